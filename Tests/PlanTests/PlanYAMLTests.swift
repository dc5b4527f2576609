import Foundation
import GmigrateTestKit
import Plans
import Testing

/// The plan's YAML reader (libyaml's events into the parser's nodes): what it accepts, what it
/// refuses, and where it says the problem is.
@Suite("Plan YAML reader")
struct PlanYAMLTests {
    static func demo() throws -> String {
        try String(contentsOfFile: repositoryRoot + "/migration-plans/demo.yaml", encoding: .utf8)
    }

    @Test func aliasesAreResolvedToTheAnchoredNode() throws {
        // The same plan with its gmem name given once, by an anchor, and used by an alias.
        let text = try Self.demo()
            .replacingOccurrences(of: "- name: ram", with: "- name: &gmem ram")
            .replacingOccurrences(of: "guestMemfd: ram", with: "guestMemfd: *gmem")
        #expect(text.contains("*gmem"))
        let report = PlanLoader.load(text: text, file: "aliases.yaml")
        #expect(report.valid, "\(report.diagnostics)")
        #expect(report.plan?.vm.memslots.allSatisfy { $0.guestMemfd == "ram" } == true)
    }

    @Test func anUndefinedAliasIsASyntaxErrorWithItsPlace() {
        let report = PlanLoader.load(text: "apiVersion: gmigrate/v1\nkind: *nothing\n", file: "alias.yaml")
        #expect(!report.parsed)
        #expect(report.diagnostics.map(\.code) == ["syntax-error"])
        #expect(report.diagnostics.first?.line == 2 && report.diagnostics.first?.column == 7)
        #expect(report.diagnostics.first?.message.contains("undefined alias 'nothing'") == true)
    }

    @Test func anAliasBombIsRefusedNotExpanded() {
        // Each level doubles ten times: 10^12 nodes if expanded.
        var text = "l0: &l0 [x, x, x, x, x, x, x, x, x, x]\n"
        for level in 1...12 {
            text += "l\(level): &l\(level) [" + Array(repeating: "*l\(level - 1)", count: 10).joined(separator: ", ") + "]\n"
        }
        let report = PlanLoader.load(text: text, file: "bomb.yaml")
        #expect(!report.parsed)
        #expect(report.diagnostics.first?.code == "syntax-error")
        #expect(report.diagnostics.first?.message.contains("more than") == true, "\(report.diagnostics)")
        // The refusal comes at the alias that crosses the bound: l5 (about 1.1 million nodes), line 6.
        #expect(report.diagnostics.first?.line == 6)
    }

    @Test func deepNestingIsRefusedWithItsPlace() {
        let text = "spec: " + String(repeating: "[", count: 100) + String(repeating: "]", count: 100) + "\n"
        let report = PlanLoader.load(text: text, file: "deep.yaml")
        #expect(!report.parsed)
        #expect(report.diagnostics.first?.message.contains("nested deeper than 64") == true, "\(report.diagnostics)")
        #expect(report.diagnostics.first?.line == 1)
    }

    @Test func twoDocumentsAreRefusedAtTheSecond() throws {
        let demo = try Self.demo()
        let report = PlanLoader.load(text: demo + "\n---\napiVersion: gmigrate/v1\n", file: "two.yaml")
        #expect(!report.parsed)
        #expect(report.diagnostics.first?.message.contains("single document") == true)
        let lines = demo.split(separator: "\n", omittingEmptySubsequences: false).count
        #expect(report.diagnostics.first?.line == lines + 1, "the line of the second document's ---")
    }

    /// Aliases cannot build a deeper tree than the text may: each anchored node's height counts
    /// again where an alias of it stands.
    @Test func aliasesCannotNestDeeperThanTheBound() {
        // Ten levels, anchored; each next anchor holds the previous alias ten levels down.
        var text = "a0: &a0 " + String(repeating: "[", count: 10) + "x" + String(repeating: "]", count: 10) + "\n"
        for level in 1...10 {
            text += "a\(level): &a\(level) " + String(repeating: "[", count: 10) + "*a\(level - 1)" + String(repeating: "]", count: 10) + "\n"
        }
        let report = PlanLoader.load(text: text, file: "deep-aliases.yaml")
        #expect(!report.parsed)
        #expect(report.diagnostics.first?.message.contains("nested deeper than 64") == true, "\(report.diagnostics)")
        // a5 holds 6 x 10 levels under its key: the alias of a5 inside a6 crosses 64.
        #expect(report.diagnostics.first?.line == 7, "\(report.diagnostics)")
    }

    /// An alias adds exactly the levels its node has: the same text written out and aliased is
    /// accepted or refused alike, at the bound.
    @Test func anAliasAtTheBoundIsTakenLikeItsText() {
        // 63 levels of lists under the key, then `[x]` (a 64th level) written out or aliased.
        let open = String(repeating: "[", count: 62)
        let close = String(repeating: "]", count: 62)
        let written = PlanLoader.load(text: "k: \(open)[x]\(close)\n", file: "written.yaml")
        let aliased = PlanLoader.load(text: "a: &a [x]\nk: \(open)*a\(close)\n", file: "aliased.yaml")
        #expect(written.diagnostics.first?.message.contains("nested deeper") != true, "\(written.diagnostics)")
        #expect(aliased.diagnostics.first?.message.contains("nested deeper") != true, "\(aliased.diagnostics)")
        let deeper = PlanLoader.load(text: "a: &a [[x]]\nk: \(open)*a\(close)\n", file: "deeper.yaml")
        #expect(deeper.diagnostics.first?.message.contains("nested deeper than 64") == true, "\(deeper.diagnostics)")
    }

    @Test func anEmptyFileIsSaidToBeEmpty() {
        for text in ["", "# only a comment\n"] {
            let report = PlanLoader.load(text: text, file: "empty.yaml")
            #expect(!report.parsed)
            #expect(report.diagnostics.first?.message == "the file is empty")
        }
    }

    /// A duplicate key no longer stops the reading: it is reported at its second occurrence, and
    /// every other rule still runs on the rest.
    @Test func duplicatesAndOtherProblemsAreReportedTogether() throws {
        let text = try Self.demo()
            .replacingOccurrences(of: "  strategy: auto", with: "  strategy: auto\n  strategy: sideways")
            .replacingOccurrences(of: "vcpus: 1", with: "vcpus: 0")
        #expect(text.contains("strategy: sideways") && text.contains("vcpus: 0"))
        let report = PlanLoader.load(text: text, file: "both.yaml")
        #expect(report.parsed && !report.valid)
        let codes = Set(report.diagnostics.map(\.code))
        #expect(codes.contains("duplicate-field") && codes.contains("vcpus-out-of-range"), "\(report.diagnostics)")
        let duplicate = try #require(report.diagnostics.first { $0.code == "duplicate-field" })
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false)
        let line = try #require(duplicate.line)
        #expect(lines[line - 1].contains("strategy: sideways"), "the second occurrence is the one reported")
        // The first value is the one read: the second, not a strategy, would be an invalid value.
        #expect(report.diagnostics.allSatisfy { $0.path != "spec.strategy" || $0.code == "duplicate-field" }, "\(report.diagnostics)")
    }
}
