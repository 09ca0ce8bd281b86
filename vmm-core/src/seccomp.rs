//! seccomp filters for the VMM's threads.
//!
//! The guest is untrusted: a bug in a device model must not hand it the
//! host. Every thread the VMM starts confines itself, before it handles
//! anything the guest controls, to the system calls its kind of work
//! needs (and for `ioctl`, `fcntl`, `socket`, `clone` and `prctl`, to the
//! argument values it uses):
//!
//! | kind | threads | may |
//! | --- | --- | --- |
//! | [`ThreadKind::Vcpu`] | `vcpu<N>` | run the vCPU (`KVM_RUN`, register reads), do the MMIO/PIO work of the devices (eventfds, the serial console's output, a vhost-user share's setup messages), sleep, stop |
//! | [`ThreadKind::EventLoop`] | `mvm-vm`, started by [`crate::Vm::run`] | serve virtio queues: files of disks, shares and volumes (the overlay file server's calls), TAP devices, vsock's Unix sockets, epoll; restore the terminal |
//! | [`ThreadKind::Worker`] | control socket, port forwards, share watcher, virtiofsd's log, `mvm-vmm`'s signal thread | what the event loop may without KVM ioctls, plus IPv4/IPv6 sockets and inotify |
//! | [`ThreadKind::Supervisor`] | network supervisor | start dnsmasq again when it died; dnsmasq inherits the filter, so it is a deny list: no mounts, namespaces, ptrace, modules, kexec, bpf, keyrings, clock changes |
//!
//! No thread but the supervisor may start programs (`clone` must carry
//! `CLONE_THREAD`, `execve` is not allowed), and none may mount, trace,
//! create namespaces, open IP sockets on the event loop, use netlink, or
//! create KVM objects: all that happens while the VM is built, before the
//! filters go on. The caller's thread, which builds the VM
//! ([`crate::Vm::new`]), waits in [`crate::Vm::run`] and tears the VM down
//! (stopping virtiofsd, unmounting, unlocking the state directory),
//! handles no guest input and is left as it is.
//!
//! A forbidden call raises SIGSYS; the handler writes which call on which
//! thread to stderr and ends the process with exit code
//! [`VIOLATION_EXIT_CODE`]. `[security] seccomp = false` in vm.toml leaves
//! the threads unconfined (for debugging). An embedding program that runs
//! its own policy gets the filters from [`filter`] and applies them with
//! [`apply_filter`].

mod names;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::{Arc, Once};

pub use mvm_devices::ThreadStart;

use crate::{Error, Result};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

/// Exit code of a process a filter stopped (128 + SIGSYS, what a shell
/// shows for a process killed by SIGSYS).
pub const VIOLATION_EXIT_CODE: i32 = 128 + libc::SIGSYS;

/// What a thread does, which decides what it may ask of the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    Vcpu,
    EventLoop,
    Worker,
    Supervisor,
}

impl ThreadKind {
    /// Every kind, for callers that compile all filters at once.
    pub const ALL: [ThreadKind; 4] = [
        ThreadKind::Vcpu,
        ThreadKind::EventLoop,
        ThreadKind::Worker,
        ThreadKind::Supervisor,
    ];

    fn label(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::EventLoop => "event-loop",
            ThreadKind::Worker => "worker",
            ThreadKind::Supervisor => "supervisor",
        }
    }
}

/// The compiled filters of every thread kind of one VM.
#[derive(Debug, Clone)]
pub struct Filters {
    vcpu: Arc<BpfProgram>,
    event_loop: Arc<BpfProgram>,
    worker: Arc<BpfProgram>,
    supervisor: Arc<BpfProgram>,
}

impl Filters {
    /// Compile the filters of all kinds.
    pub fn new() -> Result<Filters> {
        Ok(Filters {
            vcpu: Arc::new(filter(ThreadKind::Vcpu)?),
            event_loop: Arc::new(filter(ThreadKind::EventLoop)?),
            worker: Arc::new(filter(ThreadKind::Worker)?),
            supervisor: Arc::new(filter(ThreadKind::Supervisor)?),
        })
    }

    /// Confine the calling thread as a `kind` thread.
    pub fn apply(&self, kind: ThreadKind) -> Result<()> {
        let program = match kind {
            ThreadKind::Vcpu => &self.vcpu,
            ThreadKind::EventLoop => &self.event_loop,
            ThreadKind::Worker => &self.worker,
            ThreadKind::Supervisor => &self.supervisor,
        };
        apply_filter(kind, program)
    }
}

/// A hook for the threads that device and host components start: it
/// confines the thread as `kind` (nothing without `filters`), or ends the
/// process if it cannot (a thread meant to be confined must not run
/// unconfined).
pub fn thread_start(filters: Option<&Filters>, kind: ThreadKind) -> ThreadStart {
    let filters = filters?.clone();
    Some(Arc::new(move || {
        if let Err(e) = filters.apply(kind) {
            eprintln!("mvm-vmm: {e}");
            // SAFETY: plain process exit; no Rust state is relied on after.
            unsafe { libc::_exit(1) };
        }
    }))
}

/// Compile the filter of `kind` threads.
pub fn filter(kind: ThreadKind) -> Result<BpfProgram> {
    let build = |reason: String| Error::Seccomp {
        kind: kind.label(),
        reason,
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    // Allowed whatever the arguments (an empty rule list says so), even if
    // another group lists the same call with conditions.
    let mut unconditional = std::collections::BTreeSet::new();
    for (nr, conditions) in allowed(kind) {
        let entry = rules.entry(nr).or_default();
        if conditions.is_empty() {
            unconditional.insert(nr);
        }
        for alternative in conditions {
            let conds = alternative
                .iter()
                .map(|(arg, op, value)| SeccompCondition::new(*arg, SeccompCmpArgLen::Dword, op.clone(), *value))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| build(format!("system call {nr}: {e}")))?;
            entry.push(SeccompRule::new(conds).map_err(|e| build(format!("system call {nr}: {e}")))?);
        }
    }
    for nr in unconditional {
        rules.insert(nr, Vec::new());
    }
    let (mismatch, matched) = match kind {
        // It starts dnsmasq, which inherits the filter: deny what neither
        // needs rather than list what a whole daemon may call.
        ThreadKind::Supervisor => {
            rules.extend(SUPERVISOR_DENIED.iter().map(|&nr| (nr, Vec::new())));
            (SeccompAction::Allow, SeccompAction::Trap)
        }
        _ => (SeccompAction::Trap, SeccompAction::Allow),
    };
    let filter = SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64).map_err(|e| build(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| build(e.to_string()))
}

/// Install `program`, the filter of `kind` threads, on the calling thread
/// (after the SIGSYS reporter). Kinds that start threads also get a
/// filter that answers `clone3` with ENOSYS: its flags are in memory a
/// filter cannot read, and glibc then falls back to `clone`, whose flags
/// the main filter checks.
pub fn apply_filter(kind: ThreadKind, program: &BpfProgram) -> Result<()> {
    let fail = |e: String| Error::Seccomp {
        kind: kind.label(),
        reason: format!("cannot install it ({e}); the kernel needs CONFIG_SECCOMP_FILTER"),
    };
    install_sigsys_handler();
    THREAD_KIND.with(|k| k.set(Some(kind)));
    if matches!(kind, ThreadKind::EventLoop | ThreadKind::Worker) {
        let no_clone3 = SeccompFilter::new(
            BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            TargetArch::x86_64,
        )
        .and_then(BpfProgram::try_from)
        .map_err(|e| fail(e.to_string()))?;
        seccompiler::apply_filter(&no_clone3).map_err(|e| fail(e.to_string()))?;
    }
    seccompiler::apply_filter(program).map_err(|e| fail(e.to_string()))
}

thread_local! {
    /// The kind this thread was confined as, for the violation report.
    static THREAD_KIND: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

fn install_sigsys_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a handler that only formats into a stack buffer, writes
        // and exits (all async-signal-safe).
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction =
                on_sigsys as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) as usize;
            act.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut());
        }
    });
}

/// A small writer into a fixed buffer, usable in a signal handler.
struct StackText {
    buf: [u8; 256],
    len: usize,
}

impl StackText {
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn number(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // siginfo for SIGSYS: after signo, errno, code (and padding), the
    // union holds { void *call_addr; int syscall; unsigned arch; }.
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let nr = unsafe { *(info as *const u8).add(24).cast::<i32>() };
    let mut text = StackText { buf: [0; 256], len: 0 };
    text.push(b"mvm-vmm: seccomp: thread ");
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes (allowed to every thread).
    if unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) } == 0 {
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        text.push(&name[..end]);
    }
    text.push(b" (");
    let kind = THREAD_KIND.try_with(Cell::get).ok().flatten();
    text.push(kind.map_or("VMM", ThreadKind::label).as_bytes());
    text.push(b" filter) made system call ");
    text.number(nr as u64);
    if let Some(name) = usize::try_from(nr).ok().and_then(|i| names::NAMES.get(i)) {
        text.push(b" (");
        text.push(name.as_bytes());
        text.push(b")");
    }
    text.push(b", which its filter forbids; the VMM stops (a VMM bug or an attack by the guest: please report it; `[security] seccomp = false` in vm.toml turns the filters off)\n");
    // SAFETY: write(2) and _exit(2) are async-signal-safe.
    unsafe {
        libc::write(2, text.buf.as_ptr().cast(), text.len);
        libc::_exit(VIOLATION_EXIT_CODE);
    }
}

/// One alternative: every (argument, comparison, value) must hold.
type Alternative = Vec<(u8, SeccompCmpOp, u64)>;

/// A system call and the argument alternatives it is allowed with; none
/// means any arguments.
type Allowed = (i64, Vec<Alternative>);

fn any(nr: libc::c_long) -> Allowed {
    (nr, Vec::new())
}

fn when(nr: libc::c_long, alternatives: &[&[(u8, SeccompCmpOp, u64)]]) -> Allowed {
    (nr, alternatives.iter().map(|a| a.to_vec()).collect())
}

use SeccompCmpOp::{Eq, MaskedEq};

/// What every thread may do: memory, threads' own housekeeping, time,
/// futexes, signals it handles, reading and writing descriptors it has,
/// exiting.
fn common() -> Vec<Allowed> {
    vec![
        any(libc::SYS_read),
        any(libc::SYS_write),
        any(libc::SYS_readv),
        any(libc::SYS_writev),
        any(libc::SYS_close),
        any(libc::SYS_futex),
        any(libc::SYS_mmap),
        any(libc::SYS_munmap),
        any(libc::SYS_mprotect),
        any(libc::SYS_madvise),
        any(libc::SYS_mremap),
        any(libc::SYS_brk),
        any(libc::SYS_rt_sigprocmask),
        any(libc::SYS_rt_sigreturn),
        any(libc::SYS_sigaltstack),
        any(libc::SYS_sched_yield),
        any(libc::SYS_sched_getaffinity),
        any(libc::SYS_getpid),
        any(libc::SYS_gettid),
        any(libc::SYS_clock_gettime),
        any(libc::SYS_clock_nanosleep),
        any(libc::SYS_nanosleep),
        any(libc::SYS_getrandom),
        any(libc::SYS_restart_syscall),
        any(libc::SYS_exit),
        any(libc::SYS_exit_group),
        // Kicking vCPU threads out of KVM_RUN, and abort().
        any(libc::SYS_tgkill),
        // Thread names (the violation report reads its own).
        when(
            libc::SYS_prctl,
            &[
                &[(0, Eq, libc::PR_GET_NAME as u64)],
                &[(0, Eq, libc::PR_SET_NAME as u64)],
            ],
        ),
        any(libc::SYS_poll),
        any(libc::SYS_ppoll),
        any(libc::SYS_fstat),
        any(libc::SYS_newfstatat),
        any(libc::SYS_statx),
        any(libc::SYS_lseek),
        fcntl(),
    ]
}

/// fcntl(2) commands a thread may use on its descriptors: flags and
/// duplicates, no locks on other processes' behalf, no ownership.
fn fcntl() -> Allowed {
    when(
        libc::SYS_fcntl,
        &[
            &[(1, Eq, libc::F_GETFD as u64)],
            &[(1, Eq, libc::F_SETFD as u64)],
            &[(1, Eq, libc::F_GETFL as u64)],
            &[(1, Eq, libc::F_SETFL as u64)],
            &[(1, Eq, libc::F_DUPFD_CLOEXEC as u64)],
            &[(1, Eq, libc::F_OFD_SETLK as u64)],
            &[(1, Eq, libc::F_OFD_GETLK as u64)],
        ],
    )
}

/// Starting threads (not processes): `clone` with CLONE_THREAD. glibc
/// tries `clone3` first, whose flags a filter cannot see; it is allowed
/// here and answered ENOSYS by a second filter, see [`apply_filter`].
fn threads() -> Vec<Allowed> {
    vec![
        when(
            libc::SYS_clone,
            &[&[(0, MaskedEq(libc::CLONE_THREAD as u64), libc::CLONE_THREAD as u64)]],
        ),
        any(libc::SYS_clone3),
        any(libc::SYS_set_robust_list),
        any(libc::SYS_rseq),
        // A thread started by a confined thread (a forward added at run
        // time, started by the control thread) installs its own filter
        // on top of the one it inherited: it can only narrow.
        when(
            libc::SYS_prctl,
            &[&[(0, Eq, libc::PR_SET_NO_NEW_PRIVS as u64), (1, Eq, 1)]],
        ),
        when(
            libc::SYS_seccomp,
            &[&[(0, Eq, libc::SECCOMP_SET_MODE_FILTER as u64), (1, Eq, 0)]],
        ),
    ]
}

/// `_IO`/`_IOR`/`_IOW` request numbers of KVM (ioctl type 0xAE).
const fn kvm_io(nr: u64) -> u64 {
    (0xAE << 8) | nr
}

const fn kvm_ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | kvm_io(nr)
}

const fn kvm_iow(nr: u64, size: usize) -> u64 {
    (1 << 30) | ((size as u64) << 16) | kvm_io(nr)
}

const KVM_RUN: u64 = kvm_io(0x80);
const KVM_GET_REGS: u64 = kvm_ior(0x81, std::mem::size_of::<kvm_bindings::kvm_regs>());
const KVM_GET_SREGS: u64 = kvm_ior(0x83, std::mem::size_of::<kvm_bindings::kvm_sregs>());
const KVM_IRQ_LINE: u64 = kvm_iow(0x61, std::mem::size_of::<kvm_bindings::kvm_irq_level>());

/// The TAP offloads matching the features a virtio-net driver acked
/// (on the vCPU thread that writes the feature register).
const TUNSETOFFLOAD: u64 = mvm_net::tap::TUNSETOFFLOAD;

/// Terminal ioctls: the console's raw mode is restored when the VM ends.
const TERMINAL_IOCTLS: &[u64] = &[
    libc::TCGETS,
    libc::TCSETS,
    libc::TCSETSW,
    libc::TCSETSF,
    libc::TIOCGWINSZ,
];

/// Non-blocking mode and pending bytes of sockets and pipes.
const DESCRIPTOR_IOCTLS: &[u64] = &[libc::FIONBIO, libc::FIONREAD];

/// ioctl(2) with one of `requests`.
fn ioctls(requests: &[u64]) -> Allowed {
    (
        libc::SYS_ioctl,
        requests.iter().map(|&req| vec![(1, Eq, req)]).collect(),
    )
}

/// Files of disks, volumes and shares: the overlay file server's calls
/// (lookups, reads and writes, directory changes, attributes, xattrs,
/// sync), always relative to descriptors it holds.
fn files() -> Vec<Allowed> {
    [
        libc::SYS_openat,
        libc::SYS_openat2,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_preadv2,
        libc::SYS_pwritev2,
        libc::SYS_fstatfs,
        libc::SYS_statfs,
        libc::SYS_getdents64,
        libc::SYS_readlinkat,
        libc::SYS_mkdirat,
        libc::SYS_mknodat,
        libc::SYS_unlinkat,
        libc::SYS_renameat,
        libc::SYS_renameat2,
        libc::SYS_linkat,
        libc::SYS_symlinkat,
        libc::SYS_fchmod,
        libc::SYS_fchmodat,
        libc::SYS_fchown,
        libc::SYS_fchownat,
        libc::SYS_utimensat,
        libc::SYS_ftruncate,
        libc::SYS_fallocate,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_sync_file_range,
        libc::SYS_syncfs,
        libc::SYS_copy_file_range,
        libc::SYS_fadvise64,
        libc::SYS_flock,
        libc::SYS_faccessat,
        libc::SYS_faccessat2,
        libc::SYS_getxattr,
        libc::SYS_lgetxattr,
        libc::SYS_fgetxattr,
        libc::SYS_setxattr,
        libc::SYS_lsetxattr,
        libc::SYS_fsetxattr,
        libc::SYS_listxattr,
        libc::SYS_llistxattr,
        libc::SYS_flistxattr,
        libc::SYS_removexattr,
        libc::SYS_lremovexattr,
        libc::SYS_fremovexattr,
        libc::SYS_dup,
        libc::SYS_dup3,
        libc::SYS_pipe2,
        // The same by path (glibc's chmod(), std's rename() and friends use
        // these on x86_64): paths the VMM already holds, nothing the *at
        // calls could not reach.
        libc::SYS_chmod,
        libc::SYS_chown,
        libc::SYS_lchown,
        libc::SYS_unlink,
        libc::SYS_rename,
        libc::SYS_mkdir,
        libc::SYS_rmdir,
        libc::SYS_link,
        libc::SYS_symlink,
        libc::SYS_readlink,
        libc::SYS_access,
        libc::SYS_stat,
        libc::SYS_lstat,
        libc::SYS_getuid,
        libc::SYS_geteuid,
        libc::SYS_getgid,
        libc::SYS_getegid,
        libc::SYS_umask,
        libc::SYS_prlimit64,
    ]
    .into_iter()
    .map(any)
    .collect()
}

/// Sockets: Unix (vsock's host side, the control socket, vhost-user) and,
/// where `inet`, IPv4/IPv6 (port forwards). No netlink, no raw packets.
fn sockets(inet: bool) -> Vec<Allowed> {
    let mut list: Vec<Allowed> = [
        libc::SYS_connect,
        libc::SYS_accept4,
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_getsockname,
        libc::SYS_getpeername,
        libc::SYS_getsockopt,
        libc::SYS_setsockopt,
        libc::SYS_shutdown,
        libc::SYS_sendto,
        libc::SYS_recvfrom,
        libc::SYS_sendmsg,
        libc::SYS_recvmsg,
    ]
    .into_iter()
    .map(any)
    .collect();
    let unix: &[(u8, SeccompCmpOp, u64)] = &[(0, Eq, libc::AF_UNIX as u64)];
    let inet4: &[(u8, SeccompCmpOp, u64)] = &[(0, Eq, libc::AF_INET as u64)];
    let inet6: &[(u8, SeccompCmpOp, u64)] = &[(0, Eq, libc::AF_INET6 as u64)];
    list.push(match inet {
        true => when(libc::SYS_socket, &[unix, inet4, inet6]),
        false => when(libc::SYS_socket, &[unix]),
    });
    list.push(when(libc::SYS_socketpair, &[unix]));
    list
}

/// Waiting on many descriptors, the eventfds devices signal with, timers.
fn events() -> Vec<Allowed> {
    [
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_eventfd2,
        // vsock's retransmission and idle timers.
        libc::SYS_timerfd_create,
        libc::SYS_timerfd_settime,
        libc::SYS_timerfd_gettime,
    ]
    .into_iter()
    .map(any)
    .collect()
}

/// What the network supervisor may not do, although it starts programs
/// (dnsmasq, which inherits this filter): everything that reaches
/// beyond starting a daemon on a prepared bridge.
const SUPERVISOR_DENIED: &[libc::c_long] = &[
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_open_tree,
    libc::SYS_move_mount,
    libc::SYS_fsopen,
    libc::SYS_fsmount,
    libc::SYS_setns,
    libc::SYS_unshare,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_open_by_handle_at,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_acct,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_syslog,
    libc::SYS_quotactl,
];

fn allowed(kind: ThreadKind) -> Vec<Allowed> {
    let mut list = common();
    match kind {
        ThreadKind::Vcpu => {
            // Guest MMIO writes drive devices on this thread: eventfds
            // (read/write), TAP offloads for the acked features, and a
            // vhost-user share's setup messages when the driver starts it.
            list.push(ioctls(&[
                KVM_RUN,
                KVM_GET_REGS,
                KVM_GET_SREGS,
                KVM_IRQ_LINE,
                TUNSETOFFLOAD,
            ]));
            list.extend(
                [
                    libc::SYS_sendmsg,
                    libc::SYS_recvmsg,
                    libc::SYS_sendto,
                    libc::SYS_recvfrom,
                    // A device reset drops what the device had registered.
                    libc::SYS_epoll_ctl,
                ]
                .into_iter()
                .map(any),
            );
        }
        ThreadKind::EventLoop => {
            list.extend(threads());
            list.extend(files());
            list.extend(sockets(false));
            list.extend(events());
            let requests: Vec<u64> = [KVM_IRQ_LINE, TUNSETOFFLOAD]
                .iter()
                .chain(TERMINAL_IOCTLS)
                .chain(DESCRIPTOR_IOCTLS)
                .copied()
                .collect();
            list.push(ioctls(&requests));
        }
        ThreadKind::Worker => {
            list.extend(threads());
            list.extend(files());
            list.extend(sockets(true));
            list.extend(events());
            list.extend(
                [
                    libc::SYS_inotify_init1,
                    libc::SYS_inotify_add_watch,
                    libc::SYS_inotify_rm_watch,
                    libc::SYS_rt_sigtimedwait,
                ]
                .into_iter()
                .map(any),
            );
            list.push(ioctls(DESCRIPTOR_IOCTLS));
        }
        // Not an allow list: see `filter`.
        ThreadKind::Supervisor => list.clear(),
    }
    list
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// Set in the child process of the tests below: which scenario it runs
    /// (each ends the child process).
    const CHILD_ENV: &str = "MVM_TEST_SECCOMP_CHILD";

    /// In a child process: start a thread named `name`, confine it as
    /// `kind`, run `work` on it; exit 0 if the process is still alive.
    fn confined(kind: ThreadKind, name: &str, work: fn()) -> ! {
        let filters = Filters::new().unwrap();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                filters.apply(kind).unwrap();
                work();
            })
            .unwrap();
        let joined = thread.join();
        std::process::exit(if joined.is_ok() { 0 } else { 2 })
    }

    /// Run test `test` again in a child process with `scenario`; its exit
    /// code and stderr.
    fn child(test: &str, scenario: &str) -> (Option<i32>, String) {
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, scenario)
            .stdout(Stdio::null())
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    fn execve_true() {
        let path = c"/bin/true";
        let argv = [path.as_ptr(), std::ptr::null()];
        let envp = [std::ptr::null()];
        // SAFETY: valid NUL-terminated strings and NULL-terminated arrays.
        unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    }

    #[test]
    fn every_kind_compiles() {
        for kind in ThreadKind::ALL {
            assert!(!filter(kind).unwrap().is_empty(), "{kind:?}");
        }
    }

    /// The example: a vCPU thread that tries to start a program
    /// ends the VMM, and the report names the call and the thread.
    #[test]
    fn execve_on_a_vcpu_thread_kills_the_process_and_says_which() {
        const TEST: &str = "seccomp::tests::execve_on_a_vcpu_thread_kills_the_process_and_says_which";
        match std::env::var(CHILD_ENV).as_deref() {
            Ok("execve") => confined(ThreadKind::Vcpu, "vcpu0", execve_true),
            Ok("allowed") => confined(ThreadKind::Vcpu, "vcpu0", || {
                // What a vCPU thread does besides KVM_RUN: locks, time,
                // writing (the serial console), sleeping, a short-lived
                // allocation.
                let lock = std::sync::Mutex::new(vec![0u8; 1 << 20]);
                lock.lock().unwrap()[0] = 1;
                let _ = std::time::SystemTime::now();
                std::thread::sleep(std::time::Duration::from_millis(1));
                eprintln!("vcpu thread still here");
            }),
            _ => {}
        }
        let (code, stderr) = child(TEST, "execve");
        assert_eq!(code, Some(VIOLATION_EXIT_CODE), "{stderr}");
        assert!(
            stderr.contains("thread vcpu0 (vCPU filter) made system call 59 (execve)"),
            "{stderr}"
        );
        let (code, stderr) = child(TEST, "allowed");
        assert_eq!(code, Some(0), "{stderr}");
        assert!(stderr.contains("vcpu thread still here"), "{stderr}");
    }

    /// Worker threads start threads (for connections) but not programs;
    /// only the supervisor may.
    #[test]
    fn workers_start_threads_but_only_the_supervisor_starts_programs() {
        const TEST: &str = "seccomp::tests::workers_start_threads_but_only_the_supervisor_starts_programs";
        match std::env::var(CHILD_ENV).as_deref() {
            Ok("worker") => confined(ThreadKind::Worker, "fwd-tcp-8080", || {
                // As a forward's connection thread: it narrows its
                // inherited filter with its own.
                std::thread::spawn(|| {
                    Filters::new().unwrap().apply(ThreadKind::Worker).unwrap();
                    eprintln!("inner thread ran");
                })
                .join()
                .unwrap();
                execve_true();
            }),
            Ok("supervisor") => confined(ThreadKind::Supervisor, "mvm-net-watch", || {
                let status = Command::new("/bin/true").status().unwrap();
                eprintln!("program ran: {status}");
            }),
            _ => {}
        }
        let (code, stderr) = child(TEST, "worker");
        assert_eq!(code, Some(VIOLATION_EXIT_CODE), "{stderr}");
        assert!(stderr.contains("inner thread ran"), "{stderr}");
        assert!(
            stderr.contains("thread fwd-tcp-8080 (worker filter) made system call 59 (execve)"),
            "{stderr}"
        );
        let (code, stderr) = child(TEST, "supervisor");
        assert_eq!(code, Some(0), "{stderr}");
        assert!(stderr.contains("program ran: exit status: 0"), "{stderr}");
    }
}
