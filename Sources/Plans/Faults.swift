import Kernel

/// A named place where a test suite can make a migration fail: before and after every step,
/// and at every kernel call. The list is generated from `MigrationStep.allCases` and
/// `KernelOperation.allCases`, so a new step or operation brings its points with it.
public enum FaultPoint: Hashable, Sendable, CustomStringConvertible {
    case before(MigrationStep)
    case after(MigrationStep)
    case kernel(KernelOperation)

    /// Operations that cannot fail (close, unmap) and the probe are not fault points.
    static let faultableOperations = KernelOperation.allCases.filter { $0 != .openSystem }

    public static let all: [FaultPoint] =
        MigrationStep.allCases.flatMap { [FaultPoint.before($0), .after($0)] }
        + faultableOperations.map(FaultPoint.kernel)

    public var description: String {
        switch self {
        case .before(let step): "before:\(step.rawValue)"
        case .after(let step): "after:\(step.rawValue)"
        case .kernel(let operation): "kernel:\(operation.rawValue)"
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
        case .kernel(let operation): "at every \(operation.rawValue) kernel call, before it is issued"
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

    public var description: String {
        switch self {
        case .errno(let errno): "errno:\(errno.name)"
        case .crash: "crash"
        case .delay(let duration): "delay:\(duration.text)"
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
        } else {
            throw FaultSpecError("'\(faultText)' is not a fault (errno:ENAME, crash, delay:DURATION)")
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
