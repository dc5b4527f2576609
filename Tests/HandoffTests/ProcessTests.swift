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

@Suite("Migrations between VMM processes", .serialized)
struct ProcessTests {
    @Test("a live guest moves between two real tinyvmm processes; copy's own memory holds the paused guest's last count", arguments: ["share", "copy"])
    func liveMigration(_ strategy: String) throws {
        _ = try Backend.linux.make()
        let fixture = try ProcessFixture(strategy: strategy)
        defer { fixture.finish() }
        let result = try fixture.migrate()
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        let report = try #require(try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any])
        let summary = try #require(report["summary"] as? [String: Any])
        #expect(summary["state"] as? String == "completed")
        let verification = try #require(report["verification"] as? [String: Any])
        let atPause = try #require(verification["counterAtPause"] as? Int)
        #expect(atPause > 0, "the guest counted in the source")
        #expect((verification["counterAfter"] as? Int ?? 0) > atPause, "the guest goes on counting in the target")
        let source = verification["sourceInodes"] as? [String: String]
        let target = verification["targetInodes"] as? [String: String]
        #expect((source == target) == (strategy == "share"))
        let contents = try fixture.journal()
        checkJournal(contents, expect: .completed)
        let switchOver = SwitchOver(contents)
        #expect(switchOver.memoryAgreesWithRegisters, "memory and eax agree at the pause: \(switchOver)")
        // With copy the target's memory is its own: the paused guest's count must be in it.
        #expect(switchOver.counterAtRestore == switchOver.counterAtPause, "the target's memory at the restore: \(switchOver)")
        // The blackout is the guest's: from the pause request to the target's last vcpu entering
        // KVM_RUN, as the target says (`heard`, the coordinator's own end, is there only when it
        // took the target's instant, which must lie within the restore it asked for).
        let blackout = try #require(summary["blackoutNanoseconds"] as? Int)
        let parts = try #require(summary["blackoutParts"] as? [String: Int])
        _ = try #require(parts["heard"], "the target said when its vcpus entered KVM_RUN: \(parts)")
        #expect(blackout > 0)
        // The source says when its vcpus had stopped: after the request, before it answered.
        let paused = try #require(parts["vmm.paused"], "the source said when its vcpus stopped: \(parts)")
        #expect(paused > 0 && paused <= (parts["pause-source"] ?? 0))
        // The coordinator held the host's CPU latency request at 0 through the blackout where it
        // may (root, the device there), and said why not elsewhere.
        let pause = try #require(contents.entries.outcomes.first { $0.step == .pauseSource && $0.ok })
        let held = pause.details["cpu-latency"]
        if ProcessInfo.processInfo.environment["GMIGRATE_CPU_LATENCY_HOLD"] == "off" {
            #expect(held == nil, "\(pause.details)")
        } else if getuid() == 0 && FileManager.default.fileExists(atPath: "/dev/cpu_dma_latency") {
            #expect(held == "held at 0us", "\(pause.details)")
        } else {
            #expect(held?.hasPrefix("not held: /dev/cpu_dma_latency: ") == true, "\(pause.details)")
        }
        // The source process retired its VM and exited. Foundation reaps its own child: asked
        // through `isAlive` (whose waitpid reaps it first) it could miss the exit and trap in
        // `terminationStatus`, which crashed a CI run.
        let exited = waitUntil { !fixture.source.isRunning }
        #expect(exited, "the source process exits once it retired its VM")
        if exited { #expect(fixture.source.terminationStatus == 0) }
        // Its journal is finished, and stays so: nothing (a watcher's note) follows the record.
        let list = try gmigrate(["journal", "list", "--state-dir", fixture.directory])
        #expect(list.stdout.contains("demo-processes  completed"), "\(list.stdout)")
        let recover = try gmigrate(["recover", "--state-dir", fixture.directory])
        #expect(recover.stdout.contains("nothing to recover"), "\(recover.stdout)")
    }

    @Test("link between two tinyvmm processes on a shared model host")
    func modelLink() throws {
        let fixture = try ProcessFixture(strategy: "link", backend: "model")
        defer { fixture.finish() }
        let result = try fixture.migrate()
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        let report = try #require(try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any])
        let verification = try #require(report["verification"] as? [String: Any])
        let atPause = try #require(verification["counterAtPause"] as? Int)
        #expect(verification["counterAtResume"] as? Int == atPause)
        #expect(verification["sourceInodes"] as? [String: String] == verification["targetInodes"] as? [String: String])
        checkJournal(try fixture.journal(), expect: .completed)
    }

    /// The crash matrix: the coordinator ends at every step point (a real `_exit`, as SIGKILL
    /// would end it: no cleanup), the VMMs outlive it, `gmigrate recover` replays the journal into
    /// the machine and finishes; exactly one VMM runs the guest, with memory and registers
    /// consistent. share and copy on the real kernel, link on a model host.
    static let crashCases: [(strategy: String, backend: String, point: String)] = {
        var cases: [(String, String, String)] = []
        for (strategy, backend) in [("share", "linux"), ("copy", "linux"), ("link", "model")] {
            let steps = MigrationMachine.steps(strategy: Strategy(rawValue: strategy)!, confidential: false)
            for step in steps { cases += [(strategy, backend, "before:\(step.rawValue)"), (strategy, backend, "after:\(step.rawValue)")] }
        }
        return cases
    }()

    @Test("the coordinator killed at every step point, then recover", arguments: 0..<crashCases.count)
    func coordinatorKilled(_ index: Int) throws {
        let (strategy, backend, point) = Self.crashCases[index]
        if backend == "linux" { _ = try Backend.linux.make() }
        let fixture = try ProcessFixture(strategy: strategy, backend: backend)
        defer { fixture.finish() }
        let crashed = try fixture.migrate(["--inject", "\(point)=crash"], json: false)
        #expect(crashed.status == FaultInjector.crashStatus, "\(crashed.stdout)\(crashed.stderr)")
        let before = try fixture.journal()
        let started = try #require(before.started)
        #expect(before.finished == nil, "the crash left the migration unfinished")
        let recover = try gmigrate(["recover", "--state-dir", fixture.directory])
        #expect(recover.status == 0, "\(recover.stdout)\(recover.stderr)")
        let contents = try fixture.journal()
        checkJournal(contents)
        let finished = try #require(contents.finished)
        // Before the point of no return the migration rolls back; from it on, forward.
        let pastPointOfNoReturn = MigrationMachine(replaying: before.entries.map(\.event)).pastPointOfNoReturn
        #expect(finished.state == (pastPointOfNoReturn ? .completed : .rolledBack), "\(point): \(finished.reason)")
        let survivors = runningGuest([fixture.sourceSocket, started.targetSocket ?? ""])
        #expect(survivors.count == 1, "exactly one running guest: \(survivors)")
        let expected = finished.state == .completed ? started.targetSocket : fixture.sourceSocket
        #expect(survivors.first?.socket == expected)
        #expect(fixture.counterBefore > 0)
        if let survivor = survivors.first { #expect(survivor.counter >= fixture.counterBefore, "no reset") }
        let switchOver = SwitchOver(contents)
        if finished.state == .completed {
            // The target started from the paused guest: its memory holds the count the registers had.
            #expect(switchOver.memoryAgreesWithRegisters, "\(switchOver)")
            #expect(switchOver.counterAtRestore == switchOver.counterAtPause, "\(point): the target's memory at the restore: \(switchOver)")
        }
        // The other VMM is gone.
        let other = finished.state == .completed ? fixture.source.processIdentifier : contents.targetPID
        if let other { #expect(waitUntil { !isAlive(other) }, "the other VMM exits") }
        // What was printed before the crash reached the pipe (an injected crash flushes first):
        // the step timeline up to the crash, the crashed step's own line after its outcome.
        let step = String(point.split(separator: ":")[1])
        if point != "before:prepare" { #expect(crashed.stdout.contains("  prepare "), "\(crashed.stdout)") }
        if point.hasPrefix("after:") { #expect(crashed.stdout.contains("  \(step) "), "\(crashed.stdout)") }
    }

    /// kill -9 of the coordinator itself (not an injected exit) while it waits at a step.
    @Test("the coordinator killed with SIGKILL, then recover", arguments: ["before:bind-memslots", "before:retire-source"])
    func coordinatorSIGKILL(_ point: String) throws {
        _ = try Backend.linux.make()
        let fixture = try ProcessFixture(strategy: "share")
        defer { fixture.finish() }
        let result = try killDuring(fixture, point: point, killCoordinator: true) { _ in 0 }
        #expect(result.status == SIGKILL || result.status == 128 + SIGKILL, "killed: \(result.status)")
        let started = try fixture.started()
        let recover = try gmigrate(["recover", "--state-dir", fixture.directory])
        #expect(recover.status == 0, "\(recover.stdout)\(recover.stderr)")
        let contents = try fixture.journal()
        checkJournal(contents, expect: point == "before:retire-source" ? .completed : .rolledBack)
        let survivors = runningGuest([fixture.sourceSocket, started.targetSocket ?? ""])
        #expect(survivors.count == 1, "exactly one running guest: \(survivors)")
        if let survivor = survivors.first { #expect(survivor.counter >= fixture.counterBefore, "no reset") }
    }

    @Test("the source VMM killed mid-migration", arguments: [
        ("before:verify-bindings", TerminalState.lost), ("before:resume-target", TerminalState.completed),
    ])
    func sourceKilled(_ point: String, _ expected: TerminalState) throws {
        _ = try Backend.linux.make()
        let fixture = try ProcessFixture(strategy: "share")
        defer { fixture.finish() }
        let result = try killDuring(fixture, point: point) { _ in fixture.source.processIdentifier }
        let contents = try fixture.journal()
        checkJournal(contents, expect: expected)
        let started = try fixture.started()
        let survivors = runningGuest([started.targetSocket ?? ""])
        if expected == .completed {
            #expect(result.status == 0, "\(result.stdout)")
            #expect(survivors.count == 1, "the target runs the guest: the source had paused and handed it over")
        } else {
            #expect(result.status == 13, "lost has its own exit code, which recover cannot help: \(result.stdout)")
            #expect(survivors.isEmpty)
            #expect(contents.finished?.reason.contains("source VMM") == true, "a clear report: \(contents.finished?.reason ?? "")")
            // Recover has nothing to do: the journal is finished.
            let recover = try gmigrate(["recover", "--state-dir", fixture.directory])
            #expect(recover.status == 0 && recover.stdout.contains("nothing to recover"))
        }
    }

    @Test("the target VMM killed mid-migration", arguments: ["before:bind-memslots", "before:resume-target"])
    func targetKilled(_ point: String) throws {
        _ = try Backend.linux.make()
        let fixture = try ProcessFixture(strategy: "share")
        defer { fixture.finish() }
        let result = try killDuring(fixture, point: point) { contents in contents.targetPID ?? 0 }
        #expect(result.status == 6, "rolled back: \(result.stdout)")
        checkJournal(try fixture.journal(), expect: .rolledBack)
        let survivors = runningGuest([fixture.sourceSocket])
        #expect(survivors.count == 1, "the source runs the guest again")
    }

    /// copy moves what the guest populated, not the size of its memory: a sparse 8 GiB guest with
    /// 64 MiB written copies 64 MiB (and the guest's two pages of program and counter), and the
    /// target's memory holds what the source's did, page by page.
    @Test func copyMovesOnlyPopulatedPages() throws {
        _ = try Backend.linux.make()
        let fixture = try ProcessFixture(strategy: "copy", extra: ["--populate", "64Mi", "--populate-at", "0x40000000"]) { plan in
            plan.replacingOccurrences(of: "size: 2Mi", with: "size: 8Gi")
        }
        defer { fixture.finish() }
        let result = try fixture.migrate()
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        let contents = try fixture.journal()
        checkJournal(contents, expect: .completed)
        let copy = try #require(contents.entries.outcomes.first { $0.step == .copyMemory && $0.ok })
        let copied = try #require(copy.details["bytes-copied"].flatMap { UInt64($0) })
        #expect(copy.details["bytes-total"] == "\(8 << 30)")
        #expect(copied >= 64 << 20 && copied <= (64 << 20) + (64 << 10), "copied \(copied) bytes of a guest that populated 64 MiB and its program")
        let target = try RemoteVMM(role: "test", socketPath: try #require(contents.started?.targetSocket), timeout: .seconds(5))
        for page: UInt64 in [0x40000, 0x40001, 0x40000 + 8191, 0x40000 + 16383] {
            let bytes = try target.readGuest(gpa: page * 4096, count: 16)
            #expect(bytes == Array(repeating: page.littleEndian, count: 2).flatMap { withUnsafeBytes(of: $0) { Array($0) } }, "page 0x\(String(page, radix: 16))")
        }
        #expect(try target.readGuest(gpa: 0x80000000, count: 16) == [UInt8](repeating: 0, count: 16), "a hole stays a hole")
    }

    /// A rollback at any step leaves no spawned target behind: before create-target none was
    /// spawned; after it, its undo kills and reaps it.
    @Test("a rollback leaves no spawned target", arguments: ["before:create-target", "after:create-target", "before:verify-bindings", "after:pause-source"])
    func rollbackReapsTheTarget(_ point: String) throws {
        _ = try Backend.linux.make()
        let fixture = try ProcessFixture(strategy: "share")
        defer { fixture.finish() }
        let result = try fixture.migrate(["--inject", "\(point)=errno:EIO"])
        #expect(result.status == 6, "\(result.stdout)\(result.stderr)")
        let contents = try fixture.journal()
        checkJournal(contents, expect: .rolledBack)
        let tinyvmms = try processes(named: "tinyvmm").filter { $0 != fixture.source.processIdentifier }
        let targets = tinyvmms.filter { pid in
            (try? String(contentsOfFile: "/proc/\(pid)/cmdline", encoding: .utf8))?.contains(fixture.directory) ?? false
        }
        #expect(targets.isEmpty, "no target VMM of this test runs: \(targets)")
        if point != "before:create-target" { #expect(contents.targetPID != nil, "a target was spawned") }
        #expect(runningGuest([fixture.sourceSocket]).count == 1)
    }

    /// Kernel fault points fire in the VMM processes (armed over the handoff protocol in a
    /// target started with --allow-faults); one that never fires is reported.
    @Test func kernelFaultsFireInVMMProcesses() throws {
        _ = try Backend.linux.make()
        let fixture = try ProcessFixture(strategy: "share")
        defer { fixture.finish() }
        let fired = try fixture.migrate(["--inject", "kernel:set-memslot=errno:EEXIST"])
        #expect(fired.status == 6, "the target's bind fails with the injected EEXIST: \(fired.stdout)\(fired.stderr)")
        let report = try #require(try JSONSerialization.jsonObject(with: Data(fired.stdout.utf8)) as? [String: Any])
        let summary = try #require(report["summary"] as? [String: Any])
        #expect((summary["unfiredFaults"] as? [String]) == [], "it fired")
        #expect((summary["reason"] as? String ?? "").contains("EEXIST"))
        let never = try gmigrate(["migrate", fixture.plan, "--state-dir", fixture.stateDirectory(), "--inject", "kernel:punch-hole=errno:EIO"])
        #expect(never.status == 0, "\(never.stdout)\(never.stderr)")
        #expect(never.stdout.contains("warning: the fault kernel:punch-hole=errno:EIO was armed and never fired"), "\(never.stdout)")
    }

    /// The source stops its vcpus and then fails to save their state: it is paused all the
    /// same, so the rollback's resume is taken and the guest runs on in the source.
    @Test func aPauseThatFailsAfterTheStopIsResumed() throws {
        _ = try Backend.linux.make()
        let fixture = try ProcessFixture(strategy: "share", allowFaults: true)
        defer { fixture.finish() }
        let result = try fixture.migrate(["--inject", "kernel:get-vcpu-state=errno:EIO"])
        #expect(result.status == 6, "rolled back: \(result.stdout)\(result.stderr)")
        let report = try #require(try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any])
        let summary = try #require(report["summary"] as? [String: Any])
        #expect((summary["unfiredFaults"] as? [String]) == [], "the fault fired in the source")
        #expect((summary["reason"] as? String ?? "").contains("source VMM was seen running the guest again"), "\(summary["reason"] ?? "")")
        let counter = runningGuest([fixture.sourceSocket]).first?.counter ?? 0
        #expect(waitUntil(5) { (runningGuest([fixture.sourceSocket]).first?.counter ?? 0) > counter }, "the guest counts on in the source")
    }

    /// spec.faults of a socket plan are honoured with --allow-faults.
    @Test func planFaultsInASocketPlan() throws {
        _ = try Backend.linux.make()
        let fixture = try ProcessFixture(strategy: "share") { $0 + "  faults:\n    - before:bind-memslots=errno:EIO\n" }
        defer { fixture.finish() }
        let ignored = try gmigrate(["migrate", fixture.plan, "--state-dir", fixture.stateDirectory(), "--inject", "after:prepare=errno:EIO"])
        #expect(ignored.stdout.contains("spec.faults are ignored"), "\(ignored.stdout)")
        let honoured = try gmigrate(["migrate", fixture.plan, "--state-dir", fixture.stateDirectory(), "--allow-faults"])
        #expect(honoured.status == 6, "\(honoured.stdout)")
        #expect(honoured.stdout.contains("injected fault before:bind-memslots: EIO"))
    }



    @Test("gmigrate demo: the first README command")
    func demo() throws {
        _ = try Backend.linux.make()
        let state = temporaryDirectory("gmigrate-demo")
        defer { try? FileManager.default.removeItem(atPath: state) }
        let result = try gmigrate(["demo", "--state-dir", state])
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        #expect(result.stdout.hasPrefix("gmigrate demo: a live guest moves between two tinyvmm processes on real KVM"))
        #expect(result.stdout.contains("strategy share"))
        // The long-mode guest on 2 vcpus: its interrupts, syscalls and clock went on.
        #expect(result.stdout.contains("guest vcpu 1:"))
        #expect(result.stdout.contains("the guest noticed nothing: no invariant violated, its work, syscalls, timer and clocks went on"))
        #expect(result.stdout.contains("the same pages"))
        #expect(result.stdout.contains("exited with status 0 after retiring its VM"))
        #expect(try processes(named: "tinyvmm").filter { pid in
            (try? String(contentsOfFile: "/proc/\(pid)/cmdline", encoding: .utf8))?.contains(state) ?? false
        }.isEmpty, "the demo leaves no VMM running")
    }

    /// A demo that rolls back says so (exit 6, not "verification failed") and returns at once,
    /// leaving no VMM running.
    @Test func demoRollback() throws {
        _ = try Backend.linux.make()
        let state = temporaryDirectory("gmigrate-demo")
        defer { try? FileManager.default.removeItem(atPath: state) }
        let result = try gmigrate(["demo", "--state-dir", state, "--inject", "before:verify-bindings=errno:EIO"])
        #expect(result.status == 6, "\(result.stdout)\(result.stderr)")
        #expect(result.stdout.contains("rolled-back"))
        #expect(try processes(named: "tinyvmm").filter { pid in
            (try? String(contentsOfFile: "/proc/\(pid)/cmdline", encoding: .utf8))?.contains(state) ?? false
        }.isEmpty, "the demo leaves no VMM running")
    }
}

/// Hostile input to a VMM: nothing crashes it, nothing leaks a descriptor.
@Suite("Handoff decoder", .serialized)
struct HandoffDecoderTests {

    func rawConnection(_ socket: String) throws -> Int32 {
        let connection = try HandoffConnection.connect(path: socket)
        return dup(connection.fd)
    }

    static func frame(_ json: String) -> [UInt8] {
        let payload = Array(json.utf8)
        let length = UInt32(payload.count)
        return HandoffConnection.magic + [UInt8(length & 0xff), UInt8((length >> 8) & 0xff), UInt8((length >> 16) & 0xff), UInt8(length >> 24)] + payload
    }

    static let hostile: [(String, [UInt8], Int)] = [
        ("garbage", Array("GET / HTTP/1.1\r\n\r\n".utf8), 0),
        ("a bad magic", [0x47, 0x4d, 0x48, 0x32, 4, 0, 0, 0, 0x7b, 0x7d, 0x20, 0x20], 0),
        ("an oversized length", HandoffConnection.magic + [0xff, 0xff, 0xff, 0x7f], 0),
        ("JSON that is not a message", frame("[1, 2, 3]"), 0),
        ("an unknown message type", frame("{\"type\": \"format-disk\", \"id\": 1}"), 0),
        ("a truncated frame", Array(frame("{\"type\": \"status\", \"id\": 1}").prefix(14)), 0),
        ("a hello with descriptors", frame("{\"type\": \"hello\", \"id\": 1, \"version\": 2}"), 3),
        ("receive-memory with a pipe for a gmem file", frame("{\"type\": \"receive-memory\", \"id\": 1, \"strategy\": \"share\", \"gmem\": {\"name\": \"ram\", \"size\": 4096, \"flags\": 3, \"inode\": {\"device\": 1, \"inode\": 1}}}"), 1),
        ("too many descriptors", frame("{\"type\": \"status\", \"id\": 1}"), 12),
    ]

    @Test("malformed frames and unexpected descriptors", arguments: 0..<hostile.count)
    func hostileInput(_ index: Int) throws {
        let (what, bytes, descriptorCount) = Self.hostile[index]
        let fixture = try VMMUnderTest("hostile", source: false)
        defer { fixture.stop() }
        let (socket, vmm) = (fixture.socket, fixture.process)
        let before = openDescriptors(vmm.processIdentifier)
        let fd = try rawConnection(socket)
        var pipes: [Int32] = []
        for _ in 0..<((descriptorCount + 1) / 2) {
            var pair: [Int32] = [0, 0]
            _ = pipe(&pair)
            pipes += pair
        }
        let attached = Array(pipes.prefix(descriptorCount))
        _ = bytes.withUnsafeBytes { buffer in
            attached.withUnsafeBufferPointer { fds in ckvm_send_with_fds(fd, buffer.baseAddress, UInt(buffer.count), fds.baseAddress, Int32(fds.count)) }
        }
        if what == "a truncated frame" { shutdown(fd, Int32(SHUT_WR)) }
        // The VMM answers with an error or drops the connection; either way it lives on.
        var scratch = [UInt8](repeating: 0, count: 4096)
        var timeout = timeval(tv_sec: 2, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        _ = recv(fd, &scratch, scratch.count, 0)
        close(fd)
        for descriptor in pipes { close(descriptor) }
        #expect(vmm.isRunning, "\(what) must not crash the VMM")
        let status = try RemoteVMM(role: "test", socketPath: socket, timeout: .seconds(2)).status()
        #expect(status.running == false)
        // Nothing new is open (a connection open at `before`, the spawn's probe, may have closed).
        #expect(
            waitUntil(2) { Set(openDescriptors(vmm.processIdentifier)).isSubset(of: Set(before)) },
            "\(what): the VMM keeps no descriptor (\(before) before, \(openDescriptors(vmm.processIdentifier)) after)")
    }

    @Test("the decoder refuses and closes what it did not ask for (in process)")
    func decoderInProcess() throws {
        var pair: [Int32] = [0, 0]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &pair) == 0)
        let sender = HandoffConnection(fd: pair[0])
        let receiver = HandoffConnection(fd: pair[1])
        var pipeFDs: [Int32] = [0, 0]
        _ = pipe(&pipeFDs)
        // A well-formed hello that carries a pipe it should not.
        var hello = HandoffMessage(type: "hello", id: 1)
        hello.version = 2
        try sender.send(hello, descriptors: [pipeFDs[0]])
        let (message, descriptors) = try receiver.receive()
        #expect(message == hello)
        #expect(descriptors.count == 1)
        #expect(HandoffConnection.kind(of: descriptors[0]).hasPrefix("pipe:"))
        #expect(throws: HandoffError.self) { try HandoffConnection.check(descriptors, expected: []) }
        #expect(fcntl(descriptors[0], F_GETFD) == -1, "the unexpected descriptor is closed")
        close(pipeFDs[0])
        close(pipeFDs[1])
        // A bad magic: refused.
        let garbage: [UInt8] = Array("XXXX\u{4}\0\0\0abcd".utf8)
        _ = garbage.withUnsafeBytes { write(pair[0], $0.baseAddress, $0.count) }
        #expect(throws: HandoffError.self) { _ = try receiver.receive() }
    }
}

@Suite("Handoff peers")
struct HandoffPeerTests {
    /// A peer that accepts and never answers: the coordinator gives up at its timeout.
    @Test func aStallingPeerTimesOut() throws {
        let directory = temporaryDirectory("gmigrate-stall")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let socket = directory + "/stall.sock"
        let listener = ckvm_listen_unix(socket, 1)
        #expect(listener >= 0)
        defer { close(listener) }
        #expect {
            _ = try RemoteVMM(role: "target", socketPath: socket, timeout: .milliseconds(300))
        } throws: { error in
            (error as? HandoffError)?.kind == .timeout
        }
    }

    /// SO_PEERCRED: a VMM running as another uid than the plan expects is refused.
    @Test func credentialsAreChecked() throws {
        let fixture = try VMMUnderTest("cred", source: false)
        defer { fixture.stop() }
        let (socket, vmm) = (fixture.socket, fixture.process)
        #expect {
            _ = try RemoteVMM(role: "target", socketPath: socket, timeout: .seconds(2), expectedUID: 4242)
        } throws: { error in
            (error as? HandoffError)?.kind == .credentials
        }
        #expect {
            _ = try RemoteVMM(role: "target", socketPath: socket, timeout: .seconds(2), expectedPID: 1)
        } throws: { error in
            (error as? HandoffError)?.kind == .credentials
        }
        // The right peer is accepted.
        let good = try RemoteVMM(role: "target", socketPath: socket, timeout: .seconds(2), expectedPID: vmm.processIdentifier)
        #expect(good.peer.pid == vmm.processIdentifier)
    }

    @Test("gmigrate demo on the model says so first")
    func demoOnTheModel() throws {
        let state = temporaryDirectory("gmigrate-demo-model")
        defer { try? FileManager.default.removeItem(atPath: state) }
        let result = try gmigrate(["demo", "--backend", "model", "--strategy", "link", "--state-dir", state])
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        #expect(result.stdout.hasPrefix("gmigrate demo: on the model"))
        #expect(result.stdout.contains("strategy link"))
        #expect(result.stdout.contains("continued, no write lost"))
    }
}
