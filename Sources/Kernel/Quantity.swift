/// Parses a size, offset or address: decimal, 0x hex, optional K/M/G/T suffix (powers of 1024;
/// `Ki`, `Mi`, ... are accepted too).
public func parseQuantity(_ text: String) -> UInt64? {
    var body = Substring(text)
    var multiplier: UInt64 = 1
    let suffixes: [(String, UInt64)] = [
        ("Ki", 1 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30), ("Ti", 1 << 40),
        ("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40),
    ]
    let isHex = body.hasPrefix("0x") || body.hasPrefix("0X")
    if !isHex {
        for (suffix, value) in suffixes where body.hasSuffix(suffix) {
            body = body.dropLast(suffix.count)
            multiplier = value
            break
        }
    }
    let number: UInt64?
    if isHex {
        number = UInt64(body.dropFirst(2), radix: 16)
    } else {
        number = UInt64(body)
    }
    guard let number else { return nil }
    let (result, overflow) = number.multipliedReportingOverflow(by: multiplier)
    return overflow ? nil : result
}

