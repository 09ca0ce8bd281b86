//! Networks and port forwards of managed VMs: which network a VM joins,
//! its address, `mvm port` (run-time forwards kept in the VM's
//! `forwards.toml` and applied at once through the VMM's control socket),
//! and `mvm network up|down|status|rm`.

use std::net::IpAddr;
use std::path::Path;
use std::str::FromStr;

use microvm_dev::config::{addresses_clash, FileForward, ForwardConfig};
use microvm_dev::network::{read_runtime_forwards, request_reload, ForwardsFile, FORWARDS_FILE};
use microvm_dev::VmConfig;
use mvm_net::forward::Protocol;
use mvm_net::host::network::{list as list_networks, Network, NetworkSpec, NetworkStatus, DEFAULT_NETWORK};
use serde::Serialize;

use super::{Manager, VmState, VM_TOML};
use crate::{Error, Result};

/// Which managed network a new VM joins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum NetworkChoice {
    /// The network "default" (bridge virbr-mvm, 10.213.0.0/24), made on
    /// first use.
    #[default]
    Default,
    /// A network made with `mvm network up --name`.
    Named(String),
    /// No managed network (a `--from` file's `[[net]]` stay as they are).
    None,
}

impl NetworkChoice {
    pub(super) fn name(&self) -> Option<&str> {
        match self {
            NetworkChoice::Default => Some(DEFAULT_NETWORK),
            NetworkChoice::Named(n) => Some(n),
            NetworkChoice::None => None,
        }
    }
}

/// A forward as the command line writes it: `[ADDRESS:]HOST:GUEST[/udp]`
/// (`8080:80`, `0.0.0.0:8080:80`, `[::1]:5353:53/udp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortSpec {
    /// Where the host listens; default 127.0.0.1.
    pub host_address: Option<IpAddr>,
    pub host_port: u16,
    pub guest_port: u16,
    pub protocol: Protocol,
}

fn port(text: &str, what: &str, whole: &str) -> Result<u16> {
    text.parse::<u16>().ok().filter(|&p| p > 0).ok_or_else(|| {
        Error::Usage(format!(
            "{whole:?}: {what} port {text:?} is not a number from 1 to 65535"
        ))
    })
}

/// `PORT[/tcp|/udp]`.
pub fn parse_host_port(text: &str) -> Result<(u16, Protocol)> {
    let (p, protocol) = split_protocol(text)?;
    Ok((port(p, "host", text)?, protocol))
}

fn split_protocol(text: &str) -> Result<(&str, Protocol)> {
    match text.rsplit_once('/') {
        None => Ok((text, Protocol::Tcp)),
        Some((rest, proto)) => proto
            .parse()
            .map(|p| (rest, p))
            .map_err(|_| Error::Usage(format!("{text:?}: protocol {proto:?} is not tcp or udp"))),
    }
}

impl FromStr for PortSpec {
    type Err = Error;

    fn from_str(text: &str) -> Result<PortSpec> {
        let usage = || {
            Error::Usage(format!(
                "{text:?} is not a forward: expected [ADDRESS:]HOST_PORT:GUEST_PORT[/udp], e.g. 8080:80"
            ))
        };
        let (rest, protocol) = split_protocol(text)?;
        let (front, guest) = rest.rsplit_once(':').ok_or_else(usage)?;
        let (address, host) = match front.rsplit_once(':') {
            None => (None, front),
            Some((addr, host)) => {
                let addr = addr.strip_prefix('[').and_then(|a| a.strip_suffix(']')).unwrap_or(addr);
                let ip = addr
                    .parse::<IpAddr>()
                    .map_err(|_| Error::Usage(format!("{text:?}: {addr:?} is not an IP address")))?;
                (Some(ip), host)
            }
        };
        Ok(PortSpec {
            host_address: address,
            host_port: port(host, "host", text)?,
            guest_port: port(guest, "guest", text)?,
            protocol,
        })
    }
}

impl PortSpec {
    pub(super) fn to_config(self) -> ForwardConfig {
        ForwardConfig {
            protocol: self.protocol,
            host_address: self.host_address.unwrap_or(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
            host_port: self.host_port,
            guest_port: self.guest_port,
        }
    }
}

/// The `[[forward]]` table of a forward.
pub(super) fn file_forward(f: &ForwardConfig) -> FileForward {
    FileForward {
        host_port: i64::from(f.host_port),
        guest_port: i64::from(f.guest_port),
        host_address: Some(f.host_address.to_string()),
        protocol: Some(f.protocol.to_string()),
    }
}

/// A forward as `mvm port --list` and `mvm status` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ForwardInfo {
    pub protocol: String,
    pub host_address: String,
    pub host_port: u16,
    pub guest_port: u16,
    /// "vm.toml" (declared) or "run-time" (`mvm port`, in forwards.toml).
    pub origin: &'static str,
}

impl ForwardInfo {
    fn new(f: &ForwardConfig, origin: &'static str) -> ForwardInfo {
        ForwardInfo {
            protocol: f.protocol.to_string(),
            host_address: f.host_address.to_string(),
            host_port: f.host_port,
            guest_port: f.guest_port,
            origin,
        }
    }
}

impl std::fmt::Display for ForwardInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let addr = if self.host_address.contains(':') {
            format!("[{}]", self.host_address)
        } else {
            self.host_address.clone()
        };
        write!(f, "{addr}:{}->{}/{}", self.host_port, self.guest_port, self.protocol)
    }
}

fn clashes(a: &ForwardConfig, b: &ForwardConfig) -> bool {
    a.protocol == b.protocol && a.host_port == b.host_port && addresses_clash(a.host_address, b.host_address)
}

impl Manager {
    pub(super) fn vm_config(&self, name: &str) -> Result<VmConfig> {
        let file = self.existing(name)?.join(VM_TOML);
        VmConfig::from_file(&file).map_err(|source| Error::Config { path: file, source })
    }

    /// The managed network of a VM's first NIC on one.
    pub(super) fn vm_network(config: &VmConfig) -> Option<&str> {
        config.nets.iter().find_map(|n| n.network.as_deref())
    }

    /// The VM's address (its pin), if it is on a managed network and has
    /// started once.
    pub(super) fn vm_ip(&self, name: &str, config: &VmConfig) -> Option<String> {
        let network = Network::open(&self.root, Self::vm_network(config)?).ok()?;
        Some(network.pin(name).ok()??.ip.to_string())
    }

    /// Declared and run-time forwards of a VM.
    fn all_forwards(&self, name: &str, config: &VmConfig) -> Result<(Vec<ForwardConfig>, Vec<ForwardConfig>)> {
        let dir = self.vm_dir(name);
        let runtime = read_runtime_forwards(&dir).map_err(|source| Error::Config {
            path: dir.join(FORWARDS_FILE),
            source,
        })?;
        Ok((config.forwards.clone(), runtime))
    }

    /// Every forward of VM `name`: vm.toml's, then the run-time ones.
    pub fn forwards(&self, name: &str) -> Result<Vec<ForwardInfo>> {
        self.forward_infos(name, &self.vm_config(name)?)
    }

    /// [`Manager::forwards`] of a definition already read.
    pub(super) fn forward_infos(&self, name: &str, config: &VmConfig) -> Result<Vec<ForwardInfo>> {
        let (declared, runtime) = self.all_forwards(name, config)?;
        Ok(declared
            .iter()
            .map(|f| ForwardInfo::new(f, "vm.toml"))
            .chain(runtime.iter().map(|f| ForwardInfo::new(f, "run-time")))
            .collect())
    }

    /// The first other VM (running ones only, if `running_only`) with a
    /// forward that clashes with `f`.
    pub(super) fn forward_owner(&self, except: &str, f: &ForwardConfig, running_only: bool) -> Result<Option<String>> {
        for vm in self.list()? {
            if vm.name == except || (running_only && vm.state != VmState::Running) {
                continue;
            }
            let Ok(config) = VmConfig::from_file(vm.state_dir.join(VM_TOML)) else {
                continue;
            };
            let Ok((declared, runtime)) = self.all_forwards(&vm.name, &config) else {
                continue;
            };
            if declared.iter().chain(&runtime).any(|o| clashes(o, f)) {
                return Ok(Some(vm.name));
            }
        }
        Ok(None)
    }

    /// Before a start: no running VM may hold one of this VM's host ports.
    pub(super) fn check_forwards_free(&self, name: &str, config: &VmConfig) -> Result<()> {
        let (declared, runtime) = self.all_forwards(name, config)?;
        for f in declared.iter().chain(&runtime) {
            if let Some(other) = self.forward_owner(name, f, true)? {
                return Err(Error::Forward {
                    name: name.into(),
                    reason: format!(
                        "host port {}:{}/{} is forwarded to the running VM {other:?}",
                        f.host_address, f.host_port, f.protocol
                    ),
                });
            }
        }
        Ok(())
    }

    /// Add a run-time forward to VM `name`: kept in its state (so it
    /// comes back at every start) and applied at once if it runs.
    pub fn add_forward(&self, name: &str, spec: PortSpec) -> Result<ForwardInfo> {
        let config = self.vm_config(name)?;
        if Self::vm_network(&config).is_none() {
            return Err(Error::Forward {
                name: name.into(),
                reason:
                    "it is on no managed network, so it has no address to forward to (create it without --no-network)"
                        .into(),
            });
        }
        let new = spec.to_config();
        let (declared, runtime) = self.all_forwards(name, &config)?;
        if let Some(old) = declared.iter().chain(&runtime).find(|o| clashes(o, &new)) {
            return Err(Error::Forward {
                name: name.into(),
                reason: format!(
                    "host port {}:{}/{} is already forwarded to its port {}",
                    old.host_address, old.host_port, old.protocol, old.guest_port
                ),
            });
        }
        if let Some(other) = self.forward_owner(name, &new, false)? {
            return Err(Error::Forward {
                name: name.into(),
                reason: format!(
                    "host port {}:{}/{} is already forwarded to VM {other:?}",
                    new.host_address, new.host_port, new.protocol
                ),
            });
        }
        let mut updated = runtime.clone();
        updated.push(new.clone());
        self.apply_runtime(name, &runtime, &updated)?;
        Ok(ForwardInfo::new(&new, "run-time"))
    }

    /// Remove VM `name`'s run-time forward of host port `port`/`protocol`
    /// (any address); it closes at once if the VM runs.
    pub fn remove_forward(&self, name: &str, port: u16, protocol: Protocol) -> Result<Vec<ForwardInfo>> {
        let config = self.vm_config(name)?;
        let (declared, runtime) = self.all_forwards(name, &config)?;
        let matches = |f: &ForwardConfig| f.host_port == port && f.protocol == protocol;
        let (gone, kept): (Vec<_>, Vec<_>) = runtime.iter().cloned().partition(|f| matches(f));
        if gone.is_empty() {
            let reason = if declared.iter().any(matches) {
                format!(
                    "host port {port}/{protocol} is declared in its vm.toml ([[forward]]): edit that file to remove it"
                )
            } else {
                format!("it has no forward of host port {port}/{protocol}; `mvm port {name} --list` shows them")
            };
            return Err(Error::Forward {
                name: name.into(),
                reason,
            });
        }
        self.apply_runtime(name, &runtime, &kept)?;
        Ok(gone.iter().map(|f| ForwardInfo::new(f, "run-time")).collect())
    }

    /// Write the run-time forwards and have a running VMM apply them; on
    /// failure the old list is restored (file and VMM).
    fn apply_runtime(&self, name: &str, old: &[ForwardConfig], new: &[ForwardConfig]) -> Result<()> {
        let dir = self.vm_dir(name);
        write_forwards(&dir, new)?;
        if self.info(name)?.state != VmState::Running {
            return Ok(());
        }
        let failure = match request_reload(&dir) {
            Ok(errors) if errors.is_empty() => return Ok(()),
            Ok(errors) => errors.join("; "),
            Err(e) => format!(
                "cannot reach its VMM through {}: {e}",
                dir.join(microvm_dev::network::CONTROL_SOCKET).display()
            ),
        };
        write_forwards(&dir, old)?;
        let _ = request_reload(&dir);
        Err(Error::Forward {
            name: name.into(),
            reason: failure,
        })
    }

    /// Forget VM `name`'s address pins (it is being removed).
    pub(super) fn release_addresses(&self, name: &str, config: &VmConfig) {
        for net in config.nets.iter().filter_map(|n| n.network.as_deref()) {
            if let Err(e) = Network::open(&self.root, net).and_then(|n| n.release(name)) {
                log::warn!("VM {name}: cannot forget its address on network {net}: {e}");
            }
        }
    }

    /// A network by name (the default one exists without definition).
    pub fn network(&self, name: &str) -> Result<Network> {
        Ok(Network::open(&self.root, name)?)
    }

    /// Names of the defined networks (the default one once it was used).
    pub fn networks(&self) -> Vec<String> {
        let mut names = list_networks(&self.root);
        if !names.iter().any(|n| n == DEFAULT_NETWORK) {
            names.insert(0, DEFAULT_NETWORK.into());
        }
        names
    }

    /// Define (if new) and bring up a network.
    pub fn network_up(&self, spec: &NetworkSpec) -> Result<NetworkStatus> {
        let network = Network::define(&self.root, spec)?;
        network.up()?;
        Ok(network.status()?)
    }

    /// Whether a VM definition names network `name`.
    pub fn network_users(&self, name: &str) -> Result<Vec<String>> {
        Ok(self
            .list()?
            .into_iter()
            .filter(|vm| {
                VmConfig::from_file(vm.state_dir.join(VM_TOML))
                    .is_ok_and(|c| c.nets.iter().any(|n| n.network.as_deref() == Some(name)))
            })
            .map(|vm| vm.name)
            .collect())
    }

    /// Remove a network's definition (after `down`); refused while VMs
    /// are defined on it.
    pub fn network_rm(&self, name: &str) -> Result<()> {
        let users = self.network_users(name)?;
        if !users.is_empty() {
            return Err(Error::Usage(format!(
                "network {name:?} is used by VM(s) {}: remove them first",
                users.join(", ")
            )));
        }
        Ok(self.network(name)?.remove()?)
    }
}

fn write_forwards(dir: &Path, forwards: &[ForwardConfig]) -> Result<()> {
    let file = ForwardsFile {
        forward: forwards.iter().map(file_forward).collect(),
    };
    let text = toml::to_string(&file).map_err(|e| Error::Usage(format!("cannot write the forwards: {e}")))?;
    let text = format!("# Port forwards added with `mvm port`; applied at every start.\n{text}");
    Ok(mvm_net::host::write_atomic(&dir.join(FORWARDS_FILE), text.as_bytes())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_specs() {
        let p: PortSpec = "8080:80".parse().unwrap();
        assert_eq!(
            (p.host_port, p.guest_port, p.protocol, p.host_address),
            (8080, 80, Protocol::Tcp, None)
        );
        let p: PortSpec = "0.0.0.0:8080:80/udp".parse().unwrap();
        assert_eq!(p.host_address, Some("0.0.0.0".parse().unwrap()));
        assert_eq!(p.protocol, Protocol::Udp);
        let p: PortSpec = "[::1]:5353:53/tcp".parse().unwrap();
        assert_eq!(p.host_address, Some("::1".parse().unwrap()));
        for bad in [
            "8080",
            "0:80",
            "8080:0",
            "65536:80",
            "80:80/sctp",
            "x:80:80",
            "a:b",
            ":80",
            "8080:80/",
        ] {
            assert!(bad.parse::<PortSpec>().is_err(), "{bad}");
        }
        assert_eq!(parse_host_port("8080/udp").unwrap(), (8080, Protocol::Udp));
        assert!(parse_host_port("99999").is_err());
    }

    #[test]
    fn clashes_need_protocol_port_and_address() {
        let f = |s: &str| s.parse::<PortSpec>().unwrap().to_config();
        assert!(clashes(&f("8080:80"), &f("8080:81")));
        assert!(clashes(&f("0.0.0.0:8080:80"), &f("8080:81")));
        assert!(!clashes(&f("8080:80"), &f("8080:80/udp")));
        assert!(!clashes(&f("127.0.0.1:8080:80"), &f("127.0.0.2:8080:80")));
        assert!(!clashes(&f("8080:80"), &f("8081:80")));
    }
}
