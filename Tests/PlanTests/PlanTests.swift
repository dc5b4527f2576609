import Foundation
import GmigrateTestKit
import Kernel
import Plans
import Testing
import Yams

#if canImport(Glibc)
import Glibc
#endif

/// The plan files under migration-plans/, relative to the repository root.
func planFiles(_ directory: String) -> [String] {
    let names = (try? FileManager.default.contentsOfDirectory(atPath: repositoryRoot + "/" + directory)) ?? []
    return names.filter { $0.hasSuffix(".yaml") || $0.hasSuffix(".json") }.sorted().map { directory + "/" + $0 }
}

/// The same plan as JSON (YAML's data model, re-serialized), for the "YAML and JSON" checks.
func jsonVersion(ofYAMLAt path: String) throws -> String {
    let text = try String(contentsOfFile: repositoryRoot + "/" + path, encoding: .utf8)
    let object = try #require(try Yams.load(yaml: text))
    let data = try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys])
    return String(decoding: data, as: UTF8.self)
}

/// The host capabilities of this project's machine kind, as `gmigrate host probe` reads them:
/// an input for the validator's host rules (the same on every host running the tests), not an
/// assertion about the host the tests run on.
let thisMachineKind = HostCapabilities(

    backend: "linux", apiVersion: 12, vmTypes: ["default"],
    guestMemfd: .init(supported: true, flags: ["mmap", "init-shared"], flagsRaw: 3),
    userMemoryRegion2: true, preFaultMemory: false, immediateExit: true,
    link: .init(supported: false, detail: "KVM_LINK_GUEST_MEMFD (0xC040AED6) answered ENOTTY"),
    moveEncryptionContext: .init(supported: false, detail: "no SEV/SNP/TDX VM type"),
    copyEncryptionContext: .init(supported: false, detail: "no SEV/SNP/TDX VM type"),
    limits: .init(recommendedVCPUs: 2, maxVCPUs: 1024, maxVCPUID: 4096, memslots: 32764, addressSpaces: 1))

@Suite("Migration plans")
struct PlanTests {
    @Test("valid examples pass, as YAML and as JSON", arguments: planFiles("migration-plans"))
    func validExamples(_ path: String) throws {
        let report = PlanLoader.load(path: repositoryRoot + "/" + path)
        #expect(report.valid, "\(report.diagnostics.map(\.description))")
        #expect(report.diagnostics.isEmpty)
        let plan = try #require(report.plan)
        #expect(!plan.vm.memslots.isEmpty)
        if path.hasSuffix(".yaml") {
            let json = PlanLoader.load(text: try jsonVersion(ofYAMLAt: path), file: path + ".json")
            #expect(json.valid)
            #expect(json.plan == plan, "YAML and JSON describe the same plan")
        }
    }

    @Test func theExamplePlansSayWhatTheyShould() throws {
        let big = try #require(PlanLoader.load(path: repositoryRoot + "/migration-plans/multi-slot-64g.yaml").plan)
        #expect(big.vm.memslots.count == 8 && big.vm.guestMemfds.count == 2)
        #expect(big.vm.memslots.reduce(0) { $0 + $1.size } == 64 << 30)
        let demo = try #require(PlanLoader.load(path: repositoryRoot + "/migration-plans/demo.yaml").plan)
        #expect(demo.source == .inProcess && demo.target == .inProcess)
        #expect(demo.policy.maxBlackout == .milliseconds(50) && demo.policy.stepTimeout == .seconds(5))
        let snp = try #require(PlanLoader.load(path: repositoryRoot + "/migration-plans/snp-confidential.yaml").plan)
        #expect(snp.vm.type == .snp && snp.strategy == .link)
    }

    /// Every rule's example: the CLI's report is exactly the checked-in `.expected` file.
    @Test("invalid examples give their expected reports", arguments: planFiles("migration-plans/invalid") + planFiles("migration-plans/invalid/host"))
    func invalidExamples(_ path: String) throws {
        let isHost = path.contains("/host/")
        if isHost {
            // The host examples' texts quote this machine kind's probe: no link ioctl (ENOTTY), no
            // VM type but default.
            let capabilities = try requireKVM().probe()
            try requireThisMachineKind(
                !capabilities.link.supported && capabilities.link.detail.contains("ENOTTY") && capabilities.vmTypes == ["default"],
                what: "no link ioctl, default VMs only")
        }
        let expected = try String(contentsOfFile: repositoryRoot + "/" + path.replacingOccurrences(of: ".yaml", with: ".expected"), encoding: .utf8)
        let result = try gmigrate(["plan", "validate"] + (isHost ? ["--host"] : []) + [path])
        #expect(result.stdout == expected)
        let summary = expected.split(separator: "\n").last.map(String.init) ?? ""
        let status: Int32 = summary.contains(": unreadable") ? 2 : summary.contains(": invalid") ? 1 : 0
        #expect(result.status == status)
        // The file is named after the rule it shows.
        let rule = URL(fileURLWithPath: path).deletingPathExtension().lastPathComponent
        if PlanRule(rawValue: rule) != nil {
            #expect(expected.contains(": \(rule): "), "\(path) must show the rule \(rule)")
        }
    }

    @Test("every rule has an example or a test")
    func everyRuleIsShown() {
        let files = Set((planFiles("migration-plans/invalid") + planFiles("migration-plans/invalid/host")).map {
            URL(fileURLWithPath: $0).deletingPathExtension().lastPathComponent
        })
        // flag-unsupported-on-host cannot fail on this host (it has every flag): tested below
        // against an older kernel's capabilities.
        // The other NIC rules need taps: NICValidationTests makes them in a network namespace.
        let elsewhere: Set<PlanRule> = [.flagUnsupportedOnHost, .nicNotTap, .nicDown, .nicMTUMismatch, .nicWrongBridge]
        for rule in PlanRule.allCases where !elsewhere.contains(rule) {
            #expect(files.contains(rule.rawValue), "no example for \(rule.rawValue)")
        }
    }

    /// The same rules on the JSON form of each invalid example (positions differ; codes and paths do not).
    /// Not YAML at all, or a key twice (a JSON object from JSONSerialization cannot carry one):
    /// those two have no JSON form, so they are not cases here (the YAML test covers them).
    @Test(
        "invalid examples as JSON give the same codes and paths",
        arguments: planFiles("migration-plans/invalid").filter { !$0.hasSuffix("syntax-error.yaml") && !$0.hasSuffix("duplicate-field.yaml") })
    func invalidExamplesAsJSON(_ path: String) throws {
        let yaml = PlanLoader.load(path: repositoryRoot + "/" + path)
        let json = PlanLoader.load(text: try jsonVersion(ofYAMLAt: path), file: path + ".json")
        func key(_ d: PlanDiagnostic) -> String { "\(d.severity) \(d.code) \(d.path)" }
        #expect(Set(json.diagnostics.map(key)) == Set(yaml.diagnostics.map(key)))
        #expect(json.diagnostics.allSatisfy { $0.line != nil }, "JSON diagnostics carry positions too")
    }

    @Test func jsonSyntaxErrorsHaveLineAndColumn() {
        let report = PlanLoader.load(text: "{\n  \"apiVersion\": \"gmigrate/v1\",\n  \"kind\": [\n}\n", file: "p.json")
        #expect(!report.parsed)
        let diagnostic = report.diagnostics.first
        #expect(diagnostic?.code == "syntax-error")
        #expect(diagnostic?.line == 4)
        #expect(diagnostic?.column != nil)
    }

    @Test func hostChecksOnThisMachineKind() throws {
        let demo = PlanLoader.load(path: repositoryRoot + "/migration-plans/demo.yaml", host: thisMachineKind)
        #expect(demo.valid)
        #expect(demo.strategy?.chosen == .share)
        #expect(demo.plan?.strategy == .auto)
        let snpPath = repositoryRoot + "/migration-plans/snp-confidential.yaml"
        #expect(PlanLoader.load(path: snpPath).valid)
        let snp = PlanLoader.load(path: snpPath, host: thisMachineKind)
        #expect(!snp.valid)
        #expect(snp.diagnostics.map(\.code) == ["vm-type-unavailable", "strategy-unavailable"])
        let model = try KernelModel().probe()
        #expect(PlanLoader.load(path: snpPath, host: model).valid, "the model has SNP, link and the move")
        #expect(PlanLoader.load(path: repositoryRoot + "/migration-plans/demo.yaml", host: model).strategy?.chosen == .link)
    }

    @Test func flagsThisHostLacks() {
        // A 6.17-era kernel: guest_memfd without the mmap flags.
        var older = thisMachineKind
        older.guestMemfd = .init(supported: true, flags: [], flagsRaw: 0)
        let report = PlanLoader.load(path: repositoryRoot + "/migration-plans/demo.yaml", host: older)
        #expect(report.diagnostics.map(\.code).contains("flag-unsupported-on-host"))
        #expect(report.diagnostics.first { $0.code == "flag-unsupported-on-host" }?.path == "spec.vm.guestMemfds[0].flags")
        #expect(report.strategy?.chosen == nil)
    }

    @Test func theCLIPicksShareForTheDemoAndRejectsSNPWithHost() throws {
        _ = try Backend.linux.make()
        let demo = try gmigrate(["plan", "validate", "--host", "migration-plans/demo.yaml"])
        #expect(demo.status == 0)
        #expect(demo.stdout.contains("strategy auto would choose share here"))
        let snp = try gmigrate(["plan", "validate", "--host", "migration-plans/snp-confidential.yaml"])
        #expect(snp.status == 1)
        #expect(snp.stdout.contains("vm-type-unavailable: this host's KVM offers no snp VMs"))
        #expect(try gmigrate(["plan", "validate", "migration-plans/snp-confidential.yaml"]).status == 0)
    }

    @Test func jsonReport() throws {
        let result = try gmigrate(["plan", "validate", "--json", "migration-plans/demo.yaml", "migration-plans/invalid/gpa-overlap.yaml"])
        #expect(result.status == 1)
        let object = try #require(try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any])
        #expect(object["valid"] as? Bool == false)
        #expect(object["errors"] as? Int == 1)
        let files = try #require(object["files"] as? [[String: Any]])
        #expect(files.count == 2)
        #expect(files[0]["valid"] as? Bool == true)
        let diagnostic = try #require((files[1]["diagnostics"] as? [[String: Any]])?.first)
        #expect(diagnostic["code"] as? String == "gpa-overlap")
        #expect(diagnostic["path"] as? String == "spec.vm.memslots[1].guestPhysAddr")
        #expect(diagnostic["line"] as? Int == 25)
        #expect(diagnostic["severity"] as? String == "error")
    }

    @Test func unreadableFilesExit2() throws {
        let result = try gmigrate(["plan", "validate", "migration-plans/demo.yaml", "/nonexistent/plan.yaml"])
        #expect(result.status == 2)
        #expect(result.stdout.contains("/nonexistent/plan.yaml: error: syntax-error: cannot read the file"))
    }

    /// 4096 memslots: correct here; its speed is measured by tools/bench-plan-validation.
    @Test func aPlanWithManySlots() {
        let text = PlanBenchmark.plan(slots: 4096)
        let report = PlanLoader.load(text: text, file: "big.yaml")
        #expect(report.valid)
        #expect(report.plan?.vm.memslots.count == 4096)
        // One overlapping slot among thousands is found, and only that one.
        let broken = text.replacingOccurrences(of: "guestPhysAddr: 0x3ff000000\n", with: "guestPhysAddr: 0x3fe800000\n")
        let brokenReport = PlanLoader.load(text: broken, file: "big.yaml")
        #expect(brokenReport.diagnostics.map(\.code) == ["gpa-overlap"])
    }
}

@Suite("Fault specs")
struct FaultSpecTests {
    @Test("a fault spec reads back from its own text", arguments: [
        "before:bind-memslots=errno:ENOMEM", "kernel:set-memslot=errno:EIO*3", "after:prepare=crash", "before:retire-source=delay:2s",
        "kernel:run-vcpu=delay:250ms*", "after:pause-source=delay:1500us",
    ])
    func roundTrip(_ text: String) throws {
        let spec = try FaultSpec(parsing: text)
        #expect(try FaultSpec(parsing: spec.description) == spec)
        let encoded = try JSONEncoder().encode(spec)
        #expect(try JSONDecoder().decode(FaultSpec.self, from: encoded) == spec)
    }
}
