// The only file of the Kernel module that calls libc or issues ioctls (style lesson 1).
// Each wrapper keeps the C shape and returns the raw result; errno is read by the caller
// right after. EINTR is retried here for calls the kernel can restart; KVM_RUN is not
// retried, because there EINTR is an answer (a signal or immediate_exit stopped the vcpu).

import CKVM

#if canImport(Glibc)
import Glibc
#endif

enum Syscalls {
    static func open(_ path: String, _ flags: Int32) -> Int32 {
        while true {
            let fd = Glibc.open(path, flags)
            if fd >= 0 || errno != EINTR { return fd }
        }
    }

    static func close(_ fd: Int32) {
        // close(2): never retry on EINTR on Linux, the descriptor is gone either way.
        _ = Glibc.close(fd)
    }

    static func ioctl(_ fd: Int32, _ request: UInt, _ argument: UnsafeMutableRawPointer?) -> Int32 {
        while true {
            let result = ckvm_ioctl_ptr(fd, request, argument)
            if result >= 0 || errno != EINTR { return result }
        }
    }

    static func ioctl(_ fd: Int32, _ request: UInt, value: UInt) -> Int32 {
        while true {
            let result = ckvm_ioctl_ulong(fd, request, value)
            if result >= 0 || errno != EINTR { return result }
        }
    }

    /// KVM_RUN: EINTR is returned, not retried.
    static func run(_ fd: Int32) -> Int32 {
        ckvm_ioctl_ulong(fd, CKVM_RUN, 0)
    }

    static func mmap(_ fd: Int32, length: Int, offset: UInt64) -> UnsafeMutableRawPointer? {
        let pointer = Glibc.mmap(nil, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, off_t(Int64(bitPattern: offset)))
        if pointer == UnsafeMutableRawPointer(bitPattern: -1) { return nil }
        return pointer
    }

    static func munmap(_ address: UInt64, length: Int) {
        if let pointer = UnsafeMutableRawPointer(bitPattern: UInt(address)) {
            _ = Glibc.munmap(pointer, length)
        }
    }

    static func punchHole(_ fd: Int32, offset: UInt64, length: UInt64) -> Int32 {
        while true {
            let result = ckvm_fallocate(
                fd, ckvm_punch_hole_mode(), Int64(bitPattern: offset), Int64(bitPattern: length))
            if result >= 0 || errno != EINTR { return result }
        }
    }

    static func fstat(_ fd: Int32) -> stat? {
        var buffer = stat()
        return Glibc.fstat(fd, &buffer) == 0 ? buffer : nil
    }

    static func checkedRead(address: UInt64, into buffer: UnsafeMutableRawBufferPointer) -> Int {
        ckvm_checked_read(buffer.baseAddress, UnsafeRawPointer(bitPattern: UInt(address)), UInt(buffer.count))
    }

    static func checkedWrite(address: UInt64, from buffer: UnsafeRawBufferPointer) -> Int {
        ckvm_checked_write(UnsafeMutableRawPointer(bitPattern: UInt(address)), buffer.baseAddress, UInt(buffer.count))
    }

    static func copyPrepare(
        _ fd: Int32, _ target: UnsafeMutableRawPointer, length: UInt, threads: Int32, source: inout UnsafeMutableRawPointer?, populated: inout UInt
    ) -> Int32 {
        ckvm_copy_prepare(fd, target, length, threads, &source, &populated)
    }

    static func copyMapped(_ source: UnsafeRawPointer, _ target: UnsafeMutableRawPointer, length: UInt, threads: Int32, copied: inout UInt) -> Int32 {
        ckvm_copy_mapped(source, target, length, threads, &copied)
    }

    static func ioctlInChild(_ fd: Int32, _ request: UInt, _ argument: UnsafeMutableRawPointer?) -> Int32 {
        ckvm_ioctl_in_child(fd, request, argument, 0, 0)
    }

    static func ioctlInChild(_ fd: Int32, _ request: UInt, value: UInt) -> Int32 {
        ckvm_ioctl_in_child(fd, request, nil, 1, value)
    }

    static func punchHoleInChild(_ fd: Int32, offset: UInt64, length: UInt64) -> Int32 {
        ckvm_punch_hole_in_child(fd, Int64(bitPattern: offset), Int64(bitPattern: length))
    }
}
