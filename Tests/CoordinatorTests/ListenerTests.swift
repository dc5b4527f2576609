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

/// A daemon's configuration file in `directory`, on the model, with extra YAML lines.
private func writeConfig(_ directory: String, _ extra: String = "") throws -> String {
    let path = directory + "/config.yaml"
    try """
        allowedUIDs: [0]
        vmmSocketDirectories: [\(directory)]
        backend: model
        logFormat: json
        \(extra)
        """.write(toFile: path, atomically: true, encoding: .utf8)
    return path
}

/// Starts `gmigrate daemon` the way systemd starts a socket-activated service: `descriptor`
/// becomes its fd 3, `LISTEN_FDS` and `LISTEN_PID` (its own pid, set by the shell that then
/// execs it, unless `listenPID` says otherwise) in its environment.
private func startActivated(
    descriptor: Int32, arguments: [String], log: String, listenFDs: String = "1", listenPID: String? = nil

) throws -> Process {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/bin/sh")
    process.arguments = [
        "-c", "exec 3<&0 0</dev/null; export LISTEN_PID=${GM_LISTEN_PID:-$$} LISTEN_FDS=$GM_LISTEN_FDS; exec \"$@\"",
        "sh", try executable("gmigrate"), "daemon",
    ] + arguments
    var environment = ProcessInfo.processInfo.environment
    environment["GM_LISTEN_FDS"] = listenFDs
    environment["GM_LISTEN_PID"] = listenPID
    environment["GMIGRATE_TINYVMM"] = try executable("tinyvmm")
    process.environment = environment
    process.standardInput = FileHandle(fileDescriptor: descriptor, closeOnDealloc: false)
    let handle = appendingLog(log)
    process.standardOutput = handle
    process.standardError = handle
    try process.run()
    return process
}

private func jsonObject(_ data: Data) -> [String: Any] { ((try? JSONSerialization.jsonObject(with: data)) as? [String: Any]) ?? [:] }

/// Whether a UNIX socket is listening at `path` (/proc/net/unix: flags __SO_ACCEPTCON).
private func isListening(_ path: String) -> Bool {
    guard let table = try? String(contentsOfFile: "/proc/net/unix", encoding: .utf8) else { return false }
    return table.split(separator: "\n").contains { line in
        let fields = line.split(separator: " ", omittingEmptySubsequences: true)
        return fields.count >= 8 && fields[7] == path && fields[3] == "00010000"
    }
}

private func inode(_ path: String) -> UInt {
    var status = stat()
    return stat(path, &status) == 0 ? UInt(status.st_ino) : 0
}

@Suite("Daemon listeners: socket activation, loopback TCP, configuration", .serialized)
struct ListenerTests {
    /// systemd's own activator (systemd-socket-activate, what a socket unit does): the socket
    /// exists before the daemon, the first connection starts it, and it serves that socket.
    @Test func systemdSocketActivateStartsTheDaemonOnDemand() throws {
        let activator = "/usr/bin/systemd-socket-activate"
        try #require(FileManager.default.isExecutableFile(atPath: activator), "systemd-socket-activate (package systemd; tools/setup.sh installs it)")
        let directory = temporaryDirectory("gsa")
        let socket = directory + "/g.sock"
        let log = directory + "/daemon.log"
        // Not Foundation's Process: the activator closes every descriptor it inherits (SpawnedChild says why that matters).
        let process = try SpawnedChild(
            activator,
            [
                "-l", socket, "-E", "GMIGRATE_TINYVMM=" + (try executable("tinyvmm")), try executable("gmigrate"), "daemon", "--socket", socket,
                "--state-dir", directory + "/state", "--config", try writeConfig(directory),
            ], log: log)
        defer {
            if process.isRunning {
                process.terminate()
                process.waitUntilExit()
            }
        }
        // The activator binds, then listens: a connection between the two is refused (it was,
        // once, in a loaded run), so the test waits for the listening socket, not the file.
        #expect(waitUntil(10) { isListening(socket) }, "the activator listens on the socket")
        #expect(!FileManager.default.fileExists(atPath: directory + "/state"), "nothing started before the first connection")

        // The first connection: a submit, answered by the daemon it starts.
        let submitted = try UnixHTTPClient.request(socket: socket, method: "POST", path: "/v1/migrations", body: Data(try demoPlan(name: "activated").utf8))
        #expect(submitted.status == 202, "\(submitted.text)")
        let id = try #require(jsonObject(submitted.body)["id"] as? String)
        var state = ""
        #expect(waitUntil(60) {
            state = (try? UnixHTTPClient.request(socket: socket, method: "GET", path: "/v1/migrations/\(id)")).map { jsonObject($0.body)["state"] as? String ?? "" } ?? ""
            return state == "completed"
        }, "the migration completes: \(state)")
        var status = stat()
        #expect(stat(socket, &status) == 0 && status.st_mode & 0o777 == 0o660, "the daemon sets mode 0660 on the socket it was passed")
        let text = try String(contentsOfFile: log, encoding: .utf8)
        #expect(text.contains("socket-activated, descriptor 3"), "\(text)")
        #expect(!text.contains("Server started and listening on socket path"), "the daemon did not bind a socket of its own")

        process.terminate()
        #expect(process.waitUntilExit() == 0, "SIGTERM: a clean exit")
    }

    /// The point of a socket unit: across a restart of the daemon the socket stays, and a client
    /// that connects while no daemon runs waits in the backlog and is answered by the next one.
    @Test func aRestartRefusesNoConnection() throws {
        let directory = temporaryDirectory("gsr")
        let socket = directory + "/g.sock"
        let log = directory + "/daemon.log"
        let listener = ckvm_listen_unix(socket, 16)
        try #require(listener >= 0, "listen: errno \(errno)")
        defer { close(listener) }
        let boundInode = inode(socket)
        let arguments = ["--socket", socket, "--state-dir", directory + "/state", "--config", try writeConfig(directory)]

        let first = try startActivated(descriptor: listener, arguments: arguments, log: log)
        #expect(waitUntil(20) { daemonIsHealthy(socket) }, "the first daemon serves the passed socket")
        let submitted = try UnixHTTPClient.request(socket: socket, method: "POST", path: "/v1/migrations", body: Data(try demoPlan(name: "before-restart").utf8))
        let id = try #require(jsonObject(submitted.body)["id"] as? String, "\(submitted.text)")
        #expect(waitUntil(60) {
            (try? UnixHTTPClient.request(socket: socket, method: "GET", path: "/v1/migrations/\(id)")).map { jsonObject($0.body)["state"] as? String } == "completed"
        })
        first.terminate()
        first.waitUntilExit()
        #expect(first.terminationStatus == 0)
        #expect(inode(socket) == boundInode, "the daemon left the socket in place")

        // No daemon runs now. A client connects and asks; it must wait, not be refused.
        let answer = AnswerBox()
        let client = Thread {
            answer.set(Result { try UnixHTTPClient.request(socket: socket, method: "GET", path: "/v1/migrations", timeout: 30) })
        }
        client.start()
        // An absence can only be watched for a while: half a second with no answer (the
        // client's own timeout is 30 s), then the daemon comes and the answer must follow.
        #expect(!waitUntil(0.5) { answer.get() != nil }, "nobody answers while no daemon runs")

        let second = try startActivated(descriptor: listener, arguments: arguments, log: log)
        defer {
            second.terminate()
            second.waitUntilExit()
        }
        #expect(waitUntil(30) { answer.get() != nil }, "the waiting client is answered by the restarted daemon")
        let result = try #require(try answer.get()?.get())
        #expect(result.status == 200, "\(result.text)")
        let items = (try? JSONSerialization.jsonObject(with: result.body)) as? [[String: Any]] ?? []
        #expect(items.contains { $0["id"] as? String == id && $0["state"] as? String == "completed" }, "the restarted daemon knows the first one's migration: \(result.text)")
        #expect(inode(socket) == boundInode, "the same socket throughout")
    }

    /// Activation that does not add up is refused before the state directory is touched (exit 2,
    /// naming what is wrong); activation meant for another process is ignored.
    @Test func activationMistakesAreRefused() throws {
        let directory = temporaryDirectory("gsm")
        let socket = directory + "/g.sock"
        let config = try writeConfig(directory)
        let listener = ckvm_listen_unix(socket, 16)
        try #require(listener >= 0)
        defer { close(listener) }

        func refused(descriptor: Int32, socketArgument: String, listenFDs: String = "1", _ expected: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
            let log = directory + "/refused-\(UUID().uuidString).log"
            let state = directory + "/state-\(UUID().uuidString)"
            let process = try startActivated(
                descriptor: descriptor, arguments: ["--socket", socketArgument, "--state-dir", state, "--config", config], log: log, listenFDs: listenFDs)
            let exited = waitUntil(20) { !process.isRunning }
            if !exited { process.terminate() }
            process.waitUntilExit()
            #expect(exited, "the daemon refuses to start", sourceLocation: sourceLocation)
            let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
            #expect(process.terminationStatus == 2, "exit 2 (bad input): \(text)", sourceLocation: sourceLocation)
            #expect(text.contains(expected), "\(text)", sourceLocation: sourceLocation)
            #expect(!FileManager.default.fileExists(atPath: state), "nothing was created", sourceLocation: sourceLocation)
        }
        try refused(descriptor: listener, socketArgument: directory + "/other.sock", "ListenStream= and --socket must agree")
        try refused(descriptor: listener, socketArgument: socket, listenFDs: "2", "LISTEN_FDS=2, but the daemon serves exactly one socket")
        let file = open(config, O_RDONLY | O_CLOEXEC)
        defer { close(file) }
        try refused(descriptor: file, socketArgument: socket, "descriptor 3 is not a socket")
        let unbound = socket_fd_unix()
        defer { close(unbound) }
        try refused(descriptor: unbound, socketArgument: socket, "descriptor 3 is not listening")

        // LISTEN_PID names another process: not ours; the daemon binds --socket itself.
        let own = directory + "/own.sock"
        let log = directory + "/own.log"
        let process = try startActivated(
            descriptor: listener, arguments: ["--socket", own, "--state-dir", directory + "/state", "--config", config], log: log, listenPID: "1")
        defer {
            process.terminate()
            process.waitUntilExit()
        }
        #expect(waitUntil(20) { daemonIsHealthy(own) }, "it serves on its own socket")
        let text = try String(contentsOfFile: log, encoding: .utf8)
        #expect(!text.contains("socket-activated"), "\(text)")
    }

    /// The loopback TCP listener: no token 401 with a challenge, a wrong one 401, the right one
    /// serves every route (a submitted migration completes); refusals are logged; the UNIX
    /// socket keeps working.
    @Test func loopbackTCPNeedsTheBearerToken() throws {
        let directory = temporaryDirectory("gtc")
        let tokenFile = directory + "/api-token"
        let token = UUID().uuidString.replacingOccurrences(of: "-", with: "")
        try (token + "\n").write(toFile: tokenFile, atomically: true, encoding: .utf8)
        _ = chmod(tokenFile, 0o600)
        let daemon = try DaemonFixture(config: "tcp: {host: 127.0.0.1, port: 0, tokenFile: \(tokenFile)}", socket: directory + "/g.sock", stateDirectory: directory + "/state")
        defer { daemon.stop() }
        var port = 0
        #expect(waitUntil(10) {
            let log = (try? String(contentsOfFile: daemon.logFile, encoding: .utf8)) ?? ""
            guard let line = log.split(separator: "\n").first(where: { $0.contains("\"message\":\"listening on tcp\"") }) else { return false }
            port = Int(jsonObject(Data(line.utf8))["port"] as? String ?? "") ?? 0
            return port > 0
        }, "the daemon logs the TCP port it got")

        func curl(_ arguments: [String]) throws -> (status: Int, headers: String, body: String) {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: "/usr/bin/curl")
            process.arguments = ["-s", "-D", "-", "-w", "\n%{http_code}"] + arguments
            let out = Pipe()
            process.standardOutput = out
            try process.run()
            let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            process.waitUntilExit()
            let status = Int(text.split(separator: "\n").last ?? "") ?? 0
            let parts = text.components(separatedBy: "\r\n\r\n")
            return (status, parts.first ?? "", parts.dropFirst().joined(separator: "\r\n\r\n"))
        }
        let base = "http://127.0.0.1:\(port)"
        let anonymous = try curl([base + "/v1/migrations"])
        #expect(anonymous.status == 401)
        #expect(anonymous.headers.lowercased().contains("www-authenticate: bearer realm=\"gmigrate\""), "\(anonymous.headers)")
        #expect(anonymous.body.contains("\"code\":\"unauthorized\""))
        let wrong = try curl(["-H", "Authorization: Bearer \(String(token.reversed()))", base + "/v1/migrations"])
        #expect(wrong.status == 401)
        #expect(wrong.headers.contains("error=\"invalid_token\""))
        let prefix = try curl(["-H", "Authorization: Bearer \(token.dropLast())", base + "/healthz"])
        #expect(prefix.status == 401, "a prefix of the token is not the token")
        let longer = try curl(["-H", "Authorization: Bearer \(token)\(String(repeating: "x", count: 256))", base + "/healthz"])
        #expect(longer.status == 401, "the token and 256 more characters is not the token (the length difference is not cut to a byte)")

        let plan = directory + "/plan.yaml"
        try demoPlan(name: "over-tcp").write(toFile: plan, atomically: true, encoding: .utf8)
        let submitted = try curl([
            "-H", "Authorization: Bearer \(token)", "-H", "Content-Type: application/yaml", "--data-binary", "@" + plan, base + "/v1/migrations",
        ])
        #expect(submitted.status == 202, "\(submitted.body)")
        let body = submitted.body.split(separator: "\n").dropLast().joined(separator: "\n")
        let id = try #require(jsonObject(Data(body.utf8))["id"] as? String, "\(submitted.body)")
        #expect(try daemon.waitFinished(id)["state"] as? String == "completed")
        let metrics = try curl(["-H", "authorization: bearer \(token)", base + "/metrics"])
        #expect(metrics.status == 200 && metrics.body.contains("gmigrate_migrations_total"), "the scheme is case-insensitive; every route is served")
        #expect(try daemon.call("GET", "/v1/migrations/\(id)").status == 200, "the UNIX socket serves as before")

        let log = try String(contentsOfFile: daemon.logFile, encoding: .utf8)
        #expect(log.contains("\"reason\":\"no bearer token\"") && log.contains("\"reason\":\"wrong bearer token\""), "refusals are logged")
        #expect(!log.contains(token), "the token never reaches the log")
    }

    /// The token file must be an owner-only regular file with one long word in it; anything else
    /// stops the daemon before it touches its state (exit 2).
    @Test func tokenFileProblemsStopTheDaemon() throws {
        let directory = temporaryDirectory("gtk")
        let tokenFile = directory + "/api-token"
        func start(_ expected: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
            let config = try writeConfig(directory, "tcp: {port: 0, tokenFile: \(tokenFile)}")
            let result = try gmigrate(["daemon", "--socket", directory + "/g.sock", "--state-dir", directory + "/state", "--config", config])
            #expect(result.status == 2, "\(result.stderr)", sourceLocation: sourceLocation)
            #expect(result.stderr.contains(expected), "\(result.stderr)", sourceLocation: sourceLocation)
            #expect(!FileManager.default.fileExists(atPath: directory + "/state"), sourceLocation: sourceLocation)
        }
        try start("\(tokenFile) (tcp.tokenFile): No such file or directory")
        try "0123456789abcdef0123\n".write(toFile: tokenFile, atomically: true, encoding: .utf8)
        _ = chmod(tokenFile, 0o644)
        try start("mode 644 lets others read the token")
        _ = chmod(tokenFile, 0o600)
        try "short\n".write(toFile: tokenFile, atomically: false, encoding: .utf8)
        try start("at least 16 characters")
        try "0123456789abcdef0123\n".write(toFile: tokenFile, atomically: false, encoding: .utf8)
        #expect(chown(tokenFile, 4242, 4242) == 0)
        try start("owned by uid 4242, not by the daemon's uid")
        let bad = try gmigrate(["daemon", "--socket", directory + "/g.sock", "--state-dir", directory + "/state", "--log-format", "xml"])
        #expect(bad.status == 2 && bad.stderr.contains("--log-format: 'xml' is none of text, json"), "\(bad.stderr)")
    }

    /// The configuration names the file, the line and column, and the field of a mistake.
    @Test(arguments: [
        ("allowedUID: [0]\n", "c.yaml:1:1: allowedUID: unknown field"),
        ("allowedUIDs: [root]\n", "c.yaml:1:15: allowedUIDs[0]: expected a non-negative integer"),
        ("logFormat: json\nallowFaults: maybe\n", "c.yaml:2:14: allowFaults: expected true or false"),
        ("backend: kvm\n", "c.yaml:1:10: backend: 'kvm' is none of auto, linux, model"),
        ("vmmSocketDirectories: [run/gmigrate]\n", "c.yaml:1:24: vmmSocketDirectories[0]: 'run/gmigrate' is not an absolute path"),
        ("tcp:\n  host: 0.0.0.0\n  port: 8421\n  tokenFile: /t\n", "c.yaml:2:9: tcp.host: '0.0.0.0' is not a loopback address"),
        ("tcp:\n  port: 8421\n", "c.yaml:2:3: tcp.tokenFile: required"),
        ("tcp:\n  port: 70000\n  tokenFile: /t\n", "c.yaml:2:9: tcp.port: 70000 is not a TCP port"),
        ("tcp:\n  port: 1\n  tokenFile: /t\n  bind: x\n", "c.yaml:4:3: tcp.bind: unknown field"),
        ("- 1\n", "c.yaml:1:1: (top level): expected a mapping"),
    ])
    func configurationErrorsNameThePlace(text: String, expected: String) {
        #expect(throws: ConfigError.self) { try DaemonConfig.parse(text, file: "c.yaml") }
        do {
            _ = try DaemonConfig.parse(text, file: "c.yaml")
        } catch {
            #expect(error.message.hasPrefix(expected), "\(error.message)")
        }
    }

    @Test func aGoodConfigurationParses() throws {
        let config = try DaemonConfig.parse(
            "allowedGIDs: [100]\ntcp:\n  host: 127.0.0.2\n  port: 8421\n  tokenFile: /etc/gmigrate/api-token\n", file: "c.yaml")
        #expect(config.allowedUIDs == [0], "defaults stay")
        #expect(config.allowedGIDs == [100])
        #expect(config.tcp == TCPListenerConfig(host: "127.0.0.2", port: 8421, tokenFile: "/etc/gmigrate/api-token"))
        #expect(try DaemonConfig.load(path: repositoryRoot + "/dist/config.yaml").logFormat == "json", "the shipped configuration parses")
    }

    /// The units in dist/ pass systemd's own checker, and the socket unit's path is the one the
    /// service's daemon is told (it refuses to start otherwise).
    @Test func systemdUnitsVerify() throws {
        let analyze = "/usr/bin/systemd-analyze"
        try #require(FileManager.default.isExecutableFile(atPath: analyze), "systemd-analyze (package systemd; tools/setup.sh installs it)")
        let directory = temporaryDirectory("gun")
        let service = try String(contentsOfFile: repositoryRoot + "/dist/gmigrate.service", encoding: .utf8)
        let socketUnit = try String(contentsOfFile: repositoryRoot + "/dist/gmigrate.socket", encoding: .utf8)
        // The checker insists that ExecStart's binary exists: point it at the one we built.
        try service.replacingOccurrences(of: "/usr/local/bin/gmigrate", with: try executable("gmigrate"))
            .write(toFile: directory + "/gmigrate.service", atomically: true, encoding: .utf8)
        try socketUnit.write(toFile: directory + "/gmigrate.socket", atomically: true, encoding: .utf8)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: analyze)
        process.arguments = ["verify", "--man=no", directory + "/gmigrate.socket", directory + "/gmigrate.service"]
        let errors = Pipe()
        process.standardError = errors
        process.standardOutput = errors
        try process.run()
        let output = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        #expect(process.terminationStatus == 0 && output.isEmpty, "systemd-analyze verify: \(output)")

        func value(_ key: String, in unit: String) -> String? {
            unit.split(separator: "\n").first { $0.hasPrefix(key + "=") }.map { String($0.dropFirst(key.count + 1)) }
        }
        let listen = try #require(value("ListenStream", in: socketUnit))
        let exec = try #require(value("ExecStart", in: service))
        #expect(exec.contains("--socket \(listen) "), "ExecStart's --socket is the socket unit's ListenStream= (\(listen))")
        #expect(value("SocketMode", in: socketUnit) == "0660")
        #expect(value("Requires", in: service) == "gmigrate.socket")
    }
}

/// A UNIX stream socket that is neither bound nor listening.
private func socket_fd_unix() -> Int32 { socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }

/// The answer a client thread got, read from the test.
private final class AnswerBox: @unchecked Sendable {
    // @unchecked: guarded by `lock`.
    private let lock = NSLock()
    private var result: Result<HTTPResult, any Error>?
    func set(_ value: Result<HTTPResult, any Error>) { lock.withLock { result = value } }
    func get() -> Result<HTTPResult, any Error>? { lock.withLock { result } }
}
