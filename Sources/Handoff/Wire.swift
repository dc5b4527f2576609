// The handoff protocol's framing (docs/handoff.md has the full specification).
//
// A frame is `"GMH1" | length: UInt32 LE | length bytes of JSON`, sent with one sendmsg; file
// descriptors travel as SCM_RIGHTS attached to the frame's first byte. Limits: 1 MiB of JSON,
// 8 descriptors per frame. Anything else — a bad magic, an oversized length, JSON that is not
// a message, a message type this version does not know, more descriptors than the message
// carries — is refused, and every descriptor that came with it is closed.

import CKVM
import Foundation
import Kernel
import Orchestrator

#if canImport(Glibc)
import Glibc
#endif

/// Why the handoff connection failed. Keeps the errno of a failed system call.
public struct HandoffError: Error, Equatable, Sendable, CustomStringConvertible {
    public enum Kind: String, Sendable, Codable {
        case io
        /// The peer closed the connection.
        case closed
        /// The peer did not answer within the step timeout.
        case timeout
        case malformed
        /// Descriptors of the wrong number or kind came with a message.
        case unexpectedDescriptors = "unexpected-descriptors"
        /// The peer is not who the plan expects (SO_PEERCRED).
        case credentials
        case version
        /// The peer answered with an error.
        case remote
    }

    public var kind: Kind
    public var message: String
    public var errno: Errno?

    public init(_ kind: Kind, _ message: String, errno: Errno? = nil) {
        self.kind = kind
        self.message = message
        self.errno = errno
    }

    public var description: String { message }
}

/// The peer's credentials, from SO_PEERCRED.
public struct PeerCredentials: Sendable, Equatable {
    public var pid: Int32
    public var uid: UInt32
    public var gid: UInt32
}

/// One connection, either end: frames out and in, descriptors attached.
public final class HandoffConnection: @unchecked Sendable {
    // @unchecked: used by one thread at a time (a coordinator's step, or a VMM's request loop).
    public let fd: Int32
    public static let magic: [UInt8] = Array("GMH1".utf8)
    public static let maxPayloadBytes = 1 << 20
    public static let maxDescriptors = 8

    private let owns: Bool

    public init(fd: Int32) {
        self.fd = fd
        owns = true
    }

    /// A connection on a descriptor someone else closes.
    init(borrowing fd: Int32) {
        self.fd = fd
        owns = false
    }

    deinit { if owns { Glibc.close(fd) } }

    /// Connects to a VMM's socket.
    public static func connect(path: String) throws(HandoffError) -> HandoffConnection {
        let fd = ckvm_connect_unix(path)
        guard fd >= 0 else { throw HandoffError(.io, "connecting to \(path): \(String(cString: strerror(errno)))", errno: .current) }
        return HandoffConnection(fd: fd)
    }

    /// Whether something accepts connections at `path`: 0 if it does, else the errno of the
    /// attempt (ECONNREFUSED: a stale socket; ENOENT: no socket).
    public static func probe(path: String) -> Int32 {
        let fd = ckvm_connect_unix(path)
        guard fd >= 0 else { return errno }
        Glibc.close(fd)
        return 0
    }

    /// Bounds every later send and receive (0: none).
    public func setTimeout(_ duration: Duration) {
        let (seconds, attoseconds) = duration.components
        // Saturating: a plan's longest duration still gives a finite, positive bound.
        let milliseconds = seconds.multipliedReportingOverflow(by: 1000)
        let total = milliseconds.overflow ? Int64.max : milliseconds.partialValue.addingReportingOverflow(attoseconds / 1_000_000_000_000_000).partialValue
        _ = ckvm_set_timeouts(fd, Int(clamping: max(1, min(total, Int64(Int32.max)))))
    }

    public func peerCredentials() throws(HandoffError) -> PeerCredentials {
        var pid: Int32 = 0
        var uid: UInt32 = 0
        var gid: UInt32 = 0
        guard ckvm_peer_credentials(fd, &pid, &uid, &gid) == 0 else {
            throw HandoffError(.io, "SO_PEERCRED: \(String(cString: strerror(errno)))", errno: .current)
        }
        return PeerCredentials(pid: pid, uid: uid, gid: gid)
    }

    /// Sends one message with descriptors (which stay open here: the caller owns them), and
    /// its attachment (raw bytes after the JSON, counted in the message's `attachment`).
    public func send(_ message: HandoffMessage, descriptors: [Int32] = [], attachment: [UInt8]? = nil) throws(HandoffError) {
        guard descriptors.count <= HandoffConnection.maxDescriptors else {
            throw HandoffError(.unexpectedDescriptors, "\(descriptors.count) descriptors in one frame (at most \(HandoffConnection.maxDescriptors))")
        }
        var message = message
        message.attachment = attachment.map(\.count)
        guard (attachment?.count ?? 0) <= HandoffMessage.maxAttachmentBytes else {
            throw HandoffError(.malformed, "a \(message.type) attachment of \(attachment?.count ?? 0) bytes (at most \(HandoffMessage.maxAttachmentBytes))")
        }
        guard let payload = message.scalarJSON() ?? HandoffConnection.foundationJSON(message), payload.count <= HandoffConnection.maxPayloadBytes else {
            throw HandoffError(.malformed, "a \(message.type) message does not fit in a frame")
        }
        var frame = HandoffConnection.magic
        let length = UInt32(payload.count)
        frame += [UInt8(length & 0xff), UInt8((length >> 8) & 0xff), UInt8((length >> 16) & 0xff), UInt8(length >> 24)]
        frame += payload
        if let attachment { frame += attachment }
        let result = frame.withUnsafeBytes { buffer in
            descriptors.withUnsafeBufferPointer { fds in
                ckvm_send_with_fds(fd, buffer.baseAddress, UInt(buffer.count), fds.baseAddress, Int32(fds.count))
            }
        }
        guard result == 0 else { throw HandoffConnection.ioError("sending \(message.type)") }
    }

    /// A message's JSON through JSONEncoder (keys sorted): what `scalarJSON` declines.
    static func foundationJSON(_ message: HandoffMessage) -> [UInt8]? {
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        return (try? encoder.encode(message)).map { [UInt8]($0) }
    }

    /// Polls (without sleeping) until something can be read or `duration` has passed: inside the
    /// blackout the coordinator has nothing else to do, and a sleeping process is woken here
    /// only tens to hundreds of microseconds after its reply came.
    public func spin(upTo duration: Duration) {
        let clock = ContinuousClock()
        let deadline = clock.now + duration
        var descriptor = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        while clock.now < deadline {
            if poll(&descriptor, 1, 0) != 0 { return }
            sched_yield()  // a VMM thread runnable on this CPU goes first
        }
    }

    /// Receives one message and the descriptors that came with it (now owned by the caller).
    /// On any error every received descriptor is closed. A message with an attachment is
    /// refused here: its receiver takes `receiveAttached()`.
    public func receive() throws(HandoffError) -> (HandoffMessage, [Int32]) {
        let (message, descriptors, attachment) = try receiveAttached()
        guard attachment == nil else {
            for descriptor in descriptors { Glibc.close(descriptor) }
            throw HandoffError(.malformed, "a \(message.type) with an attachment where none is taken")
        }
        return (message, descriptors)
    }

    /// Receives one message, its descriptors and its attachment (the raw bytes its
    /// `attachment` counts, at most `HandoffMessage.maxAttachmentBytes`).
    public func receiveAttached() throws(HandoffError) -> (HandoffMessage, [Int32], [UInt8]?) {
        var descriptors: [Int32] = []
        do throws(HandoffError) {
            let header = try read(count: 8, into: &descriptors)
            guard Array(header.prefix(4)) == HandoffConnection.magic else {
                throw HandoffError(.malformed, "a frame without the GMH1 magic")
            }
            let length = Int(header[4]) | Int(header[5]) << 8 | Int(header[6]) << 16 | Int(header[7]) << 24
            guard length <= HandoffConnection.maxPayloadBytes else {
                throw HandoffError(.malformed, "a frame of \(length) bytes (at most \(HandoffConnection.maxPayloadBytes))")
            }
            let payload = try read(count: length, into: &descriptors)
            guard let message = HandoffMessage(scalarJSON: payload) ?? (try? JSONDecoder().decode(HandoffMessage.self, from: Data(payload))) else {
                throw HandoffError(.malformed, "a frame whose JSON is not a handoff message")
            }
            guard HandoffMessage.knownTypes.contains(message.type) else {
                throw HandoffError(.malformed, "an unknown message type '\(message.type)'")
            }
            var attachment: [UInt8]? = nil
            if let count = message.attachment {
                guard count >= 0, count <= HandoffMessage.maxAttachmentBytes else {
                    throw HandoffError(.malformed, "an attachment of \(count) bytes (at most \(HandoffMessage.maxAttachmentBytes))")
                }
                attachment = try read(count: count, into: &descriptors)
            }
            return (message, descriptors, attachment)
        } catch {
            for descriptor in descriptors { Glibc.close(descriptor) }
            throw error
        }
    }

    private func read(count: Int, into descriptors: inout [Int32]) throws(HandoffError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var received = 0
        while received < count {
            var fds = [Int32](repeating: -1, count: HandoffConnection.maxDescriptors)
            var nfds: Int32 = 0
            var truncated: Int32 = 0
            let result = bytes.withUnsafeMutableBytes { buffer in
                fds.withUnsafeMutableBufferPointer { fdBuffer in
                    ckvm_recv_with_fds(
                        fd, buffer.baseAddress! + received, UInt(count - received), fdBuffer.baseAddress,
                        Int32(HandoffConnection.maxDescriptors - descriptors.count), &nfds, &truncated)
                }
            }
            descriptors += fds.prefix(Int(nfds))
            if truncated != 0 {
                throw HandoffError(.unexpectedDescriptors, "more than \(HandoffConnection.maxDescriptors) descriptors with one frame")
            }
            if result < 0 { throw HandoffConnection.ioError("receiving") }
            if result == 0 { throw HandoffError(.closed, "the peer closed the connection") }
            received += result
        }
        return bytes
    }

    static func ioError(_ doing: String) -> HandoffError {
        let error = Errno.current
        if error.rawValue == EAGAIN || error.rawValue == EWOULDBLOCK {
            return HandoffError(.timeout, "\(doing): the peer did not answer in time", errno: error)
        }
        if error.rawValue == EPIPE || error.rawValue == ECONNRESET {
            return HandoffError(.closed, "\(doing): the peer is gone (\(error.name))", errno: error)
        }
        return HandoffError(.io, "\(doing): \(error.name) (\(error.message))", errno: error)
    }

    /// What a received descriptor is, from /proc/self/fd: `anon_inode:[kvm-gmem]`, `anon_inode:kvm-vm`, ...
    public static func kind(of descriptor: Int32) -> String {
        var buffer = [CChar](repeating: 0, count: 256)
        let length = ckvm_fd_description(descriptor, &buffer, UInt(buffer.count))
        guard length >= 0 else { return "?" }
        return String(decoding: buffer.prefix(Int(length)).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// Checks that exactly `expected` descriptors came, each of the named kind; closes them all
    /// and throws otherwise.
    /// What /proc/self/fd shows for each kind a message carries, exactly: a memfd named
    /// `kvm-gmem` is `/memfd:kvm-gmem (deleted)`, not a guest_memfd, and a file cannot pose as an
    /// anonymous inode (its link is an absolute path).
    public static let descriptorLinks = ["kvm-gmem": "anon_inode:[kvm-gmem]", "kvm-vm": "anon_inode:kvm-vm", "net/tun": "/dev/net/tun"]

    public static func check(_ descriptors: [Int32], expected kinds: [String]) throws(HandoffError) {
        let actual = descriptors.map(kind(of:))
        guard actual.count == kinds.count, zip(actual, kinds).allSatisfy({ $0.0 == (descriptorLinks[$0.1] ?? $0.1) }) else {
            for descriptor in descriptors { Glibc.close(descriptor) }
            throw HandoffError(
                .unexpectedDescriptors,
                "expected descriptors [\(kinds.joined(separator: ", "))], received [\(actual.joined(separator: ", "))]")
        }
    }
}

/// The socket pair end on which a source VMM sends its state straight to the target VMM:
/// `"GMS1" | length: UInt32 LE | length bytes of VMState`, nothing else. No JSON: the bytes are
/// `VMState`'s own checked format, and this is on the blackout's path.
public enum StateChannel {
    public static let magic: [UInt8] = Array("GMS1".utf8)

    /// Sends the state; bounded by `timeout`.
    public static func send(_ bytes: [UInt8], on fd: Int32, timeout: Duration) throws(HandoffError) {
        guard bytes.count <= HandoffMessage.maxAttachmentBytes, let length = UInt32(exactly: bytes.count) else {
            throw HandoffError(.malformed, "a state of \(bytes.count) bytes (at most \(HandoffMessage.maxAttachmentBytes))")
        }
        HandoffConnection(borrowing: fd).setTimeout(timeout)
        let header = magic + [UInt8(length & 0xff), UInt8((length >> 8) & 0xff), UInt8((length >> 16) & 0xff), UInt8(length >> 24)]
        // Header and state in one call, without copying the state into a frame first.
        var sent = 0
        let total = header.count + bytes.count
        while sent < total {
            let result = header.withUnsafeBytes { head in
                bytes.withUnsafeBytes { body in
                    let bases = [head.baseAddress, body.baseAddress]
                    // What did not go yet (a send may stop short: a timeout, a signal).
                    var parts = unsent([head.count, body.count], after: sent).map { left in
                        iovec(iov_base: UnsafeMutableRawPointer(mutating: bases[left.part]).map { $0 + left.offset }, iov_len: left.count)
                    }
                    return parts.withUnsafeMutableBufferPointer { vector in
                        var message = msghdr()
                        message.msg_iov = vector.baseAddress
                        message.msg_iovlen = vector.count
                        return Glibc.sendmsg(fd, &message, Int32(MSG_NOSIGNAL))
                    }
                }
            }
            if result < 0 {
                if errno == EINTR { continue }
                throw HandoffConnection.ioError("sending the state")
            }
            sent += result
        }
    }

    /// What is left of consecutive parts of `lengths` bytes once `sent` bytes of them went:
    /// each unfinished part's index, the offset to go on from, and the bytes left of it.
    public static func unsent(_ lengths: [Int], after sent: Int) -> [(part: Int, offset: Int, count: Int)] {
        var skip = max(0, sent)
        var left: [(part: Int, offset: Int, count: Int)] = []
        for (index, length) in lengths.enumerated() {
            let taken = min(skip, length)
            skip -= taken
            if length > taken { left.append((index, taken, length - taken)) }
        }
        return left
    }

    /// Receives one frame; bounded by `timeout`. A peer that closes its end first sent none.
    public static func receive(on fd: Int32, timeout: Duration) throws(HandoffError) -> [UInt8] {
        try receiveFrame(fd, deadline: ContinuousClock.now + timeout, atMost: HandoffMessage.maxAttachmentBytes)
    }

    /// Receives a whole state, sent as one frame or as its parts (version 7), and answers it
    /// with the `VMState.digest` of its bytes (all frames' bytes, in order) and their count.
    public static func receiveState(on fd: Int32, timeout: Duration) throws(HandoffError) -> (state: VMState, digest: String, count: Int) {
        var receiver = Receiver(fd, timeout: timeout)
        while receiver.state == nil { _ = try receiver.next() }
        guard let state = receiver.state else { throw HandoffError(.closed, "no state") }
        return (state, receiver.digest, receiver.count)
    }

    /// Sends `state` part by part through a socket pair of its own and receives it as a target
    /// does (`Receiver`), so that the code and library calls of both ends have run once in this
    /// process before a blackout needs them: a VMM's first send of a state took 80-110 µs more
    /// than the next ones on this nested host (lazy symbol binding, first-use runtime setup),
    /// and it wakes the target, so the whole blackout waited for it. Whether the state came
    /// back whole and equal.
    @discardableResult
    public static func rehearse(_ state: VMState) -> Bool {
        var ends: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &ends) == 0 else { return false }
        defer { for end in ends { Glibc.close(end) } }
        var receiver = Receiver(ends[1], timeout: .seconds(1))
        do throws(HandoffError) {
            for part in [VMState.encodedHead(vm: state.vm, vcpus: state.vcpus.count)] + state.vcpus.map(VMState.encoded) {
                try send(part, on: ends[0], timeout: .seconds(1))
                _ = try receiver.next()
            }
        } catch {
            return false
        }
        return receiver.state == state
    }

    /// A state as its frames come (version 7): the source sends its head (the VM's sections)
    /// and then each vcpu as it saves them, and the target sets each part as it comes
    /// (`VMState.StreamDecoder`), so that saving and setting overlap. The whole receipt is
    /// bounded by one timeout; between frames it polls a while before it sleeps, since the
    /// next part comes within a vcpu's save.
    public struct Receiver {
        private let fd: Int32
        private let deadline: ContinuousClock.Instant
        private var decoder = VMState.StreamDecoder()
        /// What came so far, frames concatenated, digested as it came: the bytes themselves are
        /// not kept (growing one array for them cost the target page faults between two vcpus' sets).
        private var received = VMState.Digest()

        /// How many bytes came so far.
        public var count: Int { received.count }
        /// `VMState.digest` of every byte received so far.
        public var digest: String { received.text }

        public init(_ fd: Int32, timeout: Duration) {
            self.fd = fd
            deadline = ContinuousClock.now + timeout
        }

        /// The whole state, once its last part came.
        public var state: VMState? { decoder.state }

        /// Receives the next frame: the parts of the state it completed (none, if it ended
        /// inside one). A state malformed or too long, a frame past the state's end, a peer
        /// that closes before the end, or the deadline passing, is an error.
        public mutating func next() throws(HandoffError) -> [VMState.StreamDecoder.Part] {
            let left = deadline - ContinuousClock.now
            guard left > .zero else { throw HandoffError(.timeout, "the state did not come whole in time (\(count) bytes came)") }
            let connection = HandoffConnection(borrowing: fd)
            if count > 0 { connection.spin(upTo: min(left, StateChannel.pollBetweenParts)) }
            let frame: [UInt8]
            do {
                frame = try StateChannel.receiveFrame(fd, deadline: deadline, atMost: HandoffMessage.maxAttachmentBytes - count)
            } catch where error.kind == .closed && count > 0 {
                throw HandoffError(.closed, "the source closed its end after \(count) bytes of its state")
            }
            received.add(frame)
            let parts: [VMState.StreamDecoder.Part]
            do { parts = try decoder.feed(frame) } catch { throw HandoffError(.malformed, error.message) }
            // A frame may end inside a part (the next completes it), not after the state.
            guard !decoder.isComplete || decoder.consumed == count else {
                throw HandoffError(.malformed, "\(count - decoder.consumed) bytes after the state's last vcpu")
            }
            return parts
        }
    }

    /// How long a target polls for the state's next part before it sleeps: about one vcpu's
    /// save on this nested host (0.1 ms), and a little more.
    public static let pollBetweenParts = Duration.microseconds(250)

    /// One frame of at most `atMost` bytes, all of it by `deadline` (each wait is bounded by
    /// what is left of it, so that a peer trickling bytes cannot stretch it).
    private static func receiveFrame(_ fd: Int32, deadline: ContinuousClock.Instant, atMost: Int) throws(HandoffError) -> [UInt8] {
        let header = try read(fd, count: 8, deadline: deadline)
        guard Array(header.prefix(4)) == magic else { throw HandoffError(.malformed, "a state frame without the GMS1 magic") }
        let length = Int(header[4]) | Int(header[5]) << 8 | Int(header[6]) << 16 | Int(header[7]) << 24
        guard length <= atMost else {
            throw HandoffError(.malformed, "a state of more than \(HandoffMessage.maxAttachmentBytes) bytes (a frame of \(length))")
        }
        return try read(fd, count: length, deadline: deadline)
    }

    private static func read(_ fd: Int32, count: Int, deadline: ContinuousClock.Instant) throws(HandoffError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var received = 0
        while received < count {
            let left = deadline - ContinuousClock.now
            guard left > .zero else { throw HandoffError(.timeout, "receiving the state: the peer did not send it in time (\(received) of \(count) bytes of a frame came)") }
            HandoffConnection(borrowing: fd).setTimeout(left)
            let result = bytes.withUnsafeMutableBytes { buffer in
                buffer.baseAddress.map { Glibc.recv(fd, $0 + received, count - received, 0) } ?? 0
            }
            if result < 0 {
                if errno == EINTR { continue }
                throw HandoffConnection.ioError("receiving the state")
            }
            if result == 0 { throw HandoffError(.closed, "the source closed its end before its state came") }
            received += result
        }
        return bytes
    }
}

/// The trigger of an armed pause (protocol 6): a socket pair between the coordinator and the
/// source VMM. The pause request, state channel and all, goes to the source before the
/// blackout; the source says it is ready with one byte, and waits, polling, for one byte back:
/// that byte is the pause request as the guest sees it. So the blackout holds neither the
/// request's message nor the source's wake-up. A trigger closed without a byte means the pause
/// is not requested after all: the source answers that, and its guest runs on.
public enum PauseTrigger {
    static let ready: UInt8 = 0x52  // "R"
    static let go: UInt8 = 0x47  // "G"

    /// The source: says it is ready, then waits for the go, polling for `spin` before it
    /// sleeps, `timeout` at most. False where the trigger closed or the time ran out.
    public static func armed(_ fd: Int32, spin: Duration, timeout: Duration) -> Bool {
        var byte = ready
        guard Glibc.send(fd, &byte, 1, Int32(MSG_NOSIGNAL)) == 1 else { return false }
        let deadline = ContinuousClock.now + timeout
        HandoffConnection(borrowing: fd).spin(upTo: min(spin, timeout))
        return receive(go, on: fd, by: deadline)
    }

    /// The coordinator: waits for the source's ready byte, `timeout` at most.
    public static func waitReady(_ fd: Int32, timeout: Duration) -> Bool {
        receive(ready, on: fd, by: ContinuousClock.now + timeout)
    }

    /// Whether `expected` is the byte that comes on `fd` by `deadline` (false: another byte,
    /// the peer's end closed, or the time ran out).
    private static func receive(_ expected: UInt8, on fd: Int32, by deadline: ContinuousClock.Instant) -> Bool {
        var descriptor = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        while true {
            let left = deadline - ContinuousClock.now
            guard left > .zero else { return false }
            let result = poll(&descriptor, 1, Int32(clamping: left.nanoseconds / 1_000_000 + 1))
            if result > 0 { break }
            if result < 0 && errno != EINTR { return false }
        }
        var byte: UInt8 = 0
        return Glibc.recv(fd, &byte, 1, 0) == 1 && byte == expected
    }

    /// The coordinator: requests the pause.
    @discardableResult
    public static func fire(_ fd: Int32) -> Bool {
        var byte = go
        return Glibc.send(fd, &byte, 1, Int32(MSG_NOSIGNAL)) == 1
    }
}
