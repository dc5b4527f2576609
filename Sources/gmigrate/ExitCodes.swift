import ArgumentParser

/// Every exit code gmigrate uses; README documents the same table.
enum GmigrateExitCode: Int32, CaseIterable {
    /// Success.
    case success = 0
    /// The check failed: a script line did not give its expected result, or backends disagreed.
    case checkFailed = 1
    /// Unreadable or unparseable input (a missing file, a script line that does not parse, bad arguments).
    case badInput = 2
    /// This host has no usable KVM (no /dev/kvm, no permission, wrong API version).
    case noKVM = 3
    /// A kernel operation failed where gmigrate needed it to succeed.
    case kernelFailed = 4
    /// The state directory is held by another coordinator.
    case stateDirectoryLocked = 5
    /// The migration failed and was rolled back: the source runs, the target is gone.
    case rolledBack = 6
    /// The migration is stuck past the point of no return (a step keeps failing while the target
    /// answers): `gmigrate recover` goes on from there.
    case stuck = 7
    /// The migration completed but the guest's memory or counter did not check out.
    case verificationFailed = 8
    /// A journal is corrupt: recovery did not act on it (the message names the record).
    case journalCorrupt = 9
    /// The journal could not be written.
    case journalFailed = 10
    /// The daemon refused the request (its problem document is printed).
    case daemonRefused = 11
    /// The daemon cannot be reached at its socket.
    case daemonUnreachable = 12
    /// The guest is lost: neither VM runs it and neither can be made to (the journal says why).
    /// `gmigrate recover` cannot help.
    case lost = 13

    var exitCode: ExitCode { ExitCode(rawValue) }
}

/// An error the CLI reports in one line and maps to an exit code.
struct CommandFailure: Error, CustomStringConvertible {
    var code: GmigrateExitCode
    var message: String
    var description: String { message }
}
