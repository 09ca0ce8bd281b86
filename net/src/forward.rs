//! Host-to-guest port forwarding by a userspace proxy: a [`Forwarder`] binds
//! host sockets and relays TCP connections and UDP datagrams to one guest
//! address.
//!
//! A proxy rather than kernel DNAT because it also works for connections to
//! 127.0.0.1 without `route_localnet` (which would expose the host's loopback
//! services to guests), a host port already in use is an exact error at bind
//! time, host firewalls (Docker's FORWARD drop policy, ufw) do not interfere,
//! and the forwards end with the VMM process.
//!
//! Threads, all blocking, each woken when its forward stops:
//! - TCP: one accept thread per forward (`fwd-tcp-PORT`) polling the
//!   listener and the stop eventfd; per connection one thread that connects
//!   to the guest and relays client to guest (`fwd-tcp-PORT-c`), and one
//!   relaying guest to client (`fwd-tcp-PORT-g`). Stopping shuts down every
//!   open connection's sockets, which wakes their blocked reads and writes.
//! - UDP: one thread per forward (`fwd-udp-PORT`) polling the host socket and
//!   one connected socket per client ("flow") towards the guest; replies go
//!   back to the client from the host socket.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{Builder, JoinHandle};
use std::time::{Duration, Instant};

use log::{debug, error, warn};

use crate::Error;

/// How long a new connection waits for the guest to accept it: a guest
/// still booting or swapping may be slow, and a lost SYN costs the host's
/// retransmission backoff (sent again at 1, 3, 7 and 15 s), so room for
/// four retransmissions. A guest that refuses (nothing listens) answers at
/// once whatever this is.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Open TCP connections per forward; beyond, new clients are closed at once
/// (each costs two threads).
const MAX_TCP_CONNS: usize = 512;
/// Client addresses with a UDP flow per forward; datagrams of further
/// clients are dropped until a flow expires.
const MAX_UDP_FLOWS: usize = 256;
/// A UDP flow with no datagram either way for this long is closed.
const UDP_IDLE: Duration = Duration::from_secs(60);
/// Datagrams taken from one socket per wakeup, so a flood on one side
/// cannot starve the other.
const UDP_BURST: usize = 64;
/// Pause after an accept error such as EMFILE, which would otherwise spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
const RELAY_BUF: usize = 64 * 1024;
/// Relay threads keep their buffer on the heap and need little stack.
const RELAY_STACK: usize = 256 * 1024;

/// The transport protocol of a forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

impl FromStr for Protocol {
    type Err = Error;

    /// `tcp` or `udp`, in any case.
    fn from_str(s: &str) -> Result<Protocol, Error> {
        if s.eq_ignore_ascii_case("tcp") {
            Ok(Protocol::Tcp)
        } else if s.eq_ignore_ascii_case("udp") {
            Ok(Protocol::Udp)
        } else {
            Err(Error::Protocol(s.to_owned()))
        }
    }
}

/// Forward `host` (an address of this host, often 127.0.0.1) to
/// `guest_port` on the guest's address. `(protocol, host)` identifies it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ForwardSpec {
    pub protocol: Protocol,
    pub host: SocketAddr,
    pub guest_port: u16,
}

impl fmt::Display for ForwardSpec {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}/{} -> guest port {}", self.host, self.protocol, self.guest_port)
    }
}

/// The forwards to one guest address. Each forward binds when added and
/// stops, closing its connections and flows, when removed or dropped.
pub struct Forwarder {
    guest: IpAddr,
    forwards: Vec<Running>,
    udp_idle: Duration,
    thread_start: mvm_devices::ThreadStart,
}

impl Forwarder {
    pub fn new(guest: IpAddr) -> Forwarder {
        Forwarder {
            guest,
            forwards: Vec::new(),
            udp_idle: UDP_IDLE,
            thread_start: None,
        }
    }

    /// Have every forward's thread run `start` first (the VMM confines
    /// them; their connection threads inherit it).
    pub fn set_thread_start(&mut self, start: mvm_devices::ThreadStart) {
        self.thread_start = start;
    }

    pub fn guest(&self) -> IpAddr {
        self.guest
    }

    /// Bind `spec.host` and start relaying. Adding a spec already there does
    /// nothing; a spec for a forwarded host port with another guest port
    /// replaces the old forward (closing its connections; if the new one
    /// then fails to bind, neither remains).
    pub fn add(&mut self, spec: ForwardSpec) -> Result<(), Error> {
        if let Some(i) = self.position(spec.protocol, spec.host) {
            if self.forwards.get(i).is_some_and(|r| r.spec == spec) {
                return Ok(());
            }
            self.forwards.remove(i);
        }
        let running = Running::start(spec, self.guest, self.udp_idle, self.thread_start.clone())?;
        self.forwards.push(running);
        Ok(())
    }

    /// Stop the forward of `host`, closing its listener, open connections
    /// and flows. False when there was none.
    pub fn remove(&mut self, protocol: Protocol, host: SocketAddr) -> bool {
        match self.position(protocol, host) {
            Some(i) => {
                self.forwards.remove(i);
                true
            }
            None => false,
        }
    }

    /// Make the forwards exactly `wanted`: stop those not in it, then add the
    /// new ones. Returns the specs that could not be added, with why; a
    /// second spec for the same host port with another guest port is one.
    pub fn set(&mut self, wanted: &[ForwardSpec]) -> Vec<(ForwardSpec, Error)> {
        let mut failures = Vec::new();
        let mut first: HashMap<(Protocol, SocketAddr), &ForwardSpec> = HashMap::new();
        let mut unique = Vec::new();
        for spec in wanted {
            match first.entry((spec.protocol, spec.host)) {
                Entry::Vacant(v) => {
                    v.insert(spec);
                    unique.push(spec);
                }
                Entry::Occupied(o) if *o.get() == spec => {}
                Entry::Occupied(o) => failures.push((
                    spec.clone(),
                    Error::ForwardTwice {
                        spec: spec.clone(),
                        other: (*o.get()).clone(),
                    },
                )),
            }
        }
        let keep: HashSet<&ForwardSpec> = unique.iter().copied().collect();
        let (kept, gone): (Vec<Running>, Vec<Running>) = std::mem::take(&mut self.forwards)
            .into_iter()
            .partition(|r| keep.contains(&r.spec));
        self.forwards = kept;
        // Wake them all before joining any, so they wind down together.
        gone.iter().for_each(|r| r.shared.stop());
        drop(gone);
        for spec in unique {
            if let Err(e) = self.add(spec.clone()) {
                failures.push((spec.clone(), e));
            }
        }
        failures
    }

    /// The forwards, in the order they were added.
    pub fn specs(&self) -> Vec<ForwardSpec> {
        self.forwards.iter().map(|r| r.spec.clone()).collect()
    }

    fn position(&self, protocol: Protocol, host: SocketAddr) -> Option<usize> {
        self.forwards
            .iter()
            .position(|r| r.spec.protocol == protocol && r.spec.host == host)
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.forwards.iter().for_each(|r| r.shared.stop());
        self.forwards.clear();
    }
}

/// One started forward; dropping it stops it and joins its threads.
struct Running {
    spec: ForwardSpec,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Running {
    fn start(
        spec: ForwardSpec,
        guest: IpAddr,
        udp_idle: Duration,
        thread_start: mvm_devices::ThreadStart,
    ) -> Result<Running, Error> {
        let fail = |source: io::Error| match source.kind() {
            io::ErrorKind::AddrInUse => Error::PortInUse { spec: spec.clone() },
            io::ErrorKind::PermissionDenied => Error::PortDenied { spec: spec.clone() },
            io::ErrorKind::AddrNotAvailable => Error::HostAddress { spec: spec.clone() },
            _ => Error::Forward {
                spec: spec.clone(),
                source,
            },
        };
        if spec.host.port() == 0 || spec.guest_port == 0 {
            return Err(fail(io::Error::new(
                io::ErrorKind::InvalidInput,
                "port 0 cannot be forwarded",
            )));
        }
        let guest = SocketAddr::new(guest, spec.guest_port);
        let shared = Arc::new(Shared::new().map_err(fail)?);
        let name = format!("fwd-{}-{}", spec.protocol, spec.host.port());
        let thread = match spec.protocol {
            Protocol::Tcp => {
                // std sets SO_REUSEADDR on Unix: a restart can rebind over
                // TIME_WAIT connections, yet not over another listener.
                let listener = TcpListener::bind(spec.host).map_err(fail)?;
                listener.set_nonblocking(true).map_err(fail)?;
                let shared = Arc::clone(&shared);
                let n = name.clone();
                Builder::new().name(name).spawn(move || {
                    mvm_devices::run_thread_start(&thread_start);
                    accept_loop(&listener, guest, &shared, &n)
                })
            }
            Protocol::Udp => {
                let socket = UdpSocket::bind(spec.host).map_err(fail)?;
                socket.set_nonblocking(true).map_err(fail)?;
                let shared = Arc::clone(&shared);
                let n = name.clone();
                Builder::new().name(name).spawn(move || {
                    mvm_devices::run_thread_start(&thread_start);
                    udp_loop(&socket, guest, &shared, udp_idle, &n)
                })
            }
        }
        .map_err(fail)?;
        debug!("forwarding {spec} ({guest})");
        Ok(Running {
            spec,
            shared,
            thread: Some(thread),
        })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shared.stop();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                error!("forward {}: its thread panicked", self.spec);
            }
        }
        debug!("stopped forwarding {}", self.spec);
    }
}

/// What a forward's threads share: the stop signal and, for TCP, the open
/// connections (to shut them down) and their threads (to join them).
struct Shared {
    /// An eventfd, written once on stop and never read: readable from then
    /// on, it wakes every poll that includes it.
    stop_fd: OwnedFd,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    stopped: bool,
    next_id: u64,
    conns: HashMap<u64, [Arc<TcpStream>; 2]>,
    threads: Vec<JoinHandle<()>>,
}

impl Shared {
    fn new() -> io::Result<Shared> {
        // SAFETY: creates a new descriptor; no pointers involved.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Shared {
            // SAFETY: the descriptor is new and owned from here on.
            stop_fd: unsafe { OwnedFd::from_raw_fd(fd) },
            state: Mutex::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stop(&self) {
        let mut state = self.lock();
        if state.stopped {
            return;
        }
        state.stopped = true;
        for stream in state.conns.values().flatten() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        drop(state);
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a valid buffer to our eventfd.
        if unsafe { libc::write(self.stop_fd.as_raw_fd(), one.as_ptr().cast(), one.len()) } < 0 {
            error!("forward: cannot signal stop: {}", io::Error::last_os_error());
        }
    }

    fn is_stopped(&self) -> bool {
        self.lock().stopped
    }

    /// Track an open connection so stop() can shut it down; None if
    /// stopped already (then the caller closes it).
    fn register(&self, streams: [Arc<TcpStream>; 2]) -> Option<u64> {
        let mut state = self.lock();
        if state.stopped {
            return None;
        }
        let id = state.next_id;
        state.next_id += 1;
        state.conns.insert(id, streams);
        Some(id)
    }

    fn unregister(&self, id: u64) {
        self.lock().conns.remove(&id);
    }
}

fn accept_loop(listener: &TcpListener, guest: SocketAddr, shared: &Arc<Shared>, name: &str) {
    let mut fds = [
        pollfd(shared.stop_fd.as_raw_fd(), libc::POLLIN),
        pollfd(listener.as_raw_fd(), libc::POLLIN),
    ];
    loop {
        if let Err(e) = poll(&mut fds, None) {
            error!("{name}: poll: {e}; forward stopped");
            break;
        }
        if shared.is_stopped() {
            break;
        }
        match listener.accept() {
            Ok((client, peer)) => spawn_connection(client, peer, guest, shared, name),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                ) => {}
            Err(e) => {
                warn!("{name}: accept: {e}");
                let _ = poll(&mut fds[..1], Some(ACCEPT_BACKOFF));
            }
        }
    }
    let threads = std::mem::take(&mut shared.lock().threads);
    for thread in threads {
        let _ = thread.join();
    }
}

fn spawn_connection(client: TcpStream, peer: SocketAddr, guest: SocketAddr, shared: &Arc<Shared>, name: &str) {
    let mut state = shared.lock();
    // Finished threads need no join; dropping their handles frees them.
    state.threads.retain(|t| !t.is_finished());
    if state.threads.len() >= MAX_TCP_CONNS {
        debug!("{name}: {peer}: closed, {MAX_TCP_CONNS} connections are open already");
        return;
    }
    let (s, n) = (Arc::clone(shared), name.to_owned());
    match Builder::new()
        .name(format!("{name}-c"))
        .stack_size(RELAY_STACK)
        .spawn(move || serve(client, peer, guest, &s, &n))
    {
        Ok(thread) => state.threads.push(thread),
        Err(e) => warn!("{name}: {peer}: no thread for the connection: {e}"),
    }
}

/// Connect `client` to the guest and relay both ways until both are done.
fn serve(client: TcpStream, peer: SocketAddr, guest: SocketAddr, shared: &Shared, name: &str) {
    let upstream = match connect(guest, shared) {
        Ok(upstream) => upstream,
        Err(e) => {
            // A guest that does not answer at all is worth a line in the
            // VMM's log (the client only sees a reset); a refusal (nothing
            // listens yet) is routine.
            if e.kind() == io::ErrorKind::TimedOut {
                warn!("{name}: {peer}: guest {guest} did not answer: {e}");
            } else {
                debug!("{name}: {peer}: guest {guest}: {e}");
            }
            // A reset, not an orderly close, as a refused connection would.
            reset_on_close(&client);
            return;
        }
    };
    if let Err(e) = client.set_nonblocking(false) {
        debug!("{name}: {peer}: {e}");
        return;
    }
    // Writes go out as they were read; Nagle would only add latency.
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (client, upstream) = (Arc::new(client), Arc::new(upstream));
    let Some(id) = shared.register([Arc::clone(&client), Arc::clone(&upstream)]) else {
        return;
    };
    let back = {
        let (client, upstream) = (Arc::clone(&client), Arc::clone(&upstream));
        Builder::new()
            .name(format!("{name}-g"))
            .stack_size(RELAY_STACK)
            .spawn(move || relay(&upstream, &client))
    };
    match back {
        Ok(back) => {
            relay(&client, &upstream);
            let _ = back.join();
        }
        Err(e) => warn!("{name}: {peer}: no thread for the connection: {e}"),
    }
    shared.unregister(id);
}

/// Copy `from` to `to`. At the end of `from`, half-close `to` (so a peer
/// waiting for EOF before answering still gets to answer); on an error,
/// shut down both, which also ends the other direction.
fn relay(from: &TcpStream, to: &TcpStream) {
    let mut buf = vec![0u8; RELAY_BUF];
    let (mut reader, mut writer) = (from, to);
    loop {
        match reader.read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if writer.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// A blocking stream connected to `addr`, or an error after
/// [`CONNECT_TIMEOUT`] or as soon as the forward stops.
fn connect(addr: SocketAddr, shared: &Shared) -> io::Result<TcpStream> {
    let domain = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: creates a new descriptor; no pointers involved.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor is new and owned from here on.
    let stream = TcpStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    if start_connect(fd, addr) != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
        let mut fds = [
            pollfd(fd, libc::POLLOUT),
            pollfd(shared.stop_fd.as_raw_fd(), libc::POLLIN),
        ];
        if poll(&mut fds, Some(CONNECT_TIMEOUT))? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
            ));
        }
        if shared.is_stopped() {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "forward stopped"));
        }
        if let Some(e) = stream.take_error()? {
            return Err(e);
        }
    }
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// connect(2) on the nonblocking socket `fd`: 0, or -1 with errno set.
fn start_connect(fd: RawFd, addr: SocketAddr) -> libc::c_int {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: all zeroes is a valid sockaddr_in.
            let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            sa.sin_family = libc::AF_INET as libc::sa_family_t;
            sa.sin_port = a.port().to_be();
            sa.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            let len = std::mem::size_of_val(&sa) as libc::socklen_t;
            // SAFETY: connect reads `len` bytes of a valid sockaddr_in.
            unsafe { libc::connect(fd, (&raw const sa).cast(), len) }
        }
        SocketAddr::V6(a) => {
            // SAFETY: all zeroes is a valid sockaddr_in6.
            let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sa.sin6_port = a.port().to_be();
            sa.sin6_flowinfo = a.flowinfo();
            sa.sin6_addr.s6_addr = a.ip().octets();
            sa.sin6_scope_id = a.scope_id();
            let len = std::mem::size_of_val(&sa) as libc::socklen_t;
            // SAFETY: connect reads `len` bytes of a valid sockaddr_in6.
            unsafe { libc::connect(fd, (&raw const sa).cast(), len) }
        }
    }
}

/// Make closing `stream` send a reset (SO_LINGER with a zero timeout).
fn reset_on_close(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads a valid linger of the given size.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of_val(&linger) as libc::socklen_t,
        );
    }
}

/// One UDP client's path to the guest.
struct Flow {
    /// Connected to the guest's port: what it receives are the replies.
    socket: UdpSocket,
    last: Instant,
}

fn udp_loop(socket: &UdpSocket, guest: SocketAddr, shared: &Shared, idle: Duration, name: &str) {
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    let mut buf = vec![0u8; 65536];
    let mut fds = Vec::new();
    let mut clients = Vec::new();
    loop {
        let now = Instant::now();
        flows.retain(|_, f| now.duration_since(f.last) < idle);
        let next_expiry = flows
            .values()
            .map(|f| (f.last + idle).saturating_duration_since(now))
            .min();
        fds.clear();
        clients.clear();
        fds.push(pollfd(shared.stop_fd.as_raw_fd(), libc::POLLIN));
        fds.push(pollfd(socket.as_raw_fd(), libc::POLLIN));
        for (client, flow) in &flows {
            fds.push(pollfd(flow.socket.as_raw_fd(), libc::POLLIN));
            clients.push(*client);
        }
        if let Err(e) = poll(&mut fds, next_expiry) {
            error!("{name}: poll: {e}; forward stopped");
            return;
        }
        if shared.is_stopped() {
            return;
        }
        let now = Instant::now();
        for (fd, client) in fds.iter().skip(2).zip(&clients) {
            if let Some(flow) = flows.get_mut(client).filter(|_| fd.revents != 0) {
                relay_replies(flow, socket, *client, &mut buf, now, name);
            }
        }
        if fds.get(1).is_some_and(|fd| fd.revents != 0) {
            relay_requests(socket, &mut flows, guest, &mut buf, now, name);
        }
    }
}

fn relay_requests(
    socket: &UdpSocket,
    flows: &mut HashMap<SocketAddr, Flow>,
    guest: SocketAddr,
    buf: &mut [u8],
    now: Instant,
    name: &str,
) {
    for _ in 0..UDP_BURST {
        let (n, client) = match socket.recv_from(buf) {
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                debug!("{name}: receive: {e}");
                return;
            }
        };
        let full = flows.len() >= MAX_UDP_FLOWS;
        let flow = match flows.entry(client) {
            Entry::Occupied(o) => o.into_mut(),
            Entry::Vacant(_) if full => {
                debug!("{name}: {client}: dropped, {MAX_UDP_FLOWS} clients have flows already");
                continue;
            }
            Entry::Vacant(v) => match new_flow(guest) {
                Ok(socket) => v.insert(Flow { socket, last: now }),
                Err(e) => {
                    warn!("{name}: {client}: no socket towards the guest: {e}");
                    continue;
                }
            },
        };
        flow.last = now;
        if let Err(e) = flow.socket.send(&buf[..n]) {
            debug!("{name}: {client}: to guest {guest}: {e}");
        }
    }
}

fn relay_replies(flow: &mut Flow, socket: &UdpSocket, client: SocketAddr, buf: &mut [u8], now: Instant, name: &str) {
    for _ in 0..UDP_BURST {
        match flow.socket.recv(buf) {
            Ok(n) => {
                flow.last = now;
                if let Err(e) = socket.send_to(&buf[..n], client) {
                    debug!("{name}: reply to {client}: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            // ECONNREFUSED when nothing listens on the guest port (yet).
            Err(e) => {
                debug!("{name}: {client}: from guest: {e}");
                return;
            }
        }
    }
}

fn new_flow(guest: SocketAddr) -> io::Result<UdpSocket> {
    let any: IpAddr = if guest.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let socket = UdpSocket::bind((any, 0))?;
    socket.connect(guest)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd { fd, events, revents: 0 }
}

/// poll(2), retried on EINTR; `None` waits without a timeout.
fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    // Rounded up, so a wakeup for an expiry finds it expired.
    let ms = timeout.map_or(-1, |t| {
        i32::try_from(t.as_millis().saturating_add(1)).unwrap_or(i32::MAX)
    });
    loop {
        // SAFETY: polls a valid array of the given length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if let Ok(n) = usize::try_from(n) {
            return Ok(n);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests;
