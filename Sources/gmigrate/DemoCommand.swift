import ArgumentParser
import Foundation
import Handoff
import HostNet
import Journal
import Kernel
import Orchestrator
import Plans

/// The plan of `gmigrate demo` (migration-plans/demo-processes.yaml), embedded so that the demo
/// runs from anywhere.
let embeddedDemoPlan = """
    apiVersion: gmigrate/v1
    kind: MigrationPlan
    metadata:
      name: demo-processes
    spec:
      source:
        vmm: /tmp/gmigrate-demo/source.sock
      target:
        vmm: spawn
      vm:
        type: default
        vcpus: 1
        guestMemfds:
          - name: ram
            size: 2Mi
            flags: [mmap, init-shared]
        memslots:
          - slot: 0
            guestPhysAddr: 0x0
            size: 2Mi
            guestMemfd: ram
            offset: 0
      strategy: auto
      policy:
        maxBlackout: 50ms
        stepTimeout: 5s
    """

struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Migrate a live guest from one tinyvmm process into a new one, with the best strategy this host offers.",
        discussion: "Starts a source tinyvmm running a guest that counts in its memory, spawns a target tinyvmm, runs the journaled migration between the two processes, and shows the timeline, the strategy, the blackout and the verification. Without a usable /dev/kvm it runs on the model and says so first.")

    @Option(help: "A plan instead of the embedded demo plan (its source socket is where the demo starts the source).")
    var plan: String?

    @Option(help: "linux or model (default: linux where /dev/kvm is usable).")
    var backend: BackendChoice?

    @Option(help: "Override the strategy: auto, link, share or copy.")
    var strategy: Strategy?

    @Option(help: "The state directory (default: a fresh one under /tmp/gmigrate-demo).")
    var stateDir: String?

    @Option(help: "How long the guest runs in the source before the migration, in milliseconds.")
    var warmup: Int = 300

    @Option(name: .customLong("inject"), help: "Arm a fault: POINT=FAULT (gmigrate faults list). Repeatable.")
    var injections: [String] = []

    @OptionGroup var output: OutputOptions

    func run() throws {
        var specs: [FaultSpec] = []
        for text in injections {
            do { specs.append(try FaultSpec(parsing: text)) } catch { throw CommandFailure(code: .badInput, message: "--inject \(error.message)") }
        }
        var chosen = backend ?? .linux
        var firstLine = "gmigrate demo: a live guest moves between two tinyvmm processes on real KVM"
        if backend == nil, case .failure(let error) = LinuxKVM.availability() {
            chosen = .model
            firstLine = "gmigrate demo: ON THE MODEL — no usable /dev/kvm here (\(kvmReason(error))); the VMM processes share a model kernel"
        } else if chosen == .model {
            firstLine = "gmigrate demo: on the model (--backend model); the VMM processes share a model kernel"
        }
        if !output.json { print(firstLine) }
        let directory = stateDir ?? "/tmp/gmigrate-demo/\(ProcessInfo.processInfo.processIdentifier)"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let planText: String
        let planFile: String
        if let plan {
            guard let text = try? String(contentsOfFile: plan, encoding: .utf8) else { throw CommandFailure(code: .badInput, message: "\(plan): cannot read the file") }
            (planText, planFile) = (text, plan)
        } else {
            (planText, planFile) = (embeddedDemoPlan, "(embedded demo plan)")
        }
        let kernelBackend: String
        let capabilities: HostCapabilities
        switch chosen {
        case .linux:
            let kernel = try openBackend(.linux)
            capabilities = try kernel.probe()
            kernelBackend = "linux"
        case .model:
            capabilities = try KernelModel().probe()
            kernelBackend = "model:" + directory + "/model-host.json"
        }
        let report = PlanLoader.load(text: planText, file: planFile, host: capabilities, strategy: strategy)
        guard let validPlan = report.plan, let resolved = report.strategy?.chosen else {
            throw CommandFailure(code: .checkFailed, message: "the plan is invalid here:\n" + report.diagnostics.map { $0.rendered(file: planFile) }.joined(separator: "\n"))
        }
        guard case .socket = validPlan.source else {
            throw CommandFailure(code: .badInput, message: "the demo starts a source VMM process: spec.source.vmm must be a socket path")
        }
        // The demo's own source listens in the demo's directory, so that demos never collide.
        let sourceSocket = directory + "/source.sock"
        // The source tinyvmm, running the plan's VM.
        let planCopy = directory + "/plan.yaml"
        try planText.write(toFile: planCopy, atomically: true, encoding: .utf8)
        let sourceProcess = try ProcessRun.spawnVMM(
            socket: sourceSocket, backend: kernelBackend, name: "demo/source", logFile: directory + "/source.log", plan: planCopy)
        let started: [Process] = [sourceProcess]
        defer {
            // The demo ends what it started, whatever the outcome: no VMM is left running.
            for process in started where process.isRunning {
                process.terminate()
                if !ProcessWatch.waitForExit(process.processIdentifier, timeout: .seconds(2)) { kill(process.processIdentifier, SIGKILL) }
                process.waitUntilExit()
            }
        }
        Thread.sleep(forTimeInterval: Double(warmup) / 1000)
        let journal = try openStateDirectory(directory)
        if !output.json {
            if let reason = report.strategy?.reason, validPlan.strategy == .auto { print("strategy: auto chose \(resolved.rawValue) (\(reason))") }
            print("source: tinyvmm pid \(sourceProcess.processIdentifier) at \(sourceSocket); target: spawned by the coordinator")
        }
        let json = output.json
        let run: ProcessRun
        do {
            run = try ProcessRun.run(
                plan: validPlan, planFile: planFile, strategy: resolved, journal: journal, faults: specs, sourceSocket: sourceSocket,
                targetSocket: nil, spawnBackend: kernelBackend, vmmDirectory: directory,
                progress: { step in if !json { printStep(step) } }, watcher: try? KVMEventWatcher())
        } catch {
            throw CommandFailure(code: .kernelFailed, message: "the demo could not run: \(error)")
        }
        let summary = run.summary
        let verification = run.verification
        // A retired source exits by itself; the target the coordinator spawned is shut down below.
        let sourceExited = summary.state == .completed && ProcessWatch.waitForExit(sourceProcess.processIdentifier, timeout: .seconds(5))
        if sourceExited { sourceProcess.waitUntilExit() }
        if let pid = run.targetPID, summary.state == .completed {
            (try? RemoteVMM(role: "demo", socketPath: run.targetSocket, timeout: .seconds(2)))?.shutdown()
            _ = ProcessWatch.waitForExit(pid, timeout: .seconds(5))
        }
        if output.json {
            struct Report: Encodable {
                var backend: String
                var summary: MigrationSummary
                var verification: ProcessVerification?
            }
            print(encodeJSON(Report(backend: kernelBackend, summary: summary, verification: verification)))
        } else {
            print(summaryLine(summary))
            printOutcome(summary)
            if let verification {
                print("counter: \(verification.counterAtPause.map(String.init) ?? "-") when the source paused (eax \(verification.registerAtPause.map(String.init) ?? "-")), \(verification.counterAtResume.map(String.init) ?? "-") in the target's memory when it resumed, \(verification.counterAfter.map(String.init) ?? "-") once it counted on — \(verification.counterContinued ? "continued, no write lost" : "NOT continued")")
                for (name, inode) in verification.sourceInodes.sorted(by: { $0.key < $1.key }) where summary.state == .completed {
                    let other = verification.targetInodes[name] ?? "?"
                    print("memory '\(name)': source inode \(inode), target inode \(other) — \(inode == other ? "the same pages" : "a copy")")
                }
            }
            if sourceExited {
                print("source process \(sourceProcess.processIdentifier) exited with status \(sourceProcess.terminationStatus) after retiring its VM")
            }
            print("journal: gmigrate journal show \(summary.id) --state-dir \(directory)")
        }
        let code = outcomeCode(for: summary.state, verified: verification?.counterContinued == true)
        if code != .success { throw ExitCode(code.rawValue) }
    }
}
