import ArgumentParser
import CKVM
import Foundation
import Handoff
import Kernel
import Orchestrator
import Plans

#if canImport(Glibc)
import Glibc
#endif

/// A minimal real VMM: one VM with gmem-backed memory, a guest that counts in its memory, its
/// boot vcpu on a thread, and the handoff protocol on a UNIX socket, as a source or a target.
@main
struct TinyVMMCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tinyvmm",
        abstract: "A minimal VMM that speaks gmigrate's handoff protocol (docs/handoff.md).")

    @Option(help: "The UNIX socket to listen on for the coordinator.")
    var socket: String

    @Option(help: "A plan whose VM to create and run (the source role). Without it the VMM waits to be a target.")
    var plan: String?

    @Option(help: "linux (real KVM) or model.")
    var backend: String = "linux"

    @Option(help: "With --backend model: the model host file shared with the other VMMs.")
    var modelHost: String?

    @Option(help: "The name this VMM uses in logs (and as its process on a model host).")
    var name: String?

    @Option(help: "A uid besides root and this process's own that may drive this VMM.")
    var allowUID: [UInt32] = []

    @Flag(help: "Let the coordinator arm fault points at this VMM's kernel calls (arm-faults; for test suites only).")
    var allowFaults = false

    @Option(help: "Source role: write a known pattern into this much guest memory (e.g. 64Mi, 2Gi) before the guest starts, from --populate-at: a populated guest for copy tests and benchmarks. Each 8 bytes of page P hold P.")
    var populate: String?

    @Option(help: "Where --populate starts (a guest physical address; default 1Mi, above the guest program).")
    var populateAt: String = "1Mi"

    mutating func run() throws {
        let name = self.name ?? "tinyvmm-\(getpid())"
        let log = Log(name: name)
        let kernel: any KernelBackend
        var backendText = "linux"
        switch backend {
        case "linux":
            do { kernel = try LinuxKVM() } catch {
                log.say("no usable /dev/kvm: \(error)")
                throw ExitCode(3)
            }
        case "model":
            guard let modelHost else {
                log.say("--backend model needs --model-host (VMMs share the model through it)")
                throw ExitCode(2)
            }
            var options = KernelModel.Options()
            // Each run is one transaction on the shared host file, holding its lock: keep it short so
            // that requests (and the other VMMs on the host) wait milliseconds, not the interpreter.
            options.instructionBudget = 1_000
            kernel = KernelModel(host: ModelHost(file: modelHost), process: name, options: options)
            backendText = "model:" + modelHost
        default:
            log.say("unknown backend \(backend)")
            throw ExitCode(2)
        }
        let vmm = TinyVMM(kernel: kernel, backendText: backendText, process: name, log: log, allowFaults: allowFaults)
        if let plan {
            let report = PlanLoader.load(path: plan)
            guard let parsed = report.plan else {
                for diagnostic in report.diagnostics { log.say(diagnostic.rendered(file: plan)) }
                throw ExitCode(1)
            }
            var population: (gpa: UInt64, size: UInt64)? = nil
            if let populate {
                guard let size = parseQuantity(populate), let gpa = parseQuantity(populateAt), size % 4096 == 0, gpa % 4096 == 0 else {
                    log.say("--populate and --populate-at take page-aligned sizes and addresses (64Mi, 0x100000)")
                    throw ExitCode(2)
                }
                population = (gpa, size)
            }
            do {
                try vmm.startSource(parsed.vm, populate: population)
            } catch {
                log.say("creating the VM failed: \(error)")
                throw ExitCode(4)
            }
        }
        let server = HandoffServer(socket: socket, allowed: Set([0, getuid()] + allowUID), log: { log.say($0) }, handler: vmm)
        do {
            try server.serve()
        } catch {
            log.say("\(error)")
            vmm.shutdown()
            throw ExitCode(1)
        }
        vmm.shutdown()
    }
}

/// Log lines on stderr: `tinyvmm[NAME pid]: ...`.
struct Log: Sendable {
    let name: String
    func say(_ text: String) {
        FileHandle.standardError.write(Data("tinyvmm[\(name) \(getpid())]: \(text)\n".utf8))
    }
}

/// Runs the boot vcpu on its own thread until asked to stop.
final class VCPUThread: @unchecked Sendable {
    // @unchecked: `state` is only touched under `condition`.
    private let kernel: any KernelBackend
    private let vcpu: KernelHandle
    private let log: Log
    private let condition = NSCondition()
    private var stopRequested = false
    private var running = false
    private var threadID: UInt = 0
    private var reported: UInt32?
    static let kickSignal = SIGUSR1

    init(kernel: any KernelBackend, vcpu: KernelHandle, log: Log) {
        self.kernel = kernel
        self.vcpu = vcpu
        self.log = log
    }

    var lastReported: UInt32? { condition.withLock { reported } }

    func start() {
        condition.withLock {
            stopRequested = false
            running = true
        }
        (kernel as? LinuxKVM)?.requestImmediateExit(vcpu, false)
        let thread = Thread { [self] in loop() }
        thread.name = "vcpu0"
        thread.start()
    }

    private func loop() {
        condition.withLock { threadID = UInt(ckvm_thread_self()) }
        while !condition.withLock({ stopRequested }) {
            let exit: VCPUExit
            do { exit = try kernel.run(vcpu) } catch {
                log.say("KVM_RUN failed: \(error)")
                break
            }
            switch exit {
            case .io(InProcessVMM.counterPort, true, _, let data):
                let value = UInt32(littleEndianBytes: data)
                condition.withLock { reported = value }
            case .interrupted where kernel is KernelModel:
                // A model vcpu ran its instruction budget holding the shared host's lock: let the
                // request thread (and the other VMMs on the host) have it before the next run.
                usleep(2000)
            case .io, .mmio, .interrupted:
                continue
            default:
                log.say("the guest stopped: \(exit)")
                condition.withLock { stopRequested = true }
            }
        }
        condition.withLock {
            running = false
            condition.broadcast()
        }
    }

    /// Stops the vcpu cleanly: immediate_exit, then a signal to the thread if it is in KVM_RUN.
    func stop() {
        condition.lock()
        guard running else {
            condition.unlock()
            return
        }
        stopRequested = true
        (kernel as? LinuxKVM)?.requestImmediateExit(vcpu, true)
        while running {
            if threadID != 0 { _ = ckvm_kick_thread(threadID, VCPUThread.kickSignal) }
            _ = condition.wait(until: Date().addingTimeInterval(0.01))
        }
        condition.unlock()
        (kernel as? LinuxKVM)?.requestImmediateExit(vcpu, false)
    }
}
