import CKVM
import Foundation
import GmigrateTestKit
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

// Fixtures the module test targets share: plans and journal checks, VMM processes and the
// peers that talk to them. Nothing of the daemon (its targets have their own fixtures).

public func loadPlan(_ name: String, strategy: Strategy? = nil) throws -> MigrationPlan {
    let report = PlanLoader.load(path: repositoryRoot + "/migration-plans/" + name, strategy: strategy)
    return try #require(report.plan, "\(report.diagnostics)")
}

/// The journal's own consistency: no corruption, one start, every intent answered by an
/// outcome (or, after a crash, by recovery), one finished record and nothing after it, a state
/// that agrees with the point of no return and with what was observed.
public func checkJournal(_ contents: JournalContents, expect state: TerminalState? = nil, sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(contents.corruption == nil, sourceLocation: sourceLocation)
    guard case .started? = contents.entries.first?.event else {
        Issue.record("the journal does not start with its start record", sourceLocation: sourceLocation)
        return
    }
    var open: JournalEntry.Event? = nil
    for entry in contents.entries {
        switch entry.event {
        case .intent:
            #expect(open == nil, "an intent without an outcome before #\(entry.sequence)", sourceLocation: sourceLocation)
            open = entry.event
        case .outcome(let outcome):
            // A second outcome of the same step (an injected after: fault) answers no intent.
            if open != nil {
                #expect(open == .intent(step: outcome.step, direction: outcome.direction), "#\(entry.sequence) answers no intent", sourceLocation: sourceLocation)
            }
            open = nil
        case .recovery:
            // A crash between an intent and its outcome leaves the intent unanswered; recovery takes over there.
            open = nil
        default:
            break
        }
    }
    guard case .finished(let finished)? = contents.entries.last?.event else {
        Issue.record("the journal does not end with its finished record: \(contents.entries.last.map { "\($0.event)" } ?? "empty")", sourceLocation: sourceLocation)
        return
    }
    #expect(contents.entries.filter { if case .finished = $0.event { true } else { false } }.count == 1, "one finished record", sourceLocation: sourceLocation)
    if let state { #expect(finished.state == state, "\(finished.reason)", sourceLocation: sourceLocation) }
    // What the terminal state claims was observed, in this journal, after the last step.
    let observed = contents.entries.compactMap { entry -> JournalEntry.Observation? in
        if case .observed(let observation) = entry.event { return observation }
        return nil
    }
    let machine = MigrationMachine(replaying: contents.entries.map(\.event))
    switch finished.state {
    case .completed:
        #expect(machine.pastPointOfNoReturn, "completed without passing the point of no return", sourceLocation: sourceLocation)
        #expect(observed.contains { $0.role == .target && $0.liveness == .running }, "completed without seeing the target run", sourceLocation: sourceLocation)
    case .rolledBack:
        // Past the point of no return only while the target provably never ran the guest.
        #expect(!machine.pastPointOfNoReturn || machine.sourceCanTakeBack, "rolled back after the target may have run", sourceLocation: sourceLocation)
        let nothingChanged = machine.attempted.allSatisfy { $0 == .prepare }
        #expect(nothingChanged || observed.last { $0.role == .source }?.liveness == .running, "rolled back without seeing the source run", sourceLocation: sourceLocation)
    case .stuck:
        Issue.record("a finished record holds stuck", sourceLocation: sourceLocation)
    case .lost:
        break
    }
}

extension JournalContents {
    /// The target VMM's pid, as create-target recorded it.
    public var targetPID: Int32? {
        entries.outcomes.last { $0.step == .createTarget && $0.direction == .forward && $0.ok }?.details["pid"].flatMap { Int32($0) }
    }

    public var started: JournalEntry.Started? {
        if case .started(let started)? = entries.first?.event { return started }
        return nil
    }

    public var finished: JournalEntry.Finished? {
        if case .finished(let finished)? = entries.last?.event { return finished }
        return nil
    }
}

/// Whether `pid` runs: a zombie does not (`ProcessWatch.isAlive` reads its state). It is not
/// reaped here: Foundation reaps the children it started, and a waitpid here once took a
/// child's status from it, so that `Process.terminationStatus` trapped.
public func isAlive(_ pid: Int32) -> Bool { ProcessWatch.isAlive(pid) }

/// A test's VMM processes: a source tinyvmm running the demo guest, and the plan that names it.
public final class ProcessFixture {
    public let directory: String
    public let plan: String
    public let source: Process
    public let backend: String
    public var pids: [Int32] = []

    /// A source VMM running `guest` (the counter guest by default: its count in memory and in
    /// eax pins down the switch-over exactly; the long-mode guest has its own tests).
    public init(
        strategy: String = "auto", backend: String = "linux", guest: String = "counter", allowFaults: Bool = false, extra: [String] = [],
        edit: (String) -> String = { $0 }
    ) throws {
        directory = temporaryDirectory("gmigrate-proc")
        self.backend = backend
        let socket = directory + "/source.sock"
        let text = try processPlan(source: socket, strategy: strategy, longSteps: true)
        plan = directory + "/plan.yaml"
        try edit(text).write(toFile: plan, atomically: true, encoding: .utf8)
        source = try ProcessRun.spawnVMMForTests(
            tinyvmm: try executable("tinyvmm"), socket: socket, backend: backend == "linux" ? "linux" : "model:" + directory + "/host.json",
            name: "test/source", logFile: directory + "/source.log", plan: plan, allowFaults: allowFaults, extra: ["--guest", guest] + extra)
        pids.append(source.processIdentifier)
        // The guest counts before the migration.
        let counts = waitUntil {
            let counter = (try? RemoteVMM(role: "test", socketPath: socket, timeout: .seconds(2)).status().counter) ?? nil
            return (counter ?? 0) > 0
        }
        guard counts else {
            throw FixtureError("the source guest does not count: see \(directory)/source.log")
        }
    }

    public var sourceSocket: String { directory + "/source.sock" }

    /// The guest's counter in the source right before the migration started.
    public var counterBefore: UInt32 = 0

    public func migrate(_ extra: [String] = [], json: Bool = true) throws -> CommandResult {
        counterBefore = (try? RemoteVMM(role: "test", socketPath: sourceSocket, timeout: .seconds(2)).status().counter).flatMap { $0 } ?? 0
        var arguments = ["migrate", plan, "--state-dir", directory] + (json ? ["--json"] : [])
        if backend == "model" { arguments += ["--backend", "model", "--model-host", directory + "/host.json"] }
        return try gmigrate(arguments + extra)
    }

    /// Other state directories the test migrated this guest with: their targets are finished too.
    public var otherStateDirectories: [String] = []

    /// A fresh state directory for another migration of this fixture's guest.
    public func stateDirectory() -> String {
        let made = temporaryDirectory("gmigrate-proc-s")
        otherStateDirectories.append(made)
        return made
    }

    /// The journals in a state directory.
    public static func journals(in directory: String) -> [JournalContents] {
        let ids = ((try? FileManager.default.contentsOfDirectory(atPath: directory + "/journal")) ?? []).filter { $0.hasSuffix(".log") }
        return ids.compactMap { try? Journal.read(stateDirectory: directory, id: String($0.dropLast(4))) }
    }

    /// The journal of the (only) migration.
    public func journal() throws -> JournalContents {
        let ids = ((try? FileManager.default.contentsOfDirectory(atPath: directory + "/journal")) ?? []).filter { $0.hasSuffix(".log") }
        guard let id = ids.first?.replacingOccurrences(of: ".log", with: "") else { throw FixtureError("no journal in \(directory)") }
        return try Journal.read(stateDirectory: directory, id: id)
    }

    public func started() throws -> JournalEntry.Started {
        guard let started = try journal().started else { throw FixtureError("the journal has no started record") }
        return started
    }

    /// Asks every VMM still answering to exit, then checks that no process is left.
    public func finish(sourceLocation: SourceLocation = #_sourceLocation) {
        var sockets = [sourceSocket]
        for contents in ([directory] + otherStateDirectories).flatMap(Self.journals(in:)) {
            if let pid = contents.targetPID { pids.append(pid) }
            if let socket = contents.started?.targetSocket { sockets.append(socket) }
        }
        for socket in sockets {
            (try? RemoteVMM(role: "test", socketPath: socket, timeout: .seconds(2)))?.shutdown()
        }
        for pid in Set(pids) {
            #expect(waitUntil { !isAlive(pid) }, "VMM process \(pid) is left running", sourceLocation: sourceLocation)
            if isAlive(pid) { kill(pid, SIGKILL) }
        }
        for made in [directory] + otherStateDirectories { try? FileManager.default.removeItem(atPath: made) }
    }
}

extension ProcessRun {
    public static func spawnVMMForTests(
        tinyvmm: String, socket: String, backend: String, name: String, logFile: String, plan: String?, allowFaults: Bool = false,
        extra: [String] = []
    ) throws -> Process {
        setenv("GMIGRATE_TINYVMM", tinyvmm, 1)
        return try spawnVMM(socket: socket, backend: backend, name: name, logFile: logFile, plan: plan, allowFaults: allowFaults, extra: extra)
    }
}

/// The survivor of a migration: the one VMM whose guest runs, with its counter going on.
public func runningGuest(_ sockets: [String]) -> [(socket: String, counter: UInt32)] {
    sockets.compactMap { socket in
        guard let vmm = try? RemoteVMM(role: "test", socketPath: socket, timeout: .seconds(2)),
            let first = try? vmm.status(), first.running, let before = first.counter
        else { return nil }
        guard waitUntil(5, { ((try? vmm.status().counter) ?? nil).map { $0 > before } ?? false }) else { return nil }
        return (socket, before)
    }
}

/// What the journal says of the guest at the switch-over: the counter in the source's memory
/// and its register copy (eax) at the pause, and the counter in the target's memory at the
/// restore, before the guest ran there.
public struct SwitchOver {
    public var counterAtPause: UInt32?
    public var eaxAtPause: UInt32?
    public var counterAtRestore: UInt32?

    public init(_ contents: JournalContents) {
        let pause = contents.entries.outcomes.last { $0.step == .pauseSource && $0.ok && $0.direction == .forward }
        counterAtPause = pause?.details["counter"].flatMap { UInt32($0) }
        let saved = contents.entries.compactMap { entry -> String? in
            if case .saved(.pauseSource, let state) = entry.event { return state }
            return nil
        }.last
        if let text = saved, let data = Data(base64Encoded: text),
            let state = try? VMState(decoding: [UInt8](data))
        {
            eaxAtPause = state.vcpus.first.map { UInt32(truncatingIfNeeded: $0.registers.rax) }
        }
        counterAtRestore = contents.entries.outcomes.last { $0.step == .resumeTarget && $0.ok }?.details["counter"].flatMap { UInt32($0) }
    }

    /// Memory and registers agree: the loop increments memory, then loads it into eax.
    public var memoryAgreesWithRegisters: Bool {
        guard let memory = counterAtPause, let eax = eaxAtPause else { return false }
        return eax == memory || eax &+ 1 == memory
    }
}

/// The pids of this host's processes whose executable is `name` (zombies excluded).
public func processes(named name: String) throws -> [Int32] {
    try FileManager.default.contentsOfDirectory(atPath: "/proc").compactMap { Int32($0) }.filter { pid in
        guard let comm = try? String(contentsOfFile: "/proc/\(pid)/comm", encoding: .utf8) else { return false }
        return comm.trimmingCharacters(in: .whitespacesAndNewlines) == name && ProcessWatch.isAlive(pid)
    }
}

/// The demo in a fresh state directory; no VMM of it may outlive it.
public func demo(_ arguments: [String]) throws -> (result: CommandResult, state: String) {
    let state = temporaryDirectory("gmigrate-demo")
    let result = try gmigrate(["demo", "--state-dir", state, "--json"] + arguments)
    let left = try processes(named: "tinyvmm").filter { pid in
        (try? String(contentsOfFile: "/proc/\(pid)/cmdline", encoding: .utf8))?.contains(state) ?? false
    }
    #expect(left.isEmpty, "the demo leaves no VMM running: \(left)")
    for pid in left { kill(pid, SIGKILL) }
    return (result, state)
}

/// One connection to a VMM's handoff socket that speaks raw messages: what a hostile or
/// confused coordinator could send.
public final class RawPeer {
    public let connection: HandoffConnection
    private var nextID = 1

    public init(_ socket: String) throws {
        connection = try HandoffConnection.connect(path: socket)
        connection.setTimeout(.seconds(5))
        var hello = HandoffMessage(type: "hello", id: 0)
        hello.version = HandoffMessage.protocolVersion
        let reply = try ask(hello)
        guard reply.type == "ok" else { throw FixtureError("hello refused: \(reply.message ?? "?")") }
    }

    /// Sends one request (with descriptors) and returns its reply.
    @discardableResult
    public func ask(_ message: HandoffMessage, descriptors: [Int32] = []) throws -> HandoffMessage {
        var message = message
        message.id = nextID
        nextID += 1
        try connection.send(message, descriptors: descriptors)
        let (reply, received) = try connection.receive()
        for fd in received { close(fd) }
        return reply
    }

    public func ask(_ type: String, _ edit: (inout HandoffMessage) -> Void = { _ in }) throws -> HandoffMessage {
        var message = HandoffMessage(type: type, id: 0)
        edit(&message)
        return try ask(message)
    }
}

/// A tinyvmm on the model (or on real KVM), with its directory; shut down at the end.
public final class VMMUnderTest {
    public let directory: String
    public let socket: String
    public let process: Process

    public init(_ name: String, source: Bool, backend: String = "model", guest: String = "counter") throws {
        directory = temporaryDirectory("gmigrate-" + name)
        socket = directory + "/vmm.sock"
        var plan: String? = nil
        if source {
            plan = directory + "/plan.yaml"
            try processPlan(source: socket).write(toFile: plan!, atomically: true, encoding: .utf8)
        }
        process = try ProcessRun.spawnVMMForTests(
            tinyvmm: try executable("tinyvmm"), socket: socket, backend: backend == "linux" ? "linux" : "model:" + directory + "/host.json",
            name: "hardening/" + name, logFile: directory + "/vmm.log", plan: plan, extra: source ? ["--guest", guest] : [])
    }

    public var log: String { (try? String(contentsOfFile: directory + "/vmm.log", encoding: .utf8)) ?? "" }

    public func stop() {
        (try? RemoteVMM(role: "test", socketPath: socket, timeout: .seconds(2)))?.shutdown()
        if !ProcessWatch.waitForExit(process.processIdentifier, timeout: .seconds(5)) { process.terminate() }
        process.waitUntilExit()
        try? FileManager.default.removeItem(atPath: directory)
    }
}

/// A tinyvmm started at a given socket (an empty target, or a source running the counter guest).
public struct VMMUnderTestAt {
    public let process: Process
    public let socket: String
    public init(socket: String, directory: String, plan: Bool = false) throws {
        self.socket = socket
        var planFile: String? = nil
        if plan {
            planFile = directory + "/vmm-plan.yaml"
            try processPlan(source: socket).write(toFile: planFile!, atomically: true, encoding: .utf8)
        }
        process = try ProcessRun.spawnVMMForTests(
            tinyvmm: try executable("tinyvmm"), socket: socket, backend: "model:" + directory + "/host3.json", name: "hardening/at",
            logFile: directory + "/at.log", plan: planFile, extra: plan ? ["--guest", "counter"] : [])
    }
    public func stop() {
        (try? RemoteVMM(role: "test", socketPath: socket, timeout: .seconds(2)))?.shutdown()
        process.waitUntilExit()
    }
}

/// Runs a migration that waits at `point`, SIGKILLs a VMM during the wait, lets it finish.
public func killDuring(
    _ fixture: ProcessFixture, point: String, killCoordinator: Bool = false, victim: (JournalContents) throws -> Int32
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
    let pid = killCoordinator ? process.processIdentifier : try victim(try fixture.journal())
    if pid > 0 {
        kill(pid, SIGKILL)
        if !killCoordinator { fixture.pids.append(pid) }
    }
    let output = out.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return CommandResult(status: process.terminationStatus, stdout: String(decoding: output, as: UTF8.self), stderr: "")
}

/// Asks a VMM to end, through its socket.
public enum RemoteVMMHelper {
    public static func shutdown(_ socket: String) throws {
        try RemoteVMM(role: "test", socketPath: socket, timeout: .seconds(2)).shutdown()
    }
}

/// migration-plans/demo-processes.yaml with its source VMM's socket, and, where given, its
/// target, strategy and name; `longSteps` gives it a 60 s step timeout (for a loaded machine, or
/// an injected delay). The plan most process tests migrate.
public func processPlan(source: String, target: String? = nil, strategy: String? = nil, name: String? = nil, longSteps: Bool = false) throws -> String {
    var text = try String(contentsOfFile: repositoryRoot + "/migration-plans/demo-processes.yaml", encoding: .utf8)
        .replacingOccurrences(of: "/tmp/gmigrate-demo/source.sock", with: source)
    if let target { text = text.replacingOccurrences(of: "vmm: spawn", with: "vmm: \(target)") }
    if let strategy { text = text.replacingOccurrences(of: "strategy: auto", with: "strategy: \(strategy)") }
    if let name { text = text.replacingOccurrences(of: "name: demo-processes", with: "name: \(name)") }
    if longSteps { text = text.replacingOccurrences(of: "stepTimeout: 5s", with: "stepTimeout: 60s") }
    return text
}
