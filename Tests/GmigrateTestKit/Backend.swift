import Foundation
import Kernel
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The two kernels every conformance case runs on.
public enum Backend: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case model, linux
    public var testDescription: String { rawValue }

    /// A fresh backend; for linux, through the test kit's gate (a skip where /dev/kvm is
    /// unusable, a failure under GMIGRATE_REQUIRE_KVM=1).
    public func make(sourceLocation: SourceLocation = #_sourceLocation) throws -> any KernelBackend {
        switch self {
        case .model: return KernelModel()
        case .linux: return try requireKVM(sourceLocation: sourceLocation)
        }
    }
}
