import Journal
import Kernel
import Plans

extension MigrationMachine {
    /// Where the machine stands, in words: the states of the generated table.
    public var phase: String {
        if let finished { return "finished: \(finished.state.rawValue)" }
        if halted != nil { return "halted (stuck)" }
        guard started != nil else { return "new" }
        let mode = isRollingBack ? "rolling back" : pastPointOfNoReturn ? "past the point of no return" : "forward"
        switch next() {
        case .perform(let step, let direction): return "\(mode): \(direction == .undo ? "undo " : "")\(step) in flight"
        case .append(.intent(let step, let direction)): return "\(mode): before \(direction == .undo ? "undo " : "")\(step)"
        case .append(.pointOfNoReturn): return "\(mode): at the point of no return"
        case .append(.finished(let finished)): return "\(mode): \(finished.state.rawValue) (record due)"
        case .append(.halted): return "\(mode): halting (record due)"
        case .append(.stopRequested): return "\(mode): giving the guest back (record due)"
        case .append: return "\(mode): record due"
        case .observe(let role): return "\(mode): asking the \(role.rawValue)"
        case .stop: return mode
        }
    }

    /// Every state change the machine makes, found by driving it through every outcome each
    /// effect can have (a step ok, failed, failed without an answer; a VMM running, stopped,
    /// gone; a cancel before the point of no return; one crash of the coordinator anywhere):
    /// the table in docs/machine.md is this, so it can never drift from the code.
    public static func transitions(strategy: Strategy, confidential: Bool) -> [Transition] {
        let plan = MigrationPlan.tableExample(confidential: confidential)
        let started = JournalEntry.Started(
            id: "table", planFile: "table", plan: plan, strategy: strategy, backend: "table", coordinatorPID: 1, faults: [])
        var seen: [String: Int] = [:]  // each state, with the fewest disturbances it was reached with
        var transitions: Set<Transition> = []
        // (machine, crashes so far, disturbances so far): at most one crash, and at most three
        // disturbances (failed outcomes, a cancel, the crash) per path — three is how often a step
        // is tried — reach every state without an endless tree.
        var queue = [(MigrationMachine(replaying: [.started(started)]), 0, 0)]
        while let (machine, recoveries, failures) = queue.popLast() {
            let key = machine.explorationKey + "|\(recoveries)"
            if let before = seen[key], before <= failures { continue }
            seen[key] = failures
            var branches: [(String, JournalEntry.Event)] = []
            switch machine.next() {
            case .stop:
                continue
            case .append(let event):
                branches.append((event.tableName, event))
            case .perform(let step, let direction):
                func outcome(_ ok: Bool, uncertain: Bool = false) -> JournalEntry.Event {
                    .outcome(.init(step: step, direction: direction, ok: ok, durationNanoseconds: 0, error: ok ? nil : "failed", uncertain: uncertain ? true : nil))
                }
                branches.append(("outcome ok", outcome(true)))
                if failures < MigrationMachine.attemptsPerStep {
                    branches.append(("outcome failed", outcome(false)))
                    if direction == .forward { branches.append(("outcome failed, no answer", outcome(false, uncertain: true))) }
                }
            case .observe(let role):
                for liveness in JournalEntry.Observation.Liveness.allCases {
                    branches.append(("\(role.rawValue) \(liveness.rawValue)", .observed(.init(role: role, liveness: liveness))))
                }
            }
            if failures < MigrationMachine.attemptsPerStep && !machine.pastPointOfNoReturn && !machine.isRollingBack && machine.inFlight == nil {
                branches.append(("cancel", .stopRequested(.init(kind: .cancel, reason: "cancelled"))))
            }
            if recoveries == 0 && failures < MigrationMachine.attemptsPerStep && machine.inFlight != nil {
                branches.append(("crash, then recovery", machine.recoveryRecord(pid: 2)))
            }
            let from = machine.phase
            for (name, event) in branches {
                var next = machine
                next.apply(event)
                transitions.insert(Transition(from: from, event: name, to: next.phase))
                queue.append((next, recoveries + (name == "crash, then recovery" ? 1 : 0), failures + (["cancel", "crash, then recovery"].contains(name) || name.hasPrefix("outcome failed") ? 1 : 0)))
            }
        }
        return transitions.sorted()
    }

    /// The state that decides what the machine does next (the started record and the details
    /// left out: they never change after the start, or do not steer it).
    var explorationKey: String {
        "\(pastPointOfNoReturn)|\(finished?.state.rawValue ?? "")|\(halted != nil)|\(rollbackReason != nil)|\(lostReason != nil)|\(inFlight.map { "\($0.step)\($0.direction)" } ?? "")|"
            + "\(completed.sorted { $0.rawValue < $1.rawValue })|\(attempted)|\(undone.sorted { $0.rawValue < $1.rawValue })|"
            + "\(uncertain.sorted { $0.rawValue < $1.rawValue })|\(targetSeenRunning)|\(attemptCounts)|\(freshObservations)|\(resumeSourceAgainForKey)"
    }
}

/// One row of the generated state table.
public struct Transition: Hashable, Comparable, Sendable {
    public var from: String
    public var event: String
    public var to: String

    public static func < (a: Transition, b: Transition) -> Bool {
        (a.from, a.event, a.to) < (b.from, b.event, b.to)
    }
}

extension JournalEntry.Event {
    /// The record's kind, as the table names it.
    var tableName: String {
        switch self {
        case .started: "started"
        case .intent(_, let direction): direction == .undo ? "intent (undo)" : "intent"
        case .outcome: "outcome"
        case .saved: "saved"
        case .pointOfNoReturn: "point of no return"
        case .observed: "observed"
        case .stopRequested(let stop): stop.kind == .cancel ? "cancel" : "abort"
        case .halted: "halted"
        case .recovery: "recovery"
        case .finished(let finished): "finished \(finished.state.rawValue)"
        }
    }
}

extension MigrationPlan {
    /// A plan for the generated table: one gmem file, one slot.
    static func tableExample(confidential: Bool) -> MigrationPlan {
        let text = """
            apiVersion: gmigrate/v1
            kind: MigrationPlan
            metadata: {name: table}
            spec:
              source: {vmm: /run/table.sock}
              target: {vmm: spawn}
              vm:
                type: \(confidential ? "sev" : "default")
                vcpus: 1
                guestMemfds: [{name: ram, size: 2Mi, flags: [mmap]}]
                memslots: [{slot: 0, guestPhysAddr: 0, size: 2Mi, guestMemfd: ram, offset: 0}]
              strategy: link
            """
        guard let plan = PlanLoader.load(text: text, file: "table").plan else { preconditionFailure("the table's plan is valid") }
        return plan
    }
}
