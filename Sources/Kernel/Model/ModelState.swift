import Foundation

/// The model's whole state: a plain value, changed only under the model's lock.
struct ModelState: Codable {
    /// The `st_dev` the model reports for gmem inodes (anonymous inodes share one device).
    static let device: UInt64 = 0x0f
    /// x86-64 `TASK_SIZE_MAX` with 4-level paging: `access_ok` refuses addresses above it.
    static let taskSizeMax: UInt64 = (1 << 47) - pageSize
    /// `KVM_MEM_MAX_NR_PAGES`.
    static let maxPagesPerSlot: UInt64 = (1 << 31) - 1

    var nextID = 1
    var nextHandle: Int32 = 1000
    var handles: [Int32: ModelHandle] = [:]
    var vms: [Int: ModelVM] = [:]
    var files: [Int: ModelFile] = [:]
    var inodes: [Int: ModelInode] = [:]
    var mappings: [UInt64: ModelMapping] = [:]
    var nextMappingAddress: UInt64 = 0x7e00_0000_0000
    /// What simulated processes record of themselves (see `ModelHost.setStatus`).
    var processStatus: [String: String] = [:]

    mutating func newID() -> Int {
        defer { nextID += 1 }
        return nextID
    }

    mutating func open(_ object: ModelObject, owner: String) -> KernelHandle {
        defer { nextHandle += 1 }
        handles[nextHandle] = ModelHandle(object: object, owner: owner)
        return KernelHandle(raw: nextHandle)
    }

    /// What a handle names, if it is open.
    func object(_ handle: KernelHandle) -> ModelObject? { handles[handle.raw]?.object }

    // MARK: ioctl entry checks

    /// kvm_vm_ioctl: a VM fd, from its creator's process (kvm->mm), on a VM that is not dead.
    func vmForIoctl(_ handle: KernelHandle, caller: String, _ operation: KernelOperation) throws(KernelError) -> Int {
        guard let object = object(handle) else { throw .failed(operation: operation, errno: .badFileDescriptor) }
        guard case .vm(let id) = object, let vm = vms[id] else {
            throw .failed(operation: operation, errno: .inappropriateIOCTLForDevice)
        }
        guard vm.creator == caller, !vm.dead else { throw .failed(operation: operation, errno: .ioError) }
        return id
    }

    /// kvm_vcpu_ioctl: same checks on the vcpu's VM.
    func vcpuForIoctl(_ handle: KernelHandle, caller: String, _ operation: KernelOperation) throws(KernelError) -> (Int, UInt32) {
        guard let object = object(handle) else { throw .failed(operation: operation, errno: .badFileDescriptor) }
        guard case .vcpu(let vmID, let id) = object, let vm = vms[vmID] else {
            throw .failed(operation: operation, errno: .inappropriateIOCTLForDevice)
        }
        guard vm.creator == caller, !vm.dead else { throw .failed(operation: operation, errno: .ioError) }
        return (vmID, id)
    }

    // MARK: memslots (kvm_set_memory_region, kvm_gmem_bind)

    mutating func setMemslot(_ vmID: Int, _ region: MemslotRegion, options: KernelModel.Options) throws(KernelError) {
        func invalid() -> KernelError { .failed(operation: .setMemslot, errno: .invalidArgument) }
        let vm = vms[vmID]!
        let id = region.slot & 0xffff
        let addressSpace = region.slot >> 16
        let flags = region.flags
        // kvm_vm_ioctl_set_memory_region: (u16)slot >= KVM_USER_MEM_SLOTS.
        guard id < UInt32(options.memslotsPerAddressSpace) else { throw invalid() }
        // check_memory_region_flags (6.18).
        var valid: MemslotFlags = [.logDirtyPages, .guestMemfd]
        if flags.contains(.guestMemfd) { valid.remove(.logDirtyPages) }
        if !vm.type.hasProtectedState && !flags.contains(.guestMemfd) { valid.insert(.readonly) }
        guard flags.rawValue & ~valid.rawValue == 0 else { throw invalid() }
        // General sanity checks.
        guard region.size % pageSize == 0, region.guestPhysicalAddress % pageSize == 0 else { throw invalid() }
        let (userEnd, userOverflow) = region.userspaceAddress.addingReportingOverflow(region.size)
        guard region.userspaceAddress % pageSize == 0, !userOverflow, userEnd <= ModelState.taskSizeMax else {
            throw invalid()
        }
        if flags.contains(.guestMemfd) {
            guard region.guestMemfdOffset % pageSize == 0,
                !region.guestMemfdOffset.addingReportingOverflow(region.size).overflow
            else { throw invalid() }
        }
        guard addressSpace < UInt32(vm.addressSpaces) else { throw invalid() }
        guard !region.guestPhysicalAddress.addingReportingOverflow(region.size).overflow else { throw invalid() }
        let pages = region.size / pageSize
        guard pages <= ModelState.maxPagesPerSlot else { throw invalid() }
        // kvm_arch_prepare_memory_region (x86): the slot's last frame above kvm_mmu_max_gfn().
        if region.size > 0, options.maxGuestPhysicalBits < 64 {
            let maxGFN = (UInt64(1) << UInt64(max(12, options.maxGuestPhysicalBits) - 12)) - 1
            guard (region.guestPhysicalAddress + region.size) / pageSize - 1 <= maxGFN else { throw invalid() }
        }

        let baseGFN = region.guestPhysicalAddress / pageSize
        if region.size == 0 {
            guard vm.memslots[region.slot] != nil else { throw invalid() }
            zapFrames(vmID, slot: region.slot)
            vms[vmID]!.memslots[region.slot] = nil
            return
        }
        var isMove = false
        if let old = vm.memslots[region.slot] {
            // Private memslots are immutable, they can only be deleted.
            guard !flags.contains(.guestMemfd) else { throw invalid() }
            guard region.userspaceAddress == old.userspaceAddress, pages == old.pages,
                (flags.rawValue ^ old.flags.rawValue) & (MemslotFlags.readonly.rawValue | MemslotFlags.guestMemfd.rawValue) == 0
            else { throw invalid() }
            if baseGFN != old.baseGFN {
                isMove = true
            } else if flags != old.flags {
                vms[vmID]!.memslots[region.slot]!.flags = flags
                return
            } else {
                return
            }
        }
        // CREATE or MOVE: the gpa range must not overlap another slot of this address space.
        for (key, other) in vm.memslots where key != region.slot && key >> 16 == addressSpace {
            if baseGFN < other.baseGFN + other.pages && other.baseGFN < baseGFN + pages {
                throw .failed(operation: .setMemslot, errno: .fileExists)
            }
        }
        if isMove {
            zapFrames(vmID, slot: region.slot)
            vms[vmID]!.memslots[region.slot]!.baseGFN = baseGFN
            return
        }
        var slot = ModelMemslot(
            baseGFN: baseGFN, pages: pages, flags: flags, userspaceAddress: region.userspaceAddress, file: nil, pgoff: 0)
        if flags.contains(.guestMemfd) {
            // kvm_gmem_bind: EBADF, not a gmem file, another VM's file, range, binding overlap.
            guard let handle = region.guestMemfd, let object = object(handle) else {
                throw .failed(operation: .setMemslot, errno: .badFileDescriptor)
            }
            guard case .file(let fileID) = object, let file = files[fileID] else { throw invalid() }
            guard file.vm == vmID else { throw invalid() }
            let inode = inodes[file.inode]!
            guard region.guestMemfdOffset + region.size <= inode.size else { throw invalid() }
            let pgoff = region.guestMemfdOffset / pageSize
            for other in vm.memslots.values where other.file == fileID {
                if pgoff < other.pgoff + other.pages && other.pgoff < pgoff + pages { throw invalid() }
            }
            slot.file = fileID
            slot.pgoff = pgoff
        }
        vms[vmID]!.memslots[region.slot] = slot
    }

    /// Zaps (forgets the mappings of) every frame of one slot.
    mutating func zapFrames(_ vmID: Int, slot key: UInt32) {
        guard let slot = vms[vmID]?.memslots[key], key >> 16 == 0 else { return }
        vms[vmID]!.mappedFrames = vms[vmID]!.mappedFrames.filter { $0 < slot.baseGFN || $0 >= slot.baseGFN + slot.pages }
    }

    /// RFC v2 `memslot_configurations_match`: address space 0 of both VMs has the same slots,
    /// with equal base gfn, size and flags, and gmem slots on the same inode at the same offset.
    func bindingsMatch(_ a: Int, _ b: Int) -> Bool {
        let left = vms[a]!.memslots.filter { $0.key >> 16 == 0 }
        let right = vms[b]!.memslots.filter { $0.key >> 16 == 0 }
        guard Set(left.keys) == Set(right.keys) else { return false }
        for (key, slot) in left {
            let other = right[key]!
            guard slot.baseGFN == other.baseGFN, slot.pages == other.pages, slot.flags == other.flags else { return false }
            if slot.flags.contains(.guestMemfd) {
                guard slot.pgoff == other.pgoff, let f = slot.file, let g = other.file,
                    files[f]?.inode == files[g]?.inode
                else { return false }
            }
        }
        return true
    }

    // MARK: memory

    /// The inode and offset behind a host address, or nil where an access would fault
    /// (no mapping: SIGSEGV; beyond EOF or a file without INIT_SHARED: SIGBUS).
    func resolveHostAddress(_ address: UInt64) -> (Int, UInt64)? {
        for (base, mapping) in mappings where address >= base && address < base + mapping.length {
            guard let file = files[mapping.file], let inode = inodes[file.inode] else { return nil }
            let offset = mapping.offset + (address - base)
            guard offset < inode.size, inode.flags.contains(.initShared) else { return nil }
            return (file.inode, offset)
        }
        return nil
    }

    enum GuestTarget {
        case memory(inode: Int, offset: UInt64)
        case noSlot
        case fault(Errno)
    }

    /// Where a guest access to `gpa` lands in VM `vmID` (address space 0), by KVM's fault path.
    func resolveGuest(_ vmID: Int, gpa: UInt64) -> GuestTarget {
        let vm = vms[vmID]!
        let gfn = gpa / pageSize
        guard let slot = vm.memslots.first(where: { $0.key >> 16 == 0 && gfn >= $0.value.baseGFN && gfn < $0.value.baseGFN + $0.value.pages })?.value
        else { return .noSlot }
        let delta = gpa - slot.baseGFN * pageSize
        if slot.flags.contains(.guestMemfd) {
            // kvm_gmem_get_pfn: the file is gone (closed) → EFAULT.
            guard let fileID = slot.file, let file = files[fileID], let inode = inodes[file.inode] else {
                return .fault(.badAddress)
            }
            // The model's migration rule: a linked file maps nothing before the move.
            if file.linked && vm.type.hasEncryptionContext && !vm.receivedEncryptionContext {
                return .fault(.notPermitted)
            }
            // With GUEST_MEMFD_FLAG_MMAP the slot is gmem-only; otherwise shared memory comes from the hva.
            if inode.flags.contains(.mmap) || vm.type.hasPrivateMemory {
                return .memory(inode: file.inode, offset: slot.pgoff * pageSize + delta)
            }
        }
        guard let (inode, offset) = resolveHostAddress(slot.userspaceAddress + delta) else { return .fault(.badAddress) }
        return .memory(inode: inode, offset: offset)
    }

    /// Maps one guest page into the VM, as a guest access (or KVM_PRE_FAULT_MEMORY) would.
    mutating func mapGuestPage(_ vmID: Int, gpa: UInt64, operation: KernelOperation) throws(KernelError) {
        switch resolveGuest(vmID, gpa: gpa) {
        case .memory: vms[vmID]!.mappedFrames.insert(gpa / pageSize)
        // kvm_tdp_map_page: no memslot means emulated MMIO → ENOENT.
        case .noSlot: throw .failed(operation: operation, errno: .noSuchFileOrDirectory)
        case .fault(let errno): throw .failed(operation: operation, errno: errno)
        }
    }

    /// One guest memory access for the interpreter.
    mutating func guestAccess(_ vmID: Int, _ access: ModelGuest.Access) -> ModelGuest.AccessResult {
        let gpa: UInt64
        let count: Int
        switch access {
        case .read(let address, let length): (gpa, count) = (address, length)
        case .write(let address, let bytes): (gpa, count) = (address, bytes.count)
        }
        var targets: [(Int, UInt64)] = []
        for index in 0..<UInt64(count) {
            switch resolveGuest(vmID, gpa: gpa + index) {
            case .memory(let inode, let offset): targets.append((inode, offset))
            case .noSlot: return .mmio
            case .fault: return .fault(gpa: (gpa + index) / pageSize * pageSize)
            }
            vms[vmID]!.mappedFrames.insert((gpa + index) / pageSize)
        }
        switch access {
        case .read: return .memory(targets.map { inodes[$0.0]!.byte(at: $0.1) })
        case .write(_, let bytes):
            for (index, (inode, offset)) in targets.enumerated() { inodes[inode]!.setByte(bytes[index], at: offset) }
            return .memory([])
        }
    }

    /// The checks of fallocate(PUNCH_HOLE | KEEP_SIZE) on a gmem file, in the kernel's order.
    static func punchError(offset: UInt64, length: UInt64) -> Errno? {
        // vfs_fallocate: offset < 0 || len <= 0 → EINVAL; offset + len beyond s_maxbytes → EFBIG.
        let signedOffset = Int64(bitPattern: offset)
        let signedLength = Int64(bitPattern: length)
        guard signedOffset >= 0, signedLength > 0 else { return .invalidArgument }
        if signedOffset.addingReportingOverflow(signedLength).overflow { return Errno(rawValue: 27) }  // EFBIG
        // kvm_gmem_fallocate: both page-aligned.
        guard offset % pageSize == 0, length % pageSize == 0 else { return .invalidArgument }
        return nil
    }

    /// fallocate(PUNCH_HOLE): zero the range and zap it in every VM that maps it, through any file.
    mutating func punch(inode inodeID: Int, offset: UInt64, length: UInt64) {
        guard inodes[inodeID] != nil else { return }
        let first = offset / pageSize
        let end = (offset + length) / pageSize
        inodes[inodeID]!.pages = inodes[inodeID]!.pages.filter { $0.key < first || $0.key >= end }
        for vmID in vms.keys {
            let frames = vms[vmID]!.mappedFrames
            let zapped = frames.filter { gfn in
                if case .memory(let inode, let at) = resolveGuest(vmID, gpa: gfn * pageSize) {
                    return inode == inodeID && at / pageSize >= first && at / pageSize < end
                }
                return false
            }
            vms[vmID]!.mappedFrames.subtract(zapped)
        }
    }

    // MARK: lifetimes

    mutating func close(_ handle: KernelHandle) {
        guard let object = handles.removeValue(forKey: handle.raw)?.object else { return }
        switch object {
        case .vm(let id):
            vms[id]?.vmHandleOpen = false
            destroyIfUnused(vm: id)
        case .vcpu(let vmID, _):
            vms[vmID]?.openVCPUs -= 1
            destroyIfUnused(vm: vmID)
        case .file(let id):
            files[id]?.descriptorOpen = false
            releaseIfUnused(file: id)
        }
    }

    /// kvm_gmem_release, once neither the descriptor nor a mapping holds the file: bound
    /// slots lose their file (guest faults answer EFAULT), the inode loses a view, the VM a pin.
    mutating func releaseIfUnused(file id: Int) {
        guard let file = files[id], !file.descriptorOpen, file.mappings == 0 else { return }
        if var vm = vms[file.vm] {
            for (key, slot) in vm.memslots where slot.file == id {
                vm.memslots[key]!.file = nil
                vm.mappedFrames = vm.mappedFrames.filter { $0 < slot.baseGFN || $0 >= slot.baseGFN + slot.pages }
            }
            vm.files.remove(id)
            vms[file.vm] = vm
        }
        files[id] = nil
        inodes[file.inode]?.files.remove(id)
        if inodes[file.inode]?.files.isEmpty == true { inodes[file.inode] = nil }
        destroyIfUnused(vm: file.vm)
    }

    /// kvm_destroy_vm, when the last reference (VM fd, vcpu fds, gmem files) is gone.
    mutating func destroyIfUnused(vm id: Int) {
        guard let vm = vms[id], !vm.vmHandleOpen, vm.openVCPUs == 0, vm.files.isEmpty else { return }
        vms[id] = nil
    }
}

/// An open handle: what it names, and the (simulated) process that holds it.
struct ModelHandle: Codable, Equatable {
    var object: ModelObject
    var owner: String
}

enum ModelObject: Codable, Equatable {
    case vm(Int)
    case vcpu(vm: Int, id: UInt32)
    case file(Int)
}

struct ModelVM: Codable {
    var type: VMType
    /// The process that created the VM (kvm->mm): only it may issue VM and vcpu ioctls.
    var creator: String
    var addressSpaces: Int
    var vmHandleOpen = true
    var openVCPUs = 0
    /// Live gmem files bound to this VM (each pins it).
    var files: Set<Int> = []
    var vcpus: [UInt32: ModelVCPU] = [:]
    /// Keyed by `(address space << 16) | id`.
    var memslots: [UInt32: ModelMemslot] = [:]
    var dead = false
    /// SEV/SNP/TDX: launched here, or moved in.
    var hasEncryptionContext = false
    /// The move into this VM completed: its linked files may now be mapped.
    var receivedEncryptionContext = false
    /// KVM_CREATE_IRQCHIP (and the PIT) happened.
    var hasInterruptControllers = false
    /// Frames the VM currently maps (SPTEs).
    var mappedFrames: Set<UInt64> = []

    init(type: VMType, addressSpaces: Int, creator: String) {
        self.type = type
        self.creator = creator
        self.addressSpaces = addressSpaces
    }
}

struct ModelVCPU: Codable {
    var state: VCPUState
}

struct ModelMemslot: Codable {
    var baseGFN: UInt64
    var pages: UInt64
    var flags: MemslotFlags
    var userspaceAddress: UInt64
    /// The bound gmem file; nil for a host-memory slot or once the file was released.
    var file: Int?
    var pgoff: UInt64
}

struct ModelFile: Codable {
    var vm: Int
    var inode: Int
    /// Created by KVM_LINK_GUEST_MEMFD (not by KVM_CREATE_GUEST_MEMFD).
    var linked: Bool
    var descriptorOpen = true
    var mappings = 0
}

struct ModelInode: Codable {
    var number: UInt64
    var size: UInt64
    var flags: GuestMemfdFlags
    /// Populated pages; absent pages read as zero.
    var pages: [UInt64: Page] = [:]
    var files: Set<Int> = []

    init(number: UInt64, size: UInt64, flags: GuestMemfdFlags) {
        self.number = number
        self.size = size
        self.flags = flags
    }

    func byte(at offset: UInt64) -> UInt8 {
        pages[offset / pageSize]?.bytes[Int(offset % pageSize)] ?? 0
    }

    mutating func setByte(_ value: UInt8, at offset: UInt64) {
        let index = offset / pageSize
        pages[index, default: Page()].bytes[Int(offset % pageSize)] = value
    }
}

/// One page of memory; encoded as base64 so that a host file stays small.
struct Page: Codable {
    var bytes = [UInt8](repeating: 0, count: Int(pageSize))

    init() {}

    init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        guard let data = Data(base64Encoded: text), data.count == Int(pageSize) else {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "a page is \(pageSize) bytes"))
        }
        bytes = [UInt8](data)
    }

    func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(Data(bytes).base64EncodedString())
    }
}

struct ModelMapping: Codable {
    var file: Int
    var owner: String = ""
    var offset: UInt64
    var length: UInt64
}
