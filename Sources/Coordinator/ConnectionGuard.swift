import HTTPTypes
import HummingbirdCore
import NIOHTTPTypes
import Logging
import NIOCore
import Synchronization

/// The connections one listener holds open, against its cap.
final class ConnectionCount: Sendable {
    let limit: Int
    private let count = Atomic<Int>(0)

    init(limit: Int) { self.limit = limit }

    /// Takes a place; false (and nothing taken) when the listener is full.
    func enter() -> Bool {
        while true {
            let current = count.load(ordering: .relaxed)
            guard current < limit else { return false }
            if count.compareExchange(expected: current, desired: current + 1, ordering: .relaxed).exchanged { return true }
        }
    }

    func leave() { count.subtract(1, ordering: .relaxed) }

    var current: Int { count.load(ordering: .relaxed) }
}

/// Bounds what one connection may cost the daemon, per listener: at most `limit` connections
/// open (one more is closed at once, so a flood on loopback TCP never starves the UNIX socket,
/// which has its own count); the first request must arrive whole within `requestTimeout` of the
/// connection opening (a peer that opens and waits, or sends a header a byte at a time, is
/// closed), and a request's body within `requestTimeout` of its head; between requests a
/// connection may stay silent `idleTimeout` (Hummingbird's idle handler closes it too). A long
/// response (an event stream) is never cut: no timer runs while one is being answered.
final class ConnectionGuard: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPRequestPart
    typealias InboundOut = HTTPRequestPart
    typealias OutboundIn = HTTPResponsePart
    typealias OutboundOut = HTTPResponsePart

    let count: ConnectionCount
    let requestTimeout: TimeAmount
    let idleTimeout: TimeAmount
    let logger: Logger
    private var admitted = false
    private var deadline: Scheduled<Void>?
    /// Requests read whose response has not ended (HTTP/1.1 pipelining may read ahead).
    private var outstanding = 0
    /// A request's head was read and its end not yet.
    private var reading = false

    init(count: ConnectionCount, requestTimeout: TimeAmount, idleTimeout: TimeAmount, logger: Logger) {
        self.count = count
        self.requestTimeout = requestTimeout
        self.idleTimeout = idleTimeout
        self.logger = logger
    }

    func handlerAdded(context: ChannelHandlerContext) {
        guard count.enter() else {
            logger.warning("refused a connection: the listener holds its maxConnections", metadata: ["limit": "\(count.limit)"])
            context.close(promise: nil)
            return
        }
        admitted = true
        arm(context, requestTimeout, "no whole request within headerTimeoutSeconds")
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        deadline?.cancel()
        deadline = nil
        if admitted {
            admitted = false
            count.leave()
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        handlerRemoved(context: context)
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head:
            // The body must follow within the request timeout.
            reading = true
            outstanding += 1
            arm(context, requestTimeout, "no whole request within headerTimeoutSeconds")
        case .end:
            reading = false
            disarm()
        case .body:
            break
        }
        context.fireChannelRead(data)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        if case .end = unwrapOutboundIn(data) {
            outstanding = max(0, outstanding - 1)
            // Idle from here, unless a pipelined request is already being read or answered.
            if outstanding == 0 && !reading { arm(context, idleTimeout, "idle for idleTimeoutSeconds") }
        }
        context.write(data, promise: promise)
    }

    private func disarm() {
        deadline?.cancel()
        deadline = nil
    }

    private func arm(_ context: ChannelHandlerContext, _ timeout: TimeAmount, _ why: String) {
        deadline?.cancel()
        let channel = context.channel
        deadline = context.eventLoop.scheduleTask(in: timeout) { [logger] in
            logger.info("closed a connection: \(why)", metadata: ["seconds": "\(timeout.nanoseconds / 1_000_000_000)"])
            channel.close(promise: nil)
        }
    }
}
