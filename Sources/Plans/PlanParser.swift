import Foundation
import Kernel

/// The plan as written, before validation: every field optional, each with its place in the file.
struct PlanDraft {
    struct Gmem {
        var path: String
        var name: String?
        var size: UInt64?
        var flags: GuestMemfdFlags?
        var flagNames: [String] = []
    }
    struct Slot {
        var path: String
        var slot: UInt32?
        var guestPhysAddr: UInt64?
        var size: UInt64?
        var guestMemfd: String?
        var offset: UInt64?
    }
    struct NIC {
        var path: String
        var name: String?
        var mtu: Int?
        var bridge: String?
        var queues: Int?
    }

    var apiVersion: String?
    var kind: String?
    var name: String?
    var source: Endpoint?
    var target: Endpoint?
    var type: VMType?
    var vcpus: Int?
    var gmems: [Gmem] = []
    var slots: [Slot] = []
    var nics: [NIC] = []
    var strategy: Strategy?
    var maxBlackout: Duration?
    var stepTimeout: Duration?
    var faults: [FaultSpec] = []
}

/// Reads the YAML/JSON node tree strictly: wrong kinds, unknown and duplicate fields, values
/// that do not parse, all reported with their field path and line:column; parsing goes on
/// after a problem so that one run reports every one.
struct PlanParser {
    var diagnostics: [PlanDiagnostic] = []
    /// The document, for the position of a field path a rule reports without its node: found
    /// by walking the path when a diagnostic needs it (rarely).
    var root: PlanNode?

    mutating func report(_ code: PlanRule, _ path: String, _ message: String, severity: PlanDiagnostic.Severity = .error, at node: PlanNode? = nil) {
        let place = node ?? self.node(at: path)
        diagnostics.append(PlanDiagnostic(severity: severity, code: code, path: path, line: place?.line, column: place?.column, message: message))
    }

    /// The node at a field path (`spec.vm.memslots[3].size`), if the document has one.
    func node(at path: String) -> PlanNode? {
        var current = root
        for component in path.split(separator: ".") {
            var name = component
            var indices: [Int] = []
            while name.hasSuffix("]"), let open = name.lastIndex(of: "[") {
                guard let index = Int(name[name.index(after: open)..<name.index(before: name.endIndex)]) else { return nil }
                indices.insert(index, at: 0)
                name = name[..<open]
            }
            if !name.isEmpty { current = current?[String(name)] }
            for index in indices {
                guard let sequence = current?.sequence, index >= 0, index < sequence.count else { return nil }
                current = sequence[index]
            }
            if current == nil { return nil }
        }
        return current
    }

    static func join(_ path: String, _ key: String) -> String { path.isEmpty ? key : path + "." + key }

    private static func kindName(_ node: PlanNode) -> String {
        switch node.content {
        case .scalar: "a scalar"
        case .mapping: "a mapping"
        case .sequence: "a list"
        }
    }

    /// The fields of one mapping, in file order (a handful: a linear search beats hashing).
    struct Fields {
        var entries: [(name: String, node: PlanNode)] = []
        subscript(name: String) -> PlanNode? { entries.first { $0.name == name }?.node }
    }

    /// The fields of a mapping, checked against the allowed and required names.
    mutating func mapping(_ node: PlanNode, _ path: String, allowed: [String], required: [String] = []) -> Fields? {
        guard case .mapping(let mapping) = node.content else {
            report(.invalidType, path, "expected a mapping, found \(PlanParser.kindName(node))", at: node)
            return nil
        }
        var fields = Fields()
        fields.entries.reserveCapacity(mapping.count)
        for (keyNode, value) in mapping {
            guard case .scalar(let name) = keyNode.content else {
                report(.invalidType, path, "field names must be scalars", at: keyNode)
                continue
            }
            guard allowed.contains(name) else {
                let fieldPath = PlanParser.join(path, name)
                let hint = PlanParser.closest(name, among: allowed).map { " (did you mean '\($0)'?)" } ?? ""
                report(.unknownField, fieldPath, "unknown field '\(name)'\(hint); allowed: \(allowed.joined(separator: ", "))", at: keyNode)
                continue
            }
            guard fields[name] == nil else {
                report(.duplicateField, PlanParser.join(path, name), "'\(name)' is given twice in one mapping", at: keyNode)
                continue
            }
            fields.entries.append((name, value))
        }
        for name in required where fields[name] == nil {
            report(.missingField, PlanParser.join(path, name), "required field '\(name)' is missing", at: node)
        }
        return fields
    }

    mutating func sequence(_ node: PlanNode, _ path: @autoclosure () -> String) -> [PlanNode]? {
        guard case .sequence(let sequence) = node.content else {
            report(.invalidType, path(), "expected a list, found \(PlanParser.kindName(node))", at: node)
            return nil
        }
        return sequence
    }

    mutating func string(_ node: PlanNode, _ path: @autoclosure () -> String) -> String? {
        guard case .scalar(let scalar) = node.content else {
            report(.invalidType, path(), "expected a scalar, found \(PlanParser.kindName(node))", at: node)
            return nil
        }
        return scalar
    }

    /// A size, offset or address: plain integer, 0x hex, or Ki/Mi/Gi/Ti (K/M/G/T) suffix.
    mutating func quantity(_ node: PlanNode, _ path: @autoclosure () -> String) -> UInt64? {
        guard let text = string(node, path()) else { return nil }
        let compact = text.utf8.contains(UInt8(ascii: "_")) ? String(text.filter { $0 != "_" }) : text
        guard let value = parseQuantity(compact) else {
            report(.invalidValue, path(), "'\(text)' is not a size or address (an integer, 0x hex, or a Ki/Mi/Gi/Ti suffix)", at: node)
            return nil
        }
        return value
    }

    mutating func integer(_ node: PlanNode, _ path: @autoclosure () -> String) -> Int? {
        guard let text = string(node, path()) else { return nil }
        guard let value = Int(text) else {
            report(.invalidValue, path(), "'\(text)' is not an integer", at: node)
            return nil
        }
        return value
    }

    mutating func duration(_ node: PlanNode, _ path: String) -> Duration? {
        guard let text = string(node, path) else { return nil }
        guard let value = parseDuration(text) else {
            report(.invalidDuration, path, "'\(text)' is not a duration (a number with ns, us, ms, s, m or h: 50ms, 5s)", at: node)
            return nil
        }
        guard value <= Policy.maximumDuration else {
            report(.durationTooLong, path, "'\(text)' is longer than the maximum, a day (\(Policy.maximumDuration.text))", at: node)
            return nil
        }
        return value
    }

    mutating func endpoint(_ node: PlanNode, _ path: String, allowSpawn: Bool) -> Endpoint? {
        guard let text = string(node, path) else { return nil }
        switch text {
        case "in-process": return .inProcess
        case "spawn":
            guard allowSpawn else {
                report(.invalidEndpoint, path, "the source VMM must already run: give its socket path or in-process, not spawn", at: node)
                return nil
            }
            return .spawn
        default:
            guard text.hasPrefix("/"), text.utf8.count < 108, !text.contains("\0") else {
                report(.invalidEndpoint, path,
                    "'\(text)' is none of in-process\(allowSpawn ? ", spawn" : "") or an absolute UNIX socket path (under 108 bytes)", at: node)
                return nil
            }
            return .socket(path: text)
        }
    }

    mutating func enumeration<T>(_ node: PlanNode, _ path: String, _ values: [(String, T)]) -> T? {
        guard let text = string(node, path) else { return nil }
        guard let (_, value) = values.first(where: { $0.0 == text }) else {
            report(.invalidValue, path, "'\(text)' is none of \(values.map(\.0).joined(separator: ", "))", at: node)
            return nil
        }
        return value
    }

    // MARK: - The plan

    mutating func parse(_ root: PlanNode) -> PlanDraft {
        self.root = root
        var draft = PlanDraft()
        guard let top = mapping(root, "", allowed: ["apiVersion", "kind", "metadata", "spec"], required: ["apiVersion", "kind", "metadata", "spec"])
        else { return draft }
        if let node = top["apiVersion"] { draft.apiVersion = string(node, "apiVersion") }
        if let node = top["kind"] { draft.kind = string(node, "kind") }
        if let node = top["metadata"], let metadata = mapping(node, "metadata", allowed: ["name", "labels"], required: ["name"]) {
            if let name = metadata["name"] { draft.name = string(name, "metadata.name") }
            if let labels = metadata["labels"], let fields = mapping(labels, "metadata.labels", allowed: []) {
                _ = fields  // labels are free-form in Kubernetes; gmigrate takes none yet
            }
        }
        guard let specNode = top["spec"],
            let spec = mapping(specNode, "spec", allowed: ["source", "target", "vm", "strategy", "policy", "faults"], required: ["source", "target", "vm"])
        else { return draft }
        if let node = spec["source"], let source = mapping(node, "spec.source", allowed: ["vmm"], required: ["vmm"]), let vmm = source["vmm"] {
            draft.source = endpoint(vmm, "spec.source.vmm", allowSpawn: false)
        }
        if let node = spec["target"], let target = mapping(node, "spec.target", allowed: ["vmm"], required: ["vmm"]), let vmm = target["vmm"] {
            draft.target = endpoint(vmm, "spec.target.vmm", allowSpawn: true)
        }
        if let node = spec["vm"] { parseVM(node, into: &draft) }
        draft.strategy = .auto
        if let node = spec["strategy"] {
            draft.strategy = enumeration(node, "spec.strategy", Strategy.allCases.map { ($0.rawValue, $0) })
        }
        draft.maxBlackout = Policy.defaultMaxBlackout
        draft.stepTimeout = Policy.defaultStepTimeout
        if let node = spec["policy"], let policy = mapping(node, "spec.policy", allowed: ["maxBlackout", "stepTimeout"]) {
            if let value = policy["maxBlackout"] { draft.maxBlackout = duration(value, "spec.policy.maxBlackout") }
            if let value = policy["stepTimeout"] { draft.stepTimeout = duration(value, "spec.policy.stepTimeout") }
        }
        if let node = spec["faults"], let items = sequence(node, "spec.faults") {
            for (index, item) in items.enumerated() {
                let path = "spec.faults[\(index)]"
                guard let text = string(item, path) else { continue }
                do {
                    draft.faults.append(try FaultSpec(parsing: text))
                } catch {
                    report(.invalidFault, path, error.message, at: item)
                }
            }
        }
        return draft
    }

    private mutating func parseVM(_ node: PlanNode, into draft: inout PlanDraft) {
        let path = "spec.vm"
        guard let vm = mapping(node, path, allowed: ["type", "vcpus", "guestMemfds", "memslots", "nics"], required: ["vcpus", "guestMemfds", "memslots"])
        else { return }
        draft.type = .default
        if let value = vm["type"] { draft.type = enumeration(value, "spec.vm.type", VMType.allCases.map { ($0.name, $0) }) }
        if let value = vm["vcpus"] { draft.vcpus = integer(value, "spec.vm.vcpus") }
        if let value = vm["guestMemfds"], let items = sequence(value, "spec.vm.guestMemfds") {
            for (index, item) in items.enumerated() {
                let itemPath = "spec.vm.guestMemfds[\(index)]"
                var gmem = PlanDraft.Gmem(path: itemPath)
                if let fields = mapping(item, itemPath, allowed: ["name", "size", "flags"], required: ["name", "size"]) {
                    if let name = fields["name"] { gmem.name = string(name, itemPath + ".name") }
                    if let size = fields["size"] { gmem.size = quantity(size, itemPath + ".size") }
                    gmem.flags = []
                    if let flags = fields["flags"], let list = sequence(flags, itemPath + ".flags") {
                        var parsed = GuestMemfdFlags()
                        for (flagIndex, flagNode) in list.enumerated() {
                            let flagPath = itemPath + ".flags[\(flagIndex)]"
                            guard let name = string(flagNode, flagPath) else { continue }
                            guard let flag = GuestMemfdFlags.known.first(where: { $0.0 == name })?.1 else {
                                report(.invalidFlag, flagPath, "unknown guest_memfd flag '\(name)' (mmap, init-shared)", at: flagNode)
                                continue
                            }
                            parsed.insert(flag)
                        }
                        gmem.flags = parsed
                    }
                }
                draft.gmems.append(gmem)
            }
        }
        if let value = vm["memslots"], let items = sequence(value, "spec.vm.memslots") {
            for (index, item) in items.enumerated() {
                let itemPath = "spec.vm.memslots[\(index)]"
                var slot = PlanDraft.Slot(path: itemPath)
                if let fields = mapping(
                    item, itemPath, allowed: ["slot", "guestPhysAddr", "size", "guestMemfd", "offset"],
                    required: ["slot", "guestPhysAddr", "size", "guestMemfd"])
                {
                    if let node = fields["slot"], let number = quantity(node, itemPath + ".slot") {
                        if number > UInt64(UInt32.max) {
                            report(.slotOutOfRange, itemPath + ".slot", "slot \(number) does not fit the kernel's 32-bit slot field", at: node)
                        } else {
                            slot.slot = UInt32(number)
                        }
                    }
                    if let node = fields["guestPhysAddr"] { slot.guestPhysAddr = quantity(node, itemPath + ".guestPhysAddr") }
                    if let node = fields["size"] { slot.size = quantity(node, itemPath + ".size") }
                    if let node = fields["guestMemfd"] { slot.guestMemfd = string(node, itemPath + ".guestMemfd") }
                    slot.offset = 0
                    if let node = fields["offset"] { slot.offset = quantity(node, itemPath + ".offset") }
                }
                draft.slots.append(slot)
            }
        }
        if let value = vm["nics"], let items = sequence(value, "spec.vm.nics") {
            for (index, item) in items.enumerated() {
                let itemPath = "spec.vm.nics[\(index)]"
                var nic = PlanDraft.NIC(path: itemPath)
                if let fields = mapping(item, itemPath, allowed: ["name", "mtu", "bridge", "queues"], required: ["name"]) {
                    if let node = fields["name"] { nic.name = string(node, itemPath + ".name") }
                    if let node = fields["mtu"] { nic.mtu = integer(node, itemPath + ".mtu") }
                    if let node = fields["bridge"] { nic.bridge = string(node, itemPath + ".bridge") }
                    if let node = fields["queues"] { nic.queues = integer(node, itemPath + ".queues") }
                }
                draft.nics.append(nic)
            }
        }
    }

    /// The allowed name closest to a typo (edit distance at most 3), for "did you mean".
    static func closest(_ word: String, among candidates: [String]) -> String? {
        func distance(_ a: [Character], _ b: [Character]) -> Int {
            var previous = Array(0...b.count)
            for (i, x) in a.enumerated() {
                var current = [i + 1] + Array(repeating: 0, count: b.count)
                for (j, y) in b.enumerated() {
                    current[j + 1] = min(previous[j + 1] + 1, current[j] + 1, previous[j] + (x == y ? 0 : 1))
                }
                previous = current
            }
            return previous[b.count]
        }
        let scored = candidates.map { ($0, distance(Array(word.lowercased()), Array($0.lowercased()))) }
        guard let best = scored.min(by: { $0.1 < $1.1 }), best.1 <= 3 else { return nil }
        return best.0
    }
}
