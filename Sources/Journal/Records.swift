import Foundation
import Kernel
import Plans

/// Where a migration stands when a run of it ends. `completed`, `rolled-back` and `lost` are
/// terminal (a `finished` record holds one of them); `stuck` is not: the run stopped with a
/// `halted` record, and `gmigrate recover` takes the migration up again.
public enum TerminalState: String, Sendable, Codable, CaseIterable {
    /// The target was seen running the guest, then the source was retired.
    case completed
    /// The source was seen running the guest again; the target is gone.
    case rolledBack = "rolled-back"
    /// Past the point of no return a step kept failing while the target still answers:
    /// `gmigrate recover` goes on from there.
    case stuck
    /// Neither VM can be made to run the guest (the record says why): recovery cannot help.
    case lost

    /// Whether a `finished` record may hold it.
    public var isTerminal: Bool { self != .stuck }
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
        /// Out-of-process VMMs: their handoff sockets (recovery reconnects to them). The target's
        /// pid is create-target's to record: the target does not exist yet when this is written.
        public var sourceSocket: String?
        public var targetSocket: String?
        /// The daemon's Idempotency-Key of the submission, if any.
        public var idempotencyKey: String?

        public init(
            id: String, planFile: String, plan: MigrationPlan, strategy: Strategy, backend: String, coordinatorPID: Int32, faults: [String],
            sourceSocket: String? = nil, targetSocket: String? = nil
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
        }
    }

    public struct Outcome: Sendable, Codable, Equatable {
        public var step: MigrationStep
        public var direction: Direction
        public var ok: Bool
        public var durationNanoseconds: Int64
        public var errno: Int32?
        public var error: String?
        /// A failure whose effect may have happened all the same: the request went out and its
        /// answer never came (a timeout, a VMM that died while it worked).
        public var uncertain: Bool?
        /// What the step established: inode identities, handles, saved vcpu state, ...
        public var details: [String: String]

        public init(
            step: MigrationStep, direction: Direction, ok: Bool, durationNanoseconds: Int64, errno: Int32? = nil, error: String? = nil,
            uncertain: Bool? = nil, details: [String: String] = [:]
        ) {
            self.step = step
            self.direction = direction
            self.ok = ok
            self.durationNanoseconds = durationNanoseconds
            self.errno = errno
            self.error = error
            self.uncertain = uncertain
            self.details = details
        }
    }

    public struct Finished: Sendable, Codable, Equatable {
        public var state: TerminalState
        public var reason: String
        /// From the pause request to the target's vcpus running (the guest's view).
        public var blackoutNanoseconds: Int64?
        /// The blackout's parts: `stop`, `save`, `copy`, `journal`, `restore`, `resume`, ... (nanoseconds).
        public var blackoutParts: [String: Int64]?
        /// The blackout exceeded the plan's maxBlackout.
        public var blackoutBreach: Bool
        public var totalNanoseconds: Int64?

        public init(
            state: TerminalState, reason: String, blackoutNanoseconds: Int64? = nil, blackoutParts: [String: Int64]? = nil,
            blackoutBreach: Bool = false, totalNanoseconds: Int64? = nil
        ) {
            self.state = state
            self.reason = reason
            self.blackoutNanoseconds = blackoutNanoseconds
            self.blackoutParts = blackoutParts
            self.blackoutBreach = blackoutBreach
            self.totalNanoseconds = totalNanoseconds
        }
    }

    /// Which VMM an observation or a stop is about.
    public enum Role: String, Sendable, Codable, CaseIterable {
        case source, target
    }

    /// What a VMM was seen doing: the machine's terminal states rest on these, never on
    /// what a step's success implies.
    public struct Observation: Sendable, Codable, Equatable {
        public enum Liveness: String, Sendable, Codable, CaseIterable {
            /// The VMM answered that its vcpus run the guest.
            case running
            /// The VMM answered; its vcpus do not run (paused, or never started).
            case stopped
            /// The VMM does not answer: its process is gone (or it holds no VM).
            case gone
        }

        public var role: Role
        public var liveness: Liveness
        /// What was seen, for people (the counter, the nics, why it is gone).
        public var detail: String?

        public init(role: Role, liveness: Liveness, detail: String? = nil) {
            self.role = role
            self.liveness = liveness
            self.detail = detail
        }
    }

    /// Why a migration must stop before its point of no return.
    public struct StopRequest: Sendable, Codable, Equatable {
        public enum Kind: String, Sendable, Codable {
            /// Someone asked (the API's cancel, SIGTERM of the daemon).
            case cancel
            /// A VMM's VM was destroyed or its process died (a uevent, its pid).
            case abort
        }

        public var kind: Kind
        public var reason: String

        public init(kind: Kind, reason: String) {
            self.kind = kind
            self.reason = reason
        }
    }

    /// The events of the migration machine (`MigrationMachine`), one record each: replaying
    /// a journal's records into a new machine rebuilds its state exactly.
    public enum Event: Sendable, Codable, Equatable {
        case started(Started)
        /// Written (and synced) before the step's effect.
        case intent(step: MigrationStep, direction: Direction)
        /// Written after the effect, success or failure.
        case outcome(Outcome)
        /// The VM state a step saved (pause-source: the source's, `VMState`'s binary format in
        /// base64), journaled once the blackout is over, before the source retires.
        case saved(step: MigrationStep, state: String)
        /// From here on the migration only rolls forward.
        case pointOfNoReturn
        /// A VMM was asked whether it runs the guest, and answered (or did not).
        case observed(Observation)
        /// A cancel or an abort, taken before the point of no return: the migration rolls back.
        case stopRequested(StopRequest)
        /// The run stopped short of a terminal state (`stuck`): `gmigrate recover` goes on.
        case halted(reason: String)
        /// A `gmigrate recover` (or a restarted daemon) took this migration up.
        case recovery(pid: Int32, decision: String)
        /// The terminal record: nothing is appended after it.
        case finished(Finished)
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
