import Foundation
import GmigrateTestKit
import GmigrateTestSupport
import Kernel
import Orchestrator
import Plans
import Testing

/// A staged state is read back before any vcpu runs it, also when the read-back comes after
/// the stage's answer (`stage(_:readBack: false)`, as tinyvmm does for a default VM).
@Suite("Staging the state")
struct StagingTests {
    /// A source VM on the model, paused, and an empty target VM whose kernel sets the vcpus'
    /// state as `faults` say.
    static func pair(_ faults: [String], vcpus: Int? = nil) throws -> (state: VMState, target: InProcessVMM) {
        let (state, target, injector) = try pairWithInjector(vcpus: vcpus)
        injector.arm(try faults.map { try FaultSpec(parsing: $0) })
        return (state, target)
    }

    /// Stages `state` into `target` part by part, as tinyvmm takes it from the state channel,
    /// and leaves the read-back for `verifyStaged` or the restore; `before` runs before each vcpu.
    static func stageInParts(_ state: VMState, into target: InProcessVMM, before: (Int) throws -> Void = { _ in }) throws {
        try target.beginStaging(vm: state.vm, vcpus: state.vcpus.count)
        for (index, vcpu) in state.vcpus.enumerated() {
            try before(index)
            try target.stageVCPU(index, vcpu)
        }
        try target.finishStaging(state, readBack: false)
    }

    /// `pair` with no fault armed yet: the test arms them through the injector.
    static func pairWithInjector(vcpus: Int? = nil) throws -> (state: VMState, target: InProcessVMM, injector: FaultInjector) {
        var plan = try loadPlan("demo.yaml")
        if let vcpus { plan.vm.vcpus = vcpus }
        let host = ModelHost()
        let source = InProcessVMM(role: "source", backend: KernelModel(host: host, process: "staging/source"))
        try source.createSource(plan.vm)
        let state = try source.pause()
        let injector = FaultInjector()
        let target = InProcessVMM(role: "target", backend: FaultInjectingBackend(KernelModel(host: host, process: "staging/target"), faults: injector))
        _ = try target.createVM(type: plan.vm.type, vcpus: plan.vm.vcpus)
        return (state, target, injector)
    }

    @Test func aStateThatReadsBackWrongIsNeverRun() throws {
        let (state, target) = try Self.pair(["kernel:set-vcpu-state=alter:xsave*"])
        // Checked and set: the answer comes before the read-back.
        try target.stage(state, readBack: false)
        #expect(!target.isRunning)
        // The restore reads back first, and refuses.
        #expect {
            try target.restore(state)
        } throws: { error in
            (error as? EndpointError)?.message.contains("read back differs: vcpu 0: section fpu") == true
        }
        #expect(!target.isRunning, "no vcpu runs a state that read back different")
        #expect(throws: EndpointError.self) { try target.restoreStaged() }
        #expect(!target.isRunning)
    }

    @Test func theReadBackAfterTheAnswerFindsTheDifference() throws {
        let (state, target) = try Self.pair(["kernel:set-vcpu-state=alter:xsave*"])
        try target.stage(state, readBack: false)
        #expect(throws: EndpointError.self) { try target.verifyStaged() }
        #expect(!target.isRunning)
    }

    @Test func aStateThatReadsBackEqualRuns() throws {
        let (state, target) = try Self.pair([])
        try target.stage(state, readBack: false)
        try target.verifyStaged()
        try target.restoreStaged()
        #expect(target.isRunning)
        // A restore of a state staged and not yet read back reads it back itself, then runs it.
        let (again, other) = try Self.pair([])
        try other.stage(again, readBack: false)
        try other.restore(again)
        #expect(other.isRunning)
    }

    /// Staged part by part, as a target takes it from the state channel: the kernel then holds
    /// the saved state (read with the kernel's own calls), and the target runs it.
    @Test func aStateStagedInPartsIsSetAndRuns() throws {
        let plan = try loadPlan("demo.yaml")
        let host = ModelHost()
        let source = InProcessVMM(role: "source", backend: KernelModel(host: host, process: "parts/source"))
        try source.createSource(plan.vm)
        var sent: [UInt8] = []
        let state = try source.pause(sendingParts: { sent += $0 })
        #expect(sent == state.encoded, "the parts the source sent are the state's encoding")
        let kernel = KernelModel(host: host, process: "parts/target")
        let target = InProcessVMM(role: "target", backend: kernel)
        _ = try target.createVM(type: plan.vm.type, vcpus: plan.vm.vcpus)
        try Self.stageInParts(state, into: target)
        let vm = try #require(target.vmHandle)
        let held = VMState(vm: try kernel.vmState(vm), vcpus: try target.vcpuHandles.map { try kernel.vcpuState($0) })
        #expect(VMState.difference(restored: held, saved: state) == nil)
        try target.restoreStaged()
        #expect(target.isRunning)
    }

    /// A part that fails (here the kernel refuses vcpu 0's set) leaves the VM set in part and
    /// nothing to run; so do parts out of order, and an end before every vcpu came.
    @Test func aStagingInPartsThatFailsLeavesNothingToRun() throws {
        let (state, target) = try Self.pair(["kernel:set-vcpu-state=errno:EIO"])
        try target.beginStaging(vm: state.vm, vcpus: state.vcpus.count)
        #expect(throws: EndpointError.self) { try target.stageVCPU(0, state.vcpus[0]) }
        #expect(throws: EndpointError.self) { try target.finishStaging(state, readBack: true) }
        #expect(throws: EndpointError.self) { try target.restoreStaged() }
        #expect(!target.isRunning)

        let (again, other) = try Self.pair([], vcpus: 2)
        #expect(again.vcpus.count == 2)
        #expect(throws: EndpointError.self) { try other.stageVCPU(0, again.vcpus[0]) }  // no head first
        try other.beginStaging(vm: again.vm, vcpus: again.vcpus.count)
        #expect(throws: EndpointError.self) { try other.stageVCPU(1, again.vcpus[0]) }  // vcpu 1 before vcpu 0
        try other.beginStaging(vm: again.vm, vcpus: again.vcpus.count)
        try other.stageVCPU(0, again.vcpus[0])
        #expect(throws: EndpointError.self) { try other.finishStaging(again, readBack: true) }  // vcpu 1 missing
        #expect(throws: EndpointError.self) { try other.restoreStaged() }
        #expect {
            try other.beginStaging(vm: again.vm, vcpus: again.vcpus.count + 1)
        } throws: { error in
            (error as? EndpointError)?.message.contains("\(again.vcpus.count + 1) vcpu states for \(again.vcpus.count) vcpus") == true
        }
        #expect(!other.isRunning)
    }

    /// A staging in parts that fails replaces the one before it: a state staged earlier is not
    /// run (`restoreStaged`), and a restore that names it sets every section again.
    @Test func aFailedStagingInPartsReplacesTheStagingBefore() throws {
        let (state, target) = try Self.pair([], vcpus: 2)
        try target.stage(state, readBack: false)
        try target.beginStaging(vm: state.vm, vcpus: state.vcpus.count)
        #expect(throws: EndpointError.self) { try target.stageVCPU(1, state.vcpus[1]) }  // vcpu 1 before vcpu 0
        #expect(throws: EndpointError.self) { try target.restoreStaged() }
        #expect(!target.isRunning)
        try target.restore(state)
        #expect(target.isRunning)
    }

    /// A source whose send of a part fails still saves its whole state and is paused: the
    /// failure is thrown, no part goes after it, and a later pause answers the whole state.
    @Test func aPauseWhoseSendFailsIsPausedWithItsWholeState() throws {
        var plan = try loadPlan("demo.yaml")
        plan.vm.vcpus = 2
        let source = InProcessVMM(role: "source", backend: KernelModel(host: ModelHost(), process: "parts/failing"))
        try source.createSource(plan.vm)
        var sent: [[UInt8]] = []
        #expect {
            _ = try source.pause(sendingParts: { part throws(EndpointError) in
                guard sent.count < 2 else { throw EndpointError("the target is gone") }
                sent.append(part)
            })
        } throws: { error in
            (error as? EndpointError)?.message == "the target is gone"
        }
        #expect(sent.count == 2, "the head and vcpu 0 went; nothing after the failure")
        #expect(!source.isRunning)
        let state = try source.pause()
        #expect(state.vcpus.count == 2)
        #expect(sent.flatMap { $0 } == VMState.encodedHead(vm: state.vm, vcpus: 2) + VMState.encoded(state.vcpus[0]))
    }

    /// A state whose parts read back wrong is not run, as a whole one is not.
    @Test func aStateStagedInPartsThatReadsBackWrongIsNeverRun() throws {
        let (state, target) = try Self.pair(["kernel:set-vcpu-state=alter:xsave*"])
        try Self.stageInParts(state, into: target)
        #expect {
            try target.restoreStaged()
        } throws: { error in
            (error as? EndpointError)?.message.contains("read back differs: vcpu 0: section fpu") == true
        }
        #expect(!target.isRunning)
    }

    /// Staged in parts, each vcpu but the last is read back while the next one is set, the
    /// last with the VM's sections: a difference is found in whichever vcpu it is.
    @Test(arguments: 0..<3)
    func aDifferenceInAnyVCPUOfAStagingInPartsIsFound(_ altered: Int) throws {
        let (state, target, injector) = try Self.pairWithInjector(vcpus: 3)
        try Self.stageInParts(state, into: target) { index in
            if index == altered { injector.arm([try FaultSpec(parsing: "kernel:set-vcpu-state=alter:xsave")]) }
        }
        #expect {
            try target.verifyStaged()
        } throws: { error in
            (error as? EndpointError)?.message.contains("read back differs: vcpu \(altered): section fpu") == true
        }
        #expect(throws: EndpointError.self) { try target.restoreStaged() }
        #expect(!target.isRunning)
    }

    /// A vcpu whose read-back fails while the staging goes on fails the read-back, with the
    /// kernel's errno.
    @Test func aReadBackThatFailsBesideTheStagingFailsIt() throws {
        let (state, target, injector) = try Self.pairWithInjector(vcpus: 2)
        injector.arm([try FaultSpec(parsing: "kernel:get-vcpu-state=errno:EIO")])
        try Self.stageInParts(state, into: target)
        #expect {
            try target.verifyStaged()
        } throws: { error in
            (error as? EndpointError)?.errno == Errno(rawValue: EIO)
        }
        #expect(!target.isRunning)
    }

    /// What a staging left behind when it was abandoned (a vcpu read back different) is not
    /// counted against the next staging, which reads back equal and runs.
    @Test func anAbandonedStagingsReadBackIsForgotten() throws {
        let (state, target, injector) = try Self.pairWithInjector(vcpus: 2)
        injector.arm([try FaultSpec(parsing: "kernel:set-vcpu-state=alter:xsave")])
        try target.beginStaging(vm: state.vm, vcpus: state.vcpus.count)
        try target.stageVCPU(0, state.vcpus[0])  // set altered, read back different beside the next
        try Self.stageInParts(state, into: target)
        try target.verifyStaged()
        try target.restoreStaged()
        #expect(target.isRunning)
        #expect(target.firedFaults.map(\.point.description) == ["kernel:set-vcpu-state"])
    }

    /// A target rehearses a staging with its own state before the pause (tinyvmm does at bind):
    /// its VM's state is what it was, and a `kernel:*` fault armed for the migration is still
    /// armed for the staging that follows.
    @Test("a rehearsal changes nothing and leaves armed faults to the migration", arguments: Backend.allCases)
    func aRehearsalChangesNothing(_ backend: Backend) throws {
        let plan = try loadPlan("demo.yaml")
        let kernel = try backend.make()
        let injector = FaultInjector([try FaultSpec(parsing: "kernel:set-vcpu-state=errno:EIO")])
        let target = InProcessVMM(role: "target", backend: FaultInjectingBackend(kernel, faults: injector))
        _ = try target.createVM(type: plan.vm.type, vcpus: plan.vm.vcpus)
        let vm = try #require(target.vmHandle)
        func own() throws -> VMState { VMState(vm: try kernel.vmState(vm), vcpus: try target.vcpuHandles.map { try kernel.vcpuState($0) }) }
        let before = try own()
        try target.rehearseStaging()
        let after = try own()
        #expect(VMState.difference(restored: after, saved: before) == nil)
        // What the comparison leaves out, because time moves it: the guest's clock did not go
        // back, and the TSC offset (the guest's TSC) is the one it had.
        func clock(_ state: VMState) -> UInt64? { state.vm.first { $0.name == "clock" }.map { $0.bytes.loadLE(UInt64.self, at: 0) } }
        func offsets(_ state: VMState) -> [[UInt8]?] { state.vcpus.map { $0["tsc-offset"] } }
        if backend == .linux {
            let (was, now) = (try #require(clock(before)), try #require(clock(after)))
            #expect(now >= was, "the kvmclock went back from \(was) to \(now)")
            #expect(offsets(before).allSatisfy { $0 != nil })
        }
        #expect(offsets(after) == offsets(before))
        #expect(!target.isRunning)
        #expect(target.firedFaults.isEmpty, "the rehearsal fired \(target.firedFaults)")
        #expect(throws: EndpointError.self) { try target.stage(before) }
        #expect(target.firedFaults.map(\.point.description) == ["kernel:set-vcpu-state"])
    }

    /// A source is rehearsed only where its VMM vouches that none of its vcpus ran yet; a VM
    /// that runs keeps its state to itself. The rehearsal takes the kernel under the fault
    /// injector: here a second injector under it fails every set, which makes a rehearsal show.
    @Test func aSourceIsRehearsedOnlyBeforeItsVCPUsRun() throws {
        let plan = try loadPlan("demo.yaml")
        let under = FaultInjector()
        let source = InProcessVMM(role: "source", backend: FaultInjectingBackend(FaultInjectingBackend(KernelModel(), faults: under), faults: FaultInjector()))
        try source.createSource(plan.vm)
        under.arm([try FaultSpec(parsing: "kernel:set-vcpu-state=errno:EIO*")])
        try source.rehearseStaging()
        #expect(under.fired.isEmpty, "a running source was rehearsed")
        #expect(throws: EndpointError.self) { try source.rehearseStaging(vcpusNeverRan: true) }
        #expect(!under.fired.isEmpty)
    }
}
