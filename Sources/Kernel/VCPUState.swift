import CKVM

/// The general-purpose registers of an x86 vcpu (`struct kvm_regs`).
public struct Registers: Hashable, Sendable, Codable {
    public var rax: UInt64 = 0, rbx: UInt64 = 0, rcx: UInt64 = 0, rdx: UInt64 = 0
    public var rsi: UInt64 = 0, rdi: UInt64 = 0, rsp: UInt64 = 0, rbp: UInt64 = 0
    public var r8: UInt64 = 0, r9: UInt64 = 0, r10: UInt64 = 0, r11: UInt64 = 0
    public var r12: UInt64 = 0, r13: UInt64 = 0, r14: UInt64 = 0, r15: UInt64 = 0
    public var rip: UInt64 = 0, rflags: UInt64 = 0

    public init() {}

    init(_ c: kvm_regs) {
        rax = c.rax; rbx = c.rbx; rcx = c.rcx; rdx = c.rdx
        rsi = c.rsi; rdi = c.rdi; rsp = c.rsp; rbp = c.rbp
        r8 = c.r8; r9 = c.r9; r10 = c.r10; r11 = c.r11
        r12 = c.r12; r13 = c.r13; r14 = c.r14; r15 = c.r15
        rip = c.rip; rflags = c.rflags
    }

    var c: kvm_regs {
        var c = kvm_regs()
        c.rax = rax; c.rbx = rbx; c.rcx = rcx; c.rdx = rdx
        c.rsi = rsi; c.rdi = rdi; c.rsp = rsp; c.rbp = rbp
        c.r8 = r8; c.r9 = r9; c.r10 = r10; c.r11 = r11
        c.r12 = r12; c.r13 = r13; c.r14 = r14; c.r15 = r15
        c.rip = rip; c.rflags = rflags
        return c
    }

    /// The `regs` section: `struct kvm_regs`, 144 bytes.
    public init(bytes: [UInt8]) {
        var c = kvm_regs()
        withUnsafeMutableBytes(of: &c) { buffer in
            for index in 0..<Swift.min(buffer.count, bytes.count) { buffer[index] = bytes[index] }
        }
        self.init(c)
    }

    public var bytes: [UInt8] {
        var copy = c
        return withUnsafeBytes(of: &copy) { Array($0) }
    }

    /// The field at a byte offset of `struct kvm_regs`, for read-back reports.
    public static func field(at offset: Int) -> String {
        let names = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags"]
        return offset / 8 < names.count ? names[offset / 8] : "byte \(offset)"
    }
}

/// One segment register as `struct kvm_segment` holds it.
public struct Segment: Hashable, Sendable, Codable {
    public var base: UInt64
    public var limit: UInt32
    public var selector: UInt16
    public var type: UInt8
    public var present: Bool
    /// Descriptor privilege level.
    public var dpl: UInt8 = 0
    /// Default operand size (32-bit code/data).
    public var db: Bool = false
    /// Code or data (not a system segment).
    public var s: Bool = true
    /// 64-bit code.
    public var l: Bool = false
    /// Granularity (limit in 4 KiB units).
    public var g: Bool = false

    public init(base: UInt64, limit: UInt32, selector: UInt16, type: UInt8, present: Bool, dpl: UInt8 = 0, db: Bool = false, s: Bool = true, l: Bool = false, g: Bool = false) {
        self.base = base; self.limit = limit; self.selector = selector; self.type = type; self.present = present
        self.dpl = dpl; self.db = db; self.s = s; self.l = l; self.g = g
    }

    init(_ c: kvm_segment) {
        base = c.base; limit = c.limit; selector = c.selector; type = c.type; present = c.present != 0
        dpl = c.dpl; db = c.db != 0; s = c.s != 0; l = c.l != 0; g = c.g != 0
    }

    func apply(to c: inout kvm_segment) {
        c.base = base; c.limit = limit; c.selector = selector; c.type = type; c.present = present ? 1 : 0
        c.dpl = dpl; c.db = db ? 1 : 0; c.s = s ? 1 : 0; c.l = l ? 1 : 0; c.g = g ? 1 : 0; c.unusable = present ? 0 : 1
    }
}

/// The special registers (`struct kvm_sregs`), kept as the kernel's exact bytes so that a
/// save/restore round trip loses nothing; the fields gmigrate reads have typed accessors.
public struct SpecialRegisters: Hashable, Sendable, Codable {
    public var bytes: [UInt8]

    public init(bytes: [UInt8]) {
        precondition(bytes.count == MemoryLayout<kvm_sregs>.size, "kvm_sregs is \(MemoryLayout<kvm_sregs>.size) bytes")
        self.bytes = bytes
    }

    init(_ c: kvm_sregs) {
        var copy = c
        bytes = withUnsafeBytes(of: &copy) { Array($0) }
    }

    var c: kvm_sregs {
        get { bytes.withUnsafeBytes { $0.loadUnaligned(as: kvm_sregs.self) } }
        set {
            var copy = newValue
            bytes = withUnsafeBytes(of: &copy) { Array($0) }
        }
    }

    public var cs: Segment {
        get { Segment(c.cs) }
        set { var s = c; newValue.apply(to: &s.cs); c = s }
    }
    public var ds: Segment {
        get { Segment(c.ds) }
        set { var s = c; newValue.apply(to: &s.ds); c = s }
    }

    /// The `sregs` section's leading fields out of an `sregs2` section (they share them:
    /// segments, tables, control registers, EFER, APIC base; sregs2 then has flags and PDPTRs).
    init(sregs2 bytes: [UInt8]) {
        var c = kvm_sregs()
        let shared = MemoryLayout<kvm_sregs>.offset(of: \kvm_sregs.interrupt_bitmap) ?? 0
        withUnsafeMutableBytes(of: &c) { buffer in
            for index in 0..<Swift.min(shared, bytes.count) { buffer[index] = bytes[index] }
        }
        self.init(c)
    }

    /// Writes the shared leading fields into an `sregs2` section.
    func write(intoSregs2 sregs2: inout [UInt8]) {
        let shared = MemoryLayout<kvm_sregs>.offset(of: \kvm_sregs.interrupt_bitmap) ?? 0
        for index in 0..<Swift.min(shared, sregs2.count, bytes.count) { sregs2[index] = bytes[index] }
    }

    /// Sets every segment register, the descriptor tables and the control registers at once:
    /// what a VMM does to start a vcpu in a mode of its choosing.
    public mutating func set(
        code: Segment, data: Segment, task: Segment, gdt: (base: UInt64, limit: UInt16), idt: (base: UInt64, limit: UInt16),
        cr0: UInt64, cr3: UInt64, cr4: UInt64, efer: UInt64
    ) {
        var s = c
        code.apply(to: &s.cs)
        for keyPath in [\kvm_sregs.ds, \.es, \.fs, \.gs, \.ss] { data.apply(to: &s[keyPath: keyPath]) }
        task.apply(to: &s.tr)
        var ldt = Segment(base: 0, limit: 0, selector: 0, type: 2, present: false, s: false)
        ldt.present = false
        ldt.apply(to: &s.ldt)
        s.gdt.base = gdt.base
        s.gdt.limit = gdt.limit
        s.idt.base = idt.base
        s.idt.limit = idt.limit
        s.cr0 = cr0
        s.cr3 = cr3
        s.cr4 = cr4
        s.efer = efer
        c = s
    }
    public var cr0: UInt64 {
        get { c.cr0 }
        set { var s = c; s.cr0 = newValue; c = s }
    }
    public var efer: UInt64 {
        get { c.efer }
        set { var s = c; s.efer = newValue; c = s }
    }
    public var apicBase: UInt64 { c.apic_base }

    /// Puts every segment register in flat real mode (base 0, selector 0), as a VMM does
    /// before running a guest loaded at a low address.
    public mutating func setFlatRealMode() {
        var s = c
        for keyPath in [\kvm_sregs.cs, \.ds, \.es, \.fs, \.gs, \.ss] {
            s[keyPath: keyPath].base = 0
            s[keyPath: keyPath].selector = 0
        }
        c = s
    }
}

/// The x87/SSE state (`struct kvm_fpu`), kept as the kernel's exact bytes.
public struct FPUState: Hashable, Sendable, Codable {
    public var bytes: [UInt8]
    public init(bytes: [UInt8]) {
        precondition(bytes.count == MemoryLayout<kvm_fpu>.size, "kvm_fpu is \(MemoryLayout<kvm_fpu>.size) bytes")
        self.bytes = bytes
    }
    init(_ c: kvm_fpu) {
        var copy = c
        bytes = withUnsafeBytes(of: &copy) { Array($0) }
    }
    var c: kvm_fpu { bytes.withUnsafeBytes { $0.loadUnaligned(as: kvm_fpu.self) } }

    /// The x87 control word.
    public var fcw: UInt16 { c.fcw }
    public var mxcsr: UInt32 { c.mxcsr }
}

extension VCPUState {
    /// The architectural state after `KVM_CREATE_VCPU` (x86 reset, as KVM sets it without
    /// `KVM_SET_CPUID2`): the model starts every vcpu here.
    static func reset(isBootProcessor: Bool) -> VCPUState {
        var regs = Registers()
        regs.rip = 0xfff0
        regs.rflags = 0x2
        regs.rdx = 0x600
        var s = kvm_sregs()
        func segment(_ type: UInt8, selector: UInt16 = 0, base: UInt64 = 0, code: Bool = false) -> kvm_segment {
            var seg = kvm_segment()
            seg.base = base
            seg.limit = 0xffff
            seg.selector = selector
            seg.type = type
            seg.present = 1
            seg.s = 1
            return seg
        }
        s.cs = segment(11, selector: 0xf000, base: 0xffff_0000)
        s.ds = segment(3); s.es = segment(3); s.fs = segment(3); s.gs = segment(3); s.ss = segment(3)
        s.ldt = segment(2); s.ldt.s = 0
        s.tr = segment(11); s.tr.s = 0
        s.gdt.limit = 0xffff
        s.idt.limit = 0xffff
        s.cr0 = 0x6000_0010
        s.apic_base = isBootProcessor ? 0xfee0_0900 : 0xfee0_0800
        var fpu = kvm_fpu()
        fpu.fcw = 0x37f
        // KVM_GET_FPU reports mxcsr 0 after reset on 6.18 (the xsave default is not copied out).
        return VCPUState(registers: regs, specialRegisters: SpecialRegisters(s), fpu: FPUState(fpu))
    }
}
