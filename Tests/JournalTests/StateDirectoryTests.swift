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

@Suite("Hostile peers and hosts: the state directory", .serialized)
struct StateDirectoryHardeningTests {
    /// `lock` planted as a symbolic link: refused, and its target is neither truncated nor written.
    @Test func aSymlinkedLockIsNotFollowed() throws {
        let directory = temporaryDirectory("gmigrate-symlock")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let state = directory + "/state"
        try FileManager.default.createDirectory(atPath: state, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        let victim = directory + "/victim"
        try "precious\n".write(toFile: victim, atomically: true, encoding: .utf8)
        try FileManager.default.createSymbolicLink(atPath: state + "/lock", withDestinationPath: victim)
        #expect { _ = try Journal(stateDirectory: state) } throws: { error in
            (error as? JournalError)?.kind == .unsafe && "\(error)".contains("symbolic link")
        }
        #expect(try String(contentsOfFile: victim, encoding: .utf8) == "precious\n")
        let result = try gmigrate(["journal", "list", "--state-dir", state])
        #expect(result.status != 0 || !result.stdout.contains("precious"))
    }

    /// A journal planted as a symbolic link is not reopened for appending (recovery would write
    /// into its target), and reading it is refused too.
    @Test func aSymlinkedJournalIsNotFollowed() throws {
        let directory = temporaryDirectory("gmigrate-symjournal")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let state = directory + "/state"
        let victim = directory + "/victim"
        try "precious\n".write(toFile: victim, atomically: true, encoding: .utf8)
        let store = try Journal(stateDirectory: state)
        try FileManager.default.createSymbolicLink(atPath: state + "/journal/20260101T000000-x-0000000000000001.log", withDestinationPath: victim)
        #expect { _ = try store.reopen(id: "20260101T000000-x-0000000000000001") } throws: { error in
            (error as? JournalError)?.kind == .unsafe
        }
        let reports = MigrationRunner.recoverAll(store, provider: recoveryProvider)
        #expect(reports.count == 1 && reports.first?.state == nil, "recovery does not act on it: \(reports)")
        #expect(try String(contentsOfFile: victim, encoding: .utf8) == "precious\n")
        // An id that would leave the journal directory is no id.
        #expect { _ = try Journal.read(stateDirectory: state, id: "../../victim") } throws: { error in
            (error as? JournalError)?.kind == .invalidID
        }
    }

    /// A state directory (or its journal directory) that others may write is refused, with a
    /// clear error and the journal exit code, before anything is written.
    @Test(arguments: ["state", "state/journal"])
    func aWritableStateDirectoryIsRefused(_ which: String) throws {
        let directory = temporaryDirectory("gmigrate-writable")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let state = directory + "/state"
        _ = try Journal(stateDirectory: state)
        #expect(chmod(directory + "/" + which, 0o777) == 0)
        #expect { _ = try Journal(stateDirectory: state) } throws: { error in
            (error as? JournalError)?.kind == .unsafe && "\(error)".contains("writable by others")
        }
        let result = try gmigrate(["migrate", "migration-plans/demo.yaml", "--backend", "model", "--state-dir", state])
        #expect(result.status == 10, "\(result.stdout)\(result.stderr)")
        #expect(result.stderr.contains("writable by others"))
        #expect((try FileManager.default.contentsOfDirectory(atPath: state + "/journal")).isEmpty, "nothing was written")
    }
}
