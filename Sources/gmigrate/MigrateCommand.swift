import ArgumentParser
import Foundation
import Handoff
import HostNet
import Journal
import Kernel
import Orchestrator
import Plans

/// Shared by the commands that use a state directory.
struct StateOptions: ParsableArguments {
    @Option(help: "The state directory: journals and the coordinator's lock.")
    var stateDir: String = "/var/lib/gmigrate"

    func openJournal() throws -> Journal { try openStateDirectory(stateDir) }
}

/// Opens a state directory, mapping a held lock to exit 5.
func openStateDirectory(_ path: String) throws -> Journal {
    do {
        return try Journal(stateDirectory: path)
    } catch {
        throw CommandFailure(code: error.kind == .locked ? .stateDirectoryLocked : .journalFailed, message: error.description)
    }
}

func milliseconds(_ nanoseconds: Int64) -> String { String(format: "%.2f ms", Double(nanoseconds) / 1e6) }

/// One line of the step timeline: `  bind-memslots            ok      0.05 ms`.
func printStep(_ step: StepReport) {
    let name = (step.direction == .undo ? "undo " : "") + step.step.rawValue
    let mark = step.ok ? "ok" : "FAILED"
    var line = "  \(name.padding(toLength: 24, withPad: " ", startingAt: 0)) \(mark.padding(toLength: 7, withPad: " ", startingAt: 0)) \(milliseconds(step.durationNanoseconds))"
    if let error = step.error { line += "  \(error)" }
    if step.step == .copyMemory, let details = step.details, let copied = details["bytes-copied"].flatMap(UInt64.init),
        let total = details["bytes-total"].flatMap(UInt64.init)
    {
        line += "  \(mebibytes(copied)) of \(mebibytes(total)) populated, \(details["rate"] ?? "?") (\(details["method"] ?? "?"))"
    }
    print(line)
}

func mebibytes(_ bytes: UInt64) -> String {
    if bytes >= 1 << 30 { return String(format: "%.2f GiB", Double(bytes) / Double(1 << 30)) }
    if bytes >= 1 << 20 { return String(format: "%.1f MiB", Double(bytes) / Double(1 << 20)) }
    return "\(bytes / 1024) KiB"
}

/// The summary line: `completed in 12.3 ms; strategy share; blackout 1.2 ms (pause-source 0.3, ...)`.
func summaryLine(_ summary: MigrationSummary) -> String {
    var line = "\(summary.state.rawValue) in \(milliseconds(summary.totalNanoseconds)); strategy \(summary.strategy.rawValue)"
    if let blackout = summary.blackoutNanoseconds {
        line += "; blackout \(milliseconds(blackout)) from the pause request to the target's vcpus running"
        if let parts = summary.blackoutParts, !parts.isEmpty {
            let order = ["pause-source", "vmm.stop", "vmm.save", "copy-memory", "move-enc-context", "resume-target", "vmm.restore", "vmm.resume", "journal"]
            let shown = parts.sorted { (order.firstIndex(of: $0.key) ?? 99) < (order.firstIndex(of: $1.key) ?? 99) }
            line += " (" + shown.map { "\($0.key) \(String(format: "%.2f", Double($0.value) / 1e6))" }.joined(separator: ", ") + " ms)"
        }
        if summary.blackoutBreach { line += " — BREACH of maxBlackout" }
    }
    return line
}

/// The lines after the summary that every migrate-like command prints: why it did not
/// complete, and each armed fault that never fired.
func printOutcome(_ summary: MigrationSummary) {
    if summary.state != .completed { print("reason: \(summary.reason)") }
    for fault in summary.unfiredFaults { print("warning: the fault \(fault) was armed and never fired (its point was not reached)") }
}

/// The verification of a migration between VMM processes: the long-mode guest's own account,
/// or the counter guest's counter.
func printVerification(_ verification: ProcessVerification, completed: Bool) {
    if let guest = verification.guest {
        for (index, vcpu) in guest.vcpus.enumerated() {
            print(
                "guest vcpu \(index): \(vcpu.iterations) iterations, \(vcpu.syscalls) syscalls, \(vcpu.avx ? "SSE and AVX" : "SSE") registers checked, timer \(Int(vcpu.timerHertz.rounded())) Hz; kvmclock +\(vcpu.guestElapsedNanoseconds / 1_000_000) ms while the host's +\(vcpu.hostElapsedNanoseconds / 1_000_000) ms\(vcpu.violation.map { "; VIOLATION: \($0)" } ?? "")")
        }
        print(guest.passed ? "the guest noticed nothing: no invariant violated, its work, syscalls, timer and clocks went on" : "the guest's checks FAILED: " + guest.problems.joined(separator: "; "))
    } else {
        print("counter: \(verification.counterAtPause.map(String.init) ?? "-") when the source paused (eax \(verification.registerAtPause.map(String.init) ?? "-")), \(verification.counterAtResume.map(String.init) ?? "-") in the target's memory when it resumed, \(verification.counterAfter.map(String.init) ?? "-") once it counted on — \(verification.counterContinued ? "continued, no write lost" : "NOT continued")")
    }
    for (name, inode) in verification.sourceInodes.sorted(by: { $0.key < $1.key }) where completed {
        let other = verification.targetInodes[name] ?? "?"
        print("memory '\(name)': source inode \(inode), target inode \(other) — \(inode == other ? "the same pages" : "a copy")")
    }
}

/// The exit code of a run's outcome (README's table).
func outcomeCode(for state: TerminalState, verified: Bool) -> GmigrateExitCode {
    switch state {
    case .completed: verified ? .success : .verificationFailed
    case .rolledBack: .rolledBack
    case .stuck: .stuck
    case .lost: .lost
    }
}

struct Migrate: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Migrate the VM a plan describes, journaled step by step.",
        discussion: """
            The plan is validated first (the same validator as `plan validate`). A plan whose source is in-process has its \
            VM created from the plan (gmem memory, a guest that counts in its memory), then migrated, and the summary checks \
            that the guest carries on with its memory intact; a plan whose source is a VMM's socket migrates that VMM's VM \
            into a spawned (or named) target VMM. Exit: 0 completed, 1 invalid plan, 2 bad input, 3 no usable /dev/kvm for \
            --backend linux, 5 state directory locked, 6 rolled back, 7 stuck (run gmigrate recover), 8 verification failed, \
            13 lost (neither VM runs the guest: recover cannot help).
            """)

    @Argument(help: "The plan (YAML or JSON).")
    var plan: String

    @Flag(help: "Rehearse the whole state machine on the model, touching no VM of this host (a source VMM is only asked to describe its VM).")
    var dryRun = false

    @Option(help: "Override the plan's strategy: auto, link, share or copy.")
    var strategy: Strategy?

    @Option(help: "linux (real KVM) or model. Default: linux where /dev/kvm is usable, else model (and it says so).")
    var backend: BackendChoice?

    @Option(help: "With --backend model: keep the model's state in this file, shared with VMM processes on the model.")
    var modelHost: String?

    @Option(name: .customLong("inject"), help: "Arm a fault: POINT=FAULT (gmigrate faults list). Repeatable.")
    var injections: [String] = []

    @Flag(help: "Honour the plan's spec.faults (never needed in production).")
    var allowFaults = false

    @OptionGroup var state: StateOptions
    @OptionGroup var output: OutputOptions

    func run() throws {
        var specs: [FaultSpec] = []
        for text in injections {
            do { specs.append(try FaultSpec(parsing: text)) } catch { throw CommandFailure(code: .badInput, message: "--inject \(error.message)") }
        }
        // The kernel: linux where usable, else the model.
        var notes: [String] = []
        let chosen: BackendChoice
        if dryRun {
            chosen = .model
        } else if let backend {
            chosen = backend
        } else if case .failure(let error) = LinuxKVM.availability() {
            chosen = .model
            notes.append("no usable /dev/kvm (\(kvmReason(error))): running on the model")
        } else {
            chosen = .linux
        }
        if chosen == .linux && modelHost != nil { throw CommandFailure(code: .badInput, message: "--model-host goes with --backend model") }
        let kernel = try openBackend(chosen)
        let capabilities: HostCapabilities
        do { capabilities = try kernel.probe() } catch { throw CommandFailure(code: .kernelFailed, message: "probing failed: \(error)") }
        // For a dry run, auto picks what this host would pick, if this host has KVM.
        let strategyHost = dryRun ? ((try? LinuxKVM().probe()) ?? capabilities) : capabilities

        let report = PlanLoader.load(path: plan, host: strategyHost, strategy: strategy)
        guard report.parsed else { throw CommandFailure(code: .badInput, message: report.diagnostics.map { $0.rendered(file: plan) }.joined(separator: "\n")) }
        guard let validPlan = report.plan, let resolved = report.strategy?.chosen else {
            throw CommandFailure(code: .checkFailed, message: "the plan is invalid for this run:\n" + report.diagnostics.map { $0.rendered(file: plan) }.joined(separator: "\n"))
        }
        if !validPlan.faults.isEmpty {
            if allowFaults { specs += validPlan.faults } else { notes.append("the plan's spec.faults are ignored (pass --allow-faults to honour them)") }
        }
        if let reason = report.strategy?.reason, validPlan.strategy == .auto { notes.append("strategy auto chose \(resolved.rawValue): \(reason)") }
        if dryRun {
            try rehearse(validPlan, strategy: resolved, faults: specs, notes: notes)
        } else if validPlan.source != .inProcess || validPlan.target != .inProcess {
            try migrateProcesses(validPlan, strategy: resolved, backend: chosen, faults: specs, notes: notes)
        } else {
            try migrateInProcess(validPlan, strategy: resolved, backend: chosen, faults: specs, notes: notes)
        }
    }

    func migrateInProcess(_ validPlan: MigrationPlan, strategy resolved: Strategy, backend chosen: BackendChoice, faults specs: [FaultSpec], notes: [String]) throws {
        let journal = try state.openJournal()
        if !output.json {
            for note in notes { print("note: \(note)") }
            print("migrating \(validPlan.name) (\(plan)) on \(chosen.rawValue), strategy \(resolved.rawValue)")
        }
        let json = output.json
        let run: InProcessRun
        do {
            run = try InProcessRun.run(
                plan: validPlan, planFile: plan, strategy: resolved, backend: chosen == .linux ? .linux : .model(hostFile: modelHost),
                journal: journal, faults: specs
            ) { step in if !json { printStep(step) } }
        } catch let error as JournalError {
            throw CommandFailure(code: error.kind == .locked ? .stateDirectoryLocked : .journalFailed, message: error.description)
        } catch let error as EndpointError {
            throw CommandFailure(code: .kernelFailed, message: "setting up the source VM failed: \(error)")
        }
        try printReport(run, notes: notes, stateDir: state.stateDir, dryRun: false)
        withExtendedLifetime(run) {}
        let code = outcomeCode(for: run.summary.state, verified: run.verification?.passed != false)
        if code != .success { throw ExitCode(code.rawValue) }
    }

    /// The dry run, for every plan kind: on the model, with what a source VMM describes.
    func rehearse(_ validPlan: MigrationPlan, strategy resolved: Strategy, faults specs: [FaultSpec], notes: [String]) throws {
        let json = output.json
        if !json {
            for note in notes { print("note: \(note)") }
            print("rehearsing \(validPlan.name) (\(plan)) on model, strategy \(resolved.rawValue)")
        }
        let result: Rehearsal.Result
        do {
            result = try Rehearsal.run(plan: validPlan, planFile: plan, strategy: resolved, faults: specs) { step in if !json { printStep(step) } }
        } catch let error as JournalError {
            throw CommandFailure(code: .journalFailed, message: error.description)
        } catch let error as EndpointError {
            throw CommandFailure(code: .kernelFailed, message: "the dry run could not run: \(error)")
        } catch let error as HandoffError {
            throw CommandFailure(code: .kernelFailed, message: "the dry run could not ask the source VMM: \(error)")
        }
        try printReport(result.run, notes: notes + result.notes, stateDir: nil, dryRun: true)
        let code = outcomeCode(for: result.run.summary.state, verified: result.run.verification?.passed != false)
        if code != .success { throw ExitCode(code.rawValue) }
    }

    /// Between VMM processes: the source is a running VMM's socket; the target is spawned or a socket.
    func migrateProcesses(_ validPlan: MigrationPlan, strategy resolved: Strategy, backend chosen: BackendChoice, faults specs: [FaultSpec], notes: [String]) throws {
        guard case .socket(let sourceSocket) = validPlan.source else {
            throw CommandFailure(code: .badInput, message: "\(plan): an in-process source needs an in-process target")
        }
        var targetSocket: String? = nil
        switch validPlan.target {
        case .socket(let path): targetSocket = path
        case .spawn: break
        case .inProcess: throw CommandFailure(code: .badInput, message: "\(plan): a source VMM process needs a target VMM process (spawn or a socket)")
        }
        let journal = try state.openJournal()
        let spawnBackend = chosen == .linux ? "linux" : "model:" + (modelHost ?? state.stateDir + "/model-host.json")
        if !output.json {
            for note in notes { print("note: \(note)") }
            print("migrating \(validPlan.name) (\(plan)) between VMM processes, strategy \(resolved.rawValue)")
        }
        let json = output.json
        let run: ProcessRun
        do {
            run = try ProcessRun.run(
                plan: validPlan, planFile: plan, strategy: resolved, journal: journal, faults: specs, sourceSocket: sourceSocket,
                targetSocket: targetSocket, spawnBackend: spawnBackend, vmmDirectory: state.stateDir + "/vmm",
                progress: { step in if !json { printStep(step) } }, watcher: try? KVMEventWatcher())
        } catch let error as JournalError {
            throw CommandFailure(code: error.kind == .locked ? .stateDirectoryLocked : .journalFailed, message: error.description)
        } catch {
            throw CommandFailure(code: .kernelFailed, message: "\(error)")
        }
        let summary = run.summary
        if json {
            struct Report: Encodable {
                var summary: MigrationSummary
                var verification: ProcessVerification?
                var targetPID: Int32?
                var targetSocket: String
                var armingProblems: [String]
            }
            print(encodeJSON(Report(summary: summary, verification: run.verification, targetPID: run.targetPID, targetSocket: run.targetSocket, armingProblems: run.armingProblems)))
        } else {
            print(summaryLine(summary))
            printOutcome(summary)
            for problem in run.armingProblems { print("warning: faults could not be armed: \(problem)") }
            if let verification = run.verification { printVerification(verification, completed: summary.state == .completed) }
            if summary.state == .completed { print("the guest runs in the target VMM, pid \(run.targetPID.map(String.init) ?? "?"), at \(run.targetSocket)") }
            print("journal: gmigrate journal show \(summary.id) --state-dir \(state.stateDir)")
        }
        let code = outcomeCode(for: summary.state, verified: run.verification?.passed != false)
        if code != .success { throw ExitCode(code.rawValue) }
    }

    struct Report: Encodable {
        var backend: String
        var summary: MigrationSummary
        var verification: Verification?
        var notes: [String]
        var dryRun: Bool
    }

    func printReport(_ run: InProcessRun, notes: [String], stateDir: String?, dryRun: Bool) throws {
        if output.json {
            print(encodeJSON(Report(backend: run.backendName, summary: run.summary, verification: run.verification, notes: notes, dryRun: dryRun)))
            return
        }
        if dryRun { for note in notes.suffix(from: min(notes.count, notes.count - 2 < 0 ? 0 : notes.count - 2)) { print("note: \(note)") } }
        let summary = run.summary
        print(summaryLine(summary))
        printOutcome(summary)
        if let verification = run.verification {
            var text = "verification: "
            if let before = verification.counterBefore {
                text += "guest counter \(before) at the pause, then \(verification.counterAfter.first.map(String.init) ?? "-")…\(verification.counterAfter.last.map(String.init) ?? "-") in the \(summary.state == .completed ? "target" : "source"); "
            }
            text += "\(verification.bytesChecked) marked bytes \(verification.bytesIntact ? "intact" : "CHANGED")"
            for (name, inode) in verification.sourceInodes.sorted(by: { $0.key < $1.key }) where summary.state == .completed {
                let other = verification.targetInodes[name] ?? "?"
                text += "; \(name): source inode \(inode), target inode \(other)\(inode == other ? " (the same memory)" : " (a copy)")"
            }
            print(text + (verification.passed ? "" : " — FAILED"))
            if let note = verification.note { print("note: \(note)") }
        }
        if let stateDir { print("journal: gmigrate journal show \(summary.id) --state-dir \(stateDir)") }
    }
}

extension Strategy: ExpressibleByArgument {}

struct Recover: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Take up every unfinished migration: the journal is replayed into the migration machine, which goes on from there (rolled back before the point of no return, forward after it).",
        discussion: "Exit 0: every migration reached completed or rolled-back; 7: one is still stuck (run recover again); 13: one is lost (recover cannot help; the journal says why); 9: a journal is corrupt and was left alone (the message names the record).")

    @OptionGroup var state: StateOptions
    @OptionGroup var output: OutputOptions

    func run() throws {
        let journal = try state.openJournal()
        let json = output.json
        let reports = MigrationRunner.recoverAll(journal, provider: recoveryProvider) { id, step in
            if !json {
                print("\(id):", terminator: "")
                printStep(step)
            }
        }
        if output.json {
            print(encodeJSON(reports))
        } else if reports.isEmpty {
            print("nothing to recover in \(state.stateDir)")
        } else {
            for report in reports {
                if let problem = report.problem {
                    print("\(report.id): NOT RECOVERED: \(problem)")
                } else {
                    print("\(report.id): \(report.state?.rawValue ?? "?"): \(report.action)")
                }
            }
        }
        if reports.contains(where: { $0.problem != nil }) { throw ExitCode(GmigrateExitCode.journalCorrupt.rawValue) }
        if reports.contains(where: { $0.state == .stuck }) { throw ExitCode(GmigrateExitCode.stuck.rawValue) }
        if reports.contains(where: { $0.state == .lost }) { throw ExitCode(GmigrateExitCode.lost.rawValue) }
    }
}

struct JournalCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "journal", abstract: "Read migration journals.", subcommands: [List.self, Show.self])

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "One line per migration: id, plan, state.")
        @OptionGroup var state: StateOptions
        @OptionGroup var output: OutputOptions

        struct Line: Encodable {
            var id: String
            var plan: String?
            var state: String
            var problem: String?
        }

        func run() throws {
            let directory = state.stateDir + "/journal"
            let ids = ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? [])
                .filter { $0.hasSuffix(".log") }.map { String($0.dropLast(4)) }.sorted()
            let lines = ids.map { id -> Line in
                do {
                    let contents = try Journal.read(stateDirectory: state.stateDir, id: id)
                    let machine = MigrationMachine(replaying: contents.entries.map(\.event))
                    let status = machine.finished?.state.rawValue ?? (machine.halted != nil ? TerminalState.stuck.rawValue : "unfinished")
                    return Line(id: id, plan: machine.started?.plan.name, state: status, problem: contents.corruption)
                } catch {
                    return Line(id: id, plan: nil, state: "unreadable", problem: "\(error)")
                }
            }
            if output.json {
                print(encodeJSON(lines))
            } else {
                for line in lines {
                    print("\(line.id)  \(line.plan ?? "-")  \(line.state)\(line.problem.map { "  (\($0))" } ?? "")")
                }
            }
        }
    }

    struct Show: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "One migration's full history.")
        @Argument(help: "The migration id (gmigrate journal list).")
        var id: String
        @OptionGroup var state: StateOptions
        @OptionGroup var output: OutputOptions

        struct Document: Encodable {
            var id: String
            var entries: [JournalEntry]
            var tornTailBytes: Int
            var corruption: String?
        }

        func run() throws {
            let contents: JournalContents
            do {
                contents = try Journal.read(stateDirectory: state.stateDir, id: id)
            } catch {
                throw CommandFailure(code: .badInput, message: error.description)
            }
            if output.json {
                print(encodeJSON(Document(id: id, entries: contents.entries, tornTailBytes: contents.tornTailBytes, corruption: contents.corruption)))
            } else {
                let start = contents.entries.first?.time ?? 0
                for entry in contents.entries {
                    let offset = String(format: "+%9.3f ms", (entry.time - start) * 1000)
                    print("#\(String(entry.sequence).padding(toLength: 4, withPad: " ", startingAt: 0)) \(offset)  \(Show.render(entry.event))")
                }
                if contents.tornTailBytes > 0 { print("(a torn final record of \(contents.tornTailBytes) bytes follows: never synced)") }
                if let corruption = contents.corruption { print("CORRUPT: \(corruption)") }
            }
            if contents.corruption != nil { throw ExitCode(GmigrateExitCode.journalCorrupt.rawValue) }
        }

        static func render(_ event: JournalEntry.Event) -> String {
            switch event {
            case .started(let started):
                return "started \(started.id): plan \(started.plan.name) (\(started.planFile)), strategy \(started.strategy.rawValue), backend \(started.backend), pid \(started.coordinatorPID)"
                    + (started.faults.isEmpty ? "" : ", faults \(started.faults.joined(separator: " "))")
            case .intent(let step, let direction):
                return "intent   \(direction == .undo ? "undo " : "")\(step.rawValue)"
            case .outcome(let outcome):
                var text = "outcome  \(outcome.direction == .undo ? "undo " : "")\(outcome.step.rawValue) \(outcome.ok ? "ok" : "FAILED") in \(milliseconds(outcome.durationNanoseconds))"
                if let error = outcome.error { text += ": \(error)" }
                if outcome.uncertain == true { text += " (its answer never came: it may have taken effect)" }
                let details = outcome.details.filter { !StepReport.bulkyDetails.contains($0.key) }.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }
                if !details.isEmpty { text += "  [\(details.joined(separator: " "))]" }
                if outcome.details["vm"] != nil { text += "  [source VM described]" }
                if outcome.details["vcpu-states"] != nil { text += "  [vcpu state saved]" }
                return text
            case .saved(let step, let state):
                return "saved    \(step.rawValue): the VM state (\(state.utf8.count) bytes of base64)"
            case .pointOfNoReturn:
                return "POINT OF NO RETURN"
            case .finished(let finished):
                var text = "finished \(finished.state.rawValue): \(finished.reason)"
                if let blackout = finished.blackoutNanoseconds { text += "; blackout \(milliseconds(blackout))\(finished.blackoutBreach ? " (breach)" : "")" }
                return text
            case .recovery(let pid, let decision):
                return "recovery by pid \(pid): \(decision)"
            case .observed(let observation):
                return "observed the \(observation.role.rawValue) VMM: \(observation.liveness.rawValue)\(observation.detail.map { " (\($0))" } ?? "")"
            case .stopRequested(let stop):
                return "\(stop.kind == .cancel ? "CANCEL" : "ABORT"): \(stop.reason)"
            case .halted(let reason):
                return "halted (stuck): \(reason)"
            }
        }
    }
}

struct Faults: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Fault points for test suites.", subcommands: [List.self])

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Every fault point. Arm one with `gmigrate migrate PLAN --inject POINT=FAULT` (FAULT: errno:ENAME, crash, delay:DURATION; *N for N hits, * for every hit).")
        @OptionGroup var output: OutputOptions

        struct Point: Encodable {
            var point: String
            var explanation: String
        }

        func run() {
            let points = FaultPoint.all.map { Point(point: $0.description, explanation: $0.explanation) }
            if output.json {
                print(encodeJSON(points))
            } else {
                for point in points { print("\(point.point.padding(toLength: 30, withPad: " ", startingAt: 0)) \(point.explanation)") }
            }
        }
    }
}
