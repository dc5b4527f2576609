import Foundation
import Kernel

/// The kernel limits the validator checks against when no host is given: x86 KVM as the
/// reference model stands for it (KVM_USER_MEM_SLOTS, KVM_MAX_VCPUS of this machine kind).
public struct KernelLimits: Sendable, Equatable {
    public var memslots: Int
    public var maxVCPUs: Int

    public static let reference: KernelLimits = {
        let options = KernelModel.Options()
        return KernelLimits(memslots: options.memslotsPerAddressSpace, maxVCPUs: options.maxVCPUs)
    }()

    public init(memslots: Int, maxVCPUs: Int) {
        self.memslots = memslots
        self.maxVCPUs = maxVCPUs
    }

    public init(_ host: HostCapabilities) {
        self.init(memslots: host.limits.memslots, maxVCPUs: host.limits.maxVCPUs)
    }
}

/// The one place where plan rules live. The CLI (`gmigrate plan validate`), the orchestrator
/// and the daemon all load plans through `PlanLoader.load`, so a plan that passed can never
/// fail later for a reason these rules could have seen.
public enum PlanLoader {
    /// Largest plan file accepted (a control plane's plan is kilobytes; 4096 memslots ~ 600 KiB).
    public static let maxBytes = 16 << 20

    /// Parses and validates one plan text (YAML or JSON).
    /// - Parameter host: this host's probed capabilities, for `--host` checks; nil for the plan alone.
    /// - Parameter strategy: overrides the plan's strategy (`gmigrate migrate --strategy`), checked by the same rules.
    public static func load(
        text: String, file: String, host: HostCapabilities? = nil, strategy override: Strategy? = nil, network: HostNetwork? = nil
    ) -> PlanReport {
        guard text.utf8.count <= maxBytes else {
            return PlanReport(
                file: file, parsed: false,
                diagnostics: [PlanDiagnostic(code: .syntaxError, path: "", message: "the plan is larger than \(maxBytes) bytes")],
                strategy: nil, plan: nil)
        }
        let root: PlanNode?
        do {
            // libyaml's events straight into the parser's nodes: scalars stay text (the parser
            // reads sizes, addresses and durations itself), and a key given twice is kept for
            // the parser to report with its path, like every other problem of a readable plan.
            root = try PlanNode.compose(text)
        } catch {
            return PlanReport(
                file: file, parsed: false,
                diagnostics: [PlanDiagnostic(code: .syntaxError, path: "", line: error.line, column: error.column, message: error.message)],
                strategy: nil, plan: nil)
        }
        guard let root else {
            return PlanReport(
                file: file, parsed: false,
                diagnostics: [PlanDiagnostic(code: .syntaxError, path: "", line: 1, column: 1, message: "the file is empty")],
                strategy: nil, plan: nil)
        }
        var parser = PlanParser()
        var draft = parser.parse(root)
        if let override { draft.strategy = override }
        var validator = PlanValidator(parser: parser, limits: host.map(KernelLimits.init) ?? .reference)
        validator.validate(draft)
        var choice: PlanReport.StrategyChoice? = nil
        if let host, let strategy = draft.strategy, let type = draft.type {
            choice = validator.checkHost(draft, type: type, strategy: strategy, host: host)
        }
        if let network { validator.checkNetwork(draft, network) }
        let diagnostics = validator.parser.diagnostics.sorted {
            ($0.line ?? Int.max, $0.column ?? Int.max, $0.path) < ($1.line ?? Int.max, $1.column ?? Int.max, $1.path)
        }
        let hasError = diagnostics.contains { $0.severity == .error }
        return PlanReport(
            file: file, parsed: true, diagnostics: diagnostics, strategy: choice,
            plan: hasError ? nil : PlanValidator.build(draft, chosen: choice?.chosen))
    }

    /// Reads and validates a plan file; an unreadable file is reported, not thrown.
    public static func load(path: String, host: HostCapabilities? = nil, strategy: Strategy? = nil, network: HostNetwork? = nil) -> PlanReport {
        guard let data = FileManager.default.contents(atPath: path) else {
            return PlanReport(
                file: path, parsed: false,
                diagnostics: [PlanDiagnostic(code: .syntaxError, path: "", message: "cannot read the file")],
                strategy: nil, plan: nil)
        }
        guard let text = String(data: data, encoding: .utf8) else {
            return PlanReport(
                file: path, parsed: false,
                diagnostics: [PlanDiagnostic(code: .syntaxError, path: "", message: "the file is not UTF-8 text")],
                strategy: nil, plan: nil)
        }
        return load(text: text, file: path, host: host, strategy: strategy, network: network)
    }
}

/// The rules, applied to the draft so that every problem is found in one run.
struct PlanValidator {
    var parser: PlanParser
    var limits: KernelLimits

    /// KVM_MEM_MAX_NR_PAGES.
    static let maxPagesPerSlot: UInt64 = (1 << 31) - 1
    static let pageSize: UInt64 = 4096

    mutating func report(_ code: PlanRule, _ path: String, _ message: String, severity: PlanDiagnostic.Severity = .error) {
        parser.report(code, path, message, severity: severity)
    }

    static func hex(_ value: UInt64) -> String { "0x" + String(value, radix: 16) }

    static func size(_ value: UInt64) -> String {
        for (unit, shift) in [("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10)] where value >= 1 << shift && value % (1 << shift) == 0 {
            return "\(value >> UInt64(shift))\(unit)"
        }
        return "\(value)"
    }

    mutating func validate(_ draft: PlanDraft) {
        if let apiVersion = draft.apiVersion, apiVersion != MigrationPlan.apiVersion {
            report(.unsupportedAPIVersion, "apiVersion", "'\(apiVersion)' is not supported; this gmigrate reads \(MigrationPlan.apiVersion)")
        }
        if let kind = draft.kind, kind != MigrationPlan.kind {
            report(.wrongKind, "kind", "'\(kind)' is not a \(MigrationPlan.kind)")
        }
        if let name = draft.name, !PlanValidator.isDNSLabel(name) {
            report(.invalidName, "metadata.name", "'\(name)' is not a name: 1-63 lowercase letters, digits and '-', starting and ending with a letter or digit")
        }
        if let vcpus = draft.vcpus, vcpus < 1 || vcpus > limits.maxVCPUs {
            report(.vcpusOutOfRange, "spec.vm.vcpus", "\(vcpus) vcpus: KVM allows 1 to \(limits.maxVCPUs) (KVM_CAP_MAX_VCPUS)")
        }
        validateGmems(draft)
        validateSlots(draft)
        validateNICs(draft)
        validateStrategy(draft)
        // One VMM cannot be both ends: `/run/a.sock` and `/run/./a.sock` are one socket.
        if case .socket(let source)? = draft.source, case .socket(let target)? = draft.target,
            (source as NSString).standardizingPath == (target as NSString).standardizingPath
        {
            report(.sourceIsTarget, "spec.target.vmm", "\(target) is the source's socket too: a VM migrates into another VMM")
        }
        for (path, value) in [("spec.policy.maxBlackout", draft.maxBlackout), ("spec.policy.stepTimeout", draft.stepTimeout)] {
            if let value, value <= .zero {
                report(.nonPositiveDuration, path, "\(value.text) is not a positive duration")
            }
        }
    }

    static func isDNSLabel(_ name: String) -> Bool {
        let characters = Array(name.utf8)
        guard (1...63).contains(characters.count), let first = characters.first, let last = characters.last else { return false }
        func alphanumeric(_ c: UInt8) -> Bool { (c >= 97 && c <= 122) || (c >= 48 && c <= 57) }
        return alphanumeric(first) && alphanumeric(last) && characters.allSatisfy { alphanumeric($0) || $0 == 45 }
    }

    private mutating func validateGmems(_ draft: PlanDraft) {
        var seen: [String: String] = [:]
        for gmem in draft.gmems {
            if let name = gmem.name {
                if name.isEmpty {
                    report(.invalidValue, gmem.path + ".name", "the name is empty")
                } else if let first = seen[name] {
                    report(.duplicateGmem, gmem.path + ".name", "'\(name)' is already declared at \(first)")
                } else {
                    seen[name] = gmem.path
                }
            }
            if let size = gmem.size {
                // kvm_gmem_create: size <= 0 (loff_t) or not page-aligned → EINVAL.
                if size == 0 {
                    report(.zeroSize, gmem.path + ".size", "a guest_memfd cannot be empty")
                } else if size >= 1 << 63 {
                    report(.sizeTooLarge, gmem.path + ".size", "\(PlanValidator.hex(size)) bytes does not fit the kernel's loff_t")
                } else if size % PlanValidator.pageSize != 0 {
                    report(.misaligned, gmem.path + ".size", "\(size) bytes is not a multiple of the 4096-byte page")
                }
            }
            if let flags = gmem.flags, let type = draft.type {
                let unsupported = flags.subtracting(type.supportedGuestMemfdFlags)
                if !unsupported.isEmpty {
                    report(.flagUnsupportedForType, gmem.path + ".flags",
                        "\(unsupported.names.joined(separator: ", ")) is not available to a \(type.name) VM (it allows: \(type.supportedGuestMemfdFlags.names.joined(separator: ", ")))")
                }
            }
        }
    }

    private mutating func validateSlots(_ draft: PlanDraft) {
        let gmems = Dictionary(draft.gmems.compactMap { g in g.name.map { ($0, g) } }, uniquingKeysWith: { first, _ in first })
        var seenSlots: [UInt32: String] = [:]
        var used: Set<String> = []
        // (start, end, path) of well-formed slots, for the sorted-interval overlap checks.
        var gpaRanges: [(UInt64, UInt64, String, UInt32)] = []
        var gmemRanges: [String: [(UInt64, UInt64, String, UInt32)]] = [:]
        for slot in draft.slots {
            var wellFormed = true
            if let id = slot.slot {
                if let first = seenSlots[id] {
                    report(.duplicateSlot, slot.path + ".slot", "slot \(id) is already used by \(first)")
                    wellFormed = false
                } else {
                    seenSlots[id] = slot.path
                }
                if id >= UInt32(limits.memslots) {
                    report(.slotOutOfRange, slot.path + ".slot", "slot \(id) is beyond the kernel's \(limits.memslots) memslots (KVM_CAP_NR_MEMSLOTS)")
                    wellFormed = false
                }
            }
            var gmem: PlanDraft.Gmem? = nil
            if let name = slot.guestMemfd {
                used.insert(name)
                gmem = gmems[name]
                if gmem == nil {
                    let declared = gmems.keys.sorted()
                    let hint = PlanParser.closest(name, among: declared).map { " (did you mean '\($0)'?)" } ?? ""
                    report(.unknownGmem, slot.path + ".guestMemfd",
                        "no guest_memfd named '\(name)' is declared\(hint)" + (declared.isEmpty ? "" : "; declared: \(declared.joined(separator: ", "))"))
                }
            }
            for (field, value) in [("guestPhysAddr", slot.guestPhysAddr), ("size", slot.size), ("offset", slot.offset)] {
                if let value, value % PlanValidator.pageSize != 0 {
                    report(.misaligned, slot.path + "." + field, "\(PlanValidator.hex(value)) is not a multiple of the 4096-byte page")
                    wellFormed = false
                }
            }
            guard let gpa = slot.guestPhysAddr, let size = slot.size, let offset = slot.offset else { continue }
            if size == 0 {
                report(.zeroSize, slot.path + ".size", "a memslot of size 0 is a delete, not a slot")
                continue
            }
            if size / PlanValidator.pageSize > PlanValidator.maxPagesPerSlot {
                report(.sizeTooLarge, slot.path + ".size", "\(PlanValidator.size(size)) exceeds KVM's \(PlanValidator.maxPagesPerSlot) pages per memslot")
                wellFormed = false
            }
            let (gpaEnd, gpaOverflow) = gpa.addingReportingOverflow(size)
            if gpaOverflow {
                report(.gpaOverflow, slot.path + ".guestPhysAddr", "\(PlanValidator.hex(gpa)) + \(PlanValidator.size(size)) wraps around the address space")
                continue
            }
            let (fileEnd, fileOverflow) = offset.addingReportingOverflow(size)
            if let gmem, let fileSize = gmem.size, fileOverflow || fileEnd > fileSize {
                report(.offsetBeyondFile, slot.path + ".offset",
                    "offset \(PlanValidator.size(offset)) + size \(PlanValidator.size(size)) goes beyond '\(gmem.name ?? "")' (\(PlanValidator.size(fileSize)))")
                wellFormed = false
            }
            guard wellFormed, let id = slot.slot else { continue }
            gpaRanges.append((gpa, gpaEnd, slot.path, id))
            if let name = slot.guestMemfd, gmem != nil, !fileOverflow {
                gmemRanges[name, default: []].append((offset, fileEnd, slot.path, id))
            }
        }
        // Overlaps on sorted intervals: O(n log n), each range compared with the furthest-reaching before it.
        func overlaps(_ ranges: [(UInt64, UInt64, String, UInt32)], _ body: (_ earlier: (UInt64, UInt64, String, UInt32), _ later: (UInt64, UInt64, String, UInt32)) -> Void) {
            let sorted = ranges.sorted { ($0.0, $0.1) < ($1.0, $1.1) }
            var reach: (UInt64, UInt64, String, UInt32)? = nil
            for range in sorted {
                if let furthest = reach {
                    if range.0 < furthest.1 { body(furthest, range) }
                    if range.1 > furthest.1 { reach = range }
                } else {
                    reach = range
                }
            }
        }
        var found: [(PlanRule, String, String)] = []
        overlaps(gpaRanges) { earlier, later in
            found.append((.gpaOverlap, later.2 + ".guestPhysAddr",
                "slot \(later.3) [\(PlanValidator.hex(later.0)), \(PlanValidator.hex(later.1))) overlaps slot \(earlier.3) [\(PlanValidator.hex(earlier.0)), \(PlanValidator.hex(earlier.1))) in guest-physical space (KVM: EEXIST)"))
        }
        for (name, ranges) in gmemRanges.sorted(by: { $0.key < $1.key }) {
            overlaps(ranges) { earlier, later in
                found.append((.gmemRangeOverlap, later.2 + ".offset",
                    "slot \(later.3) binds [\(PlanValidator.size(later.0)), \(PlanValidator.size(later.1))) of '\(name)', which slot \(earlier.3) already binds from \(PlanValidator.size(earlier.0)) (KVM: EINVAL)"))
            }
        }
        for (code, path, message) in found { report(code, path, message) }
        for gmem in draft.gmems {
            if let name = gmem.name, !name.isEmpty, !used.contains(name) {
                report(.unusedGmem, gmem.path, "no memslot uses '\(name)': its memory would be handed over but never mapped", severity: .warning)
            }
        }
    }

    private mutating func validateNICs(_ draft: PlanDraft) {
        var seen: [String: String] = [:]
        for nic in draft.nics {
            if let name = nic.name {
                if name.isEmpty || name.utf8.count > 15 || name.contains("/") || name.contains(where: \.isWhitespace) {
                    report(.invalidValue, nic.path + ".name", "'\(name)' is not an interface name (1-15 bytes, no '/' or spaces)")
                } else if let first = seen[name] {
                    report(.duplicateNIC, nic.path + ".name", "'\(name)' is already listed at \(first)")
                } else {
                    seen[name] = nic.path
                }
            }
            if let mtu = nic.mtu, !(68...65535).contains(mtu) {
                report(.invalidValue, nic.path + ".mtu", "MTU \(mtu) is outside 68-65535")
            }
            if let queues = nic.queues, !(1...256).contains(queues) {
                report(.invalidValue, nic.path + ".queues", "\(queues) queues: a tap has 1 to 256")
            }
            if let bridge = nic.bridge, bridge.isEmpty || bridge.utf8.count > 15 {
                report(.invalidValue, nic.path + ".bridge", "'\(bridge)' is not an interface name (1-15 bytes)")
            }
        }
    }

    private mutating func validateStrategy(_ draft: PlanDraft) {
        guard let strategy = draft.strategy, let type = draft.type else { return }
        switch strategy {
        case .auto, .link:
            return
        case .share, .copy:
            if type.hasEncryptionContext {
                report(.confidentialNeedsLink, "spec.strategy",
                    "a \(type.name) VM's memory is encrypted under its context: it moves only by link with the move of the encryption context, not by \(strategy.rawValue)")
                return
            }
            for gmem in draft.gmems {
                guard let flags = gmem.flags else { continue }
                if !flags.contains(.mmap) {
                    report(.strategyNeedsMmap, gmem.path + ".flags",
                        "\(strategy.rawValue) maps '\(gmem.name ?? "")' in the target VMM: it needs the mmap flag")
                } else if !flags.contains(.initShared) {
                    report(.strategyNeedsInitShared, gmem.path + ".flags",
                        "\(strategy.rawValue) reads '\(gmem.name ?? "")' through a host mapping: it needs init-shared (without it, host faults raise SIGBUS)")
                }
            }
        }
    }

    /// Strategies that work for this plan on `host`, in `auto`'s order of preference, with why not for the others.
    static func possibleStrategies(_ draft: PlanDraft, type: VMType, host: HostCapabilities) -> [(Strategy, String?)] {
        let allMappable = draft.gmems.allSatisfy { ($0.flags ?? []).isSuperset(of: [.mmap, .initShared]) }
        var result: [(Strategy, String?)] = []
        if !host.link.supported {
            result.append((.link, "the link ioctl is unavailable: \(host.link.detail)"))
        } else if type.hasEncryptionContext && !host.moveEncryptionContext.supported {
            result.append((.link, "this kernel cannot move an encryption context (\(host.moveEncryptionContext.detail))"))
        } else {
            result.append((.link, nil))
        }
        let hostFlags = GuestMemfdFlags(rawValue: host.guestMemfd.supported ? host.guestMemfd.flagsRaw : 0)
        let shareWhyNot: String? =
            type.hasEncryptionContext ? "a \(type.name) VM's memory cannot be mapped by another VM"
            : !hostFlags.isSuperset(of: [.mmap, .initShared]) ? "this host's guest_memfd cannot be mapped (no mmap and init-shared)"
            : allMappable ? nil : "every guest_memfd needs mmap and init-shared"
        result.append((.share, shareWhyNot))
        result.append((.copy, shareWhyNot))
        return result
    }

    mutating func checkHost(_ draft: PlanDraft, type: VMType, strategy: Strategy, host: HostCapabilities) -> PlanReport.StrategyChoice {
        if !host.supports(type) {
            report(.vmTypeUnavailable, "spec.vm.type",
                "this host's KVM offers no \(type.name) VMs (KVM_CAP_VM_TYPES: \(host.vmTypes.joined(separator: ", ")))")
        }
        let hostFlags = GuestMemfdFlags(rawValue: host.guestMemfd.supported ? host.guestMemfd.flagsRaw : 0)
        for gmem in draft.gmems {
            guard let flags = gmem.flags else { continue }
            if !host.guestMemfd.supported {
                report(.flagUnsupportedOnHost, gmem.path, "this host's KVM has no guest_memfd (KVM_CAP_GUEST_MEMFD is 0)")
            } else if !flags.subtracting(hostFlags).isEmpty {
                report(.flagUnsupportedOnHost, gmem.path + ".flags",
                    "this host's guest_memfd lacks \(flags.subtracting(hostFlags).names.joined(separator: ", ")) (KVM_CAP_GUEST_MEMFD_FLAGS: \(hostFlags.names.joined(separator: ", ")))")
            }
        }
        let possible = PlanValidator.possibleStrategies(draft, type: type, host: host)
        switch strategy {
        case .auto:
            if let (chosen, _) = possible.first(where: { $0.1 == nil }) {
                let skipped = possible.prefix { $0.0 != chosen }.map { "not \($0.0.rawValue): \($0.1 ?? "")" }
                return .init(requested: .auto, chosen: chosen,
                    reason: skipped.isEmpty ? "\(chosen.rawValue) is possible here" : skipped.joined(separator: "; "))
            }
            let why = possible.map { "\($0.0.rawValue): \($0.1 ?? "")" }.joined(separator: "; ")
            report(.strategyUnavailable, "spec.strategy", "no strategy can move this VM on this host (\(why))")
            return .init(requested: .auto, chosen: nil, reason: why)
        case .link, .share, .copy:
            if let whyNot = possible.first(where: { $0.0 == strategy })?.1 {
                report(.strategyUnavailable, "spec.strategy", "\(strategy.rawValue) is not possible here: \(whyNot)")
                return .init(requested: strategy, chosen: nil, reason: whyNot)
            }
            return .init(requested: strategy, chosen: strategy, reason: "\(strategy.rawValue) is possible here")
        }
    }

    /// `--host`: each NIC exists here, is a tap, is up, has the plan's MTU and bridge (rtnetlink).
    mutating func checkNetwork(_ draft: PlanDraft, _ network: HostNetwork) {
        for nic in draft.nics {
            guard let name = nic.name else { continue }
            guard let link = network.links[name] else {
                report(.nicMissing, nic.path + ".name", "no interface '\(name)' on this host")
                continue
            }
            if link.kind != "tun" {
                report(.nicNotTap, nic.path + ".name", "'\(name)' is \(link.kind.map { "a \($0)" } ?? "not a tap") interface, not a tap")
            }
            if !link.isUp { report(.nicDown, nic.path + ".name", "'\(name)' is down") }
            if let mtu = nic.mtu, UInt32(clamping: mtu) != link.mtu {
                report(.nicMTUMismatch, nic.path + ".mtu", "'\(name)' has MTU \(link.mtu), the plan says \(mtu)")
            }
            if let bridge = nic.bridge, link.master != bridge {
                report(.nicWrongBridge, nic.path + ".bridge",
                    "'\(name)' is attached to \(link.master.map { "'\($0)'" } ?? "no bridge"), the plan says '\(bridge)'")
            }
        }
    }

    /// The typed plan, from a draft that produced no error.
    static func build(_ draft: PlanDraft, chosen: Strategy?) -> MigrationPlan? {
        guard let name = draft.name, let source = draft.source, let target = draft.target, let type = draft.type,
            let vcpus = draft.vcpus, let strategy = draft.strategy, let maxBlackout = draft.maxBlackout,
            let stepTimeout = draft.stepTimeout
        else { return nil }
        var gmems: [GuestMemfdSpec] = []
        for gmem in draft.gmems {
            guard let name = gmem.name, let size = gmem.size, let flags = gmem.flags else { return nil }
            gmems.append(GuestMemfdSpec(name: name, size: size, flags: flags))
        }
        var slots: [MemslotSpec] = []
        for slot in draft.slots {
            guard let id = slot.slot, let gpa = slot.guestPhysAddr, let size = slot.size, let file = slot.guestMemfd,
                let offset = slot.offset
            else { return nil }
            slots.append(MemslotSpec(slot: id, guestPhysAddr: gpa, size: size, guestMemfd: file, offset: offset))
        }
        var nics: [NICSpec] = []
        for nic in draft.nics {
            guard let name = nic.name else { return nil }
            nics.append(NICSpec(name: name, mtu: nic.mtu, bridge: nic.bridge, queues: nic.queues))
        }
        return MigrationPlan(
            name: name, source: source, target: target,
            vm: VMSpec(type: type, vcpus: vcpus, guestMemfds: gmems, memslots: slots, nics: nics),
            strategy: strategy, policy: Policy(maxBlackout: maxBlackout, stepTimeout: stepTimeout), faults: draft.faults)
    }
}
