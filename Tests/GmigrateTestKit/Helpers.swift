import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

// Helpers every test target uses: where the repository and the built programs are, scratch
// directories, running a program, waiting on a condition, a seeded generator.

/// The package root, found from this file's path.
public let repositoryRoot: String = {
    var url = URL(fileURLWithPath: #filePath)
    for _ in 0..<3 { url.deleteLastPathComponent() }
    return url.path
}()

public func temporaryDirectory(_ prefix: String) -> String {
    let path = FileManager.default.temporaryDirectory.appendingPathComponent("\(prefix)-\(UUID().uuidString)").path
    try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    return path
}

/// Why a fixture could not be set up or read: a failure of the test, never a skip.
public struct FixtureError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// Where the built executables are.
public func executable(_ name: String) throws -> String {
    let candidates = [
        Bundle.main.bundleURL.deletingLastPathComponent().appendingPathComponent(name).path,
        repositoryRoot + "/.build/debug/" + name,
    ]
    guard let found = candidates.first(where: { FileManager.default.isExecutableFile(atPath: $0) }) else {
        throw FixtureError("\(name) is not built (looked in \(candidates.joined(separator: ", ")))")
    }
    return found
}

/// Waits until `condition` holds, checking it every few milliseconds; `seconds` is only an
/// outer bound against a hang.
public func waitUntil(_ seconds: Double = 10, _ condition: () -> Bool) -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
        if condition() { return true }
        usleep(5000)
    }
    return condition()
}

/// Runs the built `gmigrate` binary and captures what it prints and its exit code.
public struct CommandResult: Sendable {
    public var status: Int32
    public var stdout: String
    public var stderr: String
    public init(status: Int32, stdout: String, stderr: String) {
        self.status = status
        self.stdout = stdout
        self.stderr = stderr
    }
}

public func gmigrate(_ arguments: [String], environment: [String: String]? = nil) throws -> CommandResult {
    let binary = URL(fileURLWithPath: repositoryRoot).appendingPathComponent(".build/debug/gmigrate")
    let candidates = [
        Bundle.main.bundleURL.deletingLastPathComponent().appendingPathComponent("gmigrate"),
        Bundle.main.bundleURL.appendingPathComponent("gmigrate"),
        binary,
    ]
    guard let executable = candidates.first(where: { FileManager.default.isExecutableFile(atPath: $0.path) }) else {
        // A product that is not built is a failure of the test, never a skip.
        throw FixtureError("gmigrate is not built (looked in \(candidates.map(\.path).joined(separator: ", ")))")
    }
    return try run(executable.path, arguments, environment: environment)
}

/// Runs a program to its end from the repository's root; its exit status and output.
public func run(_ path: String, _ arguments: [String], environment: [String: String]? = nil) throws -> CommandResult {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: path)
    process.arguments = arguments
    process.currentDirectoryURL = URL(fileURLWithPath: repositoryRoot)
    if let environment { process.environment = environment }
    let out = Pipe()
    let err = Pipe()
    process.standardOutput = out
    process.standardError = err
    try process.run()
    // Both pipes drained at once: a child that fills one while we wait on the other never hangs.
    final class Box: @unchecked Sendable {
        var data = Data()
    }
    let stderr = Box()
    let done = DispatchSemaphore(value: 0)
    let errorHandle = err.fileHandleForReading
    Thread {
        stderr.data = errorHandle.readDataToEndOfFile()
        done.signal()
    }.start()
    let stdout = out.fileHandleForReading.readDataToEndOfFile()
    done.wait()
    process.waitUntilExit()
    return CommandResult(
        status: process.terminationStatus, stdout: String(decoding: stdout, as: UTF8.self),
        stderr: String(decoding: stderr.data, as: UTF8.self))
}

public func temporaryFile(_ text: String, name: String = "t.kscript") throws -> String {
    let directory = FileManager.default.temporaryDirectory.appendingPathComponent("gmigrate-tests-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    let path = directory.appendingPathComponent(name).path
    try text.write(toFile: path, atomically: true, encoding: .utf8)
    return path
}

/// SplitMix64 (as in swift-argument-parser's `roll` example): a seed reproduces a run.
public struct SplitMix64: RandomNumberGenerator {
    public var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9e37_79b9_7f4a_7c15
        var z = state
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return z ^ (z >> 31)
    }
}

/// A value shared between threads.
public final class Locked<Value: Sendable>: @unchecked Sendable {
    private let lock = NSLock()
    private var stored: Value
    public init(_ value: Value) { stored = value }
    public var value: Value { lock.withLock { stored } }
    public func mutate(_ body: (inout Value) -> Void) { lock.withLock { body(&stored) } }
}

/// A handle that appends to `path` (created if missing), for a child process's output.
public func appendingLog(_ path: String) -> FileHandle? {
    if !FileManager.default.fileExists(atPath: path) { _ = FileManager.default.createFile(atPath: path, contents: nil) }
    let handle = FileHandle(forWritingAtPath: path)
    handle?.seekToEndOfFile()
    return handle
}

/// What each open descriptor of process `pid` is ("3 socket:[123]", ...), sorted: for the tests
/// that a peer's input leaves nothing open behind it.
public func openDescriptors(_ pid: Int32) -> [String] {
    let names = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd")) ?? []
    return names.map { name in
        "\(name) " + ((try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/fd/\(name)")) ?? "?")
    }.sorted()
}

/// A child process started with posix_spawn rather than Foundation's `Process`, for a program
/// that closes the descriptors it inherits (systemd-socket-activate does). `Process` learns of
/// its child's end from a socket the child holds: once the child closes it, `Process`'s one
/// monitoring thread blocks in waitpid until that child exits, and no other `Process` of the
/// test run is seen ending meanwhile. The child starts with no signal blocked and SIGTERM,
/// SIGINT, SIGHUP, SIGPIPE and SIGCHLD at their default actions (a test may run on a thread
/// that blocks them), its output appended to `log`.
public final class SpawnedChild: @unchecked Sendable {
    // @unchecked: `status` is only touched under `lock`.
    public let pid: pid_t
    private let lock = NSLock()
    private var status: Int32?

    public init(_ path: String, _ arguments: [String], log: String) throws {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, log, O_WRONLY | O_APPEND | O_CREAT, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var none = sigset_t()
        sigemptyset(&none)
        posix_spawnattr_setsigmask(&attributes, &none)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for signal in [SIGTERM, SIGINT, SIGHUP, SIGPIPE, SIGCHLD] { sigaddset(&defaults, signal) }
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        let argv = ([path] + arguments).map { strdup($0) }
        defer { for argument in argv { free(argument) } }
        var child: pid_t = 0
        var pointers = argv + [nil]
        let result = pointers.withUnsafeMutableBufferPointer { buffer -> Int32 in
            guard let base = buffer.baseAddress else { return EINVAL }
            return posix_spawn(&child, path, &actions, &attributes, base, environ)
        }
        guard result == 0 else { throw CocoaError(.executableLoad, userInfo: [NSLocalizedDescriptionKey: "posix_spawn \(path): \(String(cString: strerror(result)))"]) }
        pid = child
    }

    /// Whether it still runs (it is reaped here once it has ended).
    public var isRunning: Bool {
        lock.withLock {
            guard status == nil else { return false }
            var raw: Int32 = 0
            if waitpid(pid, &raw, WNOHANG) == pid { status = raw }
            return status == nil
        }
    }

    public func terminate() { if isRunning { kill(pid, SIGTERM) } }

    /// Waits for its end: its exit status, or 128 + the signal that ended it.
    @discardableResult
    public func waitUntilExit() -> Int32 {
        lock.withLock {
            if status == nil {
                var raw: Int32 = 0
                while waitpid(pid, &raw, 0) == -1 && errno == EINTR {}
                status = raw
            }
            let raw = status ?? 0
            return raw & 0x7f == 0 ? (raw >> 8) & 0xff : 128 + (raw & 0x7f)
        }
    }
}
