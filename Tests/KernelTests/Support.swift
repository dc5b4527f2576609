import Foundation
import Kernel
import KernelScript
import Testing

/// The two kernels every conformance case runs on.
enum Backend: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case model, linux
    var testDescription: String { rawValue }

    /// A fresh backend, or a loud skip where /dev/kvm is unusable (a failure when CI sets
    /// GMIGRATE_REQUIRE_KVM=1, so that a missing /dev/kvm can never pass as skipped tests).
    func make() throws -> any KernelBackend {
        switch self {
        case .model: return KernelModel()
        case .linux:
            switch LinuxKVM.availability() {
            case .success: return try LinuxKVM()
            case .failure(let error):
                let reason = "needs a usable /dev/kvm: \(error)"
                if ProcessInfo.processInfo.environment["GMIGRATE_REQUIRE_KVM"] == "1" {
                    Issue.record("GMIGRATE_REQUIRE_KVM=1 but \(reason)")
                }
                try Test.cancel(Comment(rawValue: reason))
            }
        }
    }
}

/// The gate for tests that need programs (binutils' `as` and `ld`, say): they run where the
/// programs are, and elsewhere skip saying which is missing (a failure under
/// GMIGRATE_REQUIRE_KVM=1, where tools/setup.sh installed them).
func requireTools(_ names: [String]) throws {
    let path = (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":")
    let missing = names.filter { name in !path.contains { FileManager.default.isExecutableFile(atPath: "\($0)/\(name)") } }
    guard !missing.isEmpty else { return }
    let reason = "needs \(missing.joined(separator: ", ")) on PATH (tools/setup.sh installs them)"
    if ProcessInfo.processInfo.environment["GMIGRATE_REQUIRE_KVM"] == "1" {
        Issue.record("GMIGRATE_REQUIRE_KVM=1 but \(reason)")
    }
    try Test.cancel(Comment(rawValue: reason))
}

/// Runs a script text on a backend and returns its line results.
func runScript(_ text: String, on backend: any KernelBackend, name: String = "case") throws -> [LineResult] {
    let script = try Script.parse(text, path: name)
    return ScriptRunner(backend: backend).run(script)
}

/// The tiny real-mode guest used by several tests: it stores 0x2a at 0x2000, reads it back,
/// writes it to port 0x10 and halts.
let storeAndHalt: [UInt8] = [0xC6, 0x06, 0x00, 0x20, 0x2A, 0xA0, 0x00, 0x20, 0xE6, 0x10, 0xF4]

/// A counter loop: inc dword [0x2000]; mov eax, [0x2000]; out 0x10, eax; jmp back.
let counterLoop: [UInt8] = [0x66, 0xFF, 0x06, 0x00, 0x20, 0x66, 0xA1, 0x00, 0x20, 0x66, 0xE7, 0x10, 0xEB, 0xF2]
