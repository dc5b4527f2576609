import CKVM
import Foundation
import Kernel

/// A second thread for the vcpu ioctls of a blackout, so that both CPUs of this project's
/// machine kind work on the vcpus at once: a source saves half its vcpus here while it saves
/// the other half; a target sets every other vcpu here while it sets the rest, and reads back
/// here what it set, while it answers and sets the clock. Every vcpu call costs 10-17 µs on
/// this nested host (vcpu_load/vcpu_put), about ten of them a vcpu on each of save, set and
/// read-back (five to eight since the registers move through the kvm_run's sync area,
/// docs/vmstate.md): they were most of a blackout, and all on one thread.
///
/// The worker runs off the CPU of the thread that releases it (`release`): the source's
/// pausing thread keeps off the host's last CPU and the target's staging thread keeps to it
/// (`BlackoutPlacement`), so the worker saves on the last CPU in a source (where the target
/// waits for the state) and sets and reads back on the other in a target (where the source,
/// its state sent, falls idle). A job handed over before its release waits: a target that sets
/// its vcpus on one thread releases the worker only at the last vcpu's part, since a worker
/// woken while the source still saves on the other CPU would preempt the staging on its own.
///
/// What the caller waits for (`saved`, `waitForSets`, `finish`) it does itself where the
/// worker has not taken it yet, so a worker slow to wake costs nothing but the handing over.
///
/// Reading vcpu `i` before the vcpus after it and the clock are set reads what a read-back at
/// the end would: those calls change no state of vcpu `i` that KVM reports (another vcpu's MSRs,
/// LAPIC and TSC offset are its own; KVM_SET_CLOCK only asks each vcpu to update its kvmclock
/// page when it next enters). Setting two vcpus at once is what a VMM with a thread per vcpu
/// does (each vcpu ioctl holds that vcpu's own lock). The VM's sections are read at the end.
final class VCPUWorker: Sendable {
    /// One vcpu to work on.
    struct Job: @unchecked Sendable {
        // @unchecked: `kernel` is a Sendable backend; the existential's box is not seen as such,
        // and `owner` is only held, never touched.
        enum Work: Equatable, Sendable {
            /// Save the vcpu's state (a source's pause).
            case save
            /// Set this state, then read it back and compare.
            case set(VCPUState)
            /// Read back and compare with this state, which was set.
            case readBack(VCPUState)
        }
        let index: Int
        let vcpu: KernelHandle
        let work: Work
        let kernel: any KernelBackend
        /// What owns `vcpu`'s descriptor, held so that it stays open while the job exists (a
        /// VMM dropped with a call in flight must not leave its number to another file).
        let owner: AnyObject
    }

    /// How a job ended.
    enum Outcome: Equatable, Sendable {
        /// Set (where it was to be) and read back equal.
        case equal
        /// The first difference (`VCPUState.difference`).
        case differs(String)
        /// A save, a set or a read-back failed.
        case failed(KernelError)
        /// What a save read.
        case saved(VCPUState)
    }

    /// What the worker thread shares with its owner; the owner's `deinit` ends the thread.
    private final class Shared: @unchecked Sendable {
        // @unchecked: every field but `condition` is touched only under `condition`.
        let condition = NSCondition()
        var waiting: [Job] = []
        /// Whether the worker may take what waits (from `release` until `finish` or `discard`).
        var released = false
        /// How many jobs are being worked on now (by the worker, or a caller that took one).
        var working = 0
        var closed = false
        var outcomes: [Int: Outcome] = [:]
        /// The vcpus handed over since the last `finish` or `discard`.
        var handed: Set<Int> = []
        /// The vcpus handed over to be set whose set has not ended; those whose set failed.
        var setting: Set<Int> = []
        var setFailures: [Int: KernelError] = [:]
        /// The worker thread (pthread_t), once it runs; the CPU it was last kept off.
        var thread: UInt = 0
        var offCPU: Int32 = -1
        /// The CPU of the last `release`'s caller: the one to keep the worker off.
        var releaserCPU: Int32 = -1
        var started = false
        /// The CPUs the worker may use: the mask of the thread that made its owner (a VMM is
        /// made before any blackout's placement; the worker itself may be started by a placed
        /// thread, whose mask it inherits).
        var base: [UInt8] = []

        /// Keeps the worker off the releaser's CPU, where it is not already (under `condition`).
        func keepOff() {
            guard thread != 0, releaserCPU >= 0, releaserCPU != offCPU, !base.isEmpty else { return }
            guard ckvm_keep_thread_off_cpu(thread, releaserCPU, base) == 0 else { return }
            offCPU = releaserCPU
        }

        /// Takes the first waiting job `matching`, if one waits (under `condition`).
        func takeWaiting(_ matching: (Job) -> Bool) -> Job? {
            guard let at = waiting.firstIndex(where: matching) else { return nil }
            working += 1
            return waiting.remove(at: at)
        }

        /// Forgets every job and outcome, and holds the worker until the next release (with
        /// nothing worked on).
        func reset() {
            waiting.removeAll()
            outcomes = [:]
            handed = []
            setting = []
            setFailures = [:]
            released = false
        }
    }

    private let shared = Shared()

    init() {
        var base = [UInt8](repeating: 0, count: Int(ckvm_cpu_mask_size()))
        if ckvm_cpu_mask(&base) == 0 { shared.base = base }
    }

    deinit {
        shared.condition.withLock {
            shared.closed = true
            shared.condition.broadcast()
        }
    }

    /// Hands over a job; the worker takes it once released (at once, where it is released
    /// already).
    func add(_ job: Job) {
        shared.condition.withLock {
            shared.waiting.append(job)
            shared.handed.insert(job.index)
            if case .set = job.work { shared.setting.insert(job.index) }
            if shared.released { shared.condition.broadcast() }
        }
    }

    /// Lets the worker take what was handed over, off the calling thread's CPU.
    func release() {
        let shared = shared
        let cpu = ckvm_current_cpu()
        shared.condition.withLock {
            guard !shared.waiting.isEmpty else { return }
            shared.released = true
            shared.releaserCPU = cpu
            if !shared.started {
                shared.started = true
                let thread = Thread { VCPUWorker.work(shared) }
                thread.name = "blackout-worker"
                thread.start()
            }
            shared.keepOff()
            shared.condition.broadcast()
        }
    }

    /// The worker: takes, in order, what waits while released, until closed.
    private static func work(_ shared: Shared) {
        _ = ckvm_name_thread("blackout-worker")
        shared.condition.withLock {
            shared.thread = UInt(ckvm_thread_self())
            shared.keepOff()
        }
        while let job = take(shared) { run(job, in: shared) }
    }

    /// The next job the worker may take, waiting for one; nil once closed.
    private static func take(_ shared: Shared) -> Job? {
        shared.condition.withLock {
            while !shared.closed && !(shared.released && !shared.waiting.isEmpty) { shared.condition.wait() }
            guard !shared.closed else { return nil }
            // A set first: the staging's answer waits for it, not for a read-back.
            let at = shared.waiting.firstIndex { if case .set = $0.work { true } else { false } } ?? 0
            shared.working += 1
            return shared.waiting.remove(at: at)
        }
    }

    /// Does `job` (on whichever thread took it) and keeps how it ended. With `readingBackLater`,
    /// a set is not read back here: its read-back waits with the others (a caller that took the
    /// set answers before any read-back).
    private static func run(_ job: Job, in shared: Shared, readingBackLater: Bool = false) {
        let outcome: Outcome
        do throws(KernelError) {
            switch job.work {
            case .save:
                outcome = .saved(try job.kernel.vcpuState(job.vcpu))
            case .set(let state):
                do {
                    try job.kernel.setVCPUState(job.vcpu, state)
                } catch {
                    shared.condition.withLock {
                        shared.setFailures[job.index] = error
                        shared.setting.remove(job.index)
                    }
                    throw error
                }
                let later = readingBackLater ? Job(index: job.index, vcpu: job.vcpu, work: .readBack(state), kernel: job.kernel, owner: job.owner) : nil
                shared.condition.withLock {
                    shared.setting.remove(job.index)
                    if let later {
                        shared.waiting.append(later)
                        shared.working -= 1
                    }
                    shared.condition.broadcast()
                }
                if later != nil { return }
                let back = try job.kernel.vcpuState(job.vcpu)
                outcome = VCPUState.difference(restored: back, saved: state).map(Outcome.differs) ?? .equal
            case .readBack(let saved):
                let back = try job.kernel.vcpuState(job.vcpu)
                outcome = VCPUState.difference(restored: back, saved: saved).map(Outcome.differs) ?? .equal
            }
        } catch {
            outcome = .failed(error)
        }
        shared.condition.withLock {
            shared.outcomes[job.index] = outcome
            shared.working -= 1
            shared.condition.broadcast()
        }
    }

    /// What the save of vcpu `index` read (done here if the worker has not taken it yet).
    func saved(_ index: Int) throws(KernelError) -> VCPUState {
        let shared = shared
        let waiting = shared.condition.withLock {
            shared.takeWaiting { if case .save = $0.work { $0.index == index } else { false } }
        }
        if let waiting { VCPUWorker.run(waiting, in: shared) }
        let outcome = shared.condition.withLock {
            while shared.outcomes[index] == nil && !shared.closed { shared.condition.wait() }
            return shared.outcomes.removeValue(forKey: index)
        }
        switch outcome {
        case .saved(let state)?: return state
        case .failed(let error)?: throw error
        default: throw .failed(operation: .getVCPUState, errno: Errno(rawValue: ECANCELED))
        }
    }

    /// Waits until every set handed over ended (setting here those the worker has not taken,
    /// whose read-backs then wait with the others); the first that failed, by vcpu.
    func waitForSets() -> (index: Int, error: KernelError)? {
        let shared = shared
        while let job = shared.condition.withLock({ shared.takeWaiting { if case .set = $0.work { true } else { false } } }) {
            VCPUWorker.run(job, in: shared, readingBackLater: true)
        }
        return shared.condition.withLock {
            while !shared.setting.isEmpty { shared.condition.wait() }
            return shared.setFailures.min { $0.key < $1.key }.map { ($0.key, $0.value) }
        }
    }

    /// Reads back, on the calling thread beside the worker, what still waits and each of `all`
    /// that was not handed over; waits until the worker is done; then every outcome by vcpu,
    /// which it forgets.
    func finish(all: [Job]) -> [Int: Outcome] {
        let shared = shared
        shared.condition.withLock { shared.waiting += all.filter { !shared.handed.contains($0.index) } }
        while let job = shared.condition.withLock({ () -> Job? in
            guard !shared.waiting.isEmpty else { return nil }
            shared.working += 1
            return shared.waiting.removeFirst()
        }) {
            VCPUWorker.run(job, in: shared)
        }
        return shared.condition.withLock {
            while shared.working > 0 { shared.condition.wait() }
            defer { shared.reset() }
            return shared.outcomes
        }
    }

    /// Drops what waits and what was done, once the jobs taken are done: after it returns, no
    /// job touches a vcpu (its descriptor may be closed).
    func discard() {
        shared.condition.withLock {
            shared.waiting.removeAll()
            while shared.working > 0 { shared.condition.wait() }
            shared.reset()
        }
    }
}
