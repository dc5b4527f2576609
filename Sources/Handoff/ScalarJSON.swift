/// The handoff's JSON for messages whose fields are all scalars: a short path beside
/// Foundation's JSONEncoder and JSONDecoder, which stay the reference and take everything else.
///
/// Why: the blackout's messages (pause, stage-state, restore and their replies) carry only
/// scalars, and each is coded by a process that has slept meanwhile. Cold, JSONDecoder took
/// 100-150 µs and JSONEncoder 70-90 µs a message on this machine kind (warm: 5-17 µs), and the
/// blackout's critical path codes six of them. This code is a few hundred bytes of loops.
///
/// The wire does not change: what this writes is JSON any decoder reads, and what it reads is
/// what JSONDecoder would make of the same bytes. It declines (nil) wherever it is not sure:
/// a field it does not handle, an escape in a string, a number that is not a plain integer in
/// range, a duplicate key; the caller then goes through Foundation, errors and all.
extension HandoffMessage {
    /// The fields written and read here; every other field of HandoffMessage is in
    /// `structuredFields` (a test holds the two lists to the type's stored properties).
    static let scalarFields: Set<String> = [
        "attachment", "backend", "bytes", "count", "counter", "errno", "faults", "fired", "gpa", "guestProgram", "id", "message", "pid",
        "running", "runningSince", "state", "stateDigest", "stoppedAt", "timeoutMilliseconds", "timings", "type", "vcpus", "version",
    ]
    /// The fields only Foundation codes: a message with any of them set goes through it.
    static let structuredFields: Set<String> = [
        "vm", "handles", "vmType", "gmem", "strategy", "inode", "slots", "nics", "bindings", "identity", "guest", "copy",
    ]

    /// This message's JSON (keys sorted, as the JSONEncoder path writes them), or nil where
    /// a structured field is set.
    func scalarJSON() -> [UInt8]? {
        guard vm == nil, handles == nil, vmType == nil, gmem == nil, strategy == nil, inode == nil, slots == nil, nics == nil,
            bindings == nil, identity == nil, guest == nil, copy == nil
        else { return nil }
        var out = ScalarJSONWriter()
        out.bytes.reserveCapacity(96 + (message?.utf8.count ?? 0) + (state?.utf8.count ?? 0) + (bytes?.utf8.count ?? 0))
        out.field("attachment", attachment)
        out.field("backend", backend)
        out.field("bytes", bytes)
        out.field("count", count)
        out.field("counter", counter)
        out.field("errno", errno)
        out.field("faults", faults)
        out.field("fired", fired)
        out.field("gpa", gpa)
        out.field("guestProgram", guestProgram)
        out.field("id", id)
        out.field("message", message)
        out.field("pid", pid)
        if let running { out.key("running"); out.bytes += running ? Array("true".utf8) : Array("false".utf8) }
        out.field("runningSince", runningSince)
        out.field("state", state)
        out.field("stateDigest", stateDigest)
        out.field("stoppedAt", stoppedAt)
        out.field("timeoutMilliseconds", timeoutMilliseconds)
        if let timings {
            out.key("timings")
            out.bytes.append(UInt8(ascii: "{"))
            var first = true
            for name in timings.keys.sorted() {
                if !first { out.bytes.append(UInt8(ascii: ",")) }
                first = false
                out.string(name)
                out.bytes.append(UInt8(ascii: ":"))
                out.integer(timings[name] ?? 0)
            }
            out.bytes.append(UInt8(ascii: "}"))
        }
        out.field("type", type)
        out.field("vcpus", vcpus)
        out.field("version", version)
        out.bytes.append(UInt8(ascii: "}"))
        return out.bytes
    }

    /// Codes, once, out and back, the messages of the shapes a process decodes first inside
    /// the blackout: the pause's reply (a digest, the stop's time, timings, a counter), which
    /// the coordinator reads, and the restore, which the target reads. Why: the coordinator's
    /// first decode of the pause's reply took 50-60 µs on this machine kind, and its decode of
    /// the target's reply right after 12-14 µs: the first use of what the reader needs for
    /// those fields. Rehearsed before the pause, the pause's reply took 30 µs (16 migrations a
    /// side, medians). Answers whether each message came back the same.
    @discardableResult
    public static func rehearseBlackoutMessages() -> Bool {
        var reply = HandoffMessage(type: "ok", id: 1)
        reply.stateDigest = "rehearsal"
        reply.stoppedAt = 1
        reply.timings = ["save": 1, "stop": 2]
        reply.running = false
        reply.counter = 1
        return [reply, HandoffMessage(type: "restore", id: 2)].allSatisfy { message in
            message.scalarJSON().flatMap(HandoffMessage.init(scalarJSON:)) == message
        }
    }

    /// The message these bytes hold, or nil where they need JSONDecoder (see the type's doc).
    init?(scalarJSON payload: [UInt8]) {
        guard let message = payload.withUnsafeBufferPointer({ buffer -> HandoffMessage? in
            var reader = ScalarJSONReader(buffer)
            return reader.message()
        }) else { return nil }
        self = message
    }
}

private struct ScalarJSONWriter {
    var bytes: [UInt8] = [UInt8(ascii: "{")]

    mutating func key(_ name: String) {
        if bytes.count > 1 { bytes.append(UInt8(ascii: ",")) }
        string(name)
        bytes.append(UInt8(ascii: ":"))
    }

    mutating func field(_ name: String, _ value: String?) {
        guard let value else { return }
        key(name)
        string(value)
    }

    mutating func field<T: BinaryInteger>(_ name: String, _ value: T?) {
        guard let value else { return }
        key(name)
        integer(value)
    }

    mutating func field(_ name: String, _ value: [String]?) {
        guard let value else { return }
        key(name)
        bytes.append(UInt8(ascii: "["))
        for (index, element) in value.enumerated() {
            if index > 0 { bytes.append(UInt8(ascii: ",")) }
            string(element)
        }
        bytes.append(UInt8(ascii: "]"))
    }

    mutating func integer<T: BinaryInteger>(_ value: T) {
        bytes += Array(String(value).utf8)
    }

    /// A JSON string: `"` and `\` escaped, control characters as \u00XX, the rest as UTF-8.
    mutating func string(_ value: String) {
        bytes.append(UInt8(ascii: "\""))
        for byte in value.utf8 {
            switch byte {
            case UInt8(ascii: "\""): bytes += [UInt8(ascii: "\\"), UInt8(ascii: "\"")]
            case UInt8(ascii: "\\"): bytes += [UInt8(ascii: "\\"), UInt8(ascii: "\\")]
            case 0..<0x20:
                let hex = Array("0123456789abcdef".utf8)
                bytes += [UInt8(ascii: "\\"), UInt8(ascii: "u"), UInt8(ascii: "0"), UInt8(ascii: "0"), hex[Int(byte >> 4)], hex[Int(byte & 0xf)]]
            default: bytes.append(byte)
            }
        }
        bytes.append(UInt8(ascii: "\""))
    }
}

/// Reads one JSON object of scalar fields; any doubt is nil.
private struct ScalarJSONReader {
    let buffer: UnsafeBufferPointer<UInt8>
    var at = 0

    init(_ buffer: UnsafeBufferPointer<UInt8>) { self.buffer = buffer }

    mutating func message() -> HandoffMessage? {
        var message = HandoffMessage(type: "", id: 0)
        var seen: Set<String> = []
        guard take(UInt8(ascii: "{")) else { return nil }
        if !take(UInt8(ascii: "}")) {
            repeat {
                guard let key = string(), seen.insert(key).inserted, take(UInt8(ascii: ":")) else { return nil }
                if peekNull() {
                    // null leaves an optional field nil, as JSONDecoder does; the two that are not optional need Foundation's error.
                    guard key != "type", key != "id", HandoffMessage.scalarFields.contains(key) else { return nil }
                    continue
                }
                switch key {
                case "attachment": guard let value: Int = integer() else { return nil }; message.attachment = value
                case "backend": guard let value = string() else { return nil }; message.backend = value
                case "bytes": guard let value = string() else { return nil }; message.bytes = value
                case "count": guard let value: Int = integer() else { return nil }; message.count = value
                case "counter": guard let value: UInt32 = integer() else { return nil }; message.counter = value
                case "errno": guard let value: Int32 = integer() else { return nil }; message.errno = value
                case "faults": guard let value = strings() else { return nil }; message.faults = value
                case "fired": guard let value = strings() else { return nil }; message.fired = value
                case "gpa": guard let value: UInt64 = integer() else { return nil }; message.gpa = value
                case "guestProgram": guard let value = string() else { return nil }; message.guestProgram = value
                case "id": guard let value: Int = integer() else { return nil }; message.id = value
                case "message": guard let value = string() else { return nil }; message.message = value
                case "pid": guard let value: Int32 = integer() else { return nil }; message.pid = value
                case "running": guard let value = boolean() else { return nil }; message.running = value
                case "runningSince": guard let value: UInt64 = integer() else { return nil }; message.runningSince = value
                case "state": guard let value = string() else { return nil }; message.state = value
                case "stateDigest": guard let value = string() else { return nil }; message.stateDigest = value
                case "stoppedAt": guard let value: UInt64 = integer() else { return nil }; message.stoppedAt = value
                case "timeoutMilliseconds": guard let value: Int = integer() else { return nil }; message.timeoutMilliseconds = value
                case "timings": guard let value = timings() else { return nil }; message.timings = value
                case "type": guard let value = string() else { return nil }; message.type = value
                case "vcpus": guard let value: Int = integer() else { return nil }; message.vcpus = value
                case "version": guard let value: Int = integer() else { return nil }; message.version = value
                default: return nil
                }
            } while take(UInt8(ascii: ","))
            guard take(UInt8(ascii: "}")) else { return nil }
        }
        skipSpace()
        guard at == buffer.count, seen.contains("type"), seen.contains("id") else { return nil }
        return message
    }

    mutating func skipSpace() {
        while at < buffer.count, buffer[at] == 0x20 || buffer[at] == 0x0a || buffer[at] == 0x0d || buffer[at] == 0x09 { at += 1 }
    }

    mutating func take(_ byte: UInt8) -> Bool {
        skipSpace()
        guard at < buffer.count, buffer[at] == byte else { return false }
        at += 1
        return true
    }

    mutating func word(_ text: StaticString) -> Bool {
        skipSpace()
        let count = text.utf8CodeUnitCount
        guard buffer.count - at >= count else { return false }
        for index in 0..<count where buffer[at + index] != text.utf8Start[index] { return false }
        at += count
        return true
    }

    mutating func peekNull() -> Bool { word("null") }

    mutating func boolean() -> Bool? {
        if word("true") { return true }
        if word("false") { return false }
        return nil
    }

    /// A string without escapes, valid UTF-8 (a backslash or a control character declines).
    mutating func string() -> String? {
        guard take(UInt8(ascii: "\"")) else { return nil }
        let start = at
        while at < buffer.count, buffer[at] != UInt8(ascii: "\"") {
            guard buffer[at] != UInt8(ascii: "\\"), buffer[at] >= 0x20 else { return nil }
            at += 1
        }
        guard at < buffer.count else { return nil }
        let text = String(validating: UnsafeBufferPointer(rebasing: buffer[start..<at]), as: UTF8.self)
        at += 1
        return text
    }

    mutating func strings() -> [String]? {
        guard take(UInt8(ascii: "[")) else { return nil }
        var values: [String] = []
        if take(UInt8(ascii: "]")) { return values }
        repeat {
            guard let value = string() else { return nil }
            values.append(value)
        } while take(UInt8(ascii: ","))
        return take(UInt8(ascii: "]")) ? values : nil
    }

    /// An integer as JSON writes one (an optional minus, no leading zero, no fraction or
    /// exponent), in range for `T`.
    mutating func integer<T: FixedWidthInteger>() -> T? {
        skipSpace()
        let negative = at < buffer.count && buffer[at] == UInt8(ascii: "-")
        if negative {
            guard T.isSigned else { return nil }
            at += 1
        }
        let start = at
        var value: T = 0
        while at < buffer.count, buffer[at] >= UInt8(ascii: "0"), buffer[at] <= UInt8(ascii: "9") {
            let digit = T(buffer[at] - UInt8(ascii: "0"))
            let (times, overflowTimes) = value.multipliedReportingOverflow(by: 10)
            let (next, overflowPlus) = negative ? times.subtractingReportingOverflow(digit) : times.addingReportingOverflow(digit)
            guard !overflowTimes, !overflowPlus else { return nil }
            value = next
            at += 1
        }
        let digits = at - start
        guard digits > 0, digits == 1 || buffer[start] != UInt8(ascii: "0") else { return nil }
        // What follows is a delimiter, not a fraction or an exponent.
        if at < buffer.count, buffer[at] == UInt8(ascii: ".") || buffer[at] == UInt8(ascii: "e") || buffer[at] == UInt8(ascii: "E") { return nil }
        return value
    }

    mutating func timings() -> [String: Int64]? {
        guard take(UInt8(ascii: "{")) else { return nil }
        var values: [String: Int64] = [:]
        if take(UInt8(ascii: "}")) { return values }
        repeat {
            guard let name = string(), values[name] == nil, take(UInt8(ascii: ":")), let value: Int64 = integer() else { return nil }
            values[name] = value
        } while take(UInt8(ascii: ","))
        return take(UInt8(ascii: "}")) ? values : nil
    }
}
