/// What a host's KVM offers, as `gmigrate host probe` reports it. Every field is read from the
/// kernel (LinuxKVM) or states what the model models (KernelModel).
public struct HostCapabilities: Codable, Sendable, Equatable {
    /// One optional feature: whether it is there, and how that was found out.
    public struct Feature: Codable, Sendable, Equatable {
        public var supported: Bool
        public var detail: String
        public init(supported: Bool, detail: String) {
            self.supported = supported
            self.detail = detail
        }
    }

    public struct GuestMemfd: Codable, Sendable, Equatable {
        public var supported: Bool
        public var flags: [String]
        public var flagsRaw: UInt64

        public init(supported: Bool, flags: [String], flagsRaw: UInt64) {
            self.supported = supported
            self.flags = flags
            self.flagsRaw = flagsRaw
        }
    }

    public struct Limits: Codable, Sendable, Equatable {
        /// `KVM_CAP_NR_VCPUS`: the recommended maximum.
        public var recommendedVCPUs: Int
        /// `KVM_CAP_MAX_VCPUS`.
        public var maxVCPUs: Int
        /// `KVM_CAP_MAX_VCPU_ID`.
        public var maxVCPUID: Int
        /// `KVM_CAP_NR_MEMSLOTS`: user memslots per address space.
        public var memslots: Int
        /// `KVM_CAP_MULTI_ADDRESS_SPACE`.
        public var addressSpaces: Int
        /// The guest physical address bits a memslot may reach: one ending above
        /// `1 << maxGuestPhysicalBits` is EINVAL (x86 `kvm_mmu_max_gfn()`: the host's address
        /// width with TDP, 52 with shadow paging). Found by trying, not read from a table.
        public var maxGuestPhysicalBits: Int?

        public init(recommendedVCPUs: Int, maxVCPUs: Int, maxVCPUID: Int, memslots: Int, addressSpaces: Int, maxGuestPhysicalBits: Int? = nil) {
            self.recommendedVCPUs = recommendedVCPUs
            self.maxVCPUs = maxVCPUs
            self.maxVCPUID = maxVCPUID
            self.memslots = memslots
            self.addressSpaces = addressSpaces
            self.maxGuestPhysicalBits = maxGuestPhysicalBits
        }
    }

    public var backend: String
    public var apiVersion: Int
    public var vmTypes: [String]
    public var guestMemfd: GuestMemfd
    public var userMemoryRegion2: Bool
    public var preFaultMemory: Bool
    public var immediateExit: Bool
    public var link: Feature
    public var moveEncryptionContext: Feature
    public var copyEncryptionContext: Feature
    public var limits: Limits

    public init(
        backend: String, apiVersion: Int, vmTypes: [String], guestMemfd: GuestMemfd, userMemoryRegion2: Bool,
        preFaultMemory: Bool, immediateExit: Bool, link: Feature, moveEncryptionContext: Feature,
        copyEncryptionContext: Feature, limits: Limits
    ) {
        self.backend = backend
        self.apiVersion = apiVersion
        self.vmTypes = vmTypes
        self.guestMemfd = guestMemfd
        self.userMemoryRegion2 = userMemoryRegion2
        self.preFaultMemory = preFaultMemory
        self.immediateExit = immediateExit
        self.link = link
        self.moveEncryptionContext = moveEncryptionContext
        self.copyEncryptionContext = copyEncryptionContext
        self.limits = limits
    }

    public func supports(_ type: VMType) -> Bool { vmTypes.contains(type.name) }
}
