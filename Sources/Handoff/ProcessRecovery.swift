import Foundation
import Journal
import Kernel
import Orchestrator
import Plans

#if canImport(Glibc)
import Glibc
#endif

/// Recovery of a migration between VMM processes whose coordinator died: the VMMs outlived it,
/// so recovery reconnects to their sockets and finishes the migration through the protocol.
public enum ProcessRecovery {
    public static func recover(id: String, journal: MigrationJournal, contents: JournalContents, started: JournalEntry.Started) throws -> RecoveryReport {
        let torn = contents.tornTailBytes > 0 ? " (a torn final record was cut off)" : ""
        let timeout = started.plan.policy.stepTimeout
        let source = started.sourceSocket.flatMap { try? RemoteVMM(role: "source", socketPath: $0, timeout: timeout) }
        let target = started.targetSocket.flatMap { try? RemoteVMM(role: "target", socketPath: $0, timeout: timeout) }
        let outcomes = contents.entries.outcomes
        func succeeded(_ step: MigrationStep) -> Bool { outcomes.contains { $0.step == step && $0.direction == .forward && $0.ok } }
        let passed = contents.entries.contains { $0.event == .pointOfNoReturn }
        func finish(_ state: TerminalState, _ reason: String) throws -> RecoveryReport {
            try journal.append(.finished(.init(state: state, reason: reason + torn)))
            return RecoveryReport(id: id, state: state, action: reason + torn, problem: nil)
        }
        let confidential = started.plan.vm.type.hasEncryptionContext

        if passed, let target {
            try journal.append(.recovery(pid: getpid(), decision: "roll forward: past the point of no return; the target VMM answers"))
            if confidential && !succeeded(.moveEncryptionContext) {
                try Recovery.step(.moveEncryptionContext, journal) { () throws(EndpointError) in
                    guard let source else { throw EndpointError("the source VMM is gone: its VM cannot hand over its encryption context") }
                    _ = try source.describe()
                    guard let vm = source.vmHandle else { throw EndpointError("the source handed over no VM") }
                    try target.moveEncryptionContext(from: vm)
                }
            }
            if !target.isRunning {
                try Recovery.step(.resumeTarget, journal) { () throws(EndpointError) in
                    guard let states = Recovery.savedStates(outcomes) else { throw EndpointError("no saved vcpu state in the journal") }
                    try target.restore(states)
                }
            }
            try Recovery.step(.retireSource, journal) { () throws(EndpointError) in source?.retire() }
            guard target.isRunning else { return try finish(.stuck, "the target VMM did not resume the guest") }
            return try finish(.completed, "recovered: rolled forward; the target runs the guest")
        }
        if passed {
            // The target is gone. If it never ran the guest, the paused source still holds it whole.
            if !succeeded(.resumeTarget), !confidential, let source {
                try journal.append(.recovery(pid: getpid(), decision: "the target VMM is gone and never ran the guest: the source resumes"))
                try Recovery.step(.pauseSource, journal, direction: .undo) { () throws(EndpointError) in try source.resume() }
                return try finish(.rolledBack, "recovered: the target VMM died before it ran the guest; the source runs it")
            }
            try journal.append(.recovery(pid: getpid(), decision: "lost"))
            return try finish(.lost, "the target VMM, which held the guest past the point of no return, is gone")
        }
        try journal.append(.recovery(pid: getpid(), decision: "roll back: before the point of no return"))
        try Recovery.step(.createTarget, journal, direction: .undo) { () throws(EndpointError) in target?.destroy() }
        guard let source else {
            return try finish(.lost, "the source VMM, which held the only copy of the guest, is gone")
        }
        if !source.isRunning {
            try Recovery.step(.pauseSource, journal, direction: .undo) { () throws(EndpointError) in try source.resume() }
        }
        return try finish(.rolledBack, "recovered: rolled back; the source runs the guest, the target is gone")
    }
}
