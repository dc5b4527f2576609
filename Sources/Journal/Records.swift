import Foundation
import Kernel
import Plans

/// How a migration ended.
public enum TerminalState: String, Sendable, Codable {
    /// The target runs, the source is retired.
    case completed
    /// The source runs, the target is gone.
    case rolledBack = "rolled-back"
    /// Past the point of no return a step kept failing: `gmigrate recover` rolls it forward.
    case stuck
    /// The coordinator and its in-process VMs died together: nothing is left to run.
    case lost
}

/// One record of a migration's journal.
public struct JournalEntry: Sendable, Codable, Equatable {
    public enum Direction: String, Sendable, Codable {
        case forward
        case undo
    }

    public struct Started: Sendable, Codable, Equatable {
        public var id: String
        public var planFile: String
        public var plan: MigrationPlan
        /// The strategy actually used (auto resolved).
        public var strategy: Strategy
        /// `linux`, `model`, or `model:PATH` for a persistent model host.
        public var backend: String
        public var coordinatorPID: Int32
        public var faults: [String]
        /// Out-of-process VMMs: their handoff sockets (recovery reconnects to them) and pids.
        public var sourceSocket: String?
        public var targetSocket: String?
        public var sourcePID: Int32?
        public var targetPID: Int32?
        /// The daemon's Idempotency-Key of the submission, if any.
        public var idempotencyKey: String?

        public init(
            id: String, planFile: String, plan: MigrationPlan, strategy: Strategy, backend: String, coordinatorPID: Int32, faults: [String],
            sourceSocket: String? = nil, targetSocket: String? = nil, sourcePID: Int32? = nil, targetPID: Int32? = nil
        ) {
            self.id = id
            self.planFile = planFile
            self.plan = plan
            self.strategy = strategy
            self.backend = backend
            self.coordinatorPID = coordinatorPID
            self.faults = faults
            self.sourceSocket = sourceSocket
            self.targetSocket = targetSocket
            self.sourcePID = sourcePID
            self.targetPID = targetPID
        }
    }

    public struct Outcome: Sendable, Codable, Equatable {
        public var step: MigrationStep
        public var direction: Direction
        public var ok: Bool
        public var durationNanoseconds: Int64
        public var errno: Int32?
        public var error: String?
        /// What the step established: inode identities, handles, saved vcpu state, ...
        public var details: [String: String]

        public init(step: MigrationStep, direction: Direction, ok: Bool, durationNanoseconds: Int64, errno: Int32? = nil, error: String? = nil, details: [String: String] = [:]) {
            self.step = step
            self.direction = direction
            self.ok = ok
            self.durationNanoseconds = durationNanoseconds
            self.errno = errno
            self.error = error
            self.details = details
        }
    }

    public struct Finished: Sendable, Codable, Equatable {
        public var state: TerminalState
        public var reason: String
        public var blackoutNanoseconds: Int64?
        /// The blackout exceeded the plan's maxBlackout.
        public var blackoutBreach: Bool
        public var totalNanoseconds: Int64?

        public init(state: TerminalState, reason: String, blackoutNanoseconds: Int64? = nil, blackoutBreach: Bool = false, totalNanoseconds: Int64? = nil) {
            self.state = state
            self.reason = reason
            self.blackoutNanoseconds = blackoutNanoseconds
            self.blackoutBreach = blackoutBreach
            self.totalNanoseconds = totalNanoseconds
        }
    }

    public enum Event: Sendable, Codable, Equatable {
        case started(Started)
        /// Written (and synced) before the step's effect.
        case intent(step: MigrationStep, direction: Direction)
        /// Written after the effect, success or failure.
        case outcome(Outcome)
        /// From here on the migration only rolls forward.
        case pointOfNoReturn
        case finished(Finished)
        /// A `gmigrate recover` took over this migration.
        case recovery(pid: Int32, decision: String)
        case note(String)
    }

    public var sequence: Int
    /// Seconds since 1970.
    public var time: Double
    public var event: Event

    public init(sequence: Int, time: Double, event: Event) {
        self.sequence = sequence
        self.time = time
        self.event = event
    }
}

extension Array where Element == JournalEntry {
    /// Every step outcome, in order.
    public var outcomes: [JournalEntry.Outcome] {
        compactMap { entry in
            if case .outcome(let outcome) = entry.event { return outcome }
            return nil
        }
    }

    /// The gmem inodes (`name: device:inode`) the last successful forward `step` recorded
    /// (prepare: the source's; hand-over-memory: the target's).
    public func inodes(recordedBy step: MigrationStep) -> [String: String] {
        let details = outcomes.last { $0.step == step && $0.ok && $0.direction == .forward }?.details ?? [:]
        return Dictionary(uniqueKeysWithValues: details.filter { $0.key.hasPrefix("inode.") }.map { (String($0.key.dropFirst(6)), $0.value) })
    }
}
