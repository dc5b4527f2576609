import Foundation
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
    private var savedStates: [VCPUState]? = nil
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

    /// Read past the fault points: a report of the guest, not one of the migration's kernel calls.
    public var guestDetails: [String: String] {
        guard let (slot, _) = slotContaining(InProcessVMM.counterAddress), let mapping = mappings[slot.guestMemfd] else { return [:] }
        let kernel = (backend as? FaultInjectingBackend)?.inner ?? backend
        let offset = slot.offset + (InProcessVMM.counterAddress - slot.guestPhysAddr)
        guard let bytes = try? kernel.readMemory(address: mapping.value.address &+ offset, count: 4) else { return [:] }
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

    /// The guest's counter (4 bytes at `counterAddress`), where guest memory is host-readable.
    public func readCounter() -> UInt32? {
        guard let bytes = try? readGuest(gpa: InProcessVMM.counterAddress, count: 4) else { return nil }
        return UInt32(littleEndianBytes: bytes)
    }

    // MARK: - Standalone source

    /// The guest program: `inc dword [0x2000]; mov eax, [0x2000]; out 0x10, eax; jmp back`,
    /// loaded at 0x1000. Each exit reports the counter, which lives in guest memory at 0x2000.
    public static let counterProgram: [UInt8] = [
        0x66, 0xFF, 0x06, 0x00, 0x20, 0x66, 0xA1, 0x00, 0x20, 0x66, 0xE7, 0x10, 0xEB, 0xF2,
    ]
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
    /// host-writable at 0x1000, the counter program loaded and booted. The VM is running.
    public func createSource(_ spec: VMSpec, program: [UInt8] = InProcessVMM.counterProgram) throws(EndpointError) {
        do {
            try createVM(type: spec.type, vcpus: spec.vcpus)
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
            if canWriteGuest(at: InProcessVMM.programAddress, count: 0x1004) {
                try writeGuest(gpa: InProcessVMM.programAddress, bytes: program)
                try writeGuest(gpa: InProcessVMM.counterAddress, bytes: [0, 0, 0, 0])
                if let boot = vcpus.first {
                    var state = try boot.value.state()
                    state.specialRegisters.setFlatRealMode()
                    state.registers.rip = InProcessVMM.programAddress
                    try boot.value.setState(state)
                }
            }
            isRunning = true
        } catch {
            throw EndpointError.from(error)
        }
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
            memslots: slots.values.map(\.slot).sorted { $0.slot < $1.slot }, nics: nil)
    }

    public func memoryHandle(_ gmem: String) -> KernelHandle? { files[gmem]?.value.handle }

    public func pause() throws(EndpointError) -> [VCPUState] {
        if let savedStates, !isRunning { return savedStates }
        var states: [VCPUState] = []
        do {
            for vcpu in vcpus { states.append(try vcpu.value.state()) }
        } catch {
            throw EndpointError(error)
        }
        savedStates = states
        isRunning = false
        return states
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

    public func createVM(type: VMType, vcpus count: Int) throws(EndpointError) {
        if vm != nil { return }
        do {
            let created = try backend.createVirtualMachine(type: type)
            var made: [Owned<VCPU>] = []
            for id in 0..<UInt32(count) { made.append(Owned(try created.createVCPU(id: id))) }
            self.type = type
            vm = Owned(created)
            vcpus = made
        } catch {
            throw EndpointError(error)
        }
    }

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

    public func bindings() throws(EndpointError) -> [BindingReport] {
        var reports: [BindingReport] = []
        for (slot, strategy) in slots.values.sorted(by: { $0.slot.slot < $1.slot.slot }) {
            guard let inode = gmems[slot.guestMemfd]?.inode else {
                throw EndpointError("\(role): slot \(slot.slot) names '\(slot.guestMemfd)', which this VMM does not hold")
            }
            reports.append(BindingReport(
                slot: slot.slot, guestPhysAddr: slot.guestPhysAddr, size: slot.size, inode: inode, offset: slot.offset,
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

    public func restore(_ states: [VCPUState]) throws(EndpointError) {
        if isRunning { return }
        guard states.count == vcpus.count else {
            throw EndpointError("\(role): \(states.count) vcpu states for \(vcpus.count) vcpus")
        }
        do {
            for (vcpu, state) in zip(vcpus, states) { try vcpu.value.setState(state) }
        } catch {
            throw EndpointError(error)
        }
        savedStates = states
        isRunning = true
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
        slots.removeAll()
        copySources.removeAll()
        mappings.removeAll()
        files.removeAll()
        gmems.removeAll()
        sharedInodes.removeAll()
        vcpus.removeAll()
        vm = nil
        savedStates = nil
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

    public func readGuest(gpa: UInt64, count: Int) throws(EndpointError) -> [UInt8] {
        guard let (slot, _) = slotContaining(gpa), let mapping = mappings[slot.guestMemfd] else {
            throw EndpointError("\(role): gpa 0x\(String(gpa, radix: 16)) is not in host-mapped guest memory")
        }
        do {
            return try mapping.value.read(offset: slot.offset + (gpa - slot.guestPhysAddr), count: count)
        } catch {
            throw EndpointError(error)
        }
    }

    public func writeGuest(gpa: UInt64, bytes: [UInt8]) throws(EndpointError) {
        guard let (slot, _) = slotContaining(gpa), let mapping = mappings[slot.guestMemfd] else {
            throw EndpointError("\(role): gpa 0x\(String(gpa, radix: 16)) is not in host-mapped guest memory")
        }
        do {
            try mapping.value.write(offset: slot.offset + (gpa - slot.guestPhysAddr), bytes: bytes)
        } catch {
            throw EndpointError(error)
        }
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
