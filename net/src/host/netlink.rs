//! Synchronous rtnetlink (`NETLINK_ROUTE`) requests for the host side of
//! guest networking: bridges, IPv4 addresses, routes and bridge ports.
//!
//! One [`Netlink`] owns one socket and sends one request at a time: it
//! waits for the kernel's ACK, error or end of dump before returning, so
//! no tokio and no background thread. Replies are decoded defensively: a
//! truncated or malformed message is an error, never a panic.

use std::io;
use std::net::Ipv4Addr;

use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NlasIterator, NLM_F_ACK, NLM_F_ACK_TLVS,
    NLM_F_CAPPED, NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoBridgePort, InfoKind, InfoPortData, InfoPortKind, LinkAttribute, LinkFlags, LinkInfo as NlLinkInfo, LinkMessage,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::Error;

/// Big enough for any single datagram of a dump (the kernel fills dump
/// datagrams up to about a page, more only for links with many VFs).
const RECV_BUF_LEN: usize = 64 * 1024;
/// A dump interrupted by a concurrent change is retried this many times.
const DUMP_ATTEMPTS: usize = 3;
/// `NLMSGERR_ATTR_MSG`: the extended ACK's human-readable message.
const NLMSGERR_ATTR_MSG: u16 = 1;
const NETLINK_HEADER_LEN: usize = 16;

/// A network interface as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// Index of the bridge (or other master) this interface is a port of.
    pub master: Option<u32>,
    /// `IFLA_INFO_KIND`: "bridge", "tun", "veth", ...; `None` for plain
    /// devices such as physical NICs and loopback.
    pub kind: Option<String>,
    /// The hardware address, when it is an Ethernet (6-byte) one.
    pub mac: Option<[u8; 6]>,
}

/// An IPv4 address assigned to an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Address {
    pub index: u32,
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

/// An IPv4 route. Only routes that claim a destination are listed: unicast,
/// blackhole, unreachable, prohibit and throw; the per-address local and
/// broadcast entries of the local table are left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Route {
    /// Destination network; 0.0.0.0 with prefix 0 is a default route.
    pub dst: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    /// Output interface (of the first next hop for multipath routes).
    pub oif: Option<u32>,
    /// Routing table id: 254 is main, 255 local.
    pub table: u32,
}

/// The main routing table's id.
pub const RT_TABLE_MAIN: u32 = 254;

/// Whether the IPv4 networks `a/a_prefix` and `b/b_prefix` share any
/// address, i.e. one contains the other. Host bits are ignored and
/// prefixes above 32 count as 32. A prefix of 0 is the whole address space,
/// so 0.0.0.0/0 overlaps everything: callers checking a new subnet against
/// the routing table must skip default routes themselves.
pub fn subnet_overlaps(a: Ipv4Addr, a_prefix: u8, b: Ipv4Addr, b_prefix: u8) -> bool {
    let mask = prefix_mask(a_prefix.min(b_prefix));
    u32::from(a) & mask == u32::from(b) & mask
}

fn prefix_mask(prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p => u32::MAX << (32 - u32::from(p.min(32))),
    }
}

/// Why a request failed, before the caller names the operation.
#[derive(Debug)]
struct Failure {
    source: io::Error,
    /// The extended ACK message, e.g. "Unknown device type".
    kernel_says: Option<String>,
}

impl Failure {
    fn io(source: io::Error) -> Self {
        Failure {
            source,
            kernel_says: None,
        }
    }

    fn invalid(msg: impl Into<String>) -> Self {
        Self::io(io::Error::new(io::ErrorKind::InvalidData, msg.into()))
    }

    fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }

    fn context(self, what: impl Into<String>) -> Error {
        let mut what = what.into();
        if let Some(msg) = self.kernel_says {
            what = format!("{what} (kernel: {msg})");
        }
        Error::Netlink {
            what,
            source: self.source,
        }
    }
}

fn check_name(name: &str) -> Result<(), Error> {
    crate::check_interface_name(name).map_err(|_| Error::Name(name.to_string()))
}

/// An rtnetlink socket in the network namespace of the thread that opened
/// it.
pub struct Netlink {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    /// Open a `NETLINK_ROUTE` socket. Changing links and addresses later
    /// needs CAP_NET_ADMIN; reading does not.
    pub fn open() -> Result<Netlink, Error> {
        let fail = |source| Failure::io(source).context("opening a NETLINK_ROUTE socket");
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(fail)?;
        socket.bind_auto().map_err(fail)?;
        // Connected to the kernel, the socket refuses unicasts from other
        // processes that might forge replies.
        socket.connect(&SocketAddr::new(0, 0)).map_err(fail)?;
        // Both only improve error messages; kernels before 4.12 lack them.
        let _ = socket.set_ext_ack(true);
        let _ = socket.set_cap_ack(true);
        Ok(Netlink {
            socket,
            seq: 0,
            buf: vec![0; RECV_BUF_LEN],
        })
    }

    /// The index of the interface `name`, or `None` if there is none.
    pub fn link_index(&mut self, name: &str) -> Result<Option<u32>, Error> {
        Ok(self.link_by_name(name)?.map(|link| link.index))
    }

    /// The interface with index `index`, or `None` if there is none.
    pub fn link(&mut self, index: u32) -> Result<Option<LinkInfo>, Error> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.get_link(msg, || format!("looking up interface #{index}"))
    }

    /// The interface named `name`, or `None` if there is none.
    pub fn link_by_name(&mut self, name: &str) -> Result<Option<LinkInfo>, Error> {
        check_name(name)?;
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        self.get_link(msg, || format!("looking up interface {name}"))
    }

    /// All interfaces.
    pub fn links(&mut self) -> Result<Vec<LinkInfo>, Error> {
        let what = "listing interfaces";
        let replies = self
            .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))
            .map_err(|f| f.context(what))?;
        let mut links = Vec::new();
        for reply in replies {
            if let RouteNetlinkMessage::NewLink(msg) = reply {
                links.push(link_info(&msg).map_err(|f| f.context(what))?);
            }
        }
        Ok(links)
    }

    /// Create the bridge `name` (down, no ports) and return its index. An
    /// existing interface of that name is an error with errno EEXIST.
    pub fn create_bridge(&mut self, name: &str) -> Result<u32, Error> {
        check_name(name)?;
        let what = || format!("creating bridge {name}");
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        msg.attributes
            .push(LinkAttribute::LinkInfo(vec![NlLinkInfo::Kind(InfoKind::Bridge)]));
        self.change(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL)
            .map_err(|f| f.context(what()))?;
        match self.link_index(name)? {
            Some(index) => Ok(index),
            None => Err(Failure::io(io::Error::from_raw_os_error(libc::ENODEV))
                .context(format!("{}: it vanished right after creation", what()))),
        }
    }

    /// Bring the interface up (`ip link set ... up`).
    pub fn set_up(&mut self, index: u32) -> Result<(), Error> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        self.change(RouteNetlinkMessage::SetLink(msg), 0)
            .map_err(|f| f.context(format!("bringing up interface {}", self.describe(index))))
    }

    /// Delete the interface (a bridge's ports are released, not deleted).
    pub fn delete_link(&mut self, index: u32) -> Result<(), Error> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.change(RouteNetlinkMessage::DelLink(msg), 0)
            .map_err(|f| f.context(format!("deleting interface {}", self.describe(index))))
    }

    /// Put the interface in interface group `group` (`ip link set ... group`),
    /// which nftables matches as `iifgroup`/`oifgroup`.
    pub fn set_group(&mut self, index: u32, group: u32) -> Result<(), Error> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes.push(LinkAttribute::Group(group));
        self.change(RouteNetlinkMessage::SetLink(msg), 0)
            .map_err(|f| f.context(format!("setting the group of interface {}", self.describe(index))))
    }

    /// Make `port` a port of the bridge `bridge`.
    pub fn set_master(&mut self, port: u32, bridge: u32) -> Result<(), Error> {
        let mut msg = LinkMessage::default();
        msg.header.index = port;
        msg.attributes.push(LinkAttribute::Controller(bridge));
        self.change(RouteNetlinkMessage::SetLink(msg), 0).map_err(|f| {
            let (port, bridge) = (self.describe(port), self.describe(bridge));
            f.context(format!("attaching interface {port} to bridge {bridge}"))
        })
    }

    /// Set the bridge port flag "isolated" (kernel 4.18+): isolated ports
    /// can talk to non-isolated ports (the bridge itself, an uplink) but not
    /// to each other. The port must already be attached to a bridge
    /// (EOPNOTSUPP otherwise).
    pub fn set_port_isolated(&mut self, port: u32, isolated: bool) -> Result<(), Error> {
        // RTM_NEWLINK on an existing device hands IFLA_INFO_SLAVE_DATA to
        // its master's slave_changelink, as `ip link set ... type
        // bridge_slave isolated on` does.
        let mut msg = LinkMessage::default();
        msg.header.index = port;
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            NlLinkInfo::PortKind(InfoPortKind::Bridge),
            NlLinkInfo::PortData(InfoPortData::BridgePort(vec![InfoBridgePort::Isolated(isolated)])),
        ]));
        self.change(RouteNetlinkMessage::NewLink(msg), 0).map_err(|f| {
            let hint = if f.errno() == Some(libc::EOPNOTSUPP) {
                " (is it attached to a bridge?)"
            } else {
                ""
            };
            let port = self.describe(port);
            f.context(format!("setting isolated={isolated} on bridge port {port}{hint}"))
        })
    }

    /// Whether the bridge port `port` is isolated; `None` if the interface
    /// is not a bridge port (or the kernel does not report the flag). A
    /// missing interface is an error with errno ENODEV.
    pub fn port_isolated(&mut self, port: u32) -> Result<Option<bool>, Error> {
        let what = || format!("reading bridge port flags of interface #{port}");
        let mut msg = LinkMessage::default();
        msg.header.index = port;
        let replies = self
            .ack(RouteNetlinkMessage::GetLink(msg), 0)
            .map_err(|f| f.context(what()))?;
        let Some(msg) = replies.iter().find_map(|reply| match reply {
            RouteNetlinkMessage::NewLink(msg) if msg.header.index == port => Some(msg),
            _ => None,
        }) else {
            return Err(Failure::invalid("the kernel sent no link message").context(what()));
        };
        let infos = msg.attributes.iter().filter_map(|attr| match attr {
            LinkAttribute::LinkInfo(infos) => Some(infos),
            _ => None,
        });
        for info in infos.flatten() {
            if let NlLinkInfo::PortData(InfoPortData::BridgePort(attrs)) = info {
                for attr in attrs {
                    if let InfoBridgePort::Isolated(isolated) = attr {
                        return Ok(Some(*isolated));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Assign `addr/prefix` to the interface (with the subnet's broadcast
    /// address for prefixes up to /30). Already assigned is success.
    pub fn add_ipv4_address(&mut self, index: u32, addr: Ipv4Addr, prefix: u8) -> Result<(), Error> {
        let what = || format!("adding {addr}/{prefix} to interface #{index}");
        if prefix > 32 {
            return Err(Failure::io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an IPv4 prefix length is at most 32",
            ))
            .context(what()));
        }
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.prefix_len = prefix;
        msg.header.index = index;
        msg.attributes.push(AddressAttribute::Local(addr.into()));
        msg.attributes.push(AddressAttribute::Address(addr.into()));
        if prefix < 31 {
            let broadcast = u32::from(addr) | !prefix_mask(prefix);
            msg.attributes
                .push(AddressAttribute::Broadcast(Ipv4Addr::from(broadcast)));
        }
        match self.change(RouteNetlinkMessage::NewAddress(msg), NLM_F_CREATE | NLM_F_EXCL) {
            Err(f) if f.errno() == Some(libc::EEXIST) => Ok(()),
            result => result.map_err(|f| {
                let index = self.describe(index);
                f.context(format!("adding {addr}/{prefix} to interface {index}"))
            }),
        }
    }

    /// All IPv4 addresses of all interfaces.
    pub fn ipv4_addresses(&mut self) -> Result<Vec<Ipv4Address>, Error> {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        let replies = self
            .dump(RouteNetlinkMessage::GetAddress(msg))
            .map_err(|f| f.context("listing IPv4 addresses"))?;
        let mut addrs = Vec::new();
        for reply in replies {
            let RouteNetlinkMessage::NewAddress(msg) = reply else {
                continue;
            };
            if msg.header.family != AddressFamily::Inet {
                continue;
            }
            // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the
            // peer on point-to-point links and equal to it otherwise.
            let mut local = None;
            let mut address = None;
            for attr in &msg.attributes {
                match attr {
                    AddressAttribute::Local(std::net::IpAddr::V4(a)) => local = Some(*a),
                    AddressAttribute::Address(std::net::IpAddr::V4(a)) => address = Some(*a),
                    _ => {}
                }
            }
            if let Some(addr) = local.or(address) {
                addrs.push(Ipv4Address {
                    index: msg.header.index,
                    addr,
                    prefix: msg.header.prefix_len,
                });
            }
        }
        Ok(addrs)
    }

    /// The IPv4 routes of all tables (see [`Ipv4Route`] for which).
    pub fn ipv4_routes(&mut self) -> Result<Vec<Ipv4Route>, Error> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        let replies = self
            .dump(RouteNetlinkMessage::GetRoute(msg))
            .map_err(|f| f.context("listing IPv4 routes"))?;
        Ok(replies
            .iter()
            .filter_map(|reply| match reply {
                RouteNetlinkMessage::NewRoute(msg) => ipv4_route(msg),
                _ => None,
            })
            .collect())
    }

    /// "name (#index)" for error messages, or "#index" if the interface
    /// cannot be looked up.
    fn describe(&mut self, index: u32) -> String {
        match self.link(index) {
            Ok(Some(link)) => format!("{} (#{index})", link.name),
            _ => format!("#{index}"),
        }
    }

    fn get_link(&mut self, msg: LinkMessage, what: impl Fn() -> String) -> Result<Option<LinkInfo>, Error> {
        let replies = match self.ack(RouteNetlinkMessage::GetLink(msg), 0) {
            Err(f) if f.errno() == Some(libc::ENODEV) => return Ok(None),
            result => result.map_err(|f| f.context(what()))?,
        };
        for reply in replies {
            if let RouteNetlinkMessage::NewLink(msg) = reply {
                return link_info(&msg).map(Some).map_err(|f| f.context(what()));
            }
        }
        Err(Failure::invalid("the kernel sent no link message").context(what()))
    }

    /// Send a request with NLM_F_ACK and collect the replies up to the ACK.
    fn ack(&mut self, msg: RouteNetlinkMessage, flags: u16) -> Result<Vec<RouteNetlinkMessage>, Failure> {
        self.send(msg, flags | NLM_F_ACK)?;
        let (replies, _) = self.receive()?;
        Ok(replies)
    }

    /// Send a change request and wait for its ACK.
    fn change(&mut self, msg: RouteNetlinkMessage, flags: u16) -> Result<(), Failure> {
        self.ack(msg, flags).map(drop)
    }

    /// Dump all objects the request selects, retrying a dump that a
    /// concurrent change made inconsistent.
    fn dump(&mut self, msg: RouteNetlinkMessage) -> Result<Vec<RouteNetlinkMessage>, Failure> {
        for _ in 0..DUMP_ATTEMPTS {
            self.send(msg.clone(), NLM_F_DUMP)?;
            let (replies, interrupted) = self.receive()?;
            if !interrupted {
                return Ok(replies);
            }
            log::debug!("netlink dump interrupted by a concurrent change, retrying");
        }
        Err(Failure::io(io::Error::new(
            io::ErrorKind::Interrupted,
            format!("the dump was interrupted by concurrent changes {DUMP_ATTEMPTS} times"),
        )))
    }

    fn send(&mut self, msg: RouteNetlinkMessage, flags: u16) -> Result<(), Failure> {
        // Sequence numbers let receive() skip replies to an earlier request
        // that was abandoned on an error.
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        packet.finalize();
        let mut bytes = vec![0; packet.buffer_len()];
        packet.serialize(&mut bytes);
        let sent = loop {
            match self.socket.send(&bytes, 0) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                result => break result.map_err(Failure::io)?,
            }
        };
        if sent != bytes.len() {
            return Err(Failure::io(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("sent {sent} of {} bytes", bytes.len()),
            )));
        }
        Ok(())
    }

    /// Read the replies to the last request up to its end: the ACK (or
    /// error) of a plain request, NLMSG_DONE of a dump. Also returns whether
    /// the kernel flagged the dump as interrupted.
    fn receive(&mut self) -> Result<(Vec<RouteNetlinkMessage>, bool), Failure> {
        let mut replies = Vec::new();
        let mut interrupted = false;
        loop {
            let mut space = &mut self.buf[..];
            // MSG_TRUNC: the datagram's real length, to detect truncation.
            let (len, from) = loop {
                match self.socket.recv_from(&mut space, libc::MSG_TRUNC) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    result => break result.map_err(Failure::io)?,
                }
            };
            if len > self.buf.len() {
                return Err(Failure::invalid(format!(
                    "a {len}-byte reply exceeds the {}-byte buffer",
                    self.buf.len()
                )));
            }
            if from.port_number() != 0 {
                continue;
            }
            let mut rest = self.buf.get(..len).unwrap_or_default();
            while !rest.is_empty() {
                let nl =
                    NetlinkBuffer::new_checked(rest).map_err(|e| Failure::invalid(format!("malformed reply: {e}")))?;
                let msg_len = nl.length() as usize;
                let seq = nl.sequence_number();
                let flags = nl.flags();
                let bytes = rest.get(..msg_len).unwrap_or(rest);
                let aligned = msg_len.saturating_add(3) & !3;
                rest = rest.get(aligned..).unwrap_or_default();
                if seq != self.seq {
                    continue;
                }
                interrupted |= flags & NLM_F_DUMP_INTR != 0;
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes)
                    .map_err(|e| Failure::invalid(format!("malformed reply: {e}")))?;
                match msg.payload {
                    NetlinkPayload::InnerMessage(inner) => replies.push(inner),
                    NetlinkPayload::Error(err) => {
                        return match err.code {
                            None => Ok((replies, interrupted)),
                            Some(code) => Err(Failure {
                                source: io::Error::from_raw_os_error(code.get().saturating_neg()),
                                kernel_says: extack_message(flags, &err.header),
                            }),
                        };
                    }
                    NetlinkPayload::Done(done) => {
                        if done.code < 0 {
                            return Err(Failure::io(io::Error::from_raw_os_error(done.code.saturating_neg())));
                        }
                        return Ok((replies, interrupted));
                    }
                    NetlinkPayload::Overrun(_) => return Err(Failure::invalid("the kernel reported an overrun")),
                    _ => {}
                }
            }
        }
    }
}

/// The text of an extended ACK (`NLMSGERR_ATTR_MSG`), which follows the
/// echoed request header (whole request if the ACK is not capped).
fn extack_message(flags: u16, payload: &[u8]) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    let echoed = if flags & NLM_F_CAPPED != 0 {
        NETLINK_HEADER_LEN
    } else {
        let len = payload.get(..4)?;
        u32::from_ne_bytes(len.try_into().ok()?) as usize
    };
    let tlvs = payload.get(echoed.saturating_add(3) & !3..)?;
    for nla in NlasIterator::new(tlvs) {
        let nla = nla.ok()?;
        if nla.kind() == NLMSGERR_ATTR_MSG {
            let text = nla.value().split(|b| *b == 0).next()?;
            return Some(String::from_utf8_lossy(text).into_owned());
        }
    }
    None
}

fn link_info(msg: &LinkMessage) -> Result<LinkInfo, Failure> {
    let mut name = None;
    let mut master = None;
    let mut kind = None;
    let mut mac = None;
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::Controller(m) => master = Some(*m),
            LinkAttribute::Address(bytes) => mac = <[u8; 6]>::try_from(bytes.as_slice()).ok(),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let NlLinkInfo::Kind(k) = info {
                        kind = Some(k.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    let index = msg.header.index;
    let name = name.ok_or_else(|| Failure::invalid(format!("interface #{index} came without a name")))?;
    Ok(LinkInfo {
        index,
        name,
        up: msg.header.flags.contains(LinkFlags::Up),
        master,
        kind,
        mac,
    })
}

fn ipv4_route(msg: &RouteMessage) -> Option<Ipv4Route> {
    if msg.header.address_family != AddressFamily::Inet
        || !matches!(
            msg.header.kind,
            RouteType::Unicast | RouteType::BlackHole | RouteType::Unreachable | RouteType::Prohibit | RouteType::Throw
        )
    {
        return None;
    }
    let mut route = Ipv4Route {
        dst: Ipv4Addr::UNSPECIFIED,
        prefix: msg.header.destination_prefix_length,
        gateway: None,
        oif: None,
        table: u32::from(msg.header.table),
    };
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Destination(RouteAddress::Inet(a)) => route.dst = *a,
            RouteAttribute::Gateway(RouteAddress::Inet(a)) => route.gateway = Some(*a),
            RouteAttribute::Oif(i) => route.oif = Some(*i),
            // RTA_TABLE carries ids above 255, which rtm_table cannot.
            RouteAttribute::Table(t) => route.table = *t,
            RouteAttribute::MultiPath(hops) => {
                if let Some(hop) = hops.first() {
                    route.oif = route.oif.or(Some(hop.interface_index));
                    for attr in &hop.attributes {
                        if let RouteAttribute::Gateway(RouteAddress::Inet(a)) = attr {
                            route.gateway = route.gateway.or(Some(*a));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Some(route)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::testing::in_new_netns;
    use crate::tap::Tap;

    fn errno(err: &Error) -> Option<i32> {
        match err {
            Error::Netlink { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    #[test]
    fn overlaps() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert!(subnet_overlaps(ip("10.0.0.0"), 24, ip("10.0.0.128"), 25));
        assert!(subnet_overlaps(ip("10.0.0.128"), 25, ip("10.0.0.0"), 24));
        assert!(
            subnet_overlaps(ip("10.0.0.7"), 24, ip("10.0.0.200"), 24),
            "host bits ignored"
        );
        assert!(!subnet_overlaps(ip("10.0.0.0"), 24, ip("10.0.1.0"), 24));
        assert!(!subnet_overlaps(ip("10.0.0.0"), 25, ip("10.0.0.128"), 25));
        assert!(subnet_overlaps(ip("10.0.0.5"), 32, ip("10.0.0.5"), 32));
        assert!(!subnet_overlaps(ip("10.0.0.5"), 32, ip("10.0.0.6"), 32));
        assert!(subnet_overlaps(ip("172.16.0.0"), 12, ip("172.31.255.1"), 32));
        assert!(!subnet_overlaps(ip("172.16.0.0"), 12, ip("172.32.0.1"), 32));
        // The default route covers everything.
        assert!(subnet_overlaps(Ipv4Addr::UNSPECIFIED, 0, ip("192.168.1.0"), 24));
        assert!(subnet_overlaps(ip("192.168.1.0"), 24, Ipv4Addr::UNSPECIFIED, 0));
        // Over-long prefixes count as /32 instead of overflowing the shift.
        assert!(subnet_overlaps(ip("10.0.0.5"), 40, ip("10.0.0.5"), 33));
        assert!(!subnet_overlaps(ip("10.0.0.5"), 40, ip("10.0.0.6"), 33));
    }

    #[test]
    fn bridge_address_route_and_isolated_port() {
        in_new_netns(|| {
            let mut nl = Netlink::open().unwrap();
            let br = nl.create_bridge("mvmt-br0").unwrap();
            assert_eq!(nl.link_index("mvmt-br0").unwrap(), Some(br));
            let link = nl.link(br).unwrap().unwrap();
            assert_eq!(link.name, "mvmt-br0");
            assert_eq!(link.kind.as_deref(), Some("bridge"));
            assert!(!link.up);
            assert!(link.mac.is_some());
            assert_eq!(nl.link_by_name("mvmt-br0").unwrap(), Some(link));

            nl.set_up(br).unwrap();
            assert!(nl.link(br).unwrap().unwrap().up);

            let addr = Ipv4Addr::new(10, 213, 7, 1);
            nl.add_ipv4_address(br, addr, 24).unwrap();
            nl.add_ipv4_address(br, addr, 24).unwrap(); // idempotent
            let addrs = nl.ipv4_addresses().unwrap();
            let ours: Vec<_> = addrs.iter().filter(|a| a.index == br).collect();
            assert_eq!(
                ours,
                [&Ipv4Address {
                    index: br,
                    addr,
                    prefix: 24
                }]
            );
            let routes = nl.ipv4_routes().unwrap();
            assert!(
                routes.contains(&Ipv4Route {
                    dst: Ipv4Addr::new(10, 213, 7, 0),
                    prefix: 24,
                    gateway: None,
                    oif: Some(br),
                    table: RT_TABLE_MAIN,
                }),
                "{routes:?}"
            );
            // `ip` agrees, including the broadcast address we set.
            let out = std::process::Command::new("ip")
                .args(["-4", "addr", "show", "dev", "mvmt-br0"])
                .output()
                .unwrap();
            let out = String::from_utf8_lossy(&out.stdout);
            assert!(out.contains("inet 10.213.7.1/24 brd 10.213.7.255"), "{out}");

            let tap = Tap::open("mvmt-test0").unwrap();
            let port = nl.link_index(tap.name()).unwrap().unwrap();
            assert_eq!(nl.link(port).unwrap().unwrap().kind.as_deref(), Some("tun"));
            assert_eq!(nl.port_isolated(port).unwrap(), None, "not a bridge port yet");
            let err = nl.set_port_isolated(port, true).unwrap_err();
            assert_eq!(errno(&err), Some(libc::EOPNOTSUPP), "{err}");

            nl.set_master(port, br).unwrap();
            assert_eq!(nl.link(port).unwrap().unwrap().master, Some(br));
            assert_eq!(nl.port_isolated(port).unwrap(), Some(false));
            nl.set_port_isolated(port, true).unwrap();
            assert_eq!(nl.port_isolated(port).unwrap(), Some(true));
            let out = std::process::Command::new("ip")
                .args(["-d", "link", "show", "dev", "mvmt-test0"])
                .output()
                .unwrap();
            let out = String::from_utf8_lossy(&out.stdout);
            assert!(out.contains("isolated on"), "{out}");
            nl.set_port_isolated(port, false).unwrap();
            assert_eq!(nl.port_isolated(port).unwrap(), Some(false));

            let names: Vec<_> = nl.links().unwrap().into_iter().map(|l| l.name).collect();
            for name in ["lo", "mvmt-br0", "mvmt-test0"] {
                assert!(names.iter().any(|n| n == name), "{name} in {names:?}");
            }

            nl.delete_link(br).unwrap();
            assert_eq!(nl.link_index("mvmt-br0").unwrap(), None);
            assert_eq!(nl.link(br).unwrap(), None);
            // The TAP survives, released from the bridge.
            assert_eq!(nl.link(port).unwrap().unwrap().master, None);
            assert!(!nl.ipv4_routes().unwrap().iter().any(|r| r.oif == Some(br)));
        });
    }

    #[test]
    fn errors_carry_the_kernel_errno() {
        in_new_netns(|| {
            let mut nl = Netlink::open().unwrap();
            assert_eq!(nl.link_index("mvmt-none").unwrap(), None);
            assert_eq!(nl.link(4242).unwrap(), None);

            let br = nl.create_bridge("mvmt-br1").unwrap();
            let err = nl.create_bridge("mvmt-br1").unwrap_err();
            assert_eq!(errno(&err), Some(libc::EEXIST), "{err}");

            assert!(err.to_string().contains("creating bridge mvmt-br1"), "{err}");
            let Error::Netlink { source, .. } = &err else {
                panic!("{err:?}")
            };
            assert_eq!(source.kind(), io::ErrorKind::AlreadyExists);

            // Messages name the interface when it exists.
            let err = nl.set_port_isolated(br, true).unwrap_err();
            let text = err.to_string();
            assert!(text.contains("bridge port mvmt-br1 (#"), "{text}");
            assert!(text.contains("attached to a bridge?"), "{text}");
            let err = nl.set_master(4242, br).unwrap_err();
            assert_eq!(errno(&err), Some(libc::ENODEV), "{err}");
            assert!(nl.set_master(br, 4242).is_err());
            let err = nl.port_isolated(4242).unwrap_err();
            assert_eq!(errno(&err), Some(libc::ENODEV), "{err}");
            let err = nl.delete_link(4242).unwrap_err();
            assert_eq!(errno(&err), Some(libc::ENODEV), "{err}");
            assert!(nl.add_ipv4_address(br, Ipv4Addr::new(10, 0, 0, 1), 33).is_err());
            assert!(matches!(
                nl.create_bridge("a-name-that-is-too-long"),
                Err(Error::Name(_))
            ));
            assert!(matches!(nl.link_index(""), Err(Error::Name(_))));

            // The socket is still usable after errors.
            nl.delete_link(br).unwrap();
            assert_eq!(nl.link_index("mvmt-br1").unwrap(), None);
        });
    }

    #[test]
    fn dumps_spanning_many_datagrams_are_read_to_the_end() {
        in_new_netns(|| {
            let mut nl = Netlink::open().unwrap();
            // Link messages are over 1 KiB each (stats), so 80 bridges take
            // several dump datagrams.
            for i in 0..80u8 {
                let br = nl.create_bridge(&format!("mvmt-many{i}")).unwrap();
                nl.add_ipv4_address(br, Ipv4Addr::new(10, 214, i, 1), 24).unwrap();
            }
            let links = nl.links().unwrap();
            assert_eq!(links.iter().filter(|l| l.name.starts_with("mvmt-many")).count(), 80);
            // A new namespace's lo is down and has no address yet.
            assert_eq!(nl.ipv4_addresses().unwrap().len(), 80);
            // The socket is still in step with the kernel after the dumps.
            assert_eq!(nl.link_index("mvmt-many79").unwrap(), links.last().map(|l| l.index));
        });
    }

    /// Read-only: decoding the dumps of the real host's interfaces,
    /// addresses and routes (whatever devices it has) must not fail.
    #[test]
    fn host_dumps_decode() {
        let mut nl = Netlink::open().unwrap();
        let links = nl.links().unwrap();
        assert!(links.iter().any(|l| l.name == "lo"), "{links:?}");
        nl.ipv4_addresses().unwrap();
        nl.ipv4_routes().unwrap();
    }

    #[test]
    fn extack_text_is_found_after_the_echoed_header() {
        let mut payload = vec![0u8; NETLINK_HEADER_LEN];
        // NLMSGERR_ATTR_MSG = "Unknown device type\0", padded to 4.
        let text = b"Unknown device type\0";
        let nla_len = (4 + text.len()) as u16;
        payload.extend_from_slice(&nla_len.to_ne_bytes());
        payload.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        payload.extend_from_slice(text);
        while payload.len() % 4 != 0 {
            payload.push(0);
        }
        let flags = NLM_F_ACK_TLVS | NLM_F_CAPPED;
        assert_eq!(extack_message(flags, &payload).as_deref(), Some("Unknown device type"));
        assert_eq!(extack_message(NLM_F_CAPPED, &payload), None);
        // Truncated input yields nothing rather than a panic.
        assert_eq!(extack_message(flags, &payload[..3]), None);
        assert_eq!(extack_message(flags & !NLM_F_CAPPED, &payload[..3]), None);
        assert_eq!(extack_message(flags, &payload[..NETLINK_HEADER_LEN + 6]), None);
    }
}
