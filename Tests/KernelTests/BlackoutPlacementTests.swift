import Foundation
import Kernel
import Testing

@Suite("Blackout placement")
struct BlackoutPlacementTests {
    /// The CPUs the calling thread may run on, as the kernel says (`Cpus_allowed_list`).
    static func allowed() throws -> Set<Int> {
        let status = try String(contentsOfFile: "/proc/thread-self/status", encoding: .utf8)
        let line = try #require(status.split(separator: "\n").first { $0.hasPrefix("Cpus_allowed_list:") })
        var cpus = Set<Int>()
        for range in line.dropFirst("Cpus_allowed_list:".count).trimmingCharacters(in: .whitespaces).split(separator: ",") {
            let ends = range.split(separator: "-").compactMap { Int($0) }
            if let first = ends.first { cpus.formUnion(first...(ends.last ?? first)) }
        }
        return cpus
    }

    @Test("a target's staging runs on the last CPU, a source's pause on the others, and each thread gets its mask back")
    func placesAndPutsBack() throws {
        let before = try Self.allowed()
        let last = try #require(before.max())
        let staging = BlackoutPlacement.stagingThread()
        defer { staging.end() }  // whatever fails below, the test runner's thread gets its mask back
        #expect(staging.placed == (before.count > 1))
        #expect(try Self.allowed() == (before.count > 1 ? [last] : before))
        staging.end()
        #expect(try Self.allowed() == before)
        let pausing = BlackoutPlacement.pausingThread()
        defer { pausing.end() }
        #expect(try Self.allowed() == (before.count > 1 ? before.subtracting([last]) : before))
        pausing.end()
        pausing.end()  // once only
        #expect(try Self.allowed() == before)
    }
}
