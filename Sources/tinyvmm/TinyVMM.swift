import ArgumentParser
import CKVM
import Foundation
import Guests
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

    @Option(help: "Where --populate starts (a guest physical address; default 2Mi, above either guest program).")
    var populateAt: String = "2Mi"

    @Option(help: "Source role: the guest program, long-mode (64-bit, every vcpu; linux only) or counter (16-bit, vcpu 0). Default: long-mode on linux, counter on the model.")
    var guest: String?

    @Option(help: "Measure the bare floor of a blackout RUNS times and exit (tools/bench-blackout): with --plan, the VM moves back and forth between two VMs of this process sharing its memory, by the same sections and ioctls gmigrate moves, with no check, no message and no sync. Prints JSON.")
    var measureFloor: Int?

    mutating func run() throws {
        // Whoever started us may have blocked or ignored signals (a test runner, a daemon): a
        // VMM stops on SIGTERM, and SIGUSR1 kicks its vcpus.
        _ = ckvm_reset_signals()
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
            let program: GuestProgram
            switch guest ?? (backend == "linux" ? "long-mode" : "counter") {
            case "long-mode": program = .longMode
            case "counter": program = .counter(InProcessVMM.quietCounterProgram)
            case let other:
                log.say("unknown guest '\(other)' (long-mode or counter)")
                throw ExitCode(2)
            }
            let programEnd: UInt64 = if case .longMode = program { LongModeGuest.memoryNeeded } else { InProcessVMM.counterAddress + 4 }
            if let population, population.gpa < programEnd {
                log.say("--populate-at \(populateAt) would overwrite the \(program.name) guest, which lives below 0x\(String(programEnd, radix: 16))")
                throw ExitCode(2)
            }
            do {
                try vmm.startSource(parsed.vm, guest: program, populate: population)
            } catch {
                log.say("creating the VM failed: \(error)")
                throw ExitCode(4)
            }
        }
        if let runs = measureFloor {
            let floors = try vmm.measureFloor(runs: max(1, min(runs, 10_000)))
            print("{\"floorNanoseconds\": [\(floors.map(String.init).joined(separator: ", "))]}")
            vmm.shutdown()
            return
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

/// Where a target's vcpu threads wait before their first KVM_RUN, all on one condition: opening
/// it wakes every thread with one call, so the thread that opens it is not preempted by the
/// first vcpu before it has let the others go.
final class VCPUGate: @unchecked Sendable {
    // @unchecked: `state` is only touched under `condition`.
    private let condition = NSCondition()
    private var state = State.closed
    enum State { case closed, open, cancelled }

    /// Waits while closed; whether the gate opened (false: cancelled, the thread leaves).
    func pass() -> Bool {
        condition.lock()
        defer { condition.unlock() }
        while state == .closed { condition.wait() }
        return state == .open
    }

    var isClosed: Bool { condition.withLock { state == .closed } }

    func open() { settle(.open) }
    func cancel() { settle(.cancelled) }

    private func settle(_ new: State) {
        condition.withLock {
            guard state == .closed else { return }
            state = new
            condition.broadcast()
        }
    }
}

/// Runs one vcpu on its own thread until asked to stop.
final class VCPUThread: @unchecked Sendable {
    // @unchecked: the mutable fields are only touched under `condition`.
    private let kernel: any KernelBackend
    private let vcpu: KernelHandle
    let index: Int
    private let log: Log
    /// Told of each port the guest writes to (other than the counter's).
    private let onPort: @Sendable (UInt16) -> Void
    private let condition = NSCondition()
    private var stopRequested = false
    private var running = false
    /// Whether the stopped thread may end (`release`); until then it waits, parked.
    private var released = false
    /// Started, but waiting before its first KVM_RUN until the gate opens (a target's threads
    /// exist before the pause, so that none is created inside the blackout).
    private var gate: VCPUGate?
    private var threadID: UInt = 0
    private var reported: UInt32?
    static let kickSignal = SIGUSR1

    init(kernel: any KernelBackend, vcpu: KernelHandle, index: Int, log: Log, onPort: @escaping @Sendable (UInt16) -> Void) {
        self.kernel = kernel
        self.vcpu = vcpu
        self.index = index
        self.log = log
        self.onPort = onPort
    }

    /// When the thread was about to enter KVM_RUN for the first time since `start`, on
    /// `MonotonicClock` (another process can set it against its own instants).
    private var entered: UInt64?

    /// The CPU a gated thread waits on (-1: none). Once the gate opens, each vcpu thread of a
    /// target wakes on a CPU of its own: woken together, two of them were placed on the one
    /// CPU both last ran on in a run of five here, where the first to run kept it in its guest
    /// for up to a millisecond (to the scheduler's tick) while the other CPU idled and the
    /// second waited to enter KVM_RUN, inside the blackout.
    private var spreadCPU: Int32 = -1

    /// Waits until the thread is about to enter KVM_RUN; when it was (`MonotonicClock`).
    func waitEntered() -> UInt64 {
        condition.lock()
        defer { condition.unlock() }
        while entered == nil { condition.wait() }
        return entered ?? MonotonicClock.nanoseconds
    }

    var lastReported: UInt32? { condition.withLock { reported } }
    /// Whether the thread runs the guest (a gated thread does not yet).
    var isRunning: Bool {
        let (running, gate) = condition.withLock { (self.running, self.gate) }
        return running && !(gate?.isClosed ?? false)
    }

    private var linux: LinuxKVM? { (kernel as? LinuxKVM) ?? ((kernel as? FaultInjectingBackend)?.inner as? LinuxKVM) }

    /// `gate`: the thread waits at it before its first KVM_RUN; `spreadTo`: on that CPU only,
    /// until it passes (its mask is put back before it enters).
    func start(gate: VCPUGate? = nil, spreadTo cpu: Int32 = -1) {
        condition.withLock {
            stopRequested = false
            running = true
            self.gate = gate
            entered = nil
            spreadCPU = gate != nil ? cpu : -1
        }
        linux?.requestImmediateExit(vcpu, false)
        let thread = Thread { [self] in loop() }
        thread.name = "vcpu\(index)"
        thread.start()
    }

    private func loop() {
        // The kick must reach this thread even where the process was started with it blocked
        // (a test runner's mask is inherited across exec).
        _ = ckvm_unblock_signal(VCPUThread.kickSignal)
        // Named for the kernel too (`ps -L`, /proc/PID/task/TID/comm), as QEMU names its vcpu threads.
        _ = ckvm_name_thread("vcpu\(index)")
        condition.withLock {
            threadID = UInt(ckvm_thread_self())
        }
        var mask = [UInt8](repeating: 0, count: Int(ckvm_cpu_mask_size()))
        let cpu = condition.withLock { spreadCPU }
        let spread = cpu >= 0 && ckvm_place_self(cpu, 1, &mask) == 0
        if let gate = condition.withLock({ self.gate }), !gate.pass() || condition.withLock({ stopRequested }) {
            condition.withLock {
                running = false
                condition.broadcast()
            }
            return
        }
        if spread {
            let result = ckvm_set_cpu_mask(mask)
            if result != 0 { log.say("vcpu \(index): its CPU mask could not be put back (\(Errno(rawValue: result).name)): it stays on CPU \(cpu)") }
        }
        condition.withLock {
            entered = MonotonicClock.nanoseconds
            condition.broadcast()
        }
        var lastExitWasIO = false
        while !condition.withLock({ stopRequested }) {
            let exit: VCPUExit
            do { exit = try kernel.run(vcpu) } catch {
                log.say("vcpu \(index): KVM_RUN failed: \(error)")
                break
            }
            lastExitWasIO = handledIO(exit)
            if lastExitWasIO { continue }
            switch exit {
            case .interrupted where kernel is KernelModel:
                // A model vcpu ran its instruction budget holding the shared host's lock: let the
                // request thread (and the other VMMs on the host) have it before the next run.
                usleep(2000)
            case .interrupted:
                continue
            case .halt:
                // HLT exits to the VMM only without an in-kernel LAPIC (the model): a parked vcpu
                // waits for nothing, so it naps and runs its halt loop again.
                usleep(2000)
            default:
                let rip = (try? kernel.vcpuState(vcpu))?.registers.rip
                log.say("vcpu \(index): the guest stopped: \(exit) at rip 0x\(String(rip ?? 0, radix: 16))")
                condition.withLock { stopRequested = true }
            }
        }
        // An I/O exit is complete only once KVM_RUN is entered again (api.rst): with
        // immediate_exit set, KVM finishes it and returns at once, running no guest instruction.
        // An MMIO access split in fragments exits again for the next one, which is completed
        // the same way, until KVM answers EINTR (a save then finds nothing pending). An access
        // has at most a few fragments; the bound only keeps a misbehaving guest from holding
        // the stop here.
        if lastExitWasIO, let linux {
            linux.requestImmediateExit(vcpu, true)
            for _ in 0..<16 {
                guard let exit = try? kernel.run(vcpu), handledIO(exit) else { break }
            }
        }
        // Parked until released: a thread that ended here would hold the CPU its waiter (woken
        // on the same CPU) needs for tens of microseconds of thread teardown, inside the blackout.
        condition.withLock {
            running = false
            condition.broadcast()
            while !released { condition.wait() }
        }
    }

    /// Handles an I/O or MMIO exit (the counter's port write, a port the VMM watches, MMIO the
    /// guest does not expect an answer from); false for any other exit.
    private func handledIO(_ exit: VCPUExit) -> Bool {
        switch exit {
        case .io(InProcessVMM.counterPort, true, _, let data):
            let value = UInt32(littleEndianBytes: data)
            condition.withLock { reported = value }
        case .io(let port, _, _, _):
            onPort(port)
        case .mmio:
            break
        default:
            return false
        }
        return true
    }

    /// Lets a stopped thread end (`stopGuest` releases it once nobody waits on the stop).
    func release() {
        condition.withLock {
            released = true
            condition.broadcast()
        }
    }

    /// Asks the vcpu to stop: immediate_exit, then a signal if it is in KVM_RUN (a gated thread
    /// leaves without running).
    func requestStop() {
        condition.withLock {
            guard running else { return }
            stopRequested = true
            gate?.cancel()
            condition.broadcast()
            linux?.requestImmediateExit(vcpu, true)
            if threadID != 0 { _ = ckvm_kick_thread(threadID, VCPUThread.kickSignal) }
        }
    }

    /// Waits until the thread has left its loop (kicking it again while it has not).
    func waitStopped() {
        condition.lock()
        while running {
            if threadID != 0 { _ = ckvm_kick_thread(threadID, VCPUThread.kickSignal) }
            _ = condition.wait(until: Date().addingTimeInterval(0.001))
        }
        condition.unlock()
        linux?.requestImmediateExit(vcpu, false)
    }

    func stop() {
        requestStop()
        waitStopped()
    }
}
