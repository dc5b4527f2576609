import Foundation
import Guests
import Journal
import Kernel
import Orchestrator
import Plans

#if canImport(Glibc)
import Glibc
#endif

/// A VMM in another process, driven over the handoff protocol: the orchestrator's
/// out-of-process endpoint. It implements the same `VMMEndpoint` as `InProcessVMM`, so every
/// step, undo, journal record and fault point works unchanged.
///
/// Descriptors the source hands over (its gmem files, its VM for the move) are held here, in
/// the coordinator, until they have been passed to the target; `retire` closes them, so that
/// the source VM can go away.
///
/// A request whose answer does not come (a timeout, a connection that breaks) fails as
/// *uncertain*, and the connection is dropped: the next request reconnects, so that a late
/// answer can never be taken for the next request's.
public final class RemoteVMM: VMMEndpoint {
    public let role: String
    public let socketPath: String
    public let peer: PeerCredentials
    /// The peer's kernel: `linux`, or `model:HOSTFILE`.
    public let backend: String
    private var connection: HandoffConnection?
    private(set) var timeout: Duration
    private let expectedUID: UInt32?
    private var nextID = 1
    private var memory: [String: Int32] = [:]
    private var vm: Int32?
    private var taps: [Int32] = []
    /// Whether the VMM last said that its vcpus run the guest.
    public private(set) var isRunning = false
    /// The guest's counter as the VMM last reported it.
    public private(set) var lastCounter: UInt32?
    /// The counter in guest memory when the VMM restored the vcpus, before the guest ran there.
    public private(set) var counterAtRestore: UInt32?
    /// The VM state the VMM answered at its pause (the counter guest keeps its count in rax too).
    public private(set) var pausedState: VMState?
    /// What the long-mode guest recorded, as the last status said.
    public private(set) var lastGuestReport: [LongModeGuest.VCPUReport]?
    public private(set) var firedFaults: [FaultSpec] = []

    var isModel: Bool { backend.hasPrefix("model:") }

    /// Connects, says hello, and checks who answered.
    /// - Parameters:
    ///   - expectedUID: the uid the VMM must run as (SO_PEERCRED); nil: this process's uid or root.
    ///   - expectedPID: for a VMM this coordinator spawned, its pid.
    public init(role: String, socketPath: String, timeout: Duration, expectedUID: UInt32? = nil, expectedPID: Int32? = nil) throws(HandoffError) {
        self.role = role
        self.socketPath = socketPath
        self.timeout = timeout
        self.expectedUID = expectedUID
        let (connection, credentials, hello) = try RemoteVMM.connect(socketPath, timeout: timeout, expectedUID: expectedUID, expectedPID: expectedPID)
        self.connection = connection
        peer = credentials
        guard let backend = hello.backend else { throw HandoffError(.malformed, "\(socketPath): the hello reply names no backend") }
        self.backend = backend
        isRunning = hello.running ?? false
    }

    deinit { closeHeld() }

    private static func connect(_ path: String, timeout: Duration, expectedUID: UInt32?, expectedPID: Int32?) throws(HandoffError) -> (HandoffConnection, PeerCredentials, HandoffMessage) {
        let connection = try HandoffConnection.connect(path: path)
        connection.setTimeout(timeout)
        let credentials = try connection.peerCredentials()
        let allowed: Set<UInt32> = expectedUID.map { [$0] } ?? [getuid(), 0]
        guard allowed.contains(credentials.uid) else {
            throw HandoffError(.credentials, "\(path): the VMM runs as uid \(credentials.uid), expected \(allowed.sorted().map(String.init).joined(separator: " or "))")
        }
        if let expectedPID, credentials.pid != expectedPID {
            throw HandoffError(.credentials, "\(path): answered by pid \(credentials.pid), not the VMM this coordinator started (pid \(expectedPID))")
        }
        var hello = HandoffMessage(type: "hello", id: 0)
        hello.version = HandoffMessage.protocolVersion
        try connection.send(hello)
        let (reply, descriptors) = try connection.receive()
        try HandoffConnection.check(descriptors, expected: [])
        guard reply.type == "ok", reply.version == HandoffMessage.protocolVersion else {
            throw HandoffError(.version, "\(path): the VMM speaks handoff version \(reply.version.map(String.init) ?? "?"), this coordinator \(HandoffMessage.protocolVersion)")
        }
        return (connection, credentials, reply)
    }

    private func closeHeld() {
        abandonPreparedPause()
        guard !isModel else { return }
        for descriptor in memory.values { Glibc.close(descriptor) }
        for descriptor in taps { Glibc.close(descriptor) }
        if let vm { Glibc.close(vm) }
        memory.removeAll()
        taps.removeAll()
        vm = nil
    }

    public var guestDetails: [String: String] { lastCounter.map { ["counter": "\($0)"] } ?? [:] }

    public private(set) var lastTimings: [String: Int64] = [:]
    public private(set) var guestRunningSince: UInt64?
    public private(set) var guestStoppedAt: UInt64?

    public func setTimeout(_ timeout: Duration) {
        self.timeout = timeout
        connection?.setTimeout(timeout)
    }

    private func reconnect(for type: String) throws(EndpointError) -> HandoffConnection {
        do {
            let (connection, _, _) = try RemoteVMM.connect(socketPath, timeout: timeout, expectedUID: expectedUID, expectedPID: peer.pid)
            self.connection = connection
            return connection
        } catch {
            throw EndpointError("\(role) VMM: \(type): reconnecting: \(error.message)", errno: error.errno)
        }
    }

    /// One request and its reply; an `error` reply becomes an `EndpointError` with its errno.
    /// A request that was sent and not answered is `uncertain`, and the connection is dropped.
    @discardableResult
    func request(
        _ message: HandoffMessage, descriptors: [Int32] = [], attachment: [UInt8]? = nil, expect kinds: [String] = [], checkDescriptors: Bool = true
    ) throws(EndpointError) -> (HandoffMessage, [Int32]) {
        let sent = try send(message, descriptors: descriptors, attachment: attachment)
        return try reply(to: sent, expect: kinds, checkDescriptors: checkDescriptors)
    }

    /// A request sent, its reply not yet read.
    struct Sent {
        var message: HandoffMessage
        var connection: HandoffConnection
    }

    /// Sends a request (the first half of `request`): two VMMs can then work on theirs at once.
    func send(_ message: HandoffMessage, descriptors: [Int32] = [], attachment: [UInt8]? = nil) throws(EndpointError) -> Sent {
        // A prepared pause holds this connection's next reply: anything else asked first
        // abandons it (its reply read), so that each request gets its own.
        abandonPreparedPause()
        preparedBy?.abandonPreparedPause()
        var message = message
        message.id = nextID
        nextID += 1
        var connection: HandoffConnection
        let reused = self.connection != nil
        if let existing = self.connection {
            connection = existing
        } else {
            connection = try reconnect(for: message.type)
        }
        do {
            try connection.send(message, descriptors: descriptors, attachment: attachment)
        } catch {
            // Not sent: the VMM did nothing. A connection the VMM closed while we were away
            // (its idle timeout) is opened again, once, and the request sent on the new one.
            self.connection = nil
            guard reused else { throw EndpointError("\(role) VMM: \(message.type): \(error.message)", errno: error.errno) }
            connection = try reconnect(for: message.type)
            do {
                try connection.send(message, descriptors: descriptors, attachment: attachment)
            } catch {
                self.connection = nil
                throw EndpointError("\(role) VMM: \(message.type): \(error.message)", errno: error.errno)
            }
        }
        return Sent(message: message, connection: connection)
    }

    /// Reads the reply to a sent request (the second half of `request`).
    func reply(to sent: Sent, expect kinds: [String] = [], checkDescriptors: Bool = true) throws(EndpointError) -> (HandoffMessage, [Int32]) {
        let message = sent.message
        let reply: HandoffMessage
        let received: [Int32]
        do {
            (reply, received, lastAttachment) = try sent.connection.receiveAttached()
        } catch {
            if connection === sent.connection { connection = nil }
            throw EndpointError("\(role) VMM: \(message.type): no answer: \(error.message)", errno: error.errno, uncertain: true)
        }
        guard reply.id == message.id else {
            for descriptor in received { Glibc.close(descriptor) }
            if connection === sent.connection { connection = nil }
            throw EndpointError("\(role) VMM: \(message.type): a reply to request \(reply.id) where \(message.id) was due", uncertain: true)
        }
        for text in reply.fired ?? [] {
            if let spec = try? FaultSpec(parsing: text), !firedFaults.contains(spec) { firedFaults.append(spec) }
        }
        if reply.type == "error" {
            for descriptor in received { Glibc.close(descriptor) }
            throw EndpointError("\(role) VMM: \(message.type): \(reply.message ?? "failed")", errno: reply.errno.map(Errno.init(rawValue:)))
        }
        if checkDescriptors {
            do {
                try HandoffConnection.check(received, expected: isModel ? [] : kinds)
            } catch {
                throw EndpointError("\(role) VMM: \(message.type): \(error.message)")
            }
        }
        if let running = reply.running { isRunning = running }
        if let counter = reply.counter { lastCounter = counter }
        lastTimings = reply.timings ?? [:]
        guestRunningSince = reply.runningSince
        guestStoppedAt = reply.stoppedAt
        return (reply, received)
    }

    /// Whether the VMM's process is certainly gone: its pid is dead (or a zombie), or nothing
    /// listens at its socket any more. A VMM that is alive but does not answer is not gone.
    public func isGone() -> Bool {
        if !ProcessWatch.isAlive(peer.pid) { return true }
        let fd = HandoffConnection.probe(path: socketPath)
        return fd == ECONNREFUSED || fd == ENOENT
    }

    /// A request that undoes or ends something: a VMM that is gone has nothing left to undo.
    private func undoRequest(_ message: HandoffMessage) throws(EndpointError) -> String? {
        do {
            try request(message)
            return nil
        } catch {
            guard isGone() else { throw error }
            return "the \(role) VMM is gone (pid \(peer.pid))"
        }
    }

    public func observe() -> (liveness: JournalEntry.Observation.Liveness, detail: String?) {
        do {
            let (running, counter) = try status()
            return (running ? .running : .stopped, "pid \(peer.pid)" + (counter.map { ", counter \($0)" } ?? ""))
        } catch {
            if isGone() { return (.gone, "pid \(peer.pid): \(error.message)") }
            return (.stopped, "pid \(peer.pid) is alive but does not answer: \(error.message)")
        }
    }

    // MARK: - Source

    public func describe() throws(EndpointError) -> VMDescription {
        // The reply's descriptors are checked by kind once the description says how many.
        let (reply, received) = try request(HandoffMessage(type: "describe", id: 0), checkDescriptors: false)
        guard let description = reply.vm else {
            for descriptor in received { Glibc.close(descriptor) }
            throw EndpointError("\(role) VMM: describe: no description in the reply")
        }
        try adopt(description, reply, received)
        return description
    }

    public func memoryHandle(_ gmem: String) -> KernelHandle? { memory[gmem].map(KernelHandle.init(raw:)) }

    public var vmHandle: KernelHandle? { vm.map(KernelHandle.init(raw:)) }

    public func nicHandles() -> [KernelHandle] { taps.map(KernelHandle.init(raw:)) }

    public func receiveNICs(_ nics: [VMDescription.NIC], from handles: [KernelHandle]) throws(EndpointError) {
        var message = HandoffMessage(type: "receive-nics", id: 0)
        message.nics = nics
        try request(message, descriptors: handles.map(\.raw))
    }

    public func pause() throws(EndpointError) -> VMState {
        try pausedState(try request(HandoffMessage(type: "pause", id: 0)).0)
    }

    public func savedState() throws(EndpointError) -> VMState {
        // The guest's counter this VMM reports now is in memory the target shares, and runs
        // on: what it said at its pause stays.
        let counter = lastCounter
        defer { lastCounter = counter }
        return try pause()
    }

    /// The state a pause reply brings: its attachment, or base64 in `state`.
    private func pausedState(_ reply: HandoffMessage) throws(EndpointError) -> VMState {
        let bytes: [UInt8]
        if let attachment = lastAttachment {
            bytes = attachment
        } else if let text = reply.state, let data = Data(base64Encoded: text) {
            bytes = [UInt8](data)
        } else {
            throw EndpointError("\(role) VMM: pause: no VM state in the reply")
        }
        do {
            let state = try VMState(decoding: bytes)
            pausedState = state
            return state
        } catch {
            throw EndpointError("\(role) VMM: pause: \(error.message)")
        }
    }

    /// Two VMM processes: the source is asked to pause and send its state on one end of a
    /// socket pair, the target to stage the state that comes on the other end; both work at
    /// once, and both replies are read whatever happens, so that neither connection is left
    /// with a reply due. Each answers the digest of the state it sent or received, and the two
    /// must be the same. The coordinator does not get the state itself here (a later `pause`
    /// answers it, once the blackout is over). Where `preparePause` came first, the target
    /// waits for the state since then and the source, armed there, pauses when the trigger
    /// fires here; otherwise both are asked here, the target first.
    public func pause(stagingIn target: any VMMEndpoint) throws(PauseError) -> StagedPause {
        guard let target = target as? RemoteVMM else { return try pauseThenStage(in: target) }
        if let prepared, prepared.target !== target { abandonPreparedPause() }
        var ends: [Int32]
        var prestaged: Sent?
        var prepaused: Sent?
        if let prepared {
            ends = prepared.ends
            prestaged = prepared.staging
            prepaused = prepared.pausing
            self.prepared = nil
            prepared.target.preparedBy = nil
            if let trigger = prepared.trigger {
                // The pause is requested: the source, armed and polling, stops its guest now.
                if prepared.armed { PauseTrigger.fire(trigger) }
                Glibc.close(trigger)
            }
        } else {
            guard let made = RemoteVMM.stateChannel() else {
                throw .source(EndpointError("\(role) VMM: pause: socketpair: \(Errno.current.name)", errno: .current))
            }
            ends = made
        }
        /// The coordinator's copies of the channel, once its VMMs have theirs (or on failure).
        func closeEnds() {
            for end in ends where end >= 0 { Glibc.close(end) }
            ends = [-1, -1]
        }
        defer { closeEnds() }
        // The target first, then the source: the source, woken by its pause, may take this
        // CPU from the coordinator for hundreds of microseconds here, and a stage-state sent
        // after it would wait that long while the state sat in the socket.
        let staging: Sent
        if let prestaged {
            staging = prestaged
        } else {
            do { staging = try target.send(RemoteVMM.stageMessage(target), descriptors: [ends[1]]) } catch { throw .target(error) }
        }
        let pausing: Sent
        do {
            if let prepaused {
                pausing = prepaused
            } else {
                pausing = try send(HandoffMessage(type: "pause", id: 0), descriptors: [ends[0]])
            }
        } catch {
            // Not paused. The target hears the end of the socket (closed here) and answers that
            // no state came; its reply is read, so that its connection has none due.
            closeEnds()
            _ = try? target.reply(to: staging)
            throw .source(error)
        }
        // Both sent: the coordinator's ends are closed, so that each VMM sees the other's end only.
        closeEnds()
        // The coordinator sleeps on the source's reply, then on the target's, which comes last:
        // polling for either takes a CPU from the two VMMs, which save, set and read back on
        // both CPUs of this machine kind (polling for the target's was slower, 1.18 -> 1.03 ms
        // at 64 MiB once the vcpus were set on two threads, with the CPU latency hold keeping
        // a woken coordinator's wake-up short).
        let paused = Result { () throws(EndpointError) -> String in
            let (reply, _) = try reply(to: pausing)
            guard let digest = reply.stateDigest else { throw EndpointError("\(role) VMM: pause: no state digest in the reply") }
            return digest
        }
        let staged = Result { () throws(EndpointError) -> String? in try target.reply(to: staging).0.stateDigest }
        switch (paused, staged) {
        case (.failure(let error), .failure(let refusal)) where [Errno(rawValue: EPIPE), Errno(rawValue: ECONNRESET)].contains(error.errno):
            // The source could not send a part because the target had closed the channel: the
            // target refused an earlier part (protocol 7 sets each as it comes), and its
            // refusal is the reason.
            throw .target(refusal)
        case (.failure(let error), _): throw .source(error)
        case (.success, .failure(let error)): throw .target(error)
        case (.success(let sent), .success(let received)):
            guard received == sent else {
                throw .target(EndpointError("\(target.role) VMM: stage-state: the state it received (\(received ?? "no digest")) is not the one the source sent (\(sent))"))
            }
            target.stagedState = nil
            return StagedPause(state: nil, digest: sent)
        }
    }

    /// The stage-state of a state that comes on the state channel (the socket it carries).
    private static func stageMessage(_ target: RemoteVMM) -> HandoffMessage {
        var stage = HandoffMessage(type: "stage-state", id: 0)
        stage.timeoutMilliseconds = Int(clamping: target.timeout.nanoseconds / 1_000_000)
        return stage
    }

    /// What `preparePause` made ready for the next `pause(stagingIn:)`: the state channel's
    /// socket pair (the coordinator's copy of an end is closed once its VMM has it), the
    /// stage-state the target already waits in and the armed pause the source waits in, their
    /// replies not read yet (nil where one could not be sent: `pause(stagingIn:)` then sends
    /// it, and answers its failure), and the coordinator's end of the pause's trigger, which
    /// fires only if the source said it was ready (`armed`).
    private struct PreparedPause {
        var target: RemoteVMM
        var ends: [Int32]
        var staging: Sent?
        var pausing: Sent?
        var trigger: Int32?
        var armed = false
    }

    private var prepared: PreparedPause?

    /// Before the pause is requested, so that the blackout holds none of it: makes the state
    /// channel's socket pair, asks the target to stage the state that will come on it (it
    /// waits, up to its timeout), and sends the source its pause armed with a trigger
    /// (`PauseTrigger`), waiting until the source says it is ready or refuses (its copies of
    /// the trigger and the channel close: the target then hears that no state comes, and
    /// `pause(stagingIn:)` answers the source's refusal). The caller requests the pause next
    /// (`pause(stagingIn:)`, which fires the trigger); anything else asked of either VMM
    /// first abandons it.
    public func preparePause(stagingIn target: any VMMEndpoint) {
        guard let target = target as? RemoteVMM else { return }
        abandonPreparedPause()  // the target's own, if another source prepared one, goes with its send
        // The pause reply's first decode, out of the blackout.
        HandoffMessage.rehearseBlackoutMessages()
        guard var ends = RemoteVMM.stateChannel() else { return }
        var staging: Sent?
        if let sent = try? target.send(RemoteVMM.stageMessage(target), descriptors: [ends[1]]) {
            staging = sent
            Glibc.close(ends[1])
            ends[1] = -1
        }
        var ready = PreparedPause(target: target, ends: ends, staging: staging)
        // The pause itself, armed: the source readies itself now, and stops its guest when
        // the trigger fires. Only once the target waits (else the plain pause, later).
        if staging != nil, let trigger = RemoteVMM.stateChannel() {
            var pause = HandoffMessage(type: "pause", id: 0)
            pause.timeoutMilliseconds = Int(clamping: timeout.nanoseconds / 1_000_000)
            let sent = try? send(pause, descriptors: [ends[0], trigger[1]])
            // Only the source holds its ends now: if it refuses or dies, the trigger and the
            // channel close at once, for the wait below and for the target.
            Glibc.close(trigger[1])
            if let sent {
                Glibc.close(ends[0])
                ready.ends[0] = -1
                ready.pausing = sent
                ready.trigger = trigger[0]
                ready.armed = PauseTrigger.waitReady(trigger[0], timeout: timeout)
            } else {
                Glibc.close(trigger[0])
            }
        }
        prepared = ready
        target.preparedBy = self
    }

    /// The source whose prepared pause waits in this VMM's stage-state (weak: the source owns
    /// the preparation): anything else asked of this VMM abandons that first.
    private weak var preparedBy: RemoteVMM?

    /// A prepared pause that will not be requested: the source hears its trigger close unfired
    /// and answers that no pause was requested (its guest runs on), the target hears the
    /// channel close and answers that no state came; both replies are read, so that neither
    /// connection has one due.
    private func abandonPreparedPause() {
        guard let prepared else { return }
        self.prepared = nil
        prepared.target.preparedBy = nil
        for end in prepared.ends where end >= 0 { Glibc.close(end) }
        // The source hears its trigger close unfired: no pause; it answers so, its guest running.
        if let trigger = prepared.trigger { Glibc.close(trigger) }
        if let pausing = prepared.pausing { _ = try? reply(to: pausing) }
        if let staging = prepared.staging { _ = try? prepared.target.reply(to: staging) }
    }

    /// A socket pair for the state channel (nil, errno set, if none can be made).
    private static func stateChannel() -> [Int32]? {
        var ends: [Int32] = [-1, -1]
        return socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &ends) == 0 ? ends : nil
    }

    public func resume() throws(EndpointError) {
        try request(HandoffMessage(type: "resume", id: 0))
    }

    public func retire() throws(EndpointError) -> String? {
        let note = try undoRequest(HandoffMessage(type: "retire", id: 0))
        isRunning = false
        closeHeld()
        return note
    }

    // MARK: - Target

    public func createVM(type: VMType, vcpus: Int, guest: String?) throws(EndpointError) -> VMIdentity {
        var message = HandoffMessage(type: "create-vm", id: 0)
        message.vmType = type
        message.vcpus = vcpus
        message.guestProgram = guest
        let (reply, _) = try request(message)
        guard let identity = reply.identity else { throw EndpointError("\(role) VMM: create-vm: no identity in the reply") }
        return identity
    }

    public func receiveMemory(_ gmem: VMDescription.Gmem, from handle: KernelHandle, strategy: Strategy) throws(EndpointError) -> InodeIdentity {
        var message = HandoffMessage(type: "receive-memory", id: 0)
        message.gmem = gmem
        message.strategy = strategy
        if isModel { message.handles = [handle.raw] }
        let (reply, _) = try request(message, descriptors: isModel ? [] : [handle.raw])
        guard let inode = reply.inode else { throw EndpointError("\(role) VMM: receive-memory: no inode in the reply") }
        return inode
    }

    public func copyMemory(_ gmem: VMDescription.Gmem, from handle: KernelHandle) throws(EndpointError) -> CopyReport {
        var message = HandoffMessage(type: "copy-memory", id: 0)
        message.gmem = gmem
        if isModel { message.handles = [handle.raw] }
        let (reply, _) = try request(message, descriptors: isModel ? [] : [handle.raw])
        guard let copy = reply.copy else { throw EndpointError("\(role) VMM: copy-memory: no report in the reply") }
        return copy
    }

    public func bind(_ slots: [VMDescription.Slot], strategy: Strategy) throws(EndpointError) {
        var message = HandoffMessage(type: "bind", id: 0)
        message.slots = slots
        message.strategy = strategy
        try request(message)
    }

    public func bindings() throws(EndpointError) -> [BindingReport] {
        let (reply, _) = try request(HandoffMessage(type: "bindings", id: 0))
        return reply.bindings ?? []
    }

    public func probeGuestMapping(gpa: UInt64) -> KernelError? {
        var message = HandoffMessage(type: "probe-mapping", id: 0)
        message.gpa = gpa
        guard let (reply, _) = try? request(message) else { return .failed(operation: .prefault, errno: .ioError) }
        if let errno = reply.errno { return .failed(operation: .prefault, errno: Errno(rawValue: errno)) }
        if let text = reply.message { return .unsupported(operation: .prefault, reason: text) }
        return nil
    }

    public func moveEncryptionContext(from source: KernelHandle) throws(EndpointError) {
        var message = HandoffMessage(type: "move-enc-context", id: 0)
        if isModel { message.handles = [source.raw] }
        try request(message, descriptors: isModel ? [] : [source.raw])
    }

    public func stage(_ state: VMState) throws(EndpointError) {
        stagedState = nil
        try request(HandoffMessage(type: "stage-state", id: 0), attachment: state.encoded)
        stagedState = state
    }

    public func restore(_ state: VMState) throws(EndpointError) {
        // The VMM has the state it staged set already: the restore inside the blackout only
        // runs the vcpus.
        // Not polled for: the blackout ends where the target says its vcpus entered KVM_RUN, and
        // a polling coordinator would only take a CPU from them.
        let (reply, _) = try request(HandoffMessage(type: "restore", id: 0), attachment: stagedState == state ? nil : state.encoded)
        if counterAtRestore == nil { counterAtRestore = reply.counter }
    }

    public func restoreStaged() throws(EndpointError) {
        let (reply, _) = try request(HandoffMessage(type: "restore", id: 0))
        if counterAtRestore == nil { counterAtRestore = reply.counter }
    }

    /// The state the VMM staged last.
    fileprivate(set) var stagedState: VMState?
    /// The attachment of the last reply (the VM state of a pause).
    private var lastAttachment: [UInt8]?

    public func destroy() throws(EndpointError) {
        _ = try undoRequest(HandoffMessage(type: "destroy", id: 0))
        isRunning = false
    }

    public func unbind(_ slots: [VMDescription.Slot]) throws(EndpointError) {
        var message = HandoffMessage(type: "unbind", id: 0)
        message.slots = slots
        _ = try undoRequest(message)
    }

    public func releaseMemory() throws(EndpointError) {
        _ = try undoRequest(HandoffMessage(type: "release-memory", id: 0))
    }

    public func armFaults(_ specs: [FaultSpec]) throws(EndpointError) {
        guard !specs.isEmpty else { return }
        var message = HandoffMessage(type: "arm-faults", id: 0)
        message.faults = specs.map(\.description)
        try request(message)
    }

    // MARK: - The guest

    public func readGuest(gpa: UInt64, count: Int) throws(EndpointError) -> [UInt8] {
        var message = HandoffMessage(type: "read-guest", id: 0)
        message.gpa = gpa
        message.count = count
        let (reply, _) = try request(message)
        guard let text = reply.bytes, let data = Data(base64Encoded: text) else { throw EndpointError("\(role) VMM: read-guest: no bytes") }
        return [UInt8](data)
    }

    /// Whether the VMM runs its guest, and the guest's counter.
    public func status() throws(EndpointError) -> (running: Bool, counter: UInt32?) {
        let (reply, _) = try request(HandoffMessage(type: "status", id: 0))
        lastGuestReport = reply.guest
        return (reply.running ?? false, reply.counter)
    }

    /// Asks the VMM to exit.
    public func shutdown() {
        _ = try? request(HandoffMessage(type: "shutdown", id: 0))
    }

    /// Takes the descriptors a describe reply brought, once their count is known.
    private func adopt(_ description: VMDescription, _ reply: HandoffMessage, _ received: [Int32]) throws(EndpointError) {
        var received = received
        let confidential = description.type.hasEncryptionContext
        let queues = (description.nics ?? []).reduce(0) { $0 + $1.queues }
        let expected = description.guestMemfds.map { _ in "kvm-gmem" } + (confidential ? ["kvm-vm"] : [])
            + Array(repeating: "net/tun", count: queues)
        if isModel {
            for descriptor in received { Glibc.close(descriptor) }
            received = reply.handles ?? []
            guard received.count == expected.count else {
                throw EndpointError("\(role) VMM: describe: \(received.count) model handles for \(expected.count) objects")
            }
        } else {
            do {
                try HandoffConnection.check(received, expected: expected)
            } catch {
                throw EndpointError("\(role) VMM: describe: \(error.message)")
            }
        }
        closeHeld()
        for (gmem, descriptor) in zip(description.guestMemfds, received) { memory[gmem.name] = descriptor }
        if confidential { vm = received[description.guestMemfds.count] }
        taps = Array(received.suffix(queues))
    }
}
