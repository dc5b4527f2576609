import CKVM
import Foundation

/// CRC-32C (Castagnoli), table-driven; the journal's record checksum.
public enum CRC32C {
    static let table: [UInt32] = (0..<256).map { index -> UInt32 in
        var crc = UInt32(index)
        for _ in 0..<8 { crc = crc & 1 != 0 ? (crc >> 1) ^ 0x82F6_3B78 : crc >> 1 }
        return crc
    }

    /// Continues `crc` over `bytes` (start from 0). Contiguous bytes go through SSE4.2's
    /// crc32 instruction (CKVM; the table where the CPU lacks it): a journal record holding a
    /// VM state is ~37 KB, which the byte loop took 0.3 ms over, inside the blackout.
    public static func update(_ crc: UInt32, _ bytes: some Sequence<UInt8>) -> UInt32 {
        if let fast = bytes.withContiguousStorageIfAvailable({ buffer in ~ckvm_crc32c(~crc, buffer.baseAddress, UInt(buffer.count)) }) {
            return fast
        }
        var value = ~crc
        for byte in bytes { value = table[Int((value ^ UInt32(byte)) & 0xff)] ^ (value >> 8) }
        return ~value
    }

    /// The same over Data (whose storage is contiguous).
    public static func update(_ crc: UInt32, _ data: Data) -> UInt32 {
        data.withUnsafeBytes { buffer in ~ckvm_crc32c(~crc, buffer.baseAddress, UInt(buffer.count)) }
    }
}
