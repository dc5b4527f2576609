import CKVM
import Foundation
import Kernel

/// Reads a staging's vcpus back while the staging goes on: a vcpu handed to it (`add`) once all
/// its sections are set is read back and compared on a worker thread while the staging sets the
/// last vcpu (`release`, when the last vcpu's part comes), and the last one while the staging
/// answers, sets the clock and reads the VM's sections back. Inside a blackout the target is the
/// slower side, and a read-back of every vcpu after the last was set (10 vcpu ioctls each, 6-15
/// µs each on this nested host) was its longest piece; now only what the worker has not done
/// yet is left for `finish`, which does it on the calling thread.
///
/// The worker starts only once the last part came, and runs off the staging thread's CPU: while
/// the source still saves, a worker woken beside the staging found both CPUs of this machine
/// kind busy and preempted the staging on its own CPU (the scheduler does not move a woken
/// thread to a CPU that falls idle later), which only delayed the answer; once the source has
/// sent its last part, its CPU is the one that falls idle. The worker is a thread of its own,
/// kept off the CPU of the thread that releases it (where the process may run on another).
///
/// Reading vcpu `i` before the vcpus after it and the clock are set reads what a read-back at
/// the end would: those calls change no state of vcpu `i` that KVM reports (another vcpu's MSRs,
/// LAPIC and TSC offset are its own; KVM_SET_CLOCK only asks each vcpu to update its kvmclock
/// page when it next enters). The VM's sections are read at the end, as before.
final class VCPUReadBack: Sendable {
    /// One vcpu to read back: what was set into it.
    struct Job: @unchecked Sendable {
        // @unchecked: `kernel` is a Sendable backend; the existential's box is not seen as such,
        // and `owner` is only held, never touched.
        let index: Int
        let vcpu: KernelHandle
        let saved: VCPUState
        let kernel: any KernelBackend
        /// What owns `vcpu`'s descriptor, held so that it stays open while the job exists (a
        /// VMM dropped with a read in flight must not leave its number to another file).
        let owner: AnyObject
    }

    /// How a vcpu read back.
    enum Outcome: Equatable, Sendable {
        case equal
        /// The first difference (`VCPUState.difference`).
        case differs(String)
        /// Reading it failed.
        case failed(KernelError)
    }

    /// What the worker thread shares with its owner; the owner's `deinit` ends the thread.
    private final class Shared: @unchecked Sendable {
        // @unchecked: every field but `condition` is touched only under `condition`.
        let condition = NSCondition()
        var waiting: [Job] = []
        /// Whether the worker may take what waits (from `release` until `finish` or `discard`).
        var released = false
        /// Whether the worker reads a vcpu now.
        var working = false
        var closed = false
        var outcomes: [Int: Outcome] = [:]
        /// The vcpus handed over since the last `finish` or `discard`.
        var handed: Set<Int> = []
        /// The worker thread (pthread_t), once it runs; the CPU it was last kept off.
        var thread: UInt = 0
        var offCPU: Int32 = -1
        /// The CPU of the last `release`'s caller: the one to keep the worker off.
        var releaserCPU: Int32 = -1
        var started = false
        /// The CPUs the worker may use as it was made (the process's, before any placement).
        var base: [UInt8] = []

        /// Keeps the worker off the releaser's CPU, where it is not already (under `condition`).
        func keepOff() {
            guard thread != 0, releaserCPU >= 0, releaserCPU != offCPU, !base.isEmpty, ckvm_keep_thread_off_cpu(thread, releaserCPU, base) == 0 else { return }
            offCPU = releaserCPU
        }
    }

    private let shared = Shared()

    deinit {
        shared.condition.withLock {
            shared.closed = true
            shared.condition.broadcast()
        }
    }

    /// Hands over a vcpu whose sections are all set; the worker reads it back once released
    /// (at once, where it is released already: the last vcpu).
    func add(_ job: Job) {
        shared.condition.withLock {
            shared.waiting.append(job)
            shared.handed.insert(job.index)
            if shared.released { shared.condition.broadcast() }
        }
    }

    /// Lets the worker read back what was handed over, off the calling thread's CPU.
    func release() {
        let shared = shared
        let cpu = ckvm_current_cpu()
        shared.condition.withLock {
            guard !shared.waiting.isEmpty else { return }
            shared.released = true
            shared.releaserCPU = cpu
            if !shared.started {
                shared.started = true
                let thread = Thread { VCPUReadBack.work(shared) }
                thread.name = "read-back"
                thread.start()
            }
            shared.keepOff()
            shared.condition.broadcast()
        }
    }

    /// The worker: reads back, in vcpu order, what waits while released, until closed.
    private static func work(_ shared: Shared) {
        _ = ckvm_name_thread("read-back")
        var base = [UInt8](repeating: 0, count: Int(ckvm_cpu_mask_size()))
        let known = ckvm_cpu_mask(&base) == 0
        shared.condition.withLock {
            shared.thread = UInt(ckvm_thread_self())
            if known { shared.base = base }
            shared.keepOff()
        }
        while let job = take(shared) { record(job, in: shared) }
    }

    /// The next job the worker may take, waiting for one; nil once closed.
    private static func take(_ shared: Shared) -> Job? {
        shared.condition.withLock {
            shared.working = false
            shared.condition.broadcast()
            while !shared.closed && !(shared.released && !shared.waiting.isEmpty) { shared.condition.wait() }
            guard !shared.closed else { return nil }
            shared.working = true
            return shared.waiting.removeFirst()
        }
    }

    /// Reads `job`'s vcpu back and keeps how it compared.
    private static func record(_ job: Job, in shared: Shared) {
        let outcome: Outcome
        do {
            let back = try job.kernel.vcpuState(job.vcpu)
            outcome = VCPUState.difference(restored: back, saved: job.saved).map(Outcome.differs) ?? .equal
        } catch {
            outcome = .failed(error)
        }
        shared.condition.withLock { shared.outcomes[job.index] = outcome }
    }

    /// Reads back, on the calling thread beside the worker, what still waits and each of `all`
    /// that was not handed over; waits until the worker is done; then every outcome by vcpu,
    /// which it forgets.
    func finish(all: [Job]) -> [Int: Outcome] {
        let shared = shared
        shared.condition.withLock { shared.waiting += all.filter { !shared.handed.contains($0.index) } }
        while let job = shared.condition.withLock({ shared.waiting.isEmpty ? nil : shared.waiting.removeFirst() }) { VCPUReadBack.record(job, in: shared) }
        return shared.condition.withLock {
            while shared.working { shared.condition.wait() }
            defer {
                shared.outcomes = [:]
                shared.handed = []
                shared.released = false
            }
            return shared.outcomes
        }
    }

    /// Drops what waits and what was read, once the worker is done: after it returns, no
    /// read-back touches a vcpu (its descriptor may be closed).
    func discard() {
        shared.condition.withLock {
            shared.waiting.removeAll()
            while shared.working { shared.condition.wait() }
            shared.outcomes = [:]
            shared.handed = []
            shared.released = false
        }
    }
}
