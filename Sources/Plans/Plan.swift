import Kernel

/// A validated migration plan: what to move (the source VM's shape), from where to where, how
/// (the strategy), and within which limits (the policy). Only `PlanLoader` makes one, so a
/// `MigrationPlan` value has passed every rule of `PlanValidator`.
public struct MigrationPlan: Sendable, Equatable, Codable {
    public static let apiVersion = "gmigrate/v1"
    public static let kind = "MigrationPlan"

    public var name: String
    public var source: Endpoint
    public var target: Endpoint
    public var vm: VMSpec
    public var strategy: Strategy
    public var policy: Policy
    /// Faults for test suites (`spec.faults`); honoured only with `--allow-faults`.
    public var faults: [FaultSpec] = []
}

/// Where a VMM is: in the coordinator's own process, a process the coordinator starts, or a
/// running VMM's handoff socket.
public enum Endpoint: Sendable, Equatable, Codable, CustomStringConvertible {
    case inProcess
    case spawn
    case socket(path: String)

    public var description: String {
        switch self {
        case .inProcess: "in-process"
        case .spawn: "spawn"
        case .socket(let path): path
        }
    }
}

/// The source VM as the plan declares it; the source VMM's own description is checked against it.
public struct VMSpec: Sendable, Equatable, Codable {
    public var type: VMType
    public var vcpus: Int
    public var guestMemfds: [GuestMemfdSpec]
    public var memslots: [MemslotSpec]
    public var nics: [NICSpec]
}

public struct GuestMemfdSpec: Sendable, Equatable, Codable {
    public var name: String
    public var size: UInt64
    public var flags: GuestMemfdFlags
}

public struct MemslotSpec: Sendable, Equatable, Codable {
    public var slot: UInt32
    public var guestPhysAddr: UInt64
    public var size: UInt64
    public var guestMemfd: String
    public var offset: UInt64
}

public struct NICSpec: Sendable, Equatable, Codable {
    public var name: String
    public var mtu: Int?
    public var bridge: String?
    public var queues: Int?
}

/// How guest memory reaches the target VM (architecture.md, "Memory hand-over strategies").
public enum Strategy: String, Sendable, Equatable, Codable, CaseIterable {
    /// link if the host can, else share, else copy.
    case auto
    /// A new gmem file on the source's inode, bound to the target (`KVM_LINK_GUEST_MEMFD`).
    case link
    /// The target maps the source gmem file and binds an hva memslot to it.
    case share
    /// The target creates its own gmem and copies the populated ranges.
    case copy
}

public struct Policy: Sendable, Equatable, Codable {
    /// The longest the guest may be paused (source paused to target running).
    public var maxBlackout: Duration
    /// The longest any one step may take before it is treated as failed.
    public var stepTimeout: Duration

    public static let defaultMaxBlackout: Duration = .milliseconds(50)
    public static let defaultStepTimeout: Duration = .seconds(5)
    /// The longest duration a plan may give (`duration-too-long` beyond it): a day. Every
    /// timeout derived from a plan stays far from any integer limit (milliseconds in an
    /// Int32 for SO_RCVTIMEO, nanoseconds in an Int64).
    public static let maximumDuration: Duration = .seconds(86_400)
}

/// Parses `50ms`, `5s`, `1m`, `250us`, `100ns`, `1h`; nil for anything else.
public func parseDuration(_ text: String) -> Duration? {
    let units: [(String, Duration)] = [
        ("ns", .nanoseconds(1)), ("us", .microseconds(1)), ("ms", .milliseconds(1)), ("s", .seconds(1)),
        ("m", .seconds(60)), ("h", .seconds(3600)),
    ]
    for (suffix, unit) in units where text.hasSuffix(suffix) {
        let number = text.dropLast(suffix.count)
        // "ms" also ends in "s": take the longest suffix that leaves a number.
        guard !number.isEmpty, number.allSatisfy({ $0.isNumber || $0 == "." }), let value = Double(number), value.isFinite else { continue }
        // Beyond the maximum, the value is not multiplied (which could trap): it is answered
        // as just over the maximum, which the parser reports as too long.
        let seconds = value * Double(unit.components.seconds) + value * Double(unit.components.attoseconds) / 1e18
        guard seconds <= Double(Policy.maximumDuration.components.seconds) else { return Policy.maximumDuration + .nanoseconds(1) }
        return unit * value
    }
    return nil
}

extension Duration {
    /// `50ms`, `5s`, `1.5s`: the shortest exact rendering used in reports.
    public var text: String {
        let (seconds, attoseconds) = components
        // Int128: no duration a Duration can hold traps here.
        let nanoseconds = Int128(seconds) * 1_000_000_000 + Int128(attoseconds / 1_000_000_000)
        if nanoseconds % 1_000_000_000 == 0 { return "\(nanoseconds / 1_000_000_000)s" }
        if nanoseconds % 1_000_000 == 0 { return "\(nanoseconds / 1_000_000)ms" }
        if nanoseconds % 1_000 == 0 { return "\(nanoseconds / 1_000)us" }
        return "\(nanoseconds)ns"
    }
}

/// This host's network interfaces, as rtnetlink shows them (filled by HostNet), for `--host`
/// checks of `spec.vm.nics`.
public struct HostNetwork: Sendable, Equatable {
    public struct Link: Sendable, Equatable {
        public var isUp: Bool
        public var mtu: UInt32
        public var master: String?
        /// IFLA_INFO_KIND: `tun` for a tap.
        public var kind: String?
        public init(isUp: Bool, mtu: UInt32, master: String?, kind: String?) {
            self.isUp = isUp
            self.mtu = mtu
            self.master = master
            self.kind = kind
        }
    }

    public var links: [String: Link]
    public init(links: [String: Link]) { self.links = links }
}
