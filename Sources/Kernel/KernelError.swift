/// Every operation the kernel boundary offers; names are stable (fault points and reports use them).
public enum KernelOperation: String, CaseIterable, Sendable, Codable, CustomStringConvertible {
    case openSystem = "open-system"
    case checkExtension = "check-extension"
    case createVM = "create-vm"
    case createGuestMemfd = "create-guest-memfd"
    case setMemslot = "set-memslot"
    case mapGuestMemfd = "map-guest-memfd"
    case accessMemory = "access-memory"
    case punchHole = "punch-hole"
    case createVCPU = "create-vcpu"
    case getVCPUState = "get-vcpu-state"
    case setVCPUState = "set-vcpu-state"
    case runVCPU = "run-vcpu"
    case prefault = "prefault"
    case launch = "launch"
    case moveEncryptionContext = "move-enc-context"
    case linkGuestMemfd = "link-guest-memfd"
    case inodeIdentity = "inode-identity"
    /// Copying the populated pages of one gmem file into another VM's memory (the copy strategy).
    case copyMemory = "copy-memory"
    /// `KVM_CREATE_IRQCHIP` and `KVM_CREATE_PIT2`.
    case createInterruptControllers = "create-irqchip"
    /// `KVM_SET_CPUID2` (and reading `KVM_GET_SUPPORTED_CPUID`).
    case setCPUID = "set-cpuid"
    /// The VM's own state: irqchips, PIT, clock.
    case getVMState = "get-vm-state"
    case setVMState = "set-vm-state"

    public var description: String { rawValue }
}

/// What a kernel operation can answer besides success.
///
/// `.failed` keeps the errno exactly as the kernel (or the model of it) returned it;
/// `.refused` is the same with what the kernel refused, where one call carries many items
/// (KVM_SET_MSRS stops at the first MSR it refuses); `.unsupported` means the running kernel
/// lacks the operation, found by probing.
public enum KernelError: Error, Equatable, Sendable, CustomStringConvertible {
    case failed(operation: KernelOperation, errno: Errno)
    case refused(operation: KernelOperation, errno: Errno, detail: String)
    case unsupported(operation: KernelOperation, reason: String)

    public var operation: KernelOperation {
        switch self {
        case .failed(let operation, _), .refused(let operation, _, _), .unsupported(let operation, _): operation
        }
    }

    /// The errno, if the kernel answered with one.
    public var errno: Errno? {
        switch self {
        case .failed(_, let errno), .refused(_, let errno, _): errno
        case .unsupported: nil
        }
    }

    public var description: String {
        switch self {
        case .failed(let operation, let errno): "\(operation): \(errno.name) (\(errno.message))"
        case .refused(let operation, let errno, let detail): "\(operation): \(errno.name) (\(errno.message)): \(detail)"
        case .unsupported(let operation, let reason): "\(operation): unsupported: \(reason)"
        }
    }
}
