import CKVM

/// Where a VMM's request thread runs inside a blackout between two VMM processes: the target's
/// staging on the host's last CPU, the source's pause on any other, by one rule each side
/// applies alone (no message carries it).
///
/// Why: the source wakes the target with each part of the state it sends on a UNIX socket, a
/// synchronous wake-up, and the scheduler of this project's machine kind places the woken
/// target beside the source, which goes on saving, while the other CPU idles; the two then
/// share one CPU for the whole state (0.3-0.8 ms more in the traces). Kept apart, the target
/// sets each part as it comes while the source saves the next. Where the thread may run on one
/// CPU only, nothing is done.
public final class BlackoutPlacement {
    private var saved: [UInt8]
    /// Whether the thread's mask is changed (until `end` puts it back).
    public private(set) var placed: Bool

    private init(cpu: Int32, only: Bool) {
        saved = [UInt8](repeating: 0, count: Int(ckvm_cpu_mask_size()))
        placed = cpu >= 0 && ckvm_place_self(cpu, only ? 1 : 0, &saved) == 0
    }

    /// The calling thread on the last CPU it may use: a target's staging.
    public static func stagingThread() -> BlackoutPlacement { BlackoutPlacement(cpu: ckvm_last_cpu(), only: true) }

    /// The calling thread on any CPU it may use but the last: a source's pause.
    public static func pausingThread() -> BlackoutPlacement { BlackoutPlacement(cpu: ckvm_last_cpu(), only: false) }

    /// Puts the thread's mask back as it was (once; on the thread that placed it).
    public func end() {
        if placed { _ = ckvm_set_cpu_mask(saved) }
        placed = false
    }
}
