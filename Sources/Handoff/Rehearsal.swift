import Foundation
import Journal
import Kernel
import Orchestrator
import Plans

/// The dry run: the whole migration machine rehearsed on an in-memory model, touching no VM of
/// this host. A plan whose source is a running VMM is rehearsed with what that VMM describes
/// (describe is read-only): its VM must be the plan's, and the rehearsal migrates a model VM of
/// that shape.
public enum Rehearsal {
    public struct Result {
        public let run: InProcessRun
        public let notes: [String]
    }

    public static func run(
        plan: MigrationPlan, planFile: String, strategy: Strategy, faults: [FaultSpec], progress: @escaping (StepReport) -> Void = { _ in }
    ) throws -> Result {
        var notes: [String] = []
        if case .socket(let path) = plan.source {
            let source = try RemoteVMM(role: "source", socketPath: path, timeout: plan.policy.stepTimeout)
            let description = try source.describe()
            try MigrationExecutor.check(description, against: plan)
            notes.append(
                "the source VMM at \(path) (pid \(source.peer.pid)) describes the plan's VM: \(description.vcpus) vcpus, \(description.guestMemfds.count) gmem files, \(description.memslots.count) memslots; nothing was asked of it but that")
        }
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("gmigrate-dry-run-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let journal = try Journal(stateDirectory: directory)
        var rehearsed = plan
        rehearsed.source = .inProcess
        rehearsed.target = .inProcess
        let run = try InProcessRun.run(
            plan: rehearsed, planFile: planFile, strategy: strategy, backend: .model(hostFile: nil), journal: journal, faults: faults,
            progress: progress)
        notes.append("dry run: rehearsed on the model; no VM of this host was touched")
        return Result(run: run, notes: notes)
    }
}
