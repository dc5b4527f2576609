import CKVM
import Foundation
import Hummingbird
import HummingbirdCore
import Journal
import Kernel
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import Orchestrator
import Plans
import ServiceLifecycle

#if canImport(Glibc)
import Glibc
#endif

/// `struct ucred`, as SO_PEERCRED returns it.
struct PeerCredential: Sendable {
    var pid: Int32 = 0
    var uid: UInt32 = 0
    var gid: UInt32 = 0
}

/// The request context: the connection's channel, for its peer's credentials.
struct DaemonContext: RequestContext {
    var coreContext: CoreRequestContextStorage
    let channel: any Channel
    var peer: PeerCredential?

    init(source: ApplicationRequestContextSource) {
        coreContext = .init(source: source)
        channel = source.channel
    }

    /// Request bodies are bounded (the daemon also enforces the configured limit).
    var maxUploadSize: Int { 16 << 20 }
}

/// A problem document (RFC 9457 style), with the validator's codes where they apply.
struct ProblemDocument: Codable, Sendable {
    var type: String
    var title: String
    var status: Int
    var detail: String
    var code: String
    var diagnostics: [PlanDiagnostic]?
}

func problemResponse(_ problem: CoordinatorProblem) -> Response {
    let document = ProblemDocument(
        type: "urn:gmigrate:problem:\(problem.code)", title: problem.title, status: problem.status, detail: problem.detail,
        code: problem.code, diagnostics: problem.diagnostics.isEmpty ? nil : problem.diagnostics)
    return jsonResponse(document, status: HTTPResponse.Status(code: problem.status), contentType: "application/problem+json")
}

func jsonResponse<T: Encodable>(_ value: T, status: HTTPResponse.Status = .ok, contentType: String = "application/json") -> Response {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys]
    let data = (try? encoder.encode(value)) ?? Data("{}".utf8)
    var headers = HTTPFields()
    headers[.contentType] = contentType
    return Response(status: status, headers: headers, body: .init(byteBuffer: ByteBuffer(bytes: data)))
}

/// Who may call: on the UNIX socket, SO_PEERCRED against the configured uids and gids (403
/// otherwise); on the loopback TCP listener, the bearer token (401 otherwise). Refusals are logged.
struct AuthorizationMiddleware: RouterMiddleware {
    typealias Context = DaemonContext
    let allowedUIDs: Set<UInt32>
    let allowedGIDs: Set<UInt32>
    let token: BearerToken?
    let logger: Logger

    func handle(_ request: Request, context: DaemonContext, next: (Request, DaemonContext) async throws -> Response) async throws -> Response {
        var context = context
        switch context.channel.localAddress {
        case .unixDomainSocket?:
            break
        case let address?:
            // TCP: only the loopback listener exists, and it needs the token.
            guard let token, token.accepts(authorization: request.headers[.authorization]) else {
                let offered = request.headers[.authorization] != nil
                logger.warning("refused", metadata: ["remote": "\(context.channel.remoteAddress?.ipAddress ?? "?"):\(context.channel.remoteAddress?.port ?? 0)", "local": "\(address.ipAddress ?? "?"):\(address.port ?? 0)", "path": "\(request.uri.path)", "reason": "\(offered ? "wrong" : "no") bearer token"])
                var response = problemResponse(CoordinatorProblem(
                    status: 401, code: "unauthorized", title: "Unauthorized",
                    detail: offered ? "the bearer token is not the one in the daemon's tcp.tokenFile" : "the TCP listener needs `Authorization: Bearer <token>` (tcp.tokenFile)"))
                response.headers[.wwwAuthenticate] = offered ? "Bearer realm=\"gmigrate\", error=\"invalid_token\"" : "Bearer realm=\"gmigrate\""
                return response
            }
            return try await next(request, context)
        case nil:
            return problemResponse(CoordinatorProblem(status: 403, code: "forbidden", title: "Forbidden", detail: "the connection has no local address"))
        }
        guard let provider = context.channel as? any SocketOptionProvider,
            let credential: PeerCredential = try? await provider.unsafeGetSocketOption(
                level: SocketOptionLevel(SOL_SOCKET), name: SocketOptionName(SO_PEERCRED)
            ).get()
        else {
            return problemResponse(CoordinatorProblem(status: 403, code: "forbidden", title: "Forbidden", detail: "the peer's credentials cannot be read"))
        }
        var groups: Set<UInt32> = [credential.gid]
        if !allowedGIDs.isEmpty, !allowedGIDs.contains(credential.gid), !allowedUIDs.contains(credential.uid) {
            // Supplementary groups too (SO_PEERGROUPS), as the documentation promises.
            if let buffer: ckvm_peer_groups = try? await provider.unsafeGetSocketOption(
                level: SocketOptionLevel(SOL_SOCKET), name: SocketOptionName(SO_PEERGROUPS)
            ).get() {
                groups.formUnion(peerGroups(buffer, pid: credential.pid))
            }
        }
        guard allowedUIDs.contains(credential.uid) || !allowedGIDs.isDisjoint(with: groups) else {
            logger.warning("refused", metadata: ["pid": "\(credential.pid)", "uid": "\(credential.uid)", "gid": "\(credential.gid)", "path": "\(request.uri.path)"])
            return problemResponse(CoordinatorProblem(
                status: 403, code: "forbidden", title: "Forbidden",
                detail: "uid \(credential.uid) (gid \(credential.gid)) is not allowed to use this daemon (allowedUIDs, allowedGIDs)"))
        }
        context.peer = credential
        return try await next(request, context)
    }
}

/// The supplementary groups in an SO_PEERGROUPS buffer. The kernel returns them sorted and the
/// buffer comes zero-filled, so trailing zeros are padding; a buffer of zeros only is either no
/// group or group 0 alone, which the peer's /proc status settles.
func peerGroups(_ buffer: ckvm_peer_groups, pid: Int32) -> [UInt32] {
    let all = withUnsafeBytes(of: buffer.gids) { Array($0.bindMemory(to: UInt32.self)) }
    guard let last = all.lastIndex(where: { $0 != 0 }) else {
        let status = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
        let line = status.split(separator: "\n").first { $0.hasPrefix("Groups:") } ?? ""
        return line.split(separator: "\t").dropFirst().joined(separator: " ").split(separator: " ").compactMap { UInt32($0) }.filter { $0 == 0 }
    }
    return Array(all[...last])
}

/// The HTTP API (docs/openapi.yaml) in front of the coordinator core.
public enum DaemonServer {
    /// What a plan's body may be declared as. `application/x-www-form-urlencoded` is what curl
    /// sends for `--data-binary` without `-H`, and `application/octet-stream` and `text/plain`
    /// are generic: all three are read as a plan.
    static let planMediaTypes: Set<String> = [
        "application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml", "application/json", "text/plain", "application/octet-stream",
        "application/x-www-form-urlencoded",
    ]

    /// Builds the router: every route parses its request and asks the core.
    static func router(core: CoordinatorCore, token: BearerToken?, logger: Logger) -> Router<DaemonContext> {
        let router = Router(context: DaemonContext.self)
        router.add(middleware: AuthorizationMiddleware(
            allowedUIDs: Set(core.config.allowedUIDs), allowedGIDs: Set(core.config.allowedGIDs), token: token, logger: logger))
        let limit = core.config.maxBodyBytes

        @Sendable func body(_ request: Request, _ context: DaemonContext) async throws(CoordinatorProblem) -> String {
            // A plan is YAML or JSON: a body declared as something else is refused (415); no
            // Content-Type, or a generic one, is read as a plan.
            if let type = request.headers[.contentType] {
                let mediaType = type.split(separator: ";").first.map { $0.trimmingCharacters(in: .whitespaces).lowercased() } ?? ""
                guard DaemonServer.planMediaTypes.contains(mediaType) else {
                    throw CoordinatorProblem(
                        status: 415, code: "unsupported-media-type", title: "A plan is YAML or JSON",
                        detail: "Content-Type '\(type)' is none of \(DaemonServer.planMediaTypes.sorted().joined(separator: ", "))")
                }
            }
            var request = request
            let buffer: ByteBuffer
            do {
                buffer = try await request.collectBody(upTo: limit)
            } catch {
                throw CoordinatorProblem(status: 413, code: "body-too-large", title: "The request body is too large", detail: "at most \(limit) bytes")
            }
            return String(buffer: buffer)
        }

        router.get("/healthz") { _, _ in jsonResponse(["status": "ok"]) }
        router.get("/v1/host") { _, _ in jsonResponse(core.host()) }
        router.get("/metrics") { _, _ in
            var headers = HTTPFields()
            headers[.contentType] = "text/plain; version=0.0.4"
            return Response(status: .ok, headers: headers, body: .init(byteBuffer: ByteBuffer(bytes: core.metrics.emitToBuffer())))
        }
        router.post("/v1/plans/validate") { request, context in
            do {
                let report = core.validate(try await body(request, context))
                if request.uri.queryParameters.get("rehearse") == "true", let plan = report.plan, let strategy = report.strategy?.chosen {
                    struct Rehearsed: Encodable {
                        var report: PlanReport
                        var rehearsal: MigrationSummary?
                    }
                    return jsonResponse(Rehearsed(report: report, rehearsal: core.rehearse(plan, strategy: strategy)))
                }
                return jsonResponse(report, status: report.parsed ? .ok : .badRequest)
            } catch let problem as CoordinatorProblem {
                return problemResponse(problem)
            }
        }
        router.post("/v1/migrations") { request, context in
            do {
                let key = request.headers.first { $0.name.canonicalName == "idempotency-key" }?.value
                let (view, created) = try core.submit(try await body(request, context), idempotencyKey: key)
                var response = jsonResponse(view, status: created ? .accepted : .ok)
                response.headers[.location] = "/v1/migrations/\(view.id)"
                return response
            } catch let problem as CoordinatorProblem {
                return problemResponse(problem)
            }
        }
        router.get("/v1/migrations") { request, _ in
            let state = request.uri.queryParameters.get("state")
            if let state, !CoordinatorCore.listableStates.contains(state) {
                return problemResponse(CoordinatorProblem(
                    status: 400, code: "invalid-state", title: "No such state",
                    detail: "'\(state)' is none of \(CoordinatorCore.listableStates.joined(separator: ", "))"))
            }
            return jsonResponse(core.list(state: state))
        }
        router.get("/v1/migrations/:id") { _, context in
            let id = context.parameters.get("id") ?? ""
            guard let view = core.view(id) else {
                return problemResponse(CoordinatorProblem(status: 404, code: "not-found", title: "No such migration", detail: id))
            }
            return jsonResponse(view)
        }
        router.post("/v1/migrations/:id/cancel") { _, context in
            do {
                return jsonResponse(try core.cancel(context.parameters.get("id") ?? ""), status: .accepted)
            } catch let problem as CoordinatorProblem {
                return problemResponse(problem)
            }
        }
        router.get("/v1/migrations/:id/events") { _, context in
            let id = context.parameters.get("id") ?? ""
            guard let record = core.record(id) else {
                return problemResponse(CoordinatorProblem(status: 404, code: "not-found", title: "No such migration", detail: id))
            }
            var headers = HTTPFields()
            headers[.contentType] = "text/event-stream"
            headers[.cacheControl] = "no-cache"
            let events = record.subscribe()
            return Response(status: .ok, headers: headers, body: ResponseBody { writer in
                let encoder = JSONEncoder()
                encoder.outputFormatting = [.sortedKeys]
                for await event in events {
                    let data = (try? encoder.encode(event)) ?? Data("{}".utf8)
                    try await writer.write(ByteBuffer(string: "event: \(event.kind)\ndata: \(String(decoding: data, as: UTF8.self))\n\n"))
                }
                try await writer.finish(nil)
            })
        }
        return router
    }

    /// Runs the daemon until SIGTERM or SIGINT: recover, serve, then drain.
    ///
    /// It serves on the UNIX socket (bound here, mode 0660, or the one systemd passed) and on the
    /// loopback TCP listener when the configuration has one.
    public static func run(listeners: DaemonListeners, core: CoordinatorCore, logger: Logger) async throws {
        let socket = listeners.socket
        let activation = listeners.activation
        let token = listeners.token
        // One daemon per socket: a second would unlink the first one's live socket.
        let lockFD = open(socket + ".lock", O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard lockFD >= 0, flock(lockFD, LOCK_EX | LOCK_NB) == 0 else {
            throw SocketInUse(socket: socket)
        }
        defer { close(lockFD) }
        // Only a stale socket (its listener gone) is replaced; another program's live socket,
        // a file or a directory at the path is refused before any state is touched.
        if activation == nil, ckvm_clear_stale_socket(socket) != 0 {
            let error = errno
            throw SocketPathTaken(socket: socket, errno: error)
        }
        let reports = core.recoverAndLoad()
        logger.info("recovered \(reports.count) unfinished migration(s); serving on \(socket)\(activation == nil ? "" : " (socket-activated, descriptor \(activation?.descriptor ?? -1))")")

        let responder = router(core: core, token: token, logger: logger).buildResponder()
        // Each listener its own connection count and the same timeouts: whatever a peer does
        // on loopback TCP, the UNIX socket keeps its own places.
        let settings = core.config
        func channel() -> HTTP1Channel {
            let count = ConnectionCount(limit: settings.maxConnections)
            let requestTimeout = TimeAmount.seconds(Int64(settings.headerTimeoutSeconds))
            return HTTP1Channel(
                responder: httpResponder(responder, logger: logger),
                configuration: .init(
                    additionalChannelHandlers: [
                        ConnectionGuard(count: count, requestTimeout: requestTimeout, idleTimeout: .seconds(Int64(settings.idleTimeoutSeconds)), logger: logger)
                    ],
                    idleTimeout: .seconds(Int64(settings.idleTimeoutSeconds))))
        }
        let group = core.config.socketGroup
        let socketReady: @Sendable () async -> Void = {
            _ = chmod(socket, 0o660)
            if let group { _ = chown(socket, getuid(), group) }
            logger.info("ready")
        }
        var services: [any Service] = []
        if let activation {
            services.append(InheritedSocketServer(descriptor: activation.descriptor, childChannel: channel(), logger: logger, onServerRunning: socketReady))
        } else {
            services.append(channel().server(
                configuration: .init(address: .unixDomainSocket(path: socket), serverName: "gmigrate"),
                onServerRunning: { _ in await socketReady() }, eventLoopGroup: MultiThreadedEventLoopGroup.singleton, logger: logger))
        }
        if let tcp = core.config.tcp {
            services.append(channel().server(
                configuration: .init(address: .hostname(tcp.host, port: tcp.port), serverName: "gmigrate"),
                onServerRunning: { server in
                    logger.info("listening on tcp", metadata: ["address": "\(server.localAddress?.ipAddress ?? tcp.host)", "port": "\(server.localAddress?.port ?? tcp.port)"])
                }, eventLoopGroup: MultiThreadedEventLoopGroup.singleton, logger: logger))
        }
        let serviceGroup = ServiceGroup(configuration: .init(
            services: services.map { .init(service: $0) }, gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        try await serviceGroup.run()
        logger.info("stopping: draining running migrations")
        let left = core.drain()
        if !left.isEmpty {
            logger.warning("stopping with migrations still running after drainSeconds; the next start recovers them from the journal", metadata: ["migrations": "\(left.joined(separator: ","))"])
        }
        logger.info("stopped")
    }

    /// What Hummingbird's `Application` does per request, for servers we build ourselves: a
    /// context per request, the router, a 500 for anything unexpected, `Date` and `Server` headers.
    static func httpResponder(_ responder: RouterResponder<DaemonContext>, logger: Logger) -> HTTPChannelHandler.Responder {
        { request, writer, channel in
            let context = DaemonContext(source: .init(channel: channel, logger: logger))
            var response: Response
            do {
                response = try await responder.respond(to: request, context: context)
            } catch let error as HTTPParserError {
                throw error
            } catch {
                logger.error("unexpected error answering \(request.method) \(request.uri.path): \(error)")
                response = problemResponse(CoordinatorProblem(status: 500, code: "internal", title: "Internal error", detail: "\(error)"))
            }
            response.headers[.date] = httpDate()
            response.headers[.server] = "gmigrate"
            do {
                try await writer.write(response: response.head, body: response.body)
            } catch is HTTPParserError {
                // The request turned out malformed while we answered: close the connection
                // rather than let the channel answer twice.
                throw ResponseAbandoned()
            }
        }
    }

    struct ResponseAbandoned: Error {}

    /// RFC 9110 IMF-fixdate, for the `Date` header.
    static func httpDate() -> String {
        var now = time(nil)
        var parts = tm()
        gmtime_r(&now, &parts)
        var buffer = [CChar](repeating: 0, count: 40)
        let length = strftime(&buffer, buffer.count, "%a, %d %b %Y %H:%M:%S GMT", &parts)
        return String(decoding: buffer.prefix(length).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
