//! Device assembly: what the configuration asks for becomes devices here,
//! one function per kind, so that adding a kind of device is adding one
//! function and one line in [`virtio_devices`], not editing `Vm::new`.
//!
//! [`virtio_devices`] creates the virtio device models in the order the
//! guest sees them; [`attach_virtio`] puts each behind a virtio-mmio
//! transport with its notification eventfds and interrupt line in KVM;
//! [`legacy_devices`] makes the port-I/O devices.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use mvm_devices::bus::{mmio_bus, pio_bus, Bus};
use mvm_devices::legacy::{
    AcpiSleepControl, ResetController, SerialPort, COM1_IRQ, COM1_PORT_BASE, COM1_PORT_LEN, I8042_PORT_BASE,
    I8042_PORT_LEN, SLEEP_CONTROL_PORT,
};
use mvm_devices::legacy::{Rtc, RTC_PORT_BASE, RTC_PORT_LEN};
use mvm_devices::virtio::mmio::{MmioTransport, MMIO_WINDOW, NOTIFY_OFFSET};
use mvm_devices::virtio::rng::Rng;
use mvm_devices::virtio::VirtioDevice;
use mvm_devices::ThreadStart;
use vm_memory::GuestMemoryMmap;

use mvm_storage::fs::device::VirtioFs;
use mvm_storage::fs::overlay::{Overlay, OverlayOptions};

use mvm_net::host::network::{Attachment, Network};
use mvm_net::tap::Tap;

use crate::config::{default_tap_name, ConsoleOutput, NetConfig, ShareBackend, ShareConfig, VmConfig};
use crate::console::open_output;
use crate::privsep::Handoff;
use crate::state;
use crate::x86_64::{acpi, layout};
use crate::{Error, Result};
use std::path::PathBuf;

type Device = Box<dyn VirtioDevice>;

/// The virtio devices of a VM, in the order the guest sees them: root
/// image, disks, volumes (the root's writable layer first), network
/// interfaces, shares, rng, vsock. NICs on managed networks are attached
/// to them; their [`Attachment`]s go to `attachments`, in NIC order.
pub(crate) fn virtio_devices(
    config: &VmConfig,
    handoff: &mut Handoff,
    nics: &mut Nics,
    live_shares: &mut Vec<LiveShare>,
    confine: &ThreadStart,
) -> Result<Vec<Device>> {
    let mut devices: Vec<Device> = Vec::new();
    root_image(config, &mut devices)?;
    disks(config, &mut devices)?;
    volumes(config, &mut devices)?;
    nets(config, &mut devices, handoff, nics)?;
    shares(config, &mut devices, handoff, live_shares, confine)?;
    if config.machine.rng {
        devices.push(Box::new(Rng::new()));
    }
    if let Some(vsock) = &config.vsock {
        devices.push(Box::new(mvm_devices::virtio::vsock::Vsock::new(
            u64::from(vsock.guest_cid),
            &vsock.uds_path,
        )?));
    }
    Ok(devices)
}

/// How many virtio devices the configuration asks for (checked against
/// the MMIO slots before anything is created).
pub(crate) fn virtio_count(config: &VmConfig) -> usize {
    config
        .root
        .as_ref()
        .map_or(0, |r| 1 + usize::from(r.volume().is_some()))
        + config.disks.len()
        + config.volumes.len()
        + config.nets.len()
        + config.shares.len()
        + usize::from(config.machine.rng)
        + usize::from(config.vsock.is_some())
}

/// Whether guest RAM must be shareable with another process (a vhost-user
/// backend maps it).
pub(crate) fn needs_shared_memory(config: &VmConfig) -> bool {
    config.shares.iter().any(|s| s.backend == ShareBackend::Virtiofsd)
}

fn disks(config: &VmConfig, devices: &mut Vec<Device>) -> Result<()> {
    for (i, disk) in config.disks.iter().enumerate() {
        let serial = disk.serial.clone().unwrap_or_else(|| format!("mvm-disk{i}"));
        devices.push(Box::new(mvm_storage::block::Block::open(
            &disk.path,
            disk.read_only,
            &serial,
        )?));
    }
    Ok(())
}

/// The root image, read-only: every VM made from it shares the one file.
fn root_image(config: &VmConfig, devices: &mut Vec<Device>) -> Result<()> {
    if let Some(root) = &config.root {
        devices.push(Box::new(mvm_storage::block::Block::open(
            &root.image,
            true,
            crate::config::ROOT_SERIAL,
        )?));
    }
    Ok(())
}

fn volumes(config: &VmConfig, devices: &mut Vec<Device>) -> Result<()> {
    let root_volume = config.root.as_ref().and_then(|r| r.volume());
    for volume in root_volume.iter().chain(&config.volumes) {
        let image = state::prepare_volume(config, volume)?;
        devices.push(Box::new(mvm_storage::block::Block::open(
            &image,
            false,
            &state::volume_serial(volume),
        )?));
    }
    Ok(())
}

/// The NICs' side on the host: where each managed NIC's network put it.
#[derive(Default)]
pub(crate) struct Nics {
    /// Attachments made here, in NIC order (they undo themselves unless
    /// kept once the VM starts).
    pub attachments: Vec<Attachment>,
    /// The first managed NIC's address: the port forwards' target.
    pub first_ip: Option<std::net::Ipv4Addr>,
}

fn nets(config: &VmConfig, devices: &mut Vec<Device>, handoff: &mut Handoff, nics: &mut Nics) -> Result<()> {
    for (i, net) in config.nets.iter().enumerate() {
        let mac = nic_mac(config, i, net);
        let tap = match handoff.take_tap(i) {
            Some(prepared) => {
                nics.first_ip = nics.first_ip.or(prepared.ip);
                mvm_net::tap::Tap::from_fd(prepared.fd)?
            }
            None => {
                let (tap, attachment) = open_tap(config, i, net)?;
                if let Some(a) = attachment {
                    nics.first_ip = nics.first_ip.or(Some(a.ip()));
                    nics.attachments.push(a);
                }
                tap
            }
        };
        devices.push(Box::new(mvm_net::device::Net::new(tap, mac)));
    }
    Ok(())
}

fn nic_mac(config: &VmConfig, i: usize, net: &NetConfig) -> [u8; 6] {
    net.mac.unwrap_or_else(|| mvm_net::mac_for(&config.name, i))
}

/// Open NIC `i`'s TAP (creating it) and make it a port of its bridge or
/// managed network (needs CAP_NET_ADMIN). The TAP first, then the network:
/// a TAP that cannot be made leaves no network change behind.
pub(crate) fn open_tap(config: &VmConfig, i: usize, net: &NetConfig) -> Result<(Tap, Option<Attachment>)> {
    let mac = nic_mac(config, i, net);
    let tap_name = net.tap.clone().unwrap_or_else(|| default_tap_name(mac));
    let tap = Tap::open(&tap_name)?;
    if let Some(bridge) = &net.bridge {
        tap.attach_to_bridge(bridge)?;
    }
    let attachment = match &net.network {
        Some(network) => Some(Network::open(&config.state_root, network)?.attach(&config.name, mac, &tap_name)?),
        None => None,
    };
    Ok((tap, attachment))
}

/// A share whose file server runs in this process, reachable from the
/// VMM's other threads (project watcher, control socket) between two
/// guest requests.
#[derive(Clone)]
pub(crate) struct LiveShare {
    pub tag: String,
    pub fs: Arc<Mutex<Overlay>>,
}

fn shares(
    config: &VmConfig,
    devices: &mut Vec<Device>,
    handoff: &Handoff,
    live_shares: &mut Vec<LiveShare>,
    confine: &ThreadStart,
) -> Result<()> {
    for share in &config.shares {
        // virtiofsd already serves it (started by the preparing process).
        if let Some(socket) = handoff.virtiofsd_socket(&share.tag) {
            devices.push(connect_virtiofsd(share, socket)?);
            continue;
        }
        devices.push(share_device(config, share, live_shares, confine.clone())?);
    }
    Ok(())
}

fn share_device(
    config: &VmConfig,
    share: &ShareConfig,
    live_shares: &mut Vec<LiveShare>,
    confine: ThreadStart,
) -> Result<Device> {
    let layers = state::prepare_share(config, share)?;
    match share.backend {
        ShareBackend::Builtin => {
            // Without an overlay the source itself is the (only, writable)
            // layer.
            let lower = share.overlay.then_some(layers.source.as_path());
            let upper = layers.upper.as_deref().unwrap_or(&layers.source);
            let fs = Arc::new(Mutex::new(Overlay::new(lower, upper, OverlayOptions::default())?));
            live_shares.push(LiveShare {
                tag: share.tag.clone(),
                fs: Arc::clone(&fs),
            });
            Ok(Box::new(VirtioFs::new(&share.tag, Box::new(fs))?))
        }
        ShareBackend::Virtiofsd => virtiofsd_share(share, &layers, confine),
    }
}

/// Queue size offered for a virtiofsd share (virtiofsd accepts up to
/// 32768; this bounds the requests in flight, not their size).
const VIRTIOFSD_QUEUE_SIZE: u16 = 1024;

/// A vhost-user-fs device: connected to the user's virtiofsd (`socket`),
/// or to one started here over a host overlay mount of the share's layers
/// (the device owns both; they end with the VM).
fn virtiofsd_share(share: &ShareConfig, layers: &state::ShareLayers, confine: ThreadStart) -> Result<Device> {
    if let Some(socket) = &share.socket {
        return connect_virtiofsd(share, socket);
    }
    let device = with_virtiofsd(share, layers, confine, |spec| spec.start())?;
    Ok(Box::new(device))
}

/// A vhost-user-fs device on a virtiofsd already serving `share` at
/// `socket` (the user's, or the one a privileged parent started).
fn connect_virtiofsd(share: &ShareConfig, socket: &std::path::Path) -> Result<Device> {
    let device =
        mvm_storage::fs::vhost_user::VhostUserFs::connect(socket, &share.tag, VIRTIOFSD_QUEUE_SIZE).map_err(|e| {
            Error::Share {
                tag: share.tag.clone(),
                reason: e.to_string(),
            }
        })?;
    Ok(Box::new(device))
}

/// Hand `f` the virtiofsd setup of `share` over its layers, mounted and
/// served at [`virtiofsd_paths`]: `VirtiofsdShare::start` (serve and
/// connect) or `::serve` (serve only, for another process to connect).
pub(crate) fn with_virtiofsd<T>(
    share: &ShareConfig,
    layers: &state::ShareLayers,
    confine: ThreadStart,
    f: impl FnOnce(&mvm_storage::fs::vhost_user::VirtiofsdShare<'_>) -> std::result::Result<T, mvm_storage::Error>,
) -> Result<T> {
    let (merged, socket) = virtiofsd_paths(share, layers);
    let spec = mvm_storage::fs::vhost_user::VirtiofsdShare {
        tag: &share.tag,
        source: &layers.source,
        upper: layers.upper.as_deref(),
        merged: &merged,
        socket: &socket,
        binary: None,
        queue_size: VIRTIOFSD_QUEUE_SIZE,
        thread_start: confine,
    };
    f(&spec).map_err(|e| Error::Share {
        tag: share.tag.clone(),
        reason: e.to_string(),
    })
}

/// Where a virtiofsd share's overlay is mounted and its socket goes:
/// beside the upper layer, like its work directory (in the state
/// directory that is overlay/<tag>.merged and overlay/<tag>.sock).
fn virtiofsd_paths(share: &ShareConfig, layers: &state::ShareLayers) -> (PathBuf, PathBuf) {
    match &layers.upper {
        Some(upper) => (sibling(upper, "merged"), sibling(upper, "sock")),
        None => {
            let run = std::env::temp_dir().join(format!("mvm-{}-{}", std::process::id(), share.tag));
            (run.with_extension("merged"), run.with_extension("sock"))
        }
    }
}

/// `<dir>/<name>.<ext>` for `<dir>/<name>`.
fn sibling(path: &std::path::Path, ext: &str) -> std::path::PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".");
    name.push(ext);
    path.with_file_name(name)
}

/// The MMIO windows and interrupt lines of `count` virtio devices.
pub(crate) fn virtio_slots(count: usize) -> Vec<acpi::MmioDevice> {
    (0..count.min(layout::VIRTIO_MAX_DEVICES))
        .map(|i| acpi::MmioDevice {
            base: layout::VIRTIO_MMIO_BASE + i as u64 * MMIO_WINDOW,
            len: MMIO_WINDOW as u32,
            gsi: layout::VIRTIO_FIRST_GSI + i as u32,
        })
        .collect()
}

/// Put each device behind a virtio-mmio transport in its slot: queue
/// notifications caught by KVM (ioeventfd), interrupts injected by KVM
/// (irqfd), registers on the MMIO bus.
pub(crate) fn attach_virtio(
    devices: Vec<Device>,
    slots: &[acpi::MmioDevice],
    memory: &GuestMemoryMmap,
    vm_fd: &VmFd,
) -> Result<(Bus, Vec<Arc<Mutex<MmioTransport>>>)> {
    let mut mmio = mmio_bus();
    let mut transports = Vec::with_capacity(devices.len());
    for (device, slot) in devices.into_iter().zip(slots) {
        let transport = MmioTransport::new(device, memory.clone())?;
        for (queue, evt) in transport.queue_events().iter().enumerate() {
            vm_fd
                .register_ioevent(evt, &IoEventAddress::Mmio(slot.base + NOTIFY_OFFSET), queue as u32)
                .map_err(Error::kvm("KVM_IOEVENTFD (virtio queue notify)"))?;
        }
        vm_fd
            .register_irqfd(transport.interrupt().line(), slot.gsi)
            .map_err(Error::kvm("KVM_IRQFD (virtio)"))?;
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert("virtio-mmio", slot.base, MMIO_WINDOW, transport.clone())?;
        transports.push(transport);
    }
    Ok((mmio, transports))
}

/// The port-I/O devices: COM1 (with its interrupt), the i8042 reset line,
/// the CMOS RTC, and the ACPI sleep control when the guest has ACPI.
pub(crate) struct LegacyDevices {
    pub bus: Bus,
    pub serial: Arc<Mutex<SerialPort>>,
    pub reset: Arc<Mutex<ResetController>>,
    pub sleep: Option<Arc<Mutex<AcpiSleepControl>>>,
}

pub(crate) fn legacy_devices(console: ConsoleOutput, acpi: bool, vm_fd: &VmFd) -> Result<LegacyDevices> {
    let serial = Arc::new(Mutex::new(SerialPort::new(open_output(console)?)?));
    {
        let port = serial.lock().unwrap_or_else(|e| e.into_inner());
        vm_fd
            .register_irqfd(port.irq().eventfd(), COM1_IRQ)
            .map_err(Error::kvm("KVM_IRQFD (serial)"))?;
    }
    let reset = Arc::new(Mutex::new(ResetController::new()?));
    let mut bus = pio_bus();
    bus.insert("serial", COM1_PORT_BASE.into(), COM1_PORT_LEN.into(), serial.clone())?;
    bus.insert("i8042", I8042_PORT_BASE.into(), I8042_PORT_LEN.into(), reset.clone())?;
    bus.insert(
        "rtc",
        RTC_PORT_BASE.into(),
        RTC_PORT_LEN.into(),
        Arc::new(Mutex::new(Rtc::new())),
    )?;
    let sleep = if acpi {
        let dev = Arc::new(Mutex::new(AcpiSleepControl::new()?));
        bus.insert("acpi-sleep", SLEEP_CONTROL_PORT.into(), 1, dev.clone())?;
        Some(dev)
    } else {
        None
    };
    Ok(LegacyDevices {
        bus,
        serial,
        reset,
        sleep,
    })
}
