import Foundation
import Handoff
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The state channel between two VMMs: one frame, its header and the state sent in one call,
/// read whole on the other end.
@Suite("The state channel")
struct StateChannelTests {
    /// A state far larger than the socket's send buffer: the sender blocks while the other end
    /// reads, and every byte arrives, in order, after the header.
    @Test func aStateLargerThanTheSocketBufferArrivesWhole() async throws {
        var ends: [Int32] = [-1, -1]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &ends) == 0)
        defer { for end in ends { close(end) } }
        var small: Int32 = 4096
        _ = setsockopt(ends[0], SOL_SOCKET, SO_SNDBUF, &small, socklen_t(MemoryLayout<Int32>.size))
        let state = (0..<(3 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 2_654_435_761 >> 13) }
        let receiver = ends[1]
        let received = Task.detached { try StateChannel.receive(on: receiver, timeout: .seconds(20)) }
        try StateChannel.send(state, on: ends[0], timeout: .seconds(20))
        let bytes = try await received.value
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
}
