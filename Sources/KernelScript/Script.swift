import Kernel

/// A parsed kernel script: one operation per line, checked for names before anything runs.
///
/// The language (`gmigrate kernel run`; README has the full grammar):
/// ```
/// vm NAME [type=default|sw-protected|sev|sev-es|snp|tdx]
/// vcpus NAME count=N
/// gmem FILE vm=NAME size=SIZE [flags=mmap,init-shared]
/// slot NAME ID gpa=ADDR size=SIZE gmem=FILE [offset=OFF] [flags=...]
/// slot NAME ID gpa=ADDR size=SIZE map=FILE [offset=OFF] [flags=...]
/// link NEWFILE from=FILE vm=NAME
/// launch NAME
/// move-enc DST from=SRC
/// fault NAME gpa=ADDR
/// punch FILE offset=OFF len=LEN
/// write FILE offset=OFF value=BYTE
/// read FILE offset=OFF
/// same-inode FILE1 FILE2
/// close NAME|FILE
/// load FILE offset=OFF bytes=HEX            (extension: store bytes through the host mapping)
/// boot NAME rip=ADDR [vcpu=N]               (extension: flat real mode, start at rip)
/// run NAME [vcpu=N]                         (extension: KVM_RUN until the next exit)
/// ```
public struct Script: Sendable {
    public var path: String
    public var lines: [Line]

    public struct Line: Sendable {
        public var number: Int
        /// The line's text without comment and expectation.
        public var source: String
        public var command: Command
        /// The text after `=>`, if any.
        public var expected: String?
    }

    public enum Backing: Sendable {
        case none
        case guestMemfd(file: String, offset: UInt64)
        case mapping(file: String, offset: UInt64)
    }

    public enum Command: Sendable {
        case vm(name: String, type: VMType)
        case vcpus(vm: String, count: UInt32)
        case gmem(file: String, vm: String, size: UInt64, flags: GuestMemfdFlags)
        case slot(vm: String, slot: UInt32, gpa: UInt64, size: UInt64, backing: Backing, flags: MemslotFlags)
        case link(file: String, from: String, vm: String)
        case launch(vm: String)
        case moveEncryptionContext(destination: String, source: String)
        case fault(vm: String, gpa: UInt64)
        case punch(file: String, offset: UInt64, length: UInt64)
        case write(file: String, offset: UInt64, value: UInt8)
        case read(file: String, offset: UInt64)
        case sameInode(String, String)
        case close(name: String)
        case load(file: String, offset: UInt64, bytes: [UInt8])
        case boot(vm: String, vcpu: UInt32, rip: UInt64)
        case run(vm: String, vcpu: UInt32)

        /// Every object name the command uses (and must exist).
        var uses: [String] {
            switch self {
            case .vm: []
            case .vcpus(let vm, _), .launch(let vm), .fault(let vm, _), .boot(let vm, _, _), .run(let vm, _): [vm]
            case .gmem(_, let vm, _, _): [vm]
            case .slot(let vm, _, _, _, let backing, _):
                switch backing {
                case .none: [vm]
                case .guestMemfd(let file, _), .mapping(let file, _): [vm, file]
                }
            case .link(_, let from, let vm): [from, vm]
            case .moveEncryptionContext(let destination, let source): [destination, source]
            case .punch(let file, _, _), .write(let file, _, _), .read(let file, _), .load(let file, _, _): [file]
            case .sameInode(let a, let b): [a, b]
            case .close(let name): [name]
            }
        }

        /// The file whose memory the command changes (write, load, punch).
        var changesMemoryOf: String? {
            switch self {
            case .write(let file, _, _), .load(let file, _, _), .punch(let file, _, _): file
            default: nil
            }
        }

        /// The object the command creates, if any.
        var creates: (name: String, kind: ObjectKind)? {
            switch self {
            case .vm(let name, _): (name, .vm)
            case .gmem(let file, _, _, _), .link(let file, _, _): (file, .file)
            default: nil
            }
        }
    }

    public enum ObjectKind: String, Sendable {
        case vm = "VM"
        case file = "FILE"
    }
}

/// A script line that does not parse: reported as `file:line: message`.
public struct ScriptError: Error, Equatable, Sendable, CustomStringConvertible {
    public var path: String
    public var line: Int
    public var message: String
    public var description: String { "\(path):\(line): \(message)" }
}

extension Script {
    /// Parses a whole script; the first problem is thrown and nothing runs.
    public static func parse(_ text: String, path: String) throws(ScriptError) -> Script {
        var lines: [Line] = []
        // Names as the script goes: live, or closed (a later use is an error).
        var live: [String: ObjectKind] = [:]
        var closed: Set<String> = []
        for (index, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let number = index + 1
            var body = Substring(raw)
            if let hash = body.firstIndex(of: "#") { body = body[..<hash] }
            var expected: String? = nil
            if let arrow = body.indices.first(where: { body[$0...].hasPrefix("=>") }) {
                expected = body[body.index(arrow, offsetBy: 2)...].split(whereSeparator: \.isWhitespace).joined(separator: " ")
                body = body[..<arrow]
                if expected?.isEmpty == true {
                    throw ScriptError(path: path, line: number, message: "'=>' without an expected result")
                }
            }
            let words = body.split(whereSeparator: \.isWhitespace).map(String.init)
            guard !words.isEmpty else {
                if expected != nil { throw ScriptError(path: path, line: number, message: "'=>' without a command") }
                continue
            }
            let command: Command
            do {
                command = try parseCommand(words)
            } catch {
                throw ScriptError(path: path, line: number, message: error.message)
            }
            if let expected, !isValidResult(expected) {
                throw ScriptError(
                    path: path, line: number,
                    message: "expected result '\(expected)' is none of: ok, ok VALUE, error ENAME, unsupported, skipped")
            }
            for name in command.uses {
                guard live[name] != nil else {
                    let reason = closed.contains(name) ? "was closed" : "is not defined"
                    throw ScriptError(path: path, line: number, message: "'\(name)' \(reason)")
                }
            }
            try checkKinds(command, live: live, path: path, line: number)
            if let (name, kind) = command.creates {
                guard live[name] == nil else {
                    throw ScriptError(path: path, line: number, message: "'\(name)' is already defined")
                }
                live[name] = kind
                closed.remove(name)
            }
            if case .close(let name) = command {
                live[name] = nil
                closed.insert(name)
            }
            lines.append(Line(number: number, source: words.joined(separator: " "), command: command, expected: expected))
        }
        return Script(path: path, lines: lines)
    }

    private static func checkKinds(_ command: Command, live: [String: ObjectKind], path: String, line: Int) throws(ScriptError) {
        func want(_ name: String, _ kind: ObjectKind) throws(ScriptError) {
            if let actual = live[name], actual != kind {
                throw ScriptError(path: path, line: line, message: "'\(name)' is a \(actual.rawValue), expected a \(kind.rawValue)")
            }
        }
        switch command {
        case .vm, .close: break
        case .vcpus(let vm, _), .launch(let vm), .fault(let vm, _), .boot(let vm, _, _), .run(let vm, _): try want(vm, .vm)
        case .gmem(_, let vm, _, _): try want(vm, .vm)
        case .slot(let vm, _, _, _, let backing, _):
            try want(vm, .vm)
            switch backing {
            case .none: break
            case .guestMemfd(let file, _), .mapping(let file, _): try want(file, .file)
            }
        case .link(_, let from, let vm):
            try want(from, .file)
            try want(vm, .vm)
        case .moveEncryptionContext(let destination, let source):
            try want(destination, .vm)
            try want(source, .vm)
        case .punch(let file, _, _), .write(let file, _, _), .read(let file, _), .load(let file, _, _): try want(file, .file)
        case .sameInode(let a, let b):
            try want(a, .file)
            try want(b, .file)
        }
    }

    static func isValidResult(_ text: String) -> Bool {
        let words = text.split(separator: " ")
        switch words.first {
        case "ok": return words.count >= 1
        case "error": return words.count == 2 && Errno(name: String(words[1])) != nil
        case "unsupported", "skipped": return words.count == 1
        default: return false
        }
    }

    struct Problem: Error {
        var message: String
    }

    private struct Arguments {
        var positional: [String] = []
        var named: [String: String] = [:]
        let command: String

        init(_ words: ArraySlice<String>, command: String) throws(Problem) {
            self.command = command
            for word in words {
                if let equals = word.firstIndex(of: "=") {
                    let key = String(word[..<equals])
                    guard !key.isEmpty else { throw Problem(message: "'\(word)': missing key before '='") }
                    guard named[key] == nil else { throw Problem(message: "\(command): '\(key)' given twice") }
                    named[key] = String(word[word.index(after: equals)...])
                } else {
                    positional.append(word)
                }
            }
        }

        func expect(positional count: Int, _ names: String) throws(Problem) {
            guard positional.count == count else {
                throw Problem(message: "\(command) takes \(names) (\(count) word\(count == 1 ? "" : "s") before the key=value arguments), got \(positional.count)")
            }
        }

        func allow(_ keys: Set<String>) throws(Problem) {
            for key in named.keys.sorted() where !keys.contains(key) {
                throw Problem(message: "\(command): unknown argument '\(key)' (allowed: \(keys.sorted().joined(separator: ", ")))")
            }
        }

        func string(_ key: String) throws(Problem) -> String {
            guard let value = named[key], !value.isEmpty else { throw Problem(message: "\(command): missing \(key)=") }
            return value
        }

        func quantity(_ key: String) throws(Problem) -> UInt64 {
            let text = try string(key)
            guard let value = parseQuantity(text) else {
                throw Problem(message: "\(command): \(key)=\(text) is not a number (decimal, 0x hex, K/M/G/T suffix)")
            }
            return value
        }

        func optionalQuantity(_ key: String, default value: UInt64) throws(Problem) -> UInt64 {
            named[key] == nil ? value : try quantity(key)
        }
    }

    private static func parseCommand(_ words: [String]) throws(Problem) -> Command {
        let name = words[0]
        let arguments = try Arguments(words.dropFirst(), command: name)
        func number32(_ text: String, _ what: String) throws(Problem) -> UInt32 {
            guard let value = parseQuantity(text), value <= UInt64(UInt32.max) else {
                throw Problem(message: "\(name): \(what) '\(text)' is not a 32-bit number")
            }
            return UInt32(value)
        }
        switch name {
        case "vm":
            try arguments.expect(positional: 1, "NAME")
            try arguments.allow(["type"])
            let typeName = arguments.named["type"] ?? "default"
            guard let type = VMType(name: typeName) else {
                throw Problem(message: "vm: unknown type '\(typeName)' (default, sw-protected, sev, sev-es, snp, tdx)")
            }
            return .vm(name: arguments.positional[0], type: type)
        case "vcpus":
            try arguments.expect(positional: 1, "NAME")
            try arguments.allow(["count"])
            return .vcpus(vm: arguments.positional[0], count: try number32(try arguments.string("count"), "count"))
        case "gmem":
            try arguments.expect(positional: 1, "FILE")
            try arguments.allow(["vm", "size", "flags"])
            let flagNames = (arguments.named["flags"] ?? "").split(separator: ",").map(String.init)
            guard let flags = GuestMemfdFlags(names: flagNames) else {
                throw Problem(message: "gmem: flags=\(arguments.named["flags"] ?? "") (mmap, init-shared, or a number)")
            }
            return .gmem(
                file: arguments.positional[0], vm: try arguments.string("vm"), size: try arguments.quantity("size"), flags: flags)
        case "slot":
            try arguments.expect(positional: 2, "NAME ID")
            try arguments.allow(["gpa", "size", "gmem", "map", "offset", "flags"])
            let offset = try arguments.optionalQuantity("offset", default: 0)
            let backing: Backing
            switch (arguments.named["gmem"], arguments.named["map"]) {
            case (let file?, nil): backing = .guestMemfd(file: file, offset: offset)
            case (nil, let file?): backing = .mapping(file: file, offset: offset)
            case (nil, nil):
                backing = .none
            case (_?, _?): throw Problem(message: "slot: give gmem= or map=, not both")
            }
            let size = try arguments.quantity("size")
            if case .none = backing, size != 0 {
                throw Problem(message: "slot: gmem=FILE or map=FILE is required (only size=0, a delete, goes without)")
            }
            let flagNames = (arguments.named["flags"] ?? "").split(separator: ",").map(String.init)
            guard var flags = MemslotFlags(names: flagNames) else {
                throw Problem(message: "slot: flags=\(arguments.named["flags"] ?? "") (log-dirty-pages, readonly, guest-memfd, or a number)")
            }
            if case .guestMemfd = backing { flags.insert(.guestMemfd) }
            return .slot(
                vm: arguments.positional[0], slot: try number32(arguments.positional[1], "ID"),
                gpa: try arguments.quantity("gpa"), size: size, backing: backing, flags: flags)
        case "link":
            try arguments.expect(positional: 1, "NEWFILE")
            try arguments.allow(["from", "vm"])
            return .link(file: arguments.positional[0], from: try arguments.string("from"), vm: try arguments.string("vm"))
        case "launch":
            try arguments.expect(positional: 1, "NAME")
            try arguments.allow([])
            return .launch(vm: arguments.positional[0])
        case "move-enc":
            try arguments.expect(positional: 1, "DST")
            try arguments.allow(["from"])
            return .moveEncryptionContext(destination: arguments.positional[0], source: try arguments.string("from"))
        case "fault":
            try arguments.expect(positional: 1, "NAME")
            try arguments.allow(["gpa"])
            return .fault(vm: arguments.positional[0], gpa: try arguments.quantity("gpa"))
        case "punch":
            try arguments.expect(positional: 1, "FILE")
            try arguments.allow(["offset", "len"])
            return .punch(file: arguments.positional[0], offset: try arguments.quantity("offset"), length: try arguments.quantity("len"))
        case "write":
            try arguments.expect(positional: 1, "FILE")
            try arguments.allow(["offset", "value"])
            let value = try arguments.quantity("value")
            guard value <= 0xff else { throw Problem(message: "write: value=\(value) is not a byte (0-255)") }
            return .write(file: arguments.positional[0], offset: try arguments.quantity("offset"), value: UInt8(value))
        case "read":
            try arguments.expect(positional: 1, "FILE")
            try arguments.allow(["offset"])
            return .read(file: arguments.positional[0], offset: try arguments.quantity("offset"))
        case "same-inode":
            try arguments.expect(positional: 2, "FILE1 FILE2")
            try arguments.allow([])
            return .sameInode(arguments.positional[0], arguments.positional[1])
        case "close":
            try arguments.expect(positional: 1, "NAME")
            try arguments.allow([])
            return .close(name: arguments.positional[0])
        case "load":
            try arguments.expect(positional: 1, "FILE")
            try arguments.allow(["offset", "bytes"])
            let hex = try arguments.string("bytes")
            guard hex.count % 2 == 0, let bytes = decodeHex(hex) else {
                throw Problem(message: "load: bytes=\(hex) is not an even number of hex digits")
            }
            return .load(file: arguments.positional[0], offset: try arguments.quantity("offset"), bytes: bytes)
        case "boot":
            try arguments.expect(positional: 1, "NAME")
            try arguments.allow(["rip", "vcpu"])
            return .boot(
                vm: arguments.positional[0], vcpu: try number32(arguments.named["vcpu"] ?? "0", "vcpu"),
                rip: try arguments.quantity("rip"))
        case "run":
            try arguments.expect(positional: 1, "NAME")
            try arguments.allow(["vcpu"])
            return .run(vm: arguments.positional[0], vcpu: try number32(arguments.named["vcpu"] ?? "0", "vcpu"))
        default:
            throw Problem(
                message: "unknown command '\(name)' (vm, vcpus, gmem, slot, link, launch, move-enc, fault, punch, write, read, same-inode, close, load, boot, run)")
        }
    }

    private static func decodeHex(_ text: String) -> [UInt8]? {
        var bytes: [UInt8] = []
        var index = text.startIndex
        while index < text.endIndex {
            let next = text.index(index, offsetBy: 2)
            guard let byte = UInt8(text[index..<next], radix: 16) else { return nil }
            bytes.append(byte)
            index = next
        }
        return bytes
    }
}
