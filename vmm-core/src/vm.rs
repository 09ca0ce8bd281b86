//! A VM: built from a [`VmConfig`] by [`Vm::new`], run to its end by
//! [`Vm::run`], stoppable from any thread through a [`VmHandle`].

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use mvm_devices::legacy::{AcpiSleepControl, ResetController, SerialPort};
use mvm_devices::virtio::mmio::MmioTransport;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{check_file, ConsoleInput, VmConfig};
use crate::console::{InputPump, RawTerminal};
use crate::host::{compose_cmdline, HostKind, InternalError};
use crate::privsep::Handoff;
use crate::seccomp::ThreadKind;
use crate::x86_64::{acpi, boot, cpuid, layout, mptable, regs};
use crate::{control, devices, network, seccomp, state, vcpu, watch, Error, Result};

/// How a VM run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off (ACPI S5, or a KVM shutdown event).
    PowerOff,
    /// The guest reset the machine (i8042 reset line, ACPI reset register).
    Reboot,
    /// The guest could not continue; the report says why and where.
    Crash(CrashReport),
    /// The host stopped the VM.
    Stopped(StopReason),
}

/// Why the host stopped a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// [`VmHandle::stop`] was called.
    Requested,
    /// Ctrl-A x on an interactive console.
    ConsoleEscape,
}

/// What is known about a guest crash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashReport {
    /// The vCPU that saw it.
    pub vcpu: u32,
    /// What happened, in words.
    pub reason: String,
    /// Guest instruction pointer at the time, when readable.
    pub rip: Option<u64>,
    /// The decoded emulation failure, for `KVM_EXIT_INTERNAL_ERROR`.
    pub internal: Option<InternalError>,
}

impl std::fmt::Display for CrashReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "vCPU {}: {}", self.vcpu, self.reason)?;
        if let Some(rip) = self.rip {
            write!(f, " at RIP {rip:#x}")?;
        }
        Ok(())
    }
}

/// State shared by the VM's threads and handles.
pub(crate) struct VmShared {
    stopping: AtomicBool,
    exit: Mutex<Option<VmExit>>,
    wake: EventFd,
    vcpu_threads: Mutex<Vec<libc::pthread_t>>,
}

impl VmShared {
    fn new() -> Result<Self> {
        Ok(VmShared {
            stopping: AtomicBool::new(false),
            exit: Mutex::new(None),
            wake: EventFd::new(EFD_NONBLOCK).map_err(Error::host("creating the VM's wake-up eventfd"))?,
            vcpu_threads: Mutex::new(Vec::new()),
        })
    }

    pub(crate) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Record how the VM ended (the first report wins) and make every
    /// thread wind down.
    pub(crate) fn set_exit(&self, exit: VmExit) {
        {
            let mut slot = self.exit.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_none() {
                *slot = Some(exit);
            }
        }
        self.stopping.store(true, Ordering::Release);
        let _ = self.wake.write(1);
        self.kick_vcpus();
    }

    pub(crate) fn request_stop(&self, reason: StopReason) {
        self.set_exit(VmExit::Stopped(reason));
    }

    fn kick_vcpus(&self) {
        let threads = self.vcpu_threads.lock().unwrap_or_else(|e| e.into_inner());
        for t in threads.iter() {
            // SAFETY: the threads are joined only after the list is cleared.
            unsafe { libc::pthread_kill(*t, vcpu::kick_signal()) };
        }
    }
}

/// Stops a VM from any thread.
#[derive(Clone)]
pub struct VmHandle(Arc<VmShared>);

impl VmHandle {
    /// Stop the VM: [`Vm::run`] returns `VmExit::Stopped(StopReason::Requested)`
    /// unless the guest ended first.
    pub fn stop(&self) {
        self.0.request_stop(StopReason::Requested);
    }
}

/// A VM ready to run.
pub struct Vm {
    shared: Arc<VmShared>,
    // Field order is drop order: vCPUs and devices before the VM fd,
    // memory last.
    vcpus: Vec<VcpuFd>,
    bus: Arc<vcpu::Buses>,
    serial: Arc<Mutex<SerialPort>>,
    reset: Arc<Mutex<ResetController>>,
    sleep: Option<Arc<Mutex<AcpiSleepControl>>>,
    virtio: Vec<Arc<Mutex<MmioTransport>>>,
    console_input: ConsoleInput,
    /// The control socket (VMs with a state directory): stopped before
    /// the state directory is unlocked, like the networking.
    _control: Option<control::Control>,
    /// Forwards, dnsmasq watch.
    _networking: Option<network::Networking>,
    /// Replays host changes of watched shares in the guest.
    _watching: Option<watch::Watching>,
    /// Locks the state directory while the VM exists.
    _state: Option<state::StateDir>,
    cmdline: String,
    host: HostKind,
    _vm_fd: VmFd,
    _kvm: Kvm,
    /// The paths opened for this VMM, read through /proc/self/fd while it
    /// runs (the share watcher).
    _handoff: Handoff,
    _memory: GuestMemoryMmap,
    /// The threads' seccomp filters (`None`: `[security] seccomp = false`).
    filters: Option<seccomp::Filters>,
}

fn kvm_error(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    Error::kvm(op)
}

impl Vm {
    /// Build the VM: check the configuration, create the KVM VM, load the
    /// kernel and initrd, write the boot structures, create devices and
    /// vCPUs. Nothing runs until [`Vm::run`].
    pub fn new(config: VmConfig) -> Result<Self> {
        Self::with_handoff(config, Handoff::default())
    }

    /// [`Vm::new`] with host resources another (privileged) process
    /// prepared: `/dev/kvm`, TAPs, virtiofsd sockets, opened paths (see
    /// [`crate::privsep`]). What the handoff lacks is set up here as usual.
    pub fn with_handoff(mut config: VmConfig, mut handoff: Handoff) -> Result<Self> {
        handoff.apply_paths(&mut config);
        let host = HostKind::detect();
        if let Some(warning) = host.warning(config.boot.host_cmdline) {
            log::warn!("{warning}");
        }
        let kvm = match handoff.kvm.take() {
            // SAFETY: the handoff owned this open /dev/kvm descriptor; the
            // Kvm takes it over.
            Some(fd) => unsafe { Kvm::from_raw_fd(fd.into_raw_fd()) },
            None => Kvm::new().map_err(Error::KvmOpen)?,
        };
        let max_vcpus = (kvm.get_max_vcpus() as u32).min(u32::from(mptable::MAX_VCPUS));
        config.validate(max_vcpus)?;
        if devices::virtio_count(&config) > layout::VIRTIO_MAX_DEVICES {
            return Err(Error::ConfigValue {
                key: "disk",
                value: format!(
                    "{} devices ({} disks, {} volumes, {} nets, {} shares)",
                    devices::virtio_count(&config),
                    config.disks.len(),
                    config.volumes.len(),
                    config.nets.len(),
                    config.shares.len()
                ),
                reason: format!(
                    "at most {} virtio devices fit (rng and vsock included)",
                    layout::VIRTIO_MAX_DEVICES
                ),
            });
        }
        let vcpus = config.machine.vcpus as u8; // validated: 1..=254
        let mem_size = u64::from(config.machine.memory_mib) << 20;

        let mut kernel_file = check_file("boot.kernel", &config.boot.kernel)?;
        let info = boot::inspect_kernel(&config.boot.kernel, &mut kernel_file)?;
        let initrd = match &config.boot.initrd {
            Some(path) => {
                let file = check_file("boot.initrd", path)?;
                let size = file
                    .metadata()
                    .map_err(Error::host(format!("reading {}", path.display())))?
                    .len();
                Some((path.clone(), file, size))
            }
            None => None,
        };
        let initrd_size = initrd.as_ref().map_or(0, |(_, _, s)| *s);
        let initrd_addr = boot::place_initrd(config.machine.memory_mib, &info, initrd_size)?;

        let vm_fd = kvm.create_vm().map_err(kvm_error("KVM_CREATE_VM"))?;
        vm_fd
            .set_tss_address(layout::KVM_TSS_ADDR as usize)
            .map_err(kvm_error("KVM_SET_TSS_ADDR"))?;
        if kvm.check_extension(Cap::SetIdentityMapAddr) {
            vm_fd
                .set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDR)
                .map_err(kvm_error("KVM_SET_IDENTITY_MAP_ADDR"))?;
        }
        // Memory before the irqchip: once an irqchip exists, the first
        // memslot update waits for an SRCU grace period (measured 7 ms on
        // the PVM host, 0.1 ms in this order).
        let memory = create_memory(&vm_fd, mem_size, devices::needs_shared_memory(&config))?;
        // Everything checked: from here on files are created (state
        // directory, upper layers, volume images) and host processes
        // started.
        let state_dir = state::open(&config)?;
        let mut nics = devices::Nics::default();
        let mut live_shares = Vec::new();
        // Compiled before any thread starts: every one confines itself first.
        let filters = match config.security.seccomp {
            true => Some(seccomp::Filters::new()?),
            false => None,
        };
        let worker = seccomp::thread_start(filters.as_ref(), ThreadKind::Worker);
        let virtio_devices = devices::virtio_devices(&config, &mut handoff, &mut nics, &mut live_shares, &worker)?;
        let watching = watch::start(&config, &live_shares, worker.clone())?;
        let networking = match &state_dir {
            Some(dir) => network::start(&config, &dir.path, &nics, filters.as_ref())?,
            None => None,
        };
        let control = match &state_dir {
            Some(dir) => Some(control::start(
                &dir.path,
                networking.as_ref().map(network::Networking::reload_handle),
                live_shares,
                worker,
            )?),
            None => None,
        };
        vm_fd.create_irq_chip().map_err(kvm_error("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(kvm_error("KVM_CREATE_PIT2"))?;

        let mut vcpu_fds = Vec::with_capacity(usize::from(vcpus));
        for id in 0..vcpus {
            vcpu_fds.push(vm_fd.create_vcpu(u64::from(id)).map_err(kvm_error("KVM_CREATE_VCPU"))?);
        }
        let tsc_khz = vcpu_fds[0].get_tsc_khz().ok();
        let virtio_slots = devices::virtio_slots(devices::virtio_count(&config));
        let mut cmdline = compose_cmdline(&config.boot.cmdline, host, config.boot.host_cmdline, tsc_khz);
        for arg in state::guest_init_args(&config) {
            cmdline.push(' ');
            cmdline.push_str(&arg);
        }
        if !config.machine.acpi {
            // Without ACPI the guest learns of the devices from its command
            // line (Linux: CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES).
            for slot in &virtio_slots {
                cmdline.push_str(&format!(" virtio_mmio.device=4K@{:#x}:{}", slot.base, slot.gsi));
            }
        }
        if cmdline.len() > info.cmdline_max {
            return Err(Error::Cmdline(format!(
                "{} bytes{}; this kernel accepts at most {}",
                cmdline.len(),
                if cmdline.len() > config.boot.cmdline.len() {
                    " with the host's additions"
                } else {
                    ""
                },
                info.cmdline_max
            )));
        }

        let kernel = boot::load_kernel(&memory, &config.boot.kernel, &mut kernel_file, info)?;
        let initrd_region = match initrd {
            Some((path, mut file, size)) => {
                let len = usize::try_from(size).map_err(|_| Error::GuestMemory("initrd too large".into()))?;
                memory
                    .read_exact_volatile_from(GuestAddress(initrd_addr), &mut file, len)
                    .map_err(|e| Error::ConfigPath {
                        key: "boot.initrd",
                        path,
                        reason: format!("cannot load: {e}"),
                    })?;
                Some((initrd_addr, size))
            }
            None => None,
        };
        let mut cmdline_bytes = cmdline.clone().into_bytes();
        cmdline_bytes.push(0);
        boot::write_blob(&memory, layout::CMDLINE_ADDR, &cmdline_bytes, "the kernel command line")?;
        boot::write_blob(
            &memory,
            layout::SETUP_DATA_ADDR,
            &boot::rng_seed_setup_data()?,
            "the RNG seed",
        )?;

        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_error("KVM_GET_SUPPORTED_CPUID"))?;
        let cpu_signature = supported
            .as_slice()
            .iter()
            .find(|e| e.function == 1)
            .map_or(0, |e| e.eax);
        let mp = mptable::build(layout::MPTABLE_ADDR, vcpus, cpu_signature).map_err(Error::GuestMemory)?;
        boot::write_blob(&memory, layout::MPTABLE_ADDR, &mp, "the MP table")?;
        let rsdp_addr = if config.machine.acpi {
            let tables = acpi::build(layout::ACPI_ADDR, vcpus, &virtio_slots);
            boot::write_blob(&memory, layout::ACPI_ADDR, &tables.bytes, "the ACPI tables")?;
            Some(tables.rsdp_addr)
        } else {
            None
        };
        let params = boot::build_boot_params(&boot::BootParamsInput {
            kernel: &kernel,
            mem_size,
            cmdline_len: cmdline.len(),
            initrd: initrd_region,
            rsdp_addr,
            setup_data: Some(layout::SETUP_DATA_ADDR),
        })?;
        Bytes::write_obj(&memory, params, GuestAddress(layout::ZERO_PAGE_ADDR))
            .map_err(|e| Error::GuestMemory(format!("cannot write boot_params: {e}")))?;
        regs::write_boot_tables(&memory).map_err(|e| Error::GuestMemory(format!("cannot write page tables: {e}")))?;

        // Devices.
        let legacy = devices::legacy_devices(config.console.output, config.machine.acpi, &vm_fd)?;
        let (mmio, virtio) = devices::attach_virtio(virtio_devices, &virtio_slots, &memory, &vm_fd)?;

        // vCPUs.
        for (fd, id) in vcpu_fds.iter().zip(0u8..) {
            let mut cpuid = supported.clone();
            cpuid::adjust(cpuid.as_mut_slice(), id, vcpus);
            fd.set_cpuid2(&cpuid).map_err(kvm_error("KVM_SET_CPUID2"))?;
            if let Some(msrs) = regs::boot_msrs() {
                fd.set_msrs(&msrs).map_err(kvm_error("KVM_SET_MSRS"))?;
            }
            let mut lapic = fd.get_lapic().map_err(kvm_error("KVM_GET_LAPIC"))?;
            regs::configure_lint(&mut lapic);
            fd.set_lapic(&lapic).map_err(kvm_error("KVM_SET_LAPIC"))?;
            fd.set_fpu(&regs::boot_fpu()).map_err(kvm_error("KVM_SET_FPU"))?;
            if id == 0 {
                let sregs = fd.get_sregs().map_err(kvm_error("KVM_GET_SREGS"))?;
                fd.set_sregs(&regs::boot_sregs(sregs))
                    .map_err(kvm_error("KVM_SET_SREGS"))?;
                fd.set_regs(&regs::boot_regs(kernel.entry))
                    .map_err(kvm_error("KVM_SET_REGS"))?;
            }
        }

        log::info!(
            "VM ready: {vcpus} vCPU(s), {} MiB, {:?} kernel entry {:#x}, cmdline: {cmdline}",
            config.machine.memory_mib,
            kernel.info.format,
            kernel.entry
        );
        let shared = Arc::new(VmShared::new()?);
        // Nothing can fail any more: the VMs' address pins stay (here, and
        // in the process that prepared the handoff, told so).
        nics.attachments.iter_mut().for_each(|a| a.keep());
        handoff.built();
        Ok(Vm {
            shared,
            vcpus: vcpu_fds,
            bus: Arc::new(vcpu::Buses { pio: legacy.bus, mmio }),
            serial: legacy.serial,
            reset: legacy.reset,
            sleep: legacy.sleep,
            _control: control,
            _networking: networking,
            filters,
            _watching: watching,
            _state: state_dir,
            virtio,
            console_input: config.console.input,
            cmdline,
            host,
            _vm_fd: vm_fd,
            _kvm: kvm,
            _handoff: handoff,
            _memory: memory,
        })
    }

    /// A hook that confines the calling thread as a `kind` thread with this
    /// VM's seccomp filters (nothing with `[security] seccomp = false`), for
    /// threads the embedding program starts to serve the VM (`mvm-vmm`'s
    /// signal thread).
    pub fn thread_start(&self, kind: ThreadKind) -> mvm_devices::ThreadStart {
        seccomp::thread_start(self.filters.as_ref(), kind)
    }

    /// A handle that stops this VM from another thread.
    pub fn handle(&self) -> VmHandle {
        VmHandle(self.shared.clone())
    }

    /// The kernel command line as passed to the guest.
    /// The descriptor that holds the state directory's lock, if the VM
    /// has one: a process forked from this one must close its copy, or the
    /// lock outlives this process (and the next start of the VM fails).
    pub fn state_lock_fd(&self) -> Option<std::os::fd::RawFd> {
        self._state.as_ref().map(state::StateDir::lock_fd)
    }

    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// The kind of KVM this VM runs on.
    pub fn host(&self) -> HostKind {
        self.host
    }

    /// Run the guest until it powers off, reboots, crashes or is stopped,
    /// then release the VM.
    ///
    /// The event loop runs on a thread of its own ("mvm-vm"), confined by
    /// its seccomp filter with `[security] seccomp` (the default), like the
    /// vCPU threads; the calling thread only waits, then tears down.
    pub fn run(mut self) -> Result<VmExit> {
        self.run_once()
    }

    /// Like [`Vm::run`], but the VM's KVM objects and memory stay until the
    /// `Vm` is dropped. Tearing a VM down costs KVM 15-25 ms on some hosts
    /// (mostly destroying the in-kernel irqchip); a caller that is about to
    /// exit can leave that work to the kernel after it has reported the
    /// result. A VM runs once: a second call returns an error.
    pub fn run_once(&mut self) -> Result<VmExit> {
        if self.vcpus.is_empty() {
            return Err(Error::Host {
                what: "running the VM".into(),
                source: std::io::Error::other("this VM has already run"),
            });
        }
        vcpu::install_kick_handler();
        let stdin = std::io::stdin().as_raw_fd();
        // Restored when `_terminal` drops, on every way out of this function.
        let _terminal = match self.console_input {
            ConsoleInput::Stdin => RawTerminal::enter(stdin)?,
            ConsoleInput::None => None,
        };

        let mut events: EventManager<Box<dyn MutEventSubscriber + Send>> =
            EventManager::new().map_err(|e| Error::Host {
                what: "creating the event loop".into(),
                source: std::io::Error::other(format!("{e:?}")),
            })?;
        let watcher = ExitWatcher {
            vm: self.shared.clone(),
            reset: raw(&self.reset, |d: &ResetController| {
                d.reset_requested().eventfd().as_raw_fd()
            }),
            poweroff: self
                .sleep
                .as_ref()
                .map(|s| raw(s, |d: &AcpiSleepControl| d.poweroff_requested().eventfd().as_raw_fd())),
        };
        events.add_subscriber(Box::new(watcher));
        for transport in &self.virtio {
            events.add_subscriber(Box::new(QueueNotifications::new(transport.clone())));
        }
        if self.console_input == ConsoleInput::Stdin {
            let interactive = _terminal.is_some();
            events.add_subscriber(Box::new(InputPump::new(
                stdin,
                interactive,
                self.serial.clone(),
                self.shared.clone(),
            )));
        }

        let start = Arc::new(vcpu::StartGate::default());
        let mut threads = Vec::with_capacity(self.vcpus.len());
        let mut spawn_error = None;
        for (id, fd) in self.vcpus.drain(..).enumerate() {
            let (bus, vm, start) = (self.bus.clone(), self.shared.clone(), start.clone());
            let confine = seccomp::thread_start(self.filters.as_ref(), ThreadKind::Vcpu);
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .stack_size(256 << 10)
                .spawn(move || {
                    mvm_devices::run_thread_start(&confine);
                    vcpu::run(fd, id as u32, bus, vm, start)
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    spawn_error = Some(e);
                    self.shared.request_stop(StopReason::Requested);
                    break;
                }
            }
        }
        {
            let mut ids = self.shared.vcpu_threads.lock().unwrap_or_else(|e| e.into_inner());
            ids.extend(threads.iter().map(|t| t.as_pthread_t()));
        }
        start.open();
        if let Some(e) = spawn_error {
            // The threads that did start see the stop at once.
            for t in threads {
                let _ = t.join();
            }
            return Err(Error::host("starting a vCPU thread")(e));
        }
        // The event loop gets a thread of its own, confined for good, so
        // that the caller's thread stays free to tear the VM down (stop
        // virtiofsd, unmount, unlock) and to build another VM.
        let looped = std::thread::scope(|scope| {
            let shared = &self.shared;
            let filters = self.filters.as_ref();
            let events = &mut events;
            let event_loop = std::thread::Builder::new()
                .name("mvm-vm".into())
                .spawn_scoped(scope, move || -> Result<()> {
                    if let Some(filters) = filters {
                        filters.apply(ThreadKind::EventLoop)?;
                    }
                    while !shared.stopping() {
                        if let Err(e) = events.run() {
                            shared.request_stop(StopReason::Requested);
                            log::error!("event loop failed: {e:?}");
                            break;
                        }
                    }
                    Ok(())
                })
                .map_err(Error::host("starting the event loop thread"))?;
            event_loop.join().unwrap_or_else(|_| {
                Err(Error::host("running the event loop")(std::io::Error::other(
                    "the event loop thread panicked (a VMM bug; please report it)",
                )))
            })
        });
        if looped.is_err() {
            self.shared.request_stop(StopReason::Requested);
        }
        self.shared.kick_vcpus();
        // Host programs see the VM's sockets close now, not at teardown.
        for transport in &self.virtio {
            transport.lock().unwrap_or_else(|e| e.into_inner()).stop();
        }
        let mut panicked = None;
        for (id, t) in threads.into_iter().enumerate() {
            if t.join().is_err() {
                panicked.get_or_insert(id);
            }
        }
        self.shared
            .vcpu_threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        if let Some(id) = panicked {
            self.shared.set_exit(VmExit::Crash(CrashReport {
                vcpu: id as u32,
                reason: "the vCPU thread panicked (a VMM bug; please report it)".into(),
                rip: None,
                internal: None,
            }));
        }
        looped?;
        let exit = self.shared.exit.lock().unwrap_or_else(|e| e.into_inner()).take();
        Ok(exit.unwrap_or(VmExit::Stopped(StopReason::Requested)))
    }
}

fn raw<T>(dev: &Arc<Mutex<T>>, f: impl Fn(&T) -> RawFd) -> RawFd {
    f(&dev.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Allocate guest RAM (lazily backed: untouched pages cost nothing) and
/// register it with KVM. `shared`: backed by a memfd that vhost-user
/// backends can map (see [`crate::memory::allocate`]).
fn create_memory(vm_fd: &VmFd, size: u64, shared: bool) -> Result<GuestMemoryMmap> {
    let memory = crate::memory::allocate(size, shared)?;
    for (slot, region) in memory.iter().enumerate() {
        let host = memory
            .get_host_address(region.start_addr())
            .map_err(|e| Error::GuestMemory(e.to_string()))?;
        let mem_region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region stays mapped for as long as the VM exists: the
        // Vm owns `memory` and drops it after the VM fd.
        unsafe { vm_fd.set_user_memory_region(mem_region) }.map_err(kvm_error("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(memory)
}

/// Runs a virtio device's queue work on the event loop when the guest's
/// notification (caught in KVM by ioeventfd) arrives.
struct QueueNotifications {
    transport: Arc<Mutex<MmioTransport>>,
    fds: Vec<RawFd>,
    device_fds: Vec<RawFd>,
}

impl QueueNotifications {
    fn new(transport: Arc<Mutex<MmioTransport>>) -> Self {
        let fds = raw_all(&transport);
        let device_fds = transport.lock().unwrap_or_else(|e| e.into_inner()).device_event_fds();
        QueueNotifications {
            transport,
            fds,
            device_fds,
        }
    }
}

fn raw_all(transport: &Arc<Mutex<MmioTransport>>) -> Vec<RawFd> {
    let t = transport.lock().unwrap_or_else(|e| e.into_inner());
    // A vhost-user backend reads these itself; reading them here would
    // steal its kicks.
    if t.owns_queue_notifications() {
        return Vec::new();
    }
    t.queue_events().iter().map(|e| e.as_raw_fd()).collect()
}

impl MutEventSubscriber for QueueNotifications {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if self.device_fds.contains(&events.fd()) {
            let mut t = self.transport.lock().unwrap_or_else(|e| e.into_inner());
            t.process_device_event(events.fd());
            return;
        }
        let Some(index) = self.fds.iter().position(|fd| *fd == events.fd()) else {
            return;
        };
        let mut t = self.transport.lock().unwrap_or_else(|e| e.into_inner());
        // Drain the counter first: a notification arriving while we work
        // then wakes us again instead of being lost.
        let _ = t.queue_events()[index].read();
        t.process_queue(index);
    }

    fn init(&mut self, ops: &mut EventOps) {
        for fd in &self.fds {
            if let Err(e) = ops.add(Events::new_raw(*fd, EventSet::IN)) {
                log::error!("cannot watch a virtio queue: {e:?}");
            }
        }
        // Edge-triggered: a device drains its descriptor until it would
        // block or the guest has no room; the guest's next notification
        // resumes it, so a full guest never makes the loop spin.
        for fd in &self.device_fds {
            if let Err(e) = ops.add(Events::new_raw(*fd, EventSet::IN | EventSet::EDGE_TRIGGERED)) {
                log::error!("cannot watch a device descriptor: {e:?}");
            }
        }
    }
}

/// Turns device requests (reset, power off) into the VM's exit.
struct ExitWatcher {
    vm: Arc<VmShared>,
    reset: RawFd,
    poweroff: Option<RawFd>,
}

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        let mut count = [0u8; 8];
        // SAFETY: drains an eventfd counter into a valid 8-byte buffer.
        unsafe { libc::read(fd, count.as_mut_ptr().cast(), 8) };
        if fd == self.reset {
            self.vm.set_exit(VmExit::Reboot);
        } else if Some(fd) == self.poweroff {
            self.vm.set_exit(VmExit::PowerOff);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let fds = [Some(self.vm.wake.as_raw_fd()), Some(self.reset), self.poweroff];
        for fd in fds.into_iter().flatten() {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("cannot watch VM exit events: {e:?}");
            }
        }
    }
}
