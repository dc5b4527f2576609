/// The steps of a migration, in order (architecture.md). Names are stable: fault points and
/// journal records use them.
public enum MigrationStep: String, CaseIterable, Sendable, Codable, CustomStringConvertible {
    case prepare
    case createTarget = "create-target"
    case handOverMemory = "hand-over-memory"
    case bindMemslots = "bind-memslots"
    case verifyBindings = "verify-bindings"
    case pauseSource = "pause-source"
    /// Copy only: the populated pages of the paused source go into the target's own memory.
    case copyMemory = "copy-memory"
    case moveEncryptionContext = "move-enc-context"
    case resumeTarget = "resume-target"
    case retireSource = "retire-source"

    public var description: String { rawValue }
}

