import Foundation
import HostNet
import Journal
import Kernel
import Orchestrator
import Plans

#if canImport(Glibc)
import Glibc
#endif

/// What a migration between VMM processes checked: the guest's counter went on, the memory is
/// the same pages (link, share) or a copy.
public struct ProcessVerification: Codable, Sendable, Equatable {
    /// The counter in guest memory when the source paused.
    public var counterAtPause: UInt32?
    /// The counter in the target's memory when it was restored, before it ran: it must be the
    /// counter at the pause (no reset, no lost write).
    public var counterAtResume: UInt32?
    /// The counter in the target a moment after it resumed.
    public var counterAfter: UInt32?
    public var sourceInodes: [String: String]
    public var targetInodes: [String: String]

    public var counterContinued: Bool {
        guard let before = counterAtPause, let after = counterAfter else { return false }
        return after > before && (counterAtResume.map { $0 == before } ?? true)
    }
}

/// A migration between VMM processes: the source's handoff socket, and a target the coordinator
/// spawns (a tinyvmm) or connects to.
public final class ProcessRun {
    public let summary: MigrationSummary
    public let verification: ProcessVerification?
    public let source: RemoteVMM
    public let target: RemoteVMM
    public let targetProcess: Process?
    public let journalPath: String

    init(summary: MigrationSummary, verification: ProcessVerification?, source: RemoteVMM, target: RemoteVMM, targetProcess: Process?, journalPath: String) {
        self.summary = summary
        self.verification = verification
        self.source = source
        self.target = target
        self.targetProcess = targetProcess
        self.journalPath = journalPath
    }

    /// Whether a process exists and is not a zombie.
    static func isAlive(_ pid: Int32) -> Bool {
        guard kill(pid, 0) == 0 || errno == EPERM else { return false }
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
            let close = stat.lastIndex(of: ")")
        else { return true }
        return stat[stat.index(after: close)...].dropFirst().first != "Z"
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

    /// Starts a tinyvmm and waits until its socket answers.
    public static func spawnVMM(socket: String, backend: String, name: String, logFile: String, plan: String? = nil) throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: tinyvmmPath())
        var arguments = ["--socket", socket, "--name", name]
        if backend.hasPrefix("model:") {
            arguments += ["--backend", "model", "--model-host", String(backend.dropFirst(6))]
        } else {
            arguments += ["--backend", "linux"]
        }
        if let plan { arguments += ["--plan", plan] }
        process.arguments = arguments
        _ = FileManager.default.createFile(atPath: logFile, contents: nil)
        let log = FileHandle(forWritingAtPath: logFile)
        log?.seekToEndOfFile()
        process.standardOutput = log
        process.standardError = log
        try process.run()
        // Ready when its socket accepts.
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline {
            if !process.isRunning { throw EndpointError("the VMM (\(name)) exited at start: see \(logFile)") }
            if socketAnswers(socket) { break }
            Thread.sleep(forTimeInterval: 0.01)
        }
        return process
    }

    /// Migrates the VM behind `sourceSocket` into the target, journaled; verifies the counter.
    public static func run(
        plan: MigrationPlan, planFile: String, strategy: Strategy, journal store: Journal, faults specs: [FaultSpec],
        sourceSocket: String, targetSocket: String?, spawnBackend: String, vmmDirectory: String,
        progress: @escaping (StepReport) -> Void = { _ in }, shouldCancel: @escaping () -> Bool = { false },
        idempotencyKey: String? = nil, id chosen: String? = nil, watcher: KVMEventWatcher? = nil,
        onVMEvent: @escaping @Sendable (String) -> Void = { _ in }
    ) throws -> ProcessRun {
        let id = chosen ?? StandaloneRun.newID(plan.name)
        let timeout = plan.policy.stepTimeout
        let source = try RemoteVMM(role: "source", socketPath: sourceSocket, timeout: timeout)
        var targetProcess: Process? = nil
        let targetPath: String
        if let targetSocket {
            targetPath = targetSocket
        } else {
            try FileManager.default.createDirectory(atPath: vmmDirectory, withIntermediateDirectories: true)
            // sun_path holds 108 bytes: keep the name short (the id's random suffix).
            targetPath = vmmDirectory + "/target-\(id.split(separator: "-").last ?? "vmm").sock"
            targetProcess = try spawnVMM(
                socket: targetPath, backend: spawnBackend, name: "\(id)/target", logFile: vmmDirectory + "/\(id)-target.log")
        }
        let target = try RemoteVMM(
            role: "target", socketPath: targetPath, timeout: timeout, expectedPID: targetProcess?.processIdentifier)
        let journal = try store.create(id: id)
        var started = JournalEntry.Started(
            id: id, planFile: planFile, plan: plan, strategy: strategy, backend: "processes:" + source.backend, coordinatorPID: getpid(),
            faults: specs.map(\.description), sourceSocket: sourceSocket, targetSocket: targetPath, sourcePID: source.peer.pid,
            targetPID: target.peer.pid)
        started.idempotencyKey = idempotencyKey
        try journal.append(.started(started))
        let injector = FaultInjector(specs)
        // A VMM whose VM KVM destroys (its process died, or it closed the VM) stops the migration
        // at once, without waiting for a request to fail or time out.
        let abort = AbortFlag()
        let pids = [source.peer.pid: "source", target.peer.pid: "target"]
        let token = watcher?.subscribe { event in
            guard event.kind == .destroy, let role = pids[event.pid], abort.reason == nil else { return }
            let reason = "the \(role) VMM's VM (pid \(event.pid)) was destroyed (KVM uevent)"
            abort.set(reason)
            _ = try? journal.append(.note("uevent: destroy of the VM of pid \(event.pid), the \(role) VMM"))
            onVMEvent(reason)
        }
        defer { if let token { watcher?.unsubscribe(token) } }
        // A VMM process that dies while it still shares its VM with the coordinator (which holds
        // the source's gmem files, so KVM sends no destroy) is noticed by its pid.
        let watching = AbortFlag()
        let processWatch = Thread {
            while watching.reason == nil && abort.reason == nil {
                for (pid, role) in pids where !ProcessRun.isAlive(pid) {
                    // KVM's own destroy uevent, when it comes, says more: give it a moment.
                    Thread.sleep(forTimeInterval: 0.2)
                    guard abort.reason == nil else { break }
                    abort.set("the \(role) VMM (pid \(pid)) died")
                    _ = try? journal.append(.note("the \(role) VMM process (pid \(pid)) died"))
                    onVMEvent("the \(role) VMM (pid \(pid)) died")
                }
                Thread.sleep(forTimeInterval: 0.05)
            }
        }
        processWatch.start()
        defer { watching.set("done") }
        injector.interruptDelays { abort.reason != nil }
        let migration = Migration(
            id: id, plan: plan, strategy: strategy, journal: journal, source: source, target: target, faults: injector, progress: progress,
            shouldCancel: shouldCancel, abortReason: { abort.reason })
        let summary = try migration.run()
        // After the switch-over each NIC must still be up and attached (rtnetlink), journaled.
        if summary.state == .completed, !plan.vm.nics.isEmpty {
            let links = (try? readLinks()) ?? []
            for nic in plan.vm.nics {
                let link = links.first { $0.name == nic.name }
                let text = link.map { "nic \(nic.name): \($0.isUp ? "up" : "DOWN"), mtu \($0.mtu), attached to \($0.master ?? "no bridge")" }
                    ?? "nic \(nic.name): MISSING"
                _ = try? journal.append(.note(text + " (after the switch-over)"))
            }
        }
        var verification: ProcessVerification? = nil
        if summary.state == .completed || summary.state == .rolledBack {
            let survivor = summary.state == .completed ? target : source
            let atPause = source.lastCounter
            let atResume = summary.state == .completed ? target.counterAtRestore : nil
            Thread.sleep(forTimeInterval: 0.2)
            let after = try? survivor.status().counter
            verification = ProcessVerification(
                counterAtPause: atPause, counterAtResume: atResume, counterAfter: after, sourceInodes: journal.entries.inodes(recordedBy: .prepare),
                targetInodes: journal.entries.inodes(recordedBy: .handOverMemory))
        }
        return ProcessRun(
            summary: summary, verification: verification, source: source, target: target, targetProcess: targetProcess,
            journalPath: journal.path)
    }
}

/// Whether something accepts connections at a UNIX socket path.
func socketAnswers(_ path: String) -> Bool {
    guard let connection = try? HandoffConnection.connect(path: path) else { return false }
    withExtendedLifetime(connection) {}
    return true
}

/// A reason, set once, read from any thread.
final class AbortFlag: @unchecked Sendable {
    // @unchecked: guarded by `lock`.
    private let lock = NSLock()
    private var value: String?
    var reason: String? { lock.withLock { value } }
    func set(_ reason: String) { lock.withLock { if value == nil { value = reason } } }
}
