/// One conformance case: a kernel script whose `=> RESULT` lines are the kernel's answers.
/// Each runs on both backends; where the real kernel lacks an operation the linux run records
/// `unsupported` (and `skipped` for what follows from it) and the model is checked alone.
struct ConformanceCase: Sendable, CustomStringConvertible {
    var name: String
    var script: String
    var description: String { name }
}

/// Cases mirror the kernel selftests named in each comment (guest_memfd_test.c,
/// set_memory_region_test.c, sev_migrate_tests.c, the link RFC's tests).
let conformanceCases: [ConformanceCase] = [
    // mirrors test_create_guest_memfd_multiple / the flags accepted on a default VM (6.18)
    .init(name: "gmem-valid-flags", script: """
        vm v
        gmem a vm=v size=4K                       => ok
        gmem b vm=v size=4K flags=mmap            => ok
        gmem c vm=v size=4K flags=init-shared     => ok
        gmem d vm=v size=4K flags=mmap,init-shared => ok
        same-inode a b                            => ok false
        same-inode a a                            => ok true
        """),
    // mirrors test_create_guest_memfd_invalid: every unknown flag bit
    .init(name: "gmem-invalid-flag-bits", script: "vm v\n" + (2..<64).map {
        "gmem f\($0) vm=v size=4K flags=0x\(String(UInt64(1) << UInt64($0), radix: 16)) => error EINVAL"
    }.joined(separator: "\n")),
    // mirrors test_create_guest_memfd_invalid: sizes that are not page multiples, and zero
    .init(name: "gmem-invalid-sizes", script: """
        vm v
        gmem a vm=v size=0       => error EINVAL
        gmem b vm=v size=1       => error EINVAL
        gmem c vm=v size=4095    => error EINVAL
        gmem d vm=v size=4097    => error EINVAL
        gmem e vm=v size=0x8000000000000000 => error EINVAL
        gmem f vm=v size=8K      => ok
        """),
    // kvm_gmem_bind: f->kvm != kvm
    .init(name: "bind-other-vms-file", script: """
        vm v1
        vm v2
        gmem g vm=v1 size=1M flags=mmap,init-shared
        slot v2 0 gpa=0 size=1M gmem=g          => error EINVAL
        slot v1 0 gpa=0 size=1M gmem=g          => ok
        """),
    // set_memory_region_test: overlapping GPA ranges → EEXIST
    .init(name: "gpa-overlap", script: """
        vm v
        gmem g vm=v size=2M flags=mmap,init-shared
        slot v 0 gpa=0 size=1M gmem=g                  => ok
        slot v 1 gpa=0xff000 size=8K gmem=g offset=1M  => error EEXIST
        slot v 1 gpa=1M size=8K gmem=g offset=1M       => ok
        """),
    // set_memory_region_test: overlap in the guest_memfd bindings, not in GPA space (6.18: EINVAL)
    .init(name: "gmem-range-overlap", script: """
        vm v
        gmem g vm=v size=2M flags=mmap,init-shared
        slot v 0 gpa=0 size=1M gmem=g                  => ok
        slot v 1 gpa=4M size=1M gmem=g offset=0xff000  => error EINVAL
        slot v 1 gpa=4M size=1M gmem=g offset=1M       => ok
        """),
    .init(name: "offset-beyond-file", script: """
        vm v
        gmem g vm=v size=1M flags=mmap,init-shared
        slot v 0 gpa=0 size=1M gmem=g offset=4K        => error EINVAL
        slot v 0 gpa=0 size=8K gmem=g offset=1M        => error EINVAL
        slot v 0 gpa=0 size=4K gmem=g offset=0xff000   => ok
        """),
    .init(name: "unaligned-offset-size-gpa", script: """
        vm v
        gmem g vm=v size=1M flags=mmap,init-shared
        slot v 0 gpa=0 size=4K gmem=g offset=0x800     => error EINVAL
        slot v 0 gpa=0 size=0x1800 gmem=g              => error EINVAL
        slot v 0 gpa=0x800 size=4K gmem=g              => error EINVAL
        slot v 0 gpa=0 size=4K gmem=g                  => ok
        """),
    // check_memory_region_flags: GUEST_MEMFD excludes READONLY and LOG_DIRTY_PAGES; unknown bits
    .init(name: "gmem-slot-flags", script: """
        vm v
        gmem g vm=v size=1M flags=mmap,init-shared
        slot v 0 gpa=0 size=4K gmem=g flags=readonly         => error EINVAL
        slot v 0 gpa=0 size=4K gmem=g flags=log-dirty-pages  => error EINVAL
        slot v 0 gpa=0 size=4K gmem=g flags=8                => error EINVAL
        slot v 0 gpa=0 size=4K gmem=g flags=0x80000000       => error EINVAL
        slot v 0 gpa=0 size=4K gmem=g                        => ok
        """),
    // kvm_vm_ioctl_set_memory_region: (u16)slot >= KVM_USER_MEM_SLOTS; address spaces (KVM_CAP_MULTI_ADDRESS_SPACE)
    .init(name: "slot-id-limits", script: """
        vm v
        gmem g vm=v size=1M flags=mmap,init-shared
        slot v 32764 gpa=0 size=4K gmem=g              => error EINVAL
        slot v 0x10000 gpa=0 size=4K gmem=g            => error EINVAL
        slot v 32763 gpa=0 size=4K gmem=g              => ok
        """),
    // "Private memslots are immutable, they can only be deleted" — even an identical re-issue
    .init(name: "gmem-slot-immutable", script: """
        vm v
        gmem g vm=v size=1M flags=mmap,init-shared
        slot v 0 gpa=0 size=4K gmem=g                  => ok
        slot v 0 gpa=0 size=4K gmem=g                  => error EINVAL
        slot v 0 gpa=8K size=4K gmem=g                 => error EINVAL
        slot v 0 gpa=0 size=0                          => ok
        slot v 0 gpa=8K size=4K gmem=g                 => ok
        """),
    .init(name: "delete-missing-slot", script: """
        vm v
        slot v 3 gpa=0 size=0                          => error EINVAL
        """),
    .init(name: "gpa-wraps", script: """
        vm v
        gmem g vm=v size=1M flags=mmap,init-shared
        slot v 0 gpa=0xfffffffffffff000 size=8K gmem=g => error EINVAL
        """),
    // 9935df5333aa: toggling KVM_MEM_GUEST_MEMFD off on an existing slot → EINVAL
    .init(name: "gmem-flag-toggle-off", script: """
        vm v
        gmem g vm=v size=64K flags=mmap,init-shared
        slot v 0 gpa=0 size=64K gmem=g                 => ok
        slot v 0 gpa=0 size=64K map=g                  => error EINVAL
        """),
    // the "share" strategy: an hva slot on a mapping of a gmem file, moved and re-flagged
    .init(name: "hva-slot-on-gmem-mapping", script: """
        vm v
        gmem g vm=v size=64K flags=mmap,init-shared
        slot v 0 gpa=0 size=64K map=g                  => ok
        slot v 1 gpa=32K size=64K map=g                => error EEXIST
        slot v 0 gpa=1M size=64K map=g                 => ok
        slot v 0 gpa=1M size=64K map=g flags=log-dirty-pages => ok
        slot v 0 gpa=1M size=64K map=g flags=readonly  => error EINVAL
        """),
    .init(name: "hva-slot-needs-mmap-flag", script: """
        vm v
        gmem g vm=v size=64K
        slot v 0 gpa=0 size=64K map=g                  => error ENODEV
        """),
    .init(name: "hva-slot-of-another-vms-file", script: """
        vm v1
        vm v2
        gmem g vm=v1 size=64K flags=mmap,init-shared
        slot v2 0 gpa=0 size=64K map=g                 => ok
        """),
    // kvm_gmem_mmap: ENODEV without GUEST_MEMFD_FLAG_MMAP
    .init(name: "mmap-needs-flag", script: """
        vm v
        gmem g vm=v size=64K flags=init-shared
        read g offset=0                                => error ENODEV
        """),
    // kvm_gmem_fault_user_mapping: no INIT_SHARED → SIGBUS, reported as EFAULT
    .init(name: "mapping-without-init-shared-faults", script: """
        vm v
        gmem g vm=v size=64K flags=mmap
        read g offset=0                                => error EFAULT
        write g offset=0 value=1                       => error EFAULT
        """),
    // test_mmap_supported: fresh pages are zero, writes read back
    .init(name: "mapping-reads-writes", script: """
        vm v
        gmem g vm=v size=64K flags=mmap,init-shared
        read g offset=0x1234                           => ok 0
        write g offset=0x1234 value=0xa5               => ok
        read g offset=0x1234                           => ok 0xa5
        read g offset=0x1235                           => ok 0
        """),
    .init(name: "access-beyond-file", script: """
        vm v
        gmem g vm=v size=8K flags=mmap,init-shared
        read g offset=8K                               => error EFAULT
        """),
    // test_invalid_punch_hole / test_fallocate
    .init(name: "punch-alignment", script: """
        vm v
        gmem g vm=v size=64K flags=mmap,init-shared
        punch g offset=1 len=4K                        => error EINVAL
        punch g offset=4K len=1                        => error EINVAL
        punch g offset=4K len=0                        => error EINVAL
        punch g offset=0x800 len=0x800                 => error EINVAL
        punch g offset=4K len=4K                       => ok
        punch g offset=64K len=4K                      => ok
        punch g offset=1M len=8K                       => ok
        """),
    .init(name: "punch-zeroes-only-its-range", script: """
        vm v
        gmem g vm=v size=64K flags=mmap,init-shared
        write g offset=0x1000 value=1                  => ok
        write g offset=0x2000 value=2                  => ok
        write g offset=0x3000 value=3                  => ok
        punch g offset=0x2000 len=4K                   => ok
        read g offset=0x1000                           => ok 1
        read g offset=0x2000                           => ok 0
        read g offset=0x3000                           => ok 3
        """),
    .init(name: "memory-outlives-closed-vm-handle", script: """
        vm v
        gmem g vm=v size=64K flags=mmap,init-shared
        write g offset=0 value=9                       => ok
        close v
        read g offset=0                                => ok 9
        """),
    // link RFC test_link: a new file on the same inode, bound to the other VM
    .init(name: "link-same-inode", script: """
        vm v1
        vm v2
        gmem g1 vm=v1 size=64K flags=mmap,init-shared
        link g2 from=g1 vm=v2                          => ok
        same-inode g1 g2                               => ok true
        """),
    .init(name: "link-into-owner-vm", script: """
        vm v1
        gmem g1 vm=v1 size=64K flags=mmap,init-shared
        link g2 from=g1 vm=v1                          => error EINVAL
        """),
    // each file has its own bindings: a page may sit at a different gfn in each VM
    .init(name: "link-independent-bindings", script: """
        vm v1
        vm v2
        gmem g1 vm=v1 size=2M flags=mmap,init-shared
        slot v1 0 gpa=0 size=1M gmem=g1                => ok
        link g2 from=g1 vm=v2                          => ok
        slot v2 5 gpa=16M size=1M gmem=g2              => ok
        slot v2 6 gpa=32M size=1M gmem=g2 offset=1M   => ok
        slot v2 7 gpa=48M size=1M gmem=g1 offset=1M   => error EINVAL
        write g1 offset=0x1000 value=0x11              => ok
        read g2 offset=0x1000                          => ok 0x11
        """),
    // punching a hole in one file zaps the range in every file of the inode
    .init(name: "link-punch-seen-from-both", script: """
        vm v1
        vm v2
        gmem g1 vm=v1 size=64K flags=mmap,init-shared
        write g1 offset=0x2000 value=0x42              => ok
        link g2 from=g1 vm=v2                          => ok
        punch g2 offset=0x2000 len=4K                  => ok
        read g1 offset=0x2000                          => ok 0
        read g2 offset=0x2000                          => ok 0
        """),
    // pages live while any file holds the inode, beyond the VM that created them
    .init(name: "link-memory-outlives-source", script: """
        vm v1
        vm v2
        gmem g1 vm=v1 size=64K flags=mmap,init-shared
        write g1 offset=0x3000 value=0x77              => ok
        link g2 from=g1 vm=v2                          => ok
        close g1
        close v1
        read g2 offset=0x3000                          => ok 0x77
        """),
    // VM types without an encryption context have nothing to move: linked files map at once
    .init(name: "link-default-maps-at-once", script: """
        vm v1
        vm v2
        vcpus v2 count=1
        gmem g1 vm=v1 size=64K flags=mmap,init-shared
        link g2 from=g1 vm=v2                          => ok
        slot v2 0 gpa=0 size=64K gmem=g2               => ok
        fault v2 gpa=0x1000                            => ok
        """),
    .init(name: "fault-without-memslot", script: """
        vm v
        vcpus v count=1
        fault v gpa=0x100000                           => error ENOENT
        """),
    // kvm_gmem_get_pfn after the file was released → EFAULT
    .init(name: "fault-after-file-closed", script: """
        vm v
        vcpus v count=1
        gmem g vm=v size=64K flags=mmap,init-shared
        slot v 0 gpa=0 size=64K gmem=g                 => ok
        fault v gpa=0                                  => ok
        close g
        fault v gpa=0                                  => error EFAULT
        """),
    // KVM_MEMORY_ENCRYPT_OP on a VM without an encryption context
    .init(name: "launch-default-vm", script: """
        vm v
        launch v                                       => error ENOTTY
        """),
    .init(name: "launch-twice", script: """
        vm v type=sev
        launch v                                       => ok
        launch v                                       => error EINVAL
        """),
    // sev_migrate_tests: test_sev_migrate_parameters, with the RFC's bindings check
    .init(name: "move-default-vms", script: """
        vm a
        vm b
        move-enc b from=a                              => error EINVAL
        """),
    .init(name: "move-self", script: """
        vm a type=sev
        launch a
        move-enc a from=a                              => error EINVAL
        """),
    .init(name: "move-types-differ", script: """
        vm a type=sev
        launch a
        vm b type=sev-es
        move-enc b from=a                              => error EINVAL
        """),
    .init(name: "move-source-not-launched", script: """
        vm a type=sev
        vm b type=sev
        move-enc b from=a                              => error EINVAL
        """),
    .init(name: "move-destination-already-launched", script: """
        vm a type=sev
        launch a
        vm b type=sev
        launch b
        move-enc b from=a                              => error EINVAL
        """),
    .init(name: "move-sev-es-vcpu-counts-differ", script: """
        vm a type=sev-es
        vcpus a count=2
        launch a
        vm b type=sev-es
        vcpus b count=1
        move-enc b from=a                              => error EINVAL
        vcpus b count=1
        move-enc b from=a                              => ok
        """),
    .init(name: "move-sev-vcpu-counts-may-differ", script: """
        vm a type=sev
        vcpus a count=2
        launch a
        vm b type=sev
        move-enc b from=a                              => ok
        """),
    // RFC v2 memslot_configurations_match: same slots, gfns, sizes, flags, inodes, offsets
    .init(name: "move-needs-identical-bindings", script: """
        vm a type=snp
        gmem g vm=a size=2M flags=mmap
        slot a 0 gpa=0 size=1M gmem=g                  => ok
        launch a
        vm b type=snp
        gmem other vm=b size=2M flags=mmap
        slot b 0 gpa=0 size=1M gmem=other              => ok
        move-enc b from=a                              => error EINVAL
        slot b 0 gpa=0 size=0                          => ok
        link g2 from=g vm=b                            => ok
        slot b 0 gpa=0 size=1M gmem=g2 offset=1M       => ok
        move-enc b from=a                              => error EINVAL
        slot b 0 gpa=0 size=0                          => ok
        slot b 0 gpa=0 size=1M gmem=g2                 => ok
        move-enc b from=a                              => ok
        """),
    // after the move the source is dead: VM and vcpu ioctls answer EIO
    .init(name: "move-kills-source", script: """
        vm a type=tdx
        vcpus a count=1
        launch a
        vm b type=tdx
        vcpus b count=1
        move-enc b from=a                              => ok
        gmem g vm=a size=4K                            => error EIO
        slot a 0 gpa=0 size=0                          => error EIO
        launch a                                       => error EIO
        move-enc a from=b                              => error EIO
        """),
    // a linked file maps nothing before the move of the encryption context
    .init(name: "linked-confidential-waits-for-move", script: """
        vm a type=sev
        vcpus a count=1
        gmem g vm=a size=64K flags=mmap,init-shared
        slot a 0 gpa=0 size=64K gmem=g                 => ok
        launch a
        vm b type=sev
        vcpus b count=1
        link g2 from=g vm=b                            => ok
        slot b 0 gpa=0 size=64K gmem=g2                => ok
        fault b gpa=0                                  => error EPERM
        fault a gpa=0                                  => ok
        move-enc b from=a                              => ok
        fault b gpa=0                                  => ok
        """),
    // 6.18 kvm_gmem_get_supported_flags: private-memory VMs get MMAP only
    .init(name: "private-vm-gmem-flags", script: """
        vm p type=sw-protected
        gmem a vm=p size=4K flags=mmap                 => ok
        gmem b vm=p size=4K flags=mmap,init-shared     => error EINVAL
        vm t type=tdx
        gmem c vm=t size=4K flags=init-shared          => error EINVAL
        vm s type=sev
        gmem d vm=s size=4K flags=mmap,init-shared     => ok
        """),
    // protected-state VMs have no read-only memslots and a single address space
    .init(name: "protected-state-slots", script: """
        vm e type=sev-es
        gmem g vm=e size=64K flags=mmap
        slot e 0 gpa=0 size=64K map=g flags=readonly   => error EINVAL
        """),
    // a real guest runs from gmem-backed memory; its store is visible through the mapping
    .init(name: "guest-runs-from-gmem", script: """
        vm v
        vcpus v count=1
        gmem ram vm=v size=64K flags=mmap,init-shared
        slot v 0 gpa=0 size=64K gmem=ram               => ok
        load ram offset=0x1000 bytes=C60600202AA00020E610F4 => ok
        boot v rip=0x1000                              => ok
        run v                                          => ok io-out port=0x10 size=1 data=0x2a
        run v                                          => ok hlt
        read ram offset=0x2000                         => ok 0x2a
        """),
    // the share strategy: a second VM runs on the first VM's gmem pages through a mapping
    .init(name: "guest-runs-on-shared-pages", script: """
        vm v1
        gmem ram vm=v1 size=64K flags=mmap,init-shared
        load ram offset=0x1000 bytes=C60600202AA00020E610F4 => ok
        vm v2
        vcpus v2 count=1
        slot v2 0 gpa=0 size=64K map=ram               => ok
        close v1
        boot v2 rip=0x1000                             => ok
        run v2                                         => ok io-out port=0x10 size=1 data=0x2a
        read ram offset=0x2000                         => ok 0x2a
        """),
    // a store beyond every memslot exits to userspace as MMIO
    .init(name: "guest-mmio-exit", script: """
        vm v
        vcpus v count=1
        gmem ram vm=v size=8K flags=mmap,init-shared
        slot v 0 gpa=0 size=8K gmem=ram                => ok
        load ram offset=0x1000 bytes=C60600202AF4      => ok
        boot v rip=0x1000                              => ok
        run v                                          => ok mmio-write gpa=0x2000 data=0x2a
        run v                                          => ok hlt
        """),
]
