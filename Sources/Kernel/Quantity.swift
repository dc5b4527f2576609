/// Parses a size, offset or address: decimal, 0x hex, optional K/M/G/T suffix (powers of 1024;
/// `Ki`, `Mi`, `Gi`, `Ti` are accepted too; hex takes no suffix). Nil on anything else or on overflow.
public func parseQuantity(_ text: String) -> UInt64? {
    var bytes = Array(text.utf8)[...]
    if bytes.count > 2, bytes[bytes.startIndex] == UInt8(ascii: "0"),
        bytes[bytes.startIndex + 1] | 0x20 == UInt8(ascii: "x")
    {
        var value: UInt64 = 0
        for byte in bytes.dropFirst(2) {
            let digit: UInt8
            switch byte {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): digit = byte - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = byte - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): digit = byte - UInt8(ascii: "A") + 10
            default: return nil
            }
            guard value >> 60 == 0 else { return nil }
            value = value << 4 | UInt64(digit)
        }
        return value
    }
    var shift: UInt64 = 0
    if bytes.last == UInt8(ascii: "i") { bytes = bytes.dropLast() }
    switch bytes.last {
    case UInt8(ascii: "K"): shift = 10
    case UInt8(ascii: "M"): shift = 20
    case UInt8(ascii: "G"): shift = 30
    case UInt8(ascii: "T"): shift = 40
    default:
        // A lone "i" was no suffix.
        if bytes.count != text.utf8.count { return nil }
    }
    if shift > 0 { bytes = bytes.dropLast() }
    guard !bytes.isEmpty else { return nil }
    var value: UInt64 = 0
    for byte in bytes {
        guard byte >= UInt8(ascii: "0"), byte <= UInt8(ascii: "9") else { return nil }
        let (times, overflow1) = value.multipliedReportingOverflow(by: 10)
        let (sum, overflow2) = times.addingReportingOverflow(UInt64(byte - UInt8(ascii: "0")))
        guard !overflow1, !overflow2 else { return nil }
        value = sum
    }
    guard value == 0 || value.leadingZeroBitCount >= Int(shift) else { return nil }
    return value << shift
}
