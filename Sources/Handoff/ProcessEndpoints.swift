import CKVM
import Foundation
import Guests
import HostNet
import Journal
import Kernel
import Orchestrator
import Plans

#if canImport(Glibc)
import Glibc
#endif

/// The VMMs of a migration between processes: the source's handoff socket, and a target that
/// create-target spawns (a tinyvmm) or connects to. A VMM whose VM KVM destroys (a uevent) or
/// whose process dies (its pidfd) stops the migration at once, before the point of no return.
public final class ProcessEndpoints: EndpointProvider {
    /// How create-target starts a target VMM.
    public struct Spawn: Sendable {
        /// `linux`, or `model:HOSTFILE`.
        public var backend: String
        public var logFile: String
        public init(backend: String, logFile: String) {
            self.backend = backend
            self.logFile = logFile
        }
    }

    public let sourceSocket: String
    public let targetSocket: String
    let spawn: Spawn?
    let timeout: Duration
    public private(set) var sourceVMM: RemoteVMM?
    public private(set) var targetVMM: RemoteVMM?
    private var targetProcess: Process?
    /// The pid of a target this coordinator (or, when recovering, the one before it) spawned.
    private var spawnedPID: Int32?
    /// Whether a target may exist (create-target was attempted): recovery reconnects to it.
    private var targetMayExist: Bool
    private var kernelFaults: [FaultSpec] = []
    private let abort = AbortFlag()
    private let roles = RolePIDs()
    private let gone = GoneRoles()
    private let pids: PidWatcher
    private let watcher: KVMEventWatcher?
    private var token: UUID?
    private let onVMEvent: @Sendable (String) -> Void
    /// What went wrong arming `kernel:*` faults in a VMM (they then stay unfired).
    public private(set) var armingProblems: [String] = []

    /// VMM processes that wake one another inside the blackout: the coordinator holds the CPU
    /// latency request through it (`CPULatencyHold`), unless the target runs on the model or
    /// `GMIGRATE_CPU_LATENCY_HOLD=off` says not to.
    public var holdsCPULatencyInBlackout: Bool {
        guard ProcessInfo.processInfo.environment["GMIGRATE_CPU_LATENCY_HOLD"] != "off" else { return false }
        return !(spawn?.backend.hasPrefix("model") ?? false)
    }

    public init(
        sourceSocket: String, targetSocket: String, spawn: Spawn?, timeout: Duration, watcher: KVMEventWatcher? = nil,
        onVMEvent: @escaping @Sendable (String) -> Void = { _ in }, recoveredTargetPID: Int32? = nil, targetMayExist: Bool = false
    ) {
        self.sourceSocket = sourceSocket
        self.targetSocket = targetSocket
        self.spawn = spawn
        self.timeout = timeout
        self.watcher = watcher
        self.onVMEvent = onVMEvent
        self.spawnedPID = recoveredTargetPID
        self.targetMayExist = targetMayExist
        let abort = self.abort
        let gone = self.gone
        pids = PidWatcher { pid, role in
            // A VMM process that died while the coordinator holds its gmem files: KVM sends no
            // destroy (the files pin the VM), so its pid says it.
            let reason = "the \(role) VMM (pid \(pid)) died"
            gone.set(role, reason)
            abort.set(reason)
            onVMEvent(reason)
        }
        let roles = self.roles
        token = watcher?.subscribe { event in
            guard event.kind == .destroy, let role = roles.role(of: event.pid) else { return }
            let reason = "the \(role) VMM's VM (pid \(event.pid)) was destroyed (KVM uevent)"
            gone.set(role, reason)
            guard abort.reason == nil else { return }
            abort.set(reason)
            onVMEvent(reason)
        }
    }

    /// The provider a recovering coordinator uses: the sockets from the started record, the
    /// spawned target's pid from create-target's outcome; nothing is spawned again.
    public static func recovering(_ started: JournalEntry.Started, _ machine: MigrationMachine) -> ProcessEndpoints {
        ProcessEndpoints(
            sourceSocket: started.sourceSocket ?? "", targetSocket: started.targetSocket ?? "", spawn: nil,
            timeout: started.plan.policy.stepTimeout, recoveredTargetPID: machine.details[.createTarget]?["pid"].flatMap { Int32($0) },
            targetMayExist: machine.attempted.contains(.createTarget))
    }

    deinit { close() }

    /// Stops watching; lets go of the VMM connections (the VMMs run on by themselves).
    public func close() {
        pids.stop()
        if let token { watcher?.unsubscribe(token) }
        token = nil
    }

    public var abortReason: String? { abort.reason }

    public func knownGone(_ role: JournalEntry.Role) -> String? { gone.reason(role.rawValue) }

    public func source() throws(EndpointError) -> any VMMEndpoint {
        if let sourceVMM { return sourceVMM }
        let vmm: RemoteVMM
        do {
            vmm = try RemoteVMM(role: "source", socketPath: sourceSocket, timeout: timeout)
        } catch {
            throw EndpointError("source VMM: \(error.message)", errno: error.errno)
        }
        sourceVMM = vmm
        roles.set(vmm.peer.pid, "source")
        pids.watch(vmm.peer.pid, name: "source")
        arm(vmm)
        return vmm
    }

    public func makeTarget() throws(EndpointError) -> any VMMEndpoint {
        if let targetVMM { return targetVMM }
        targetMayExist = true
        if let spawn, spawnedPID == nil {
            do {
                let process = try ProcessRun.spawnVMM(
                    socket: targetSocket, backend: spawn.backend,
                    // Each target its own name: on a model host the name is the process, and the
                    // next hop's target must not be taken for this one.
                    name: "target/" + ((targetSocket as NSString).lastPathComponent as NSString).deletingPathExtension, logFile: spawn.logFile, allowFaults: !kernelFaults.isEmpty)
                targetProcess = process
                spawnedPID = process.processIdentifier
            } catch {
                throw EndpointError.from(error)
            }
        }
        let vmm: RemoteVMM
        do {
            vmm = try RemoteVMM(role: "target", socketPath: targetSocket, timeout: timeout, expectedPID: spawnedPID)
        } catch {
            throw EndpointError("target VMM: \(error.message)", errno: error.errno)
        }
        targetVMM = vmm
        gone.clear("target")
        roles.set(vmm.peer.pid, "target")
        pids.watch(vmm.peer.pid, name: "target")
        arm(vmm)
        return vmm
    }

    public func existingTarget() -> (any VMMEndpoint)? {
        if let targetVMM { return targetVMM }
        // A coordinator that took over after a crash reaches the target again, if it answers.
        guard targetMayExist, !targetSocket.isEmpty,
            let vmm = try? RemoteVMM(role: "target", socketPath: targetSocket, timeout: timeout, expectedPID: spawnedPID)
        else { return nil }
        targetVMM = vmm
        return vmm
    }

    public func disposeTarget() throws(EndpointError) {
        defer {
            if let targetVMM { goneFired += targetVMM.firedFaults }
            targetVMM = nil
            targetMayExist = false
        }
        guard let pid = spawnedPID else { return }
        // Destroy made it exit; one that did not (or did not answer) is killed.
        if !ProcessWatch.waitForExit(pid, timeout: .seconds(2)) {
            kill(pid, SIGKILL)
            guard ProcessWatch.waitForExit(pid, timeout: .seconds(5)) else {
                throw EndpointError("the spawned target VMM (pid \(pid)) does not exit, even after SIGKILL")
            }
        }
        targetProcess?.waitUntilExit()  // reaps our child
        targetProcess = nil
        spawnedPID = nil
    }

    public var targetDetails: [String: String] {
        var details = ["socket": targetSocket]
        if let pid = targetVMM?.peer.pid { details["pid"] = "\(pid)" }
        details["spawned"] = spawnedPID == nil ? "no" : "yes"
        return details
    }

    public func observe(_ role: JournalEntry.Role) -> JournalEntry.Observation {
        switch role {
        case .source:
            do {
                let (liveness, detail) = try source().observe()
                return .init(role: role, liveness: liveness, detail: detail)
            } catch {
                return .init(role: role, liveness: .gone, detail: error.message)
            }
        case .target:
            guard let target = existingTarget() else {
                if let pid = spawnedPID, ProcessWatch.isAlive(pid) {
                    return .init(role: role, liveness: .stopped, detail: "pid \(pid) is alive but does not answer at \(targetSocket)")
                }
                return .init(role: role, liveness: .gone, detail: targetMayExist ? "nothing answers at \(targetSocket)" : "it was never made")
            }
            var (liveness, detail) = target.observe()
            if liveness == .running, let nics = (try? describedNICs()), !nics.isEmpty {
                // The network went with the guest: each tap still up and attached (rtnetlink).
                detail = [detail, nics].compactMap { $0 }.joined(separator: "; ")
            }
            return .init(role: role, liveness: liveness, detail: detail)
        }
    }

    /// NIC states for the plan's taps, read through rtnetlink.
    private var plannedNICs: [String] = []
    public func expectNICs(_ names: [String]) { plannedNICs = names }

    private func describedNICs() throws -> String? {
        guard !plannedNICs.isEmpty else { return nil }
        let links = (try? readLinks()) ?? []
        return plannedNICs.map { name in
            guard let link = links.first(where: { $0.name == name }) else { return "nic \(name): MISSING" }
            return "nic \(name): \(link.isUp ? "up" : "DOWN"), mtu \(link.mtu), attached to \(link.master ?? "no bridge")"
        }.joined(separator: "; ")
    }

    public func armKernelFaults(_ specs: [FaultSpec]) {
        kernelFaults = specs
        for vmm in [sourceVMM, targetVMM].compactMap({ $0 }) { arm(vmm) }
    }

    private func arm(_ vmm: RemoteVMM) {
        guard !kernelFaults.isEmpty else { return }
        do {
            try vmm.armFaults(kernelFaults)
        } catch {
            armingProblems.append(error.message)
        }
    }

    /// The faults that fired in a target that was disposed of since.
    private var goneFired: [FaultSpec] = []

    public var firedKernelFaults: [FaultSpec] { (sourceVMM?.firedFaults ?? []) + (targetVMM?.firedFaults ?? []) + goneFired }
}

/// What a migration between VMM processes checked: the guest's counter went on, its memory
/// agreed with its registers at the switch-over, the memory is the same pages (link, share) or
/// a copy.
public struct ProcessVerification: Codable, Sendable, Equatable {
    /// The counter in guest memory when the source paused.
    public var counterAtPause: UInt32?
    /// The counter guest's register copy of its count (eax) at the pause: memory and registers
    /// agree when it is the memory's count or one less (paused between the increment and the load).
    public var registerAtPause: UInt32?
    /// The counter in the target's memory when it was restored, before it ran: it must be the
    /// counter at the pause (no reset, no lost write).
    public var counterAtResume: UInt32?
    /// The counter in the survivor once it counted on.
    public var counterAfter: UInt32?
    public var sourceInodes: [String: String]
    public var targetInodes: [String: String]
    /// The long-mode guest's own account: no violation, work, syscalls, timer and clocks going on.
    public var guest: LongModeCheck?

    /// The guest carried on: the long-mode guest's check, or the counter guest's counter.
    public var passed: Bool { guest?.passed ?? counterContinued }

    public var registersAgree: Bool {
        guard let memory = counterAtPause, let register = registerAtPause else { return true }
        return register == memory || register &+ 1 == memory
    }

    public var counterContinued: Bool {
        guard let before = counterAtPause, let after = counterAfter else { return false }
        return after > before && (counterAtResume.map { $0 == before } ?? true) && registersAgree
    }
}

/// A migration between VMM processes, run by the one runner: the source's handoff socket, and
/// a target the coordinator spawns (a tinyvmm) or connects to.
public final class ProcessRun {
    public let summary: MigrationSummary
    public let verification: ProcessVerification?
    public let journalPath: String
    public let targetSocket: String
    public let targetPID: Int32?
    /// Problems arming `kernel:*` faults in the VMMs (those faults stay unfired).
    public let armingProblems: [String]

    init(summary: MigrationSummary, verification: ProcessVerification?, journalPath: String, targetSocket: String, targetPID: Int32?, armingProblems: [String]) {
        self.summary = summary
        self.verification = verification
        self.journalPath = journalPath
        self.targetSocket = targetSocket
        self.targetPID = targetPID
        self.armingProblems = armingProblems
    }

    /// The tinyvmm executable: `GMIGRATE_TINYVMM`, or the one next to this executable.
    public static func tinyvmmPath() -> String {
        if let path = ProcessInfo.processInfo.environment["GMIGRATE_TINYVMM"], FileManager.default.isExecutableFile(atPath: path) {
            return path
        }
        let me = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        let directory = (me as NSString).deletingLastPathComponent
        for candidate in [directory + "/tinyvmm", directory + "/../tinyvmm"] where FileManager.default.isExecutableFile(atPath: candidate) {
            return candidate
        }
        return "tinyvmm"
    }

    /// What the long-mode guest recorded, as a VMM's status says, with the host's time.
    public static func sample(_ vmm: RemoteVMM) -> LongModeSample? {
        guard (try? vmm.status()) != nil, let reports = vmm.lastGuestReport else { return nil }
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        return LongModeSample(hostNanoseconds: UInt64(now.tv_sec) &* 1_000_000_000 &+ UInt64(now.tv_nsec), vcpus: reports)
    }

    /// Starts a tinyvmm and waits until its socket answers.
    public static func spawnVMM(
        socket: String, backend: String, name: String, logFile: String, plan: String? = nil, allowFaults: Bool = false, extra: [String] = []
    ) throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: tinyvmmPath())
        var arguments = ["--socket", socket, "--name", name]
        if backend.hasPrefix("model:") {
            arguments += ["--backend", "model", "--model-host", String(backend.dropFirst(6))]
        } else {
            arguments += ["--backend", "linux"]
        }
        if let plan { arguments += ["--plan", plan] }
        if allowFaults { arguments.append("--allow-faults") }
        process.arguments = arguments + extra
        _ = FileManager.default.createFile(atPath: logFile, contents: nil)
        let log = FileHandle(forWritingAtPath: logFile)
        log?.seekToEndOfFile()
        process.standardOutput = log
        process.standardError = log
        // The VMM starts with no signal blocked: posix_spawn passes on the calling thread's
        // mask, and a coordinator run by a test runner or a service manager may block SIGTERM
        // (a VMM that survives SIGTERM) or SIGUSR1 (tinyvmm's vcpu kick). tinyvmm also resets
        // ignored dispositions itself.
        var saved = [UInt8](repeating: 0, count: Int(ckvm_sigset_size()))
        _ = saved.withUnsafeMutableBytes { ckvm_clear_signal_mask($0.baseAddress) }
        defer { _ = saved.withUnsafeBytes { ckvm_set_signal_mask($0.baseAddress) } }
        try process.run()
        // Ready when its socket accepts (it listens before it serves).
        let deadline = ContinuousClock.now + .seconds(10)
        while ContinuousClock.now < deadline {
            if !process.isRunning { throw EndpointError("the VMM (\(name)) exited at start: see \(logFile)") }
            if HandoffConnection.probe(path: socket) == 0 { return process }
            _ = ProcessWatch.waitForExit(process.processIdentifier, timeout: .milliseconds(5))
        }
        process.terminate()
        throw EndpointError("the VMM (\(name)) did not listen at \(socket) within 10 s: see \(logFile)")
    }

    /// Where a spawned target listens: in `vmmDirectory`, named after the migration's id
    /// (sun_path holds 108 bytes: the id's random suffix keeps it short).
    public static func spawnedTargetSocket(id: String, vmmDirectory: String) -> String {
        let suffix = String(id.split(separator: "-").last ?? "vmm").prefix(12)
        return vmmDirectory + "/t-\(suffix).sock"
    }

    /// The started record of a migration between VMM processes: what recovery needs to reach
    /// both VMMs again.
    public static func startedRecord(
        id: String, plan: MigrationPlan, planFile: String, strategy: Strategy, faults specs: [FaultSpec], sourceSocket: String,
        targetSocket: String?, spawnBackend: String, vmmDirectory: String, idempotencyKey: String?
    ) -> JournalEntry.Started {
        var started = JournalEntry.Started(
            id: id, planFile: planFile, plan: plan, strategy: strategy, backend: "processes:" + spawnBackend, coordinatorPID: getpid(),
            faults: specs.map(\.description), sourceSocket: sourceSocket,
            targetSocket: targetSocket ?? spawnedTargetSocket(id: id, vmmDirectory: vmmDirectory))
        started.idempotencyKey = idempotencyKey
        return started
    }

    /// Migrates the VM behind `sourceSocket` into the target, journaled; verifies the counter.
    /// The journal is begun before any VMM is contacted, so a crash at any moment leaves a
    /// migration that `gmigrate recover` finds. A caller that journaled the migration when it
    /// accepted it (the daemon) passes that journal as `begun`; then an unreachable source is
    /// the machine's to handle (it rolls back, or records why it cannot).
    public static func run(
        plan: MigrationPlan, planFile: String, strategy: Strategy, journal store: Journal, faults specs: [FaultSpec],
        sourceSocket: String, targetSocket: String?, spawnBackend: String, vmmDirectory: String,
        progress: @escaping (StepReport) -> Void = { _ in }, cancelReason: @escaping () -> String? = { nil },
        observer: @escaping (JournalEntry.Event) -> Void = { _ in }, idempotencyKey: String? = nil, id chosen: String? = nil,
        begun: MigrationJournal? = nil, watcher: KVMEventWatcher? = nil,
        onVMEvent: @escaping @Sendable (String) -> Void = { _ in }
    ) throws -> ProcessRun {
        if begun == nil {
            // Nothing answers at the source's socket: there is no migration to journal.
            let reachable = HandoffConnection.probe(path: sourceSocket)
            if reachable != 0 {
                throw EndpointError("connecting to \(sourceSocket): \(String(cString: strerror(reachable)))", errno: Errno(rawValue: reachable))
            }
        }
        let id = begun?.id ?? chosen ?? MigrationRunner.newID(plan.name)
        let targetPath = targetSocket ?? spawnedTargetSocket(id: id, vmmDirectory: vmmDirectory)
        if targetSocket == nil {
            try FileManager.default.createDirectory(atPath: vmmDirectory, withIntermediateDirectories: true)
        }
        let started = startedRecord(
            id: id, plan: plan, planFile: planFile, strategy: strategy, faults: specs, sourceSocket: sourceSocket, targetSocket: targetSocket,
            spawnBackend: spawnBackend, vmmDirectory: vmmDirectory, idempotencyKey: idempotencyKey)
        // The long-mode guest's account before the migration, for the comparison after it.
        let sourceSample = (try? RemoteVMM(role: "source", socketPath: sourceSocket, timeout: plan.policy.stepTimeout)).flatMap(ProcessRun.sample)
        let journal = try begun ?? MigrationRunner.begin(started, in: store)
        let provider = ProcessEndpoints(
            sourceSocket: sourceSocket, targetSocket: targetPath,
            spawn: targetSocket == nil ? .init(backend: spawnBackend, logFile: vmmDirectory + "/\(id)-target.log") : nil,
            timeout: plan.policy.stepTimeout, watcher: watcher, onVMEvent: onVMEvent)
        defer { provider.close() }
        provider.expectNICs(plan.vm.nics.map(\.name))
        let summary = try MigrationRunner.run(
            journal, provider: provider, faults: FaultInjector(), progress: progress, cancelReason: cancelReason, observer: observer)
        var verification: ProcessVerification? = nil
        let survivor: RemoteVMM? = summary.state == .completed ? provider.targetVMM : summary.state == .rolledBack ? provider.sourceVMM : nil
        if let survivor, let source = provider.sourceVMM {
            let atPause = source.lastCounter
            var after: UInt32? = nil
            var guest: LongModeCheck? = nil
            if let before = sourceSample, !before.vcpus.isEmpty {
                // The long-mode guest: two samples in the survivor, a timer measure apart.
                if let first = ProcessRun.sample(survivor) {
                    _ = ProcessWatch.waitForExit(survivor.peer.pid, timeout: .milliseconds(400))
                    if let second = ProcessRun.sample(survivor) { 
                        guest = LongModeCheck.check(before: before, after: first, later: second, blackoutNanoseconds: summary.blackoutNanoseconds)
                    }
                }
                if guest == nil { guest = LongModeCheck(vcpus: [], problems: ["the survivor reports nothing of its guest"]) }
            } else {
                // The counter guest counts on: wait (bounded) for the survivor's counter to pass the pause's.
                let deadline = ContinuousClock.now + .seconds(5)
                while ContinuousClock.now < deadline {
                    after = try? survivor.status().counter
                    if let after, let atPause, after > atPause { break }
                    if atPause == nil { break }
                    _ = ProcessWatch.waitForExit(survivor.peer.pid, timeout: .milliseconds(10))
                }
            }
            verification = ProcessVerification(
                counterAtPause: atPause, registerAtPause: guest == nil ? source.pausedState?.vcpus.first.map { UInt32(truncatingIfNeeded: $0.registers.rax) } : nil,
                counterAtResume: summary.state == .completed ? provider.targetVMM?.counterAtRestore : nil, counterAfter: after,
                sourceInodes: journal.entries.inodes(recordedBy: .prepare), targetInodes: journal.entries.inodes(recordedBy: .handOverMemory),
                guest: guest)
        }
        return ProcessRun(
            summary: summary, verification: verification, journalPath: journal.path, targetSocket: targetPath,
            targetPID: provider.targetVMM?.peer.pid, armingProblems: provider.armingProblems)
    }
}

/// The provider recovery uses for a journal's migration: VMM processes are reached again
/// through their sockets; in-process VMMs ended with the coordinator that held them.
public func recoveryProvider(_ started: JournalEntry.Started, _ machine: MigrationMachine) -> any EndpointProvider {
    if started.backend.hasPrefix("processes:") { return ProcessEndpoints.recovering(started, machine) }
    return InProcessEndpoints.afterCrash(started)
}
