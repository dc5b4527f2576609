/// What a migration needs from the kernel, at the level of handles.
///
/// Two implementations: `LinuxKVM` issues real ioctls on `/dev/kvm`; `KernelModel` is an
/// in-process reference model of the same rules (and of what this host lacks). The same
/// conformance suite runs on both. Callers normally use the owned object types
/// (`VirtualMachine`, `GuestMemfd`, `VCPU`, `GuestMapping`), which close their handle when
/// they go away; the handle-level requirements here are what those types forward to.
public protocol KernelBackend: AnyObject, Sendable {
    /// `linux` or `model`.
    var name: String { get }

    /// What this kernel offers, read from it (or, for the model, what it models).
    func probe() throws(KernelError) -> HostCapabilities

    /// `KVM_CHECK_EXTENSION` on `/dev/kvm` (`vm == nil`) or on a VM.
    func checkExtension(_ capability: Capability, vm: KernelHandle?) throws(KernelError) -> Int

    /// `KVM_CREATE_VM`.
    func createVM(type: VMType) throws(KernelError) -> KernelHandle

    /// `KVM_CREATE_GUEST_MEMFD` on a VM.
    func createGuestMemfd(vm: KernelHandle, size: UInt64, flags: GuestMemfdFlags) throws(KernelError) -> KernelHandle

    /// `KVM_SET_USER_MEMORY_REGION2` (a size of zero deletes the slot).
    func setMemslot(vm: KernelHandle, _ region: MemslotRegion) throws(KernelError)

    /// `mmap(MAP_SHARED)` of a gmem file; returns the host address of the mapping.
    func mapGuestMemfd(_ file: KernelHandle, offset: UInt64, length: UInt64) throws(KernelError) -> UInt64

    /// `munmap` of a mapping made by `mapGuestMemfd`.
    func unmap(address: UInt64, length: UInt64)

    /// Copies bytes out of a host mapping; a page the kernel refuses to fault in answers EFAULT.
    func readMemory(address: UInt64, count: Int) throws(KernelError) -> [UInt8]

    /// Copies bytes into a host mapping; a page the kernel refuses to fault in answers EFAULT.
    func writeMemory(address: UInt64, bytes: [UInt8]) throws(KernelError)

    /// The copy strategy's preparation, before the pause: maps the gmem file `source` (its first
    /// `length` bytes) read-only, and faults in the page tables of the pages it populates now and of
    /// the same pages of the host mapping at `address`, so that the copy inside the blackout faults
    /// nothing it need not. Returns the source mapping (`unmap` it) and the bytes populated. Linux
    /// finds the pages with mincore (guest_memfd answers ESPIPE to SEEK_DATA), on two threads.
    func prepareCopy(from source: KernelHandle, length: UInt64, to address: UInt64) throws(KernelError) -> (sourceAddress: UInt64, populated: UInt64)

    /// The copy, once the source is paused: copies the pages populated now from the read-only
    /// mapping at `sourceAddress` (made by `prepareCopy`) into the mapping at `address`; holes are
    /// neither read nor written, so a sparse guest stays sparse. Returns the bytes copied.
    func copyPopulated(fromMapping sourceAddress: UInt64, length: UInt64, to address: UInt64) throws(KernelError) -> UInt64

    /// `fallocate(PUNCH_HOLE | KEEP_SIZE)` on a gmem file.
    func punchHole(_ file: KernelHandle, offset: UInt64, length: UInt64) throws(KernelError)

    /// `KVM_CREATE_VCPU`.
    func createVCPU(vm: KernelHandle, id: UInt32) throws(KernelError) -> KernelHandle

    /// Every section of the vcpu's state this kernel offers (`StateSection.kinds`), in KVM's save order.
    func vcpuState(_ vcpu: KernelHandle) throws(KernelError) -> VCPUState

    /// Restores every section of `state`, in KVM's restore order; a section this kernel does not
    /// keep is refused (`unsupported`, naming it), never dropped.
    func setVCPUState(_ vcpu: KernelHandle, _ state: VCPUState) throws(KernelError)

    /// `KVM_CREATE_IRQCHIP` and `KVM_CREATE_PIT2`: the in-kernel PIC pair, IOAPIC, LAPICs and PIT.
    func createInterruptControllers(vm: KernelHandle) throws(KernelError)

    /// `KVM_GET_SUPPORTED_CPUID`: the CPU model this kernel offers a VMM.
    func supportedCPUID() throws(KernelError) -> [CPUIDEntry]

    /// `KVM_SET_CPUID2`.
    func setCPUID(_ vcpu: KernelHandle, _ entries: [CPUIDEntry]) throws(KernelError)

    /// The VM's own state sections (irqchips, PIT, clock).
    func vmState(_ vm: KernelHandle) throws(KernelError) -> [StateSection]

    /// The VM's sections named in `names` only (a read-back reads what it compares, no more).
    func vmState(_ vm: KernelHandle, only names: Set<String>) throws(KernelError) -> [StateSection]

    /// Restores the VM's own sections; the clock last.
    func setVMState(_ vm: KernelHandle, _ sections: [StateSection]) throws(KernelError)

    /// `KVM_RUN`.
    func run(_ vcpu: KernelHandle) throws(KernelError) -> VCPUExit

    /// `KVM_PRE_FAULT_MEMORY`: maps guest pages into the VM as a guest access would.
    func prefault(_ vcpu: KernelHandle, guestPhysicalAddress: UInt64, size: UInt64) throws(KernelError)

    /// Sets up a confidential VM's encryption context (SEV/SNP/TDX launch), through `KVM_MEMORY_ENCRYPT_OP`.
    func launch(vm: KernelHandle) throws(KernelError)

    /// `KVM_ENABLE_CAP(KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM)` on `destination` with `source`'s fd.
    func moveEncryptionContext(to destination: KernelHandle, from source: KernelHandle) throws(KernelError)

    /// `KVM_LINK_GUEST_MEMFD` (RFC): a new gmem file on `file`'s inode, bound to `vm`.
    func linkGuestMemfd(_ file: KernelHandle, into vm: KernelHandle, flags: UInt64) throws(KernelError) -> KernelHandle

    /// `fcntl(F_DUPFD_CLOEXEC)`: a second handle on the same file, owned by the caller (a VMM
    /// keeps the gmem file it was handed, so that it can hand it on as a source in turn).
    func duplicate(_ handle: KernelHandle) throws(KernelError) -> KernelHandle

    /// `fstat`: the inode a gmem file is a view of.
    func inodeIdentity(_ file: KernelHandle) throws(KernelError) -> InodeIdentity

    /// Closes a handle of any kind. Never fails: the owned types call it from `deinit`.
    func close(_ handle: KernelHandle)

    /// Tries `request` from a process other than the VM's creator (a real forked child on Linux)
    /// and returns what it got: `nil` for success.
    func attemptInAnotherProcess(_ request: ForeignRequest) -> KernelError?

    /// Where the kernel itself has a VM's memslots (slot → guest physical address and size),
    /// where it can say: the model can; KVM has no ioctl that reads memslots back (nil), so a
    /// VMM reports what the kernel accepted.
    func memslotPlacement(vm: KernelHandle) -> [UInt32: (guestPhysicalAddress: UInt64, size: UInt64)]?
}

extension KernelBackend {
    public func vmState(_ vm: KernelHandle, only names: Set<String>) throws(KernelError) -> [StateSection] {
        try vmState(vm).filter { names.contains($0.name) }
    }

    /// `KVM_CREATE_VM`: a VM of `type`, owned by the caller.
    public func createVirtualMachine(type: VMType = .default) throws(KernelError) -> VirtualMachine {
        VirtualMachine(backend: self, handle: try createVM(type: type), type: type)
    }
}
