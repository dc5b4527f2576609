import Foundation
import Journal
import Plans
import Kernel
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The armed faults of one coordinator. Faults are armed only explicitly (`--inject`, or a
/// plan's `spec.faults` with `--allow-faults`): they ship in release builds because users'
/// own test suites use them.
public final class FaultInjector: Sendable {
    /// The exit status of an injected crash.
    public static let crashStatus: Int32 = 86

    /// An injected crash: what was printed reaches its pipe or file, then the process ends at
    /// once, with no other cleanup (`_exit`).
    public static let crash: @Sendable (FaultPoint) -> Void = { _ in
        fflush(nil)
        _exit(FaultInjector.crashStatus)
    }

    private let armed: Mutex<[FaultSpec]>
    /// Ends an injected delay early (a VMM died meanwhile: the migration must react at once).
    private let interruption = Mutex<(@Sendable () -> Bool)?>(nil)

    /// Ends injected delays early while `condition` holds (nil: never). The caller clears it when
    /// its run ends: the condition may hold what holds this injector.
    public func interruptDelays(when condition: (@Sendable () -> Bool)?) {
        interruption.withLock { $0 = condition }
    }
    /// Called right before an injected crash exits (tests of the injector itself replace it).
    private let onCrash: @Sendable (FaultPoint) -> Void

    public init(_ specs: [FaultSpec] = [], onCrash: @escaping @Sendable (FaultPoint) -> Void = FaultInjector.crash) {
        armed = Mutex(specs)
        self.onCrash = onCrash
    }

    public var isEmpty: Bool { armed.withLock { $0.isEmpty } }

    /// Arms more faults (a standalone run arms them once its source VM is set up, so that they
    /// fire in the migration, not in the set-up).
    public func arm(_ specs: [FaultSpec]) {
        armed.withLock { $0.append(contentsOf: specs) }
    }

    /// Disarms every fault (a standalone run does so before it verifies the guest).
    public func disarm() {
        armed.withLock { $0.removeAll() }
    }

    /// The faults still armed (one that fired as many times as it was armed is gone).
    public var remaining: [FaultSpec] { armed.withLock { $0 } }

    private let firedSpecs = Mutex<[FaultSpec]>([])

    /// Every armed fault that fired at least once, as it was armed.
    public var fired: [FaultSpec] { firedSpecs.withLock { $0 } }

    /// Fires the `alter:` fault armed at `point`, if any and if `applies` to it: the piece of
    /// state to break.
    public func alteration(at point: FaultPoint, applies: (StateAlteration) -> Bool = { _ in true }) -> StateAlteration? {
        armed.withLock { specs -> StateAlteration? in
            guard let index = specs.firstIndex(where: { $0.point == point }), case .alter(let alteration) = specs[index].fault,
                applies(alteration)
            else { return nil }
            let spec = specs[index]
            firedSpecs.withLock { if !$0.contains(spec) { $0.append(spec) } }
            if let count = spec.count {
                if count <= 1 { specs.remove(at: index) } else { specs[index].count = count - 1 }
            }
            return alteration
        }
    }

    /// Fires the fault armed at `point`, if any: sleeps, exits, or returns the errno to fail with.
    public func hit(_ point: FaultPoint) -> Errno? {
        let fault = armed.withLock { specs -> Fault? in
            guard let index = specs.firstIndex(where: { spec in
                if case .alter = spec.fault { return false }
                return spec.point == point
            }) else { return nil }
            let spec = specs[index]
            firedSpecs.withLock { if !$0.contains(spec) { $0.append(spec) } }
            if let count = spec.count {
                if count <= 1 { specs.remove(at: index) } else { specs[index].count = count - 1 }
            }
            return spec.fault
        }
        switch fault {
        case nil: return nil
        case .errno(let errno): return errno
        case .crash:
            onCrash(point)
            return nil
        case .alter:
            return nil  // taken by alteration(at:), never here
        case .delay(let duration):
            let end = Date().addingTimeInterval(Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18)
            let interrupted = interruption.withLock { $0 }
            while Date() < end {
                if interrupted?() == true { break }
                Thread.sleep(forTimeInterval: min(0.01, max(0, end.timeIntervalSinceNow)))
            }
            return nil
        }
    }
}

/// Wraps a kernel backend so that every faultable operation passes its `kernel:OP` fault point
/// first: the same points on the real kernel and on the model.
public final class FaultInjectingBackend: KernelBackend {
    public let inner: any KernelBackend
    public let faults: FaultInjector
    /// Whether a VMM saves and sets its vcpus on this kernel one after another, on one thread
    /// (`InProcessVMM` does both on two otherwise): so that a fault's count names one save or
    /// set of one vcpu whatever the threads' timing. A test of the two threads turns it off.
    public let vcpuCallsInOrder: Bool
    public var name: String { inner.name }

    public init(_ inner: any KernelBackend, faults: FaultInjector, vcpuCallsInOrder: Bool = true) {
        self.inner = inner
        self.faults = faults
        self.vcpuCallsInOrder = vcpuCallsInOrder
    }

    private func check(_ operation: KernelOperation) throws(KernelError) {
        if let errno = faults.hit(.kernel(operation)) { throw .failed(operation: operation, errno: errno) }
    }

    public func probe() throws(KernelError) -> HostCapabilities { try inner.probe() }
    public func checkExtension(_ capability: Capability, vm: KernelHandle?) throws(KernelError) -> Int {
        try check(.checkExtension)
        return try inner.checkExtension(capability, vm: vm)
    }
    public func createVM(type: VMType) throws(KernelError) -> KernelHandle {
        try check(.createVM)
        return try inner.createVM(type: type)
    }
    public func createGuestMemfd(vm: KernelHandle, size: UInt64, flags: GuestMemfdFlags) throws(KernelError) -> KernelHandle {
        try check(.createGuestMemfd)
        return try inner.createGuestMemfd(vm: vm, size: size, flags: flags)
    }
    public func setMemslot(vm: KernelHandle, _ region: MemslotRegion) throws(KernelError) {
        try check(.setMemslot)
        var region = region
        // alter:gpa: a slot made (not deleted) one page above where it was asked.
        if region.size > 0, faults.alteration(at: .kernel(.setMemslot), applies: { $0 == .gpa }) != nil {
            region.guestPhysicalAddress &+= 4096
        }
        try inner.setMemslot(vm: vm, region)
    }
    public func mapGuestMemfd(_ file: KernelHandle, offset: UInt64, length: UInt64) throws(KernelError) -> UInt64 {
        try check(.mapGuestMemfd)
        return try inner.mapGuestMemfd(file, offset: offset, length: length)
    }
    public func unmap(address: UInt64, length: UInt64) { inner.unmap(address: address, length: length) }
    public func memslotPlacement(vm: KernelHandle) -> [UInt32: (guestPhysicalAddress: UInt64, size: UInt64)]? {
        inner.memslotPlacement(vm: vm)
    }
    public func readMemory(address: UInt64, count: Int) throws(KernelError) -> [UInt8] {
        try check(.accessMemory)
        return try inner.readMemory(address: address, count: count)
    }
    public func writeMemory(address: UInt64, bytes: [UInt8]) throws(KernelError) {
        try check(.accessMemory)
        try inner.writeMemory(address: address, bytes: bytes)
    }
    public func prepareCopy(from source: KernelHandle, length: UInt64, to address: UInt64) throws(KernelError) -> (sourceAddress: UInt64, populated: UInt64) {
        try check(.copyMemory)
        return try inner.prepareCopy(from: source, length: length, to: address)
    }
    public func copyPopulated(fromMapping sourceAddress: UInt64, length: UInt64, to address: UInt64) throws(KernelError) -> UInt64 {
        try check(.copyMemory)
        return try inner.copyPopulated(fromMapping: sourceAddress, length: length, to: address)
    }
    public func punchHole(_ file: KernelHandle, offset: UInt64, length: UInt64) throws(KernelError) {
        try check(.punchHole)
        try inner.punchHole(file, offset: offset, length: length)
    }
    public func createVCPU(vm: KernelHandle, id: UInt32) throws(KernelError) -> KernelHandle {
        try check(.createVCPU)
        return try inner.createVCPU(vm: vm, id: id)
    }
    public func vcpuState(_ vcpu: KernelHandle) throws(KernelError) -> VCPUState {
        try check(.getVCPUState)
        return try inner.vcpuState(vcpu)
    }
    public func setVCPUState(_ vcpu: KernelHandle, _ state: VCPUState) throws(KernelError) {
        try check(.setVCPUState)
        let alteration = faults.alteration(at: .kernel(.setVCPUState))
        try inner.setVCPUState(vcpu, alteration.map { state.altered(by: $0) } ?? state)
    }
    public func createInterruptControllers(vm: KernelHandle) throws(KernelError) {
        try check(.createInterruptControllers)
        try inner.createInterruptControllers(vm: vm)
    }
    public func supportedCPUID() throws(KernelError) -> [CPUIDEntry] { try inner.supportedCPUID() }
    public func setCPUID(_ vcpu: KernelHandle, _ entries: [CPUIDEntry]) throws(KernelError) {
        try check(.setCPUID)
        try inner.setCPUID(vcpu, entries)
    }
    public func vmState(_ vm: KernelHandle) throws(KernelError) -> [StateSection] {
        try check(.getVMState)
        return try inner.vmState(vm)
    }
    public func vmState(_ vm: KernelHandle, only names: Set<String>) throws(KernelError) -> [StateSection] {
        try check(.getVMState)
        return try inner.vmState(vm, only: names)
    }
    public func setVMState(_ vm: KernelHandle, _ sections: [StateSection]) throws(KernelError) {
        try check(.setVMState)
        let alteration = faults.alteration(at: .kernel(.setVMState)) { VMState.alter(sections, by: $0) != sections }
        try inner.setVMState(vm, alteration.map { VMState.alter(sections, by: $0) } ?? sections)
    }
    public func run(_ vcpu: KernelHandle) throws(KernelError) -> VCPUExit {
        try check(.runVCPU)
        return try inner.run(vcpu)
    }
    public func prefault(_ vcpu: KernelHandle, guestPhysicalAddress: UInt64, size: UInt64) throws(KernelError) {
        try check(.prefault)
        try inner.prefault(vcpu, guestPhysicalAddress: guestPhysicalAddress, size: size)
    }
    public func launch(vm: KernelHandle) throws(KernelError) {
        try check(.launch)
        try inner.launch(vm: vm)
    }
    public func moveEncryptionContext(to destination: KernelHandle, from source: KernelHandle) throws(KernelError) {
        try check(.moveEncryptionContext)
        try inner.moveEncryptionContext(to: destination, from: source)
    }
    public func linkGuestMemfd(_ file: KernelHandle, into vm: KernelHandle, flags: UInt64) throws(KernelError) -> KernelHandle {
        try check(.linkGuestMemfd)
        return try inner.linkGuestMemfd(file, into: vm, flags: flags)
    }
    public func duplicate(_ handle: KernelHandle) throws(KernelError) -> KernelHandle { try inner.duplicate(handle) }
    public func inodeIdentity(_ file: KernelHandle) throws(KernelError) -> InodeIdentity {
        try check(.inodeIdentity)
        return try inner.inodeIdentity(file)
    }
    public func close(_ handle: KernelHandle) { inner.close(handle) }
    public func attemptInAnotherProcess(_ request: ForeignRequest) -> KernelError? { inner.attemptInAnotherProcess(request) }
}
