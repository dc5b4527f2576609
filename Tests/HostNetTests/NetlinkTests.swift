import Foundation
import GmigrateTestKit
import GmigrateTestSupport
import Handoff
import HostNet
import Journal
import Kernel
import Orchestrator
import Plans
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
        // KVM records the creating *thread*'s id: this thread's, not another test's running
        // in the same process at the same time.
        let me = Int32((try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/thread-self")).split(separator: "/").last ?? "") ?? -1
        watcher.subscribe { event in
            if event.pid == me { seen.mutate { $0.append(event) } }
        }
        // The watcher's socket is bound when it is made: the uevents queue there from now on.
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
        let killed = Locked<Date?>(nil)
        let result = try killDuring(fixture, point: "before:bind-memslots=delay:20s") { contents in
            killed.mutate { $0 = Date() }
            return contents.targetPID ?? 0
        }
        let elapsed = Date().timeIntervalSince(started)
        #expect(result.status == 6, "rolled back: \(result.stdout)")
        #expect(elapsed < 15, "the 20 s delay was cut short by the event (took \(elapsed) s)")
        let contents = try fixture.journal()
        checkJournal(contents, expect: .rolledBack)
        let stops = contents.entries.compactMap { entry -> (Double, JournalEntry.StopRequest)? in
            if case .stopRequested(let stop) = entry.event { return (entry.time, stop) }
            return nil
        }
        let stop = try #require(stops.first)
        #expect(stop.1.kind == .abort)
        #expect(stop.1.reason.contains("KVM uevent") || stop.1.reason.contains("died"), "\(stop.1.reason)")
        let killedAt = try #require(killed.value).timeIntervalSince1970
        #expect(stop.0 - killedAt < 1.0, "reacted \(Int((stop.0 - killedAt) * 1000)) ms after the kill")
        #expect(runningGuest([fixture.sourceSocket]).count == 1, "the source runs the guest again")
    }
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
        // `plan validate --host` probes this host's KVM too.
        try requireKVM()
        try requireNetns()
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

@Suite("Tap handover")
struct TapHandoverTests {
    /// A tinyvmm with a two-queue tap, migrated in a test network namespace: the queues travel
    /// to the target by SCM_RIGHTS, and the tap stays up and attached, checked through rtnetlink.
    @Test func tapQueuesGoWithTheGuest() throws {
        _ = try Backend.linux.make()
        try requireNetns()
        let validation = NICValidationTests()
        let namespace = "gmm-\(UInt16.random(in: 0...UInt16.max))"
        #expect(try validation.ip(["netns", "add", namespace]) == 0)
        defer { _ = try? validation.ip(["netns", "del", namespace]) }
        for command in [
            ["link", "add", "br-gm", "type", "bridge"], ["link", "set", "br-gm", "up"],
            ["tuntap", "add", "dev", "tap0", "mode", "tap", "multi_queue"], ["link", "set", "tap0", "mtu", "1400", "master", "br-gm", "up"],
        ] {
            #expect(try validation.ip(["-n", namespace] + command) == 0)
        }
        let directory = temporaryDirectory("gmtap")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let socket = directory + "/source.sock"
        let plan = try processPlan(source: socket, longSteps: true)
            .replacingOccurrences(of: "  strategy: auto", with: "    nics:\n      - {name: tap0, mtu: 1400, bridge: br-gm, queues: 2}\n  strategy: share")
        let planFile = directory + "/plan.yaml"
        try plan.write(toFile: planFile, atomically: true, encoding: .utf8)
        func inNamespace(_ arguments: [String], wait: Bool = true) throws -> (Process, String) {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: "/usr/sbin/ip")
            process.arguments = ["netns", "exec", namespace] + arguments
            let out = Pipe()
            process.standardOutput = out
            process.standardError = wait ? out : FileHandle.nullDevice
            try process.run()
            guard wait else { return (process, "") }
            let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            process.waitUntilExit()
            return (process, text)
        }
        // The plan's NICs check out on this (namespaced) host.
        let (validate, validateOutput) = try inNamespace([try executable("gmigrate"), "plan", "validate", "--host", planFile])
        #expect(validate.terminationStatus == 0, "\(validateOutput)")
        let (source, _) = try inNamespace([try executable("tinyvmm"), "--socket", socket, "--plan", planFile, "--name", "tap-source"], wait: false)
        #expect(waitUntil(10) { (try? RemoteVMM(role: "test", socketPath: socket, timeout: .seconds(2)).status().running) == true }, "the source's guest runs")
        setenv("GMIGRATE_TINYVMM", try executable("tinyvmm"), 1)
        let (migrate, output) = try inNamespace([try executable("gmigrate"), "migrate", planFile, "--state-dir", directory, "--json"])
        #expect(migrate.terminationStatus == 0, "\(output)")
        let fixtureJournal = try Journal(stateDirectory: directory)
        let id = try #require(fixtureJournal.ids().first)
        let contents = try Journal.read(stateDirectory: directory, id: id)
        checkJournal(contents, expect: .completed)
        let observed = contents.entries.compactMap { entry -> JournalEntry.Observation? in
            if case .observed(let observation) = entry.event { return observation }
            return nil
        }
        #expect(observed.contains { $0.role == .target && $0.liveness == .running && ($0.detail ?? "").contains("nic tap0: up, mtu 1400, attached to br-gm") }, "\(observed)")
        guard let started = contents.started, let targetPID = contents.targetPID, let targetSocket = started.targetSocket else {
            Issue.record("no target in the journal")
            return
        }
        // The target holds both queues; the source retired and exited.
        let descriptors = ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(targetPID)/fd")) ?? []).compactMap {
            try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(targetPID)/fd/\($0)")
        }
        #expect(descriptors.filter { $0.hasSuffix("net/tun") }.count == 2, "\(descriptors)")
        #expect(waitUntil(10) { !source.isRunning })
        try RemoteVMMHelper.shutdown(targetSocket)
        #expect(waitUntil(10) { !isAlive(targetPID) })
    }
}
