import Dispatch
import Foundation
import Kernel

/// Reads a staging's vcpus back while the staging goes on: a vcpu handed to it (`add`) once all
/// its sections are set is read back and compared on a worker thread, while the staging sets the
/// next vcpu (and the source saves the one after). Inside a blackout the target is the slower
/// side, and a read-back of every vcpu after the last was set (11 vcpu ioctls each, 6-12 µs each
/// on this nested host) was its longest piece; now only what the worker has not done yet is left
/// for `finish`, which does it on the calling thread.
///
/// Reading vcpu `i` before the vcpus after it and the clock are set reads what a read-back at
/// the end would: those calls change no state of vcpu `i` that KVM reports (another vcpu's MSRs,
/// LAPIC and TSC offset are its own; KVM_SET_CLOCK only asks each vcpu to update its kvmclock
/// page when it next enters). The VM's sections are read at the end, as before.
final class VCPUReadBack: @unchecked Sendable {
    // @unchecked: every field but `condition` is touched only under `condition`.

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

    private let condition = NSCondition()
    private var waiting: [Job] = []
    /// Whether a worker is draining `waiting` (one at a time, so reads go in vcpu order).
    private var working = false
    private var outcomes: [Int: Outcome] = [:]
    /// The vcpus handed over since the last `finish` or `discard`.
    private var handed: Set<Int> = []

    /// Hands over a vcpu whose sections are all set; a worker reads it back when it can.
    func add(_ job: Job) {
        let start = condition.withLock {
            waiting.append(job)
            handed.insert(job.index)
            guard !working else { return false }
            working = true
            return true
        }
        if start { DispatchQueue.global(qos: .userInitiated).async { [self] in drain() } }
    }

    private func drain() {
        while let job = take() { record(job) }
    }

    /// The next job, or nil (and the worker is done) when none waits.
    private func take() -> Job? {
        condition.withLock {
            guard !waiting.isEmpty else {
                working = false
                condition.broadcast()
                return nil
            }
            return waiting.removeFirst()
        }
    }

    /// Reads `job`'s vcpu back and keeps how it compared.
    private func record(_ job: Job) {
        let outcome: Outcome
        do {
            let back = try job.kernel.vcpuState(job.vcpu)
            outcome = VCPUState.difference(restored: back, saved: job.saved).map(Outcome.differs) ?? .equal
        } catch {
            outcome = .failed(error)
        }
        condition.withLock { outcomes[job.index] = outcome }
    }

    /// Reads back, on the calling thread beside the worker, what still waits and each of `all`
    /// that was not handed over; waits until the worker is done; then every outcome by vcpu,
    /// which it forgets.
    func finish(all: [Job]) -> [Int: Outcome] {
        condition.withLock { waiting += all.filter { !handed.contains($0.index) } }
        while let job = condition.withLock({ waiting.isEmpty ? nil : waiting.removeFirst() }) { record(job) }
        return condition.withLock {
            while working { condition.wait() }
            defer {
                outcomes = [:]
                handed = []
            }
            return outcomes
        }
    }

    /// Drops what waits and what was read, once the worker is done: after it returns, no
    /// read-back touches a vcpu (its descriptor may be closed).
    func discard() {
        condition.withLock {
            waiting.removeAll()
            while working { condition.wait() }
            outcomes = [:]
            handed = []
        }
    }
}
