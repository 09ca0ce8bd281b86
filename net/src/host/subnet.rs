//! An IPv4 subnet written `10.213.0.0/24`: the network's address range,
//! the host's (gateway) address in it and the guests' addresses.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An IPv4 network: address with the host bits zero, and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Subnet {
    addr: Ipv4Addr,
    prefix: u8,
}

/// Smallest and largest prefix a network may have: /16 is 65534 guests,
/// /29 still leaves the host and five guests.
pub const PREFIX_RANGE: std::ops::RangeInclusive<u8> = 16..=29;

impl Subnet {
    /// 10.213.0.0/24: the default network's.
    pub const DEFAULT_NETWORK: Subnet = Subnet {
        addr: Ipv4Addr::new(10, 213, 0, 0),
        prefix: 24,
    };

    /// `addr/prefix`, refused unless the host bits of `addr` are zero and
    /// the prefix is in [`PREFIX_RANGE`].
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Subnet, String> {
        if !PREFIX_RANGE.contains(&prefix) {
            return Err(format!(
                "prefix /{prefix} is out of range: use /{} to /{}",
                PREFIX_RANGE.start(),
                PREFIX_RANGE.end()
            ));
        }
        let net = Subnet { addr, prefix };
        if u32::from(addr) & !net.mask_bits() != 0 {
            let base = Ipv4Addr::from(u32::from(addr) & net.mask_bits());
            return Err(format!(
                "{addr} has host bits set for /{prefix}: did you mean {base}/{prefix}?"
            ));
        }
        Ok(net)
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    fn mask_bits(&self) -> u32 {
        mask(self.prefix)
    }

    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask_bits())
    }

    /// The host's address on the bridge: the first in the subnet.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) + 1)
    }

    /// Addresses guests get: after the gateway, before broadcast.
    pub fn guest_addresses(&self) -> impl Iterator<Item = Ipv4Addr> {
        let first = u32::from(self.addr) + 2;
        let broadcast = u32::from(self.addr) | !self.mask_bits();
        (first..broadcast).map(Ipv4Addr::from)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask_bits() == u32::from(self.addr)
    }

    /// Whether `other/prefix` shares any address with this subnet
    /// (`0.0.0.0/0` overlaps everything).
    pub fn overlaps(&self, other: Ipv4Addr, prefix: u8) -> bool {
        super::netlink::subnet_overlaps(self.addr, self.prefix, other, prefix)
    }
}

fn mask(prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p => u32::MAX << (32 - u32::from(p.min(32))),
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Subnet {
    type Err = String;

    fn from_str(s: &str) -> Result<Subnet, String> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a subnet like 10.213.0.0/24"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| format!("{addr:?} is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| format!("{prefix:?} is not a prefix length"))?;
        Subnet::new(addr, prefix)
    }
}

impl serde::Serialize for Subnet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Subnet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Subnet, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_valid() {
        let d = Subnet::DEFAULT_NETWORK;
        assert_eq!(Subnet::new(d.addr(), d.prefix()), Ok(d));
    }

    #[test]
    fn parses_and_derives_addresses() {
        let net: Subnet = "10.213.0.0/24".parse().unwrap();
        assert_eq!(net.gateway(), Ipv4Addr::new(10, 213, 0, 1));
        assert_eq!(net.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        let guests: Vec<_> = net.guest_addresses().collect();
        assert_eq!(guests.len(), 253);
        assert_eq!(guests[0], Ipv4Addr::new(10, 213, 0, 2));
        assert_eq!(guests[252], Ipv4Addr::new(10, 213, 0, 254));
        assert!(net.contains(Ipv4Addr::new(10, 213, 0, 77)));
        assert!(!net.contains(Ipv4Addr::new(10, 213, 1, 1)));
        assert_eq!(net.to_string(), "10.213.0.0/24");
        let small: Subnet = "192.0.2.8/29".parse().unwrap();
        assert_eq!(small.guest_addresses().count(), 5);
    }

    #[test]
    fn refuses_bad_subnets() {
        for bad in [
            "10.0.0.1/24",
            "10.0.0.0/8",
            "10.0.0.0/30",
            "10.0.0.0",
            "x/24",
            "10.0.0.0/x",
            "10.0.0.0/24/1",
        ] {
            assert!(bad.parse::<Subnet>().is_err(), "{bad}");
        }
        let e = "10.0.0.1/24".parse::<Subnet>().unwrap_err();
        assert!(e.contains("did you mean 10.0.0.0/24"), "{e}");
    }

    #[test]
    fn overlaps() {
        let net: Subnet = "10.213.0.0/24".parse().unwrap();
        assert!(net.overlaps(Ipv4Addr::new(10, 0, 0, 0), 8));
        assert!(net.overlaps(Ipv4Addr::new(10, 213, 0, 128), 25));
        assert!(net.overlaps(Ipv4Addr::new(0, 0, 0, 0), 0));
        assert!(!net.overlaps(Ipv4Addr::new(10, 214, 0, 0), 24));
        assert!(!net.overlaps(Ipv4Addr::new(192, 168, 0, 0), 16));
    }
}
