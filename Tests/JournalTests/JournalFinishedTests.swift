import Foundation
import GmigrateTestKit
import GmigrateTestSupport
import Handoff
import Journal
import Kernel
import Orchestrator
import Plans
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The journal: a finished migration stays finished.
@Suite("Journal, finished")
struct JournalFinishedTests {
    @Test func nothingIsAppendedAfterFinished() throws {
        let state = temporaryDirectory("gmigrate-journal")
        let journal = try Journal(stateDirectory: state)
        let file = try journal.create(id: "20261201T000000-x-0000000000000001")
        try file.append(.started(.init(id: file.id, planFile: "p", plan: try loadPlan("demo.yaml"), strategy: .share, backend: "linux", coordinatorPID: 1, faults: [])))
        try file.append(.finished(.init(state: .rolledBack, reason: "test")))
        #expect(file.isFinished)
        #expect {
            try file.append(.observed(.init(role: .source, liveness: .gone, detail: "a watcher's late note")))
        } throws: { error in
            (error as? JournalError)?.kind == .finished
        }
        #expect(try Journal.read(path: file.path).entries.count == 2)
    }
}
