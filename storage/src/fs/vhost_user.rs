//! virtio-fs served by an external vhost-user backend (virtiofsd): the
//! guest sees the same device as [`super::device`] (type 26, tag in the
//! config space, a high-priority queue and one request queue), but the
//! rings are processed by the backend process, which maps guest memory
//! itself. The VMM only describes memory and rings to it over the
//! vhost-user socket, hands it the queue-notify eventfds as kicks, and
//! turns its "call" eventfds into interrupts.
//!
//! Requirements: guest RAM must be shared (a memfd, see
//! `microvm_dev::memory::allocate`), or activation fails.
//!
//! No vhost-user protocol features are negotiated: without
//! `VHOST_USER_F_PROTOCOL_FEATURES` the backend enables rings as soon as
//! they are started (no `SET_VRING_ENABLE`), and the config space is ours
//! (the tag), so `CONFIG` is not needed either.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mvm_devices::virtio::{DeviceError, VirtioDevice, VIRTIO_F_VERSION_1};
use vhost::vhost_user::Frontend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::host_overlay::HostOverlay;
use super::virtiofsd::{self, Virtiofsd};
use super::{ConfigSpace, DEVICE_TYPE_FS};
use crate::Error;

/// How long [`VhostUserFs::connect`] waits for the backend to accept.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a reply from the backend may take before the device fails
/// (requests are sent from a vCPU thread, which must not hang forever).
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// hiprio + one request queue.
const NUM_QUEUES: usize = 2;
/// Ring features the backend implements and the guest may use; the
/// transport adds VERSION_1. Not VHOST_F_LOG_ALL (migration) nor
/// PROTOCOL_FEATURES (vhost-user's own bit).
const PASSED_THROUGH: u64 = (1 << 28) | (1 << 29); // INDIRECT_DESC, EVENT_IDX

/// The frontend of one virtio-fs device whose backend is a vhost-user
/// process.
pub struct VhostUserFs {
    config: ConfigSpace,
    tag: String,
    queue_sizes: [u16; NUM_QUEUES],
    socket: PathBuf,
    // Field order is drop order: close the connection, then stop the
    // daemon, then unmount what it served.
    frontend: Frontend,
    daemon: Option<Virtiofsd>,
    overlay: Option<HostOverlay>,
    backend_features: u64,
    driver_features: u64,
    /// Used-buffer notifications from the backend, one per queue; they
    /// live as long as the device because the event loop watches them.
    calls: [EventFd; NUM_QUEUES],
    /// Queues handed to the backend since the last activation.
    started: [bool; NUM_QUEUES],
    hung_up: bool,
}

impl VhostUserFs {
    /// Connect to the backend listening on `socket` (retrying while the
    /// socket is missing or refuses, up to [`CONNECT_TIMEOUT`]), check its
    /// features and claim it (`SET_OWNER`). `tag` is what the guest mounts
    /// (`mount -t virtiofs <tag> <dir>`): 1 to 36 bytes, no NUL or other
    /// control characters.
    pub fn connect(socket: &Path, tag: &str, queue_size: u16) -> Result<Self, Error> {
        let err = |reason: String| Error::VhostUser {
            tag: tag.to_string(),
            socket: socket.to_path_buf(),
            reason,
        };
        let config = ConfigSpace::new(tag)?;
        if !queue_size.is_power_of_two() {
            return Err(err(format!("queue size {queue_size} is not a power of two")));
        }
        let stream = connect_retrying(socket, CONNECT_TIMEOUT).map_err(|e| err(format!("cannot connect: {e}")))?;
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(REPLY_TIMEOUT)))
            .map_err(|e| err(format!("socket setup: {e}")))?;
        let frontend = Frontend::from_stream(stream, NUM_QUEUES as u64);
        let backend_features = frontend.get_features().map_err(|e| err(format!("GET_FEATURES: {e}")))?;
        if backend_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(err(format!(
                "the backend does not offer VIRTIO_F_VERSION_1 (features {backend_features:#x})"
            )));
        }
        frontend.set_owner().map_err(|e| err(format!("SET_OWNER: {e}")))?;
        let new_call = || EventFd::new(EFD_NONBLOCK).map_err(|e| err(format!("eventfd: {e}")));
        Ok(VhostUserFs {
            config,
            tag: tag.to_string(),
            queue_sizes: [queue_size; NUM_QUEUES],
            socket: socket.to_path_buf(),
            frontend,
            daemon: None,
            overlay: None,
            backend_features,
            driver_features: 0,
            calls: [new_call()?, new_call()?],
            started: [false; NUM_QUEUES],
            hung_up: false,
        })
    }

    /// Tie `daemon`'s life to this device: it is stopped when the VM
    /// stops or the device is dropped.
    pub fn own_daemon(&mut self, daemon: Virtiofsd) {
        self.daemon = Some(daemon);
    }

    /// Likewise for the overlay the daemon serves (unmounted after the
    /// daemon is stopped).
    pub fn own_overlay(&mut self, overlay: HostOverlay) {
        self.overlay = Some(overlay);
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// What the guest may negotiate besides VERSION_1.
    pub fn backend_features(&self) -> u64 {
        self.backend_features
    }

    fn backend_error(&self, what: &str, e: impl std::fmt::Display) -> DeviceError {
        let msg = format!(
            "virtiofsd at {} (tag \"{}\"): {what}: {e}",
            self.socket.display(),
            self.tag
        );
        log::error!("{msg}");
        DeviceError::Backend(msg)
    }

    /// Describe guest memory and the ready rings to the backend and start them.
    fn start(&mut self, mem: &GuestMemoryMmap, queues: &[Queue], kicks: &[EventFd]) -> Result<(), DeviceError> {
        let features = (self.driver_features & self.backend_features) | VIRTIO_F_VERSION_1;
        self.frontend
            .set_features(features)
            .map_err(|e| self.backend_error("SET_FEATURES", e))?;
        let mut regions = Vec::new();
        for region in mem.iter() {
            let info = VhostUserMemoryRegionInfo::from_guest_region(region).map_err(|_| {
                self.backend_error(
                    "guest memory",
                    "it is private to the VMM; a VM with a virtiofsd share must allocate shared memory",
                )
            })?;
            regions.push(info);
        }
        self.frontend
            .set_mem_table(&regions)
            .map_err(|e| self.backend_error("SET_MEM_TABLE", e))?;
        for (index, (queue, kick)) in queues.iter().zip(kicks).enumerate() {
            let Some(call) = self.calls.get(index) else { break };
            if !queue.ready() {
                continue;
            }
            let size = queue.size();
            let n = usize::from(size);
            // The backend finds rings by their address in this process:
            // each must lie within one memory region.
            let host = |addr: u64, len: usize, what: &str| -> Result<u64, DeviceError> {
                mem.get_slice(GuestAddress(addr), len)
                    .map(|s| s.ptr_guard().as_ptr() as u64)
                    .map_err(|e| DeviceError::Queue(index as u16, format!("{what} at {addr:#x}: {e}")))
            };
            let ring = VringConfigData {
                queue_max_size: queue.max_size(),
                queue_size: size,
                flags: 0,
                desc_table_addr: host(queue.desc_table(), 16 * n, "descriptor table")?,
                used_ring_addr: host(queue.used_ring(), 6 + 8 * n, "used ring")?,
                avail_ring_addr: host(queue.avail_ring(), 6 + 2 * n, "available ring")?,
                log_addr: None,
            };
            // Before the first message: a reset must stop even a ring that
            // failed half way.
            if let Some(started) = self.started.get_mut(index) {
                *started = true;
            }
            let fe = &self.frontend;
            fe.set_vring_num(index, size)
                .and_then(|()| fe.set_vring_addr(index, &ring))
                .and_then(|()| fe.set_vring_base(index, 0))
                .and_then(|()| fe.set_vring_call(index, call))
                .and_then(|()| fe.set_vring_kick(index, kick))
                .map_err(|e| self.backend_error(&format!("starting queue {index}"), e))?;
        }
        Ok(())
    }

    /// Did the backend close its end? (Peeks: replies the frontend reads
    /// synchronously are not consumed here.)
    fn backend_hung_up(&self) -> bool {
        let mut byte = 0u8;
        // SAFETY: reads at most one byte into a valid buffer.
        let n = unsafe {
            libc::recv(
                self.frontend.as_raw_fd(),
                (&mut byte as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n == 0 || (n < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EAGAIN))
    }
}

/// Connect to a Unix socket that may not exist or listen yet (virtiofsd
/// creates the file at bind(2), a moment before it listens).
pub fn connect_retrying(socket: &Path, timeout: Duration) -> std::io::Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(socket) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e),
        }
    }
}

impl VirtioDevice for VhostUserFs {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.backend_features & PASSED_THROUGH
    }

    fn ack_features(&mut self, features: u64) {
        self.driver_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn process_queue(&mut self, _: usize, _: &mut Queue, _: &GuestMemoryMmap) -> Result<bool, DeviceError> {
        // The backend serves the rings; notifications go to it directly.
        Ok(false)
    }

    fn activate(&mut self, mem: &GuestMemoryMmap, queues: &[Queue], kicks: &[EventFd]) -> Result<(), DeviceError> {
        if self.hung_up || self.backend_hung_up() {
            self.hung_up = true;
            return Err(self.backend_error("activating", "the backend has exited"));
        }
        self.start(mem, queues, kicks)
    }

    fn owns_queue_notifications(&self) -> bool {
        true
    }

    fn reset(&mut self) {
        // GET_VRING_BASE stops a ring; the backend forgets its kick and
        // call until the next activation.
        for (index, started) in std::mem::take(&mut self.started).into_iter().enumerate() {
            if started && !self.hung_up {
                if let Err(e) = self.frontend.get_vring_base(index) {
                    log::warn!("virtiofsd at {}: stopping queue {index}: {e}", self.socket.display());
                }
            }
        }
        for call in &self.calls {
            let _ = call.read();
        }
    }

    fn stop(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            daemon.stop();
        }
        self.overlay = None;
    }

    fn event_fds(&self) -> Vec<RawFd> {
        let mut fds: Vec<RawFd> = self.calls.iter().map(AsRawFd::as_raw_fd).collect();
        fds.push(self.frontend.as_raw_fd());
        fds
    }

    fn process_event(&mut self, fd: RawFd, _: &mut [Queue], _: &GuestMemoryMmap) -> Result<bool, DeviceError> {
        if let Some(call) = self.calls.iter().find(|c| c.as_raw_fd() == fd) {
            return Ok(call.read().is_ok());
        }
        if fd == self.frontend.as_raw_fd() && !self.hung_up && self.backend_hung_up() {
            self.hung_up = true;
            let said = self.daemon.as_ref().map(Virtiofsd::stderr_tail).unwrap_or_default();
            return Err(self.backend_error("connection lost", format!("the backend exited{said}")));
        }
        Ok(false)
    }
}

/// One `backend = "virtiofsd"` share: a virtiofsd of its own serving the
/// project directory, directly or (with `upper`) merged under a per-VM
/// upper directory by a host overlay mount.
#[derive(Clone)]
pub struct VirtiofsdShare<'a> {
    /// What the guest mounts.
    pub tag: &'a str,
    /// The project directory (the read-only lower layer with `upper`).
    pub source: &'a Path,
    /// The VM's changes (upper layer; its work directory goes next to it,
    /// see [`HostOverlay::work_dir_for`]). `None`: share `source` itself.
    pub upper: Option<&'a Path>,
    /// Mountpoint of the merged view (with `upper`); created and removed.
    pub merged: &'a Path,
    /// virtiofsd's socket (at most 107 bytes: a Unix socket path).
    pub socket: &'a Path,
    /// virtiofsd to run; `None` looks for it (see [`virtiofsd::find_binary`]).
    pub binary: Option<&'a Path>,
    pub queue_size: u16,
    /// Run first by the thread that logs virtiofsd's stderr.
    pub thread_start: mvm_devices::ThreadStart,
}

impl VirtiofsdShare<'_> {
    /// Mount, start virtiofsd and connect: the device owns the daemon and
    /// the mount, so they go away with the VM (or with the error).
    pub fn start(&self) -> Result<VhostUserFs, Error> {
        let (daemon, overlay) = self.serve()?;
        let mut device = VhostUserFs::connect(self.socket, self.tag, self.queue_size).map_err(|e| match e {
            Error::VhostUser { tag, socket, reason } => Error::VhostUser {
                tag,
                socket,
                reason: format!("{reason}{}", daemon.stderr_tail()),
            },
            other => other,
        })?;
        device.own_daemon(daemon);
        if let Some(overlay) = overlay {
            device.own_overlay(overlay);
        }
        Ok(device)
    }

    /// Mount the overlay (when there is an upper layer) and start
    /// virtiofsd on `socket`, without connecting: for a privileged process
    /// that serves the share to an unprivileged VMM, which connects. Drop
    /// both to stop serving.
    pub fn serve(&self) -> Result<(Virtiofsd, Option<HostOverlay>), Error> {
        let binary = virtiofsd::find_binary(self.binary)?;
        if self.socket.as_os_str().len() > 107 {
            return Err(Error::VhostUser {
                tag: self.tag.to_string(),
                socket: self.socket.to_path_buf(),
                reason: "the socket path is longer than 107 bytes; use a shorter directory".into(),
            });
        }
        let overlay = match self.upper {
            Some(upper) => Some(HostOverlay::mount(self.source, upper, self.merged)?),
            None => None,
        };
        let shared_dir = overlay.as_ref().map_or(self.source, HostOverlay::merged);
        let daemon = Virtiofsd::start(&binary, self.socket, shared_dir, &self.thread_start)?;
        Ok((daemon, overlay))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, FileOffset};

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mvm-vhost-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A backend that answers GET_FEATURES with `features`, takes
    /// SET_OWNER, and holds the connection until the test ends.
    fn fake_backend(socket: &Path, features: u64) -> std::thread::JoinHandle<Vec<u32>> {
        let listener = UnixListener::bind(socket).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut requests = Vec::new();
            let mut hdr = [0u8; 12];
            while s.read_exact(&mut hdr).is_ok() {
                let code = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
                let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap());
                let mut body = vec![0u8; size as usize];
                s.read_exact(&mut body).unwrap();
                requests.push(code);
                if code == 1 {
                    // GET_FEATURES: reply flag (0x4) | version 1.
                    let mut reply = Vec::new();
                    for v in [1u32, 0x5, 8] {
                        reply.extend_from_slice(&v.to_le_bytes());
                    }
                    reply.extend_from_slice(&features.to_le_bytes());
                    s.write_all(&reply).unwrap();
                }
            }
            requests
        })
    }

    const VIRTIOFSD_LIKE: u64 = VIRTIO_F_VERSION_1 | (1 << 30) | (1 << 29) | (1 << 28) | (1 << 26);

    #[test]
    fn config_space_holds_the_tag_and_one_request_queue() {
        let dir = temp_dir("config");
        let socket = dir.join("sock");
        let backend = fake_backend(&socket, VIRTIOFSD_LIKE);
        let dev = VhostUserFs::connect(&socket, "project", 128).unwrap();
        assert_eq!(dev.device_type(), 26);
        assert_eq!(dev.queue_max_sizes(), &[128, 128]);
        let mut tag = [0xffu8; 36];
        dev.read_config(0, &mut tag);
        assert_eq!(&tag[..7], b"project");
        assert!(tag[7..].iter().all(|b| *b == 0), "NUL padded");
        let mut n = [0u8; 4];
        dev.read_config(36, &mut n);
        assert_eq!(u32::from_le_bytes(n), 1);
        // Out of range reads leave the (zeroed) buffer alone.
        let mut past = [0u8; 4];
        dev.read_config(38, &mut past);
        assert_eq!(past, [0; 4]);
        dev.read_config(u64::MAX, &mut past);
        assert_eq!(past, [0; 4]);
        // Only ring features reach the guest, not vhost-user's own bits.
        assert_eq!(dev.features(), (1 << 29) | (1 << 28));
        drop(dev);
        assert_eq!(backend.join().unwrap(), vec![1, 3], "GET_FEATURES, SET_OWNER");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn private_guest_memory_fails_activation_clearly() {
        let dir = temp_dir("private");
        let socket = dir.join("sock");
        let backend = fake_backend(&socket, VIRTIOFSD_LIKE);
        let mut dev = VhostUserFs::connect(&socket, "t", 16).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let ring = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        let kicks = [EventFd::new(EFD_NONBLOCK).unwrap(), EventFd::new(EFD_NONBLOCK).unwrap()];
        dev.ack_features(VIRTIO_F_VERSION_1);
        let err = dev
            .activate(&mem, &[Queue::new(16).unwrap(), ring.create_queue().unwrap()], &kicks)
            .unwrap_err();
        assert!(err.to_string().contains("private"), "{err}");
        drop(dev);
        // SET_FEATURES (2) went out; no memory table, no rings.
        assert_eq!(backend.join().unwrap(), vec![1, 3, 2]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_tags_and_backends_are_refused() {
        let dir = temp_dir("refuse");
        let socket = dir.join("sock");
        for tag in ["", "a\0b", &"x".repeat(37)] {
            let err = VhostUserFs::connect(&socket, tag, 128).err().unwrap();
            assert!(err.to_string().contains("must be 1 to 36 bytes"), "{err}");
        }
        let _backend = fake_backend(&socket, 1 << 30);
        let err = VhostUserFs::connect(&socket, "t", 128).err().unwrap();
        assert!(err.to_string().contains("VIRTIO_F_VERSION_1"), "{err}");
        // Nobody listening: a clear error after the timeout.
        let started = Instant::now();
        let err = connect_retrying(&dir.join("none"), Duration::from_millis(50)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
        assert!(started.elapsed() >= Duration::from_millis(50));
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Guest memory in a memfd, as the VMM allocates it for virtiofsd.
    fn shared_memory(size: usize) -> GuestMemoryMmap {
        // SAFETY: valid name and flags.
        let fd = unsafe { libc::memfd_create(c"test-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a new descriptor nothing else owns.
        let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(size as u64).unwrap();
        GuestMemoryMmap::from_ranges_with_files([(GuestAddress(0), size, Some(FileOffset::new(file, 0)))]).unwrap()
    }

    fn wait_readable(fd: RawFd, timeout_ms: i32) -> bool {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, timeout_ms) == 1 }
    }

    const FUSE_GETATTR: u32 = 3;
    const FUSE_INIT: u32 = 26;

    /// Put one FUSE request on the mock ring at `slot` and return the
    /// address of its reply buffer.
    fn send(mem: &GuestMemoryMmap, q: &MockSplitQueue<GuestMemoryMmap>, slot: u16, opcode: u32, body: &[u8]) -> u64 {
        let (req, reply) = (0x10_000 + u64::from(slot) * 0x2000, 0x11_000 + u64::from(slot) * 0x2000);
        let mut msg = Vec::new();
        msg.extend_from_slice(&(40 + body.len() as u32).to_le_bytes());
        msg.extend_from_slice(&opcode.to_le_bytes());
        msg.extend_from_slice(&(u64::from(slot) + 1).to_le_bytes()); // unique
        msg.extend_from_slice(&1u64.to_le_bytes()); // node id: the root
        msg.extend_from_slice(&[0u8; 16]); // uid, gid, pid, extlen, padding
        msg.extend_from_slice(body);
        mem.write_slice(&msg, GuestAddress(req)).unwrap();
        let descs = [
            RawDescriptor::from(Descriptor::new(req, msg.len() as u32, 1, 1)), // NEXT
            RawDescriptor::from(Descriptor::new(reply, 0x1000, 2, 0)),         // WRITE
        ];
        q.add_desc_chains(&descs, slot * 2).unwrap();
        reply
    }

    /// The reply header's error and the first u32 of its body.
    fn reply(mem: &GuestMemoryMmap, addr: u64) -> (i32, u32) {
        let error: i32 = mem.read_obj(GuestAddress(addr + 4)).unwrap();
        let first: u32 = mem.read_obj(GuestAddress(addr + 16)).unwrap();
        (error, first)
    }

    /// The whole path against the real virtiofsd: rings described over
    /// vhost-user, a kick through the transport's eventfd, the reply in
    /// guest memory and a call back; then reset, restart and backend death.
    #[test]
    fn serves_fuse_requests_through_a_real_virtiofsd() {
        let Ok(binary) = virtiofsd::find_binary(None) else {
            eprintln!("virtiofsd not installed (scripts/setup-host.sh); skipped");
            return;
        };
        let dir = temp_dir("real");
        std::fs::create_dir_all(dir.join("share")).unwrap();
        let socket = dir.join("sock");
        let started = Instant::now();
        let daemon = Virtiofsd::start(&binary, &socket, &dir.join("share"), &None).unwrap();
        let spawned = started.elapsed();
        let mut dev = VhostUserFs::connect(&socket, "share", 16).unwrap();
        eprintln!(
            "virtiofsd: socket after {spawned:?}, connected and owned after {:?}",
            started.elapsed()
        );
        dev.own_daemon(daemon);

        let mem = shared_memory(1 << 20);
        let kicks = [EventFd::new(EFD_NONBLOCK).unwrap(), EventFd::new(EFD_NONBLOCK).unwrap()];
        // hiprio left unready, as a driver may
        let hiprio = || Queue::new(16).unwrap();
        let ring = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        dev.ack_features(VIRTIO_F_VERSION_1 | dev.features());
        dev.activate(&mem, &[hiprio(), ring.create_queue().unwrap()], &kicks)
            .unwrap();
        let [_, call, sock] = dev.event_fds()[..] else { panic!() };

        let mut init = [0u8; 64];
        init[0..4].copy_from_slice(&7u32.to_le_bytes());
        init[4..8].copy_from_slice(&31u32.to_le_bytes());
        let at = send(&mem, &ring, 0, FUSE_INIT, &init);
        let sent = Instant::now();
        kicks[1].write(1).unwrap();
        assert!(wait_readable(call, 5000), "no used-buffer call from virtiofsd");
        eprintln!("FUSE_INIT round trip {:?}", sent.elapsed());
        let mut queues = [hiprio(), ring.create_queue().unwrap()];
        assert!(dev.process_event(call, &mut queues, &mem).unwrap(), "interrupt due");
        assert!(!dev.process_event(call, &mut queues, &mem).unwrap(), "drained");
        assert_eq!(ring.used().idx().load(), 1);
        assert_eq!(reply(&mem, at), (0, 7), "FUSE_INIT answered with major 7");
        assert!(!dev.process_event(sock, &mut queues, &mem).unwrap(), "backend alive");

        // Guest reset: rings stopped; a fresh ring after reactivation works.
        dev.reset();
        let ring2 = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
        dev.activate(&mem, &[hiprio(), ring2.create_queue().unwrap()], &kicks)
            .unwrap();
        let at = send(&mem, &ring2, 0, FUSE_GETATTR, &[0u8; 16]);
        kicks[1].write(1).unwrap();
        assert!(wait_readable(call, 5000), "no call after reactivation");
        assert!(dev.process_event(call, &mut queues, &mem).unwrap());
        let (error, _) = reply(&mem, at);
        assert_eq!(error, 0, "GETATTR of the root");
        let mode: u32 = mem.read_obj(GuestAddress(at + 16 + 16 + 60)).unwrap(); // attr_valid(8) + nsec(4) + pad(4), then attr.mode
        assert_eq!(mode & libc::S_IFMT, libc::S_IFDIR);

        // Backend death is noticed on the socket and fails the device.
        dev.stop();
        assert!(wait_readable(sock, 5000), "hang-up seen");
        let err = dev.process_event(sock, &mut queues, &mem).unwrap_err();
        assert!(
            err.to_string().contains("virtiofsd at") && err.to_string().contains("exited"),
            "{err}"
        );
        dev.reset();
        assert!(dev.activate(&mem, &queues, &kicks).is_err());
        drop(dev);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// The convenience path: overlay, daemon and device together (root only).
    #[test]
    fn a_virtiofsd_share_mounts_starts_and_cleans_up() {
        // SAFETY: no preconditions.
        if unsafe { libc::geteuid() } != 0 || virtiofsd::find_binary(None).is_err() {
            eprintln!("needs root and virtiofsd; skipped");
            return;
        }
        let dir = temp_dir("share");
        std::fs::create_dir_all(dir.join("project")).unwrap();
        std::fs::write(dir.join("project/file"), "x").unwrap();
        let (upper, merged, socket) = (dir.join("vm/upper"), dir.join("vm/merged"), dir.join("vm/fs.sock"));
        let share = VirtiofsdShare {
            tag: "proj",
            source: &dir.join("project"),
            upper: Some(&upper),
            merged: &merged,
            socket: &socket,
            binary: None,
            queue_size: 128,
            thread_start: None,
        };
        let started = Instant::now();
        let mut dev = share.start().unwrap();
        eprintln!("overlay + virtiofsd + connect: {:?}", started.elapsed());
        assert_eq!(std::fs::read_to_string(merged.join("file")).unwrap(), "x");
        assert!(socket.exists());
        dev.stop();
        assert!(!merged.exists(), "unmounted and removed after the daemon stopped");
        assert!(!socket.exists());
        drop(dev);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
