import ArgumentParser
import Foundation

/// gmigrate: intra-host live migration of KVM guest_memfd VMs.
@main
struct Gmigrate: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "gmigrate",
        abstract: "Move a running KVM VM between VMM processes on one host without copying its memory.",
        subcommands: [Demo.self, Host.self, KernelCommand.self, Plan.self, Migrate.self, Recover.self, JournalCommand.self, Faults.self, MachineCommand.self, Daemon.self, Submit.self, Status.self, List.self, Cancel.self, Watch.self]
    )

    /// Parses and runs, mapping every failure to the documented exit codes (README): argument
    /// errors exit 2 like any other unreadable input, not ArgumentParser's 64.
    static func main() async {
        do {
            var command = try parseAsRoot()
            if var asyncCommand = command as? AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try command.run()
            }
        } catch let failure as CommandFailure {
            FileHandle.standardError.write(Data("gmigrate: \(failure.message)\n".utf8))
            Foundation.exit(failure.code.rawValue)
        } catch let exit as ExitCode {
            Foundation.exit(exit.rawValue)
        } catch {
            let code = exitCode(for: error)
            if code == .success {
                print(fullMessage(for: error))
                Foundation.exit(0)
            }
            FileHandle.standardError.write(Data((fullMessage(for: error) + "\n").utf8))
            Foundation.exit(GmigrateExitCode.badInput.rawValue)
        }
    }
}

/// Shared by the commands that print reports.
struct OutputOptions: ParsableArguments {
    @Flag(help: "Print one machine-readable JSON document.")
    var json = false
}

func encodeJSON<T: Encodable>(_ value: T) -> String {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
    guard let data = try? encoder.encode(value), let text = String(data: data, encoding: .utf8) else {
        return "{}"
    }
    return text
}
