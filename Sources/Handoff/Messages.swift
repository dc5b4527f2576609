import Foundation
import Guests
import Kernel
import Orchestrator
import Plans

/// One handoff message: a request from the coordinator or a VMM's reply (`ok` or `error`),
/// with the fields its type uses. Version 2; docs/handoff.md lists every type and field.
public struct HandoffMessage: Codable, Equatable, Sendable {
    /// 3: the whole VM state (`state`, binary) checked by the target before the point of no
    /// return (check-state) and restored, the target's identity at create-vm, the guest's
    /// reports at status. 2: copy-memory replaces sync-copy (only populated pages, once the
    /// source is paused); arm-faults; every reply may carry the faults that fired.
    /// 4: the VM state travels as raw bytes after the frame's JSON (`attachment`), not as
    /// base64 inside it.
    /// 5: `stage-state` replaces check-state: the target checks the state, sets it and reads it
    /// back before the point of no return, and `restore` only runs the vcpus. A `pause` may
    /// carry a socket on which the source sends its state straight to the target, whose
    /// `stage-state` carries the socket's other end (`timeoutMilliseconds` bounds its wait).
    /// 6: a `pause` may be armed: a second socket, on which the source says it is ready and
    /// pauses when the coordinator's byte comes (`PauseTrigger`).
    /// 7: the state channel carries the state in parts, one frame each (its head, then each
    /// vcpu as it is saved), and the target sets each part as it comes.
    public static let protocolVersion = 7

    /// The largest attachment a frame may carry (a VM state is tens of KiB).
    public static let maxAttachmentBytes = 64 << 20

    /// Requests, in the order a migration uses them, then the replies.
    public static let requestTypes: Set<String> = [
        "hello", "describe", "create-vm", "receive-memory", "receive-nics", "copy-memory", "bind", "bindings", "probe-mapping", "pause", "stage-state", "resume",
        "move-enc-context", "restore", "retire", "destroy", "unbind", "release-memory", "status", "read-guest", "arm-faults", "shutdown",
    ]
    public static let knownTypes: Set<String> = requestTypes.union(["ok", "error"])

    public var type: String
    /// Request id; a reply carries its request's.
    public var id: Int

    // hello
    public var version: Int?
    public var pid: Int32?
    /// `linux`, or `model:HOSTFILE` (then memory and VMs travel as model handles, not descriptors).
    public var backend: String?
    // describe (reply)
    public var vm: VMDescription?
    /// Model handles standing for descriptors, when the backend is the model.
    public var handles: [Int32]?
    // create-vm
    public var vmType: VMType?
    public var vcpus: Int?
    /// The guest program the source runs (`counter`, `long-mode`).
    public var guestProgram: String?
    // receive-memory
    public var gmem: VMDescription.Gmem?
    public var strategy: Strategy?
    public var inode: InodeIdentity?
    // bind, unbind
    public var slots: [VMDescription.Slot]?
    // receive-nics
    public var nics: [VMDescription.NIC]?
    // bindings (reply)
    public var bindings: [BindingReport]?
    // probe-mapping, read-guest
    public var gpa: UInt64?
    public var count: Int?
    /// Base64 bytes (read-guest reply).
    public var bytes: String?
    // pause (reply), restore: the whole VM state, `VMState`'s binary format in base64
    public var state: String?
    // create-vm (reply): the vcpu count and CPUID the VMM set, for the coordinator's check
    public var identity: VMIdentity?
    // status (reply): what the long-mode guest recorded, per vcpu
    public var guest: [LongModeGuest.VCPUReport]?
    // status, pause (reply)
    public var running: Bool?
    /// The guest's counter (guest memory at 0x2000), when readable.
    public var counter: UInt32?
    // error (reply), probe-mapping (reply)
    public var message: String?
    public var errno: Int32?
    // copy-memory (reply)
    public var copy: CopyReport?
    // arm-faults: `kernel:*` fault specs (honoured only by a VMM started with --allow-faults)
    public var faults: [String]?
    /// Any reply: the armed faults that fired while the VMM handled this request.
    public var fired: [String]?
    /// pause and restore (reply): how long the VMM's parts of the request took, in nanoseconds
    /// (`stop`, `save`; `restore`, `resume`): the blackout's parts as the VMM measured them.
    public var timings: [String: Int64]?
    /// The number of raw bytes that follow this message's JSON in its frame (the VM state of
    /// a pause reply, a stage-state or a restore). The bytes themselves are the frame's
    /// attachment, handed over beside the message.
    public var attachment: Int?
    /// stage-state by socket: how long the target waits for the source's state.
    public var timeoutMilliseconds: Int?
    /// pause by socket and stage-state (replies): `BYTES:CRC32C` of the state sent / received.
    public var stateDigest: String?
    /// restore (reply): when the last vcpu thread entered KVM_RUN, CLOCK_MONOTONIC nanoseconds
    /// (`MonotonicClock`): where the blackout ends as the guest sees it, whatever the reply's
    /// own way to the coordinator takes.
    public var runningSince: UInt64?
    /// pause (reply): when every vcpu thread had stopped, on the same clock.
    public var stoppedAt: UInt64?

    public init(type: String, id: Int) {
        self.type = type
        self.id = id
    }
}
