import Foundation
import Yams

/// The daemon's configuration file (YAML or JSON). Every field is optional; an unknown field is
/// an error (a misspelt `allowedUID` must not silently leave the default in force).
///
/// ```yaml
/// allowedUIDs: [0]            # who may use the API (SO_PEERCRED); root by default
/// allowedGIDs: []             # or any member of these groups
/// socketGroup: 0              # the group the socket (mode 0660) belongs to
/// vmmSocketDirectories: [/run/gmigrate]   # plans may name VMM sockets only under these
/// backend: auto               # auto | linux | model (in-process plans)
/// allowFaults: false          # honour plans' spec.faults (test suites only)
/// maxBodyBytes: 1048576
/// logFormat: text             # text | json (JSON lines)
/// maxConnections: 64          # per listener (UNIX socket, TCP): beyond it a connection is closed at once
/// headerTimeoutSeconds: 10    # a request's head must arrive within this
/// idleTimeoutSeconds: 60      # a connection with no request for this long is closed
/// drainSeconds: 30            # SIGTERM waits at most this for running migrations (recovery takes them up)
/// keepFinishedJournals: 1000  # the newest finished migrations kept; older journals are deleted
/// tcp:                        # optional: also serve on a loopback TCP port
///   host: 127.0.0.1           #   127.0.0.0/8, ::1 or localhost only
///   port: 8421                #   0 = any free port (logged)
///   tokenFile: /etc/gmigrate/api-token   # every request needs `Authorization: Bearer <token>`
/// ```
public struct DaemonConfig: Codable, Sendable, Equatable {
    public var allowedUIDs: [UInt32] = [0]
    public var allowedGIDs: [UInt32] = []
    public var socketGroup: UInt32?
    public var vmmSocketDirectories: [String] = ["/run/gmigrate"]
    public var backend: String = "auto"
    public var allowFaults: Bool = false
    public var maxBodyBytes: Int = 1 << 20
    public var logFormat: String = "text"
    public var maxConnections: Int = 64
    public var headerTimeoutSeconds: Int = 10
    public var idleTimeoutSeconds: Int = 60
    public var drainSeconds: Int = 30
    public var keepFinishedJournals: Int = 1000
    public var tcp: TCPListenerConfig?

    public init() {}

    enum CodingKeys: String, CodingKey, CaseIterable {
        case allowedUIDs, allowedGIDs, socketGroup, vmmSocketDirectories, backend, allowFaults, maxBodyBytes, logFormat, maxConnections
        case headerTimeoutSeconds, idleTimeoutSeconds, drainSeconds, keepFinishedJournals, tcp
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        let defaults = DaemonConfig()
        allowedUIDs = try container.decodeIfPresent([UInt32].self, forKey: .allowedUIDs) ?? defaults.allowedUIDs
        allowedGIDs = try container.decodeIfPresent([UInt32].self, forKey: .allowedGIDs) ?? defaults.allowedGIDs
        socketGroup = try container.decodeIfPresent(UInt32.self, forKey: .socketGroup)
        vmmSocketDirectories = try container.decodeIfPresent([String].self, forKey: .vmmSocketDirectories) ?? defaults.vmmSocketDirectories
        backend = try container.decodeIfPresent(String.self, forKey: .backend) ?? defaults.backend
        allowFaults = try container.decodeIfPresent(Bool.self, forKey: .allowFaults) ?? defaults.allowFaults
        maxBodyBytes = try container.decodeIfPresent(Int.self, forKey: .maxBodyBytes) ?? defaults.maxBodyBytes
        logFormat = try container.decodeIfPresent(String.self, forKey: .logFormat) ?? defaults.logFormat
        maxConnections = try container.decodeIfPresent(Int.self, forKey: .maxConnections) ?? defaults.maxConnections
        headerTimeoutSeconds = try container.decodeIfPresent(Int.self, forKey: .headerTimeoutSeconds) ?? defaults.headerTimeoutSeconds
        idleTimeoutSeconds = try container.decodeIfPresent(Int.self, forKey: .idleTimeoutSeconds) ?? defaults.idleTimeoutSeconds
        drainSeconds = try container.decodeIfPresent(Int.self, forKey: .drainSeconds) ?? defaults.drainSeconds
        keepFinishedJournals = try container.decodeIfPresent(Int.self, forKey: .keepFinishedJournals) ?? defaults.keepFinishedJournals
        tcp = try container.decodeIfPresent(TCPListenerConfig.self, forKey: .tcp)
    }

    /// Reads a configuration file; a bad one is an error naming the file, the line and the field.
    public static func load(path: String) throws(ConfigError) -> DaemonConfig {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
            throw ConfigError(message: "\(path): cannot read the file")
        }
        return try parse(text, file: path)
    }

    /// Parses and checks a configuration text; `file` names it in errors.
    public static func parse(_ text: String, file: String) throws(ConfigError) -> DaemonConfig {
        let root: Node
        do {
            guard let node = try Yams.compose(yaml: text) else { return DaemonConfig() }
            root = node
        } catch {
            throw ConfigError(message: "\(file): not YAML or JSON: \(error)")
        }
        func place(_ node: Node?, _ field: String) -> String {
            guard let mark = node?.mark else { return "\(file): \(field)" }
            return "\(file):\(mark.line):\(mark.column): \(field)"
        }
        func checkKeys(_ node: Node, allowed: [String], prefix: String) throws(ConfigError) {
            guard let mapping = node.mapping else {
                throw ConfigError(message: "\(place(node, prefix.isEmpty ? "(top level)" : String(prefix.dropLast()))): expected a mapping")
            }
            for (key, _) in mapping {
                let name = key.string ?? "\(key)"
                if !allowed.contains(name) {
                    throw ConfigError(message: "\(place(key, prefix + name)): unknown field (known: \(allowed.joined(separator: ", ")))")
                }
            }
        }
        try checkKeys(root, allowed: CodingKeys.allCases.map(\.rawValue), prefix: "")
        let tcpNode = root.mapping?["tcp"]
        if let tcpNode { try checkKeys(tcpNode, allowed: TCPListenerConfig.CodingKeys.allCases.map(\.rawValue), prefix: "tcp.") }

        /// The node at a decoding error's coding path, for its line.
        func node(at path: [any CodingKey]) -> Node? {
            var current: Node? = root
            for key in path {
                if let index = key.intValue { current = current?.sequence.flatMap { index < $0.count ? $0[index] : nil } }
                else { current = current?.mapping?[key.stringValue] }
            }
            return current
        }
        func fieldPath(_ path: [any CodingKey]) -> String {
            path.map { $0.intValue.map { "[\($0)]" } ?? ".\($0.stringValue)" }.joined().drop { $0 == "." }.description
        }
        let config: DaemonConfig
        do {
            config = try YAMLDecoder().decode(DaemonConfig.self, from: root)
        } catch let DecodingError.typeMismatch(type, context) {
            throw ConfigError(message: "\(place(node(at: context.codingPath), fieldPath(context.codingPath))): expected \(typeName(type))")
        } catch let DecodingError.dataCorrupted(context) {
            throw ConfigError(message: "\(place(node(at: context.codingPath), fieldPath(context.codingPath))): \(context.debugDescription)")
        } catch let DecodingError.keyNotFound(key, context) {
            let path = context.codingPath + [key]
            throw ConfigError(message: "\(place(node(at: context.codingPath), fieldPath(path))): required")
        } catch let DecodingError.valueNotFound(type, context) {
            throw ConfigError(message: "\(place(node(at: context.codingPath), fieldPath(context.codingPath))): expected \(typeName(type)), found null")
        } catch {
            throw ConfigError(message: "\(file): \(error)")
        }
        // Values the types alone do not rule out.
        if !["auto", "linux", "model"].contains(config.backend) {
            throw ConfigError(message: "\(place(root.mapping?["backend"], "backend")): '\(config.backend)' is none of auto, linux, model")
        }
        if !["text", "json"].contains(config.logFormat) {
            throw ConfigError(message: "\(place(root.mapping?["logFormat"], "logFormat")): '\(config.logFormat)' is none of text, json")
        }
        if config.maxBodyBytes < 1024 {
            throw ConfigError(message: "\(place(root.mapping?["maxBodyBytes"], "maxBodyBytes")): \(config.maxBodyBytes) is below 1024 bytes")
        }
        for (field, value, range) in [
            ("maxConnections", config.maxConnections, 1...65536), ("headerTimeoutSeconds", config.headerTimeoutSeconds, 1...3600),
            ("idleTimeoutSeconds", config.idleTimeoutSeconds, 1...86400), ("drainSeconds", config.drainSeconds, 0...86400),
            ("keepFinishedJournals", config.keepFinishedJournals, 1...1_000_000),
        ] where !range.contains(value) {
            throw ConfigError(message: "\(place(root.mapping?[field], field)): \(value) is outside \(range.lowerBound)...\(range.upperBound)")
        }
        for (index, directory) in config.vmmSocketDirectories.enumerated() where !directory.hasPrefix("/") {
            throw ConfigError(message: "\(place(root.mapping?["vmmSocketDirectories"]?.sequence?[index], "vmmSocketDirectories[\(index)]")): '\(directory)' is not an absolute path")
        }
        if let tcp = config.tcp {
            let fields = tcpNode?.mapping
            if !TCPListenerConfig.isLoopback(tcp.host) {
                throw ConfigError(message: "\(place(fields?["host"], "tcp.host")): '\(tcp.host)' is not a loopback address (127.0.0.0/8, ::1, localhost): the token travels in clear text")
            }
            if !(0...65535).contains(tcp.port) {
                throw ConfigError(message: "\(place(fields?["port"], "tcp.port")): \(tcp.port) is not a TCP port (0 to 65535; 0 picks a free one)")
            }
            if !tcp.tokenFile.hasPrefix("/") {
                throw ConfigError(message: "\(place(fields?["tokenFile"], "tcp.tokenFile")): '\(tcp.tokenFile)' is not an absolute path")
            }
        }
        return config
    }

    private static func typeName(_ type: Any.Type) -> String {
        switch type {
        case is Bool.Type: "true or false"
        case is String.Type: "a string"
        case is Int.Type, is UInt32.Type: "a non-negative integer"
        case is [UInt32].Type: "a list of non-negative integers"
        case is [String].Type: "a list of strings"
        default: "\(type)"
        }
    }
}

/// The optional loopback TCP listener. Its requests carry a bearer token read from `tokenFile`
/// (SO_PEERCRED means nothing on TCP), so the file must be readable by its owner only.
public struct TCPListenerConfig: Codable, Sendable, Equatable {
    public var host: String = "127.0.0.1"
    public var port: Int
    public var tokenFile: String

    enum CodingKeys: String, CodingKey, CaseIterable { case host, port, tokenFile }

    public init(host: String = "127.0.0.1", port: Int, tokenFile: String) {
        self.host = host
        self.port = port
        self.tokenFile = tokenFile
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        host = try container.decodeIfPresent(String.self, forKey: .host) ?? "127.0.0.1"
        port = try container.decode(Int.self, forKey: .port)
        tokenFile = try container.decode(String.self, forKey: .tokenFile)
    }

    /// 127.0.0.0/8, ::1 and localhost: the only hosts a bearer token in clear text may be offered on.
    static func isLoopback(_ host: String) -> Bool {
        if host == "localhost" || host == "::1" { return true }
        let parts = host.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 4, parts.allSatisfy({ UInt8($0) != nil }) else { return false }
        return parts[0] == "127"
    }
}

/// A configuration, socket-activation or token file problem; the message names the place.
public struct ConfigError: Error, CustomStringConvertible {
    public var message: String
    public var description: String { message }
    public init(message: String) { self.message = message }
}

/// The daemon's socket path holds something it must not replace: another program's live
/// socket (EADDRINUSE), or something that is not a socket (EEXIST).
public struct SocketPathTaken: Error, CustomStringConvertible {
    public var socket: String
    public var errno: Int32
    public var description: String {
        switch errno {
        case EADDRINUSE: "\(socket): another program listens on this socket; refusing to replace it"
        case EEXIST: "\(socket) exists and is not a socket; refusing to replace it"
        default: "\(socket): \(String(cString: strerror(errno)))"
        }
    }
}

/// Another daemon serves this socket already.
public struct SocketInUse: Error, CustomStringConvertible {
    public var socket: String
    public var description: String { "\(socket) is in use by another daemon" }
}
