import Synchronization

/// An in-process reference model of KVM's guest_memfd, memslot and intra-host migration rules.
///
/// It follows shared/design/kernel.md (the errno of every check, in the kernel's order) and
/// the proposed `KVM_LINK_GUEST_MEMFD` design, and it models what this host lacks: the link,
/// the move of the encryption context, and the confidential VM types (sw-protected, SEV,
/// SEV-ES, SNP, TDX), so that plans for them can be validated and rehearsed.
///
/// ## Object model
/// - An *inode* holds the memory (pages, size, creation flags). A *file* is one VM's view of
///   an inode: it is bound 1:1 to the VM that created (or linked) it and holds that VM's
///   memslot bindings. `link` adds a file on the same inode for another VM; each file has its
///   own bindings, so a page may sit at a different gfn in each VM.
/// - A file pins its VM (a VM lives while its VM handle, a vcpu or a gmem file is open); a
///   mapping pins its file. Pages live while any file of the inode lives, so they outlive the
///   VM that created them.
/// - Punching a hole zeroes the range and zaps it from every VM that maps it through any file
///   of the inode.
/// - A file made by `link` into a VM with an encryption context cannot be mapped by that VM
///   (guest faults answer EPERM — the model's choice; the RFC names no errno) until the move
///   of the encryption context into that VM has completed. VM types without an encryption
///   context have nothing to move: their linked files map at once.
/// - VM and vcpu ioctls from a process other than the VM's creator, or on a VM that is dead
///   after its encryption context moved away, answer EIO.
///
/// ## Fault model
/// The model never fails on its own: every error it returns is a rule of the kernel. Faults
/// for tests are injected above it (the orchestrator's fault points).
///
/// ## Where it is deliberately narrower than KVM
/// - Memory attributes (`KVM_SET_MEMORY_ATTRIBUTES`) are not modelled: a gmem file without
///   `GUEST_MEMFD_FLAG_MMAP` is reached through the slot's host address, as shared memory is.
/// - `run` interprets a small subset of 16-bit real-mode x86 (see `ModelGuest`), enough for
///   the guest programs gmigrate ships; any other instruction is an internal-error exit.
public final class KernelModel: KernelBackend {
    /// The host the model stands for. The defaults are this project's machine kind (kernel
    /// 6.18, Intel, no SMM address space) plus the types and operations that host lacks.
    public struct Options: Sendable {
        public var vmTypes: [VMType] = VMType.allCases
        /// `KVM_CAP_MULTI_ADDRESS_SPACE` (2 with SMM).
        public var addressSpaces: Int = 1
        /// `KVM_USER_MEM_SLOTS` on x86.
        public var memslotsPerAddressSpace: Int = 32764
        public var maxVCPUs: Int = 1024
        public var maxVCPUID: Int = 4096
        /// `kvm_mmu_max_gfn()` as address bits: a memslot ending above `1 << bits` is EINVAL.
        /// 52 (shadow paging's, and this machine kind's); a test gives the real host's probe.
        public var maxGuestPhysicalBits: Int = 52
        public var recommendedVCPUs: Int = 2
        /// Whether SNP VMs may move their context (the proposal: yes; a June 2026 SEV patch refuses it).
        public var allowsSNPMove: Bool = true
        /// Instructions one `run` interprets before it returns `.interrupted` (as a vcpu kicked
        /// by a timer signal would), so that a VMM thread can be stopped between runs.
        public var instructionBudget: Int = 1_000_000
        public init() {}
    }

    public let name = "model"
    public let options: Options
    /// The machine this model kernel runs on (shared by every simulated process on it).
    public let host: ModelHost
    /// The simulated process this view of the model acts as: it holds the handles it opens,
    /// and only it may issue ioctls on the VMs it creates (EIO for any other).
    public let process: String

    /// A model kernel on a host of its own, used by one process.
    public convenience init(options: Options = Options()) {
        self.init(host: ModelHost(), process: "main", options: options)
    }

    /// A view of a shared host, acting as `process`.
    public init(host: ModelHost, process: String, options: Options = Options()) {
        self.options = options
        self.host = host
        self.process = process
    }

    // MARK: - Probe

    public func probe() throws(KernelError) -> HostCapabilities {
        HostCapabilities(
            backend: name,
            apiVersion: 12,
            vmTypes: options.vmTypes.map(\.name),
            guestMemfd: .init(supported: true, flags: GuestMemfdFlags([.mmap, .initShared]).names, flagsRaw: 3),
            userMemoryRegion2: true,
            preFaultMemory: true,
            immediateExit: true,
            link: .init(supported: true, detail: "modelled: KVM_LINK_GUEST_MEMFD as proposed (RFC v2)"),
            moveEncryptionContext: .init(
                supported: true, detail: "modelled: SEV/SEV-ES/SNP/TDX with the identical-bindings check of RFC v2"),
            copyEncryptionContext: .init(supported: false, detail: "not modelled"),
            limits: .init(
                recommendedVCPUs: options.recommendedVCPUs, maxVCPUs: options.maxVCPUs, maxVCPUID: options.maxVCPUID,
                memslots: options.memslotsPerAddressSpace, addressSpaces: options.addressSpaces,
                maxGuestPhysicalBits: options.maxGuestPhysicalBits))
    }

    public func memslotPlacement(vm: KernelHandle) -> [UInt32: (guestPhysicalAddress: UInt64, size: UInt64)]? {
        let process = self.process
        return try? host.transaction { (s: inout ModelState) throws(KernelError) -> [UInt32: (guestPhysicalAddress: UInt64, size: UInt64)] in
            let id = try s.vmForIoctl(vm, caller: process, .setMemslot)
            var placement: [UInt32: (guestPhysicalAddress: UInt64, size: UInt64)] = [:]
            for (slot, memslot) in s.vms[id]?.memslots ?? [:] { placement[slot] = (memslot.baseGFN * 4096, memslot.pages * 4096) }
            return placement
        }
    }

    public func checkExtension(_ capability: Capability, vm: KernelHandle?) throws(KernelError) -> Int {
        try host.transaction { (s: inout ModelState) throws(KernelError) -> Int in
            var type: VMType? = nil
            if let vm {
                let id = try s.vmForIoctl(vm, caller: process, .checkExtension)
                type = s.vms[id]?.type
            }
            switch capability {
            case .userMemory2, .guestMemfd, .immediateExit, .memoryFaultInfo, .preFaultMemory, .extCPUID: return 1
            case .guestMemfdFlags: return Int((type?.supportedGuestMemfdFlags ?? [.mmap, .initShared]).rawValue)
            case .vmTypes: return options.vmTypes.reduce(0) { $0 | (1 << Int($1.rawValue)) }
            case .nrVCPUs: return options.recommendedVCPUs
            case .maxVCPUs: return options.maxVCPUs
            case .maxVCPUID: return options.maxVCPUID
            case .nrMemslots: return options.memslotsPerAddressSpace
            case .multiAddressSpace: return options.addressSpaces
            case .vmMoveEncContextFrom, .vmCopyEncContextFrom: return 1
            case .memoryAttributes: return (type?.hasPrivateMemory ?? true) ? 8 : 0
            default: return 0
            }
        }
    }

    // MARK: - VMs

    public func createVM(type: VMType) throws(KernelError) -> KernelHandle {
        guard options.vmTypes.contains(type) else {
            throw .failed(operation: .createVM, errno: .invalidArgument)
        }
        return host.transaction { s in
            let id = s.newID()
            s.vms[id] = ModelVM(type: type, addressSpaces: type.hasProtectedState ? 1 : options.addressSpaces, creator: process)
            return s.open(.vm(id), owner: process)
        }
    }

    public func createGuestMemfd(vm: KernelHandle, size: UInt64, flags: GuestMemfdFlags) throws(KernelError) -> KernelHandle {
        try host.transaction { (s: inout ModelState) throws(KernelError) -> KernelHandle in
            let vmID = try s.vmForIoctl(vm, caller: process, .createGuestMemfd)
            let type = s.vms[vmID]!.type
            // kvm_gmem_create: unsupported flags, then size (loff_t: >= 2^63 is negative).
            guard flags.rawValue & ~type.supportedGuestMemfdFlags.rawValue == 0 else {
                throw .failed(operation: .createGuestMemfd, errno: .invalidArgument)
            }
            guard size > 0, size < (1 << 63), size % pageSize == 0 else {
                throw .failed(operation: .createGuestMemfd, errno: .invalidArgument)
            }
            let inode = s.newID()
            s.inodes[inode] = ModelInode(number: UInt64(inode), size: size, flags: flags)
            let file = s.newID()
            s.files[file] = ModelFile(vm: vmID, inode: inode, linked: false)
            s.inodes[inode]!.files.insert(file)
            s.vms[vmID]!.files.insert(file)
            return s.open(.file(file), owner: process)
        }
    }

    public func linkGuestMemfd(_ file: KernelHandle, into vm: KernelHandle, flags: UInt64) throws(KernelError) -> KernelHandle {
        try host.transaction { (s: inout ModelState) throws(KernelError) -> KernelHandle in
            let vmID = try s.vmForIoctl(vm, caller: process, .linkGuestMemfd)
            // kvm_gmem_link (RFC v1/v2): flags, then the fd, then "same VM again".
            guard flags == 0 else { throw .failed(operation: .linkGuestMemfd, errno: .invalidArgument) }
            guard case .file(let source) = s.object(file), let sourceFile = s.files[source] else {
                throw .failed(operation: .linkGuestMemfd, errno: .invalidArgument)
            }
            guard sourceFile.vm != vmID else { throw .failed(operation: .linkGuestMemfd, errno: .invalidArgument) }
            let linked = s.newID()
            s.files[linked] = ModelFile(vm: vmID, inode: sourceFile.inode, linked: true)
            s.inodes[sourceFile.inode]!.files.insert(linked)
            s.vms[vmID]!.files.insert(linked)
            return s.open(.file(linked), owner: process)
        }
    }

    public func setMemslot(vm: KernelHandle, _ region: MemslotRegion) throws(KernelError) {
        try host.transaction { (s: inout ModelState) throws(KernelError) in
            let vmID = try s.vmForIoctl(vm, caller: process, .setMemslot)
            try s.setMemslot(vmID, region, options: options)
        }
    }

    // MARK: - Host mappings and memory

    public func mapGuestMemfd(_ file: KernelHandle, offset: UInt64, length: UInt64) throws(KernelError) -> UInt64 {
        try host.transaction { (s: inout ModelState) throws(KernelError) -> UInt64 in
            guard case .file(let fileID) = s.object(file), let modelFile = s.files[fileID] else {
                throw .failed(operation: .mapGuestMemfd, errno: .badFileDescriptor)
            }
            // mmap(2): length 0 and unaligned offsets are refused before the file is asked.
            guard length > 0, offset % pageSize == 0 else { throw .failed(operation: .mapGuestMemfd, errno: .invalidArgument) }
            // kvm_gmem_mmap: ENODEV without GUEST_MEMFD_FLAG_MMAP.
            guard s.inodes[modelFile.inode]!.flags.contains(.mmap) else {
                throw .failed(operation: .mapGuestMemfd, errno: .noSuchDevice)
            }
            let address = s.nextMappingAddress
            let span = (length + pageSize - 1) / pageSize * pageSize
            s.nextMappingAddress += span + pageSize  // a guard page between mappings
            s.mappings[address] = ModelMapping(file: fileID, owner: process, offset: offset, length: length)
            s.files[fileID]!.mappings += 1
            return address
        }
    }

    public func unmap(address: UInt64, length: UInt64) {
        host.transaction { s in
            guard let mapping = s.mappings.removeValue(forKey: address) else { return }
            s.files[mapping.file]?.mappings -= 1
            s.releaseIfUnused(file: mapping.file)
        }
    }

    public func readMemory(address: UInt64, count: Int) throws(KernelError) -> [UInt8] {
        try host.transaction { (s: inout ModelState) throws(KernelError) -> [UInt8] in
            var bytes: [UInt8] = []
            bytes.reserveCapacity(count)
            for index in 0..<UInt64(count) {
                guard let (inode, offset) = s.resolveHostAddress(address + index) else {
                    throw .failed(operation: .accessMemory, errno: .badAddress)
                }
                bytes.append(s.inodes[inode]!.byte(at: offset))
            }
            return bytes
        }
    }

    public func writeMemory(address: UInt64, bytes: [UInt8]) throws(KernelError) {
        try host.transaction { (s: inout ModelState) throws(KernelError) in
            // Resolve every byte first: a failed copy writes nothing the test could observe.
            var targets: [(Int, UInt64)] = []
            for index in 0..<UInt64(bytes.count) {
                guard let target = s.resolveHostAddress(address + index) else {
                    throw .failed(operation: .accessMemory, errno: .badAddress)
                }
                targets.append(target)
            }
            for (index, (inode, offset)) in targets.enumerated() {
                s.inodes[inode]!.setByte(bytes[index], at: offset)
            }
        }
    }

    public func prepareCopy(from source: KernelHandle, length: UInt64, to address: UInt64) throws(KernelError) -> (sourceAddress: UInt64, populated: UInt64) {
        let sourceAddress = try mapGuestMemfd(source, offset: 0, length: length)
        let populated = try host.transaction { (s: inout ModelState) throws(KernelError) -> UInt64 in
            guard let (inode, _) = s.resolveHostAddress(sourceAddress) else { throw .failed(operation: .copyMemory, errno: .badAddress) }
            return UInt64(s.inodes[inode]!.pages.keys.filter { $0 * pageSize < length }.count) * pageSize
        }
        return (sourceAddress, populated)
    }

    public func copyPopulated(fromMapping sourceAddress: UInt64, length: UInt64, to address: UInt64) throws(KernelError) -> UInt64 {
        try host.transaction { (s: inout ModelState) throws(KernelError) -> UInt64 in
            guard let (sourceInode, base) = s.resolveHostAddress(sourceAddress) else { throw .failed(operation: .copyMemory, errno: .badAddress) }
            let first = base / pageSize
            let pages = s.inodes[sourceInode]!.pages.filter { $0.key >= first && ($0.key - first) * pageSize < length }.sorted { $0.key < $1.key }
            // Resolve every target page first: a failed copy writes nothing.
            var targets: [(inode: Int, offset: UInt64, bytes: [UInt8])] = []
            for (index, page) in pages {
                let at = address + (index - first) * pageSize
                guard let (inode, offset) = s.resolveHostAddress(at), s.resolveHostAddress(at + pageSize - 1) != nil else {
                    throw .failed(operation: .copyMemory, errno: .badAddress)
                }
                targets.append((inode, offset, page.bytes))
            }
            for target in targets {
                // Mappings and their offsets are page-aligned: whole pages land on whole pages.
                var page = Page()
                page.bytes = target.bytes
                s.inodes[target.inode]!.pages[target.offset / pageSize] = page
            }
            return UInt64(pages.count) * pageSize
        }
    }

    public func punchHole(_ file: KernelHandle, offset: UInt64, length: UInt64) throws(KernelError) {
        try host.transaction { (s: inout ModelState) throws(KernelError) in
            guard case .file(let fileID) = s.object(file), let modelFile = s.files[fileID] else {
                throw .failed(operation: .punchHole, errno: .badFileDescriptor)
            }
            if let errno = ModelState.punchError(offset: offset, length: length) {
                throw .failed(operation: .punchHole, errno: errno)
            }
            s.punch(inode: modelFile.inode, offset: offset, length: length)
        }
    }

    /// Model handles belong to one simulated process and are not duplicated: the model's VMMs
    /// link (they never share a file they were handed).
    public func duplicate(_ handle: KernelHandle) throws(KernelError) -> KernelHandle {
        throw .unsupported(operation: .inodeIdentity, reason: "the model does not duplicate handles")
    }

    public func inodeIdentity(_ file: KernelHandle) throws(KernelError) -> InodeIdentity {
        try host.transaction { (s: inout ModelState) throws(KernelError) -> InodeIdentity in
            guard case .file(let fileID) = s.object(file), let modelFile = s.files[fileID] else {
                throw .failed(operation: .inodeIdentity, errno: .badFileDescriptor)
            }
            return InodeIdentity(device: ModelState.device, inode: s.inodes[modelFile.inode]!.number)
        }
    }

    // MARK: - vcpus

    public func createVCPU(vm: KernelHandle, id: UInt32) throws(KernelError) -> KernelHandle {
        try host.transaction { (s: inout ModelState) throws(KernelError) -> KernelHandle in
            let vmID = try s.vmForIoctl(vm, caller: process, .createVCPU)
            // kvm_vm_ioctl_create_vcpu: id range, vcpu count, then a duplicate id.
            guard id < UInt32(options.maxVCPUID) else { throw .failed(operation: .createVCPU, errno: .invalidArgument) }
            guard s.vms[vmID]!.vcpus.count < options.maxVCPUs else {
                throw .failed(operation: .createVCPU, errno: .invalidArgument)
            }
            guard s.vms[vmID]!.vcpus[id] == nil else { throw .failed(operation: .createVCPU, errno: .fileExists) }
            s.vms[vmID]!.vcpus[id] = ModelVCPU(state: .reset(isBootProcessor: id == 0))
            s.vms[vmID]!.openVCPUs += 1
            return s.open(.vcpu(vm: vmID, id: id), owner: process)
        }
    }

    public func vcpuState(_ vcpu: KernelHandle) throws(KernelError) -> VCPUState {
        try host.transaction { (s: inout ModelState) throws(KernelError) -> VCPUState in
            let (vmID, id) = try s.vcpuForIoctl(vcpu, caller: process, .getVCPUState)
            return s.vms[vmID]!.vcpus[id]!.state
        }
    }

    /// The sections the model keeps: the architectural registers its interpreter uses, and CPUID.
    static let modelledSections: Set<String> = ["regs", "sregs", "fpu", "cpuid"]

    public func setVCPUState(_ vcpu: KernelHandle, _ newState: VCPUState) throws(KernelError) {
        if let foreign = newState.sections.first(where: { !KernelModel.modelledSections.contains($0.name) }) {
            throw .unsupported(operation: .setVCPUState, reason: "section '\(foreign.name)': the model keeps regs, sregs, fpu and cpuid only")
        }
        try host.transaction { (s: inout ModelState) throws(KernelError) in
            let (vmID, id) = try s.vcpuForIoctl(vcpu, caller: process, .setVCPUState)
            var state = s.vms[vmID]!.vcpus[id]!.state
            for section in newState.sections { state[section.name] = section.bytes }
            s.vms[vmID]!.vcpus[id]!.state = state
        }
    }

    public func createInterruptControllers(vm: KernelHandle) throws(KernelError) {
        try host.transaction { (s: inout ModelState) throws(KernelError) in
            let vmID = try s.vmForIoctl(vm, caller: process, .createInterruptControllers)
            // kvm_arch_vm_ioctl(KVM_CREATE_IRQCHIP): a second one EEXIST, after vcpus EINVAL.
            guard !s.vms[vmID]!.hasInterruptControllers else { throw .failed(operation: .createInterruptControllers, errno: .fileExists) }
            guard s.vms[vmID]!.vcpus.isEmpty else { throw .failed(operation: .createInterruptControllers, errno: .invalidArgument) }
            s.vms[vmID]!.hasInterruptControllers = true
        }
    }

    /// The model's CPU: the vendor leaf and the feature leaf its interpreter honours (none of
    /// them matter to 16-bit real mode, but source and target must agree on them all the same).
    public func supportedCPUID() throws(KernelError) -> [CPUIDEntry] {
        [
            CPUIDEntry(function: 0, index: 0, flags: 0, eax: 1, ebx: 0x6c65_646f, ecx: 0x2020_2020, edx: 0x6d20_6b67),  // "gkmodel"
            CPUIDEntry(function: 1, index: 0, flags: 0, eax: 0x600, ebx: 0, ecx: 0, edx: 0x1),  // fpu
        ]
    }

    public func setCPUID(_ vcpu: KernelHandle, _ entries: [CPUIDEntry]) throws(KernelError) {
        try host.transaction { (s: inout ModelState) throws(KernelError) in
            let (vmID, id) = try s.vcpuForIoctl(vcpu, caller: process, .setCPUID)
            s.vms[vmID]!.vcpus[id]!.state["cpuid"] = CPUIDEntry.bytes(entries)
        }
    }

    /// The model keeps no irqchip, PIT or clock state.
    public func vmState(_ vm: KernelHandle) throws(KernelError) -> [StateSection] {
        try host.transaction { (s: inout ModelState) throws(KernelError) -> [StateSection] in
            _ = try s.vmForIoctl(vm, caller: process, .getVMState)
            return []
        }
    }

    public func setVMState(_ vm: KernelHandle, _ sections: [StateSection]) throws(KernelError) {
        if let section = sections.first {
            throw .unsupported(operation: .setVMState, reason: "section '\(section.name)': the model keeps no irqchip, PIT or clock state")
        }
        try host.transaction { (s: inout ModelState) throws(KernelError) in _ = try s.vmForIoctl(vm, caller: process, .setVMState) }
    }

    public func run(_ vcpu: KernelHandle) throws(KernelError) -> VCPUExit {
        try host.transaction { (s: inout ModelState) throws(KernelError) -> VCPUExit in
            let (vmID, id) = try s.vcpuForIoctl(vcpu, caller: process, .runVCPU)
            var machine = ModelGuest(state: s.vms[vmID]!.vcpus[id]!.state)
            machine.budget = options.instructionBudget
            let exit = machine.run { access in s.guestAccess(vmID, access) }
            s.vms[vmID]!.vcpus[id]!.state = machine.state
            return exit
        }
    }

    public func prefault(_ vcpu: KernelHandle, guestPhysicalAddress: UInt64, size: UInt64) throws(KernelError) {
        try host.transaction { (s: inout ModelState) throws(KernelError) in
            let (vmID, _) = try s.vcpuForIoctl(vcpu, caller: process, .prefault)
            // kvm_vcpu_pre_fault_memory: alignment and a non-empty, non-wrapping range.
            guard guestPhysicalAddress % pageSize == 0, size % pageSize == 0, size > 0,
                guestPhysicalAddress &+ size > guestPhysicalAddress
            else { throw .failed(operation: .prefault, errno: .invalidArgument) }
            var gpa = guestPhysicalAddress
            while gpa < guestPhysicalAddress + size {
                try s.mapGuestPage(vmID, gpa: gpa, operation: .prefault)
                gpa += pageSize
            }
        }
    }

    // MARK: - Confidential VMs

    public func launch(vm: KernelHandle) throws(KernelError) {
        try host.transaction { (s: inout ModelState) throws(KernelError) in
            let vmID = try s.vmForIoctl(vm, caller: process, .launch)
            let model = s.vms[vmID]!
            // KVM_MEMORY_ENCRYPT_OP: no vendor op for this VM (vmx without a TD) → ENOTTY.
            guard model.type.hasEncryptionContext else { throw .failed(operation: .launch, errno: .inappropriateIOCTLForDevice) }
            // SEV_INIT twice / a TD finalized twice → EINVAL.
            guard !model.hasEncryptionContext else { throw .failed(operation: .launch, errno: .invalidArgument) }
            s.vms[vmID]!.hasEncryptionContext = true
        }
    }

    public func moveEncryptionContext(to destination: KernelHandle, from source: KernelHandle) throws(KernelError) {
        try host.transaction { (s: inout ModelState) throws(KernelError) in
            let dstID = try s.vmForIoctl(destination, caller: process, .moveEncryptionContext)
            // sev_vm_move_enc_context_from (kernel.md §3.1), with the RFC v2 bindings check.
            guard case .vm(let srcID) = s.object(source) else {
                throw .failed(operation: .moveEncryptionContext, errno: .badFileDescriptor)
            }
            let invalid = KernelError.failed(operation: .moveEncryptionContext, errno: .invalidArgument)
            guard srcID != dstID, let dst = s.vms[dstID], let src = s.vms[srcID] else { throw invalid }
            guard dst.type == src.type, dst.type.hasEncryptionContext else { throw invalid }
            guard !dst.hasEncryptionContext, src.hasEncryptionContext else { throw invalid }
            if dst.type == .snp && !options.allowsSNPMove { throw invalid }
            if dst.type.hasProtectedState && dst.vcpus.count != src.vcpus.count { throw invalid }
            guard s.bindingsMatch(dstID, srcID) else { throw invalid }
            s.vms[dstID]!.hasEncryptionContext = true
            s.vms[dstID]!.receivedEncryptionContext = true
            s.vms[srcID]!.hasEncryptionContext = false
            s.vms[srcID]!.dead = true
        }
    }

    // MARK: - Lifetime and processes

    public func close(_ handle: KernelHandle) {
        host.transaction { s in s.close(handle) }
    }

    public func attemptInAnotherProcess(_ request: ForeignRequest) -> KernelError? {
        host.transaction { s in
            // kvm_vm_ioctl / kvm_vcpu_ioctl: kvm->mm != current->mm → EIO; guest_memfd.c has no
            // mm check, so fallocate on a passed gmem fd works from anywhere.
            switch request {
            case .checkExtension(let vm, _):
                return s.object(vm) == nil ? .failed(operation: .checkExtension, errno: .badFileDescriptor)
                    : .failed(operation: .checkExtension, errno: .ioError)
            case .createGuestMemfd(let vm, _, _):
                return s.object(vm) == nil ? .failed(operation: .createGuestMemfd, errno: .badFileDescriptor)
                    : .failed(operation: .createGuestMemfd, errno: .ioError)
            case .createVCPU(let vm, _):
                return s.object(vm) == nil ? .failed(operation: .createVCPU, errno: .badFileDescriptor)
                    : .failed(operation: .createVCPU, errno: .ioError)
            case .punchHole(let file, let offset, let length):
                guard case .file(let fileID) = s.object(file), let modelFile = s.files[fileID] else {
                    return .failed(operation: .punchHole, errno: .badFileDescriptor)
                }
                if let errno = ModelState.punchError(offset: offset, length: length) {
                    return .failed(operation: .punchHole, errno: errno)
                }
                s.punch(inode: modelFile.inode, offset: offset, length: length)
                return nil
            }
        }
    }

    // MARK: - Introspection for tests (what the real kernel does not show userspace)

    /// The guest frame numbers a VM currently maps (its SPTEs), for tests of zapping.
    public func mappedFrames(vm: KernelHandle) -> Set<UInt64> {
        host.transaction { s in
            guard case .vm(let id) = s.object(vm) else { return [] }
            return s.vms[id]?.mappedFrames ?? []
        }
    }

    /// How many inodes hold memory (a leak check: zero once every file is closed).
    public var liveInodeCount: Int { host.liveInodeCount }

    /// How many VMs exist (not yet destroyed).
    public var liveVMCount: Int { host.transaction { $0.vms.count } }

    /// Whether a VM is dead (its encryption context moved away).
    public func isDead(vm: KernelHandle) -> Bool {
        host.transaction { s in
            guard case .vm(let id) = s.object(vm) else { return false }
            return s.vms[id]?.dead ?? false
        }
    }
}

let pageSize: UInt64 = 4096
