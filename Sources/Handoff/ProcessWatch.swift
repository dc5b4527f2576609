import CKVM
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// Processes watched through pidfds: whether one is alive, waiting for one to exit, and a
/// thread that reports the first of a set that dies (without polling its state in a loop).
public enum ProcessWatch {
    /// Whether a process exists and is not a zombie.
    public static func isAlive(_ pid: Int32) -> Bool {
        guard pid > 0, kill(pid, 0) == 0 || errno == EPERM else { return false }
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
            let close = stat.lastIndex(of: ")")
        else { return true }
        return stat[stat.index(after: close)...].dropFirst().first != "Z"
    }

    /// Waits until `pid` has exited, at most `timeout`; true once it is gone.
    public static func waitForExit(_ pid: Int32, timeout: Duration) -> Bool {
        let fd = ckvm_pidfd_open(pid)
        guard fd >= 0 else { return !isAlive(pid) }
        defer { close(fd) }
        var fds = [fd]
        let milliseconds = Int32(clamping: timeout.components.seconds * 1000 + timeout.components.attoseconds / 1_000_000_000_000_000)
        // A pidfd polls readable once its process has exited, reaped or not (a zombie whose
        // parent has not yet waited for it still answers kill(pid, 0)).
        if ckvm_poll_any(&fds, 1, milliseconds) == 0 { return true }
        return !isAlive(pid)
    }
}

/// Watches processes on a thread of its own: the first one that exits is reported (once).
final class PidWatcher: @unchecked Sendable {
    // @unchecked: `watched` and `stopped` are guarded by `lock`; the wake pipe is written once.
    private let lock = NSLock()
    private var watched: [(pid: Int32, fd: Int32, name: String)] = []
    private var stopped = false
    private var thread: Thread?
    private let onExit: @Sendable (Int32, String) -> Void
    /// Written to wake the thread when the set changes or the watch ends.
    private var wake: [Int32] = [-1, -1]

    init(onExit: @escaping @Sendable (Int32, String) -> Void) {
        self.onExit = onExit
        if pipe(&wake) == 0 {
            for descriptor in wake {
                _ = fcntl(descriptor, F_SETFD, FD_CLOEXEC)
                _ = fcntl(descriptor, F_SETFL, O_NONBLOCK)
            }
        }
    }

    deinit {
        stop()
        for descriptor in wake where descriptor >= 0 { close(descriptor) }
    }

    /// Adds a process; the thread starts with the first.
    func watch(_ pid: Int32, name: String) {
        let fd = ckvm_pidfd_open(pid)
        guard fd >= 0 else { return }
        lock.withLock { watched.append((pid, fd, name)) }
        poke()
        lock.withLock {
            if thread == nil {
                let thread = Thread { [self] in loop() }
                thread.name = "pid watcher"
                self.thread = thread
                thread.start()
            }
        }
    }

    func stop() {
        let wasRunning = lock.withLock { () -> Bool in
            defer { stopped = true }
            return !stopped
        }
        if wasRunning { poke() }
    }

    private func poke() {
        var byte: UInt8 = 1
        _ = write(wake[1], &byte, 1)
    }

    private func loop() {
        while true {
            let (fds, names, done) = lock.withLock { (watched.map(\.fd), watched.map { ($0.pid, $0.name) }, stopped) }
            if done { break }
            var all = [wake[0]] + fds
            let ready = ckvm_poll_any(&all, Int32(all.count), -1)
            if ready == 0 {
                var scratch = [UInt8](repeating: 0, count: 64)
                _ = read(wake[0], &scratch, scratch.count)
                continue
            }
            guard ready > 0 else { continue }
            let (pid, name) = names[Int(ready) - 1]
            lock.withLock { watched.removeAll { $0.pid == pid } }
            close(fds[Int(ready) - 1])
            if !lock.withLock({ stopped }) { onExit(pid, name) }
        }
        lock.withLock {
            for entry in watched { close(entry.fd) }
            watched.removeAll()
        }
    }
}

/// Which VMM role a pid is, for the watchers' threads.
final class RolePIDs: @unchecked Sendable {
    // @unchecked: guarded by `lock`.
    private let lock = NSLock()
    private var roles: [Int32: String] = [:]
    func set(_ pid: Int32, _ role: String) { lock.withLock { roles[pid] = role } }
    func role(of pid: Int32) -> String? { lock.withLock { roles[pid] } }
}

/// Which VMM roles are known to be gone, and why (set from the watchers' threads).
final class GoneRoles: @unchecked Sendable {
    // @unchecked: guarded by `lock`.
    private let lock = NSLock()
    private var reasons: [String: String] = [:]
    func set(_ role: String, _ reason: String) { lock.withLock { if reasons[role] == nil { reasons[role] = reason } } }
    func clear(_ role: String) { lock.withLock { reasons[role] = nil } }
    func reason(_ role: String) -> String? { lock.withLock { reasons[role] } }
}

/// A reason, set once, read from any thread.
final class AbortFlag: @unchecked Sendable {
    // @unchecked: guarded by `lock`.
    private let lock = NSLock()
    private var value: String?
    var reason: String? { lock.withLock { value } }
    func set(_ reason: String) { lock.withLock { if value == nil { value = reason } } }
}
