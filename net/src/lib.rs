//! Networking for microvm-dev guests: [`tap::Tap`] (a Linux TAP device with
//! a virtio-net header, optionally attached to a bridge) and
//! [`device::Net`], the virtio-net device that moves frames between the
//! guest's queues and a [`device::FrameIo`] such as a TAP or
//! [`socket::SocketFrames`]. [`host`] is the host side of managed
//! networks: bridge, dnsmasq, nftables, address pins;
//! [`forward::Forwarder`] forwards host ports to a guest by a userspace
//! proxy.

pub mod device;
pub mod forward;
pub mod host;
pub mod socket;
pub mod tap;

/// Errors of the net crate: each names the interface and what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("TAP \"{name}\": {what}: {source} (needs CAP_NET_ADMIN, /dev/net/tun, and a name of at most 15 bytes)")]
    Tap {
        name: String,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("bridge \"{bridge}\": cannot attach TAP \"{tap}\": {source} (does the bridge exist?)")]
    Bridge {
        bridge: String,
        tap: String,
        source: std::io::Error,
    },
    #[error("interface name {0:?} is not valid: 1-15 bytes, no '/', ':' or white space, not \".\" or \"..\"")]
    Name(String),
    /// An rtnetlink request failed. `what` names the operation and the
    /// interface; a refusal by the kernel keeps its errno in `source`
    /// (`raw_os_error()`: EEXIST, ENODEV, EPERM, ...), a reply that could
    /// not be decoded has kind `InvalidData`.
    #[error("netlink: {what}: {source}")]
    Netlink { what: String, source: std::io::Error },
    #[error("{tool} not found: install Debian's {package} package")]
    MissingTool { tool: &'static str, package: &'static str },
    #[error("{what}: cannot run it: {source}")]
    Spawn { what: String, source: std::io::Error },
    #[error("{what} failed: {output}")]
    Command { what: String, output: String },
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: unreadable network state: {reason} (delete the file to start the network afresh)")]
    State { path: std::path::PathBuf, reason: String },
    #[error("network {network:?}: {reason}")]
    BadSpec { network: String, reason: String },
    #[error("no network named {name:?}: make it with `mvm network up --name {name} --subnet <cidr>`")]
    UnknownNetwork { name: String },
    #[error("network {network:?}: subnet {subnet} overlaps the host's route {route}; choose another with --subnet")]
    SubnetInUse {
        network: String,
        subnet: String,
        route: String,
    },
    #[error("network {network:?}: every address of {subnet} is pinned; remove VMs or use a larger subnet")]
    Full { network: String, subnet: String },
    #[error("network {network:?} is in use by {}: stop those VMs first", ports.join(", "))]
    InUse { network: String, ports: Vec<String> },
    #[error("interface {0:?} disappeared")]
    Gone(String),
    #[error("host port {}/{} is already in use on the host (stop what uses it, or forward another host port)", spec.host, spec.protocol)]
    PortInUse { spec: forward::ForwardSpec },
    #[error("host port {}/{}: permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE; forward a host port of 1024 or more)", spec.host, spec.protocol)]
    PortDenied { spec: forward::ForwardSpec },
    #[error("host address {} of forward {spec} is not an address of this host (use 127.0.0.1, 0.0.0.0 or one of `ip addr`)", spec.host.ip())]
    HostAddress { spec: forward::ForwardSpec },
    #[error("cannot forward {spec}: {source}")]
    Forward {
        spec: forward::ForwardSpec,
        source: std::io::Error,
    },
    #[error("host port {}/{} is forwarded twice: to guest ports {} and {} (keep one)", spec.host, spec.protocol, other.guest_port, spec.guest_port)]
    ForwardTwice {
        spec: forward::ForwardSpec,
        other: forward::ForwardSpec,
    },
    #[error("unknown protocol {0:?}: use tcp or udp")]
    Protocol(String),
}

impl Error {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Error {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// A MAC address derived stably from `vm_name` and the interface index:
/// locally administered and unicast, so copies of one definition under
/// different names never collide and a VM keeps its MAC across restarts.
pub fn mac_for(vm_name: &str, index: usize) -> [u8; 6] {
    // FNV-1a: stable across builds and platforms (std's hasher is not).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in vm_name.as_bytes().iter().chain(&(index as u64).to_le_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let b = h.to_le_bytes();
    [(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]]
}

/// A Linux interface name as the kernel accepts it (`dev_valid_name`):
/// 1-15 bytes, not `.` or `..`, no `/`, `:` or white space.
pub fn check_interface_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(format!("an interface name is 1 to {} bytes", libc::IFNAMSIZ - 1));
    }
    if name == "." || name == ".." {
        return Err("\".\" and \"..\" are not interface names".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| *c == '/' || *c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(format!("{c:?} is not allowed in an interface name"));
    }
    Ok(())
}

/// `aa:bb:cc:dd:ee:ff`, as `ip link` and dnsmasq write a MAC.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_stable_local_unicast_and_distinct() {
        let a = mac_for("web", 0);
        assert_eq!(a, mac_for("web", 0));
        assert_ne!(a, mac_for("web-2", 0));
        assert_ne!(a, mac_for("web", 1));
        assert_eq!(a[0] & 0x01, 0, "unicast");
        assert_eq!(a[0] & 0x02, 0x02, "locally administered");
        assert_eq!(format_mac([2, 0xab, 0, 1, 0x10, 0xff]), "02:ab:00:01:10:ff");
    }
}
