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

/// A VMM that answers as a test says: for what the coordinator side does with each answer.
final class ScriptedVMM: HandoffHandler, @unchecked Sendable {
    // @unchecked: `answers` is set before the server thread starts and read only by it.
    var answers: [String: (HandoffMessage) -> HandoffMessage?] = [:]
    /// A pause's answer when it carries a state channel: these bytes go on it (and their digest
    /// in the reply), as a source VMM sends its state.
    var sendsStateOnChannel: [UInt8]?
    private(set) var exitRequested = false

    func handle(_ request: HandoffMessage, descriptors: [Int32]) -> (HandoffMessage, [Int32]) {
        defer { for descriptor in descriptors { close(descriptor) } }
        if let answer = answers[request.type] {
            // nil: no answer at all (the VMM stalls as if stuck in the request).
            guard let reply = answer(request) else {
                Thread.sleep(forTimeInterval: 1)
                return (HandoffMessage(type: "ok", id: request.id), [])
            }
            return (reply, [])
        }
        if request.type == "pause", descriptors.count == 2, !PauseTrigger.armed(descriptors[1], spin: .zero, timeout: .seconds(5)) {
            // An armed pause whose trigger closed unfired, as tinyvmm answers it.
            var reply = HandoffMessage(type: "error", id: request.id)
            reply.message = "pause: not requested"
            return (reply, [])
        }
        if request.type == "pause", let bytes = sendsStateOnChannel, let channel = descriptors.first {
            var reply = HandoffMessage(type: "ok", id: request.id)
            do {
                try StateChannel.send(bytes, on: channel, timeout: .seconds(5))
                reply.stateDigest = VMState.digest(bytes)
            } catch {
                reply = HandoffMessage(type: "error", id: request.id)
                reply.message = error.message
            }
            return (reply, [])
        }
        if request.type == "hello" { return (helloReply(request), []) }
        if request.type == "shutdown" { exitRequested = true }
        return (HandoffMessage(type: "ok", id: request.id), [])
    }

    static func error(_ message: String) -> (HandoffMessage) -> HandoffMessage? {
        { request in
            var reply = HandoffMessage(type: "error", id: request.id)
            reply.message = message
            reply.errno = 5
            return reply
        }
    }

}

/// A scripted VMM's answer to hello: this protocol version, on Linux, no guest running.
func helloReply(_ request: HandoffMessage) -> HandoffMessage {
    var reply = HandoffMessage(type: "ok", id: request.id)
    reply.version = HandoffMessage.protocolVersion
    reply.backend = "linux"
    reply.running = false
    return reply
}

extension HandoffHandler where Self: Sendable {
    /// Serves on a thread of its own; stopped by a `shutdown` request.
    func serve(at socket: String) -> Thread {
        let thread = Thread { [self] in try? HandoffServer(socket: socket, allowed: [0, getuid()], log: { _ in }, handler: self).serve() }
        thread.start()
        _ = waitUntil(5) { HandoffConnection.probe(path: socket) == 0 }
        return thread
    }
}

@Suite("VMM endpoints report what happened", .serialized)
struct EndpointTests {
    /// An undo whose request the VMM refuses is a failure, never an `ok`.
    @Test func anUndoTheVMMRefusesFails() throws {
        let directory = temporaryDirectory("gmigrate-endpoint")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let socket = directory + "/vmm.sock"
        let vmm = ScriptedVMM()
        vmm.answers["release-memory"] = ScriptedVMM.error("the memory is busy")
        vmm.answers["unbind"] = ScriptedVMM.error("slot 0 is in use")
        vmm.answers["destroy"] = ScriptedVMM.error("cannot destroy")
        _ = vmm.serve(at: socket)
        let remote = try RemoteVMM(role: "target", socketPath: socket, timeout: .seconds(2))
        defer { remote.shutdown() }
        #expect(throws: EndpointError.self) { try remote.releaseMemory() }
        #expect(throws: EndpointError.self) { try remote.unbind([]) }
        #expect(throws: EndpointError.self) { try remote.destroy() }
    }

    /// A request whose answer never comes fails as uncertain (its effect may have happened), and
    /// the next request does not take the late answer for its own: it reconnects.
    @Test func anUnansweredRequestIsUncertainAndTheNextReconnects() throws {
        let directory = temporaryDirectory("gmigrate-endpoint")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let socket = directory + "/vmm.sock"
        let vmm = ScriptedVMM()
        vmm.answers["restore"] = { _ in nil }
        _ = vmm.serve(at: socket)
        let remote = try RemoteVMM(role: "target", socketPath: socket, timeout: .milliseconds(200))
        defer { remote.shutdown() }
        do {
            try remote.restore(VMState(vm: [], vcpus: []))
            Issue.record("a restore that is never answered succeeded")
        } catch {
            #expect(error.uncertain, "\(error)")
        }
        remote.setTimeout(.seconds(5))
        let status = try remote.status()
        #expect(status.running == false, "the next request gets its own answer")
    }

    /// A VMM that is gone has nothing left to undo or retire: the undo succeeds, and says why.
    @Test func aGoneVMMIsUndoneAndRetired() throws {
        let directory = temporaryDirectory("gmigrate-endpoint")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let socket = directory + "/vmm.sock"
        let vmm = ScriptedVMM()
        let thread = vmm.serve(at: socket)
        let remote = try RemoteVMM(role: "source", socketPath: socket, timeout: .seconds(2))
        // The VMM ends: its socket goes away.
        remote.shutdown()
        #expect(waitUntil(5) { thread.isFinished && HandoffConnection.probe(path: socket) != 0 })
        try remote.destroy()
        let note = try remote.retire()
        #expect(note?.contains("gone") == true, "\(note ?? "nil")")
        #expect(remote.observe().liveness == .gone)
    }
}

/// The dry run rehearses socket plans too: the source VMM only describes its VM.
@Suite("Dry runs of socket plans", .serialized)
struct SocketDryRunTests {
    @Test func aSocketPlanIsRehearsedOnTheModel() throws {
        _ = try Backend.linux.make()
        let fixture = try ProcessFixture(strategy: "share")
        defer { fixture.finish() }
        let before = try RemoteVMM(role: "test", socketPath: fixture.sourceSocket, timeout: .seconds(2)).status()
        let result = try gmigrate(["migrate", fixture.plan, "--dry-run", "--state-dir", fixture.directory])
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        #expect(result.stdout.contains("describes the plan's VM"), "\(result.stdout)")
        #expect(result.stdout.contains("dry run: rehearsed on the model"))
        #expect(!FileManager.default.fileExists(atPath: fixture.directory + "/journal"), "a dry run journals nowhere")
        // The source VMM's guest was not touched: it runs on, counting.
        let after = try RemoteVMM(role: "test", socketPath: fixture.sourceSocket, timeout: .seconds(2)).status()
        #expect(before.running && after.running)
        #expect((after.counter ?? 0) >= (before.counter ?? 0))
        // A fault the rehearsal hits rolls it back, as the real run would.
        let failing = try gmigrate(["migrate", fixture.plan, "--dry-run", "--inject", "kernel:set-memslot=errno:EEXIST"])
        #expect(failing.status == 6, "\(failing.stdout)")
        // A plan whose VM is not the source's: refused, with the difference.
        let other = fixture.directory + "/other.yaml"
        try String(contentsOfFile: fixture.plan, encoding: .utf8).replacingOccurrences(of: "vcpus: 2", with: "vcpus: 3").write(toFile: other, atomically: true, encoding: .utf8)
        let mismatch = try gmigrate(["migrate", other, "--dry-run"])
        #expect(mismatch.status == 4, "\(mismatch.stdout)\(mismatch.stderr)")
        #expect(mismatch.stderr.contains("2 vcpus, the plan says 3"), "\(mismatch.stderr)")
    }
}

/// A target that stages what comes on the state channel a stage-state carries, as tinyvmm does
/// (`StateChannel.receiveState`), and records what it saw.
final class ChannelTarget: HandoffHandler, @unchecked Sendable {
    // @unchecked: `seen` is written by the server thread and read under `lock`.
    private let lock = NSLock()
    private var seen: [String] = []
    private(set) var exitRequested = false

    var outcomes: [String] { lock.withLock { seen } }

    func handle(_ request: HandoffMessage, descriptors: [Int32]) -> (HandoffMessage, [Int32]) {
        defer { for descriptor in descriptors { close(descriptor) } }
        if request.type == "hello" { return (helloReply(request), []) }
        if request.type == "shutdown" { exitRequested = true }
        guard request.type == "stage-state", let channel = descriptors.first else {
            lock.withLock { seen.append(request.type) }
            return (HandoffMessage(type: "ok", id: request.id), [])
        }
        do {
            let (_, digest, count) = try StateChannel.receiveState(on: channel, timeout: .seconds(5))
            lock.withLock { seen.append("state of \(count) bytes") }
            var reply = HandoffMessage(type: "ok", id: request.id)
            reply.stateDigest = digest
            return (reply, [])
        } catch {
            lock.withLock { seen.append(error.kind == .closed ? "closed" : "\(error.message)") }
            var reply = HandoffMessage(type: "error", id: request.id)
            reply.message = "stage-state: no state came from the source: \(error.message)"
            return (reply, [])
        }
    }
}

/// A scripted source and a channel target, each served on a socket of its own, and the
/// coordinator's endpoints to them; all shut down, and the directory removed, at the end.
final class PreparedPair {
    let directory = temporaryDirectory("gmigrate-prepared")
    let source = ScriptedVMM()
    let target = ChannelTarget()
    let sourceVMM: RemoteVMM
    let targetVMM: RemoteVMM

    init(timeout: Duration = .seconds(5), script: (ScriptedVMM) -> Void = { _ in }) throws {
        script(source)
        _ = source.serve(at: directory + "/source.sock")
        _ = target.serve(at: directory + "/target.sock")
        sourceVMM = try RemoteVMM(role: "source", socketPath: directory + "/source.sock", timeout: timeout)
        targetVMM = try RemoteVMM(role: "target", socketPath: directory + "/target.sock", timeout: timeout)
    }

    deinit {
        sourceVMM.shutdown()
        targetVMM.shutdown()
        try? FileManager.default.removeItem(atPath: directory)
    }
}

@Suite("A pause prepared before it is requested", .serialized)
struct PreparedPauseTests {
    /// The target is asked to stage before the pause is requested (so that the blackout holds
    /// neither the request nor its wake-up). A prepared pause the coordinator then does not
    /// request is abandoned: the target hears the state channel close and answers that no state
    /// came, and that answer is read, so that the target's next request gets its own.
    @Test func anAbandonedPauseLeavesTheTargetAnsweringItsNextRequest() throws {
        let pair = try PreparedPair()
        let (target, sourceVMM, targetVMM) = (pair.target, pair.sourceVMM, pair.targetVMM)
        defer { withExtendedLifetime(pair) {} }  // shut down at the end, not after its last use

        sourceVMM.preparePause(stagingIn: targetVMM)
        // The target waits on the channel and the source on its trigger; the source is asked
        // something else instead of the pause.
        _ = try sourceVMM.status()
        #expect(target.outcomes == ["closed"])
        // The target's next request is answered as its own (a stale stage-state reply would
        // fail it as an answer to another request).
        _ = try targetVMM.status()
        #expect(target.outcomes == ["closed", "status"])
    }

    /// The same when the target is asked something first: the source's prepared pause is
    /// abandoned before that request goes, and both VMMs answer their next requests.
    @Test func askingTheTargetFirstAbandonsThePreparedPause() throws {
        let pair = try PreparedPair()
        let (target, sourceVMM, targetVMM) = (pair.target, pair.sourceVMM, pair.targetVMM)
        defer { withExtendedLifetime(pair) {} }  // shut down at the end, not after its last use

        sourceVMM.preparePause(stagingIn: targetVMM)
        _ = try targetVMM.status()
        #expect(target.outcomes == ["closed", "status"])
        _ = try sourceVMM.status()
    }

    /// A source that refuses the armed pause (here: any pause) closes the trigger and the
    /// channel at once: the preparation does not wait out the timeout, the pause fails with
    /// the source's own answer, and the target hears that no state comes.
    @Test(.timeLimit(.minutes(1))) func aRefusedArmedPauseFailsAtOnce() throws {
        // Timeouts beyond the test's time limit: a wait for either would fail the test.
        let pair = try PreparedPair(timeout: .seconds(600)) { $0.answers["pause"] = ScriptedVMM.error("pause is refused: this VMM is building") }
        let (target, sourceVMM, targetVMM) = (pair.target, pair.sourceVMM, pair.targetVMM)
        defer { withExtendedLifetime(pair) {} }  // shut down at the end, not after its last use

        sourceVMM.preparePause(stagingIn: targetVMM)
        do {
            _ = try sourceVMM.pause(stagingIn: targetVMM)
            Issue.record("a refused pause succeeded")
        } catch {
            guard case .source(let refusal) = error else { Issue.record("not the source's refusal: \(error)"); return }
            #expect(refusal.message.contains("this VMM is building"), "\(refusal.message)")
        }
        #expect(target.outcomes == ["closed"])
    }

    /// A prepared pause that is requested goes over the prepared channel: the target stages
    /// what the source sends on it, once.
    @Test func aRequestedPauseUsesThePreparedChannel() throws {
        let state = VMState(vm: [StateSection(name: "clock", bytes: [1, 2, 3])], vcpus: [])
        let pair = try PreparedPair { $0.sendsStateOnChannel = state.encoded }
        let (target, sourceVMM, targetVMM) = (pair.target, pair.sourceVMM, pair.targetVMM)
        defer { withExtendedLifetime(pair) {} }  // shut down at the end, not after its last use

        sourceVMM.preparePause(stagingIn: targetVMM)
        let staged = try sourceVMM.pause(stagingIn: targetVMM)
        #expect(staged.digest == VMState.digest(state.encoded))
        #expect(target.outcomes == ["state of \(state.encoded.count) bytes"])
    }
}
