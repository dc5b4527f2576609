import Foundation
import Handoff
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The state channel between two VMMs: one frame, its header and the state sent in one call
/// (resumed where a send stopped short), read whole on the other end.
@Suite("The state channel")
struct StateChannelTests {
    /// A state far larger than the socket's send buffer: the sender blocks while the other end
    /// reads (on a thread of its own), and every byte arrives, in order, after the header.
    @Test func aStateLargerThanTheSocketBufferArrivesWhole() throws {
        var ends: [Int32] = [-1, -1]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &ends) == 0)
        defer { for end in ends { close(end) } }
        var small: Int32 = 4096
        _ = setsockopt(ends[0], SOL_SOCKET, SO_SNDBUF, &small, socklen_t(MemoryLayout<Int32>.size))
        let state = (0..<(3 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 2_654_435_761 >> 13) }
        let receiver = ends[1]
        let received = Received()
        let thread = Thread { received.set(Result { try StateChannel.receive(on: receiver, timeout: .seconds(20)) }) }
        thread.start()
        try StateChannel.send(state, on: ends[0], timeout: .seconds(20))
        let bytes = try received.wait().get()
        #expect(bytes.count == state.count)
        #expect(bytes == state)
    }

    @Test func anEmptyStateIsAFrameToo() throws {
        var ends: [Int32] = [-1, -1]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &ends) == 0)
        defer { for end in ends { close(end) } }
        try StateChannel.send([], on: ends[0], timeout: .seconds(5))
        #expect(try StateChannel.receive(on: ends[1], timeout: .seconds(5)) == [])
    }

    /// Where a send that stopped short goes on: in the header, at its end, in the state, at
    /// the end of all.
    @Test func aShortSendGoesOnWhereItStopped() {
        func left(_ sent: Int) -> [[Int]] { StateChannel.unsent([8, 100], after: sent).map { [$0.part, $0.offset, $0.count] } }
        #expect(left(0) == [[0, 0, 8], [1, 0, 100]])
        #expect(left(5) == [[0, 5, 3], [1, 0, 100]])
        #expect(left(8) == [[1, 0, 100]])
        #expect(left(8 + 37) == [[1, 37, 63]])
        #expect(left(108) == [])
        #expect(StateChannel.unsent([8, 0], after: 8).isEmpty)
    }
}

/// A value handed from one thread to another.
private final class Received: @unchecked Sendable {
    // @unchecked: `value` is only touched under `condition`.
    private let condition = NSCondition()
    private var value: Result<[UInt8], any Error>?

    func set(_ result: Result<[UInt8], any Error>) {
        condition.withLock {
            value = result
            condition.broadcast()
        }
    }

    func wait() -> Result<[UInt8], any Error> {
        condition.withLock {
            while true {
                if let value { return value }
                condition.wait()
            }
        }
    }
}
