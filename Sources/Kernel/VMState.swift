import CKVM
import Glibc

/// One piece of a VM's architectural state, as KVM hands it out: a named section holding the
/// kernel's exact bytes (so that a save and restore loses nothing), with the capabilities a
/// host needs to restore it. docs/vmstate.md lists every section, its ioctls and its order.
public struct StateSection: Hashable, Sendable, Codable {
    public var name: String
    public var bytes: [UInt8]

    public init(name: String, bytes: [UInt8]) {
        self.name = name
        self.bytes = bytes
    }

    /// What a section is: its name, what a host needs to restore it, and whose state it is.
    public struct Kind: Sendable {
        public var name: String
        /// The capabilities (`KVM_CHECK_EXTENSION`) a host must report to restore it.
        public var capabilities: [Capability]
        /// The get and set ioctls, for people (docs/vmstate.md, the VMM's per-section log).
        public var ioctls: String
        public var perVCPU: Bool
    }

    /// Every section this version knows. A state with any other is refused by its decoder:
    /// a target never silently drops a piece of state it does not understand.
    public static let kinds: [String: Kind] = {
        let list: [Kind] = [
            Kind(name: "cpuid", capabilities: [.extCPUID], ioctls: "KVM_GET_CPUID2 / KVM_SET_CPUID2", perVCPU: true),
            Kind(name: "regs", capabilities: [], ioctls: "KVM_GET_REGS / KVM_SET_REGS", perVCPU: true),
            Kind(name: "sregs", capabilities: [], ioctls: "KVM_GET_SREGS / KVM_SET_SREGS", perVCPU: true),
            Kind(name: "sregs2", capabilities: [.sregs2], ioctls: "KVM_GET_SREGS2 / KVM_SET_SREGS2", perVCPU: true),
            Kind(name: "fpu", capabilities: [], ioctls: "KVM_GET_FPU / KVM_SET_FPU", perVCPU: true),
            Kind(name: "xsave", capabilities: [.xsave2], ioctls: "KVM_GET_XSAVE2 / KVM_SET_XSAVE", perVCPU: true),
            Kind(name: "xcrs", capabilities: [.xcrs], ioctls: "KVM_GET_XCRS / KVM_SET_XCRS", perVCPU: true),
            Kind(name: "msrs", capabilities: [], ioctls: "KVM_GET_MSRS / KVM_SET_MSRS (every MSR of KVM_GET_MSR_INDEX_LIST the vcpu reads back)", perVCPU: true),
            Kind(name: "mp-state", capabilities: [.mpState], ioctls: "KVM_GET_MP_STATE / KVM_SET_MP_STATE", perVCPU: true),
            Kind(name: "lapic", capabilities: [.irqchip], ioctls: "KVM_GET_LAPIC / KVM_SET_LAPIC", perVCPU: true),
            Kind(name: "events", capabilities: [.vcpuEvents], ioctls: "KVM_GET_VCPU_EVENTS / KVM_SET_VCPU_EVENTS", perVCPU: true),
            Kind(name: "debugregs", capabilities: [.debugRegisters], ioctls: "KVM_GET_DEBUGREGS / KVM_SET_DEBUGREGS", perVCPU: true),
            Kind(name: "tsc-khz", capabilities: [.getTSCKhz], ioctls: "KVM_GET_TSC_KHZ / KVM_SET_TSC_KHZ (where KVM_CAP_TSC_CONTROL; else checked equal)", perVCPU: true),
            Kind(name: "tsc-offset", capabilities: [.vcpuAttributes], ioctls: "KVM_GET_DEVICE_ATTR / KVM_SET_DEVICE_ATTR (KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET)", perVCPU: true),
            Kind(name: "nested", capabilities: [.nestedState], ioctls: "KVM_GET_NESTED_STATE / KVM_SET_NESTED_STATE", perVCPU: true),
            Kind(name: "pic-master", capabilities: [.irqchip], ioctls: "KVM_GET_IRQCHIP / KVM_SET_IRQCHIP (KVM_IRQCHIP_PIC_MASTER)", perVCPU: false),
            Kind(name: "pic-slave", capabilities: [.irqchip], ioctls: "KVM_GET_IRQCHIP / KVM_SET_IRQCHIP (KVM_IRQCHIP_PIC_SLAVE)", perVCPU: false),
            Kind(name: "ioapic", capabilities: [.irqchip], ioctls: "KVM_GET_IRQCHIP / KVM_SET_IRQCHIP (KVM_IRQCHIP_IOAPIC)", perVCPU: false),
            Kind(name: "pit2", capabilities: [.pit2], ioctls: "KVM_GET_PIT2 / KVM_SET_PIT2", perVCPU: false),
            Kind(name: "clock", capabilities: [.adjustClock], ioctls: "KVM_GET_CLOCK / KVM_SET_CLOCK (with the flags it returned)", perVCPU: false),
        ]
        return Dictionary(uniqueKeysWithValues: list.map { ($0.name, $0) })
    }()

    public var kind: Kind? { StateSection.kinds[name] }
}

/// Everything of one vcpu that moves, as sections. The model has `regs`, `sregs` and `fpu`;
/// Linux every section this host's KVM offers (docs/vmstate.md), restored in KVM's order
/// whatever their order here.
public struct VCPUState: Hashable, Sendable, Codable {
    public var sections: [StateSection]

    public init(sections: [StateSection]) { self.sections = sections }

    /// Only the named sections: what a VMM sets when it boots a vcpu, leaving the rest as KVM
    /// made it (writing back MSRs read before KVM_SET_CPUID2 may be refused).
    public func only(_ names: Set<String>) -> VCPUState {
        VCPUState(sections: sections.filter { names.contains($0.name) })
    }

    /// The register sections a boot sets.
    public static let bootSections: Set<String> = ["regs", "sregs", "sregs2"]

    /// A state of the three sections every backend has.
    public init(registers: Registers, specialRegisters: SpecialRegisters, fpu: FPUState) {
        sections = [
            StateSection(name: "regs", bytes: registers.bytes), StateSection(name: "sregs", bytes: specialRegisters.bytes),
            StateSection(name: "fpu", bytes: fpu.bytes),
        ]
    }

    public subscript(_ name: String) -> [UInt8]? {
        get { sections.first { $0.name == name }?.bytes }
        set {
            if let index = sections.firstIndex(where: { $0.name == name }) {
                if let newValue { sections[index].bytes = newValue } else { sections.remove(at: index) }
            } else if let newValue {
                sections.append(StateSection(name: name, bytes: newValue))
            }
        }
    }

    /// The general-purpose registers (`regs`).
    public var registers: Registers {
        get { self["regs"].map(Registers.init(bytes:)) ?? Registers() }
        set { self["regs"] = newValue.bytes }
    }

    /// The special registers (`sregs`, or the same leading fields of `sregs2`).
    public var specialRegisters: SpecialRegisters {
        get {
            if let bytes = self["sregs"] { return SpecialRegisters(bytes: bytes) }
            if let bytes = self["sregs2"] { return SpecialRegisters(sregs2: bytes) }
            return SpecialRegisters(kvm_sregs())
        }
        set {
            if self["sregs"] != nil || self["sregs2"] == nil {
                self["sregs"] = newValue.bytes
            } else if var bytes = self["sregs2"] {
                newValue.write(intoSregs2: &bytes)
                self["sregs2"] = bytes
            }
        }
    }

    /// The x87/SSE state of a backend without XSAVE (`fpu`); nil where `xsave` carries it.
    public var fpu: FPUState? {
        get { self["fpu"].map(FPUState.init(bytes:)) }
        set { self["fpu"] = newValue?.bytes }
    }

    /// The x87 control word, from `fpu` or the legacy area of `xsave` (FXSAVE layout: FCW at byte 0).
    public var x87ControlWord: UInt16? {
        if let fpu { return fpu.fcw }
        return self["xsave"].map { $0.loadLE(UInt16.self, at: 0) }
    }

    /// The value of one MSR in the `msrs` section.
    public func msr(_ index: UInt32) -> UInt64? { MSRList(bytes: self["msrs"] ?? []).entries.first { $0.index == index }?.value }
}

/// The `msrs` section: `struct kvm_msr_entry` records (index, reserved, value).
public struct MSRList: Hashable, Sendable {
    public struct Entry: Hashable, Sendable {
        public var index: UInt32
        public var value: UInt64
        public init(index: UInt32, value: UInt64) {
            self.index = index
            self.value = value
        }
    }

    public var entries: [Entry]

    /// KVM's paravirtual MSRs and the KVM_FEATURE_* bit (CPUID 0x40000001 EAX) that offers each
    /// (Documentation/virt/kvm/x86/msr.rst, cpuid.rst).
    public static let paravirtual: [UInt32: Int] = [
        0x11: 0, 0x12: 0,  // MSR_KVM_WALL_CLOCK, MSR_KVM_SYSTEM_TIME: CLOCKSOURCE
        0x4b56_4d00: 3, 0x4b56_4d01: 3,  // the _NEW pair: CLOCKSOURCE2
        0x4b56_4d02: 4,  // ASYNC_PF_EN: ASYNC_PF
        0x4b56_4d03: 5,  // STEAL_TIME
        0x4b56_4d04: 6,  // PV_EOI_EN: PV_EOI
        0x4b56_4d05: 12,  // POLL_CONTROL
        0x4b56_4d06: 14, 0x4b56_4d07: 14,  // ASYNC_PF_INT, ASYNC_PF_ACK: ASYNC_PF_INT
        0x4b56_4d08: 17,  // MIGRATION_CONTROL
    ]

    /// The KVM features a CPUID offers (leaf 0x40000001 EAX, under the "KVMKVMKVM" signature
    /// at 0x40000000); none without that leaf.
    public static func paravirtualFeatures(_ cpuid: [CPUIDEntry]) -> UInt32 {
        guard let signature = cpuid.first(where: { $0.function == 0x4000_0000 }),
            signature.ebx == 0x4b4d_564b, signature.ecx == 0x564b_4d56, signature.edx == 0x4d
        else { return 0 }
        return cpuid.first { $0.function == 0x4000_0001 }?.eax ?? 0
    }

    /// Whether MSR `index` belongs in a vcpu's state: any non-paravirtual MSR, a paravirtual one
    /// only where `features` offers it.
    public static func isOffered(_ index: UInt32, features: UInt32) -> Bool {
        guard let bit = paravirtual[index] else { return true }
        return features & (1 << UInt32(bit)) != 0
    }

    public init(entries: [Entry]) { self.entries = entries }

    public init(bytes: [UInt8]) {
        var entries: [Entry] = []
        var offset = 0
        while offset + 16 <= bytes.count {
            entries.append(Entry(index: bytes.loadLE(UInt32.self, at: offset), value: bytes.loadLE(UInt64.self, at: offset + 8)))
            offset += 16
        }
        self.entries = entries
    }

    public var bytes: [UInt8] {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(entries.count * 16)
        for entry in entries {
            bytes.appendLE(entry.index)
            bytes.appendLE(UInt32(0))
            bytes.appendLE(entry.value)
        }
        return bytes
    }

    /// Names for the MSRs people ask about.
    public static func name(_ index: UInt32) -> String {
        let names: [UInt32: String] = [
            0x10: "IA32_TSC", 0x1b: "IA32_APIC_BASE", 0x3b: "IA32_TSC_ADJUST", 0x174: "SYSENTER_CS", 0x175: "SYSENTER_ESP",
            0x176: "SYSENTER_EIP", 0x277: "PAT", 0x6e0: "TSC_DEADLINE", 0xc0000080: "EFER", 0xc0000081: "STAR", 0xc0000082: "LSTAR",
            0xc0000083: "CSTAR", 0xc0000084: "SFMASK", 0xc0000102: "KERNEL_GS_BASE", 0xc0000103: "TSC_AUX",
            0x4b564d00: "KVM_WALL_CLOCK_NEW", 0x4b564d01: "KVM_SYSTEM_TIME_NEW", 0x4b564d02: "KVM_ASYNC_PF_EN",
            0x4b564d03: "KVM_STEAL_TIME", 0x4b564d04: "KVM_PV_EOI_EN",
        ]
        return names[index] ?? "0x\(String(index, radix: 16))"
    }
}

/// One CPUID leaf as `struct kvm_cpuid_entry2` holds it.
public struct CPUIDEntry: Hashable, Sendable, Codable {
    public var function: UInt32
    public var index: UInt32
    public var flags: UInt32
    public var eax: UInt32, ebx: UInt32, ecx: UInt32, edx: UInt32

    public init(function: UInt32, index: UInt32, flags: UInt32, eax: UInt32, ebx: UInt32, ecx: UInt32, edx: UInt32) {
        self.function = function
        self.index = index
        self.flags = flags
        self.eax = eax
        self.ebx = ebx
        self.ecx = ecx
        self.edx = edx
    }

    /// The CPU model a VMM gives vcpu `id`: the kernel's supported CPUID with the fields that name
    /// a CPU made the vcpu's own. KVM_GET_SUPPORTED_CPUID passes through the host's leaf 1 EBX
    /// (and leaf 0xB/0x1F EDX), whose initial APIC ID is that of whichever host CPU ran the ioctl,
    /// so two VMMs on one host would otherwise disagree; like QEMU, gmigrate sets it to the vcpu id.
    public static func forVCPU(_ supported: [CPUIDEntry], id: UInt32) -> [CPUIDEntry] {
        supported.map { entry in
            var entry = entry
            switch entry.function {
            case 0x1: entry.ebx = (entry.ebx & 0x00FF_FFFF) | ((id & 0xFF) << 24)
            case 0xB, 0x1F: entry.edx = id
            default: break
            }
            return entry
        }
    }

    /// The entries without the bits KVM rewrites as the guest runs (kvm_update_cpuid_runtime):
    /// leaf 1 OSXSAVE (CR4) and APIC (APIC_BASE), leaf 7 OSPKE (CR4), and leaf 0xD's XSAVE area
    /// sizes (XCR0, XSS). A running vcpu's CPUID differs from its CPU model in these alone.
    public static func withoutRuntimeBits(_ entries: [CPUIDEntry]) -> [CPUIDEntry] {
        entries.map(\.withoutRuntimeBits)
    }

    /// This entry without the bits KVM rewrites as the guest runs (`withoutRuntimeBits`).
    public var withoutRuntimeBits: CPUIDEntry {
        var entry = self
        switch (entry.function, entry.index) {
        case (0x1, _):
            entry.ecx &= ~(UInt32(1) << 27)
            entry.edx &= ~(UInt32(1) << 9)
        case (0x7, 0): entry.ecx &= ~(UInt32(1) << 4)
        case (0xD, 0), (0xD, 1): entry.ebx = 0
        default: break
        }
        return entry
    }

    /// Whether the `cpuid` section `bytes` holds `stripped` (entries without their runtime
    /// bits), in order, but for its own runtime bits: `withoutRuntimeBits(list(bytes)) ==
    /// stripped`, read straight from the bytes. A target asks it twice of every vcpu inside the
    /// blackout (its check and its restore), where building and stripping the lists took
    /// 10-20 µs a vcpu on this nested host.
    public static func sameButRuntimeBits(_ bytes: [UInt8], _ stripped: [CPUIDEntry]) -> Bool {
        guard bytes.count / 40 == stripped.count else { return false }
        return bytes.withUnsafeBytes { raw in
            func field(_ offset: Int) -> UInt32 { UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: offset, as: UInt32.self)) }
            for (number, wanted) in stripped.enumerated() {
                let at = number * 40
                let entry = CPUIDEntry(
                    function: field(at), index: field(at + 4), flags: field(at + 8), eax: field(at + 12), ebx: field(at + 16),
                    ecx: field(at + 20), edx: field(at + 24))
                if entry.withoutRuntimeBits != wanted { return false }
            }
            return true
        }
    }

    /// How CPUID `source` differs from `target`, leaf by leaf (the first difference, named with
    /// its leaf and register); nil when they are the same.
    public static func difference(_ source: [CPUIDEntry], _ target: [CPUIDEntry]) -> String? {
        guard source != target else { return nil }
        let key = { (entry: CPUIDEntry) in "\(entry.function).\(entry.index)" }
        let targetLeaves = Dictionary(target.map { (key($0), $0) }, uniquingKeysWith: { a, _ in a })
        for leaf in source {
            let name = "leaf 0x\(String(leaf.function, radix: 16)).\(leaf.index)"
            guard let other = targetLeaves[key(leaf)] else { return "\(name) is the source's, not the target's" }
            for (register, a, b) in [("eax", leaf.eax, other.eax), ("ebx", leaf.ebx, other.ebx), ("ecx", leaf.ecx, other.ecx), ("edx", leaf.edx, other.edx)]
            where a != b {
                return "\(name) \(register): source 0x\(String(a, radix: 16)), target 0x\(String(b, radix: 16))"
            }
        }
        return source.count == target.count ? "the leaves differ in flags or order" : "the source has \(source.count) leaves, the target \(target.count)"
    }

    /// The `cpuid` section: 40-byte records.
    public static func list(_ bytes: [UInt8]) -> [CPUIDEntry] {
        stride(from: 0, to: bytes.count - 39, by: 40).map { offset in
            CPUIDEntry(
                function: bytes.loadLE(UInt32.self, at: offset), index: bytes.loadLE(UInt32.self, at: offset + 4),
                flags: bytes.loadLE(UInt32.self, at: offset + 8), eax: bytes.loadLE(UInt32.self, at: offset + 12),
                ebx: bytes.loadLE(UInt32.self, at: offset + 16), ecx: bytes.loadLE(UInt32.self, at: offset + 20),
                edx: bytes.loadLE(UInt32.self, at: offset + 24))
        }
    }

    public static func bytes(_ entries: [CPUIDEntry]) -> [UInt8] {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(entries.count * 40)
        for entry in entries {
            bytes.appendLE(entry.function)
            bytes.appendLE(entry.index)
            bytes.appendLE(entry.flags)
            bytes.appendLE(entry.eax)
            bytes.appendLE(entry.ebx)
            bytes.appendLE(entry.ecx)
            bytes.appendLE(entry.edx)
            bytes.append(contentsOf: repeatElement(0, count: 12))  // padding[3]
        }
        return bytes
    }
}

/// A whole VM's state: its own sections (irqchip, PIT, clock) and each vcpu's.
///
/// It travels in a versioned, self-describing binary format: a section it does not know, or a
/// host that lacks a capability a section needs, is refused with an error naming it — before
/// anything is restored, so that the migration rolls back.
///
///     "GMVS" | version: u16 | VM sections: u16 | vcpus: u16 | VM sections | per vcpu: count u16, sections
///     section: name length u8 | name | capabilities u8 | each capability u16 | length u32 | bytes
///
/// Little-endian throughout.
public struct VMState: Hashable, Sendable {
    public static let magic: [UInt8] = Array("GMVS".utf8)
    public static let version: UInt16 = 1
    /// The largest section accepted (an xsave area is a few KiB; a CPUID list 3 KiB).
    public static let maxSectionBytes = 1 << 20

    public var vm: [StateSection]
    public var vcpus: [VCPUState]

    public init(vm: [StateSection], vcpus: [VCPUState]) {
        self.vm = vm
        self.vcpus = vcpus
    }

    public var encoded: [UInt8] {
        // One allocation, as a rule: a section's header is its name and a few bytes.
        var bytes = [UInt8]()
        bytes.reserveCapacity((vm + vcpus.flatMap(\.sections)).reduce(64) { $0 + $1.bytes.count + $1.name.utf8.count + 32 })
        VMState.appendHead(vm: vm, vcpus: vcpus.count, to: &bytes)
        for vcpu in vcpus { VMState.append(vcpu, to: &bytes) }
        return bytes
    }

    /// The encoding's first part: its header and the VM's sections. The whole encoding is this
    /// and each vcpu's part (`encoded(_:)`), in order: a source can send each part as soon as
    /// it is saved, and a target can set each as it comes (`StreamDecoder`).
    public static func encodedHead(vm: [StateSection], vcpus: Int) -> [UInt8] {
        var bytes = [UInt8]()
        bytes.reserveCapacity(vm.reduce(16) { $0 + $1.bytes.count + $1.name.utf8.count + 32 })
        appendHead(vm: vm, vcpus: vcpus, to: &bytes)
        return bytes
    }

    /// One vcpu's part of the encoding.
    public static func encoded(_ vcpu: VCPUState) -> [UInt8] {
        var bytes = [UInt8]()
        bytes.reserveCapacity(vcpu.sections.reduce(2) { $0 + $1.bytes.count + $1.name.utf8.count + 32 })
        append(vcpu, to: &bytes)
        return bytes
    }

    private static func appendHead(vm: [StateSection], vcpus: Int, to bytes: inout [UInt8]) {
        bytes += VMState.magic
        bytes.appendLE(VMState.version)
        bytes.appendLE(UInt16(truncatingIfNeeded: vm.count))
        bytes.appendLE(UInt16(truncatingIfNeeded: vcpus))
        for section in vm { append(section, to: &bytes) }
    }

    private static func append(_ vcpu: VCPUState, to bytes: inout [UInt8]) {
        bytes.appendLE(UInt16(truncatingIfNeeded: vcpu.sections.count))
        for section in vcpu.sections { append(section, to: &bytes) }
    }

    private static func append(_ section: StateSection, to bytes: inout [UInt8]) {
        let name = Array(section.name.utf8)
        bytes.append(UInt8(truncatingIfNeeded: name.count))
        bytes += name
        let capabilities = section.kind?.capabilities ?? []
        bytes.append(UInt8(truncatingIfNeeded: capabilities.count))
        for capability in capabilities { bytes.appendLE(UInt16(truncatingIfNeeded: capability.rawValue)) }
        bytes.appendLE(UInt32(truncatingIfNeeded: section.bytes.count))
        bytes += section.bytes
    }

    /// Decodes a state, refusing anything this version does not know.
    public init(decoding bytes: [UInt8]) throws(VMStateError) {
        var decoder = StreamDecoder()
        _ = try decoder.feed(bytes)
        guard let state = decoder.state else {
            // Short of a header: garbage, or the start of one.
            guard bytes.count >= 10 || VMState.magic.starts(with: bytes.prefix(4)) else { throw VMStateError("not a VM state (no GMVS magic)") }
            throw VMStateError("the state ends inside a section (at byte \(decoder.consumed))")
        }
        guard decoder.consumed == bytes.count else { throw VMStateError("\(bytes.count - decoder.consumed) bytes after the last vcpu") }
        self = state
    }

    /// Decodes a state as its bytes come, in pieces of any size: each `feed` answers the parts
    /// it completed (the head, then each vcpu as its last section comes), so that a target sets
    /// them while the source still saves the next. Anything this version does not know is
    /// refused as soon as it comes, as `init(decoding:)` refuses it.
    public struct StreamDecoder: Sendable {
        /// A completed part: the VM's sections and how many vcpus follow, or one vcpu.
        public enum Part: Equatable, Sendable {
            case head(vm: [StateSection], vcpus: Int)
            case vcpu(index: Int, VCPUState)
        }

        private var buffer: [UInt8] = []
        /// Bytes of `buffer` decoded (whole sections and headers).
        private var offset = 0
        /// Bytes dropped from `buffer`'s front once decoded.
        private var dropped = 0
        private var vmCount: Int?
        private var vcpuCount = 0
        private var vm: [StateSection] = []
        private var vcpus: [VCPUState] = []
        /// The sections of the vcpu being decoded, and how many it has.
        private var current: (count: Int, sections: [StateSection])?

        public init() {}

        /// Every byte fed that belongs to the state (a byte after its end is not).
        public var consumed: Int { dropped + offset }

        /// The whole state, once its last vcpu came.
        public var state: VMState? { isComplete ? VMState(vm: vm, vcpus: vcpus) : nil }

        public var isComplete: Bool { vmCount != nil && vm.count == vmCount && vcpus.count == vcpuCount }

        /// Takes the next bytes; answers the parts they completed.
        public mutating func feed(_ bytes: [UInt8]) throws(VMStateError) -> [Part] {
            if offset > 0 {
                buffer.removeFirst(offset)
                dropped += offset
                offset = 0
            }
            buffer += bytes
            var parts: [Part] = []
            while !isComplete {
                var reader = Reader(bytes: buffer, offset: offset)
                guard let vmCount else {
                    guard reader.left >= 10 else { break }
                    guard try reader.take(4) == VMState.magic else { throw VMStateError("not a VM state (no GMVS magic)") }
                    let version = try reader.u16()
                    guard version == VMState.version else {
                        throw VMStateError("VM state version \(version); this gmigrate reads version \(VMState.version)")
                    }
                    self.vmCount = Int(try reader.u16())
                    vcpuCount = Int(try reader.u16())
                    offset = reader.offset
                    if self.vmCount == 0 { parts.append(.head(vm: [], vcpus: vcpuCount)) }
                    continue
                }
                if vm.count < vmCount {
                    guard let section = try reader.section(perVCPU: false) else { break }
                    vm.append(section)
                    offset = reader.offset
                    if vm.count == vmCount { parts.append(.head(vm: vm, vcpus: vcpuCount)) }
                    continue
                }
                guard let (count, sections) = current else {
                    guard reader.left >= 2 else { break }
                    current = (Int(try reader.u16()), [])
                    offset = reader.offset
                    continue
                }
                if sections.count < count {
                    guard let section = try reader.section(perVCPU: true) else { break }
                    current = (count, sections + [section])
                    offset = reader.offset
                    continue
                }
                vcpus.append(VCPUState(sections: sections))
                current = nil
                parts.append(.vcpu(index: vcpus.count - 1, VCPUState(sections: sections)))
            }
            return parts
        }
    }

    /// Every capability some section of this state needs.
    public var neededCapabilities: Set<Capability> {
        Set((vm + vcpus.flatMap(\.sections)).flatMap { $0.kind?.capabilities ?? [] })
    }

    /// The capabilities this state needs that `has` says a host lacks: each named with its section.
    public func missingCapabilities(_ has: (Capability) -> Bool) -> [String] {
        let sections = vm + vcpus.flatMap(\.sections)
        var missing: [String] = []
        for section in sections {
            for capability in section.kind?.capabilities ?? [] where !has(capability) {
                let text = "section '\(section.name)' needs capability \(capability.rawValue)"
                if !missing.contains(text) { missing.append(text) }
            }
        }
        return missing
    }

    private struct Reader {
        let bytes: [UInt8]
        var offset: Int
        var left: Int { bytes.count - offset }

        mutating func take(_ count: Int) throws(VMStateError) -> [UInt8] {
            guard count >= 0, left >= count else { throw VMStateError("the state ends inside a section (at byte \(offset))") }
            defer { offset += count }
            return Array(bytes[offset..<(offset + count)])
        }
        mutating func u8() throws(VMStateError) -> UInt8 { try take(1)[0] }
        mutating func u16() throws(VMStateError) -> UInt16 { try take(2).loadLE(UInt16.self, at: 0) }
        mutating func u32() throws(VMStateError) -> UInt32 { try take(4).loadLE(UInt32.self, at: 0) }

        /// The next section; nil while not all of it is there yet (a section longer than the
        /// largest accepted is refused as soon as its length is).
        mutating func section(perVCPU: Bool) throws(VMStateError) -> StateSection? {
            guard left >= 1 else { return nil }
            let nameLength = Int(try u8())
            guard left >= nameLength + 1 else { return nil }
            let name = String(decoding: try take(nameLength), as: UTF8.self)
            let capabilityCount = Int(try u8())
            guard left >= capabilityCount * 2 + 4 else { return nil }
            var capabilities: [Int] = []
            for _ in 0..<capabilityCount { capabilities.append(Int(try u16())) }
            let length = Int(try u32())
            guard length <= VMState.maxSectionBytes else { throw VMStateError("section '\(name)' of \(length) bytes (at most \(VMState.maxSectionBytes))") }
            guard left >= length else { return nil }
            let body = try take(length)
            guard let kind = StateSection.kinds[name] else {
                throw VMStateError("section '\(name)' (\(length) bytes, needs capabilities \(capabilities)) is unknown to this VMM: it cannot restore it")
            }
            guard kind.perVCPU == perVCPU else { throw VMStateError("section '\(name)' is not a \(perVCPU ? "vcpu" : "VM") section") }
            return StateSection(name: name, bytes: body)
        }
    }
}

/// Why a VM state cannot be decoded or restored: the message names the section.
public struct VMStateError: Error, Equatable, Sendable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

extension Array where Element == UInt8 {
    /// The little-endian integer at `offset` (bytes past the end read as zero).
    public func loadLE<T: FixedWidthInteger>(_ type: T.Type, at offset: Int) -> T {
        var value: T = 0
        for index in 0..<MemoryLayout<T>.size where offset + index < count {
            value |= T(self[offset + index]) << (8 * index)
        }
        return value
    }

    /// Writes `value` little-endian at `offset` (bytes past the end are not written).
    public mutating func storeLE<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        for index in 0..<MemoryLayout<T>.size where offset + index < count {
            self[offset + index] = UInt8(truncatingIfNeeded: value >> (8 * index))
        }
    }

    public mutating func appendLE<T: FixedWidthInteger>(_ value: T) {
        for index in 0..<MemoryLayout<T>.size { append(UInt8(truncatingIfNeeded: value >> (8 * index))) }
    }
}

extension VMState {
    /// The VM sections a read-back does not compare (nor read): time moves them by itself.
    public static let uncomparedVMSections: Set<String> = ["clock", "pit2"]

    /// How a restored state differs from the saved one, section by section, or nil if it does
    /// not: the first difference, naming the section and the field (the register, the MSR, the
    /// byte). What time moves by itself is not compared: the kvmclock and the PIT's counters
    /// (the clock is set to advance), the LAPIC's current timer count, and the TSC MSR when the TSC
    /// offset is what carries the guest's TSC (the offset is compared).
    public static func difference(restored: VMState, saved: VMState) -> String? {
        for section in saved.vm where !uncomparedVMSections.contains(section.name) {
            guard let back = restored.vm.first(where: { $0.name == section.name })?.bytes else { return "VM section \(section.name): not read back" }
            if let where_ = firstDifference(back, section.bytes) { return "VM section \(section.name): \(where_)" }
        }
        guard restored.vcpus.count == saved.vcpus.count else { return "\(restored.vcpus.count) vcpus read back, \(saved.vcpus.count) saved" }
        for (index, (back, saved)) in zip(restored.vcpus, saved.vcpus).enumerated() {
            if let difference = VCPUState.difference(restored: back, saved: saved) { return "vcpu \(index): \(difference)" }
        }
        return nil
    }

    /// Whether `a` and `b` hold the same bytes (memcmp).
    static func sameBytes(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        a.count == b.count && a.withUnsafeBytes { x in
            b.withUnsafeBytes { y in
                guard let p = x.baseAddress, let q = y.baseAddress else { return true }
                return memcmp(p, q, x.count) == 0
            }
        }
    }

    static func firstDifference(_ a: [UInt8], _ b: [UInt8], ignoring ignored: [Range<Int>] = [], name: (Int) -> String = { "byte \($0)" }) -> String? {
        guard a.count == b.count else { return "\(a.count) bytes read back, \(b.count) saved" }
        // Equal bytes, the read-back's usual case, in one memcmp (the byte loop below took
        // several microseconds of the blackout for an XSAVE area).
        if sameBytes(a, b) { return nil }
        for index in 0..<a.count where a[index] != b[index] && !ignored.contains(where: { $0.contains(index) }) {
            return "\(name(index)): 0x\(String(b[index], radix: 16)) saved, 0x\(String(a[index], radix: 16)) read back"
        }
        return nil
    }
}

extension VCPUState {
    /// The LAPIC registers a read-back does not compare, because KVM derives them:
    /// - the current count (TMCCT, 0x390), which runs down by itself;
    /// - the processor priority (PPR, 0xA0), which KVM computes from the task priority and the
    ///   in-service vectors (both compared). KVM_SET_LAPIC computes it before it recounts the
    ///   in-service vectors (`kvm_apic_set_state` calls `apic_update_ppr` before
    ///   `kvm_apic_update_apicv`), so a vcpu stopped inside an interrupt handler reads back its
    ///   task priority alone there until KVM next updates it, which it does before it delivers
    ///   an interrupt or the guest reads the register. It failed about one migration in 25 here.
    public static let derivedLAPICRegisters: [Range<Int>] = [0x390..<0x394, 0xa0..<0xa4]

    /// Whether two MSR lists hold the same indices in the same order and the same values (the
    /// TSC's aside where `skippingTSC`); false says only that a comparison by index is needed.
    /// For lists of distinct indices (a save reads KVM's index list, which names each MSR once)
    /// it answers what that comparison would.
    static func sameMSRsInOrder(_ a: [UInt8], _ b: [UInt8], skippingTSC: Bool) -> Bool {
        guard a.count == b.count, a.count % 16 == 0 else { return false }
        return a.withUnsafeBytes { x in
            b.withUnsafeBytes { y in
                for offset in stride(from: 0, to: x.count, by: 16) {
                    let index = x.loadUnaligned(fromByteOffset: offset, as: UInt32.self)
                    guard index == y.loadUnaligned(fromByteOffset: offset, as: UInt32.self) else { return false }
                    if skippingTSC && UInt32(littleEndian: index) == 0x10 { continue }
                    guard x.loadUnaligned(fromByteOffset: offset + 8, as: UInt64.self) == y.loadUnaligned(fromByteOffset: offset + 8, as: UInt64.self) else { return false }
                }
                return true
            }
        }
    }

    public static func difference(restored: VCPUState, saved: VCPUState) -> String? {
        for section in saved.sections {
            guard let back = restored[section.name] else { return "section \(section.name): not read back" }
            switch section.name {
            case "regs":
                if let where_ = VMState.firstDifference(back, section.bytes, name: { "\(Registers.field(at: $0)) (byte \($0))" }) {
                    return "section regs: \(where_)"
                }
            case "lapic":
                if let where_ = VMState.firstDifference(back, section.bytes, ignoring: VCPUState.derivedLAPICRegisters, name: { "register 0x\(String($0 & ~0xf, radix: 16)) (byte \($0))" }) {
                    return "section lapic: \(where_)"
                }
            case "msrs":
                // The read-back reads the MSRs the save read, in its order: record by record
                // (16 bytes: index, reserved, value), without parsing either list. Anything
                // else is compared by index below.
                let carriedByOffset = saved["tsc-offset"] != nil
                if VCPUState.sameMSRsInOrder(back, section.bytes, skippingTSC: carriedByOffset) { continue }
                let backed = Dictionary(MSRList(bytes: back).entries.map { ($0.index, $0.value) }, uniquingKeysWith: { a, _ in a })
                for entry in MSRList(bytes: section.bytes).entries {
                    if entry.index == 0x10 && carriedByOffset { continue }
                    guard let value = backed[entry.index] else { return "section msrs: MSR \(MSRList.name(entry.index)) not read back" }
                    if value != entry.value {
                        return "section msrs: MSR \(MSRList.name(entry.index)) saved 0x\(String(entry.value, radix: 16)), read back 0x\(String(value, radix: 16))"
                    }
                }
            case "cpuid":
                // Without the runtime bits KVM rewrites (`CPUIDEntry.withoutRuntimeBits`): they
                // follow from CR4 and the APIC base (sregs), XCR0 (xcrs) and XSS (msrs), which
                // are compared, and a save carries none (so the bytes are mostly equal).
                guard !VMState.sameBytes(back, section.bytes) else { continue }
                let (backed, kept) = (CPUIDEntry.withoutRuntimeBits(CPUIDEntry.list(back)), CPUIDEntry.withoutRuntimeBits(CPUIDEntry.list(section.bytes)))
                if let difference = CPUIDEntry.difference(kept, backed) { return "section cpuid: \(difference)" }
            default:
                if let where_ = VMState.firstDifference(back, section.bytes) { return "section \(section.name): \(where_)" }
            }
        }
        return nil
    }
}
