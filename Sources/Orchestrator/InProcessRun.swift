import Foundation
import Journal
import Kernel
import Plans

#if canImport(Glibc)
import Glibc
#endif

/// Which kernel a standalone migration runs on.
public enum StandaloneBackend: Sendable, Equatable {
    case linux
    /// The model; with a host file, its state outlives this process (for crash rehearsals).
    case model(hostFile: String?)
}

/// What the run checked after the migration: the guest's memory and its counter.
public struct Verification: Codable, Sendable, Equatable {
    /// The guest's counter when the source was paused (nil when the guest memory is private).
    public var counterBefore: UInt32?
    /// The counter values the guest reported after the migration, in the VM that runs.
    public var counterAfter: [UInt32]
    /// Bytes written into guest memory before the migration and read back after it.
    public var bytesChecked: Int
    public var bytesIntact: Bool
    /// Source and target inodes of each gmem file (link and share: the same inode).
    public var sourceInodes: [String: String]
    public var targetInodes: [String: String]
    public var note: String?

    public var passed: Bool {
        bytesIntact && (counterBefore.map { before in counterAfter.first == before &+ 1 } ?? true)
    }
}

/// The VMMs of a migration that live in the coordinator's own process. They share the
/// coordinator's fault injector through their kernel (`FaultInjectingBackend`), so `kernel:*`
/// faults need no arming of their own. After a crash they are gone: they ended with the
/// coordinator's process, and recovery can only say so.
public final class InProcessEndpoints: EndpointProvider {
    let sourceVMM: InProcessVMM?
    let targetVMM: InProcessVMM?
    private let goneReason: String
    private var targetMade = false

    public init(source: InProcessVMM, target: InProcessVMM) {
        sourceVMM = source
        targetVMM = target
        goneReason = ""
    }

    private init(goneReason: String) {
        sourceVMM = nil
        targetVMM = nil
        self.goneReason = goneReason
    }

    /// What a recovering coordinator finds of an in-process migration: nothing. On a model host
    /// that outlives the crashed process, the kernel's own cleanup of that process is done here
    /// (its handles closed, its VMs gone), as Linux does when a process exits.
    public static func afterCrash(_ started: JournalEntry.Started) -> InProcessEndpoints {
        if started.backend.hasPrefix("model:") {
            let host = ModelHost(file: String(started.backend.dropFirst("model:".count)))
            for role in ["source", "target"] {
                host.exit(process: started.id + "/" + role)
                host.setStatus(process: started.id + "/" + role, nil)
            }
        }
        return InProcessEndpoints(
            goneReason: "the in-process VMMs ended with the coordinator (pid \(started.coordinatorPID)) that held them")
    }

    public func source() throws(EndpointError) -> any VMMEndpoint {
        guard let sourceVMM else { throw EndpointError(goneReason) }
        return sourceVMM
    }

    public func makeTarget() throws(EndpointError) -> any VMMEndpoint {
        guard let targetVMM else { throw EndpointError(goneReason) }
        targetMade = true
        return targetVMM
    }

    public func existingTarget() -> (any VMMEndpoint)? { targetMade ? targetVMM : nil }

    /// Nothing to kill: destroy (the executor's first undo) closed the target's VM.
    public func disposeTarget() throws(EndpointError) {}

    public var targetDetails: [String: String] { [:] }
    public var abortReason: String? { nil }
    public func armKernelFaults(_ specs: [FaultSpec]) {}
    public var firedKernelFaults: [FaultSpec] { [] }
}

/// A migration of a VM created in-process from its plan: the source is set up (its guest
/// run for `guestExits` exits, marks written into every host-writable slot), the one runner
/// migrates it, and the surviving VM's guest is run again and its memory checked.
public final class InProcessRun {
    public let summary: MigrationSummary
    public let verification: Verification?
    public let source: InProcessVMM
    public let target: InProcessVMM
    public let backendName: String
    public let journalPath: String

    init(summary: MigrationSummary, verification: Verification?, source: InProcessVMM, target: InProcessVMM, backendName: String, journalPath: String) {
        self.summary = summary
        self.verification = verification
        self.source = source
        self.target = target
        self.backendName = backendName
        self.journalPath = journalPath
    }

    /// How many guest exits the source runs before the migration, and the survivor after it.
    public static let guestExits = 32

    /// Creates the plan's VM in-process, runs its guest, migrates it with `strategy`, and checks
    /// that the guest carries on with its memory intact.
    /// - Parameter faults: armed once the source is set up, so that they fire in the migration.
    public static func run(
        plan: MigrationPlan, planFile: String, strategy: Strategy, backend: StandaloneBackend, journal store: Journal,
        faults specs: [FaultSpec], linux: LinuxKVM? = nil, progress: @escaping (StepReport) -> Void = { _ in },
        cancelReason: @escaping () -> String? = { nil }, observer: @escaping (JournalEntry.Event) -> Void = { _ in },
        idempotencyKey: String? = nil, id chosen: String? = nil
    ) throws -> InProcessRun {
        let id = chosen ?? MigrationRunner.newID(plan.name)
        let injector = FaultInjector()
        let sourceBackend: any KernelBackend
        let targetBackend: any KernelBackend
        let host: ModelHost?
        let backendName: String
        switch backend {
        case .linux:
            let kernel = try linux ?? LinuxKVM()
            (sourceBackend, targetBackend, host, backendName) = (kernel, kernel, nil, "linux")
        case .model(let hostFile):
            let modelHost = hostFile.map(ModelHost.init(file:)) ?? ModelHost()
            sourceBackend = KernelModel(host: modelHost, process: id + "/source")
            targetBackend = KernelModel(host: modelHost, process: id + "/target")
            host = hostFile == nil ? nil : modelHost
            backendName = hostFile.map { "model:" + $0 } ?? "model"
        }
        let source = InProcessVMM(
            role: "source", backend: FaultInjectingBackend(sourceBackend, faults: injector), statusHost: host, process: id + "/source")
        let target = InProcessVMM(
            role: "target", backend: FaultInjectingBackend(targetBackend, faults: injector), statusHost: host, process: id + "/target")
        try source.createSource(plan.vm)

        // The guest runs before the migration; some bytes of every host-writable slot are marked.
        let guestRuns = source.canWriteGuest(at: InProcessVMM.programAddress, count: 0x1004)
        var counterBefore: UInt32? = nil
        if guestRuns {
            counterBefore = counters(try source.runGuest(exits: guestExits)).last
        }
        var marks: [(UInt64, [UInt8])] = []
        for slot in plan.vm.memslots {
            let gpa = slot.guestPhysAddr + slot.size - 4096
            guard source.canWriteGuest(at: gpa, count: 16) else { continue }
            let bytes = Array("gmigrate slot \(slot.slot)   ".utf8.prefix(16))
            try source.writeGuest(gpa: gpa, bytes: bytes)
            marks.append((gpa, bytes))
        }

        var started = JournalEntry.Started(
            id: id, planFile: planFile, plan: plan, strategy: strategy, backend: backendName, coordinatorPID: getpid(),
            faults: specs.map(\.description))
        started.idempotencyKey = idempotencyKey
        let journal = try MigrationRunner.begin(started, in: store)
        let summary = try MigrationRunner.run(
            journal, provider: InProcessEndpoints(source: source, target: target), faults: injector, progress: progress,
            cancelReason: cancelReason, observer: observer)
        injector.disarm()

        // Verification: the VM that runs now has the memory the source had.
        let survivor: InProcessVMM? = summary.state == .completed ? target : summary.state == .rolledBack ? source : nil
        var verification: Verification? = nil
        if let survivor, survivor.isRunning {
            var intact = true
            for (gpa, bytes) in marks where (try? survivor.readGuest(gpa: gpa, count: bytes.count)) != bytes { intact = false }
            let after = guestRuns ? counters(try survivor.runGuest(exits: guestExits)) : []
            verification = Verification(
                counterBefore: counterBefore, counterAfter: after, bytesChecked: marks.reduce(0) { $0 + $1.1.count },
                bytesIntact: intact, sourceInodes: journal.entries.inodes(recordedBy: .prepare),
                targetInodes: journal.entries.inodes(recordedBy: .handOverMemory),
                note: guestRuns ? nil : "guest memory is private (no init-shared): the guest program cannot be loaded from the host; verified by inode identity")
        }
        return InProcessRun(summary: summary, verification: verification, source: source, target: target, backendName: backendName, journalPath: journal.path)
    }

    static func counters(_ exits: [VCPUExit]) -> [UInt32] {
        exits.compactMap { exit in
            guard case .io(let port, true, 4, let data) = exit, port == InProcessVMM.counterPort else { return nil }
            return UInt32(littleEndianBytes: data)
        }
    }
}
