//! Networking for microvm-dev guests: [`tap::Tap`] (a Linux TAP device with
//! a virtio-net header, optionally attached to a bridge) and
//! [`device::Net`], the virtio-net device that moves frames between the
//! guest's queues and a [`device::FrameIo`] such as a TAP or
//! [`socket::SocketFrames`].

pub mod device;
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
    #[error("interface name {0:?} is empty or longer than 15 bytes")]
    Name(String),
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
    }
}
