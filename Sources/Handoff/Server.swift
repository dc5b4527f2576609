import CKVM
import Foundation
import Kernel

#if canImport(Glibc)
import Glibc
#endif

/// What a VMM does with the coordinator's requests.
public protocol HandoffHandler: AnyObject {
    /// Answers one request. The request's descriptors are the handler's to keep or close; the
    /// reply's descriptors stay open (the peer receives its own copies).
    func handle(_ request: HandoffMessage, descriptors: [Int32]) -> (HandoffMessage, [Int32])
    /// The same with the frame's attachment (the VM state), in the request and in the reply.
    func handle(_ request: HandoffMessage, descriptors: [Int32], attachment: [UInt8]?) -> (HandoffMessage, [Int32], [UInt8]?)
    /// Set once a request (retire, destroy, shutdown) ends the VMM.
    var exitRequested: Bool { get }
    /// How long to poll for the next request before sleeping on the connection: a target
    /// whose staged state waits for `restore` inside the blackout polls, so that it is not
    /// woken late (tens to hundreds of microseconds on this machine kind).
    var pollForNextRequest: Duration { get }
    /// Work a request left for after its reply is sent (a target's read-back of the state it
    /// staged, while the coordinator journals).
    func afterReply()
}

extension HandoffHandler {
    public var pollForNextRequest: Duration { .zero }
    public func afterReply() {}

    /// A handler that takes no attachment: a request that carries one is answered without it.
    public func handle(_ request: HandoffMessage, descriptors: [Int32], attachment: [UInt8]?) -> (HandoffMessage, [Int32], [UInt8]?) {
        let (reply, replyDescriptors) = handle(request, descriptors: descriptors)
        return (reply, replyDescriptors, nil)
    }
}

/// A VMM's side of the protocol: one coordinator connection at a time, each checked by
/// SO_PEERCRED; a malformed frame ends that connection (its descriptors closed), never the VMM.
public final class HandoffServer {
    let socket: String
    let allowed: Set<UInt32>
    let log: (String) -> Void
    let handler: any HandoffHandler

    /// How long a new connection may take to send its first request, and how long a
    /// connection may stay silent between requests: one coordinator at a time is served, so a
    /// peer that connects and waits must not hold the VMM from every other. A coordinator whose
    /// connection was closed for idleness reconnects (RemoteVMM does, for a request not sent).
    let firstRequestTimeout: Duration
    let idleTimeout: Duration

    public init(
        socket: String, allowed: Set<UInt32>, log: @escaping (String) -> Void, handler: any HandoffHandler,
        firstRequestTimeout: Duration = .seconds(5), idleTimeout: Duration = .seconds(30)
    ) {
        self.socket = socket
        self.allowed = allowed
        self.log = log
        self.handler = handler
        self.firstRequestTimeout = firstRequestTimeout
        self.idleTimeout = idleTimeout
    }

    /// Listens and serves until a request asks the VMM to end.
    public func serve() throws(HandoffError) {
        let listener = ckvm_listen_unix(socket, 4)
        guard listener >= 0 else {
            let why = switch errno {
            case EADDRINUSE: "another program listens on this socket; refusing to replace it"
            case EEXIST: "something that is not a socket is there; refusing to replace it"
            default: String(cString: strerror(errno))
            }
            throw HandoffError(.io, "listening on \(socket): \(why)", errno: .current)
        }
        _ = chmod(socket, 0o600)
        defer {
            close(listener)
            unlink(socket)
        }
        log("listening on \(socket)")
        while !handler.exitRequested {
            let fd = ckvm_accept(listener)
            guard fd >= 0 else { throw HandoffError(.io, "accept: \(String(cString: strerror(errno)))", errno: .current) }
            let connection = HandoffConnection(fd: fd)
            guard let peer = try? connection.peerCredentials(), allowed.contains(peer.uid) else {
                log("refused a connection from uid \((try? connection.peerCredentials()).map { String($0.uid) } ?? "?")")
                continue
            }
            log("coordinator connected (pid \(peer.pid), uid \(peer.uid))")
            serve(connection)
        }
    }

    private func serve(_ connection: HandoffConnection) {
        connection.setTimeout(firstRequestTimeout)
        var first = true
        while !handler.exitRequested {
            if !first { connection.setTimeout(idleTimeout) }
            first = false
            let poll = handler.pollForNextRequest
            if poll > .zero { connection.spin(upTo: poll) }
            let request: HandoffMessage
            let descriptors: [Int32]
            let attachment: [UInt8]?
            do {
                (request, descriptors, attachment) = try connection.receiveAttached()
            } catch {
                if error.kind != .closed { log("dropping the connection: \(error.message)") }
                return
            }
            guard HandoffMessage.requestTypes.contains(request.type) else {
                for descriptor in descriptors { close(descriptor) }
                var reply = HandoffMessage(type: "error", id: request.id)
                reply.message = "'\(request.type)' is not a request"
                try? connection.send(reply)
                continue
            }
            let (reply, replyDescriptors, replyAttachment) = handler.handle(request, descriptors: descriptors, attachment: attachment)
            do {
                try connection.send(reply, descriptors: replyDescriptors, attachment: replyAttachment)
            } catch {
                log("the reply to \(request.type) could not be sent: \(error.message)")
                handler.afterReply()
                return
            }
            handler.afterReply()
        }
    }
}
