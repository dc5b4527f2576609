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

    var exitCode: ExitCode { ExitCode(rawValue) }
}

/// An error the CLI reports in one line and maps to an exit code.
struct CommandFailure: Error, CustomStringConvertible {
    var code: GmigrateExitCode
    var message: String
    var description: String { message }
}
