import CKVM
import Foundation
import GmigrateTestKit
import Kernel
import KernelScript
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Runs a script text on a backend and returns its line results.
func runScript(_ text: String, on backend: any KernelBackend, name: String = "case") throws -> [LineResult] {
    let script = try Script.parse(text, path: name)
    return ScriptRunner(backend: backend).run(script)
}

/// The tiny real-mode guest used by several tests: it stores 0x2a at 0x2000, reads it back,
/// writes it to port 0x10 and halts.
let storeAndHalt: [UInt8] = [0xC6, 0x06, 0x00, 0x20, 0x2A, 0xA0, 0x00, 0x20, 0xE6, 0x10, 0xF4]

/// A counter loop: inc dword [0x2000]; mov eax, [0x2000]; out 0x10, eax; jmp back.
let counterLoop: [UInt8] = [0x66, 0xFF, 0x06, 0x00, 0x20, 0x66, 0xA1, 0x00, 0x20, 0x66, 0xE7, 0x10, 0xEB, 0xF2]
