import Foundation
import Journal
import Kernel
import Plans

/// What recovery did with one migration.
public struct RecoveryReport: Codable, Sendable, Equatable {
    public var id: String
    /// The terminal state it brought the migration to; nil if it could not act.
    public var state: TerminalState?
    public var action: String
    /// Why recovery did not act (a corrupt journal): the operator must look.
    public var problem: String?

    public init(id: String, state: TerminalState?, action: String, problem: String?) {
        self.id = id
        self.state = state
        self.action = action
        self.problem = problem
    }
}

/// Brings every unfinished migration of a state directory to a terminal state: rolled back
/// before the point of no return, completed after it. A journal that is corrupt is reported
/// and left alone: recovery never acts on a record it cannot trust.
public enum Recovery {
    /// Recovers a migration between VMM processes (the handoff module provides it).
    public typealias ProcessRecovery = (_ id: String, _ journal: MigrationJournal, _ contents: JournalContents, _ started: JournalEntry.Started) throws -> RecoveryReport

    public static func recoverAll(_ journal: Journal, processes: ProcessRecovery? = nil) -> [RecoveryReport] {
        journal.ids().compactMap { id -> RecoveryReport? in
            do {
                let contents = try Journal.read(path: journal.directory + "/journal/" + id + ".log")
                if let corruption = contents.corruption {
                    return RecoveryReport(id: id, state: nil, action: "none", problem: corruption)
                }
                if case .finished(let finished)? = contents.entries.last?.event, finished.state != .stuck { return nil }
                return try recover(id: id, journal: journal, processes: processes)
            } catch {
                return RecoveryReport(id: id, state: nil, action: "none", problem: "\(error)")
            }
        }
    }

    static func recover(id: String, journal store: Journal, processes: ProcessRecovery?) throws -> RecoveryReport {
        let (journal, contents) = try store.reopen(id: id)
        let torn = contents.tornTailBytes > 0 ? " (a torn final record of \(contents.tornTailBytes) bytes was cut off: it was never synced, so its effect never began)" : ""
        guard case .started(let started)? = contents.entries.first?.event else {
            try journal.append(.finished(.init(state: .lost, reason: "the journal holds no start record\(torn)")))
            return RecoveryReport(id: id, state: .lost, action: "nothing to recover\(torn)", problem: nil)
        }
        let passed = contents.entries.contains { $0.event == .pointOfNoReturn }
        let outcomes = contents.entries.outcomes
        func succeeded(_ step: MigrationStep) -> Bool { outcomes.contains { $0.step == step && $0.direction == .forward && $0.ok } }

        if started.backend.hasPrefix("processes:") {
            guard let processes else {
                return RecoveryReport(id: id, state: nil, action: "none", problem: "a migration between VMM processes needs the handoff protocol to recover")
            }
            return try processes(id, journal, contents, started)
        }
        guard started.backend.hasPrefix("model:") else {
            // In-process VMs on the real kernel live and die with the coordinator's process.
            let reason = "the coordinator (pid \(started.coordinatorPID)) ended mid-migration and its in-process VMs ended with it\(torn)"
            try journal.append(.recovery(pid: getpid(), decision: "lost"))
            try journal.append(.finished(.init(state: .lost, reason: reason)))
            return RecoveryReport(id: id, state: .lost, action: "recorded as lost: \(reason)", problem: nil)
        }
        let host = ModelHost(file: String(started.backend.dropFirst("model:".count)))
        let sourceProcess = id + "/source"
        let targetProcess = id + "/target"
        let sourceView = KernelModel(host: host, process: sourceProcess)
        let targetView = KernelModel(host: host, process: targetProcess)

        if passed {
            try journal.append(.recovery(pid: getpid(), decision: "roll forward: past the point of no return"))
            let sourceVM = host.handles(ownedBy: sourceProcess).first { $0.kind == "vm" }?.handle
            let targetVM = host.handles(ownedBy: targetProcess).first { $0.kind == "vm" }?.handle
            if started.plan.vm.type.hasEncryptionContext && !succeeded(.moveEncryptionContext) {
                try step(.moveEncryptionContext, journal) { () throws(EndpointError) in
                    guard let targetVM else { throw EndpointError("the target VM is gone") }
                    // Idempotent: a source already dead means the move happened before the crash.
                    if let sourceVM, !sourceView.isDead(vm: sourceVM) {
                        do throws(KernelError) { try targetView.moveEncryptionContext(to: targetVM, from: sourceVM) } catch { throw EndpointError(error) }
                    }
                }
            }
            if !succeeded(.resumeTarget) || host.status(of: targetProcess) != "running" {
                try step(.resumeTarget, journal) { () throws(EndpointError) in
                    guard host.status(of: targetProcess) != "running" else { return }
                    guard let states = savedStates(outcomes) else { throw EndpointError("no saved vcpu state in the journal") }
                    let vcpus = host.handles(ownedBy: targetProcess).filter { $0.kind == "vcpu" }.map(\.handle)
                    guard vcpus.count == states.count else { throw EndpointError("the target has \(vcpus.count) vcpus for \(states.count) states") }
                    do throws(KernelError) {
                        for (vcpu, state) in zip(vcpus, states) { try targetView.setVCPUState(vcpu, state) }
                    } catch {
                        throw EndpointError(error)
                    }
                    host.setStatus(process: targetProcess, "running")
                }
            }
            try step(.retireSource, journal) { () throws(EndpointError) in
                host.exit(process: sourceProcess)
                host.setStatus(process: sourceProcess, nil)
            }
            try journal.append(.finished(.init(state: .completed, reason: "recovered: rolled forward\(torn)")))
            return RecoveryReport(id: id, state: .completed, action: "rolled forward: the target runs, the source is retired\(torn)", problem: nil)
        }

        try journal.append(.recovery(pid: getpid(), decision: "roll back: before the point of no return"))
        try step(.createTarget, journal, direction: .undo) { () throws(EndpointError) in
            host.exit(process: targetProcess)
            host.setStatus(process: targetProcess, nil)
        }
        guard host.handles(ownedBy: sourceProcess).contains(where: { $0.kind == "vm" }) else {
            try journal.append(.finished(.init(state: .lost, reason: "the source VM is gone\(torn)")))
            return RecoveryReport(id: id, state: .lost, action: "the source VM is gone", problem: nil)
        }
        if host.status(of: sourceProcess) != "running" {
            try step(.pauseSource, journal, direction: .undo) { () throws(EndpointError) in
                host.setStatus(process: sourceProcess, "running")
            }
        }
        try journal.append(.finished(.init(state: .rolledBack, reason: "recovered: rolled back\(torn)")))
        return RecoveryReport(id: id, state: .rolledBack, action: "rolled back: the source runs, the target is gone\(torn)", problem: nil)
    }

    public static func step(
        _ step: MigrationStep, _ journal: MigrationJournal, direction: JournalEntry.Direction = .forward,
        _ body: () throws(EndpointError) -> Void
    ) throws(JournalError) {
        try journal.append(.intent(step: step, direction: direction))
        let clock = ContinuousClock()
        let started = clock.now
        var outcome = JournalEntry.Outcome(step: step, direction: direction, ok: true, durationNanoseconds: 0)
        do {
            try body()
        } catch {
            outcome.ok = false
            outcome.error = error.message
            outcome.errno = error.errno?.rawValue
        }
        outcome.durationNanoseconds = (clock.now - started).nanoseconds
        try journal.append(.outcome(outcome))
    }

    public static func savedStates(_ outcomes: [JournalEntry.Outcome]) -> [VCPUState]? {
        guard let text = outcomes.last(where: { $0.step == .pauseSource && $0.ok && $0.direction == .forward })?.details["vcpu-states"],
            let data = Data(base64Encoded: text)
        else { return nil }
        return try? JSONDecoder().decode([VCPUState].self, from: data)
    }
}
