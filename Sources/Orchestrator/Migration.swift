import Foundation
import Journal
import Kernel
import Plans

/// One step's timing, for the progress display and the summary.
public struct StepReport: Codable, Sendable, Equatable {
    public var step: MigrationStep
    public var direction: JournalEntry.Direction
    public var ok: Bool
    public var durationNanoseconds: Int64
    public var error: String?

    public init(step: MigrationStep, direction: JournalEntry.Direction, ok: Bool, durationNanoseconds: Int64, error: String?) {
        self.step = step
        self.direction = direction
        self.ok = ok
        self.durationNanoseconds = durationNanoseconds
        self.error = error
    }
}

/// How a migration ended, as `gmigrate migrate` reports it.
public struct MigrationSummary: Codable, Sendable, Equatable {
    public var id: String
    public var state: TerminalState
    public var strategy: Strategy
    public var reason: String
    public var steps: [StepReport]
    public var blackoutNanoseconds: Int64?
    public var blackoutBreach: Bool
    public var totalNanoseconds: Int64
}

/// The state machine of one migration, driving two VMM endpoints and journaling every step.
///
/// Steps run in `MigrationStep` order. Each has an action and an undo, both idempotent:
/// - prepare: the source describes its VM; it must match the plan. Undo: nothing.
/// - create-target: the target creates a VM of the same type and vcpu count. Undo: destroy it.
/// - hand-over-memory: per gmem file, link / share / copy. Undo: release what the target got.
/// - bind-memslots: the target binds memslots identical to the source's. Undo: delete them.
/// - verify-bindings: slot, gpa, size, inode and offset equal on both sides; for confidential
///   types, the target is shown unable to map guest memory yet. Undo: nothing.
/// - pause-source: the source stops its vcpus and hands over their state. Blackout starts.
///   Undo: resume the source.
/// - move-enc-context (confidential types only): the encryption context moves to the target;
///   the source VM is dead afterwards.
/// - resume-target: the vcpu state is restored and the target runs. Blackout ends.
/// - retire-source: the source closes its VM; the memory lives on through the target.
///
/// **The point of no return** is journaled (and synced) right before the first step that
/// cannot be undone: move-enc-context for confidential types (after it the source VM is dead),
/// resume-target for the others (once the target ran, the source's state is stale). A failure
/// before it rolls back (undo in reverse: the source runs, the target is gone); a failure after
/// it rolls forward (the step is retried; if it keeps failing the migration is `stuck` and
/// `gmigrate recover` finishes it). Never both VMs running, never neither.
///
/// Journal ordering: a step's intent is on stable storage before its effect starts, its
/// outcome after; fault points fire between the intent and the effect (`before:`) and after
/// the outcome (`after:`).
public final class Migration {
    public let id: String
    public let plan: MigrationPlan
    public let strategy: Strategy
    let journal: MigrationJournal
    let source: any VMMEndpoint
    let target: any VMMEndpoint
    let faults: FaultInjector
    let progress: (StepReport) -> Void
    /// Asked before every step up to the point of no return: true cancels (and rolls back).
    let shouldCancel: () -> Bool
    /// Asked before every step up to the point of no return: a reason stops the migration at once
    /// (a VMM's VM was destroyed, or its process died). Past it, a dead target shows at its next request.
    let abortReason: () -> String?
    let clock = ContinuousClock()

    private var description: VMDescription?
    private var savedStates: [VCPUState]?
    private var attempted: [MigrationStep] = []
    private var reports: [StepReport] = []
    private var pausedAt: ContinuousClock.Instant?
    private var blackout: Duration?
    /// Set once the point of no return is journaled: from then on only the target matters.
    private var pastPointOfNoReturn = false
    /// Attempts of a step past the point of no return before the migration is `stuck`.
    static let forwardAttempts = 3

    public init(
        id: String, plan: MigrationPlan, strategy: Strategy, journal: MigrationJournal, source: any VMMEndpoint,
        target: any VMMEndpoint, faults: FaultInjector, progress: @escaping (StepReport) -> Void = { _ in },
        shouldCancel: @escaping () -> Bool = { false }, abortReason: @escaping () -> String? = { nil }
    ) {
        precondition(strategy != .auto, "the strategy is resolved before a migration starts")
        self.id = id
        self.plan = plan
        self.strategy = strategy
        self.journal = journal
        self.source = source
        self.target = target
        self.faults = faults
        self.progress = progress
        self.shouldCancel = shouldCancel
        self.abortReason = abortReason
    }

    var isConfidential: Bool { plan.vm.type.hasEncryptionContext }

    /// The first step that cannot be undone; the point of no return is recorded before it.
    public static func pointOfNoReturn(confidential: Bool) -> MigrationStep {
        confidential ? .moveEncryptionContext : .resumeTarget
    }

    /// Runs the migration to a terminal state (or `stuck`). Journal failures are thrown: without
    /// a journal nothing may go on.
    public func run() throws(JournalError) -> MigrationSummary {
        let started = clock.now
        let steps = MigrationStep.allCases
        let pointOfNoReturn = Migration.pointOfNoReturn(confidential: isConfidential)
        var failure: (MigrationStep, EndpointError)? = nil
        var passedPointOfNoReturn = false
        for step in steps {
            if !passedPointOfNoReturn, let reason = abortReason() {
                try journal.append(.note("aborted before \(step): \(reason)"))
                failure = (step, EndpointError("aborted: \(reason)"))
                break
            }
            if !passedPointOfNoReturn && shouldCancel() {
                try journal.append(.note("cancelled by request before \(step)"))
                failure = (step, EndpointError("cancelled by request"))
                break
            }
            if step == pointOfNoReturn {
                try journal.append(.pointOfNoReturn)
                passedPointOfNoReturn = true
                pastPointOfNoReturn = true
            }
            var result = try perform(step, direction: .forward)
            if passedPointOfNoReturn {
                var attempts = 1
                while case .failure = result, attempts < Migration.forwardAttempts {
                    attempts += 1
                    result = try perform(step, direction: .forward)
                }
            }
            if case .failure(let error) = result {
                failure = (step, error)
                break
            }
        }
        let total = clock.now - started
        let finished: JournalEntry.Finished
        if let (step, error) = failure {
            let targetRanGuest = reports.contains { $0.step == .resumeTarget && $0.ok && $0.direction == .forward }
            if passedPointOfNoReturn && !target.isAlive() && !targetRanGuest && !isConfidential && source.isAlive() {
                // The target died before it ran the guest: the paused source still holds it whole.
                try journal.append(.note("the target VMM died before it ran the guest (\(error)); the source resumes"))
                _ = try perform(.pauseSource, direction: .undo)
                finished = .init(state: .rolledBack, reason: "the target VMM died at \(step) before it ran the guest; the source resumed",
                    totalNanoseconds: (clock.now - started).nanoseconds)
            } else if passedPointOfNoReturn {
                finished = .init(
                    state: targetRanGuest || target.isAlive() ? .stuck : .lost,
                    reason: target.isAlive()
                        ? "\(step) kept failing past the point of no return: \(error); gmigrate recover rolls it forward"
                        : "the target VMM died at \(step), past the point of no return: \(error)",
                    totalNanoseconds: total.nanoseconds)
            } else {
                try rollBack()
                if source.isAlive() && source.isRunning {
                    finished = .init(state: .rolledBack, reason: "\(step) failed: \(error)", totalNanoseconds: (clock.now - started).nanoseconds)
                } else {
                    finished = .init(
                        state: .lost,
                        reason: "\(step) failed (\(error)) and the source VMM, which held the only copy of the guest, does not run any more",
                        totalNanoseconds: (clock.now - started).nanoseconds)
                }
            }
        } else if !target.isAlive() {
            finished = .init(state: .lost, reason: "the migration completed, then the target VMM, which held the guest, died", totalNanoseconds: total.nanoseconds)
        } else {
            let breach = blackout.map { $0 > plan.policy.maxBlackout } ?? false
            finished = .init(
                state: .completed,
                reason: breach ? "completed; the blackout exceeded maxBlackout (\(plan.policy.maxBlackout.text))" : "completed",
                blackoutNanoseconds: blackout?.nanoseconds, blackoutBreach: breach, totalNanoseconds: total.nanoseconds)
        }
        try journal.append(.finished(finished))
        return MigrationSummary(
            id: id, state: finished.state, strategy: strategy, reason: finished.reason, steps: reports,
            blackoutNanoseconds: finished.blackoutNanoseconds, blackoutBreach: finished.blackoutBreach,
            totalNanoseconds: finished.totalNanoseconds ?? total.nanoseconds)
    }

    private func perform(_ step: MigrationStep, direction: JournalEntry.Direction) throws(JournalError) -> Result<[String: String], EndpointError> {
        try journal.append(.intent(step: step, direction: direction))
        if direction == .forward && !attempted.contains(step) { attempted.append(step) }
        let started = clock.now
        var result: Result<[String: String], EndpointError>
        if let errno = faults.hit(.before(step)) {
            result = .failure(EndpointError("injected fault before:\(step): \(errno.name)", errno: errno))
        } else if direction == .forward, !pastPointOfNoReturn, let reason = abortReason() {
            // The event came while this step waited: react now, before its effect.
            try journal.append(.note("aborted before \(step): \(reason)"))
            result = .failure(EndpointError("aborted: \(reason)"))
        } else {
            do {
                result = .success(try (direction == .forward ? action(step) : undo(step)))
            } catch {
                result = .failure(error)
            }
        }
        let duration = clock.now - started
        if case .success = result, direction == .forward, duration > plan.policy.stepTimeout {
            result = .failure(EndpointError(
                "\(step) took \(duration.nanoseconds / 1_000_000)ms, over the step timeout of \(plan.policy.stepTimeout.text)",
                errno: Errno(rawValue: 110)))  // ETIMEDOUT
        }
        let outcome: JournalEntry.Outcome
        switch result {
        case .success(let details):
            outcome = .init(step: step, direction: direction, ok: true, durationNanoseconds: duration.nanoseconds, details: details)
        case .failure(let error):
            outcome = .init(
                step: step, direction: direction, ok: false, durationNanoseconds: duration.nanoseconds,
                errno: error.errno?.rawValue, error: error.message)
        }
        try journal.append(.outcome(outcome))
        let report = StepReport(
            step: step, direction: direction, ok: outcome.ok, durationNanoseconds: outcome.durationNanoseconds, error: outcome.error)
        reports.append(report)
        progress(report)
        if case .success = result, let errno = faults.hit(.after(step)) {
            return .failure(EndpointError("injected fault after:\(step): \(errno.name)", errno: errno))
        }
        return result
    }

    /// Undoes every attempted step, last first. Undo is idempotent and best effort: each is
    /// tried a few times, and a failure is journaled and does not stop the others.
    private func rollBack() throws(JournalError) {
        for step in attempted.reversed() where Migration.hasUndo(step) {
            var attempts = 0
            while attempts < Migration.forwardAttempts {
                attempts += 1
                if case .success = try perform(step, direction: .undo) { break }
            }
        }
    }

    static func hasUndo(_ step: MigrationStep) -> Bool {
        switch step {
        case .createTarget, .handOverMemory, .bindMemslots, .pauseSource: true
        case .prepare, .verifyBindings, .moveEncryptionContext, .resumeTarget, .retireSource: false
        }
    }

    // MARK: - Actions

    private func action(_ step: MigrationStep) throws(EndpointError) -> [String: String] {
        switch step {
        case .prepare:
            let description = try source.describe()
            try Migration.check(description, against: plan)
            self.description = description
            return Dictionary(uniqueKeysWithValues: description.guestMemfds.map { ("inode.\($0.name)", $0.inode.description) })
        case .createTarget:
            try target.createVM(type: plan.vm.type, vcpus: plan.vm.vcpus)
            return ["type": plan.vm.type.name, "vcpus": "\(plan.vm.vcpus)"]
        case .handOverMemory:
            let description = try described()
            var details: [String: String] = ["strategy": strategy.rawValue]
            for gmem in description.guestMemfds {
                guard let handle = source.memoryHandle(gmem.name) else {
                    throw EndpointError("the source holds no gmem file '\(gmem.name)'")
                }
                let inode = try target.receiveMemory(gmem, from: handle, strategy: strategy)
                details["inode.\(gmem.name)"] = inode.description
            }
            if let nics = description.nics, !nics.isEmpty {
                try target.receiveNICs(nics, from: source.nicHandles())
                details["nics"] = nics.map { "\($0.name)x\($0.queues)" }.joined(separator: ",")
            }
            return details
        case .bindMemslots:
            try target.bind(try described().memslots, strategy: strategy)
            return ["slots": "\(try described().memslots.count)"]
        case .verifyBindings:
            return try verify()
        case .pauseSource:
            let states = try source.pause()
            pausedAt = clock.now
            savedStates = states
            guard let data = try? JSONEncoder().encode(states) else { throw EndpointError("the vcpu state does not encode") }
            return ["vcpu-states": data.base64EncodedString()]
        case .moveEncryptionContext:
            guard isConfidential else { return ["skipped": "a \(plan.vm.type.name) VM has no encryption context"] }
            guard let handle = source.vmHandle else { throw EndpointError("the source holds no VM") }
            try target.moveEncryptionContext(from: handle)
            return [:]
        case .resumeTarget:
            guard let states = savedStates else { throw EndpointError("no saved vcpu state to restore") }
            if strategy == .copy && !target.isRunning {
                // The first copy was made while the source ran: copy again now that it is paused.
                for gmem in try described().guestMemfds {
                    guard let handle = source.memoryHandle(gmem.name) else { throw EndpointError("the source holds no gmem file '\(gmem.name)'") }
                    try target.synchronizeCopy(gmem, from: handle)
                }
            }
            try target.restore(states)
            if let pausedAt { blackout = clock.now - pausedAt }
            return blackout.map { ["blackout-ns": "\($0.nanoseconds)"] } ?? [:]
        case .retireSource:
            source.retire()
            return [:]
        }
    }

    private func undo(_ step: MigrationStep) throws(EndpointError) -> [String: String] {
        switch step {
        case .createTarget:
            target.destroy()
        case .handOverMemory:
            target.releaseMemory()
        case .bindMemslots:
            if let description { target.unbind(description.memslots) }
        case .pauseSource:
            try source.resume()
        case .prepare, .verifyBindings, .moveEncryptionContext, .resumeTarget, .retireSource:
            break
        }
        return [:]
    }

    private func described() throws(EndpointError) -> VMDescription {
        guard let description else { throw EndpointError("the source was not described") }
        return description
    }

    /// The source VM must be the one the plan describes (the validator checked the plan; this
    /// checks the running VM against it).
    static func check(_ description: VMDescription, against plan: MigrationPlan) throws(EndpointError) {
        var problems: [String] = []
        if description.type != plan.vm.type { problems.append("type \(description.type.name), the plan says \(plan.vm.type.name)") }
        if description.vcpus != plan.vm.vcpus { problems.append("\(description.vcpus) vcpus, the plan says \(plan.vm.vcpus)") }
        let planned = plan.vm.guestMemfds.map { VMDescription.Gmem(name: $0.name, size: $0.size, flags: $0.flags, inode: .init(device: 0, inode: 0)) }
        for gmem in planned where !description.guestMemfds.contains(where: { $0.name == gmem.name && $0.size == gmem.size && $0.flags == gmem.flags }) {
            problems.append("no gmem file '\(gmem.name)' of \(gmem.size) bytes with flags \(gmem.flags)")
        }
        let slots = plan.vm.memslots.map {
            VMDescription.Slot(slot: $0.slot, guestPhysAddr: $0.guestPhysAddr, size: $0.size, guestMemfd: $0.guestMemfd, offset: $0.offset)
        }
        if Set(slots.map(\.slot)) != Set(description.memslots.map(\.slot)) || !slots.allSatisfy(description.memslots.contains) {
            problems.append("its memslots differ from the plan's")
        }
        if !problems.isEmpty { throw EndpointError("the source VM is not the plan's: " + problems.joined(separator: "; ")) }
    }

    private func verify() throws(EndpointError) -> [String: String] {
        let description = try described()
        let reports = try target.bindings()
        let inodes = Dictionary(uniqueKeysWithValues: description.guestMemfds.map { ($0.name, $0.inode) })
        guard reports.count == description.memslots.count else {
            throw EndpointError("the target binds \(reports.count) memslots, the source \(description.memslots.count)")
        }
        for slot in description.memslots {
            guard let report = reports.first(where: { $0.slot == slot.slot }) else {
                throw EndpointError("the target has no slot \(slot.slot)")
            }
            guard report.guestPhysAddr == slot.guestPhysAddr, report.size == slot.size, report.offset == slot.offset else {
                throw EndpointError("slot \(slot.slot) differs: gpa/size/offset \(report.guestPhysAddr)/\(report.size)/\(report.offset) vs \(slot.guestPhysAddr)/\(slot.size)/\(slot.offset)")
            }
            let sameInode = report.inode == inodes[slot.guestMemfd]
            switch strategy {
            case .link, .share:
                guard sameInode else { throw EndpointError("slot \(slot.slot) is on inode \(report.inode), not the source's \(inodes[slot.guestMemfd]?.description ?? "?")") }
            case .copy:
                guard !sameInode else { throw EndpointError("slot \(slot.slot) of a copy is on the source's own inode") }
            case .auto:
                break
            }
            guard report.guestMemfdBacked == (strategy != .share) else {
                throw EndpointError("slot \(slot.slot) is \(report.guestMemfdBacked ? "gmem" : "host-mapping") backed, which \(strategy) does not make")
            }
        }
        var details = ["slots-verified": "\(description.memslots.count)"]
        // Before the move of the encryption context the target must not map guest memory.
        if isConfidential, let first = description.memslots.first {
            switch target.probeGuestMapping(gpa: first.guestPhysAddr) {
            case nil:
                throw EndpointError("the target mapped guest memory before the encryption context moved")
            case .failed(_, let errno)?:
                details["target-maps-before-move"] = errno.name
            case .unsupported(_, let reason)?:
                details["target-maps-before-move"] = "not checkable here: \(reason)"
            }
        }
        return details
    }
}

extension Duration {
    var nanoseconds: Int64 {
        let (seconds, attoseconds) = components
        return seconds * 1_000_000_000 + attoseconds / 1_000_000_000
    }
}
