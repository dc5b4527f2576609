import CKVM
import Foundation
import GmigrateTestKit
import Kernel
import KernelScript
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Generates a random script of operations both backends can run on this host (no link,
/// move or confidential types), with sizes and offsets drawn to hit the kernel's edge cases.
func randomScript(seed: UInt64, length: Int) -> String {
    var random = SplitMix64(seed: seed)
    var lines = ["vm v0", "vm v1"]
    var files: [(name: String, vm: String)] = []
    var fileCount = 0
    let sizes = ["4K", "8K", "64K", "1M", "0", "0x1800", "2M"]
    let offsets = ["0", "4K", "0x800", "60K", "1M", "0xff000"]
    let gpas = ["0", "4K", "64K", "1M", "0x1800", "16M", "0xfffffffffffff000"]
    let flagSets = ["", "mmap", "init-shared", "mmap,init-shared", "0x4"]
    for _ in 0..<length {
        let vm = "v\(Int.random(in: 0...1, using: &random))"
        switch Int.random(in: 0..<10, using: &random) {
        case 0, 1:
            let name = "g\(fileCount)"
            fileCount += 1
            let flags = flagSets.randomElement(using: &random)!
            lines.append("gmem \(name) vm=\(vm) size=\(sizes.randomElement(using: &random)!)" + (flags.isEmpty ? "" : " flags=\(flags)"))
            files.append((name, vm))
        case 2, 3, 4:
            guard let file = files.randomElement(using: &random) else { continue }
            let slot = Int.random(in: 0..<4, using: &random)
            let backing = Bool.random(using: &random) ? "gmem" : "map"
            lines.append(
                "slot \(vm) \(slot) gpa=\(gpas.randomElement(using: &random)!) size=\(sizes.randomElement(using: &random)!) \(backing)=\(file.name) offset=\(offsets.randomElement(using: &random)!)")
        case 5:
            guard let file = files.randomElement(using: &random) else { continue }
            lines.append("punch \(file.name) offset=\(offsets.randomElement(using: &random)!) len=\(sizes.randomElement(using: &random)!)")
        case 6:
            guard let file = files.randomElement(using: &random) else { continue }
            lines.append("write \(file.name) offset=\(offsets.randomElement(using: &random)!) value=\(Int.random(in: 0...255, using: &random))")
        case 7, 8:
            guard let file = files.randomElement(using: &random) else { continue }
            lines.append("read \(file.name) offset=\(offsets.randomElement(using: &random)!)")
        default:
            guard Bool.random(using: &random), let index = files.indices.randomElement(using: &random) else { continue }
            lines.append("close \(files[index].name)")
            files.remove(at: index)
        }
    }
    return lines.joined(separator: "\n")
}

@Suite("Differential")
struct DifferentialTests {
    /// Seeded random operation sequences give identical transcripts on the model and the real
    /// kernel (raft's "two paths, same result"). A failure names the seed to replay.
    @Test("random operation sequences: model and linux transcripts are identical", arguments: 1...64)
    func randomSequences(_ seed: Int) throws {
        let linux = try Backend.linux.make()
        let text = randomScript(seed: UInt64(seed), length: 80)
        let model = try runScript(text, on: KernelModel(), name: "seed-\(seed)")
        let real = try runScript(text, on: linux, name: "seed-\(seed)")
        #expect(model.count == real.count)
        for (m, l) in zip(model, real) {
            #expect(m.result == l.result, "seed \(seed), line \(m.line) `\(m.source)`: model \(m.result), linux \(l.result)")
        }
        // The sequences must exercise successes and failures alike.
        #expect(model.contains { $0.result == "ok" } && model.contains { $0.result.hasPrefix("error") })
    }
}
