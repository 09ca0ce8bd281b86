//! virtio-vsock (device type 19): stream connections between guest
//! programs and host programs, with Firecracker's host-side protocol:
//!
//! - **host to guest**: a host program connects to the device's Unix socket
//!   (`uds_path`), writes `CONNECT <port>\n` and, once a guest program
//!   listening on that vsock port accepted, reads `OK <host port>\n`; from
//!   then on the stream is the connection. If the guest refuses, or does
//!   not answer within [`CONNECT_TIMEOUT`], the stream is closed.
//! - **guest to host**: a guest connection to CID 2, port P is joined to
//!   the Unix socket `<uds_path>_P`, where a host program listens; if
//!   nobody does, the guest's connect fails (connection reset).
//!
//! Both directions use virtio-vsock's credit flow control: the guest never
//! has more than [`CONN_BUF`] bytes in flight to a host stream (what the
//! host program has not read yet waits here), and a host stream is read
//! only as far as the guest said it has room. Host sockets are
//! non-blocking and watched by one edge-triggered epoll descriptor, which
//! the VMM's event loop watches as this device's event fd.
//!
//! Guest input is checked: a chain without a complete header, or whose
//! header claims more payload than the chain holds, fails the device
//! (`NEEDS_RESET`); a packet that is well formed but wrong (an unknown
//! connection or operation, credit overrun, a non-stream type) is answered
//! with a reset of that connection; a packet with a forged source CID is
//! dropped. Connections and pending replies are bounded.

pub mod packet;

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use self::packet::{op, ConnectLine, Header, HDR_LEN, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use super::{chain_terminates, serve_queue, DeviceError, VirtioDevice};
use crate::{Error, Result};

const DEVICE_TYPE_VSOCK: u32 = 19;
const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;

/// Receive buffer per connection for guest data the host program has not
/// read yet; advertised to the guest as `buf_alloc`.
pub const CONN_BUF: u32 = 256 * 1024;
/// After this many bytes forwarded to the host without telling the guest,
/// a credit update goes out (the guest also learns it from every packet).
const CREDIT_UPDATE_AFTER: u32 = CONN_BUF / 4;
/// Largest payload in one packet, either way (Linux's own limit).
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// How long a host program waits for the guest to accept its `CONNECT`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Open connections, both directions together.
pub const MAX_CONNECTIONS: usize = 1024;
/// Host programs connected to `uds_path` that have not sent their line.
const MAX_CLIENTS: usize = 64;
/// Replies waiting for receive buffers; past this the transmit queue is
/// left alone until the guest supplies some, so a guest that only sends
/// cannot make the backlog grow without bound.
const MAX_BACKLOG: usize = 1024;
/// Host ports of host-initiated connections (Firecracker uses the same
/// range, so guest programs see familiar numbers).
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// (host port, guest port)
type Key = (u32, u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Host-initiated; REQUEST sent, waiting for the guest's RESPONSE.
    Requested {
        deadline: Instant,
    },
    Established,
    /// The guest closed both ways; flushing what the host has not read yet.
    Closing,
}

struct Connection {
    stream: UnixStream,
    state: State,
    /// Guest data the host stream has not accepted yet (at most CONN_BUF).
    to_host: VecDeque<u8>,
    /// Guest bytes handed to the host stream so far.
    fwd_cnt: Wrapping<u32>,
    /// The `fwd_cnt` the guest was last told.
    fwd_cnt_told: Wrapping<u32>,
    /// The guest's receive buffer for this connection and how much of it
    /// it has consumed, from its latest packet.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest so far.
    rx_cnt: Wrapping<u32>,
    /// The host stream may have data (edge-triggered: set by an event,
    /// cleared when a read would block).
    host_readable: bool,
    /// In the device's `rx_ready` list.
    queued: bool,
    host_eof: bool,
    host_write_shut: bool,
    /// SHUTDOWN flags the guest sent.
    guest_shutdown: u32,
    /// A CREDIT_REQUEST went out and no packet of the guest answered yet.
    credit_requested: bool,
}

impl Connection {
    fn new(stream: UnixStream, state: State, peer: &Header) -> Self {
        Connection {
            stream,
            state,
            to_host: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            fwd_cnt_told: Wrapping(0),
            peer_buf_alloc: peer.buf_alloc,
            peer_fwd_cnt: Wrapping(peer.fwd_cnt),
            rx_cnt: Wrapping(0),
            host_readable: true,
            queued: false,
            host_eof: false,
            host_write_shut: false,
            guest_shutdown: 0,
            credit_requested: false,
        }
    }

    /// Bytes the guest has room for.
    fn guest_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Host data could go to the guest now.
    fn wants_rx(&self) -> bool {
        self.state == State::Established
            && self.host_readable
            && !self.host_eof
            && self.guest_shutdown & SHUTDOWN_RCV == 0
    }

    fn update_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        self.credit_requested = false;
    }

    /// Hand buffered guest data to the host stream, as far as it takes it.
    fn flush(&mut self) -> io::Result<()> {
        while !self.to_host.is_empty() {
            let (chunk, _) = self.to_host.as_slices();
            match send(self.stream.as_raw_fd(), chunk) {
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt += n as u32;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// `send` without SIGPIPE (a host program that went away is an error
/// here, not a reason to die) and without blocking.
fn send(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: sends from a valid buffer of the given length.
        let n = unsafe {
            libc::send(
                fd,
                data.as_ptr().cast(),
                data.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn recv(fd: RawFd, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    loop {
        // SAFETY: receives into a valid buffer of the given length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), flags | libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Connect to a host program's Unix socket without ever blocking the
/// event loop (a full listen backlog fails instead of waiting).
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "socket path too long"));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: creates a new socket; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket owned from here on.
    let stream = unsafe { <UnixStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: connects with a valid, initialised address of the given size.
    let r = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

/// Bind the device's socket. A leftover socket file nobody listens on (a
/// VMM that was killed) is replaced; a live one or another file is an error.
fn bind_listener(path: &Path) -> Result<UnixListener> {
    let fail = |reason: String| Error::VsockSocket {
        path: path.to_path_buf(),
        reason,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(fail(
                "exists and is not a socket; remove it or choose another vsock.uds_path".into(),
            ));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(fail(
                "another program (another VM?) is listening on it; choose another vsock.uds_path".into(),
            ));
        }
        std::fs::remove_file(path).map_err(|e| fail(format!("cannot remove the stale socket: {e}")))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| fail(format!("cannot listen: {e}")))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| fail(format!("cannot make it non-blocking: {e}")))?;
    Ok(listener)
}

/// The virtio-vsock device and its host side.
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: Option<UnixListener>,
    epoll: Epoll,
    timer: TimerFd,
    conns: HashMap<Key, Connection>,
    /// Host stream descriptor → its connection.
    fds: HashMap<RawFd, Key>,
    /// Host programs connected to `uds_path` whose `CONNECT` line is not in yet.
    clients: HashMap<RawFd, UnixStream>,
    /// Header-only packets for the guest, in order: (connection, op, flags).
    backlog: VecDeque<(Key, u16, u32)>,
    /// Connections with host data to send (round robin).
    rx_ready: VecDeque<Key>,
    next_local_port: u32,
    connect_timeout: Duration,
    sizes: [u16; 3],
    buf: Vec<u8>,
}

impl Vsock {
    /// A device for a guest with context id `guest_cid` (3 or more), with
    /// its host socket at `uds_path`.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self> {
        if !(3..u64::from(u32::MAX)).contains(&guest_cid) {
            return Err(Error::Virtio(format!(
                "vsock guest CID {guest_cid} is reserved; use 3 to {}",
                u32::MAX - 1
            )));
        }
        let io_err = |what: &'static str| {
            move |e: io::Error| Error::VsockSocket {
                path: uds_path.to_path_buf(),
                reason: format!("{what}: {e}"),
            }
        };
        let listener = bind_listener(uds_path)?;
        let epoll = Epoll::new().map_err(io_err("cannot create an epoll descriptor"))?;
        let timer = TimerFd::new().map_err(|e| io_err("cannot create a timer")(io::Error::from(e)))?;
        // SAFETY: sets a flag on our own descriptor; a blocking read of
        // an unexpired timer would stall the event loop.
        unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        let device = Vsock {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener: Some(listener),
            epoll,
            timer,
            conns: HashMap::new(),
            fds: HashMap::new(),
            clients: HashMap::new(),
            backlog: VecDeque::new(),
            rx_ready: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            connect_timeout: CONNECT_TIMEOUT,
            sizes: [QUEUE_SIZE; 3],
            buf: vec![0; MAX_PAYLOAD],
        };
        for fd in [device.listener_fd(), device.timer.as_raw_fd()] {
            device.watch(fd).map_err(io_err("cannot watch"))?;
        }
        Ok(device)
    }

    /// The guest's context id.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Number of open connections (both directions).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    fn listener_fd(&self) -> RawFd {
        self.listener.as_ref().map_or(-1, |l| l.as_raw_fd())
    }

    fn watch(&self, fd: RawFd) -> io::Result<()> {
        let events = EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, fd as u64))
    }

    /// Handle everything the host side has for us.
    fn poll_host(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("vsock: epoll_wait: {e}");
                    return;
                }
            };
            if n == 0 {
                return;
            }
            // Handling an event can add descriptors (an accepted client)
            // whose readiness shows up in the next round.
            for ev in &events[..n] {
                self.host_event(ev.fd(), ev.event_set());
            }
        }
    }

    fn host_event(&mut self, fd: RawFd, set: EventSet) {
        if fd == self.listener_fd() {
            self.accept_clients();
        } else if fd == self.timer.as_raw_fd() {
            clear_timer(self.timer.as_raw_fd());
            self.expire_requests();
        } else if self.clients.contains_key(&fd) {
            self.read_connect_line(fd);
        } else if let Some(&key) = self.fds.get(&fd) {
            let Some(conn) = self.conns.get_mut(&key) else { return };
            if set.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR) {
                conn.host_readable = true;
                if conn.wants_rx() && !conn.queued {
                    conn.queued = true;
                    self.rx_ready.push_back(key);
                }
            }
            if set.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR) {
                self.flush(key);
            }
        }
    }

    fn accept_clients(&mut self) {
        loop {
            let Some(listener) = &self.listener else { return };
            let stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("vsock: accept on {}: {e}", self.uds_path.display());
                    return;
                }
            };
            if self.clients.len() >= MAX_CLIENTS {
                log::warn!("vsock: too many host clients without a CONNECT line; closing a new one");
                continue;
            }
            let fd = stream.as_raw_fd();
            if stream.set_nonblocking(true).is_err() || self.watch(fd).is_err() {
                continue;
            }
            self.clients.insert(fd, stream);
        }
    }

    /// A host client sent bytes: once its `CONNECT <port>` line is
    /// complete, ask the guest for the connection.
    fn read_connect_line(&mut self, fd: RawFd) {
        let mut line = [0u8; packet::MAX_CONNECT_LINE];
        // Peek: what follows the newline is connection data, read later.
        let n = match recv(fd, &mut line, libc::MSG_PEEK) {
            Ok(0) => {
                self.clients.remove(&fd);
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(_) => {
                self.clients.remove(&fd);
                return;
            }
        };
        match packet::parse_connect_line(&line[..n]) {
            ConnectLine::Incomplete => {}
            ConnectLine::Invalid => {
                log::debug!("vsock: host client sent no valid CONNECT line; closing it");
                self.clients.remove(&fd);
            }
            ConnectLine::Connect { port, len } => {
                let Some(stream) = self.clients.remove(&fd) else { return };
                if recv(fd, &mut line[..len], 0).ok() != Some(len) {
                    return;
                }
                if self.conns.len() >= MAX_CONNECTIONS {
                    log::warn!("vsock: {MAX_CONNECTIONS} connections open; refusing a host connection");
                    return;
                }
                let Some(local) = self.allocate_local_port(port) else {
                    return;
                };
                let key = (local, port);
                let deadline = Instant::now() + self.connect_timeout;
                let conn = Connection::new(stream, State::Requested { deadline }, &Header::default());
                self.fds.insert(fd, key);
                self.conns.insert(key, conn);
                self.backlog.push_back((key, op::REQUEST, 0));
                self.arm_timer();
            }
        }
    }

    fn allocate_local_port(&mut self, guest_port: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_local_port;
            self.next_local_port = self.next_local_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(port, guest_port)) {
                return Some(port);
            }
        }
        None
    }

    /// Wake up at the earliest deadline of a pending host connection.
    fn arm_timer(&mut self) {
        let now = Instant::now();
        let earliest = self
            .conns
            .values()
            .filter_map(|c| match c.state {
                State::Requested { deadline } => Some(deadline),
                _ => None,
            })
            .min();
        if let Some(deadline) = earliest {
            // At least 1 ms: a zero duration would disarm the timer.
            let wait = deadline.saturating_duration_since(now).max(Duration::from_millis(1));
            if let Err(e) = self.timer.reset(wait, None) {
                log::warn!("vsock: cannot arm the connect timer: {e}");
            }
        }
    }

    /// Host connections the guest did not answer in time are closed.
    fn expire_requests(&mut self) {
        let now = Instant::now();
        let expired: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(c.state, State::Requested { deadline } if deadline <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            log::debug!("vsock: guest port {} did not answer in time", key.1);
            let delivered = !self.backlog.iter().any(|(k, o, _)| *k == key && *o == op::REQUEST);
            self.close(key, delivered);
        }
        self.arm_timer();
    }

    /// Drop a connection (closing its host stream); with `reset`, tell the
    /// guest.
    fn close(&mut self, key: Key, reset: bool) {
        if let Some(conn) = self.conns.remove(&key) {
            self.fds.remove(&conn.stream.as_raw_fd());
        }
        self.backlog.retain(|(k, _, _)| *k != key);
        if reset {
            self.backlog.push_back((key, op::RST, 0));
        }
    }

    /// Write buffered guest data to the host and follow up: shut the host's
    /// read side once the guest sent its last byte, finish a closing
    /// connection, update the guest's credit.
    fn flush(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else { return };
        if let Err(e) = conn.flush() {
            log::debug!("vsock: host side of port {} went away: {e}", key.0);
            self.close(key, true);
            return;
        }
        if conn.to_host.is_empty() {
            if conn.state == State::Closing {
                self.close(key, true);
                return;
            }
            if conn.guest_shutdown & SHUTDOWN_SEND != 0 && !conn.host_write_shut {
                conn.host_write_shut = true;
                let _ = conn.stream.shutdown(std::net::Shutdown::Write);
            }
        }
        let unreported = (conn.fwd_cnt - conn.fwd_cnt_told).0;
        if unreported >= CREDIT_UPDATE_AFTER && !self.backlog.contains(&(key, op::CREDIT_UPDATE, 0)) {
            self.backlog.push_back((key, op::CREDIT_UPDATE, 0));
        }
    }

    /// A header from us to the guest for connection `key`; it carries our
    /// current credit, which counts as telling the guest.
    fn header(&mut self, key: Key, op: u16, flags: u32, len: u32) -> Header {
        let (buf_alloc, fwd_cnt) = match self.conns.get_mut(&key) {
            Some(conn) => {
                conn.fwd_cnt_told = conn.fwd_cnt;
                (CONN_BUF, conn.fwd_cnt.0)
            }
            None => (0, 0),
        };
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            len,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc,
            fwd_cnt,
        }
    }

    /// One transmit chain: a packet from the guest.
    fn transmit(
        &mut self,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> std::result::Result<u32, DeviceError> {
        let head = chain.head_index();
        let fail = |reason: String| DeviceError::Chain { head, reason };
        let mut reader = chain.reader(mem).map_err(|e| fail(e.to_string()))?;
        let mut raw = [0u8; HDR_LEN];
        reader
            .read_exact(&mut raw)
            .map_err(|_| fail("packet header (44 bytes) missing or cut short".into()))?;
        let hdr = Header::from_bytes(&raw);
        let available = reader.available_bytes();
        if hdr.len as usize > available {
            return Err(fail(format!(
                "header says {} payload bytes, the chain holds {available}",
                hdr.len
            )));
        }
        let mut payload = std::mem::take(&mut self.buf);
        let len = if hdr.op == op::RW && hdr.len as usize <= MAX_PAYLOAD {
            hdr.len as usize
        } else {
            0
        };
        let read = reader.read_exact(&mut payload[..len]);
        let result = match read {
            Ok(()) => {
                self.guest_packet(&hdr, &payload[..len]);
                Ok(0)
            }
            Err(e) => Err(fail(format!("payload: {e}"))),
        };
        self.buf = payload;
        result
    }

    /// Act on one well-formed packet from the guest.
    fn guest_packet(&mut self, hdr: &Header, payload: &[u8]) {
        if hdr.src_cid != self.guest_cid {
            log::debug!("vsock: dropping a packet with forged source CID {}", hdr.src_cid);
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.dst_cid != HOST_CID {
            log::debug!(
                "vsock: dropping a packet for CID {}: only the host (2) is reachable",
                hdr.dst_cid
            );
            return;
        }
        let reply_reset = hdr.op != op::RST;
        if hdr.kind != TYPE_STREAM || (hdr.op == op::RW && hdr.len as usize > MAX_PAYLOAD) {
            if reply_reset {
                self.close(key, true);
            }
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            match hdr.op {
                op::REQUEST => self.guest_connect(key, hdr),
                op::RST => {}
                _ => self.backlog.push_back((key, op::RST, 0)),
            }
            return;
        };
        conn.update_credit(hdr);
        if conn.host_readable && !conn.queued && conn.wants_rx() && conn.guest_credit() > 0 {
            conn.queued = true;
            self.rx_ready.push_back(key);
        }
        let established = conn.state == State::Established;
        match hdr.op {
            op::RESPONSE if matches!(conn.state, State::Requested { .. }) => {
                conn.state = State::Established;
                // Not counted in fwd_cnt: the line is ours, not the guest's.
                let line = format!("OK {}\n", key.0);
                if send(conn.stream.as_raw_fd(), line.as_bytes()).ok() != Some(line.len()) {
                    self.close(key, true);
                    return;
                }
                if conn.host_readable && !conn.queued {
                    conn.queued = true;
                    self.rx_ready.push_back(key);
                }
            }
            op::RST => self.close(key, false),
            op::RW if established => {
                if conn.guest_shutdown & SHUTDOWN_SEND != 0 || conn.to_host.len() + payload.len() > CONN_BUF as usize {
                    log::debug!("vsock: guest sent past its credit or after shutdown on port {}", key.0);
                    self.close(key, true);
                    return;
                }
                conn.to_host.extend(payload);
                self.flush(key);
            }
            op::SHUTDOWN if established => {
                conn.guest_shutdown |= hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                if conn.guest_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
                    conn.state = State::Closing;
                }
                self.flush(key);
            }
            op::CREDIT_UPDATE if established => {}
            op::CREDIT_REQUEST if established => {
                if !self.backlog.contains(&(key, op::CREDIT_UPDATE, 0)) {
                    self.backlog.push_back((key, op::CREDIT_UPDATE, 0));
                }
            }
            _ => {
                log::debug!("vsock: unexpected op {} on port {}; resetting", hdr.op, key.0);
                self.close(key, true);
            }
        }
    }

    /// The guest connects to host port `key.0`: join it to `<uds_path>_<port>`.
    fn guest_connect(&mut self, key: Key, hdr: &Header) {
        if self.conns.len() >= MAX_CONNECTIONS {
            log::warn!("vsock: {MAX_CONNECTIONS} connections open; refusing a guest connection");
            self.backlog.push_back((key, op::RST, 0));
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", key.0));
        let path = PathBuf::from(path);
        let stream = match connect_nonblocking(&path) {
            Ok(stream) => stream,
            Err(e) => {
                log::debug!(
                    "vsock: guest connection to host port {}: {}: {e}",
                    key.0,
                    path.display()
                );
                self.backlog.push_back((key, op::RST, 0));
                return;
            }
        };
        let fd = stream.as_raw_fd();
        if let Err(e) = self.watch(fd) {
            log::warn!("vsock: cannot watch {}: {e}", path.display());
            self.backlog.push_back((key, op::RST, 0));
            return;
        }
        let mut conn = Connection::new(stream, State::Established, hdr);
        conn.queued = true;
        self.fds.insert(fd, key);
        self.conns.insert(key, conn);
        self.backlog.push_back((key, op::RESPONSE, 0));
        self.rx_ready.push_back(key);
    }

    /// The next packet for the guest, its payload (if any) in `self.buf`;
    /// `room` is the payload space of the receive buffer at hand.
    fn next_for_guest(&mut self, room: usize) -> Option<(Header, usize)> {
        if let Some((key, op, flags)) = self.backlog.pop_front() {
            return Some((self.header(key, op, flags, 0), 0));
        }
        while let Some(key) = self.rx_ready.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else { continue };
            conn.queued = false;
            if !conn.wants_rx() {
                continue;
            }
            let credit = conn.guest_credit() as usize;
            if credit == 0 {
                // Resumed by the guest's next packet on this connection.
                if !conn.credit_requested {
                    conn.credit_requested = true;
                    return Some((self.header(key, op::CREDIT_REQUEST, 0, 0), 0));
                }
                continue;
            }
            let want = room.min(credit).min(MAX_PAYLOAD);
            if want == 0 {
                // A receive buffer with room for the header only.
                conn.queued = true;
                self.rx_ready.push_front(key);
                return None;
            }
            let fd = conn.stream.as_raw_fd();
            match recv(fd, &mut self.buf[..want], 0) {
                Ok(0) => {
                    conn.host_eof = true;
                    return Some((self.header(key, op::SHUTDOWN, SHUTDOWN_SEND, 0), 0));
                }
                Ok(n) => {
                    conn.rx_cnt += n as u32;
                    conn.queued = true;
                    self.rx_ready.push_back(key);
                    return Some((self.header(key, op::RW, 0, n as u32), n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => conn.host_readable = false,
                Err(e) => {
                    log::debug!("vsock: reading host port {}: {e}", key.0);
                    self.close(key, false);
                    return Some((self.header(key, op::RST, 0, 0), 0));
                }
            }
        }
        None
    }

    /// Fill the guest's receive buffers with what is waiting for it.
    fn fill_rx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> std::result::Result<bool, DeviceError> {
        let qerr = |e: virtio_queue::Error| DeviceError::Queue(RX as u16, e.to_string());
        let mut used_any = false;
        while !self.backlog.is_empty() || !self.rx_ready.is_empty() {
            let Some(chain) = queue.iter(mem).map_err(qerr)?.next() else {
                break;
            };
            let head = chain.head_index();
            let fail = |reason: String| DeviceError::Chain { head, reason };
            chain_terminates(&chain).map_err(fail)?;
            let mut writer = chain.writer(mem).map_err(|e| fail(e.to_string()))?;
            let room = writer.available_bytes();
            if room < HDR_LEN {
                return Err(fail(format!(
                    "receive buffer of {room} bytes cannot hold the 44-byte header"
                )));
            }
            let Some((hdr, len)) = self.next_for_guest(room - HDR_LEN) else {
                queue.go_to_previous_position();
                break;
            };
            writer
                .write_all(&hdr.to_bytes())
                .and_then(|()| writer.write_all(&self.buf[..len]))
                .map_err(|e| fail(e.to_string()))?;
            queue.add_used(mem, head, (HDR_LEN + len) as u32).map_err(qerr)?;
            used_any = true;
        }
        Ok(used_any && queue.needs_notification(mem).map_err(qerr)?)
    }

    /// Serve the guest's packets (unless replies are backed up), then fill
    /// its receive buffers; twice, so that transmit work held back by a
    /// full backlog resumes once receive buffers drained it.
    fn run(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> std::result::Result<bool, DeviceError> {
        self.poll_host();
        let mut notify = false;
        for _ in 0..2 {
            if self.backlog.len() < MAX_BACKLOG {
                if let Some(tx) = queues.get_mut(TX).filter(|q| q.ready()) {
                    notify |= serve_queue(TX, tx, mem, |chain| self.transmit(chain, mem))?;
                }
            }
            if let Some(rx) = queues.get_mut(RX).filter(|q| q.ready()) {
                notify |= self.fill_rx(rx, mem)?;
            }
        }
        Ok(notify)
    }

    /// Close the host socket file and every connection; the guest sees the
    /// device no more.
    fn release_host_side(&mut self) {
        if self.listener.take().is_some() {
            let _ = std::fs::remove_file(&self.uds_path);
        }
        self.conns.clear();
        self.fds.clear();
        self.clients.clear();
    }
}

/// Clear the timer's expiry count (non-blocking; nothing to read is fine).
fn clear_timer(fd: RawFd) {
    let mut count = [0u8; 8];
    // SAFETY: reads the timer's 8-byte counter into a valid buffer.
    unsafe { libc::read(fd, count.as_mut_ptr().cast(), 8) };
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.release_host_side();
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.guest_cid.to_le_bytes();
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        if let Some(src) = start.checked_add(data.len()).and_then(|end| config.get(start..end)) {
            data.copy_from_slice(src);
        }
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> std::result::Result<bool, DeviceError> {
        match index {
            RX => {
                self.poll_host();
                self.fill_rx(queue, mem)
            }
            // Replies wait in the backlog until the receive queue runs.
            TX if self.backlog.len() < MAX_BACKLOG => serve_queue(TX, queue, mem, |chain| self.transmit(chain, mem)),
            // The event queue only carries transport resets after a
            // snapshot restore, which this VMM does not do.
            _ => Ok(false),
        }
    }

    fn queue_notified(
        &mut self,
        _index: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> std::result::Result<bool, DeviceError> {
        self.run(queues, mem)
    }

    fn reset(&mut self) {
        // The guest's sockets are gone with its driver: so are the connections.
        self.conns.clear();
        self.fds.clear();
        self.backlog.clear();
        self.rx_ready.clear();
    }

    fn stop(&mut self) {
        self.release_host_side();
    }

    fn event_fds(&self) -> Vec<RawFd> {
        vec![self.epoll.as_raw_fd()]
    }

    fn process_event(
        &mut self,
        _fd: RawFd,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> std::result::Result<bool, DeviceError> {
        self.run(queues, mem)
    }
}

#[cfg(test)]
mod tests;
