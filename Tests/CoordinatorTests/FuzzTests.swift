import CKVM
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
import Yams
@testable import Coordinator

#if canImport(Glibc)
import Glibc
#endif

/// Seeded fuzzing of what peers send: each run is reproducible from its seed (printed on a
/// failure), bounded in messages and time, and checks that nothing crashes and nothing leaks.
@Suite("Fuzzing peers", .serialized)
struct FuzzTests {
    static let seeds: [UInt64] = [1, 0x5eed, 0xdead_beef]


    /// A random request: a real type or not, fields of the right or wrong kind and size.
    static func randomFrame(_ random: inout SplitMix64, id: Int) -> [UInt8] {
        // Every request but those that end the VMM by design (shutdown, retire, destroy).
        let types = HandoffMessage.requestTypes.subtracting(["shutdown", "retire", "destroy"]).sorted() + ["ok", "error", "format-disk", ""]
        var fields: [String] = ["\"type\": \"\(types[Int(random.next() % UInt64(types.count))])\"", "\"id\": \(id)"]
        let numbers = ["-1", "0", "1", "2", "4096", "2097152", "1099511627776", "9223372036854775807", "-9223372036854775808", "1e300", "\"7\"", "null"]
        let candidates: [(String, [String])] = [
            ("version", numbers), ("vcpus", numbers), ("count", numbers),
            ("gpa", ["0", "4096", "2097144", "18446744073709551615", "-5"]),
            ("vmType", ["\"default\"", "\"snp\"", "\"nope\"", "3"]),
            ("strategy", ["\"share\"", "\"copy\"", "\"link\"", "\"teleport\""]),
            ("state", ["\"\"", "\"AAAA\"", "\"not base64!\"", "\"R01WUw==\""]),
            ("slots", ["[]", "[{\"slot\": 0, \"guestPhysAddr\": 0, \"size\": 2097152, \"guestMemfd\": \"ram\", \"offset\": 0}]", "{}"]),
            ("gmem", ["{\"name\": \"ram\", \"size\": 2097152, \"flags\": 3, \"inode\": {\"device\": 1, \"inode\": 1}}", "{}", "7"]),
            ("faults", ["[\"kernel:set-memslot=errno:EEXIST\"]", "[\"nonsense\"]", "[]"]),
            ("handles", ["[1]", "[99999]", "[-1]", "[]"]),
            ("attachment", ["0", "16", "-1", "67108865", "\"x\""]),
        ]
        for (name, values) in candidates where random.next() % 2 == 0 {
            fields.append("\"\(name)\": \(values[Int(random.next() % UInt64(values.count))])")
        }
        var payload = Array(("{" + fields.joined(separator: ", ") + "}").utf8)
        // Now and then a byte flipped: JSON that no longer parses, or a different value.
        if random.next() % 8 == 0, !payload.isEmpty {
            payload[Int(random.next() % UInt64(payload.count))] = UInt8(truncatingIfNeeded: random.next())
        }
        let length = UInt32(payload.count)
        var frame = HandoffConnection.magic + [UInt8(length & 0xff), UInt8((length >> 8) & 0xff), UInt8((length >> 16) & 0xff), UInt8(length >> 24)]
        frame += payload
        // Now and then raw bytes after the JSON, as an attachment (which may or may not match
        // the count the JSON gives).
        if random.next() % 4 == 0 { frame += (0..<Int(random.next() % 64)).map { _ in UInt8(truncatingIfNeeded: random.next()) } }
        // Now and then a frame cut short or a wrong magic.
        switch random.next() % 16 {
        case 0: frame = Array(frame.prefix(Int(random.next() % UInt64(frame.count))))
        case 1: frame[0] ^= 0xff
        default: break
        }
        return frame
    }

    /// Descriptors of every kind a peer could attach.
    static func randomDescriptors(_ random: inout SplitMix64, directory: String) -> [Int32] {
        var fds: [Int32] = []
        for _ in 0..<Int(random.next() % 4) {
            switch random.next() % 5 {
            case 0:
                var pair: [Int32] = [0, 0]
                if pipe(&pair) == 0 { fds.append(pair[0]); close(pair[1]) }
            case 1: fds.append(open("/dev/null", O_RDONLY))
            case 2:
                let path = directory + "/anon_inode:[kvm-gmem]"
                fds.append(open(path, O_RDWR | O_CREAT, 0o600))
            case 3: fds.append(socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0))
            default:
                var pair: [Int32] = [0, 0]
                if socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &pair) == 0 { fds.append(pair[0]); close(pair[1]) }
            }
        }
        return fds.filter { $0 >= 0 }
    }

    /// Random frames, descriptors and request orders against a running source VMM and an empty
    /// target, both on the model: neither dies, neither keeps a descriptor, both still answer.
    @Test("random frames and descriptors to a VMM", arguments: seeds)
    func handoffFrames(seed: UInt64) throws {
        var random = SplitMix64(seed: seed)
        for source in [true, false] {
            let vmm = try VMMUnderTest("fuzz-\(seed)-\(source)", source: source)
            defer { vmm.stop() }
            let pid = vmm.process.processIdentifier
            let before = Set(openDescriptors(pid))
            let deadline = ContinuousClock.now + .seconds(8)
            var sent = 0
            while sent < 150, ContinuousClock.now < deadline {
                // A connection per few frames: the VMM drops a connection on a malformed one.
                guard let connection = try? HandoffConnection.connect(path: vmm.socket) else { continue }
                connection.setTimeout(.milliseconds(300))
                let fd = connection.fd
                for _ in 0..<Int(1 + random.next() % 4) {
                    let frame = Self.randomFrame(&random, id: sent)
                    let attached = Self.randomDescriptors(&random, directory: vmm.directory)
                    sent += 1
                    let wrote = frame.withUnsafeBytes { buffer in
                        attached.withUnsafeBufferPointer { ckvm_send_with_fds(fd, buffer.baseAddress, UInt(buffer.count), $0.baseAddress, Int32($0.count)) }
                    }
                    for descriptor in attached { close(descriptor) }
                    guard wrote >= 0 else { break }
                    guard (try? connection.receive()).map({ reply, fds in fds.forEach { close($0) }; return reply }) != nil else { break }
                }
            }
            #expect(vmm.process.isRunning, "seed \(seed): the VMM lives after \(sent) random frames; see \(vmm.directory)/vmm.log")
            let status = try RemoteVMM(role: "test", socketPath: vmm.socket, timeout: .seconds(5)).status()
            #expect(status.running == source || !source, "seed \(seed): the source's guest still runs")
            // Nothing received is kept: no pipe, socket, file or device beyond what it held.
            func kept() -> Set<String> {
                Set(openDescriptors(pid)).subtracting(before).filter { $0.contains("pipe:") || $0.contains("socket:") || $0.contains("/dev/null") || $0.contains(vmm.directory) }
            }
            #expect(waitUntil(3) { kept().isEmpty }, "seed \(seed): the VMM keeps \(kept())")
        }
    }

    /// Random methods, paths, headers and bodies to the daemon: it answers each (never a 5xx),
    /// stays healthy, and holds no more descriptors than before.
    @Test("random requests to the daemon", arguments: seeds)
    func daemonRoutes(seed: UInt64) throws {
        var random = SplitMix64(seed: seed)
        let daemon = try DaemonFixture(backend: "model")
        defer { daemon.stop() }
        let pid = daemon.process.processIdentifier
        let before = Set(openDescriptors(pid)).count
        let methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
        let paths = [
            "/healthz", "/v1/host", "/metrics", "/v1/plans/validate", "/v1/plans/validate?rehearse=true", "/v1/migrations", "/v1/migrations?state=lost",
            "/v1/migrations?state=%00", "/v1/migrations/x", "/v1/migrations/../../etc/passwd", "/v1/migrations/x/cancel", "/v1/migrations/x/events",
            "/" + String(repeating: "a", count: 2000), "/v1/migrations/%ff%fe",
        ]
        let plan = try demoPlan(name: "fuzz")
        let bodies: [() -> String] = [
            { "" }, { plan }, { "{" }, { "[1, 2" }, { "a: &a [*a]" }, { String(repeating: "[", count: 5000) },
            { plan.replacingOccurrences(of: "2Mi", with: "-1") }, { "spec: {policy: {stepTimeout: 99999999999999999999h}}" },
            { String(decoding: (0..<512).map { UInt8(truncatingIfNeeded: $0 &* 7919 ^ Int(seed & 0xff)) }, as: UTF8.self) },
        ]
        let headerSets: [[String: String]] = [
            [:], ["Content-Type": "application/json"], ["Content-Type": "image/png"], ["Idempotency-Key": String(repeating: "k", count: 4000)],
            ["Content-Type": ";;;"], ["Accept": "*/*", "Idempotency-Key": ""],
        ]
        let deadline = ContinuousClock.now + .seconds(20)
        var answered = 0
        var statuses: [Int: Int] = [:]
        while answered < 120, ContinuousClock.now < deadline {
            let method = methods[Int(random.next() % UInt64(methods.count))]
            let path = paths[Int(random.next() % UInt64(paths.count))]
            let body = bodies[Int(random.next() % UInt64(bodies.count))]()
            let headers = headerSets[Int(random.next() % UInt64(headerSets.count))]
            // The event stream of a running migration lasts; the others answer at once.
            guard !path.hasSuffix("/events") else { continue }
            let answer = try UnixHTTPClient.request(
                socket: daemon.socket, method: method, path: path, headers: headers, body: method == "GET" ? nil : Data(body.utf8), timeout: 10)
            statuses[answer.status, default: 0] += 1
            #expect(answer.status < 500, "seed \(seed): \(method) \(path) answered \(answer.status): \(answer.text.prefix(300))")
            answered += 1
        }
        #expect(answered > 20, "seed \(seed): \(answered) requests in the time bound")
        #expect(daemonIsHealthy(daemon.socket))
        // Migrations the fuzz started finish; then the daemon holds what it held.
        let listed = (try? JSONSerialization.jsonObject(with: try daemon.call("GET", "/v1/migrations").body)) as? [[String: Any]] ?? []
        for migration in listed { _ = try daemon.waitFinished(migration["id"] as? String ?? "") }
        #expect(waitUntil(5) { Set(openDescriptors(pid)).count <= before + 2 }, "seed \(seed): descriptors \(before) before, \(Set(openDescriptors(pid)).count) after; statuses \(statuses)")
    }
}
