import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The machine a `KernelModel` runs on: the model kernel's state, shared by the simulated
/// processes that use it (one `KernelModel` per process).
///
/// In memory by default. With a file, the state outlives the processes that use it — as the
/// real kernel, and the VMM processes holding its objects, outlive a crashed coordinator — so
/// that crash and recovery can be rehearsed deterministically: a recovering coordinator finds
/// the VMs, files and vcpus that each simulated process still holds. Every operation is one
/// transaction under a lock (a mutex, and `flock` on the file across processes).
public final class ModelHost: Sendable {
    private enum Storage {
        case memory
        case file(String)
    }

    private let storage: Storage
    private let memory = Mutex(ModelState())

    /// A host in this process's memory.
    public init() { storage = .memory }

    /// A host whose state lives in `path` (created on first use).
    public init(file path: String) { storage = .file(path) }

    /// The file, for a host that lives in one.
    public var path: String? {
        if case .file(let path) = storage { return path }
        return nil
    }

    func transaction<Result, Failure: Error>(_ body: (inout ModelState) throws(Failure) -> Result) throws(Failure) -> Result {
        switch storage {
        case .memory:
            return try memory.withLock { (state: inout ModelState) throws(Failure) -> Result in try body(&state) }
        case .file(let path):
            // The mutex orders this process's threads; flock orders the processes.
            return try memory.withLock { (_: inout ModelState) throws(Failure) -> Result in
                let lockFD = open(path + ".lock", O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
                if lockFD >= 0 { _ = flock(lockFD, LOCK_EX) }
                defer { if lockFD >= 0 { close(lockFD) } }
                var state = ModelHost.load(path)
                let result = try body(&state)
                ModelHost.save(state, to: path)
                return result
            }
        }
    }

    private static func load(_ path: String) -> ModelState {
        guard let data = FileManager.default.contents(atPath: path), !data.isEmpty else { return ModelState() }
        guard let state = try? JSONDecoder().decode(ModelState.self, from: data) else {
            // The host file is the model's own; one that does not decode is a bug, not input.
            preconditionFailure("model host \(path) does not decode")
        }
        return state
    }

    private static func save(_ state: ModelState, to path: String) {
        guard let data = try? JSONEncoder().encode(state) else { preconditionFailure("model state does not encode") }
        let temporary = path + ".tmp"
        // Rename is atomic: another process sees the old state or the new one, never a torn one.
        guard FileManager.default.createFile(atPath: temporary, contents: data), rename(temporary, path) == 0 else {
            preconditionFailure("model host \(path) cannot be written: \(String(cString: strerror(errno)))")
        }
    }

    /// The handles a simulated process holds, with what each is.
    public func handles(ownedBy process: String) -> [(handle: KernelHandle, kind: String)] {
        transaction { (state: inout ModelState) -> [(handle: KernelHandle, kind: String)] in
            state.handles.filter { $0.value.owner == process }.sorted { $0.key < $1.key }.map { entry in
                let kind: String
                switch entry.value.object {
                case .vm: kind = "vm"
                case .vcpu: kind = "vcpu"
                case .file: kind = "gmem"
                }
                return (KernelHandle(raw: entry.key), kind)
            }
        }
    }

    /// Closes every handle (and unmaps every mapping) a process holds, as the kernel does when
    /// that process exits.
    public func exit(process: String) {
        transaction { (state: inout ModelState) in
            for (address, mapping) in state.mappings where mapping.owner == process {
                state.mappings[address] = nil
                state.files[mapping.file]?.mappings -= 1
                state.releaseIfUnused(file: mapping.file)
            }
            for handle in state.handles.filter({ $0.value.owner == process }).map(\.key).sorted() {
                state.close(KernelHandle(raw: handle))
            }
        }
    }

    /// The VMs that exist, and for each the inodes it can reach (through its gmem files or its
    /// host mappings): what "which VM holds the memory" is asked of.
    public func vmsHoldingMemory() -> [(creator: String, inodes: Set<UInt64>)] {
        transaction { (state: inout ModelState) -> [(creator: String, inodes: Set<UInt64>)] in
            state.vms.sorted { $0.key < $1.key }.map { (id, vm) in
                var inodes = Set(vm.files.compactMap { state.files[$0].flatMap { state.inodes[$0.inode]?.number } })
                for slot in vm.memslots.values where !slot.flags.contains(.guestMemfd) {
                    if let (inode, _) = state.resolveHostAddress(slot.userspaceAddress), let number = state.inodes[inode]?.number {
                        inodes.insert(number)
                    }
                }
                return (vm.creator, inodes)
            }
        }
    }

    /// Records a simulated process's own state (a VMM: `running` or `stopped`), which outlives
    /// a crash of another process as the VMM itself would.
    public func setStatus(process: String, _ status: String?) {
        transaction { (state: inout ModelState) in state.processStatus[process] = status }
    }

    public func status(of process: String) -> String? {
        transaction { (state: inout ModelState) -> String? in state.processStatus[process] }
    }

    /// How many inodes hold memory.
    public var liveInodeCount: Int { transaction { $0.inodes.count } }
}
