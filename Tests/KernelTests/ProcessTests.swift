import CKVM
import Foundation
import Handoff
import Journal
import Kernel
import Orchestrator
import Plans
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Where the built executables are.
func executable(_ name: String) throws -> String {
    let candidates = [
        Bundle.main.bundleURL.deletingLastPathComponent().appendingPathComponent(name).path,
        repositoryRoot + "/.build/debug/" + name,
    ]
    guard let found = candidates.first(where: { FileManager.default.isExecutableFile(atPath: $0) }) else {
        throw CancellationError()
    }
    return found
}

func isAlive(_ pid: Int32) -> Bool {
    // A zombie is not alive: reap it first if it is our child.
    var status: Int32 = 0
    if waitpid(pid, &status, WNOHANG) == pid { return false }
    return kill(pid, 0) == 0
}

func waitUntil(_ seconds: Double = 10, _ condition: () -> Bool) -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
        if condition() { return true }
        Thread.sleep(forTimeInterval: 0.02)
    }
    return condition()
}

/// A test's VMM processes: a source tinyvmm running the demo guest, and the plan that names it.
final class ProcessFixture {
    let directory: String
    let plan: String
    let source: Process
    let backend: String
    var pids: [Int32] = []

    init(strategy: String = "auto", backend: String = "linux") throws {
        directory = temporaryDirectory("gmigrate-proc")
        self.backend = backend
        let socket = directory + "/source.sock"
        let text = try String(contentsOfFile: repositoryRoot + "/migration-plans/demo-processes.yaml", encoding: .utf8)
            .replacingOccurrences(of: "/tmp/gmigrate-demo/source.sock", with: socket)
            .replacingOccurrences(of: "strategy: auto", with: "strategy: \(strategy)")
            .replacingOccurrences(of: "stepTimeout: 5s", with: "stepTimeout: 60s")
        plan = directory + "/plan.yaml"
        try text.write(toFile: plan, atomically: true, encoding: .utf8)
        source = try ProcessRun.spawnVMMForTests(
            tinyvmm: try executable("tinyvmm"), socket: socket, backend: backend == "linux" ? "linux" : "model:" + directory + "/host.json",
            name: "test/source", logFile: directory + "/source.log", plan: plan)
        pids.append(source.processIdentifier)
        Thread.sleep(forTimeInterval: 0.15)  // the guest counts for a while
    }

    var sourceSocket: String { directory + "/source.sock" }

    /// The guest's counter in the source right before the migration started.
    var counterBefore: UInt32 = 0

    func migrate(_ extra: [String] = []) throws -> CommandResult {
        counterBefore = (try? RemoteVMM(role: "test", socketPath: sourceSocket, timeout: .seconds(2)).status().counter).flatMap { $0 } ?? 0
        var arguments = ["migrate", plan, "--state-dir", directory, "--json"]
        if backend == "model" { arguments += ["--backend", "model", "--model-host", directory + "/host.json"] }
        return try gmigrate(arguments + extra)
    }

    /// The journal of the (only) migration.
    func journal() throws -> JournalContents {
        let ids = ((try? FileManager.default.contentsOfDirectory(atPath: directory + "/journal")) ?? []).filter { $0.hasSuffix(".log") }
        guard let id = ids.first?.replacingOccurrences(of: ".log", with: "") else { throw CancellationError() }
        return try Journal.read(stateDirectory: directory, id: id)
    }

    func started() throws -> JournalEntry.Started {
        guard case .started(let started)? = try journal().entries.first?.event else { throw CancellationError() }
        return started
    }

    /// Asks every VMM still answering to exit, then checks that no process is left.
    func finish(sourceLocation: SourceLocation = #_sourceLocation) {
        if let started = try? started(), let pid = started.targetPID { pids.append(pid) }
        for socket in [sourceSocket] + ((try? started().targetSocket).flatMap { $0 }.map { [$0] } ?? []) {
            (try? RemoteVMM(role: "test", socketPath: socket, timeout: .seconds(2)))?.shutdown()
        }
        for pid in Set(pids) {
            #expect(waitUntil { !isAlive(pid) }, "VMM process \(pid) is left running", sourceLocation: sourceLocation)
            if isAlive(pid) { kill(pid, SIGKILL) }
        }
        try? FileManager.default.removeItem(atPath: directory)
    }
}

extension ProcessRun {
    static func spawnVMMForTests(tinyvmm: String, socket: String, backend: String, name: String, logFile: String, plan: String?) throws -> Process {
        setenv("GMIGRATE_TINYVMM", tinyvmm, 1)
        return try spawnVMM(socket: socket, backend: backend, name: name, logFile: logFile, plan: plan)
    }
}

/// The survivor of a migration: the one VMM whose guest runs, with its counter going on.
func runningGuest(_ sockets: [String]) -> [(socket: String, counter: UInt32)] {
    sockets.compactMap { socket in
        guard let vmm = try? RemoteVMM(role: "test", socketPath: socket, timeout: .seconds(2)),
            let first = try? vmm.status(), first.running, let before = first.counter
        else { return nil }
        Thread.sleep(forTimeInterval: 0.1)
        guard let second = try? vmm.status(), let after = second.counter, after > before else { return nil }
        return (socket, before)
    }
}

@Suite("Migrations between VMM processes", .serialized)
struct ProcessTests {
    @Test("a live guest moves between two real tinyvmm processes", arguments: ["share", "copy"])
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
        #expect(verification["counterAtResume"] as? Int == atPause, "no reset, no lost write")
        #expect((verification["counterAfter"] as? Int ?? 0) > atPause, "the guest goes on counting in the target")
        let source = verification["sourceInodes"] as? [String: String]
        let target = verification["targetInodes"] as? [String: String]
        #expect((source == target) == (strategy == "share"))
        // The source process retired its VM and exited.
        #expect(waitUntil { !isAlive(fixture.source.processIdentifier) })
        #expect(fixture.source.terminationStatus == 0)
        checkJournal(try fixture.journal(), expect: .completed)
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
    }

    /// The coordinator dies (a real exit at the fault point); the VMMs outlive it; `gmigrate
    /// recover` reconnects to them and finishes the migration.
    @Test("the coordinator killed, then recover", arguments: [
        "after:create-target", "after:bind-memslots", "after:pause-source", "before:resume-target", "after:resume-target",
        "before:retire-source",
    ])
    func coordinatorKilled(_ point: String) throws {
        _ = try Backend.linux.make()
        let fixture = try ProcessFixture(strategy: "share")
        defer { fixture.finish() }
        let crashed = try fixture.migrate(["--inject", "\(point)=crash"])
        #expect(crashed.status == FaultInjector.crashStatus)
        let started = try fixture.started()
        let recover = try gmigrate(["recover", "--state-dir", fixture.directory])
        #expect(recover.status == 0, "\(recover.stdout)\(recover.stderr)")
        let contents = try fixture.journal()
        checkJournal(contents)
        guard case .finished(let finished)? = contents.entries.last?.event else {
            Issue.record("not finished")
            return
        }
        #expect(finished.state == .completed || finished.state == .rolledBack, "\(finished.reason)")
        let survivors = runningGuest([fixture.sourceSocket, started.targetSocket ?? ""])
        #expect(survivors.count == 1, "exactly one running guest: \(survivors)")
        let expected = finished.state == .completed ? started.targetSocket : fixture.sourceSocket
        #expect(survivors.first?.socket == expected)
        // The counter is intact: never below what the guest had counted before the migration.
        #expect(fixture.counterBefore > 0)
        if let survivor = survivors.first { #expect(survivor.counter >= fixture.counterBefore, "no reset") }
        // The other VMM is gone.
        let other = finished.state == .completed ? started.sourcePID : started.targetPID
        if let other { #expect(waitUntil { !isAlive(other) }, "the other VMM exits") }
    }

    /// kill -9 of the coordinator itself (not an injected exit) while it waits at a step.
    @Test("the coordinator killed with SIGKILL, then recover", arguments: ["before:bind-memslots", "before:retire-source"])
    func coordinatorSIGKILL(_ point: String) throws {
        _ = try Backend.linux.make()
        let fixture = try ProcessFixture(strategy: "share")
        defer { fixture.finish() }
        let result = try killDuring(fixture, point: point, killCoordinator: true) { _ in 0 }
        #expect(result.status == 9 || result.status == -9 || result.status == 137 || result.status == SIGKILL, "killed: \(result.status)")
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
            #expect(result.status == 7)
            #expect(survivors.isEmpty)
            let finished = contents.entries.compactMap { entry -> JournalEntry.Finished? in
                if case .finished(let finished) = entry.event { return finished }
                return nil
            }.last
            #expect(finished?.reason.contains("source VMM") == true, "a clear report: \(finished?.reason ?? "")")
        }
    }

    @Test("the target VMM killed mid-migration", arguments: ["before:bind-memslots", "before:resume-target"])
    func targetKilled(_ point: String) throws {
        _ = try Backend.linux.make()
        let fixture = try ProcessFixture(strategy: "share")
        defer { fixture.finish() }
        let result = try killDuring(fixture, point: point) { started in started.targetPID ?? 0 }
        #expect(result.status == 6, "rolled back: \(result.stdout)")
        checkJournal(try fixture.journal(), expect: .rolledBack)
        let survivors = runningGuest([fixture.sourceSocket])
        #expect(survivors.count == 1, "the source runs the guest again")
    }

    /// Runs a migration that waits at `point`, SIGKILLs a VMM during the wait, lets it finish.
    func killDuring(
        _ fixture: ProcessFixture, point: String, killCoordinator: Bool = false, victim: (JournalEntry.Started) throws -> Int32
    ) throws -> CommandResult {
        let spec = point.contains("=") ? point : "\(point)=delay:1500ms"
        let step = String(point.split(separator: "=")[0].split(separator: ":")[1])
        fixture.counterBefore = (try? RemoteVMM(role: "test", socketPath: fixture.sourceSocket, timeout: .seconds(2)).status().counter).flatMap { $0 } ?? 0
        #expect(fixture.counterBefore > 0, "the guest counts before the migration")
        let process = Process()
        process.executableURL = URL(fileURLWithPath: try executable("gmigrate"))
        process.arguments = ["migrate", fixture.plan, "--state-dir", fixture.directory, "--inject", spec]
        process.currentDirectoryURL = URL(fileURLWithPath: repositoryRoot)
        let out = Pipe()
        process.standardOutput = out
        process.standardError = out
        try process.run()
        let reached = waitUntil(10) {
            guard let contents = try? fixture.journal() else { return false }
            return contents.entries.contains { if case .intent(let s, .forward) = $0.event { s.rawValue == step } else { false } }
        }
        #expect(reached, "the migration reached \(point)")
        let pid = killCoordinator ? process.processIdentifier : try victim(try fixture.started())
        if pid > 0 && !killCoordinator {
            kill(pid, SIGKILL)
            fixture.pids.append(pid)
        } else if killCoordinator {
            kill(pid, SIGKILL)
        }
        let output = out.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return CommandResult(status: process.terminationStatus, stdout: String(decoding: output, as: UTF8.self), stderr: "")
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
        #expect(result.stdout.contains("continued, no write lost"))
        #expect(result.stdout.contains("the same pages"))
        #expect(result.stdout.contains("exited with status 0 after retiring its VM"))
    }
}

/// Hostile input to a VMM: nothing crashes it, nothing leaks a descriptor.
@Suite("Handoff decoder", .serialized)
struct HandoffDecoderTests {
    func openDescriptors(_ pid: Int32) -> Int {
        ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd")) ?? []).count
    }

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
        ("a hello with descriptors", frame("{\"type\": \"hello\", \"id\": 1, \"version\": 1}"), 3),
        ("receive-memory with a pipe for a gmem file", frame("{\"type\": \"receive-memory\", \"id\": 1, \"strategy\": \"share\", \"gmem\": {\"name\": \"ram\", \"size\": 4096, \"flags\": 3, \"inode\": {\"device\": 1, \"inode\": 1}}}"), 1),
        ("too many descriptors", frame("{\"type\": \"status\", \"id\": 1}"), 12),
    ]

    @Test("malformed frames and unexpected descriptors", arguments: 0..<hostile.count)
    func hostileInput(_ index: Int) throws {
        let (what, bytes, descriptorCount) = Self.hostile[index]
        let directory = temporaryDirectory("gmigrate-hostile")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let socket = directory + "/vmm.sock"
        let vmm = try ProcessRun.spawnVMMForTests(
            tinyvmm: try executable("tinyvmm"), socket: socket, backend: "model:" + directory + "/host.json", name: "hostile",
            logFile: directory + "/vmm.log", plan: nil)
        defer {
            (try? RemoteVMM(role: "test", socketPath: socket, timeout: .seconds(2)))?.shutdown()
            vmm.waitUntilExit()
        }
        Thread.sleep(forTimeInterval: 0.1)
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
        #expect(waitUntil(2) { openDescriptors(vmm.processIdentifier) == before }, "\(what): the VMM keeps no descriptor (\(before) before, \(openDescriptors(vmm.processIdentifier)) after)")
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
        hello.version = 1
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
        let started = ContinuousClock.now
        #expect {
            _ = try RemoteVMM(role: "target", socketPath: socket, timeout: .milliseconds(300))
        } throws: { error in
            (error as? HandoffError)?.kind == .timeout
        }
        #expect(ContinuousClock.now - started < .seconds(5))
    }

    /// SO_PEERCRED: a VMM running as another uid than the plan expects is refused.
    @Test func credentialsAreChecked() throws {
        let directory = temporaryDirectory("gmigrate-cred")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let socket = directory + "/vmm.sock"
        let vmm = try ProcessRun.spawnVMMForTests(
            tinyvmm: try executable("tinyvmm"), socket: socket, backend: "model:" + directory + "/host.json", name: "cred",
            logFile: directory + "/vmm.log", plan: nil)
        defer {
            (try? RemoteVMM(role: "test", socketPath: socket, timeout: .seconds(2)))?.shutdown()
            vmm.waitUntilExit()
        }
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
