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

@Suite("gmigrate command line")
struct CLITests {
    @Test func kernelRunPassesAndFails() throws {
        let good = try temporaryFile("vm a\nlaunch a => error ENOTTY\n")
        let passing = try gmigrate(["kernel", "run", good])
        #expect(passing.status == 0)
        #expect(passing.stdout.contains("\(good):2: launch a"))
        #expect(passing.stdout.contains("error ENOTTY"))

        let bad = try temporaryFile("vm a\nlaunch a => ok\n")
        let failing = try gmigrate(["kernel", "run", bad])
        #expect(failing.status == 1)
        #expect(failing.stdout.contains("MISMATCH"))
        #expect(failing.stdout.contains("(expected: ok)"))
    }

    @Test func unparseableScriptRunsNothingAndExits2() throws {
        // The first line would create a VM; the parse error on line 3 stops the whole script.
        let path = try temporaryFile("vm a\ngmem g vm=a size=4K\nslot a 0 gpa=zero size=4K gmem=g\n")
        let result = try gmigrate(["kernel", "run", path, "--json"])
        #expect(result.status == 2)
        #expect(result.stdout.isEmpty)
        #expect(result.stderr.contains("\(path):3: slot: gpa=zero is not a number"))
    }

    @Test func missingFileAndBadArgumentsExit2() throws {
        #expect(try gmigrate(["kernel", "run", "/nonexistent.kscript"]).status == 2)
        #expect(try gmigrate(["kernel", "run", "--backend", "qemu", "x"]).status == 2)
        #expect(try gmigrate(["no-such-command"]).status == 2)
    }

    @Test func kernelRunJSON() throws {
        let path = try temporaryFile("vm a\ngmem g vm=a size=4K => ok\n")
        let result = try gmigrate(["kernel", "run", path, "--json"])
        #expect(result.status == 0)
        let object = try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any]
        #expect(object?["passed"] as? Bool == true)
        let scripts = object?["scripts"] as? [[String: Any]]
        let lines = scripts?.first?["lines"] as? [[String: Any]]
        #expect(lines?.count == 2)
        #expect(lines?.last?["status"] as? String == "match")
    }

    @Test func hostProbeJSONReadsThisKernel() throws {
        _ = try Backend.linux.make()
        let result = try gmigrate(["host", "probe", "--json"])
        #expect(result.status == 0)
        let object = try #require(try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any])
        let gmem = object["guestMemfd"] as? [String: Any]
        #expect(gmem?["supported"] as? Bool == true)
        #expect(gmem?["flags"] as? [String] == ["mmap", "init-shared"])
        #expect((object["link"] as? [String: Any])?["supported"] as? Bool == false)
        #expect((object["moveEncryptionContext"] as? [String: Any])?["supported"] as? Bool == false)
        #expect(object["backend"] as? String == "linux")
    }

    /// Without a usable /dev/kvm: one line that says why, and exit 3.
    @Test func hostProbeWithoutKVM() throws {
        // The nobody user cannot open the root-only /dev/kvm; run the probe as that user. The
        // case needs that real /dev/kvm (and root to drop to nobody).
        try requireKVM()
        try requireRoot()
        let binary = try #require(
            [Bundle.main.bundleURL.deletingLastPathComponent().appendingPathComponent("gmigrate").path,
             repositoryRoot + "/.build/debug/gmigrate"].first { FileManager.default.isExecutableFile(atPath: $0) })
        // A copy in a world-readable place: the checkout's own directories may not be.
        let directory = "/tmp/gmigrate-nobody-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true,
            attributes: [.posixPermissions: 0o755])
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let copy = directory + "/gmigrate"
        try FileManager.default.copyItem(atPath: binary, toPath: copy)
        try FileManager.default.setAttributes([.posixPermissions: 0o755], ofItemAtPath: copy)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/setpriv")
        process.arguments = ["--reuid=65534", "--regid=65534", "--clear-groups", copy, "host", "probe"]
        process.currentDirectoryURL = URL(fileURLWithPath: directory)
        let err = Pipe()
        process.standardError = err
        process.standardOutput = Pipe()
        try process.run()
        let stderr = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        #expect(process.terminationStatus == 3)
        #expect(stderr == "gmigrate: no usable KVM: /dev/kvm: permission denied (EACCES): run as root or as a member of the kvm group\n")
    }

    @Test func bothBackendsCompare() throws {
        _ = try Backend.linux.make()
        let result = try gmigrate(["kernel", "run", "--backend", "both", "tools/kernel-scripts/selftest-bindings.kscript"])
        #expect(result.status == 0, "\(result.stdout)")
        #expect(result.stdout.contains("0 disagreements between model and linux"))
        #expect(result.stdout.contains("linux: unsupported"))
    }
}

@Suite("Repository")
struct RepositoryTests {
    /// CI must run exactly README's test command.
    @Test func ciRunsTheReadmeTestCommand() throws {
        let readme = try String(contentsOfFile: repositoryRoot + "/README.md", encoding: .utf8)
        let ci = try String(contentsOfFile: repositoryRoot + "/.ci/run", encoding: .utf8)
        let blocks = readme.components(separatedBy: "```sh\n").dropFirst().map { $0.components(separatedBy: "\n```")[0] }
        #expect(blocks.count >= 2, "README starts with two commands")
        let testCommand = try #require(blocks.dropFirst().first)
        #expect(testCommand.contains("swift test"))
        #expect(ci.split(separator: "\n").contains { $0 == testCommand }, "'\(testCommand)' must be a line of .ci/run")
    }
}
