import ArgumentParser
import Coordinator
import Foundation
import Logging

struct Daemon: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve the coordinator's HTTP API on a UNIX socket (docs/openapi.yaml).",
        discussion: "It binds --socket itself, or serves the socket systemd passes (LISTEN_FDS, dist/gmigrate.socket), and optionally a loopback TCP port with a bearer token (the configuration's tcp section). At start it recovers every unfinished migration from the journal, then accepts requests. SIGTERM stops accepting, cancels migrations that have not passed their point of no return, waits for the rest, and exits 0.")

    @Option(help: "The UNIX socket to serve on (mode 0660); under socket activation, the path of the socket systemd passes. (default: /run/gmigrate/gmigrate.sock)")
    var socket: String?

    @Option(help: "The state directory: journals and the lock.")
    var stateDir: String = "/var/lib/gmigrate"

    @Option(help: "The configuration file (YAML or JSON): allowed uids and gids, VMM socket directories, ...")
    var config: String?

    @Option(help: "text or json (JSON lines); overrides the configuration's logFormat.")
    var logFormat: String?

    func run() async throws {
        // First, before anything spawns a process: the socket systemd may have passed.
        let activation: SocketActivation?
        do { activation = try SocketActivation.fromEnvironment() } catch { throw CommandFailure(code: .badInput, message: "\(error)") }
        var settings = DaemonConfig()
        if let config {
            do { settings = try DaemonConfig.load(path: config) } catch { throw CommandFailure(code: .badInput, message: "\(error)") }
        }
        let format = logFormat ?? settings.logFormat
        guard ["text", "json"].contains(format) else {
            throw CommandFailure(code: .badInput, message: "--log-format: '\(format)' is none of text, json")
        }
        var logger = Logger(label: "gmigrate.daemon") { label -> any LogHandler in
            format == "json" ? JSONLogHandler(label: label) : StreamLogHandler.standardError(label: label)
        }
        logger.logLevel = .info
        let listeners: DaemonListeners
        do {
            listeners = try DaemonListeners.prepare(socket: socket, activation: activation, config: settings, defaultSocket: Daemon.defaultSocket)
        } catch {
            throw CommandFailure(code: .badInput, message: "\(error)")
        }
        try FileManager.default.createDirectory(atPath: (listeners.socket as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        let core: CoordinatorCore
        do {
            core = try CoordinatorCore(stateDirectory: stateDir, config: settings, logger: logger)
        } catch {
            throw CommandFailure(code: .stateDirectoryLocked, message: "\(error)")
        }
        do {
            try await DaemonServer.run(listeners: listeners, core: core, logger: logger)
        } catch let error as SocketInUse {
            throw CommandFailure(code: .stateDirectoryLocked, message: "\(error)")
        } catch let error as SocketPathTaken {
            throw CommandFailure(code: .badInput, message: "\(error)")
        }
    }

    static let defaultSocket = "/run/gmigrate/gmigrate.sock"
}

/// Shared by the client commands.
struct ClientOptions: ParsableArguments {
    @Option(help: "The daemon's socket.")
    var socket: String = "/run/gmigrate/gmigrate.sock"

    @Flag(help: "Print the daemon's JSON as it is.")
    var json = false

    func call(_ method: String, _ path: String, headers: [String: String] = [:], body: Data? = nil) throws -> HTTPResult {
        let result: HTTPResult
        do {
            result = try UnixHTTPClient.request(socket: socket, method: method, path: path, headers: headers, body: body)
        } catch {
            throw CommandFailure(code: .daemonUnreachable, message: "\(error)")
        }
        if result.status >= 400 {
            if json { print(result.text) }
            let object = (try? JSONSerialization.jsonObject(with: result.body)) as? [String: Any]
            var message = "the daemon answered \(result.status): \(object?["title"] as? String ?? "error"): \(object?["detail"] as? String ?? result.text)"
            for diagnostic in (object?["diagnostics"] as? [[String: Any]]) ?? [] {
                message += "\n  \(diagnostic["path"] as? String ?? ""): \(diagnostic["code"] as? String ?? ""): \(diagnostic["message"] as? String ?? "")"
            }
            throw CommandFailure(code: .daemonRefused, message: message)
        }
        return result
    }
}

func describeMigration(_ object: [String: Any]) -> String {
    let steps = (object["steps"] as? [[String: Any]]) ?? []
    var text = "\(object["id"] as? String ?? "?")  \(object["plan"] as? String ?? "?")  \(object["state"] as? String ?? "?")"
    if let strategy = object["strategy"] as? String { text += "  strategy \(strategy)" }
    text += "  \(steps.count) steps"
    if let blackout = object["blackoutNanoseconds"] as? Int { text += "  blackout \(milliseconds(Int64(blackout)))" }
    if let reason = object["reason"] as? String { text += "  (\(reason))" }
    return text
}

struct Submit: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Submit a plan to the daemon; prints the migration's id.")
    @Argument(help: "The plan (YAML or JSON).") var plan: String
    @Option(help: "Makes a retried submission return the same migration.") var idempotencyKey: String?
    @OptionGroup var client: ClientOptions

    func run() throws {
        guard let body = FileManager.default.contents(atPath: plan) else { throw CommandFailure(code: .badInput, message: "\(plan): cannot read the file") }
        let result = try client.call("POST", "/v1/migrations", headers: idempotencyKey.map { ["Idempotency-Key": $0] } ?? [:], body: body)
        if client.json { print(result.text); return }
        let object = (try? JSONSerialization.jsonObject(with: result.body)) as? [String: Any] ?? [:]
        print(object["id"] as? String ?? result.text)
    }
}

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "One migration (state, steps, strategy, blackout), or the daemon's health.")
    @Argument(help: "The migration's id; without it, the daemon's health and host.") var id: String?
    @OptionGroup var client: ClientOptions

    func run() throws {
        guard let id else {
            let health = try client.call("GET", "/healthz")
            let host = try client.call("GET", "/v1/host")
            if client.json { print(host.text); return }
            print("daemon at \(client.socket): \(health.text)")
            return
        }
        let result = try client.call("GET", "/v1/migrations/\(id)")
        if client.json { print(result.text); return }
        let object = (try? JSONSerialization.jsonObject(with: result.body)) as? [String: Any] ?? [:]
        print(describeMigration(object))
        for step in (object["steps"] as? [[String: Any]]) ?? [] {
            let name = ((step["direction"] as? String) == "undo" ? "undo " : "") + (step["step"] as? String ?? "")
            print("  \(name.padding(toLength: 24, withPad: " ", startingAt: 0)) \((step["ok"] as? Bool) == true ? "ok" : "FAILED")  \(milliseconds(Int64(step["durationNanoseconds"] as? Int ?? 0)))")
        }
    }
}

struct List: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "The daemon's migrations, a line each.")
    @Option(help: "Only migrations in this state (running, completed, rolled-back, ...).") var state: String?
    @OptionGroup var client: ClientOptions

    func run() throws {
        let result = try client.call("GET", "/v1/migrations" + (state.map { "?state=\($0)" } ?? ""))
        if client.json { print(result.text); return }
        for object in ((try? JSONSerialization.jsonObject(with: result.body)) as? [[String: Any]]) ?? [] { print(describeMigration(object)) }
    }
}

struct Cancel: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Cancel a migration before its point of no return (refused after it).")
    @Argument(help: "The migration's id.") var id: String
    @OptionGroup var client: ClientOptions

    func run() throws {
        let result = try client.call("POST", "/v1/migrations/\(id)/cancel")
        if client.json { print(result.text); return }
        print("cancel requested for \(id): it rolls back at its next step")
    }
}

struct Watch: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Follow a migration's steps live until it finishes.")
    @Argument(help: "The migration's id.") var id: String
    @OptionGroup var client: ClientOptions

    func run() throws {
        var final = ""
        let json = client.json
        let status: Int
        do {
            status = try UnixHTTPClient.events(socket: client.socket, path: "/v1/migrations/\(id)/events") { kind, data in
                if json { print(data); return }
                let object = (try? JSONSerialization.jsonObject(with: Data(data.utf8))) as? [String: Any] ?? [:]
                switch kind {
                case "step":
                    let step = object["step"] as? [String: Any] ?? [:]
                    let name = ((step["direction"] as? String) == "undo" ? "undo " : "") + (step["step"] as? String ?? "")
                    print("  \(name.padding(toLength: 24, withPad: " ", startingAt: 0)) \((step["ok"] as? Bool) == true ? "ok" : "FAILED")  \(milliseconds(Int64(step["durationNanoseconds"] as? Int ?? 0)))")
                case "finished":
                    final = object["state"] as? String ?? ""
                    print("\(final)\((object["reason"] as? String).map { ": \($0)" } ?? "")")
                default:
                    print("[\(object["state"] as? String ?? "")]\((object["reason"] as? String).map { " \($0)" } ?? "")")
                }
            }
        } catch {
            throw CommandFailure(code: .daemonUnreachable, message: "\(error)")
        }
        if status >= 400 { throw CommandFailure(code: .daemonRefused, message: "the daemon answered \(status) for \(id)") }
        if final != "completed" { throw ExitCode(GmigrateExitCode.rolledBack.rawValue) }
    }
}
