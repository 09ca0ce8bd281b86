//! Servers from the guest's Debian packages (PostgreSQL, Redis, MariaDB),
//! run and supervised by the agent: systemd is not there, the agent is
//! init.
//!
//! Each service runs as its package's system user (`postgres`, `redis`,
//! `mysql`) with everything it keeps under its `data_dir` (on the VM's
//! `services` volume, so it survives restarts):
//!
//! ```text
//! <data_dir>/data            the server's data directory
//! <data_dir>/<kind>.log      its stdout and stderr (appended)
//! <data_dir>/.mvm-datadir   written once the data directory is made
//! <data_dir>/.mvm-initialized  written once the databases, role and
//!                            initial script are done (never redone)
//! ```
//!
//! The host sends the list with `Services` after each start; a service
//! already known keeps running. A server that dies is restarted after
//! 1, 2, 4, ... 60 s (back to 1 s after a minute of running).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::passwd::{self, Account};
use crate::proto::{ServiceRun, ServiceSpec, ServiceState};
use crate::reaper::Reaper;
use crate::{say, sys};

/// Marker of a finished first-start setup.
pub const MARKER: &str = ".mvm-initialized";
/// Marker of a finished data directory.
pub const DATADIR_MARKER: &str = ".mvm-datadir";
/// How long a server may take to accept connections after it starts
/// before its state says it is late (it is not killed for that: a server
/// that runs is starting, on a slow guest for minutes).
const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// Between two readiness checks. Each connection makes PostgreSQL fork a
/// backend (one that only turns the client away while it starts up), and
/// `pg_isready` is a process of its own: polled every 200 ms they compete
/// with the starting server for a slow guest's CPU (PostgreSQL took
/// 20 minutes to start in a loaded one-vCPU guest, 3 in an idle two-vCPU
/// one).
const READY_POLL: Duration = Duration::from_secs(3);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// A run this long resets the backoff.
const STABLE_RUN: Duration = Duration::from_secs(60);
/// How long a one-shot setup command may run: a guard against a hung
/// one, not a schedule (mariadb-install-db with its help tables ran over
/// 10 minutes in an interpreted guest kernel next to a starting
/// PostgreSQL).
const SETUP_TIMEOUT: Duration = Duration::from_secs(1800);

/// The last list the host sent, kept on the services volume (where `mvm`
/// mounts it) so that the next boot starts them at once, before the host
/// asks (and after a reboot in place, when it does not).
pub const SAVED: &str = "/var/lib/mvm-services/.mvm-services";

/// Keep `specs` in [`SAVED`] when they all live on that volume.
pub fn save(specs: &[ServiceSpec], path: &Path) {
    let Some(dir) = path.parent() else { return };
    if specs.is_empty() || !dir.is_dir() || !specs.iter().all(|s| Path::new(&s.data_dir).starts_with(dir)) {
        return;
    }
    let frame = crate::proto::Message::Services(specs.to_vec()).encode();
    let tmp = path.with_extension("tmp");
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        // It may hold passwords.
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| std::io::Write::write_all(&mut f, &frame))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        say!("cannot keep the services in {}: {e}", path.display());
    }
}

/// The list [`save`] kept, if any.
pub fn load(path: &Path) -> Vec<ServiceSpec> {
    let Ok(frame) = std::fs::read(path) else {
        return Vec::new();
    };
    match frame.get(4..).map(crate::proto::Message::decode) {
        Some(Ok(crate::proto::Message::Services(specs))) => specs,
        _ => {
            say!("{}: not a list of services; ignored", path.display());
            Vec::new()
        }
    }
}

/// The three kinds, and what differs between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Postgresql,
    Redis,
    Mariadb,
}

impl Kind {
    pub fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "postgresql" | "postgres" => Kind::Postgresql,
            "redis" => Kind::Redis,
            "mariadb" | "mysql" => Kind::Mariadb,
            _ => return None,
        })
    }
    /// The system user the package makes.
    pub fn system_user(self) -> &'static str {
        match self {
            Kind::Postgresql => "postgres",
            Kind::Redis => "redis",
            Kind::Mariadb => "mysql",
        }
    }
    /// Its socket directory under /run (a tmpfs: made at each boot).
    fn run_dir(self) -> &'static str {
        match self {
            Kind::Postgresql => "/run/postgresql",
            Kind::Redis => "/run/redis",
            Kind::Mariadb => "/run/mysqld",
        }
    }
    fn package(self) -> &'static str {
        match self {
            Kind::Postgresql => "postgresql",
            Kind::Redis => "redis-server",
            Kind::Mariadb => "mariadb-server",
        }
    }
    /// The signal that stops it quickly and cleanly.
    fn stop_signal(self) -> libc::c_int {
        match self {
            // SIGTERM would wait for every client to leave.
            Kind::Postgresql => libc::SIGINT,
            _ => libc::SIGTERM,
        }
    }
}

/// A command to run: as whom, and its argv.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// `None`: root.
    pub user: Option<&'static str>,
    pub argv: Vec<String>,
    /// Written to the command's stdin.
    pub stdin: Option<String>,
}

/// Everything the agent does for one service, worked out without running
/// anything (so tests can check it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub kind: Kind,
    /// The server's data directory (`<data_dir>/data`).
    pub data: PathBuf,
    pub log: PathBuf,
    /// Written once `init` succeeded: a data directory without it is a
    /// first start cut short, removed and made again.
    pub initialized_file: PathBuf,
    /// Makes the data directory (when `initialized_file` is missing).
    pub init: Vec<Step>,
    /// The server, in the foreground.
    pub server: Step,
    /// Databases, role and initial script, once (after the server runs).
    pub first: Vec<Step>,
    /// The data directory is an overlay of this (read-only) directory
    /// under `<data_dir>/upper`, mounted at every start.
    pub overlay: Option<PathBuf>,
    /// Succeeds once the server takes queries (PostgreSQL listens while
    /// it still starts up and turns clients away); `None`: an open port
    /// is enough.
    pub ready: Option<Step>,
    /// Appended to this configuration file for a first start, and undone
    /// by the last of `first`: PostgreSQL's `fsync = off` while it makes
    /// the initial databases. Every file CREATE DATABASE copies is fsynced
    /// one by one otherwise (about six minutes for one database on a PVM
    /// host); the agent syncs the file systems once instead, before it
    /// records the first start as done.
    pub setup_conf: Option<(PathBuf, &'static str)>,
    /// Made before `init`: MariaDB's installation as `mariadb-install-db
    /// --basedir` sees it (see [`make_lean_basedir`]).
    pub lean_basedir: Option<PathBuf>,
}

/// A development database in a small VM, as for PostgreSQL's
/// shared_buffers: not the package's 128 MB InnoDB pool nor its 96 MB
/// redo log.
const MARIADB_POOL: &str = "--innodb-buffer-pool-size=32M";
const MARIADB_REDO_LOG: &str = "--innodb-log-file-size=8M";

/// What `mariadb-install-db` reads from its `--basedir` (`bin`, `sbin`,
/// `lib`, `share/mysql`).
const MARIADB_BASE: &str = "/usr";
/// The script of the help tables (`HELP` in the client): 3,700 INSERTs
/// whose bootstrap costs 19,000 of the 20,000 page writes of a new data
/// directory, over ten minutes where the guest kernel is interpreted.
/// The lean base directory has it empty; `mariadb mysql <
/// /usr/share/mysql/fill_help_tables.sql` fills them later.
const MARIADB_HELP_SCRIPT: &str = "fill_help_tables.sql";

/// `dir` as a MariaDB installation directory for `mariadb-install-db
/// --basedir`: links to [`MARIADB_BASE`]'s, except an empty
/// [`MARIADB_HELP_SCRIPT`]. Made anew each time (root-owned, readable).
pub fn make_lean_basedir(dir: &Path, base: &Path) -> Result<(), String> {
    let err = |what: &str, p: &Path, e: std::io::Error| format!("{what} {}: {e}", p.display());
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| err("cannot remove", dir, e))?;
    }
    let share = dir.join("share/mysql");
    std::fs::create_dir_all(&share).map_err(|e| err("cannot create", &share, e))?;
    for sub in ["bin", "sbin", "lib"] {
        std::os::unix::fs::symlink(base.join(sub), dir.join(sub)).map_err(|e| err("cannot link", &dir.join(sub), e))?;
    }
    let source = base.join("share/mysql");
    let entries = std::fs::read_dir(&source).map_err(|e| err("cannot read", &source, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| err("cannot read", &source, e))?;
        let name = entry.file_name();
        let link = share.join(&name);
        if name == MARIADB_HELP_SCRIPT {
            std::fs::write(&link, b"").map_err(|e| err("cannot write", &link, e))?;
        } else {
            std::os::unix::fs::symlink(entry.path(), &link).map_err(|e| err("cannot link", &link, e))?;
        }
    }
    Ok(())
}

fn s(v: &str) -> String {
    v.to_string()
}

/// `'text'` as an SQL string literal.
fn sql_string(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// `"name"` as an SQL identifier (PostgreSQL).
fn pg_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `` `name` `` as an SQL identifier (MariaDB).
fn my_ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// The plan for `spec`; `pg_bin` is PostgreSQL's program directory
/// (`/usr/lib/postgresql/<major>/bin`), `pg_template` the cluster Debian's
/// package made in the image (`/var/lib/postgresql/<major>/main`), if any.
/// `pg_major`: PostgreSQL's major version (15 for Debian 12's).
pub fn plan(spec: &ServiceSpec, pg_bin: &Path, pg_major: u32, pg_template: Option<&Path>) -> Result<Plan, String> {
    let kind = Kind::parse(&spec.kind).ok_or_else(|| format!("unknown service kind {:?}", spec.kind))?;
    if !spec.data_dir.starts_with('/') || spec.data_dir.contains("/../") {
        return Err(format!("data directory {:?} is not an absolute path", spec.data_dir));
    }
    let dir = PathBuf::from(&spec.data_dir);
    let data = dir.join("data");
    let log = dir.join(format!("{}.log", kind.package()));
    let data_s = data.to_string_lossy().into_owned();
    let port = spec.port.to_string();
    let user = Some(kind.system_user());
    let script = spec.initial_script.clone().filter(|t| !t.trim().is_empty());
    let plan = match kind {
        Kind::Postgresql => {
            let bin = |p: &str| pg_bin.join(p).to_string_lossy().into_owned();
            let mut init_argv = vec![
                bin("initdb"),
                s("-D"),
                data_s.clone(),
                s("-U"),
                s("postgres"),
                s("-E"),
                s("UTF8"),
                s("--locale=C.UTF-8"),
                s("--auth-local=trust"),
            ];
            init_argv.push(s("--auth-host=trust"));
            // Its many fsyncs cost minutes on a slow guest; the agent syncs
            // at power-off, and a first start cut short is redone from
            // scratch (see `Plan::initialized_file`).
            init_argv.push(s("--no-sync"));
            // The package's cluster under an overlay: only what PostgreSQL
            // changes is written to the volume (initdb runs the server half
            // a dozen times, and even a copy of the 40 MB cluster takes
            // many minutes on a slow guest). Its configuration lives in
            // /etc (Debian's way): the data directory gets empty files, the
            // command line below sets what matters.
            let init = match pg_template {
                Some(_) => vec![Step {
                    user,
                    argv: vec![
                        s("touch"),
                        data.join("postgresql.conf").to_string_lossy().into_owned(),
                        data.join("pg_ident.conf").to_string_lossy().into_owned(),
                    ],
                    stdin: None,
                }],
                None => vec![Step {
                    user,
                    argv: init_argv,
                    stdin: None,
                }],
            };
            let psql = |db: &str, role: &str| -> Vec<String> {
                vec![
                    bin("psql"),
                    s("-X"),
                    s("-q"),
                    s("-v"),
                    s("ON_ERROR_STOP=1"),
                    // TCP on loopback, as the host's connections come: a
                    // server that runs answers there whatever became of
                    // its socket directory.
                    s("-h"),
                    s("127.0.0.1"),
                    s("-p"),
                    port.clone(),
                    s("-U"),
                    s(role),
                    s("-d"),
                    s(db),
                ]
            };
            let mut sql = String::new();
            let password = spec
                .password
                .as_deref()
                .map_or(String::new(), |p| format!(" PASSWORD {}", sql_string(p)));
            if spec.user == "postgres" {
                if !password.is_empty() {
                    sql.push_str(&format!("ALTER ROLE postgres{password};\n"));
                }
            } else {
                // Superuser like devenv's own PostgreSQL: a development
                // database, its owner may do anything in it.
                sql.push_str(&format!(
                    "CREATE ROLE {} LOGIN SUPERUSER{password};\n",
                    pg_ident(&spec.user)
                ));
            }
            let mut first = Vec::new();
            if !sql.is_empty() {
                first.push(Step {
                    user,
                    argv: psql("postgres", "postgres"),
                    stdin: Some(sql),
                });
            }
            // CREATE DATABASE cannot run inside a transaction block: one
            // command each.
            for db in &spec.databases {
                let mut argv = psql("postgres", "postgres");
                argv.push(s("-c"));
                // UTF-8 whatever the template cluster was made with (the
                // image's, in the C locale of the build: SQL_ASCII).
                // FILE_COPY (PostgreSQL 15+; the only way before): a copy
                // of the template's files, not its pages through the WAL,
                // which is three times the writes.
                argv.push(format!(
                    "CREATE DATABASE {} OWNER {} TEMPLATE template0 ENCODING 'UTF8' LOCALE 'C.UTF-8'{}",
                    pg_ident(db),
                    pg_ident(&spec.user),
                    if pg_major >= 15 { " STRATEGY FILE_COPY" } else { "" }
                ));
                first.push(Step {
                    user,
                    argv,
                    stdin: None,
                });
            }
            if let Some(script) = script {
                let db = spec.databases.first().map_or("postgres", String::as_str);
                first.push(Step {
                    user,
                    argv: psql(db, &spec.user),
                    stdin: Some(script),
                });
            }
            // Undo `setup_conf` (ALTER SYSTEM cannot run in a transaction
            // block: statements from stdin run one by one).
            first.push(Step {
                user,
                argv: psql("postgres", "postgres"),
                stdin: Some("ALTER SYSTEM RESET fsync;\nSELECT pg_reload_conf() \\g /dev/null\n".into()),
            });
            Plan {
                kind,
                initialized_file: dir.join(DATADIR_MARKER),
                init,
                server: Step {
                    user,
                    argv: vec![
                        bin("postgres"),
                        s("-D"),
                        data_s,
                        s("-c"),
                        s("listen_addresses=*"),
                        s("-c"),
                        format!("port={port}"),
                        s("-c"),
                        format!("unix_socket_directories={}", kind.run_dir()),
                        // A development database in a small VM (256 MiB by
                        // default): the package's 128 MB would be a large
                        // part of it, and touching it all slows the start.
                        s("-c"),
                        s("shared_buffers=16MB"),
                        s("-c"),
                        format!("hba_file={}", dir.join("pg_hba.conf").display()),
                    ],
                    stdin: None,
                },
                first,
                overlay: pg_template.map(Path::to_path_buf),
                ready: Some(Step {
                    user,
                    argv: vec![
                        bin("pg_isready"),
                        s("-q"),
                        // A backend's fork and start take seconds in a
                        // slow guest: pg_isready's default 3 s would call
                        // a ready server unresponsive.
                        s("-t"),
                        s("30"),
                        s("-h"),
                        s("127.0.0.1"),
                        s("-p"),
                        port.clone(),
                    ],
                    stdin: None,
                }),
                setup_conf: Some((data.join("postgresql.auto.conf"), "fsync = off\n")),
                lean_basedir: None,
                data,
                log,
            }
        }
        Kind::Redis => {
            let mut argv = vec![
                s("/usr/bin/redis-server"),
                s("--port"),
                port,
                s("--bind"),
                s("0.0.0.0"),
                s("--dir"),
                data_s,
                s("--appendonly"),
                s("yes"),
                s("--daemonize"),
                s("no"),
                s("--unixsocket"),
                format!("{}/redis-server.sock", kind.run_dir()),
            ];
            match &spec.password {
                Some(p) => argv.extend([s("--requirepass"), p.clone()]),
                // Reachable only on the VM's own network (and through the
                // host's forward): no password, as devenv does.
                None => argv.extend([s("--protected-mode"), s("no")]),
            }
            Plan {
                kind,
                initialized_file: dir.join(DATADIR_MARKER),
                init: Vec::new(),
                server: Step {
                    user,
                    argv,
                    stdin: None,
                },
                first: Vec::new(),
                overlay: None,
                ready: None,
                setup_conf: None,
                lean_basedir: None,
                data,
                log,
            }
        }
        Kind::Mariadb => {
            let lean_basedir = Path::new(kind.run_dir()).join("basedir");
            let socket = format!("{}/mysqld.sock", kind.run_dir());
            let client = |db: Option<&str>| -> Vec<String> {
                let mut v = vec![s("/usr/bin/mariadb"), format!("--socket={socket}"), s("-u"), s("root")];
                if let Some(db) = db {
                    v.push(s(db));
                }
                v
            };
            let host_user = format!("{}@'%'", sql_string(&spec.user));
            let identified = spec
                .password
                .as_deref()
                .map_or(String::new(), |p| format!(" IDENTIFIED BY {}", sql_string(p)));
            let mut sql = format!(
                "CREATE USER IF NOT EXISTS {host_user}{identified};\nGRANT ALL PRIVILEGES ON *.* TO {host_user} WITH GRANT OPTION;\n"
            );
            for db in &spec.databases {
                sql.push_str(&format!("CREATE DATABASE IF NOT EXISTS {};\n", my_ident(db)));
            }
            sql.push_str("FLUSH PRIVILEGES;\n");
            // The root of the socket is the OS root (unix_socket auth).
            let mut first = vec![Step {
                user: None,
                argv: client(None),
                stdin: Some(sql),
            }];
            if let Some(script) = script {
                first.push(Step {
                    user: None,
                    argv: client(spec.databases.first().map(String::as_str)),
                    stdin: Some(script),
                });
            }
            Plan {
                kind,
                initialized_file: dir.join(DATADIR_MARKER),
                init: vec![Step {
                    user: None,
                    argv: vec![
                        s("/usr/bin/mariadb-install-db"),
                        // As the server below: not Debian's /etc/mysql.
                        s("--no-defaults"),
                        format!("--basedir={}", lean_basedir.display()),
                        s("--user=mysql"),
                        format!("--datadir={data_s}"),
                        s("--auth-root-authentication-method=socket"),
                        s("--skip-test-db"),
                        // Passed on to its bootstrap server, as for the
                        // server below: the default 128 MB pool and 96 MB
                        // redo log are minutes of page faults and writes
                        // in an interpreted guest kernel.
                        s(MARIADB_POOL),
                        s(MARIADB_REDO_LOG),
                    ],
                    stdin: None,
                }],
                server: Step {
                    user,
                    argv: vec![
                        s("/usr/sbin/mariadbd"),
                        s("--no-defaults"),
                        format!("--datadir={data_s}"),
                        format!("--port={port}"),
                        s("--bind-address=*"),
                        format!("--socket={socket}"),
                        format!("--pid-file={}/mysqld.pid", kind.run_dir()),
                        s("--skip-name-resolve"),
                        s(MARIADB_POOL),
                        s(MARIADB_REDO_LOG),
                    ],
                    stdin: None,
                },
                first,
                overlay: None,
                ready: None,
                setup_conf: None,
                lean_basedir: Some(lean_basedir),
                data,
                log,
            }
        }
    };
    Ok(plan)
}

/// pg_hba.conf: trust (or a password when one is set) from loopback and
/// from the subnets the guest is on (`samenet`: the managed network,
/// where the host's forwards come from); nothing else.
pub fn pg_hba(password: bool) -> String {
    let method = if password { "scram-sha-256" } else { "trust" };
    format!(
        "# Written by mvm-agent at each start (docs/vm-toml.md, [[service]]).\n\
         local all all trust\n\
         host all all 127.0.0.1/32 {method}\n\
         host all all ::1/128 {method}\n\
         host all all samenet {method}\n"
    )
}

/// The newest `/usr/lib/postgresql/<major>/bin` under `lib`.
pub fn postgres_bin(lib: &Path) -> Option<(String, PathBuf)> {
    let mut majors: Vec<(u32, String)> = std::fs::read_dir(lib)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n = name.split('.').next()?.parse::<u32>().ok()?;
            e.path().join("bin/postgres").is_file().then_some((n, name))
        })
        .collect();
    majors.sort();
    let (_, name) = majors.pop()?;
    let bin = lib.join(&name).join("bin");
    Some((name, bin))
}

/// A package's upstream version from dpkg's status file (`1:10.11.6-0+deb12u1`
/// -> `10.11.6`).
pub fn package_version(status: &str, package: &str) -> Option<String> {
    let mut current = false;
    for line in status.lines() {
        if let Some(name) = line.strip_prefix("Package: ") {
            current = name.trim() == package;
        } else if current {
            if let Some(v) = line.strip_prefix("Version: ") {
                let v = v.trim();
                let v = v.split_once(':').map_or(v, |(_, r)| r);
                let v = v.split(['-', '+', '~']).next().unwrap_or(v);
                return Some(v.to_string());
            }
        }
    }
    None
}

/// Every service the agent was asked for.
pub struct Services {
    states: Mutex<BTreeMap<String, ServiceState>>,
    /// Pid and stop signal of each running server, for shutdown.
    pids: Mutex<BTreeMap<String, (libc::pid_t, libc::c_int)>>,
    stopping: AtomicBool,
}

static SERVICES: OnceLock<Arc<Services>> = OnceLock::new();

/// The agent's one registry.
pub fn registry() -> Arc<Services> {
    Arc::clone(SERVICES.get_or_init(|| {
        Arc::new(Services {
            states: Mutex::new(BTreeMap::new()),
            pids: Mutex::new(BTreeMap::new()),
            stopping: AtomicBool::new(false),
        })
    }))
}

impl Services {
    fn set(&self, name: &str, run: ServiceRun, detail: impl Into<String>) {
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(st) = states.get_mut(name) {
            st.run = run;
            st.detail = detail.into();
        }
    }

    /// Every service's state, by name.
    pub fn states(&self) -> Vec<ServiceState> {
        self.states
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Start supervising the services not known yet.
    pub fn ensure(self: &Arc<Self>, reaper: &Arc<Reaper>, specs: Vec<ServiceSpec>) {
        for spec in specs {
            {
                let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
                if states.contains_key(&spec.name) {
                    continue;
                }
                states.insert(
                    spec.name.clone(),
                    ServiceState {
                        name: spec.name.clone(),
                        kind: spec.kind.clone(),
                        port: spec.port,
                        run: ServiceRun::Starting,
                        version: String::new(),
                        detail: String::new(),
                        restarts: 0,
                    },
                );
            }
            let me = Arc::clone(self);
            let reaper = Arc::clone(reaper);
            let name = spec.name.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("service-{name}"))
                .spawn(move || me.supervise(&reaper, spec));
            if let Err(e) = spawned {
                self.set(&name, ServiceRun::Failed, format!("cannot start a thread: {e}"));
            }
        }
    }

    /// Stop every server cleanly (before the power-off's SIGTERM to all):
    /// PostgreSQL gets its fast shutdown. Waits up to `timeout`.
    pub fn stop_all(&self, timeout: Duration) {
        self.stopping.store(true, Ordering::SeqCst);
        let pids: Vec<(libc::pid_t, libc::c_int)> = self
            .pids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .copied()
            .collect();
        for &(pid, sig) in &pids {
            // SAFETY: kill(2) on a child we spawned and still track.
            unsafe { libc::kill(pid, sig) };
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline && !self.pids.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn supervise(&self, reaper: &Arc<Reaper>, spec: ServiceSpec) {
        let name = spec.name.clone();
        let fail = |why: String| {
            say!("service {name}: {why}");
            self.set(&name, ServiceRun::Failed, why);
        };
        let (version, pg_bin) = match Kind::parse(&spec.kind) {
            Some(Kind::Postgresql) => match postgres_bin(Path::new("/usr/lib/postgresql")) {
                Some((v, bin)) => (v, bin),
                None => return fail("PostgreSQL is not installed (Debian package postgresql)".into()),
            },
            Some(kind) => {
                let status = std::fs::read_to_string("/var/lib/dpkg/status").unwrap_or_default();
                match package_version(&status, kind.package()) {
                    Some(v) => (v, PathBuf::new()),
                    None => {
                        return fail(format!(
                            "{} is not installed (Debian package {})",
                            spec.kind,
                            kind.package()
                        ))
                    }
                }
            }
            None => return fail(format!("unknown kind {:?}", spec.kind)),
        };
        // "15" for PostgreSQL (its directory under /usr/lib/postgresql).
        let major = version.split('.').next().and_then(|m| m.parse().ok()).unwrap_or(0);
        {
            let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(st) = states.get_mut(&name) {
                st.version = version;
            }
        }
        let template = pg_bin
            .parent()
            .and_then(|p| p.file_name())
            .map(|major| Path::new("/var/lib/postgresql").join(major).join("main"))
            .filter(|t| t.join("PG_VERSION").is_file());
        let plan = match plan(&spec, &pg_bin, major, template.as_deref()) {
            Ok(p) => p,
            Err(why) => return fail(why),
        };
        let account = match passwd::account(
            Path::new("/etc/passwd"),
            Path::new("/etc/group"),
            plan.kind.system_user(),
        ) {
            Ok(a) => a,
            Err(why) => return fail(why),
        };
        let fresh = !plan.initialized_file.exists();
        if fresh && plan.data.exists() {
            say!(
                "service {name}: {} is from a first start cut short; making it again",
                plan.data.display()
            );
            if let Err(e) = std::fs::remove_dir_all(&plan.data) {
                return fail(format!("cannot remove {}: {e}", plan.data.display()));
            }
        }
        if let Err(why) = prepare_dirs(&plan, &spec, &account) {
            return fail(why);
        }
        if let Some(lower) = &plan.overlay {
            if let Err(why) = mount_overlay(lower, &plan.data, Path::new(&spec.data_dir), &account, fresh) {
                return fail(why);
            }
        }
        if fresh {
            self.set(&name, ServiceRun::Starting, "making the data directory");
            let t = Instant::now();
            if let Some(dir) = &plan.lean_basedir {
                if let Err(why) = make_lean_basedir(dir, Path::new(MARIADB_BASE)) {
                    return fail(why);
                }
            }
            for step in &plan.init {
                if let Err(why) = run_step(reaper, step, &account, &plan.log) {
                    return fail(format!("first-start setup failed: {why} (see {})", plan.log.display()));
                }
            }
            if let Err(e) = std::fs::write(&plan.initialized_file, b"") {
                return fail(format!("cannot write {}: {e}", plan.initialized_file.display()));
            }
            say!(
                "service {name}: data directory made in {:.1} s",
                t.elapsed().as_secs_f64()
            );
        }
        let marker = Path::new(&spec.data_dir).join(MARKER);
        if let (false, Some((conf, line))) = (marker.exists(), &plan.setup_conf) {
            if let Err(why) = append_once(conf, line) {
                say!("service {name}: cannot write {}: {why}", conf.display());
            }
        }
        self.set(&name, ServiceRun::Starting, "the server is starting up");
        let mut backoff = Duration::from_secs(1);
        loop {
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            let started = Instant::now();
            let (child, watch) = match spawn_server(reaper, &plan, &account) {
                Ok(c) => c,
                Err(why) => return fail(why),
            };
            let pid = child.id() as libc::pid_t;
            drop(child);
            self.pids
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name.clone(), (pid, plan.kind.stop_signal()));
            let addr = SocketAddr::from(([127, 0, 0, 1], spec.port));
            let mut late = false;
            let mut next_check = Instant::now();
            // The server's exit before it took connections, if it did not.
            let early_exit = loop {
                if !late && started.elapsed() >= READY_TIMEOUT {
                    late = true;
                    let detail = format!(
                        "not accepting connections after {} s; still waiting (log: {})",
                        READY_TIMEOUT.as_secs(),
                        plan.log.display()
                    );
                    say!("service {name}: {detail}");
                    self.set(&name, ServiceRun::Starting, &detail);
                }
                if let Some(e) = reaper.wait_timeout(&watch, Duration::from_millis(200)) {
                    break Some(e);
                }
                if Instant::now() < next_check {
                    continue;
                }
                next_check = Instant::now() + READY_POLL;
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                    && plan
                        .ready
                        .as_ref()
                        .is_none_or(|step| run_step(reaper, step, &account, &plan.log).is_ok())
                {
                    break None;
                }
            };
            let exit = if let Some(e) = early_exit {
                e
            } else {
                say!(
                    "service {name}: accepting connections on port {} after {:.1} s",
                    spec.port,
                    started.elapsed().as_secs_f64()
                );
                if !marker.exists() {
                    self.set(&name, ServiceRun::Starting, "creating databases and role");
                    let mut ok = true;
                    for step in &plan.first {
                        if let Err(why) = run_step(reaper, step, &account, &plan.log) {
                            fail(format!("first-start setup failed: {why} (see {})", plan.log.display()));
                            ok = false;
                            break;
                        }
                    }
                    if ok {
                        // What `setup_conf` left unsynced, in one go.
                        // SAFETY: sync(2) takes no arguments.
                        unsafe { libc::sync() };
                        if let Err(e) = std::fs::write(&marker, b"") {
                            say!("service {name}: cannot write {}: {e}", marker.display());
                        }
                        self.set(&name, ServiceRun::Running, "");
                    }
                } else {
                    self.set(&name, ServiceRun::Running, "");
                }
                loop {
                    if let Some(e) = reaper.wait_timeout(&watch, Duration::from_secs(3600)) {
                        break e;
                    }
                }
            };
            self.pids.lock().unwrap_or_else(|e| e.into_inner()).remove(&name);
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            let how = match exit.status {
                crate::proto::ExitStatus::Code(c) => format!("exited with status {c}"),
                crate::proto::ExitStatus::Signal(s) => format!("killed by signal {s}"),
            };
            if started.elapsed() >= STABLE_RUN {
                backoff = Duration::from_secs(1);
            }
            let restarts = {
                let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
                states.get_mut(&name).map_or(0, |st| {
                    st.restarts += 1;
                    st.restarts
                })
            };
            let why = format!(
                "the server {how}; restart {restarts} in {} s (log: {})",
                backoff.as_secs(),
                plan.log.display()
            );
            say!("service {name}: {why}");
            // Three quick deaths in a row: say it failed (it is still retried).
            let run = if restarts >= 3 && backoff >= Duration::from_secs(4) {
                ServiceRun::Failed
            } else {
                ServiceRun::Starting
            };
            self.set(&name, run, why);
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

/// The data directory's parent owned by the service's user; /run's
/// socket directory (a tmpfs, new at every boot); pg_hba.conf.
fn prepare_dirs(plan: &Plan, spec: &ServiceSpec, account: &Account) -> Result<(), String> {
    let chown = |p: &Path| -> Result<(), String> {
        std::os::unix::fs::chown(p, Some(account.uid), Some(account.gid))
            .map_err(|e| format!("cannot give {} to {}: {e}", p.display(), account.name))
    };
    let dir = Path::new(&spec.data_dir);
    for d in [dir, Path::new(plan.kind.run_dir())] {
        std::fs::create_dir_all(d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
        chown(d)?;
    }
    // initdb wants to make its directory itself (or find it empty).
    if plan.kind != Kind::Postgresql {
        std::fs::create_dir_all(&plan.data).map_err(|e| format!("cannot create {}: {e}", plan.data.display()))?;
        chown(&plan.data)?;
        let _ = std::fs::set_permissions(&plan.data, std::fs::Permissions::from_mode(0o750));
    }
    if plan.kind == Kind::Postgresql {
        let hba = dir.join("pg_hba.conf");
        std::fs::write(&hba, pg_hba(spec.password.is_some()))
            .map_err(|e| format!("cannot write {}: {e}", hba.display()))?;
        chown(&hba)?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(&plan.log)
        .map_err(|e| format!("cannot open {}: {e}", plan.log.display()))?;
    drop(log);
    chown(&plan.log)
}

/// Mount `lower` under `<dir>/upper` at `data` (a fresh start empties
/// the upper layer first).
/// Append `line` to `path` unless the file already has it.
fn append_once(path: &Path, line: &str) -> std::io::Result<()> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    if text.lines().any(|l| l.trim() == line.trim()) {
        return Ok(());
    }
    // Not created here: a root-owned file the server could not rewrite.
    let mut f = std::fs::OpenOptions::new().append(true).open(path)?;
    let sep = if text.is_empty() || text.ends_with('\n') {
        ""
    } else {
        "\n"
    };
    f.write_all(format!("{sep}{line}").as_bytes())
}

fn mount_overlay(lower: &Path, data: &Path, dir: &Path, account: &Account, fresh: bool) -> Result<(), String> {
    let (upper, work) = (dir.join("upper"), dir.join("work"));
    for d in [&upper, &work] {
        if fresh && d.exists() {
            std::fs::remove_dir_all(d).map_err(|e| format!("cannot remove {}: {e}", d.display()))?;
        }
        std::fs::create_dir_all(d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
        std::os::unix::fs::chown(d, Some(account.uid), Some(account.gid))
            .map_err(|e| format!("cannot give {} to {}: {e}", d.display(), account.name))?;
    }
    // The merged root takes the upper directory's owner and mode, and
    // PostgreSQL wants its data directory private.
    let _ = std::fs::set_permissions(&upper, std::fs::Permissions::from_mode(0o700));
    std::fs::create_dir_all(data).map_err(|e| format!("cannot create {}: {e}", data.display()))?;
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    sys::mount("overlay", &data.to_string_lossy(), "overlay", 0, Some(&options)).map_err(|e| {
        format!(
            "cannot mount the data directory overlay ({options}): {}",
            sys::error_text(&e)
        )
    })
}

/// A command for `step`: its user's ids, a clean environment, signals
/// unblocked, output appended to `log`.
fn command(step: &Step, account: &Account, log: &Path) -> Result<Command, String> {
    let (program, args) = step.argv.split_first().ok_or("empty command")?;
    let mut cmd = Command::new(program);
    cmd.args(args);
    let home = if step.user.is_some() {
        account.home.as_str()
    } else {
        "/root"
    };
    cmd.env_clear()
        .envs(crate::session::boot_env().iter().cloned())
        .env("PATH", crate::session::DEFAULT_PATH)
        .env("HOME", home)
        .env("LANG", "C.UTF-8")
        .current_dir("/");
    let out = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(log)
        .map_err(|e| format!("cannot open {}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    cmd.stdout(out).stderr(err);
    cmd.process_group(0);
    let ids = step.user.map(|_| (account.uid, account.gid, account.groups.clone()));
    // SAFETY: the closure makes only async-signal-safe calls on memory it
    // owns.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            sys::cvt(libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()))?;
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            if let Some((uid, gid, groups)) = &ids {
                sys::cvt(libc::setgroups(groups.len(), groups.as_ptr()))?;
                sys::cvt(libc::setgid(*gid))?;
                sys::cvt(libc::setuid(*uid))?;
            }
            Ok(())
        })
    };
    Ok(cmd)
}

fn spawn_server(
    reaper: &Reaper,
    plan: &Plan,
    account: &Account,
) -> Result<(std::process::Child, crate::reaper::Watch), String> {
    let mut cmd = command(&plan.server, account, &plan.log)?;
    cmd.stdin(Stdio::null());
    reaper.spawn(&mut cmd).map_err(|e| {
        format!(
            "cannot run {}: {e}",
            plan.server.argv.first().map_or("", String::as_str)
        )
    })
}

/// Run a setup step to its end; an error names its status.
fn run_step(reaper: &Reaper, step: &Step, account: &Account, log: &Path) -> Result<(), String> {
    let mut cmd = command(step, account, log)?;
    cmd.stdin(if step.stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let program = step.argv.first().cloned().unwrap_or_default();
    let (mut child, watch) = reaper
        .spawn(&mut cmd)
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    drop(cmd);
    if let (Some(text), Some(mut stdin)) = (&step.stdin, child.stdin.take()) {
        use std::io::Write;
        let _ = stdin.write_all(text.as_bytes());
    }
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_end(&mut Vec::new());
    }
    let exit = reaper.wait_timeout(&watch, SETUP_TIMEOUT);
    match exit.map(|e| e.status) {
        Some(crate::proto::ExitStatus::Code(0)) => Ok(()),
        Some(crate::proto::ExitStatus::Code(c)) => Err(format!("{program} exited with status {c}")),
        Some(crate::proto::ExitStatus::Signal(s)) => Err(format!("{program} was killed by signal {s}")),
        None => {
            // SAFETY: kill(2) on our child.
            unsafe { libc::kill(watch.pid, libc::SIGKILL) };
            reaper.forget(&watch);
            Err(format!("{program} did not finish in {} s", SETUP_TIMEOUT.as_secs()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: &str) -> ServiceSpec {
        ServiceSpec {
            kind: kind.into(),
            name: kind.into(),
            port: 5432,
            databases: vec!["app".into()],
            user: "dev".into(),
            password: None,
            initial_script: Some("create table t (x int);".into()),
            data_dir: format!("/var/lib/mvm-services/{kind}"),
        }
    }

    #[test]
    fn append_once_appends_one_line_to_an_existing_file() {
        let dir = std::env::temp_dir().join(format!("mvm-append-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("postgresql.auto.conf");
        assert!(append_once(&f, "fsync = off\n").is_err(), "not created");
        std::fs::write(&f, "# header").unwrap();
        append_once(&f, "fsync = off\n").unwrap();
        append_once(&f, "fsync = off\n").unwrap();
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "# header\nfsync = off\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn postgres_plan() {
        let p = plan(&spec("postgresql"), Path::new("/usr/lib/postgresql/15/bin"), 15, None).unwrap();
        assert_eq!(p.data, Path::new("/var/lib/mvm-services/postgresql/data"));
        assert_eq!(
            p.initialized_file,
            Path::new("/var/lib/mvm-services/postgresql/.mvm-datadir")
        );
        assert!(p.init[0].argv.contains(&"--no-sync".to_string()));
        assert_eq!(p.init[0].argv[0], "/usr/lib/postgresql/15/bin/initdb");
        assert_eq!(p.init[0].user, Some("postgres"));
        assert_eq!(p.server.user, Some("postgres"));
        let ready = &p.ready.as_ref().unwrap().argv;
        assert_eq!(ready[0], "/usr/lib/postgresql/15/bin/pg_isready");
        assert!(ready.contains(&"127.0.0.1".to_string()));
        assert!(p.server.argv.contains(&"listen_addresses=*".to_string()));
        assert!(p.server.argv.contains(&"port=5432".to_string()));
        assert!(p
            .server
            .argv
            .contains(&"hba_file=/var/lib/mvm-services/postgresql/pg_hba.conf".to_string()));
        assert_eq!(p.first.len(), 4);
        assert_eq!(
            p.first[0].stdin.as_deref(),
            Some("CREATE ROLE \"dev\" LOGIN SUPERUSER;\n")
        );
        assert_eq!(
            p.first[1].argv.last().unwrap(),
            "CREATE DATABASE \"app\" OWNER \"dev\" TEMPLATE template0 ENCODING 'UTF8' LOCALE 'C.UTF-8' STRATEGY FILE_COPY"
        );
        // fsync is off for the first start only: the last step turns it back on.
        let (conf, line) = p.setup_conf.as_ref().unwrap();
        assert_eq!(
            conf,
            Path::new("/var/lib/mvm-services/postgresql/data/postgresql.auto.conf")
        );
        assert_eq!(*line, "fsync = off\n");
        assert_eq!(
            p.first[3].stdin.as_deref(),
            Some("ALTER SYSTEM RESET fsync;\nSELECT pg_reload_conf() \\g /dev/null\n")
        );
        let old = plan(&spec("postgresql"), Path::new("/b"), 14, None).unwrap();
        assert!(!old.first[1].argv.last().unwrap().contains("STRATEGY"));
        // The script runs as the user, in the first database.
        let a = &p.first[2].argv;
        assert_eq!(&a[a.len() - 4..], ["-U", "dev", "-d", "app"]);

        let mut s = spec("postgresql");
        s.user = "postgres".into();
        s.password = Some("it's".into());
        s.initial_script = None;
        s.databases.clear();
        let p = plan(&s, Path::new("/b"), 15, None).unwrap();
        assert_eq!(p.first.len(), 2, "ALTER ROLE, then fsync back on");
        assert_eq!(
            p.first[0].stdin.as_deref(),
            Some("ALTER ROLE postgres PASSWORD 'it''s';\n")
        );
        assert!(pg_hba(true).contains("host all all samenet scram-sha-256"));
        // With the package's cluster: an overlay of it, not initdb.
        let p = plan(&s, Path::new("/b"), 15, Some(Path::new("/var/lib/postgresql/15/main"))).unwrap();
        assert_eq!(p.overlay.as_deref(), Some(Path::new("/var/lib/postgresql/15/main")));
        assert_eq!(p.init.len(), 1);
        assert_eq!(p.init[0].argv[0], "touch");
        assert!(pg_hba(false).contains("host all all samenet trust"));
    }

    #[test]
    fn lean_basedir_links_all_but_the_help_tables() {
        let t = std::env::temp_dir().join(format!("mvm-lean-basedir-{}", std::process::id()));
        let base = t.join("usr");
        std::fs::create_dir_all(base.join("share/mysql/english")).unwrap();
        std::fs::write(base.join("share/mysql/fill_help_tables.sql"), "INSERT ...").unwrap();
        std::fs::write(base.join("share/mysql/mysql_system_tables.sql"), "CREATE ...").unwrap();
        let dir = t.join("run/basedir");
        std::fs::create_dir_all(dir.join("stale")).unwrap();
        make_lean_basedir(&dir, &base).unwrap();
        assert!(!dir.join("stale").exists());
        assert_eq!(std::fs::read_link(dir.join("sbin")).unwrap(), base.join("sbin"));
        let share = dir.join("share/mysql");
        assert_eq!(
            std::fs::read_to_string(share.join("mysql_system_tables.sql")).unwrap(),
            "CREATE ..."
        );
        assert!(share.join("english").is_dir());
        assert_eq!(std::fs::read_to_string(share.join("fill_help_tables.sql")).unwrap(), "");
        assert_eq!(
            std::fs::read_to_string(base.join("share/mysql/fill_help_tables.sql")).unwrap(),
            "INSERT ..."
        );
        // A base without share/mysql: an error naming it.
        let err = make_lean_basedir(&dir, &t.join("none")).unwrap_err();
        assert!(err.contains("none/share/mysql"), "{err}");
        std::fs::remove_dir_all(&t).unwrap();
    }

    #[test]
    fn redis_and_mariadb_plans() {
        let mut r = spec("redis");
        r.databases.clear();
        r.initial_script = None;
        r.port = 6380;
        let p = plan(&r, Path::new(""), 0, None).unwrap();
        assert!(p.init.is_empty() && p.first.is_empty());
        assert_eq!(p.server.user, Some("redis"));
        assert_eq!(&p.server.argv[..3], ["/usr/bin/redis-server", "--port", "6380"]);
        assert!(p.server.argv.ends_with(&["--protected-mode".into(), "no".into()]));

        let p = plan(&spec("mariadb"), Path::new(""), 0, None).unwrap();
        assert_eq!(p.init[0].argv[0], "/usr/bin/mariadb-install-db");
        assert_eq!(p.lean_basedir.as_deref(), Some(Path::new("/run/mysqld/basedir")));
        assert!(p.init[0].argv.contains(&"--basedir=/run/mysqld/basedir".to_string()));
        assert_eq!(p.server.user, Some("mysql"));
        assert!(p.server.argv.contains(&"--port=5432".to_string()));
        let sql = p.first[0].stdin.as_deref().unwrap();
        assert!(sql.contains("CREATE USER IF NOT EXISTS 'dev'@'%';"));
        assert!(sql.contains("CREATE DATABASE IF NOT EXISTS `app`;"));
        assert_eq!(p.first[1].argv.last().unwrap(), "app");

        assert!(plan(&spec("mongodb"), Path::new(""), 0, None).is_err());
        let mut bad = spec("redis");
        bad.data_dir = "relative".into();
        assert!(plan(&bad, Path::new(""), 0, None).is_err());
    }

    #[test]
    fn saved_list() {
        let dir = std::env::temp_dir().join(format!("mvm-agent-saved-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(".mvm-services");
        let mut a = spec("postgresql");
        a.data_dir = dir.join("postgresql").to_string_lossy().into_owned();
        save(&[a.clone()], &file);
        assert_eq!(load(&file), [a.clone()]);
        // Data elsewhere: not kept (the list stays as it was).
        save(&[spec("redis")], &file);
        assert_eq!(load(&file), [a]);
        std::fs::write(&file, b"junk").unwrap();
        assert!(load(&file).is_empty());
        assert!(load(&dir.join("none")).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn versions() {
        let status = "Package: redis-server\nStatus: install ok installed\nVersion: 5:7.0.15-1~deb12u1\n\nPackage: mariadb-server\nVersion: 1:10.11.6-0+deb12u1\n";
        assert_eq!(package_version(status, "redis-server").as_deref(), Some("7.0.15"));
        assert_eq!(package_version(status, "mariadb-server").as_deref(), Some("10.11.6"));
        assert_eq!(package_version(status, "postgresql"), None);

        let dir = std::env::temp_dir().join(format!("mvm-agent-pglib-{}", std::process::id()));
        for v in ["13", "15", "9.6"] {
            std::fs::create_dir_all(dir.join(v).join("bin")).unwrap();
            std::fs::write(dir.join(v).join("bin/postgres"), b"").unwrap();
        }
        std::fs::create_dir_all(dir.join("16/bin")).unwrap(); // no server
        assert_eq!(postgres_bin(&dir).unwrap(), ("15".into(), dir.join("15/bin")));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
