import Foundation
import GmigrateTestKit
import GmigrateTestSupport
import Handoff
import Journal
import Kernel
import Orchestrator
import Plans
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The journal's CRC-32C: the standard check value, and the hardware path (contiguous bytes)
/// equal to the table (any other sequence) on every length and split.
@Suite("CRC-32C")
struct CRC32CTests {
    @Test func checkValueAndAgreement() {
        #expect(CRC32C.update(0, Array("123456789".utf8)) == 0xE306_9283, "RFC 3720's check value")
        #expect(CRC32C.update(0, AnySequence(Array("123456789".utf8))) == 0xE306_9283, "the table gives it too")
        var random = SplitMix64(seed: 0xc2c)
        for length in [0, 1, 7, 8, 9, 63, 64, 65, 4095, 37_000] {
            let bytes = (0..<length).map { _ in UInt8(truncatingIfNeeded: random.next()) }
            let hardware = CRC32C.update(0, bytes)
            #expect(hardware == CRC32C.update(0, AnySequence(bytes)), "length \(length)")
            #expect(hardware == CRC32C.update(0, Data(bytes)), "length \(length), as Data")
            // Continuing over a split equals one pass.
            let cut = length / 3
            #expect(CRC32C.update(CRC32C.update(0, Array(bytes[..<cut])), Array(bytes[cut...])) == hardware, "length \(length) split at \(cut)")
        }
    }
}
