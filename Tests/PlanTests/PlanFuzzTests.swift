import Foundation
import GmigrateTestKit
import Kernel
import Plans
import Testing
import Yams

#if canImport(Glibc)
import Glibc
#endif

/// Random and mutated plans: the validator must answer every input with a report, never crash,
/// and its answers must hold up against simple oracles.
@Suite("Plan fuzzing")
struct PlanFuzzTests {
    static let junk = [
        "", "-1", "0x", "0xZZ", "99999999999999999999999", "1Ti", "16Ti", "{", "[", "]", "~", "null", "true",
        "\"\"", "'", "💥", String(repeating: "a", count: 300), "0x8000000000000000", "4095", "1e9", "- x", ": :",
        "&a", "*a", "!!binary AAAA", "|", ">", "0s", "-5ms", "in-process", "spawn", "snp", "share", "[mmap]",
        "{slot: 1}", "\t", "#", "%YAML 1.2", "---", "...",
    ]

    static func examples() throws -> [String] {
        try planFiles("migration-plans").filter { $0.hasSuffix(".yaml") }.map {
            try String(contentsOfFile: repositoryRoot + "/" + $0, encoding: .utf8)
        }
    }

    /// One random mutation of a plan text.
    static func mutate(_ text: String, _ random: inout SplitMix64) -> String {
        var lines = text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        guard !lines.isEmpty else { return text }
        let index = Int.random(in: 0..<lines.count, using: &random)
        switch Int.random(in: 0..<8, using: &random) {
        case 0:
            lines.remove(at: index)
        case 1:
            lines.insert(lines[index], at: index)
        case 2:
            // Replace the value after the first ':' with junk.
            if let colon = lines[index].firstIndex(of: ":") {
                lines[index] = String(lines[index][...colon]) + " " + junk.randomElement(using: &random)!
            }
        case 3:
            lines[index] = String(repeating: " ", count: Int.random(in: 0...12, using: &random))
                + lines[index].trimmingCharacters(in: .whitespaces)
        case 4:
            let cut = Int.random(in: 0...text.utf8.count, using: &random)
            return String(decoding: Array(text.utf8.prefix(cut)), as: UTF8.self)
        case 5:
            lines.insert(junk.randomElement(using: &random)!, at: index)
        case 6:
            var characters = Array(lines[index])
            if !characters.isEmpty {
                characters[Int.random(in: 0..<characters.count, using: &random)] =
                    Character(UnicodeScalar(UInt8.random(in: 32...126, using: &random)))
            }
            lines[index] = String(characters)
        default:
            lines.swapAt(index, Int.random(in: 0..<lines.count, using: &random))
        }
        return lines.joined(separator: "\n")
    }

    /// The report's invariants, for any input.
    static func checkInvariants(_ report: PlanReport, input: String) {
        if !report.parsed {
            #expect(report.diagnostics.count == 1, "an unreadable file gets one syntax report: \(input)")
            #expect(report.plan == nil)
        } else if report.valid {
            #expect(report.plan != nil, "a valid plan yields a plan")
            #expect(report.diagnostics.allSatisfy { $0.severity == .warning })
        } else {
            #expect(report.errorCount > 0 && report.plan == nil)
        }
        for diagnostic in report.diagnostics {
            #expect(PlanRule(rawValue: diagnostic.code) != nil, "stable code: \(diagnostic.code)")
            #expect(!diagnostic.message.isEmpty)
            #expect(!diagnostic.message.contains("\n"), "one-line messages")
        }
    }

    @Test("mutated example plans never crash the validator", arguments: 0..<40)
    func mutatedPlans(_ seed: Int) throws {
        var random = SplitMix64(seed: UInt64(seed) &* 7919)
        for original in try Self.examples() {
            var text = original
            for _ in 0..<Int.random(in: 1...4, using: &random) {
                text = Self.mutate(text, &random)
                Self.checkInvariants(PlanLoader.load(text: text, file: "fuzz.yaml"), input: text)
                Self.checkInvariants(PlanLoader.load(text: text, file: "fuzz.yaml", host: thisMachineKind), input: text)
            }
        }
    }

    @Test("random bytes and hostile shapes are answered, not crashed on")
    func hostileInputs() {
        var random = SplitMix64(seed: 42)
        var inputs = [
            "", "\n", "---\n---\n", "[", "{}", "[]", "null", "42", "\"just a string\"",
            String(repeating: "[", count: 5000) + String(repeating: "]", count: 5000),
            String(repeating: "- ", count: 3000) + "x",
            "a: &x [1]\nb: *x\n", "apiVersion: !!int 3\n", "spec: {vm: {memslots: [{slot: 1, slot: 2}]}}",
        ]
        for _ in 0..<200 {
            let count = Int.random(in: 0..<200, using: &random)
            inputs.append(String(decoding: (0..<count).map { _ in UInt8.random(in: 9...126, using: &random) }, as: UTF8.self))
        }
        for input in inputs {
            Self.checkInvariants(PlanLoader.load(text: input, file: "hostile.yaml"), input: input)
        }
    }

    /// Property: the sorted-interval overlap checks find exactly the slots a pairwise oracle finds.
    @Test("overlap checks agree with a pairwise oracle", arguments: 0..<60)
    func overlapOracle(_ seed: Int) {
        var random = SplitMix64(seed: UInt64(seed) &+ 1000)
        let count = Int.random(in: 1...24, using: &random)
        let page: UInt64 = 4096
        var slots: [(slot: Int, gpa: UInt64, size: UInt64, file: String, offset: UInt64)] = []
        for index in 0..<count {
            slots.append((
                index, UInt64.random(in: 0..<64, using: &random) * page, UInt64.random(in: 1...8, using: &random) * page,
                Bool.random(using: &random) ? "a" : "b", UInt64.random(in: 0..<56, using: &random) * page
            ))
        }
        var text = """
            apiVersion: gmigrate/v1
            kind: MigrationPlan
            metadata: {name: oracle}
            spec:
              source: {vmm: in-process}
              target: {vmm: in-process}
              vm:
                vcpus: 1
                guestMemfds:
                  - {name: a, size: 256Ki, flags: [mmap, init-shared]}
                  - {name: b, size: 256Ki, flags: [mmap, init-shared]}
                memslots:

            """
        for s in slots {
            text += "      - {slot: \(s.slot), guestPhysAddr: \(s.gpa), size: \(s.size), guestMemfd: \(s.file), offset: \(s.offset)}\n"
        }
        let report = PlanLoader.load(text: text, file: "oracle.yaml")
        func overlapping(_ a: (UInt64, UInt64), _ b: (UInt64, UInt64)) -> Bool { a.0 < b.0 + b.1 && b.0 < a.0 + a.1 }
        // Oracle: is any pair overlapping, in gpa space or within one file?
        var gpaClash = false
        var fileClash = false
        for i in slots.indices {
            for j in slots.indices where j > i {
                if overlapping((slots[i].gpa, slots[i].size), (slots[j].gpa, slots[j].size)) { gpaClash = true }
                if slots[i].file == slots[j].file && overlapping((slots[i].offset, slots[i].size), (slots[j].offset, slots[j].size)) {
                    fileClash = true
                }
            }
        }
        let codes = Set(report.diagnostics.map(\.code))
        #expect(codes.contains("gpa-overlap") == gpaClash, "seed \(seed)")
        #expect(codes.contains("gmem-range-overlap") == fileClash, "seed \(seed)")
        // Each slot that overlaps an earlier-starting one is reported once.
        #expect(report.valid == (!gpaClash && !fileClash))
    }

    /// The CLI answers every file with exit 0, 1 or 2 and a report.
    @Test func cliExitCodesOnFuzzedFiles() throws {
        var random = SplitMix64(seed: 7)
        let examples = try Self.examples()
        for round in 0..<12 {
            var text = examples[round % examples.count]
            for _ in 0..<3 { text = Self.mutate(text, &random) }
            let path = try temporaryFile(text, name: "fuzz-\(round).yaml")
            let result = try gmigrate(["plan", "validate", path])
            #expect([0, 1, 2].contains(result.status), "\(path): exit \(result.status)")
            #expect(result.stdout.contains("\(path): "), "a report for every file")
        }
    }
}
