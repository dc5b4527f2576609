import CKVM
import Foundation
import Guests
import Handoff
import Kernel
import Orchestrator
import Plans

#if canImport(Glibc)
import Glibc
#endif

/// What the VMM does with each request: the VM is held by an `InProcessVMM` (the same kernel
/// object handling as the coordinator's in-process endpoint); each vcpu runs on a `VCPUThread`,
/// and they pause and resume together.
final class TinyVMM: HandoffHandler {
    let kernel: any KernelBackend
    let backendText: String
    let process: String
    let log: Log
    let vmm: InProcessVMM
    private(set) var threads: [VCPUThread] = []
    /// The gate a target's waiting vcpu threads pass together (nil once open, or with no waiting threads).
    private var gate: VCPUGate?
    /// Violations the guest reported on its port, in this VMM.
    private let violations = ViolationLog()
    private(set) var exitRequested = false
    /// The VM's tap interfaces and their open queues (the network goes with the guest).
    private var taps: [(nic: VMDescription.NIC, queues: [Int32])] = []

    /// The VMM's own fault points (`kernel:*`), armed over the protocol; nil unless started
    /// with --allow-faults.
    let faults: FaultInjector?
    private var reportedFaults: Set<FaultSpec> = []

    init(kernel: any KernelBackend, backendText: String, process: String, log: Log, allowFaults: Bool = false) {
        self.backendText = backendText
        self.process = process
        self.log = log
        if allowFaults {
            let injector = FaultInjector()
            faults = injector
            self.kernel = FaultInjectingBackend(kernel, faults: injector)
        } else {
            faults = nil
            self.kernel = kernel
        }
        vmm = InProcessVMM(role: "vmm", backend: self.kernel)
        _ = ckvm_install_kick_handler(VCPUThread.kickSignal)
    }

    var isModel: Bool { backendText.hasPrefix("model:") }

    func startSource(_ spec: VMSpec, guest: GuestProgram, populate: (gpa: UInt64, size: UInt64)? = nil) throws {
        try vmm.createSource(spec, guest: guest)
        if let (gpa, size) = populate {
            // Each 8 bytes of page P hold P: a copy can be checked page by page.
            let chunk: UInt64 = 4 << 20
            var offset: UInt64 = 0
            while offset < size {
                let count = min(chunk, size - offset)
                var bytes = [UInt8](repeating: 0, count: Int(count))
                bytes.withUnsafeMutableBytes { buffer in
                    for index in 0..<Int(count / 8) {
                        let page = (gpa + offset + UInt64(index * 8)) / 4096
                        buffer.storeBytes(of: page.littleEndian, toByteOffset: index * 8, as: UInt64.self)
                    }
                }
                try vmm.writeGuest(gpa: gpa + offset, bytes: bytes)
                offset += count
            }
            log.say("populated \(size) bytes of guest memory from 0x\(String(gpa, radix: 16))")
        }
        for nic in spec.nics {
            let count = max(1, nic.queues ?? 1)
            var queues: [Int32] = []
            for _ in 0..<count {
                let fd = ckvm_open_tap_queue(nic.name, count > 1 ? 1 : 0)
                guard fd >= 0 else {
                    throw EndpointError("opening tap \(nic.name): \(String(cString: strerror(errno)))", errno: .current)
                }
                queues.append(fd)
            }
            taps.append((VMDescription.NIC(name: nic.name, queues: count), queues))
            log.say("opened tap \(nic.name) with \(count) queue\(count == 1 ? "" : "s")")
        }
        rehearse(vcpusNeverRan: true)
        log.say("created a \(spec.type.name) VM: \(spec.vcpus) vcpus, \(spec.guestMemfds.count) gmem files, \(spec.memslots.count) memslots; the guest runs")
        startGuest()
    }

    /// Saving and staging gone through once before any vcpu of this VM runs
    /// (`InProcessVMM.rehearseStaging`), and the state sent and received as the state channel
    /// carries it (`StateChannel.rehearse`), and the blackout's messages coded once
    /// (`HandoffMessage.rehearseBlackoutMessages`), so that the blackout pays no first-time costs. Not
    /// needed for the migration: a failure is only logged.
    private func rehearse(vcpusNeverRan: Bool = false) {
        if !HandoffMessage.rehearseBlackoutMessages() { log.say("the rehearsal of the blackout's messages failed; the blackout may be longer") }
        do {
            guard let state = try vmm.rehearseStaging(vcpusNeverRan: vcpusNeverRan) else { return }
            if !StateChannel.rehearse(state) { log.say("the rehearsal of the state channel failed; the blackout may be longer") }
        } catch {
            log.say("\(error.message); the blackout may be longer")
        }
    }

    /// Runs every vcpu on a thread of its own: the threads `prepareGuest` made, or new ones.
    func startGuest() {
        releaseParked()
        if !threads.isEmpty {
            gate?.open()
            gate = nil
            return
        }
        makeThreads(gated: false)
    }

    /// Makes the vcpu threads of a target, each waiting before its first KVM_RUN until
    /// `startGuest`: no thread is created inside the blackout.
    func prepareGuest() {
        guard threads.isEmpty else { return }
        makeThreads(gated: true)
    }

    private func makeThreads(gated: Bool) {
        guard vmm.guest != nil, threads.isEmpty else { return }
        // The vcpu threads take the CPU mask of the thread that makes them: never the
        // blackout's placement of the staging thread.
        endStagingPlacement()
        let violations = self.violations
        let log = self.log
        // A vcpu thread reads its own report page through the host mapping, never the VMM's tables.
        let reader = (kernel as? FaultInjectingBackend)?.inner ?? kernel
        let reportPages: [UInt64?] = vmm.vcpuHandles.indices.map { vmm.hostAddress(gpa: LongModeGuest.reportAddress($0)) }
        let longMode = vmm.guest == .longMode
        threads = vmm.vcpuHandles.enumerated().map { index, vcpu in
            let page = reportPages[index]
            return VCPUThread(kernel: kernel, vcpu: vcpu, index: index, log: log) { port in
                // The long-mode guest reports a violated invariant: what it recorded says which.
                guard longMode, port == LongModeGuest.reportPort, let page,
                    let bytes = try? reader.readMemory(address: page, count: LongModeGuest.reportBytes)
                else { return }
                let text = "vcpu \(index): \(LongModeGuest.VCPUReport(bytes: bytes).violationText ?? "a report without a violation")"
                violations.add(text)
                log.say("guest violation: \(text)")
            }
        }
        gate = gated ? VCPUGate() : nil
        let spread = gated && threads.count > 1
        for (index, thread) in threads.enumerated() { thread.start(gate: gate, spreadTo: spread ? ckvm_nth_cpu(Int32(clamping: index)) : -1) }
    }

    /// Stops every vcpu: all are asked at once (immediate_exit and a signal), then each is
    /// waited for; a vcpu whose last exit was I/O re-enters KVM_RUN once so that KVM completes
    /// it (api.rst) before its state is saved. Returns how long it took.
    ///
    /// `parking`: the stopped threads wait, parked, until the guest starts again or the VMM
    /// retires, instead of ending now (a pause: their teardown would take the CPU the state's
    /// save needs, inside the blackout).
    @discardableResult
    func stopGuest(parking: Bool = false) -> Duration {
        let clock = ContinuousClock()
        let began = clock.now
        for thread in threads { thread.requestStop() }
        for thread in threads { thread.waitStopped() }
        parked += threads
        threads = []
        gate = nil
        let stopped = clock.now - began
        if !parking { releaseParked() }
        return stopped
    }

    /// The vcpu threads a pause stopped and left parked (`stopGuest(parking:)`).
    private var parked: [VCPUThread] = []

    /// Lets the parked vcpu threads end.
    private func releaseParked() {
        for thread in parked { thread.release() }
        parked = []
    }

    /// The bare floor of a blackout (tools/bench-blackout), `runs` times: stop every vcpu, get
    /// every section, set them in a second VM of this process that shares this one's memory,
    /// and let its vcpus enter KVM_RUN; then back the other way. No check, no read-back, no
    /// message, no journal: what any migration of this state must at least cost here.
    func measureFloor(runs: Int) throws -> [Int64] {
        let other = TinyVMM(kernel: kernel, backendText: backendText, process: process + "/floor", log: log)
        let description = try vmm.describe()
        _ = try other.vmm.createVM(type: description.type, vcpus: description.vcpus, guest: vmm.guest?.name)
        for gmem in description.guestMemfds {
            guard let handle = vmm.memoryHandle(gmem.name) else { throw EndpointError("floor: no handle for '\(gmem.name)'") }
            _ = try other.vmm.receiveMemory(gmem, from: handle, strategy: .share)
        }
        try other.vmm.bind(description.memslots, strategy: .share)
        var (from, to) = (self, other)
        var floors: [Int64] = []
        for _ in 0..<runs {
            usleep(20_000)  // the guest runs a while between moves
            // The host's CPU latency request at 0, as a coordinator holds it through a blackout.
            let hold = CPULatencyHold()
            defer { withExtendedLifetime(hold) {} }
            let began = MonotonicClock.nanoseconds
            from.stopGuest(parking: true)
            let state = try from.vmm.pause()
            try to.vmm.restore(state, verify: false)
            to.startGuest()
            let entered = to.threads.map { $0.waitEntered() }.max() ?? MonotonicClock.nanoseconds
            floors.append(Int64(clamping: entered &- began))
            (from, to) = (to, from)
        }
        // The guest ends in this VMM's VM.
        if from !== self {
            from.stopGuest()
            let state = try from.vmm.pause()
            try vmm.restore(state, verify: false)
            startGuest()
        }
        other.shutdown()
        return floors
    }

    /// Whether every vcpu thread runs the guest (a VM without a known guest program runs none).
    private var guestRuns: Bool { vmm.guest == nil || (!threads.isEmpty && threads.allSatisfy(\.isRunning)) }

    private func closeTaps() {
        for (_, queues) in taps { for fd in queues { close(fd) } }
        taps.removeAll()
    }

    func shutdown() {
        writeLaterLines()
        closeTaps()
        stopGuest()
        try? vmm.destroy()
        if case let model as KernelModel = kernel { model.host.exit(process: process) }
    }

    private var counter: UInt32? { vmm.readCounter() }

    /// Where this VMM stands, which decides the requests it takes: a target-only request
    /// (memory, bindings, restore, undo) is refused by a VMM whose VM runs, and a source-only
    /// one (pause, retire) by a VMM still being built.
    enum Phase: String {
        /// No VM yet: a spawned target before create-vm.
        case empty
        /// A target's VM being assembled: memory, memslots, state.
        case building
        /// The guest runs: a source, or a target after its restore (the next hop's source).
        case running
        /// A source paused by the coordinator: it resumes (rollback) or retires.
        case paused
    }

    private var paused = false
    /// When the vcpus stopped for the pause in force (a repeated pause answers the same).
    private var stoppedAt: UInt64?
    /// The state stage-state set into the vcpus, for a restore that does not carry it again.
    private var staged: VMState?

    /// Why the read-back of the staged state failed (restore then answers it), and how long it took.
    private var stagingFailure: String?
    private var readBack: Int64?
    /// Whether the staged state still waits for its read-back (`afterReply`).
    private var readBackPending = false
    /// A target's staging thread placed for the blackout (`BlackoutPlacement`), from a
    /// streamed stage-state until its restore ran the vcpus or anything else is asked.
    private var stagingPlacement: BlackoutPlacement?

    /// Puts the staging thread's CPU mask back, where it was placed.
    private func endStagingPlacement() {
        stagingPlacement?.end()
        stagingPlacement = nil
    }

    /// Log lines of the blackout's requests, written once the reply is sent (`afterReply`): the
    /// coordinator waits on the reply, and on this machine kind the CPUs are all busy then.
    private var pendingLog: [() -> String] = []
    /// A log line made and written after the reply (its text too is made then).
    private func later(_ line: @escaping @autoclosure () -> String) { pendingLog.append(line) }

    private func writeLaterLines() {
        for line in pendingLog { log.say(line()) }
        pendingLog.removeAll()
    }

    /// A source paused with its state sent straight to the target: the blackout goes on in the
    /// target and the coordinator, which share this machine's CPUs with this VMM, so its log
    /// lines wait for the next request (or the VMM's end).
    private var pausedForTarget = false

    /// The read-back of a state stage-state set, once its reply is sent; then the log lines
    /// the reply waited for, unless the staged state now waits for its restore or the state
    /// went to a target (`pausedForTarget`): inside the blackout nothing but the read-back
    /// comes before the restore, and the lines wait for the next reply (or the VMM's end).
    func afterReply() {
        defer {
            let blackoutGoesOn = (staged != nil && !vmm.isRunning && stagingFailure == nil) || pausedForTarget
            if exitRequested || !blackoutGoesOn { writeLaterLines() }
        }
        guard readBackPending, staged != nil, !vmm.isRunning else { return }
        readBackPending = false
        let clock = ContinuousClock()
        let began = clock.now
        do {
            try vmm.verifyStaged()
            readBack = (clock.now - began).nanoseconds
            later("the staged state read back equal")
        } catch {
            stagingFailure = error.message
            later("the staged state: \(error.message)")
        }
    }

    /// A target with a staged state polls for the restore that follows inside the blackout.
    var pollForNextRequest: Duration { staged != nil && !vmm.isRunning ? .milliseconds(20) : .zero }

    var phase: Phase {
        if vmm.vmHandle == nil { return .empty }
        if paused { return .paused }
        return vmm.isRunning ? .running : .building
    }

    /// The requests each phase takes; hello, status, read-guest, arm-faults and shutdown are
    /// always taken.
    static let allowed: [Phase: Set<String>] = [
        .empty: ["create-vm", "destroy", "unbind", "release-memory"],
        .building: [
            "create-vm", "receive-memory", "receive-nics", "copy-memory", "bind", "bindings", "probe-mapping", "move-enc-context", "stage-state",
            "restore", "destroy", "unbind", "release-memory", "describe",
        ],
        // restore again: the coordinator repeats resume-target after a crash or a lost reply,
        // and a VMM whose guest runs answers ok (idempotent), as docs/handoff.md says.
        .running: ["describe", "pause", "resume", "restore", "bindings", "probe-mapping"],
        .paused: ["describe", "pause", "resume", "retire", "bindings", "probe-mapping"],
    ]
    static let always: Set<String> = ["hello", "status", "read-guest", "arm-faults", "shutdown"]

    func handle(_ request: HandoffMessage, descriptors: [Int32]) -> (HandoffMessage, [Int32]) {
        let (reply, replyDescriptors, _) = handle(request, descriptors: descriptors, attachment: nil)
        return (reply, replyDescriptors)
    }

    /// The VM state a request brings: its attachment (version 4), or base64 in `state`.
    private func requestState(_ request: HandoffMessage, _ attachment: [UInt8]?) throws -> VMState? {
        let bytes: [UInt8]
        if let attachment {
            bytes = attachment
        } else if let text = request.state {
            guard let data = Data(base64Encoded: text) else { throw EndpointError("\(request.type): the state is not base64") }
            bytes = [UInt8](data)
        } else {
            return nil
        }
        do { return try VMState(decoding: bytes) } catch { throw EndpointError("\(request.type): \(error.message)") }
    }

    func handle(_ request: HandoffMessage, descriptors: [Int32], attachment: [UInt8]?) -> (HandoffMessage, [Int32], [UInt8]?) {
        var replyAttachment: [UInt8]? = nil
        // The blackout is over for a source once the coordinator asks anything again.
        pausedForTarget = false
        var reply = HandoffMessage(type: "ok", id: request.id)
        if request.type != "restore" { endStagingPlacement() }
        do {
            let phase = self.phase
            if !TinyVMM.always.contains(request.type), HandoffMessage.requestTypes.contains(request.type),
                !(TinyVMM.allowed[phase] ?? []).contains(request.type)
            {
                for descriptor in descriptors { close(descriptor) }
                throw EndpointError("\(request.type) is refused: this VMM is \(phase.rawValue), and a \(phase.rawValue) VMM does not take it", errno: .notPermitted)
            }
            switch request.type {
            case "hello":
                try expectNone(descriptors)
                guard request.version == HandoffMessage.protocolVersion else {
                    throw EndpointError("this VMM speaks handoff version \(HandoffMessage.protocolVersion), not \(request.version.map(String.init) ?? "?")")
                }
                reply.version = HandoffMessage.protocolVersion
                reply.pid = getpid()
                reply.backend = backendText
                reply.running = vmm.isRunning
            case "describe":
                try expectNone(descriptors)
                var description = try vmm.describe()
                description.nics = taps.isEmpty ? nil : taps.map(\.nic)
                reply.vm = description
                reply.running = vmm.isRunning
                reply.counter = counter
                var handles = description.guestMemfds.compactMap { vmm.memoryHandle($0.name)?.raw }
                if description.type.hasEncryptionContext, let vm = vmm.vmHandle { handles.append(vm.raw) }
                let tapQueues = taps.flatMap(\.queues)
                log.say("describe: \(description.guestMemfds.count) gmem files handed over")
                // The descriptors stay open here: SCM_RIGHTS gives the peer its own.
                if isModel { reply.handles = handles } else { return (reply, handles + tapQueues, nil) }
            case "pause":
                // An optional socket: the state goes straight to the target on it. A second
                // one arms the pause: it happens when the coordinator's byte comes on it.
                let sockets = try sockets(descriptors, atMost: 2)
                let channel = sockets.first
                // Off the CPU where the target stages, before the trigger (outside the blackout).
                let placement = channel != nil ? BlackoutPlacement.pausingThread() : nil
                defer { placement?.end() }
                if let trigger = sockets.dropFirst().first {
                    defer { close(trigger) }
                    guard !paused, PauseTrigger.armed(trigger, spin: .milliseconds(5), timeout: Self.timeout(of: request)) else {
                        if let channel { close(channel) }  // the target hears that no state comes
                        throw EndpointError(
                            paused ? "pause: armed while paused already" : "pause: not requested: the coordinator closed the trigger; the guest runs on")
                    }
                }
                let clock = ContinuousClock()
                let began = clock.now
                stopGuest(parking: true)
                // Once its vcpus are stopped the VMM is paused, even if saving the state fails:
                // the coordinator's rollback must be able to resume it.
                if !paused { stoppedAt = MonotonicClock.nanoseconds }
                paused = true
                let stopped = clock.now
                reply.stoppedAt = stoppedAt
                let state: VMState
                if let channel {
                    // The state goes to the target only, part by part as it is saved (the
                    // target sets each as it comes); the coordinator gets its digest (and the
                    // state itself from a later pause, which answers the saved state).
                    defer { close(channel) }  // the target hears the end of the socket: no more comes
                    var sent = VMState.Digest()
                    state = try vmm.pause(sendingParts: { part throws(EndpointError) in
                        sent.add(part)
                        do throws(HandoffError) {
                            try StateChannel.send(part, on: channel, timeout: .seconds(5))
                        } catch {
                            // Paused, but the pause asked of it did not happen whole: an error (the
                            // rollback's resume is taken, since the VMM counts as paused).
                            throw EndpointError("pause: the state could not be sent to the target: \(error.message)", errno: error.errno)
                        }
                    })
                    // Once sent: the target needs the state first, the coordinator waits for
                    // the target's reply longer than for this one.
                    reply.stateDigest = sent.text
                } else {
                    state = try vmm.pause()
                    replyAttachment = state.encoded
                }
                // With a state channel, `save` counts the sends between the parts.
                reply.timings = ["stop": (stopped - began).nanoseconds, "save": (clock.now - stopped).nanoseconds]
                reply.running = false
                reply.counter = counter
                pausedForTarget = channel != nil
                later("saved sections: \(TinyVMM.sections(state))")
                let (counter, direct) = (reply.counter, channel != nil)
                later("paused; counter \(counter.map(String.init) ?? "-")\(direct ? "; the state went to the target" : "")")
            case "resume":
                try expectNone(descriptors)
                try vmm.resume()
                paused = false
                startGuest()
                reply.running = vmm.isRunning && guestRuns
                log.say("resumed")
            case "retire":
                try expectNone(descriptors)
                closeTaps()
                stopGuest()
                _ = try vmm.retire()
                exitRequested = true
                log.say("retired: the VM is closed; exiting")
            case "create-vm":
                try expectNone(descriptors)
                guard let type = request.vmType, let vcpus = request.vcpus else { throw EndpointError("create-vm needs vmType and vcpus") }
                reply.identity = try vmm.createVM(type: type, vcpus: vcpus, guest: request.guestProgram)
                log.say("created a \(type.name) VM with \(vcpus) vcpus")
            case "receive-memory":
                guard let gmem = request.gmem, let strategy = request.strategy else { throw EndpointError("receive-memory needs gmem and strategy") }
                let handle = try single(descriptors, request, kind: "kvm-gmem")
                defer { if !isModel { close(handle.raw) } }
                try checkSize(handle, of: gmem)
                reply.inode = try vmm.receiveMemory(gmem, from: handle, strategy: strategy)
                log.say("received '\(gmem.name)' by \(strategy.rawValue): inode \(reply.inode?.description ?? "?")")
            case "receive-nics":
                guard let nics = request.nics else {
                    for fd in descriptors { close(fd) }
                    throw EndpointError("receive-nics needs nics")
                }
                let expected = nics.reduce(0) { $0 + $1.queues }
                do {
                    try HandoffConnection.check(descriptors, expected: Array(repeating: "net/tun", count: expected))
                } catch {
                    throw EndpointError("receive-nics: \(error.message)")
                }
                var rest = descriptors[...]
                for nic in nics {
                    taps.append((nic, Array(rest.prefix(nic.queues))))
                    rest = rest.dropFirst(nic.queues)
                }
                log.say("took over \(nics.map { "\($0.name) (\($0.queues) queues)" }.joined(separator: ", "))")
            case "copy-memory":
                guard let gmem = request.gmem else { throw EndpointError("copy-memory needs gmem") }
                let handle = try single(descriptors, request, kind: "kvm-gmem")
                defer { if !isModel { close(handle.raw) } }
                try checkSize(handle, of: gmem)
                let copy = try vmm.copyMemory(gmem, from: handle)
                reply.copy = copy
                log.say("copied '\(gmem.name)' from the paused source: \(copy.bytesCopied) of \(copy.bytesTotal) bytes populated (\(copy.method))")
            case "bind":
                try expectNone(descriptors)
                guard let slots = request.slots, let strategy = request.strategy else { throw EndpointError("bind needs slots and strategy") }
                try vmm.bind(slots, strategy: strategy)
                rehearse()
                // The vcpu threads wait from now on, so that none is created inside the blackout.
                prepareGuest()
                log.say("bound \(slots.count) memslots; the vcpu threads wait")
            case "bindings":
                try expectNone(descriptors)
                reply.bindings = try vmm.bindings()
            case "probe-mapping":
                try expectNone(descriptors)
                switch vmm.probeGuestMapping(gpa: request.gpa ?? 0) {
                case nil: break
                case .failed(_, let errno)?, .refused(_, let errno, _)?: reply.errno = errno.rawValue
                case .unsupported(_, let reason)?: reply.message = reason
                }
            case "move-enc-context":
                let handle = try single(descriptors, request, kind: "kvm-vm")
                defer { if !isModel { close(handle.raw) } }
                try vmm.moveEncryptionContext(from: handle)
                log.say("the encryption context moved in")
            case "stage-state":
                // The state comes with the request, or from the source on the socket it carries.
                let state: VMState
                var streamed = false
                let clock = ContinuousClock()
                let began = clock.now
                if let channel = try sockets(descriptors, atMost: 1).first {
                    guard attachment == nil else {
                        close(channel)
                        throw EndpointError("stage-state: a state and a socket; one of them")
                    }
                    defer { close(channel) }
                    staged = nil
                    // On the CPU the source keeps off, until the restore ran the vcpus.
                    endStagingPlacement()
                    stagingPlacement = BlackoutPlacement.stagingThread()
                    // Each part is checked and set as it comes, while the source saves the next.
                    var receiver = StateChannel.Receiver(channel, timeout: Self.timeout(of: request))
                    while receiver.state == nil {
                        let parts: [VMState.StreamDecoder.Part]
                        do {
                            parts = try receiver.next()
                        } catch where error.kind == .malformed {
                            throw EndpointError("stage-state: the state from the source is malformed: \(error.message)")
                        } catch {
                            throw EndpointError("stage-state: no state came from the source: \(error.message)", errno: error.errno)
                        }
                        for part in parts { try vmm.stage(part) }
                    }
                    guard let whole = receiver.state else { throw EndpointError("stage-state: no whole state came from the source") }
                    state = whole
                    streamed = true
                    reply.stateDigest = receiver.digest
                } else {
                    guard let given = try requestState(request, attachment) else { throw EndpointError("stage-state needs state") }
                    state = given
                    reply.stateDigest = attachment.map(VMState.digest)
                }
                let received = clock.now
                staged = nil
                stagingFailure = nil
                readBack = nil
                readBackPending = false
                // Checked and set now; read back once the reply is sent (`afterReply`), while
                // the coordinator journals. No vcpu runs before the read-back says equal, and a
                // difference still rolls back: the target never ran, the source is whole. Not
                // so for a confidential VM: past its point of no return the move of the
                // encryption context ends the source VM, so its state is read back first.
                if streamed {
                    try vmm.finishStaging(state, readBack: vmm.isConfidential)
                } else {
                    try vmm.stage(state, readBack: vmm.isConfidential)
                }
                staged = state
                readBackPending = !vmm.isConfidential
                prepareGuest()
                reply.timings = vmm.lastTimings.merging(["receive": (received - began).nanoseconds, "stage": (clock.now - received).nanoseconds]) { _, b in b }
                later("staged the state: \(state.vcpus.count) vcpus, every section known; restored sections: \(TinyVMM.sections(state))")
            case "restore" where vmm.isRunning:
                // Idempotent: a VMM whose guest runs has restored already (a repeated
                // resume-target after a crash or a lost reply).
                try expectNone(descriptors)
                reply.running = guestRuns
                reply.counter = counter
                log.say("restore: the guest runs already")
            case "restore":
                try expectNone(descriptors)
                // The state comes with the request, or is the one stage-state set.
                let state: VMState
                if let given = try requestState(request, attachment) {
                    state = given
                } else if let staged {
                    state = staged
                } else {
                    throw EndpointError("restore needs state (or a state stage-state set)")
                }
                let wasStaged = staged == state
                if wasStaged, let stagingFailure { throw EndpointError(stagingFailure) }
                let clock = ContinuousClock()
                let began = clock.now
                try vmm.restore(state)
                let restored = clock.now
                // The counter before the guest runs here: the coordinator checks it is the source's at its pause.
                reply.counter = counter
                // The placement ends before the vcpus run: a vcpu thread woken on this CPU keeps
                // it while its guest runs (for 0.6-0.8 ms in the traces, until the scheduler's
                // tick), and this thread, kept to it, would wait that long to hear it entered.
                endStagingPlacement()
                startGuest()
                // Running means each vcpu thread is at KVM_RUN, not only let go; the blackout the
                // coordinator measures ends when the last one entered it.
                reply.runningSince = threads.map { $0.waitEntered() }.max()
                reply.timings = ["restore": (restored - began).nanoseconds, "resume": (clock.now - restored).nanoseconds]
                if wasStaged, let readBack { reply.timings?["staged-read-back"] = readBack }
                reply.running = vmm.isRunning && guestRuns
                // The staging is over: this VMM runs the guest now (and may be the next hop's source).
                staged = nil
                readBack = nil
                later(wasStaged ? "restore: the staged state; the guest runs"
                    : "restored sections: \(TinyVMM.sections(state)); read back equal; the guest runs")
            case "destroy":
                try expectNone(descriptors)
                closeTaps()
                stopGuest()
                try vmm.destroy()
                exitRequested = true
                log.say("destroyed; exiting")
            case "unbind":
                try expectNone(descriptors)
                try vmm.unbind(request.slots ?? [])
            case "release-memory":
                try expectNone(descriptors)
                try vmm.releaseMemory()
            case "status":
                try expectNone(descriptors)
                reply.running = vmm.isRunning && guestRuns
                reply.counter = counter
                reply.guest = vmm.longModeReports()
            case "read-guest":
                try expectNone(descriptors)
                let count = min(max(request.count ?? 0, 0), 1 << 16)
                reply.bytes = Data(try vmm.readGuest(gpa: request.gpa ?? 0, count: count)).base64EncodedString()
            case "arm-faults":
                try expectNone(descriptors)
                guard let faults else { throw EndpointError("this VMM was not started with --allow-faults: its fault points cannot be armed") }
                var specs: [FaultSpec] = []
                for text in request.faults ?? [] {
                    guard let spec = try? FaultSpec(parsing: text), case .kernel = spec.point else {
                        throw EndpointError("arm-faults: '\(text)' is not a kernel:* fault")
                    }
                    specs.append(spec)
                }
                faults.arm(specs)
                log.say("armed \(specs.map(\.description).joined(separator: " "))")
            case "shutdown":
                try expectNone(descriptors)
                exitRequested = true
                log.say("shutting down")
            default:
                throw EndpointError("'\(request.type)' is not a request")
            }
        } catch let error as EndpointError {
            reply = HandoffMessage(type: "error", id: request.id)
            reply.message = error.message
            reply.errno = error.errno?.rawValue
            log.say("\(request.type) failed: \(error.message)")
        } catch {
            reply = HandoffMessage(type: "error", id: request.id)
            reply.message = "\(error)"
        }
        // A staging or a restore that failed ends the blackout's placement.
        if reply.type != "ok" { endStagingPlacement() }
        reply.fired = newlyFired()
        return (reply, [], reply.type == "ok" ? replyAttachment : nil)
    }

    /// A state's sections for the log: `VM [...], each of N vcpus [...]`.
    static func sections(_ state: VMState) -> String {
        "VM [\(state.vm.map(\.name).joined(separator: " "))], each of \(state.vcpus.count) vcpus [\(state.vcpus.first?.sections.map(\.name).joined(separator: " ") ?? "")]"
    }

    /// The armed faults that fired since the last reply said so.
    private func newlyFired() -> [String]? {
        guard let faults else { return nil }
        let fresh = faults.fired.filter { !reportedFaults.contains($0) }
        reportedFaults.formUnion(fresh)
        return fresh.isEmpty ? nil : fresh.map(\.description)
    }

    /// A received guest_memfd is the size its description says (a smaller file must not be
    /// mapped as the larger one).
    private func checkSize(_ handle: KernelHandle, of gmem: VMDescription.Gmem) throws {
        guard !isModel else { return }
        var status = stat()
        guard fstat(handle.raw, &status) == 0 else { throw EndpointError("fstat of the received guest_memfd: \(String(cString: strerror(errno)))") }
        guard status.st_size >= 0, UInt64(status.st_size) == gmem.size else {
            throw EndpointError("the received guest_memfd for '\(gmem.name)' holds \(status.st_size) bytes, not the \(gmem.size) its description says")
        }
    }

    /// How long a request may wait for its peer (`timeoutMilliseconds`: 5 s unless it says,
    /// between 1 ms and a day).
    static func timeout(of request: HandoffMessage) -> Duration {
        .milliseconds(Int64(min(max(request.timeoutMilliseconds ?? 5000, 1), 86_400_000)))
    }

    /// The sockets a request may carry, in order: a stage-state's state channel, or a pause's
    /// state channel and then its trigger. More than `count`, or anything but sockets, closes
    /// them all.
    private func sockets(_ descriptors: [Int32], atMost count: Int) throws -> [Int32] {
        func isSocket(_ descriptor: Int32) -> Bool {
            var status = stat()
            return fstat(descriptor, &status) == 0 && status.st_mode & S_IFMT == S_IFSOCK
        }
        guard descriptors.count <= count, descriptors.allSatisfy(isSocket) else {
            let kinds = descriptors.map(HandoffConnection.kind(of:))
            for descriptor in descriptors { close(descriptor) }
            throw EndpointError("expected at most \(count == 1 ? "one socket" : "two sockets"), received [\(kinds.joined(separator: ", "))] (closed)")
        }
        return descriptors
    }

    private func expectNone(_ descriptors: [Int32]) throws {
        guard descriptors.isEmpty else {
            for descriptor in descriptors { close(descriptor) }
            throw EndpointError("\(descriptors.count) unexpected descriptors (closed)")
        }
    }

    /// The one object a request hands over: a received descriptor of `kind`, or a model handle.
    private func single(_ descriptors: [Int32], _ request: HandoffMessage, kind: String) throws -> KernelHandle {
        if isModel {
            try expectNone(descriptors)
            guard let handles = request.handles, handles.count == 1 else { throw EndpointError("\(request.type) needs one model handle") }
            return KernelHandle(raw: handles[0])
        }
        do {
            try HandoffConnection.check(descriptors, expected: [kind])
        } catch {
            throw EndpointError("\(request.type): \(error.message)")
        }
        return KernelHandle(raw: descriptors[0])
    }
}


/// The violations a guest reported, kept for the log and for status.
final class ViolationLog: @unchecked Sendable {
    // @unchecked: guarded by `lock`.
    private let lock = NSLock()
    private var texts: [String] = []
    func add(_ text: String) { lock.withLock { texts.append(text) } }
    var all: [String] { lock.withLock { texts } }
}
