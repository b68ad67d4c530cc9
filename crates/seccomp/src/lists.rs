//! The allow-lists, in groups that say why each call is there.
//!
//! Built from `strace -f` runs of the end-to-end suite (boot, blk, net, vsock exec,
//! snapshot/restore, migration, display) with each thread's calls attributed to its kind by
//! the thread's name (scripts/seccomp-trace does it), not from guessing.
use crate::Kind;
use libc::*;

/// What every Rust thread needs: memory, locks, time, its own start and end, logging.
const THREAD: &[c_long] = &[
    // The allocator, the thread's stack and its signal stack.
    SYS_brk,
    SYS_mmap,
    SYS_munmap,
    SYS_mremap,
    SYS_mprotect,
    SYS_madvise,
    SYS_sigaltstack,
    // Locks, channels, sleeping.
    SYS_futex,
    SYS_sched_yield,
    SYS_nanosleep,
    SYS_clock_nanosleep,
    // A sleep a signal interrupted (a vCPU kick, a child's end) resumes through this.
    SYS_restart_syscall,
    SYS_clock_gettime,
    SYS_gettimeofday,
    // The inherited signal mask; a vCPU kick's handler returns through rt_sigreturn.
    SYS_rt_sigprocmask,
    SYS_rt_sigreturn,
    // Logging (stderr, the VM's log files), eventfd signalling, closing what it owned.
    SYS_write,
    SYS_writev,
    SYS_close,
    SYS_fcntl,
    // std asks these as a thread starts and for errors and logs.
    SYS_getpid,
    SYS_gettid,
    SYS_sched_getaffinity,
    SYS_getrandom,
    // The end of the thread, or of the process (also the SIGSYS report's way out).
    SYS_exit,
    SYS_exit_group,
];

/// Starting threads: glibc's clone3 and what the new thread runs before its own filter
/// (robust futex list, rseq, its name; installing its filter).
const SPAWN: &[c_long] = &[
    SYS_clone,
    SYS_clone3,
    SYS_set_robust_list,
    SYS_rseq,
    SYS_prctl,
    SYS_seccomp,
];

/// KVM_RUN and the vCPU ioctls (registers for pause and snapshot, interrupts).
const VCPU: &[c_long] = &[SYS_ioctl];

/// A vCPU whose MMIO exit hits a passthrough device's BAR or configuration space: the
/// access goes to the device's process over vfio-user (a Unix socket; MSI-X eventfds are
/// passed with SCM_RIGHTS), or to the VFIO device's file at an offset. Each request is
/// bounded (a receive timeout, shortened when less time is left) and a device that does
/// not answer in time has its link shut down.
const PASSTHROUGH: &[c_long] = &[
    SYS_read,
    SYS_setsockopt,
    SYS_shutdown,
    SYS_recvfrom,
    SYS_recvmsg,
    SYS_sendto,
    SYS_sendmsg,
    SYS_pread64,
    SYS_pwrite64,
    SYS_dup,
];

/// Waiting on several descriptors (eventfds, sockets, TAPs).
const WAIT: &[c_long] = &[
    SYS_epoll_create1,
    SYS_epoll_ctl,
    SYS_epoll_wait,
    SYS_epoll_pwait,
    SYS_poll,
    SYS_ppoll,
    SYS_eventfd2,
];

/// Moving bytes on descriptors already open.
const STREAM: &[c_long] = &[
    SYS_read,
    SYS_readv,
    SYS_recvfrom,
    SYS_recvmsg,
    SYS_sendto,
    SYS_sendmsg,
    SYS_shutdown,
];

/// Making and taking connections (the API's clients, the vsock host side, migration).
const CONNECT: &[c_long] = &[
    SYS_socket,
    SYS_connect,
    SYS_accept4,
    SYS_setsockopt,
    SYS_getsockopt,
    SYS_getsockname,
    SYS_getpeername,
];

/// Listening on a new socket (the API, VNC and migration listeners are made by the VMM
/// thread; a migration target's Unix socket is removed by the migration thread).
const LISTEN: &[c_long] = &[SYS_bind, SYS_listen, SYS_chmod, SYS_fchmod];

/// The TAP and KVM ioctls of a device's I/O thread (TAP offloads, irqfd-less paths).
const DEVICE_IOCTL: &[c_long] = &[SYS_ioctl];

/// A disk worker: positioned reads and writes, flushes, discards (fallocate).
const BLK: &[c_long] = &[
    SYS_pread64,
    SYS_pwrite64,
    SYS_preadv,
    SYS_pwritev,
    SYS_fsync,
    SYS_fdatasync,
    SYS_fallocate,
];

/// A disk's io_uring engine: setting the ring up (on its own thread, and once when the
/// disk is opened to check the host has it), submitting and waiting.
const URING: &[c_long] = &[
    SYS_io_uring_setup,
    SYS_io_uring_enter,
    SYS_io_uring_register,
];

/// A migration target writing the disks a source copies (`--copy-disks`): sizing the new
/// sparse file, writing blocks, punching holes for blocks of zeros; once every block is
/// in, flushing the file, renaming it to its final name without replacing anything
/// (`renameat2`) and flushing the directory (`fsync`).
const DISK_COPY: &[c_long] = &[
    SYS_pwrite64,
    SYS_ftruncate,
    SYS_fallocate,
    SYS_fdatasync,
    SYS_fsync,
    SYS_renameat2,
];

/// Reading files by name (key files, /proc for metrics, snapshot manifests).
const READ_FILES: &[c_long] = &[
    SYS_openat,
    SYS_read,
    SYS_pread64,
    SYS_lseek,
    SYS_fstat,
    SYS_newfstatat,
    SYS_statx,
    SYS_readlink,
    SYS_getdents64,
    SYS_unlink,
];

/// Writing files: snapshots (the API deletes and lists them too), records, logs, the VM
/// directory.
const WRITE_FILES: &[c_long] = &[
    SYS_pwrite64,
    SYS_fsync,
    SYS_fdatasync,
    SYS_ftruncate,
    SYS_fallocate,
    SYS_rename,
    SYS_renameat,
    SYS_renameat2,
    SYS_unlinkat,
    SYS_mkdir,
    SYS_mkdirat,
    SYS_rmdir,
    SYS_flock,
    SYS_dup,
    SYS_dup3,
];

/// The VMM thread's own work: KVM set-up (ioctls), guest memory (memfd, NUMA policy,
/// userfaultfd for lazy restore), stop signals, joining a TAP's network namespace,
/// vCPU pinning and kicks, helper thread priorities.
const MAIN: &[c_long] = &[
    SYS_ioctl,
    SYS_memfd_create,
    SYS_userfaultfd,
    SYS_mbind,
    SYS_get_mempolicy,
    SYS_move_pages,
    SYS_rt_sigaction,
    SYS_rt_sigtimedwait,
    SYS_tgkill,
    SYS_setns,
    SYS_sched_setaffinity,
    SYS_setpriority,
    SYS_sysinfo,
    SYS_getrusage,
    SYS_uname,
];

/// A display's change detection, read on its viewers' threads: the dirty log
/// (`KVM_GET_DIRTY_LOG`, or `KVM_RESET_DIRTY_RINGS` when the rings are on).
const DIRTY_LOG: &[c_long] = &[SYS_ioctl];

/// The dirty-ring harvester and the NUMA policy: KVM ioctls, moving pages between nodes.
const HARVESTER: &[c_long] = &[SYS_ioctl, SYS_mbind, SYS_get_mempolicy, SYS_move_pages];

/// The groups each kind's own filter is made of (before the kinds it starts are added:
/// see [`Kind::syscalls`]).
fn groups(kind: Kind) -> &'static [&'static [c_long]] {
    match kind {
        Kind::Main => &[
            THREAD,
            SPAWN,
            WAIT,
            STREAM,
            CONNECT,
            LISTEN,
            READ_FILES,
            WRITE_FILES,
            MAIN,
        ],
        Kind::Vcpu => &[THREAD, VCPU, PASSTHROUGH],
        Kind::Api => &[
            THREAD,
            SPAWN,
            WAIT,
            STREAM,
            CONNECT,
            READ_FILES,
            WRITE_FILES,
        ],
        Kind::DeviceIo => &[THREAD, WAIT, STREAM, CONNECT, DEVICE_IOCTL],
        Kind::BlkWorker => &[THREAD, BLK, URING],
        // SPAWN: an encrypted stream is opened by a crypto worker per core.
        Kind::Migration => &[
            THREAD, SPAWN, WAIT, STREAM, CONNECT, READ_FILES, VCPU, DISK_COPY,
        ],
        Kind::Display => &[THREAD, SPAWN, WAIT, STREAM, CONNECT, DIRTY_LOG],
        Kind::Harvester => &[THREAD, HARVESTER],
    }
}

/// Every call `kind`'s own groups allow.
pub fn of(kind: Kind) -> Vec<i64> {
    groups(kind)
        .iter()
        .flat_map(|g| g.iter().copied())
        .collect()
}
