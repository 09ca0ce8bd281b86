//! A project's `devenv.nix` turned into what `create` makes: services run
//! from Debian's packages, the guest sessions' environment, and a report
//! of everything left out (never guessed: see [`crate::devenv`]).

use std::path::{Path, PathBuf};

use microvm_dev::service::{is_plain_name, ServiceConfig};

use super::CreateOptions;
use crate::devenv::{self, DeclaredService, Devenv, ServiceKind};
use crate::Result;

/// What `create` takes from a project's devenv.nix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevenvPlan {
    /// The devenv.nix read.
    pub file: PathBuf,
    /// Enabled services this project can run in the VM.
    pub services: Vec<ServiceConfig>,
    /// `env.*`: set in every session in the VM.
    pub env: Vec<(String, String)>,
    /// What is not taken, one line each, naming the attribute.
    pub notes: Vec<String>,
}

/// The plan for `project`'s devenv.nix; `None` when it has none. A file
/// that does not parse is an error naming its line and column.
pub fn plan(project: &Path) -> Result<Option<DevenvPlan>> {
    let Some(files) = devenv::detect(project) else {
        return Ok(None);
    };
    let parsed = devenv::read(&files.nix)?;
    Ok(Some(plan_from(files.nix, &parsed)))
}

impl CreateOptions {
    /// Reads the project's devenv.nix (if the VM has a project and the
    /// project has one) into these options: its services (a kind already
    /// asked for with `services` is not added twice) and its `env.*`
    /// (variables already in `env` win), and records the file. Returns the
    /// plan, for its notes.
    pub fn apply_devenv(&mut self) -> Result<Option<DevenvPlan>> {
        let Some(project) = &self.project else {
            return Ok(None);
        };
        let Some(mut plan) = plan(project)? else {
            return Ok(None);
        };
        for s in &plan.services {
            if self.services.iter().any(|o| o.kind == s.kind) {
                plan.notes.push(format!(
                    "services.{}: already given with --service; that one is used",
                    s.kind
                ));
            } else {
                self.services.push(s.clone());
            }
        }
        for (name, value) in &plan.env {
            if !self.env.iter().any(|(n, _)| n == name) {
                self.env.push((name.clone(), value.clone()));
            }
        }
        self.devenv = Some(plan.file.clone());
        Ok(Some(plan))
    }
}

fn plan_from(file: PathBuf, d: &Devenv) -> DevenvPlan {
    let mut plan = DevenvPlan {
        file,
        services: Vec::new(),
        env: Vec::new(),
        notes: Vec::new(),
    };
    for s in d.services.iter().filter(|s| s.enabled) {
        match service_config(s, &mut plan.notes) {
            Ok(c) => plan.services.push(c),
            Err(why) => plan.notes.push(format!("services.{}: not run: {why}", s.name)),
        }
        for attr in &s.ignored {
            plan.notes.push(format!("services.{}.{attr}: not used by mvm", s.name));
        }
    }
    for (name, value) in &d.env {
        if microvm_dev::config::is_env_name(name) {
            plan.env.push((name.clone(), value.clone()));
        } else {
            plan.notes
                .push(format!("env.{name}: not a variable name a shell takes; left out"));
        }
    }
    for s in &d.skipped {
        plan.notes.push(format!(
            "{} (line {}, column {}): skipped: {}",
            s.attr, s.line, s.column, s.reason
        ));
    }
    if !d.packages.is_empty() {
        plan.notes.push(format!(
            "packages ({}): Nix packages; the Debian image does not have Nix (install what you need with apt in the VM)",
            d.packages.join(", ")
        ));
    }
    for (name, _) in &d.processes {
        plan.notes.push(format!(
            "processes.{name}: not started (mvm runs the services; start it with mvm exec)"
        ));
    }
    plan
}

/// The `[[service]]` for a devenv service, or why there is none.
fn service_config(s: &DeclaredService, notes: &mut Vec<String>) -> std::result::Result<ServiceConfig, String> {
    let kind = s
        .kind
        .ok_or_else(|| "a service mvm does not know (it runs postgres, redis and mysql)".to_string())?;
    let guest = kind.guest_kind().ok_or_else(|| no_guest_reason(&s.name, kind))?;
    let mut c = ServiceConfig::new(guest);
    if let Some(port) = s.port.filter(|&p| p > 0) {
        c.port = port;
    }
    for db in &s.initial_databases {
        if is_plain_name(&db.name) {
            c.databases.push(db.name.clone());
        } else {
            notes.push(format!(
                "services.{}.initialDatabases: {:?} is not a name mvm creates (letters, digits, '_', '-'); left out",
                s.name, db.name
            ));
        }
    }
    // devenv makes each database's user; the VM has one role for the
    // host's connections: the first one named.
    if let Some(db) = s.initial_databases.iter().find(|d| d.user.is_some()) {
        c.user = db.user.clone();
        c.password = db.pass.clone();
    }
    c.initial_script = s.initial_script.clone();
    Ok(c)
}

fn no_guest_reason(name: &str, kind: ServiceKind) -> String {
    if kind.debian_packages().is_empty() {
        format!("{name} is not in Debian 12's packages")
    } else {
        format!(
            "{name} (Debian: {}) is not one the guest agent runs yet",
            kind.debian_packages().join(", ")
        )
    }
}

/// The host-side variables of a VM's services, reached through their
/// forwards: `DATABASE_URL`, `PGHOST`, `REDIS_URL`, ...
pub(super) fn connection_env(services: &[(ServiceConfig, String, u16, String)]) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = Vec::new();
    for (s, host, port, user) in services {
        for (name, value) in ServiceKind::from_guest(s.kind).connection_env(
            host,
            *port,
            s.databases.first().map(String::as_str),
            user,
            s.password.as_deref(),
        ) {
            // Two services of a kind (or postgres and mariadb, which both
            // give DATABASE_URL): the first one's.
            if !vars.iter().any(|(n, _)| *n == name) {
                vars.push((name, value));
            }
        }
    }
    vars
}

#[cfg(test)]
mod tests {
    use super::*;
    use microvm_dev::service::ServiceKind as GuestKind;

    const NIX: &str = r#"{ pkgs, lib, ... }:
let port = 5433; in {
  packages = [ pkgs.git ];
  env.GREETING = "hello";
  services.postgres = {
    enable = true;
    initialDatabases = [ { name = "app"; user = "dev"; pass = "secret"; } { name = "bad name"; } ];
    initialScript = "create table t (x int);";
  };
  services.redis.enable = true;
  services.redis.port = port;
  services.mongodb.enable = true;
  services.frobnicator.enable = true;
  services.mysql.enable = false;
  processes.web.exec = "npm run dev";
}
"#;

    #[test]
    fn devenv_services_env_and_notes() {
        let d = devenv::parse(NIX).unwrap();
        let plan = plan_from(PathBuf::from("/p/devenv.nix"), &d);
        let mut pg = ServiceConfig::new(GuestKind::Postgresql);
        pg.databases = vec!["app".into()];
        pg.user = Some("dev".into());
        pg.password = Some("secret".into());
        pg.initial_script = Some("create table t (x int);".into());
        // redis.port comes from a let: skipped, so the default port.
        let redis = ServiceConfig::new(GuestKind::Redis);
        assert_eq!(plan.services, vec![pg, redis]);
        assert_eq!(plan.env, vec![("GREETING".to_string(), "hello".to_string())]);
        let notes = plan.notes.join("\n");
        for expected in [
            "services.postgres.initialDatabases: \"bad name\"",
            "services.mongodb: not run: mongodb is not in Debian 12's packages",
            "services.frobnicator: not run: a service mvm does not know",
            "services.redis.port (line 11, column 25): skipped",
            "packages (git)",
            "processes.web: not started",
        ] {
            assert!(notes.contains(expected), "{expected:?} not in:\n{notes}");
        }
        assert!(
            !notes.contains("services.mysql"),
            "a disabled service is not reported:\n{notes}"
        );
    }

    #[test]
    fn options_keep_what_the_user_gave() {
        let dir = std::env::temp_dir().join(format!("mvm-devenv-plan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("devenv.nix"), NIX).unwrap();
        let mut opts = CreateOptions {
            project: Some(dir.clone()),
            services: vec![ServiceConfig::new(GuestKind::Redis)],
            env: vec![("GREETING".into(), "mine".into())],
            ..Default::default()
        };
        let plan = opts.apply_devenv().unwrap().unwrap();
        let kinds: Vec<_> = opts.services.iter().map(|s| s.kind).collect();
        assert_eq!(kinds, [GuestKind::Redis, GuestKind::Postgresql]);
        assert_eq!(opts.env, vec![("GREETING".to_string(), "mine".to_string())]);
        assert_eq!(opts.devenv.as_deref(), Some(dir.join("devenv.nix").as_path()));
        assert!(plan.notes.iter().any(|n| n.contains("already given")));
        // A file that does not parse: line and column.
        std::fs::write(dir.join("devenv.nix"), "{ services.postgres.enable = ; }\n").unwrap();
        let e = CreateOptions {
            project: Some(dir.clone()),
            ..Default::default()
        }
        .apply_devenv()
        .unwrap_err()
        .to_string();
        assert!(e.contains("devenv.nix: line 1, column"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn connection_variables_of_forwarded_services() {
        let mut pg = ServiceConfig::new(GuestKind::Postgresql);
        pg.databases = vec!["app".into()];
        let vars = connection_env(&[
            (pg, "127.0.0.1".into(), 15432, "dev".into()),
            (
                ServiceConfig::new(GuestKind::Redis),
                "127.0.0.1".into(),
                6379,
                "dev".into(),
            ),
        ]);
        let get = |n: &str| vars.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(get("DATABASE_URL"), Some("postgres://dev@127.0.0.1:15432/app"));
        assert_eq!(get("PGPORT"), Some("15432"));
        assert_eq!(get("REDIS_URL"), Some("redis://127.0.0.1:6379"));
    }
}
