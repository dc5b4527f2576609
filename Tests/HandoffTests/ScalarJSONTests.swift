import Foundation
import GmigrateTestKit
import Testing

@testable import Handoff

/// The scalar fast path of the handoff's JSON against Foundation's coder, which stays the
/// reference: what one writes the other reads alike, and what the fast reader accepts is what
/// JSONDecoder makes of the same bytes.
@Suite("The handoff's scalar JSON")
struct ScalarJSONTests {
    static func foundation(_ bytes: [UInt8]) -> HandoffMessage? { try? JSONDecoder().decode(HandoffMessage.self, from: Data(bytes)) }

    static func foundationBytes(_ message: HandoffMessage) throws -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        return [UInt8](try encoder.encode(message))
    }

    /// Messages with every scalar field, strings that need escapes among them.
    static var samples: [HandoffMessage] {
        var pause = HandoffMessage(type: "pause", id: 41)
        pause.timeoutMilliseconds = 30_000
        var reply = HandoffMessage(type: "ok", id: 41)
        reply.stateDigest = "21480:9a1bc3d4"
        reply.stoppedAt = UInt64.max
        reply.runningSince = 37_234_920_731_039
        reply.timings = ["stop": 171_000, "save": 245_000, "send": -1, "a \"quoted\" name": Int64.min]
        reply.running = false
        reply.counter = UInt32.max
        reply.attachment = 0
        var error = HandoffMessage(type: "error", id: -7)
        error.message = "stage-state: \"quoted\", back\\slash, tab\t, newline\n, bell\u{07}, é, 漢字, 🙂"
        error.errno = Int32.min
        error.fired = ["kernel:set-vcpu-state=alter:msr:0xc0000082", ""]
        error.faults = []
        var hello = HandoffMessage(type: "hello", id: 0)
        hello.version = 5
        hello.pid = Int32.max
        hello.backend = "model:/tmp/x y/host"
        hello.vcpus = 8
        hello.guestProgram = "long-mode"
        hello.gpa = 0x1_0000_0000
        hello.count = Int.max
        hello.bytes = "AAEC/w=="
        hello.state = String(repeating: "QUJD", count: 40)
        hello.timings = [:]
        return [pause, reply, error, hello, HandoffMessage(type: "restore", id: Int.min)]
    }

    /// Each stored property of HandoffMessage is coded here or left to Foundation, never both
    /// and never neither: a field added later cannot be dropped by the fast writer unnoticed.
    @Test func everyFieldIsScalarOrStructured() {
        let fields = Set(Mirror(reflecting: HandoffMessage(type: "x", id: 0)).children.compactMap(\.label))
        #expect(HandoffMessage.scalarFields.isDisjoint(with: HandoffMessage.structuredFields))
        #expect(HandoffMessage.scalarFields.union(HandoffMessage.structuredFields) == fields)
    }

    @Test(arguments: samples)
    func whatItWritesFoundationReadsAlike(_ message: HandoffMessage) throws {
        let bytes = try #require(message.scalarJSON())
        #expect(Self.foundation(bytes) == message)
        // And it reads it back itself, unless a string needed an escape (then it declines).
        if let fast = HandoffMessage(scalarJSON: bytes) {
            #expect(fast == message)
        } else {
            #expect(bytes.contains(UInt8(ascii: "\\")))
        }
    }

    @Test(arguments: samples)
    func whatFoundationWritesItReadsAlike(_ message: HandoffMessage) throws {
        let bytes = try Self.foundationBytes(message)
        if let fast = HandoffMessage(scalarJSON: bytes) {
            #expect(fast == message)
        } else {
            #expect(bytes.contains(UInt8(ascii: "\\")))
        }
    }

    @Test func aStructuredFieldGoesThroughFoundation() throws {
        var message = HandoffMessage(type: "create-vm", id: 3)
        message.vmType = .default
        #expect(message.scalarJSON() == nil)
        let bytes = try Self.foundationBytes(message)
        #expect(HandoffMessage(scalarJSON: bytes) == nil)
        message.vmType = nil
        message.slots = []
        #expect(message.scalarJSON() == nil)
    }

    /// Whatever it is not sure of, it declines, and Foundation judges: here each would be read
    /// differently, or refused, by JSONDecoder.
    @Test(arguments: [
        #"{"type":"ok","id":1,"unknown":2}"#,  // a field it does not know (JSONDecoder ignores it)
        #"{"type":"ok","id":1,"id":2}"#,  // a duplicate key
        #"{"type":"ok","id":1.0}"#,  // a fraction
        #"{"type":"ok","id":1e3}"#,  // an exponent
        #"{"type":"ok","id":01}"#,  // a leading zero
        #"{"type":"ok","id":1,"counter":4294967296}"#,  // out of UInt32
        #"{"type":"ok","id":1,"counter":-1}"#,  // negative for an unsigned field
        #"{"type":"ok","id":99999999999999999999}"#,  // out of Int
        #"{"type":"o\u006b","id":1}"#,  // an escape
        #"{"type":"ok","id":1} x"#,  // something after the object
        #"{"id":1}"#,  // no type
        #"{"type":"ok"}"#,  // no id
        #"{"type":null,"id":1}"#,  // null where a value is required
        #"{"type":"ok","id":1,"vm":null}"#,  // a structured field
        #"{"type":"ok","id":1,"running":"true"}"#,  // the wrong kind of value
        #"{"type":"ok","id":1,"timings":{"a":1,"a":2}}"#,  // a duplicate timing
        #"{"type":"ok","id":1,"#,  // cut short
        #"[]"#,
    ])
    func itDeclinesWhatItIsNotSureOf(_ text: String) {
        #expect(HandoffMessage(scalarJSON: Array(text.utf8)) == nil)
    }

    /// What it accepts beyond its own output: spaces, nulls, empty lists and maps.
    @Test func itReadsJSONAsJSONDecoderDoes() throws {
        let text = " {\n \"type\" : \"ok\" ,\t\"id\":-0, \"message\":null, \"fired\":[ ], \"timings\":{ }, \"running\":true, \"counter\":0 }\r\n"
        let fast = try #require(HandoffMessage(scalarJSON: Array(text.utf8)))
        #expect(fast == Self.foundation(Array(text.utf8)))
    }

    /// Random damage to valid messages: wherever the fast reader still accepts the bytes,
    /// JSONDecoder accepts them too and makes the same message of them.
    @Test func damagedBytesAreReadAlikeOrDeclined() throws {
        var random = SplitMix64(seed: 0x5EED)
        var accepted = 0
        for message in Self.samples.filter({ ($0.state?.count ?? 0) < 100 }) {
            let original = try Self.foundationBytes(message)
            for _ in 0..<2000 {
                var bytes = original
                for _ in 0...(random.next() % 3) {
                    let at = Int(random.next() % UInt64(bytes.count))
                    switch random.next() % 3 {
                    case 0: bytes[at] = UInt8(truncatingIfNeeded: random.next())
                    case 1: bytes.remove(at: at)
                    default: bytes.insert(Array(#"0123456789-",:{}[]" e.tnul"#.utf8)[Int(random.next() % 24)], at: at)
                    }
                }
                guard let fast = HandoffMessage(scalarJSON: bytes) else { continue }
                accepted += 1
                #expect(fast == Self.foundation(bytes), "\(String(decoding: bytes, as: UTF8.self))")
            }
        }
        // Some damage leaves valid JSON (a digit changed): the comparison above did run.
        #expect(accepted > 0)
    }

    /// The rehearsal before the pause is worth its call only if the messages it codes take
    /// the fast path both ways: a field the fast path stopped handling would send them
    /// through Foundation, and the blackout's first decode would be cold again.
    @Test func theBlackoutsMessagesAreRehearsedOnTheFastPath() {
        #expect(HandoffMessage.rehearseBlackoutMessages())
    }
}
