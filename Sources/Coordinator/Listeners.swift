import CKVM
import Foundation
import HummingbirdCore
import Kernel
import Logging
import NIOCore
import NIOExtras
import NIOPosix
import ServiceLifecycle

#if canImport(Glibc)
import Glibc
#endif

/// Where the daemon listens, checked before it touches its state directory: a mistake here
/// (activation that disagrees with --socket, a bad token file) changes nothing.
public struct DaemonListeners: Sendable {
    /// The UNIX socket's path (also the name of its `.lock`).
    public var socket: String
    /// The socket systemd passed, bound to `socket`; nil: the daemon binds `socket` itself.
    public var activation: SocketActivation?
    /// The loopback TCP listener's token, when the configuration has a `tcp` section.
    public var token: BearerToken?

    /// `socket` nil: the activated socket's path, else the default.
    public static func prepare(socket: String?, activation: SocketActivation?, config: DaemonConfig, defaultSocket: String) throws(ConfigError) -> DaemonListeners {
        let path = socket ?? activation?.path ?? defaultSocket
        if let activation, activation.path != path {
            throw ConfigError(message: "socket activation: the socket systemd passed is bound to \(activation.path), but --socket is \(path) (ListenStream= and --socket must agree)")
        }
        let token = try config.tcp.map { tcp throws(ConfigError) in try BearerToken.load(path: tcp.tokenFile) }
        return DaemonListeners(socket: path, activation: activation, token: token)
    }
}

/// The listening socket systemd hands over when `gmigrate.socket` starts the daemon
/// (sd_listen_fds(3): `LISTEN_PID`, `LISTEN_FDS`, descriptors from 3). With it the socket
/// outlives the daemon: clients that connect while it restarts wait in the backlog instead of
/// being refused.
public struct SocketActivation: Sendable, Equatable {
    /// The inherited listening descriptor (3).
    public var descriptor: Int32
    /// The path it is bound to.
    public var path: String

    /// The first descriptor systemd passes (SD_LISTEN_FDS_START).
    static let firstDescriptor: Int32 = 3

    /// Reads and then unsets `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` (so the VMM
    /// processes the daemon spawns do not believe they were activated). Nil when they are absent
    /// or meant for another process; an error when they promise something the descriptors are not:
    /// the daemon serves one UNIX stream socket, so exactly one must be passed.
    public static func fromEnvironment() throws(ConfigError) -> SocketActivation? {
        let environment = ProcessInfo.processInfo.environment
        defer {
            unsetenv("LISTEN_PID")
            unsetenv("LISTEN_FDS")
            unsetenv("LISTEN_FDNAMES")
        }
        guard let pidText = environment["LISTEN_PID"], let countText = environment["LISTEN_FDS"] else { return nil }
        guard let pid = Int32(pidText), pid == getpid() else { return nil }
        guard let count = Int32(countText), count >= 0 else {
            throw ConfigError(message: "socket activation: LISTEN_FDS=\(countText) is not a descriptor count")
        }
        guard count == 1 else {
            throw ConfigError(message: "socket activation: LISTEN_FDS=\(count), but the daemon serves exactly one socket (one ListenStream= in gmigrate.socket)")
        }
        return try inspect(descriptor: firstDescriptor)
    }

    /// Checks that `descriptor` is a listening UNIX stream socket bound to a path, and marks it close-on-exec.
    public static func inspect(descriptor: Int32) throws(ConfigError) -> SocketActivation {
        var buffer = [CChar](repeating: 0, count: 128)
        guard ckvm_listening_unix_path(descriptor, &buffer, UInt(buffer.count)) == 0 else {
            let code = errno
            let what = switch code {
            case EBADF: "is not open"
            case ENOTSOCK: "is not a socket"
            case ESOCKTNOSUPPORT: "is not a stream socket (ListenStream=)"
            case EINVAL: "is not listening"
            case EAFNOSUPPORT: "is not a UNIX socket (ListenStream= must name a path)"
            case EDESTADDRREQ: "has no path (abstract or unnamed)"
            default: "cannot be inspected: \(Errno(rawValue: code).message) (\(Errno(rawValue: code).name))"
            }
            throw ConfigError(message: "socket activation: descriptor \(descriptor) \(what)")
        }
        let path = String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return SocketActivation(descriptor: descriptor, path: path)
    }
}

/// The loopback TCP listener's bearer token, read once at start from a file that only its owner
/// may read (like ssh's private keys: a group- or world-readable token is refused).
public struct BearerToken: Sendable {
    let bytes: [UInt8]

    public static func load(path: String) throws(ConfigError) -> BearerToken {
        var status = stat()
        guard stat(path, &status) == 0 else {
            let error = Errno.current
            throw ConfigError(message: "\(path) (tcp.tokenFile): \(error.message) (\(error.name))")
        }
        guard status.st_mode & S_IFMT == S_IFREG else {
            throw ConfigError(message: "\(path) (tcp.tokenFile): not a regular file")
        }
        guard status.st_uid == geteuid() else {
            throw ConfigError(message: "\(path) (tcp.tokenFile): owned by uid \(status.st_uid), not by the daemon's uid \(geteuid()); another user could have chosen the token")
        }
        guard status.st_mode & 0o077 == 0 else {
            throw ConfigError(message: "\(path) (tcp.tokenFile): mode \(String(status.st_mode & 0o777, radix: 8)) lets others read the token; chmod 600 it")
        }
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
            throw ConfigError(message: "\(path) (tcp.tokenFile): cannot read it as UTF-8 text")
        }
        let token = text.trimmingCharacters(in: .whitespacesAndNewlines)
        guard token.utf8.count >= 16, !token.contains(where: { $0.isWhitespace }) else {
            throw ConfigError(message: "\(path) (tcp.tokenFile): the token must be one word of at least 16 characters (e.g. `openssl rand -hex 32`)")
        }
        return BearerToken(bytes: Array(token.utf8))
    }

    /// Whether an `Authorization` header carries this token; compares in constant time.
    func accepts(authorization: String?) -> Bool {
        guard let authorization else { return false }
        let prefix = "bearer "
        guard authorization.count > prefix.count, authorization.prefix(prefix.count).lowercased() == prefix else { return false }
        let offered = Array(authorization.dropFirst(prefix.count).utf8)
        // The lengths compared in full (a difference truncated to a byte let 256·k extra
        // characters through), then every byte of the token, whatever the offered length.
        var difference = offered.count == bytes.count ? 0 : 1
        for index in 0..<bytes.count {
            difference |= Int(bytes[index] ^ (index < offered.count ? offered[index] : 0))
        }
        return difference == 0
    }
}

/// Serves HTTP on a listening socket someone else bound: systemd's, under socket activation.
/// HummingbirdCore's `Server` only binds a path or a port itself, so this is its counterpart for
/// a descriptor: the same child channel (HTTP/1.1 and our responder), the same quiescing on
/// graceful shutdown. Closing it closes only our copy of the descriptor; systemd keeps the socket.
struct InheritedSocketServer<ChildChannel: ServerChildChannel>: Service {
    let descriptor: Int32
    let childChannel: ChildChannel
    let logger: Logger
    let onServerRunning: @Sendable () async -> Void

    func run() async throws {
        let group = MultiThreadedEventLoopGroup.singleton
        let quiescing = ServerQuiescingHelper(group: group)
        let server = try await ServerBootstrap(group: group)
            .serverChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(quiescing.makeServerChannelHandler(channel: channel))
                }
            }
            .childChannelOption(ChannelOptions.allowRemoteHalfClosure, value: true)
            .bind(descriptor, serverBackPressureStrategy: nil) { channel in
                childChannel.setup(channel: channel, logger: logger)
            }
        await withGracefulShutdownHandler {
            await onServerRunning()
            await withDiscardingTaskGroup { tasks in
                do {
                    try await server.executeThenClose { inbound in
                        for try await child in inbound {
                            tasks.addTask { await childChannel.handle(value: child, logger: logger) }
                        }
                    }
                } catch {
                    logger.error("accepting on the inherited socket: \(error)")
                }
            }
        } onGracefulShutdown: {
            quiescing.initiateShutdown(promise: nil)
        }
    }
}
