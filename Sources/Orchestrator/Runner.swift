import Foundation
import Journal
import Kernel
import Plans

#if canImport(Glibc)
import Glibc
#endif

/// What recovery did with one migration.
public struct RecoveryReport: Codable, Sendable, Equatable {
    public var id: String
    /// Where the migration stands now: a terminal state, or `stuck` (recover again); nil if
    /// recovery could not act (a corrupt journal).
    public var state: TerminalState?
    public var action: String
    /// Why recovery did not act (a corrupt journal): the operator must look.
    public var problem: String?
    /// The run's summary, when recovery ran the machine.
    public var summary: MigrationSummary?

    public init(id: String, state: TerminalState?, action: String, problem: String?, summary: MigrationSummary? = nil) {
        self.id = id
        self.state = state
        self.action = action
        self.problem = problem
        self.summary = summary
    }
}

/// Runs migrations and recovers them: one machine (`MigrationMachine`), one executor, for every
/// kind of VMM endpoint (the caller gives the `EndpointProvider`).
public enum MigrationRunner {
    /// Creates the migration's journal and writes its started record: from here on a crash
    /// leaves a migration that `gmigrate recover` finds.
    public static func begin(_ started: JournalEntry.Started, in store: Journal) throws(JournalError) -> MigrationJournal {
        let journal = try store.create(id: started.id)
        try journal.append(.started(started))
        return journal
    }

    /// Runs a migration begun with `begin` to a terminal state (or `stuck`).
    /// - Parameters:
    ///   - faults: the coordinator's injector (in-process VMMs share it through their kernel);
    ///     the started record's faults are armed in it, and the `kernel:*` ones in the provider's VMMs.
    public static func run(
        _ journal: MigrationJournal, provider: any EndpointProvider, faults: FaultInjector, progress: @escaping (StepReport) -> Void = { _ in },
        cancelReason: @escaping () -> String? = { nil }, observer: @escaping (JournalEntry.Event) -> Void = { _ in }
    ) throws(JournalError) -> MigrationSummary {
        var machine = MigrationMachine(replaying: journal.entries.map(\.event))
        guard let started = machine.started else { throw JournalError(.io, "\(journal.path): no started record") }
        let specs = started.faults.compactMap { try? FaultSpec(parsing: $0) }
        faults.arm(specs)
        provider.armKernelFaults(specs.filter { if case .kernel = $0.point { true } else { false } })
        let executor = MigrationExecutor(
            journal: journal, provider: provider, faults: faults, armed: started.faults, progress: progress, cancelReason: cancelReason,
            observer: observer)
        return try executor.run(&machine)
    }

    /// Takes up one unfinished migration: its journal is replayed into the machine, a recovery
    /// record says what the machine will do, and the same executor goes on from there.
    public static func recover(
        id: String, in store: Journal, provider makeProvider: (JournalEntry.Started, MigrationMachine) -> any EndpointProvider,
        progress: @escaping (StepReport) -> Void = { _ in }
    ) throws(JournalError) -> RecoveryReport {
        let (journal, contents) = try store.reopen(id: id)
        let torn = contents.tornTailBytes > 0
            ? " (a torn final record of \(contents.tornTailBytes) bytes was cut off: it was never synced, so its effect never began)" : ""
        var machine = MigrationMachine(replaying: contents.entries.map(\.event))
        if let finished = machine.finished {
            return RecoveryReport(id: id, state: finished.state, action: "already finished", problem: nil)
        }
        guard let started = machine.started else {
            // Not even the start record reached the disk: nothing of the migration was done.
            try journal.append(.finished(.init(state: .lost, reason: "the journal holds no start record\(torn)")))
            return RecoveryReport(id: id, state: .lost, action: "nothing to recover\(torn)", problem: nil)
        }
        let record = machine.recoveryRecord(pid: getpid())
        try journal.append(record)
        machine.apply(record)
        let provider = makeProvider(started, machine)
        let executor = MigrationExecutor(journal: journal, provider: provider, faults: FaultInjector(), progress: progress)
        let summary = try executor.run(&machine)
        let action: String
        switch summary.state {
        case .completed: action = "rolled forward: the target VMM runs the guest, the source is retired"
        case .rolledBack: action = "rolled back: the source VMM runs the guest, the target is gone"
        case .lost: action = "lost: \(summary.reason)"
        case .stuck: action = "still stuck: \(summary.reason)"
        }
        return RecoveryReport(id: id, state: summary.state, action: action + torn, problem: nil, summary: summary)
    }

    /// Takes up every unfinished migration of a state directory, oldest first. A corrupt journal
    /// is reported and left alone: recovery never acts on a record it cannot trust.
    public static func recoverAll(
        _ store: Journal, provider: (JournalEntry.Started, MigrationMachine) -> any EndpointProvider, progress: @escaping (String, StepReport) -> Void = { _, _ in }
    ) -> [RecoveryReport] {
        store.ids().compactMap { id -> RecoveryReport? in
            do {
                let contents = try store.read(id: id)
                if let corruption = contents.corruption {
                    return RecoveryReport(id: id, state: nil, action: "none", problem: corruption)
                }
                if case .finished? = contents.entries.last?.event { return nil }
                return try recover(id: id, in: store, provider: provider) { progress(id, $0) }
            } catch {
                return RecoveryReport(id: id, state: nil, action: "none", problem: "\(error)")
            }
        }
    }

    /// `YYYYmmddTHHMMSS-NAME-XXXXXXXXXXXXXXXX`: sortable by time, with 64 random bits.
    public static func newID(_ name: String) -> String {
        var now = time(nil)
        var parts = tm()
        gmtime_r(&now, &parts)
        let stamp = String(
            format: "%04d%02d%02dT%02d%02d%02d", Int(parts.tm_year) + 1900, Int(parts.tm_mon) + 1, Int(parts.tm_mday),
            Int(parts.tm_hour), Int(parts.tm_min), Int(parts.tm_sec))
        let random = String(UInt64.random(in: 0...UInt64.max), radix: 16)
        return "\(stamp)-\(name)-\(String(repeating: "0", count: 16 - random.count) + random)"
    }
}
