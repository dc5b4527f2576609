# The long-mode guest of gmigrate's tests and demo: a guest that notices if anything of its
# state is lost across a migration. Assembled with GNU as and linked flat at 0x1000:
#
#   as --64 -o longmode.o longmode.S && ld -m elf_x86_64 -Ttext=0x1000 --oformat=binary -o longmode.bin longmode.o
#
# (tools/build-guests does it and regenerates LongModeGuestImage.swift; a test checks that the
# bytes the code embeds are these.)
#
# The VMM starts every vcpu in 64-bit mode at `entry`, paging on (the page tables below map the
# first 2 MiB), with RDI = vcpu index, RSI = the vcpu's block (0x10000 + index * 0x4000), RSP =
# the block's kernel stack top, TR = the block's TSS. Ring 0 is short (this host emulates it):
# it loads the IDT, sets STAR/LSTAR/SFMASK, KERNEL_GS_BASE, the kvmclock and the LAPIC timer
# (x2APIC, periodic, 250 Hz), then drops to ring 3 (IOPL 3, so that ring 3 may report through
# port 0xE9); where CPUID offers XSAVE and AVX, ring 0 also sets CR4.OSXSAVE and XCR0 (x87, SSE,
# AVX). Ring 3 runs the workload: it counts; every 256 iterations it checks that xmm0..xmm7
# (and, with AVX, ymm0..ymm7's upper halves) hold their values and that the TSC and the kvmclock never went back; every 2^16 it
# makes a syscall and checks that the ring-0 handler (LSTAR, KERNEL_GS_BASE) counted it. The
# timer handler counts ticks. A violation is recorded in the user page (code, expected, seen)
# and reported on port 0xE9 with its code. After each syscall ring 3 yields (INT3): ring 0
# idles with interrupts on until the next timer tick.
#
# A vcpu block: +0x000 pvclock (kvmclock's struct) | +0x080 TSS | +0x1000 user data page |
# +0x2000 user stack page (top +0x3000) | +0x3000 kernel stack page (top +0x4000).

        .intel_syntax noprefix
        .code64
        .text

        .set BLOCKS, 0x10000
        .set USER, 0x1000            # the user data page, within a block
        .set ITERATIONS, 0x00        # ring 3's count
        .set TICKS, 0x08             # LAPIC timer interrupts (ring 0)
        .set SYSCALLS, 0x10          # syscalls the handler saw (ring 0)
        .set VIOLATIONS, 0x18        # invariant violations found
        .set VCODE, 0x20             # the last violation: its code,
        .set VEXPECTED, 0x28         # what was expected,
        .set VSEEN, 0x30             # and what was seen
        .set LASTTSC, 0x38
        .set LASTCLOCK, 0x40         # kvmclock nanoseconds at the last check
        .set MAXCLOCKSTEP, 0x48      # the largest step between two kvmclock checks (ns)
        .set MAXTSCSTEP, 0x50        # the largest step between two TSC checks (cycles)
        .set SYSCALLSMADE, 0x58      # syscalls ring 3 made
        .set READY, 0x60             # 1 once ring 3 runs
        .set CHECKS, 0x68            # checks done
        .set YIELDS, 0x70            # INT3 idles
        .set AVX, 0x78               # 1 where ring 0 turned AVX on (ymm upper halves checked)
        .set IDT, 0x7000
        .set REPORT_PORT, 0xe9

        .globl  _start
_start:
image:
        jmp     entry
        .balign 8
# The header the VMM reads (offsets into the image).
header:
        .ascii  "GMLM"               # magic
        .long   1                    # version
        .quad   entry
        .quad   gdt
        .quad   gdt_end - gdt - 1
        .quad   IDT
        .quad   0x4000               # CR3: the PML4 below
        .quad   BLOCKS
        .quad   0x4000               # bytes per vcpu block

        .balign 16
gdt:
        .quad   0                    # 0x00
        .quad   0x00af9a000000ffff   # 0x08 kernel code, 64-bit
        .quad   0x00cf92000000ffff   # 0x10 kernel data
        .quad   0x00cffa000000ffff   # 0x18 user code, 32-bit (SYSRET's base)
        .quad   0x00cff2000000ffff   # 0x20 user data
        .quad   0x00affa000000ffff   # 0x28 user code, 64-bit
        .fill   32, 8, 0             # 0x30: a TSS descriptor per vcpu (the VMM's TR caches it)
gdt_end:

idtr:
        .word   256 * 16 - 1
        .quad   IDT

# ---- ring 0 ------------------------------------------------------------------------------
entry:
        # The IDT: exception stubs for 0..31, the timer at 0x20, `ignore` elsewhere.
        mov     rcx, 0
1:      lea     rax, [rip + ignore]
        cmp     rcx, 32
        jae     2f
        lea     rax, [rip + stubs]
        lea     rax, [rax + rcx * 8]
2:      cmp     rcx, 0x20
        jne     3f
        lea     rax, [rip + timer]
3:      mov     rdx, rcx
        shl     rdx, 4
        add     rdx, IDT
        mov     word ptr [rdx + 4], 0x8e00  # present interrupt gate, DPL 0
        cmp     rcx, 3
        jne     4f
        lea     rax, [rip + yield]
        mov     word ptr [rdx + 4], 0xee00  # INT3: DPL 3, ring 3 may raise it
4:      mov     word ptr [rdx], ax          # offset 15:0
        mov     word ptr [rdx + 2], 0x08    # selector
        shr     rax, 16
        mov     word ptr [rdx + 6], ax      # offset 31:16
        mov     qword ptr [rdx + 8], 0      # offset 63:32, reserved
        inc     rcx
        cmp     rcx, 256
        jb      1b
        lidt    [rip + idtr]

        # The TSS's RSP0: this vcpu's kernel stack top.
        lea     rax, [rsi + 0x4000]
        mov     [rsi + 0x80 + 4], rax

        # KERNEL_GS_BASE: the vcpu's block (the syscall handler's swapgs finds it).
        mov     ecx, 0xc0000102
        mov     rax, rsi
        mov     rdx, rsi
        shr     rdx, 32
        wrmsr
        # STAR: kernel CS 0x08 (SS 0x10); SYSRET to CS 0x2b, SS 0x23.
        mov     ecx, 0xc0000081
        xor     eax, eax
        mov     edx, 0x00180008
        wrmsr
        # LSTAR: the syscall handler. SFMASK: IF, TF, DF cleared on entry.
        mov     ecx, 0xc0000082
        lea     rax, [rip + syscall_entry]
        xor     edx, edx
        wrmsr
        mov     ecx, 0xc0000084
        mov     eax, 0x700
        xor     edx, edx
        wrmsr
        # kvmclock: MSR_KVM_SYSTEM_TIME_NEW = this vcpu's pvclock struct, enabled.
        mov     ecx, 0x4b564d01
        lea     rax, [rsi + 1]
        xor     edx, edx
        wrmsr
        # x2APIC on, software-enabled (spurious vector 0xff), timer periodic at vector 0x20:
        # 1 GHz bus / 16 / 250000 = 250 Hz.
        mov     ecx, 0x1b
        rdmsr
        or      eax, 0xc00
        wrmsr
        mov     ecx, 0x80f
        mov     eax, 0x1ff
        xor     edx, edx
        wrmsr
        mov     ecx, 0x83e
        mov     eax, 0x3
        wrmsr
        mov     ecx, 0x832
        mov     eax, 0x20020
        wrmsr
        mov     ecx, 0x838
        mov     eax, 250000
        wrmsr

        # AVX where the CPU offers it (CPUID.1:ECX XSAVE, bit 26, and AVX, bit 28): CR4.OSXSAVE,
        # then XCR0 = x87 | SSE | AVX. Ring 3 then holds known values in ymm0..7's upper halves.
        mov     eax, 1
        xor     ecx, ecx
        cpuid
        and     ecx, 0x14000000
        cmp     ecx, 0x14000000
        jne     5f
        mov     rax, cr4
        or      rax, 0x40000
        mov     cr4, rax
        xor     ecx, ecx
        mov     eax, 7
        xor     edx, edx
        xsetbv
        mov     qword ptr [rsi + USER + AVX], 1
5:
        # To ring 3, interrupts on, IOPL 3.
        push    0x23
        lea     rax, [rsi + 0x3000]
        push    rax
        push    0x3202
        push    0x2b
        lea     rax, [rip + user]
        push    rax
        iretq

# The syscall handler: counts in the user page of the vcpu, found from the user stack (it lies
# in the vcpu's block; SYSCALL switches no stack), and returns with IRETQ (RIP in RCX, RFLAGS
# in R11). A host that runs ring 0 by emulation (PVM) refuses privileged instructions after a
# SYSCALL (SWAPGS, SYSRET, STI: #GP), so the handler uses none; KERNEL_GS_BASE moves with the
# MSRs all the same.
syscall_entry:
        mov     rax, rsp
        and     rax, -0x4000
        inc     qword ptr [rax + USER + SYSCALLS]
        mov     rax, rsp
        push    0x23
        push    rax
        push    r11
        push    0x2b
        push    rcx
        iretq

# INT3 (a DPL-3 gate): ring 3 yields. The handler idles with interrupts on until the next
# interrupt (the timer's, at the latest). Idling in ring 0 is how the timer reaches the guest on
# every host: a host that runs ring 0 by emulation (PVM) delivers interrupts to ring 0 only.
yield:
        push    rax
        mov     rax, rsp
        and     rax, -0x4000
        inc     qword ptr [rax + USER + YIELDS]
        pop     rax
        sti
        hlt
        cli
        iretq

# The LAPIC timer: counts a tick, EOI.
timer:
        push    rax
        push    rcx
        push    rdx
        mov     rax, rsp
        and     rax, -0x4000
        inc     qword ptr [rax + USER + TICKS]
        mov     ecx, 0x80b
        xor     eax, eax
        xor     edx, edx
        wrmsr
        pop     rdx
        pop     rcx
        pop     rax
        iretq

ignore:
        iretq

# Exceptions: the stub pushes its vector; the handler reports 0x100 + vector and stops.
        .balign 8
stubs:
        .irp    v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .balign 8
        push    \v
        jmp     fault
        .endr
# It records the frame's first two words: the error code and RIP for the exceptions that push
# one (8, 10-14, 17, 21, 29, 30), RIP and CS for the others.
fault:
        pop     rcx
        mov     rax, rsp
        and     rax, -0x4000
        mov     rdx, [rsp]
        mov     [rax + USER + VEXPECTED], rdx
        mov     rdx, [rsp + 8]
        mov     [rax + USER + VSEEN], rdx
        add     rcx, 0x100
        mov     [rax + USER + VCODE], rcx
        inc     qword ptr [rax + USER + VIOLATIONS]
        mov     eax, ecx
        out     REPORT_PORT, al
1:      hlt
        jmp     1b

# ---- ring 3 ------------------------------------------------------------------------------
user:
        # xmm0..xmm7: known values, distinct per register and per vcpu (in ring 3: SSE is not
        # for ring 0 here, whose instructions the host emulates).
        .irp    n, 0, 1, 2, 3, 4, 5, 6, 7
        mov     rax, 0x0101010101010101 * (\n + 1)
        add     rax, rdi
        movq    xmm\n, rax
        punpcklqdq xmm\n, xmm\n
        .endr
        lea     rbx, [rsi + USER]
        # With AVX, ymm0..ymm7's upper halves: other known values, distinct per register and vcpu.
        cmp     qword ptr [rbx + AVX], 0
        je      1f
        .irp    n, 0, 1, 2, 3, 4, 5, 6, 7
        mov     rax, 0x1010101010101010 * (\n + 1) + 0x0f0f0f0f
        add     rax, rdi
        movq    xmm8, rax
        punpcklqdq xmm8, xmm8
        vinsertf128 ymm\n, ymm\n, xmm8, 1
        .endr
1:
        mov     qword ptr [rbx + READY], 1
loop:
        inc     qword ptr [rbx + ITERATIONS]
        mov     rax, [rbx + ITERATIONS]
        test    eax, 0xff
        jnz     loop
        call    check_sse
        call    check_clocks
        inc     qword ptr [rbx + CHECKS]
        mov     rax, [rbx + ITERATIONS]
        test    eax, 0xffff
        jnz     loop
        call    make_syscall
        int3
        jmp     loop

# Each xmm register still holds its value, and with AVX each ymm's upper half its own.
check_sse:
        .irp    n, 0, 1, 2, 3, 4, 5, 6, 7
        mov     rax, 0x0101010101010101 * (\n + 1)
        add     rax, rdi
        movq    xmm8, rax
        punpcklqdq xmm8, xmm8
        pcmpeqd xmm8, xmm\n
        pmovmskb ecx, xmm8
        cmp     ecx, 0xffff
        je      1f
        mov     rdx, rax
        movq    rax, xmm\n
        mov     ecx, 0x10 + \n
        call    violation
1:
        .endr
        cmp     qword ptr [rbx + AVX], 0
        je      3f
        .irp    n, 0, 1, 2, 3, 4, 5, 6, 7
        mov     rax, 0x1010101010101010 * (\n + 1) + 0x0f0f0f0f
        add     rax, rdi
        movq    xmm8, rax
        punpcklqdq xmm8, xmm8
        vextractf128 xmm9, ymm\n, 1
        pcmpeqd xmm8, xmm9
        pmovmskb ecx, xmm8
        cmp     ecx, 0xffff
        je      2f
        mov     rdx, rax
        movq    rax, xmm9
        mov     ecx, 0x20 + \n
        call    violation
2:
        .endr
3:
        ret

# A clock reading in rax only goes forward from the last one (kept at [rbx + last]): if it went
# back, violation `code` (seen rax, expected at least rdx); else the largest step is kept at
# [rbx + maxstep] for the verifier. The first reading (last still 0) only sets last.
        .macro forward_only last, maxstep, code
        mov     rdx, [rbx + \last]
        mov     [rbx + \last], rax
        test    rdx, rdx
        jz      .Ldone\@
        cmp     rax, rdx
        jae     .Lstep\@
        mov     ecx, \code
        call    violation
        jmp     .Ldone\@
.Lstep\@:
        sub     rax, rdx
        cmp     rax, [rbx + \maxstep]
        jbe     .Ldone\@
        mov     [rbx + \maxstep], rax
.Ldone\@:
        .endm

# The TSC and the kvmclock only go forward; the largest steps are kept for the verifier.
check_clocks:
        rdtsc
        shl     rdx, 32
        or      rax, rdx
        forward_only LASTTSC, MAXTSCSTEP, 1         # 1: the TSC went back
        call    kvmclock
        test    rax, rax
        jz      1f                                  # KVM has not filled the pvclock yet
        forward_only LASTCLOCK, MAXCLOCKSTEP, 2     # 2: the kvmclock went back
1:      ret

# The kvmclock in nanoseconds from this vcpu's pvclock struct (0 until KVM has filled it).
kvmclock:
1:      mov     r8d, [rsi]                  # version
        test    r8d, r8d
        jz      3f
        test    r8d, 1
        jnz     1b
        lfence
        rdtsc
        shl     rdx, 32
        or      rax, rdx
        sub     rax, [rsi + 8]              # - tsc_timestamp
        movsx   ecx, byte ptr [rsi + 28]    # tsc_shift
        test    ecx, ecx
        js      2f
        shl     rax, cl
        jmp     4f
2:      neg     ecx
        shr     rax, cl
4:      mov     r9d, [rsi + 24]             # tsc_to_system_mul
        mul     r9
        shrd    rax, rdx, 32
        add     rax, [rsi + 16]             # + system_time
        lfence
        cmp     r8d, [rsi]
        jne     1b
        ret
3:      xor     eax, eax
        ret

# A syscall, counted by the ring-0 handler: the count must follow.
make_syscall:
        syscall
        inc     qword ptr [rbx + SYSCALLSMADE]
        mov     rax, [rbx + SYSCALLS]
        mov     rdx, [rbx + SYSCALLSMADE]
        cmp     rax, rdx
        je      1f
        mov     ecx, 3
        call    violation
1:      ret

# Records a violation (ecx = code, rdx = expected, rax = seen) and reports it on port 0xE9.
violation:
        mov     [rbx + VCODE], rcx
        mov     [rbx + VEXPECTED], rdx
        mov     [rbx + VSEEN], rax
        inc     qword ptr [rbx + VIOLATIONS]
        mov     eax, ecx
        out     REPORT_PORT, al
        ret

# ---- page tables: the first 2 MiB, identity, user-accessible ------------------------------
        .org    0x3000
pml4:   .quad   0x5007
        .fill   511, 8, 0
pdpt:   .quad   0x6007
        .fill   511, 8, 0
pd:     .quad   0x0087
        .fill   511, 8, 0
