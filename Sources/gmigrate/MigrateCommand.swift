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
    print("  \(name.padding(toLength: 24, withPad: " ", startingAt: 0)) \(mark.padding(toLength: 7, withPad: " ", startingAt: 0)) \(milliseconds(step.durationNanoseconds))\(step.error.map { "  \($0)" } ?? "")")
}

struct Migrate: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Migrate the VM a plan describes, with in-process VMMs, journaled step by step.",
        discussion: """
            The plan is validated first (the same validator as `plan validate`). In this standalone mode the source VM \
            is created from the plan (gmem memory, a guest that counts in its memory), then migrated; the summary checks \
            that the guest carries on with its memory intact. Exit: 0 completed, 1 invalid plan, 2 bad input, 3 no usable \
            /dev/kvm for --backend linux, 5 state directory locked, 6 rolled back, 7 stuck (run gmigrate recover), \
            8 verification failed.
            """)

    @Argument(help: "The plan (YAML or JSON).")
    var plan: String

    @Flag(help: "Rehearse the whole state machine on the model built from the plan; touch no VM of this host.")
    var dryRun = false

    @Option(help: "Override the plan's strategy: auto, link, share or copy.")
    var strategy: Strategy?

    @Option(help: "linux (real KVM) or model. Default: linux where /dev/kvm is usable, else model (and it says so).")
    var backend: BackendChoice?

    @Option(help: "With --backend model: keep the model's state in this file, so that it outlives a crash of this process (for rehearsing recovery).")
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
        if validPlan.source != .inProcess || validPlan.target != .inProcess {
            try migrateProcesses(validPlan, strategy: resolved, backend: chosen, faults: specs, notes: notes)
            return
        }
        if !validPlan.faults.isEmpty {
            if allowFaults { specs += validPlan.faults } else { notes.append("the plan's spec.faults are ignored (pass --allow-faults to honour them)") }
        }
        if let reason = report.strategy?.reason, validPlan.strategy == .auto { notes.append("strategy auto chose \(resolved.rawValue): \(reason)") }

        let temporary = dryRun ? FileManager.default.temporaryDirectory.appendingPathComponent("gmigrate-dry-run-\(UUID().uuidString)").path : nil
        defer { if let temporary { try? FileManager.default.removeItem(atPath: temporary) } }
        let journal: Journal
        if let temporary {
            journal = try openStateDirectory(temporary)
            notes.append("dry run: rehearsed on the model; no VM of this host was touched")
        } else {
            journal = try state.openJournal()
        }
        let standaloneBackend: StandaloneBackend = chosen == .linux ? .linux : .model(hostFile: dryRun ? nil : modelHost)
        if !output.json {
            for note in notes { print("note: \(note)") }
            print("migrating \(validPlan.name) (\(plan)) on \(chosen.rawValue), strategy \(resolved.rawValue)")
        }
        let json = output.json
        let run: StandaloneRun
        do {
            run = try StandaloneRun.run(
                plan: validPlan, planFile: plan, strategy: resolved, backend: standaloneBackend, journal: journal, faults: specs
            ) { step in if !json { printStep(step) } }
        } catch let error as JournalError {
            throw CommandFailure(code: error.kind == .locked ? .stateDirectoryLocked : .journalFailed, message: error.description)
        } catch let error as EndpointError {
            throw CommandFailure(code: .kernelFailed, message: "setting up the source VM failed: \(error)")
        }
        try printReport(run, notes: notes, stateDir: temporary == nil ? state.stateDir : nil)
        // A VMM on a model host file keeps running after this command, as a VMM process would:
        // exit here, without closing what the VMMs hold.
        if modelHost != nil { Foundation.exit(exitCode(run).rawValue) }
        withExtendedLifetime(run) {}
        if exitCode(run) != .success { throw ExitCode(exitCode(run).rawValue) }
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
        guard !dryRun else { throw CommandFailure(code: .badInput, message: "--dry-run rehearses in-process plans") }
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
                var targetPID: Int32
            }
            print(encodeJSON(Report(summary: summary, verification: run.verification, targetPID: run.target.peer.pid)))
        } else {
            var line = "\(summary.state.rawValue) in \(milliseconds(summary.totalNanoseconds)); strategy \(summary.strategy.rawValue)"
            if let blackout = summary.blackoutNanoseconds { line += "; blackout \(milliseconds(blackout))" + (summary.blackoutBreach ? " — BREACH of maxBlackout" : "") }
            print(line)
            if summary.state != .completed { print("reason: \(summary.reason)") }
            if let verification = run.verification {
                print("counter: \(verification.counterAtPause.map(String.init) ?? "-") at the pause, \(verification.counterAtResume.map(String.init) ?? "-") at the resume, \(verification.counterAfter.map(String.init) ?? "-") later")
            }
            if summary.state == .completed { print("the guest runs in the target VMM, pid \(run.target.peer.pid), at \(run.target.socketPath)") }
            print("journal: gmigrate journal show \(summary.id) --state-dir \(state.stateDir)")
        }
        let code: GmigrateExitCode
        switch summary.state {
        case .completed: code = run.verification?.counterContinued == false ? .verificationFailed : .success
        case .rolledBack: code = .rolledBack
        case .stuck, .lost: code = .stuck
        }
        if code != .success { throw ExitCode(code.rawValue) }
    }

    func exitCode(_ run: StandaloneRun) -> GmigrateExitCode {
        switch run.summary.state {
        case .completed: run.verification?.passed == false ? .verificationFailed : .success
        case .rolledBack: .rolledBack
        case .stuck, .lost: .stuck
        }
    }

    struct Report: Encodable {
        var backend: String
        var summary: MigrationSummary
        var verification: Verification?
        var notes: [String]
        var dryRun: Bool
    }

    func printReport(_ run: StandaloneRun, notes: [String], stateDir: String?) throws {
        if output.json {
            print(encodeJSON(Report(backend: run.backendName, summary: run.summary, verification: run.verification, notes: notes, dryRun: dryRun)))
            return
        }
        let summary = run.summary
        var line = "\(summary.state.rawValue) in \(milliseconds(summary.totalNanoseconds)); strategy \(summary.strategy.rawValue)"
        if let blackout = summary.blackoutNanoseconds {
            line += "; blackout \(milliseconds(blackout))" + (summary.blackoutBreach ? " — BREACH of maxBlackout" : "")
        }
        print(line)
        if summary.state != .completed { print("reason: \(summary.reason)") }
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
        abstract: "Bring every unfinished migration to a terminal state (rolled back before the point of no return, completed after it).",
        discussion: "Exit 0: nothing left unfinished; 9: a journal is corrupt and was left alone (the message names the record).")

    @OptionGroup var state: StateOptions
    @OptionGroup var output: OutputOptions

    func run() throws {
        let journal = try state.openJournal()
        let reports = Recovery.recoverAll(journal, processes: ProcessRecovery.recover)
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
                    var plan: String? = nil
                    if case .started(let started)? = contents.entries.first?.event { plan = started.plan.name }
                    var status = "unfinished"
                    if case .finished(let finished)? = contents.entries.last?.event { status = finished.state.rawValue }
                    return Line(id: id, plan: plan, state: status, problem: contents.corruption)
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
                let details = outcome.details.filter { $0.key != "vcpu-states" }.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }
                if !details.isEmpty { text += "  [\(details.joined(separator: " "))]" }
                if outcome.details["vcpu-states"] != nil { text += "  [vcpu state saved]" }
                return text
            case .pointOfNoReturn:
                return "POINT OF NO RETURN"
            case .finished(let finished):
                var text = "finished \(finished.state.rawValue): \(finished.reason)"
                if let blackout = finished.blackoutNanoseconds { text += "; blackout \(milliseconds(blackout))\(finished.blackoutBreach ? " (breach)" : "")" }
                return text
            case .recovery(let pid, let decision):
                return "recovery by pid \(pid): \(decision)"
            case .note(let note):
                return "note: \(note)"
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
