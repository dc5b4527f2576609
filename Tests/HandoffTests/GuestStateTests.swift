import CKVM
import Foundation
import GmigrateTestKit
import GmigrateTestSupport
import Guests
import Handoff
import Journal
import Kernel
import Orchestrator
import Plans
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The demo's JSON: one document with a hop per migration.
struct DemoReport {
    var hops: [[String: Any]]

    init(_ result: CommandResult) throws {
        let document = try #require(try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any], "\(result.stdout)\(result.stderr)")
        hops = try #require(document["hops"] as? [[String: Any]])
    }

    func summary(_ hop: Int) -> [String: Any] { hops[hop]["summary"] as? [String: Any] ?? [:] }
    func verification(_ hop: Int) -> [String: Any] { hops[hop]["verification"] as? [String: Any] ?? [:] }
    /// The long-mode guest's check of one hop: its problems and each vcpu's figures.
    func guest(_ hop: Int) -> (problems: [String], vcpus: [[String: Any]])? {
        guard let guest = verification(hop)["guest"] as? [String: Any] else { return nil }
        return (guest["problems"] as? [String] ?? ["no problems list"], guest["vcpus"] as? [[String: Any]] ?? [])
    }
}

/// Issue 12: a real guest (long mode, 2 vcpus, LAPIC timer, syscalls, SSE, TSC and kvmclock)
/// survives migration after migration, and breaking any one piece of its state is noticed.
@Suite("The whole VM state, migration after migration", .serialized)
struct GuestStateTests {
    /// Ten consecutive migrations of one live long-mode guest on 2 vcpus (A→B→C…): after each,
    /// the guest reports no violation and its work, syscalls, timer ticks and clocks went on.
    @Test("ten hops of the long-mode guest on the real kernel", arguments: ["share", "copy"])
    func tenHops(_ strategy: String) throws {
        _ = try Backend.linux.make()
        let (result, state) = try demo(["--hops", "10", "--strategy", strategy, "--warmup", "100"])
        defer { try? FileManager.default.removeItem(atPath: state) }
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        let report = try DemoReport(result)
        #expect(report.hops.count == 10)
        var lastIterations: [Int] = []
        var lastSyscalls: [Int] = []
        for hop in report.hops.indices {
            #expect(report.summary(hop)["state"] as? String == "completed", "hop \(hop + 1): \(report.summary(hop))")
            let guest = try #require(report.guest(hop), "hop \(hop + 1) checked the long-mode guest")
            #expect(guest.problems.isEmpty, "hop \(hop + 1): \(guest.problems)")
            #expect(guest.vcpus.count == 2)
            let iterations = guest.vcpus.map { $0["iterations"] as? Int ?? 0 }
            let syscalls = guest.vcpus.map { $0["syscalls"] as? Int ?? 0 }
            if !lastIterations.isEmpty {
                #expect(zip(iterations, lastIterations).allSatisfy { $0 > $1 }, "hop \(hop + 1): every vcpu's work goes on: \(lastIterations) → \(iterations)")
                #expect(zip(syscalls, lastSyscalls).allSatisfy { $0 > $1 }, "hop \(hop + 1): every vcpu's syscalls go on")
            }
            lastIterations = iterations
            lastSyscalls = syscalls
            for vcpu in guest.vcpus {
                let hertz = vcpu["timerHertz"] as? Double ?? 0
                #expect(hertz > 125 && hertz < 375, "hop \(hop + 1): the timer ticks at \(hertz) Hz, about 250")
            }
            let source = report.verification(hop)["sourceInodes"] as? [String: String]
            let target = report.verification(hop)["targetInodes"] as? [String: String]
            #expect((source == target) == (strategy == "share"), "hop \(hop + 1): share keeps the inode, copy makes its own")
        }
    }

    /// Ten consecutive links on a model host (the counter guest: the model runs 16-bit code):
    /// the count in guest memory goes on from where each hop paused it.
    @Test("ten hops with link on the model")
    func tenLinksOnTheModel() throws {
        let (result, state) = try demo(["--hops", "10", "--backend", "model", "--strategy", "link", "--warmup", "100"])
        defer { try? FileManager.default.removeItem(atPath: state) }
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        let report = try DemoReport(result)
        #expect(report.hops.count == 10)
        var last = 0
        for hop in report.hops.indices {
            #expect(report.summary(hop)["state"] as? String == "completed", "hop \(hop + 1): \(report.summary(hop))")
            let verification = report.verification(hop)
            let atPause = verification["counterAtPause"] as? Int ?? 0
            #expect(atPause > last, "hop \(hop + 1): the count went on from the last hop (\(last) → \(atPause))")
            #expect(verification["counterAtResume"] as? Int == atPause, "hop \(hop + 1): the target resumed with the paused count")
            #expect(verification["sourceInodes"] as? [String: String] == verification["targetInodes"] as? [String: String])
            last = atPause
        }
    }

    /// One piece of the state broken on purpose, and who must notice.
    struct Break: Sendable, CustomTestStringConvertible {
        var fault: String
        /// Rolled back before the guest ran in the target (the target refused the state, or
        /// its read-back differed), or completed and the guest noticed.
        var rolledBack: Bool
        var noticed: String
        var testDescription: String { fault }
    }

    static let breaks: [Break] = [
        // CPUID: the saved CPU model is no longer the target's: refused before the point of no return.
        Break(fault: "state=alter:cpuid", rolledBack: true, noticed: "cpuid-mismatch: vcpu 0's saved CPUID is not this VMM's CPU model: leaf 0x1.0 ecx"),
        // An MSR: LSTAR moved, the guest's next syscall lands outside its handler.
        Break(fault: "state=alter:msr:0xc0000082", rolledBack: false, noticed: "exception 14"),
        // The same MSR set wrong by the target's kernel: the read-back names it.
        Break(fault: "kernel:set-vcpu-state=alter:msr:0xc0000082*", rolledBack: true, noticed: "read back differs: vcpu 0: section msrs: MSR LSTAR"),
        // XSAVE: xmm3 changed, and ymm3's upper half (the AVX component).
        Break(fault: "state=alter:xsave", rolledBack: false, noticed: "xmm3 changed"),
        Break(fault: "state=alter:ymm", rolledBack: false, noticed: "ymm3's upper half changed"),
        // LAPIC: the timer's LVT masked, no tick arrives.
        Break(fault: "state=alter:lapic", rolledBack: false, noticed: "its timer ticks at 0 Hz"),
        // The clock: the kvmclock ten seconds ahead.
        Break(fault: "state=alter:clock", rolledBack: false, noticed: "its kvmclock advanced"),
        // The target's kernel refuses a vcpu's set: the target refuses the state, also when the
        // source, still sending the next part, finds the channel closed first.
        Break(fault: "kernel:set-vcpu-state=errno:EIO", rolledBack: true, noticed: "the target refuses the saved state"),
        // The format: a section no VMM knows, and one that needs a capability this host lacks.
        Break(fault: "state=alter:section:future", rolledBack: true, noticed: "section 'future'"),
        Break(fault: "state=alter:section:nested", rolledBack: true, noticed: "section 'nested' needs capability"),
    ]

    /// Each break is caught: by the target before the point of no return (the migration rolls
    /// back and the guest runs on in the source, unharmed), by the read-back (the same), or by the
    /// guest itself (the migration completes and its verification fails, exit 8).
    @Test("breaking one piece of the state is noticed", arguments: breaks)
    func breakOnePiece(_ broken: Break) throws {
        _ = try Backend.linux.make()
        let (result, state) = try demo(["--inject", broken.fault, "--warmup", "100"])
        defer { try? FileManager.default.removeItem(atPath: state) }
        let report = try DemoReport(result)
        let summary = report.summary(0)
        if broken.rolledBack {
            #expect(result.status == 6, "\(result.stdout)\(result.stderr)")
            #expect(summary["state"] as? String == "rolled-back")
            #expect((summary["reason"] as? String ?? "").contains(broken.noticed), "\(summary["reason"] ?? "")")
            let guest = try #require(report.guest(0))
            #expect(guest.problems.isEmpty, "the guest runs on in the source, unharmed: \(guest.problems)")
        } else {
            #expect(result.status == 8, "\(result.stdout)\(result.stderr)")
            #expect(summary["state"] as? String == "completed")
            let guest = try #require(report.guest(0))
            if broken.fault.hasSuffix(":ymm") {
                // Only a guest that turned AVX on (CPUID offers XSAVE and AVX) holds ymm state.
                try requireHostFeature("AVX", present: guest.vcpus.allSatisfy { $0["avx"] as? Bool == true })
            }
            #expect(guest.problems.contains { $0.contains(broken.noticed) }, "the guest noticed: \(guest.problems)")
        }
        #expect((summary["unfiredFaults"] as? [String] ?? []).isEmpty, "the break was made")
    }

    /// The VMMs issue the GET and SET of every section (their per-section logs), and the
    /// journal's record of the pause names the same sections.
    @Test("every section is saved by the source and restored by the target")
    func perSectionLogs() throws {
        let linux = try #require(try Backend.linux.make() as? LinuxKVM)
        let (result, state) = try demo(["--warmup", "100"])
        defer { try? FileManager.default.removeItem(atPath: state) }
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        let files = try FileManager.default.contentsOfDirectory(atPath: state)
        let sourceLog = try String(contentsOfFile: state + "/source.log", encoding: .utf8)
        let targetName = try #require(files.first { $0.hasSuffix("-target.log") })
        let targetLog = try String(contentsOfFile: state + "/" + targetName, encoding: .utf8)
        func sections(_ log: String, _ prefix: String) -> Set<String> {
            guard let line = log.split(separator: "\n").first(where: { $0.contains(prefix) }),
                let start = line.range(of: prefix)
            else { return [] }
            var names: Set<String> = []
            for bracket in line[start.upperBound...].split(separator: "[").dropFirst() {
                names.formUnion(bracket.prefix { $0 != "]" }.split(separator: " ").map(String.init))
            }
            return names
        }
        let saved = sections(sourceLog, "saved sections:")
        let restored = sections(targetLog, "restored sections:")
        #expect(targetLog.contains("read back equal"))
        // What this host offers decides the alternatives (SREGS2 or SREGS, XSAVE2 or FPU, nested).
        var expected: Set<String> = ["regs", "msrs", "lapic", "cpuid", "pic-master", "pic-slave", "ioapic", "pit2", "clock"]
        func has(_ capability: Capability) -> Bool { ((try? linux.checkExtension(capability, vm: nil)) ?? 0) > 0 }
        expected.insert(has(.sregs2) ? "sregs2" : "sregs")
        expected.insert(has(.xsave2) ? "xsave" : "fpu")
        for (capability, name) in [
            (Capability.xcrs, "xcrs"), (.mpState, "mp-state"), (.vcpuEvents, "events"), (.debugRegisters, "debugregs"), (.getTSCKhz, "tsc-khz"),
        ] where has(capability) {
            expected.insert(name)
        }
        #expect(expected.isSubset(of: saved), "saved: \(saved.sorted()); missing \(expected.subtracting(saved).sorted())")
        #expect(saved == restored, "the target restored what the source saved: \(saved.symmetricDifference(restored).sorted())")
    }

    /// The bytes the code embeds are what the committed assembly source assembles to.
    @Test("the long-mode guest's embedded bytes match longmode.S")
    func guestImageMatchesSource() throws {
        try requireTools(["as", "ld"])
        let check = try run(repositoryRoot + "/tools/build-guests", ["--check"])
        #expect(check.status == 0, "\(check.stderr)")
    }
}
