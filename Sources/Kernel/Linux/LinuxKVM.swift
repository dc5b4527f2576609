import CKVM
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The real kernel: ioctls on `/dev/kvm` and the VM, vcpu and guest_memfd descriptors.
///
/// What the running kernel lacks (the link ioctl, the move of the encryption context, VM
/// types the hardware does not offer) answers `KernelError.unsupported`, decided by probing
/// the kernel once, never assumed.
public final class LinuxKVM: KernelBackend {
    public let name = "linux"
    public let devicePath: String
    private let systemFD: Int32
    private let vcpuMmapSize: Int
    private let usesSyncArea: Bool

    private struct State {
        /// kvm_run mappings of open vcpu descriptors.
        var runMappings: [Int32: UInt] = [:]
        /// VM type of each open VM descriptor.
        var vmTypes: [Int32: VMType] = [:]
        var probe: HostCapabilities?
        /// Descriptors this instance opened and has not closed, and its mappings.
        var open: Set<Int32> = []
        var mappings: Set<UInt64> = []
        /// The VM of each vcpu descriptor, and the VMs with an in-kernel irqchip and PIT.
        var vcpuVMs: [Int32: Int32] = [:]
        var irqchips: Set<Int32> = []
        /// What this host's KVM offers for the vcpu state, read once.
        var stateSupport: StateSupport?
        /// What each vcpu holds that only calls through this instance change, so that a
        /// restore or a save inside the blackout need not ask KVM again (each vcpu ioctl costs
        /// 5-10 µs on this nested host): the CPUID entries KVM_SET_CPUID2 took, without the
        /// runtime bits (KVM adds only those), and the TSC frequency as KVM_GET_TSC_KHZ answered or
        /// KVM_SET_TSC_KHZ set it. Dropped when the vcpu's descriptor closes.
        var vcpuCPUID: [Int32: [CPUIDEntry]] = [:]
        /// What a save and a read-back derive from `vcpuCPUID` (`SaveShape`), made at the first
        /// and dropped with it.
        var vcpuSaveShapes: [Int32: SaveShape] = [:]
        var vcpuTSCKhz: [Int32: UInt32] = [:]
        /// The vcpus that entered KVM_RUN through this instance (one that never did holds no TSC
        /// deadline, so a deadline of 0 need not be written into it).
        var ranVCPUs: Set<Int32> = []
        /// Sections of a vcpu that never ran, as KVM last answered them (vcpu events, MP
        /// state, debug registers, XCR0) or as a set gave them where KVM stores them exactly
        /// (XCR0): nothing but a run or a set through this instance changes
        /// them while no vcpu of its VM runs, so a set of the same bytes is a call that changes
        /// nothing, and is skipped, and a read answers these bytes without asking KVM again (as
        /// the CPUID section does). A set of other bytes drops the section; any run drops all.
        var vcpuHeld: [Int32: [String: [UInt8]]] = [:]
        /// How many vcpu calls `vcpuHeld` spared (sets and reads).
        var heldCallsSkipped = 0
        /// How many KVM_RUNs that entered no guest moved registers through the sync area.
        var syncRuns = 0
        /// How many KVM_RUNs began through this instance: what was read while one began is not
        /// taken as held.
        var runs: UInt64 = 0
        /// Whether this kernel has the vcpu's TSC-offset attribute (KVM_HAS_DEVICE_ATTR, asked once).
        var tscOffsetAttribute: Bool?
        /// Whether the host's clock source was the TSC, and when that was read (`hostTSCIsStable`).
        var tscStable: (at: UInt64, stable: Bool)?
    }

    /// The vcpu state this host's KVM saves and restores, probed once.
    struct StateSupport {
        var sregs2: Bool
        var xsaveSize: Int
        var xcrs: Bool
        var events: Bool
        var debugRegisters: Bool
        var mpState: Bool
        var tscKhz: Bool
        var tscControl: Bool
        var vcpuAttributes: Bool
        var nested: Bool
        /// Whether the regs, sregs and vcpu events move through the kvm_run's sync area
        /// (KVM_CAP_SYNC_REGS), on a kernel where a KVM_RUN from a thread other than the vcpu's
        /// last is cheap (6.13 and later guard its PID with a rwlock; before, such a KVM_RUN
        /// waited for an RCU grace period, milliseconds): `syncRun`.
        var syncRegs: Bool
        /// The MSRs of KVM_GET_MSR_INDEX_LIST (filtered to those a vcpu reads back, at first use).
        var msrIndices: [UInt32]
        var msrsFiltered: Bool
    }
    private let state = Mutex(State())

    /// Opens `/dev/kvm` and checks the API version (12). `syncArea: false` moves the regs,
    /// sregs and events by their own ioctls only, never through the kvm_run (`syncRun`): a
    /// test's oracle.
    /// - Throws: `.failed(.openSystem, errno)` (ENOENT without KVM, EACCES without permission).
    public init(devicePath: String = "/dev/kvm", syncArea: Bool = true) throws(KernelError) {
        usesSyncArea = syncArea
        let fd = Syscalls.open(devicePath, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { throw .failed(operation: .openSystem, errno: .current) }
        let version = Syscalls.ioctl(fd, CKVM_GET_API_VERSION, value: 0)
        guard version == 12 else {
            Syscalls.close(fd)
            throw .unsupported(operation: .openSystem, reason: "KVM API version \(version), expected 12")
        }
        let size = Syscalls.ioctl(fd, CKVM_GET_VCPU_MMAP_SIZE, value: 0)
        guard size > 0 else {
            let error = Errno.current
            Syscalls.close(fd)
            throw .failed(operation: .openSystem, errno: error)
        }
        self.devicePath = devicePath
        self.systemFD = fd
        self.vcpuMmapSize = Int(size)
    }

    deinit { Syscalls.close(systemFD) }

    /// Whether `/dev/kvm` can be used here, and if not, why (one line).
    public static func availability(devicePath: String = "/dev/kvm") -> Result<Void, KernelError> {
        do {
            _ = try LinuxKVM(devicePath: devicePath)
            return .success(())
        } catch {
            return .failure(error)
        }
    }

    // MARK: - Probing

    public func probe() throws(KernelError) -> HostCapabilities {
        if let cached = state.withLock({ $0.probe }) { return cached }
        let probe = try readCapabilities()
        state.withLock { $0.probe = probe }
        return probe
    }

    private func readCapabilities() throws(KernelError) -> HostCapabilities {
        func check(_ capability: Capability) -> Int {
            max(0, Int(Syscalls.ioctl(systemFD, CKVM_CHECK_EXTENSION, value: UInt(capability.rawValue))))
        }
        let apiVersion = Int(Syscalls.ioctl(systemFD, CKVM_GET_API_VERSION, value: 0))
        let typeBits = check(.vmTypes)
        // Before KVM_CAP_VM_TYPES (6.10) only the default type exists.
        let types = VMType.allCases.filter { typeBits == 0 ? $0 == .default : typeBits & (1 << $0.rawValue) != 0 }
        let gmemSupported = check(.guestMemfd) > 0
        let gmemFlags = GuestMemfdFlags(rawValue: UInt64(check(.guestMemfdFlags)))
        let encryptionTypes = types.filter(\.hasEncryptionContext)

        // The link ioctl: issue it on a scratch VM with a descriptor that cannot be valid.
        // ENOTTY: the kernel has no such ioctl. Anything else: the ioctl exists and refused the fd.
        let link: HostCapabilities.Feature
        do {
            let vm = try createVM(type: .default)
            defer { close(vm) }
            var argument = ckvm_link_guest_memfd()
            argument.fd = UInt64(UInt32.max)
            let result = Syscalls.ioctl(vm.raw, CKVM_LINK_GUEST_MEMFD, &argument)
            let error = Errno.current
            if result < 0 && error == .inappropriateIOCTLForDevice {
                link = .init(supported: false, detail: "KVM_LINK_GUEST_MEMFD (0xC040AED6) answered ENOTTY")
            } else {
                link = .init(
                    supported: true,
                    detail: "KVM_LINK_GUEST_MEMFD (0xC040AED6) exists (invalid fd answered \(result < 0 ? error.name : "0"))")
            }
        }

        // KVM_CHECK_EXTENSION reports the move and copy caps as 1 on every x86 host, even where
        // the vendor module lacks the operation (kernel.md §2.6). So ask the kernel twice: the
        // cap, and whether any VM type with an encryption context exists; then record what
        // enabling it between two scratch default VMs answers.
        func encryptionFeature(_ capability: Capability, name: String) throws(KernelError) -> HostCapabilities.Feature {
            let reported = check(capability)
            let a = try createVM(type: .default)
            defer { close(a) }
            let b = try createVM(type: .default)
            defer { close(b) }
            var argument = kvm_enable_cap()
            argument.cap = UInt32(capability.rawValue)
            argument.args.0 = UInt64(b.raw)
            let result = Syscalls.ioctl(a.raw, CKVM_ENABLE_CAP, &argument)
            let answer = result < 0 ? Errno.current.name : "0"
            let supported = reported > 0 && !encryptionTypes.isEmpty
            let typesText = encryptionTypes.isEmpty ? "no SEV/SNP/TDX VM type" : encryptionTypes.map(\.name).joined(separator: ",")
            return .init(
                supported: supported,
                detail: "\(name) reported \(reported); KVM_CAP_VM_TYPES has \(typesText); enabling it between two default VMs answered \(answer)")
        }
        // The largest guest physical address a memslot may reach (kvm_mmu_max_gfn()): a
        // one-page slot ending at 1 << bits, tried from 57 bits down; the first that KVM takes.
        var maxGuestPhysicalBits: Int? = nil
        do {
            let vm = try createVM(type: .default)
            defer { close(vm) }
            if let page = mmap(nil, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), page != MAP_FAILED {
                defer { munmap(page, 4096) }
                let address = UInt64(UInt(bitPattern: page))
                for bits in stride(from: 57, through: 32, by: -1) {
                    let region = MemslotRegion(slot: 0, guestPhysicalAddress: (UInt64(1) << UInt64(bits)) - 4096, size: 4096, userspaceAddress: address)
                    if (try? setMemslot(vm: vm, region)) != nil {
                        maxGuestPhysicalBits = bits
                        _ = try? setMemslot(vm: vm, MemslotRegion(slot: 0, guestPhysicalAddress: region.guestPhysicalAddress, size: 0, userspaceAddress: address))
                        break
                    }
                }
            }
        }
        let move = try encryptionFeature(.vmMoveEncContextFrom, name: "KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM")
        let copy = try encryptionFeature(.vmCopyEncContextFrom, name: "KVM_CAP_VM_COPY_ENC_CONTEXT_FROM")

        return HostCapabilities(
            backend: name,
            apiVersion: apiVersion,
            vmTypes: types.map(\.name),
            guestMemfd: .init(supported: gmemSupported, flags: gmemFlags.names, flagsRaw: gmemFlags.rawValue),
            userMemoryRegion2: check(.userMemory2) > 0,
            preFaultMemory: check(.preFaultMemory) > 0,
            immediateExit: check(.immediateExit) > 0,
            link: link,
            moveEncryptionContext: move,
            copyEncryptionContext: copy,
            limits: .init(
                recommendedVCPUs: check(.nrVCPUs), maxVCPUs: check(.maxVCPUs), maxVCPUID: check(.maxVCPUID),
                memslots: check(.nrMemslots), addressSpaces: max(1, check(.multiAddressSpace)), maxGuestPhysicalBits: maxGuestPhysicalBits))
    }

    // MARK: - VMs and memory

    public func checkExtension(_ capability: Capability, vm: KernelHandle?) throws(KernelError) -> Int {
        let result = Syscalls.ioctl(vm?.raw ?? systemFD, CKVM_CHECK_EXTENSION, value: UInt(capability.rawValue))
        guard result >= 0 else { throw .failed(operation: .checkExtension, errno: .current) }
        return Int(result)
    }

    public func createVM(type: VMType) throws(KernelError) -> KernelHandle {
        let fd = Syscalls.ioctl(systemFD, CKVM_CREATE_VM, value: type.rawValue)
        guard fd >= 0 else {
            let error = Errno.current
            // A type the hardware (or this kernel) does not offer: KVM_CAP_VM_TYPES lacks its bit.
            if error == .invalidArgument, type != .default,
                Syscalls.ioctl(systemFD, CKVM_CHECK_EXTENSION, value: UInt(Capability.vmTypes.rawValue)) & (1 << Int32(type.rawValue)) == 0
            {
                throw .unsupported(operation: .createVM, reason: "VM type \(type.name) is not in KVM_CAP_VM_TYPES")
            }
            throw .failed(operation: .createVM, errno: error)
        }
        // Our descriptors must not leak into the processes we spawn.
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        state.withLock {
            $0.vmTypes[fd] = type
            $0.open.insert(fd)
        }
        return KernelHandle(raw: fd)
    }

    public func createGuestMemfd(vm: KernelHandle, size: UInt64, flags: GuestMemfdFlags) throws(KernelError) -> KernelHandle {
        var argument = ckvm_create_guest_memfd()
        argument.size = size
        argument.flags = flags.rawValue
        let fd = Syscalls.ioctl(vm.raw, CKVM_CREATE_GUEST_MEMFD, &argument)
        guard fd >= 0 else { throw .failed(operation: .createGuestMemfd, errno: .current) }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        state.withLock { _ = $0.open.insert(fd) }
        return KernelHandle(raw: fd)
    }

    public func setMemslot(vm: KernelHandle, _ region: MemslotRegion) throws(KernelError) {
        var argument = ckvm_userspace_memory_region2()
        argument.slot = region.slot
        argument.flags = region.flags.rawValue
        argument.guest_phys_addr = region.guestPhysicalAddress
        argument.memory_size = region.size
        argument.userspace_addr = region.userspaceAddress
        argument.guest_memfd_offset = region.guestMemfdOffset
        argument.guest_memfd = region.guestMemfd.map { UInt32(bitPattern: $0.raw) } ?? 0
        guard Syscalls.ioctl(vm.raw, CKVM_SET_USER_MEMORY_REGION2, &argument) == 0 else {
            throw .failed(operation: .setMemslot, errno: .current)
        }
    }

    public func mapGuestMemfd(_ file: KernelHandle, offset: UInt64, length: UInt64) throws(KernelError) -> UInt64 {
        guard length > 0, length <= UInt64(Int.max) else { throw .failed(operation: .mapGuestMemfd, errno: .invalidArgument) }
        guard let pointer = Syscalls.mmap(file.raw, length: Int(length), offset: offset) else {
            throw .failed(operation: .mapGuestMemfd, errno: .current)
        }
        let address = UInt64(UInt(bitPattern: pointer))
        state.withLock { _ = $0.mappings.insert(address) }
        return address
    }

    public func unmap(address: UInt64, length: UInt64) {
        state.withLock { _ = $0.mappings.remove(address) }
        Syscalls.munmap(address, length: Int(length))
    }

    /// Descriptors and mappings this instance made and has not closed: a leak check.
    public var openDescriptorCount: Int { state.withLock { $0.open.count } }
    public var mappingCount: Int { state.withLock { $0.mappings.count } }

    public func readMemory(address: UInt64, count: Int) throws(KernelError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        let copied = bytes.withUnsafeMutableBytes { Syscalls.checkedRead(address: address, into: $0) }
        guard copied == count else { throw .failed(operation: .accessMemory, errno: copied < 0 ? .current : .badAddress) }
        return bytes
    }

    public func writeMemory(address: UInt64, bytes: [UInt8]) throws(KernelError) {
        let copied = bytes.withUnsafeBytes { Syscalls.checkedWrite(address: address, from: $0) }
        guard copied == bytes.count else {
            throw .failed(operation: .accessMemory, errno: copied < 0 ? .current : .badAddress)
        }
    }

    public func prepareCopy(from source: KernelHandle, length: UInt64, to address: UInt64) throws(KernelError) -> (sourceAddress: UInt64, populated: UInt64) {
        guard length > 0, length <= UInt64(Int.max), let target = UnsafeMutableRawPointer(bitPattern: UInt(address)) else {
            throw .failed(operation: .copyMemory, errno: .invalidArgument)
        }
        var mapped: UnsafeMutableRawPointer? = nil
        var populated: UInt = 0
        guard Syscalls.copyPrepare(source.raw, target, length: UInt(length), threads: 2, source: &mapped, populated: &populated) == 0,
            let mapped
        else { throw .failed(operation: .copyMemory, errno: .current) }
        let sourceAddress = UInt64(UInt(bitPattern: mapped))
        state.withLock { _ = $0.mappings.insert(sourceAddress) }
        return (sourceAddress, UInt64(populated))
    }

    public func copyPopulated(fromMapping sourceAddress: UInt64, length: UInt64, to address: UInt64) throws(KernelError) -> UInt64 {
        guard length > 0, length <= UInt64(Int.max), let target = UnsafeMutableRawPointer(bitPattern: UInt(address)),
            let source = UnsafeRawPointer(bitPattern: UInt(sourceAddress))
        else { throw .failed(operation: .copyMemory, errno: .invalidArgument) }
        var copied: UInt = 0
        guard Syscalls.copyMapped(source, target, length: UInt(length), threads: 2, copied: &copied) == 0 else {
            throw .failed(operation: .copyMemory, errno: .current)
        }
        return UInt64(copied)
    }

    public func punchHole(_ file: KernelHandle, offset: UInt64, length: UInt64) throws(KernelError) {
        guard Syscalls.punchHole(file.raw, offset: offset, length: length) == 0 else {
            throw .failed(operation: .punchHole, errno: .current)
        }
    }

    public func duplicate(_ handle: KernelHandle) throws(KernelError) -> KernelHandle {
        let fd = fcntl(handle.raw, F_DUPFD_CLOEXEC, 0)
        guard fd >= 0 else { throw .failed(operation: .inodeIdentity, errno: .current) }
        state.withLock { _ = $0.open.insert(fd) }
        return KernelHandle(raw: fd)
    }

    public func inodeIdentity(_ file: KernelHandle) throws(KernelError) -> InodeIdentity {
        guard let info = Syscalls.fstat(file.raw) else { throw .failed(operation: .inodeIdentity, errno: .current) }
        return InodeIdentity(device: UInt64(info.st_dev), inode: UInt64(info.st_ino))
    }

    // MARK: - vcpus

    public func createVCPU(vm: KernelHandle, id: UInt32) throws(KernelError) -> KernelHandle {
        let fd = Syscalls.ioctl(vm.raw, CKVM_CREATE_VCPU, value: UInt(id))
        guard fd >= 0 else { throw .failed(operation: .createVCPU, errno: .current) }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        guard let run = Syscalls.mmap(fd, length: vcpuMmapSize, offset: 0) else {
            let error = Errno.current
            Syscalls.close(fd)
            throw .failed(operation: .createVCPU, errno: error)
        }
        state.withLock {
            $0.runMappings[fd] = UInt(bitPattern: run)
            $0.open.insert(fd)
            $0.vcpuVMs[fd] = vm.raw
        }
        return KernelHandle(raw: fd)
    }

    public func createInterruptControllers(vm: KernelHandle) throws(KernelError) {
        guard Syscalls.ioctl(vm.raw, CKVM_CREATE_IRQCHIP, value: 0) == 0 else { throw .failed(operation: .createInterruptControllers, errno: .current) }
        var config = kvm_pit_config()
        guard Syscalls.ioctl(vm.raw, CKVM_CREATE_PIT2, &config) == 0 else { throw .failed(operation: .createInterruptControllers, errno: .current) }
        _ = state.withLock { $0.irqchips.insert(vm.raw) }
    }

    public func supportedCPUID() throws(KernelError) -> [CPUIDEntry] {
        var count = 256
        while true {
            var buffer = [UInt8](repeating: 0, count: 8 + count * Int(CKVM_SIZEOF_CPUID_ENTRY2))
            buffer.withUnsafeMutableBytes { $0.storeBytes(of: UInt32(count), as: UInt32.self) }
            let result = buffer.withUnsafeMutableBytes { Syscalls.ioctl(systemFD, CKVM_GET_SUPPORTED_CPUID, $0.baseAddress) }
            if result < 0 && Errno.current == .argumentListTooLong && count < 4096 {
                count *= 2
                continue
            }
            guard result == 0 else { throw .failed(operation: .setCPUID, errno: .current) }
            let entries = Int(buffer.loadLE(UInt32.self, at: 0))
            return CPUIDEntry.list(Array(buffer[8..<(8 + entries * Int(CKVM_SIZEOF_CPUID_ENTRY2))]))
        }
    }

    public func setCPUID(_ vcpu: KernelHandle, _ entries: [CPUIDEntry]) throws(KernelError) {
        var buffer = [UInt8]()
        buffer.appendLE(UInt32(entries.count))
        buffer.appendLE(UInt32(0))
        buffer += CPUIDEntry.bytes(entries)
        let result = buffer.withUnsafeMutableBytes { Syscalls.ioctl(vcpu.raw, CKVM_SET_CPUID2, $0.baseAddress) }
        guard result == 0 else { throw .failed(operation: .setCPUID, errno: .current) }
        // What KVM took, read back (it is what a save carries, `vcpuState`): KVM keeps the
        // entries as given but for the runtime bits it rewrites, which are not kept here.
        let held = heldCPUID(vcpu) ?? entries
        state.withLock {
            $0.vcpuCPUID[vcpu.raw] = CPUIDEntry.withoutRuntimeBits(held)
            $0.vcpuSaveShapes[vcpu.raw] = nil
            $0.vcpuHeld[vcpu.raw]?["xcrs"] = nil  // KVM recomputes what XCR0 may hold
        }
    }

    /// What a vcpu's save and read-back derive from the CPUID this instance set in it: the
    /// `cpuid` section's bytes and the MSRs to read (those KVM reads on this host, the
    /// paravirtual ones only where that CPUID offers them). Made once a CPUID: each took
    /// 10-12 µs of a save or a read-back inside the blackout (the entries coded to bytes and
    /// parsed back, the MSR list filtered).
    struct SaveShape {
        /// Nil where the vcpu holds no CPUID (none was set): there is nothing to carry.
        var cpuid: [UInt8]?
        var msrIndices: [UInt32]
    }

    /// The vcpu's `SaveShape`, made from `entries` (its CPUID without the runtime bits).
    private func saveShape(_ vcpu: KernelHandle, _ entries: [CPUIDEntry]?) -> SaveShape {
        let features = MSRList.paravirtualFeatures(entries ?? [])
        return SaveShape(cpuid: entries.map(CPUIDEntry.bytes), msrIndices: readableMSRs(vcpu).filter { MSRList.isOffered($0, features: features) })
    }

    private func stateSupport() -> StateSupport {
        if let cached = state.withLock({ $0.stateSupport }) { return cached }
        func check(_ capability: Capability) -> Int {
            max(0, Int(Syscalls.ioctl(systemFD, CKVM_CHECK_EXTENSION, value: UInt(capability.rawValue))))
        }
        var list = [UInt8](repeating: 0, count: 4 + 4 * 1024)
        list.withUnsafeMutableBytes { $0.storeBytes(of: UInt32(1024), as: UInt32.self) }
        let result = list.withUnsafeMutableBytes { Syscalls.ioctl(systemFD, CKVM_GET_MSR_INDEX_LIST, $0.baseAddress) }
        let count = result == 0 ? min(1024, Int(list.loadLE(UInt32.self, at: 0))) : 0
        let indices = (0..<count).map { list.loadLE(UInt32.self, at: 4 + 4 * $0) }
        let support = StateSupport(
            sregs2: check(.sregs2) > 0, xsaveSize: check(.xsave2), xcrs: check(.xcrs) > 0, events: check(.vcpuEvents) > 0,
            debugRegisters: check(.debugRegisters) > 0, mpState: check(.mpState) > 0, tscKhz: check(.getTSCKhz) > 0,
            tscControl: check(.tscControl) > 0, vcpuAttributes: check(.vcpuAttributes) > 0, nested: check(.nestedState) > 0,
            syncRegs: check(.syncRegs) & LinuxKVM.syncedFields == LinuxKVM.syncedFields && ckvm_kernel_version() >= 6013,
            msrIndices: indices, msrsFiltered: false)
        state.withLock { $0.stateSupport = support }
        return support
    }

    /// The MSRs a vcpu of this host reads back (the index list, less any KVM_GET_MSRS refuses).
    private func readableMSRs(_ vcpu: KernelHandle) -> [UInt32] {
        var support = stateSupport()
        if support.msrsFiltered { return support.msrIndices }
        support.msrIndices = support.msrIndices.filter { index in
            var one = MSRList(entries: [.init(index: index, value: 0)]).bytes
            return msrIoctl(vcpu, CKVM_GET_MSRS, &one) == 1
        }
        support.msrsFiltered = true
        let filtered = support
        state.withLock { $0.stateSupport = filtered }
        return support.msrIndices
    }

    /// KVM_GET_MSRS / KVM_SET_MSRS on `struct kvm_msrs` built around `entries` (the records).
    private func msrIoctl(_ vcpu: KernelHandle, _ request: UInt, _ entries: inout [UInt8]) -> Int32 {
        var buffer = [UInt8]()
        buffer.appendLE(UInt32(entries.count / 16))
        buffer.appendLE(UInt32(0))
        buffer += entries
        let result = buffer.withUnsafeMutableBytes { Syscalls.ioctl(vcpu.raw, request, $0.baseAddress) }
        entries = Array(buffer[8...])
        return result
    }

    private func get(_ vcpu: Int32, _ request: UInt, size: Int, operation: KernelOperation = .getVCPUState) throws(KernelError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: size)
        let result = bytes.withUnsafeMutableBytes { Syscalls.ioctl(vcpu, request, $0.baseAddress) }
        guard result >= 0 else { throw .failed(operation: operation, errno: .current) }
        return bytes
    }

    private func set(_ fd: Int32, _ request: UInt, _ bytes: [UInt8], section: String, operation: KernelOperation = .setVCPUState) throws(KernelError) {
        var copy = bytes
        let result = copy.withUnsafeMutableBytes { Syscalls.ioctl(fd, request, $0.baseAddress) }
        guard result >= 0 else { throw .failed(operation: operation, errno: .current) }
    }

    /// Every section this host offers, in QEMU's save order: vcpu events first (reading MP state
    /// may act on a pending INIT/SIPI), MP state, regs, xsave (or fpu), xcrs, sregs2 (or sregs),
    /// MSRs (the paravirtual ones the vcpu's CPUID offers), LAPIC, debug registers; then CPUID,
    /// the TSC frequency and offset. Where the sync area serves the vcpu (`syncArea`), the MP
    /// state is read first and the events with the regs and sregs, after it: what a read of
    /// the MP state did to a pending INIT or SIPI is then in all three. Nested state is not saved: no host gmigrate was tested on
    /// offers KVM_CAP_NESTED_STATE, and a state that would need it says so (`nested` section).
    public func vcpuState(_ vcpu: KernelHandle) throws(KernelError) -> VCPUState {
        let support = stateSupport()
        let fd = vcpu.raw
        let (hasIRQChip, runsBefore) = state.withLock { s in (s.vcpuVMs[fd].map { s.irqchips.contains($0) } ?? false, s.runs) }
        // What the vcpu holds (`vcpuHeld`) is answered without a vcpu ioctl.
        func heldOrGet(_ name: String, _ request: UInt, size: Int) throws(KernelError) -> [UInt8] {
            if let bytes = spare(fd, name) { return bytes }
            return try get(fd, request, size: size)
        }
        let sregsName = support.sregs2 ? "sregs2" : "sregs"
        func getEvents() throws(KernelError) -> [UInt8] { try get(fd, CKVM_GET_VCPU_EVENTS, size: Int(CKVM_SIZEOF_VCPU_EVENTS)) }
        func getRegs() throws(KernelError) -> [UInt8] { try get(fd, CKVM_GET_REGS, size: Int(CKVM_SIZEOF_REGS)) }
        func getSregs() throws(KernelError) -> [UInt8] {
            try get(fd, support.sregs2 ? CKVM_GET_SREGS2 : CKVM_GET_SREGS, size: Int(support.sregs2 ? CKVM_SIZEOF_SREGS2 : CKVM_SIZEOF_SREGS))
        }
        var events: [UInt8]?
        var mpState: [UInt8]?
        var regs: [UInt8]
        var sregs: [UInt8]
        if let run = syncArea(fd) {
            // MP state first: reading it may act on a pending INIT or SIPI, which changes the
            // registers and drops the events (QEMU reads it before the registers for this). Then
            // one KVM_RUN that enters no guest stores the regs, the sregs and the events in the
            // kvm_run (`syncRun`): one vcpu call for three. Held regs and sregs are answered only
            // where the MP state was too (no read of it acted on anything).
            let heldMPState = support.mpState ? spare(fd, "mp-state") : nil
            if let heldMPState { mpState = heldMPState } else if support.mpState { mpState = try get(fd, CKVM_GET_MP_STATE, size: 4) }
            // Held events and registers only where the MP state was held as well (no read of it
            // acted on a pending INIT, which resets both).
            let mpStateUntouched = heldMPState != nil || !support.mpState
            events = support.events && mpStateUntouched ? spare(fd, "events") : nil
            if mpStateUntouched, let held = spareRegisters(fd, sregsName) {
                (regs, sregs) = held
                if support.events && events == nil { events = try getEvents() }
            } else if let synced = try syncRun(fd, run, setting: nil, v2: support.sregs2, events: support.events && events == nil) {
                regs = synced.regs
                // KVM stores the sregs before the events, and reading the events delivers a
                // queued #PF's payload into CR2 (KVM_CAP_EXCEPTION_PAYLOAD is not enabled): with
                // a #PF in the events, the sregs are read again, after it.
                let pageFault = synced.events.map { ($0[0] != 0 || $0[3] != 0) && $0[1] == 14 } ?? false
                if let synced = synced.sregs, !pageFault { sregs = synced } else { sregs = try getSregs() }
                events = events ?? synced.events
            } else {
                if support.events && events == nil { events = try getEvents() }
                regs = try getRegs()
                sregs = try getSregs()
            }
        } else {
            if support.events { events = try heldOrGet("events", CKVM_GET_VCPU_EVENTS, size: Int(CKVM_SIZEOF_VCPU_EVENTS)) }
            if support.mpState { mpState = try heldOrGet("mp-state", CKVM_GET_MP_STATE, size: 4) }
            regs = try getRegs()
            sregs = try getSregs()
        }
        var sections: [StateSection] = []
        if let events { sections.append(.init(name: "events", bytes: events)) }
        if let mpState { sections.append(.init(name: "mp-state", bytes: mpState)) }
        sections.append(.init(name: "regs", bytes: regs))
        if support.xsaveSize > 0 {
            sections.append(.init(name: "xsave", bytes: try get(fd, CKVM_GET_XSAVE2, size: support.xsaveSize)))
        } else {
            sections.append(.init(name: "fpu", bytes: try get(fd, CKVM_GET_FPU, size: Int(CKVM_SIZEOF_FPU))))
        }
        // XCR0 held (a set or a read gave it; an INIT leaves it as it is: `kvm_vcpu_reset`
        // resets it only at creation) is answered without a call.
        if support.xcrs { sections.append(.init(name: "xcrs", bytes: try heldOrGet("xcrs", CKVM_GET_XCRS, size: Int(CKVM_SIZEOF_XCRS)))) }
        sections.append(.init(name: sregsName, bytes: sregs))
        // CPUID as KVM holds it, without the runtime bits (none before KVM_SET_CPUID2: then there
        // is nothing to carry). Where this process set it, what KVM took then: KVM refuses a
        // different CPUID once a vcpu ran, and changes nothing of it itself but the runtime
        // bits, which follow from CR4, the APIC base, XCR0 and XSS (the sregs, xcrs and MSRs
        // carry those), so the section needs no ioctl (each costs 5-15 µs on this nested host,
        // inside the blackout, on both sides: the save and the read-back).
        // Like QEMU, a KVM paravirtual MSR moves only where the vcpu's CPUID offers its feature:
        // KVM refuses to set one the guest was not offered (MSR_KVM_ASYNC_PF_INT, say). Both
        // follow from the CPUID, so where this process set it they are made once (`SaveShape`).
        let shape: SaveShape
        let (set, made) = state.withLock { ($0.vcpuCPUID[fd], $0.vcpuSaveShapes[fd]) }
        if let made {
            shape = made
        } else if let set {
            shape = saveShape(vcpu, set)
            state.withLock { state in if state.vcpuCPUID[fd] == set { state.vcpuSaveShapes[fd] = shape } }
        } else {
            shape = saveShape(vcpu, heldCPUID(vcpu).map(CPUIDEntry.withoutRuntimeBits))
        }
        let cpuidSection = shape.cpuid.map { StateSection(name: "cpuid", bytes: $0) }
        let indices = shape.msrIndices
        var msrs = MSRList(entries: indices.map { .init(index: $0, value: 0) }).bytes
        guard msrIoctl(vcpu, CKVM_GET_MSRS, &msrs) == Int32(indices.count) else { throw .failed(operation: .getVCPUState, errno: .current) }
        sections.append(.init(name: "msrs", bytes: msrs))
        if hasIRQChip { sections.append(.init(name: "lapic", bytes: try get(fd, CKVM_GET_LAPIC, size: Int(CKVM_SIZEOF_LAPIC)))) }
        if support.debugRegisters { sections.append(.init(name: "debugregs", bytes: try heldOrGet("debugregs", CKVM_GET_DEBUGREGS, size: Int(CKVM_SIZEOF_DEBUGREGS)))) }
        if let cpuidSection { sections.append(cpuidSection) }
        if support.tscKhz {
            var bytes: [UInt8] = []
            bytes.appendLE(try tscKhz(fd))
            sections.append(.init(name: "tsc-khz", bytes: bytes))
        }
        if support.vcpuAttributes {
            if let held = spareTSCOffset(fd) {
                sections.append(.init(name: "tsc-offset", bytes: held))
            } else if let offset = tscOffset(vcpu) {
                var bytes: [UInt8] = []
                bytes.appendLE(offset)
                sections.append(.init(name: "tsc-offset", bytes: bytes))
            }
        }
        state.withLock { state in
            guard !state.ranVCPUs.contains(fd), state.runs == runsBefore else { return }
            state.vcpuHeld[fd] = Dictionary(
                sections.filter { LinuxKVM.heldSections.contains($0.name) }.map { ($0.name, $0.bytes) }) { _, last in last }
        }
        return VCPUState(sections: sections)
    }

    /// The vcpu's CPUID entries as KVM holds them now, runtime bits and all (KVM_GET_CPUID2);
    /// nil before any were set. A save's `cpuid` section is these without the runtime bits.
    public func heldCPUID(_ vcpu: KernelHandle) -> [CPUIDEntry]? { currentCPUID(vcpu.raw).map(CPUIDEntry.list) }

    /// The vcpu's CPUID entries as KVM holds them (KVM_GET_CPUID2); nil before any were set.
    private func currentCPUID(_ fd: Int32) -> [UInt8]? {
        var cpuid = [UInt8](repeating: 0, count: 8 + 256 * Int(CKVM_SIZEOF_CPUID_ENTRY2))
        cpuid.withUnsafeMutableBytes { $0.storeBytes(of: UInt32(256), as: UInt32.self) }
        guard cpuid.withUnsafeMutableBytes({ Syscalls.ioctl(fd, CKVM_GET_CPUID2, $0.baseAddress) }) == 0 else { return nil }
        let count = min(256, Int(cpuid.loadLE(UInt32.self, at: 0)))
        return count > 0 ? Array(cpuid[8..<(8 + count * Int(CKVM_SIZEOF_CPUID_ENTRY2))]) : nil
    }

    /// The vcpu's TSC frequency: KVM_GET_TSC_KHZ once, then what it answered or what
    /// KVM_SET_TSC_KHZ set since (nothing else changes it).
    private func tscKhz(_ fd: Int32) throws(KernelError) -> UInt32 {
        if let known = state.withLock({ $0.vcpuTSCKhz[fd] }) { return known }
        let khz = Syscalls.ioctl(fd, CKVM_GET_TSC_KHZ, value: 0)
        guard khz > 0 else { throw .failed(operation: .getVCPUState, errno: .current) }
        state.withLock { $0.vcpuTSCKhz[fd] = UInt32(khz) }
        return UInt32(khz)
    }

    /// KVM_VCPU_TSC_OFFSET, where the kernel has the attribute (asked once).
    private func tscOffset(_ vcpu: KernelHandle) -> UInt64? {
        var value: UInt64 = 0
        return withUnsafeMutablePointer(to: &value) { pointer -> UInt64? in
            var attribute = kvm_device_attr()
            attribute.group = CKVM_VCPU_TSC_CTRL
            attribute.attr = CKVM_VCPU_TSC_OFFSET
            attribute.addr = UInt64(UInt(bitPattern: pointer))
            let has: Bool
            if let known = state.withLock({ $0.tscOffsetAttribute }) {
                has = known
            } else {
                has = Syscalls.ioctl(vcpu.raw, CKVM_HAS_DEVICE_ATTR, &attribute) == 0
                // Remembered only when KVM answered: it has the attribute, or has none (ENXIO).
                if has || Errno.current == .noSuchDeviceOrAddress { state.withLock { $0.tscOffsetAttribute = has } }
            }
            guard has, Syscalls.ioctl(vcpu.raw, CKVM_GET_DEVICE_ATTR, &attribute) == 0 else { return nil }
            return pointer.pointee
        }
    }

    /// Restores every section present, in QEMU's put order (docs/vmstate.md): CPUID first (MSR
    /// writes are checked against it; not set again where the vcpu holds it), the TSC frequency
    /// (not set where the vcpu runs at it), sregs2, regs, xsave, xcrs, MSRs but the TSC
    /// deadline (and but the TSC where the offset is set), the TSC offset (which decides the
    /// guest TSC whatever the TSC MSR wrote; not set where the vcpu holds it, `spareTSCOffset`),
    /// events, MP state, LAPIC (after the APIC base in sregs), then the TSC deadline (restoring
    /// the LAPIC resets the deadline timer, and KVM arms it against the guest TSC as it stands),
    /// and the debug registers. QEMU also sets the events
    /// before the regs, so that the SMM flag precedes nested state; no nested state moves here,
    /// and KVM_SET_REGS drops a pending exception set before it, so the events go once, after.
    /// Where the sync area serves the vcpu (`syncArea`), the MP state goes before the sregs (a
    /// vcpu in KVM_MP_STATE_UNINITIALIZED, an AP of a new VM, takes no synced registers), and
    /// the sregs and regs go in one KVM_RUN that enters no guest (`syncRun`), which reads them
    /// back as well: the vcpu then holds what KVM stored (`vcpuHeld`).
    public func setVCPUState(_ vcpu: KernelHandle, _ newState: VCPUState) throws(KernelError) {
        let fd = vcpu.raw
        try checkSizes(newState.sections, operation: .setVCPUState)
        // The registers held are dropped first: a set that fails part-way (KVM takes the regs
        // before the sregs) leaves nothing held.
        let runsBefore = state.withLock { state in
            for name in LinuxKVM.registerSections { state.vcpuHeld[fd]?[name] = nil }
            return state.runs
        }
        /// Holds these sections' bytes as the vcpu's unless a run began since this set did.
        func hold(_ sections: [String: [UInt8]]) {
            state.withLock { state in
                guard !state.ranVCPUs.contains(fd), state.runs == runsBefore else { return }
                state.vcpuHeld[fd, default: [:]].merge(sections) { _, new in new }
            }
        }
        // A section the vcpu holds already, byte for byte (`vcpuHeld`), is not set again:
        // a vcpu ioctl less inside the blackout for each (10-20 µs on this nested host). A
        // target's vcpus, read by its rehearsal and never run, hold the debug registers and
        // often the events and MP state a running guest's vcpus are saved with.
        func setUnlessHeld(_ name: String, _ request: UInt, _ bytes: [UInt8]) throws(KernelError) {
            guard spare(fd, name, if: { $0 == bytes }) == nil else { return }
            state.withLock { $0.vcpuHeld[fd]?[name] = nil }
            try set(fd, request, bytes, section: name)
        }
        // KVM keeps an MP state of RUNNABLE or HALTED as given (kvm_arch_vcpu_ioctl_set_mpstate),
        // and before the vcpu runs only a pending INIT or SIPI changes it, which the next
        // KVM_GET_MP_STATE would accept. None is pending once the events set with it latch no
        // INIT (KVM_VCPUEVENT_VALID_SMM with smi.latched_init 0 clears KVM_APIC_INIT; a SIPI acts
        // only on INIT_RECEIVED; no other vcpu runs to send one): a vcpu that never ran then
        // holds it, and a read-back answers it, and the registers it holds, without a call.
        let latchesNoINIT = newState["events"].map { $0.count > 27 && $0.loadLE(UInt32.self, at: 20) & 0x8 != 0 && $0[27] == 0 } ?? false
        func setMPState(_ bytes: [UInt8]) throws(KernelError) {
            try setUnlessHeld("mp-state", CKVM_SET_MP_STATE, bytes)
            let value = bytes.loadLE(UInt32.self, at: 0)
            if latchesNoINIT, value == 0 || value == 3 { hold(["mp-state": bytes]) }  // RUNNABLE, HALTED
        }
        if let cpuid = newState["cpuid"] {
            // KVM_SET_CPUID2 is the costliest call of a restore here (0.07-0.15 ms a vcpu: KVM
            // recomputes the vcpu's CPU model). A vcpu that holds these entries already, but for
            // the bits KVM rewrites itself from the sregs and MSRs set below, keeps them, as
            // QEMU's destination does (its migration stream carries no CPUID); the read-back
            // compares what KVM answered after its set (`setCPUID`), without runtime bits.
            let held = state.withLock({ $0.vcpuCPUID[fd] }) ?? heldCPUID(vcpu).map(CPUIDEntry.withoutRuntimeBits)
            if !(held.map { CPUIDEntry.sameButRuntimeBits(cpuid, $0) } ?? false) { try setCPUID(vcpu, CPUIDEntry.list(cpuid)) }
        }
        if let khz = newState["tsc-khz"].map({ $0.loadLE(UInt32.self, at: 0) }) {
            // Unknown (KVM_GET_TSC_KHZ failed): set it, as when it differs.
            let current = (try? tscKhz(fd)) ?? 0
            if current != khz {
                defer { state.withLock { $0.vcpuTSCKhz[fd] = nil } }  // asked again next time, whatever happened
                guard stateSupport().tscControl, Syscalls.ioctl(fd, CKVM_SET_TSC_KHZ, value: UInt(khz)) == 0 else {
                    throw .unsupported(
                        operation: .setVCPUState,
                        reason: "section tsc-khz: the source's TSC runs at \(khz) kHz, this vcpu's at \(current) kHz, and this host cannot set it (no KVM_CAP_TSC_CONTROL)")
                }
            }
        }
        let v2 = newState["sregs2"] != nil
        let sregsName = v2 ? "sregs2" : "sregs"
        var mpStateSet = false
        var registersSynced = false
        if let run = syncArea(fd), let regs = newState["regs"], let sregs = newState[sregsName], newState["sregs2"] == nil || newState["sregs"] == nil {
            if let mp = newState["mp-state"] {
                try setMPState(mp)
                mpStateSet = true
            }
            if let synced = try syncRun(fd, run, setting: (regs, sregs), v2: v2, events: false) {
                registersSynced = true
                var held = ["regs": synced.regs]
                held[sregsName] = synced.sregs
                hold(held)
            }
        }
        if !registersSynced {
            if let bytes = newState["sregs2"] { try set(fd, CKVM_SET_SREGS2, bytes, section: "sregs2") }
            if let bytes = newState["sregs"] { try set(fd, CKVM_SET_SREGS, bytes, section: "sregs") }
            if let bytes = newState["regs"] { try set(fd, CKVM_SET_REGS, bytes, section: "regs") }
        }
        if let bytes = newState["xsave"] { try set(fd, CKVM_SET_XSAVE, bytes, section: "xsave") }
        if let bytes = newState["fpu"] { try set(fd, CKVM_SET_FPU, bytes, section: "fpu") }
        if let bytes = newState["xcrs"] {
            try setUnlessHeld("xcrs", CKVM_SET_XCRS, bytes)
            // KVM_SET_XCRS takes XCR0 exactly or refuses it (`__kvm_set_xcr`), and
            // KVM_GET_XCRS answers a zeroed struct with XCR0 alone: bytes of that form are what
            // a read answers until a run or another set changes XCR0.
            if LinuxKVM.isXCR0Alone(bytes) { hold(["xcrs": bytes]) }
        }
        let deadline: UInt32 = 0x6e0
        // The TSC offset where QEMU writes the TSC (with the MSRs, before the LAPIC and the
        // deadline): KVM arms a TSC deadline at its write against the guest's TSC as it then
        // stands, and does not re-arm it when the offset moves. An offset the vcpu holds (a read
        // answered it and nothing since moved it) is not set again.
        func setTSCOffset() throws(KernelError) {
            guard let bytes = newState["tsc-offset"], spareTSCOffset(fd, if: { $0 == bytes }) == nil else { return }
            state.withLock { $0.vcpuHeld[fd]?["tsc-offset"] = nil }
            var value = bytes.loadLE(UInt64.self, at: 0)
            let result = withUnsafeMutablePointer(to: &value) { pointer -> Int32 in
                var attribute = kvm_device_attr()
                attribute.group = CKVM_VCPU_TSC_CTRL
                attribute.attr = CKVM_VCPU_TSC_OFFSET
                attribute.addr = UInt64(UInt(bitPattern: pointer))
                return Syscalls.ioctl(fd, CKVM_SET_DEVICE_ATTR, &attribute)
            }
            guard result == 0 else { throw .failed(operation: .setVCPUState, errno: .current) }
        }
        func setEventsMPStateAndLAPIC() throws(KernelError) {
            if let events = newState["events"] { try setUnlessHeld("events", CKVM_SET_VCPU_EVENTS, events) }
            if let mp = newState["mp-state"], !mpStateSet { try setMPState(mp) }
            if let lapic = newState["lapic"] { try set(fd, CKVM_SET_LAPIC, lapic, section: "lapic") }
        }
        if let bytes = newState["msrs"] {
            let all = MSRList(bytes: bytes).entries
            // A deadline of 0 (no TSC-deadline timer armed: the LAPIC's own timer, or none) is not
            // written into a vcpu that never ran: it holds 0 (KVM_SET_LAPIC keeps a deadline
            // set before, so one that ran might not), and the read-back compares it. One vcpu
            // ioctl less inside the blackout.
            let neverRan = !state.withLock { $0.ranVCPUs.contains(fd) }
            // The TSC is not written where the TSC offset is set after it: the offset decides the
            // guest's TSC whatever the TSC's write made of it (both go through
            // `__kvm_synchronize_tsc`, which also matches the vcpus' TSCs for the master clock),
            // and the write would move the offset the vcpu holds.
            let tsc: UInt32 = 0x10
            let offsetSet = newState["tsc-offset"] != nil
            let first = all.filter { $0.index != deadline && !($0.index == tsc && offsetSet) }
            for (index, batch) in [first, all.filter { $0.index == deadline && !($0.value == 0 && neverRan) }].enumerated() {
                // Between the two batches: the TSC offset, the events, MP state and LAPIC.
                if index == 1 {
                    try setTSCOffset()
                    try setEventsMPStateAndLAPIC()
                }
                guard !batch.isEmpty else { continue }
                if batch.contains(where: { $0.index == tsc }) { state.withLock { $0.vcpuHeld[fd]?["tsc-offset"] = nil } }
                var records = MSRList(entries: batch).bytes
                let written = msrIoctl(vcpu, CKVM_SET_MSRS, &records)
                guard written == Int32(batch.count) else {
                    // KVM_SET_MSRS stops at the first MSR it refuses: `written` names it.
                    guard written >= 0, let refused = batch.dropFirst(Int(written)).first else {
                        throw .failed(operation: .setVCPUState, errno: .current)
                    }
                    throw .refused(
                        operation: .setVCPUState, errno: .invalidArgument,
                        detail: "section msrs: KVM_SET_MSRS refused MSR 0x\(String(refused.index, radix: 16)) = 0x\(String(refused.value, radix: 16)) (\(written) of \(batch.count) written)")
                }
            }
        } else {
            try setTSCOffset()
            try setEventsMPStateAndLAPIC()
        }
        if let bytes = newState["debugregs"] { try setUnlessHeld("debugregs", CKVM_SET_DEBUGREGS, bytes) }
    }

    /// How many vcpu calls of a save, a set or a read-back were spared because the vcpu held
    /// the section's bytes already (a set of them skipped, a read answered from them).
    public var heldCallsSkipped: Int { state.withLock { $0.heldCallsSkipped } }

    /// The sections a vcpu that never ran holds as KVM last answered them (`vcpuHeld`); the
    /// regs and sregs too, which a read answers only with the MP state held as well, and the TSC
    /// offset, answered only on a stable TSC (`spareTSCOffset`).
    static let heldSections: Set<String> = Set(["events", "mp-state", "debugregs", "xcrs", "tsc-offset"]).union(registerSections)

    /// Whether `bytes` are a `struct kvm_xcrs` as KVM_GET_XCRS answers it: one XCR, XCR0, and
    /// zeros but for its value.
    static func isXCR0Alone(_ bytes: [UInt8]) -> Bool {
        guard bytes.count == Int(CKVM_SIZEOF_XCRS), bytes.loadLE(UInt32.self, at: 0) == 1 else { return false }
        return bytes.indices.allSatisfy { (0..<4).contains($0) || (16..<24).contains($0) || bytes[$0] == 0 }
    }

    /// The sections a sync run moves but the events.
    static let registerSections: Set<String> = ["regs", "sregs2", "sregs"]

    /// The size of KVM's struct for each section a set hands KVM by pointer (KVM copies the
    /// struct's size from it, whatever the section's length), or the least an XSAVE area has.
    private func structSize(_ name: String) -> (bytes: Int, atLeast: Bool)? {
        switch name {
        case "regs": (Int(CKVM_SIZEOF_REGS), false)
        case "sregs": (Int(CKVM_SIZEOF_SREGS), false)
        case "sregs2": (Int(CKVM_SIZEOF_SREGS2), false)
        case "fpu": (Int(CKVM_SIZEOF_FPU), false)
        case "xsave": (max(4096, stateSupport().xsaveSize), true)
        case "xcrs": (Int(CKVM_SIZEOF_XCRS), false)
        case "events": (Int(CKVM_SIZEOF_VCPU_EVENTS), false)
        case "mp-state", "tsc-khz": (4, false)
        case "tsc-offset": (8, false)
        case "lapic": (Int(CKVM_SIZEOF_LAPIC), false)
        case "debugregs": (Int(CKVM_SIZEOF_DEBUGREGS), false)
        case "pic-master", "pic-slave", "ioapic": (Int(CKVM_SIZEOF_IRQCHIP), false)
        case "pit2": (Int(CKVM_SIZEOF_PIT_STATE2), false)
        case "clock": (Int(CKVM_SIZEOF_CLOCK_DATA), false)
        default: nil  // cpuid and msrs are parsed entry by entry
        }
    }

    /// Refuses, before anything is set, a section shorter or longer than KVM's struct for it:
    /// KVM would read past the bytes given (a state from a peer or the journal is input).
    private func checkSizes(_ sections: [StateSection], operation: KernelOperation) throws(KernelError) {
        for section in sections {
            guard let (size, atLeast) = structSize(section.name) else { continue }
            guard atLeast ? section.bytes.count >= size : section.bytes.count == size else {
                throw .refused(
                    operation: operation, errno: .invalidArgument,
                    detail: "section \(section.name): \(section.bytes.count) bytes, where KVM's struct has \(atLeast ? "at least " : "")\(size)")
            }
        }
    }

    /// How many KVM_RUNs that entered no guest moved a vcpu's registers (`syncRun`).
    public var syncRunsTaken: Int { state.withLock { $0.syncRuns } }

    /// Whether this instance moves the regs, sregs and events of a VM with an in-kernel LAPIC
    /// through the kvm_run's sync area (`syncRun`): the host offers it and it was not declined.
    public var movesRegistersThroughSyncArea: Bool { usesSyncArea && stateSupport().syncRegs }

    /// KVM_SYNC_X86_REGS, KVM_SYNC_X86_SREGS and KVM_SYNC_X86_EVENTS.
    static let syncedFields = 0x7

    /// The kvm_run of vcpu `fd`, where its regs, sregs and events can move through the sync area
    /// (`syncRun`): this host offers it (`StateSupport.syncRegs`), the VM has an in-kernel LAPIC
    /// (without one KVM_RUN first sets CR8 from the kvm_run's own field) and no encryption
    /// context (its state is the guest's own).
    private func syncArea(_ fd: Int32) -> UnsafeMutableRawPointer? {
        guard movesRegistersThroughSyncArea else { return nil }
        return state.withLock { state -> UnsafeMutableRawPointer? in
            guard let vm = state.vcpuVMs[fd], state.irqchips.contains(vm), !(state.vmTypes[vm] ?? .default).hasEncryptionContext,
                let base = state.runMappings[fd]
            else { return nil }
            return UnsafeMutableRawPointer(bitPattern: base)
        }
    }

    /// What one KVM_RUN that entered no guest stored: the regs, the sregs (nil for a vcpu in PAE
    /// paging, whose PDPTRs only KVM_GET_SREGS2 reads) and, where asked, the vcpu events.
    private struct Synced {
        var regs: [UInt8]
        var sregs: [UInt8]?
        var events: [UInt8]?
    }

    /// One KVM_RUN with immediate_exit on vcpu `fd`, which runs no guest instruction (KVM
    /// returns before it enters the guest), for the registers it moves through the kvm_run's
    /// sync area (`ckvm_sync_run`): with `setting`, KVM takes those regs and sregs first, as
    /// KVM_SET_REGS and KVM_SET_SREGS(2) would; on the way out it stores the regs, the sregs and
    /// the events, as the KVM_GET calls would answer them. One vcpu call for up to six (each
    /// 9-13 µs on this nested host, inside the blackout). Not a run for `ranVCPUs` or
    /// `vcpuHeld`: the guest did not enter. Nil where KVM did not take the registers (a vcpu
    /// in KVM_MP_STATE_UNINITIALIZED exits before it syncs) or sregs2 carry PDPTRs: the
    /// caller uses the ioctls. Only for a vcpu whose thread is not in KVM_RUN (a paused source's,
    /// a target's before its restore): it writes the vcpu's kvm_run page.
    private func syncRun(
        _ fd: Int32, _ run: UnsafeMutableRawPointer, setting: (regs: [UInt8], sregs: [UInt8])?, v2: Bool, events: Bool
    ) throws(KernelError) -> Synced? {
        let sregsSize = Int(v2 ? CKVM_SIZEOF_SREGS2 : CKVM_SIZEOF_SREGS)
        var regs = setting?.regs ?? [UInt8](repeating: 0, count: Int(CKVM_SIZEOF_REGS))
        var sregs = setting?.sregs ?? [UInt8](repeating: 0, count: sregsSize)
        // The C side copies KVM's sizes (`checkSizes` refused any other before a set).
        guard regs.count == Int(CKVM_SIZEOF_REGS) && sregs.count == sregsSize else { return nil }
        var eventBytes = [UInt8](repeating: 0, count: events ? Int(CKVM_SIZEOF_VCPU_EVENTS) : 0)
        let operation: KernelOperation = setting == nil ? .getVCPUState : .setVCPUState
        let result = regs.withUnsafeMutableBytes { r in
            sregs.withUnsafeMutableBytes { s in
                eventBytes.withUnsafeMutableBytes { e in
                    ckvm_sync_run(fd, run, setting == nil ? 0 : 1, v2 ? 1 : 0, r.baseAddress, s.baseAddress, events ? e.baseAddress : nil)
                }
            }
        }
        if result == 0 || result == 2 { state.withLock { $0.syncRuns += 1 } }
        switch result {
        case 0: return Synced(regs: regs, sregs: sregs, events: events ? eventBytes : nil)
        case 2: return Synced(regs: regs, sregs: nil, events: events ? eventBytes : nil)
        case 1, 3: return nil
        default: throw .failed(operation: operation, errno: Errno(rawValue: -result))
        }
    }

    /// The regs and sregs vcpu `fd` holds (`vcpuHeld`), both or neither, counting the two
    /// calls they spare.
    private func spareRegisters(_ fd: Int32, _ sregsName: String) -> (regs: [UInt8], sregs: [UInt8])? {
        state.withLock { state in
            guard let held = state.vcpuHeld[fd], let regs = held["regs"], let sregs = held[sregsName] else { return nil }
            state.heldCallsSkipped += 2
            return (regs, sregs)
        }
    }

    /// What vcpu `fd` holds of section `name` (`vcpuHeld`: a run since it was read empties
    /// it), where `matches` accepts it, counting the call it spares.
    private func spare(_ fd: Int32, _ name: String, if matches: ([UInt8]) -> Bool = { _ in true }) -> [UInt8]? {
        state.withLock { state in
            guard let bytes = state.vcpuHeld[fd]?[name], matches(bytes) else { return nil }
            state.heldCallsSkipped += 1
            return bytes
        }
    }

    /// The TSC offset vcpu `fd` holds, where `matches` accepts it and the host's TSC is
    /// stable, counting the call it spares. A read holds the offset KVM answered
    /// (KVM_GET_DEVICE_ATTR): KVM moves it at a write of the TSC or of the offset (dropped
    /// then), a run (drops all), and, on a host whose TSC is unstable, at every load of the vcpu
    /// (`kvm_arch_vcpu_load`), which any vcpu ioctl does: held on a stable TSC only. Left aside:
    /// KVM's own corrections at a vcpu load after a host suspend (`tsc_offset_adjustment`) or
    /// when it sees the TSC go backwards (then marked unstable, but sysfs says so only once the
    /// watchdog switched clock sources); what a read would see then is KVM's correction, not a
    /// state this restore got wrong. Not held as a set gave it: on this host (PVM) the offset
    /// reads back 0 whatever was set.
    private func spareTSCOffset(_ fd: Int32, if matches: ([UInt8]) -> Bool = { _ in true }) -> [UInt8]? {
        guard state.withLock({ $0.vcpuHeld[fd]?["tsc-offset"] }).map(matches) ?? false, hostTSCIsStable() else { return nil }
        return spare(fd, "tsc-offset", if: matches)
    }

    /// Whether the host's clock source is the TSC: Linux leaves it once it finds the TSC
    /// unstable (`mark_tsc_unstable`), the case where KVM rewrites a vcpu's TSC offset whenever
    /// it loads the vcpu. Read from sysfs at most once a second (a read costs
    /// 7 µs here, a vcpu call 10-20).
    private func hostTSCIsStable() -> Bool {
        let now = MonotonicClock.nanoseconds
        if let known = state.withLock({ $0.tscStable }), now &- known.at < 1_000_000_000 { return known.stable }
        let stable = LinuxKVM.clockSourceIsTSC()
        state.withLock { $0.tscStable = (now, stable) }
        return stable
    }

    /// Whether `/sys/devices/system/clocksource/clocksource0/current_clocksource` says `tsc`.
    public static func clockSourceIsTSC() -> Bool {
        let fd = Syscalls.open("/sys/devices/system/clocksource/clocksource0/current_clocksource", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { Syscalls.close(fd) }
        var buffer = [UInt8](repeating: 0, count: 16)
        let count = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
        return count == 4 && buffer[0..<4].elementsEqual("tsc\n".utf8)
    }

    /// The VM's own state: the PIC pair and the IOAPIC, the PIT, the kvmclock.
    public func vmState(_ vm: KernelHandle) throws(KernelError) -> [StateSection] {
        try vmState(vm, only: Set(LinuxKVM.irqchipSections.map(\.name) + ["pit2", "clock"]))
    }

    /// The irqchip sections and KVM_GET_IRQCHIP's chip of each.
    private static let irqchipSections: [(name: String, chip: UInt32)] = [("pic-master", CKVM_IRQCHIP_PIC_MASTER), ("pic-slave", CKVM_IRQCHIP_PIC_SLAVE), ("ioapic", CKVM_IRQCHIP_IOAPIC)]

    public func vmState(_ vm: KernelHandle, only names: Set<String>) throws(KernelError) -> [StateSection] {
        var sections: [StateSection] = []
        if state.withLock({ $0.irqchips.contains(vm.raw) }) {
            for (name, chip) in LinuxKVM.irqchipSections where names.contains(name) {
                var bytes = [UInt8](repeating: 0, count: Int(CKVM_SIZEOF_IRQCHIP))
                bytes.withUnsafeMutableBytes { $0.storeBytes(of: chip, as: UInt32.self) }
                guard bytes.withUnsafeMutableBytes({ Syscalls.ioctl(vm.raw, CKVM_GET_IRQCHIP, $0.baseAddress) }) == 0 else {
                    throw .failed(operation: .getVMState, errno: .current)
                }
                sections.append(.init(name: name, bytes: bytes))
            }
            if names.contains("pit2") {
                sections.append(.init(name: "pit2", bytes: try get(vm.raw, CKVM_GET_PIT2, size: Int(CKVM_SIZEOF_PIT_STATE2), operation: .getVMState)))
            }
        }
        if names.contains("clock") {
            sections.append(.init(name: "clock", bytes: try get(vm.raw, CKVM_GET_CLOCK, size: Int(CKVM_SIZEOF_CLOCK_DATA), operation: .getVMState)))
        }
        return sections
    }

    /// Restores the VM's sections: the irqchips and the PIT; the clock last, with the flags
    /// KVM_GET_CLOCK returned, so that guest time advances by the real time that passed.
    public func setVMState(_ vm: KernelHandle, _ sections: [StateSection]) throws(KernelError) {
        try checkSizes(sections, operation: .setVMState)
        for name in ["pic-master", "pic-slave", "ioapic"] {
            guard let bytes = sections.first(where: { $0.name == name })?.bytes else { continue }
            try set(vm.raw, CKVM_SET_IRQCHIP, bytes, section: name, operation: .setVMState)
        }
        if let bytes = sections.first(where: { $0.name == "pit2" })?.bytes {
            try set(vm.raw, CKVM_SET_PIT2, bytes, section: "pit2", operation: .setVMState)
        }
        if var bytes = sections.first(where: { $0.name == "clock" })?.bytes {
            // KVM_SET_CLOCK takes REALTIME (it adds the real time since `realtime`); the other
            // flags KVM_GET_CLOCK reported describe the clock and are not input.
            let flagsOffset = 8
            let flags = bytes.loadLE(UInt32.self, at: flagsOffset) & CKVM_CLOCK_REALTIME
            for (index, byte) in withUnsafeBytes(of: flags.littleEndian, Array.init).enumerated() { bytes[flagsOffset + index] = byte }
            try set(vm.raw, CKVM_SET_CLOCK, bytes, section: "clock", operation: .setVMState)
        }
    }

    /// Byte offsets in `struct kvm_run` (include/uapi/linux/kvm.h): the ABI is fixed.
    private enum RunLayout {
        static let immediateExit = 1
        static let exitReason = 8
        static let union = 32
    }

    public func run(_ vcpu: KernelHandle) throws(KernelError) -> VCPUExit {
        // Under the one lock a run takes: the mapping, and that the vcpu ran.
        let mapping = state.withLock { state -> UInt? in
            state.ranVCPUs.insert(vcpu.raw)
            state.runs &+= 1
            if !state.vcpuHeld.isEmpty { state.vcpuHeld.removeAll() }
            return state.runMappings[vcpu.raw]
        }
        guard let base = mapping, let run = UnsafeMutableRawPointer(bitPattern: base)
        else { preconditionFailure("vcpu \(vcpu) has no kvm_run mapping") }
        let result = Syscalls.run(vcpu.raw)
        let error = Errno.current
        let reason = run.load(fromByteOffset: RunLayout.exitReason, as: UInt32.self)
        let union = run + RunLayout.union
        if result < 0 {
            // EAGAIN: a vcpu waiting for INIT/SIPI (an AP of an in-kernel irqchip) was woken
            // by something other than a signal; the VMM simply runs it again.
            if error == .interrupted || error == .tryAgain { return .interrupted }
            if error == .badAddress && reason == CKVM_EXIT_MEMORY_FAULT {
                return .memoryFault(
                    address: union.load(fromByteOffset: 8, as: UInt64.self),
                    size: union.load(fromByteOffset: 16, as: UInt64.self))
            }
            throw .failed(operation: .runVCPU, errno: error)
        }
        switch reason {
        case UInt32(KVM_EXIT_IO):
            let isWrite = union.load(fromByteOffset: 0, as: UInt8.self) == UInt8(KVM_EXIT_IO_OUT)
            let size = union.load(fromByteOffset: 1, as: UInt8.self)
            let port = union.load(fromByteOffset: 2, as: UInt16.self)
            let count = union.load(fromByteOffset: 4, as: UInt32.self)
            let dataOffset = Int(union.load(fromByteOffset: 8, as: UInt64.self))
            let length = Int(size) * Int(count)
            let data = isWrite ? Array(UnsafeRawBufferPointer(start: run + dataOffset, count: length)) : []
            return .io(port: port, isWrite: isWrite, size: size, data: data)
        case UInt32(KVM_EXIT_MMIO):
            let length = Int(union.load(fromByteOffset: 16, as: UInt32.self))
            let isWrite = union.load(fromByteOffset: 20, as: UInt8.self) != 0
            let data = isWrite ? Array(UnsafeRawBufferPointer(start: union + 8, count: min(length, 8))) : []
            return .mmio(address: union.load(fromByteOffset: 0, as: UInt64.self), isWrite: isWrite, data: data)
        case UInt32(KVM_EXIT_HLT): return .halt
        case UInt32(KVM_EXIT_SHUTDOWN): return .shutdown
        case UInt32(KVM_EXIT_INTERNAL_ERROR): return .internalError(suberror: union.load(as: UInt32.self))
        case UInt32(KVM_EXIT_FAIL_ENTRY): return .failEntry(reason: union.load(as: UInt64.self))
        case UInt32(KVM_EXIT_INTR): return .interrupted
        default: return .other(reason: reason)
        }
    }

    /// Asks a vcpu blocked in (or about to enter) `KVM_RUN` to return with EINTR; used together
    /// with a signal to pause a running vcpu.
    /// KVM has no ioctl that reads memslots back.
    public func memslotPlacement(vm: KernelHandle) -> [UInt32: (guestPhysicalAddress: UInt64, size: UInt64)]? { nil }

    public func requestImmediateExit(_ vcpu: KernelHandle, _ value: Bool) {
        guard let base = state.withLock({ $0.runMappings[vcpu.raw] }), let run = UnsafeMutableRawPointer(bitPattern: base)
        else { return }
        run.storeBytes(of: value ? 1 : 0, toByteOffset: RunLayout.immediateExit, as: UInt8.self)
    }

    public func prefault(_ vcpu: KernelHandle, guestPhysicalAddress: UInt64, size: UInt64) throws(KernelError) {
        // KVM_PRE_FAULT_MEMORY needs the TDP MMU; KVM_CAP_PRE_FAULT_MEMORY says whether it is there.
        if try !probe().preFaultMemory {
            throw .unsupported(operation: .prefault, reason: "KVM_CAP_PRE_FAULT_MEMORY is 0 (no TDP MMU on this host)")
        }
        var argument = ckvm_pre_fault_memory()
        argument.gpa = guestPhysicalAddress
        argument.size = size
        // KVM_PRE_FAULT_MEMORY may map only part of the range and answer how much is left.
        while true {
            let result = ckvm_ioctl_ptr(vcpu.raw, CKVM_PRE_FAULT_MEMORY, &argument)
            if result >= 0 && argument.size == 0 { return }
            if result < 0 {
                let error = Errno.current
                if error == .interrupted || error == .resourceBusy { continue }
                throw .failed(operation: .prefault, errno: error)
            }
        }
    }

    // MARK: - Confidential VMs

    public func launch(vm: KernelHandle) throws(KernelError) {
        let type = state.withLock { $0.vmTypes[vm.raw] } ?? .default
        if type.hasEncryptionContext {
            throw .unsupported(
                operation: .launch,
                reason: "launching a \(type.name) guest needs its firmware protocol, which the linux backend does not drive")
        }
        // A VM without an encryption context: KVM_MEMORY_ENCRYPT_OP answers ENOTTY on hosts
        // without SEV/TDX (vendor op missing or !is_td), EINVAL where SEV refuses the type.
        var command = ckvm_sev_cmd()
        command.id = CKVM_SEV_INIT2
        guard Syscalls.ioctl(vm.raw, CKVM_MEMORY_ENCRYPT_OP, &command) == 0 else {
            throw .failed(operation: .launch, errno: .current)
        }
    }

    public func moveEncryptionContext(to destination: KernelHandle, from source: KernelHandle) throws(KernelError) {
        var argument = kvm_enable_cap()
        argument.cap = UInt32(Capability.vmMoveEncContextFrom.rawValue)
        argument.args.0 = UInt64(bitPattern: Int64(source.raw))
        if Syscalls.ioctl(destination.raw, CKVM_ENABLE_CAP, &argument) == 0 { return }
        let error = Errno.current
        let feature = try probe().moveEncryptionContext
        if !feature.supported && error == .invalidArgument {
            throw .unsupported(operation: .moveEncryptionContext, reason: feature.detail)
        }
        throw .failed(operation: .moveEncryptionContext, errno: error)
    }

    public func linkGuestMemfd(_ file: KernelHandle, into vm: KernelHandle, flags: UInt64) throws(KernelError) -> KernelHandle {
        var argument = ckvm_link_guest_memfd()
        argument.fd = UInt64(UInt32(bitPattern: file.raw))
        argument.flags = flags
        let fd = Syscalls.ioctl(vm.raw, CKVM_LINK_GUEST_MEMFD, &argument)
        guard fd >= 0 else {
            let error = Errno.current
            if error == .inappropriateIOCTLForDevice {
                throw .unsupported(operation: .linkGuestMemfd, reason: "KVM_LINK_GUEST_MEMFD answered ENOTTY: this kernel lacks it")
            }
            throw .failed(operation: .linkGuestMemfd, errno: error)
        }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        state.withLock { _ = $0.open.insert(fd) }
        return KernelHandle(raw: fd)
    }

    // MARK: - Lifetime and other processes

    public func close(_ handle: KernelHandle) {
        let mapping = state.withLock { state -> UInt? in
            state.vmTypes[handle.raw] = nil
            state.open.remove(handle.raw)
            state.vcpuVMs[handle.raw] = nil
            state.vcpuCPUID[handle.raw] = nil
            state.vcpuSaveShapes[handle.raw] = nil
            state.vcpuTSCKhz[handle.raw] = nil
            state.ranVCPUs.remove(handle.raw)
            state.vcpuHeld[handle.raw] = nil
            state.irqchips.remove(handle.raw)
            return state.runMappings.removeValue(forKey: handle.raw)
        }
        if let mapping { Syscalls.munmap(UInt64(mapping), length: vcpuMmapSize) }
        Syscalls.close(handle.raw)
    }

    public func attemptInAnotherProcess(_ request: ForeignRequest) -> KernelError? {
        let operation: KernelOperation
        let result: Int32
        switch request {
        case .checkExtension(let vm, let capability):
            operation = .checkExtension
            result = Syscalls.ioctlInChild(vm.raw, CKVM_CHECK_EXTENSION, value: UInt(capability.rawValue))
        case .createGuestMemfd(let vm, let size, let flags):
            operation = .createGuestMemfd
            var argument = ckvm_create_guest_memfd()
            argument.size = size
            argument.flags = flags.rawValue
            result = Syscalls.ioctlInChild(vm.raw, CKVM_CREATE_GUEST_MEMFD, &argument)
        case .createVCPU(let vm, let id):
            operation = .createVCPU
            result = Syscalls.ioctlInChild(vm.raw, CKVM_CREATE_VCPU, value: UInt(id))
        case .punchHole(let file, let offset, let length):
            operation = .punchHole
            result = Syscalls.punchHoleInChild(file.raw, offset: offset, length: length)
        }
        if result == 0 { return nil }
        return .failed(operation: operation, errno: Errno(rawValue: abs(result)))
    }
}
