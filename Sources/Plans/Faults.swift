import Kernel

/// A named place where a test suite can make a migration fail: before and after every step,
/// at every kernel call, and on the VM state in transit. The list is generated from
/// `MigrationStep.allCases` and `KernelOperation.allCases`, so a new step or operation brings
/// its points with it.
public enum FaultPoint: Hashable, Sendable, CustomStringConvertible {
    case before(MigrationStep)
    case after(MigrationStep)
    case kernel(KernelOperation)
    /// The VM state the source saved, as the coordinator carries it to the target (only an
    /// `alter:` fault): what the target is given, checked and restored.
    case state

    /// Operations that cannot fail (close, unmap) and the probe are not fault points.
    static let faultableOperations = KernelOperation.allCases.filter { $0 != .openSystem }

    public static let all: [FaultPoint] =
        MigrationStep.allCases.flatMap { [FaultPoint.before($0), .after($0)] }
        + faultableOperations.map(FaultPoint.kernel) + [.state]

    /// The points where an operation can fail with an errno (every point but `state`).
    public static let failing: [FaultPoint] = all.filter { $0 != .state }

    /// The kernel calls whose state an `alter:` fault can change: what a target's kernel is
    /// told to set (its read-back then differs from what the source saved).
    public static let alterableOperations: Set<KernelOperation> = [.setVCPUState, .setVMState, .setMemslot]

    public var description: String {
        switch self {
        case .before(let step): "before:\(step.rawValue)"
        case .after(let step): "after:\(step.rawValue)"
        case .kernel(let operation): "kernel:\(operation.rawValue)"
        case .state: "state"
        }
    }

    public init?(_ text: String) {
        guard let point = FaultPoint.all.first(where: { $0.description == text }) else { return nil }
        self = point
    }

    /// One line for `gmigrate faults list`.
    public var explanation: String {
        switch self {
        case .before(let step): "before the effect of \(step.rawValue) (its intent is journaled)"
        case .after(let step): "after \(step.rawValue) succeeded (its outcome is journaled)"
        case .kernel(let operation) where FaultPoint.alterableOperations.contains(operation):
            "at every \(operation.rawValue) kernel call, before it is issued (also takes alter:WHAT)"
        case .kernel(let operation): "at every \(operation.rawValue) kernel call, before it is issued"
        case .state: "the VM state in transit from source to target (alter:WHAT only)"
        }
    }
}

/// One piece of the VM state an `alter:` fault breaks on purpose, to prove that the guest or
/// the checks notice (issue 12): each names what the long-mode guest or the read-back sees.
public enum StateAlteration: Hashable, Sendable, CustomStringConvertible {
    /// CPUID leaf 1 ECX bit 21 (x2APIC) cleared on every vcpu: the CPU model is no longer the target's.
    case cpuid
    /// The MSR's value moved by 0x1000 on every vcpu (0xc0000082, LSTAR: the next syscall lands elsewhere).
    case msr(UInt32)
    /// xmm3 inverted in every vcpu's XSAVE (or FPU) area: the guest's SSE check sees it.
    case xsave
    /// ymm3's upper half inverted in every vcpu's XSAVE area (its AVX component).
    case ymm
    /// The LAPIC timer's LVT masked on every vcpu: timer interrupts stop.
    case lapic
    /// The kvmclock ten seconds ahead: guest time jumps.
    case clock
    /// A section named so appended to every vcpu's state (an unknown one, or one needing a
    /// capability this host lacks, such as `nested`).
    case section(String)
    /// At `kernel:set-memslot` only: the slot bound one page above the address asked for (a
    /// target whose memory is not where the source's is; verify-bindings must see it).
    case gpa

    /// Whether this alteration changes a memslot (at kernel:set-memslot) rather than VM state.
    public var isMemslot: Bool { self == .gpa }

    public init?(_ text: String) {
        switch text {
        case "cpuid": self = .cpuid
        case "xsave": self = .xsave
        case "ymm": self = .ymm
        case "lapic": self = .lapic
        case "clock": self = .clock
        case "gpa": self = .gpa
        default:
            if text.hasPrefix("msr:"), let index = UInt32(text.dropFirst(4).replacingOccurrences(of: "0x", with: ""), radix: 16) {
                self = .msr(index)
            } else if text.hasPrefix("section:"), text.count > 8, text.count <= 8 + 255 {
                self = .section(String(text.dropFirst(8)))
            } else {
                return nil
            }
        }
    }

    public var description: String {
        switch self {
        case .cpuid: "cpuid"
        case .msr(let index): "msr:0x\(String(index, radix: 16))"
        case .xsave: "xsave"
        case .ymm: "ymm"
        case .lapic: "lapic"
        case .clock: "clock"
        case .section(let name): "section:\(name)"
        case .gpa: "gpa"
        }
    }
}

/// What happens at an armed fault point.
public enum Fault: Hashable, Sendable, CustomStringConvertible {
    /// The operation fails with this errno.
    case errno(Errno)
    /// The coordinator process exits at once, without cleanup (`_exit(FaultInjector.crashStatus)`).
    case crash
    /// The operation is delayed.
    case delay(Duration)
    /// A piece of the VM state is broken (at `state`, or a target's `kernel:set-*-state`).
    case alter(StateAlteration)

    public var description: String {
        switch self {
        case .errno(let errno): "errno:\(errno.name)"
        case .crash: "crash"
        case .delay(let duration): "delay:\(duration.text)"
        case .alter(let alteration): "alter:\(alteration)"
        }
    }
}

/// One armed fault: a point, a fault, and how many times it fires (nil: every time).
public struct FaultSpec: Hashable, Sendable, Codable, CustomStringConvertible {
    public var point: FaultPoint
    public var fault: Fault
    public var count: Int?

    public init(point: FaultPoint, fault: Fault, count: Int? = 1) {
        self.point = point
        self.fault = fault
        self.count = count
    }

    /// Parses `POINT=FAULT[*N|*]`: `before:bind-memslots=errno:ENOMEM`, `kernel:run-vcpu=crash`,
    /// `after:prepare=delay:200ms`, `kernel:set-memslot=errno:EIO*3` (three times), `...*` (always).
    public init(parsing text: String) throws(FaultSpecError) {
        guard let equals = text.firstIndex(of: "=") else { throw FaultSpecError("'\(text)': expected POINT=FAULT") }
        let pointText = String(text[..<equals])
        var faultText = String(text[text.index(after: equals)...])
        guard let point = FaultPoint(pointText) else {
            throw FaultSpecError("'\(pointText)' is not a fault point (gmigrate faults list shows them all)")
        }
        var count: Int? = 1
        if let star = faultText.lastIndex(of: "*") {
            let suffix = faultText[faultText.index(after: star)...]
            if suffix.isEmpty {
                count = nil
            } else if let n = Int(suffix), n > 0 {
                count = n
            } else {
                throw FaultSpecError("'\(faultText)': the count after '*' must be a positive number")
            }
            faultText = String(faultText[..<star])
        }
        let fault: Fault
        if faultText == "crash" {
            fault = .crash
        } else if faultText.hasPrefix("errno:"), let errno = Errno(name: String(faultText.dropFirst(6))) {
            fault = .errno(errno)
        } else if faultText.hasPrefix("delay:"), let duration = parseDuration(String(faultText.dropFirst(6))) {
            fault = .delay(duration)
        } else if faultText.hasPrefix("alter:") {
            guard let alteration = StateAlteration(String(faultText.dropFirst(6))) else {
                throw FaultSpecError("'\(faultText)': alter:WHAT takes cpuid, msr:0xINDEX, xsave, ymm, lapic, clock, section:NAME or (at kernel:set-memslot) gpa")
            }
            fault = .alter(alteration)
        } else {
            throw FaultSpecError("'\(faultText)' is not a fault (errno:ENAME, crash, delay:DURATION, alter:WHAT)")
        }
        switch (point, fault) {
        case (.kernel(.setMemslot), .alter(let alteration)) where !alteration.isMemslot,
            (.state, .alter(let alteration)) where alteration.isMemslot,
            (.kernel(_), .alter(let alteration)) where alteration.isMemslot && point != .kernel(.setMemslot):
            throw FaultSpecError("'\(text)': alter:gpa is a fault of kernel:set-memslot, and kernel:set-memslot takes only alter:gpa")
        case (.state, .alter): break
        case (.kernel(let operation), .alter) where FaultPoint.alterableOperations.contains(operation): break
        case (_, .alter):
            throw FaultSpecError("'\(text)': alter:WHAT is a fault of the state, at 'state' or at kernel:set-vcpu-state / kernel:set-vm-state (or alter:gpa at kernel:set-memslot)")
        case (.state, _):
            throw FaultSpecError("'\(text)': the point 'state' takes only alter:WHAT")
        default: break
        }
        self.init(point: point, fault: fault, count: count)
    }

    public var description: String {
        "\(point)=\(fault)" + (count == 1 ? "" : count.map { "*\($0)" } ?? "*")
    }
}

public struct FaultSpecError: Error, Equatable, Sendable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}



extension FaultSpec {
    public init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        do {
            try self.init(parsing: text)
        } catch {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: error.message))
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }
}
