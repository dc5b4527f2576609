import ArgumentParser
import Foundation
import HostNet
import Kernel
import Plans

struct Plan: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Work with migration plans.", subcommands: [Validate.self])

    /// The JSON report of `plan validate --json` (schema in docs/plans.md).
    struct Report: Encodable {
        var valid: Bool
        var errors: Int
        var warnings: Int
        /// The backend whose capabilities `--host` checked against; absent without `--host`.
        var host: String?
        var files: [PlanReport]
    }

    struct Validate: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Validate plans without touching any VM; report every problem.",
            discussion: "Exit 0: every plan is valid (warnings allowed); 1: a plan is invalid; 2: a plan is unreadable or not YAML/JSON; 3: --host without a usable /dev/kvm.")

        @Argument(help: "Plan files (YAML or JSON).")
        var plans: [String]

        @Flag(help: "Also check the plans against this host's probed KVM capabilities.")
        var host = false

        @Option(help: "With --host: linux (this kernel) or model (the reference model's capabilities).")
        var hostBackend: BackendChoice = .linux

        @OptionGroup var output: OutputOptions

        func run() throws {
            var capabilities: HostCapabilities? = nil
            if host {
                let kernel = try openBackend(hostBackend)
                do {
                    capabilities = try kernel.probe()
                } catch {
                    throw CommandFailure(code: .kernelFailed, message: "probing failed: \(error)")
                }
            }
            // --host also reads this network namespace's interfaces, for spec.vm.nics.
            var network: HostNetwork? = nil
            if host, let links = try? readLinks() {
                network = HostNetwork(links: Dictionary(links.map {
                    ($0.name, HostNetwork.Link(isUp: $0.isUp, mtu: $0.mtu, master: $0.master, kind: $0.kind))
                }, uniquingKeysWith: { first, _ in first }))
            }
            let reports = plans.map { PlanLoader.load(path: $0, host: capabilities, network: network) }
            let errors = reports.reduce(0) { $0 + $1.errorCount }
            let warnings = reports.reduce(0) { $0 + $1.warningCount }
            if output.json {
                print(encodeJSON(Report(valid: reports.allSatisfy(\.valid), errors: errors, warnings: warnings,
                    host: capabilities?.backend, files: reports)))
            } else {
                for report in reports { printText(report) }
            }
            if reports.contains(where: { !$0.parsed }) { throw ExitCode(GmigrateExitCode.badInput.rawValue) }
            if reports.contains(where: { !$0.valid }) { throw ExitCode(GmigrateExitCode.checkFailed.rawValue) }
        }

        private func printText(_ report: PlanReport) {
            for diagnostic in report.diagnostics { print(diagnostic.rendered(file: report.file)) }
            func count(_ n: Int, _ word: String) -> String { "\(n) \(word)\(n == 1 ? "" : "s")" }
            var summary = "\(report.file): \(report.valid ? "valid" : report.parsed ? "invalid" : "unreadable")"
            summary += " (\(count(report.errorCount, "error")), \(count(report.warningCount, "warning")))"
            if let strategy = report.strategy {
                if let chosen = strategy.chosen {
                    summary += strategy.requested == .auto
                        ? "; strategy auto would choose \(chosen.rawValue) here (\(strategy.reason))"
                        : "; strategy \(chosen.rawValue) is possible here"
                } else {
                    summary += "; strategy \(strategy.requested.rawValue) is not possible here"
                }
            }
            print(summary)
        }
    }
}
