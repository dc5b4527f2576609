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

/// A real `gmigrate daemon` process on a real UNIX socket, with its own state directory.
final class DaemonFixture {
    let directory: String
    let socket: String
    let process: Process
    let logFile: String

    init(backend: String = "model", config extra: String = "", socket: String? = nil, stateDirectory: String? = nil) throws {
        directory = stateDirectory.map { ($0 as NSString).deletingLastPathComponent } ?? temporaryDirectory("gmd")
        self.socket = socket ?? directory + "/g.sock"
        let config = directory + "/config.yaml"
        try """
            allowedUIDs: [0]
            vmmSocketDirectories: [\(directory)]
            backend: \(backend)
            allowFaults: true
            logFormat: json
            \(extra)
            """.write(toFile: config, atomically: true, encoding: .utf8)
        logFile = directory + "/daemon.log"
        process = try DaemonFixture.start(socket: self.socket, state: stateDirectory ?? directory + "/state", config: config, log: logFile)
    }

    static func start(socket: String, state: String, config: String, log: String) throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: try executable("gmigrate"))
        process.arguments = ["daemon", "--socket", socket, "--state-dir", state, "--config", config]
        let handle = appendingLog(log)
        process.standardOutput = handle
        process.standardError = handle
        setenv("GMIGRATE_TINYVMM", try executable("tinyvmm"), 1)
        try process.run()
        let ready = waitUntil(20) { daemonIsHealthy(socket) }
        if !ready { process.terminate() }
        #expect(ready, "the daemon serves on \(socket)")
        return process
    }

    func call(_ method: String, _ path: String, body: String? = nil, headers: [String: String] = [:]) throws -> HTTPResult {
        try UnixHTTPClient.request(socket: socket, method: method, path: path, headers: headers, body: body.map { Data($0.utf8) })
    }

    func json(_ result: HTTPResult) -> [String: Any] { ((try? JSONSerialization.jsonObject(with: result.body)) as? [String: Any]) ?? [:] }

    /// Waits until a migration is in a terminal state; returns it.
    func waitFinished(_ id: String, seconds: Double = 60) throws -> [String: Any] {
        var last: [String: Any] = [:]
        _ = waitUntil(seconds) {
            last = (try? json(call("GET", "/v1/migrations/\(id)"))) ?? [:]
            return ["completed", "rolled-back", "stuck", "lost"].contains(last["state"] as? String ?? "")
        }
        return last
    }

    /// SIGTERM: the daemon drains and exits 0.
    func stop(sourceLocation: SourceLocation = #_sourceLocation) {
        guard process.isRunning else { return }
        process.terminate()
        process.waitUntilExit()
        #expect(process.terminationStatus == 0, "a clean exit on SIGTERM", sourceLocation: sourceLocation)
    }
}

/// Whether a daemon answers /healthz on `socket`.
func daemonIsHealthy(_ socket: String) -> Bool {
    (try? UnixHTTPClient.request(socket: socket, method: "GET", path: "/healthz", timeout: 1))?.status == 200
}

func demoPlan(name: String = "demo", faults: [String] = []) throws -> String {
    var text = try String(contentsOfFile: repositoryRoot + "/migration-plans/demo.yaml", encoding: .utf8)
    text = text.replacingOccurrences(of: "name: demo\n", with: "name: \(name)\n")
        .replacingOccurrences(of: "stepTimeout: 5s", with: "stepTimeout: 60s")
    if !faults.isEmpty { text += "  faults:\n" + faults.map { "    - \($0)\n" }.joined() }
    return text
}

@Suite("The coordinator daemon", .serialized)
struct DaemonTests {
    @Test func submitWatchEventsStatusAndMetrics() throws {
        let daemon = try DaemonFixture()
        defer { daemon.stop() }
        let submitted = try daemon.call("POST", "/v1/migrations", body: try demoPlan())
        #expect(submitted.status == 202)
        #expect(submitted.headers["location"]?.hasPrefix("/v1/migrations/") == true)
        let id = try #require(daemon.json(submitted)["id"] as? String)
        var kinds: [String] = []
        var steps: [String] = []
        let status = try UnixHTTPClient.events(socket: daemon.socket, path: "/v1/migrations/\(id)/events") { kind, data in
            kinds.append(kind)
            if kind == "step", let object = try? JSONSerialization.jsonObject(with: Data(data.utf8)) as? [String: Any],
                let step = object["step"] as? [String: Any]
            {
                steps.append(step["step"] as? String ?? "")
            }
        }
        #expect(status == 200)
        #expect(kinds.last == "finished")
        #expect(steps == ["prepare", "create-target", "hand-over-memory", "bind-memslots", "verify-bindings", "pause-source", "resume-target", "retire-source"])
        let view = try daemon.waitFinished(id)
        #expect(view["state"] as? String == "completed")
        #expect(view["strategy"] as? String == "link")
        #expect((view["blackoutNanoseconds"] as? Int ?? 0) > 0)
        #expect((view["steps"] as? [Any])?.count == 8, "the steps of a share or link run")
        // Metrics: Prometheus text, parsed.
        let metrics = try daemon.call("GET", "/metrics")
        #expect(metrics.headers["content-type"]?.hasPrefix("text/plain") == true)
        var samples: [String: Double] = [:]
        for line in metrics.text.split(separator: "\n") where !line.hasPrefix("#") {
            let parts = line.split(separator: " ")
            if parts.count == 2, let value = Double(parts[1]) { samples[String(parts[0])] = value }
        }
        #expect(samples["gmigrate_migrations_total{outcome=\"completed\"}"] == 1)
        #expect(samples["gmigrate_step_duration_seconds_count"] == 8)
        #expect(samples["gmigrate_blackout_seconds_count"] == 1)
        #expect(samples["gmigrate_recoveries_total"] == 0)
        // The list, filtered.
        let list = try daemon.call("GET", "/v1/migrations?state=completed")
        #expect(((try? JSONSerialization.jsonObject(with: list.body)) as? [[String: Any]])?.count == 1)
        // JSON log lines carry the migration id.
        let log = try String(contentsOfFile: daemon.logFile, encoding: .utf8)
        let lines = log.split(separator: "\n").compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: String] }
        #expect(lines.contains { $0["migration"] == id && $0["message"] == "finished" })
    }

    @Test func idempotentResubmitConflictAndCancel() throws {
        let daemon = try DaemonFixture()
        defer { daemon.stop() }
        let slow = try demoPlan(name: "slow", faults: ["before:bind-memslots=delay:2s"])
        let first = try daemon.call("POST", "/v1/migrations", body: slow, headers: ["Idempotency-Key": "k-1"])
        #expect(first.status == 202)
        let id = try #require(daemon.json(first)["id"] as? String)
        let again = try daemon.call("POST", "/v1/migrations", body: slow, headers: ["Idempotency-Key": "k-1"])
        #expect(again.status == 200)
        #expect(daemon.json(again)["id"] as? String == id, "the same migration")
        // The same VM again, without the key: 409.
        let conflict = try daemon.call("POST", "/v1/migrations", body: slow)
        #expect(conflict.status == 409)
        #expect(conflict.headers["content-type"] == "application/problem+json")
        #expect(daemon.json(conflict)["code"] as? String == "vm-migrating")
        // Cancel before the point of no return: it rolls back.
        let cancelled = try daemon.call("POST", "/v1/migrations/\(id)/cancel")
        #expect(cancelled.status == 202)
        let view = try daemon.waitFinished(id)
        #expect(view["state"] as? String == "rolled-back")
        #expect((view["reason"] as? String)?.contains("cancelled through the API") == true)
        // Cancelling a finished migration: 409.
        #expect(try daemon.call("POST", "/v1/migrations/\(id)/cancel").status == 409)
        #expect(try daemon.call("GET", "/v1/migrations/nope").status == 404)
    }

    @Test func cancelPastThePointOfNoReturnIsRefused() throws {
        let daemon = try DaemonFixture()
        defer { daemon.stop() }
        let late = try demoPlan(name: "late", faults: ["before:retire-source=delay:2s"])
        let id = try #require(daemon.json(try daemon.call("POST", "/v1/migrations", body: late))["id"] as? String)
        #expect(waitUntil(10) { (try? daemon.json(daemon.call("GET", "/v1/migrations/\(id)")))?["pointOfNoReturnPassed"] as? Bool == true })
        let refused = try daemon.call("POST", "/v1/migrations/\(id)/cancel")
        #expect(refused.status == 409)
        #expect(daemon.json(refused)["code"] as? String == "past-point-of-no-return")
        #expect(try daemon.waitFinished(id)["state"] as? String == "completed")
    }

    @Test func validationErrorsAreProblemDocumentsWithTheValidatorsCodes() throws {
        let daemon = try DaemonFixture(config: "maxBodyBytes: 8192")
        defer { daemon.stop() }
        let invalid = try String(contentsOfFile: repositoryRoot + "/migration-plans/invalid/gpa-overlap.yaml", encoding: .utf8)
        let rejected = try daemon.call("POST", "/v1/migrations", body: invalid)
        #expect(rejected.status == 422)
        let problem = daemon.json(rejected)
        #expect(problem["code"] as? String == "gpa-overlap")
        let diagnostics = problem["diagnostics"] as? [[String: Any]]
        #expect(diagnostics?.first?["path"] as? String == "spec.vm.memslots[1].guestPhysAddr")
        let garbage = try daemon.call("POST", "/v1/migrations", body: "{ not: [yaml")
        #expect(garbage.status == 400)
        #expect(daemon.json(garbage)["code"] as? String == "syntax-error")
        let tooLarge = try daemon.call("POST", "/v1/migrations", body: String(repeating: "# padding\n", count: 2000))
        #expect(tooLarge.status == 413)
        let report = try daemon.call("POST", "/v1/plans/validate", body: try demoPlan())
        #expect(report.status == 200)
        #expect(daemon.json(report)["valid"] as? Bool == true)
        #expect((daemon.json(report)["strategy"] as? [String: Any])?["chosen"] as? String == "link")
        let rehearsed = try daemon.call("POST", "/v1/plans/validate?rehearse=true", body: try demoPlan())
        #expect(rehearsed.status == 200)
        #expect((daemon.json(rehearsed)["rehearsal"] as? [String: Any])?["state"] as? String == "completed")
        // A VMM socket outside the configured directories is refused.
        let outside = try String(contentsOfFile: repositoryRoot + "/migration-plans/web-vmm-upgrade.yaml", encoding: .utf8)
        let forbidden = try daemon.call("POST", "/v1/migrations", body: outside)
        #expect(forbidden.status == 403)
        #expect(daemon.json(forbidden)["code"] as? String == "path-outside-directories")
    }

    /// The running server answers every route the OpenAPI document lists, with a documented status.
    @Test func theServerMatchesItsOpenAPIDocument() throws {
        let daemon = try DaemonFixture()
        defer { daemon.stop() }
        let document = try #require(try Yams.load(yaml: String(contentsOfFile: repositoryRoot + "/docs/openapi.yaml", encoding: .utf8)) as? [String: Any])
        let paths = try #require(document["paths"] as? [String: [String: Any]])
        let id = try #require(daemon.json(try daemon.call("POST", "/v1/migrations", body: try demoPlan(name: "openapi")))["id"] as? String)
        _ = try daemon.waitFinished(id)
        var checked = 0
        var bodies = 0
        for (path, operations) in paths {
            for (method, operation) in operations {
                let responses = ((operation as? [String: Any])?["responses"] as? [String: Any]) ?? [:]
                let concrete = path.replacingOccurrences(of: "{id}", with: id)
                let body = method == "post" && !path.contains("cancel") ? try demoPlan(name: "openapi") : nil
                let result = try daemon.call(method.uppercased(), concrete, body: body, headers: ["Idempotency-Key": "openapi"])
                #expect(responses.keys.contains(String(result.status)), "\(method.uppercased()) \(path) answered \(result.status), documented: \(responses.keys.sorted())")
                // The body matches the documented schema: required fields, types, enums.
                if let response = responses[String(result.status)] as? [String: Any],
                    let content = OpenAPI.resolve(response, in: document)["content"] as? [String: Any],
                    let (mediaType, entry) = content.first(where: { result.headers["content-type"]?.hasPrefix($0.key) == true }),
                    mediaType.contains("json"), let schema = (entry as? [String: Any])?["schema"] as? [String: Any]
                {
                    let value = try JSONSerialization.jsonObject(with: result.body, options: [.fragmentsAllowed])
                    let problems = OpenAPI.check(value, against: schema, in: document, at: "body")
                    #expect(problems.isEmpty, "\(method.uppercased()) \(path) \(result.status): \(problems)")
                    bodies += 1
                }
                checked += 1
            }
        }
        #expect(checked == 9)
        #expect(bodies >= 6, "JSON bodies checked against their schemas: \(bodies)")
        // Every route of the router is documented: an undocumented path is 404.
        #expect(try daemon.call("GET", "/v1/nowhere").status == 404)
    }

    /// A client whose uid is not allowed (a real process running as nobody) gets 403.
    @Test func anotherUserIsForbidden() throws {
        let daemon = try DaemonFixture(config: "socketGroup: 65534")
        defer { daemon.stop() }
        _ = chmod(daemon.directory, 0o755)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/setpriv")
        process.arguments = [
            "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/curl", "-s", "-w", "\n%{http_code}", "--unix-socket", daemon.socket,
            "http://localhost/v1/migrations",
        ]
        let out = Pipe()
        process.standardOutput = out
        try process.run()
        let output = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        #expect(output.hasSuffix("\n403"), "\(output)")
        #expect(output.contains("\"code\":\"forbidden\""))
        #expect(output.contains("uid 65534"))
        let log = try String(contentsOfFile: daemon.logFile, encoding: .utf8)
        #expect(log.contains("\"message\":\"refused\"") && log.contains("\"uid\":\"65534\""), "the refusal is logged")
    }

    /// allowedGIDs admits a member of the group through a supplementary group, not only
    /// through its primary group (SO_PEERGROUPS); a non-member is still refused.
    @Test func aSupplementaryGroupIsAllowed() throws {
        let daemon = try DaemonFixture(config: "socketGroup: 4343\nallowedGIDs: [4343]")
        defer { daemon.stop() }
        _ = chmod(daemon.directory, 0o755)
        // Anyone may connect: the daemon's own check is what is tested.
        _ = chmod(daemon.socket, 0o666)
        func get(groups: String) throws -> String {
            let result = try run("/usr/bin/setpriv", [
                "--reuid=65534", "--regid=65534", "--groups=\(groups)", "/usr/bin/curl", "-s", "-w", "\n%{http_code}", "--unix-socket", daemon.socket,
                "http://localhost/v1/migrations",
            ])
            return result.stdout
        }
        let member = try get(groups: "4343")
        #expect(member.hasSuffix("\n200"), "\(member)")
        let several = try get(groups: "100,4343,5000")
        #expect(several.hasSuffix("\n200"), "\(several)")
        let stranger = try get(groups: "100")
        #expect(stranger.hasSuffix("\n403"), "\(stranger)")
        // The buffer as the kernel fills it: sorted groups, then SwiftNIO's zero padding.
        var buffer = ckvm_peer_groups()
        withUnsafeMutableBytes(of: &buffer.gids) { raw in
            let gids = raw.bindMemory(to: UInt32.self)
            gids[0] = 100
            gids[1] = 4343
        }
        #expect(peerGroups(buffer, pid: getpid()) == [100, 4343], "the padding is not group 0")
    }

    /// kill -9 of the daemon mid-migration; the restarted daemon recovers it before serving:
    /// between VMM processes the source runs the guest again; in-process VMMs died with the
    /// daemon, and the migration is recorded lost.
    @Test func killedDaemonRecoversAtRestart() throws {
        _ = try Backend.linux.make()
        let daemon = try DaemonFixture(backend: "linux")
        let socket = daemon.directory + "/src.sock"
        let plan = try processPlan(source: socket, longSteps: true) + "  faults:\n    - before:bind-memslots=delay:10s\n"
        let file = daemon.directory + "/plan.yaml"
        try plan.write(toFile: file, atomically: true, encoding: .utf8)
        let source = try ProcessRunHelper.spawn(socket: socket, plan: file, log: daemon.directory + "/src.log")
        defer {
            (try? RemoteVMM(role: "test", socketPath: socket, timeout: .seconds(2)))?.shutdown()
            if source.isRunning { source.terminate() }
        }
        let id = try #require(daemon.json(try daemon.call("POST", "/v1/migrations", body: plan))["id"] as? String)
        let inProcess = try #require(daemon.json(try daemon.call("POST", "/v1/migrations", body: try demoPlan(name: "killed", faults: ["before:bind-memslots=delay:10s"])))["id"] as? String)
        for migration in [id, inProcess] {
            #expect(waitUntil(10) { (try? daemon.json(daemon.call("GET", "/v1/migrations/\(migration)")))?["steps"].map { ($0 as? [Any])?.count ?? 0 } ?? 0 >= 3 })
        }
        kill(daemon.process.processIdentifier, SIGKILL)
        daemon.process.waitUntilExit()
        let restarted = try DaemonFixture.start(
            socket: daemon.socket, state: daemon.directory + "/state", config: daemon.directory + "/config.yaml", log: daemon.logFile)
        defer {
            restarted.terminate()
            restarted.waitUntilExit()
        }
        let view = daemon.json(try daemon.call("GET", "/v1/migrations/\(id)"))
        #expect(view["state"] as? String == "rolled-back", "recovered before the point of no return: \(view)")
        #expect(runningGuest([socket]).count == 1, "the source runs the guest")
        let lost = daemon.json(try daemon.call("GET", "/v1/migrations/\(inProcess)"))
        #expect(lost["state"] as? String == "lost", "in-process VMMs end with the daemon: \(lost)")
        let metrics = try daemon.call("GET", "/metrics").text
        #expect(metrics.contains("gmigrate_recoveries_total 2"))
    }

    /// Many migrations of different VMs at once, each with its own history.
    @Test func eightAtOnceOnTheModel() throws {
        let daemon = try DaemonFixture()
        defer { daemon.stop() }
        let ids = try (0..<8).map { index in
            try #require(daemon.json(try daemon.call("POST", "/v1/migrations", body: try demoPlan(name: "vm-\(index)")))["id"] as? String)
        }
        #expect(Set(ids).count == 8)
        for id in ids {
            let view = try daemon.waitFinished(id)
            #expect(view["state"] as? String == "completed", "\(id): \(view)")
            let steps = (view["steps"] as? [[String: Any]])?.map { $0["step"] as? String ?? "" }
            #expect(steps?.count == 8 && steps?.first == "prepare" && steps?.last == "retire-source")
            let journal = try gmigrate(["journal", "show", id, "--state-dir", daemon.directory + "/state", "--json"])
            let entries = ((try? JSONSerialization.jsonObject(with: Data(journal.stdout.utf8))) as? [String: Any])?["entries"] as? [Any]
            #expect(entries?.count == 21, "\(id)'s own history: started, 8 intents and outcomes, the saved state, the point of no return, one observation, finished")
        }
    }

    @Test func eightAtOnceWithRealVMMProcessesAndInProcess() throws {
        _ = try Backend.linux.make()
        let daemon = try DaemonFixture(backend: "linux")
        defer { daemon.stop() }
        var sources: [Process] = []
        var plans: [String] = []
        for index in 0..<4 {
            let socket = daemon.directory + "/src-\(index).sock"
            let text = try processPlan(source: socket, name: "proc-\(index)", longSteps: true)
            let file = daemon.directory + "/proc-\(index).yaml"
            try text.write(toFile: file, atomically: true, encoding: .utf8)
            sources.append(try ProcessRunHelper.spawn(socket: socket, plan: file, log: daemon.directory + "/src-\(index).log"))
            plans.append(text)
        }
        for index in 0..<4 { plans.append(try demoPlan(name: "inproc-\(index)")) }
        let ids = try plans.map { plan in try #require(daemon.json(try daemon.call("POST", "/v1/migrations", body: plan))["id"] as? String) }
        for id in ids {
            let view = try daemon.waitFinished(id)
            #expect(view["state"] as? String == "completed", "\(id): \(view)")
            #expect((view["steps"] as? [Any])?.count == 8, "the steps of a share or link run")
        }
        for source in sources {
            #expect(waitUntil { !source.isRunning }, "each source VMM retired and exited")
        }
        // The targets run on (the daemon let go of them); ask each to stop, and check that it did.
        for id in ids {
            guard let contents = try? Journal.read(stateDirectory: daemon.directory + "/state", id: id),
                let socket = contents.started?.targetSocket, let pid = contents.targetPID
            else { continue }
            try RemoteVMMHelper.shutdown(socket)
            #expect(waitUntil { !isAlive(pid) }, "target VMM \(pid) stops when asked")
            if isAlive(pid) { kill(pid, SIGKILL) }
        }
    }
}

@Suite("Daemon VM events", .serialized)
struct DaemonVMEventTests {
    /// A VMM killed mid-migration: the daemon's event stream carries the VM event, and the
    /// migration rolls back at once.
    @Test func aKilledTargetShowsOnTheEventStream() throws {
        _ = try Backend.linux.make()
        let daemon = try DaemonFixture(backend: "linux")
        defer { daemon.stop() }
        let socket = daemon.directory + "/src.sock"
        let plan = try processPlan(source: socket, longSteps: true) + "  faults:\n    - before:bind-memslots=delay:20s\n"
        let file = daemon.directory + "/plan.yaml"
        try plan.write(toFile: file, atomically: true, encoding: .utf8)
        let source = try ProcessRunHelper.spawn(socket: socket, plan: file, log: daemon.directory + "/src.log")
        defer { if source.isRunning { source.terminate() } }
        let id = try #require(daemon.json(try daemon.call("POST", "/v1/migrations", body: plan))["id"] as? String)
        // Wait for the target, then kill it.
        var targetPID: Int32 = 0
        #expect(waitUntil(10) {
            guard let contents = try? Journal.read(stateDirectory: daemon.directory + "/state", id: id), let pid = contents.targetPID
            else { return false }
            targetPID = pid
            return contents.entries.contains { if case .intent(.bindMemslots, .forward) = $0.event { true } else { false } }
        })
        kill(targetPID, SIGKILL)
        var kinds: [String] = []
        var reasons: [String] = []
        _ = try UnixHTTPClient.events(socket: daemon.socket, path: "/v1/migrations/\(id)/events") { kind, data in
            kinds.append(kind)
            if let object = try? JSONSerialization.jsonObject(with: Data(data.utf8)) as? [String: Any], let reason = object["reason"] as? String {
                reasons.append(reason)
            }
        }
        #expect(kinds.contains("vm-event"), "\(kinds)")
        #expect(reasons.contains { $0.contains("target VMM") }, "\(reasons)")
        #expect(try daemon.waitFinished(id)["state"] as? String == "rolled-back")
        try RemoteVMMHelper.shutdown(socket)
        #expect(waitUntil(10) { !source.isRunning })
    }
}

/// README's curl examples, run as written, against a daemon on the socket they name.
@Suite("README")
struct ReadmeCurlTests {
    @Test func curlExamplesWorkAsWritten() throws {
        let readme = try String(contentsOfFile: repositoryRoot + "/README.md", encoding: .utf8)
        let commands = readme.split(separator: "\n").map(String.init).filter { $0.hasPrefix("curl --unix-socket /run/gmigrate/gmigrate.sock") }
        #expect(commands.count >= 4)
        let state = temporaryDirectory("gmd-readme")
        try? FileManager.default.createDirectory(atPath: "/run/gmigrate", withIntermediateDirectories: true)
        try "allowedUIDs: [0]\nbackend: model\n".write(toFile: state + "/config.yaml", atomically: true, encoding: .utf8)
        let daemon = try DaemonFixture.start(socket: "/run/gmigrate/gmigrate.sock", state: state + "/state", config: state + "/config.yaml", log: state + "/log")
        defer {
            daemon.terminate()
            daemon.waitUntilExit()
        }
        for command in commands {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: "/bin/sh")
            process.arguments = ["-c", command + " -s -o /dev/null -w '%{http_code}'"]
            process.currentDirectoryURL = URL(fileURLWithPath: repositoryRoot)
            let out = Pipe()
            process.standardOutput = out
            try process.run()
            let code = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            process.waitUntilExit()
            #expect(["200", "202"].contains(code), "\(command) answered \(code)")
        }
    }
}

import Handoff

enum ProcessRunHelper {
    /// A source VMM running the counter guest: the daemon's tests watch its count go on (the
    /// long-mode guest has its own tests).
    static func spawn(socket: String, plan: String, log: String) throws -> Process {
        try ProcessRun.spawnVMMForTests(
            tinyvmm: try executable("tinyvmm"), socket: socket, backend: "linux", name: "daemon-test", logFile: log, plan: plan, extra: ["--guest", "counter"])
    }
}


/// Just enough of OpenAPI 3 schema checking for the daemon's documents: `$ref`, `type`,
/// `required`, `properties`, `items` and `enum`.
enum OpenAPI {
    static func resolve(_ node: [String: Any], in document: [String: Any]) -> [String: Any] {
        guard let reference = node["$ref"] as? String, reference.hasPrefix("#/") else { return node }
        var current: Any = document
        for part in reference.dropFirst(2).split(separator: "/") { current = (current as? [String: Any])?[String(part)] as Any }
        return (current as? [String: Any]).map { resolve($0, in: document) } ?? [:]
    }

    static func check(_ value: Any, against schema: [String: Any], in document: [String: Any], at place: String) -> [String] {
        let schema = resolve(schema, in: document)
        var problems: [String] = []
        switch schema["type"] as? String {
        case "object":
            guard let object = value as? [String: Any] else { return ["\(place): not an object"] }
            for name in schema["required"] as? [String] ?? [] where object[name] == nil { problems.append("\(place).\(name): required, missing") }
            for (name, property) in schema["properties"] as? [String: Any] ?? [:] {
                if let field = object[name], !(field is NSNull), let property = property as? [String: Any] {
                    problems += check(field, against: property, in: document, at: place + "." + name)
                }
            }
        case "array":
            guard let array = value as? [Any] else { return ["\(place): not an array"] }
            if let items = schema["items"] as? [String: Any] {
                for (index, item) in array.enumerated() { problems += check(item, against: items, in: document, at: "\(place)[\(index)]") }
            }
        case "string":
            guard let text = value as? String else { return ["\(place): not a string"] }
            if let allowed = schema["enum"] as? [String], !allowed.contains(text) { problems.append("\(place): '\(text)' is none of \(allowed)") }
        case "integer":
            if let number = value as? NSNumber, number.doubleValue == number.doubleValue.rounded(), !(value is Bool) {} else { problems.append("\(place): not an integer") }
        case "boolean":
            if !(value is Bool) { problems.append("\(place): not a boolean") }
        default:
            break
        }
        return problems
    }
}
