/// One problem (or note) the validator found in a plan file.
public struct PlanDiagnostic: Sendable, Equatable, Codable, CustomStringConvertible {
    public enum Severity: String, Sendable, Codable, Comparable {
        case warning
        case error

        public static func < (a: Severity, b: Severity) -> Bool { a == .warning && b == .error }
    }

    public var severity: Severity
    /// A stable code (`gpa-overlap`, `unknown-field`, ...), listed in `PlanRule`.
    public var code: String
    /// The field, as `spec.vm.memslots[1].offset`; empty for the document itself.
    public var path: String
    /// Where the field is in the file (1-based), when known.
    public var line: Int?
    public var column: Int?
    public var message: String

    public init(severity: Severity = .error, code: PlanRule, path: String, line: Int? = nil, column: Int? = nil, message: String) {
        self.severity = severity
        self.code = code.rawValue
        self.path = path
        self.line = line
        self.column = column
        self.message = message
    }

    /// `FILE:LINE:COLUMN: error: spec.vm.memslots[1].offset: offset-beyond-file: message`.
    public func rendered(file: String) -> String {
        var location = file
        if let line { location += ":\(line)" + (column.map { ":\($0)" } ?? "") }
        return "\(location): \(severity.rawValue): \(path.isEmpty ? "" : path + ": ")\(code): \(message)"
    }

    public var description: String { rendered(file: "plan") }
}

/// Every rule's stable code. Each has an example in migration-plans/invalid/ that the tests run.
public enum PlanRule: String, Sendable, CaseIterable, Codable {
    // The document
    case syntaxError = "syntax-error"
    case invalidType = "invalid-type"
    case unknownField = "unknown-field"
    case duplicateField = "duplicate-field"
    case missingField = "missing-field"
    case invalidValue = "invalid-value"
    case unsupportedAPIVersion = "unsupported-api-version"
    case wrongKind = "wrong-kind"
    case invalidName = "invalid-name"
    case invalidEndpoint = "invalid-endpoint"
    case sourceIsTarget = "source-is-target"
    // The kernel's gmem and memslot rules
    case misaligned = "misaligned"
    case zeroSize = "zero-size"
    case sizeTooLarge = "size-too-large"
    case invalidFlag = "invalid-flag"
    case flagUnsupportedForType = "flag-unsupported-for-type"
    case duplicateGmem = "duplicate-gmem"
    case duplicateSlot = "duplicate-slot"
    case slotOutOfRange = "slot-out-of-range"
    case gpaOverflow = "gpa-overflow"
    case gpaOverlap = "gpa-overlap"
    case gmemRangeOverlap = "gmem-range-overlap"
    case offsetBeyondFile = "offset-beyond-file"
    case vcpusOutOfRange = "vcpus-out-of-range"
    // References
    case unknownGmem = "unknown-gmem"
    case unusedGmem = "unused-gmem"
    case duplicateNIC = "duplicate-nic"
    // Strategy
    case strategyNeedsMmap = "strategy-needs-mmap"
    case strategyNeedsInitShared = "strategy-needs-init-shared"
    case confidentialNeedsLink = "confidential-needs-link"
    // Policy
    case invalidDuration = "invalid-duration"
    case nonPositiveDuration = "non-positive-duration"
    case durationTooLong = "duration-too-long"
    // Faults for test suites
    case invalidFault = "invalid-fault"
    // This host (--host)
    case vmTypeUnavailable = "vm-type-unavailable"
    case flagUnsupportedOnHost = "flag-unsupported-on-host"
    case strategyUnavailable = "strategy-unavailable"
    case nicMissing = "nic-missing"
    case nicNotTap = "nic-not-tap"
    case nicDown = "nic-down"
    case nicMTUMismatch = "nic-mtu-mismatch"
    case nicWrongBridge = "nic-wrong-bridge"
}

/// What validating one file found.
public struct PlanReport: Sendable, Equatable, Codable {
    /// What `auto` resolves to (or the requested strategy, checked) on the host given.
    public struct StrategyChoice: Sendable, Equatable, Codable {
        public var requested: Strategy
        public var chosen: Strategy?
        public var reason: String
    }

    public var file: String
    /// False when the file could not be read or is not YAML/JSON at all.
    public var parsed: Bool
    public var diagnostics: [PlanDiagnostic]
    public var strategy: StrategyChoice?
    /// The plan, when there is no error.
    public var plan: MigrationPlan?

    public var valid: Bool { parsed && !diagnostics.contains { $0.severity == .error } }
    public var errorCount: Int { diagnostics.filter { $0.severity == .error }.count }
    public var warningCount: Int { diagnostics.filter { $0.severity == .warning }.count }

    private enum CodingKeys: String, CodingKey {
        case file, parsed, diagnostics, strategy, valid
    }

    public init(file: String, parsed: Bool, diagnostics: [PlanDiagnostic], strategy: StrategyChoice?, plan: MigrationPlan?) {
        self.file = file
        self.parsed = parsed
        self.diagnostics = diagnostics
        self.strategy = strategy
        self.plan = plan
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        file = try container.decode(String.self, forKey: .file)
        parsed = try container.decode(Bool.self, forKey: .parsed)
        diagnostics = try container.decode([PlanDiagnostic].self, forKey: .diagnostics)
        strategy = try container.decodeIfPresent(StrategyChoice.self, forKey: .strategy)
        plan = nil
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(file, forKey: .file)
        try container.encode(parsed, forKey: .parsed)
        try container.encode(valid, forKey: .valid)
        try container.encode(diagnostics, forKey: .diagnostics)
        try container.encodeIfPresent(strategy, forKey: .strategy)
    }
}
