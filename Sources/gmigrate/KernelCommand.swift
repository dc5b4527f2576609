import ArgumentParser
import Foundation
import Kernel
import KernelScript

struct KernelCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kernel", abstract: "Replay kernel operations on either backend.", subcommands: [Run.self])

    enum ScriptBackend: String, ExpressibleByArgument, CaseIterable {
        case model, linux, both
    }

    /// The JSON report of `kernel run --json`.
    struct Report: Encodable {
        struct ScriptReport: Encodable {
            var path: String
            var backend: String
            var lines: [LineResult]
            var mismatches: Int
            /// With `--backend both`: lines where model and linux answered differently
            /// (a linux `unsupported` or `skipped` does not count).
            var disagreements: [Int]?
            var linux: [LineResult]?
        }
        var scripts: [ScriptReport]
        var passed: Bool
    }

    struct Run: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Run kernel scripts, one operation per line, and compare each line with its '=> RESULT'.",
            discussion: "Exit 0: every expectation held; 1: a line mismatched (or, with --backend both, the backends disagreed); 2: a script does not parse (nothing of it runs); 3: no usable /dev/kvm for --backend linux or both.")

        @Argument(help: "Script files.")
        var scripts: [String]

        @Option(help: "model, linux, or both (run on each and compare them).")
        var backend: ScriptBackend = .model

        @OptionGroup var output: OutputOptions

        func run() throws {
            // Parse everything first: a script that does not parse runs not at all.
            var parsed: [Script] = []
            for path in scripts {
                guard let data = FileManager.default.contents(atPath: path), let text = String(data: data, encoding: .utf8) else {
                    throw CommandFailure(code: .badInput, message: "\(path): cannot read the file")
                }
                do {
                    parsed.append(try Script.parse(text, path: path))
                } catch {
                    throw CommandFailure(code: .badInput, message: error.description)
                }
            }
            var reports: [Report.ScriptReport] = []
            for script in parsed {
                switch backend {
                case .model, .linux:
                    let kernel = try openBackend(backend == .model ? .model : .linux)
                    let lines = ScriptRunner(backend: kernel).run(script)
                    reports.append(.init(path: script.path, backend: kernel.name, lines: lines,
                        mismatches: lines.filter { $0.status == .mismatch }.count))
                case .both:
                    let model = ScriptRunner(backend: KernelModel()).run(script)
                    let linux = ScriptRunner(backend: try openBackend(.linux)).run(script)
                    let disagreements = zip(model, linux).filter { m, l in
                        l.result != "unsupported" && l.result != "skipped" && m.result != l.result
                    }.map(\.0.line)
                    let mismatches = (model + linux).filter { $0.status == .mismatch }.count
                    reports.append(.init(path: script.path, backend: "both", lines: model, mismatches: mismatches,
                        disagreements: disagreements, linux: linux))
                }
            }
            let passed = reports.allSatisfy { $0.mismatches == 0 && ($0.disagreements ?? []).isEmpty }
            if output.json {
                print(encodeJSON(Report(scripts: reports, passed: passed)))
            } else {
                for report in reports { printText(report) }
            }
            if !passed { throw ExitCode(GmigrateExitCode.checkFailed.rawValue) }
        }

        private func printText(_ report: Report.ScriptReport) {
            func mark(_ status: LineResult.Status) -> String {
                switch status {
                case .none, .match: ""
                case .mismatch: "  MISMATCH"
                case .unchecked: "  (not checked)"
                }
            }
            let width = min(60, report.lines.map(\.source.count).max() ?? 0)
            if let linux = report.linux {
                print("# \(report.path): model | linux")
                let disagreements = Set(report.disagreements ?? [])
                for (m, l) in zip(report.lines, linux) {
                    let expectation = m.expected.map { " => \($0)" } ?? ""
                    print("\(report.path):\(m.line): \(m.source.padding(toLength: width, withPad: " ", startingAt: 0))\(expectation)")
                    print("    model: \(m.result)\(mark(m.status))")
                    print("    linux: \(l.result)\(mark(l.status))\(disagreements.contains(m.line) ? "  DISAGREES" : "")")
                }
            } else {
                print("# \(report.path) on \(report.backend)")
                for line in report.lines {
                    let expectation = line.expected.map { "  (expected: \($0))" } ?? ""
                    let shown = line.status == .mismatch ? expectation : ""
                    print("\(report.path):\(line.line): \(line.source.padding(toLength: width, withPad: " ", startingAt: 0))  \(line.result)\(shown)\(mark(line.status))")
                }
            }
            let all = report.lines + (report.linux ?? [])
            let checked = all.filter { $0.status == .match || $0.status == .mismatch }.count
            let unchecked = all.filter { $0.status == .unchecked }.count
            var summary = "# \(checked) checked, \(report.mismatches) mismatched, \(unchecked) not checked (unsupported or skipped)"
            if let disagreements = report.disagreements {
                summary += ", \(disagreements.count) disagreement\(disagreements.count == 1 ? "" : "s") between model and linux"
            }
            print(summary)
        }
    }
}
