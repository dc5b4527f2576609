import Foundation
import Kernel

/// The long-mode guest (longmode.S): 64-bit, paging, a GDT, an IDT and a TSS, on every vcpu;
/// its workload in ring 3, entering ring 0 through `syscall` and through LAPIC timer
/// interrupts; SSE registers held at known values; the TSC and the kvmclock checked never to
/// go back. It records what it sees in guest memory (`report`) and reports any violated
/// invariant on port 0xE9. A guest that would notice if anything of its state were lost.
public enum LongModeGuest {
    /// Where the image is loaded (and linked).
    public static let loadAddress: UInt64 = 0x1000
    /// The port a violation is reported on (its code in AL).
    public static let reportPort: UInt16 = 0xe9
    /// The timer's rate, as the guest programs it (1 GHz APIC bus / 16 / 250000).
    public static let timerHertz = 250
    /// The guest's memory must cover [0, 2 MiB): its page tables map that much.
    public static let memoryNeeded: UInt64 = 2 << 20
    /// The most vcpus the image's GDT and memory layout hold.
    public static let maxVCPUs = 16

    /// The image's bytes (longmode.bin).
    public static let image: [UInt8] = {
        guard let data = Data(base64Encoded: imageBase64, options: .ignoreUnknownCharacters) else {
            preconditionFailure("the embedded guest image is base64")
        }
        return [UInt8](data)
    }()

    /// The image's header (offsets 8…, after the jump at its start).
    public struct Header: Sendable {
        public var entry: UInt64
        public var gdt: UInt64
        public var gdtLimit: UInt16
        public var idt: UInt64
        public var cr3: UInt64
        public var blocks: UInt64
        public var blockSize: UInt64
    }

    public static let header: Header = {
        let bytes = image
        func quad(_ offset: Int) -> UInt64 { (0..<8).reduce(UInt64(0)) { $0 | UInt64(bytes[offset + $1]) << (8 * UInt64($1)) } }
        precondition(Array(bytes[8..<12]) == Array("GMLM".utf8), "the guest image starts with its header")
        return Header(
            entry: quad(16), gdt: quad(24), gdtLimit: UInt16(truncatingIfNeeded: quad(32)), idt: quad(40), cr3: quad(48), blocks: quad(56),
            blockSize: quad(64))
    }()

    /// The guest-physical address of a vcpu's block.
    public static func block(_ vcpu: Int) -> UInt64 { header.blocks + UInt64(vcpu) * header.blockSize }

    /// A vcpu's state to start the guest: 64-bit mode at the entry point, paging on, the
    /// vcpu's index in RDI, its block in RSI, its kernel stack, its TSS in TR; an application
    /// processor is made runnable (it would otherwise wait for INIT/SIPI).
    public static func boot(_ state: VCPUState, vcpu: Int) -> VCPUState {
        var state = state
        let block = block(vcpu)
        var registers = Registers()
        registers.rip = header.entry
        registers.rdi = UInt64(vcpu)
        registers.rsi = block
        registers.rsp = block + header.blockSize
        registers.rflags = 0x2
        state.registers = registers
        var special = state.specialRegisters
        special.set(
            code: Segment(base: 0, limit: 0xffff_ffff, selector: 0x08, type: 0xb, present: true, l: true, g: true),
            data: Segment(base: 0, limit: 0xffff_ffff, selector: 0x10, type: 0x3, present: true, db: true, g: true),
            task: Segment(base: block + 0x80, limit: 0x67, selector: UInt16(0x30 + 16 * vcpu), type: 0xb, present: true, s: false),
            gdt: (header.gdt, header.gdtLimit), idt: (header.idt, 256 * 16 - 1),
            cr0: 0x8005_0033,  // PG WP NE ET MP PE
            cr3: header.cr3,
            cr4: 0x620,  // OSXMMEXCPT OSFXSR PAE
            efer: 0xd01)  // NXE LMA LME SCE
        state.specialRegisters = special
        if vcpu > 0, state["mp-state"] != nil { state["mp-state"] = [0, 0, 0, 0] }  // KVM_MP_STATE_RUNNABLE
        return state
    }

    /// What a vcpu of the guest records in its user page.
    public struct VCPUReport: Codable, Equatable, Sendable {
        public var iterations: UInt64
        public var ticks: UInt64
        public var syscalls: UInt64
        public var violations: UInt64
        public var violationCode: UInt64
        public var violationExpected: UInt64
        public var violationSeen: UInt64
        public var lastTSC: UInt64
        /// kvmclock nanoseconds at the guest's last check.
        public var lastClock: UInt64
        public var maxClockStep: UInt64
        public var maxTSCStep: UInt64
        public var syscallsMade: UInt64
        public var ready: Bool
        public var checks: UInt64
        /// Whether ring 0 turned AVX on, so that ymm0..ymm7's upper halves are checked too.
        public var avx: Bool

        /// The user page's bytes (0x80 of them).
        public init(bytes: [UInt8]) {
            func quad(_ offset: Int) -> UInt64 {
                (0..<8).reduce(UInt64(0)) { $0 | UInt64(offset + $1 < bytes.count ? bytes[offset + $1] : 0) << (8 * UInt64($1)) }
            }
            iterations = quad(0x00)
            ticks = quad(0x08)
            syscalls = quad(0x10)
            violations = quad(0x18)
            violationCode = quad(0x20)
            violationExpected = quad(0x28)
            violationSeen = quad(0x30)
            lastTSC = quad(0x38)
            lastClock = quad(0x40)
            maxClockStep = quad(0x48)
            maxTSCStep = quad(0x50)
            syscallsMade = quad(0x58)
            ready = quad(0x60) != 0
            checks = quad(0x68)
            avx = quad(0x78) != 0
        }

        /// The violation in words: which register or clock, expected and seen.
        public var violationText: String? {
            guard violations > 0 else { return nil }
            let what: String
            switch violationCode {
            case 1: what = "the TSC went back"
            case 2: what = "the kvmclock went back"
            case 3: what = "a syscall was not counted by its handler (LSTAR, KERNEL_GS_BASE)"
            case 0x10...0x17: what = "xmm\(violationCode - 0x10) changed"
            case 0x20...0x27: what = "ymm\(violationCode - 0x20)'s upper half changed"
            case 0x100...0x11f: what = "exception \(violationCode - 0x100) in ring 0 or 3"
            default: what = "violation \(violationCode)"
            }
            return "\(what): expected 0x\(String(violationExpected, radix: 16)), seen 0x\(String(violationSeen, radix: 16))"
        }
    }

    /// The user page of a vcpu, where its report is.
    public static func reportAddress(_ vcpu: Int) -> UInt64 { block(vcpu) + 0x1000 }
    public static let reportBytes = 0x80
}

/// What the long-mode guest recorded, read at one moment of the host's monotonic clock.
public struct LongModeSample: Codable, Equatable, Sendable {
    public var hostNanoseconds: UInt64
    public var vcpus: [LongModeGuest.VCPUReport]

    public init(hostNanoseconds: UInt64, vcpus: [LongModeGuest.VCPUReport]) {
        self.hostNanoseconds = hostNanoseconds
        self.vcpus = vcpus
    }
}

/// What a migration must not have disturbed in the long-mode guest: from a sample taken in the
/// source before it, and two in the survivor after it.
public struct LongModeCheck: Codable, Equatable, Sendable {
    public struct VCPU: Codable, Equatable, Sendable {
        public var iterations: UInt64
        public var syscalls: UInt64
        /// Timer interrupts a second, measured in the survivor.
        public var timerHertz: Double
        /// Guest time (kvmclock) that passed across the migration, against the host's.
        public var guestElapsedNanoseconds: Int64
        public var hostElapsedNanoseconds: Int64
        /// The largest step the guest saw its kvmclock take between two of its checks, since it
        /// booted: across a migration it may grow to the blackout, not beyond.
        public var largestClockStepNanoseconds: UInt64
        /// Whether the guest holds AVX state (ymm upper halves) and checks it.
        public var avx: Bool
        public var violation: String?
    }

    public var vcpus: [VCPU]
    public var problems: [String]
    public var passed: Bool { problems.isEmpty }

    public init(vcpus: [VCPU], problems: [String]) {
        self.vcpus = vcpus
        self.problems = problems
    }

    /// The tolerance between guest and host time across a migration (the guest checks its clock
    /// every few microseconds of work, or after an idle of at most one timer period).
    public static let clockTolerance: Int64 = 100_000_000

    /// Checks every vcpu: no violation reported, its work and its syscalls continued, its timer
    /// ticks at its rate (within half of it either way), its kvmclock advanced as the host's time
    /// did (neither frozen nor jumped), and no step of its kvmclock between two of its checks
    /// made during the migration was longer than the blackout (plus the tolerance).
    public static func check(
        before: LongModeSample, after first: LongModeSample, later second: LongModeSample, blackoutNanoseconds: Int64? = nil
    ) -> LongModeCheck {
        var problems: [String] = []
        var vcpus: [VCPU] = []
        guard before.vcpus.count == first.vcpus.count, first.vcpus.count == second.vcpus.count, !before.vcpus.isEmpty else {
            return LongModeCheck(vcpus: [], problems: ["the guest reports \(before.vcpus.count), then \(first.vcpus.count) vcpus"])
        }
        let window = Double(Int64(bitPattern: second.hostNanoseconds &- first.hostNanoseconds)) / 1e9
        for index in before.vcpus.indices {
            let (a, b, c) = (before.vcpus[index], first.vcpus[index], second.vcpus[index])
            let hertz = window > 0 ? Double(Int64(bitPattern: c.ticks &- b.ticks)) / window : 0
            let guestElapsed = Int64(bitPattern: b.lastClock &- a.lastClock)
            let hostElapsed = Int64(bitPattern: first.hostNanoseconds &- before.hostNanoseconds)
            let vcpu = VCPU(
                iterations: c.iterations, syscalls: c.syscalls, timerHertz: hertz, guestElapsedNanoseconds: guestElapsed,
                hostElapsedNanoseconds: hostElapsed, largestClockStepNanoseconds: c.maxClockStep, avx: c.avx, violation: c.violationText)
            vcpus.append(vcpu)
            if let violation = c.violationText { problems.append("vcpu \(index): \(violation)") }
            if c.iterations <= a.iterations { problems.append("vcpu \(index): its work did not continue (\(a.iterations) before, \(c.iterations) after)") }
            if let blackout = blackoutNanoseconds, b.maxClockStep > a.maxClockStep,
                Int64(clamping: b.maxClockStep) > blackout + clockTolerance
            {
                problems.append(
                    "vcpu \(index): its kvmclock jumped \(b.maxClockStep / 1_000_000) ms between two checks during a blackout of \(blackout / 1_000_000) ms")
            }
            if a.avx && !c.avx { problems.append("vcpu \(index): its AVX state is gone") }
            if c.syscalls <= a.syscalls { problems.append("vcpu \(index): its syscalls did not continue (\(a.syscalls) before, \(c.syscalls) after)") }
            let rate = Double(LongModeGuest.timerHertz)
            if hertz < rate / 2 || hertz > rate * 1.5 { problems.append("vcpu \(index): its timer ticks at \(Int(hertz)) Hz, not \(LongModeGuest.timerHertz)") }
            if abs(guestElapsed - hostElapsed) > clockTolerance {
                problems.append("vcpu \(index): its kvmclock advanced \(guestElapsed / 1_000_000) ms while the host's advanced \(hostElapsed / 1_000_000) ms")
            }
        }
        return LongModeCheck(vcpus: vcpus, problems: problems)
    }
}
