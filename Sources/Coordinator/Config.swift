import Foundation
import Yams

/// The daemon's configuration file (YAML or JSON). Every field is optional.
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

    public init() {}

    enum CodingKeys: String, CodingKey {
        case allowedUIDs, allowedGIDs, socketGroup, vmmSocketDirectories, backend, allowFaults, maxBodyBytes, logFormat
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
    }

    /// Reads a configuration file; a bad one is an error naming the file.
    public static func load(path: String) throws -> DaemonConfig {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
            throw ConfigError(message: "\(path): cannot read the file")
        }
        do {
            return try YAMLDecoder().decode(DaemonConfig.self, from: text)
        } catch {
            throw ConfigError(message: "\(path): \(error)")
        }
    }
}

public struct ConfigError: Error, CustomStringConvertible {
    public var message: String
    public var description: String { message }
}
