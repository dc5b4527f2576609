import CKVM

/// An x86 KVM VM type (the `type` argument of `KVM_CREATE_VM`).
public enum VMType: UInt, CaseIterable, Sendable, Codable, CustomStringConvertible {
    case `default` = 0
    case swProtected = 1
    case sev = 2
    case sevES = 3
    case snp = 4
    case tdx = 5

    /// The name plans and scripts use.
    public var name: String {
        switch self {
        case .default: "default"
        case .swProtected: "sw-protected"
        case .sev: "sev"
        case .sevES: "sev-es"
        case .snp: "snp"
        case .tdx: "tdx"
        }
    }

    public init?(name: String) {
        guard let type = VMType.allCases.first(where: { $0.name == name }) else { return nil }
        self = type
    }

    public var description: String { name }

    /// Confidential types: memory is encrypted under a context (ASID, HKID) that
    /// `KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM` must move to a target VM.
    public var hasEncryptionContext: Bool {
        switch self {
        case .default, .swProtected: false
        case .sev, .sevES, .snp, .tdx: true
        }
    }

    /// `kvm_arch_has_private_mem`: SW_PROTECTED, SNP and TDX (kernel.md §1.2).
    public var hasPrivateMemory: Bool {
        switch self {
        case .swProtected, .snp, .tdx: true
        case .default, .sev, .sevES: false
        }
    }

    /// `kvm->arch.has_protected_state`: SEV-ES, SNP, TDX (no read-only memslots, one address space,
    /// and the move requires equal vcpu counts).
    public var hasProtectedState: Bool {
        switch self {
        case .sevES, .snp, .tdx: true
        case .default, .swProtected, .sev: false
        }
    }

    /// The guest_memfd flags `kvm_gmem_get_supported_flags` offers a VM of this type (6.18).
    public var supportedGuestMemfdFlags: GuestMemfdFlags {
        hasPrivateMemory ? [.mmap] : [.mmap, .initShared]
    }
}

/// Flags of `KVM_CREATE_GUEST_MEMFD` (`GUEST_MEMFD_FLAG_*`), keeping the C raw value.
public struct GuestMemfdFlags: OptionSet, Hashable, Sendable, Codable, CustomStringConvertible {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// `GUEST_MEMFD_FLAG_MMAP`: userspace may mmap the file.
    public static let mmap = GuestMemfdFlags(rawValue: CKVM_GUEST_MEMFD_FLAG_MMAP)
    /// `GUEST_MEMFD_FLAG_INIT_SHARED`: pages start shared, so host mappings can fault them in.
    public static let initShared = GuestMemfdFlags(rawValue: CKVM_GUEST_MEMFD_FLAG_INIT_SHARED)

    public static let known: [(String, GuestMemfdFlags)] = [("mmap", .mmap), ("init-shared", .initShared)]

    /// Parses `mmap,init-shared`; a number (`0x8000000000000000`) is taken as raw bits.
    public init?(names: [String]) {
        var flags = GuestMemfdFlags()
        for name in names where !name.isEmpty {
            if let (_, flag) = GuestMemfdFlags.known.first(where: { $0.0 == name }) {
                flags.insert(flag)
            } else if let raw = parseUnsigned(name) {
                flags.insert(GuestMemfdFlags(rawValue: raw))
            } else {
                return nil
            }
        }
        self = flags
    }

    public var names: [String] {
        var result = GuestMemfdFlags.known.filter { contains($0.1) }.map(\.0)
        let unknown = rawValue & ~(GuestMemfdFlags.mmap.rawValue | GuestMemfdFlags.initShared.rawValue)
        if unknown != 0 { result.append("0x" + String(unknown, radix: 16)) }
        return result
    }

    public var description: String { names.isEmpty ? "none" : names.joined(separator: ",") }
}

/// Flags of `KVM_SET_USER_MEMORY_REGION2` (`KVM_MEM_*`).
public struct MemslotFlags: OptionSet, Hashable, Sendable, Codable {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    public static let logDirtyPages = MemslotFlags(rawValue: CKVM_MEM_LOG_DIRTY_PAGES)
    public static let readonly = MemslotFlags(rawValue: CKVM_MEM_READONLY)
    public static let guestMemfd = MemslotFlags(rawValue: CKVM_MEM_GUEST_MEMFD)

    static let known: [(String, MemslotFlags)] = [
        ("log-dirty-pages", .logDirtyPages), ("readonly", .readonly), ("guest-memfd", .guestMemfd),
    ]

    public init?(names: [String]) {
        var flags = MemslotFlags()
        for name in names where !name.isEmpty {
            if let (_, flag) = MemslotFlags.known.first(where: { $0.0 == name }) {
                flags.insert(flag)
            } else if let raw = parseUnsigned(name), raw <= UInt64(UInt32.max) {
                flags.insert(MemslotFlags(rawValue: UInt32(raw)))
            } else {
                return nil
            }
        }
        self = flags
    }
}

/// A capability number for `KVM_CHECK_EXTENSION`.
public struct Capability: RawRepresentable, Hashable, Sendable, Codable {
    public var rawValue: Int
    public init(rawValue: Int) { self.rawValue = rawValue }

    public static let nrVCPUs = Capability(rawValue: CKVM_CAP_NR_VCPUS)
    public static let nrMemslots = Capability(rawValue: CKVM_CAP_NR_MEMSLOTS)
    public static let maxVCPUs = Capability(rawValue: CKVM_CAP_MAX_VCPUS)
    public static let multiAddressSpace = Capability(rawValue: CKVM_CAP_MULTI_ADDRESS_SPACE)
    public static let maxVCPUID = Capability(rawValue: CKVM_CAP_MAX_VCPU_ID)
    public static let immediateExit = Capability(rawValue: CKVM_CAP_IMMEDIATE_EXIT)
    public static let syncRegs = Capability(rawValue: CKVM_CAP_SYNC_REGS)
    public static let vmCopyEncContextFrom = Capability(rawValue: CKVM_CAP_VM_COPY_ENC_CONTEXT_FROM)
    public static let vmMoveEncContextFrom = Capability(rawValue: CKVM_CAP_VM_MOVE_ENC_CONTEXT_FROM)
    public static let userMemory2 = Capability(rawValue: CKVM_CAP_USER_MEMORY2)
    public static let memoryFaultInfo = Capability(rawValue: CKVM_CAP_MEMORY_FAULT_INFO)
    public static let memoryAttributes = Capability(rawValue: CKVM_CAP_MEMORY_ATTRIBUTES)
    public static let guestMemfd = Capability(rawValue: CKVM_CAP_GUEST_MEMFD)
    public static let vmTypes = Capability(rawValue: CKVM_CAP_VM_TYPES)
    public static let preFaultMemory = Capability(rawValue: CKVM_CAP_PRE_FAULT_MEMORY)
    public static let guestMemfdFlags = Capability(rawValue: CKVM_CAP_GUEST_MEMFD_FLAGS)
    public static let irqchip = Capability(rawValue: CKVM_CAP_IRQCHIP)
    public static let extCPUID = Capability(rawValue: CKVM_CAP_EXT_CPUID)
    public static let mpState = Capability(rawValue: CKVM_CAP_MP_STATE)
    public static let pit2 = Capability(rawValue: CKVM_CAP_PIT2)
    public static let adjustClock = Capability(rawValue: CKVM_CAP_ADJUST_CLOCK)
    public static let vcpuEvents = Capability(rawValue: CKVM_CAP_VCPU_EVENTS)
    public static let debugRegisters = Capability(rawValue: CKVM_CAP_DEBUGREGS)
    public static let xcrs = Capability(rawValue: CKVM_CAP_XCRS)
    public static let tscControl = Capability(rawValue: CKVM_CAP_TSC_CONTROL)
    public static let getTSCKhz = Capability(rawValue: CKVM_CAP_GET_TSC_KHZ)
    public static let vcpuAttributes = Capability(rawValue: CKVM_CAP_VCPU_ATTRIBUTES)
    public static let nestedState = Capability(rawValue: CKVM_CAP_NESTED_STATE)
    public static let sregs2 = Capability(rawValue: CKVM_CAP_SREGS2)
    public static let xsave2 = Capability(rawValue: CKVM_CAP_XSAVE2)
}

/// A backend's name for one open kernel object: a file descriptor on Linux, an id in the model.
public struct KernelHandle: Hashable, Sendable, CustomStringConvertible {
    public var raw: Int32
    public init(raw: Int32) { self.raw = raw }
    public var description: String { "#\(raw)" }
}

/// The identity of a guest_memfd inode: two files are views of the same memory iff these are equal.
public struct InodeIdentity: Hashable, Sendable, Codable, CustomStringConvertible {
    public var device: UInt64
    public var inode: UInt64
    public init(device: UInt64, inode: UInt64) {
        self.device = device
        self.inode = inode
    }
    public var description: String { "\(device):\(inode)" }
}

/// One `struct kvm_userspace_memory_region2`, with the gmem file as a handle.
public struct MemslotRegion: Hashable, Sendable {
    /// `(address space << 16) | slot id`.
    public var slot: UInt32
    public var flags: MemslotFlags
    public var guestPhysicalAddress: UInt64
    public var size: UInt64
    public var userspaceAddress: UInt64
    public var guestMemfd: KernelHandle?
    public var guestMemfdOffset: UInt64

    public init(
        slot: UInt32, flags: MemslotFlags = [], guestPhysicalAddress: UInt64, size: UInt64,
        userspaceAddress: UInt64 = 0, guestMemfd: KernelHandle? = nil, guestMemfdOffset: UInt64 = 0
    ) {
        self.slot = slot
        self.flags = flags
        self.guestPhysicalAddress = guestPhysicalAddress
        self.size = size
        self.userspaceAddress = userspaceAddress
        self.guestMemfd = guestMemfd
        self.guestMemfdOffset = guestMemfdOffset
    }
}

/// Why `KVM_RUN` returned to userspace.
public enum VCPUExit: Hashable, Sendable, CustomStringConvertible {
    /// `KVM_EXIT_IO`: a port access; for an OUT, `data` holds the bytes written.
    case io(port: UInt16, isWrite: Bool, size: UInt8, data: [UInt8])
    /// `KVM_EXIT_MMIO`: an access to a guest-physical address without a memslot.
    case mmio(address: UInt64, isWrite: Bool, data: [UInt8])
    /// `KVM_EXIT_HLT`.
    case halt
    /// `KVM_EXIT_SHUTDOWN` (triple fault).
    case shutdown
    /// `KVM_EXIT_MEMORY_FAULT` (with `KVM_RUN` failing EFAULT): guest memory could not be mapped.
    case memoryFault(address: UInt64, size: UInt64)
    /// `KVM_EXIT_INTERNAL_ERROR` (for the model: an instruction its interpreter does not know).
    case internalError(suberror: UInt32)
    /// `KVM_EXIT_FAIL_ENTRY`.
    case failEntry(reason: UInt64)
    /// `KVM_RUN` returned EINTR: a signal or `immediate_exit` stopped the vcpu.
    case interrupted
    /// Any other exit reason.
    case other(reason: UInt32)

    public var description: String {
        func hex(_ bytes: [UInt8]) -> String { bytes.map { String(format2: $0) }.joined() }
        switch self {
        case .io(let port, let isWrite, let size, let data):
            return "io-\(isWrite ? "out" : "in") port=0x\(String(port, radix: 16)) size=\(size)"
                + (isWrite ? " data=0x\(hex(data.reversed()))" : "")
        case .mmio(let address, let isWrite, let data):
            return "mmio-\(isWrite ? "write" : "read") gpa=0x\(String(address, radix: 16))"
                + (isWrite ? " data=0x\(hex(data.reversed()))" : "")
        case .halt: return "hlt"
        case .shutdown: return "shutdown"
        case .memoryFault(let address, let size):
            return "memory-fault gpa=0x\(String(address, radix: 16)) size=0x\(String(size, radix: 16))"
        case .internalError(let suberror): return "internal-error suberror=\(suberror)"
        case .failEntry(let reason): return "fail-entry reason=0x\(String(reason, radix: 16))"
        case .interrupted: return "interrupted"
        case .other(let reason): return "exit reason=\(reason)"
        }
    }
}

extension String {
    init(format2 byte: UInt8) {
        let digits = String(byte, radix: 16)
        self = digits.count == 1 ? "0" + digits : digits
    }
}

/// Parses a decimal or 0x-hexadecimal unsigned number.
func parseUnsigned(_ text: String) -> UInt64? {
    if text.hasPrefix("0x") || text.hasPrefix("0X") { return UInt64(text.dropFirst(2), radix: 16) }
    return UInt64(text)
}

/// A VM ioctl tried from a process other than the VM's creator (see `KernelBackend.attemptInAnotherProcess`).
public enum ForeignRequest: Sendable {
    case checkExtension(vm: KernelHandle, Capability)
    case createGuestMemfd(vm: KernelHandle, size: UInt64, flags: GuestMemfdFlags)
    case createVCPU(vm: KernelHandle, id: UInt32)
    /// fallocate(PUNCH_HOLE) on a gmem file: guest_memfd.c has no mm check.
    case punchHole(file: KernelHandle, offset: UInt64, length: UInt64)
}
