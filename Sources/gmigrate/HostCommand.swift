import ArgumentParser
import Kernel

enum BackendChoice: String, ExpressibleByArgument, CaseIterable {
    case linux, model
}

/// Opens the chosen backend; no usable /dev/kvm is exit 3 with the kernel's one-line reason.
func openBackend(_ choice: BackendChoice) throws -> any KernelBackend {
    switch choice {
    case .model:
        return KernelModel()
    case .linux:
        do {
            return try LinuxKVM()
        } catch {
            throw CommandFailure(code: .noKVM, message: "no usable KVM: /dev/kvm: \(kvmReason(error))")
        }
    }
}

func kvmReason(_ error: KernelError) -> String {
    switch error {
    case .failed(_, let errno) where errno == .noSuchFileOrDirectory: "does not exist (ENOENT): KVM is not available on this host"
    case .failed(_, let errno) where errno == .permissionDenied:
        "permission denied (EACCES): run as root or as a member of the kvm group"
    case .failed(_, let errno): "\(errno.name) (\(errno.message))"
    case .refused(_, let errno, let detail): "\(errno.name) (\(errno.message)): \(detail)"
    case .unsupported(_, let reason): reason
    }
}

struct Host: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Inspect this host's KVM.", subcommands: [Probe.self])

    struct Probe: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Report what this host's KVM offers, read from the kernel.")

        @OptionGroup var output: OutputOptions

        @Option(help: "linux (the real kernel) or model (the reference model).")
        var backend: BackendChoice = .linux

        func run() throws {
            let kernel = try openBackend(backend)
            let capabilities: HostCapabilities
            do {
                capabilities = try kernel.probe()
            } catch {
                throw CommandFailure(code: .kernelFailed, message: "probing failed: \(error)")
            }
            if output.json {
                print(encodeJSON(capabilities))
                return
            }
            func yes(_ value: Bool) -> String { value ? "yes" : "no" }
            func feature(_ f: HostCapabilities.Feature) -> String { (f.supported ? "supported" : "unsupported") + " (\(f.detail))" }
            let limits = capabilities.limits
            let rows: [(String, String)] = [
                ("API version", "\(capabilities.apiVersion)"),
                ("VM types", capabilities.vmTypes.joined(separator: ", ")),
                ("guest_memfd", capabilities.guestMemfd.supported
                    ? "yes, flags: \(capabilities.guestMemfd.flags.isEmpty ? "none" : capabilities.guestMemfd.flags.joined(separator: ", "))"
                    : "no"),
                ("memory region 2", yes(capabilities.userMemoryRegion2)),
                ("pre-fault memory", yes(capabilities.preFaultMemory)),
                ("immediate exit", yes(capabilities.immediateExit)),
                ("link", feature(capabilities.link)),
                ("move enc context", feature(capabilities.moveEncryptionContext)),
                ("copy enc context", feature(capabilities.copyEncryptionContext)),
                ("vcpus", "\(limits.recommendedVCPUs) recommended, \(limits.maxVCPUs) max, ids below \(limits.maxVCPUID)"),
                ("memslots", "\(limits.memslots) per address space, \(limits.addressSpaces) address space\(limits.addressSpaces == 1 ? "" : "s")"),
            ]
            print("KVM on this host (\(capabilities.backend) backend)")
            for (name, value) in rows {
                print("  " + name.padding(toLength: 18, withPad: " ", startingAt: 0) + value)
            }
        }
    }
}
