import Foundation
import Journal
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
    /// The vcpus' CPUID, as the VMM set it: the target's must be the same.
    public var cpuid: [CPUIDEntry]?
    /// The guest program the VM runs (`counter`, `long-mode`), if the VMM knows it.
    public var guest: String?
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
    /// The request went out and its answer never came (a timeout, a peer that died while it
    /// worked): its effect may have happened.
    public var uncertain: Bool

    public init(_ message: String, kernel: KernelError? = nil, errno: Errno? = nil, uncertain: Bool = false) {
        self.message = message
        self.kernel = kernel
        self.errno = errno ?? kernel?.errno
        self.uncertain = uncertain
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

/// Why `pause(stagingIn:)` failed: the source's pause, or the target's stage (the source is
/// paused then, and the rollback resumes it).
public enum PauseError: Error, Equatable, Sendable {
    case source(EndpointError)
    case target(EndpointError)
}

/// What `pause(stagingIn:)` established: the state, when it passed through the coordinator,
/// and its digest either way (when it went VMM to VMM, both VMMs answer the digest of what
/// they sent and received, and the coordinator compares them).
public struct StagedPause: Sendable, Equatable {
    public var state: VMState?
    public var digest: String

    public init(state: VMState?, digest: String) {
        self.state = state
        self.digest = digest
    }
}

extension VMState {
    /// `BYTES:CRC32C` of an encoded state: what the source sent and the target received.
    public static func digest(_ encoded: [UInt8]) -> String {
        var digest = Digest()
        digest.add(encoded)
        return digest.text
    }

    /// `digest` of bytes that come (or go) in pieces, continued over each as it passes, so that
    /// nobody keeps the bytes only to digest them at the end.
    public struct Digest: Sendable {
        /// How many bytes were added.
        public private(set) var count = 0
        private var crc: UInt32 = 0

        public init() {}

        public mutating func add(_ bytes: [UInt8]) {
            count += bytes.count
            crc = CRC32C.update(crc, bytes)
        }

        /// `BYTES:CRC32C` of every byte added.
        public var text: String { "\(count):" + String(crc, radix: 16) }
    }
}

extension VMMEndpoint {
    public func savedState() throws(EndpointError) -> VMState { try pause() }

    public func pause(stagingIn target: any VMMEndpoint) throws(PauseError) -> StagedPause { try pauseThenStage(in: target) }
    public func preparePause(stagingIn target: any VMMEndpoint) {}

    /// Through the coordinator: the source's state comes here, then goes to the target.
    public func pauseThenStage(in target: any VMMEndpoint) throws(PauseError) -> StagedPause {
        let state: VMState
        do { state = try pause() } catch { throw .source(error) }
        do { try target.stage(state) } catch { throw .target(error) }
        return StagedPause(state: state, digest: VMState.digest(state.encoded))
    }
}

/// What a copy moved: only populated pages travel.
public struct CopyReport: Codable, Equatable, Sendable {
    /// The size of the file.
    public var bytesTotal: UInt64
    /// The bytes that were populated in the source, and copied.
    public var bytesCopied: UInt64
    /// How the populated ranges were found: `seek-data` (SEEK_DATA/SEEK_HOLE on the file),
    /// `mincore` (page-cache residency through a mapping), or `all` (every byte).
    public var method: String
    public var durationNanoseconds: Int64

    public init(bytesTotal: UInt64, bytesCopied: UInt64, method: String, durationNanoseconds: Int64) {
        self.bytesTotal = bytesTotal
        self.bytesCopied = bytesCopied
        self.method = method
        self.durationNanoseconds = durationNanoseconds
    }
}

/// What the coordinator asks of a VMM, in either role. The in-process endpoint
/// (`InProcessVMM`) implements it on the coordinator's own kernel objects; an out-of-process
/// VMM implements it behind the handoff protocol. Every operation is idempotent (replaying it
/// after a crash is safe), and every one reports its failure: an undo that did not happen
/// throws, so that the journal never says `ok` for it.
public protocol VMMEndpoint: AnyObject {
    /// `source` or `target`, for reports.
    var role: String { get }
    /// Whether the VMM answers and runs the guest, as it says itself; `gone` when it does not
    /// answer or holds no VM. The machine's terminal states rest on this.
    func observe() -> (liveness: JournalEntry.Observation.Liveness, detail: String?)
    /// Bounds each later request (a VMM in another process; in-process calls are not bounded).
    func setTimeout(_ timeout: Duration)
    /// What the VMM said of its guest in its last answer (the counter guest: `counter`, read from
    /// guest memory); journaled with pause-source and resume-target, so that memory and registers
    /// can be checked against each other at the switch-over.
    var guestDetails: [String: String] { get }
    /// How long the VMM's own parts of its last request took, as it measured them (nanoseconds):
    /// pause's `stop` and `save`, restore's `restore` and `resume`. The blackout's parts.
    var lastTimings: [String: Int64] { get }
    /// When the guest began to run in this VMM, by its last answer: the instant its last vcpu
    /// thread entered KVM_RUN, on `MonotonicClock` (nil when the VMM did not say; the
    /// coordinator then takes the instant the answer came).
    var guestRunningSince: UInt64? { get }
    /// When every vcpu of this VMM had stopped, by its last answer (a pause), on `MonotonicClock`.
    var guestStoppedAt: UInt64? { get }

    // As a source.
    func describe() throws(EndpointError) -> VMDescription
    /// The kernel handle through which the target reaches a gmem file (in-process: the file
    /// itself; out-of-process: the descriptor the coordinator received). Nil before `describe`.
    func memoryHandle(_ gmem: String) -> KernelHandle?
    /// The VM's handle, for the move of the encryption context.
    var vmHandle: KernelHandle? { get }
    /// The tap queue descriptors of the VM's NICs, in `describe`'s order.
    func nicHandles() -> [KernelHandle]
    /// Stops every vcpu together (pending I/O completed first) and returns the whole VM state.
    /// Idempotent: a paused VM answers its saved state.
    func pause() throws(EndpointError) -> VMState
    /// Pauses this VMM (the source) and stages its state in `target` (`stage`), the state going
    /// the shortest way between them: two VMM processes pass it over a socket pair while the
    /// coordinator waits for both. Returns the state's digest, and the state itself when it
    /// passed through the coordinator.
    func pause(stagingIn target: any VMMEndpoint) throws(PauseError) -> StagedPause
    /// Makes ready, before the pause is requested, what `pause(stagingIn:)` will need, so that
    /// the blackout does not hold it (two VMM processes: the state channel, the target waiting
    /// on it, the source's pause armed). Optional: a pause without it makes its own. Anything
    /// else asked of either VMM before the pause abandons it.
    func preparePause(stagingIn target: any VMMEndpoint)
    func resume() throws(EndpointError)
    /// The state a paused VMM saved, asked again (read-only: what the VMM last said of its
    /// guest is kept): the coordinator journals a state that went VMM to VMM this way, after
    /// the blackout.
    func savedState() throws(EndpointError) -> VMState
    /// Closes the VM; its memory lives on through the target's files. Idempotent: a VMM that is
    /// already gone is retired. Returns a note for the journal (nil when nothing is worth saying).
    func retire() throws(EndpointError) -> String?

    // As a target.
    /// Creates the VM (its interrupt controllers, its vcpus with this host's CPUID); answers what
    /// the coordinator compares with the source: the vcpu count and the CPUID.
    /// `guest` names the guest program the source runs (`VMDescription.guest`), so that the
    /// target can report on it once it runs it.
    func createVM(type: VMType, vcpus: Int, guest: String?) throws(EndpointError) -> VMIdentity
    /// Gives the target its view of one source gmem file, by `strategy`; answers its inode.
    /// For copy, the target's own (empty) gmem file: `copyMemory` fills it once the source is paused.
    func receiveMemory(_ gmem: VMDescription.Gmem, from handle: KernelHandle, strategy: Strategy) throws(EndpointError) -> InodeIdentity
    /// For copy: copies the populated pages of the paused source's file into the target's own.
    func copyMemory(_ gmem: VMDescription.Gmem, from handle: KernelHandle) throws(EndpointError) -> CopyReport
    /// Takes the source's tap queues (the network goes with the guest).
    func receiveNICs(_ nics: [VMDescription.NIC], from handles: [KernelHandle]) throws(EndpointError)
    func bind(_ slots: [VMDescription.Slot], strategy: Strategy) throws(EndpointError)
    func bindings() throws(EndpointError) -> [BindingReport]
    /// Tries to map one guest page, as a guest access would; nil if it mapped.
    func probeGuestMapping(gpa: UInt64) -> KernelError?
    func moveEncryptionContext(from source: KernelHandle) throws(EndpointError)
    /// Checks that this VMM can restore `state` (as many vcpus, every section known, every
    /// capability a section needs present, each vcpu's CPUID this VMM's CPU model), sets it into
    /// the VM and its vcpus and reads it back (a difference fails it, naming the section and the
    /// field); the vcpus do not run. Asked before the point of no return, so that a refusal
    /// rolls the migration back.
    func stage(_ state: VMState) throws(EndpointError)
    /// Runs every vcpu with `state`: a state `stage` set already is not set again; another one
    /// is checked, set and read back first. Idempotent: a VMM whose guest runs answers ok.
    func restore(_ state: VMState) throws(EndpointError)
    /// Runs every vcpu with the state `stage` set (the coordinator does not hold it when it
    /// went VMM to VMM). Idempotent: a VMM whose guest runs answers ok; one with nothing
    /// staged fails.
    func restoreStaged() throws(EndpointError)
    /// Undo of createVM, receiveMemory and bind: closes everything the target holds. Idempotent:
    /// a VMM that is already gone is destroyed.
    func destroy() throws(EndpointError)
    func unbind(_ slots: [VMDescription.Slot]) throws(EndpointError)
    func releaseMemory() throws(EndpointError)

    // Fault points at the VMM's own kernel calls (`kernel:*`).
    func armFaults(_ specs: [FaultSpec]) throws(EndpointError)
    /// The armed faults that fired in this VMM so far.
    var firedFaults: [FaultSpec] { get }
}
