//! vCPU threads: the `KVM_RUN` loop, port I/O dispatch, and the signal
//! that kicks a vCPU out of the guest when the VM stops.

use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::Duration;

use kvm_bindings::{kvm_run, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use mvm_devices::bus::Bus;

use crate::host::InternalError;
use crate::vm::{CrashReport, VmExit, VmShared};

thread_local! {
    /// This thread's `kvm_run` page, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal that kicks vCPU threads out of `KVM_RUN`.
pub(crate) fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int) {
    // Setting immediate_exit makes a KVM_RUN that is about to start return
    // EINTR at once, closing the race between checking the stop flag and
    // entering the guest. Only async-signal-safe work here: one store.
    let _ = KVM_RUN.try_with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's mapped kvm_run, set by the
            // vCPU loop and cleared before the mapping goes away.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

/// Install the kick handler once per process.
pub(crate) fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a plain handler with an empty mask and no SA_RESTART, so
        // the ioctl returns EINTR.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_kick as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(kick_signal(), &act, std::ptr::null_mut());
        }
    });
}

/// Holds vCPU threads until the VM has recorded their thread IDs, so that
/// a stop request can always kick every one of them.
#[derive(Default)]
pub(crate) struct StartGate {
    open: Mutex<bool>,
    cv: Condvar,
}

impl StartGate {
    pub(crate) fn open(&self) {
        *self.open.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_all();
    }

    fn wait(&self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        while !*open {
            open = self.cv.wait(open).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// The buses vCPU exits are dispatched to.
pub(crate) struct Buses {
    pub(crate) pio: Bus,
    pub(crate) mmio: Bus,
}

/// Guest exits that end the run, decided inside the match on `run()`
/// (whose result borrows the vCPU) and completed after it.
enum Ending {
    Exit(VmExit),
    Internal,
}

/// Run vCPU `id` until the VM stops; the return value is what this vCPU
/// saw end the VM, if anything.
pub(crate) fn run(mut vcpu: VcpuFd, id: u32, bus: Arc<Buses>, vm: Arc<VmShared>, start: Arc<StartGate>) {
    KVM_RUN.with(|p| p.set(vcpu.get_kvm_run() as *mut kvm_run));
    start.wait();
    let crash = |reason: String, rip: Option<u64>, internal: Option<InternalError>| {
        VmExit::Crash(CrashReport {
            vcpu: id,
            reason,
            rip,
            internal,
        })
    };
    let ending = loop {
        if vm.stopping() {
            break None;
        }
        let ending = match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                bus.pio.read(u64::from(port), data);
                continue;
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                bus.pio.write(u64::from(port), data);
                continue;
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !bus.mmio.read(addr, data) {
                    log::debug!("vcpu{id}: read of unmapped MMIO {addr:#x}");
                }
                continue;
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !bus.mmio.write(addr, data) {
                    log::debug!("vcpu{id}: write to unmapped MMIO {addr:#x}");
                }
                continue;
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => Ending::Exit(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::PowerOff,
                KVM_SYSTEM_EVENT_RESET => VmExit::Reboot,
                KVM_SYSTEM_EVENT_CRASH => {
                    crash("the guest reported a crash (KVM_SYSTEM_EVENT_CRASH)".into(), None, None)
                }
                other => crash(format!("unknown KVM system event {other}"), None, None),
            }),
            Ok(VcpuExit::Shutdown) => Ending::Exit(crash("triple fault (KVM_EXIT_SHUTDOWN)".into(), None, None)),
            Ok(VcpuExit::InternalError) => Ending::Internal,
            Ok(VcpuExit::FailEntry(reason, cpu)) => Ending::Exit(crash(
                format!("KVM could not enter the guest: hardware entry failure reason {reason:#x} on host CPU {cpu}"),
                None,
                None,
            )),
            Ok(VcpuExit::Hlt) => Ending::Exit(crash(
                "vCPU halted (HLT exit with no in-kernel LAPIC)".into(),
                None,
                None,
            )),
            Ok(other) => Ending::Exit(crash(format!("unhandled VM exit {other:?}"), None, None)),
            Err(e) if e.errno() == libc::EINTR => {
                vcpu.set_kvm_immediate_exit(0);
                continue;
            }
            Err(e) if e.errno() == libc::EAGAIN => {
                // PVM returns EAGAIN for an application processor the guest
                // has not started yet; poll gently instead of spinning a core.
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            Err(e) => Ending::Exit(crash(format!("KVM_RUN failed: {e}"), None, None)),
        };
        break Some(ending);
    };
    let rip = vcpu.get_regs().ok().map(|r| r.rip);
    let exit = ending.map(|ending| match ending {
        Ending::Exit(VmExit::Crash(mut report)) => {
            report.rip = report.rip.or(rip);
            VmExit::Crash(report)
        }
        Ending::Exit(exit) => exit,
        Ending::Internal => {
            // SAFETY: after KVM_EXIT_INTERNAL_ERROR the `internal` member of
            // the exit union is the valid one.
            let internal = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal };
            let decoded = InternalError::decode(internal.suberror, internal.ndata, &internal.data);
            let reason = decoded.to_string();
            crash(reason, rip, Some(decoded))
        }
    });
    KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
    if let Some(exit) = exit {
        vm.set_exit(exit);
    }
}
