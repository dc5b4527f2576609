import Kernel

/// What one line did.
public struct LineResult: Sendable, Equatable, Codable {
    public enum Status: String, Sendable, Codable {
        /// No expectation on the line.
        case none
        case match
        case mismatch
        /// The backend lacks the operation (`unsupported`) or the line was `skipped`: not compared.
        case unchecked
    }

    public var line: Int
    public var source: String
    public var result: String
    public var expected: String?
    public var status: Status
}

/// Runs a parsed script on one backend, line by line; every line prints one result.
public final class ScriptRunner {
    public let backend: any KernelBackend
    private var vms: [String: Owned<VirtualMachine>] = [:]
    private var vcpus: [String: [UInt32: Owned<VCPU>]] = [:]
    private var files: [String: Owned<GuestMemfd>] = [:]
    private var mappings: [String: Owned<GuestMapping>] = [:]
    /// Objects whose creation failed or was skipped, or whose memory a skipped line would have
    /// changed: lines naming them are `skipped`, since their state is no longer the script's.
    private var missing: Set<String> = []
    /// The first file of each inode family: `link NEW from=FILE` puts NEW in FILE's family.
    private var family: [String: String] = [:]

    public init(backend: any KernelBackend) {
        self.backend = backend
    }

    /// Runs every line in order and returns their results.
    public func run(_ script: Script) -> [LineResult] {
        script.lines.map { line in
            let result = execute(line.command)
            return LineResult(
                line: line.number, source: line.source, result: result, expected: line.expected,
                status: ScriptRunner.compare(result: result, expected: line.expected))
        }
    }

    /// Compares a result with an expectation; numbers in `ok VALUE` compare by value.
    static func compare(result: String, expected: String?) -> LineResult.Status {
        guard let expected else { return .none }
        if normalize(result) == normalize(expected) { return .match }
        if result == "unsupported" || result == "skipped" { return .unchecked }
        return .mismatch
    }

    static func normalize(_ text: String) -> String {
        let words = text.split(separator: " ").map(String.init)
        guard words.first == "ok", words.count == 2, let value = parseQuantity(words[1]) else { return words.joined(separator: " ") }
        return "ok \(value)"
    }

    // MARK: - Commands

    private func execute(_ command: Script.Command) -> String {
        if case .link(let file, let from, _) = command { family[file] = family[from] ?? from }
        if case .close(let name) = command, missing.contains(name) {
            missing.remove(name)
            family[name] = nil
            return "skipped"
        }
        if command.uses.contains(where: missing.contains) {
            if let (name, _) = command.creates { missing.insert(name) }
            // A skipped line that would have changed memory leaves every file of the inode
            // with contents the script no longer describes.
            if let changed = command.changesMemoryOf {
                let root = family[changed] ?? changed
                missing.formUnion(files.keys.filter { (family[$0] ?? $0) == root })
            }
            return "skipped"
        }
        do {
            return try perform(command)
        } catch {
            if let (name, _) = command.creates { missing.insert(name) }
            switch error {
            case .failed(_, let errno), .refused(_, let errno, _): return "error \(errno.name)"
            case .unsupported: return "unsupported"
            }
        }
    }

    private func perform(_ command: Script.Command) throws(KernelError) -> String {
        switch command {
        case .vm(let name, let type):
            vms[name] = Owned(try backend.createVirtualMachine(type: type))
            vcpus[name] = [:]
        case .vcpus(let name, let count):
            let vm = vms[name]!
            let first = UInt32(vcpus[name]!.count)
            for id in first..<first + count {
                vcpus[name]![id] = Owned(try vm.value.createVCPU(id: id))
            }
        case .gmem(let file, let vm, let size, let flags):
            files[file] = Owned(try vms[vm]!.value.createGuestMemfd(size: size, flags: flags))
        case .slot(let vm, let slot, let gpa, let size, let backing, let flags):
            var region = MemslotRegion(slot: slot, flags: flags, guestPhysicalAddress: gpa, size: size)
            switch backing {
            case .none:
                break
            case .guestMemfd(let file, let offset):
                region.guestMemfd = files[file]!.value.handle
                region.guestMemfdOffset = offset
                // Where the file can be mapped, give KVM the mapping too, as a VMM does: KVM
                // reads guest memory through it where it must emulate (see VirtualMachine.setMemslot).
                if files[file]!.value.flags.contains(.mmap) {
                    region.userspaceAddress = try mapping(of: file).value.address &+ offset
                }
            case .mapping(let file, let offset):
                region.userspaceAddress = try mapping(of: file).value.address &+ offset
            }
            try vms[vm]!.value.setMemslot(region)
        case .link(let file, let from, let vm):
            files[file] = Owned(try vms[vm]!.value.link(files[from]!.value))
        case .launch(let vm):
            try vms[vm]!.value.launch()
        case .moveEncryptionContext(let destination, let source):
            try vms[destination]!.value.moveEncryptionContext(from: vms[source]!.value)
        case .fault(let vm, let gpa):
            // KVM_PRE_FAULT_MEMORY is a vcpu ioctl: the VM's lowest vcpu carries it.
            guard let vcpu = vcpus[vm]!.min(by: { $0.key < $1.key })?.value else {
                throw .failed(operation: .prefault, errno: .noSuchDeviceOrAddress)
            }
            try vcpu.value.prefault(guestPhysicalAddress: gpa & ~0xfff)
        case .punch(let file, let offset, let length):
            try files[file]!.value.punchHole(offset: offset, length: length)
        case .write(let file, let offset, let value):
            try access(file, offset: offset, count: 1) { (mapping: borrowing GuestMapping) throws(KernelError) in
                try mapping.write(offset: offset, bytes: [value])
            }
        case .load(let file, let offset, let bytes):
            try access(file, offset: offset, count: bytes.count) { (mapping: borrowing GuestMapping) throws(KernelError) in
                try mapping.write(offset: offset, bytes: bytes)
            }
        case .read(let file, let offset):
            var value: UInt8 = 0
            try access(file, offset: offset, count: 1) { (mapping: borrowing GuestMapping) throws(KernelError) in
                value = try mapping.read(offset: offset, count: 1)[0]
            }
            return "ok 0x" + String(value, radix: 16)
        case .sameInode(let a, let b):
            let same = try files[a]!.value.inodeIdentity() == files[b]!.value.inodeIdentity()
            return "ok \(same)"
        case .close(let name):
            // Closing a VM closes its vcpus too, as a VMM tearing it down does.
            vcpus[name] = nil
            vms[name] = nil
            mappings[name] = nil
            files[name] = nil
            family[name] = nil
        case .boot(let vm, let id, let rip):
            guard let vcpu = vcpus[vm]![id] else { throw .failed(operation: .setVCPUState, errno: .noSuchDeviceOrAddress) }
            var state = try vcpu.value.state().only(VCPUState.bootSections)
            state.specialRegisters.setFlatRealMode()
            state.registers.rip = rip
            try vcpu.value.setState(state)
        case .run(let vm, let id):
            guard let vcpu = vcpus[vm]![id] else { throw .failed(operation: .runVCPU, errno: .noSuchDeviceOrAddress) }
            return "ok \(try vcpu.value.run())"
        }
        return "ok"
    }

    /// The runner's mapping of a whole file (made on first use, unmapped when the file closes).
    private func mapping(of file: String) throws(KernelError) -> Owned<GuestMapping> {
        if let existing = mappings[file] { return existing }
        let made = Owned(try files[file]!.value.map())
        mappings[file] = made
        return made
    }

    private func access(
        _ file: String, offset: UInt64, count: Int, _ body: (borrowing GuestMapping) throws(KernelError) -> Void
    ) throws(KernelError) {
        let mapping = try mapping(of: file)
        // Beyond the end of the file: the host access would raise SIGBUS; report it as EFAULT.
        guard offset + UInt64(count) <= mapping.value.length else { throw .failed(operation: .accessMemory, errno: .badAddress) }
        try body(mapping.value)
    }
}
