#define _GNU_SOURCE
#include "ckvm.h"

#include <errno.h>
#include <sched.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

int ckvm_fallocate(int fd, int mode, int64_t offset, int64_t length) {
    return fallocate(fd, mode, (off_t)offset, (off_t)length);
}

int ckvm_punch_hole_mode(void) {
    return FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
}

static int wait_child(pid_t pid) {
    int status = 0;
    for (;;) {
        if (waitpid(pid, &status, 0) >= 0) break;
        if (errno != EINTR) return -errno;
    }
    if (!WIFEXITED(status)) return -ECHILD;
    return WEXITSTATUS(status);
}

int ckvm_ioctl_in_child(int fd, unsigned long request, void *arg, int by_value, unsigned long value) {
    pid_t pid = fork();
    if (pid < 0) return -errno;
    if (pid == 0) {
        int r = by_value ? ioctl(fd, request, value) : ioctl(fd, request, arg);
        _exit(r < 0 ? (errno & 0xff) : 0);
    }
    return wait_child(pid);
}

int ckvm_punch_hole_in_child(int fd, int64_t offset, int64_t length) {
    pid_t pid = fork();
    if (pid < 0) return -errno;
    if (pid == 0) {
        int r = fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length);
        _exit(r < 0 ? (errno & 0xff) : 0);
    }
    return wait_child(pid);
}

/* The guest-memory side is always the *local* iovec: the kernel reaches it with
 * copy_{to,from}_user, whose fault answers EFAULT, and only the plain buffer goes through
 * get_user_pages (which a guest_memfd mapping need not support). */
long ckvm_checked_read(void *buffer, const void *mapped, unsigned long length) {
    struct iovec local = { .iov_base = (void *)mapped, .iov_len = length };
    struct iovec remote = { .iov_base = buffer, .iov_len = length };
    return process_vm_writev(getpid(), &local, 1, &remote, 1, 0);
}

long ckvm_checked_write(void *mapped, const void *buffer, unsigned long length) {
    struct iovec local = { .iov_base = mapped, .iov_len = length };
    struct iovec remote = { .iov_base = (void *)buffer, .iov_len = length };
    return process_vm_readv(getpid(), &local, 1, &remote, 1, 0);
}

#include <pthread.h>
#include <signal.h>
#include <stdlib.h>

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

struct copy_run { unsigned long offset, length; };
enum copy_operation { copy_populate, copy_bytes };
struct copy_work {
    const char *source;
    char *target;
    const struct copy_run *runs;
    unsigned long count;
    enum copy_operation operation;
    unsigned long next;          /* the next run to take, under `lock` */
    pthread_mutex_t lock;
    int error;
};

static int copy_run(const struct copy_work *work, const struct copy_run *run) {
    if (work->operation == copy_populate) {
        /* Page tables on both sides, before the pause: the copy in the blackout faults nothing. */
        if (madvise((void *)(work->source + run->offset), run->length, MADV_POPULATE_READ) != 0) return errno;
        if (madvise(work->target + run->offset, run->length, MADV_POPULATE_WRITE) != 0) return errno;
        return 0;
    }
    unsigned long done = 0;
    while (done < run->length) {
        struct iovec local = { .iov_base = (void *)(work->source + run->offset + done), .iov_len = run->length - done };
        struct iovec remote = { .iov_base = work->target + run->offset + done, .iov_len = run->length - done };
        ssize_t n = process_vm_writev(getpid(), &local, 1, &remote, 1, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return n < 0 ? errno : EFAULT;
        done += (unsigned long)n;
    }
    return 0;
}

static void *copy_worker(void *argument) {
    struct copy_work *work = argument;
    for (;;) {
        pthread_mutex_lock(&work->lock);
        unsigned long index = work->next++;
        int failed = work->error;
        pthread_mutex_unlock(&work->lock);
        if (index >= work->count || failed) return NULL;
        int error = copy_run(work, &work->runs[index]);
        if (error) {
            pthread_mutex_lock(&work->lock);
            work->error = error;
            pthread_mutex_unlock(&work->lock);
            return NULL;
        }
    }
}

/* The resident runs of `source` (mincore), cut into 4 MiB chunks so that threads share the
 * work evenly, done by `threads` threads. */
static int copy_each_resident_run(const char *source, char *target, unsigned long length, int threads, enum copy_operation operation,
                                  unsigned long *bytes) {
    const unsigned long page = 4096, chunk = 4ul << 20;
    *bytes = 0;
    unsigned long pages = length / page;
    unsigned char *resident = malloc(pages);
    struct copy_run *runs = malloc(sizeof *runs * (pages / (chunk / page) + pages / 2 + 2));
    if (!resident || !runs) { free(resident); free(runs); errno = ENOMEM; return -1; }
    if (mincore((void *)source, length, resident) != 0) {
        int saved = errno;
        free(resident); free(runs);
        errno = saved;
        return -1;
    }
    unsigned long count = 0, total = 0;
    for (unsigned long i = 0; i < pages;) {
        if (!(resident[i] & 1)) { i++; continue; }
        unsigned long start = i;
        while (i < pages && (resident[i] & 1) && (i - start) * page < chunk) i++;
        runs[count].offset = start * page;
        runs[count].length = (i - start) * page;
        total += runs[count].length;
        count++;
    }
    struct copy_work work = { .source = source, .target = target, .runs = runs, .count = count, .operation = operation, .next = 0, .error = 0 };
    pthread_mutex_init(&work.lock, NULL);
    pthread_t workers[16];
    int started = 0;
    if (threads > 16) threads = 16;
    for (int t = 1; t < threads && (unsigned long)t < count; t++) {
        if (pthread_create(&workers[started], NULL, copy_worker, &work) == 0) started++;
    }
    copy_worker(&work);
    for (int t = 0; t < started; t++) pthread_join(workers[t], NULL);
    pthread_mutex_destroy(&work.lock);
    free(resident);
    free(runs);
    if (work.error) { errno = work.error; return -1; }
    *bytes = total;
    return 0;
}

int ckvm_copy_prepare(int source_fd, void *target, unsigned long length, int threads, void **source, unsigned long *resident) {
    *source = NULL;
    *resident = 0;
    if (length == 0 || length % 4096 != 0 || threads < 1) { errno = EINVAL; return -1; }
    char *mapped = mmap(NULL, length, PROT_READ, MAP_SHARED, source_fd, 0);
    if (mapped == MAP_FAILED) return -1;
    if (copy_each_resident_run(mapped, target, length, threads, copy_populate, resident) != 0) {
        int saved = errno;
        munmap(mapped, length);
        errno = saved;
        return -1;
    }
    *source = mapped;
    return 0;
}

int ckvm_copy_mapped(const void *source, void *target, unsigned long length, int threads, unsigned long *copied) {
    if (length == 0 || length % 4096 != 0 || threads < 1) { errno = EINVAL; return -1; }
    return copy_each_resident_run(source, target, length, threads, copy_bytes, copied);
}
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <stddef.h>
#include <sys/stat.h>

static int unix_address(const char *path, struct sockaddr_un *address) {
    memset(address, 0, sizeof *address);
    address->sun_family = AF_UNIX;
    if (strlen(path) >= sizeof address->sun_path) { errno = ENAMETOOLONG; return -1; }
    strcpy(address->sun_path, path);
    return 0;
}

/* Makes `path` free for a listening socket without taking it from anyone: nothing there, or
 * a stale socket (connect refused: its listener is gone), which is removed. A live socket
 * answers EADDRINUSE; anything that is not a socket (a file, a directory, a symbolic link)
 * EEXIST: neither is touched. */
int ckvm_clear_stale_socket(const char *path) {
    struct stat status;
    if (lstat(path, &status) < 0) return errno == ENOENT ? 0 : -1;
    if (!S_ISSOCK(status.st_mode)) { errno = EEXIST; return -1; }
    struct sockaddr_un address;
    if (unix_address(path, &address) < 0) return -1;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    int connected;
    do { connected = connect(fd, (struct sockaddr *)&address, sizeof address); } while (connected < 0 && errno == EINTR);
    int saved = errno;
    close(fd);
    if (connected == 0) { errno = EADDRINUSE; return -1; }
    if (saved != ECONNREFUSED) { errno = saved; return -1; }
    return unlink(path) < 0 && errno != ENOENT ? -1 : 0;
}

int ckvm_listen_unix(const char *path, int backlog) {
    struct sockaddr_un address;
    if (unix_address(path, &address) < 0) return -1;
    if (ckvm_clear_stale_socket(path) < 0) return -1;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    if (bind(fd, (struct sockaddr *)&address, sizeof address) < 0 || listen(fd, backlog) < 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

int ckvm_accept(int listener) {
    for (;;) {
        int fd = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
        if (fd >= 0 || errno != EINTR) return fd;
    }
}

int ckvm_connect_unix(const char *path) {
    struct sockaddr_un address;
    if (unix_address(path, &address) < 0) return -1;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    for (;;) {
        if (connect(fd, (struct sockaddr *)&address, sizeof address) == 0) return fd;
        if (errno != EINTR) break;
    }
    int saved = errno;
    close(fd);
    errno = saved;
    return -1;
}

int ckvm_set_timeouts(int fd, long milliseconds) {
    struct timeval tv = { .tv_sec = milliseconds / 1000, .tv_usec = (milliseconds % 1000) * 1000 };
    if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) < 0) return -1;
    return setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

int ckvm_peer_credentials(int fd, int *pid, unsigned *uid, unsigned *gid) {
    struct ucred credentials;
    socklen_t length = sizeof credentials;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &credentials, &length) < 0) return -1;
    *pid = credentials.pid;
    *uid = credentials.uid;
    *gid = credentials.gid;
    return 0;
}

int ckvm_listening_unix_path(int fd, char *path, unsigned long length) {
    struct stat status;
    if (fstat(fd, &status) < 0) return -1;
    if (!S_ISSOCK(status.st_mode)) { errno = ENOTSOCK; return -1; }
    int value = 0;
    socklen_t size = sizeof value;
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &value, &size) < 0) return -1;
    if (value != SOCK_STREAM) { errno = ESOCKTNOSUPPORT; return -1; }
    size = sizeof value;
    if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &value, &size) < 0) return -1;
    if (!value) { errno = EINVAL; return -1; }
    struct sockaddr_un address;
    socklen_t addressLength = sizeof address;
    memset(&address, 0, sizeof address);
    if (getsockname(fd, (struct sockaddr *)&address, &addressLength) < 0) return -1;
    if (address.sun_family != AF_UNIX) { errno = EAFNOSUPPORT; return -1; }
    if (addressLength <= offsetof(struct sockaddr_un, sun_path) || address.sun_path[0] == '\0') { errno = EDESTADDRREQ; return -1; }
    size_t pathLength = strnlen(address.sun_path, addressLength - offsetof(struct sockaddr_un, sun_path));
    if (pathLength + 1 > length) { errno = ENAMETOOLONG; return -1; }
    memcpy(path, address.sun_path, pathLength);
    path[pathLength] = '\0';
    int flags = fcntl(fd, F_GETFD);
    if (flags < 0 || fcntl(fd, F_SETFD, flags | FD_CLOEXEC) < 0) return -1;
    return 0;
}

int ckvm_send_with_fds(int fd, const void *buffer, unsigned long length, const int *fds, int nfds) {
    const char *bytes = buffer;
    unsigned long sent = 0;
    int attach = nfds > 0;
    while (sent < length) {
        struct iovec iov = { .iov_base = (void *)(bytes + sent), .iov_len = length - sent };
        struct msghdr message = { .msg_iov = &iov, .msg_iovlen = 1 };
        char control[CMSG_SPACE(sizeof(int) * 32)];
        if (attach) {
            if (nfds > 32) { errno = EINVAL; return -1; }
            memset(control, 0, sizeof control);
            message.msg_control = control;
            message.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
            struct cmsghdr *header = CMSG_FIRSTHDR(&message);
            header->cmsg_level = SOL_SOCKET;
            header->cmsg_type = SCM_RIGHTS;
            header->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
            memcpy(CMSG_DATA(header), fds, sizeof(int) * nfds);
        }
        ssize_t result = sendmsg(fd, &message, MSG_NOSIGNAL);
        if (result < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        attach = 0;
        sent += (unsigned long)result;
    }
    return 0;
}

long ckvm_recv_with_fds(int fd, void *buffer, unsigned long length, int *fds, int maxfds, int *nfds, int *truncated) {
    char control[CMSG_SPACE(sizeof(int) * 32)];
    struct iovec iov = { .iov_base = buffer, .iov_len = length };
    struct msghdr message = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control };
    *nfds = 0;
    *truncated = 0;
    ssize_t result;
    for (;;) {
        result = recvmsg(fd, &message, MSG_CMSG_CLOEXEC);
        if (result >= 0 || errno != EINTR) break;
    }
    if (result < 0) return -1;
    if (message.msg_flags & MSG_CTRUNC) *truncated = 1;
    for (struct cmsghdr *header = CMSG_FIRSTHDR(&message); header; header = CMSG_NXTHDR(&message, header)) {
        if (header->cmsg_level != SOL_SOCKET || header->cmsg_type != SCM_RIGHTS) continue;
        int count = (int)((header->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        int *received = (int *)CMSG_DATA(header);
        for (int i = 0; i < count; i++) {
            if (*nfds < maxfds) fds[(*nfds)++] = received[i];
            else { close(received[i]); *truncated = 1; }
        }
    }
    return result;
}

long ckvm_fd_description(int fd, char *buffer, unsigned long length) {
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    ssize_t result = readlink(path, buffer, length - 1);
    if (result < 0) return -1;
    buffer[result] = 0;
    return result;
}

static void kick_handler(int signo) { (void)signo; }

int ckvm_install_kick_handler(int signo) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = kick_handler;
    sigemptyset(&action.sa_mask);
    action.sa_flags = 0; /* no SA_RESTART: KVM_RUN must return EINTR */
    return sigaction(signo, &action, NULL);
}

unsigned long ckvm_thread_self(void) { return (unsigned long)pthread_self(); }

int ckvm_unblock_signal(int signo) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, signo);
    return pthread_sigmask(SIG_UNBLOCK, &set, NULL);
}

int ckvm_reset_signals(void) {
    /* Dispositions first (an ignored SIGTERM survives exec), then the mask. Only the signals a
     * VMM must answer: SIGTERM and SIGINT stop it, SIGUSR1 kicks its vcpus. An ignored SIGHUP
     * (nohup) or SIGPIPE stays ignored. */
    const int answered[] = { SIGTERM, SIGINT, SIGUSR1 };
    for (unsigned i = 0; i < sizeof answered / sizeof answered[0]; i++) {
        struct sigaction current;
        if (sigaction(answered[i], NULL, &current) == 0 && current.sa_handler == SIG_IGN) signal(answered[i], SIG_DFL);
    }
    sigset_t none;
    sigemptyset(&none);
    return pthread_sigmask(SIG_SETMASK, &none, NULL);
}

int ckvm_set_signal_mask(const void *mask) { return pthread_sigmask(SIG_SETMASK, (const sigset_t *)mask, NULL); }

int ckvm_clear_signal_mask(void *saved) {
    sigset_t none;
    sigemptyset(&none);
    return pthread_sigmask(SIG_SETMASK, &none, (sigset_t *)saved);
}

unsigned long ckvm_sigset_size(void) { return sizeof(sigset_t); }

int ckvm_kick_thread(unsigned long thread, int signo) { return pthread_kill((pthread_t)thread, signo); }

int ckvm_current_cpu(void) { return sched_getcpu(); }

int ckvm_keep_thread_off_cpu(unsigned long thread, int cpu, const void *base) {
    cpu_set_t mask = *(const cpu_set_t *)base;
    if (cpu >= 0 && cpu < CPU_SETSIZE && CPU_ISSET(cpu, &mask) && CPU_COUNT(&mask) > 1) CPU_CLR(cpu, &mask);
    return pthread_setaffinity_np((pthread_t)thread, sizeof mask, &mask);
}

int ckvm_cpu_mask(void *saved) { return sched_getaffinity(0, sizeof(cpu_set_t), (cpu_set_t *)saved) == 0 ? 0 : errno; }

int ckvm_nth_cpu(int n) {
    cpu_set_t mask;
    if (n < 0 || sched_getaffinity(0, sizeof mask, &mask) != 0) return -1;
    int count = CPU_COUNT(&mask);
    if (count < 2) return -1;
    int wanted = n % count;
    for (int i = 0; i < CPU_SETSIZE; i++) if (CPU_ISSET(i, &mask) && wanted-- == 0) return i;
    return -1;
}

int ckvm_last_cpu(void) {
    cpu_set_t mask;
    if (sched_getaffinity(0, sizeof mask, &mask) != 0 || CPU_COUNT(&mask) < 2) return -1;
    for (int i = CPU_SETSIZE - 1; i >= 0; i--) if (CPU_ISSET(i, &mask)) return i;
    return -1;
}

int ckvm_place_self(int cpu, int only, void *saved) {
    cpu_set_t *old = saved, mask;
    if (sched_getaffinity(0, sizeof(cpu_set_t), old) != 0) return errno;
    if (cpu < 0 || cpu >= CPU_SETSIZE || !CPU_ISSET(cpu, old) || CPU_COUNT(old) < 2) return EINVAL;
    if (only) {
        CPU_ZERO(&mask);
        CPU_SET(cpu, &mask);
    } else {
        mask = *old;
        CPU_CLR(cpu, &mask);
    }
    return sched_setaffinity(0, sizeof mask, &mask) == 0 ? 0 : errno;
}

int ckvm_set_cpu_mask(const void *mask) { return sched_setaffinity(0, sizeof(cpu_set_t), (const cpu_set_t *)mask) == 0 ? 0 : errno; }

unsigned long ckvm_cpu_mask_size(void) { return sizeof(cpu_set_t); }

int ckvm_name_thread(const char *name) {
    char kept[16];
    snprintf(kept, sizeof kept, "%s", name);
    return pthread_setname_np(pthread_self(), kept);
}

#include <linux/if.h>
#include <linux/if_tun.h>

int ckvm_open_tap_queue(const char *name, int multi_queue) {
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
    if (fd < 0) return -1;
    struct ifreq request;
    memset(&request, 0, sizeof request);
    request.ifr_flags = IFF_TAP | IFF_NO_PI | (multi_queue ? IFF_MULTI_QUEUE : 0);
    strncpy(request.ifr_name, name, IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &request) < 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

#include <poll.h>
#include <sys/syscall.h>

int ckvm_pidfd_open(int pid) {
    return (int)syscall(SYS_pidfd_open, pid, 0);
}

int ckvm_poll_any(const int *fds, int count, int milliseconds) {
    struct pollfd polls[64];
    if (count < 0 || count > 64) { errno = EINVAL; return -2; }
    for (int i = 0; i < count; i++) { polls[i].fd = fds[i]; polls[i].events = POLLIN; polls[i].revents = 0; }
    for (;;) {
        int n = poll(polls, (nfds_t)count, milliseconds);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return -2;
        if (n == 0) return -1;
        for (int i = 0; i < count; i++) if (polls[i].revents) return i;
        return -1;
    }
}

/* CRC-32C (Castagnoli), reflected, without the pre- and post-inversion (the caller does
 * both): SSE4.2's crc32 instruction where the CPU has it, else a byte table. */
static uint32_t crc32c_table[256];
static pthread_once_t crc32c_table_once = PTHREAD_ONCE_INIT;

static void crc32c_build_table(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc32c_table[i] = c;
    }
}

static uint32_t crc32c_software(uint32_t crc, const unsigned char *p, unsigned long length) {
    pthread_once(&crc32c_table_once, crc32c_build_table);
    while (length--) crc = crc32c_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return crc;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2")))
static uint32_t crc32c_hardware(uint32_t crc, const unsigned char *p, unsigned long length) {
    uint64_t value = crc;
    while (length >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        value = __builtin_ia32_crc32di(value, word);
        p += 8;
        length -= 8;
    }
    uint32_t small = (uint32_t)value;
    while (length--) small = __builtin_ia32_crc32qi(small, *p++);
    return small;
}
#endif

uint32_t ckvm_crc32c(uint32_t crc, const void *data, unsigned long length) {
#if defined(__x86_64__)
    if (__builtin_cpu_supports("sse4.2")) return crc32c_hardware(crc, data, length);
#endif
    return crc32c_software(crc, data, length);
}

/* ---- registers through the kvm_run's sync area ------------------------------------------ */

int ckvm_sync_run(int fd, void *run, int set, int v2, void *regs, void *sregs, void *events) {
    struct kvm_run *r = run;
    /* struct kvm_sregs2 begins with struct kvm_sregs up to its interrupt_bitmap. */
    const size_t common = offsetof(struct kvm_sregs, interrupt_bitmap);
    if (set) {
        if (v2 && ((struct kvm_sregs2 *)sregs)->flags != 0) return 3;
        memcpy(&r->s.regs.regs, regs, sizeof(struct kvm_regs));
        if (v2) {
            memset(&r->s.regs.sregs, 0, sizeof(struct kvm_sregs));
            memcpy(&r->s.regs.sregs, sregs, common);
        } else {
            memcpy(&r->s.regs.sregs, sregs, sizeof(struct kvm_sregs));
        }
    }
    uint8_t immediate = r->immediate_exit;
    r->kvm_dirty_regs = set ? (KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS) : 0;
    r->kvm_valid_regs = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | (events ? KVM_SYNC_X86_EVENTS : 0);
    r->immediate_exit = 1;
    int result = ioctl(fd, KVM_RUN, 0);
    int error = errno;
    uint64_t left = r->kvm_dirty_regs;
    r->kvm_dirty_regs = 0;
    r->kvm_valid_regs = 0;
    r->immediate_exit = immediate;
    /* With immediate_exit KVM_RUN answers EINTR; anything else is a failure (EINVAL: the
       registers were refused). */
    if (result == 0) return -EIO;
    if (error != EINTR) return -error;
    if (left != 0) return 1;
    memcpy(regs, &r->s.regs.regs, sizeof(struct kvm_regs));
    if (events) memcpy(events, &r->s.regs.events, sizeof(struct kvm_vcpu_events));
    if (!v2) {
        memcpy(sregs, &r->s.regs.sregs, sizeof(struct kvm_sregs));
        return 0;
    }
    memset(sregs, 0, sizeof(struct kvm_sregs2));
    memcpy(sregs, &r->s.regs.sregs, common);
    const struct kvm_sregs *s = &r->s.regs.sregs;
    /* is_pae_paging(): CR0.PG and CR4.PAE outside long mode (EFER.LMA). */
    int pae_paging = (s->cr0 & (1ull << 31)) && (s->cr4 & (1ull << 5)) && !(s->efer & (1ull << 10));
    return pae_paging ? 2 : 0;
}

#include <sys/utsname.h>

int ckvm_kernel_version(void) {
    struct utsname name;
    unsigned major = 0, minor = 0;
    if (uname(&name) != 0 || sscanf(name.release, "%u.%u", &major, &minor) != 2 || major > 100000 || minor > 999) return -1;
    return (int)(major * 1000 + minor);
}
