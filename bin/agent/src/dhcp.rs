//! A DHCPv4 client (RFC 2131) for the interfaces `mvm.dhcp=` names: just
//! what the host's dnsmasq needs (it pins one address per MAC), with the
//! lease applied by [`netif`] and renewed in the background.
//!
//! Replies come from the network and are parsed as hostile input. A
//! plain UDP socket is enough to receive them before the interface has an
//! address: we ask the server to broadcast (the BROADCAST flag), and the
//! kernel delivers broadcasts on an address-less interface as long as
//! rp_filter is off, which is the kernel's default (nothing has changed it
//! when the agent, as PID 1, runs this).

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read};
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::{netif, say, sys};

pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;
/// How long [`configure`] tries before giving up.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

const BOOTREQUEST: u8 = 1;
const BOOTREPLY: u8 = 2;
const HTYPE_ETHERNET: u8 = 1;
const FLAG_BROADCAST: u16 = 0x8000;
const MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];
/// The fixed BOOTP header (op .. file) and the magic cookie.
const OPTIONS_START: usize = 240;
/// Requests are padded to the BOOTP minimum: some servers drop less.
const MIN_REQUEST_LEN: usize = 300;
const INFINITE: u32 = 0xffff_ffff;

const OPT_PAD: u8 = 0;
const OPT_SUBNET_MASK: u8 = 1;
const OPT_ROUTER: u8 = 3;
const OPT_DNS: u8 = 6;
const OPT_HOSTNAME: u8 = 12;
const OPT_DOMAIN: u8 = 15;
const OPT_REQUESTED_IP: u8 = 50;
const OPT_LEASE_TIME: u8 = 51;
const OPT_MESSAGE_TYPE: u8 = 53;
const OPT_SERVER_ID: u8 = 54;
const OPT_PARAMS: u8 = 55;
const OPT_MESSAGE: u8 = 56;
const OPT_CLIENT_ID: u8 = 61;
const OPT_END: u8 = 255;
/// Mask, router, DNS, domain, lease time, server id, broadcast address.
const PARAMS: [u8; 7] = [1, 3, 6, 15, 51, 54, 28];

#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    #[error("{}: {}", .0, sys::error_text(.1))]
    Io(&'static str, #[source] io::Error),
    #[error(
        "no DHCP {waiting_for} in {} s{}{}",
        .waited.as_secs(),
        .ignored.as_ref().map(|i| format!(" (ignored a reply: {i})")).unwrap_or_default(),
        .unsent.as_ref().map(|e| format!(" (the last send failed: {e})")).unwrap_or_default()
    )]
    Timeout {
        waiting_for: &'static str,
        waited: Duration,
        /// Why the last reply that came was not used.
        ignored: Option<String>,
        /// Why the last message could not be sent, if it could not.
        unsent: Option<String>,
    },
    #[error("the server refused the request{}", .0.as_ref().map(|m| format!(": {m}")).unwrap_or_default())]
    Refused(Option<String>),
    #[error("a reply for another client")]
    NotOurs,
    #[error("malformed reply: {0}")]
    Malformed(&'static str),
    #[error("malformed reply: option {0} has a bad length or value")]
    BadOption(u8),
}

/// What the server gave us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub address: Ipv4Addr,
    /// From the subnet mask (option 1), 1..=32.
    pub prefix_len: u8,
    /// The first router (option 3).
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    /// The DNS search domain (option 15), letters, digits, '-', '_', '.'.
    pub domain: Option<String>,
    /// None: infinite (or not given).
    pub lease_secs: Option<u32>,
    pub server_id: Ipv4Addr,
}

impl Lease {
    pub fn netmask(&self) -> Ipv4Addr {
        let prefix_len = u32::from(self.prefix_len.min(32));
        Ipv4Addr::from(u32::MAX.checked_shl(32 - prefix_len).unwrap_or(0))
    }
}

/// `10.213.0.17/24 via 10.213.0.1, dns 10.213.0.1 (lease infinite)`.
impl fmt::Display for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix_len)?;
        match self.router {
            Some(r) => write!(f, " via {r}")?,
            None => write!(f, ", no router")?,
        }
        if self.dns.is_empty() {
            write!(f, ", no dns")?;
        } else {
            write!(f, ", dns")?;
            for d in &self.dns {
                write!(f, " {d}")?;
            }
        }
        match self.lease_secs {
            Some(s) => write!(f, " (lease {s} s)"),
            None => write!(f, " (lease infinite)"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    Discover = 1,
    Offer = 2,
    Request = 3,
    Ack = 5,
    Nak = 6,
}

/// A message the client sends.
#[derive(Debug, Clone)]
pub struct Outgoing<'a> {
    /// Discover or Request.
    pub kind: MessageType,
    pub xid: u32,
    pub mac: [u8; 6],
    /// Our address when renewing, else unspecified.
    pub ciaddr: Ipv4Addr,
    /// The offer a Request accepts: (address, server id), options 50 and 54.
    pub accept: Option<(Ipv4Addr, Ipv4Addr)>,
    /// Sent as option 12 unless empty.
    pub hostname: &'a str,
}

impl Outgoing<'_> {
    pub fn encode(&self) -> Vec<u8> {
        let mut m = vec![0u8; OPTIONS_START];
        m[0] = BOOTREQUEST;
        m[1] = HTYPE_ETHERNET;
        m[2] = 6;
        m[4..8].copy_from_slice(&self.xid.to_be_bytes());
        // Until we have an address, replies can only reach us broadcast.
        if self.ciaddr.is_unspecified() {
            m[10..12].copy_from_slice(&FLAG_BROADCAST.to_be_bytes());
        }
        m[12..16].copy_from_slice(&self.ciaddr.octets());
        m[28..34].copy_from_slice(&self.mac);
        m[236..240].copy_from_slice(&MAGIC_COOKIE);
        let mut option = |code: u8, value: &[u8]| {
            // Values longer than an option can hold are left out.
            if let Ok(len) = u8::try_from(value.len()) {
                m.extend_from_slice(&[code, len]);
                m.extend_from_slice(value);
            }
        };
        option(OPT_MESSAGE_TYPE, &[self.kind as u8]);
        let mut client_id = vec![HTYPE_ETHERNET];
        client_id.extend_from_slice(&self.mac);
        option(OPT_CLIENT_ID, &client_id);
        if let Some((address, server)) = self.accept {
            option(OPT_REQUESTED_IP, &address.octets());
            option(OPT_SERVER_ID, &server.octets());
        }
        if !self.hostname.is_empty() {
            option(OPT_HOSTNAME, self.hostname.as_bytes());
        }
        option(OPT_PARAMS, &PARAMS);
        m.push(OPT_END);
        if m.len() < MIN_REQUEST_LEN {
            m.resize(MIN_REQUEST_LEN, OPT_PAD);
        }
        m
    }
}

/// A server's answer to us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Offer(Lease),
    Ack(Lease),
    /// With the server's message (option 56), if any.
    Nak(Option<String>),
}

/// Parse and check a reply to transaction `xid` from client `mac`.
pub fn parse_reply(buf: &[u8], xid: u32, mac: [u8; 6]) -> Result<Reply, DhcpError> {
    let (header, options) = buf
        .split_first_chunk::<OPTIONS_START>()
        .ok_or(DhcpError::Malformed("shorter than the fixed header"))?;
    if header[0] != BOOTREPLY {
        return Err(DhcpError::Malformed("not a BOOTREPLY"));
    }
    if header[1] != HTYPE_ETHERNET || header[2] != 6 {
        return Err(DhcpError::Malformed("not for an Ethernet address"));
    }
    if header[4..8] != xid.to_be_bytes() || header[28..34] != mac {
        return Err(DhcpError::NotOurs);
    }
    if header[236..240] != MAGIC_COOKIE {
        return Err(DhcpError::Malformed("no DHCP magic cookie"));
    }
    let yiaddr = Ipv4Addr::new(header[16], header[17], header[18], header[19]);
    let options = parse_options(options)?;
    match options.get(&OPT_MESSAGE_TYPE).map(Vec::as_slice) {
        Some([2]) => Ok(Reply::Offer(lease(yiaddr, &options)?)),
        Some([5]) => Ok(Reply::Ack(lease(yiaddr, &options)?)),
        Some([6]) => Ok(Reply::Nak(options.get(&OPT_MESSAGE).map(|m| printable(m)))),
        Some([_]) => Err(DhcpError::Malformed("not an offer, acknowledgement or refusal")),
        Some(_) => Err(DhcpError::BadOption(OPT_MESSAGE_TYPE)),
        None => Err(DhcpError::Malformed("no message type (a BOOTP reply)")),
    }
}

/// The options up to the end option, by code. An option given more than
/// once is one long option (RFC 3396). The overload option (52) is not
/// followed: nothing we ask for needs the file or sname fields.
fn parse_options(mut rest: &[u8]) -> Result<BTreeMap<u8, Vec<u8>>, DhcpError> {
    let mut options: BTreeMap<u8, Vec<u8>> = BTreeMap::new();
    loop {
        let Some((&code, after)) = rest.split_first() else {
            return Err(DhcpError::Malformed("options without the end option"));
        };
        match code {
            OPT_PAD => rest = after,
            OPT_END => return Ok(options),
            _ => {
                let (&len, after) = after.split_first().ok_or(DhcpError::BadOption(code))?;
                let (value, after) = after
                    .split_at_checked(usize::from(len))
                    .ok_or(DhcpError::BadOption(code))?;
                options.entry(code).or_default().extend_from_slice(value);
                rest = after;
            }
        }
    }
}

fn lease(address: Ipv4Addr, options: &BTreeMap<u8, Vec<u8>>) -> Result<Lease, DhcpError> {
    if address.is_unspecified() || address.is_broadcast() || address.is_multicast() || address.is_loopback() {
        return Err(DhcpError::Malformed("the offered address is not a unicast address"));
    }
    let server_id = one_address(options, OPT_SERVER_ID)?.ok_or(DhcpError::Malformed("no server identifier"))?;
    let mask = one_address(options, OPT_SUBNET_MASK)?.ok_or(DhcpError::Malformed("no subnet mask"))?;
    let prefix_len = prefix_len(mask).ok_or(DhcpError::BadOption(OPT_SUBNET_MASK))?;
    let router = addresses(options, OPT_ROUTER)?
        .into_iter()
        .find(|r| !r.is_unspecified());
    let dns = addresses(options, OPT_DNS)?;
    let domain = options.get(&OPT_DOMAIN).and_then(|d| domain(d));
    let lease_secs = match options.get(&OPT_LEASE_TIME).map(Vec::as_slice) {
        None => None,
        Some(&[a, b, c, d]) => Some(u32::from_be_bytes([a, b, c, d])).filter(|&s| s != INFINITE),
        Some(_) => return Err(DhcpError::BadOption(OPT_LEASE_TIME)),
    };
    Ok(Lease {
        address,
        prefix_len,
        router,
        dns,
        domain,
        lease_secs,
        server_id,
    })
}

fn one_address(options: &BTreeMap<u8, Vec<u8>>, code: u8) -> Result<Option<Ipv4Addr>, DhcpError> {
    options
        .get(&code)
        .map(|v| <[u8; 4]>::try_from(v.as_slice()).map(Ipv4Addr::from))
        .transpose()
        .map_err(|_| DhcpError::BadOption(code))
}

/// A list of addresses (one at least, when the option is there).
fn addresses(options: &BTreeMap<u8, Vec<u8>>, code: u8) -> Result<Vec<Ipv4Addr>, DhcpError> {
    let Some(value) = options.get(&code) else {
        return Ok(Vec::new());
    };
    let chunks = value.chunks_exact(4);
    if value.is_empty() || !chunks.remainder().is_empty() {
        return Err(DhcpError::BadOption(code));
    }
    Ok(chunks.map(|c| Ipv4Addr::new(c[0], c[1], c[2], c[3])).collect())
}

/// The prefix length of a contiguous, non-zero netmask.
fn prefix_len(mask: Ipv4Addr) -> Option<u8> {
    let m = u32::from(mask);
    let ones = m.leading_ones();
    (ones > 0 && ones + m.trailing_zeros() == 32).then_some(ones as u8)
}

/// A search domain fit for resolv.conf (it goes on a `search` line, so
/// nothing that could end the line or the word); anything else is ignored.
fn domain(value: &[u8]) -> Option<String> {
    // Some servers count a C string's NUL.
    let end = value.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let name = value.get(..end)?;
    let ok = |b: &u8| b.is_ascii_alphanumeric() || b"-_.".contains(b);
    (!name.is_empty() && name.len() <= 253 && name.iter().all(ok)).then(|| String::from_utf8_lossy(name).into_owned())
}

/// A server's message for the log: printable ASCII, bounded.
fn printable(value: &[u8]) -> String {
    value
        .iter()
        .take(200)
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '?'
            }
        })
        .collect()
}

/// A transaction id: it only has to differ from other clients' and from
/// our earlier ones, so a clock will do when there is no /dev/urandom.
fn random_xid(mac: [u8; 6]) -> u32 {
    let mut b = [0u8; 4];
    match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)) {
        Ok(()) => u32::from_ne_bytes(b),
        Err(_) => {
            let ns = sys::clock_ns(libc::CLOCK_MONOTONIC) as u64;
            (ns ^ (ns >> 32)) as u32 ^ u32::from_be_bytes([mac[2], mac[3], mac[4], mac[5]])
        }
    }
}

/// How long to wait before sending again after a send failed.
const SEND_RETRY: Duration = Duration::from_millis(500);

/// How long to wait for an answer to the `attempt`th message (from 0): the
/// guest kernel may be slow (even interpreted), so generously.
fn attempt_wait(attempt: u32) -> Duration {
    Duration::from_secs(if attempt == 0 { 4 } else { 8 })
}

/// After this many unanswered requests, start again with a discover.
const MAX_REQUESTS: u32 = 3;

/// Where the exchange is.
#[derive(Debug)]
enum State {
    /// Discover sent, waiting for an offer.
    Selecting,
    /// Requesting this offer.
    Requesting(Lease),
    /// Asking the server that gave us the address (unicast) to extend it.
    Renewing { address: Ipv4Addr, server: Ipv4Addr },
}

/// Whether `reply` is what `state` waits for: an offer while selecting;
/// an acknowledgement (while requesting: from the server whose offer we
/// took) or a refusal after a request.
fn answers(state: &State, reply: &Reply) -> bool {
    match (state, reply) {
        (State::Selecting, Reply::Offer(_)) => true,
        (State::Requesting(offer), Reply::Ack(lease)) => lease.server_id == offer.server_id,
        (State::Renewing { .. }, Reply::Ack(_)) => true,
        (State::Requesting(_) | State::Renewing { .. }, Reply::Nak(_)) => true,
        _ => false,
    }
}

/// A socket on port 68 of one interface, which is up.
struct Client {
    sock: UdpSocket,
    mac: [u8; 6],
}

impl Client {
    fn open(ifname: &str) -> Result<Client, DhcpError> {
        netif::set_up(ifname).map_err(|e| DhcpError::Io("cannot bring the interface up", e))?;
        let mac = netif::hw_addr(ifname).map_err(|e| DhcpError::Io("cannot read the MAC address", e))?;
        let sock = udp_socket(ifname).map_err(|e| DhcpError::Io("cannot open the DHCP client socket", e))?;
        Ok(Client { sock, mac })
    }

    /// Run the exchange from `state` until a lease is acknowledged or
    /// `timeout` has passed.
    fn exchange(&self, hostname: &str, mut state: State, timeout: Duration) -> Result<Lease, DhcpError> {
        let start = Instant::now();
        let deadline = start + timeout;
        let mut xid = random_xid(self.mac);
        let mut attempt = 0;
        let mut ignored = None;
        let mut unsent = None;
        loop {
            let now = Instant::now();
            if now >= deadline {
                let waiting_for = match state {
                    State::Selecting => "offer",
                    _ => "acknowledgement",
                };
                return Err(DhcpError::Timeout {
                    waiting_for,
                    waited: now - start,
                    ignored,
                    unsent,
                });
            }
            let (ciaddr, accept, kind, to) = match &state {
                State::Selecting => (Ipv4Addr::UNSPECIFIED, None, MessageType::Discover, Ipv4Addr::BROADCAST),
                State::Requesting(offer) => (
                    Ipv4Addr::UNSPECIFIED,
                    Some((offer.address, offer.server_id)),
                    MessageType::Request,
                    Ipv4Addr::BROADCAST,
                ),
                State::Renewing { address, server } => (*address, None, MessageType::Request, *server),
            };
            let message = Outgoing {
                kind,
                xid,
                mac: self.mac,
                ciaddr,
                accept,
                hostname,
            }
            .encode();
            if let Err(e) = self.sock.send_to(&message, (to, SERVER_PORT)) {
                unsent = Some(sys::error_text(&e));
                if matches!(state, State::Renewing { .. }) {
                    // The lease's server may be out of reach (no route):
                    // ask everyone instead.
                    state = State::Selecting;
                } else {
                    // A link that has just come up may refuse a send for
                    // a moment (no carrier yet, a full queue): try again
                    // until the deadline rather than give up the boot's
                    // only chance of an address.
                    std::thread::sleep(SEND_RETRY.min(deadline.saturating_duration_since(Instant::now())));
                }
                continue;
            }
            unsent = None;
            let until = deadline.min(now + attempt_wait(attempt));
            attempt += 1;
            match self.receive(&state, xid, until, &mut ignored)? {
                Some(Reply::Offer(offer)) => {
                    // The request keeps the offer's transaction id.
                    state = State::Requesting(offer);
                    attempt = 0;
                }
                Some(Reply::Ack(lease)) => return Ok(lease),
                Some(Reply::Nak(message)) => {
                    ignored = Some(DhcpError::Refused(message).to_string());
                    state = State::Selecting;
                    xid = random_xid(self.mac);
                    attempt = 0;
                    // Not straight back: a server that always refuses would
                    // have us spin.
                    std::thread::sleep(Duration::from_secs(1).min(deadline.saturating_duration_since(Instant::now())));
                }
                None if attempt >= MAX_REQUESTS && !matches!(state, State::Selecting) => {
                    state = State::Selecting;
                    xid = random_xid(self.mac);
                    attempt = 0;
                }
                None => {}
            }
        }
    }

    /// The first reply to `xid` that answers `state`, or None at `until`.
    /// Replies for others and late ones (an offer while requesting) are
    /// skipped; why the last malformed one was refused goes in `ignored`.
    fn receive(
        &self,
        state: &State,
        xid: u32,
        until: Instant,
        ignored: &mut Option<String>,
    ) -> Result<Option<Reply>, DhcpError> {
        let mut buf = [0u8; 1500];
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.sock
                .set_read_timeout(Some(left))
                .map_err(|e| DhcpError::Io("cannot set a timeout", e))?;
            let n = match self.sock.recv(&mut buf) {
                Ok(n) => n,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(DhcpError::Io("cannot receive", e)),
            };
            match parse_reply(buf.get(..n).unwrap_or_default(), xid, self.mac) {
                Ok(reply) if answers(state, &reply) => return Ok(Some(reply)),
                Ok(_) | Err(DhcpError::NotOurs) => {}
                Err(e) => *ignored = Some(e.to_string()),
            }
        }
    }
}

/// A UDP socket on 0.0.0.0:68 that sends and receives on `ifname` only
/// and may broadcast.
fn udp_socket(ifname: &str) -> io::Result<UdpSocket> {
    // SAFETY: plain socket call.
    let fd = sys::cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: a fresh fd only we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    for option in [libc::SO_REUSEADDR, libc::SO_BROADCAST] {
        // SAFETY: an int option, pointer and length describe `one`.
        sys::cvt(unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&one as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        })?;
    }
    // SAFETY: pointer and length describe the name (no NUL needed).
    sys::cvt(unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            ifname.as_ptr().cast(),
            ifname.len() as libc::socklen_t,
        )
    })?;
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: CLIENT_PORT.to_be(),
        sin_addr: libc::in_addr { s_addr: 0 },
        sin_zero: [0; 8],
    };
    // SAFETY: pointer and length describe `addr`.
    sys::cvt(unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    })?;
    Ok(UdpSocket::from(sock))
}

/// Bring `ifname` up and get a lease for it (discover, offer, request,
/// acknowledgement), trying for at most about `timeout`.
pub fn acquire(ifname: &str, hostname: &str, timeout: Duration) -> Result<Lease, DhcpError> {
    Client::open(ifname)?.exchange(hostname, State::Selecting, timeout)
}

/// Extend `lease`, which `ifname` has: a request with its address to the
/// server that gave it; a refusal or silence falls back to a new discover.
pub fn renew(ifname: &str, hostname: &str, lease: &Lease, timeout: Duration) -> Result<Lease, DhcpError> {
    let state = State::Renewing {
        address: lease.address,
        server: lease.server_id,
    };
    Client::open(ifname)?.exchange(hostname, state, timeout)
}

/// [`acquire`] a lease, apply it ([`netif::apply_lease`]), and renew a
/// finite one in a background thread at about half its time.
pub fn configure(ifname: &str, hostname: &str, resolv_conf: &Path, timeout: Duration) -> Result<Lease, DhcpError> {
    let lease = acquire(ifname, hostname, timeout)?;
    netif::apply_lease(ifname, &lease, resolv_conf).map_err(|e| DhcpError::Io("cannot apply the lease", e))?;
    if lease.lease_secs.is_some() {
        let (name, host, path) = (ifname.to_owned(), hostname.to_owned(), resolv_conf.to_owned());
        let first = lease.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("dhcp-{ifname}"))
            .spawn(move || keep_renewed(&name, &host, &path, first));
        if let Err(e) = spawned {
            say!("{ifname}: cannot start the lease renewal thread: {e}");
        }
    }
    Ok(lease)
}

/// Shortest wait between renewals (a server may hand out tiny leases).
const MIN_RENEW_WAIT: Duration = Duration::from_secs(30);

/// Renew at half the lease, then at halves of what is left after a
/// failure. An expired lease keeps its address: for a development VM a
/// stale address beats none.
fn keep_renewed(ifname: &str, hostname: &str, resolv_conf: &Path, mut lease: Lease) {
    while let Some(secs) = lease.lease_secs {
        let mut wait = Duration::from_secs(u64::from(secs / 2)).max(MIN_RENEW_WAIT);
        loop {
            std::thread::sleep(wait);
            let renewed = renew(ifname, hostname, &lease, DEFAULT_TIMEOUT).and_then(|new| {
                netif::apply_lease(ifname, &new, resolv_conf)
                    .map(|()| new)
                    .map_err(|e| DhcpError::Io("cannot apply the lease", e))
            });
            match renewed {
                Ok(new) => {
                    if new.address != lease.address || new.prefix_len != lease.prefix_len {
                        say!("{ifname}: new lease {new}");
                    }
                    lease = new;
                    break;
                }
                Err(e) => {
                    wait = (wait / 2).max(MIN_RENEW_WAIT);
                    say!(
                        "{ifname}: cannot renew the DHCP lease: {e}; again in {} s",
                        wait.as_secs()
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x42];
    const XID: u32 = 0x1234_5678;
    const SERVER: [u8; 4] = [10, 213, 0, 1];

    /// A server's reply with these options (and the end option).
    fn reply(yiaddr: [u8; 4], options: &[(u8, &[u8])]) -> Vec<u8> {
        let mut m = vec![0u8; OPTIONS_START];
        m[0] = BOOTREPLY;
        m[1] = HTYPE_ETHERNET;
        m[2] = 6;
        m[4..8].copy_from_slice(&XID.to_be_bytes());
        m[16..20].copy_from_slice(&yiaddr);
        m[20..24].copy_from_slice(&SERVER);
        m[28..34].copy_from_slice(&MAC);
        m[236..240].copy_from_slice(&MAGIC_COOKIE);
        for (code, value) in options {
            m.push(*code);
            m.push(value.len() as u8);
            m.extend_from_slice(value);
        }
        m.push(OPT_END);
        m
    }

    /// What dnsmasq sends for a pinned host.
    fn good(kind: u8) -> Vec<u8> {
        reply(
            [10, 213, 0, 42],
            &[
                (OPT_MESSAGE_TYPE, &[kind]),
                (OPT_SERVER_ID, &SERVER),
                (OPT_LEASE_TIME, &[0xff; 4]),
                (OPT_SUBNET_MASK, &[255, 255, 255, 0]),
                (28, &[10, 213, 0, 255]),
                (OPT_ROUTER, &SERVER),
                (OPT_DNS, &SERVER),
                (OPT_DOMAIN, b"mvm"),
                (OPT_HOSTNAME, b"guest1"),
            ],
        )
    }

    fn expected() -> Lease {
        Lease {
            address: Ipv4Addr::new(10, 213, 0, 42),
            prefix_len: 24,
            router: Some(Ipv4Addr::from(SERVER)),
            dns: vec![Ipv4Addr::from(SERVER)],
            domain: Some("mvm".into()),
            lease_secs: None,
            server_id: Ipv4Addr::from(SERVER),
        }
    }

    fn parse(buf: &[u8]) -> Result<Reply, DhcpError> {
        parse_reply(buf, XID, MAC)
    }

    #[test]
    fn encodes_a_discover() {
        let m = Outgoing {
            kind: MessageType::Discover,
            xid: XID,
            mac: MAC,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            accept: None,
            hostname: "guest1",
        }
        .encode();
        assert_eq!(m.len(), MIN_REQUEST_LEN);
        assert_eq!(&m[..4], &[1, 1, 6, 0]);
        assert_eq!(&m[4..8], &XID.to_be_bytes());
        assert_eq!(&m[8..12], &[0, 0, 0x80, 0], "secs 0, BROADCAST flag");
        assert_eq!(&m[12..28], &[0; 16], "no ciaddr, yiaddr, siaddr, giaddr");
        assert_eq!(&m[28..34], &MAC);
        assert_eq!(&m[34..236], &[0; 202]);
        assert_eq!(&m[236..240], &MAGIC_COOKIE);
        let options = parse_options(&m[240..]).unwrap();
        let expect: BTreeMap<u8, Vec<u8>> = [
            (OPT_MESSAGE_TYPE, vec![1]),
            (OPT_CLIENT_ID, vec![1, 2, 0, 0, 0, 0, 0x42]),
            (OPT_HOSTNAME, b"guest1".to_vec()),
            (OPT_PARAMS, vec![1, 3, 6, 15, 51, 54, 28]),
        ]
        .into();
        assert_eq!(options, expect);
    }

    #[test]
    fn encodes_requests() {
        let selecting = Outgoing {
            kind: MessageType::Request,
            xid: XID,
            mac: MAC,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            accept: Some((Ipv4Addr::new(10, 213, 0, 42), Ipv4Addr::from(SERVER))),
            hostname: "",
        }
        .encode();
        let options = parse_options(&selecting[240..]).unwrap();
        assert_eq!(options[&OPT_MESSAGE_TYPE], [3]);
        assert_eq!(options[&OPT_REQUESTED_IP], [10, 213, 0, 42]);
        assert_eq!(options[&OPT_SERVER_ID], SERVER);
        assert!(!options.contains_key(&OPT_HOSTNAME));
        assert_eq!(&selecting[12..16], &[0; 4]);

        let renewing = Outgoing {
            ciaddr: Ipv4Addr::new(10, 213, 0, 42),
            accept: None,
            ..Outgoing {
                kind: MessageType::Request,
                xid: XID,
                mac: MAC,
                ciaddr: Ipv4Addr::UNSPECIFIED,
                accept: None,
                hostname: "h",
            }
        }
        .encode();
        assert_eq!(&renewing[10..16], &[0, 0, 10, 213, 0, 42], "no BROADCAST flag, ciaddr");
        let options = parse_options(&renewing[240..]).unwrap();
        assert!(!options.contains_key(&OPT_REQUESTED_IP));
        assert!(!options.contains_key(&OPT_SERVER_ID));
        // A host name too long for an option is left out, not truncated.
        let long = "x".repeat(256);
        let m = Outgoing {
            kind: MessageType::Discover,
            xid: XID,
            mac: MAC,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            accept: None,
            hostname: &long,
        }
        .encode();
        assert!(!parse_options(&m[240..]).unwrap().contains_key(&OPT_HOSTNAME));
    }

    #[test]
    fn parses_offer_and_ack() {
        assert_eq!(parse(&good(2)).unwrap(), Reply::Offer(expected()));
        assert_eq!(parse(&good(5)).unwrap(), Reply::Ack(expected()));
        // Trailing bytes after the end option are ignored.
        let mut padded = good(5);
        padded.extend_from_slice(&[0; 60]);
        padded.extend_from_slice(&[1, 2, 3]);
        assert_eq!(parse(&padded).unwrap(), Reply::Ack(expected()));
    }

    #[test]
    fn parses_a_full_lease() {
        let buf = reply(
            [192, 168, 7, 9],
            &[
                (OPT_PAD, &[]),
                (OPT_MESSAGE_TYPE, &[5]),
                (OPT_SERVER_ID, &[192, 168, 7, 1]),
                (OPT_LEASE_TIME, &3600u32.to_be_bytes()),
                (OPT_SUBNET_MASK, &[255, 255, 240, 0]),
                (OPT_ROUTER, &[0, 0, 0, 0, 192, 168, 7, 254]),
                (OPT_DNS, &[1, 1, 1, 1, 8, 8, 8, 8]),
                // RFC 3396: a repeated option continues the first.
                (OPT_DNS, &[9, 9, 9, 9]),
                (OPT_DOMAIN, b"example.org\0"),
            ],
        );
        // The pad option is a single byte: drop the length reply() added.
        let buf: Vec<u8> = buf[..240].iter().chain(&buf[242..]).copied().collect();
        let Reply::Ack(lease) = parse(&buf).unwrap() else {
            panic!()
        };
        assert_eq!(
            lease,
            Lease {
                address: Ipv4Addr::new(192, 168, 7, 9),
                prefix_len: 20,
                router: Some(Ipv4Addr::new(192, 168, 7, 254)),
                dns: vec![
                    Ipv4Addr::new(1, 1, 1, 1),
                    Ipv4Addr::new(8, 8, 8, 8),
                    Ipv4Addr::new(9, 9, 9, 9)
                ],
                domain: Some("example.org".into()),
                lease_secs: Some(3600),
                server_id: Ipv4Addr::new(192, 168, 7, 1),
            }
        );
        assert_eq!(lease.netmask(), Ipv4Addr::new(255, 255, 240, 0));
        assert_eq!(
            lease.to_string(),
            "192.168.7.9/20 via 192.168.7.254, dns 1.1.1.1 8.8.8.8 9.9.9.9 (lease 3600 s)"
        );
        assert_eq!(
            expected().to_string(),
            "10.213.0.42/24 via 10.213.0.1, dns 10.213.0.1 (lease infinite)"
        );
    }

    #[test]
    fn optional_options_may_be_missing() {
        let buf = reply(
            [10, 0, 0, 5],
            &[
                (OPT_MESSAGE_TYPE, &[2]),
                (OPT_SERVER_ID, &SERVER),
                (OPT_SUBNET_MASK, &[255, 255, 255, 255]),
            ],
        );
        let Reply::Offer(lease) = parse(&buf).unwrap() else {
            panic!()
        };
        assert_eq!((lease.prefix_len, lease.router, lease.lease_secs), (32, None, None));
        assert!(lease.dns.is_empty() && lease.domain.is_none());
        assert_eq!(lease.to_string(), "10.0.0.5/32, no router, no dns (lease infinite)");
    }

    #[test]
    fn parses_a_nak() {
        let nak = reply(
            [0; 4],
            &[
                (OPT_MESSAGE_TYPE, &[6]),
                (OPT_SERVER_ID, &SERVER),
                (OPT_MESSAGE, b"wrong network\n\x1b"),
            ],
        );
        assert_eq!(parse(&nak).unwrap(), Reply::Nak(Some("wrong network??".into())));
        let bare = reply([0; 4], &[(OPT_MESSAGE_TYPE, &[6])]);
        assert_eq!(parse(&bare).unwrap(), Reply::Nak(None));
        assert_eq!(
            DhcpError::Refused(Some("no".into())).to_string(),
            "the server refused the request: no"
        );
    }

    #[test]
    fn refuses_replies_for_others() {
        assert!(matches!(parse_reply(&good(2), XID + 1, MAC), Err(DhcpError::NotOurs)));
        let mut other_mac = MAC;
        other_mac[5] ^= 1;
        assert!(matches!(parse_reply(&good(2), XID, other_mac), Err(DhcpError::NotOurs)));
    }

    #[test]
    fn refuses_malformed_headers() {
        let cases: [(usize, u8, &str); 4] = [
            (0, BOOTREQUEST, "not a BOOTREPLY"),
            (1, 6, "not for an Ethernet address"),
            (2, 16, "not for an Ethernet address"),
            (237, 0, "no DHCP magic cookie"),
        ];
        for (at, value, why) in cases {
            let mut buf = good(2);
            buf[at] = value;
            assert!(matches!(parse(&buf), Err(DhcpError::Malformed(w)) if w == why), "{at}");
        }
        for address in [[0, 0, 0, 0], [255; 4], [224, 0, 0, 1], [127, 0, 0, 1]] {
            let mut buf = good(5);
            buf[16..20].copy_from_slice(&address);
            assert!(matches!(parse(&buf), Err(DhcpError::Malformed(_))), "{address:?}");
        }
    }

    #[test]
    fn refuses_every_truncation() {
        let full = good(5);
        for len in 0..full.len() {
            assert!(parse(&full[..len]).is_err(), "{len}");
        }
    }

    #[test]
    fn refuses_bad_options() {
        let base: [(u8, &[u8]); 3] = [
            (OPT_MESSAGE_TYPE, &[5]),
            (OPT_SERVER_ID, &SERVER),
            (OPT_SUBNET_MASK, &[255, 255, 255, 0]),
        ];
        let bad: [(u8, &[u8]); 11] = [
            (OPT_SUBNET_MASK, &[255, 255, 255]),
            (OPT_SUBNET_MASK, &[255, 0, 255, 0]),
            (OPT_SUBNET_MASK, &[0, 0, 0, 0]),
            (OPT_SERVER_ID, &[1, 2, 3, 4, 5]),
            (OPT_ROUTER, &[]),
            (OPT_ROUTER, &[10, 0, 0, 1, 10]),
            (OPT_DNS, &[10, 0, 0]),
            (OPT_LEASE_TIME, &[0, 0, 1]),
            (OPT_MESSAGE_TYPE, &[5, 5]),
            (OPT_MESSAGE_TYPE, &[]),
            (OPT_LEASE_TIME, &[0, 0, 0, 0, 0]),
        ];
        for (code, value) in bad {
            // The bad one is appended: a repeated option continues the first.
            let options: Vec<(u8, &[u8])> = if matches!(code, OPT_SUBNET_MASK | OPT_SERVER_ID | OPT_MESSAGE_TYPE) {
                base.iter()
                    .filter(|(c, _)| *c != code)
                    .copied()
                    .chain([(code, value)])
                    .collect()
            } else {
                base.iter().copied().chain([(code, value)]).collect()
            };
            let err = parse(&reply([10, 0, 0, 2], &options)).unwrap_err();
            assert!(
                matches!(err, DhcpError::BadOption(c) if c == code),
                "{code} {value:?}: {err}"
            );
        }
        // Required options.
        for code in [OPT_SERVER_ID, OPT_SUBNET_MASK, OPT_MESSAGE_TYPE] {
            let options: Vec<(u8, &[u8])> = base.iter().filter(|(c, _)| *c != code).copied().collect();
            assert!(
                matches!(parse(&reply([10, 0, 0, 2], &options)), Err(DhcpError::Malformed(_))),
                "{code}"
            );
        }
        // Other message types are not answers to us.
        for kind in [1, 3, 4, 7, 8, 0, 200] {
            let buf = reply([10, 0, 0, 2], &[(OPT_MESSAGE_TYPE, &[kind])]);
            assert!(matches!(parse(&buf), Err(DhcpError::Malformed(_))), "{kind}");
        }
    }

    #[test]
    fn refuses_broken_option_framing() {
        let mut no_end = good(5);
        no_end.pop();
        assert!(matches!(parse(&no_end), Err(DhcpError::Malformed(_))));
        // An option whose length runs past the end of the message.
        let mut overlong = good(5);
        overlong.pop();
        overlong.extend_from_slice(&[OPT_DNS, 8, 1, 2, 3, 4]);
        assert!(matches!(parse(&overlong), Err(DhcpError::BadOption(OPT_DNS))));
        // A code without its length byte.
        let mut no_len = good(5);
        no_len.pop();
        no_len.push(OPT_ROUTER);
        assert!(matches!(parse(&no_len), Err(DhcpError::BadOption(OPT_ROUTER))));
    }

    #[test]
    fn ignores_unfit_domains() {
        for bad in [
            &b""[..],
            b"\0",
            b"a b",
            b"mvm\nnameserver 6.6.6.6",
            b"caf\xc3\xa9",
            b"a;b",
        ] {
            assert_eq!(domain(bad), None, "{bad:?}");
        }
        assert_eq!(domain(&[b'a'; 254]), None);
        assert_eq!(domain(b"my-lab_1.example.\0\0").as_deref(), Some("my-lab_1.example."));
        // A bad domain does not cost the lease.
        let buf = reply(
            [10, 0, 0, 2],
            &[
                (OPT_MESSAGE_TYPE, &[5]),
                (OPT_SERVER_ID, &SERVER),
                (OPT_SUBNET_MASK, &[255, 0, 0, 0]),
                (OPT_DOMAIN, b"x\ny"),
            ],
        );
        let Reply::Ack(lease) = parse(&buf).unwrap() else {
            panic!()
        };
        assert_eq!((lease.domain, lease.prefix_len), (None, 8));
    }

    #[test]
    fn prefix_lengths() {
        assert_eq!(prefix_len(Ipv4Addr::new(255, 255, 255, 0)), Some(24));
        assert_eq!(prefix_len(Ipv4Addr::new(128, 0, 0, 0)), Some(1));
        assert_eq!(prefix_len(Ipv4Addr::BROADCAST), Some(32));
        assert_eq!(prefix_len(Ipv4Addr::new(0, 0, 0, 0)), None);
        assert_eq!(prefix_len(Ipv4Addr::new(0, 255, 255, 255)), None);
        assert_eq!(prefix_len(Ipv4Addr::new(255, 255, 0, 255)), None);
        for prefix_len in [0, 1, 24, 32, 33, 255] {
            let lease = Lease {
                prefix_len,
                ..expected()
            };
            let ones = u32::from(lease.netmask()).leading_ones();
            assert_eq!(ones, u32::from(prefix_len.min(32)));
        }
    }

    #[test]
    fn survives_random_mutations() {
        // A small deterministic generator: no panic whatever the bytes.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let base = good(5);
        for _ in 0..20_000 {
            let mut buf = base.clone();
            for _ in 0..(next() % 8) {
                let at = 236 + (next() as usize % (buf.len() - 236));
                buf[at] = next() as u8;
            }
            buf.truncate(240 + next() as usize % (buf.len() - 239));
            let _ = parse(&buf);
        }
    }

    #[test]
    fn waits_for_the_reply_that_fits() {
        let offer = expected();
        let other_server = Lease {
            server_id: Ipv4Addr::new(10, 213, 0, 2),
            ..expected()
        };
        let selecting = State::Selecting;
        let requesting = State::Requesting(offer.clone());
        let renewing = State::Renewing {
            address: offer.address,
            server: offer.server_id,
        };
        assert!(answers(&selecting, &Reply::Offer(offer.clone())));
        assert!(!answers(&selecting, &Reply::Ack(offer.clone())));
        assert!(!answers(&selecting, &Reply::Nak(None)));
        assert!(answers(&requesting, &Reply::Ack(offer.clone())));
        assert!(!answers(&requesting, &Reply::Ack(other_server.clone())));
        assert!(!answers(&requesting, &Reply::Offer(offer.clone())));
        assert!(answers(&requesting, &Reply::Nak(None)));
        assert!(answers(&renewing, &Reply::Ack(other_server)));
        assert!(answers(&renewing, &Reply::Nak(None)));
        assert!(!answers(&renewing, &Reply::Offer(offer)));
    }

    #[test]
    fn timeout_messages_say_what_was_missing() {
        let e = DhcpError::Timeout {
            waiting_for: "offer",
            waited: Duration::from_secs(30),
            ignored: Some("malformed reply: no subnet mask".into()),
            unsent: None,
        };
        assert_eq!(
            e.to_string(),
            "no DHCP offer in 30 s (ignored a reply: malformed reply: no subnet mask)"
        );
        let e = DhcpError::Timeout {
            waiting_for: "offer",
            waited: Duration::from_secs(30),
            ignored: None,
            unsent: Some("Network is down".into()),
        };
        assert_eq!(
            e.to_string(),
            "no DHCP offer in 30 s (the last send failed: Network is down)"
        );
    }
}
