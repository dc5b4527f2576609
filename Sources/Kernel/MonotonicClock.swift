import Glibc

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process of the host, so that an instant
/// one process took (a target's vcpu entering KVM_RUN) can be set against another's (the
/// coordinator's pause request). Swift's clocks give no readable instant across processes.
public enum MonotonicClock {
    public static var nanoseconds: UInt64 {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        return UInt64(clamping: now.tv_sec) &* 1_000_000_000 &+ UInt64(clamping: now.tv_nsec)
    }
}
