//! Services of managed VMs (`[[service]]`, `mvm create --service`):
//! PostgreSQL, Redis and MariaDB from the image's Debian packages, run by
//! the guest agent, data on the VM's `services` volume, reached from the
//! host through a port forward.

use std::net::{IpAddr, Ipv4Addr, TcpListener};

use microvm_dev::config::ForwardConfig;
use microvm_dev::service::{is_plain_name, ServiceConfig, ServiceKind};
use microvm_dev::VmConfig;
use mvm_agent::proto::{ServiceRun, ServiceSpec, ServiceState};
use serde::Serialize;

use super::{Manager, VmState};
use crate::image::ImageSpec;
use crate::{Error, Result};

/// The volume that keeps every service's data.
pub const SERVICES_VOLUME: &str = "services";
/// Where the guest mounts it; service `<name>` keeps its data in
/// `<mount>/<name>`.
pub const SERVICES_MOUNT: &str = "/var/lib/mvm-services";
/// Its size: room for a development database (the file is sparse: only
/// what the guest writes takes host disk).
pub const SERVICES_VOLUME_MIB: u64 = 8192;
/// The name of the images made for VMs with services.
pub const SERVICES_IMAGE: &str = "services";

/// `KIND[:PORT][:DB,DB...]` of `mvm create --service`: `postgresql`,
/// `postgresql:5433`, `postgresql:5432:app,test`, `postgresql:app`.
pub fn parse_service_arg(text: &str) -> Result<ServiceConfig> {
    let usage = |why: String| {
        Error::Usage(format!(
            "--service {text:?}: {why}; expected KIND[:PORT][:DB,DB...], e.g. postgresql:5432:app (kinds: postgresql, redis, mariadb)"
        ))
    };
    let mut parts = text.split(':');
    let kind_text = parts.next().unwrap_or_default();
    let kind = ServiceKind::parse(kind_text).ok_or_else(|| usage(format!("unknown kind {kind_text:?}")))?;
    let mut service = ServiceConfig::new(kind);
    let mut rest: Vec<&str> = parts.collect();
    if rest.len() > 2 {
        return Err(usage("too many ':'".into()));
    }
    if let Some(first) = rest.first() {
        if first.is_empty() || first.bytes().all(|b| b.is_ascii_digit()) {
            if !first.is_empty() {
                service.port = first
                    .parse::<u16>()
                    .ok()
                    .filter(|&p| p > 0)
                    .ok_or_else(|| usage(format!("port {first:?} is not a number from 1 to 65535")))?;
            }
            rest.remove(0);
        }
    }
    if let Some(dbs) = rest.first() {
        if rest.len() > 1 {
            return Err(usage("too many ':'".into()));
        }
        if !kind.has_databases() {
            return Err(usage(format!("{kind} has no databases")));
        }
        for db in dbs.split(',').filter(|d| !d.is_empty()) {
            if !is_plain_name(db) {
                return Err(usage(format!("database {db:?}: 1-63 of letters, digits, '_' and '-'")));
            }
            service.databases.push(db.to_string());
        }
    }
    Ok(service)
}

/// The image for `services`: the default packages and each kind's server.
pub fn services_image_spec(services: &[ServiceConfig]) -> ImageSpec {
    let mut spec = ImageSpec {
        name: SERVICES_IMAGE.into(),
        ..ImageSpec::default()
    };
    for s in services {
        spec.packages.push(s.kind.package().into());
    }
    spec
}

/// The `[[service]]` table of `s` (only the keys that differ from the
/// defaults, so the file reads like what was asked).
pub fn service_table(s: &ServiceConfig) -> toml::Table {
    use toml::Value;
    let mut t = toml::Table::new();
    t.insert("kind".into(), s.kind.as_str().into());
    if s.name != s.kind.as_str() {
        t.insert("name".into(), s.name.clone().into());
    }
    t.insert("port".into(), Value::Integer(s.port.into()));
    if !s.databases.is_empty() {
        t.insert(
            "databases".into(),
            Value::Array(s.databases.iter().map(|d| Value::String(d.clone())).collect()),
        );
    }
    if let Some(u) = &s.user {
        t.insert("user".into(), u.clone().into());
    }
    if let Some(p) = &s.password {
        t.insert("password".into(), p.clone().into());
    }
    if let Some(script) = &s.initial_script {
        t.insert("initial_script".into(), script.clone().into());
    }
    t
}

/// The role a service's host connections use: its `user`, else the VM's
/// user, else the kind's default (postgres, root).
pub fn service_user(s: &ServiceConfig, vm_user: Option<&str>) -> String {
    s.user
        .clone()
        .or_else(|| vm_user.map(str::to_string))
        .unwrap_or_else(|| s.kind.default_user().to_string())
}

/// What the agent is sent for the services of `config`.
pub fn service_specs(config: &VmConfig) -> Vec<ServiceSpec> {
    let vm_user = super::user::from_cmdline(&config.boot.cmdline).map(|u| u.name);
    config
        .services
        .iter()
        .map(|s| ServiceSpec {
            kind: s.kind.as_str().into(),
            name: s.name.clone(),
            port: s.port,
            databases: s.databases.clone(),
            user: service_user(s, vm_user.as_deref()),
            password: s.password.clone(),
            initial_script: s.initial_script.clone(),
            data_dir: format!("{SERVICES_MOUNT}/{}", s.name),
        })
        .collect()
}

/// A service as `mvm status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceInfo {
    pub name: String,
    pub kind: String,
    /// The server's version, once the guest reported it.
    pub version: Option<String>,
    /// How it runs: "debian-package" (the agent runs the image's
    /// package; `devenv up` is not supported yet).
    pub runs_from: &'static str,
    pub guest_port: u16,
    /// `ADDRESS:PORT` on the host that reaches it (a vm.toml forward).
    pub host: Option<String>,
    /// The role host connections use.
    pub user: String,
    pub databases: Vec<String>,
    /// "stopped" (the VM is), "unknown" (the agent did not answer),
    /// "starting", "running" or "failed".
    pub state: String,
    /// Why it failed or restarts.
    pub detail: Option<String>,
    pub restarts: u32,
}

impl std::fmt::Display for ServiceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.kind)?;
        if let Some(v) = &self.version {
            write!(f, " {v}")?;
        }
        write!(f, " (Debian package)")?;
        if self.name != self.kind {
            write!(f, " {:?}", self.name)?;
        }
        write!(f, " on guest port {}", self.guest_port)?;
        match &self.host {
            Some(h) => write!(f, ", host {h}")?,
            None => write!(f, ", no host forward")?,
        }
        write!(f, ": {}", self.state)?;
        if let Some(d) = &self.detail {
            write!(f, " ({d})")?;
        }
        Ok(())
    }
}

/// The services of `config`, with the agent's states when it gave them.
pub fn service_infos(config: &VmConfig, vm_state: VmState, states: Option<&[ServiceState]>) -> Vec<ServiceInfo> {
    let vm_user = super::user::from_cmdline(&config.boot.cmdline).map(|u| u.name);
    config
        .services
        .iter()
        .map(|s| {
            let host = config
                .forwards
                .iter()
                .find(|f| f.guest_port == s.port && f.protocol == mvm_net::forward::Protocol::Tcp)
                .map(|f| format!("{}:{}", f.host_address, f.host_port));
            let reported = states.and_then(|st| st.iter().find(|x| x.name == s.name));
            let state = match (vm_state, reported) {
                (_, Some(r)) => r.run.as_str().to_string(),
                (VmState::Running, None) if states.is_some() => ServiceRun::Starting.as_str().into(),
                (VmState::Running, None) => "unknown".into(),
                _ => "stopped".into(),
            };
            ServiceInfo {
                name: s.name.clone(),
                kind: s.kind.as_str().into(),
                version: reported.map(|r| r.version.clone()).filter(|v| !v.is_empty()),
                runs_from: "debian-package",
                guest_port: s.port,
                host,
                user: service_user(s, vm_user.as_deref()),
                databases: s.databases.clone(),
                state,
                detail: reported.map(|r| r.detail.clone()).filter(|d| !d.is_empty()),
                restarts: reported.map_or(0, |r| r.restarts),
            }
        })
        .collect()
}

impl Manager {
    /// The host port for a service's forward: `wanted`, else the next
    /// port that no other VM forwards, this VM does not use yet (`own`),
    /// and nothing on the host listens on.
    pub(super) fn pick_host_port(&self, name: &str, wanted: u16, own: &[ForwardConfig]) -> Result<u16> {
        let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let mut port = wanted;
        for _ in 0..1000 {
            let f = ForwardConfig {
                protocol: mvm_net::forward::Protocol::Tcp,
                host_address: localhost,
                host_port: port,
                guest_port: wanted,
            };
            let own_clash = own.iter().any(|o| {
                o.protocol == f.protocol
                    && o.host_port == port
                    && microvm_dev::config::addresses_clash(o.host_address, localhost)
            });
            if !own_clash
                && self.forward_owner(name, &f, false)?.is_none()
                && TcpListener::bind((localhost, port)).is_ok()
            {
                return Ok(port);
            }
            port = match port.checked_add(1) {
                Some(p) => p,
                None => break,
            };
        }
        Err(Error::Usage(format!(
            "no free host port from {wanted} on for the service's forward; free one or forward by hand with --forward"
        )))
    }

    /// Have the agent of running VM `name` run its services; their states.
    pub(super) fn send_services(&self, name: &str, config: &VmConfig) -> Result<Vec<ServiceState>> {
        self.agent(name)?.services(service_specs(config))
    }

    /// The states the agent of running VM `name` reports, after asking it
    /// to start those of `config`'s services it does not know yet: the
    /// request at start may have failed (an agent too slow to answer on a
    /// loaded host), and the agent ignores services it already runs.
    pub(super) fn service_states(&self, name: &str, config: &VmConfig) -> Result<Vec<ServiceState>> {
        self.agent(name)?.services(service_specs(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_arguments() {
        let s = parse_service_arg("postgresql:5432:app").unwrap();
        assert_eq!(
            (s.kind, s.port, s.databases.clone()),
            (ServiceKind::Postgresql, 5432, vec!["app".to_string()])
        );
        let s = parse_service_arg("postgres:app,test").unwrap();
        assert_eq!((s.port, s.databases.len()), (5432, 2));
        let s = parse_service_arg("redis:6380").unwrap();
        assert_eq!((s.kind, s.port), (ServiceKind::Redis, 6380));
        let s = parse_service_arg("mysql").unwrap();
        assert_eq!(
            (s.kind, s.name.as_str(), s.port),
            (ServiceKind::Mariadb, "mariadb", 3306)
        );
        let s = parse_service_arg("mariadb::shop").unwrap();
        assert_eq!((s.port, s.databases[0].as_str()), (3306, "shop"));
        for bad in [
            "mongodb",
            "redis:x:y",
            "redis:0",
            "redis:6379:db",
            "postgresql:1:a:b",
            "postgresql:5432:a b",
        ] {
            assert!(parse_service_arg(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn image_and_tables() {
        let pg = parse_service_arg("postgresql:5432:app").unwrap();
        let spec = services_image_spec(std::slice::from_ref(&pg));
        assert!(spec.packages.contains(&"postgresql".to_string()));
        assert!(spec.packages.contains(&"bash".to_string()));
        assert_ne!(spec.id(), ImageSpec::default().id());
        let t = service_table(&pg);
        assert_eq!(t.len(), 3);
        assert_eq!(t["kind"].as_str(), Some("postgresql"));
        assert_eq!(t["port"].as_integer(), Some(5432));
        assert_eq!(t["databases"].as_array().unwrap().len(), 1);
        assert_eq!(service_user(&pg, Some("alice")), "alice");
        assert_eq!(service_user(&pg, None), "postgres");
        let my = ServiceConfig::new(ServiceKind::Mariadb);
        assert_eq!(service_user(&my, None), "root");
    }
}
