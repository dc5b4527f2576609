import Foundation
import GmigrateTestKit
import GmigrateTestSupport
import Journal
import Kernel
import Orchestrator
import Plans
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A scripted world for the pure machine: how each step and each observation comes out.
struct World {
    /// A step's outcome on its n-th try (1-based): ok, failed, or failed without an answer.
    enum Result { case ok, failed, uncertain }
    var steps: (MigrationStep, JournalEntry.Direction, Int) -> Result = { _, _, _ in .ok }
    var observe: (JournalEntry.Role) -> JournalEntry.Observation.Liveness = { _ in .running }
    /// Before each forward step (before the point of no return), a cancel?
    var cancelBefore: MigrationStep? = nil
}

/// Drives a machine through a world until it stops, as the executor would; returns the records.
@discardableResult
func drive(_ machine: inout MigrationMachine, _ world: World, limit: Int = 500, mustStop: Bool = true) -> [JournalEntry.Event] {
    var records: [JournalEntry.Event] = []
    var tries: [String: Int] = [:]
    var cancelled = false
    for _ in 0..<limit {
        if let step = world.cancelBefore, !cancelled, !machine.pastPointOfNoReturn, !machine.isRollingBack, machine.inFlight == nil,
            case .append(.intent(step, .forward)) = machine.next()
        {
            cancelled = true
            let event = JournalEntry.Event.stopRequested(.init(kind: .cancel, reason: "test"))
            records.append(event)
            machine.apply(event)
            continue
        }
        let event: JournalEntry.Event
        switch machine.next() {
        case .stop: return records
        case .append(let record): event = record
        case .perform(let step, let direction):
            let key = "\(step)\(direction)"
            tries[key, default: 0] += 1
            let result = world.steps(step, direction, tries[key]!)
            event = .outcome(.init(
                step: step, direction: direction, ok: result == .ok, durationNanoseconds: 1, error: result == .ok ? nil : "scripted failure",
                uncertain: result == .uncertain ? true : nil, details: result == .ok ? ["step": step.rawValue] : [:]))
        case .observe(let role):
            event = .observed(.init(role: role, liveness: world.observe(role)))
        }
        records.append(event)
        machine.apply(event)
    }
    if mustStop { Issue.record("the machine did not stop within \(limit) effects") }
    return records
}

func startedRecord(strategy: Strategy = .share, confidential: Bool = false) throws -> JournalEntry.Started {
    var plan = try loadPlan(confidential ? "confidential-demo.yaml" : "demo.yaml")
    plan.strategy = strategy
    return JournalEntry.Started(id: "m", planFile: "p", plan: plan, strategy: strategy, backend: "test", coordinatorPID: 1, faults: [])
}

func machine(strategy: Strategy = .share, confidential: Bool = false) throws -> MigrationMachine {
    MigrationMachine(replaying: [.started(try startedRecord(strategy: strategy, confidential: confidential))])
}

extension Array where Element == JournalEntry.Event {
    var forwardSteps: [MigrationStep] {
        compactMap { if case .intent(let step, .forward) = $0 { step } else { nil } }
    }
    var undoSteps: [MigrationStep] {
        compactMap { if case .intent(let step, .undo) = $0 { step } else { nil } }
    }
    var finished: JournalEntry.Finished? {
        compactMap { if case .finished(let finished) = $0 { finished } else { nil } }.last
    }
}

@Suite("The migration machine")
struct MachineTests {
    @Test("a run where everything works: every step, the point of no return before resume-target, the target seen running, completed", arguments: Strategy.allCases.filter { $0 != .auto })
    func happyPath(_ strategy: Strategy) throws {
        var m = try machine(strategy: strategy)
        let records = drive(&m, World())
        let expected: [MigrationStep] = [.prepare, .createTarget, .handOverMemory, .bindMemslots, .verifyBindings, .pauseSource]
            + (strategy == .copy ? [.copyMemory] : []) + [.resumeTarget, .retireSource]
        #expect(records.forwardSteps == expected)
        let pnr = try #require(records.firstIndex(of: .pointOfNoReturn))
        #expect(records[pnr + 1] == .intent(step: .resumeTarget, direction: .forward))
        let observedRunning = try #require(records.firstIndex(of: .observed(.init(role: .target, liveness: .running))))
        #expect(observedRunning < records.firstIndex(of: .intent(step: .retireSource, direction: .forward))!, "seen running before the source is retired")
        #expect(records.finished?.state == .completed)
        #expect(m.next() == .stop, "nothing after finished")
    }

    @Test("confidential: the point of no return before move-enc-context")
    func confidentialPath() throws {
        var m = try machine(strategy: .link, confidential: true)
        let records = drive(&m, World())
        let pnr = try #require(records.firstIndex(of: .pointOfNoReturn))
        #expect(records[pnr + 1] == .intent(step: .moveEncryptionContext, direction: .forward))
        #expect(records.finished?.state == .completed)
    }

    @Test("a failure before the point of no return undoes every attempted step, last first, then sees the source run", arguments: [
        MigrationStep.prepare, .createTarget, .handOverMemory, .bindMemslots, .verifyBindings, .pauseSource, .copyMemory,
    ])
    func rollback(_ failing: MigrationStep) throws {
        var m = try machine(strategy: .copy)
        var world = World()
        world.steps = { step, direction, _ in step == failing && direction == .forward ? .failed : .ok }
        let records = drive(&m, world)
        let attempted = Array(records.forwardSteps)
        #expect(attempted.last == failing)
        let undoable = attempted.reversed().filter(MigrationMachine.hasUndo)
        #expect(records.undoSteps == undoable, "undo in reverse: \(records.undoSteps)")
        #expect(records.finished?.state == .rolledBack, "\(records.finished?.reason ?? "")")
        #expect(!records.contains(.pointOfNoReturn))
        #expect(records.finished?.reason.contains("\(failing) failed") == true)
    }

    @Test("an undo that fails is journaled failed, tried again, and named in the outcome")
    func failingUndo() throws {
        var m = try machine()
        var world = World()
        world.steps = { step, direction, _ in
            if step == .verifyBindings && direction == .forward { return .failed }
            if step == .handOverMemory && direction == .undo { return .failed }
            return .ok
        }
        let records = drive(&m, world)
        let failedUndos = records.filter {
            if case .outcome(let o) = $0 { o.step == .handOverMemory && o.direction == .undo && !o.ok } else { false }
        }
        #expect(failedUndos.count == MigrationMachine.attemptsPerStep)
        #expect(records.finished?.state == .rolledBack)
        #expect(records.finished?.reason.contains("the undo of hand-over-memory failed") == true, "\(records.finished?.reason ?? "")")
    }

    @Test("the source that cannot be resumed: lost, not rolled-back", arguments: [JournalEntry.Observation.Liveness.stopped, .gone])
    func sourceCannotResume(_ liveness: JournalEntry.Observation.Liveness) throws {
        var m = try machine()
        var world = World()
        world.steps = { step, direction, _ in
            if step == .verifyBindings && direction == .forward { return .failed }
            if step == .pauseSource && direction == .undo { return .failed }
            return .ok
        }
        world.observe = { _ in liveness }
        let records = drive(&m, world)
        // verify-bindings failed before the pause: the source was never paused, so nothing resumes it.
        #expect(records.finished?.state == .lost, "\(records.finished?.reason ?? "")")
        var paused = try machine()
        var afterPause = World()
        afterPause.steps = { step, direction, _ in
            if step == .resumeTarget { return .failed }
            if step == .pauseSource && direction == .undo { return .failed }
            return .ok
        }
        afterPause.observe = { role in role == .target ? .stopped : liveness }
        let more = drive(&paused, afterPause)
        #expect(more.finished?.state == .lost, "\(more.finished?.reason ?? "")")
    }

    @Test("past the point of no return a failing step is tried again while the target answers")
    func retryForward() throws {
        var m = try machine()
        let resumes = Counter()
        let succeeded = Counter()
        var world = World()
        world.steps = { step, _, _ in
            guard step == .resumeTarget else { return .ok }
            if resumes.next() < 3 { return .failed }
            _ = succeeded.next()
            return .ok
        }
        // The target answers throughout; once its third resume succeeded, it runs the guest.
        world.observe = { role in role == .target && succeeded.value == 0 ? .stopped : .running }
        let records = drive(&m, world)
        #expect(records.filter { $0 == .intent(step: .resumeTarget, direction: .forward) }.count == 3)
        #expect(m.finished?.state == .completed, "\(m.finished?.reason ?? m.halted ?? "")")
    }

    @Test("resume-target keeps failing and the target never ran: the source takes the guest back")
    func giveBack() throws {
        var m = try machine()
        var world = World()
        world.steps = { step, direction, _ in step == .resumeTarget && direction == .forward ? .failed : .ok }
        world.observe = { role in role == .target ? .stopped : .running }
        let records = drive(&m, world)
        #expect(records.contains(.pointOfNoReturn))
        #expect(records.contains { if case .stopRequested(let stop) = $0 { stop.kind == .abort } else { false } })
        #expect(records.finished?.state == .rolledBack, "\(records.finished?.reason ?? "")")
        #expect(records.undoSteps.contains(.pauseSource))
    }

    @Test("resume-target without an answer: the target may run the guest, so it is never given back; stuck")
    func uncertainResume() throws {
        var m = try machine()
        var world = World()
        world.steps = { step, direction, _ in step == .resumeTarget && direction == .forward ? .uncertain : .ok }
        world.observe = { role in role == .target ? .stopped : .running }
        let records = drive(&m, world)
        #expect(!records.undoSteps.contains(.pauseSource), "the source never resumes once the target may have run")
        #expect(records.finished == nil)
        #expect(m.halted != nil, "stuck: recover goes on")
        // A recovery takes it up again with a fresh budget, and a target that now works completes it.
        let recovery = m.recoveryRecord(pid: 2)
        m.apply(recovery)
        let after = drive(&m, World())
        #expect(after.finished?.state == .completed)
    }

    @Test("the target gone past the point of no return", arguments: [false, true])
    func targetGone(_ resumed: Bool) throws {
        var m = try machine()
        var world = World()
        world.steps = { step, direction, _ in
            if step == (resumed ? .retireSource : .resumeTarget) && direction == .forward { return .failed }
            return .ok
        }
        world.observe = { role in role == .target ? (resumed ? .gone : .gone) : .running }
        let records = drive(&m, world)
        if resumed {
            // It resumed (and may have run the guest): the source's state is stale.
            #expect(records.finished?.state == .lost, "\(records.finished?.reason ?? "")")
            #expect(!records.undoSteps.contains(.pauseSource))
        } else {
            // It never ran the guest: the paused source takes it back.
            #expect(records.finished?.state == .rolledBack, "\(records.finished?.reason ?? "")")
        }
    }

    @Test("a cancel before the point of no return rolls back; none is taken after it")
    func cancel() throws {
        var m = try machine()
        var world = World()
        world.cancelBefore = .bindMemslots
        let records = drive(&m, world)
        #expect(records.finished?.state == .rolledBack)
        #expect(records.finished?.reason.contains("cancelled") == true)
        // Past the point of no return a stop is honoured only while the target provably never
        // ran the guest (the machine's own give-back); once it resumed, never.
        var late = try machine()
        var stopAfterResume = World()
        stopAfterResume.observe = { _ in .running }
        while !late.completed.contains(.resumeTarget) { drive(&late, stopAfterResume, limit: 1, mustStop: false) }
        #expect(late.pastPointOfNoReturn)
        late.apply(.stopRequested(.init(kind: .cancel, reason: "too late")))
        #expect(!late.isRollingBack, "a cancel once the target resumed is not honoured")
        #expect(drive(&late, World()).finished?.state == .completed)
    }

    /// Recovery is replay: a crash at any record of any run, followed by a recovery record and a
    /// world where everything works, ends where the point of no return says — and whatever a
    /// forward run does at a step (the final copy included), recovery does too.
    @Test("a crash after any record, then recovery", arguments: Strategy.allCases.filter { $0 != .auto })
    func crashAnywhere(_ strategy: Strategy) throws {
        var full = try machine(strategy: strategy)
        let records = [JournalEntry.Event.started(try startedRecord(strategy: strategy))] + drive(&full, World())
        for cut in 1..<records.count {
            let prefix = Array(records.prefix(cut))
            var m = MigrationMachine(replaying: prefix)
            if m.finished != nil { continue }
            let past = m.pastPointOfNoReturn
            m.apply(m.recoveryRecord(pid: 2))
            let after = drive(&m, World())
            let state = after.finished?.state
            #expect(state == (past ? .completed : .rolledBack), "crash after #\(cut) (\(prefix.last!)): \(state.map(\.rawValue) ?? "none")")
            if strategy == .copy && state == .completed {
                // The target restored from memory copied after the pause: copy-memory succeeded
                // after pause-source, before the recovered resume.
                let all = prefix + after
                let copied = all.lastIndex { if case .outcome(let o) = $0 { o.step == .copyMemory && o.ok } else { false } }
                let paused = all.lastIndex { if case .outcome(let o) = $0 { o.step == .pauseSource && o.ok } else { false } }
                let resumed = all.lastIndex { if case .outcome(let o) = $0 { o.step == .resumeTarget && o.ok } else { false } }
                #expect(copied != nil && paused != nil && resumed != nil && paused! < copied! && copied! < resumed!, "crash after #\(cut)")
            }
        }
    }

    /// The machine is what its records say: replaying a run's records gives the same machine.
    @Test("replay rebuilds the same machine, for seeded random worlds")
    func replay() throws {
        var generator = SplitMix64(seed: 0x6d69_6772)
        for _ in 0..<200 {
            var m = try machine(strategy: [.share, .copy, .link].randomElement(using: &generator)!)
            let seed = generator.next()
            var local = SplitMix64(seed: seed)
            var world = World()
            let outcomes: [World.Result] = [.ok, .ok, .ok, .ok, .failed, .uncertain]
            let choices = (0..<64).map { _ in outcomes.randomElement(using: &local)! }
            let liveness = (0..<64).map { _ in JournalEntry.Observation.Liveness.allCases.randomElement(using: &local)! }
            let counter = Counter()
            world.steps = { _, _, _ in choices[counter.next() % choices.count] }
            world.observe = { _ in liveness[counter.next() % liveness.count] }
            let records = [JournalEntry.Event.started(m.started!)] + drive(&m, world)
            #expect(MigrationMachine(replaying: records) == m, "seed \(seed)")
            #expect(m.finished != nil || m.halted != nil, "it stops in a terminal state or halted (seed \(seed))")
            if let finished = m.finished, finished.state == .completed {
                #expect(records.contains(.observed(.init(role: .target, liveness: .running))), "completed only once seen running (seed \(seed))")
            }
            if let finished = m.finished, finished.state == .rolledBack {
                #expect(!m.targetMayHaveRun, "rolled back only while the target never ran (seed \(seed))")
            }
        }
    }

    /// docs/machine.md is generated from the machine: it must be current.
    @Test func theDocumentedTableIsTheCode() throws {
        let generated = try gmigrate(["machine", "--document"])
        #expect(generated.status == 0)
        let documented = try String(contentsOfFile: repositoryRoot + "/docs/machine.md", encoding: .utf8)
        #expect(documented == generated.stdout, "docs/machine.md is stale: run tools/machine-table")
        #expect(generated.stdout.contains("| finished: completed"), "the table reaches completed")
    }
}

final class Counter: @unchecked Sendable {
    private(set) var value = 0
    func next() -> Int {
        value += 1
        return value
    }
}
