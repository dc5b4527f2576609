/// A KVM virtual machine (a VM file descriptor on Linux). Closing it (deinit) drops the VM's
/// reference; the VM itself lives on while any of its vcpus or gmem files is open.
public struct VirtualMachine: ~Copyable, Sendable {
    public let backend: any KernelBackend
    public let handle: KernelHandle
    public let type: VMType
    private var owned = true

    init(backend: any KernelBackend, handle: KernelHandle, type: VMType) {
        self.backend = backend
        self.handle = handle
        self.type = type
    }

    /// Takes ownership of a VM handle that outlived its owner value: a recovering coordinator
    /// adopting what a crashed one left, or a descriptor received from another process.
    public init(adopting handle: KernelHandle, backend: any KernelBackend, type: VMType) {
        self.init(backend: backend, handle: handle, type: type)
    }

    deinit { if owned { backend.close(handle) } }

    /// Gives up ownership without closing: the caller now owns the handle.
    public consuming func relinquish() -> KernelHandle {
        // `discard self` needs trivially-destroyed properties; the backend reference is not.
        owned = false
        return handle
    }

    /// The corresponding ioctl is `KVM_CHECK_EXTENSION` on the VM fd.
    public func checkExtension(_ capability: Capability) throws(KernelError) -> Int {
        try backend.checkExtension(capability, vm: handle)
    }

    /// Creates a guest_memfd file bound to this VM.
    /// The corresponding ioctl is `KVM_CREATE_GUEST_MEMFD`.
    public func createGuestMemfd(size: UInt64, flags: GuestMemfdFlags) throws(KernelError) -> GuestMemfd {
        let file = try backend.createGuestMemfd(vm: handle, size: size, flags: flags)
        return GuestMemfd(backend: backend, handle: file, size: size, flags: flags)
    }

    /// Binds `[offset, offset+size)` of `file` at `guestPhysicalAddress`.
    ///
    /// `userspaceAddress` is where the same range is mapped in this process (0: nowhere). KVM
    /// faults guest memory in from the gmem file, but where it must emulate an instruction (real
    /// mode without unrestricted guest, shadow paging) it reads guest memory through this address.
    /// The corresponding ioctl is `KVM_SET_USER_MEMORY_REGION2` with `KVM_MEM_GUEST_MEMFD`.
    public func setMemslot(
        slot: UInt32, guestPhysicalAddress: UInt64, size: UInt64, file: borrowing GuestMemfd, offset: UInt64,
        userspaceAddress: UInt64 = 0, extraFlags: MemslotFlags = []
    ) throws(KernelError) {
        try backend.setMemslot(
            vm: handle,
            MemslotRegion(
                slot: slot, flags: extraFlags.union(.guestMemfd), guestPhysicalAddress: guestPhysicalAddress,
                size: size, userspaceAddress: userspaceAddress, guestMemfd: file.handle, guestMemfdOffset: offset))
    }

    /// Backs `size` bytes at `guestPhysicalAddress` with host memory at `offset` into `mapping`
    /// (the "share" strategy: a mapping of another VM's gmem file).
    /// The corresponding ioctl is `KVM_SET_USER_MEMORY_REGION2` without `KVM_MEM_GUEST_MEMFD`.
    public func setMemslot(
        slot: UInt32, guestPhysicalAddress: UInt64, size: UInt64, mapping: borrowing GuestMapping, offset: UInt64,
        extraFlags: MemslotFlags = []
    ) throws(KernelError) {
        try backend.setMemslot(
            vm: handle,
            MemslotRegion(
                slot: slot, flags: extraFlags, guestPhysicalAddress: guestPhysicalAddress, size: size,
                userspaceAddress: mapping.address &+ offset))
    }

    /// Issues a raw region, for tests of the kernel's own validation.
    /// The corresponding ioctl is `KVM_SET_USER_MEMORY_REGION2`.
    public func setMemslot(_ region: MemslotRegion) throws(KernelError) {
        try backend.setMemslot(vm: handle, region)
    }

    /// Deletes a memslot (a region of size zero).
    /// The corresponding ioctl is `KVM_SET_USER_MEMORY_REGION2`.
    public func deleteMemslot(slot: UInt32) throws(KernelError) {
        try backend.setMemslot(vm: handle, MemslotRegion(slot: slot, guestPhysicalAddress: 0, size: 0))
    }

    /// The corresponding ioctl is `KVM_CREATE_VCPU`.
    public func createVCPU(id: UInt32) throws(KernelError) -> VCPU {
        VCPU(backend: backend, handle: try backend.createVCPU(vm: handle, id: id), id: id)
    }

    /// Gives this VM a new gmem file on `file`'s inode (`file` may belong to another VM).
    /// The corresponding ioctl is `KVM_LINK_GUEST_MEMFD` (RFC; `unsupported` where the kernel lacks it).
    public func link(_ file: borrowing GuestMemfd, flags: UInt64 = 0) throws(KernelError) -> GuestMemfd {
        let linked = try backend.linkGuestMemfd(file.handle, into: handle, flags: flags)
        return GuestMemfd(backend: backend, handle: linked, size: file.size, flags: file.flags)
    }

    /// Moves `source`'s encryption context into this VM; afterwards `source` is dead (EIO).
    /// The corresponding ioctl is `KVM_ENABLE_CAP` with `KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM`.
    public func moveEncryptionContext(from source: borrowing VirtualMachine) throws(KernelError) {
        try backend.moveEncryptionContext(to: handle, from: source.handle)
    }

    /// Sets up this confidential VM's encryption context.
    /// The corresponding ioctl is `KVM_MEMORY_ENCRYPT_OP`.
    public func launch() throws(KernelError) {
        try backend.launch(vm: handle)
    }
}

/// A guest_memfd file: one VM's view (its bindings) of an inode that holds the memory.
public struct GuestMemfd: ~Copyable, Sendable {
    public let backend: any KernelBackend
    public let handle: KernelHandle
    /// The size given at creation (gmem files never change size).
    public let size: UInt64
    public let flags: GuestMemfdFlags
    private var owned = true

    public init(backend: any KernelBackend, handle: KernelHandle, size: UInt64, flags: GuestMemfdFlags) {
        self.backend = backend
        self.handle = handle
        self.size = size
        self.flags = flags
    }

    deinit { if owned { backend.close(handle) } }

    /// Gives up ownership without closing: the caller now owns the handle.
    public consuming func relinquish() -> KernelHandle {
        // `discard self` needs trivially-destroyed properties; the backend reference is not.
        owned = false
        return handle
    }

    /// Maps `length` bytes at `offset` shared into this process.
    /// The corresponding call is `mmap(MAP_SHARED)` (ENODEV without `GUEST_MEMFD_FLAG_MMAP`).
    public func map(offset: UInt64 = 0, length: UInt64? = nil) throws(KernelError) -> GuestMapping {
        let length = length ?? size
        let address = try backend.mapGuestMemfd(handle, offset: offset, length: length)
        return GuestMapping(backend: backend, address: address, length: length)
    }

    /// Zeroes and frees `[offset, offset+length)` in every file of the inode.
    /// The corresponding call is `fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`.
    public func punchHole(offset: UInt64, length: UInt64) throws(KernelError) {
        try backend.punchHole(handle, offset: offset, length: length)
    }

    /// The corresponding call is `fstat` (`st_dev`, `st_ino`).
    public func inodeIdentity() throws(KernelError) -> InodeIdentity {
        try backend.inodeIdentity(handle)
    }
}

/// A shared host mapping of a gmem file; unmapped when it goes away.
public struct GuestMapping: ~Copyable, Sendable {
    public let backend: any KernelBackend
    public let address: UInt64
    public let length: UInt64

    deinit { backend.unmap(address: address, length: length) }

    init(backend: any KernelBackend, address: UInt64, length: UInt64) {
        self.backend = backend
        self.address = address
        self.length = length
    }

    /// Takes ownership of a mapping made earlier (see `VirtualMachine.init(adopting:)`).
    public init(adopting address: UInt64, length: UInt64, backend: any KernelBackend) {
        self.init(backend: backend, address: address, length: length)
    }

    /// Reads bytes at `offset`; EFAULT where the kernel refuses the page (no INIT_SHARED, beyond EOF).
    public func read(offset: UInt64, count: Int) throws(KernelError) -> [UInt8] {
        precondition(offset + UInt64(count) <= length, "read beyond the mapping")
        return try backend.readMemory(address: address + offset, count: count)
    }

    /// Writes bytes at `offset`; EFAULT where the kernel refuses the page.
    public func write(offset: UInt64, bytes: [UInt8]) throws(KernelError) {
        precondition(offset + UInt64(bytes.count) <= length, "write beyond the mapping")
        try backend.writeMemory(address: address + offset, bytes: bytes)
    }
}

/// A virtual CPU of a VM.
public struct VCPU: ~Copyable, Sendable {
    public let backend: any KernelBackend
    public let handle: KernelHandle
    public let id: UInt32

    init(backend: any KernelBackend, handle: KernelHandle, id: UInt32) {
        self.backend = backend
        self.handle = handle
        self.id = id
    }

    /// Takes ownership of a vcpu handle (see `VirtualMachine.init(adopting:)`).
    public init(adopting handle: KernelHandle, id: UInt32, backend: any KernelBackend) {
        self.init(backend: backend, handle: handle, id: id)
    }

    deinit { backend.close(handle) }

    /// The corresponding ioctls are `KVM_GET_REGS`, `KVM_GET_SREGS` and `KVM_GET_FPU`.
    public func state() throws(KernelError) -> VCPUState { try backend.vcpuState(handle) }

    /// The corresponding ioctls are `KVM_SET_REGS`, `KVM_SET_SREGS` and `KVM_SET_FPU`.
    public func setState(_ state: VCPUState) throws(KernelError) { try backend.setVCPUState(handle, state) }

    /// Runs the vcpu until the next exit to userspace.
    /// The corresponding ioctl is `KVM_RUN`.
    public func run() throws(KernelError) -> VCPUExit { try backend.run(handle) }

    /// The corresponding ioctl is `KVM_PRE_FAULT_MEMORY`.
    public func prefault(guestPhysicalAddress: UInt64, size: UInt64 = 4096) throws(KernelError) {
        try backend.prefault(handle, guestPhysicalAddress: guestPhysicalAddress, size: size)
    }
}
