#define _GNU_SOURCE
#include "ckvm.h"

#include <errno.h>
#include <fcntl.h>
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
