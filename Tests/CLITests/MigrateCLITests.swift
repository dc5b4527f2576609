import Foundation
import GmigrateTestKit
import GmigrateTestSupport
import Journal
import Kernel
import Orchestrator
import Plans
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A copy of demo.yaml with some lines replaced, in a temporary file.
func demoVariant(_ replacements: [(String, String)], name: String = "variant.yaml") throws -> String {
    var text = try String(contentsOfFile: repositoryRoot + "/migration-plans/demo.yaml", encoding: .utf8)
    for (old, new) in replacements { text = text.replacingOccurrences(of: old, with: new) }
    return try temporaryFile(text, name: name)
}

@Suite("gmigrate migrate")
struct MigrateCLITests {
    @Test func migrateOnTheRealKernelShowsStepsBlackoutAndVerification() throws {
        _ = try Backend.linux.make()
        let state = temporaryDirectory("gmigrate-cli")
        let result = try gmigrate(["migrate", "migration-plans/demo.yaml", "--state-dir", state])
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        #expect(result.stdout.contains("on linux, strategy share"))
        #expect(result.stdout.contains("strategy auto chose share"))
        for step in MigrationMachine.steps(strategy: .share, confidential: false) { #expect(result.stdout.contains("  \(step.rawValue) "), "\(step) is shown") }
        #expect(!result.stdout.contains("copy-memory") && !result.stdout.contains("move-enc-context"), "steps a share run does not need are not part of it")
        #expect(result.stdout.contains("completed in"))
        #expect(result.stdout.contains("blackout"))
        #expect(result.stdout.contains("guest counter 32 at the pause, then 33…64 in the target"))
        #expect(result.stdout.contains("(the same memory)"))
        // The journal is readable, as text and JSON, and listed.
        let list = try gmigrate(["journal", "list", "--state-dir", state])
        #expect(list.stdout.contains("demo  completed"))
        let id = try #require(list.stdout.split(separator: " ").first.map(String.init))
        let show = try gmigrate(["journal", "show", id, "--state-dir", state])
        #expect(show.stdout.contains("POINT OF NO RETURN"))
        #expect(show.stdout.contains("finished completed"))
        let json = try gmigrate(["journal", "show", id, "--state-dir", state, "--json"])
        let document = try #require(try JSONSerialization.jsonObject(with: Data(json.stdout.utf8)) as? [String: Any])
        #expect((document["entries"] as? [Any])?.count == 21, "started, 8 intents and outcomes, the saved state, the point of no return, one observation, finished")
    }

    @Test func jsonSummary() throws {
        let state = temporaryDirectory("gmigrate-cli")
        let result = try gmigrate(["migrate", "migration-plans/demo.yaml", "--backend", "model", "--state-dir", state, "--json"])
        #expect(result.status == 0)
        let object = try #require(try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any])
        let summary = try #require(object["summary"] as? [String: Any])
        #expect(summary["state"] as? String == "completed")
        #expect(summary["strategy"] as? String == "link")
        #expect((summary["steps"] as? [Any])?.count == 8, "prepare … retire-source, without copy-memory and move-enc-context")
        #expect((object["verification"] as? [String: Any])?["bytesIntact"] as? Bool == true)
    }

    @Test func dryRunRehearsesOnTheModelAndTouchesNothing() throws {
        let state = temporaryDirectory("gmigrate-cli")
        let result = try gmigrate(["migrate", "migration-plans/demo.yaml", "--dry-run", "--state-dir", state])
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        #expect(result.stdout.contains("dry run: rehearsed on the model"))
        #expect(result.stdout.contains("on model"))
        // The strategy auto picks is this host's, rehearsed on the model: link where the probe
        // finds the link ioctl (and on a host without /dev/kvm, where the model is the host),
        // share otherwise. From the probe, never a constant.
        let hostHasLink = kvmIsUsable ? try LinuxKVM().probe().link.supported : true
        #expect(result.stdout.contains(hostHasLink ? "strategy link" : "strategy share"), "\(result.stdout)")
        #expect(!FileManager.default.fileExists(atPath: state + "/journal"), "a dry run journals nowhere")
        // The first failure it would hit.
        let failing = try gmigrate(["migrate", "migration-plans/demo.yaml", "--dry-run", "--inject", "kernel:set-memslot=errno:EEXIST"])
        #expect(failing.status == 6)
        #expect(failing.stdout.contains("bind-memslots            FAILED"))
        #expect(failing.stdout.contains("reason: bind-memslots failed: set-memslot: EEXIST"))
    }

    @Test func errnoFaultRollsBackAndSaysWhy() throws {
        let state = temporaryDirectory("gmigrate-cli")
        let result = try gmigrate([
            "migrate", "migration-plans/demo.yaml", "--backend", "model", "--state-dir", state, "--inject", "after:pause-source=errno:ENOMEM",
        ])
        #expect(result.status == 6)
        #expect(result.stdout.contains("undo pause-source"))
        #expect(result.stdout.contains("undo create-target"))
        #expect(result.stdout.contains("rolled-back"))
        #expect(result.stdout.contains("guest counter 32 at the pause, then 33…64 in the source"))
    }

    @Test func stepTimeoutAndBlackoutBreach() throws {
        let slow = try demoVariant([("stepTimeout: 5s", "stepTimeout: 100ms")])
        let timedOut = try gmigrate(["migrate", slow, "--backend", "model", "--state-dir", temporaryDirectory("s"), "--inject", "before:bind-memslots=delay:300ms"])
        #expect(timedOut.status == 6)
        #expect(timedOut.stdout.contains("over the step timeout of 100ms"))
        let tight = try demoVariant([("maxBlackout: 50ms", "maxBlackout: 1us")])
        let breached = try gmigrate(["migrate", tight, "--backend", "model", "--state-dir", temporaryDirectory("s")])
        #expect(breached.status == 0)
        #expect(breached.stdout.contains("BREACH of maxBlackout"))
    }

    @Test func planFaultsNeedAllowFaults() throws {
        let plan = try demoVariant([("    stepTimeout: 5s", "    stepTimeout: 5s\n  faults:\n    - before:create-target=errno:EIO")])
        let ignored = try gmigrate(["migrate", plan, "--backend", "model", "--state-dir", temporaryDirectory("s")])
        #expect(ignored.status == 0)
        #expect(ignored.stdout.contains("spec.faults are ignored"))
        let honoured = try gmigrate(["migrate", plan, "--backend", "model", "--state-dir", temporaryDirectory("s"), "--allow-faults"])
        #expect(honoured.status == 6)
        #expect(honoured.stdout.contains("injected fault before:create-target: EIO"))
    }

    @Test func badInputs() throws {
        #expect(try gmigrate(["migrate", "migration-plans/demo.yaml", "--inject", "before:nowhere=crash"]).status == 2)
        let invalid = try gmigrate(["migrate", "migration-plans/invalid/gpa-overlap.yaml", "--backend", "model"])
        #expect(invalid.status == 1)
        #expect(invalid.stderr.contains("gpa-overlap"))
        let remote = try gmigrate(["migrate", "migration-plans/web-vmm-upgrade.yaml", "--backend", "model"])
        #expect(remote.status == 4, "no VMM listens at the plan's source socket")
        #expect(remote.stderr.contains("connecting to /run/gmigrate/vmm/web-42.sock: No such file or directory"))
    }

    /// A link on a kernel without the link ioctl is refused by the validator, before any VM is
    /// created; on one with it, the link runs.
    @Test func linkFollowsTheProbe() throws {
        let kernel = try requireKVM()
        let link = try gmigrate(["migrate", "migration-plans/demo.yaml", "--backend", "linux", "--strategy", "link", "--state-dir", temporaryDirectory("s")])
        if try kernel.probe().link.supported {
            #expect(link.status == 0, "\(link.stdout)\(link.stderr)")
        } else {
            #expect(link.status == 1)
            #expect(link.stderr.contains("strategy-unavailable"))
        }
    }

    @Test func faultsList() throws {
        let result = try gmigrate(["faults", "list", "--json"])
        let points = try #require(try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [[String: String]])
        #expect(
            points.count == MigrationStep.allCases.count * 2 + 21 + 1,
            "a point before and after every step, one at each of the 21 faultable kernel calls, and the state in transit")
        #expect(points.contains { $0["point"] == "state" })
        #expect(points.contains { $0["point"] == "before:bind-memslots" })
        #expect(points.contains { $0["point"] == "kernel:link-guest-memfd" })
        for call in ["create-irqchip", "set-cpuid", "get-vm-state", "set-vm-state"] {
            #expect(points.contains { $0["point"] == "kernel:" + call }, "the VM state's calls are faultable: \(call)")
        }
    }
}
