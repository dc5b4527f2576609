import Glibc

/// A request, while it lives, that the host's idle CPUs wake without delay: the CPU latency
/// QoS request of `/dev/cpu_dma_latency` held at 0 µs (Documentation/power/pm_qos_interface.rst),
/// as latency-bound programs (cyclictest, tuned's latency profiles) hold it.
///
/// Why: inside a blackout three processes wake one another on two CPUs, and a CPU that went
/// idle halts; on a nested host waking a halted CPU takes tens of microseconds more each time
/// (its halt is an exit to the host below). With the request at 0 the cpuidle governor picks
/// its polling state: an idle CPU spins in the kernel and a thread woken onto it runs at once.
/// Held for a few milliseconds (from just before the pause is requested until the target's
/// vcpus run); the kernel drops the request when the descriptor closes, also when the process
/// dies. The file is root's (mode 0600): without it nothing is held, and `refusal` says why.
public final class CPULatencyHold: Sendable {
    private let descriptor: Int32
    private let path: String
    /// Why nothing is held (the errno of the open or the write), nil while the request is held.
    public let refusal: Errno?

    public init(path: String = "/dev/cpu_dma_latency") {
        self.path = path
        let fd = Glibc.open(path, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else {
            descriptor = -1
            refusal = .current
            return
        }
        var zero: Int32 = 0
        guard Glibc.write(fd, &zero, MemoryLayout<Int32>.size) == MemoryLayout<Int32>.size else {
            refusal = .current
            Glibc.close(fd)
            descriptor = -1
            return
        }
        descriptor = fd
        refusal = nil
    }

    /// Whether the request is in force.
    public var isHeld: Bool { refusal == nil }

    /// What the journal records: `held`, or why not.
    public var summary: String { refusal.map { "not held: \(path): \($0.name)" } ?? "held at 0us" }

    deinit {
        if descriptor >= 0 { Glibc.close(descriptor) }
    }
}
