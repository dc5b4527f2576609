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

/// The kernel calls each in-process run makes while it migrates, and the step that makes each:
/// what the migration is specified to do, so that a fault point never reached is a failure.
enum KernelCalls {
    static func made(strategy: Strategy, confidential: Bool) -> [KernelOperation: MigrationStep] {
        var calls: [KernelOperation: MigrationStep] = [
            .createVM: .createTarget, .createVCPU: .createTarget, .inodeIdentity: .handOverMemory, .setMemslot: .bindMemslots,
            // The target stages the state (sets it, reads it back) in pause-source, before the
            // point of no return; resume-target only runs its vcpus.
            .getVCPUState: .pauseSource, .setVCPUState: .pauseSource,
            // The target VMM's VM is made as the source's was: irqchip and PIT, each vcpu's CPUID.
            .createInterruptControllers: .createTarget, .setCPUID: .createTarget,
            // The VM's own state (irqchip, PIT, clock) is saved and staged in pause-source too.
            // The target checks the capabilities the state needs there (stage-state).
            .getVMState: .pauseSource, .setVMState: .pauseSource, .checkExtension: .pauseSource,
        ]
        switch strategy {
        case .link:
            calls[.linkGuestMemfd] = .handOverMemory
            calls[.mapGuestMemfd] = .handOverMemory  // the plans' files have the mmap flag: the VMM maps its linked file
        case .share: calls[.mapGuestMemfd] = .handOverMemory
        case .copy:
            calls[.createGuestMemfd] = .handOverMemory
            calls[.mapGuestMemfd] = .handOverMemory
            calls[.copyMemory] = .handOverMemory  // the first of its calls: the preparation, before the pause
        case .auto: break
        }
        if confidential {
            calls[.prefault] = .verifyBindings
            calls[.moveEncryptionContext] = .moveEncryptionContext
        }
        return calls
    }
}

/// Kernel calls whose failure is an answer, not a failed step: the probe that the target cannot
/// map guest memory before the move succeeds when the mapping fails, whatever its errno.
let callsThatMayFail: Set<KernelOperation> = [.prefault]

/// Which terminal state a fault that fired must end in: one that fires in a step before the
/// point of no return rolls back; in or after it, the step is tried again and completes.
func expectedState(afterFaultIn step: MigrationStep, confidential: Bool) -> TerminalState {
    let order = MigrationStep.allCases
    let pointOfNoReturn = MigrationMachine.pointOfNoReturn(confidential: confidential)
    return order.firstIndex(of: step)! >= order.firstIndex(of: pointOfNoReturn)! ? .completed : .rolledBack
}

@Suite("Migrations")
struct MigrationTests {
    @Test("demo.yaml on the real kernel with share and copy, verified through the target", arguments: [Strategy.share, .copy])
    func realMigration(_ strategy: Strategy) throws {
        let linux = try Backend.linux.make() as! LinuxKVM
        let journal = try Journal(stateDirectory: temporaryDirectory("gmigrate-state"))
        let run = try InProcessRun.run(
            plan: try loadPlan("demo.yaml", strategy: strategy), planFile: "demo.yaml", strategy: strategy, backend: .linux,
            journal: journal, faults: [], linux: linux)
        #expect(run.summary.state == .completed)
        let verification = try #require(run.verification)
        #expect(verification.passed)
        #expect(verification.counterBefore == UInt32(InProcessRun.guestExits))
        #expect(verification.counterAfter.first == UInt32(InProcessRun.guestExits) + 1)
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
        let run = try InProcessRun.run(
            plan: try loadPlan(plan), planFile: plan, strategy: .link, backend: .model(hostFile: nil), journal: journal, faults: [])
        #expect(run.summary.state == .completed)
        #expect(run.verification?.passed == true)
        #expect(run.verification?.sourceInodes == run.verification?.targetInodes)
        let contents = try Journal.read(path: run.journalPath)
        checkJournal(contents, expect: .completed)
        if plan == "confidential-demo.yaml" {
            // The target was shown unable to map guest memory before the move.
            let verify = contents.entries.outcomes.first { $0.step == .verifyBindings }
            #expect(verify?.details["target-maps-before-move"] == "EPERM")
        }
    }

    /// The runs of the errno matrix: share on the real kernel (default type only: this host
    /// has no confidential type), link and copy on the model, a confidential link on the model.
    static let runs: [(plan: String, strategy: Strategy, backend: Backend)] = [
        ("demo.yaml", .share, .linux), ("demo.yaml", .copy, .model), ("demo.yaml", .link, .model), ("confidential-demo.yaml", .link, .model),
    ]

    /// Every fault point × errno, in this process: a point the run reaches must fire (and the
    /// summary says so), one it does not reach is reported unfired; a fired fault ends in the
    /// right terminal state with the invariants held, and nothing leaks.
    @Test("every fault point with an errno", arguments: FaultPoint.failing, 0..<runs.count)
    func errnoMatrix(_ point: FaultPoint, _ runIndex: Int) throws {
        let (planFile, strategy, backend) = Self.runs[runIndex]
        let plan = try loadPlan(planFile)
        let confidential = plan.vm.type.hasEncryptionContext
        let steps = MigrationMachine.steps(strategy: strategy, confidential: confidential)
        let calls = KernelCalls.made(strategy: strategy, confidential: confidential)
        let step: MigrationStep?
        switch point {
        case .before(let s), .after(let s): step = steps.contains(s) ? s : nil
        case .kernel(let operation): step = calls[operation]
        case .state: step = nil  // not a point of errno faults (FaultPoint.failing leaves it out)
        }
        let spec = FaultSpec(point: point, fault: .errno(Errno(rawValue: 12)))  // ENOMEM
        let journal = try Journal(stateDirectory: temporaryDirectory("gmigrate-state"))
        let linux = backend == .linux ? try Backend.linux.make() as? LinuxKVM : nil
        do {
            let run = try InProcessRun.run(
                plan: plan, planFile: planFile, strategy: strategy, backend: backend == .linux ? .linux : .model(hostFile: nil),
                journal: journal, faults: [spec], linux: linux)
            let contents = try Journal.read(path: run.journalPath)
            let fired = !run.summary.unfiredFaults.contains(spec.description)
            #expect(fired == (step != nil), "\(point) \(step == nil ? "is not on this run's path, yet fired" : "never fired in \(step!)")")
            var expected = step.map { expectedState(afterFaultIn: $0, confidential: confidential) } ?? .completed
            if case .kernel(let operation) = point, callsThatMayFail.contains(operation) { expected = .completed }
            #expect(run.summary.state == expected, "\(run.summary.reason)")
            checkJournal(contents, expect: expected)
            // Exactly one VM holds the memory and runs: the target after completion, else the source.
            let (survivor, other) = expected == .completed ? (run.target, run.source) : (run.source, run.target)
            #expect(survivor.vmHandle != nil && survivor.isRunning)
            #expect(other.vmHandle == nil && !other.isRunning)
            #expect(run.verification?.passed == true, "the guest carries on with its memory")
            if backend == .model, let model = (run.source.backend as? FaultInjectingBackend)?.inner as? KernelModel {
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

/// verify-bindings compares what the target bound with the source's memslots: a target that
/// bound its slot elsewhere (`kernel:set-memslot=alter:gpa`) is caught there, before the pause.
@Suite("Binding check")
struct BindingCheckTests {
    @Test(arguments: [Strategy.share, .copy, .link])
    func aSlotBoundElsewhereIsCaught(_ strategy: Strategy) throws {
        let journal = try Journal(stateDirectory: temporaryDirectory("gmigrate-state"))
        let spec = try FaultSpec(parsing: "kernel:set-memslot=alter:gpa")
        let run = try InProcessRun.run(
            plan: try loadPlan("demo.yaml"), planFile: "demo.yaml", strategy: strategy, backend: .model(hostFile: nil), journal: journal, faults: [spec])
        #expect(!run.summary.unfiredFaults.contains(spec.description), "the fault fired")
        #expect(run.summary.state == .rolledBack, "\(run.summary.reason)")
        let contents = try Journal.read(path: run.journalPath)
        let verify = contents.entries.outcomes.first { $0.step == .verifyBindings && $0.direction == .forward }
        #expect(verify?.ok == false)
        #expect(verify?.error?.contains("slot 0 differs") == true, "\(verify?.error ?? "no verify-bindings outcome")")
        #expect(!contents.entries.outcomes.contains { $0.step == .pauseSource }, "the source was never paused")
        #expect(run.verification?.passed == true, "the source's guest carries on")
    }
}
