/*
 * CKVM: the KVM uAPI that this host's system headers (linux-libc-dev 6.1) lack, and plain
 * (non-variadic) wrappers so that Swift can issue ioctls, fallocate and fork-probes.
 *
 * New structs carry a `ckvm_` prefix so that a newer <linux/kvm.h> cannot collide with them;
 * the request numbers encode sizeof(struct), and the _Static_asserts pin the ABI sizes.
 * Numbers: see shared/design/kernel.md §6 (include/uapi/linux/kvm.h).
 */
#ifndef CKVM_H
#define CKVM_H

#include <linux/kvm.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/types.h>

/* ---- structs newer than the 6.1 headers ------------------------------------------------ */

struct ckvm_create_guest_memfd {
    __u64 size;
    __u64 flags;
    __u64 reserved[6];
};

struct ckvm_userspace_memory_region2 {
    __u32 slot;
    __u32 flags;
    __u64 guest_phys_addr;
    __u64 memory_size;
    __u64 userspace_addr;
    __u64 guest_memfd_offset;
    __u32 guest_memfd;
    __u32 pad1;
    __u64 pad2[14];
};

/* RFC only (Ackerley Tng 2023, Ryan Afranji 2025): KVM_LINK_GUEST_MEMFD. */
struct ckvm_link_guest_memfd {
    __u64 fd;
    __u64 flags;
    __u64 reserved[6];
};

struct ckvm_pre_fault_memory {
    __u64 gpa;
    __u64 size;
    __u64 flags;
    __u64 padding[5];
};

/* KVM_MEMORY_ENCRYPT_OP argument as SEV defines it (arch/x86/include/uapi/asm/kvm.h). */
struct ckvm_sev_cmd {
    __u32 id;
    __u32 pad0;
    __u64 data;
    __u32 error;
    __u32 sev_fd;
};

_Static_assert(sizeof(struct ckvm_create_guest_memfd) == 64, "kvm_create_guest_memfd ABI");
_Static_assert(sizeof(struct ckvm_userspace_memory_region2) == 160, "kvm_userspace_memory_region2 ABI");
_Static_assert(sizeof(struct ckvm_link_guest_memfd) == 64, "kvm_link_guest_memfd ABI");
_Static_assert(sizeof(struct ckvm_pre_fault_memory) == 64, "kvm_pre_fault_memory ABI");
_Static_assert(sizeof(struct kvm_enable_cap) == 104, "kvm_enable_cap ABI");

/* ---- request numbers ------------------------------------------------------------------- */

static const unsigned long CKVM_GET_API_VERSION = KVM_GET_API_VERSION;
static const unsigned long CKVM_CREATE_VM = KVM_CREATE_VM;
static const unsigned long CKVM_CHECK_EXTENSION = KVM_CHECK_EXTENSION;
static const unsigned long CKVM_GET_VCPU_MMAP_SIZE = KVM_GET_VCPU_MMAP_SIZE;
static const unsigned long CKVM_CREATE_VCPU = KVM_CREATE_VCPU;
static const unsigned long CKVM_RUN = KVM_RUN;
static const unsigned long CKVM_GET_REGS = KVM_GET_REGS;
static const unsigned long CKVM_SET_REGS = KVM_SET_REGS;
static const unsigned long CKVM_GET_SREGS = KVM_GET_SREGS;
static const unsigned long CKVM_SET_SREGS = KVM_SET_SREGS;
static const unsigned long CKVM_GET_FPU = KVM_GET_FPU;
static const unsigned long CKVM_SET_FPU = KVM_SET_FPU;
static const unsigned long CKVM_ENABLE_CAP = KVM_ENABLE_CAP;                 /* 0x4068AEA3 */

/* The whole x86 vcpu and VM state (docs/vmstate.md): present in the 6.1 headers. */
static const unsigned long CKVM_GET_SUPPORTED_CPUID = KVM_GET_SUPPORTED_CPUID;
static const unsigned long CKVM_GET_MSR_INDEX_LIST = KVM_GET_MSR_INDEX_LIST;
static const unsigned long CKVM_SET_CPUID2 = KVM_SET_CPUID2;
static const unsigned long CKVM_GET_CPUID2 = KVM_GET_CPUID2;
static const unsigned long CKVM_GET_SREGS2 = KVM_GET_SREGS2;
static const unsigned long CKVM_SET_SREGS2 = KVM_SET_SREGS2;
static const unsigned long CKVM_GET_XSAVE2 = KVM_GET_XSAVE2;
static const unsigned long CKVM_SET_XSAVE = KVM_SET_XSAVE;
static const unsigned long CKVM_GET_XCRS = KVM_GET_XCRS;
static const unsigned long CKVM_SET_XCRS = KVM_SET_XCRS;
static const unsigned long CKVM_GET_MSRS = KVM_GET_MSRS;
static const unsigned long CKVM_SET_MSRS = KVM_SET_MSRS;
static const unsigned long CKVM_GET_MP_STATE = KVM_GET_MP_STATE;
static const unsigned long CKVM_SET_MP_STATE = KVM_SET_MP_STATE;
static const unsigned long CKVM_GET_LAPIC = KVM_GET_LAPIC;
static const unsigned long CKVM_SET_LAPIC = KVM_SET_LAPIC;
static const unsigned long CKVM_GET_VCPU_EVENTS = KVM_GET_VCPU_EVENTS;
static const unsigned long CKVM_SET_VCPU_EVENTS = KVM_SET_VCPU_EVENTS;
static const unsigned long CKVM_GET_DEBUGREGS = KVM_GET_DEBUGREGS;
static const unsigned long CKVM_SET_DEBUGREGS = KVM_SET_DEBUGREGS;
static const unsigned long CKVM_GET_TSC_KHZ = KVM_GET_TSC_KHZ;
static const unsigned long CKVM_SET_TSC_KHZ = KVM_SET_TSC_KHZ;
static const unsigned long CKVM_GET_NESTED_STATE = KVM_GET_NESTED_STATE;
static const unsigned long CKVM_SET_NESTED_STATE = KVM_SET_NESTED_STATE;
static const unsigned long CKVM_HAS_DEVICE_ATTR = KVM_HAS_DEVICE_ATTR;
static const unsigned long CKVM_GET_DEVICE_ATTR = KVM_GET_DEVICE_ATTR;
static const unsigned long CKVM_SET_DEVICE_ATTR = KVM_SET_DEVICE_ATTR;
static const unsigned long CKVM_CREATE_IRQCHIP = KVM_CREATE_IRQCHIP;
static const unsigned long CKVM_CREATE_PIT2 = KVM_CREATE_PIT2;
static const unsigned long CKVM_GET_IRQCHIP = KVM_GET_IRQCHIP;
static const unsigned long CKVM_SET_IRQCHIP = KVM_SET_IRQCHIP;
static const unsigned long CKVM_GET_PIT2 = KVM_GET_PIT2;
static const unsigned long CKVM_SET_PIT2 = KVM_SET_PIT2;
static const unsigned long CKVM_GET_CLOCK = KVM_GET_CLOCK;
static const unsigned long CKVM_SET_CLOCK = KVM_SET_CLOCK;
static const uint32_t CKVM_VCPU_TSC_CTRL = KVM_VCPU_TSC_CTRL;
static const uint64_t CKVM_VCPU_TSC_OFFSET = KVM_VCPU_TSC_OFFSET;
static const uint32_t CKVM_MP_STATE_RUNNABLE = KVM_MP_STATE_RUNNABLE;
static const uint32_t CKVM_IRQCHIP_PIC_MASTER = KVM_IRQCHIP_PIC_MASTER;
static const uint32_t CKVM_IRQCHIP_PIC_SLAVE = KVM_IRQCHIP_PIC_SLAVE;
static const uint32_t CKVM_IRQCHIP_IOAPIC = KVM_IRQCHIP_IOAPIC;
static const unsigned long CKVM_SIZEOF_SREGS2 = sizeof(struct kvm_sregs2);
static const unsigned long CKVM_SIZEOF_XCRS = sizeof(struct kvm_xcrs);
static const unsigned long CKVM_SIZEOF_LAPIC = sizeof(struct kvm_lapic_state);
static const unsigned long CKVM_SIZEOF_VCPU_EVENTS = sizeof(struct kvm_vcpu_events);
static const unsigned long CKVM_SIZEOF_DEBUGREGS = sizeof(struct kvm_debugregs);
static const unsigned long CKVM_SIZEOF_IRQCHIP = sizeof(struct kvm_irqchip);
static const unsigned long CKVM_SIZEOF_PIT_STATE2 = sizeof(struct kvm_pit_state2);
static const unsigned long CKVM_SIZEOF_CLOCK_DATA = sizeof(struct kvm_clock_data);
static const unsigned long CKVM_SIZEOF_CPUID_ENTRY2 = sizeof(struct kvm_cpuid_entry2);
static const unsigned long CKVM_SIZEOF_MSR_ENTRY = sizeof(struct kvm_msr_entry);
static const unsigned long CKVM_SIZEOF_REGS = sizeof(struct kvm_regs);
static const unsigned long CKVM_SIZEOF_SREGS = sizeof(struct kvm_sregs);
static const unsigned long CKVM_SIZEOF_FPU = sizeof(struct kvm_fpu);
static const uint32_t CKVM_CLOCK_TSC_STABLE = KVM_CLOCK_TSC_STABLE;
static const uint32_t CKVM_CLOCK_REALTIME = KVM_CLOCK_REALTIME;
static const uint32_t CKVM_CLOCK_HOST_TSC = KVM_CLOCK_HOST_TSC;
static const unsigned long CKVM_MEMORY_ENCRYPT_OP = _IOWR(KVMIO, 0xba, unsigned long);
static const unsigned long CKVM_SET_USER_MEMORY_REGION2 =
    _IOW(KVMIO, 0x49, struct ckvm_userspace_memory_region2);                 /* 0x40A0AE49 */
static const unsigned long CKVM_CREATE_GUEST_MEMFD =
    _IOWR(KVMIO, 0xd4, struct ckvm_create_guest_memfd);                      /* 0xC040AED4 */
static const unsigned long CKVM_PRE_FAULT_MEMORY =
    _IOWR(KVMIO, 0xd5, struct ckvm_pre_fault_memory);                        /* 0xC040AED5 */
/* RFC v2 number; v1 used 0xd5, which became KVM_PRE_FAULT_MEMORY. */
static const unsigned long CKVM_LINK_GUEST_MEMFD =
    _IOWR(KVMIO, 0xd6, struct ckvm_link_guest_memfd);                        /* 0xC040AED6 */

/* ---- flags ------------------------------------------------------------------------------ */

static const uint32_t CKVM_MEM_LOG_DIRTY_PAGES = 1u << 0;
static const uint32_t CKVM_MEM_READONLY = 1u << 1;
static const uint32_t CKVM_MEM_GUEST_MEMFD = 1u << 2;
static const uint64_t CKVM_GUEST_MEMFD_FLAG_MMAP = 1ull << 0;
static const uint64_t CKVM_GUEST_MEMFD_FLAG_INIT_SHARED = 1ull << 1;

/* ---- capabilities ----------------------------------------------------------------------- */

static const long CKVM_CAP_IRQCHIP = 0;
static const long CKVM_CAP_EXT_CPUID = 7;
static const long CKVM_CAP_MP_STATE = 14;
static const long CKVM_CAP_PIT2 = 33;
static const long CKVM_CAP_ADJUST_CLOCK = 39;
static const long CKVM_CAP_VCPU_EVENTS = 41;
static const long CKVM_CAP_DEBUGREGS = 50;
static const long CKVM_CAP_XCRS = 56;
static const long CKVM_CAP_TSC_CONTROL = 60;
static const long CKVM_CAP_GET_TSC_KHZ = 61;
static const long CKVM_CAP_VCPU_ATTRIBUTES = 127;
static const long CKVM_CAP_NESTED_STATE = 157;
static const long CKVM_CAP_SREGS2 = 200;
static const long CKVM_CAP_XSAVE2 = 208;
static const long CKVM_CAP_NR_VCPUS = 9;
static const long CKVM_CAP_NR_MEMSLOTS = 10;
static const long CKVM_CAP_MAX_VCPUS = 66;
static const long CKVM_CAP_MULTI_ADDRESS_SPACE = 118;
static const long CKVM_CAP_MAX_VCPU_ID = 128;
static const long CKVM_CAP_IMMEDIATE_EXIT = 136;
static const long CKVM_CAP_SYNC_REGS = 74;
static const long CKVM_CAP_VM_COPY_ENC_CONTEXT_FROM = 197;
static const long CKVM_CAP_VM_MOVE_ENC_CONTEXT_FROM = 206;
static const long CKVM_CAP_USER_MEMORY2 = 231;
static const long CKVM_CAP_MEMORY_FAULT_INFO = 232;
static const long CKVM_CAP_MEMORY_ATTRIBUTES = 233;
static const long CKVM_CAP_GUEST_MEMFD = 234;
static const long CKVM_CAP_VM_TYPES = 235;
static const long CKVM_CAP_PRE_FAULT_MEMORY = 236;
static const long CKVM_CAP_GUEST_MEMFD_FLAGS = 244;

/* ---- x86 VM types (arch/x86/include/uapi/asm/kvm.h) ------------------------------------- */

static const unsigned long CKVM_X86_DEFAULT_VM = 0;
static const unsigned long CKVM_X86_SW_PROTECTED_VM = 1;
static const unsigned long CKVM_X86_SEV_VM = 2;
static const unsigned long CKVM_X86_SEV_ES_VM = 3;
static const unsigned long CKVM_X86_SNP_VM = 4;
static const unsigned long CKVM_X86_TDX_VM = 5;

/* SEV command used to ask whether a VM has an encryption context to launch. */
static const uint32_t CKVM_SEV_INIT2 = 22;

/* ---- exit reasons newer than the 6.1 headers -------------------------------------------- */

static const uint32_t CKVM_EXIT_MEMORY_FAULT = 39;

/* ---- wrappers (ioctl is variadic: Swift does not import it) ------------------------------ */

static inline int ckvm_ioctl_ulong(int fd, unsigned long request, unsigned long arg) {
    return ioctl(fd, request, arg);
}

static inline int ckvm_ioctl_ptr(int fd, unsigned long request, void *arg) {
    return ioctl(fd, request, arg);
}

/* Defined in ckvm.c (built with _GNU_SOURCE). */

/** One KVM_RUN on vcpu `fd` (its kvm_run mapped at `run`) that runs no guest instruction
 *  (immediate_exit), for the registers it moves through the kvm_run's sync area
 *  (KVM_CAP_SYNC_REGS): with `set`, KVM takes `regs` and `sregs` from it before the exit (as
 *  KVM_SET_REGS and KVM_SET_SREGS would), and on the way out it stores the regs, the sregs and,
 *  where `events` is given, the vcpu events, which are copied into `regs`, `sregs`, `events`.
 *  `v2`: `sregs` is a struct kvm_sregs2, moved as the struct kvm_sregs it begins with (flags 0,
 *  no PDPTRs: a vcpu not in PAE paging). The kvm_run's immediate_exit is put back and the sync
 *  fields cleared. Returns 0; 1 where KVM left the registers unset (a vcpu in
 *  KVM_MP_STATE_UNINITIALIZED exits before it syncs); 2 where the sregs read are of a vcpu in
 *  PAE paging (KVM_GET_SREGS2 has its PDPTRs); 3 where `v2` sregs to set carry flags; or
 *  -errno. */
int ckvm_sync_run(int fd, void *run, int set, int v2, void *regs, void *sregs, void *events);

/** The running kernel's version as major * 1000 + minor (uname's release), or -1. */
int ckvm_kernel_version(void);

/** fallocate(2), which Swift's Glibc module does not export. Returns -1 and sets errno. */
int ckvm_fallocate(int fd, int mode, int64_t offset, int64_t length);

/** FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE. */
int ckvm_punch_hole_mode(void);

/**
 * Forks a child that issues one ioctl on an inherited descriptor and exits with its errno
 * (0 on success). Only async-signal-safe calls run in the child, so this is safe from a
 * multi-threaded Swift process. Returns the child's errno, or -errno if fork/wait failed.
 * This is how the tests show that KVM answers EIO to a VM ioctl from another process.
 */
int ckvm_ioctl_in_child(int fd, unsigned long request, void *arg, int by_value, unsigned long value);

/** Same, for fallocate(PUNCH_HOLE|KEEP_SIZE) on an inherited descriptor. */
int ckvm_punch_hole_in_child(int fd, int64_t offset, int64_t length);

/** Copies out of / into a mapping of guest memory through process_vm_writev/readv on this
 *  process, so that a page the kernel refuses to fault in (a guest_memfd without INIT_SHARED
 *  raises SIGBUS on a plain access) answers EFAULT instead of killing the process.
 *  Return the number of bytes copied, or -1 with errno set. */
long ckvm_checked_read(void *buffer, const void *mapped, unsigned long length);
long ckvm_checked_write(void *mapped, const void *buffer, unsigned long length);

/* The copy strategy, in two halves (guest_memfd answers ESPIPE to SEEK_DATA, so mincore(2) on a
 *  read-only mapping of the source file finds the pages its page cache holds; holes are neither
 *  read nor written, so a sparse guest stays sparse on both sides; `threads` threads share the
 *  resident runs, cut into 4 MiB chunks).
 *  ckvm_copy_prepare, before the pause: maps the source read-only (*source, `length` bytes, to be
 *  munmapped by the caller) and faults in the page tables of its resident pages and of the same
 *  pages of `target` (MADV_POPULATE_READ/WRITE), so that the copy in the blackout faults nothing
 *  it need not. ckvm_copy_mapped, once the source is paused: copies the pages resident now from
 *  `source` (such a mapping) into `target`, with process_vm_writev (EFAULT, never SIGBUS).
 *  Both return 0 (and the bytes resident or copied), or -1 with errno set. */
int ckvm_copy_prepare(int source_fd, void *target, unsigned long length, int threads, void **source, unsigned long *resident);
int ckvm_copy_mapped(const void *source, void *target, unsigned long length, int threads, unsigned long *copied);

/* pidfd_open(2): a descriptor that polls readable once the process has exited. -1 and errno on failure. */
int ckvm_pidfd_open(int pid);
/* Waits until one of `fds` polls readable, at most `milliseconds` (-1: no bound). Returns the
 *  index of a readable descriptor, -1 on a timeout, -2 with errno on failure. */
int ckvm_poll_any(const int *fds, int count, int milliseconds);
#endif

/* ---- UNIX sockets, SCM_RIGHTS, peer credentials, vcpu kicks (ckvm.c, _GNU_SOURCE) ------ */

/** Frees path for a listening socket: 0 if nothing is there or a stale socket (connect
 *  refused) was removed; -1 with EADDRINUSE for a live socket, EEXIST for anything that is not a
 *  socket (neither is touched). */
int ckvm_clear_stale_socket(const char *path);
/** A listening SOCK_STREAM UNIX socket at path (a stale socket there is replaced; a live one or a
 *  non-socket is refused, see ckvm_clear_stale_socket), CLOEXEC. -1/errno on failure. */
int ckvm_listen_unix(const char *path, int backlog);
/** accept4(CLOEXEC), retrying EINTR. */
int ckvm_accept(int listener);
/** A connected SOCK_STREAM UNIX socket to path, CLOEXEC. */
int ckvm_connect_unix(const char *path);
/** Send and receive timeouts (SO_SNDTIMEO/SO_RCVTIMEO), in milliseconds; 0 = none. */
int ckvm_set_timeouts(int fd, long milliseconds);
/** SO_PEERCRED of a connected UNIX socket. */
int ckvm_peer_credentials(int fd, int *pid, unsigned *uid, unsigned *gid);
/** Checks that fd is a listening SOCK_STREAM AF_UNIX socket bound to a path (what a systemd
 *  socket unit's ListenStream=/path hands over), copies the path (NUL-terminated) and sets
 *  FD_CLOEXEC. Returns 0, or -1 with errno: EBADF (no such descriptor), ENOTSOCK (not a socket),
 *  ESOCKTNOSUPPORT (not SOCK_STREAM), EINVAL (not listening), EAFNOSUPPORT (not AF_UNIX),
 *  EDESTADDRREQ (unnamed or abstract), ENAMETOOLONG (path does not fit in length). */
int ckvm_listening_unix_path(int fd, char *path, unsigned long length);
/** sendmsg of the whole buffer with nfds descriptors attached (SCM_RIGHTS) to its first byte;
 *  retries EINTR and short writes. Returns 0, or -1/errno. */
int ckvm_send_with_fds(int fd, const void *buffer, unsigned long length, const int *fds, int nfds);
/** recvmsg of up to length bytes; descriptors received (CLOEXEC) go to fds (at most maxfds;
 *  any beyond are closed and *truncated set). Returns bytes read (0 at end of stream) or -1/errno. */
long ckvm_recv_with_fds(int fd, void *buffer, unsigned long length, int *fds, int maxfds, int *nfds, int *truncated);
/** readlink("/proc/self/fd/N"): what a descriptor is (anon_inode:kvm-vm, anon_inode:[kvm-gmem], ...). */
long ckvm_fd_description(int fd, char *buffer, unsigned long length);
/** Installs an empty handler for signo without SA_RESTART, so that a blocked KVM_RUN returns EINTR. */
int ckvm_install_kick_handler(int signo);
/** The calling thread's id, and a signal sent to a thread. */
unsigned long ckvm_thread_self(void);
/* Unblocks `signo` in the calling thread: a process inherits its blocked mask from whoever
   spawned it, and a kick that stays blocked never interrupts KVM_RUN. */
int ckvm_unblock_signal(int signo);
/** CRC-32C over `length` bytes, continuing `crc` (reflected; no pre- or post-inversion: the
 *  caller inverts): SSE4.2 where the CPU has it, a table otherwise. */
uint32_t ckvm_crc32c(uint32_t crc, const void *data, unsigned long length);
/** Room for SO_PEERGROUPS: a peer's supplementary groups (the kernel returns them sorted;
 *  getsockopt through SwiftNIO zero-fills the rest). */
typedef struct ckvm_peer_groups { unsigned int gids[1024]; } ckvm_peer_groups;
/** For a process started by another that may have blocked or ignored signals (a test runner,
 *  a daemon): every ignored signal back to its default, and no signal blocked. */
int ckvm_reset_signals(void);
/** The calling thread's mask emptied; the old one saved in `saved` (ckvm_sigset_size bytes). */
int ckvm_clear_signal_mask(void *saved);
/** The calling thread's mask set from `mask` (saved by ckvm_clear_signal_mask). */
int ckvm_set_signal_mask(const void *mask);
unsigned long ckvm_sigset_size(void);
int ckvm_kick_thread(unsigned long thread, int signo);
/** Names the calling thread for the kernel (comm: at most 15 bytes kept). Returns 0, or an errno. */
int ckvm_name_thread(const char *name);
/** The CPU the calling thread runs on now (sched_getcpu), or -1. */
int ckvm_current_cpu(void);
/** Lets `thread` run on the CPUs of `base` (a mask ckvm_cpu_mask saved) but `cpu` (on all of
 *  them where `cpu` is the only one). Returns 0, or an errno. */
int ckvm_keep_thread_off_cpu(unsigned long thread, int cpu, const void *base);
/** The calling thread's CPU mask, into `saved` (ckvm_cpu_mask_size bytes). 0, or an errno. */
int ckvm_cpu_mask(void *saved);
/** The CPU `n` modulo their count among those the calling thread may run on, or -1 where it
 *  may run on one CPU only. */
int ckvm_nth_cpu(int n);
/** The last CPU the calling thread may run on, or -1 where it may run on one CPU only. */
int ckvm_last_cpu(void);
/** Confines the calling thread to `cpu` (`only` nonzero) or to every CPU it may use but `cpu`,
 *  saving its mask in `saved` (ckvm_cpu_mask_size bytes) for ckvm_set_cpu_mask. 0, or an errno. */
int ckvm_place_self(int cpu, int only, void *saved);
int ckvm_set_cpu_mask(const void *mask);
unsigned long ckvm_cpu_mask_size(void);

/** Opens one queue of tap device `name` (/dev/net/tun, TUNSETIFF with IFF_TAP|IFF_NO_PI, and
 *  IFF_MULTI_QUEUE when multi_queue), CLOEXEC. Returns the fd, or -1/errno. */
int ckvm_open_tap_queue(const char *name, int multi_queue);
