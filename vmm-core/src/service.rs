//! `[[service]]` tables: database and cache servers the guest agent runs
//! from the guest image's Debian packages. The VMM itself ignores them;
//! `mvm` and the agent use them (docs/vm-toml.md).

use serde::Deserialize;

use crate::{Error, Result};

/// The services the agent knows how to run from Debian packages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServiceKind {
    Postgresql,
    Redis,
    Mariadb,
}

impl ServiceKind {
    pub const ALL: [ServiceKind; 3] = [ServiceKind::Postgresql, ServiceKind::Redis, ServiceKind::Mariadb];

    /// The name in vm.toml and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceKind::Postgresql => "postgresql",
            ServiceKind::Redis => "redis",
            ServiceKind::Mariadb => "mariadb",
        }
    }

    /// `postgresql` (or `postgres`), `redis`, `mariadb` (or `mysql`).
    pub fn parse(text: &str) -> Option<ServiceKind> {
        Some(match text {
            "postgresql" | "postgres" => ServiceKind::Postgresql,
            "redis" => ServiceKind::Redis,
            "mariadb" | "mysql" => ServiceKind::Mariadb,
            _ => return None,
        })
    }

    /// The port the service listens on unless told otherwise.
    pub fn default_port(self) -> u16 {
        match self {
            ServiceKind::Postgresql => 5432,
            ServiceKind::Redis => 6379,
            ServiceKind::Mariadb => 3306,
        }
    }

    /// The Debian package that brings the server.
    pub fn package(self) -> &'static str {
        match self {
            ServiceKind::Postgresql => "postgresql",
            ServiceKind::Redis => "redis-server",
            ServiceKind::Mariadb => "mariadb-server",
        }
    }

    /// Guest memory (MiB) a VM is given for the server on top of
    /// `mvm create`'s default, when its size is not chosen: what the
    /// server and its clients touch as the agent configures it (16 MB
    /// shared buffers for PostgreSQL, a 32 MB InnoDB pool for MariaDB).
    pub fn memory_mib(self) -> u32 {
        match self {
            ServiceKind::Postgresql => 128,
            ServiceKind::Redis => 32,
            ServiceKind::Mariadb => 160,
        }
    }

    /// Whether it has databases, roles and SQL scripts.
    pub fn has_databases(self) -> bool {
        !matches!(self, ServiceKind::Redis)
    }

    /// The role used when none is named and the VM has no user.
    pub fn default_user(self) -> &'static str {
        match self {
            ServiceKind::Postgresql => "postgres",
            ServiceKind::Redis => "default",
            ServiceKind::Mariadb => "root",
        }
    }
}

impl std::fmt::Display for ServiceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One `[[service]]`, with its defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    pub kind: ServiceKind,
    /// Unique among the VM's services; default: the kind.
    pub name: String,
    /// Guest TCP port; default: the kind's.
    pub port: u16,
    /// Databases created at the first start (PostgreSQL, MariaDB).
    pub databases: Vec<String>,
    /// The role the host connects as; `None`: the VM's user, else the
    /// kind's default (decided by `mvm`, which knows the VM's user).
    pub user: Option<String>,
    /// The role's password; `None`: no password from the VM's networks.
    pub password: Option<String>,
    /// SQL run once, after the databases are made.
    pub initial_script: Option<String>,
}

impl ServiceConfig {
    /// A service of `kind` with every default.
    pub fn new(kind: ServiceKind) -> Self {
        ServiceConfig {
            kind,
            name: kind.as_str().into(),
            port: kind.default_port(),
            databases: Vec::new(),
            user: None,
            password: None,
            initial_script: None,
        }
    }
}

/// One `[[service]]` table as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileService {
    kind: String,
    name: Option<String>,
    port: Option<i64>,
    #[serde(default)]
    databases: Vec<String>,
    user: Option<String>,
    password: Option<String>,
    initial_script: Option<String>,
}

/// A name a guest command line or SQL identifier can carry without
/// quoting: 1-63 of `[A-Za-z0-9_-]`, not starting with `-`.
pub fn is_plain_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn bad(key: &'static str, value: &str, reason: impl Into<String>) -> Error {
    Error::ConfigValue {
        key,
        value: format!("{value:?}"),
        reason: reason.into(),
    }
}

/// Check the `[[service]]` tables and fill in their defaults.
pub fn parse_services(entries: Vec<FileService>) -> Result<Vec<ServiceConfig>> {
    let mut out: Vec<ServiceConfig> = Vec::new();
    for e in entries {
        let kind = ServiceKind::parse(&e.kind)
            .ok_or_else(|| bad("service.kind", &e.kind, "known kinds: postgresql, redis, mariadb"))?;
        let name = e.name.unwrap_or_else(|| kind.as_str().into());
        if !is_plain_name(&name) {
            return Err(bad("service.name", &name, "1-63 of letters, digits, '_' and '-'"));
        }
        if out.iter().any(|s| s.name == name) {
            return Err(bad(
                "service.name",
                &name,
                "two services have this name; give each its own `name`",
            ));
        }
        let port = match e.port {
            None => kind.default_port(),
            Some(p) => u16::try_from(p)
                .ok()
                .filter(|&p| p > 0)
                .ok_or_else(|| bad("service.port", &p.to_string(), "a TCP port is 1-65535"))?,
        };
        if let Some(other) = out.iter().find(|s| s.port == port) {
            return Err(bad(
                "service.port",
                &port.to_string(),
                format!("service {:?} listens there already", other.name),
            ));
        }
        if !kind.has_databases() && (!e.databases.is_empty() || e.initial_script.is_some()) {
            return Err(bad(
                "service.databases",
                &name,
                format!("{kind} has no databases or SQL scripts"),
            ));
        }
        for db in &e.databases {
            if !is_plain_name(db) {
                return Err(bad("service.databases", db, "1-63 of letters, digits, '_' and '-'"));
            }
        }
        if let Some(user) = &e.user {
            if !is_plain_name(user) {
                return Err(bad("service.user", user, "1-63 of letters, digits, '_' and '-'"));
            }
        }
        if let Some(pw) = &e.password {
            if pw.is_empty() || pw.chars().any(|c| c.is_control()) {
                return Err(bad("service.password", "(hidden)", "not empty, no control characters"));
            }
        }
        let mut databases = e.databases;
        databases.dedup();
        out.push(ServiceConfig {
            kind,
            name,
            port,
            databases,
            user: e.user,
            password: e.password,
            initial_script: e.initial_script,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<ServiceConfig>> {
        #[derive(Deserialize)]
        struct Doc {
            #[serde(default)]
            service: Vec<FileService>,
        }
        let doc: Doc = toml::from_str(text).unwrap();
        parse_services(doc.service)
    }

    #[test]
    fn defaults_per_kind() {
        let s =
            parse("[[service]]\nkind = \"postgresql\"\n[[service]]\nkind = \"redis\"\n[[service]]\nkind = \"mysql\"\n")
                .unwrap();
        assert_eq!(s[0], ServiceConfig::new(ServiceKind::Postgresql));
        assert_eq!((s[1].name.as_str(), s[1].port), ("redis", 6379));
        assert_eq!(
            (s[2].kind, s[2].name.as_str(), s[2].port),
            (ServiceKind::Mariadb, "mariadb", 3306)
        );
    }

    #[test]
    fn full_table() {
        let s = parse(
            "[[service]]\nkind = \"postgresql\"\nname = \"db\"\nport = 5433\ndatabases = [\"app\", \"test\"]\nuser = \"dev\"\npassword = \"pw\"\ninitial_script = \"create table t (x int);\"\n",
        )
        .unwrap();
        assert_eq!(s[0].name, "db");
        assert_eq!(s[0].port, 5433);
        assert_eq!(s[0].databases, ["app", "test"]);
        assert_eq!(s[0].user.as_deref(), Some("dev"));
        assert_eq!(s[0].password.as_deref(), Some("pw"));
        assert!(s[0].initial_script.as_deref().unwrap().starts_with("create"));
    }

    #[test]
    fn rejects_bad_tables() {
        let err = |t: &str| parse(t).unwrap_err().to_string();
        assert!(err("[[service]]\nkind = \"mongodb\"\n").contains("known kinds"));
        assert!(
            err("[[service]]\nkind = \"redis\"\n[[service]]\nkind = \"redis\"\nport = 6380\n").contains("two services")
        );
        assert!(
            err("[[service]]\nkind = \"redis\"\n[[service]]\nkind = \"postgresql\"\nport = 6379\n")
                .contains("listens there")
        );
        assert!(err("[[service]]\nkind = \"redis\"\nport = 70000\n").contains("1-65535"));
        assert!(err("[[service]]\nkind = \"redis\"\ndatabases = [\"a\"]\n").contains("no databases"));
        assert!(err("[[service]]\nkind = \"postgresql\"\ndatabases = [\"a b\"]\n").contains("letters"));
        assert!(err("[[service]]\nkind = \"postgresql\"\nuser = \"x;drop\"\n").contains("letters"));
        assert!(err("[[service]]\nkind = \"postgresql\"\npassword = \"\"\n").contains("hidden"));
        assert!(toml::from_str::<FileService>("kind = \"redis\"\nbogus = 1\n").is_err());
    }
}
