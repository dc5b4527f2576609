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
    /// What the step established, for people (the saved vcpu state and the description left out).
    public var details: [String: String]?

    public init(
        step: MigrationStep, direction: JournalEntry.Direction, ok: Bool, durationNanoseconds: Int64, error: String?,
        details: [String: String]? = nil
    ) {
        self.step = step
        self.direction = direction
        self.ok = ok
        self.durationNanoseconds = durationNanoseconds
        self.error = error
        self.details = details
    }

    /// The report of a journaled outcome.
    public init(_ outcome: JournalEntry.Outcome) {
        let shown = outcome.details.filter { !StepReport.bulkyDetails.contains($0.key) }
        self.init(
            step: outcome.step, direction: outcome.direction, ok: outcome.ok, durationNanoseconds: outcome.durationNanoseconds,
            error: outcome.error, details: shown.isEmpty ? nil : shown)
    }

    /// Details that are for the machine, not for people.
    public static let bulkyDetails: Set<String> = ["vm", "vm-state", "identity"]
}

/// How a run of a migration ended, as `gmigrate migrate` and the API report it.
public struct MigrationSummary: Codable, Sendable, Equatable {
    public var id: String
    /// `completed`, `rolled-back`, `lost`, or `stuck` (halted: `gmigrate recover` goes on).
    public var state: TerminalState
    public var strategy: Strategy
    public var reason: String
    public var steps: [StepReport]
    /// From the pause request to the target's vcpus running, as the guest sees it.
    public var blackoutNanoseconds: Int64?
    /// The blackout's parts (nanoseconds): each step in it, and the journal writes.
    public var blackoutParts: [String: Int64]?
    public var blackoutBreach: Bool
    public var totalNanoseconds: Int64
    /// Armed faults that never fired (their point was not reached): a test that injects one
    /// and sees it here did not test what it meant to.
    public var unfiredFaults: [String]
}

/// Who the executor asks for the VMMs of one migration: in-process VMMs, VMM processes, or any
/// VMM kind to come. The source is reached on first use; the target is made by create-target
/// (spawned or connected), and taken away again by its undo.
public protocol EndpointProvider: AnyObject {
    /// The source VMM, reached on first use (and again after a crash).
    func source() throws(EndpointError) -> any VMMEndpoint
    /// Makes the target VMM (spawns it, or connects to it): create-target's first effect.
    func makeTarget() throws(EndpointError) -> any VMMEndpoint
    /// The target, if it was made (or, after a crash, can be reached again); nil if it never was.
    func existingTarget() -> (any VMMEndpoint)?
    /// Undo of `makeTarget`: a VMM this provider spawned is killed and reaped. Idempotent; throws
    /// only when the process cannot be made to go.
    func disposeTarget() throws(EndpointError)
    /// What create-target records about the target (its pid, its socket).
    var targetDetails: [String: String] { get }
    /// Why the migration must stop at once, if a VMM's VM was destroyed or its process died.
    var abortReason: String? { get }
    /// Why a VMM is known to be gone (its process exited, its VM was destroyed), if it is: a
    /// request to it is then not sent, and certainly had no effect.
    func knownGone(_ role: JournalEntry.Role) -> String?
    /// What a VMM was seen doing: the endpoint's own answer, and anything the provider adds
    /// (the NICs after the switch-over).
    func observe(_ role: JournalEntry.Role) -> JournalEntry.Observation
    /// Arms `kernel:*` faults where the VMMs make their kernel calls.
    func armKernelFaults(_ specs: [FaultSpec])
    /// The kernel faults that fired in the VMMs.
    var firedKernelFaults: [FaultSpec] { get }
    /// Whether the coordinator holds the host's CPU latency request at 0 through the blackout
    /// (`CPULatencyHold`): VMM processes of this host that wake one another inside it.
    var holdsCPULatencyInBlackout: Bool { get }
}

extension EndpointProvider {
    public var holdsCPULatencyInBlackout: Bool { false }

    public func knownGone(_ role: JournalEntry.Role) -> String? { nil }

    public func observe(_ role: JournalEntry.Role) -> JournalEntry.Observation {
        let endpoint: (any VMMEndpoint)?
        switch role {
        case .source:
            do { endpoint = try source() } catch { return .init(role: role, liveness: .gone, detail: error.message) }
        case .target:
            endpoint = existingTarget()
        }
        guard let endpoint else { return .init(role: role, liveness: .gone, detail: "it was never made") }
        let (liveness, detail) = endpoint.observe()
        return .init(role: role, liveness: liveness, detail: detail)
    }
}

/// Performs a `MigrationMachine`'s effects: journal appends, step actions and undos against the
/// endpoints, observations; feeds every record back into the machine. Fault points fire here:
/// `before:` between a step's intent and its effect, `after:` once its outcome is journaled.
///
/// Ordering rule: a record is on stable storage before the machine acts on it, so a crash
/// anywhere leaves a journal from which `MigrationMachine(replaying:)` rebuilds the state that
/// the effects in flight started from.
public final class MigrationExecutor {
    let journal: MigrationJournal
    let provider: any EndpointProvider
    let faults: FaultInjector
    let progress: (StepReport) -> Void
    /// A cancel asked from outside (the API, SIGTERM), fed to the machine before its point of no return.
    let cancelReason: () -> String?
    /// The faults armed for this run, as the started record names them (for the unfired report).
    let armed: [String]
    /// Told every record once it is journaled (the daemon's view follows the point of no return).
    let observer: (JournalEntry.Event) -> Void
    let clock = ContinuousClock()

    private var reports: [StepReport] = []
    private var pauseRequested: ContinuousClock.Instant?
    /// The same instant on `MonotonicClock`, set against the target's own "running since".
    private var pauseRequestedAt: UInt64 = 0
    /// What the target reported at its restore: when its last vcpu entered KVM_RUN.
    private var targetRunningSince: UInt64?
    /// When the restore was asked, on `MonotonicClock`: the target's instant must come after.
    private var restoreRequestedAt: UInt64 = 0
    private var blackout: Duration?
    private var blackoutParts: [String: Int64] = [:]
    private var journalTimeInBlackout: Duration = .zero
    /// What `rehearseBlackout` made (kept so that it is made), until the pause's own timings.
    private var rehearsedTimings: [String: Int64] = [:]
    /// The VMMs' own measurements of the blackout's parts (stop, save, restore, resume).
    private var vmmTimings: [String: Int64] = [:]
    private var checkedCancel = false
    /// The CPU latency request held from just before the pause is requested until the target's
    /// vcpus run (or the step fails, or a rollback begins).
    private var latencyHold: CPULatencyHold?
    /// The state the source paused with in this run (the journal has it too, for a later run).
    private var pausedState: VMState?

    public init(
        journal: MigrationJournal, provider: any EndpointProvider, faults: FaultInjector, armed: [String] = [],
        progress: @escaping (StepReport) -> Void = { _ in }, cancelReason: @escaping () -> String? = { nil },
        observer: @escaping (JournalEntry.Event) -> Void = { _ in }
    ) {
        self.armed = armed
        self.observer = observer
        self.journal = journal
        self.provider = provider
        self.faults = faults
        self.progress = progress
        self.cancelReason = cancelReason
    }

    /// Drives the machine until it stops (finished or halted). Journal failures are thrown:
    /// without a journal nothing may go on.
    public func run(_ machine: inout MigrationMachine) throws(JournalError) -> MigrationSummary {
        let started = clock.now
        // An injected delay ends early when a VMM dies or a cancel comes: the machine must react at once.
        let provider = self.provider
        let cancelReason = self.cancelReason
        let stop = StopProbe { provider.abortReason != nil || cancelReason() != nil }
        faults.interruptDelays { stop.isSet }
        defer { faults.interruptDelays(when: nil) }
        guard let record = machine.started else { preconditionFailure("the machine has its started record") }
        // However the run ends (a journal error thrown included), what it wrote is synced.
        defer { try? journal.sync() }
        loop: while true {
            if let stop = pendingStop(machine) {
                try append(.stopRequested(stop), to: &machine)
                continue
            }
            switch machine.next() {
            case .stop:
                break loop
            case .append(let event):
                try append(decorate(event, machine: machine, started: started), to: &machine)
            case .perform(let step, let direction):
                try perform(step, direction, &machine)
            case .observe(let role):
                try append(.observed(provider.observe(role)), to: &machine)
            }
        }
        // Whatever the run ended on, every record is durable before it returns.
        try journal.sync()
        let fired = Set(faults.fired + provider.firedKernelFaults)
        let unfired = Array(Set(armed)).sorted().filter { text in !fired.contains { $0.description == text } }
        let finished = machine.finished
        return MigrationSummary(
            id: record.id, state: finished?.state ?? .stuck, strategy: record.strategy,
            reason: finished?.reason ?? machine.halted ?? "?", steps: reports, blackoutNanoseconds: finished?.blackoutNanoseconds,
            blackoutParts: finished?.blackoutParts, blackoutBreach: finished?.blackoutBreach ?? false,
            totalNanoseconds: (clock.now - started).nanoseconds, unfiredFaults: unfired)
    }

    /// A cancel, or a VMM that died, before the point of no return: journaled once, it rolls back.
    private func pendingStop(_ machine: MigrationMachine, inFlight: Bool = false) -> JournalEntry.StopRequest? {
        guard machine.started != nil, !machine.pastPointOfNoReturn, !machine.isRollingBack, !machine.isDone, (machine.inFlight != nil) == inFlight
        else { return nil }
        if let reason = provider.abortReason { return .init(kind: .abort, reason: reason) }
        if let reason = cancelReason() { return .init(kind: .cancel, reason: reason) }
        return nil
    }

    private func append(_ event: JournalEntry.Event, to machine: inout MigrationMachine) throws(JournalError) {
        let before = clock.now
        // Inside the blackout (the pause requested, the target not yet seen running, going
        // forward) records are written but not synced: a coordinator that dies leaves them in
        // the page cache for recovery, and a host crash ends both VMs whatever the disk holds
        // (docs/orchestrator.md). The first record after the blackout, or of a rollback, syncs
        // them all.
        let inBlackout = pauseRequested != nil && blackout == nil && !machine.isRollingBack
        try journal.append(event, durable: !inBlackout)
        if pauseRequested != nil && blackout == nil { journalTimeInBlackout += clock.now - before }
        machine.apply(event)
        observer(event)
    }

    /// The executor's measurements go into the finished record: the machine reads no clock.
    private func decorate(_ event: JournalEntry.Event, machine: MigrationMachine, started: ContinuousClock.Instant) -> JournalEntry.Event {
        guard case .finished(var finished) = event else { return event }
        finished.totalNanoseconds = (clock.now - started).nanoseconds
        if finished.state == .completed, let blackout, let plan = machine.started?.plan {
            finished.blackoutNanoseconds = blackout.nanoseconds
            finished.blackoutParts = blackoutParts
            finished.blackoutBreach = blackout > plan.policy.maxBlackout
            if finished.blackoutBreach { finished.reason += "; the blackout exceeded maxBlackout (\(plan.policy.maxBlackout.text))" }
        }
        return .finished(finished)
    }

    // MARK: - Steps

    private func perform(_ step: MigrationStep, _ direction: JournalEntry.Direction, _ machine: inout MigrationMachine) throws(JournalError) {
        guard let plan = machine.started?.plan, let strategy = machine.started?.strategy else { return }
        let timeout = MigrationExecutor.timeout(for: step, plan: plan, strategy: strategy)
        let began = clock.now
        if step == .pauseSource && direction == .forward {
            // Before the pause's preparation: the request wakes the idle CPUs once, outside
            // the blackout (the pause is requested after the preparation).
            if provider.holdsCPULatencyInBlackout { latencyHold = CPULatencyHold() }
            pauseRequested = began
            pauseRequestedAt = MonotonicClock.nanoseconds
            targetRunningSince = nil
            pausedState = nil
            blackout = nil
            blackoutParts = [:]
            vmmTimings = [:]
            journalTimeInBlackout = .zero
        }
        if step == .retireSource, direction == .forward {
            // The state that went VMM to VMM, journaled before the source goes.
            try journalSavedState(&machine, timeout: timeout)
        }
        var result: Result<[String: String], EndpointError>
        if direction == .forward, let errno = faults.hit(.before(step)) {
            result = .failure(EndpointError("injected fault before:\(step): \(errno.name)", errno: errno))
        } else if direction == .forward, let stop = pendingStop(machine, inFlight: true) {
            // The stop came while this step waited (an injected delay): it is journaled, and the
            // step's effect never starts.
            try append(.stopRequested(stop), to: &machine)
            result = .failure(EndpointError("not performed: the migration stops (\(stop.reason))"))
        } else if direction == .forward, MigrationExecutor.targetSteps.contains(step), let gone = provider.knownGone(.target) {
            // Not sent: the target is gone, so the step certainly did nothing.
            result = .failure(EndpointError("not sent: \(gone)"))
        } else {
            do {
                result = .success(try (direction == .forward ? action(step, machine, timeout: timeout) : undo(step, machine, timeout: timeout)))
            } catch {
                result = .failure(error)
            }
        }
        let duration = clock.now - began
        if case .success = result, direction == .forward, duration > timeout {
            result = .failure(EndpointError(
                "\(step) took \(duration.nanoseconds / 1_000_000)ms, over the step timeout of \(timeout.text)", errno: Errno(rawValue: 110)))  // ETIMEDOUT
        }
        if latencyHold != nil, step == .resumeTarget || direction != .forward || (try? result.get()) == nil { latencyHold = nil }
        if step == .pauseSource, direction == .forward, let hold = latencyHold, case .success(var details) = result {
            details["cpu-latency"] = hold.summary
            result = .success(details)
        }
        let outcome: JournalEntry.Outcome
        switch result {
        case .success(let details):
            outcome = .init(step: step, direction: direction, ok: true, durationNanoseconds: duration.nanoseconds, details: details)
        case .failure(let error):
            outcome = .init(
                step: step, direction: direction, ok: false, durationNanoseconds: duration.nanoseconds, errno: error.errno?.rawValue,
                error: error.message, uncertain: error.uncertain ? true : nil)
        }
        if pauseRequested != nil && blackout == nil && direction == .forward {
            // pause-source: from the pause request (its preparation before it is no part of the blackout).
            blackoutParts[step.rawValue] = (step == .pauseSource ? duration - ((pauseRequested ?? began) - began) : duration).nanoseconds
            if step == .resumeTarget, outcome.ok, let pauseRequested {
                // The guest runs again in the target: the blackout ends where its last vcpu
                // entered KVM_RUN, as the target saw it (the reply's way here is no part of
                // what the guest sees), if it says so within this step; else here.
                let heard = clock.now - pauseRequested
                blackout = heard
                if let since = targetRunningSince, since >= max(pauseRequestedAt, restoreRequestedAt), since <= MonotonicClock.nanoseconds {
                    blackout = .nanoseconds(Int64(clamping: since - pauseRequestedAt))
                    blackoutParts["heard"] = heard.nanoseconds
                }
                blackoutParts["journal"] = journalTimeInBlackout.nanoseconds
                // Within pause-source and resume-target, what the VMMs did themselves.
                for (part, nanoseconds) in vmmTimings { blackoutParts["vmm." + part] = nanoseconds }
            }
        }
        try append(.outcome(outcome), to: &machine)
        report(StepReport(outcome))

        if outcome.ok, direction == .forward, let errno = faults.hit(.after(step)) {
            let failure = JournalEntry.Outcome(
                step: step, direction: .forward, ok: false, durationNanoseconds: 0, errno: errno.rawValue,
                error: "injected fault after:\(step): \(errno.name) (the step's own effect had succeeded)")
            try append(.outcome(failure), to: &machine)
            report(StepReport(failure))
        }
    }

    /// Before the source retires, the state the target staged is journaled (the `saved`
    /// record), outside the blackout: the one this run paused with, or, when it went VMM to VMM
    /// or the run began after a crash, the one the paused source answers again; either only if
    /// its digest is the one the pause recorded. In whichever run retires the source. A source
    /// that cannot answer leaves the journal without it: the target runs it, nothing waits on it.
    private func journalSavedState(_ machine: inout MigrationMachine, timeout: Duration) throws(JournalError) {
        guard machine.savedState == nil, let digest = machine.details[.pauseSource]?["state-digest"] else { return }
        func matching(_ state: VMState?) -> [UInt8]? { state.map(\.encoded).flatMap { VMState.digest($0) == digest ? $0 : nil } }
        guard let encoded = matching(pausedState) ?? matching(try? source(timeout: timeout).savedState()) else { return }
        try append(.saved(step: .pauseSource, state: Data(encoded).base64EncodedString()), to: &machine)
    }

    /// A target's refusal of the saved state, as the journal says it.
    static func refusal(_ error: EndpointError) -> EndpointError {
        EndpointError("the target refuses the saved state: \(error.message)", errno: error.errno, uncertain: error.uncertain)
    }

    /// The forward steps whose effect happens in the target VMM.
    static let targetSteps: Set<MigrationStep> = [
        .handOverMemory, .bindMemslots, .verifyBindings, .pauseSource, .copyMemory, .moveEncryptionContext, .resumeTarget,
    ]

    private func report(_ report: StepReport) {
        reports.append(report)
        progress(report)
    }

    /// The step timeout of the plan, plus, for the steps whose work grows with the guest's
    /// memory, the time that memory needs: hand-over-memory of a copy (faulting in both sides'
    /// page tables, at 64 MiB/s: a 2 GiB guest gets 32 s more) and copy-memory (at 256 MiB/s: 8 s).
    public static func timeout(for step: MigrationStep, plan: MigrationPlan, strategy: Strategy) -> Duration {
        let bytes = plan.vm.guestMemfds.reduce(UInt64(0)) { $0 &+ $1.size }
        switch step {
        case .handOverMemory where strategy == .copy: return plan.policy.stepTimeout + .milliseconds(Int64(clamping: bytes / (64 << 10)))
        case .copyMemory: return plan.policy.stepTimeout + .milliseconds(Int64(clamping: bytes / (256 << 10)))
        default: return plan.policy.stepTimeout
        }
    }

    // MARK: - Actions

    private func source(timeout: Duration) throws(EndpointError) -> any VMMEndpoint {
        let source = try provider.source()
        source.setTimeout(timeout)
        return source
    }

    /// The source with its descriptors in hand (a coordinator that took over after a crash
    /// asks it to describe itself again: describe is read-only).
    private func describedSource(_ description: VMDescription, timeout: Duration) throws(EndpointError) -> any VMMEndpoint {
        let source = try source(timeout: timeout)
        if let first = description.guestMemfds.first, source.memoryHandle(first.name) == nil { _ = try source.describe() }
        return source
    }

    private func target(timeout: Duration) throws(EndpointError) -> any VMMEndpoint {
        guard let target = provider.existingTarget() else { throw EndpointError("the target VMM was never made") }
        target.setTimeout(timeout)
        return target
    }

    private func description(_ machine: MigrationMachine) throws(EndpointError) -> VMDescription {
        guard let text = machine.details[.prepare]?["vm"], let description = try? JSONDecoder().decode(VMDescription.self, from: Data(text.utf8))
        else { throw EndpointError("the journal holds no description of the source VM") }
        return description
    }

    private func action(_ step: MigrationStep, _ machine: MigrationMachine, timeout: Duration) throws(EndpointError) -> [String: String] {
        guard let started = machine.started else { throw EndpointError("no started record") }
        let plan = started.plan
        switch step {
        case .prepare:
            let description = try source(timeout: timeout).describe()
            try MigrationExecutor.check(description, against: plan)
            guard let data = try? JSONEncoder().encode(description) else { throw EndpointError("the description does not encode") }
            var details = ["vm": String(decoding: data, as: UTF8.self)]
            for gmem in description.guestMemfds { details["inode.\(gmem.name)"] = gmem.inode.description }
            return details
        case .createTarget:
            let target = try provider.makeTarget()
            target.setTimeout(timeout)
            let identity = try target.createVM(type: plan.vm.type, vcpus: plan.vm.vcpus, guest: try description(machine).guest)
            guard let data = try? JSONEncoder().encode(identity) else { throw EndpointError("the target's identity does not encode") }
            return provider.targetDetails.merging(["type": plan.vm.type.name, "vcpus": "\(plan.vm.vcpus)", "identity": String(decoding: data, as: UTF8.self)]) { a, _ in a }
        case .handOverMemory:
            let description = try description(machine)
            let source = try describedSource(description, timeout: timeout)
            let target = try target(timeout: timeout)
            var details: [String: String] = ["strategy": started.strategy.rawValue]
            for gmem in description.guestMemfds {
                guard let handle = source.memoryHandle(gmem.name) else { throw EndpointError("the source holds no gmem file '\(gmem.name)'") }
                let inode = try target.receiveMemory(gmem, from: handle, strategy: started.strategy)
                details["inode.\(gmem.name)"] = inode.description
            }
            if let nics = description.nics, !nics.isEmpty {
                try target.receiveNICs(nics, from: source.nicHandles())
                details["nics"] = nics.map { "\($0.name)x\($0.queues)" }.joined(separator: ",")
            }
            return details
        case .bindMemslots:
            let slots = try description(machine).memslots
            try target(timeout: timeout).bind(slots, strategy: started.strategy)
            return ["slots": "\(slots.count)"]
        case .verifyBindings:
            let description = try description(machine)
            try MigrationExecutor.checkIdentity(description, machine.details[.createTarget]?["identity"])
            return try verify(description, target: try target(timeout: timeout), strategy: started.strategy, confidential: machine.isConfidential)
        case .pauseSource:
            let source = try source(timeout: timeout)
            let target = try target(timeout: timeout)
            var state: VMState?
            var digest: String
            var details: [String: String]
            // The target stages the state (checks it, sets it, reads it back) while the source
            // can still take the guest back: a refusal rolls back.
            let staging = clock.now
            if let alteration = faults.alteration(at: .state) {
                // A state altered on purpose passes through here, between the two.
                let altered = try source.pause().altered(by: alteration)
                vmmTimings.merge(source.lastTimings) { _, b in b }
                details = source.guestDetails.merging(["altered": "injected fault state=alter:\(alteration)"]) { _, b in b }
                do { try target.stage(altered) } catch { throw MigrationExecutor.refusal(error) }
                state = altered
                digest = VMState.digest(altered.encoded)
            } else {
                let staged: StagedPause
                // What the pause needs besides the pause itself (the state channel, the target
                // waiting on it) is made before it is requested: the guest sees none of it.
                rehearseBlackout(staging: staging, source: source, target: target)
                source.preparePause(stagingIn: target)
                pauseRequested = clock.now
                pauseRequestedAt = MonotonicClock.nanoseconds
                do {
                    staged = try source.pause(stagingIn: target)
                } catch {
                    switch error {
                    case .source(let error): throw error
                    case .target(let error): throw MigrationExecutor.refusal(error)
                    }
                }
                vmmTimings.merge(source.lastTimings) { _, b in b }
                if let stopped = source.guestStoppedAt, stopped >= pauseRequestedAt {
                    // From the pause request to every vcpu stopped: what stopping costs the guest.
                    vmmTimings["paused"] = Int64(clamping: stopped - pauseRequestedAt)
                }
                details = source.guestDetails
                state = staged.state
                digest = staged.digest
            }
            addStagingTimings(to: &vmmTimings, target: target, stagedBeforeThePause: state == nil, staging: staging)
            rehearsedTimings = [:]
            pausedState = state
            // The state itself is journaled before the source retires.
            details["state-digest"] = digest
            if let state {
                details["vcpus"] = "\(state.vcpus.count)"
                details["sections"] = (state.vm.map(\.name) + (state.vcpus.first?.sections.map(\.name) ?? [])).joined(separator: ",")
            }
            return details
        case .copyMemory:
            let description = try description(machine)
            let source = try describedSource(description, timeout: timeout)
            let target = try target(timeout: timeout)
            var total: UInt64 = 0
            var copied: UInt64 = 0
            var nanoseconds: Int64 = 0
            var methods: Set<String> = []
            for gmem in description.guestMemfds {
                guard let handle = source.memoryHandle(gmem.name) else { throw EndpointError("the source holds no gmem file '\(gmem.name)'") }
                let report = try target.copyMemory(gmem, from: handle)
                total += report.bytesTotal
                copied += report.bytesCopied
                nanoseconds += report.durationNanoseconds
                methods.insert(report.method)
            }
            let rate = nanoseconds > 0 ? Double(copied) / Double(nanoseconds) : 0  // bytes per ns = GB/s
            return [
                "bytes-total": "\(total)", "bytes-copied": "\(copied)", "method": methods.sorted().joined(separator: ","),
                "rate": String(format: "%.2f GB/s", rate),
            ]
        case .moveEncryptionContext:
            let description = try description(machine)
            let source = try describedSource(description, timeout: timeout)
            if source.vmHandle == nil { _ = try source.describe() }
            guard let handle = source.vmHandle else { throw EndpointError("the source handed over no VM") }
            try target(timeout: timeout).moveEncryptionContext(from: handle)
            return [:]
        case .resumeTarget:
            // The state this run paused with; after a crash, the one the journal holds (its
            // `saved` record; a journal of an older gmigrate kept it in the pause's outcome);
            // else the one the target staged, which went to it straight from the source.
            var state: VMState? = pausedState
            if state == nil, let text = machine.savedState ?? machine.details[.pauseSource]?["vm-state"] {
                guard let data = Data(base64Encoded: text) else { throw EndpointError("the journal's saved VM state is not base64") }
                do { state = try VMState(decoding: [UInt8](data)) } catch { throw EndpointError("the saved VM state: \(error.message)") }
            }
            let target = try target(timeout: timeout)
            restoreRequestedAt = MonotonicClock.nanoseconds
            if let state { try target.restore(state) } else { try target.restoreStaged() }
            vmmTimings.merge(target.lastTimings) { _, b in b }
            targetRunningSince = target.guestRunningSince
            return target.guestDetails
        case .retireSource:
            do {
                let note = try source(timeout: timeout).retire()
                return note.map { ["note": $0] } ?? [:]
            } catch {
                // A source that cannot be reached any more is retired: check that it is gone.
                let seen = provider.observe(.source)
                guard seen.liveness == .gone else { throw error }
                return ["note": "the source VMM was already gone (\(seen.detail ?? error.message))"]
            }
        }
    }

    /// Before the pause is requested: the pause's bookkeeping after the target's answer (its
    /// timings: the instants' arithmetic, the parts' names), done once on copies and kept until
    /// the pause's own. Why: its first run in the process took 24 µs inside the blackout (marks
    /// of 10 runs: the instants' `max` alone; 1.4 µs when run again right after it; neither
    /// demangling nor lazy binding), which this run before the pause takes out.
    private func rehearseBlackout(staging: ContinuousClock.Instant, source: any VMMEndpoint, target: any VMMEndpoint) {
        var timings = vmmTimings.merging(source.lastTimings) { _, b in b }
        addStagingTimings(to: &timings, target: target, stagedBeforeThePause: true, staging: staging)
        rehearsedTimings = timings
    }

    /// Adds to `timings` the target's staging's parts (`stage-` and its name) and the pause and
    /// stage's whole time from the later of `staging` and the pause request. A target asked to
    /// stage before the pause (`stagedBeforeThePause`) waited for the state from then on: its
    /// whole request (`stage`) and its wait (`receive`) are no parts of the blackout.
    private func addStagingTimings(
        to timings: inout [String: Int64], target: any VMMEndpoint, stagedBeforeThePause: Bool, staging: ContinuousClock.Instant
    ) {
        let waitedBeforeThePause: Set<String> = stagedBeforeThePause ? ["receive", "stage"] : []
        for (part, nanoseconds) in target.lastTimings where !waitedBeforeThePause.contains(part) { timings["stage-" + part] = nanoseconds }
        timings["pause-and-stage"] = (clock.now - max(staging, pauseRequested ?? staging)).nanoseconds
    }

    private func undo(_ step: MigrationStep, _ machine: MigrationMachine, timeout: Duration) throws(EndpointError) -> [String: String] {
        switch step {
        case .createTarget:
            var details: [String: String] = [:]
            if let target = provider.existingTarget() {
                target.setTimeout(timeout)
                do { try target.destroy() } catch { details["destroy"] = error.message }
            }
            try provider.disposeTarget()
            return details
        case .handOverMemory:
            try provider.existingTarget().map { target throws(EndpointError) in
                target.setTimeout(timeout)
                try target.releaseMemory()
            }
            return [:]
        case .bindMemslots:
            let slots = try description(machine).memslots
            try provider.existingTarget().map { target throws(EndpointError) in
                target.setTimeout(timeout)
                try target.unbind(slots)
            }
            return [:]
        case .pauseSource:
            try source(timeout: timeout).resume()
            return [:]
        case .prepare, .verifyBindings, .copyMemory, .moveEncryptionContext, .resumeTarget, .retireSource:
            return [:]
        }
    }

    /// Source and target must be the same machine: the same vcpu count and the same CPUID, leaf by
    /// leaf (`cpuid-mismatch`); checked before the pause.
    static func checkIdentity(_ description: VMDescription, _ targetIdentity: String?) throws(EndpointError) {
        guard let text = targetIdentity, let target = try? JSONDecoder().decode(VMIdentity.self, from: Data(text.utf8)) else {
            throw EndpointError("the journal holds no identity of the target VM")
        }
        guard target.vcpus == description.vcpus else {
            throw EndpointError("cpuid-mismatch: the target has \(target.vcpus) vcpus, the source \(description.vcpus)")
        }
        // Without the runtime bits, which follow from the vcpu's registers: a VMM of this version
        // reports none, one before it reported them as KVM held them at that moment.
        if let difference = CPUIDEntry.difference(CPUIDEntry.withoutRuntimeBits(description.cpuid ?? []), CPUIDEntry.withoutRuntimeBits(target.cpuid)) {
            throw EndpointError("cpuid-mismatch: \(difference)")
        }
    }

    /// The source VM must be the one the plan describes (the validator checked the plan; this
    /// checks the running VM against it).
    public static func check(_ description: VMDescription, against plan: MigrationPlan) throws(EndpointError) {
        var problems: [String] = []
        if description.type != plan.vm.type { problems.append("type \(description.type.name), the plan says \(plan.vm.type.name)") }
        if description.vcpus != plan.vm.vcpus { problems.append("\(description.vcpus) vcpus, the plan says \(plan.vm.vcpus)") }
        for gmem in plan.vm.guestMemfds
        where !description.guestMemfds.contains(where: { $0.name == gmem.name && $0.size == gmem.size && $0.flags == gmem.flags }) {
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

    private func verify(_ description: VMDescription, target: any VMMEndpoint, strategy: Strategy, confidential: Bool) throws(EndpointError) -> [String: String] {
        let reports = try target.bindings()
        let inodes = Dictionary(description.guestMemfds.map { ($0.name, $0.inode) }, uniquingKeysWith: { a, _ in a })
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
        if confidential, let first = description.memslots.first {
            switch target.probeGuestMapping(gpa: first.guestPhysAddr) {
            case nil:
                throw EndpointError("the target mapped guest memory before the encryption context moved")
            case .failed(_, let errno)?, .refused(_, let errno, _)?:
                details["target-maps-before-move"] = errno.name
            case .unsupported(_, let reason)?:
                details["target-maps-before-move"] = "not checkable here: \(reason)"
            }
        }
        return details
    }
}

/// Whether a stop is pending, for the fault injector's delays (read from its thread).
final class StopProbe: @unchecked Sendable {
    // @unchecked: the closure reads thread-safe state (an atomic flag, a locked record).
    private let check: () -> Bool
    init(_ check: @escaping () -> Bool) { self.check = check }
    var isSet: Bool { check() }
}

extension Duration {
    /// The duration in whole nanoseconds (wrapping past Int64, ~292 years), for timings.
    public var nanoseconds: Int64 {
        let (seconds, attoseconds) = components
        return seconds &* 1_000_000_000 &+ attoseconds / 1_000_000_000
    }
}
