import Kernel
import Plans

// The `alter:` faults: one piece of the VM state broken on purpose, so that a test can show the
// long-mode guest or the read-back check catching it (docs/vmstate.md, "Proving the checks").

extension VMState {
    /// This state with `alteration` applied: to the VM's sections and to every vcpu's.
    public func altered(by alteration: StateAlteration) -> VMState {
        VMState(vm: VMState.alter(vm, by: alteration), vcpus: vcpus.map { $0.altered(by: alteration) })
    }

    /// The VM's own sections with `alteration` applied (only `clock` is one of them).
    public static func alter(_ sections: [StateSection], by alteration: StateAlteration) -> [StateSection] {
        guard case .clock = alteration else { return sections }
        return sections.map { section in
            guard section.name == "clock", section.bytes.count >= 8 else { return section }
            var bytes = section.bytes
            // struct kvm_clock_data: the clock in nanoseconds first.
            bytes.storeLE(bytes.loadLE(UInt64.self, at: 0) &+ 10_000_000_000, at: 0)
            return StateSection(name: section.name, bytes: bytes)
        }
    }
}

extension VCPUState {
    /// This vcpu's state with `alteration` applied (unchanged where it has no such section).
    public func altered(by alteration: StateAlteration) -> VCPUState {
        var state = self
        switch alteration {
        case .cpuid:
            guard let bytes = state["cpuid"] else { break }
            state["cpuid"] = CPUIDEntry.bytes(CPUIDEntry.list(bytes).map { entry in
                var entry = entry
                if entry.function == 1 { entry.ecx &= ~(UInt32(1) << 21) }  // x2APIC
                return entry
            })
        case .msr(let index):
            guard let bytes = state["msrs"] else { break }
            var list = MSRList(bytes: bytes)
            list.entries = list.entries.map { $0.index == index ? .init(index: index, value: $0.value &+ 0x1000) : $0 }
            state["msrs"] = list.bytes
        case .xsave:
            // xmm3: at 160 + 3 * 16 in the XSAVE legacy area, at 152 + 3 * 16 in struct kvm_fpu.
            for (name, offset) in [("xsave", 208), ("fpu", 200)] {
                guard var bytes = state[name], bytes.count >= offset + 16 else { continue }
                for i in offset..<(offset + 16) { bytes[i] = ~bytes[i] }
                state[name] = bytes
            }
        case .ymm:
            // The AVX component of the (standard-format) XSAVE area starts at 576: the upper
            // halves of ymm0..ymm15, 16 bytes each.
            guard var bytes = state["xsave"], bytes.count >= 576 + 64 else { break }
            for i in (576 + 48)..<(576 + 64) { bytes[i] = ~bytes[i] }
            state["xsave"] = bytes
        case .lapic:
            // The LVT timer register (0x320): bit 16 masks it.
            guard var bytes = state["lapic"], bytes.count >= 0x324 else { break }
            bytes.storeLE(bytes.loadLE(UInt32.self, at: 0x320) | (1 << 16), at: 0x320)
            state["lapic"] = bytes
        case .clock:
            break
        case .section(let name):
            state.sections.append(StateSection(name: name, bytes: [0, 0, 0, 0]))
        case .gpa:
            break  // a memslot's, not the state's
        }
        return state
    }
}
