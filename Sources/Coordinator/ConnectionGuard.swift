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
/// which has its own count), and a request must arrive whole within `requestTimeout` of the
/// connection opening or of the previous response (a peer that opens and waits, or sends a
/// header a byte at a time, is closed). Hummingbird's idle timeout closes connections that stay
/// silent between requests.
final class ConnectionGuard: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPRequestPart
    typealias InboundOut = HTTPRequestPart
    typealias OutboundIn = HTTPResponsePart
    typealias OutboundOut = HTTPResponsePart

    let count: ConnectionCount
    let requestTimeout: TimeAmount
    let logger: Logger
    private var admitted = false
    private var deadline: Scheduled<Void>?

    init(count: ConnectionCount, requestTimeout: TimeAmount, logger: Logger) {
        self.count = count
        self.requestTimeout = requestTimeout
        self.logger = logger
    }

    func handlerAdded(context: ChannelHandlerContext) {
        guard count.enter() else {
            logger.warning("refused a connection: the listener holds its maxConnections", metadata: ["limit": "\(count.limit)"])
            context.close(promise: nil)
            return
        }
        admitted = true
        arm(context)
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
        if case .end = unwrapInboundIn(data) {
            deadline?.cancel()
            deadline = nil
        }
        context.fireChannelRead(data)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        if case .end = unwrapOutboundIn(data) { arm(context) }
        context.write(data, promise: promise)
    }

    private func arm(_ context: ChannelHandlerContext) {
        deadline?.cancel()
        let channel = context.channel
        let timeout = requestTimeout
        deadline = context.eventLoop.scheduleTask(in: timeout) { [logger] in
            logger.info("closed a connection: no whole request within headerTimeoutSeconds", metadata: ["seconds": "\(timeout.nanoseconds / 1_000_000_000)"])
            channel.close(promise: nil)
        }
    }
}
