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
        vcpus: 2
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

    @Option(help: "Migrate the guest this many times, each target the next source (A→B→C…).")
    var hops: Int = 1

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
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
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
        guard hops >= 1, hops <= 1000 else { throw CommandFailure(code: .badInput, message: "--hops takes 1 to 1000") }
        let sourceProcess = try ProcessRun.spawnVMM(
            socket: sourceSocket, backend: kernelBackend, name: "demo/source", logFile: directory + "/source.log", plan: planCopy)
        var survivors: [Int32] = [sourceProcess.processIdentifier]
        var lastSocket = sourceSocket
        defer {
            // The demo ends what it started, whatever the outcome: no VMM is left running.
            (try? RemoteVMM(role: "demo", socketPath: lastSocket, timeout: .seconds(2)))?.shutdown()
            for pid in survivors where ProcessWatch.isAlive(pid) {
                if !ProcessWatch.waitForExit(pid, timeout: .seconds(2)) { kill(pid, SIGTERM) }
                if !ProcessWatch.waitForExit(pid, timeout: .seconds(2)) { kill(pid, SIGKILL) }
            }
            if sourceProcess.isRunning { sourceProcess.terminate() }
            sourceProcess.waitUntilExit()
        }
        Thread.sleep(forTimeInterval: Double(warmup) / 1000)
        let journal = try openStateDirectory(directory)
        if !output.json {
            if let reason = report.strategy?.reason, validPlan.strategy == .auto { print("strategy: auto chose \(resolved.rawValue) (\(reason))") }
            print("source: tinyvmm pid \(sourceProcess.processIdentifier) at \(sourceSocket); target: spawned by the coordinator")
        }
        let json = output.json
        struct Hop: Encodable {
            var hop: Int
            var summary: MigrationSummary
            var verification: ProcessVerification?
            var targetSocket: String
        }
        var done: [Hop] = []
        var code = GmigrateExitCode.success
        for hop in 1...hops {
            var hopPlan = validPlan
            hopPlan.source = .socket(path: lastSocket)
            let run: ProcessRun
            do {
                run = try ProcessRun.run(
                    plan: hopPlan, planFile: planFile, strategy: resolved, journal: journal, faults: specs, sourceSocket: lastSocket,
                    targetSocket: nil, spawnBackend: kernelBackend, vmmDirectory: directory,
                    progress: { step in if !json && hop == 1 { printStep(step) } }, watcher: try? KVMEventWatcher())
            } catch {
                throw CommandFailure(code: .kernelFailed, message: "the demo could not run (hop \(hop)): \(error)")
            }
            let summary = run.summary
            let verification = run.verification
            if let pid = run.targetPID { survivors.append(pid) }
            done.append(Hop(hop: hop, summary: summary, verification: verification, targetSocket: run.targetSocket))
            if !json {
                if hops > 1 { print("hop \(hop)/\(hops): " + summaryLine(summary)) } else { print(summaryLine(summary)) }
                printOutcome(summary)
                if let verification { printVerification(verification, completed: summary.state == .completed) }
            }
            code = outcomeCode(for: summary.state, verified: verification?.passed == true)
            guard code == .success else { break }
            // The retired source exits by itself; the target is the next hop's source.
            let previous = survivors[survivors.count - 2]
            let exited = ProcessWatch.waitForExit(previous, timeout: .seconds(5))
            if !json && hop == 1 && exited && previous == sourceProcess.processIdentifier {
                sourceProcess.waitUntilExit()
                print("source process \(previous) exited with status \(sourceProcess.terminationStatus) after retiring its VM")
            }
            lastSocket = run.targetSocket
        }
        if json {
            struct Report: Encodable {
                var backend: String
                var hops: [Hop]
            }
            print(encodeJSON(Report(backend: kernelBackend, hops: done)))
        } else {
            if hops > 1, code == .success { print("the guest moved \(hops) times; it runs in the VMM at \(lastSocket)") }
            print("journal: gmigrate journal list --state-dir \(directory)")
        }
        if code != .success { throw ExitCode(code.rawValue) }
    }
}
