#if canImport(Glibc)
import Glibc
#endif

/// An error number as the kernel returns it.
///
/// An open struct rather than a closed enum (as in swift-system): the kernel can answer with a
/// value no list anticipated, and it must never be lost on the way to the user.
public struct Errno: RawRepresentable, Error, Hashable, Sendable, Codable, CustomStringConvertible {
    public var rawValue: Int32

    public init(rawValue: Int32) { self.rawValue = rawValue }

    /// The errno of the calling thread, read right after a failed call.
    public static var current: Errno { Errno(rawValue: errno) }

    public static let notPermitted = Errno(rawValue: 1)  // EPERM
    public static let noSuchFileOrDirectory = Errno(rawValue: 2)  // ENOENT
    public static let interrupted = Errno(rawValue: 4)  // EINTR
    public static let tryAgain = Errno(rawValue: 11)  // EAGAIN
    public static let ioError = Errno(rawValue: 5)  // EIO
    public static let noSuchDeviceOrAddress = Errno(rawValue: 6)  // ENXIO
    public static let argumentListTooLong = Errno(rawValue: 7)  // E2BIG
    public static let badFileDescriptor = Errno(rawValue: 9)  // EBADF
    public static let noMemory = Errno(rawValue: 12)  // ENOMEM
    public static let permissionDenied = Errno(rawValue: 13)  // EACCES
    public static let badAddress = Errno(rawValue: 14)  // EFAULT
    public static let resourceBusy = Errno(rawValue: 16)  // EBUSY
    public static let fileExists = Errno(rawValue: 17)  // EEXIST
    public static let noSuchDevice = Errno(rawValue: 19)  // ENODEV
    public static let invalidArgument = Errno(rawValue: 22)  // EINVAL
    public static let inappropriateIOCTLForDevice = Errno(rawValue: 25)  // ENOTTY
    public static let notSupported = Errno(rawValue: 95)  // EOPNOTSUPP

    private static let names: [Int32: String] = [
        1: "EPERM", 2: "ENOENT", 3: "ESRCH", 4: "EINTR", 5: "EIO", 6: "ENXIO", 7: "E2BIG",
        8: "ENOEXEC", 9: "EBADF", 10: "ECHILD", 11: "EAGAIN", 12: "ENOMEM", 13: "EACCES",
        14: "EFAULT", 16: "EBUSY", 17: "EEXIST", 18: "EXDEV", 19: "ENODEV", 20: "ENOTDIR",
        21: "EISDIR", 22: "EINVAL", 23: "ENFILE", 24: "EMFILE", 25: "ENOTTY", 27: "EFBIG",
        28: "ENOSPC", 29: "ESPIPE", 30: "EROFS", 32: "EPIPE", 34: "ERANGE", 35: "EDEADLK",
        38: "ENOSYS", 61: "ENODATA", 62: "ETIME", 75: "EOVERFLOW", 95: "EOPNOTSUPP",
        110: "ETIMEDOUT", 111: "ECONNREFUSED", 133: "EHWPOISON",
    ]
    private static let numbers: [String: Int32] = Dictionary(
        uniqueKeysWithValues: names.map { ($0.value, $0.key) })

    /// The symbolic name (`EINVAL`), or `E<number>` for a value without one here.
    public var name: String { Errno.names[rawValue] ?? "E\(rawValue)" }

    /// Parses a symbolic name (`EINVAL`, `E22`) or a plain number.
    public init?(name: String) {
        if let value = Errno.numbers[name.uppercased()] {
            self.init(rawValue: value)
        } else if name.uppercased().hasPrefix("E"), let value = Int32(name.dropFirst()), value > 0 {
            self.init(rawValue: value)
        } else if let value = Int32(name), value > 0 {
            self.init(rawValue: value)
        } else {
            return nil
        }
    }

    public var description: String { name }

    /// The C library's message for this errno.
    public var message: String { String(cString: strerror(rawValue)) }

    public static func ~= (pattern: Errno, value: any Error) -> Bool {
        (value as? Errno) == pattern
    }
}
