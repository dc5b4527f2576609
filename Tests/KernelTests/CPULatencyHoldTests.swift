import Foundation
import GmigrateTestKit
import Kernel
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite("CPU latency hold")
struct CPULatencyHoldTests {
    /// The CPU latency QoS value the kernel enforces now: reading /dev/cpu_dma_latency answers it.
    static func enforced() throws -> Int32 {
        let fd = open("/dev/cpu_dma_latency", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw CocoaError(.fileReadNoPermission) }
        defer { close(fd) }
        var value: Int32 = -1
        guard read(fd, &value, 4) == 4 else { throw CocoaError(.fileReadUnknown) }
        return value
    }

    /// How many of this process's descriptors are open on /dev/cpu_dma_latency.
    static func descriptorsOnTheRequest() -> Int {
        let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
        return fds.filter { (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/" + $0)) == "/dev/cpu_dma_latency" }.count
    }

    /// Other tests' coordinators may hold a request of their own meanwhile, so what is checked
    /// after the hold is this process's descriptor (the kernel drops a request when it closes).
    @Test("a hold sets the host's CPU latency request to 0 while it lives, and closes it after")
    func holdsWhileItLives() throws {
        try requireRoot()
        let before = Self.descriptorsOnTheRequest()
        do {
            let hold = CPULatencyHold()
            #expect(hold.isHeld, "\(hold.summary)")
            #expect(try Self.enforced() == 0)
            #expect(Self.descriptorsOnTheRequest() == before + 1)
            withExtendedLifetime(hold) {}
        }
        #expect(Self.descriptorsOnTheRequest() == before)
    }

    @Test("a hold that cannot open its file holds nothing and says why")
    func saysWhy() {
        let hold = CPULatencyHold(path: "/nonexistent/cpu_dma_latency")
        #expect(!hold.isHeld)
        #expect(hold.refusal == .noSuchFileOrDirectory)
        #expect(hold.summary == "not held: /nonexistent/cpu_dma_latency: ENOENT", "\(hold.summary)")
    }
}
