import Foundation
import Guests
import Journal
import Kernel
import Plans

/// A VMM living in the coordinator's own process (`vmm: in-process` in a plan): both VMs of a
/// migration in one process, which KVM allows since that process creates them. It drives its
/// VM with the kernel boundary directly, and acts as source or target.
///
/// The guest does not run on a thread here: `runGuest(exits:)` advances it by a number of
/// exits, so a migration's steps see a guest that is stopped between them. (Live guests on
/// their own threads come with out-of-process VMMs.)
public final class InProcessVMM: VMMEndpoint {
    public let role: String
    public let backend: any KernelBackend
    /// Where the VMM's running state is kept so that it outlives a crash (a model host), if anywhere.
    let statusHost: ModelHost?
    /// The simulated process this VMM is on a model host (the owner of its handles there).
    public let process: String

    private var type: VMType = .default
    /// Whether the VM has an encryption context (its point of no return comes before the move,
    /// which ends the source VM).
    public var isConfidential: Bool { type.hasEncryptionContext }
    private var vm: Owned<VirtualMachine>?
    private var vcpus: [Owned<VCPU>] = []
    private var files: [String: Owned<GuestMemfd>] = [:]
    private var mappings: [String: Owned<GuestMapping>] = [:]
    /// For share: the inode of the source file each mapping is on.
    private var sharedInodes: [String: InodeIdentity] = [:]
    /// For copy: the source's file, mapped read-only and faulted in before the pause.
    private var copySources: [String: Owned<GuestMapping>] = [:]
    private var gmems: [String: VMDescription.Gmem] = [:]
    private var slots: [UInt32: (slot: VMDescription.Slot, strategy: Strategy?)] = [:]
    private var saved: VMState? = nil
    /// The state `stage` set into the vcpus (read back equal), which have not run since.
    private var loaded: VMState? = nil
    /// A state `stage(_:readBack: false)` set and has not read back yet (`verifyStaged`).
    private var unverified: VMState? = nil
    /// Saves, sets and reads back vcpus on a second thread inside a blackout.
    private let vcpuWorker = VCPUWorker()
    /// Vcpu 0's CPUID as KVM reports it once this VMM set its CPU model (KVM_SET_CPUID2 at
    /// creation, from KVM_GET_SUPPORTED_CPUID with the vcpu's own APIC ID): what source and
    /// target compare, and what a restored state's CPUID must be (per vcpu, `forVCPU`).
    private var cpuid: [CPUIDEntry] = [] { didSet { strippedModels = [:] } }
    /// Each vcpu's CPU model (`CPUIDEntry.forVCPU` of `cpuid`) without its runtime bits, as
    /// `checkVCPU` compares it, made once.
    private var strippedModels: [Int: [CPUIDEntry]] = [:]
    /// Which guest program this VMM loaded, if it loaded one.
    public private(set) var guest: GuestProgram?
    private var hasReceivedEncryptionContext = false
    public private(set) var isRunning = false {
        didSet { statusHost?.setStatus(process: process, isRunning ? "running" : "stopped") }
    }

    /// - Parameters:
    ///   - statusHost: a model host in which to record whether this VMM runs its VM, so that
    ///     recovery can read it after a crash.
    ///   - process: the simulated process this VMM is (its handles' owner on a model host).
    public init(role: String, backend: any KernelBackend, statusHost: ModelHost? = nil, process: String = "") {
        self.role = role
        self.backend = backend
        self.statusHost = statusHost
        self.process = process
    }

    public var vmHandle: KernelHandle? { vm?.value.handle }

    /// Whether this VMM holds a VM.
    public var holdsVM: Bool { vm != nil }

    public func observe() -> (liveness: JournalEntry.Observation.Liveness, detail: String?) {
        guard vm != nil else { return (.gone, "it holds no VM") }
        return (isRunning ? .running : .stopped, nil)
    }

    /// In-process calls are not bounded.
    public func setTimeout(_ timeout: Duration) {}

    public private(set) var lastTimings: [String: Int64] = [:]
    /// An in-process VMM runs no vcpu threads of its own: the coordinator's instant stands.
    public var guestRunningSince: UInt64? { nil }
    public var guestStoppedAt: UInt64? { nil }

    /// Read past the fault points: a report of the guest, not one of the migration's kernel calls.
    public var guestDetails: [String: String] {
        if let reports = longModeReports() {
            var details: [String: String] = ["violations": "\(reports.reduce(0) { $0 + $1.violations })"]
            for (index, report) in reports.enumerated() { details["vcpu\(index).iterations"] = "\(report.iterations)" }
            return details
        }
        guard case .counter? = guest, let bytes = try? readGuestUnfaulted(gpa: InProcessVMM.counterAddress, count: 4) else { return [:] }
        return ["counter": "\(UInt32(littleEndianBytes: bytes))"]
    }

    public func armFaults(_ specs: [FaultSpec]) throws(EndpointError) {
        guard let injector = (backend as? FaultInjectingBackend)?.faults else {
            throw EndpointError("\(role): this VMM's kernel calls have no fault points (a VMM takes them only when started with --allow-faults)")
        }
        injector.arm(specs)
    }

    public var firedFaults: [FaultSpec] { (backend as? FaultInjectingBackend)?.faults.fired ?? [] }

    /// In-process VMMs drive no tap devices.
    public func nicHandles() -> [KernelHandle] { [] }

    public func receiveNICs(_ nics: [VMDescription.NIC], from handles: [KernelHandle]) throws(EndpointError) {
        guard nics.isEmpty else { throw EndpointError("\(role): an in-process VMM drives no tap devices") }
    }

    /// The vcpus' handles, for a VMM that runs them on its own threads.
    public var vcpuHandles: [KernelHandle] { vcpus.map { $0.value.handle } }

    /// The counter guest's counter (4 bytes at `counterAddress`), where guest memory is host-readable.
    public func readCounter() -> UInt32? {
        guard case .counter? = guest, let bytes = try? readGuestUnfaulted(gpa: InProcessVMM.counterAddress, count: 4) else { return nil }
        return UInt32(littleEndianBytes: bytes)
    }

    // MARK: - Standalone source

    /// The guest program: `inc dword [0x2000]; mov eax, [0x2000]; out 0x10, eax; jmp back`,
    /// loaded at 0x1000. Each exit reports the counter, which lives in guest memory at 0x2000.
    public static let counterProgram: [UInt8] = [
        0x66, 0xFF, 0x06, 0x00, 0x20, 0x66, 0xA1, 0x00, 0x20, 0x66, 0xE7, 0x10, 0xEB, 0xF2,
    ]
    /// Where the counter guest parks every vcpu but the boot one: `hlt; jmp back`. (Under KVM
    /// with an in-kernel irqchip those vcpus wait for INIT/SIPI and never get there.)
    public static let parkProgram: [UInt8] = [0xF4, 0xEB, 0xFD]
    public static let parkAddress: UInt64 = 0x1800
    public static let programAddress: UInt64 = 0x1000
    public static let counterAddress: UInt64 = 0x2000
    public static let counterPort: UInt16 = 0x10

    /// The same loop, reporting only every 4096th increment (for a guest on its own thread):
    /// `inc dword [0x2000]; mov eax, [0x2000]; test eax, 0xfff; jnz back; out 0x10, eax; jmp back`.
    public static let quietCounterProgram: [UInt8] = [
        0x66, 0xFF, 0x06, 0x00, 0x20, 0x66, 0xA1, 0x00, 0x20, 0x66, 0xA9, 0xFF, 0x0F, 0x00, 0x00, 0x75, 0xEF, 0x66, 0xE7,
        0x10, 0xEB, 0xEA,
    ]

    /// Creates the VM a plan describes, with its memory bound and, where guest memory is
    /// host-writable, a guest program loaded and booted: the counter program at 0x1000 (on the
    /// boot vcpu, in real mode), or the long-mode guest (on every vcpu). The VM is running.
    public func createSource(_ spec: VMSpec, guest requested: GuestProgram = .counter) throws(EndpointError) {
        do {
            _ = try createVM(type: spec.type, vcpus: spec.vcpus, guest: nil)
            guard let vm else { throw EndpointError("the source VM was not created") }
            for gmem in spec.guestMemfds {
                let file = try vm.value.createGuestMemfd(size: gmem.size, flags: gmem.flags)
                let inode = try file.inodeIdentity()
                if gmem.flags.contains(.mmap) { mappings[gmem.name] = Owned(try file.map()) }
                files[gmem.name] = Owned(file)
                gmems[gmem.name] = .init(name: gmem.name, size: gmem.size, flags: gmem.flags, inode: inode)
            }
            for slot in spec.memslots {
                let description = VMDescription.Slot(
                    slot: slot.slot, guestPhysAddr: slot.guestPhysAddr, size: slot.size, guestMemfd: slot.guestMemfd,
                    offset: slot.offset)
                try bindGuestMemfd(description, file: slot.guestMemfd)
                slots[slot.slot] = (description, nil)
            }
            if spec.type.hasEncryptionContext { try vm.value.launch() }
            switch requested {
            case .counter(let program):
                if canWriteGuest(at: InProcessVMM.programAddress, count: 0x1004) {
                    try writeGuest(gpa: InProcessVMM.programAddress, bytes: program)
                    try writeGuest(gpa: InProcessVMM.counterAddress, bytes: [0, 0, 0, 0])
                    try writeGuest(gpa: InProcessVMM.parkAddress, bytes: InProcessVMM.parkProgram)
                    for (index, vcpu) in vcpus.enumerated() {
                        var state = try vcpu.value.state().only(VCPUState.bootSections)
                        state.specialRegisters.setFlatRealMode()
                        state.registers.rip = index == 0 ? InProcessVMM.programAddress : InProcessVMM.parkAddress
                        try vcpu.value.setState(state)
                    }
                    guest = requested
                }
            case .longMode:
                guard canWriteGuest(at: 0, count: Int(LongModeGuest.memoryNeeded)) else {
                    throw EndpointError("the long-mode guest needs host-writable guest memory at [0, 2 MiB) (mmap, init-shared)")
                }
                guard vcpus.count <= LongModeGuest.maxVCPUs else { throw EndpointError("the long-mode guest runs on at most \(LongModeGuest.maxVCPUs) vcpus") }
                try writeGuest(gpa: LongModeGuest.loadAddress, bytes: LongModeGuest.image)
                for (index, vcpu) in vcpus.enumerated() {
                    try vcpu.value.setState(LongModeGuest.boot(try vcpu.value.state(), vcpu: index))
                }
                guest = requested
            }
            isRunning = true
        } catch {
            throw EndpointError.from(error)
        }
    }

    /// What the guest recorded, per vcpu (the long-mode guest); nil for another guest.
    public func longModeReports() -> [LongModeGuest.VCPUReport]? {
        guard case .longMode? = guest else { return nil }
        return (0..<vcpus.count).map { index in
            LongModeGuest.VCPUReport(bytes: (try? readGuestUnfaulted(gpa: LongModeGuest.reportAddress(index), count: LongModeGuest.reportBytes)) ?? [])
        }
    }

    /// The guest's identity for the coordinator's checks: its vcpu count and the CPUID this VMM
    /// set (kept, not read back: a vcpu ioctl would wait for a running vcpu to leave KVM_RUN).
    public func identity() throws(EndpointError) -> VMIdentity {
        VMIdentity(vcpus: vcpus.count, cpuid: cpuid)
    }

    /// Whether `[gpa, gpa+count)` lies in one memslot whose memory this process can write.
    public func canWriteGuest(at gpa: UInt64, count: Int) -> Bool {
        guard let (slot, _) = slotContaining(gpa), gpa + UInt64(count) <= slot.guestPhysAddr + slot.size else { return false }
        if let gmem = gmems[slot.guestMemfd] { return gmem.flags.contains(.initShared) && mappings[slot.guestMemfd] != nil }
        return mappings[slot.guestMemfd] != nil
    }

    // MARK: - Source role

    public func describe() throws(EndpointError) -> VMDescription {
        VMDescription(
            type: type, vcpus: vcpus.count, guestMemfds: gmems.values.sorted { $0.name < $1.name },
            memslots: slots.values.map(\.slot).sorted { $0.slot < $1.slot }, nics: nil, cpuid: try identity().cpuid, guest: guest?.name)
    }

    public func memoryHandle(_ gmem: String) -> KernelHandle? { files[gmem]?.value.handle }

    public func pause() throws(EndpointError) -> VMState { try pause(sendingParts: nil) }

    /// `pause`, handing each part of the state's encoding to `send` as soon as it is saved: the
    /// head with the VM's sections, then each vcpu (`VMState.encodedHead`, `encoded(_:)`), so
    /// that a target sets one part while this VMM saves the next. The whole state is saved even
    /// if a `send` fails (the VMM is paused, and the rollback's `resume` is taken); the first
    /// failure is then thrown, and no part is sent after it.
    public func pause(sendingParts send: (([UInt8]) throws(EndpointError) -> Void)?) throws(EndpointError) -> VMState {
        var failure: EndpointError?
        func emit(_ part: @autoclosure () -> [UInt8]) {
            guard let send, failure == nil else { return }
            do { try send(part()) } catch { failure = error }
        }
        let state: VMState
        if let saved, !isRunning {
            state = saved
            emit(VMState.encodedHead(vm: state.vm, vcpus: state.vcpus.count))
            for vcpu in state.vcpus { emit(VMState.encoded(vcpu)) }
        } else {
            guard let vm else { throw EndpointError("\(role): there is no VM to pause") }
            let clock = ContinuousClock()
            let began = clock.now
            do {
                var sections: [StateSection] = []
                let saves = try saveVCPUs(
                    kernel: backend,
                    handedOver: { () throws(KernelError) in
                        sections = try backend.vmState(vm.value.handle)
                        emit(VMState.encodedHead(vm: sections, vcpus: vcpus.count))
                    },
                    each: { emit(VMState.encoded($0)) })
                state = VMState(vm: sections, vcpus: saves)
            } catch {
                throw EndpointError.from(error)
            }
            lastTimings = ["save": (clock.now - began).nanoseconds]
            saved = state
            isRunning = false
        }
        if let failure { throw failure }
        return state
    }

    /// Whether the vcpus' saves and sets on `kernel` stay on one thread: a VM of one vcpu, or a
    /// kernel under a fault injector (a VMM started with --allow-faults, a test), where a
    /// fault's count must name one save or set of one vcpu whatever the threads' timing
    /// (`vcpuCallsInOrder`). The read-backs go on beside the last vcpu's set as before.
    private static func onOneThread(_ kernel: any KernelBackend, vcpus count: Int) -> Bool {
        count < 2 || (kernel as? FaultInjectingBackend)?.vcpuCallsInOrder == true
    }

    /// Saves every vcpu's state (its vcpus stopped): the second half on the worker
    /// (`VCPUWorker`) while this thread saves the first. `handedOver` runs once the worker has
    /// its half (a pause saves the VM's sections then), `each` with every state in vcpu order,
    /// as soon as it and those before it are saved. Nothing is left on the worker when it
    /// returns or throws (the first failure, in vcpu order).
    private func saveVCPUs(
        kernel: any KernelBackend, handedOver: () throws(KernelError) -> Void = {}, each: (VCPUState) -> Void = { _ in }
    ) throws(KernelError) -> [VCPUState] {
        let count = vcpus.count
        let mine = Self.onOneThread(kernel, vcpus: count) ? count : (count + 1) / 2
        vcpuWorker.discard()  // nothing of a staging that failed part-way answers for a save
        for index in mine..<count {
            vcpuWorker.add(.init(index: index, vcpu: vcpus[index].value.handle, work: .save, kernel: kernel, owner: vcpus[index]))
        }
        vcpuWorker.release()
        defer { vcpuWorker.discard() }
        try handedOver()
        var saves: [VCPUState] = []
        for index in 0..<count {
            let state = index < mine ? try kernel.vcpuState(vcpus[index].value.handle) : try vcpuWorker.saved(index)
            each(state)
            saves.append(state)
        }
        return saves
    }

    public func resume() throws(EndpointError) {
        guard vm != nil else { throw EndpointError("\(role): there is no VM to resume") }
        isRunning = true
    }

    public func retire() throws(EndpointError) -> String? {
        isRunning = false
        closeEverything()
        return nil
    }

    // MARK: - Target role

    /// Creates the VM: its in-kernel interrupt controllers (LAPICs, PIC pair, IOAPIC, PIT) before
    /// its vcpus, and each vcpu's CPUID set to this kernel's CPU model (`KVM_GET_SUPPORTED_CPUID`),
    /// as a VMM must before the vcpu runs. Idempotent.
    public func createVM(type: VMType, vcpus count: Int, guest program: String? = nil) throws(EndpointError) -> VMIdentity {
        if vm != nil { return try identity() }
        if let program {
            guard let known = GuestProgram(name: program) else { throw EndpointError("\(role): no guest program '\(program)'") }
            guest = known
        }
        guard count >= 1, count <= InProcessVMM.maxVCPUs, let last = UInt32(exactly: count - 1) else {
            throw EndpointError("\(role): \(count) vcpus (1 to \(InProcessVMM.maxVCPUs))", errno: .invalidArgument)
        }
        do {
            let created = try backend.createVirtualMachine(type: type)
            try backend.createInterruptControllers(vm: created.handle)
            let supported = try backend.supportedCPUID()
            var made: [Owned<VCPU>] = []
            for id in 0...last {
                let vcpu = try created.createVCPU(id: id)
                try backend.setCPUID(vcpu.handle, CPUIDEntry.forVCPU(supported, id: id))
                made.append(Owned(vcpu))
            }
            // The model is what KVM made of it: a host may rewrite what it was given (PVM sets the
            // host's own feature bits in leaf 1), and that is what the guest sees and what moves.
            var effective: [CPUIDEntry] = []
            if let first = made.first, let bytes = try first.value.state()["cpuid"] { effective = CPUIDEntry.list(bytes) }
            self.cpuid = effective.isEmpty ? CPUIDEntry.forVCPU(supported, id: 0) : effective
            self.type = type
            vm = Owned(created)
            vcpus = made
        } catch {
            throw EndpointError(error)
        }
        return try identity()
    }

    /// The most vcpus a VMM of gmigrate creates (KVM_CAP_MAX_VCPUS is far more; no test needs more).
    public static let maxVCPUs = 64

    public func receiveMemory(_ gmem: VMDescription.Gmem, from handle: KernelHandle, strategy: Strategy) throws(EndpointError) -> InodeIdentity {
        if let existing = gmems[gmem.name] { return existing.inode }
        guard let vm else { throw EndpointError("\(role): no VM to receive memory") }
        do {
            switch strategy {
            case .link:
                let linked = try vm.value.link(GuestMemfdReference(handle: handle, backend: backend, gmem: gmem))
                let inode = try linked.inodeIdentity()
                if gmem.flags.contains(.mmap) { mappings[gmem.name] = Owned(try linked.map()) }
                files[gmem.name] = Owned(linked)
                gmems[gmem.name] = .init(name: gmem.name, size: gmem.size, flags: gmem.flags, inode: inode)
                return inode
            case .share:
                let address = try backend.mapGuestMemfd(handle, offset: 0, length: gmem.size)
                mappings[gmem.name] = Owned(GuestMapping(adopting: address, length: gmem.size, backend: backend))
                let inode = try backend.inodeIdentity(handle)
                // The file itself is kept (a handle of this VMM's own), so that this VMM can hand
                // it on when it is the source of the next migration.
                if let own = try? backend.duplicate(handle) {
                    files[gmem.name] = Owned(GuestMemfd(backend: backend, handle: own, size: gmem.size, flags: gmem.flags))
                }
                sharedInodes[gmem.name] = inode
                gmems[gmem.name] = .init(name: gmem.name, size: gmem.size, flags: gmem.flags, inode: inode)
                return inode
            case .copy:
                // The target's own memory, empty: copy-memory fills it once the source is paused.
                // Its page tables, and the source's, are faulted in now, outside the blackout.
                let own = try vm.value.createGuestMemfd(size: gmem.size, flags: gmem.flags)
                let target = try own.map()
                let (sourceAddress, _) = try backend.prepareCopy(from: handle, length: gmem.size, to: target.address)
                copySources[gmem.name] = Owned(GuestMapping(adopting: sourceAddress, length: gmem.size, backend: backend))
                let inode = try own.inodeIdentity()
                mappings[gmem.name] = Owned(target)
                files[gmem.name] = Owned(own)
                gmems[gmem.name] = .init(name: gmem.name, size: gmem.size, flags: gmem.flags, inode: inode)
                return inode
            case .auto:
                throw EndpointError("the strategy must be resolved before memory is handed over")
            }
        } catch {
            throw EndpointError.from(error)
        }
    }

    public func copyMemory(_ gmem: VMDescription.Gmem, from handle: KernelHandle) throws(EndpointError) -> CopyReport {
        guard let target = mappings[gmem.name], files[gmem.name] != nil else {
            throw EndpointError("\(role): no memory of its own for '\(gmem.name)' to copy into (hand-over-memory by copy makes it)")
        }
        let clock = ContinuousClock()
        let started = clock.now
        do {
            if copySources[gmem.name] == nil {
                let (sourceAddress, _) = try backend.prepareCopy(from: handle, length: gmem.size, to: target.value.address)
                copySources[gmem.name] = Owned(GuestMapping(adopting: sourceAddress, length: gmem.size, backend: backend))
            }
            guard let source = copySources[gmem.name] else { throw EndpointError("\(role): no mapping of the source's '\(gmem.name)'") }
            let copied = try backend.copyPopulated(fromMapping: source.value.address, length: gmem.size, to: target.value.address)
            copySources[gmem.name] = nil
            let elapsed = clock.now - started
            return CopyReport(
                bytesTotal: gmem.size, bytesCopied: copied, method: backend.name == "model" ? "model-pages" : "mincore",
                durationNanoseconds: elapsed.components.seconds &* 1_000_000_000 &+ elapsed.components.attoseconds / 1_000_000_000)
        } catch {
            throw EndpointError.from(error)
        }
    }

    public func bind(_ requested: [VMDescription.Slot], strategy: Strategy) throws(EndpointError) {
        for slot in requested where slots[slot.slot] == nil {
            do {
                switch strategy {
                case .share:
                    guard let vm, let mapping = mappings[slot.guestMemfd] else {
                        throw EndpointError("\(role): no mapping of '\(slot.guestMemfd)' to bind slot \(slot.slot)")
                    }
                    try vm.value.setMemslot(
                        slot: slot.slot, guestPhysicalAddress: slot.guestPhysAddr, size: slot.size, mapping: mapping.value,
                        offset: slot.offset)
                default:
                    try bindGuestMemfd(slot, file: slot.guestMemfd)
                }
            } catch {
                throw EndpointError.from(error)
            }
            slots[slot.slot] = (slot, strategy)
        }
    }

    private func bindGuestMemfd(_ slot: VMDescription.Slot, file name: String) throws(KernelError) {
        guard let vm, let file = files[name] else {
            throw .failed(operation: .setMemslot, errno: .badFileDescriptor)
        }
        // Give KVM the host mapping too: where it must emulate, it reads guest memory through it.
        let address = mappings[name].map { $0.value.address &+ slot.offset } ?? 0
        try vm.value.setMemslot(
            slot: slot.slot, guestPhysicalAddress: slot.guestPhysAddr, size: slot.size, file: file.value, offset: slot.offset,
            userspaceAddress: address)
    }

    /// The memslots as bound: where the kernel can say (the model), its own placement of each;
    /// otherwise what the kernel accepted.
    public func bindings() throws(EndpointError) -> [BindingReport] {
        var reports: [BindingReport] = []
        let placement = vm.flatMap { backend.memslotPlacement(vm: $0.value.handle) }
        for (slot, strategy) in slots.values.sorted(by: { $0.slot.slot < $1.slot.slot }) {
            guard let inode = gmems[slot.guestMemfd]?.inode else {
                throw EndpointError("\(role): slot \(slot.slot) names '\(slot.guestMemfd)', which this VMM does not hold")
            }
            let placed = placement.map { $0[slot.slot] ?? (guestPhysicalAddress: UInt64.max, size: 0) }
            reports.append(BindingReport(
                slot: slot.slot, guestPhysAddr: placed?.guestPhysicalAddress ?? slot.guestPhysAddr, size: placed?.size ?? slot.size, inode: inode, offset: slot.offset,
                guestMemfdBacked: strategy != .share))
        }
        return reports
    }

    public func probeGuestMapping(gpa: UInt64) -> KernelError? {
        guard let vcpu = vcpus.first else { return .failed(operation: .prefault, errno: .noSuchDeviceOrAddress) }
        do {
            try vcpu.value.prefault(guestPhysicalAddress: gpa & ~0xfff)
            return nil
        } catch {
            return error
        }
    }

    public func moveEncryptionContext(from source: KernelHandle) throws(EndpointError) {
        // Idempotent: a second move into a VM that has the context would answer EINVAL.
        if hasReceivedEncryptionContext { return }
        guard let vm else { throw EndpointError("\(role): no VM to move the encryption context into") }
        do {
            try backend.moveEncryptionContext(to: vm.value.handle, from: source)
        } catch {
            throw EndpointError(error)
        }
        hasReceivedEncryptionContext = true
    }

    /// Whether this VMM can restore `state`, setting nothing: as many vcpus, every section known,
    /// every capability a section needs present, and each vcpu's CPUID this VMM's CPU model.
    func checkState(_ state: VMState, kernel: (any KernelBackend)? = nil) throws(EndpointError) {
        capabilityAnswers = [:]
        try checkHead(vm: state.vm, vcpus: state.vcpus.count, kernel: kernel)
        for (index, vcpu) in state.vcpus.enumerated() { try checkVCPU(index, vcpu, kernel: kernel) }
    }

    /// `checkState`'s part for the VM's own sections and the vcpu count.
    private func checkHead(vm sections: [StateSection], vcpus count: Int, kernel: (any KernelBackend)?) throws(EndpointError) {
        guard vm != nil else { throw EndpointError("\(role): no VM to restore into") }
        guard count == vcpus.count else {
            throw EndpointError("\(role): \(count) vcpu states for \(vcpus.count) vcpus")
        }
        try checkSections(sections, kernel: kernel)
    }

    /// `checkState`'s part for one vcpu.
    private func checkVCPU(_ index: Int, _ state: VCPUState, kernel: (any KernelBackend)?) throws(EndpointError) {
        try checkSections(state.sections, kernel: kernel)
        // Each vcpu's CPUID must be the CPU model this VMM gave it (the coordinator compared the
        // two VMMs' models before the pause; this is the state's own).
        guard let bytes = state["cpuid"], let id = UInt32(exactly: index) else { return }
        let stripped = strippedModels[index] ?? CPUIDEntry.withoutRuntimeBits(CPUIDEntry.forVCPU(cpuid, id: id))
        strippedModels[index] = stripped
        if CPUIDEntry.sameButRuntimeBits(bytes, stripped) { return }
        if let difference = CPUIDEntry.difference(CPUIDEntry.withoutRuntimeBits(CPUIDEntry.list(bytes)), stripped) {
            throw EndpointError("\(role): cpuid-mismatch: vcpu \(index)'s saved CPUID is not this VMM's CPU model: \(difference)")
        }
    }

    /// What KVM_CHECK_EXTENSION answered for the state being checked (asked once a state, not
    /// once a part).
    private var capabilityAnswers: [Capability: Bool] = [:]

    /// Every section known, every capability one needs present.
    private func checkSections(_ sections: [StateSection], kernel: (any KernelBackend)?) throws(EndpointError) {
        let kernel = kernel ?? backend
        let unknown = Set(sections.filter { $0.kind == nil }.map(\.name))
        guard unknown.isEmpty else {
            throw EndpointError("\(role): the state has sections this VMM does not know: \(unknown.sorted().joined(separator: ", "))")
        }
        let part = VMState(vm: sections, vcpus: [])
        for capability in part.neededCapabilities where capabilityAnswers[capability] == nil {
            do { capabilityAnswers[capability] = try kernel.checkExtension(capability, vm: nil) > 0 } catch { throw EndpointError(error) }
        }
        let missing = part.missingCapabilities { capabilityAnswers[$0] ?? false }
        guard missing.isEmpty else { throw EndpointError("\(role): this host cannot restore the state: " + missing.joined(separator: "; ")) }
    }

    /// Checks `state` (`checkState`), sets it into the VM and its vcpus, and reads it back: a
    /// section that differs from what was saved fails it, naming it. The vcpus do not run: the
    /// restore that follows the point of no return runs them without setting anything again.
    public func stage(_ state: VMState) throws(EndpointError) { try stage(state, readBack: true) }

    /// `readBack: false`: the state is checked and set, and read back later by `verifyStaged`
    /// (which `restore` calls if nothing did before): a VMM answers the coordinator first and
    /// reads back while the coordinator journals, and no vcpu runs before the read-back.
    public func stage(_ state: VMState, readBack: Bool) throws(EndpointError) {
        guard !isRunning else { throw EndpointError("\(role): the VM runs; a state is staged only in a VM that does not") }
        let clock = ContinuousClock()
        let began = clock.now
        try checkState(state)
        let checked = clock.now - began
        try load(state, verify: readBack)
        lastTimings["check"] = checked.nanoseconds
        if !readBack {
            loaded = nil
            unverified = state
        }
    }

    /// A state staged part by part (`beginStaging`): the vcpus it has and the next one due,
    /// and the time its checks and sets took so far.
    private var staging: (vcpus: Int, next: Int, check: Duration, set: Duration)?

    /// Stages a state part by part as it comes (`VMState.StreamDecoder`), so that its sets
    /// overlap the source's saves: checks the VM's sections and the vcpu count, and sets those
    /// sections but the clock. Then `stageVCPU` checks and sets each vcpu in order, and
    /// `finishStaging` sets the clock and reads back, as `stage` does for a whole state. A part
    /// that fails leaves the VM set in part: nothing runs it (`restore` wants a staging that
    /// finished), and the next staging sets every section again.
    public func beginStaging(vm sections: [StateSection], vcpus count: Int) throws(EndpointError) {
        guard !isRunning else { throw EndpointError("\(role): the VM runs; a state is staged only in a VM that does not") }
        try beginStaging(vm: sections, vcpus: count, kernel: backend)
    }

    /// (`rehearseStaging` stages into a source whose vcpus never ran: it counts as running.)
    private func beginStaging(vm sections: [StateSection], vcpus count: Int, kernel: any KernelBackend) throws(EndpointError) {
        staging = nil
        loaded = nil
        unverified = nil
        clockUnset = false
        vcpuWorker.discard()
        capabilityAnswers = [:]
        let clock = ContinuousClock()
        let began = clock.now
        try checkHead(vm: sections, vcpus: count, kernel: kernel)
        let checked = clock.now
        try setHead(sections, kernel: kernel)
        staging = (count, 0, checked - began, clock.now - checked)
    }

    /// One part of a state as it came (`VMState.StreamDecoder`): its head begins the staging
    /// (`beginStaging`), each vcpu goes on with it (`stageVCPU`).
    public func stage(_ part: VMState.StreamDecoder.Part) throws(EndpointError) {
        switch part {
        case .head(let sections, let count): try beginStaging(vm: sections, vcpus: count)
        case .vcpu(let index, let state): try stageVCPU(index, state)
        }
    }

    /// `stage(_:)` on `kernel` (the rehearsal's, under the fault injector).
    private func stage(_ part: VMState.StreamDecoder.Part, kernel: any KernelBackend) throws(EndpointError) {
        switch part {
        case .head(let sections, let count): try beginStaging(vm: sections, vcpus: count, kernel: kernel)
        case .vcpu(let index, let state): try stageVCPU(index, state, kernel: kernel)
        }
    }

    /// The next vcpu of a staging `beginStaging` began: checked and set. It is read back with the
    /// others, by `finishStaging` or `verifyStaged`, once all are set.
    public func stageVCPU(_ index: Int, _ state: VCPUState) throws(EndpointError) { try stageVCPU(index, state, kernel: backend) }

    private func stageVCPU(_ index: Int, _ state: VCPUState, kernel: any KernelBackend) throws(EndpointError) {
        guard let (count, next, check, set) = staging, index == next, index < count else {
            staging = nil
            vcpuWorker.discard()
            throw EndpointError("\(role): vcpu \(index)'s state, out of order in the staging")
        }
        staging = nil
        // A part that fails leaves nothing on the worker (the staging is over).
        var failed = true
        defer { if failed { vcpuWorker.discard() } }
        let clock = ContinuousClock()
        let began = clock.now
        try checkVCPU(index, state, kernel: kernel)
        let checked = clock.now
        guard vcpus.indices.contains(index) else { throw EndpointError("\(role): no vcpu \(index) to restore into") }
        let job = { (work: VCPUWorker.Job.Work) in VCPUWorker.Job(index: index, vcpu: self.vcpus[index].value.handle, work: work, kernel: kernel, owner: self.vcpus[index]) }
        if Self.onOneThread(kernel, vcpus: count) {
            // The last vcpu's part: the source has sent its state and its CPU falls idle, where
            // the vcpus set before are read back while this one is set.
            if index + 1 == count { vcpuWorker.release() }
            try setVCPU(index, state, kernel: kernel)
            // Read back on the worker: those before the last beside the last one's set, the last
            // beside the staging's answer, the clock's set and the VM sections' read-back.
            vcpuWorker.add(job(.readBack(state)))
        } else if index % 2 == 0 && index + 1 < count {
            // Every other vcpu (not the last) is set on the worker, and read back there, while
            // this thread sets the next; the source saved its two halves at once.
            vcpuWorker.add(job(.set(state)))
            vcpuWorker.release()
        } else {
            try setVCPU(index, state, kernel: kernel)
            vcpuWorker.add(job(.readBack(state)))
            vcpuWorker.release()
        }
        failed = false
        staging = (count, next + 1, check + (checked - began), set + (clock.now - checked))
    }

    /// Ends a staging once every vcpu was set: `state` is the whole state its parts made. With
    /// `readBack`, sets the clock and reads back now; else both wait for `verifyStaged`, which
    /// the VMM runs once it has answered (the clock is then set closer to the run, and the
    /// staging's answer waits for nothing but the vcpus' sets).
    public func finishStaging(_ state: VMState, readBack: Bool) throws(EndpointError) {
        try finishStaging(state, readBack: readBack, kernel: backend)
    }

    private func finishStaging(_ state: VMState, readBack: Bool, kernel: any KernelBackend) throws(EndpointError) {
        guard let (count, next, check, set) = staging, next == count, state.vcpus.count == count else {
            staging = nil
            vcpuWorker.discard()
            throw EndpointError("\(role): the staging ended before every vcpu's state was set")
        }
        staging = nil
        let clock = ContinuousClock()
        let began = clock.now
        // The worker's sets, before the clock (KVM's order) and before the staging answers.
        if let (index, error) = vcpuWorker.waitForSets() {
            vcpuWorker.discard()
            let failure = EndpointError.from(error)
            throw EndpointError("\(role): vcpu \(index): \(failure.message)", errno: failure.errno)
        }
        var clockSet = clock.now
        if readBack {
            try setClock(state.vm, kernel: kernel)
            clockSet = clock.now
            try verify(state, kernel: kernel)
        }
        lastTimings = [
            "check": check.nanoseconds, "set": (set + (clockSet - began)).nanoseconds, "restore": (set + (clock.now - began)).nanoseconds,
        ]
        loaded = readBack ? state : nil
        unverified = readBack ? nil : state
        clockUnset = !readBack
    }

    /// Whether the clock of the `unverified` state is still to be set (`verifyStaged` sets it).
    private var clockUnset = false

    /// Goes once through what staging a state does, with this VM's own state before any of its
    /// vcpus ran (a target's at bind, a source's before its guest starts): saved, encoded,
    /// digested, decoded, checked, set back and read back. Nothing changes (what is set is what
    /// was read, and the read-back says so), but every code path and kernel call of saving and
    /// staging has run once in this process, so that the ones inside the blackout pay no
    /// first-time costs (lazy runtime setup, first-touch page faults), which came to several
    /// hundred microseconds of a blackout on this nested host. Armed `kernel:*` faults are not
    /// consumed: they are for the migration's own calls.
    ///
    /// A target is rehearsed while its VM does not run; a source only where the caller vouches
    /// that none of its vcpus ran yet (`vcpusNeverRan`: tinyvmm, before it starts the guest's
    /// threads). A VM with an encryption context is not: its state is the guest's own.
    /// Answers the state it went through (nil where it did not rehearse), for a caller that
    /// rehearses its transport too.
    @discardableResult
    public func rehearseStaging(vcpusNeverRan: Bool = false) throws(EndpointError) -> VMState? {
        guard let vm, !isRunning || vcpusNeverRan, loaded == nil, unverified == nil, !type.hasEncryptionContext else { return nil }
        let kernel = (backend as? FaultInjectingBackend)?.inner ?? backend
        do {
            // As a source sends it (`pause(sendingParts:)`) and a target stages it, part by part.
            let own = VMState(vm: try kernel.vmState(vm.value.handle), vcpus: try saveVCPUs(kernel: kernel))
            var decoder = VMState.StreamDecoder()
            var sent: [UInt8] = []
            for part in [VMState.encodedHead(vm: own.vm, vcpus: own.vcpus.count)] + own.vcpus.map(VMState.encoded) {
                sent += part
                for decoded in try decoder.feed(part) { try stage(decoded, kernel: kernel) }
            }
            _ = VMState.digest(sent)
            guard let decoded = decoder.state else { throw EndpointError("\(role): the state's parts did not make a whole state") }
            try finishStaging(decoded, readBack: true, kernel: kernel)
            loaded = nil
            lastTimings = [:]
            return decoded
        } catch {
            vcpuWorker.discard()
            throw EndpointError("\(role): the rehearsal of a staging: \(EndpointError.from(error).message)")
        }
    }

    /// Reads back the state `stage(_:readBack: false)` set (setting the clock first, where a
    /// staging left it) and compares it with what was saved: a difference fails it, naming the
    /// section and field, and the state is not run.
    public func verifyStaged() throws(EndpointError) {
        guard let state = unverified, let vm else { return }
        unverified = nil
        let clock = ContinuousClock()
        let began = clock.now
        if clockUnset {
            clockUnset = false
            do { try setClock(state.vm, kernel: backend) } catch {
                vcpuWorker.discard()
                throw error
            }
        }
        do {
            try readBack(state, vm: vm.value.handle)
        } catch {
            throw EndpointError.from(error)
        }
        lastTimings = ["read-back": (clock.now - began).nanoseconds]
        loaded = state
    }

    /// Reads the VM's and every vcpu's state back and compares it with `state`: a difference
    /// fails, naming the section and field. A staging read some vcpus back already, as it set
    /// them (`VCPUWorker`); the rest are read now.
    private func readBack(_ state: VMState, vm: KernelHandle, kernel: (any KernelBackend)? = nil) throws {
        let kernel = kernel ?? backend
        let compared = Set(state.vm.map(\.name)).subtracting(VMState.uncomparedVMSections)
        let vmBack: [StateSection]
        do { vmBack = try kernel.vmState(vm, only: compared) } catch {
            vcpuWorker.discard()
            throw error
        }
        let jobs = zip(vcpus, state.vcpus).enumerated().map {
            VCPUWorker.Job(index: $0, vcpu: $1.0.value.handle, work: .readBack($1.1), kernel: kernel, owner: $1.0)
        }
        let outcomes = vcpuWorker.finish(all: jobs)
        if let difference = VMState.difference(restored: VMState(vm: vmBack, vcpus: []), saved: VMState(vm: state.vm, vcpus: [])) {
            throw EndpointError("\(role): the restored state read back differs: \(difference)")
        }
        guard vcpus.count == state.vcpus.count else {
            throw EndpointError("\(role): the restored state read back differs: \(vcpus.count) vcpus read back, \(state.vcpus.count) saved")
        }
        for index in state.vcpus.indices {
            switch outcomes[index] {
            case .equal: continue
            case .differs(let difference): throw EndpointError("\(role): the restored state read back differs: vcpu \(index): \(difference)")
            case .failed(let error): throw error
            case .saved?: throw EndpointError("\(role): vcpu \(index) was saved, not read back")
            case nil: throw EndpointError("\(role): vcpu \(index)'s state was not read back")
            }
        }
    }

    /// Restores a saved state into this VM and runs it: what `stage` set already is not set
    /// again; otherwise the state is checked, set and read back here.
    public func restore(_ state: VMState) throws(EndpointError) { try restore(state, verify: true) }

    public func restoreStaged() throws(EndpointError) {
        if isRunning { return }
        guard let staged = unverified ?? loaded else { throw EndpointError("\(role): no staged state to run") }
        try restore(staged, verify: true)
    }

    /// `verify: false` is the bare floor `tools/bench-blackout` measures against: the same sets,
    /// no check, no read-back.
    public func restore(_ state: VMState, verify: Bool) throws(EndpointError) {
        if isRunning { return }
        guard vm != nil else { throw EndpointError("\(role): no VM to restore into") }
        if unverified == state { try verifyStaged() }
        if loaded != state {
            if verify { try checkState(state) }
            try load(state, verify: verify)
        } else {
            lastTimings = [:]
        }
        saved = state
        loaded = nil
        isRunning = true
    }

    /// Sets a state in KVM's order (the VM's sections but the clock, each vcpu's, the clock
    /// last), then, with `verify`, reads it back and compares.
    private func load(_ state: VMState, verify: Bool, kernel: (any KernelBackend)? = nil) throws(EndpointError) {
        let kernel = kernel ?? backend
        loaded = nil
        unverified = nil
        clockUnset = false
        staging = nil
        vcpuWorker.discard()
        let clock = ContinuousClock()
        let began = clock.now
        try setHead(state.vm, kernel: kernel)
        for (index, vcpuState) in state.vcpus.enumerated() { try setVCPU(index, vcpuState, kernel: kernel) }
        try setClock(state.vm, kernel: kernel)
        let set = clock.now
        if verify { try self.verify(state, kernel: kernel) }
        lastTimings = ["restore": (clock.now - began).nanoseconds, "set": (set - began).nanoseconds]
        loaded = state
    }

    /// The VM's sections but the clock (set last, `setClock`).
    private func setHead(_ sections: [StateSection], kernel: any KernelBackend) throws(EndpointError) {
        guard let vm else { throw EndpointError("\(role): no VM to restore into") }
        do { try kernel.setVMState(vm.value.handle, sections.filter { $0.name != "clock" }) } catch { throw EndpointError.from(error) }
    }

    private func setVCPU(_ index: Int, _ state: VCPUState, kernel: any KernelBackend) throws(EndpointError) {
        guard vcpus.indices.contains(index) else { throw EndpointError("\(role): no vcpu \(index) to restore into") }
        do { try kernel.setVCPUState(vcpus[index].value.handle, state) } catch { throw EndpointError.from(error) }
    }

    private func setClock(_ sections: [StateSection], kernel: any KernelBackend) throws(EndpointError) {
        guard let vm else { throw EndpointError("\(role): no VM to restore into") }
        do { try kernel.setVMState(vm.value.handle, sections.filter { $0.name == "clock" }) } catch { throw EndpointError.from(error) }
    }

    private func verify(_ state: VMState, kernel: any KernelBackend) throws(EndpointError) {
        guard let vm else { throw EndpointError("\(role): no VM to restore into") }
        do { try readBack(state, vm: vm.value.handle, kernel: kernel) } catch { throw EndpointError.from(error) }
    }

    public func unbind(_ requested: [VMDescription.Slot]) throws(EndpointError) {
        for slot in requested where slots[slot.slot] != nil {
            guard let vm else { break }
            do {
                try vm.value.deleteMemslot(slot: slot.slot)
            } catch {
                throw EndpointError("\(role): deleting slot \(slot.slot): \(error)", kernel: error)
            }
            slots[slot.slot] = nil
        }
    }

    public func releaseMemory() throws(EndpointError) {
        copySources.removeAll()
        mappings.removeAll()
        files.removeAll()
        gmems.removeAll()
        sharedInodes.removeAll()
    }

    public func destroy() throws(EndpointError) {
        isRunning = false
        closeEverything()
    }

    private func closeEverything() {
        vcpuWorker.discard()
        slots.removeAll()
        copySources.removeAll()
        mappings.removeAll()
        files.removeAll()
        gmems.removeAll()
        sharedInodes.removeAll()
        vcpus.removeAll()
        vm = nil
        saved = nil
        loaded = nil
        unverified = nil
        hasReceivedEncryptionContext = false
    }

    // MARK: - The guest

    public func runGuest(exits: Int) throws(EndpointError) -> [VCPUExit] {
        guard isRunning, let vcpu = vcpus.first else { throw EndpointError("\(role): the VM is not running") }
        var result: [VCPUExit] = []
        do {
            for _ in 0..<exits {
                let exit = try vcpu.value.run()
                result.append(exit)
                switch exit {
                case .io, .mmio, .interrupted: continue
                default: return result
                }
            }
        } catch {
            throw EndpointError(error)
        }
        return result
    }

    private func slotContaining(_ gpa: UInt64) -> (VMDescription.Slot, Strategy?)? {
        slots.values.first { gpa >= $0.slot.guestPhysAddr && gpa < $0.slot.guestPhysAddr + $0.slot.size }.map { ($0.slot, $0.strategy) }
    }

    /// The mapping and offset of `count` bytes of guest memory at `gpa`, all in one host-mapped
    /// slot; an error for a range that leaves it (or a count out of range), never a trap.
    private func mapped(gpa: UInt64, count: Int) throws(EndpointError) -> (mapping: Owned<GuestMapping>, offset: UInt64) {
        guard let (slot, _) = slotContaining(gpa), let mapping = mappings[slot.guestMemfd] else {
            throw EndpointError("\(role): gpa 0x\(String(gpa, radix: 16)) is not in host-mapped guest memory", errno: .invalidArgument)
        }
        let inSlot = gpa - slot.guestPhysAddr
        guard count >= 0, let length = UInt64(exactly: count), length <= slot.size - inSlot else {
            throw EndpointError(
                "\(role): \(count) bytes at gpa 0x\(String(gpa, radix: 16)) leave slot \(slot.slot) (0x\(String(slot.guestPhysAddr, radix: 16)), \(slot.size) bytes)",
                errno: .invalidArgument)
        }
        let offset = slot.offset + inSlot
        guard offset <= mapping.value.length, length <= mapping.value.length - offset else {
            throw EndpointError("\(role): \(count) bytes at gpa 0x\(String(gpa, radix: 16)) leave the mapping of '\(slot.guestMemfd)'", errno: .invalidArgument)
        }
        return (mapping, offset)
    }

    public func readGuest(gpa: UInt64, count: Int) throws(EndpointError) -> [UInt8] {
        let (mapping, offset) = try mapped(gpa: gpa, count: count)
        do {
            return try mapping.value.read(offset: offset, count: count)
        } catch {
            throw EndpointError(error)
        }
    }

    /// Where guest memory at `gpa` is mapped in this process, if it is.
    public func hostAddress(gpa: UInt64) -> UInt64? {
        guard let (slot, _) = slotContaining(gpa), let mapping = mappings[slot.guestMemfd] else { return nil }
        return mapping.value.address &+ slot.offset &+ (gpa - slot.guestPhysAddr)
    }

    /// Reads guest memory past the fault points: a report of the guest, not a migration's call.
    func readGuestUnfaulted(gpa: UInt64, count: Int) throws(EndpointError) -> [UInt8] {
        let (mapping, offset) = try mapped(gpa: gpa, count: count)
        let kernel = (backend as? FaultInjectingBackend)?.inner ?? backend
        do {
            return try kernel.readMemory(address: mapping.value.address &+ offset, count: count)
        } catch {
            throw EndpointError(error)
        }
    }

    public func writeGuest(gpa: UInt64, bytes: [UInt8]) throws(EndpointError) {
        let (mapping, offset) = try mapped(gpa: gpa, count: bytes.count)
        do {
            try mapping.value.write(offset: offset, bytes: bytes)
        } catch {
            throw EndpointError(error)
        }
    }
}

/// The guest program a VMM runs.
public enum GuestProgram: Hashable, Sendable {
    /// 16-bit real mode, vcpu 0: increments a counter in memory and reports it on port 0x10.
    case counter([UInt8])
    /// 64-bit, every vcpu: `LongModeGuest`.
    case longMode

    public static let counter = GuestProgram.counter(InProcessVMM.counterProgram)

    /// `counter` or `long-mode`: what a source describes and a target is told.
    public var name: String {
        switch self {
        case .counter: "counter"
        case .longMode: "long-mode"
        }
    }

    public init?(name: String) {
        switch name {
        case "counter": self = .counter(InProcessVMM.quietCounterProgram)
        case "long-mode": self = .longMode
        default: return nil
        }
    }
}

/// What a VM is, for the coordinator's checks before the pause: source and target must agree.
public struct VMIdentity: Codable, Equatable, Sendable {
    public var vcpus: Int
    public var cpuid: [CPUIDEntry]
    public init(vcpus: Int, cpuid: [CPUIDEntry]) {
        self.vcpus = vcpus
        self.cpuid = cpuid
    }
}

/// A borrowed view of another VMM's gmem file, for `VirtualMachine.link` (it never closes it).
struct GuestMemfdReference: ~Copyable {
    let handle: KernelHandle
    let backend: any KernelBackend
    let gmem: VMDescription.Gmem
}

extension VirtualMachine {
    /// Links a gmem file this VMM does not own (it stays open; the caller's owner closes it).
    func link(_ reference: borrowing GuestMemfdReference) throws(KernelError) -> GuestMemfd {
        let linked = try backend.linkGuestMemfd(reference.handle, into: handle, flags: 0)
        return GuestMemfd(backend: backend, handle: linked, size: reference.gmem.size, flags: reference.gmem.flags)
    }
}
