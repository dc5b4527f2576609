import Foundation
import Journal
import Kernel
import Orchestrator
import Plans
import Testing

func loadPlan(_ name: String, strategy: Strategy? = nil) throws -> MigrationPlan {
    let report = PlanLoader.load(path: repositoryRoot + "/migration-plans/" + name, strategy: strategy)
    return try #require(report.plan, "\(report.diagnostics)")
}

func temporaryDirectory(_ prefix: String) -> String {
    let path = FileManager.default.temporaryDirectory.appendingPathComponent("\(prefix)-\(UUID().uuidString)").path
    try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    return path
}

/// The journal's own consistency: no corruption, one start, every intent answered by an
/// outcome (or, after a crash, by recovery), a finished record whose state agrees with the
/// point of no return.
func checkJournal(_ contents: JournalContents, expect state: TerminalState? = nil, sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(contents.corruption == nil, sourceLocation: sourceLocation)
    guard case .started? = contents.entries.first?.event else {
        Issue.record("the journal does not start with its start record", sourceLocation: sourceLocation)
        return
    }
    var open: JournalEntry.Event? = nil
    for entry in contents.entries {
        switch entry.event {
        case .intent:
            #expect(open == nil, "an intent without an outcome before #\(entry.sequence)", sourceLocation: sourceLocation)
            open = entry.event
        case .outcome(let outcome):
            #expect(open == .intent(step: outcome.step, direction: outcome.direction), "#\(entry.sequence) answers no intent", sourceLocation: sourceLocation)
            open = nil
        case .recovery:
            // A crash between an intent and its outcome leaves the intent unanswered; recovery takes over there.
            open = nil
        default:
            break
        }
    }
    let finished = contents.entries.compactMap { entry -> JournalEntry.Finished? in
        if case .finished(let finished) = entry.event { return finished }
        return nil
    }.last
    guard let finished else {
        Issue.record("the journal has no finished record", sourceLocation: sourceLocation)
        return
    }
    if let state { #expect(finished.state == state, "\(finished.reason)", sourceLocation: sourceLocation) }
    let passed = contents.entries.contains { $0.event == .pointOfNoReturn }
    switch finished.state {
    case .completed: #expect(passed, "completed without passing the point of no return", sourceLocation: sourceLocation)
    case .rolledBack:
        // Past the point of no return only when the target died before it ever ran the guest.
        let targetDiedFirst = contents.entries.contains { entry in
            switch entry.event {
            case .note(let text): text.contains("died before it ran the guest")
            case .recovery(_, let decision): decision.contains("never ran the guest")
            default: false
            }
        }
        #expect(!passed || targetDiedFirst, "rolled back after the point of no return", sourceLocation: sourceLocation)
    case .stuck, .lost: break
    }
}

/// Which terminal state a fault must end in: a fault that fires before the point of no return
/// rolls back; after it, the step is retried and the migration completes.
func expectedState(for point: FaultPoint, plan: MigrationPlan, fired: Bool, journal: JournalContents) -> TerminalState {
    guard fired else { return .completed }
    let pointOfNoReturn = Migration.pointOfNoReturn(confidential: plan.vm.type.hasEncryptionContext)
    let order = MigrationStep.allCases
    switch point {
    case .before(let step):
        return order.firstIndex(of: step)! >= order.firstIndex(of: pointOfNoReturn)! ? .completed : .rolledBack
    case .after(let step):
        return order.firstIndex(of: step)! >= order.firstIndex(of: pointOfNoReturn)! ? .completed : .rolledBack
    case .kernel:
        // A kernel call fails in whichever step makes it: the journal says which.
        let failed = journal.entries.compactMap { entry -> MigrationStep? in
            if case .outcome(let outcome) = entry.event, !outcome.ok, outcome.direction == .forward { return outcome.step }
            return nil
        }.first
        guard let failed else { return .completed }
        return order.firstIndex(of: failed)! >= order.firstIndex(of: pointOfNoReturn)! ? .completed : .rolledBack
    }
}

struct MatrixCase: Sendable, CustomTestStringConvertible {
    var point: FaultPoint
    var plan: String
    var testDescription: String { "\(point) (\(plan))" }
}

let matrixPoints = FaultPoint.all.map { MatrixCase(point: $0, plan: "demo.yaml") }
    + FaultPoint.all.map { MatrixCase(point: $0, plan: "confidential-demo.yaml") }

@Suite("Migrations")
struct MigrationTests {
    @Test("demo.yaml on the real kernel with share and copy, verified through the target", arguments: [Strategy.share, .copy])
    func realMigration(_ strategy: Strategy) throws {
        let linux = try Backend.linux.make() as! LinuxKVM
        let journal = try Journal(stateDirectory: temporaryDirectory("gmigrate-state"))
        let run = try StandaloneRun.run(
            plan: try loadPlan("demo.yaml", strategy: strategy), planFile: "demo.yaml", strategy: strategy, backend: .linux,
            journal: journal, faults: [], linux: linux)
        #expect(run.summary.state == .completed)
        let verification = try #require(run.verification)
        #expect(verification.passed)
        #expect(verification.counterBefore == UInt32(StandaloneRun.guestExits))
        #expect(verification.counterAfter.first == UInt32(StandaloneRun.guestExits) + 1)
        #expect(verification.bytesChecked > 0 && verification.bytesIntact)
        let same = verification.sourceInodes["ram"] == verification.targetInodes["ram"]
        #expect(same == (strategy == .share), "share runs on the source's inode, copy on its own")
        checkJournal(try Journal.read(path: run.journalPath), expect: .completed)
        #expect(run.source.vmHandle == nil, "the source is retired")
        #expect(run.target.isRunning)
    }

    @Test("demo.yaml on the model with link", arguments: ["demo.yaml", "confidential-demo.yaml"])
    func modelLink(_ plan: String) throws {
        let journal = try Journal(stateDirectory: temporaryDirectory("gmigrate-state"))
        let run = try StandaloneRun.run(
            plan: try loadPlan(plan), planFile: plan, strategy: .link, backend: .model(hostFile: nil), journal: journal, faults: [])
        #expect(run.summary.state == .completed)
        #expect(run.verification?.passed == true)
        #expect(run.verification?.sourceInodes == run.verification?.targetInodes)
        let contents = try Journal.read(path: run.journalPath)
        checkJournal(contents, expect: .completed)
        if plan == "confidential-demo.yaml" {
            // The target was shown unable to map guest memory before the move.
            let verify = contents.entries.compactMap { entry -> JournalEntry.Outcome? in
                if case .outcome(let outcome) = entry.event, outcome.step == .verifyBindings { return outcome }
                return nil
            }.first
            #expect(verify?.details["target-maps-before-move"] == "EPERM")
        }
    }

    /// Every fault point × errno, in this process, on both kernels: the run ends in the right
    /// terminal state with the invariants held, and nothing leaks.
    @Test("every fault point with an errno", arguments: matrixPoints, Backend.allCases)
    func errnoMatrix(_ matrix: MatrixCase, _ backend: Backend) throws {
        let plan = try loadPlan(matrix.plan)
        if backend == .linux && plan.vm.type != .default { return }  // no confidential types on this host
        let strategy: Strategy = backend == .linux ? .share : .link
        let spec = FaultSpec(point: matrix.point, fault: .errno(Errno(rawValue: 12)))  // ENOMEM
        let journal = try Journal(stateDirectory: temporaryDirectory("gmigrate-state"))
        let linux = backend == .linux ? try Backend.linux.make() as? LinuxKVM : nil
        do {
            let run = try StandaloneRun.run(
                plan: plan, planFile: matrix.plan, strategy: strategy, backend: backend == .linux ? .linux : .model(hostFile: nil),
                journal: journal, faults: [spec], linux: linux)
            let contents = try Journal.read(path: run.journalPath)
            let fired = run.unfiredFaults.isEmpty
            let expected = expectedState(for: matrix.point, plan: plan, fired: fired, journal: contents)
            #expect(run.summary.state == expected, "\(run.summary.reason)")
            checkJournal(contents, expect: expected)
            // Exactly one VM holds the memory and runs: the target after completion, else the source.
            let (survivor, other) = expected == .completed ? (run.target, run.source) : (run.source, run.target)
            #expect(survivor.vmHandle != nil && survivor.isRunning)
            #expect(other.vmHandle == nil && !other.isRunning)
            #expect(run.verification?.passed == true, "the guest carries on with its memory")
            if case .model = backend, let model = (run.source.backend as? FaultInjectingBackend)?.inner as? KernelModel {
                let holders = model.host.vmsHoldingMemory().filter { !$0.inodes.isEmpty }
                #expect(holders.count == 1, "VMs holding guest memory: \(holders)")
                #expect(holders.first?.creator == survivor.process)
            }
        }
        // Everything released: no descriptor or mapping left behind by the migration.
        if let linux {
            #expect(linux.openDescriptorCount == 0)
            #expect(linux.mappingCount == 0)
        }
    }
}

