//! A managed network: the Linux bridge with the host's address, dnsmasq
//! for DHCP and DNS, the nftables table for NAT and isolation, and the
//! address pins, with its state in `<state root>/networks/<name>/`.
//!
//! Every operation takes the network's lock (`flock` on `.lock`) and reads
//! the state file afresh, because several `mvm-vmm` processes attach VMs
//! to one network at once. An operation that fails half-way undoes what it
//! did, so a failed start leaves no bridge, rule, process or pin of its
//! own behind.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::netlink::Netlink;
use super::subnet::Subnet;
use super::{dnsmasq, nft, write_atomic};
use crate::Error;

/// The network VMs join unless told otherwise.
pub const DEFAULT_NETWORK: &str = "default";
/// The default network's bridge.
pub const DEFAULT_BRIDGE: &str = "virbr-mvm";
/// The default network's subnet: away from the ranges homes, offices,
/// Docker (172.17-31), libvirt (192.168.122), slirp (10.0.2) and
/// Kubernetes (10.96, 10.244) use.
pub const DEFAULT_SUBNET: Subnet = Subnet::DEFAULT_NETWORK;
/// The DNS domain of the guests' names.
pub const DOMAIN: &str = "mvm";
/// The interface group of every managed network's bridge: each network's
/// table drops what its guests send towards another such bridge, so VMs
/// on different networks never meet through the host.
pub const BRIDGE_GROUP: u32 = 0x6d76;
/// Where networks live, under the state root.
pub const NETWORKS_DIR: &str = "networks";
const STATE_FILE: &str = "network.json";

/// What a network is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// 1-15 of `[a-z0-9_-]`; names the state directory and the nftables table.
    pub name: String,
    /// The Linux bridge.
    pub bridge: String,
    /// The IPv4 subnet; the host is its first address.
    pub subnet: Subnet,
    /// No traffic between guests (isolated bridge ports, and a drop of
    /// traffic the host would route between them). Off only for networks
    /// made as a shared segment.
    pub isolate: bool,
}

impl NetworkSpec {
    /// The default network: bridge `virbr-mvm`, subnet 10.213.0.0/24,
    /// guests isolated.
    pub fn default_network() -> NetworkSpec {
        NetworkSpec {
            name: DEFAULT_NETWORK.into(),
            bridge: DEFAULT_BRIDGE.into(),
            subnet: DEFAULT_SUBNET,
            isolate: true,
        }
    }

    /// Check the name and the bridge name.
    pub fn validate(&self) -> Result<(), Error> {
        check_network_name(&self.name)?;
        check_interface_name(&self.bridge).map_err(|reason| Error::BadSpec {
            network: self.name.clone(),
            reason: format!("bridge {:?}: {reason}", self.bridge),
        })
    }
}

/// A network name: 1-15 of `[a-z0-9_-]`.
pub fn check_network_name(name: &str) -> Result<(), Error> {
    let ok = (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::BadSpec {
            network: name.to_string(),
            reason: "a network name is 1-15 of a-z, 0-9, '-' and '_'".into(),
        })
    }
}

pub use crate::check_interface_name;

/// A VM's fixed address on a network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    pub vm: String,
    /// `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    pub ip: Ipv4Addr,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct State {
    spec: NetworkSpec,
    #[serde(default)]
    pins: Vec<Pin>,
    /// Interfaces whose IPv4 forwarding we switched on (to restore them).
    #[serde(default)]
    forwarding: Vec<String>,
}

/// What `mvm network status` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkStatus {
    pub name: String,
    pub bridge: String,
    pub subnet: String,
    pub gateway: Ipv4Addr,
    pub isolate: bool,
    /// The bridge exists and is up with the host's address.
    pub up: bool,
    pub dnsmasq_pid: Option<i32>,
    pub nft_table: bool,
    /// TAPs on the bridge (running VMs).
    pub ports: Vec<String>,
    pub pins: Vec<Pin>,
    pub state_dir: PathBuf,
}

/// One network's state directory and lock.
#[derive(Debug, Clone)]
pub struct Network {
    dir: PathBuf,
    name: String,
}

/// What one `up` did, to undo on a later failure.
#[derive(Debug, Default)]
struct Undo {
    bridge: Option<u32>,
    table: bool,
    dnsmasq: bool,
    forwarding: Vec<String>,
}

/// The network lock, held while the value lives.
struct Locked {
    _file: File,
}

/// The network's directory under `root`.
pub fn network_dir(root: &Path, name: &str) -> PathBuf {
    root.join(NETWORKS_DIR).join(name)
}

/// Names of the networks defined under `root`.
pub fn list(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root.join(NETWORKS_DIR))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join(STATE_FILE).is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

impl Network {
    /// The network `name` under `root`. The default network needs no
    /// definition; others are made with [`Network::define`].
    pub fn open(root: &Path, name: &str) -> Result<Network, Error> {
        check_network_name(name)?;
        let net = Network {
            dir: network_dir(root, name),
            name: name.to_string(),
        };
        if name != DEFAULT_NETWORK && !net.dir.join(STATE_FILE).is_file() {
            return Err(Error::UnknownNetwork { name: name.to_string() });
        }
        Ok(net)
    }

    /// Define a network (or check that an existing one matches `spec`).
    pub fn define(root: &Path, spec: &NetworkSpec) -> Result<Network, Error> {
        spec.validate()?;
        let net = Network {
            dir: network_dir(root, &spec.name),
            name: spec.name.clone(),
        };
        let _lock = net.lock()?;
        if let Some(state) = net.read_state()? {
            if state.spec != *spec {
                return Err(Error::BadSpec {
                    network: spec.name.clone(),
                    reason: format!(
                        "it exists with bridge {}, subnet {}, isolate {}: `mvm network rm {}` first to change it",
                        state.spec.bridge, state.spec.subnet, state.spec.isolate, spec.name
                    ),
                });
            }
        } else {
            for other in list(root) {
                if other == spec.name {
                    continue;
                }
                let other = Network::open(root, &other)?.spec()?;
                if other.bridge == spec.bridge || other.subnet.overlaps(spec.subnet.addr(), spec.subnet.prefix()) {
                    return Err(Error::BadSpec {
                        network: spec.name.clone(),
                        reason: format!(
                            "network {} already uses bridge {} and subnet {}",
                            other.name, other.bridge, other.subnet
                        ),
                    });
                }
            }
            net.write_state(&State {
                spec: spec.clone(),
                pins: Vec::new(),
                forwarding: Vec::new(),
            })?;
        }
        Ok(net)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> Result<Locked, Error> {
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        let path = self.dir.join(".lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(Error::io(&path, std::io::Error::last_os_error()));
        }
        Ok(Locked { _file: file })
    }

    fn read_state(&self) -> Result<Option<State>, Error> {
        let path = self.dir.join(STATE_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| Error::State {
                path,
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    fn state(&self) -> Result<State, Error> {
        match self.read_state()? {
            Some(s) => Ok(s),
            None if self.name == DEFAULT_NETWORK => Ok(State {
                spec: NetworkSpec::default_network(),
                pins: Vec::new(),
                forwarding: Vec::new(),
            }),
            None => Err(Error::UnknownNetwork {
                name: self.name.clone(),
            }),
        }
    }

    fn write_state(&self, state: &State) -> Result<(), Error> {
        let text = serde_json::to_vec_pretty(state).map_err(|e| Error::State {
            path: self.dir.join(STATE_FILE),
            reason: e.to_string(),
        })?;
        write_atomic(&self.dir.join(STATE_FILE), &text)
    }

    /// The network's definition.
    pub fn spec(&self) -> Result<NetworkSpec, Error> {
        Ok(self.state()?.spec)
    }

    /// The pin of `vm`, if it has one.
    pub fn pin(&self, vm: &str) -> Result<Option<Pin>, Error> {
        Ok(self.state()?.pins.into_iter().find(|p| p.vm == vm))
    }

    /// Bring the network up (idempotent): bridge with the host's address,
    /// forwarding, the nftables table, dnsmasq.
    pub fn up(&self) -> Result<(), Error> {
        let _lock = self.lock()?;
        let mut state = self.state()?;
        let mut undo = Undo::default();
        match self.up_locked(&mut state, &mut undo) {
            Ok(()) => self.write_state(&state),
            Err(e) => {
                self.undo(&state.spec, undo);
                Err(e)
            }
        }
    }

    fn up_locked(&self, state: &mut State, undo: &mut Undo) -> Result<(), Error> {
        let spec = state.spec.clone();
        spec.validate()?;
        let mut nl = Netlink::open()?;
        let index = match nl.link_index(&spec.bridge)? {
            Some(index) => index,
            None => {
                check_routes(&mut nl, &spec)?;
                let index = nl.create_bridge(&spec.bridge)?;
                undo.bridge = Some(index);
                index
            }
        };
        nl.add_ipv4_address(index, spec.subnet.gateway(), spec.subnet.prefix())?;
        nl.set_group(index, BRIDGE_GROUP)?;
        nl.set_up(index)?;
        // Forwarding on the bridge (the guests' packets) and on the
        // interfaces with a default route (their replies); not `all`.
        let mut devices = vec![spec.bridge.clone()];
        devices.extend(default_route_devices(&mut nl)?);
        for dev in devices {
            if enable_forwarding(&dev)? && dev != spec.bridge {
                undo.forwarding.push(dev.clone());
                if !state.forwarding.contains(&dev) {
                    state.forwarding.push(dev);
                }
            }
        }
        if !nft::table_exists(&spec.name)? {
            undo.table = true;
        }
        nft::apply(&spec)?;
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        dnsmasq::write_host_files(&self.dir, &state.pins)?;
        if dnsmasq::running(&self.dir).is_none() {
            dnsmasq::start(&spec, &self.dir)?;
            undo.dnsmasq = true;
        }
        Ok(())
    }

    fn undo(&self, spec: &NetworkSpec, undo: Undo) {
        if undo.dnsmasq {
            dnsmasq::stop(&self.dir);
        }
        if undo.table {
            if let Err(e) = nft::remove(&spec.name) {
                log::warn!("network {}: undoing the nftables table: {e}", spec.name);
            }
        }
        for dev in &undo.forwarding {
            let _ = set_forwarding(dev, false);
        }
        if let Some(index) = undo.bridge {
            if let Err(e) = Netlink::open().and_then(|mut nl| nl.delete_link(index)) {
                log::warn!("network {}: undoing the bridge: {e}", spec.name);
            }
        }
    }

    /// Attach a VM's TAP: bring the network up if needed, pin the VM's
    /// address (the one it had, or the first free one), tell dnsmasq, and
    /// make the TAP a bridge port (isolated unless the network is shared).
    /// On failure nothing of this call remains; the returned
    /// [`Attachment`] forgets a new pin too, unless kept.
    pub fn attach(&self, vm: &str, mac: [u8; 6], tap: &str) -> Result<Attachment, Error> {
        let _lock = self.lock()?;
        let mut state = self.state()?;
        let mut undo = Undo::default();
        let before = state.pins.clone();
        // The pin first: a dnsmasq this call starts reads it at startup.
        let result = pin(&mut state, vm, &crate::format_mac(mac)).and_then(|(ip, new_pin)| {
            self.up_locked(&mut state, &mut undo)?;
            self.write_state(&state)?;
            if !undo.dnsmasq {
                if let Some(pid) = dnsmasq::running(&self.dir) {
                    dnsmasq::reload(&self.dir, pid)?;
                }
            }
            let mut nl = Netlink::open()?;
            let bridge = nl
                .link_index(&state.spec.bridge)?
                .ok_or_else(|| Error::Gone(state.spec.bridge.clone()))?;
            let port = nl.link_index(tap)?.ok_or_else(|| Error::Gone(tap.to_string()))?;
            nl.set_master(port, bridge)?;
            nl.set_port_isolated(port, state.spec.isolate)?;
            Ok((ip, new_pin))
        });
        match result {
            Ok((ip, new_pin)) => Ok(Attachment {
                network: self.clone(),
                vm: vm.to_string(),
                ip,
                new_pin,
                brought_up: undo,
                kept: false,
            }),
            Err(e) => {
                if state.pins != before {
                    state.pins = before;
                    let _ = self.write_state(&state);
                    let _ = dnsmasq::write_host_files(&self.dir, &state.pins);
                    if let Some(pid) = dnsmasq::running(&self.dir) {
                        if let Err(e) = dnsmasq::reload(&self.dir, pid) {
                            log::warn!("network {}: forgetting {vm}'s pin: {e}", state.spec.name);
                        }
                    }
                }
                self.undo(&state.spec, undo);
                Err(e)
            }
        }
    }

    /// Forget `vm`'s pin (when the VM is deleted).
    pub fn release(&self, vm: &str) -> Result<(), Error> {
        if !self.dir.join(STATE_FILE).exists() {
            // Never used: nothing to forget (and nothing to create).
            return Ok(());
        }
        let _lock = self.lock()?;
        let Some(mut state) = self.read_state()? else {
            return Ok(());
        };
        let before = state.pins.len();
        state.pins.retain(|p| p.vm != vm);
        if state.pins.len() != before {
            self.write_state(&state)?;
            dnsmasq::write_host_files(&self.dir, &state.pins)?;
            if let Some(pid) = dnsmasq::running(&self.dir) {
                // Forgotten all the same: dnsmasq's stale entry goes at
                // its next reload or restart.
                if let Err(e) = dnsmasq::reload(&self.dir, pid) {
                    log::warn!("network {}: forgetting {vm}'s pin: {e}", state.spec.name);
                }
            }
        }
        Ok(())
    }

    /// Keep a network that is up whole: restart dnsmasq if it died (true
    /// if it did), and put the nftables table and the FORWARD accept rules
    /// back if something removed them (`nft flush ruleset`, a firewall
    /// reload, Docker starting with its drop policy). Every VM process
    /// attached to the network calls this now and then.
    pub fn supervise(&self) -> Result<bool, Error> {
        // One VM process at a time: two would both add the FORWARD rules.
        let _lock = self.lock()?;
        let state = self.state()?;
        if Netlink::open()?.link_index(&state.spec.bridge)?.is_none() {
            // Brought down on purpose: nothing to keep.
            return Ok(false);
        }
        nft::ensure(&state.spec)?;
        if dnsmasq::running(&self.dir).is_some() {
            return Ok(false);
        }
        dnsmasq::write_host_files(&self.dir, &state.pins)?;
        dnsmasq::start(&state.spec, &self.dir)?;
        Ok(true)
    }

    /// Take the network down: dnsmasq, the nftables table and our rules,
    /// the forwarding we switched on, the bridge. Refused while TAPs are on
    /// the bridge (running VMs). Pins stay, so VMs keep their addresses.
    pub fn down(&self) -> Result<(), Error> {
        let _lock = self.lock()?;
        let mut state = self.state()?;
        let spec = state.spec.clone();
        let mut nl = Netlink::open()?;
        let bridge = nl.link_index(&spec.bridge)?;
        if let Some(index) = bridge {
            let ports = bridge_ports(&mut nl, index)?;
            if !ports.is_empty() {
                return Err(Error::InUse {
                    network: spec.name.clone(),
                    ports,
                });
            }
        }
        dnsmasq::stop(&self.dir);
        nft::remove(&spec.name)?;
        for dev in std::mem::take(&mut state.forwarding) {
            let _ = set_forwarding(&dev, false);
        }
        if let Some(index) = bridge {
            nl.delete_link(index)?;
        }
        if self.dir.join(STATE_FILE).exists() {
            self.write_state(&state)?;
        }
        Ok(())
    }

    /// Down, and forget the network's definition and pins.
    pub fn remove(&self) -> Result<(), Error> {
        self.down()?;
        std::fs::remove_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))
    }

    /// What the network looks like now.
    pub fn status(&self) -> Result<NetworkStatus, Error> {
        let state = self.state()?;
        let spec = state.spec;
        let mut nl = Netlink::open()?;
        let (up, ports) = match nl.link_by_name(&spec.bridge)? {
            Some(link) => {
                let has_addr = nl
                    .ipv4_addresses()?
                    .iter()
                    .any(|a| a.index == link.index && a.addr == spec.subnet.gateway());
                (link.up && has_addr, bridge_ports(&mut nl, link.index)?)
            }
            None => (false, Vec::new()),
        };
        Ok(NetworkStatus {
            name: spec.name.clone(),
            bridge: spec.bridge.clone(),
            subnet: spec.subnet.to_string(),
            gateway: spec.subnet.gateway(),
            isolate: spec.isolate,
            up,
            dnsmasq_pid: dnsmasq::running(&self.dir),
            nft_table: nft::table_exists(&spec.name)?,
            ports,
            pins: state.pins,
            state_dir: self.dir.clone(),
        })
    }
}

/// A VM's NIC on a network. Until [`Attachment::keep`], dropping it
/// forgets the pin it made (a start that fails later leaves no pin).
#[derive(Debug)]
pub struct Attachment {
    network: Network,
    vm: String,
    ip: Ipv4Addr,
    new_pin: bool,
    /// What this attach brought up (the network was down before).
    brought_up: Undo,
    kept: bool,
}

impl Attachment {
    /// The VM's address.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    pub fn network(&self) -> &Network {
        &self.network
    }

    /// The start went through: the pin stays.
    pub fn keep(&mut self) {
        self.kept = true;
    }
}

impl Drop for Attachment {
    /// Undo an attach whose start failed later: the pin it made, and the
    /// network if this start brought it up and no other VM joined since.
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        if self.new_pin {
            if let Err(e) = self.network.release(&self.vm) {
                log::warn!(
                    "network {}: cannot forget the pin of {}: {e}",
                    self.network.name,
                    self.vm
                );
            }
        }
        let undo = std::mem::take(&mut self.brought_up);
        if undo.bridge.is_none() && !undo.table && !undo.dnsmasq {
            return;
        }
        let Ok(_lock) = self.network.lock() else { return };
        let Ok(state) = self.network.state() else { return };
        let others = Netlink::open()
            .and_then(|mut nl| match nl.link_index(&state.spec.bridge)? {
                Some(index) => bridge_ports(&mut nl, index),
                None => Ok(Vec::new()),
            })
            .map_or(true, |ports| !ports.is_empty());
        if !others {
            self.network.undo(&state.spec, undo);
        }
    }
}

/// The VM's pinned address, and whether the pin is new: kept if it has
/// one (its MAC updated), else the first address no pin holds.
fn pin(state: &mut State, vm: &str, mac: &str) -> Result<(Ipv4Addr, bool), Error> {
    if let Some(p) = state.pins.iter_mut().find(|p| p.vm == vm) {
        p.mac = mac.to_string();
        return Ok((p.ip, false));
    }
    if let Some(other) = state.pins.iter().find(|p| p.mac == mac) {
        return Err(Error::BadSpec {
            network: state.spec.name.clone(),
            reason: format!("MAC {mac} is already pinned to VM {}", other.vm),
        });
    }
    let ip = state
        .spec
        .subnet
        .guest_addresses()
        .find(|ip| !state.pins.iter().any(|p| p.ip == *ip))
        .ok_or_else(|| Error::Full {
            network: state.spec.name.clone(),
            subnet: state.spec.subnet.to_string(),
        })?;
    state.pins.push(Pin {
        vm: vm.to_string(),
        mac: mac.to_string(),
        ip,
    });
    Ok((ip, true))
}

/// Refuse a subnet that overlaps a route the host has (other than
/// default routes), naming the route.
fn check_routes(nl: &mut Netlink, spec: &NetworkSpec) -> Result<(), Error> {
    let links = nl.links()?;
    for route in nl.ipv4_routes()? {
        if route.prefix == 0 {
            continue;
        }
        if spec.subnet.overlaps(route.dst, route.prefix) {
            let dev = route
                .oif
                .and_then(|i| links.iter().find(|l| l.index == i))
                .map(|l| format!(" dev {}", l.name))
                .unwrap_or_default();
            return Err(Error::SubnetInUse {
                network: spec.name.clone(),
                subnet: spec.subnet.to_string(),
                route: format!("{}/{}{dev}", route.dst, route.prefix),
            });
        }
    }
    Ok(())
}

fn default_route_devices(nl: &mut Netlink) -> Result<Vec<String>, Error> {
    let links = nl.links()?;
    let mut devs: Vec<String> = nl
        .ipv4_routes()?
        .into_iter()
        .filter(|r| r.prefix == 0)
        .filter_map(|r| r.oif)
        .filter_map(|i| links.iter().find(|l| l.index == i).map(|l| l.name.clone()))
        .collect();
    devs.sort();
    devs.dedup();
    Ok(devs)
}

fn bridge_ports(nl: &mut Netlink, bridge: u32) -> Result<Vec<String>, Error> {
    Ok(nl
        .links()?
        .into_iter()
        .filter(|l| l.master == Some(bridge))
        .map(|l| l.name)
        .collect())
}

fn forwarding_path(dev: &str) -> PathBuf {
    Path::new("/proc/sys/net/ipv4/conf").join(dev).join("forwarding")
}

/// Switch IPv4 forwarding on for `dev`; true if it was off.
fn enable_forwarding(dev: &str) -> Result<bool, Error> {
    let path = forwarding_path(dev);
    let now = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    if now.trim() == "1" {
        return Ok(false);
    }
    set_forwarding(dev, true)?;
    Ok(true)
}

fn set_forwarding(dev: &str, on: bool) -> Result<(), Error> {
    let path = forwarding_path(dev);
    std::fs::write(&path, if on { "1" } else { "0" }).map_err(|e| Error::io(&path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        State {
            spec: NetworkSpec {
                subnet: "192.0.2.8/29".parse().unwrap(),
                ..NetworkSpec::default_network()
            },
            pins: Vec::new(),
            forwarding: Vec::new(),
        }
    }

    #[test]
    fn pins_are_stable_unique_and_bounded() {
        let mut s = state();
        let (a, new) = pin(&mut s, "a", "02:00:00:00:00:0a").unwrap();
        assert!(new);
        let (b, _) = pin(&mut s, "b", "02:00:00:00:00:0b").unwrap();
        assert_eq!(a, Ipv4Addr::new(192, 0, 2, 10));
        assert_eq!(b, Ipv4Addr::new(192, 0, 2, 11));
        assert_eq!(
            pin(&mut s, "a", "02:00:00:00:00:0c").unwrap(),
            (a, false),
            "same VM, same address"
        );
        assert_eq!(s.pins[0].mac, "02:00:00:00:00:0c");
        assert!(pin(&mut s, "x", "02:00:00:00:00:0b").is_err(), "a MAC has one pin");
        s.pins.retain(|p| p.vm != "a");
        assert_eq!(
            pin(&mut s, "c", "02:00:00:00:00:0d").unwrap(),
            (a, true),
            "freed addresses are reused"
        );
        for vm in ["d", "e", "f"] {
            pin(&mut s, vm, &format!("02:00:00:00:01:{vm}{vm}")).unwrap();
        }
        assert!(matches!(pin(&mut s, "g", "02:00:00:00:00:99"), Err(Error::Full { .. })));
    }

    #[test]
    fn names_are_checked() {
        assert!(check_network_name("default").is_ok());
        for bad in ["", "Default", "a/b", "a-very-long-network", "a b"] {
            assert!(check_network_name(bad).is_err(), "{bad}");
        }
        assert!(check_interface_name("virbr-mvm").is_ok());
        for bad in [
            "",
            ".",
            "..",
            "bad/name",
            "a:b",
            "a b",
            "a-tap-name-longer-than-ifnamsiz",
        ] {
            assert!(check_interface_name(bad).is_err(), "{bad}");
        }
    }

    /// The whole life of the default network in a private namespace: up
    /// (bridge, address, nftables table, dnsmasq), attach (pin, host
    /// files, isolated port), the same pin again, down refused while a TAP
    /// is on the bridge, then down; and a subnet that overlaps a route.
    #[test]
    fn up_attach_down_in_a_private_namespace() {
        crate::host::testing::in_new_netns(|| {
            let root = std::env::temp_dir().join(format!("mvm-network-test-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            /// A failed assertion must not leave dnsmasq running.
            struct Cleanup(PathBuf);
            impl Drop for Cleanup {
                fn drop(&mut self) {
                    dnsmasq::stop(&network_dir(&self.0, DEFAULT_NETWORK));
                    let _ = std::fs::remove_dir_all(&self.0);
                }
            }
            let _cleanup = Cleanup(root.clone());
            let net = Network::open(&root, DEFAULT_NETWORK).unwrap();
            net.up().unwrap();
            let status = net.status().unwrap();
            assert!(status.up && status.nft_table, "{status:?}");
            let dnsmasq = status.dnsmasq_pid.expect("dnsmasq runs");
            net.up().unwrap();
            assert_eq!(net.status().unwrap().dnsmasq_pid, Some(dnsmasq), "up is idempotent");

            let tap = crate::tap::Tap::open("mvmt-net0").unwrap();
            let mut a = net.attach("web", [2, 1, 2, 3, 4, 5], "mvmt-net0").unwrap();
            assert_eq!(a.ip(), Ipv4Addr::new(10, 213, 0, 2));
            a.keep();
            drop(a);
            let hosts = std::fs::read_to_string(net.dir().join(dnsmasq::DHCP_HOSTS)).unwrap();
            assert_eq!(hosts, "02:01:02:03:04:05,10.213.0.2,web,infinite\n");
            let mut nl = Netlink::open().unwrap();
            let port = nl.link_index("mvmt-net0").unwrap().unwrap();
            assert_eq!(nl.port_isolated(port).unwrap(), Some(true));
            assert_eq!(net.status().unwrap().ports, vec!["mvmt-net0".to_string()]);
            // A start that fails later forgets a new pin, never an old one.
            let b = net.attach("web", [2, 1, 2, 3, 4, 5], "mvmt-net0").unwrap();
            drop(b);
            assert!(net.pin("web").unwrap().is_some());
            let tap2 = crate::tap::Tap::open("mvmt-net1").unwrap();
            let c = net.attach("db", [2, 1, 2, 3, 4, 6], "mvmt-net1").unwrap();
            assert_eq!(c.ip(), Ipv4Addr::new(10, 213, 0, 3));
            drop(c);
            assert!(net.pin("db").unwrap().is_none());

            assert!(matches!(net.down(), Err(Error::InUse { .. })));
            drop((tap, tap2));
            net.down().unwrap();
            let status = net.status().unwrap();
            assert!(
                !status.up && !status.nft_table && status.dnsmasq_pid.is_none(),
                "{status:?}"
            );
            assert_eq!(status.pins.len(), 1, "pins outlive the network");

            // An attach that brought the network up, for a start that then
            // failed: nothing of it stays.
            let tap3 = crate::tap::Tap::open("mvmt-net2").unwrap();
            let d = net.attach("solo", [2, 1, 2, 3, 4, 7], "mvmt-net2").unwrap();
            assert!(net.status().unwrap().up);
            drop(tap3);
            drop(d);
            let status = net.status().unwrap();
            assert!(
                !status.up && !status.nft_table && status.dnsmasq_pid.is_none(),
                "{status:?}"
            );
            assert!(net.pin("solo").unwrap().is_none());

            std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status()
                .unwrap();
            let out = std::process::Command::new("ip")
                .args(["route", "add", "10.213.0.0/16", "dev", "lo"])
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            let e = net.up().unwrap_err().to_string();
            assert!(e.contains("overlaps the host's route 10.213.0.0/16 dev lo"), "{e}");
            assert!(!net.status().unwrap().nft_table, "a failed up leaves nothing");
        });
    }

    /// A network made as a shared segment: its ports are not isolated, and
    /// its table has no drop between guests.
    #[test]
    fn shared_segments_do_not_isolate() {
        crate::host::testing::in_new_netns(|| {
            let root = std::env::temp_dir().join(format!("mvm-network-shared-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            let spec = NetworkSpec {
                name: "lab".into(),
                bridge: "mvm-lab".into(),
                subnet: "10.214.0.0/24".parse().unwrap(),
                isolate: false,
            };
            let net = Network::define(&root, &spec).unwrap();
            assert!(matches!(
                Network::open(&root, "nosuch"),
                Err(Error::UnknownNetwork { .. })
            ));
            let other = NetworkSpec {
                name: "lab2".into(),
                ..spec.clone()
            };
            assert!(Network::define(&root, &other).is_err(), "same bridge and subnet as lab");
            let tap = crate::tap::Tap::open("mvmt-lab0").unwrap();
            let mut a = net.attach("x", [2, 9, 9, 9, 9, 9], "mvmt-lab0").unwrap();
            a.keep();
            assert_eq!(a.ip(), Ipv4Addr::new(10, 214, 0, 2));
            let mut nl = Netlink::open().unwrap();
            let port = nl.link_index("mvmt-lab0").unwrap().unwrap();
            assert_eq!(nl.port_isolated(port).unwrap(), Some(false));
            drop(tap);
            net.remove().unwrap();
            assert!(!network_dir(&root, "lab").exists());
            let _ = std::fs::remove_dir_all(&root);
        });
    }

    #[test]
    fn state_round_trips() {
        let mut s = state();
        pin(&mut s, "a", "02:00:00:00:00:0a").unwrap();
        let text = serde_json::to_string(&s).unwrap();
        let back: State = serde_json::from_str(&text).unwrap();
        assert_eq!(back.pins, s.pins);
        assert_eq!(back.spec, s.spec);
    }
}
