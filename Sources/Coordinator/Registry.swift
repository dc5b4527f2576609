import Foundation
import Handoff
import HostNet
import Journal
import Kernel
import Logging
import Orchestrator
import Plans
import Prometheus

/// One event of a migration, as the event stream sends it.
public struct MigrationEvent: Codable, Sendable, Equatable {
    /// `state`, `step` or `finished`.
    public var kind: String
    public var state: String
    public var step: StepReport?
    public var reason: String?
}

/// What the API shows of one migration.
public struct MigrationView: Codable, Sendable, Equatable {
    public var id: String
    public var plan: String
    public var vm: String
    /// queued, running, completed, rolled-back, stuck, lost.
    public var state: String
    public var strategy: String?
    public var steps: [StepReport]
    public var blackoutNanoseconds: Int64?
    public var blackoutBreach: Bool?
    public var reason: String?
    public var pointOfNoReturnPassed: Bool
    public var cancelRequested: Bool
}

/// One migration the daemon knows: its live state, its events, and its subscribers.
final class MigrationRecord: @unchecked Sendable {
    // @unchecked: every mutable field is guarded by `lock`.
    private let lock = NSLock()
    private var view: MigrationView
    private var events: [MigrationEvent] = []
    private var subscribers: [UUID: AsyncStream<MigrationEvent>.Continuation] = [:]
    /// The journal begun when the migration was accepted (VMM processes).
    var begun: MigrationJournal?

    init(view: MigrationView) { self.view = view }

    var snapshot: MigrationView { lock.withLock { view } }
    var id: String { snapshot.id }
    var isFinished: Bool { ["completed", "rolled-back", "stuck", "lost"].contains(snapshot.state) }
    /// Finished in its journal: nothing more will happen to its VM (stuck is not).
    var hasEnded: Bool { ["completed", "rolled-back", "lost"].contains(snapshot.state) }

    func update(_ change: (inout MigrationView) -> MigrationEvent?) {
        let (event, targets) = lock.withLock { () -> (MigrationEvent?, [AsyncStream<MigrationEvent>.Continuation]) in
            let event = change(&view)
            if let event { events.append(event) }
            return (event, Array(subscribers.values))
        }
        guard let event else { return }
        for continuation in targets { continuation.yield(event) }
        if event.kind == "finished" {
            let all = lock.withLock { () -> [AsyncStream<MigrationEvent>.Continuation] in
                defer { subscribers.removeAll() }
                return Array(subscribers.values)
            }
            for continuation in all { continuation.finish() }
        }
    }

    /// Every event so far, then the live ones until the migration finishes.
    func subscribe() -> AsyncStream<MigrationEvent> {
        AsyncStream { continuation in
            let (past, finished) = lock.withLock { () -> ([MigrationEvent], Bool) in
                let finished = ["completed", "rolled-back", "stuck", "lost"].contains(view.state)
                if !finished { subscribers[UUID()] = continuation }
                return (events, finished)
            }
            for event in past { continuation.yield(event) }
            if finished { continuation.finish() }
        }
    }
}

/// Why the daemon refused a request: an HTTP status and a problem document.
public struct CoordinatorProblem: Error, Sendable {
    public var status: Int
    public var code: String
    public var title: String
    public var detail: String
    public var diagnostics: [PlanDiagnostic] = []
}

/// The daemon's one owner of state: the journal (and its lock), the migrations, the backends,
/// the metrics. The HTTP layer never touches the kernel or the journal.
public final class CoordinatorCore: @unchecked Sendable {
    // @unchecked: mutable state is guarded by `lock`.
    public let config: DaemonConfig
    public let stateDirectory: String
    let journal: Journal
    let logger: Logger
    public let metrics = PrometheusCollectorRegistry()
    private let lock = NSLock()
    private var records: [String: MigrationRecord] = [:]
    /// Each Idempotency-Key's migration and the plan it was given (a reuse with another plan is
    /// refused). Looked up and inserted under one lock: one key makes at most one migration.
    private var idempotency: [String: (id: String, plan: MigrationPlan)] = [:]
    private var threads = 0
    private var accepting = true
    let backendChoice: String  // linux | model
    let modelHostFile: String
    let capabilities: HostCapabilities
    /// KVM's VM lifecycle uevents, for every process migration (nil where netlink is unavailable).
    let watcher = try? KVMEventWatcher()

    public init(stateDirectory: String, config: DaemonConfig, logger: Logger) throws {
        self.config = config
        self.stateDirectory = stateDirectory
        self.logger = logger
        journal = try Journal(stateDirectory: stateDirectory)
        modelHostFile = stateDirectory + "/model-host.json"
        switch config.backend {
        case "linux": backendChoice = "linux"
        case "model": backendChoice = "model"
        default:
            if case .success = LinuxKVM.availability() { backendChoice = "linux" } else { backendChoice = "model" }
        }
        capabilities = try (backendChoice == "linux" ? LinuxKVM().probe() : KernelModel().probe())
    }

    // MARK: - Start: recover, then load the history

    /// Brings every unfinished migration to a terminal state, then loads every journal.
    public func recoverAndLoad() -> [RecoveryReport] {
        let reports = MigrationRunner.recoverAll(journal, provider: recoveryProvider)
        let recoveries = metrics.makeCounter(descriptor: .init(
            namespace: "gmigrate", metricName: "recoveries", unitName: "total", helpText: "Migrations recovered at daemon start"))
        for report in reports {
            recoveries.increment()
            logger.info("recovered", metadata: ["migration": "\(report.id)", "state": "\(report.state?.rawValue ?? "none")", "problem": "\(report.problem ?? "")"])
        }
        for id in journal.ids() {
            guard let contents = try? Journal.read(stateDirectory: stateDirectory, id: id),
                case .started(let started)? = contents.entries.first?.event
            else { continue }
            let machine = MigrationMachine(replaying: contents.entries.map(\.event))
            var view = MigrationView(
                id: id, plan: started.plan.name, vm: CoordinatorCore.vmKey(started.plan),
                state: machine.finished?.state.rawValue ?? (machine.halted != nil ? TerminalState.stuck.rawValue : "unfinished"),
                strategy: started.strategy.rawValue, steps: contents.entries.outcomes.map(StepReport.init), reason: machine.finished?.reason ?? machine.halted,
                pointOfNoReturnPassed: machine.pastPointOfNoReturn, cancelRequested: false)
            view.blackoutNanoseconds = machine.finished?.blackoutNanoseconds
            view.blackoutBreach = machine.finished?.blackoutBreach
            let record = MigrationRecord(view: view)
            record.update { view in MigrationEvent(kind: "finished", state: view.state, reason: view.reason) }
            lock.withLock {
                records[id] = record
                if let key = started.idempotencyKey { idempotency[key] = (id, started.plan) }
            }
        }
        pruneFinished()
        return reports
    }

    /// Retention: keeps the newest `keepFinishedJournals` finished migrations (ids sort by
    /// time); older ones leave memory and the state directory. Unfinished ones are never touched.
    func pruneFinished() {
        let doomed = lock.withLock { () -> [String] in
            // Stuck ones are not finished in their journals: recovery still needs them.
            let finished = records.values.filter { $0.isFinished && $0.snapshot.state != "stuck" }.map(\.id).sorted()
            let excess = finished.count - config.keepFinishedJournals
            guard excess > 0 else { return [] }
            let doomed = Array(finished.prefix(excess))
            for id in doomed { records[id] = nil }
            idempotency = idempotency.filter { !doomed.contains($0.value.id) }
            return doomed
        }
        var deleted = 0
        for id in doomed {
            do {
                try journal.remove(id: id)
                deleted += 1
            } catch {
                logger.warning("retention: the journal could not be deleted", metadata: ["migration": "\(id)", "error": "\(error)"])
            }
        }
        if deleted > 0 { logger.info("retention: deleted \(deleted) finished journal(s) beyond keepFinishedJournals") }
    }

    /// A VM's identity, for "already migrating": its source VMM's socket, or the plan's name in-process.
    static func vmKey(_ plan: MigrationPlan) -> String {
        if case .socket(let path) = plan.source { return path }
        return "in-process:" + plan.name
    }

    // MARK: - Requests

    /// The states `GET /v1/migrations?state=` filters on.
    public static let listableStates = ["queued", "running", "unfinished", "completed", "rolled-back", "stuck", "lost"]

    public func list(state: String?) -> [MigrationView] {
        let all = lock.withLock { Array(records.values) }.map(\.snapshot).sorted { $0.id < $1.id }
        return state.map { wanted in all.filter { $0.state == wanted } } ?? all
    }

    public func view(_ id: String) -> MigrationView? { lock.withLock { records[id] }?.snapshot }

    func record(_ id: String) -> MigrationRecord? { lock.withLock { records[id] } }

    public func host() -> HostCapabilities { capabilities }

    /// Validates a plan exactly as `gmigrate plan validate --host` does.
    public func validate(_ text: String) -> PlanReport {
        PlanLoader.load(text: text, file: "request", host: capabilities)
    }

    /// The dry run of `gmigrate migrate --dry-run`: the whole state machine rehearsed on an
    /// in-memory model with the strategy this host would use; no VM of this host is touched (a
    /// source VMM is only asked to describe its VM).
    public func rehearse(_ plan: MigrationPlan, strategy: Strategy) -> MigrationSummary? {
        try? Rehearsal.run(plan: plan, planFile: "(rehearsal)", strategy: strategy, faults: []).run.summary
    }

    /// Accepts a migration: validates, refuses a VM already migrating (409), starts it.
    /// Returns the migration and whether it is new (an idempotent resubmission is not).
    public func submit(_ text: String, idempotencyKey: String?) throws(CoordinatorProblem) -> (MigrationView, Bool) {
        let report = validate(text)
        guard report.parsed else {
            throw CoordinatorProblem(status: 400, code: "syntax-error", title: "The plan is not YAML or JSON",
                detail: report.diagnostics.first?.message ?? "unparseable", diagnostics: report.diagnostics)
        }
        guard let validPlan = report.plan, let strategy = report.strategy?.chosen else {
            throw CoordinatorProblem(status: 422, code: report.diagnostics.first { $0.severity == .error }?.code ?? "invalid-plan",
                title: "The plan is invalid", detail: "\(report.errorCount) problem(s); see diagnostics", diagnostics: report.diagnostics)
        }
        // Socket paths are resolved (symbolic links, `.` and `..`) before they are checked
        // against vmmSocketDirectories, and the migration uses the resolved path: the check and
        // the use see the same file, and one VM has one key however its path is written.
        var plan = validPlan
        if case .socket(let path) = plan.source { plan.source = .socket(path: try resolvedSocket(path, role: "source")) }
        if case .socket(let path) = plan.target { plan.target = .socket(path: try resolvedSocket(path, role: "target")) }
        if case .socket(let source) = plan.source, plan.target == .socket(path: source) {
            throw CoordinatorProblem(status: 422, code: "source-is-target", title: "The source and the target are one VMM",
                detail: "\(source) is both the source's and the target's socket")
        }
        if plan.source == .inProcess && plan.target != .inProcess || plan.source != .inProcess && plan.target == .inProcess {
            throw CoordinatorProblem(status: 422, code: "invalid-endpoint", title: "Mixed endpoints",
                detail: "an in-process source needs an in-process target, and a VMM process a VMM process")
        }
        let vm = CoordinatorCore.vmKey(plan)
        let id = MigrationRunner.newID(plan.name)
        let faults = config.allowFaults ? plan.faults : []
        // The key's lookup, the one-migration-per-VM check and the journal's first record happen
        // under one lock: one key makes at most one migration, and a migration answered 202 is
        // on disk (a crash after the answer leaves a journal that recovery finds).
        lock.lock()
        let (record, isNew) = try { () throws(CoordinatorProblem) -> (MigrationRecord, Bool) in
            defer { lock.unlock() }
            if let key = idempotencyKey, let existing = idempotency[key] {
                guard existing.plan == plan else {
                    throw CoordinatorProblem(status: 422, code: "idempotency-key-reused", title: "The Idempotency-Key was used with another plan",
                        detail: "'\(key)' made migration \(existing.id) of another plan; a key names one request")
                }
                if let record = records[existing.id] { return (record, false) }
            }
            guard accepting else {
                throw CoordinatorProblem(status: 503, code: "shutting-down", title: "The daemon is shutting down", detail: "no new migrations")
            }
            // A stuck or unfinished migration still holds its VM: recovery will take it up.
            if let busy = records.values.first(where: { $0.snapshot.vm == vm && !$0.hasEnded }) {
                throw CoordinatorProblem(status: 409, code: "vm-migrating", title: "The VM is already migrating",
                    detail: "migration \(busy.id) of \(vm) is still \(busy.snapshot.state)")
            }
            let record = MigrationRecord(view: MigrationView(
                id: id, plan: plan.name, vm: vm, state: "queued", strategy: strategy.rawValue, steps: [], pointOfNoReturnPassed: false,
                cancelRequested: false))
            if case .socket(let sourceSocket) = plan.source {
                var targetSocket: String? = nil
                if case .socket(let path) = plan.target { targetSocket = path }
                let started = ProcessRun.startedRecord(
                    id: id, plan: plan, planFile: "(submitted)", strategy: strategy, faults: faults, sourceSocket: sourceSocket,
                    targetSocket: targetSocket, spawnBackend: spawnBackend, vmmDirectory: vmmDirectory, idempotencyKey: idempotencyKey)
                do {
                    record.begun = try MigrationRunner.begin(started, in: journal)
                } catch {
                    throw CoordinatorProblem(status: 503, code: "journal-failed", title: "The migration could not be journaled", detail: "\(error)")
                }
            }
            records[id] = record
            if let idempotencyKey { idempotency[idempotencyKey] = (id, plan) }
            threads += 1
            return (record, true)
        }()
        guard isNew else { return (record.snapshot, false) }
        let thread = Thread { [self, plan] in
            execute(record, plan: plan, strategy: strategy, faults: faults, idempotencyKey: idempotencyKey)
            lock.withLock { threads -= 1 }
        }
        thread.name = "migration \(id)"
        thread.start()
        return (record.snapshot, true)
    }

    var spawnBackend: String { backendChoice == "linux" ? "linux" : "model:" + modelHostFile }
    var vmmDirectory: String { stateDirectory + "/vmm" }

    /// The real path of a VMM socket (its directory's, for a socket not created yet), checked
    /// to lie under one of the configured directories (themselves resolved).
    func resolvedSocket(_ path: String, role: String) throws(CoordinatorProblem) -> String {
        func real(_ path: String) -> String? {
            guard let resolved = realpath(path, nil) else { return nil }
            defer { free(resolved) }
            return String(cString: resolved)
        }
        let name = (path as NSString).lastPathComponent
        let found = real(path) ?? real((path as NSString).deletingLastPathComponent).map { $0 + "/" + name }
        // A path that does not exist is still checked, lexically, so that outside stays 403.
        let resolved = found ?? (path as NSString).standardizingPath
        let directories = config.vmmSocketDirectories.map { real($0) ?? $0 }
        guard directories.contains(where: { resolved.hasPrefix($0.hasSuffix("/") ? $0 : $0 + "/") }) else {
            throw CoordinatorProblem(status: 403, code: "path-outside-directories", title: "A VMM socket outside the configured directories",
                detail: "the \(role)'s \(path) (\(resolved)) is not under \(config.vmmSocketDirectories.joined(separator: ", ")) (vmmSocketDirectories)")
        }
        guard found != nil, name != "..", name != "." else {
            throw CoordinatorProblem(status: 422, code: "socket-unresolvable", title: "A VMM socket path that does not resolve",
                detail: "the \(role)'s \(path): its directory does not exist")
        }
        return resolved
    }

    /// Cancels before the point of no return; refuses after it.
    public func cancel(_ id: String) throws(CoordinatorProblem) -> MigrationView {
        guard let record = record(id) else {
            throw CoordinatorProblem(status: 404, code: "not-found", title: "No such migration", detail: id)
        }
        let view = record.snapshot
        if record.isFinished {
            throw CoordinatorProblem(status: 409, code: "finished", title: "The migration has finished", detail: "it is \(view.state)")
        }
        if view.pointOfNoReturnPassed {
            throw CoordinatorProblem(status: 409, code: "past-point-of-no-return", title: "Too late to cancel",
                detail: "the migration passed its point of no return; it can only complete")
        }
        record.update { view in
            view.cancelRequested = true
            return MigrationEvent(kind: "state", state: view.state, reason: "cancel requested")
        }
        return record.snapshot
    }

    /// Stops accepting, cancels what has not passed its point of no return, and waits for the
    /// rest at most `drainSeconds`: a step blocked on a VMM that does not answer must not hold
    /// the daemon for ever. What still runs then is journaled, and the next start recovers it,
    /// as after a crash. Returns the migrations left running.
    @discardableResult
    public func drain() -> [String] {
        let running = lock.withLock { () -> [MigrationRecord] in
            accepting = false
            return records.values.filter { !$0.isFinished }
        }
        for record in running where !record.snapshot.pointOfNoReturnPassed { _ = try? cancel(record.id) }
        let deadline = ContinuousClock.now + .seconds(config.drainSeconds)
        while lock.withLock({ threads }) > 0, ContinuousClock.now < deadline { Thread.sleep(forTimeInterval: 0.02) }
        return lock.withLock { records.values.filter { !$0.isFinished }.map(\.id).sorted() }
    }

    // MARK: - Running one migration

    private func execute(_ record: MigrationRecord, plan: MigrationPlan, strategy: Strategy, faults: [FaultSpec], idempotencyKey: String?) {
        var log = logger
        log[metadataKey: "migration"] = "\(record.id)"
        log.info("started", metadata: ["plan": "\(plan.name)", "strategy": "\(strategy.rawValue)"])
        record.update { view in
            view.state = "running"
            return MigrationEvent(kind: "state", state: "running")
        }
        let stepHistogram = metrics.makeDurationHistogram(
            descriptor: .init(namespace: "gmigrate", metricName: "step_duration", unitName: "seconds", helpText: "Duration of migration steps"),
            labels: [], buckets: [.microseconds(100), .milliseconds(1), .milliseconds(10), .milliseconds(100), .seconds(1), .seconds(10)])
        let progress: (StepReport) -> Void = { step in
            stepHistogram.recordNanoseconds(step.durationNanoseconds)
            log.info("step", metadata: ["step": "\(step.step.rawValue)", "direction": "\(step.direction.rawValue)", "ok": "\(step.ok)"])
            record.update { view in
                view.steps.append(step)
                return MigrationEvent(kind: "step", state: view.state, step: step)
            }
        }
        // The view passes the point of no return when the journal does: a cancel after it is refused.
        let observer: (JournalEntry.Event) -> Void = { event in
            guard event == .pointOfNoReturn else { return }
            record.update { view in
                view.pointOfNoReturnPassed = true
                return nil
            }
        }
        let cancelReason: () -> String? = { record.snapshot.cancelRequested ? "cancelled through the API" : nil }
        var summary: MigrationSummary? = nil
        var failure: String? = nil
        do {
            if plan.source == .inProcess {
                let backend: StandaloneBackend = backendChoice == "linux" ? .linux : .model(hostFile: modelHostFile)
                let run = try InProcessRun.run(
                    plan: plan, planFile: "(submitted)", strategy: strategy, backend: backend, journal: journal, faults: faults,
                    progress: progress, cancelReason: cancelReason, observer: observer, idempotencyKey: idempotencyKey, id: record.id)
                // The run, its VMMs and their VMs end here: a daemon keeps no finished
                // migration's kernel objects (each held descriptors and kernel threads).
                summary = run.summary
            } else if case .socket(let sourceSocket) = plan.source {
                var targetSocket: String? = nil
                if case .socket(let path) = plan.target { targetSocket = path }
                let run = try ProcessRun.run(
                    plan: plan, planFile: "(submitted)", strategy: strategy, journal: journal, faults: faults, sourceSocket: sourceSocket,
                    targetSocket: targetSocket, spawnBackend: spawnBackend,
                    vmmDirectory: vmmDirectory, progress: progress, cancelReason: cancelReason, observer: observer,
                    idempotencyKey: idempotencyKey, id: record.id, begun: record.begun, watcher: watcher,
                    onVMEvent: { [log] reason in
                        log.warning("vm-event", metadata: ["event": "\(reason)"])
                        record.update { view in MigrationEvent(kind: "vm-event", state: view.state, reason: reason) }
                    })
                // The VMMs run on by themselves: let go of their connections, so that a VMM can
                // take its next coordinator (each serves one connection at a time).
                summary = run.summary
            }
        } catch {
            failure = "\(error)"
        }
        // A run that failed before its machine ended: with a journal begun, the next start (or
        // `gmigrate recover`) takes it up, so it is stuck, not lost.
        let outcome = summary?.state.rawValue ?? (record.begun != nil ? TerminalState.stuck.rawValue : TerminalState.lost.rawValue)
        metrics.makeCounter(
            descriptor: .init(namespace: "gmigrate", metricName: "migrations", unitName: "total", helpText: "Migrations by outcome"),
            labels: [("outcome", outcome)]
        ).increment()
        if let blackout = summary?.blackoutNanoseconds {
            metrics.makeDurationHistogram(
                descriptor: .init(namespace: "gmigrate", metricName: "blackout", unitName: "seconds", helpText: "Source paused to target running"),
                labels: [], buckets: [.microseconds(100), .milliseconds(1), .milliseconds(10), .milliseconds(50), .milliseconds(100), .seconds(1)]
            ).recordNanoseconds(blackout)
        }
        record.begun = nil
        log.info("finished", metadata: ["state": "\(outcome)", "reason": "\(summary?.reason ?? failure ?? "")"])
        record.update { view in
            view.state = outcome
            view.reason = summary?.reason ?? failure
            view.blackoutNanoseconds = summary?.blackoutNanoseconds
            view.blackoutBreach = summary?.blackoutBreach
            return MigrationEvent(kind: "finished", state: outcome, reason: view.reason)
        }
        pruneFinished()
    }
}
