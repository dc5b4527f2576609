import Foundation
import GmigrateTestKit
import GmigrateTestSupport
import Journal
import Kernel
import Orchestrator
import Plans
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Crash cases of in-process runs: the coordinator is a real child process that really dies at
/// the fault point (`_exit`, no cleanup). Its in-process VMMs die with it, so `gmigrate recover`
/// can only record the migration as lost — the same machine decides it, from observations. (The
/// crash cases that recover a guest run between VMM processes: ProcessTests.)
@Suite("Crash and recovery")
struct RecoveryTests {
    /// On the model, with its state in a host file that outlives the crashed coordinator: the
    /// kernel's cleanup of the dead process is done, and the host holds nothing of it after.
    @Test("in-process VMMs end with their coordinator: lost, and nothing left (model)", arguments: [
        "before:create-target", "after:bind-memslots", "after:pause-source", "before:resume-target", "after:resume-target",
    ])
    func crashModel(_ point: String) throws {
        let state = temporaryDirectory("gmigrate-crash")
        defer { try? FileManager.default.removeItem(atPath: state) }
        let hostFile = state + "/model-host.json"
        let run = try gmigrate([
            "migrate", "migration-plans/demo.yaml", "--backend", "model", "--model-host", hostFile, "--state-dir", state, "--inject", "\(point)=crash",
        ])
        #expect(run.status == FaultInjector.crashStatus, "\(run.stdout)\(run.stderr)")
        let recover = try gmigrate(["recover", "--state-dir", state])
        #expect(recover.status == 13, "lost: \(recover.stdout)\(recover.stderr)")
        let journal = try Journal(stateDirectory: state)
        let contents = try Journal.read(stateDirectory: state, id: try #require(journal.ids().first))
        checkJournal(contents, expect: .lost)
        #expect(contents.finished?.reason.contains("gone") == true, "\(contents.finished?.reason ?? "")")
        let host = ModelHost(file: hostFile)
        #expect(host.vmsHoldingMemory().isEmpty, "the dead coordinator's VMs are gone")
        #expect(host.liveInodeCount == 0)
    }

    /// On the real kernel, in-process VMs end with the coordinator's process: recovery records
    /// the migration as lost.
    @Test("a crash at each step, then recover (linux)", arguments: MigrationMachine.steps(strategy: .share, confidential: false))
    func crashLinux(_ step: MigrationStep) throws {
        _ = try Backend.linux.make()
        let state = temporaryDirectory("gmigrate-crash-linux")
        defer { try? FileManager.default.removeItem(atPath: state) }
        let run = try gmigrate([
            "migrate", "migration-plans/demo.yaml", "--backend", "linux", "--state-dir", state, "--inject", "before:\(step.rawValue)=crash",
        ])
        #expect(run.status == FaultInjector.crashStatus)
        let recover = try gmigrate(["recover", "--state-dir", state])
        #expect(recover.status == 13)
        #expect(recover.stdout.contains("lost"))
        let journal = try Journal(stateDirectory: state)
        let contents = try Journal.read(stateDirectory: state, id: try #require(journal.ids().first))
        checkJournal(contents, expect: .lost)
        // The crash hit between the step's intent and its outcome: recovery's record follows the intent.
        let intents = contents.entries.filter { if case .intent(step, .forward) = $0.event { true } else { false } }
        #expect(intents.count >= 1)
    }

    @Test("a second coordinator on the same state directory is refused")
    func lock() throws {
        let state = temporaryDirectory("gmigrate-lock")
        let held = try Journal(stateDirectory: state)
        #expect(throws: JournalError.self) { _ = try Journal(stateDirectory: state) }
        let refused = try gmigrate(["recover", "--state-dir", state])
        #expect(refused.status == 5)
        #expect(refused.stderr.contains("in use by another coordinator"))
        withExtendedLifetime(held) {}
    }
}
