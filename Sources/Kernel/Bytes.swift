extension UInt32 {
    /// The value of up to four little-endian bytes (an OUT's data, a counter in guest memory).
    public init(littleEndianBytes bytes: some Sequence<UInt8>) {
        self = bytes.enumerated().reduce(UInt32(0)) { $0 | UInt32($1.element) << (8 * UInt32($1.offset % 4)) }
    }
}
