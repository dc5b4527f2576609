import CKVM
import Foundation
import GmigrateTestKit
import Kernel
import KernelScript
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite("Kernel scripts")
struct ScriptTests {
    @Test(arguments: [
        ("4K", UInt64(4096)), ("2M", 2 << 20), ("1G", 1 << 30), ("1T", 1 << 40), ("0x1000", 4096), ("17", 17),
        ("4Ki", 4096), ("0xfffffffffffff000", 0xffff_ffff_ffff_f000),
    ])
    func quantities(_ text: String, _ value: UInt64) {
        #expect(parseQuantity(text) == value)
    }

    @Test(arguments: ["", "K", "0x", "12Q", "-1", "99999999999999999999", "16777216T"])
    func badQuantities(_ text: String) {
        #expect(parseQuantity(text) == nil)
    }

    /// A line that does not parse is reported as file:line, and nothing of the script runs.
    @Test(arguments: [
        ("vm a\nfrobnicate a", 2, "unknown command 'frobnicate'"),
        ("vm a\ngmem g vm=b size=4K", 2, "'b' is not defined"),
        ("vm a\nclose a\nvcpus a count=1", 3, "'a' was closed"),
        ("vm a\ngmem g vm=a size=lots", 2, "size=lots is not a number"),
        ("vm a\ngmem g vm=a size=4K colour=red", 2, "unknown argument 'colour'"),
        ("vm a type=z80", 1, "unknown type 'z80'"),
        ("vm a\nvm a", 2, "'a' is already defined"),
        ("vm a\ngmem g vm=a size=4K\nslot g 0 gpa=0 size=4K gmem=g", 3, "'g' is a FILE, expected a VM"),
        ("vm a => maybe", 1, "expected result 'maybe'"),
        ("vm a\nslot a 0 gpa=0 size=4K", 2, "gmem=FILE or map=FILE is required"),
        ("vm a\nwrite a offset=0 value=300", 2, "not a byte"),
    ])
    func parseErrors(_ text: String, _ line: Int, _ fragment: String) {
        do {
            _ = try Script.parse(text, path: "t.kscript")
            Issue.record("expected a parse error")
        } catch {
            #expect(error.line == line)
            #expect(error.description.hasPrefix("t.kscript:\(line): "))
            #expect(error.description.contains(fragment), "\(error.description)")
        }
    }

    @Test func commentsAndExpectations() throws {
        let script = try Script.parse("# a comment\n\nvm a   # trailing\nlaunch a => error ENOTTY\n", path: "x")
        #expect(script.lines.count == 2)
        #expect(script.lines[1].number == 4)
        #expect(script.lines[1].expected == "error ENOTTY")
    }

    @Test func resultsAndStatuses() throws {
        let results = try runScript(
            """
            vm a
            gmem g vm=a size=4K flags=mmap,init-shared => ok
            read g offset=0 => ok 0x0
            read g offset=0 => ok 1
            vm s type=tdx
            gmem h vm=s size=4K => ok
            """, on: KernelModel())
        #expect(results.map(\.status) == [.none, .match, .match, .mismatch, .none, .match])
        #expect(results[3].result == "ok 0x0")
    }

    @Test("a failed creation makes later lines naming it `skipped`", arguments: Backend.allCases)
    func skipped(_ backend: Backend) throws {
        let results = try runScript(
            """
            vm a
            gmem g vm=a size=4095
            punch g offset=0 len=4K
            close g
            gmem g vm=a size=4K
            punch g offset=0 len=4K
            """, on: try backend.make())
        #expect(results.map(\.result) == ["ok", "error EINVAL", "skipped", "skipped", "ok", "ok"])
    }
}
