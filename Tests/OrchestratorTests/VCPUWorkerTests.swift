import Foundation
import GmigrateTestKit
import GmigrateTestSupport
import Kernel
import Orchestrator
import Plans
import Testing

/// A VMM saves, sets and reads back its vcpus on two threads inside a blackout (`VCPUWorker`):
/// the state is the same as on one, streamed in vcpu order, and a failure on either thread
/// fails the pause or the staging with the kernel's errno, leaving nothing to run.
@Suite("Vcpus on two threads")
struct VCPUWorkerTests {
    /// A paused model source of `vcpus` vcpus (saved on two threads) with the parts its pause
    /// sent, and an empty target whose kernel lets its vcpus be set on two threads.
    static func pair(vcpus: Int) throws
        -> (state: VMState, parts: [[UInt8]], target: InProcessVMM, injector: FaultInjector, kernel: KernelModel)
    {
        var plan = try loadPlan("demo.yaml")
        plan.vm.vcpus = vcpus
        let host = ModelHost()
        let source = InProcessVMM(role: "source", backend: KernelModel(host: host, process: "two-threads/source"))
        try source.createSource(plan.vm)
        var parts: [[UInt8]] = []
        let state = try source.pause(sendingParts: { part throws(EndpointError) in parts.append(part) })
        let injector = FaultInjector()
        let kernel = KernelModel(host: host, process: "two-threads/target")
        let target = InProcessVMM(role: "target", backend: FaultInjectingBackend(kernel, faults: injector, vcpuCallsInOrder: false))
        _ = try target.createVM(type: plan.vm.type, vcpus: vcpus)
        return (state, parts, target, injector, kernel)
    }

    /// Stages each part as it came (every other vcpu set on the worker).
    static func stage(_ parts: [[UInt8]], into target: InProcessVMM) throws -> VMState {
        var decoder = VMState.StreamDecoder()
        for part in parts {
            for decoded in try decoder.feed(part) { try target.stage(decoded) }
        }
        guard let state = decoder.state else { throw EndpointError("the parts made no whole state") }
        try target.finishStaging(state, readBack: false)
        return state
    }

    @Test(arguments: [2, 3, 4])
    func aStateSavedAndSetOnTwoThreadsRunsAsSaved(_ vcpus: Int) throws {
        let (state, parts, target, _, kernel) = try Self.pair(vcpus: vcpus)
        // The parts go in vcpu order, each whole, whichever thread saved it.
        #expect(parts.count == vcpus + 1)
        #expect(parts.flatMap { $0 } == VMState.encodedHead(vm: state.vm, vcpus: vcpus) + state.vcpus.flatMap(VMState.encoded))
        let staged = try Self.stage(parts, into: target)
        #expect(staged == state)
        try target.verifyStaged()
        // Read here, apart from the VMM's own read-back: every vcpu holds what the source saved.
        for (index, handle) in target.vcpuHandles.enumerated() {
            let back = try kernel.vcpuState(handle)
            #expect(VCPUState.difference(restored: back, saved: state.vcpus[index]) == nil, "vcpu \(index)")
        }
        try target.restoreStaged()
        #expect(target.isRunning)
    }

    /// Vcpu 0 is set on the worker: its set fails there (the only set in flight when the fault
    /// fires), the next is set here, and the staging's end reports the worker's failure.
    @Test func aSetThatFailsOnTheWorkerFailsTheStaging() throws {
        let (state, _, target, injector, _) = try Self.pair(vcpus: 2)
        injector.arm([try FaultSpec(parsing: "kernel:set-vcpu-state=errno:EIO")])
        try target.beginStaging(vm: state.vm, vcpus: 2)
        try target.stageVCPU(0, state.vcpus[0])
        #expect(waitUntil { !target.firedFaults.isEmpty }, "the worker set vcpu 0")
        try target.stageVCPU(1, state.vcpus[1])
        #expect {
            try target.finishStaging(state, readBack: false)
        } throws: { error in
            (error as? EndpointError)?.errno == Errno(rawValue: EIO)
        }
        #expect(throws: EndpointError.self) { try target.restoreStaged() }
        #expect(!target.isRunning)
        // Nothing of it is left for the next staging, which runs.
        _ = try Self.stage([VMState.encodedHead(vm: state.vm, vcpus: 2)] + state.vcpus.map(VMState.encoded), into: target)
        try target.verifyStaged()
        try target.restoreStaged()
        #expect(target.isRunning)
    }

    /// A difference set by either thread is found by the read-back, naming its vcpu: vcpu 0 is
    /// set on the worker, vcpu 1 on the staging thread, and the fault is armed while only that
    /// vcpu's set is in flight.
    @Test(arguments: [0, 1])
    func aDifferenceSetOnEitherThreadIsFound(_ altered: Int) throws {
        let (state, _, target, injector, kernel) = try Self.pair(vcpus: 2)
        let first = try #require(target.vcpuHandles.first)
        #expect(VCPUState.difference(restored: try kernel.vcpuState(first), saved: state.vcpus[0]) != nil, "a new vcpu holds another state")
        let alter = try FaultSpec(parsing: "kernel:set-vcpu-state=alter:xsave")
        try target.beginStaging(vm: state.vm, vcpus: 2)
        if altered == 0 { injector.arm([alter]) }
        try target.stageVCPU(0, state.vcpus[0])
        // The worker's set of vcpu 0 has ended: altered or as saved.
        let setOnWorker = waitUntil {
            guard let back = try? kernel.vcpuState(first) else { return false }
            let difference = VCPUState.difference(restored: back, saved: state.vcpus[0])
            return altered == 0 ? difference?.contains("section fpu") == true : difference == nil
        }
        #expect(setOnWorker)
        if altered == 1 { injector.arm([alter]) }
        try target.stageVCPU(1, state.vcpus[1])
        try target.finishStaging(state, readBack: false)
        #expect(target.firedFaults.count == 1)
        #expect {
            try target.verifyStaged()
        } throws: { error in
            (error as? EndpointError)?.message.contains("read back differs: vcpu \(altered): section fpu") == true
        }
        #expect(throws: EndpointError.self) { try target.restoreStaged() }
        #expect(!target.isRunning)
    }

    /// A save that fails, on whichever thread, fails the pause with the kernel's errno; what
    /// was sent before it is the start of the state a later pause saves whole.
    @Test(arguments: ["kernel:get-vcpu-state=errno:EIO", "kernel:get-vcpu-state=errno:EIO*"])
    func aSaveThatFailsFailsThePause(_ fault: String) throws {
        var plan = try loadPlan("demo.yaml")
        plan.vm.vcpus = 2
        let injector = FaultInjector()
        let kernel = KernelModel(host: ModelHost(), process: "two-threads/failing")
        let source = InProcessVMM(role: "source", backend: FaultInjectingBackend(kernel, faults: injector, vcpuCallsInOrder: false))
        try source.createSource(plan.vm)
        injector.arm([try FaultSpec(parsing: fault)])
        var sent: [UInt8] = []
        #expect {
            _ = try source.pause(sendingParts: { part throws(EndpointError) in sent += part })
        } throws: { error in
            (error as? EndpointError)?.errno == Errno(rawValue: EIO)
        }
        injector.disarm()
        let state = try source.pause()
        let whole = VMState.encodedHead(vm: state.vm, vcpus: 2) + state.vcpus.flatMap(VMState.encoded)
        #expect(sent.count < whole.count && Array(whole.prefix(sent.count)) == sent)
    }
}
