/// A tiny interpreter of 16-bit real-mode x86, so that the model can run the guest programs
/// gmigrate ships (a store and halt; a counter loop that reports through an I/O port).
///
/// Supported: the 0x66 operand-size prefix; NOP; HLT; JMP rel8/rel16; JZ/JNZ rel8; TEST AL/eAX, imm;
/// MOV r8/r16/r32, imm;
/// MOV sreg, r16; MOV [disp16], imm8/imm16/imm32; MOV AL/AX/EAX <-> [moffs16]; INC r16/r32;
/// INC byte/word/dword [disp16]; OUT imm8 / OUT DX with AL/AX/EAX. Anything else ends the run
/// with `internalError(suberror: 1)` (KVM_INTERNAL_ERROR_EMULATION), as a failed emulation
/// does in KVM. A run that reaches no exit within `budget` instructions returns `.interrupted`,
/// as a vcpu kicked by a signal would.
struct ModelGuest {
    enum Access {
        case read(UInt64, Int)
        case write(UInt64, [UInt8])
    }

    enum AccessResult {
        case memory([UInt8])
        case mmio
        case fault(gpa: UInt64)
    }

    var state: VCPUState
    var budget = 1_000_000

    private enum Stop: Error {
        case exit(VCPUExit)
    }

    mutating func run(_ access: (Access) -> AccessResult) -> VCPUExit {
        for _ in 0..<budget {
            do {
                try step(access)
            } catch {
                switch error {
                case .exit(let exit): return exit
                }
            }
        }
        return .interrupted
    }

    private var ip: UInt64 {
        get { state.registers.rip & 0xffff }
        set { state.registers.rip = newValue & 0xffff }
    }

    private func linearCode(_ offset: UInt64) -> UInt64 { state.specialRegisters.cs.base &+ (offset & 0xffff) }
    private func linearData(_ offset: UInt64) -> UInt64 { state.specialRegisters.ds.base &+ (offset & 0xffff) }

    private func read(_ address: UInt64, _ count: Int, _ access: (Access) -> AccessResult) throws(Stop) -> [UInt8] {
        switch access(.read(address, count)) {
        case .memory(let bytes): return bytes
        // MMIO reads need the VMM to complete them; the model does not emulate that.
        case .mmio: throw .exit(.internalError(suberror: 1))
        case .fault(let gpa): throw .exit(.memoryFault(address: gpa, size: pageSize))
        }
    }

    private func write(_ address: UInt64, _ bytes: [UInt8], _ access: (Access) -> AccessResult) throws(Stop) -> VCPUExit? {
        switch access(.write(address, bytes)) {
        case .memory: return nil
        case .mmio: return .mmio(address: address, isWrite: true, data: bytes)
        case .fault(let gpa): throw .exit(.memoryFault(address: gpa, size: pageSize))
        }
    }

    private static func little(_ bytes: [UInt8]) -> UInt64 {
        bytes.enumerated().reduce(0) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
    }

    private static func bytes(_ value: UInt64, _ count: Int) -> [UInt8] {
        (0..<count).map { UInt8(truncatingIfNeeded: value >> (8 * UInt64($0))) }
    }

    private func register(_ index: Int) -> UInt64 {
        let r = state.registers
        return [r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi][index]
    }

    private mutating func setRegister(_ index: Int, _ value: UInt64, width: Int) {
        let mask: UInt64 = width == 4 ? 0xffff_ffff : 0xffff
        let merged = (register(index) & ~mask) | (value & mask)
        switch index {
        case 0: state.registers.rax = merged
        case 1: state.registers.rcx = merged
        case 2: state.registers.rdx = merged
        case 3: state.registers.rbx = merged
        case 4: state.registers.rsp = merged
        case 5: state.registers.rbp = merged
        case 6: state.registers.rsi = merged
        default: state.registers.rdi = merged
        }
    }

    private mutating func setByteRegister(_ index: Int, _ value: UInt8) {
        // 0-3: AL CL DL BL; 4-7: AH CH DH BH.
        let base = index & 3
        let shift: UInt64 = index < 4 ? 0 : 8
        let merged = (register(base) & ~(0xff << shift)) | (UInt64(value) << shift)
        setRegister(base, merged, width: 4)
    }

    /// Flags an INC leaves (CF is unchanged): OF, SF, ZF, AF, PF.
    private mutating func setIncrementFlags(result: UInt64, width: Int) {
        let bits = UInt64(width * 8)
        let mask: UInt64 = bits == 64 ? ~0 : (1 << bits) - 1
        let value = result & mask
        var flags = state.registers.rflags & ~UInt64(0x8d4)  // OF SF ZF AF PF
        if value == 1 << (bits - 1) { flags |= 0x800 }
        if value & (1 << (bits - 1)) != 0 { flags |= 0x80 }
        if value == 0 { flags |= 0x40 }
        if value & 0xf == 0 { flags |= 0x10 }
        if (value & 0xff).nonzeroBitCount % 2 == 0 { flags |= 0x4 }
        state.registers.rflags = flags
    }

    private mutating func step(_ access: (Access) -> AccessResult) throws(Stop) {
        var cursor = ip
        func fetch(_ count: Int) throws(Stop) -> UInt64 {
            let bytes = try read(linearCode(cursor), count, access)
            cursor += UInt64(count)
            return ModelGuest.little(bytes)
        }
        var width = 2
        var opcode = try fetch(1)
        if opcode == 0x66 {
            width = 4
            opcode = try fetch(1)
        }
        switch opcode {
        case 0x90:
            ip = cursor
        case 0xF4:
            ip = cursor
            throw .exit(.halt)
        case 0xEB:
            let rel = Int8(truncatingIfNeeded: try fetch(1))
            ip = UInt64(bitPattern: Int64(cursor) + Int64(rel))
        case 0xE9:
            let rel = Int16(truncatingIfNeeded: try fetch(2))
            ip = UInt64(bitPattern: Int64(cursor) + Int64(rel))
        case 0xB0...0xB7:
            setByteRegister(Int(opcode - 0xB0), UInt8(try fetch(1)))
            ip = cursor
        case 0xB8...0xBF:
            setRegister(Int(opcode - 0xB8), try fetch(width), width: width)
            ip = cursor
        case 0x40...0x47:
            let index = Int(opcode - 0x40)
            let result = register(index) &+ 1
            setRegister(index, result, width: width)
            setIncrementFlags(result: result, width: width)
            ip = cursor
        case 0x8E:
            let modrm = try fetch(1)
            guard modrm >> 6 == 3 else { throw .exit(.internalError(suberror: 1)) }
            let value = register(Int(modrm & 7)) & 0xffff
            var sregs = state.specialRegisters
            var segment: Segment
            switch (modrm >> 3) & 7 {
            case 3: segment = sregs.ds
            default: throw .exit(.internalError(suberror: 1))
            }
            segment.selector = UInt16(value)
            segment.base = value << 4
            sregs.ds = segment
            state.specialRegisters = sregs
            ip = cursor
        case 0xC6, 0xC7, 0xFE, 0xFF:
            let modrm = try fetch(1)
            // Only [disp16] (mod 00, r/m 110) with /0.
            guard modrm == 0x06 else { throw .exit(.internalError(suberror: 1)) }
            let address = linearData(try fetch(2))
            let size = (opcode == 0xC6 || opcode == 0xFE) ? 1 : width
            let value: UInt64
            if opcode == 0xC6 || opcode == 0xC7 {
                value = try fetch(size)
            } else {
                value = ModelGuest.little(try read(address, size, access)) &+ 1
                setIncrementFlags(result: value, width: size)
            }
            ip = cursor
            if let exit = try write(address, ModelGuest.bytes(value, size), access) { throw .exit(exit) }
        case 0xA0, 0xA1:
            let address = linearData(try fetch(2))
            let size = opcode == 0xA0 ? 1 : width
            let value = ModelGuest.little(try read(address, size, access))
            if size == 1 { setByteRegister(0, UInt8(value)) } else { setRegister(0, value, width: size) }
            ip = cursor
        case 0xA2, 0xA3:
            let address = linearData(try fetch(2))
            let size = opcode == 0xA2 ? 1 : width
            ip = cursor
            if let exit = try write(address, ModelGuest.bytes(state.registers.rax, size), access) { throw .exit(exit) }
        case 0xA8, 0xA9:
            // TEST AL/AX/EAX, imm: SF ZF PF from the AND; CF and OF cleared.
            let size = opcode == 0xA8 ? 1 : width
            let mask: UInt64 = size == 4 ? 0xffff_ffff : size == 2 ? 0xffff : 0xff
            let value = state.registers.rax & mask & (try fetch(size))
            var flags = state.registers.rflags & ~UInt64(0x8c5)  // OF SF ZF PF CF
            if value == 0 { flags |= 0x40 }
            if value & (1 << UInt64(size * 8 - 1)) != 0 { flags |= 0x80 }
            if (value & 0xff).nonzeroBitCount % 2 == 0 { flags |= 0x4 }
            state.registers.rflags = flags
            ip = cursor
        case 0x74, 0x75:
            // JZ / JNZ rel8.
            let rel = Int8(truncatingIfNeeded: try fetch(1))
            let zero = state.registers.rflags & 0x40 != 0
            ip = (zero == (opcode == 0x74)) ? UInt64(bitPattern: Int64(cursor) + Int64(rel)) : cursor
        case 0xE6, 0xE7, 0xEE, 0xEF:
            let port = opcode <= 0xE7 ? UInt16(try fetch(1)) : UInt16(truncatingIfNeeded: state.registers.rdx)
            let size = (opcode == 0xE6 || opcode == 0xEE) ? 1 : width
            ip = cursor
            throw .exit(.io(port: port, isWrite: true, size: UInt8(size), data: ModelGuest.bytes(state.registers.rax, size)))
        default:
            throw .exit(.internalError(suberror: 1))
        }
    }
}
