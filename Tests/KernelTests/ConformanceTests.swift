import CKVM
import Foundation
import GmigrateTestKit
import Kernel
import KernelScript
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// One conformance case: a kernel script (Tests/conformance/NAME.kscript) whose `=> RESULT`
/// lines are the kernel's answers. Each runs on both backends; where the real kernel lacks an
/// operation the linux run records `unsupported` (and `skipped` for what follows from it) and
/// the model is checked alone. Kernel people read and add them without Swift.
struct ConformanceCase: Sendable, CustomStringConvertible {
    var name: String
    var script: String
    var description: String { name }

    /// Every case in Tests/conformance, by name.
    static let all: [ConformanceCase] = {
        let directory = repositoryRoot + "/Tests/conformance"
        let names = ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []).filter { $0.hasSuffix(".kscript") }.sorted()
        return names.map { file in
            ConformanceCase(
                name: String(file.dropLast(".kscript".count)),
                script: (try? String(contentsOfFile: directory + "/" + file, encoding: .utf8)) ?? "")
        }
    }()

    /// The host's limits, for the cases that name them: from the real kernel's probe where
    /// there is one, else the model's own.
    static let hostBits: Int = {
        if kvmIsUsable, let bits = try? LinuxKVM().probe().limits.maxGuestPhysicalBits { return bits }
        return KernelModel.Options().maxGuestPhysicalBits
    }()

    /// The script with the host's values in its placeholders.
    var text: String {
        let top = UInt64(1) << UInt64(ConformanceCase.hostBits)
        func hex(_ value: UInt64) -> String { "0x" + String(value, radix: 16) }
        return script.replacingOccurrences(of: "{max-gpa-minus-8k}", with: hex(top - 8192))
            .replacingOccurrences(of: "{max-gpa-minus-4k}", with: hex(top - 4096))
            .replacingOccurrences(of: "{max-gpa}", with: hex(top))
    }

    /// The model kernel for a case: the reference host, with the real host's address width.
    static func model() -> KernelModel {
        var options = KernelModel.Options()
        options.maxGuestPhysicalBits = hostBits
        return KernelModel(options: options)
    }
}

let conformanceCases = ConformanceCase.all

/// The kernel conformance suite: every case on both backends, and the two compared.
@Suite("Kernel conformance")
struct ConformanceTests {
    @Test("expectations hold", arguments: conformanceCases, Backend.allCases)
    func expectations(_ testCase: ConformanceCase, _ backend: Backend) throws {
        let kernel = backend == .model ? ConformanceCase.model() : try backend.make()
        let results = try runScript(testCase.text, on: kernel, name: testCase.name)
        #expect(results.contains { $0.expected != nil }, "a case must check something")
        for line in results where line.expected != nil {
            switch backend {
            case .model:
                // The model implements everything: every expectation must hold.
                #expect(line.status == .match, "\(testCase.name):\(line.line) \(line.source): got \(line.result), expected \(line.expected ?? "")")
            case .linux:
                // Where this kernel lacks an operation, the line is recorded as unchecked.
                #expect(line.status != .mismatch, "\(testCase.name):\(line.line) \(line.source): got \(line.result), expected \(line.expected ?? "")")
            }
        }
        // Lines go unchecked only because of an operation this kernel lacks, never after an error.
        if let firstGap = results.firstIndex(where: { $0.result == "unsupported" || $0.result == "skipped" }) {
            #expect(results[firstGap].result == "unsupported", "\(testCase.name):\(results[firstGap].line) skipped without an unsupported operation before it")
        }
    }

    @Test("model and linux agree", arguments: conformanceCases)
    func agreement(_ testCase: ConformanceCase) throws {
        let linux = try Backend.linux.make()
        let model = try runScript(testCase.text, on: ConformanceCase.model(), name: testCase.name)
        let real = try runScript(testCase.text, on: linux, name: testCase.name)
        for (m, l) in zip(model, real) where l.result != "unsupported" && l.result != "skipped" {
            #expect(m.result == l.result, "\(testCase.name):\(m.line) \(m.source): model \(m.result), linux \(l.result)")
        }
    }

    @Test("the suite has at least 40 cases")
    func caseCount() {
        #expect(conformanceCases.count >= 40)
        #expect(Set(conformanceCases.map(\.name)).count == conformanceCases.count, "case names are unique")
    }

    /// The example scripts in tools/kernel-scripts are run as they are shipped.
    @Test("shipped example scripts pass", arguments: ["selftest-bindings", "guest-runs", "confidential-move"], Backend.allCases)
    func shippedScripts(_ name: String, _ backend: Backend) throws {
        let kernel = try backend.make()
        let path = repositoryRoot + "/tools/kernel-scripts/\(name).kscript"
        let text = try String(contentsOfFile: path, encoding: .utf8)
        let results = try runScript(text, on: kernel, name: path)
        #expect(results.filter { $0.expected != nil }.count >= 5)
        for line in results {
            #expect(line.status != .mismatch, "\(path):\(line.line): got \(line.result), expected \(line.expected ?? "")")
            if backend == .model { #expect(line.status != .unchecked) }
        }
    }
}

import Foundation
