import GmigrateTestKit
import Kernel
import Testing

/// A state sent in parts (protocol 7): the head (the VM's sections) and then each vcpu, so that
/// a target sets one part while the source saves the next. The parts' bytes are the whole
/// encoding's, and a decoder fed any split of them yields the same parts in order.
@Suite("A VM state in parts")
struct StateStreamTests {
    /// A state of known sections with bytes of a seeded generator: `vcpus` vcpus, each with
    /// sections of several sizes.
    static func state(vcpus: Int, seed: UInt64) -> VMState {
        var random = SplitMix64(seed: seed)
        func bytes(_ count: Int) -> [UInt8] { (0..<count).map { _ in UInt8(truncatingIfNeeded: random.next()) } }
        let vm = ["pic-master", "pic-slave", "ioapic", "clock"].map { StateSection(name: $0, bytes: bytes(Int(random.next() % 300))) }
        let each = (0..<vcpus).map { _ in
            VCPUState(sections: ["events", "regs", "xsave", "sregs2", "msrs", "lapic"].map { StateSection(name: $0, bytes: bytes(Int(random.next() % 3000))) })
        }
        return VMState(vm: vm, vcpus: each)
    }

    @Test("the parts are the whole encoding, in order", arguments: [0, 1, 2, 8])
    func thePartsAreTheWholeEncoding(_ vcpus: Int) {
        let state = Self.state(vcpus: vcpus, seed: UInt64(vcpus) + 1)
        let parts = [VMState.encodedHead(vm: state.vm, vcpus: state.vcpus.count)] + state.vcpus.map(VMState.encoded)
        #expect(parts.flatMap { $0 } == state.encoded)
    }

    /// Fed one part at a time, the decoder answers each part as its frame completes it.
    @Test func eachPartComesOutWithItsLastByte() throws {
        let state = Self.state(vcpus: 3, seed: 7)
        var decoder = VMState.StreamDecoder()
        #expect(try decoder.feed(VMState.encodedHead(vm: state.vm, vcpus: 3)) == [.head(vm: state.vm, vcpus: 3)])
        for (index, vcpu) in state.vcpus.enumerated() {
            #expect(decoder.state == nil)
            let bytes = VMState.encoded(vcpu)
            #expect(try decoder.feed(Array(bytes.dropLast())) == [], "vcpu \(index) lacks its last byte")
            #expect(try decoder.feed([bytes[bytes.count - 1]]) == [.vcpu(index: index, vcpu)])
        }
        #expect(decoder.state == state)
        #expect(decoder.consumed == state.encoded.count)
    }

    /// Split anywhere (inside headers, names, bodies), the bytes make the same parts in the
    /// same order, and the same state.
    @Test("any split of the bytes decodes the same", arguments: [1, 2, 3, 4, 5] as [UInt64])
    func anySplitDecodesTheSame(_ seed: UInt64) throws {
        let state = Self.state(vcpus: 4, seed: seed)
        let bytes = state.encoded
        var random = SplitMix64(seed: seed &* 31)
        var decoder = VMState.StreamDecoder()
        var parts: [VMState.StreamDecoder.Part] = []
        var offset = 0
        while offset < bytes.count {
            let count = min(bytes.count - offset, Int(random.next() % 700))
            parts += try decoder.feed(Array(bytes[offset..<(offset + count)]))
            offset += count
        }
        #expect(parts == [.head(vm: state.vm, vcpus: 4)] + state.vcpus.enumerated().map { .vcpu(index: $0.offset, $0.element) })
        #expect(decoder.state == state)
    }

    @Test func aStateWithoutVMSectionsOrVCPUs() throws {
        var decoder = VMState.StreamDecoder()
        let empty = VMState(vm: [], vcpus: [])
        #expect(try decoder.feed(empty.encoded) == [.head(vm: [], vcpus: 0)])
        #expect(decoder.state == empty)
        #expect(try VMState(decoding: empty.encoded) == empty)
    }

    /// An unknown section is refused when it comes, before the rest of the state: the parts
    /// before it were answered already, the target sets nothing after it.
    @Test func anUnknownSectionIsRefusedWhenItComes() throws {
        var state = Self.state(vcpus: 2, seed: 11)
        state.vcpus[1].sections.insert(StateSection(name: "quantum-flux", bytes: [1, 2, 3]), at: 2)
        var decoder = VMState.StreamDecoder()
        #expect(try decoder.feed(VMState.encodedHead(vm: state.vm, vcpus: 2) + VMState.encoded(state.vcpus[0])).count == 2)
        let part = VMState.encoded(state.vcpus[1])
        #expect(throws: VMStateError.self) { _ = try decoder.feed(part) }
        do {
            _ = try VMState(decoding: state.encoded)
            Issue.record("an unknown section was decoded")
        } catch {
            #expect(error.message.contains("section 'quantum-flux'"), "\(error)")
        }
    }

    /// A section longer than any accepted is refused as soon as its length comes, without
    /// waiting for (or holding) its body.
    @Test func anOversizedSectionIsRefusedBeforeItsBody() {
        var head = VMState.encodedHead(vm: [], vcpus: 1)
        head.appendLE(UInt16(1))
        head.append(4)
        head += Array("regs".utf8)
        head.append(0)
        head.appendLE(UInt32(VMState.maxSectionBytes + 1))
        var decoder = VMState.StreamDecoder()
        #expect {
            _ = try decoder.feed(head)
        } throws: { error in
            (error as? VMStateError)?.message.contains("section 'regs' of \(VMState.maxSectionBytes + 1) bytes") == true
        }
    }

    /// The read-back leaves out the LAPIC registers KVM derives (the current count, the
    /// processor priority) and compares the rest: the task priority and the in-service vectors
    /// from which KVM derives the processor priority among them.
    @Test func theReadBackLeavesOutOnlyTheDerivedLAPICRegisters() {
        var random = SplitMix64(seed: 17)
        let saved = (0..<1024).map { _ in UInt8(truncatingIfNeeded: random.next()) }
        func difference(_ change: (inout [UInt8]) -> Void) -> String? {
            var back = saved
            change(&back)
            return VCPUState.difference(
                restored: VCPUState(sections: [StateSection(name: "lapic", bytes: back)]), saved: VCPUState(sections: [StateSection(name: "lapic", bytes: saved)]))
        }
        #expect(difference { $0[0xa0] ^= 0x30; $0[0xa3] ^= 1 } == nil, "PPR")
        #expect(difference { $0[0x390] ^= 0xff; $0[0x393] ^= 1 } == nil, "TMCCT")
        #expect(difference { $0[0x80] ^= 0x10 }?.contains("register 0x80") == true, "TPR")
        #expect(difference { $0[0x112] ^= 0x02 }?.contains("register 0x110") == true, "ISR")
        #expect(difference { $0[0xa4] ^= 1 } != nil, "the byte after PPR")
        #expect(difference { $0[0x9f] ^= 1 } != nil, "the byte before PPR")
    }

    @Test func aWholeStateIsRefusedShortOrLong() {
        let bytes = Self.state(vcpus: 2, seed: 3).encoded
        #expect {
            _ = try VMState(decoding: Array(bytes.dropLast()))
        } throws: { error in
            (error as? VMStateError)?.message.contains("ends inside a section") == true
        }
        #expect {
            _ = try VMState(decoding: bytes + [0, 0, 0])
        } throws: { error in
            (error as? VMStateError)?.message == "3 bytes after the last vcpu"
        }
        let garbages: [[UInt8]] = [Array("GMVX".utf8) + Array(bytes.dropFirst(4)), Array("GMVX".utf8), [0x47, 0x4d, 0x00]]
        for garbage in garbages {
            #expect {
                _ = try VMState(decoding: garbage)
            } throws: { error in
                (error as? VMStateError)?.message.contains("no GMVS magic") == true
            }
        }
        #expect {
            _ = try VMState(decoding: Array("GMV".utf8))
        } throws: { error in
            (error as? VMStateError)?.message.contains("ends inside") == true
        }
    }
}
