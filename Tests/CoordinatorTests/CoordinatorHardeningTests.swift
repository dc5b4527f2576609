import CKVM
import Foundation
import GmigrateTestKit
import GmigrateTestSupport
import Handoff
import HostNet
import Journal
import Kernel
import Orchestrator
import Plans
import Testing
import Yams
@testable import Coordinator

#if canImport(Glibc)
import Glibc
#endif

@Suite("Hostile peers and hosts: plans and sockets", .serialized)
struct PlanPathHardeningTests {
    func plan(source: String, target: String, name: String = "demo") throws -> String {
        try processPlan(source: source, target: target, name: name)
    }

    /// `..` and symbolic links do not lead out of vmmSocketDirectories, and one VM written two
    /// ways is still one VM (409 for the second migration).
    @Test func socketPathsAreResolvedBeforeTheyAreChecked() throws {
        let daemon = try DaemonFixture(backend: "model")
        defer { daemon.stop() }
        let allowed = daemon.directory + "/vmms"
        // Short paths: a socket path has 108 bytes.
        let elsewhere = "/tmp/ge-" + String(UUID().uuidString.prefix(8))
        try FileManager.default.createDirectory(atPath: elsewhere, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: elsewhere) }
        try FileManager.default.createDirectory(atPath: allowed, withIntermediateDirectories: true)
        try FileManager.default.createSymbolicLink(atPath: allowed + "/escape", withDestinationPath: elsewhere)
        let outside = elsewhere + "/x.sock"
        for path in [daemon.directory + "/vmms/../../" + (elsewhere as NSString).lastPathComponent + "/x.sock", allowed + "/escape/x.sock"] {
            let answer = try daemon.call("POST", "/v1/migrations", body: try plan(source: path, target: "spawn"))
            #expect(answer.status == 403, "\(path): \(answer.text)")
            #expect(daemon.json(answer)["code"] as? String == "path-outside-directories")
        }
        #expect(!FileManager.default.fileExists(atPath: outside))
        // One source VMM, named through `..` and through a symbolic link: one VM, one key, and
        // the second migration of it is refused while the first runs.
        let socket = daemon.directory + "/s.sock"
        let planFile = daemon.directory + "/source-plan.yaml"
        try plan(source: socket, target: "spawn").write(toFile: planFile, atomically: true, encoding: .utf8)
        let source = try ProcessRun.spawnVMMForTests(
            tinyvmm: try executable("tinyvmm"), socket: socket, backend: "model:" + daemon.directory + "/state/model-host.json", name: "hardening/key",
            logFile: daemon.directory + "/s.log", plan: planFile, extra: ["--guest", "counter"])
        defer {
            (try? RemoteVMM(role: "test", socketPath: socket, timeout: .seconds(2)))?.shutdown()
            source.waitUntilExit()
        }
        try FileManager.default.createSymbolicLink(atPath: allowed + "/link.sock", withDestinationPath: socket)
        let held = try plan(source: allowed + "/../s.sock", target: "spawn", name: "first") + "  faults:\n    - before:create-target=delay:3s\n"
        let first = try daemon.call("POST", "/v1/migrations", body: held)
        #expect(first.status == 202, "\(first.text)")
        #expect(daemon.json(first)["vm"] as? String == socket, "the VM's key is its resolved socket")
        let second = try daemon.call("POST", "/v1/migrations", body: try plan(source: allowed + "/link.sock", target: "spawn", name: "second"))
        #expect(second.status == 409, "\(second.text)")
        #expect(daemon.json(second)["code"] as? String == "vm-migrating")
        let id = try #require(daemon.json(first)["id"] as? String)
        _ = try daemon.call("POST", "/v1/migrations/\(id)/cancel")
        #expect(try daemon.waitFinished(id)["state"] as? String == "rolled-back")
        // Same socket as source and target: invalid, whichever way it is written.
        let same = try daemon.call("POST", "/v1/migrations", body: try plan(source: daemon.directory + "/a.sock", target: daemon.directory + "/./a.sock"))
        #expect(same.status == 422)
        #expect(daemon.json(same)["code"] as? String == "source-is-target")
    }

    /// The longest duration a plan accepts is a day: the validator refuses more (the daemon
    /// crashed on it once), and the daemon answers 422 and lives on.
    @Test func durationsHaveAMaximum() throws {
        let daemon = try DaemonFixture(backend: "model")
        defer { daemon.stop() }
        let text = try demoPlan().replacingOccurrences(of: "stepTimeout: 60s", with: "stepTimeout: 9999999999999h")
        let answer = try daemon.call("POST", "/v1/migrations", body: text)
        #expect(answer.status == 422)
        #expect(daemon.json(answer)["code"] as? String == "duration-too-long")
        #expect(daemonIsHealthy(daemon.socket))
        #expect(Duration.seconds(Int64.max).text.hasSuffix("s"), "rendering the longest Duration does not trap")
    }
}

@Suite("Hostile peers and hosts: sockets and signals", .serialized)
struct SocketHardeningTests {
    /// tinyvmm does not take a live VMM's socket, nor a file's path; a stale socket is replaced.
    @Test func tinyvmmTakesOnlyAStaleSocket() throws {
        let live = try VMMUnderTest("live", source: false)
        defer { live.stop() }
        let tinyvmm = try executable("tinyvmm")
        func start(_ socket: String) throws -> CommandResult {
            try run(tinyvmm, ["--socket", socket, "--backend", "model", "--model-host", live.directory + "/host2.json", "--name", "second"])
        }
        let second = try start(live.socket)
        #expect(second.status != 0)
        #expect(second.stderr.contains("another program listens on this socket"), "\(second.stderr)")
        #expect(HandoffConnection.probe(path: live.socket) == 0, "the live VMM's socket still answers")
        let file = live.directory + "/file.sock"
        try "not a socket".write(toFile: file, atomically: true, encoding: .utf8)
        let onFile = try start(file)
        #expect(onFile.status != 0 && onFile.stderr.contains("not a socket"), "\(onFile.stderr)")
        #expect(try String(contentsOfFile: file, encoding: .utf8) == "not a socket")
        // A stale socket (nobody listens) is replaced.
        let stale = live.directory + "/stale.sock"
        let listener = ckvm_listen_unix(stale, 1)
        close(listener)
        let replacing = try VMMUnderTestAt(socket: stale, directory: live.directory)
        #expect(HandoffConnection.probe(path: stale) == 0)
        replacing.stop()
    }

    /// The daemon does not unlink another program's live socket, nor a file, and says so
    /// before recovery runs.
    @Test func theDaemonTakesOnlyAStaleSocket() throws {
        let live = try VMMUnderTest("daemon-live", source: false)
        defer { live.stop() }
        let config = live.directory + "/config.yaml"
        try "allowedUIDs: [0]\nbackend: model\n".write(toFile: config, atomically: true, encoding: .utf8)
        let result = try gmigrate(["daemon", "--socket", live.socket, "--state-dir", live.directory + "/state", "--config", config])
        #expect(result.status == 2, "\(result.stderr)")
        #expect(result.stderr.contains("another program listens on this socket"), "\(result.stderr)")
        #expect(HandoffConnection.probe(path: live.socket) == 0)
        let file = live.directory + "/plain"
        try "x".write(toFile: file, atomically: true, encoding: .utf8)
        let onFile = try gmigrate(["daemon", "--socket", file, "--state-dir", live.directory + "/state", "--config", config])
        #expect(onFile.status == 2 && onFile.stderr.contains("is not a socket"), "\(onFile.stderr)")
    }

    /// A VMM the coordinator spawns starts with no signal blocked and none ignored, whatever
    /// the coordinator's own mask (a test runner's, a service manager's).
    @Test func spawnedVMMsStartWithADefaultSignalMask() throws {
        var blocked = sigset_t()
        sigemptyset(&blocked)
        for signal in [SIGTERM, SIGHUP, SIGINT, SIGUSR1] { sigaddset(&blocked, signal) }
        var old = sigset_t()
        pthread_sigmask(SIG_BLOCK, &blocked, &old)
        defer { pthread_sigmask(SIG_SETMASK, &old, nil) }
        let previous = signal(SIGTERM, SIG_IGN)
        defer { signal(SIGTERM, previous) }
        let vmm = try VMMUnderTest("signals", source: false)
        defer { try? FileManager.default.removeItem(atPath: vmm.directory) }
        let status = try String(contentsOfFile: "/proc/\(vmm.process.processIdentifier)/status", encoding: .utf8)
        let line = status.split(separator: "\n").first { $0.hasPrefix("SigBlk:") } ?? ""
        #expect(line.hasSuffix("0000000000000000"), "\(line)")
        kill(vmm.process.processIdentifier, SIGTERM)
        #expect(ProcessWatch.waitForExit(vmm.process.processIdentifier, timeout: .seconds(10)), "SIGTERM ends the VMM")
        vmm.process.waitUntilExit()
    }
}

@Suite("Hostile peers and hosts: the daemon's API", .serialized)
struct DaemonAPIHardeningTests {
    /// One Idempotency-Key makes at most one migration, whatever the concurrency; the key with
    /// another plan is 422.
    @Test func anIdempotencyKeyMakesOneMigration() throws {
        let daemon = try DaemonFixture(backend: "model")
        defer { daemon.stop() }
        let plan = try demoPlan(name: "once", faults: ["before:bind-memslots=delay:1s"])
        final class Answers: @unchecked Sendable {
            let lock = NSLock()
            var all: [(Int, String)] = []
        }
        let answers = Answers()
        let socket = daemon.socket
        DispatchQueue.concurrentPerform(iterations: 8) { _ in
            guard let answer = try? UnixHTTPClient.request(
                socket: socket, method: "POST", path: "/v1/migrations", headers: ["Idempotency-Key": "k-1"], body: Data(plan.utf8))
            else { return }
            let id = ((try? JSONSerialization.jsonObject(with: answer.body)) as? [String: Any])?["id"] as? String ?? "?"
            answers.lock.withLock { answers.all.append((answer.status, id)) }
        }
        #expect(answers.all.count == 8)
        #expect(Set(answers.all.map(\.1)).count == 1, "one migration for one key: \(answers.all)")
        #expect(answers.all.filter { $0.0 == 202 }.count == 1 && answers.all.filter { $0.0 == 200 }.count == 7, "\(answers.all)")
        let other = try daemon.call("POST", "/v1/migrations", body: try demoPlan(name: "another"), headers: ["Idempotency-Key": "k-1"])
        #expect(other.status == 422)
        #expect(daemon.json(other)["code"] as? String == "idempotency-key-reused")
        _ = try daemon.waitFinished(answers.all[0].1)
    }

    /// A filter that names no state is 400 with the allowed values; a body declared as neither
    /// YAML nor JSON is 415.
    @Test func badQueriesAndMediaTypesAreRefused() throws {
        let daemon = try DaemonFixture(backend: "model")
        defer { daemon.stop() }
        let bogus = try daemon.call("GET", "/v1/migrations?state=bogus")
        #expect(bogus.status == 400)
        #expect((daemon.json(bogus)["detail"] as? String)?.contains("rolled-back") == true)
        #expect(try daemon.call("GET", "/v1/migrations?state=completed").status == 200)
        let html = try daemon.call("POST", "/v1/migrations", body: try demoPlan(), headers: ["Content-Type": "text/html"])
        #expect(html.status == 415)
        #expect(daemon.json(html)["code"] as? String == "unsupported-media-type")
        let yaml = try daemon.call("POST", "/v1/plans/validate", body: try demoPlan(), headers: ["Content-Type": "application/yaml; charset=utf-8"])
        #expect(yaml.status == 200)
    }

    /// A migration answered 202 is journaled before the answer; SIGTERM with a step blocked on
    /// a VMM that never answers exits within drainSeconds, and the next start takes it up.
    @Test func acceptedIsDurableAndSIGTERMIsBounded() throws {
        let directory = temporaryDirectory("gdr")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let daemon = try DaemonFixture(config: "drainSeconds: 1", socket: directory + "/g.sock", stateDirectory: directory + "/state")
        // A target that accepts and never answers: the migration's step blocks on it.
        let stall = directory + "/stall.sock"
        let listener = ckvm_listen_unix(stall, 8)
        #expect(listener >= 0)
        let source = try VMMUnderTestAt(socket: directory + "/s.sock", directory: directory, plan: true)
        defer { source.stop() }
        let text = try processPlan(source: source.socket, target: stall, longSteps: true)
        let answer = try daemon.call("POST", "/v1/migrations", body: text)
        #expect(answer.status == 202, "\(answer.text)")
        let id = try #require(daemon.json(answer)["id"] as? String)
        #expect(FileManager.default.fileExists(atPath: directory + "/state/journal/\(id).log"), "journaled before the answer")
        // Once prepare is done, create-target waits on the stalling target: its connection is
        // there, unaccepted (before it, the stop can still come between the steps, and the
        // migration then ends inside drainSeconds, which is not what this test is about).
        #expect(waitUntil(10) { ((try? daemon.json(daemon.call("GET", "/v1/migrations/\(id)")))?["steps"] as? [Any])?.isEmpty == false })
        var connection = pollfd(fd: listener, events: Int16(POLLIN), revents: 0)
        #expect(waitUntil(10) { poll(&connection, 1, 0) > 0 }, "create-target connected to the stalling target")
        let began = ContinuousClock.now
        daemon.process.terminate()
        daemon.process.waitUntilExit()
        #expect(ContinuousClock.now - began < .seconds(20), "SIGTERM returns within drainSeconds (and the step's own time), not at the step's 60 s")
        let log = try String(contentsOfFile: daemon.logFile, encoding: .utf8)
        #expect(log.contains(id) && log.contains("the next start recovers them"), "\(log.suffix(3000))")
        // The journal holds the accepted migration: the next start recovers it (the stalling
        // target gone, the source runs the guest again).
        close(listener)
        unlink(stall)
        let restarted = try DaemonFixture.start(
            socket: directory + "/g.sock", state: directory + "/state", config: directory + "/config.yaml", log: daemon.logFile)
        defer {
            restarted.terminate()
            restarted.waitUntilExit()
        }
        let view = try daemon.waitFinished(id)
        #expect(view["state"] as? String == "rolled-back", "\(view)")
    }

    /// Connections are capped per listener and timed out: idle peers on one listener neither
    /// exceed it nor starve the other, and a peer that sends no request is closed.
    @Test func connectionsAreCappedAndTimedOut() throws {
        let directory = temporaryDirectory("gcc")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let tokenFile = directory + "/api-token"
        try (UUID().uuidString.replacingOccurrences(of: "-", with: "") + "\n").write(toFile: tokenFile, atomically: true, encoding: .utf8)
        _ = chmod(tokenFile, 0o600)
        let daemon = try DaemonFixture(
            config: "maxConnections: 4\nheaderTimeoutSeconds: 4\ntcp: {host: 127.0.0.1, port: 0, tokenFile: \(tokenFile)}", socket: directory + "/g.sock",
            stateDirectory: directory + "/state")
        defer { daemon.stop() }
        var port: UInt16 = 0
        #expect(waitUntil(10) {
            let log = (try? String(contentsOfFile: daemon.logFile, encoding: .utf8)) ?? ""
            guard let line = log.split(separator: "\n").first(where: { $0.contains("\"message\":\"listening on tcp\"") }) else { return false }
            port = UInt16(((try? JSONSerialization.jsonObject(with: Data(line.utf8))) as? [String: Any])?["port"] as? String ?? "") ?? 0
            return port > 0
        })
        func tcpConnection() -> Int32 {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_port = port.bigEndian
            address.sin_addr.s_addr = inet_addr("127.0.0.1")
            let connected = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            #expect(connected == 0)
            return fd
        }
        /// Whether the daemon closed `fd` within `seconds`: a read answers end of file, or a reset
        /// (a close the kernel turns into RST), not a timeout.
        func closedByPeer(_ fd: Int32, within seconds: Int) -> Bool {
            var timeout = timeval(tv_sec: seconds, tv_usec: 0)
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            var byte: UInt8 = 0
            let result = recv(fd, &byte, 1, 0)
            return result == 0 || (result < 0 && errno == ECONNRESET)
        }
        /// Whether the daemon closed `fd` already (without waiting).
        func closedNow(_ fd: Int32) -> Bool {
            var byte: UInt8 = 0
            let result = recv(fd, &byte, 1, Int32(MSG_DONTWAIT))
            return result == 0 || (result < 0 && errno == ECONNRESET)
        }
        // Five at once: the daemon's event loops take them in no set order, admit four (each
        // has headerTimeoutSeconds from its own accept) and close the one too many at once.
        let connections = (0..<5).map { _ in tcpConnection() }
        defer { for fd in connections { close(fd) } }
        var refused: [Int32] = []
        #expect(waitUntil(3) {
            refused = connections.filter(closedNow)
            return !refused.isEmpty
        }, "one TCP connection over maxConnections is closed at once")
        #expect(refused.count == 1, "only the one over maxConnections is closed at once")
        let idle = connections.filter { !refused.contains($0) }
        #expect(daemonIsHealthy(daemon.socket), "the UNIX socket is served while TCP is full")
        for fd in idle { #expect(closedByPeer(fd, within: 8), "an idle connection is closed after headerTimeoutSeconds") }
        let log = try String(contentsOfFile: daemon.logFile, encoding: .utf8)
        #expect(log.contains("maxConnections") && log.contains("no whole request within headerTimeoutSeconds"))
    }

    /// Retention: beyond keepFinishedJournals the oldest finished journals are deleted; and a
    /// finished in-process migration keeps no descriptor in the daemon.
    @Test func finishedMigrationsAreReleasedAndRetained() throws {
        let directory = temporaryDirectory("grt")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let daemon = try DaemonFixture(config: "keepFinishedJournals: 2", socket: directory + "/g.sock", stateDirectory: directory + "/state")
        defer { daemon.stop() }
        func descriptors() -> Int { openDescriptors(daemon.process.processIdentifier).count }
        var ids: [String] = []
        var counts: [Int] = []
        for index in 0..<5 {
            let answer = try daemon.call("POST", "/v1/migrations", body: try demoPlan(name: "keep-\(index)"))
            let id = try #require(daemon.json(answer)["id"] as? String)
            #expect(try daemon.waitFinished(id)["state"] as? String == "completed")
            ids.append(id)
            counts.append(descriptors())
        }
        #expect(counts.last ?? 0 <= (counts.dropFirst().first ?? 0) + 2, "descriptors do not grow with migrations: \(counts)")
        let journals = try FileManager.default.contentsOfDirectory(atPath: directory + "/state/journal").sorted()
        #expect(journals == ids.suffix(2).map { $0 + ".log" }, "\(journals)")
        let listed = (try? JSONSerialization.jsonObject(with: try daemon.call("GET", "/v1/migrations").body)) as? [[String: Any]]
        #expect(listed?.count == 2)
        #expect(try daemon.call("GET", "/v1/migrations/\(ids[0])").status == 404)
    }
}
