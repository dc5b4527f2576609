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

/// The journal file: torn and corrupt records are found, never trusted.
@Suite("Journal")
struct JournalTests {
    typealias Corruption = @Sendable (String) throws -> Void

    /// A finished-looking journal of a migration that stopped at bind-memslots (unfinished).
    func unfinishedJournal() throws -> (state: String, id: String, path: String) {
        let state = temporaryDirectory("gmigrate-journal")
        let journal = try Journal(stateDirectory: state)
        let plan = try loadPlan("demo.yaml")
        let file = try journal.create(id: "20261121T000000-demo-0001")
        try file.append(.started(.init(id: file.id, planFile: "demo.yaml", plan: plan, strategy: .share, backend: "linux", coordinatorPID: 999_999, faults: [])))
        for step in [MigrationStep.prepare, .createTarget] {
            try file.append(.intent(step: step, direction: .forward))
            try file.append(.outcome(.init(step: step, direction: .forward, ok: true, durationNanoseconds: 1000)))
        }
        try file.append(.intent(step: .handOverMemory, direction: .forward))
        return (state, file.id, file.path)
    }

    @Test func recordsReadBackAsWritten() throws {
        let (_, _, path) = try unfinishedJournal()
        let contents = try Journal.read(path: path)
        #expect(contents.entries.count == 6)
        #expect(contents.entries.map(\.sequence) == Array(1...6))
        #expect(contents.corruption == nil && contents.tornTailBytes == 0)
    }

    static let corruptions: [(String, Bool, Corruption)] = [
        // (what, is it corruption (true) or a torn tail (false), how)
        ("truncated in the last payload", false, { path in try truncate(path, by: 7) }),
        ("truncated in the last header", false, { path in try truncate(path, by: Journal.lastRecordSize(path) - 5) }),
        ("a bit flipped in a payload", true, { path in try flip(path, at: 40) }),
        ("a bit flipped in a length", true, { path in try flip(path, at: 1) }),
        ("a bit flipped in the last CRC", true, { path in try flip(path, atFromEnd: Journal.lastRecordSize(path) - 9) }),
        ("a record duplicated", true, { path in try duplicateLastRecord(path) }),
        ("garbage appended", true, { path in try append(path, Array(repeating: 0xAB, count: 40)) }),
    ]

    @Test("torn and corrupt journals are detected; recovery acts only on what it can trust", arguments: 0..<corruptions.count)
    func corruption(_ index: Int) throws {
        let (what, isCorruption, corrupt) = Self.corruptions[index]
        let (state, id, path) = try unfinishedJournal()
        try corrupt(path)
        let contents = try Journal.read(path: path)
        if isCorruption {
            let message = try #require(contents.corruption, "\(what) must be detected")
            #expect(message.contains("record") && message.contains("corrupt"), "\(message)")
        } else {
            #expect(contents.corruption == nil, "\(what) is a torn tail, not corruption")
            #expect(contents.tornTailBytes > 0)
            #expect(contents.entries.count == 5, "the records before the torn one are intact")
        }
        let result = try gmigrate(["recover", "--state-dir", state])
        if isCorruption {
            #expect(result.status == 9, "\(what): \(result.stdout)")
            #expect(result.stdout.contains("NOT RECOVERED"))
            #expect(result.stdout.contains("\(id)"))
            // Not acted on: the file is as the corruption left it.
            #expect(try Journal.read(path: path).corruption != nil)
        } else {
            // The journal is trusted up to the torn record; its in-process VMMs ended with their
            // coordinator: recorded lost (exit 13).
            #expect(result.status == 13, "\(what): \(result.stdout)")
            #expect(result.stdout.contains("torn final record"))
            let recovered = try Journal.read(path: path)
            #expect(recovered.corruption == nil && recovered.tornTailBytes == 0)
            guard case .finished(let finished)? = recovered.entries.last?.event else {
                Issue.record("not finished")
                return
            }
            #expect(finished.state == .lost)
        }
        let show = try gmigrate(["journal", "show", id, "--state-dir", state])
        #expect(show.status == (isCorruption ? 9 : 0))
    }

    static func truncate(_ path: String, by count: Int) throws {
        let handle = try FileHandle(forUpdating: URL(fileURLWithPath: path))
        let size = try handle.seekToEnd()
        try handle.truncate(atOffset: size - UInt64(count))
        try handle.close()
    }

    static func flip(_ path: String, at offset: Int) throws {
        var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
        bytes[offset] ^= 0x10
        try Data(bytes).write(to: URL(fileURLWithPath: path))
    }

    static func flip(_ path: String, atFromEnd offset: Int) throws {
        let count = try Data(contentsOf: URL(fileURLWithPath: path)).count
        try flip(path, at: count - offset)
    }

    static func append(_ path: String, _ extra: [UInt8]) throws {
        let handle = try FileHandle(forUpdating: URL(fileURLWithPath: path))
        try handle.seekToEnd()
        try handle.write(contentsOf: Data(extra))
        try handle.close()
    }

    static func duplicateLastRecord(_ path: String) throws {
        let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
        let last = Journal.lastRecordSize(path)
        try append(path, Array(bytes.suffix(last)))
    }
}

extension Journal {
    /// The size of the last record of a journal file (header and payload).
    static func lastRecordSize(_ path: String) -> Int {
        guard let data = try? Data(contentsOf: URL(fileURLWithPath: path)) else { return 0 }
        let bytes = [UInt8](data)
        var offset = 0
        var last = 0
        while offset + 12 <= bytes.count {
            let length = Int(bytes[offset]) | Int(bytes[offset + 1]) << 8 | Int(bytes[offset + 2]) << 16 | Int(bytes[offset + 3]) << 24
            last = 12 + length
            offset += last
        }
        return last
    }
}

/// The intents, the point of no return and plain outcomes are written directly too (on the
/// blackout's path between the target's stage and its restore): each reads back as its entry,
/// and holds what the encoder's JSON holds.
@Suite("The blackout's small records' JSON")
struct DirectRecordTests {
    @Test func intentsAndThePointOfNoReturnReadBackAsTheEncoderWritesThem() throws {
        var events: [JournalEntry.Event] = [.pointOfNoReturn]
        for step in MigrationStep.allCases {
            for direction in [JournalEntry.Direction.forward, .undo] { events.append(.intent(step: step, direction: direction)) }
        }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        for (index, event) in events.enumerated() {
            let entry = JournalEntry(sequence: index + 1, time: Date().timeIntervalSince1970 + Double(index) / 3, event: event)
            let direct = try #require(MigrationJournal.directPayload(entry))
            #expect(try JSONDecoder().decode(JournalEntry.self, from: direct) == entry)
            let reference = try JSONSerialization.jsonObject(with: try encoder.encode(entry)) as? NSDictionary
            #expect(try JSONSerialization.jsonObject(with: direct) as? NSDictionary == reference, "\(String(decoding: direct, as: UTF8.self))")
        }
    }

    /// Outcomes of plain strings are written directly too (the pause-source outcome is the
    /// first record after the target's stage), every optional field present or not.
    @Test func plainOutcomesReadBackAsTheEncoderWritesThem() throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let outcomes = [
            JournalEntry.Outcome(step: .pauseSource, direction: .forward, ok: true, durationNanoseconds: 1_234_567, details: [
                "state-digest": "20044:0a1b2c3d", "vcpus": "2", "sections": "pic-master,regs", "socket": "/tmp/x/t.sock", "": "",
            ]),
            JournalEntry.Outcome(step: .resumeTarget, direction: .undo, ok: false, durationNanoseconds: -5, errno: -22, error: "EINVAL: it said {no} [really]", uncertain: true),
            JournalEntry.Outcome(step: .bindMemslots, direction: .forward, ok: false, durationNanoseconds: Int64.max, error: "", uncertain: false),
        ]
        for (index, outcome) in outcomes.enumerated() {
            let entry = JournalEntry(sequence: index + 2, time: Date().timeIntervalSince1970 + Double(index) / 7, event: .outcome(outcome))
            let direct = try #require(MigrationJournal.directPayload(entry))
            #expect(try JSONDecoder().decode(JournalEntry.self, from: direct) == entry)
            let reference = try JSONSerialization.jsonObject(with: try encoder.encode(entry)) as? NSDictionary
            #expect(try JSONSerialization.jsonObject(with: direct) as? NSDictionary == reference, "\(String(decoding: direct, as: UTF8.self))")
        }
    }

    /// A string that would need escaping (a quote, a backslash, a control character, beyond
    /// ASCII) leaves the outcome to the encoder.
    @Test func anOutcomeWithAStringToEscapeTakesTheEncoder() {
        for text in ["a\"b", "a\\b", "line\nbreak", "tab\t", "caf\u{e9}"] {
            let inDetails = JournalEntry.Outcome(step: .pauseSource, direction: .forward, ok: true, durationNanoseconds: 1, details: ["k": text])
            let inKey = JournalEntry.Outcome(step: .pauseSource, direction: .forward, ok: true, durationNanoseconds: 1, details: [text: "v"])
            let inError = JournalEntry.Outcome(step: .pauseSource, direction: .forward, ok: false, durationNanoseconds: 1, error: text)
            for outcome in [inDetails, inKey, inError] {
                #expect(MigrationJournal.directPayload(JournalEntry(sequence: 1, time: 1, event: .outcome(outcome))) == nil, "\(text)")
            }
        }
        #expect(MigrationJournal.directPayload(JournalEntry(sequence: 1, time: .nan, event: .pointOfNoReturn)) == nil)
    }
}

/// The `saved` record's JSON is written directly (its base64 state is large, and on the
/// blackout's path): it must read back as the entry, like the encoder's own JSON.
@Suite("The saved record's JSON")
struct SavedRecordTests {
    @Test(arguments: [0, 1, 2, 3, 4, 100, 13_000])
    func readsBackAsTheEntry(_ count: Int) throws {
        var random = SplitMix64(seed: UInt64(count) + 1)
        let bytes = (0..<count).map { _ in UInt8.random(in: 0...255, using: &random) }
        let time = Date().timeIntervalSince1970 + Double(count) / 7
        let entry = JournalEntry(sequence: count + 3, time: time, event: .saved(step: .pauseSource, state: Data(bytes).base64EncodedString()))
        let fast = try #require(MigrationJournal.savedStatePayload(entry))
        #expect(try JSONDecoder().decode(JournalEntry.self, from: fast) == entry)
        // The encoder's JSON and this one hold the same object.
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let reference = try JSONSerialization.jsonObject(with: try encoder.encode(entry)) as? NSDictionary
        #expect(try JSONSerialization.jsonObject(with: fast) as? NSDictionary == reference)
    }

    @Test func anythingElseTakesTheEncoder() {
        #expect(MigrationJournal.savedStatePayload(JournalEntry(sequence: 1, time: 1, event: .pointOfNoReturn)) == nil)
        // Not base64: a quote would need escaping.
        #expect(MigrationJournal.savedStatePayload(JournalEntry(sequence: 1, time: 1, event: .saved(step: .pauseSource, state: "a\"b"))) == nil)
    }

    @Test func aJournalWithASavedRecordReadsBack() throws {
        let directory = temporaryDirectory("jsaved")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let journal = try Journal(stateDirectory: directory).create(id: "20261201T000000-x-0000000000000002")
        let state = Data((0..<5000).map { UInt8(truncatingIfNeeded: $0 &* 31) }).base64EncodedString()
        try journal.append(.saved(step: .pauseSource, state: state), durable: false)
        try journal.append(.pointOfNoReturn)
        let contents = try Journal.read(path: journal.path)
        #expect(contents.corruption == nil)
        #expect(contents.entries.map(\.event) == [.saved(step: .pauseSource, state: state), .pointOfNoReturn])
    }
}
