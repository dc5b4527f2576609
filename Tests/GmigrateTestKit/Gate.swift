import Foundation
import Kernel
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The one gate for tests that need something of the host: a usable /dev/kvm, a program, a
/// network namespace, root, a CPU feature. Each `require…` returns when the prerequisite is
/// there; otherwise the test is skipped with the reason — unless `GMIGRATE_REQUIRE_KVM=1` (CI,
/// and this machine), where the missing prerequisite is a failure naming the test and the
/// reason. There is no other way to skip a test in this suite: a product that fails is a
/// failure, never a skip.
public enum Gate {
    /// Whether CI asked for every prerequisite to be present.
    public static var strict: Bool { ProcessInfo.processInfo.environment["GMIGRATE_REQUIRE_KVM"] == "1" }

    /// Skips the current test saying why, or fails it under `GMIGRATE_REQUIRE_KVM=1`.
    public static func missing(_ reason: String, sourceLocation: SourceLocation = #_sourceLocation) throws -> Never {
        if strict {
            Issue.record("GMIGRATE_REQUIRE_KVM=1, but this test \(reason)", sourceLocation: sourceLocation)
            throw PrerequisiteMissing(reason: reason)
        }
        try Test.cancel(Comment(rawValue: reason), sourceLocation: sourceLocation)
    }
}

/// A prerequisite that `GMIGRATE_REQUIRE_KVM=1` demands and the host lacks.
public struct PrerequisiteMissing: Error, CustomStringConvertible {
    public var reason: String
    public var description: String { "prerequisite missing: \(reason)" }
}

/// A usable /dev/kvm: the real kernel backend, or a skip (a failure under the variable).
@discardableResult
public func requireKVM(sourceLocation: SourceLocation = #_sourceLocation) throws -> LinuxKVM {
    switch LinuxKVM.availability() {
    case .success:
        // /dev/kvm answered availability(): failing to open it now is a product failure.
        return try LinuxKVM()
    case .failure(let error):
        try Gate.missing("needs a usable /dev/kvm: \(error)", sourceLocation: sourceLocation)
    }
}

/// Whether a usable /dev/kvm is here, for a test that asserts either way (never to skip).
public var kvmIsUsable: Bool { if case .success = LinuxKVM.availability() { true } else { false } }

/// A program on PATH (or at an absolute path).
public func requireTool(_ name: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
    try requireTools([name], sourceLocation: sourceLocation)
}

/// Programs on PATH: binutils' `as` and `ld`, iproute2's `ip`, curl, setpriv...
public func requireTools(_ names: [String], sourceLocation: SourceLocation = #_sourceLocation) throws {
    let directories = (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":").map(String.init) + ["/usr/sbin", "/sbin"]
    func found(_ name: String) -> Bool {
        if name.hasPrefix("/") { return FileManager.default.isExecutableFile(atPath: name) }
        return directories.contains { directory in FileManager.default.isExecutableFile(atPath: directory + "/" + name) }
    }
    let missing = names.filter { !found($0) }
    guard !missing.isEmpty else { return }
    try Gate.missing("needs \(missing.joined(separator: ", ")) (tools/setup.sh installs them)", sourceLocation: sourceLocation)
}

/// Root: to drop to another uid, to make network namespaces and taps.
public func requireRoot(sourceLocation: SourceLocation = #_sourceLocation) throws {
    guard getuid() != 0 else { return }
    try Gate.missing("needs root", sourceLocation: sourceLocation)
}

/// A network namespace of its own: root and iproute2.
public func requireNetns(sourceLocation: SourceLocation = #_sourceLocation) throws {
    try requireRoot(sourceLocation: sourceLocation)
    try requireTool("ip", sourceLocation: sourceLocation)
}

/// A feature of this host's CPU, as the guest sees it (AVX, say): a test of it runs where the
/// feature is.
public func requireHostFeature(_ name: String, present: Bool, sourceLocation: SourceLocation = #_sourceLocation) throws {
    guard !present else { return }
    try Gate.missing("needs \(name), which this host's CPUID does not offer the guest", sourceLocation: sourceLocation)
}

/// For the few expectations that are facts of this project's machine kind, not of KVM (the
/// host examples' exact probe texts: no link ioctl, default VMs only): they are checked where
/// the probe finds that kind, and elsewhere skipped saying so, even under
/// `GMIGRATE_REQUIRE_KVM=1` — on another host they would not be wrong, only different. Every
/// other expectation reads the host from the probe.
public func requireThisMachineKind(_ matches: Bool, what: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
    guard !matches else { return }
    try Test.cancel(Comment(rawValue: "a fact of this project's machine kind (\(what)); this host differs"), sourceLocation: sourceLocation)
}
