import Journal
import Plans

/// One migration as a pure state machine: it takes the journal's events one at a time
/// (`apply`) and says what to do next (`next`). It does no I/O and reads no clock; an executor
/// performs its effects against the VMM endpoints and the journal, and feeds every record it
/// writes back as an event. Recovery is the same machine: replaying a journal's records into a
/// new machine rebuilds its state exactly, and it goes on from there — whatever a forward run
/// does at a step, recovery does too.
///
/// Steps run in `MigrationStep` order; the ones a plan does not need (copy-memory unless it
/// copies, move-enc-context without an encryption context) are not part of its run. Each step
/// has an intent record before its effect and an outcome record after it.
///
/// **The point of no return** is recorded right before the first step that cannot be undone:
/// move-enc-context for confidential types (after it the source VM is dead), resume-target for
/// the others (once the target ran the guest, the source's state is stale). Before it, any
/// failure, cancel or abort rolls back: every attempted step's undo, last first, then the
/// source must be *seen* running. Past it the machine rolls forward: a failing step is retried,
/// and the target is asked whether it is still there. Rolling back past it is allowed only while
/// the journal proves the target never ran the guest (and no encryption context left the source).
///
/// Terminal states rest on observations, never on what a step's success implies:
/// - `completed`: the target answered that its vcpus run, then the source was retired;
/// - `rolled-back`: the source answered that its vcpus run again;
/// - `lost`: neither can be made to run the guest (the reason says why);
/// - otherwise the run `halted` (stuck): a step keeps failing while the target answers, and
///   `gmigrate recover` goes on.
///
/// Never both VMs running the guest, never neither: the target runs only past the point of no
/// return, the source is resumed only while the target provably never ran.
public struct MigrationMachine: Sendable, Equatable {
    /// What the executor does next.
    public enum Effect: Equatable, Sendable {
        /// Append this event to the journal, then apply it.
        case append(JournalEntry.Event)
        /// Perform the step whose intent was just journaled; journal its outcome, then apply it.
        case perform(MigrationStep, JournalEntry.Direction)
        /// Ask a VMM whether it runs the guest; journal what it answered, then apply it.
        case observe(JournalEntry.Role)
        /// Nothing more: the migration finished, or halted (`gmigrate recover` goes on).
        case stop
    }

    /// How many times a step (or an undo) is tried before the machine decides otherwise.
    public static let attemptsPerStep = 3

    /// The first step that cannot be undone; the point of no return is recorded before it.
    public static func pointOfNoReturn(confidential: Bool) -> MigrationStep {
        confidential ? .moveEncryptionContext : .resumeTarget
    }

    /// The steps a plan's migration runs, in order.
    public static func steps(strategy: Strategy, confidential: Bool) -> [MigrationStep] {
        MigrationStep.allCases.filter { step in
            switch step {
            case .copyMemory: strategy == .copy
            case .moveEncryptionContext: confidential
            default: true
            }
        }
    }

    /// Whether a step has an undo (the others change nothing that must be taken back).
    public static func hasUndo(_ step: MigrationStep) -> Bool {
        switch step {
        case .createTarget, .handOverMemory, .bindMemslots, .pauseSource: true
        case .prepare, .verifyBindings, .copyMemory, .moveEncryptionContext, .resumeTarget, .retireSource: false
        }
    }

    // MARK: - State (every field follows from the events applied so far)

    public private(set) var started: JournalEntry.Started?
    /// The steps of this migration, from its plan and strategy.
    public private(set) var steps: [MigrationStep] = []
    public private(set) var pastPointOfNoReturn = false
    public private(set) var finished: JournalEntry.Finished?
    /// Why the last run halted (stuck); cleared when recovery takes the migration up.
    public private(set) var halted: String?
    /// Why the machine rolls back; nil while it goes forward.
    public private(set) var rollbackReason: String?
    /// Why the guest is lost, once an observation showed it: the `finished` record comes next.
    public private(set) var lostReason: String?
    /// The intent journaled whose outcome has not come yet.
    public private(set) var inFlight: Intent?
    public private(set) var recoveries = 0
    /// The VM state the last pause saved (base64), from its `saved` record.
    public private(set) var savedState: String?

    /// Forward steps that succeeded (and were not undone by a later failure report).
    public private(set) var completed: Set<MigrationStep> = []
    /// Forward steps whose intent was journaled, in the order of their first intent.
    public private(set) var attempted: [MigrationStep] = []
    /// Steps whose undo succeeded.
    public private(set) var undone: Set<MigrationStep> = []
    /// Steps whose effect may have happened without a success saying so (the answer never came,
    /// or a crash hit between the intent and the outcome).
    public private(set) var uncertain: Set<MigrationStep> = []
    private var forwardAttempts: [MigrationStep: Int] = [:]
    private var undoAttempts: [MigrationStep: Int] = [:]
    private var forwardErrors: [MigrationStep: String] = [:]
    private var undoErrors: [MigrationStep: String] = [:]
    /// What each step's last success established (the description, the saved vcpu state, ...).
    public private(set) var details: [MigrationStep: [String: String]] = [:]
    /// The target was seen running the guest at some point.
    public private(set) var targetSeenRunning = false
    /// The target was seen running since the last recovery: what completion rests on (a
    /// coordinator that took over after a crash looks again).
    public private(set) var targetConfirmedRunning = false
    /// Each role's last observation and the epoch it was made in. An observation is fresh while
    /// no outcome or recovery has come since (the epoch counts them).
    private var observations: [JournalEntry.Role: Observed] = [:]
    private var epoch = 0
    /// In a rollback: an observation found the source stopped after its undo; resume it again.
    private var resumeSourceAgain = false

    public struct Intent: Hashable, Sendable {
        public var step: MigrationStep
        public var direction: JournalEntry.Direction
    }

    struct Observed: Equatable, Sendable {
        var observation: JournalEntry.Observation
        var epoch: Int
    }

    public init() {}

    /// A machine rebuilt from a journal's records.
    public init(replaying events: [JournalEntry.Event]) {
        for event in events { apply(event) }
    }

    public var isConfidential: Bool { started?.plan.vm.type.hasEncryptionContext ?? false }
    public var pointOfNoReturnStep: MigrationStep { MigrationMachine.pointOfNoReturn(confidential: isConfidential) }
    public var isRollingBack: Bool { rollbackReason != nil }
    public var isDone: Bool { finished != nil || halted != nil }

    /// The target may have run the guest: its resume succeeded, its answer never came, or it
    /// was seen running. From then on the source's state is stale and must never run again.
    public var targetMayHaveRun: Bool {
        completed.contains(.resumeTarget) || uncertain.contains(.resumeTarget) || targetSeenRunning
    }

    /// The encryption context may have left the source (whose VM is then dead).
    public var contextMayHaveMoved: Bool {
        completed.contains(.moveEncryptionContext) || uncertain.contains(.moveEncryptionContext)
    }

    /// Whether rolling back can still give the guest back to the source.
    public var sourceCanTakeBack: Bool { !targetMayHaveRun && !contextMayHaveMoved }

    var attemptCounts: String {
        "\(forwardAttempts.sorted { $0.key.rawValue < $1.key.rawValue }.map { "\($0.key)\($0.value)" })\(undoAttempts.sorted { $0.key.rawValue < $1.key.rawValue }.map { "\($0.key)\($0.value)" })"
    }
    var freshObservations: String { JournalEntry.Role.allCases.map { fresh($0)?.liveness.rawValue ?? "-" }.joined(separator: ",") }
    var resumeSourceAgainForKey: Bool { resumeSourceAgain }

    private func fresh(_ role: JournalEntry.Role) -> JournalEntry.Observation? {
        guard let observed = observations[role], observed.epoch == epoch else { return nil }
        return observed.observation
    }

    // MARK: - What to do next

    public func next() -> Effect {
        if finished != nil || halted != nil { return .stop }
        guard started != nil else { preconditionFailure("a migration machine starts with its started record") }
        if let inFlight { return .perform(inFlight.step, inFlight.direction) }
        if let lostReason { return .append(.finished(.init(state: .lost, reason: lostReason))) }
        return rollbackReason == nil ? nextForward() : nextInRollback()
    }

    private func nextForward() -> Effect {
        for step in steps where !completed.contains(step) {
            if step == .retireSource && !targetConfirmedRunning {
                // Completed means the target was seen running: ask before the source goes.
                return .observe(.target)
            }
            if step == pointOfNoReturnStep && !pastPointOfNoReturn { return .append(.pointOfNoReturn) }
            let attempts = forwardAttempts[step, default: 0]
            if attempts > 0 {
                // Only past the point of no return does a failed step come round again.
                guard let target = fresh(.target) else { return .observe(.target) }
                if attempts >= MigrationMachine.attemptsPerStep {
                    let failing = "\(step) failed \(attempts) times past the point of no return (last: \(forwardErrors[step] ?? "?"))"
                    if sourceCanTakeBack {
                        // The target never ran the guest: the paused source takes it back.
                        return .append(.stopRequested(.init(kind: .abort, reason: failing + "; the target never ran the guest")))
                    }
                    return .append(.halted(reason: "\(failing); the target VMM \(target.liveness == .running ? "runs the guest" : "answers"): gmigrate recover goes on from here"))
                }
            }
            return .append(.intent(step: step, direction: .forward))
        }
        return .append(.finished(.init(state: .completed, reason: completionReason())))
    }

    private func nextInRollback() -> Effect {
        for step in pendingUndos() {
            if undoAttempts[step, default: 0] > 0 && undone.contains(step) == false {
                // It failed before: is there still a VMM to undo it on?
                let role: JournalEntry.Role = step == .pauseSource ? .source : .target
                guard let seen = fresh(role) else { return .observe(role) }
                // Nothing left to undo on a VMM that is gone, and a source seen running is resumed.
                if seen.liveness == .gone || (step == .pauseSource && seen.liveness == .running) { continue }
            }
            return .append(.intent(step: step, direction: .undo))
        }
        // Every undo tried: the source must be seen running the guest again.
        guard let source = fresh(.source) else { return .observe(.source) }
        if attempted.allSatisfy({ $0 == .prepare }) && source.liveness == .stopped {
            // Only the source's description was asked for: the guest is where it was.
            return .append(.finished(.init(
                state: .rolledBack,
                reason: "nothing was changed (\(rollbackReason ?? "?")); the source VMM answers as it did, its vcpus stopped\(source.detail.map { " (\($0))" } ?? "")")))
        }
        switch source.liveness {
        case .running:
            return .append(.finished(.init(state: .rolledBack, reason: rollbackSummary())))
        case .stopped:
            return .append(.finished(.init(
                state: .lost,
                reason: "\(rollbackReason ?? "rolled back"); the source VMM answers but does not run the guest, and resuming it failed \(undoAttempts[.pauseSource, default: 0]) times (last: \(undoErrors[.pauseSource] ?? "no error, yet its vcpus do not run"))")))
        case .gone:
            return .append(.finished(.init(
                state: .lost,
                reason: "\(rollbackReason ?? "rolled back"); the source VMM, which held the only copy of the guest, is gone\(source.detail.map { " (\($0))" } ?? "")")))
        }
    }

    /// The undos still to run, last step first; one that failed every attempt is given up.
    func pendingUndos() -> [MigrationStep] {
        var steps = attempted.reversed().filter { MigrationMachine.hasUndo($0) && !undone.contains($0) }
        if resumeSourceAgain && !steps.contains(.pauseSource) { steps.append(.pauseSource) }
        return steps.filter { undoAttempts[$0, default: 0] < MigrationMachine.attemptsPerStep }
    }

    private func completionReason() -> String {
        var reason = "the target VMM was seen running the guest; the source is retired"
        if let detail = details[.retireSource]?["note"] { reason += " (\(detail))" }
        return reason
    }

    private func rollbackSummary() -> String {
        var text = "\(rollbackReason ?? "?"); the source VMM was seen running the guest again"
        let failed = attempted.filter { MigrationMachine.hasUndo($0) && !undone.contains($0) && $0 != .pauseSource }
        for step in failed { text += "; the undo of \(step) failed: \(undoErrors[step] ?? "?")" }
        return text
    }

    /// The `recovery` record a recovering coordinator journals first: what it will do.
    public func recoveryRecord(pid: Int32) -> JournalEntry.Event {
        let decision: String
        if let halted {
            decision = "take up a halted migration: \(halted)"
        } else if let rollbackReason {
            decision = "go on rolling back (\(rollbackReason))"
        } else if pastPointOfNoReturn {
            decision = "roll forward: past the point of no return"
        } else {
            decision = "roll back: before the point of no return"
        }
        let crashed = inFlight.map { "; the coordinator ended during \($0.direction == .undo ? "undo " : "")\($0.step)" } ?? ""
        return .recovery(pid: pid, decision: decision + crashed)
    }

    // MARK: - Events

    public mutating func apply(_ event: JournalEntry.Event) {
        switch event {
        case .started(let record):
            started = record
            steps = MigrationMachine.steps(strategy: record.strategy, confidential: record.plan.vm.type.hasEncryptionContext)
        case .intent(let step, let direction):
            inFlight = Intent(step: step, direction: direction)
            switch direction {
            case .forward:
                if !attempted.contains(step) { attempted.append(step) }
                forwardAttempts[step, default: 0] += 1
            case .undo:
                undoAttempts[step, default: 0] += 1
            }
        case .outcome(let outcome):
            inFlight = nil
            epoch += 1
            apply(outcome)
        case .saved(_, let state):
            savedState = state
        case .pointOfNoReturn:
            pastPointOfNoReturn = true
        case .observed(let observation):
            observations[observation.role] = Observed(observation: observation, epoch: epoch)
            apply(observation)
        case .stopRequested(let request):
            // Honoured while the source can still take the guest back: always before the point
            // of no return (the executor feeds the API's cancels only there), and past it only
            // while the journal proves the target never ran the guest.
            if rollbackReason == nil && lostReason == nil && (!pastPointOfNoReturn || sourceCanTakeBack) {
                rollbackReason = (request.kind == .cancel ? "cancelled: " : "aborted: ") + request.reason
            }
        case .halted(let reason):
            halted = reason
        case .recovery:
            recoveries += 1
            epoch += 1
            halted = nil
            targetConfirmedRunning = false
            // The crash hit between this intent and its outcome: its effect may have happened.
            if let inFlight {
                if inFlight.direction == .forward { uncertain.insert(inFlight.step) }
                self.inFlight = nil
            }
            // A fresh budget of attempts for the new coordinator.
            forwardAttempts = [:]
            undoAttempts = [:]
            if !pastPointOfNoReturn && rollbackReason == nil {
                rollbackReason = "the coordinator ended before the point of no return"
            }
        case .finished(let record):
            finished = record
        }
    }

    private mutating func apply(_ outcome: JournalEntry.Outcome) {
        let step = outcome.step
        switch outcome.direction {
        case .forward:
            if outcome.ok {
                completed.insert(step)
                details[step] = outcome.details
                return
            }
            // A failure report after a success (an injected `after:` fault) takes it back.
            completed.remove(step)
            forwardErrors[step] = outcome.error ?? "failed"
            if outcome.uncertain == true { uncertain.insert(step) }
            if !pastPointOfNoReturn && rollbackReason == nil {
                rollbackReason = "\(step) failed: \(outcome.error ?? "?")"
            }
        case .undo:
            if outcome.ok {
                undone.insert(step)
                if step == .pauseSource { resumeSourceAgain = false }
            } else {
                undoErrors[step] = outcome.error ?? "failed"
            }
        }
    }

    private mutating func apply(_ observation: JournalEntry.Observation) {
        switch observation.role {
        case .target:
            // Running counts once the target was asked to run the guest: before that, whatever
            // its vcpus do, they do not run this guest.
            if observation.liveness == .running && attempted.contains(.resumeTarget) {
                targetSeenRunning = true
                targetConfirmedRunning = true
            }
            guard rollbackReason == nil, pastPointOfNoReturn else { return }
            switch observation.liveness {
            case .running:
                break
            case .stopped:
                // Resumed, yet its vcpus do not run: the resume comes round again.
                if completed.contains(.resumeTarget) && !targetConfirmedRunning { completed.remove(.resumeTarget) }
            case .gone:
                if sourceCanTakeBack {
                    rollbackReason = "the target VMM is gone and never ran the guest\(observation.detail.map { " (\($0))" } ?? "")"
                } else {
                    lostReason = lostTargetReason(observation)
                }
            }
        case .source:
            // In a rollback, a source that answers but does not run is resumed again.
            if rollbackReason != nil, observation.liveness == .stopped,
                undoAttempts[.pauseSource, default: 0] < MigrationMachine.attemptsPerStep
            {
                undone.remove(.pauseSource)
                resumeSourceAgain = true
            }
        }
    }

    private func lostTargetReason(_ observation: JournalEntry.Observation) -> String {
        let why = targetMayHaveRun ? "after it may have run the guest" : "after the encryption context may have moved to it"
        let step = steps.first { !completed.contains($0) }.map { " at \($0)" } ?? ""
        return "the target VMM is gone\(step), past the point of no return, \(why)\(observation.detail.map { " (\($0))" } ?? ""): the guest cannot be given back to the source"
    }

}
