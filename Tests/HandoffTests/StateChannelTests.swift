import Foundation
import GmigrateTestKit
import Handoff
import Kernel
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

/// A state sent in parts, a frame each (protocol 7), as a source sends it and a target takes it.
@Suite("The state channel, in parts")
struct StateChannelPartsTests {
    /// Two connected ends; a test closes them at its end (`closeAll`, deferred: the ends
    /// then live as long as the test), or one earlier (`close`).
    final class Ends {
        var fds: [Int32] = [-1, -1]
        init() throws {
            guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0 else { throw HandoffError(.io, "socketpair") }
        }
        func close(_ index: Int) {
            if fds[index] >= 0 { Glibc.close(fds[index]) }
            fds[index] = -1
        }
        func closeAll() { for index in fds.indices { close(index) } }
    }

    static let state: VMState = {
        let vm = [StateSection(name: "pic-master", bytes: Array(repeating: 1, count: 40)), StateSection(name: "clock", bytes: Array(repeating: 2, count: 48))]
        let vcpus = (0..<3).map { index in
            VCPUState(sections: [
                StateSection(name: "regs", bytes: Array(repeating: UInt8(index), count: 144)),
                StateSection(name: "xsave", bytes: Array(repeating: UInt8(index + 8), count: 4096)),
            ])
        }
        return VMState(vm: vm, vcpus: vcpus)
    }()

    static var parts: [[UInt8]] { [VMState.encodedHead(vm: state.vm, vcpus: state.vcpus.count)] + state.vcpus.map(VMState.encoded) }

    @Test func eachFrameGivesThePartItCompletes() throws {
        let ends = try Ends()
        defer { ends.closeAll() }
        for part in Self.parts { try StateChannel.send(part, on: ends.fds[0], timeout: .seconds(5)) }
        var receiver = StateChannel.Receiver(ends.fds[1], timeout: .seconds(5))
        #expect(try receiver.next() == [.head(vm: Self.state.vm, vcpus: 3)])
        for (index, vcpu) in Self.state.vcpus.enumerated() {
            #expect(receiver.state == nil)
            #expect(try receiver.next() == [.vcpu(index: index, vcpu)])
        }
        #expect(receiver.state == Self.state)
        #expect(receiver.count == Self.state.encoded.count)
        #expect(receiver.digest == VMState.digest(Self.state.encoded))
    }

    /// The rehearsal a VMM runs before any blackout sends the state part by part through a
    /// socket pair and receives it as a target does: it comes back equal.
    @Test func theRehearsalCarriesTheStateThroughASocketPair() {
        #expect(StateChannel.rehearse(Self.state))
        #expect(StateChannel.rehearse(VMState(vm: [], vcpus: [])))
    }

    /// A state in one frame (as a test double or an older source sends it) is taken whole.
    @Test func aStateInOneFrame() throws {
        let ends = try Ends()
        defer { ends.closeAll() }
        try StateChannel.send(Self.state.encoded, on: ends.fds[0], timeout: .seconds(5))
        let (state, digest, count) = try StateChannel.receiveState(on: ends.fds[1], timeout: .seconds(5))
        #expect(state == Self.state)
        #expect(count == Self.state.encoded.count)
        #expect(digest == VMState.digest(Self.state.encoded))
    }

    /// A source that closes its end inside the state: the error says how much came.
    @Test func aSourceThatStopsInsideTheState() throws {
        let ends = try Ends()
        defer { ends.closeAll() }
        let parts = Self.parts
        for part in parts.prefix(2) { try StateChannel.send(part, on: ends.fds[0], timeout: .seconds(5)) }
        ends.close(0)
        var receiver = StateChannel.Receiver(ends.fds[1], timeout: .seconds(5))
        #expect(try receiver.next().count == 1)
        #expect(try receiver.next().count == 1)
        #expect {
            _ = try receiver.next()
        } throws: { error in
            isHandoffError(error, .closed, saying: "after \(parts[0].count + parts[1].count) bytes")
        }
        #expect(receiver.state == nil)
    }

    @Test func bytesPastTheStatesEndAreRefused() throws {
        let ends = try Ends()
        defer { ends.closeAll() }
        try StateChannel.send(Self.state.encoded + [9, 9], on: ends.fds[0], timeout: .seconds(5))
        #expect {
            _ = try StateChannel.receiveState(on: ends.fds[1], timeout: .seconds(5))
        } throws: { error in
            isHandoffError(error, .malformed, saying: "2 bytes after")
        }
    }

    @Test func aMalformedPartIsRefused() throws {
        let ends = try Ends()
        defer { ends.closeAll() }
        try StateChannel.send(Array("GMVS".utf8) + [9, 0, 0, 0, 0, 0], on: ends.fds[0], timeout: .seconds(5))
        #expect {
            _ = try StateChannel.receiveState(on: ends.fds[1], timeout: .seconds(5))
        } throws: { error in
            isHandoffError(error, .malformed, saying: "version 9")
        }
    }

    /// A frame may end anywhere inside a part: the part comes out with the frame that ends it.
    @Test func aFrameMayEndInsideAPart() throws {
        let ends = try Ends()
        defer { ends.closeAll() }
        let bytes = Self.state.encoded
        let cuts = [3, 11, 60, Self.parts[0].count + 5, bytes.count - 1, bytes.count]
        var from = 0
        for cut in cuts {
            try StateChannel.send(Array(bytes[from..<cut]), on: ends.fds[0], timeout: .seconds(5))
            from = cut
        }
        var receiver = StateChannel.Receiver(ends.fds[1], timeout: .seconds(5))
        var counts: [Int] = []
        while receiver.state == nil { counts.append(try receiver.next().count) }
        #expect(counts == [0, 0, 0, 1, 2, 1], "the head with the fourth frame, two vcpus with the fifth, the last with the sixth")
        #expect(receiver.state == Self.state)
    }

    /// A frame longer than what is left of the largest state is refused from its header, before
    /// its body is waited for or held.
    @Test func aFrameOverTheLargestStateIsRefusedFromItsHeader() throws {
        let ends = try Ends()
        defer { ends.closeAll() }
        let length = UInt32(HandoffMessage.maxAttachmentBytes + 1)
        let header = Array("GMS1".utf8) + [UInt8(length & 0xff), UInt8((length >> 8) & 0xff), UInt8((length >> 16) & 0xff), UInt8(length >> 24)]
        #expect(write(ends.fds[0], header, header.count) == header.count)
        #expect {
            _ = try StateChannel.receiveState(on: ends.fds[1], timeout: .seconds(5))
        } throws: { error in
            isHandoffError(error, .malformed, saying: "a frame of \(length)")
        }
    }

    /// A source that trickles a frame, a byte at a time, does not stretch the receipt past its
    /// one deadline (each wait inside the frame is bounded by what is left of it): 200 bytes at
    /// one every 20 ms would take 4 s.
    @Test func aTrickledFrameDoesNotStretchTheDeadline() throws {
        let ends = try Ends()
        defer { ends.closeAll() }
        // The thread's own descriptor, closed by it: the test's ends may close before it ends.
        let sender = dup(ends.fds[0])
        let stop = Flag()
        let thread = Thread {
            defer { close(sender) }
            var header = Array("GMS1".utf8) + [200, 0, 0, 0]
            _ = send(sender, &header, header.count, Int32(MSG_NOSIGNAL))
            for _ in 0..<200 where !stop.isSet {
                var byte: UInt8 = 0
                _ = send(sender, &byte, 1, Int32(MSG_NOSIGNAL))
                usleep(20_000)  // a trickle, not a wait on the test's condition
            }
        }
        thread.start()
        defer { stop.set() }
        let clock = ContinuousClock()
        let began = clock.now
        var receiver = StateChannel.Receiver(ends.fds[1], timeout: .milliseconds(150))
        #expect {
            while receiver.state == nil { _ = try receiver.next() }
        } throws: { error in
            isHandoffError(error, .timeout)
        }
        #expect(clock.now - began < .seconds(2), "the deadline held: \(clock.now - began)")
    }

    /// The whole receipt has one deadline: a source that sends the head and then nothing.
    @Test func theWholeStateHasOneDeadline() throws {
        let ends = try Ends()
        defer { ends.closeAll() }
        try StateChannel.send(Self.parts[0], on: ends.fds[0], timeout: .seconds(5))
        var receiver = StateChannel.Receiver(ends.fds[1], timeout: .milliseconds(100))
        #expect(try receiver.next().count == 1)
        #expect {
            _ = try receiver.next()
        } throws: { error in
            isHandoffError(error, .timeout)
        }
    }
}

/// Whether `error` is a HandoffError of `kind` whose message says `text`.
private func isHandoffError(_ error: any Error, _ kind: HandoffError.Kind, saying text: String = "") -> Bool {
    guard let error = error as? HandoffError else { return false }
    return error.kind == kind && (text.isEmpty || error.message.contains(text))
}

/// A flag one thread sets and another reads.
private final class Flag: @unchecked Sendable {
    // @unchecked: `value` is only touched under `lock`.
    private let lock = NSLock()
    private var value = false
    var isSet: Bool { lock.withLock { value } }
    func set() { lock.withLock { value = true } }
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
