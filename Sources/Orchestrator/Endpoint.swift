import Foundation
import Kernel
import Plans

/// A VM as its VMM describes it to the coordinator (the source) or reports it (the target).
public struct VMDescription: Codable, Equatable, Sendable {
    public struct Gmem: Codable, Equatable, Sendable {
        public var name: String
        public var size: UInt64
        public var flags: GuestMemfdFlags
        public var inode: InodeIdentity
    }

    public struct Slot: Codable, Equatable, Sendable {
        public var slot: UInt32
        public var guestPhysAddr: UInt64
        public var size: UInt64
        public var guestMemfd: String
        public var offset: UInt64
    }

    /// A network interface whose tap queues travel with the VM.
    public struct NIC: Codable, Equatable, Sendable {
        public var name: String
        public var queues: Int
        public init(name: String, queues: Int) {
            self.name = name
            self.queues = queues
        }
    }

    public var type: VMType
    public var vcpus: Int
    public var guestMemfds: [Gmem]
    public var memslots: [Slot]
    /// Tap interfaces, whose queue descriptors follow the memory's in `describe`.
    public var nics: [NIC]?
}

/// One memslot as the target VMM has bound it, for the verification step.
public struct BindingReport: Codable, Equatable, Sendable {
    public var slot: UInt32
    public var guestPhysAddr: UInt64
    public var size: UInt64
    /// The inode the slot's memory lives on (the gmem file's, or the mapped file's).
    public var inode: InodeIdentity
    /// The offset into that inode.
    public var offset: UInt64
    /// Whether the slot is bound to a gmem file (KVM_MEM_GUEST_MEMFD) or to a host mapping.
    public var guestMemfdBacked: Bool
}

/// Why a step failed.
public struct EndpointError: Error, Equatable, Sendable, CustomStringConvertible {
    public var message: String
    public var kernel: KernelError?
    /// The errno of the failure: the kernel's, or an injected one.
    public var errno: Errno?

    public init(_ message: String, kernel: KernelError? = nil, errno: Errno? = nil) {
        self.message = message
        self.kernel = kernel
        self.errno = errno ?? kernel?.errno
    }

    public init(_ kernel: KernelError) {
        self.init(kernel.description, kernel: kernel)
    }
    public var description: String { message }

    /// An endpoint error as it is, a kernel error wrapped (its errno kept), anything else described.
    public static func from(_ error: any Error) -> EndpointError {
        switch error {
        case let error as EndpointError: error
        case let error as KernelError: EndpointError(error)
        default: EndpointError("\(error)")
        }
    }
}

/// What the coordinator asks of a VMM, in either role. The in-process endpoint
/// (`InProcessVMM`) implements it on the coordinator's own kernel objects; an out-of-process
/// VMM implements it behind the handoff protocol. Every operation is idempotent: replaying it
/// after a crash is safe.
public protocol VMMEndpoint: AnyObject {
    /// `source` or `target`, for reports.
    var role: String { get }
    var isRunning: Bool { get }
    /// Whether the VMM still holds a VM (a VMM process that died holds nothing).
    func isAlive() -> Bool

    // As a source.
    func describe() throws(EndpointError) -> VMDescription
    /// The kernel handle through which the target reaches a gmem file (in-process: the file
    /// itself; out-of-process: the descriptor the coordinator received).
    func memoryHandle(_ gmem: String) -> KernelHandle?
    /// The VM's handle, for the move of the encryption context.
    var vmHandle: KernelHandle? { get }
    /// The tap queue descriptors of the VM's NICs, in `describe`'s order.
    func nicHandles() -> [KernelHandle]
    /// Stops the vcpus and returns their state. Idempotent: a paused VM answers its saved state.
    func pause() throws(EndpointError) -> [VCPUState]
    func resume() throws(EndpointError)
    /// Closes the VM; its memory lives on through the target's files. Idempotent.
    func retire()

    // As a target.
    func createVM(type: VMType, vcpus: Int) throws(EndpointError)
    /// Gives the target its view of one source gmem file, by `strategy`; answers its inode.
    func receiveMemory(_ gmem: VMDescription.Gmem, from handle: KernelHandle, strategy: Strategy) throws(EndpointError) -> InodeIdentity
    /// For copy: copies the source's memory again, once the source is paused (the first copy
    /// was made while it ran). Part of the blackout: O(memory), the baseline's cost.
    func synchronizeCopy(_ gmem: VMDescription.Gmem, from handle: KernelHandle) throws(EndpointError)
    /// Takes the source's tap queues (the network goes with the guest).
    func receiveNICs(_ nics: [VMDescription.NIC], from handles: [KernelHandle]) throws(EndpointError)
    func bind(_ slots: [VMDescription.Slot], strategy: Strategy) throws(EndpointError)
    func bindings() throws(EndpointError) -> [BindingReport]
    /// Tries to map one guest page, as a guest access would; nil if it mapped.
    func probeGuestMapping(gpa: UInt64) -> KernelError?
    func moveEncryptionContext(from source: KernelHandle) throws(EndpointError)
    func restore(_ states: [VCPUState]) throws(EndpointError)
    /// Undo of createVM, receiveMemory and bind: closes everything the target holds. Idempotent.
    func destroy()
    func unbind(_ slots: [VMDescription.Slot])
    func releaseMemory()

    // The guest, for standalone runs and verification.
    func runGuest(exits: Int) throws(EndpointError) -> [VCPUExit]
    func readGuest(gpa: UInt64, count: Int) throws(EndpointError) -> [UInt8]
}
