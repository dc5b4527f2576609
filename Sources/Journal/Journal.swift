// # The journal's format, and why it is as safe as SQLite for this job
//
// Each migration has one append-only file, `journal/<id>.log`, in the state directory.
// A record is
//
//     length: UInt32 LE | ~length: UInt32 LE | crc: UInt32 LE | payload: `length` bytes of JSON
//
// where `crc = crc32c(previous record's crc as 4 LE bytes ‖ payload)` (the first record chains
// from 0): etcd's WAL CRC chain. Records carry consecutive sequence numbers.
//
// Ordering rule (the one durability depends on): a step's *intent* record is appended and
// `fdatasync`ed before the step's effect starts, and its *outcome* after the effect; the
// point-of-no-return record is written before the first irreversible effect. `append` does not
// return before the data is on stable storage; the directory is fsynced when a file is created.
// The one exception is the blackout, whose records are written in the same order but synced
// only once the target runs (`append(_:durable: false)`): a crashed coordinator's writes are in
// the page cache for recovery, and a crashed host ends both VMs (docs/orchestrator.md).
//
// Why a hand-made log and not SQLite (the argument DEVELOPERS.md asks for):
// - Every write is one append of one record followed by `fdatasync`, by the only writer of
//   that file (the state directory is locked; one migration, one file). There are no updates
//   in place, no indexes and no transactions spanning records, which is what SQLite's WAL and
//   rollback journal exist to make atomic.
// - A crash can only tear the *last* record, and only if it was not yet synced — in which case
//   its effect never started. The reader recognises a torn tail (a header or payload cut short
//   by the end of the file) and drops it, which is therefore safe.
// - Anything else — a bad `~length`, a CRC mismatch on a complete record, a sequence gap, a
//   payload that does not decode — is corruption. SQLite does not checksum row contents, so it
//   would hand a flipped bit back as data; the CRC chain finds it, names the record, and
//   recovery refuses to act on that journal instead of acting wrongly.
// - Measured on this machine kind (shared/design/dependencies.md): ~5.8k synced appends/s
//   against ~4.4k for GRDB with synchronous=FULL, and no dependency to build.

import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// Why the journal could not be used.
public struct JournalError: Error, Equatable, Sendable, CustomStringConvertible {
    public enum Kind: String, Sendable {
        case io
        /// Another coordinator holds the state directory.
        case locked
        /// A record is corrupt: recovery must not act on this journal.
        case corrupt
        case notFound = "not-found"
        /// The journal holds its `finished` record: nothing may follow it.
        case finished
        /// The state directory (or its journal directory) is not safe to trust: writable by
        /// others, owned by another user, or an entry in it is a symbolic link.
        case unsafe
        /// A migration id that is not a journal's name (it would leave the journal directory).
        case invalidID = "invalid-id"
    }

    public var kind: Kind
    public var message: String
    /// The errno of a failed system call.
    public var errno: Int32?

    public init(_ kind: Kind, _ message: String, errno: Int32? = nil) {
        self.kind = kind
        self.message = message
        self.errno = errno
    }

    public var description: String { message }
}

/// What reading a journal file found.
public struct JournalContents: Sendable {
    public var entries: [JournalEntry]
    /// Bytes after the last whole record that a crash tore (dropped, safely: never synced).
    public var tornTailBytes: Int
    /// Set when a record is corrupt: the entries before it are intact, nothing after is trusted.
    public var corruption: String?
    /// File offset where the valid records end.
    public var validLength: Int
    /// The CRC of the last valid record (the chain continues from it).
    public var lastCRC: UInt32
}

/// One migration's journal file, open for appending.
public final class MigrationJournal: @unchecked Sendable {
    // @unchecked: every access to the mutable fields holds `lock`.
    public let id: String
    public let path: String
    private let fd: Int32
    private let lock = NSLock()
    private var nextSequence: Int
    private var lastCRC: UInt32
    /// A record was written and not yet synced.
    private var unsynced = false
    public private(set) var entries: [JournalEntry]

    /// The largest record accepted (a plan with thousands of memslots fits easily).
    public static let maxRecordBytes = 16 << 20

    init(id: String, path: String, fd: Int32, contents: JournalContents) {
        self.id = id
        self.path = path
        self.fd = fd
        self.entries = contents.entries
        self.nextSequence = (contents.entries.last?.sequence ?? 0) + 1
        self.lastCRC = contents.lastCRC
    }

    deinit { Glibc.close(fd) }

    /// Makes every record written so far durable (`fdatasync`), if any is not yet.
    public func sync() throws(JournalError) {
        lock.lock()
        defer { lock.unlock() }
        guard unsynced else { return }
        guard fdatasync(fd) == 0 else { throw JournalError(.io, "\(path): fdatasync: \(String(cString: strerror(errno)))", errno: errno) }
        unsynced = false
    }

    /// Whether the journal holds its `finished` record.
    public var isFinished: Bool {
        lock.withLock {
            if case .finished? = entries.last?.event { return true }
            return false
        }
    }

    /// The JSON of the records the blackout writes on its way to the restore, written directly:
    /// a `saved` record (below), an intent, the point of no return. An intent and the point of
    /// no return hold only names from fixed sets, so no character needs escaping; JSONEncoder
    /// took 10-20 µs for each. Nil for any other record (the encoder writes it).
    public static func directPayload(_ entry: JournalEntry) -> Data? {
        switch entry.event {
        case .saved: savedStatePayload(entry)
        case .intent(let step, let direction): record(entry, event: #"{"intent":{"direction":""# + direction.rawValue + #"","step":""# + step.rawValue + #""}}"#)
        case .pointOfNoReturn: record(entry, event: #"{"pointOfNoReturn":{}}"#)
        case .outcome(let outcome): outcomePayload(entry, outcome)
        default: nil
        }
    }

    /// An outcome's JSON, written directly where every string in it is plain (printable ASCII
    /// without a quote or a backslash: nothing to escape): the pause-source outcome is the first
    /// record after the target's stage, and JSONEncoder's first use took 100 µs of that path.
    /// Keys in the encoder's sorted order; nil for anything else.
    private static func outcomePayload(_ entry: JournalEntry, _ outcome: JournalEntry.Outcome) -> Data? {
        func plain(_ text: String) -> Bool { text.utf8.allSatisfy { $0 >= 0x20 && $0 < 0x7f && $0 != UInt8(ascii: "\"") && $0 != UInt8(ascii: "\\") } }
        guard outcome.details.allSatisfy({ plain($0.key) && plain($0.value) }), outcome.error.map(plain) ?? true else { return nil }
        var json = #"{"outcome":{"_0":{"details":{"#
        json += outcome.details.sorted { $0.key < $1.key }.map { #"""# + $0.key + #"":""# + $0.value + #"""# }.joined(separator: ",")
        json += #"},"direction":""# + outcome.direction.rawValue + #"","durationNanoseconds":"# + String(outcome.durationNanoseconds)
        if let errno = outcome.errno { json += #","errno":"# + String(errno) }
        if let error = outcome.error { json += #","error":""# + error + #"""# }
        json += #","ok":"# + (outcome.ok ? "true" : "false") + #","step":""# + outcome.step.rawValue + #"""#
        if let uncertain = outcome.uncertain { json += #","uncertain":"# + (uncertain ? "true" : "false") }
        return record(entry, event: json + "}}}")
    }

    /// An entry's JSON around its event's (keys sorted, as the encoder writes them).
    private static func record(_ entry: JournalEntry, event: String) -> Data? {
        guard entry.time.isFinite else { return nil }
        return Data((#"{"event":"# + event + #","sequence":"# + String(entry.sequence) + #","time":"# + "\(entry.time)" + "}").utf8)
    }

    /// The JSON of a `saved` record, written directly: its state is tens of KiB of base64, which
    /// JSONEncoder scans character by character (150 µs here). The same JSON the encoder writes, without escaping a
    /// character base64 does not have; the pair assertion in `append` decodes it back (debug
    /// builds), and a test compares it with the encoder's. Nil for any other record.
    public static func savedStatePayload(_ entry: JournalEntry) -> Data? {
        guard case .saved(let step, let state) = entry.event,
            state.utf8.allSatisfy({ $0 == UInt8(ascii: "+") || $0 == UInt8(ascii: "/") || $0 == UInt8(ascii: "=") || (0x30...0x39).contains($0) || (0x41...0x5a).contains($0) || (0x61...0x7a).contains($0) })
        else { return nil }
        return record(entry, event: #"{"saved":{"state":""# + state + #"","step":""# + step.rawValue + #""}}"#)
    }

    /// Appends one event and returns only once it is on stable storage (`fdatasync`), with
    /// every record written before it.
    ///
    /// With `durable: false` the record is written (to the page cache: a process that dies
    /// after this call leaves it for `gmigrate recover`) but not synced; the next durable append,
    /// or `sync()`, makes it durable. The blackout writes this way (docs/orchestrator.md says
    /// why that changes no outcome).
    /// - Throws: `.finished` after the `finished` record (a finished journal stays finished),
    ///   `.io` when the record cannot be written.
    @discardableResult
    public func append(_ event: JournalEntry.Event, durable: Bool = true) throws(JournalError) -> JournalEntry {
        lock.lock()
        defer { lock.unlock() }
        if case .finished? = entries.last?.event {
            throw JournalError(.finished, "\(path): the migration has finished; nothing is appended after its finished record")
        }
        if case .finished(let finished) = event, !finished.state.isTerminal {
            preconditionFailure("a finished record holds a terminal state, not \(finished.state)")
        }
        let entry = JournalEntry(sequence: nextSequence, time: Date().timeIntervalSince1970, event: event)
        let payload: Data
        if let fast = MigrationJournal.directPayload(entry) {
            payload = fast
        } else {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys]
            guard let encoded = try? encoder.encode(entry) else { throw JournalError(.io, "\(path): record \(entry.sequence) cannot be encoded") }
            payload = encoded
        }
        guard payload.count <= MigrationJournal.maxRecordBytes else {
            throw JournalError(.io, "\(path): record \(entry.sequence) is larger than \(MigrationJournal.maxRecordBytes) bytes")
        }
        // Pair assertion: what is written must read back as the same entry.
        assert((try? JSONDecoder().decode(JournalEntry.self, from: payload)) == entry)
        let crc = CRC32C.update(CRC32C.update(0, Journal.littleEndian(lastCRC)), payload)
        var record = Data()
        record.append(contentsOf: Journal.littleEndian(UInt32(payload.count)))
        record.append(contentsOf: Journal.littleEndian(~UInt32(payload.count)))
        record.append(contentsOf: Journal.littleEndian(crc))
        record.append(payload)
        try Journal.writeAll(fd, record, path: path)
        if durable {
            guard fdatasync(fd) == 0 else { throw JournalError(.io, "\(path): fdatasync: \(String(cString: strerror(errno)))", errno: errno) }
            unsynced = false
        } else {
            unsynced = true
        }
        lastCRC = crc
        nextSequence += 1
        entries.append(entry)
        return entry
    }
}

/// The state directory: its lock, and the journals in it.
///
/// Every file in it is opened relative to the directory's own descriptor with `O_NOFOLLOW`:
/// a symbolic link planted as `lock` or `journal/X.log` is refused, never followed (root would
/// otherwise truncate and write its target). The state directory and its journal directory
/// must belong to the user running the coordinator and be writable by nobody else.
public final class Journal: Sendable {
    public let directory: String
    private let lockFD: Int32
    private let directoryFD: Int32
    private let journalFD: Int32

    /// Opens (creating if needed) the state directory and takes its lock.
    /// - Throws: `.locked` if another coordinator holds it; `.unsafe` if the directory, its
    ///   journal directory or its lock could be changed by another user or is a symbolic link.
    public init(stateDirectory: String) throws(JournalError) {
        directory = stateDirectory
        try Journal.makeDirectory(stateDirectory)
        let directoryFD = try Journal.openDirectory(stateDirectory, followLink: true)
        let journalFD: Int32
        do throws(JournalError) {
            if mkdirat(directoryFD, "journal", 0o700) == 0 {
                _ = fsync(directoryFD)  // the new directory's entry is durable
            } else if errno != EEXIST {
                throw JournalError(.io, "\(stateDirectory)/journal: \(String(cString: strerror(errno)))", errno: errno)
            }
            journalFD = try Journal.openDirectory(stateDirectory + "/journal", followLink: false, relativeTo: directoryFD, name: "journal")
        } catch {
            Glibc.close(directoryFD)
            throw error
        }
        let lockPath = stateDirectory + "/lock"
        let fd = openat(directoryFD, "lock", O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK, 0o600)
        guard fd >= 0 else {
            let error = errno
            Glibc.close(directoryFD)
            Glibc.close(journalFD)
            if error == ELOOP { throw JournalError(.unsafe, "\(lockPath) is a symbolic link: refused (remove it)", errno: error) }
            throw JournalError(.io, "\(lockPath): \(String(cString: strerror(error)))", errno: error)
        }
        func fail(_ error: JournalError) -> JournalError {
            Glibc.close(fd)
            Glibc.close(directoryFD)
            Glibc.close(journalFD)
            return error
        }
        var status = stat()
        guard fstat(fd, &status) == 0, (status.st_mode & S_IFMT) == S_IFREG else {
            throw fail(JournalError(.unsafe, "\(lockPath) is not a regular file: refused"))
        }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            let error = errno
            if error == EWOULDBLOCK {
                throw fail(JournalError(.locked, "\(stateDirectory) is in use by another coordinator (its lock is held)", errno: error))
            }
            throw fail(JournalError(.io, "\(lockPath): flock: \(String(cString: strerror(error)))", errno: error))
        }
        // Record who holds it, for the operator.
        let pid = "\(getpid())\n"
        _ = ftruncate(fd, 0)
        _ = pid.withCString { Glibc.write(fd, $0, strlen($0)) }
        lockFD = fd
        self.directoryFD = directoryFD
        self.journalFD = journalFD
    }

    deinit {
        Glibc.close(lockFD)
        Glibc.close(journalFD)
        Glibc.close(directoryFD)
    }

    func journalPath(_ id: String) -> String { directory + "/journal/" + id + ".log" }

    /// Whether `id` can name a journal: letters, digits, `.`, `_` and `-`, not starting with a
    /// dot, at most 200 characters (so that no id leaves the journal directory).
    public static func isValidID(_ id: String) -> Bool {
        let bytes = Array(id.utf8)
        guard (1...200).contains(bytes.count), bytes[0] != UInt8(ascii: ".") else { return false }
        return bytes.allSatisfy { byte in
            (byte >= 48 && byte <= 57) || (byte >= 65 && byte <= 90) || (byte >= 97 && byte <= 122) || byte == 45 || byte == 46 || byte == 95
        }
    }

    static func checkID(_ id: String) throws(JournalError) {
        guard isValidID(id) else {
            throw JournalError(.invalidID, "'\(id)' is not a migration id (letters, digits, '.', '_' and '-', not starting with '.')")
        }
    }

    /// Creates the journal of a new migration.
    public func create(id: String) throws(JournalError) -> MigrationJournal {
        try Journal.checkID(id)
        let path = journalPath(id)
        let fd = openat(journalFD, id + ".log", O_WRONLY | O_CREAT | O_EXCL | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else { throw JournalError(.io, "\(path): \(String(cString: strerror(errno)))", errno: errno) }
        guard fsync(journalFD) == 0 else {
            let error = errno
            Glibc.close(fd)
            throw JournalError(.io, "\(directory)/journal: fsync: \(String(cString: strerror(error)))", errno: error)
        }
        return MigrationJournal(id: id, path: path, fd: fd, contents: JournalContents(entries: [], tornTailBytes: 0, corruption: nil, validLength: 0, lastCRC: 0))
    }

    /// Deletes a finished migration's journal (retention); an unfinished one is refused, since
    /// recovery needs it.
    public func remove(id: String) throws(JournalError) {
        try Journal.checkID(id)
        let contents = try read(id: id)
        guard case .finished? = contents.entries.last?.event else {
            throw JournalError(.io, "\(journalPath(id)): not finished; only a finished journal is deleted")
        }
        guard unlinkat(journalFD, id + ".log", 0) == 0 else {
            throw JournalError(.io, "\(journalPath(id)): unlink: \(String(cString: strerror(errno)))", errno: errno)
        }
        _ = fsync(journalFD)
    }

    /// Opens an existing journal for appending. A torn tail is cut off (it was never synced, so
    /// its effect never started); a corrupt journal is refused.
    public func reopen(id: String) throws(JournalError) -> (MigrationJournal, JournalContents) {
        try Journal.checkID(id)
        let path = journalPath(id)
        let contents = try read(id: id)
        if let corruption = contents.corruption { throw JournalError(.corrupt, corruption) }
        let fd = openat(journalFD, id + ".log", O_WRONLY | O_APPEND | O_CLOEXEC | O_NOFOLLOW)
        guard fd >= 0 else { throw JournalError(errno == ELOOP ? .unsafe : .io, "\(path): \(String(cString: strerror(errno)))", errno: errno) }
        if contents.tornTailBytes > 0 {
            guard ftruncate(fd, off_t(contents.validLength)) == 0, fdatasync(fd) == 0 else {
                let error = errno
                Glibc.close(fd)
                throw JournalError(.io, "\(path): cutting the torn tail: \(String(cString: strerror(error)))", errno: error)
            }
        }
        return (MigrationJournal(id: id, path: path, fd: fd, contents: contents), contents)
    }

    /// The ids of every journal in the directory, oldest first (ids sort by time).
    public func ids() -> [String] {
        // Listed through the journal directory's descriptor: the directory the lock covers.
        var names: [String] = []
        let copy = dup(journalFD)
        guard copy >= 0, let stream = fdopendir(copy) else {
            if copy >= 0 { Glibc.close(copy) }
            return []
        }
        defer { closedir(stream) }
        rewinddir(stream)
        while let entry = readdir(stream) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { buffer in
                String(decoding: buffer.prefix { $0 != 0 }, as: UTF8.self)
            }
            names.append(name)
        }
        return names.filter { $0.hasSuffix(".log") }.map { String($0.dropLast(4)) }.filter(Journal.isValidID).sorted()
    }

    /// Reads one journal without the lock (for `journal show` and `list`).
    public static func read(stateDirectory: String, id: String) throws(JournalError) -> JournalContents {
        try checkID(id)
        return try read(path: stateDirectory + "/journal/" + id + ".log")
    }

    /// Reads and verifies a journal file: the CRC chain, the header check and the sequence.
    /// The file itself must not be a symbolic link.
    public static func read(path: String) throws(JournalError) -> JournalContents {
        parse(try readRegularFile(path), path: path)
    }

    /// Reads a journal of this state directory through the directory's own descriptor
    /// (`openat`, `O_NOFOLLOW`): what recovery trusts is the file the lock covers.
    public func read(id: String) throws(JournalError) -> JournalContents {
        try Journal.checkID(id)
        let path = journalPath(id)
        return Journal.parse(try Journal.readRegularFile(id + ".log", in: journalFD, path: path), path: path)
    }

    /// Verifies the bytes of a journal file: the CRC chain, the header check and the sequence.
    static func parse(_ bytes: [UInt8], path: String) -> JournalContents {
        var entries: [JournalEntry] = []
        var offset = 0
        var crc: UInt32 = 0
        let decoder = JSONDecoder()
        func corrupt(_ why: String) -> JournalContents {
            JournalContents(
                entries: entries, tornTailBytes: 0,
                corruption: "\(path): record \(entries.count + 1) at byte \(offset) is corrupt (\(why)); the \(entries.count) records before it are intact, nothing after it is trusted",
                validLength: offset, lastCRC: crc)
        }
        while offset < bytes.count {
            let remaining = bytes.count - offset
            // A header cut short by the end of the file: a torn final append.
            guard remaining >= 12 else {
                return JournalContents(entries: entries, tornTailBytes: remaining, corruption: nil, validLength: offset, lastCRC: crc)
            }
            let length = Journal.readUInt32(bytes, offset)
            let check = Journal.readUInt32(bytes, offset + 4)
            let recordCRC = Journal.readUInt32(bytes, offset + 8)
            guard check == ~length, Int(length) <= MigrationJournal.maxRecordBytes else {
                return corrupt("its length field fails its check")
            }
            // A complete header whose payload the end of the file cuts short: torn.
            guard remaining - 12 >= Int(length) else {
                return JournalContents(entries: entries, tornTailBytes: remaining, corruption: nil, validLength: offset, lastCRC: crc)
            }
            let payload = bytes[(offset + 12)..<(offset + 12 + Int(length))]
            let expected = CRC32C.update(CRC32C.update(0, Journal.littleEndian(crc)), payload)
            guard expected == recordCRC else {
                return corrupt("CRC 0x\(String(recordCRC, radix: 16)) where the chain gives 0x\(String(expected, radix: 16))")
            }
            guard let entry = try? decoder.decode(JournalEntry.self, from: Data(payload)) else {
                return corrupt("its payload is not a journal entry")
            }
            guard entry.sequence == entries.count + 1 else {
                return corrupt("sequence \(entry.sequence) where \(entries.count + 1) belongs")
            }
            entries.append(entry)
            crc = recordCRC
            offset += 12 + Int(length)
        }
        return JournalContents(entries: entries, tornTailBytes: 0, corruption: nil, validLength: offset, lastCRC: crc)
    }

    // MARK: - Files

    static func littleEndian(_ value: UInt32) -> [UInt8] {
        [UInt8(value & 0xff), UInt8((value >> 8) & 0xff), UInt8((value >> 16) & 0xff), UInt8(value >> 24)]
    }

    static func readUInt32(_ bytes: [UInt8], _ offset: Int) -> UInt32 {
        UInt32(bytes[offset]) | UInt32(bytes[offset + 1]) << 8 | UInt32(bytes[offset + 2]) << 16 | UInt32(bytes[offset + 3]) << 24
    }

    static func writeAll(_ fd: Int32, _ data: Data, path: String) throws(JournalError) {
        var written = 0
        while written < data.count {
            let result = data.withUnsafeBytes { buffer in Glibc.write(fd, buffer.baseAddress! + written, data.count - written) }
            if result < 0 {
                if errno == EINTR { continue }
                throw JournalError(.io, "\(path): write: \(String(cString: strerror(errno)))", errno: errno)
            }
            written += result
        }
    }

    /// Reads a whole regular file opened with `O_NOFOLLOW`: `name` relative to the directory
    /// descriptor `directory` (the current directory by default), `path` for messages.
    static func readRegularFile(_ name: String, in directory: Int32 = AT_FDCWD, path: String? = nil) throws(JournalError) -> [UInt8] {
        let path = path ?? name
        let fd = openat(directory, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK)
        guard fd >= 0 else {
            let error = errno
            if error == ENOENT { throw JournalError(.notFound, "\(path): no such journal", errno: error) }
            if error == ELOOP { throw JournalError(.unsafe, "\(path) is a symbolic link: refused", errno: error) }
            throw JournalError(.io, "\(path): \(String(cString: strerror(error)))", errno: error)
        }
        defer { Glibc.close(fd) }
        var status = stat()
        guard fstat(fd, &status) == 0, (status.st_mode & S_IFMT) == S_IFREG else {
            throw JournalError(.unsafe, "\(path) is not a regular file: refused")
        }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let count = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if count < 0 {
                if errno == EINTR { continue }
                throw JournalError(.io, "\(path): read: \(String(cString: strerror(errno)))", errno: errno)
            }
            if count == 0 { return bytes }
            bytes.append(contentsOf: chunk[0..<count])
        }
    }

    /// Opens a directory of the state directory and checks that only this user can change it:
    /// owned by the effective uid (or root), writable by neither group nor others, and (for an
    /// entry of the state directory) not a symbolic link.
    static func openDirectory(_ path: String, followLink: Bool, relativeTo parent: Int32? = nil, name: String? = nil) throws(JournalError) -> Int32 {
        let flags = O_RDONLY | O_DIRECTORY | O_CLOEXEC | (followLink ? 0 : O_NOFOLLOW)
        let fd = if let parent, let name { openat(parent, name, flags) } else { Glibc.open(path, flags) }
        guard fd >= 0 else {
            let error = errno
            if error == ELOOP || error == ENOTDIR { throw JournalError(.unsafe, "\(path) is a symbolic link or not a directory: refused", errno: error) }
            throw JournalError(.io, "\(path): \(String(cString: strerror(error)))", errno: error)
        }
        var status = stat()
        guard fstat(fd, &status) == 0 else {
            let error = errno
            Glibc.close(fd)
            throw JournalError(.io, "\(path): fstat: \(String(cString: strerror(error)))", errno: error)
        }
        if status.st_uid != geteuid() && status.st_uid != 0 {
            Glibc.close(fd)
            throw JournalError(.unsafe, "\(path) belongs to uid \(status.st_uid), not to this user (uid \(geteuid())): refused")
        }
        if status.st_mode & 0o022 != 0 {
            Glibc.close(fd)
            throw JournalError(
                .unsafe, "\(path) is writable by \(status.st_mode & 0o002 != 0 ? "others" : "its group") (mode \(String(status.st_mode & 0o7777, radix: 8))): refused; chmod go-w it")
        }
        return fd
    }

    static func makeDirectory(_ path: String) throws(JournalError) {
        var isDirectory: ObjCBool = false
        if FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) {
            guard isDirectory.boolValue else { throw JournalError(.io, "\(path) exists and is not a directory") }
            return
        }
        do {
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        } catch {
            throw JournalError(.io, "\(path): cannot create the directory: \(error.localizedDescription)")
        }
        try syncDirectory((path as NSString).deletingLastPathComponent)
    }

    static func syncDirectory(_ path: String) throws(JournalError) {
        let fd = Glibc.open(path.isEmpty ? "." : path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw JournalError(.io, "\(path): \(String(cString: strerror(errno)))", errno: errno) }
        defer { Glibc.close(fd) }
        guard fsync(fd) == 0 else { throw JournalError(.io, "\(path): fsync: \(String(cString: strerror(errno)))", errno: errno) }
    }
}
