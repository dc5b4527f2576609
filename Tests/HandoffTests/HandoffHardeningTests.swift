import CKVM
import Foundation
import GmigrateTestKit
import GmigrateTestSupport
import Guests
import Handoff
import Journal
import Kernel
import Orchestrator
import Plans
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite("Hostile peers and hosts: VMM requests", .serialized)
struct VMMRequestHardeningTests {
    /// Requests within the protocol's types but outside the VM: each answered by an error, and
    /// the VMM and its guest live on.
    @Test func outOfRangeRequestsAreAnsweredNotFatal() throws {
        let vmm = try VMMUnderTest("ranges", source: true)
        defer { vmm.stop() }
        let peer = try RawPeer(vmm.socket)
        // The demo's slot is 2 MiB at 0: 16 bytes from its last 8 leave it.
        for (gpa, count) in [(UInt64(2 << 20) - 8, 16), (UInt64(2 << 20) - 1, 2), (UInt64.max - 4, 16), (0, Int.max)] {
            let reply = try peer.ask("read-guest") {
                $0.gpa = gpa
                $0.count = count
            }
            if count == Int.max {
                // Clamped to 64 KiB by the VMM: inside the slot, answered.
                #expect(reply.type == "ok")
            } else {
                #expect(reply.type == "error", "read-guest of \(count) bytes at 0x\(String(gpa, radix: 16))")
            }
        }
        let target = try VMMUnderTest("ranges-target", source: false)
        defer { target.stop() }
        let empty = try RawPeer(target.socket)
        for vcpus in [-1, 0, 1 << 40, Int.max, Int.min] {
            let reply = try empty.ask("create-vm") {
                $0.vmType = .default
                $0.vcpus = vcpus
            }
            #expect(reply.type == "error", "create-vm with \(vcpus) vcpus")
            #expect(reply.message?.contains("vcpus") == true)
        }
        #expect(vmm.process.isRunning && target.process.isRunning)
        let status = try peer.ask("status")
        #expect(status.running == true, "the source's guest runs on")
    }

    /// A running source refuses what only a target being built may be asked; a target being
    /// built refuses what only a source may be asked. Its status stays true.
    @Test func requestsOutsideTheVMMsPhaseAreRefused() throws {
        let source = try VMMUnderTest("phase-source", source: true)
        defer { source.stop() }
        let peer = try RawPeer(source.socket)
        for type in ["unbind", "release-memory", "stage-state", "destroy", "bind", "create-vm"] {
            let reply = try peer.ask(type) {
                $0.slots = []
                $0.strategy = .share
                $0.vmType = .default
                $0.vcpus = 2
            }
            #expect(reply.type == "error" && reply.message?.contains("this VMM is running") == true, "a running source refuses \(type): \(reply)")
        }
        // restore again (a coordinator repeating resume-target after a crash): ok, a no-op.
        #expect(try peer.ask("restore").type == "ok", "a running VMM answers a repeated restore ok")
        let status = try peer.ask("status")
        #expect(status.running == true, "status says running, and it is")
        let counter = status.counter ?? 0
        #expect(waitUntil(5) { ((try? peer.ask("status"))?.counter ?? 0) > counter }, "the guest still counts")

        let target = try VMMUnderTest("phase-target", source: false)
        defer { target.stop() }
        let empty = try RawPeer(target.socket)
        for type in ["pause", "retire", "resume", "describe", "restore", "bind"] {
            let reply = try empty.ask(type) {
                $0.slots = []
                $0.strategy = .share
            }
            #expect(reply.type == "error" && reply.message?.contains("this VMM is empty") == true, "an empty target refuses \(type): \(reply)")
        }
        #expect(try empty.ask("create-vm") { $0.vmType = .default; $0.vcpus = 2 }.type == "ok")
        for type in ["pause", "retire"] {
            let reply = try empty.ask(type)
            #expect(reply.type == "error" && reply.message?.contains("this VMM is building") == true, "a target being built refuses \(type)")
        }
    }

    /// A descriptor's kind is checked exactly: a memfd named `kvm-gmem` is not a guest_memfd,
    /// and a guest_memfd smaller than its description is not mapped as the larger one.
    @Test func forgedDescriptorsAreRefused() throws {
        _ = try Backend.linux.make()
        let target = try VMMUnderTest("forged", source: false, backend: "linux")
        defer { target.stop() }
        let peer = try RawPeer(target.socket)
        #expect(try peer.ask("create-vm") { $0.vmType = .default; $0.vcpus = 1 }.type == "ok")
        let gmem = try JSONDecoder().decode(
            VMDescription.Gmem.self, from: Data(#"{"name": "ram", "size": 2097152, "flags": 3, "inode": {"device": 1, "inode": 1}}"#.utf8))
        // A file whose path holds the kind's name: a substring check took it for a guest_memfd.
        let impostor = target.directory + "/anon_inode:[kvm-gmem]"
        #expect(FileManager.default.createFile(atPath: impostor, contents: Data(count: 2 << 20)))
        let memfd = open(impostor, O_RDWR)
        #expect(memfd >= 0)
        defer { close(memfd) }
        var request = HandoffMessage(type: "receive-memory", id: 0)
        request.gmem = gmem
        request.strategy = .share
        let forged = try peer.ask(request, descriptors: [memfd])
        #expect(forged.type == "error")
        #expect(forged.message?.contains("received [\(impostor)]") == true, "the refusal names what came: \(forged.message ?? "")")
        // A real guest_memfd of 4 KiB described as 2 MiB.
        let kernel = try LinuxKVM()
        let vm = try kernel.createVirtualMachine()
        let small = try vm.createGuestMemfd(size: 4096, flags: [.mmap, .initShared])
        let short = try peer.ask(request, descriptors: [small.handle.raw])
        #expect(short.type == "error")
        #expect(short.message?.contains("holds 4096 bytes") == true, "\(short.message ?? "")")
        #expect(target.process.isRunning)
    }
}

@Suite("Hostile peers and hosts: the VMM's socket", .serialized)
struct VMMSocketHardeningTests {
    /// A peer that connects and sends nothing is closed after the first-request timeout; the
    /// next coordinator is served.
    @Test func anIdlePeerDoesNotHoldTheVMM() throws {
        let vmm = try VMMUnderTest("idle", source: false)
        defer { vmm.stop() }
        let idle = try HandoffConnection.connect(path: vmm.socket)
        _ = idle
        let began = ContinuousClock.now
        let status = try RemoteVMM(role: "test", socketPath: vmm.socket, timeout: .seconds(20)).status()
        #expect(status.running == false)
        #expect(ContinuousClock.now - began < .seconds(15), "served once the idle peer was dropped")
        #expect(vmm.log.contains("dropping the connection"))
    }
}

/// The armed pause (protocol 6): the source readies itself and stops its guest only when the
/// coordinator's byte comes on the trigger.
@Suite("An armed pause", .serialized)
struct ArmedPauseTests {
    /// Sends an armed pause (state channel and trigger) and waits for the source's ready byte;
    /// returns the coordinator's ends of both.
    static func arm(_ peer: RawPeer) throws -> (channel: Int32, trigger: Int32) {
        var channel: [Int32] = [-1, -1]
        var trigger: [Int32] = [-1, -1]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &channel) == 0)
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &trigger) == 0)
        var pause = HandoffMessage(type: "pause", id: 7)
        pause.timeoutMilliseconds = 5_000
        try peer.connection.send(pause, descriptors: [channel[1], trigger[1]])
        close(channel[1])
        close(trigger[1])
        #expect(PauseTrigger.waitReady(trigger[0], timeout: .seconds(5)), "the source says it is ready")
        return (channel[0], trigger[0])
    }

    /// Whether the guest runs and its counter goes on (asked on the test's own connection: a
    /// VMM serves one at a time).
    static func counts(_ peer: RawPeer) -> Bool {
        guard let first = try? peer.ask("status"), first.running == true, let before = first.counter else { return false }
        return waitUntil(5) { ((try? peer.ask("status"))?.counter).map { $0 > before } ?? false }
    }

    /// Not fired: the source answers that no pause was requested, sends no state (its end of
    /// the channel closes), and its guest counts on.
    @Test func anArmedPauseNotFiredLeavesTheGuestRunning() throws {
        let source = try VMMUnderTest("armed-unfired", source: true)
        defer { source.stop() }
        let peer = try RawPeer(source.socket)
        let (channel, trigger) = try Self.arm(peer)
        defer { close(channel) }
        close(trigger)
        let (reply, _) = try peer.connection.receive()
        #expect(reply.type == "error" && reply.message?.contains("not requested") == true, "\(reply)")
        do {
            _ = try StateChannel.receive(on: channel, timeout: .seconds(5))
            Issue.record("a state came from a pause that was not requested")
        } catch {
            #expect(error.kind == .closed, "the source closed the channel unused: \(error)")
        }
        #expect(Self.counts(peer), "the guest counts on")
    }

    /// Fired: the source pauses, sends its state on the channel part by part (version 7: its
    /// head, then each vcpu, a frame each), and answers the digest of all it sent.
    @Test func anArmedPauseFiredPausesAndSendsTheState() throws {
        let source = try VMMUnderTest("armed-fired", source: true)
        defer { source.stop() }
        let peer = try RawPeer(source.socket)
        let (channel, trigger) = try Self.arm(peer)
        defer { close(channel) }
        #expect(PauseTrigger.fire(trigger))
        close(trigger)
        var receiver = StateChannel.Receiver(channel, timeout: .seconds(5))
        var frames: [[VMState.StreamDecoder.Part]] = []
        while receiver.state == nil { frames.append(try receiver.next()) }
        let state = try #require(receiver.state)
        #expect(state.vcpus.count == 2)
        #expect(frames.map { $0.map(\.label) } == [["head"], ["vcpu 0"], ["vcpu 1"]], "one frame a part")
        // What came is the state's whole encoding, as one frame would have carried it.
        #expect(receiver.count == state.encoded.count && receiver.digest == VMState.digest(state.encoded))
        let (reply, _) = try peer.connection.receive()
        #expect(reply.type == "ok" && reply.running == false, "\(reply)")
        #expect(reply.stateDigest == receiver.digest)
        #expect(try peer.ask("status").running == false, "paused")
        #expect(try peer.ask("resume").type == "ok")
        #expect(Self.counts(peer), "the guest counts on once resumed")
    }

    /// A pause parks the vcpu threads it stopped (ending them took the CPU the state's save
    /// needs, inside the blackout) and a resume lets them end: pause after pause, the source
    /// holds one thread a vcpu.
    @Test func aPauseParksTheVCPUThreadsAndAResumeEndsThem() throws {
        let source = try VMMUnderTest("parked", source: true)
        defer { source.stop() }
        let peer = try RawPeer(source.socket)
        let tasks = "/proc/\(source.process.processIdentifier)/task"
        func vcpuThreads() -> Int {
            let ids = (try? FileManager.default.contentsOfDirectory(atPath: tasks)) ?? []
            return ids.filter { id in
                ((try? String(contentsOfFile: "\(tasks)/\(id)/comm", encoding: .utf8)) ?? "").hasPrefix("vcpu")
            }.count
        }
        #expect(waitUntil(5) { vcpuThreads() == 2 }, "one thread a vcpu while the guest runs: \(vcpuThreads())")
        for round in 1...3 {
            try peer.connection.send(HandoffMessage(type: "pause", id: 100 + round))
            let (paused, _, _) = try peer.connection.receiveAttached()
            #expect(paused.type == "ok" && paused.running == false, "\(paused)")
            #expect(vcpuThreads() == 2, "round \(round): the stopped threads are parked, not ended")
            #expect(try peer.ask("resume").type == "ok")
            #expect(waitUntil(5) { vcpuThreads() == 2 }, "round \(round): the parked threads ended beside the new ones: \(vcpuThreads())")
            #expect(Self.counts(peer), "round \(round): the guest counts on")
        }
    }
}

extension VMState.StreamDecoder.Part {
    /// Which part: "head", or "vcpu N".
    var label: String {
        switch self {
        case .head: "head"
        case .vcpu(let index, _): "vcpu \(index)"
        }
    }
}
