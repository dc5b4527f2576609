import Foundation
import HostNet
import Journal
import Kernel
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite("Netlink")
struct NetlinkTests {
    @Test func kvmUeventsAreParsed() {
        let create = KVMEvent(["ACTION": "change", "DEVPATH": "/devices/virtual/misc/kvm", "SUBSYSTEM": "misc", "EVENT": "create", "PID": "42", "STATS_PATH": "/kvm/42-10", "COUNT": "3", "CREATED": "7"])
        #expect(create?.kind == .create && create?.pid == 42 && create?.count == 3 && create?.created == 7 && create?.statsPath == "/kvm/42-10")
        #expect(KVMEvent(["DEVPATH": "/devices/virtual/net/tap0", "ACTION": "add"]) == nil, "not KVM's")
        #expect(KVMEvent(["DEVPATH": "/devices/virtual/misc/kvm", "EVENT": "create"]) == nil, "no PID")
    }

    /// The real kernel announces a VM's creation and destruction; the watcher sees both.
    @Test func theWatcherSeesAVMComeAndGo() throws {
        let kernel = try Backend.linux.make()
        let watcher = try KVMEventWatcher()
        let seen = Locked<[KVMEvent]>([])
        // KVM records the creating *thread*'s id: ours if it is one of this process's tasks.
        watcher.subscribe { event in
            if FileManager.default.fileExists(atPath: "/proc/self/task/\(event.pid)") { seen.mutate { $0.append(event) } }
        }
        Thread.sleep(forTimeInterval: 0.1)
        do { _ = try kernel.createVirtualMachine() }
        #expect(waitUntil(5) { seen.value.contains { $0.kind == .destroy } }, "create and destroy uevents for pid \(getpid())")
        #expect(seen.value.map(\.kind).prefix(2) == [.create, .destroy])
        watcher.stop()
    }

    @Test func linksAreReadThroughRtnetlink() throws {
        let links = try readLinks()
        let loopback = try #require(links.first { $0.name == "lo" })
        #expect(loopback.isUp)
        #expect(loopback.mtu == 65536)
        #expect(loopback.index == 1)
    }

    /// A VMM killed mid-migration: the migration reacts to KVM's destroy uevent at once, not
    /// when its next request fails or times out.
    @Test func aKilledVMMStopsTheMigrationThroughItsUevent() throws {
        _ = try Backend.linux.make()
        let fixture = try ProcessFixture(strategy: "share")
        defer { fixture.finish() }
        let started = Date()
        let result = try ProcessTests().killDuring(fixture, point: "before:bind-memslots=delay:20s") { started in started.targetPID ?? 0 }
        let elapsed = Date().timeIntervalSince(started)
        #expect(result.status == 6, "rolled back: \(result.stdout)")
        #expect(elapsed < 15, "the 20 s delay was cut short by the event (took \(elapsed) s)")
        let contents = try fixture.journal()
        checkJournal(contents, expect: .rolledBack)
        let notes = contents.entries.compactMap { entry -> (Double, String)? in
            if case .note(let text) = entry.event { return (entry.time, text) }
            return nil
        }
        let event = try #require(notes.first { $0.1.hasPrefix("uevent: destroy") })
        let reaction = try #require(notes.first { $0.1.hasPrefix("aborted before bind-memslots") })
        #expect(reaction.1.contains("KVM uevent"))
        #expect(reaction.0 - event.0 < 1.0, "reacted \(Int((reaction.0 - event.0) * 1000)) ms after the uevent")
        #expect(runningGuest([fixture.sourceSocket]).count == 1, "the source runs the guest again")
    }
}

/// A value shared between threads.
final class Locked<Value: Sendable>: @unchecked Sendable {
    private let lock = NSLock()
    private var stored: Value
    init(_ value: Value) { stored = value }
    var value: Value { lock.withLock { stored } }
    func mutate(_ body: (inout Value) -> Void) { lock.withLock { body(&stored) } }
}

/// The validator's NIC checks through rtnetlink, in a network namespace the test makes and
/// removes (never the host's own interfaces).
@Suite("NIC checks in a network namespace")
struct NICValidationTests {
    func ip(_ arguments: [String]) throws -> Int32 {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/sbin/ip")
        process.arguments = arguments
        process.standardError = FileHandle.nullDevice
        try process.run()
        process.waitUntilExit()
        return process.terminationStatus
    }

    @Test func missingDownWrongMTUWrongBridgeAndNotATap() throws {
        guard getuid() == 0, FileManager.default.isExecutableFile(atPath: "/usr/sbin/ip") else {
            try Test.cancel("needs root and iproute2 to make a network namespace")
        }
        let namespace = "gmt-\(UInt16.random(in: 0...UInt16.max))"
        #expect(try ip(["netns", "add", namespace]) == 0)
        defer { _ = try? ip(["netns", "del", namespace]) }
        let setup: [[String]] = [
            ["link", "add", "br-gm", "type", "bridge"], ["link", "set", "br-gm", "up"],
            ["link", "add", "br-other", "type", "bridge"], ["link", "set", "br-other", "up"],
            ["tuntap", "add", "dev", "tapok", "mode", "tap", "multi_queue"], ["link", "set", "tapok", "mtu", "1400", "master", "br-gm", "up"],
            ["tuntap", "add", "dev", "tapdown", "mode", "tap"],
            ["tuntap", "add", "dev", "tapmtu", "mode", "tap"], ["link", "set", "tapmtu", "mtu", "9000", "up"],
            ["tuntap", "add", "dev", "tapbr", "mode", "tap"], ["link", "set", "tapbr", "master", "br-other", "up"],
            ["link", "add", "veth0", "type", "veth", "peer", "name", "veth1"], ["link", "set", "veth0", "up"],
        ]
        for command in setup { #expect(try ip(["-n", namespace] + command) == 0, "ip \(command.joined(separator: " "))") }
        var plan = try String(contentsOfFile: repositoryRoot + "/migration-plans/demo.yaml", encoding: .utf8)
        plan = plan.replacingOccurrences(of: "    nics: []\n", with: """
                nics:
                  - {name: tapok, mtu: 1400, bridge: br-gm, queues: 2}
                  - {name: tapdown}
                  - {name: tapmtu, mtu: 1500}
                  - {name: tapbr, bridge: br-gm}
                  - {name: veth0}
                  - {name: tapnone}

            """)
        let file = try temporaryFile(plan, name: "nics.yaml")
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/sbin/ip")
        process.arguments = ["netns", "exec", namespace, try executable("gmigrate"), "plan", "validate", "--host", "--json", file]
        let out = Pipe()
        process.standardOutput = out
        try process.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        #expect(process.terminationStatus == 1)
        let report = try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        let diagnostics = ((report["files"] as? [[String: Any]])?.first?["diagnostics"] as? [[String: Any]]) ?? []
        let found = Set(diagnostics.map { "\($0["path"] as? String ?? "") \($0["code"] as? String ?? "")" })
        #expect(found == [
            "spec.vm.nics[1].name nic-down",
            "spec.vm.nics[2].mtu nic-mtu-mismatch",
            "spec.vm.nics[3].bridge nic-wrong-bridge",
            "spec.vm.nics[4].name nic-not-tap",
            "spec.vm.nics[5].name nic-missing",
        ], "\(diagnostics)")
    }
}
