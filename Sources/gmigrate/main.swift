import Kernel
func r<T>(_ label: String, _ body: () throws -> T) {
    do { let v = try body(); print(label, "ok", v) } catch { print(label, "error", error) }
}
let k = try! LinuxKVM()
print(try! k.probe())
let vm = try! k.createVirtualMachine()
for f: UInt64 in [0,1,2,3,4,1<<63] { r("gmem flags \(f)") { _ = try vm.createGuestMemfd(size: 0x200000, flags: GuestMemfdFlags(rawValue: f)) } }
r("gmem size 0") { _ = try vm.createGuestMemfd(size: 0, flags: []) }
r("gmem size 4095") { _ = try vm.createGuestMemfd(size: 4095, flags: []) }
let g = try! vm.createGuestMemfd(size: 0x200000, flags: [.mmap, .initShared])
r("slot0") { try vm.setMemslot(slot: 0, guestPhysicalAddress: 0, size: 0x100000, file: g, offset: 0) }
r("slot1 gmem overlap") { try vm.setMemslot(slot: 1, guestPhysicalAddress: 0x100000, size: 0x100000, file: g, offset: 0x80000) }
r("slot1 gpa overlap") { try vm.setMemslot(slot: 1, guestPhysicalAddress: 0x80000, size: 0x100000, file: g, offset: 0x100000) }
r("slot1 beyond") { try vm.setMemslot(slot: 1, guestPhysicalAddress: 0x100000, size: 0x200000, file: g, offset: 0x100000) }
r("slot0 reissue") { try vm.setMemslot(slot: 0, guestPhysicalAddress: 0, size: 0x100000, file: g, offset: 0) }
r("slot5 delete nonexist") { try vm.deleteMemslot(slot: 5) }
r("slot2 ro") { try vm.setMemslot(slot: 2, guestPhysicalAddress: 0x400000, size: 0x1000, file: g, offset: 0x1f0000, extraFlags: .readonly) }
r("slot2 logdirty") { try vm.setMemslot(slot: 2, guestPhysicalAddress: 0x400000, size: 0x1000, file: g, offset: 0x1f0000, extraFlags: .logDirtyPages) }
r("slot2 offset unaligned") { try vm.setMemslot(slot: 2, guestPhysicalAddress: 0x400000, size: 0x1000, file: g, offset: 0x1f0100) }
r("slot2 size unaligned") { try vm.setMemslot(slot: 2, guestPhysicalAddress: 0x400000, size: 0x1001, file: g, offset: 0x1f0000) }
r("slot 32764") { try vm.setMemslot(slot: 32764, guestPhysicalAddress: 0x400000, size: 0x1000, file: g, offset: 0x1f0000) }
r("slot 32763") { try vm.setMemslot(slot: 32763, guestPhysicalAddress: 0x400000, size: 0x1000, file: g, offset: 0x1f0000) }
r("slot as1") { try vm.setMemslot(slot: 0x10000 | 3, guestPhysicalAddress: 0x0, size: 0x1000, file: g, offset: 0x1e0000) }
r("slot as2") { try vm.setMemslot(slot: 0x20000 | 3, guestPhysicalAddress: 0x0, size: 0x1000, file: g, offset: 0x1d0000) }
let vm2 = try! k.createVirtualMachine()
r("other vm gmem") { try vm2.setMemslot(slot: 0, guestPhysicalAddress: 0, size: 0x100000, file: g, offset: 0) }
let g0 = try! vm.createGuestMemfd(size: 0x200000, flags: [])
r("mmap no flag") { _ = try g0.map() }
let g1 = try! vm.createGuestMemfd(size: 0x200000, flags: [.mmap])
r("mmap mmap-only + read") { let m = try g1.map(); return try m.read(offset: 0, count: 4) }
r("mmap flags3 write/read") { let m = try g.map(); try m.write(offset: 0x2000, bytes: [1,2,3]); return try m.read(offset: 0x2000, count: 4) }
r("mmap unaligned offset") { _ = try g.map(offset: 100, length: 4096) }
r("mmap beyond eof read") { let m = try g.map(offset: 0x1ff000, length: 0x2000); return try m.read(offset: 0x1000, count: 1) }
r("punch unaligned") { try g.punchHole(offset: 1, length: 4096) }
r("punch beyond") { try g.punchHole(offset: 0x400000, length: 4096) }
r("punch ok+read") { try g.punchHole(offset: 0x2000, length: 4096); let m = try g.map(); return try m.read(offset: 0x2000, count: 4) }
r("link") { _ = try vm2.link(g) }
r("move") { try vm2.moveEncryptionContext(from: vm) }
r("launch") { try vm.launch() }
let c = try! vm.createVCPU(id: 0)
r("prefault slot") { try c.prefault(guestPhysicalAddress: 0x1000) }
r("prefault noslot") { try c.prefault(guestPhysicalAddress: 0x10000000) }
r("vcpu dup") { _ = try vm.createVCPU(id: 0) }
r("vcpu 5000") { _ = try vm.createVCPU(id: 5000) }
r("foreign check") { k.attemptInAnotherProcess(.checkExtension(vm: vm.handle, .userMemory2)) as Any }
r("foreign gmem") { k.attemptInAnotherProcess(.createGuestMemfd(vm: vm.handle, size: 4096, flags: [])) as Any }
r("foreign punch") { k.attemptInAnotherProcess(.punchHole(file: g.handle, offset: 0, length: 4096)) as Any }
r("state") { try c.state() }
// guest
r("guest") { () throws -> [String] in
  let m = try g.map()
  try m.write(offset: 0x1000, bytes: [0xC6,0x06,0x00,0x20,0x2A, 0xA0,0x00,0x20, 0xE6,0x10, 0xF4])
  var s = try c.state(); s.specialRegisters.setFlatRealMode(); s.registers.rip = 0x1000; try c.setState(s)
  var out: [String] = []
  for _ in 0..<3 { let e = try c.run(); out.append("\(e)"); if e == .halt { break } }
  out.append("\(try m.read(offset: 0x2000, count: 1))")
  return out
}
r("guest gmem+hva") { () throws -> [String] in
   let vm3 = try k.createVirtualMachine(); let c3 = try vm3.createVCPU(id: 0)
   let g3 = try vm3.createGuestMemfd(size: 0x10000, flags: [.mmap, .initShared]); let m = try g3.map()
   try vm3.setMemslot(MemslotRegion(slot: 0, flags: .guestMemfd, guestPhysicalAddress: 0, size: 0x10000, userspaceAddress: m.address, guestMemfd: g3.handle, guestMemfdOffset: 0))
   try m.write(offset: 0x1000, bytes: [0xC6,0x06,0x00,0x20,0x2A, 0xA0,0x00,0x20, 0xE6,0x10, 0xF4])
   var s = try c3.state(); s.specialRegisters.setFlatRealMode(); s.registers.rip = 0x1000; try c3.setState(s)
   var out: [String] = []
   for _ in 0..<3 { let e = try c3.run(); out.append("\(e)"); if e == .halt { break } }
   out.append("\(try m.read(offset: 0x2000, count: 1))")
   return out
}
r("guest gmem+hva protected mode") { () throws -> [String] in
   let vm3 = try k.createVirtualMachine(); let c3 = try vm3.createVCPU(id: 0)
   let g3 = try vm3.createGuestMemfd(size: 0x10000, flags: [.mmap, .initShared]); let m = try g3.map()
   try vm3.setMemslot(MemslotRegion(slot: 0, flags: .guestMemfd, guestPhysicalAddress: 0, size: 0x10000, userspaceAddress: 0, guestMemfd: g3.handle, guestMemfdOffset: 0))
   try m.write(offset: 0x1000, bytes: [0xC6,0x05,0x00,0x20,0x00,0x00,0x2A, 0xF4])
   var s = try c3.state(); s.specialRegisters.setFlatRealMode(); s.registers.rip = 0x1000
   var cs = s.specialRegisters.cs; cs.limit = 0xffffffff; s.specialRegisters.cs = cs
   s.specialRegisters.cr0 = s.specialRegisters.cr0 | 1
   try c3.setState(s)
   var out: [String] = []
   for _ in 0..<3 { let e = try c3.run(); out.append("\(e)"); if e == .halt { break } }
   out.append("\(try m.read(offset: 0x2000, count: 1))")
   return out
}
r("close gmem then prefault") { () throws in
   let vm3 = try k.createVirtualMachine(); let c3 = try vm3.createVCPU(id: 0)
   do { let g3 = try vm3.createGuestMemfd(size: 0x10000, flags: [.mmap, .initShared]); try vm3.setMemslot(slot: 0, guestPhysicalAddress: 0, size: 0x10000, file: g3, offset: 0) }
   try c3.prefault(guestPhysicalAddress: 0)
}
r("noMMAP gmem slot prefault") { () throws in
   let vm3 = try k.createVirtualMachine(); let c3 = try vm3.createVCPU(id: 0)
   let g3 = try vm3.createGuestMemfd(size: 0x10000, flags: []); try vm3.setMemslot(slot: 0, guestPhysicalAddress: 0, size: 0x10000, file: g3, offset: 0)
   try c3.prefault(guestPhysicalAddress: 0)
}
r("share: map slot") { () throws -> [String] in
   let vm3 = try k.createVirtualMachine(); let c3 = try vm3.createVCPU(id: 0)
   let m = try g.map()
   try vm3.setMemslot(slot: 0, guestPhysicalAddress: 0, size: 0x10000, mapping: m, offset: 0)
   try m.write(offset: 0x2000, bytes: [0])
   var s = try c3.state(); s.specialRegisters.setFlatRealMode(); s.registers.rip = 0x1000; try c3.setState(s)
   var out: [String] = []
   for _ in 0..<3 { let e = try c3.run(); out.append("\(e)"); if e == .halt { break } }
   return out
}
r("toggle gmem off") { () throws in
   let vm3 = try k.createVirtualMachine()
   let g3 = try vm3.createGuestMemfd(size: 0x10000, flags: [.mmap, .initShared]); try vm3.setMemslot(slot: 0, guestPhysicalAddress: 0, size: 0x10000, file: g3, offset: 0)
   try vm3.setMemslot(MemslotRegion(slot: 0, guestPhysicalAddress: 0x0, size: 0x10000))
}
r("move gpa nongmem") { () throws in
   let vm3 = try k.createVirtualMachine()
   let g3 = try vm3.createGuestMemfd(size: 0x10000, flags: [.mmap, .initShared]); let m = try g3.map()
   try vm3.setMemslot(slot: 0, guestPhysicalAddress: 0, size: 0x10000, mapping: m, offset: 0)
   try vm3.setMemslot(MemslotRegion(slot: 0, guestPhysicalAddress: 0x100000, size: 0x10000, userspaceAddress: m.address))
}
r("userspace unaligned") { () throws in
   let vm3 = try k.createVirtualMachine()
   try vm3.setMemslot(MemslotRegion(slot: 0, guestPhysicalAddress: 0x100000, size: 0x10000, userspaceAddress: 0x1001))
}
r("userspace kernel addr") { () throws in
   let vm3 = try k.createVirtualMachine()
   try vm3.setMemslot(MemslotRegion(slot: 0, guestPhysicalAddress: 0x100000, size: 0x10000, userspaceAddress: 0xffff800000000000))
}
r("vm sw-protected") { _ = try k.createVirtualMachine(type: .swProtected) }
