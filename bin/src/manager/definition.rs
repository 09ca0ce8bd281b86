//! The `vm.toml` that `create` writes: generated, or derived from a
//! `--from` file, and checked with the VMM's own parser.

use std::path::{Path, PathBuf};

use microvm_dev::VmConfig;

use super::{
    CreateOptions, Manager, RootChoice, CONSOLE_LOG, DEFAULT_CPUS, DEFAULT_MEMORY_MIB, GUEST_DIR, INITRD_ENV,
    KERNEL_ENV, PROJECT_MOUNT, PROJECT_TAG, VSOCK_SOCK,
};
use crate::{Error, Result};

impl Manager {
    /// The vm.toml text for `opts`.
    pub(super) fn definition(
        &self,
        opts: &CreateOptions,
        project: Option<&Path>,
        progress: &mut dyn FnMut(crate::image::Progress<'_>),
    ) -> Result<String> {
        use toml::{Table, Value};
        let name = opts.name.as_str();
        let (mut doc, base_dir, origin) = match &opts.from {
            None => (Table::new(), PathBuf::new(), None),
            Some(path) => {
                let bad = |reason: String| Error::BaseFile {
                    path: path.clone(),
                    reason,
                };
                let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read: {e}")))?;
                let doc: Table = text
                    .parse()
                    .map_err(|e: toml::de::Error| bad(e.message().trim().to_string()))?;
                let abs = std::path::absolute(path).map_err(|e| bad(e.to_string()))?;
                let dir = abs.parent().map(Path::to_path_buf).unwrap_or_default();
                (doc, dir, Some(abs))
            }
        };
        // Relative paths of the base file are relative to its directory;
        // the new file lives elsewhere, so they are made absolute.
        let absolutize = |t: &mut Table, key: &str| {
            if let Some(Value::String(s)) = t.get(key) {
                if !Path::new(s).is_absolute() {
                    let p = base_dir.join(s).to_string_lossy().into_owned();
                    t.insert(key.into(), Value::String(p));
                }
            }
        };
        let section = |doc: &mut Table, key: &str| -> Result<Table> {
            match doc.remove(key) {
                None => Ok(Table::new()),
                Some(Value::Table(t)) => Ok(t),
                Some(_) => Err(Error::BaseFile {
                    path: opts.from.clone().unwrap_or_default(),
                    reason: format!("`{key}` is not a table"),
                }),
            }
        };
        let list = |doc: &mut Table, key: &str| -> Vec<Table> {
            match doc.remove(key) {
                Some(Value::Array(a)) => a
                    .into_iter()
                    .filter_map(|v| match v {
                        Value::Table(t) => Some(t),
                        _ => None,
                    })
                    .collect(),
                _ => Vec::new(),
            }
        };

        // Checked before an image is built for them.
        let no_image = || {
            Error::Usage(
                "--service runs a server from the image's Debian packages: an initramfs-only VM has none; drop --no-image (or pick a Debian image with --image)".into(),
            )
        };
        let no_network = || {
            Error::Usage(
                "--service is reached from the host through a port forward, which needs a managed network: drop --no-network (or use --network NAME)".into(),
            )
        };
        if !opts.services.is_empty() {
            if opts.root == RootChoice::Initramfs {
                return Err(no_image());
            }
            let base_network = matches!(doc.get("net"), Some(Value::Array(a))
                if a.iter().any(|n| n.as_table().is_some_and(|t| t.contains_key("network"))));
            if opts.network.name().is_none() && !base_network {
                return Err(no_network());
            }
        }
        let mut machine = section(&mut doc, "machine")?;
        let cpus = opts
            .cpus
            .or_else(|| (!machine.contains_key("vcpus")).then_some(DEFAULT_CPUS));
        if let Some(c) = cpus {
            machine.insert("vcpus".into(), Value::Integer(c.into()));
        }
        // Servers need room of their own: a VM with PostgreSQL and
        // MariaDB in the default 256 MiB would swap-less OOM.
        let default_mem = DEFAULT_MEMORY_MIB + opts.services.iter().map(|s| s.kind.memory_mib()).sum::<u32>();
        let mem = opts
            .memory_mib
            .or_else(|| (!machine.contains_key("memory_mib")).then_some(default_mem));
        if let Some(m) = mem {
            machine.insert("memory_mib".into(), Value::Integer(m.into()));
        }

        let mut boot = section(&mut doc, "boot")?;
        absolutize(&mut boot, "kernel");
        absolutize(&mut boot, "initrd");
        let base_has_kernel = boot.contains_key("kernel");
        if opts.kernel.is_some() || !base_has_kernel {
            let kernel = self.kernel(opts.kernel.as_deref())?;
            boot.insert("kernel".into(), path_value(&kernel));
            match self.initrd(opts.initrd.as_deref())? {
                Some(i) => boot.insert("initrd".into(), path_value(&i)),
                None => boot.remove("initrd"),
            };
        } else if let Some(i) = &opts.initrd {
            boot.insert("initrd".into(), path_value(&checked_file("initrd", i)?));
        }
        let mut root = section(&mut doc, "root")?;
        absolutize(&mut root, "image");
        let image = match &opts.root {
            RootChoice::Initramfs => {
                root.clear();
                None
            }
            RootChoice::Image(reference) => Some(self.resolve_image(reference, progress)?),
            RootChoice::DefaultImage if root.contains_key("image") => None,
            // Services need their servers' packages: the default packages
            // and those, an image of its own (built once, then cached).
            RootChoice::DefaultImage if !opts.services.is_empty() => {
                let spec = super::services::services_image_spec(&opts.services);
                Some(self.images().build(&spec, progress)?.0.path)
            }
            RootChoice::DefaultImage => Some(self.resolve_image(crate::image::DEFAULT_IMAGE, progress)?),
        };
        if let Some(image) = image {
            root.insert("image".into(), path_value(&image));
        }
        if root.is_empty() {
            if opts.ephemeral || opts.root_size_mib.is_some() {
                return Err(Error::Usage(
                    "--ephemeral and --root-size apply to an image root, not to an initramfs-only VM".into(),
                ));
            }
        } else {
            if opts.ephemeral {
                root.insert("upper".into(), "tmpfs".into());
            }
            if let Some(size) = opts.root_size_mib {
                root.insert(
                    "size_mib".into(),
                    Value::Integer(i64::try_from(size).unwrap_or(i64::MAX)),
                );
            }
            if !boot.contains_key("initrd") {
                return Err(Error::NoKernel {
                    what: "initrd",
                    env: INITRD_ENV,
                    default: self.root.join(GUEST_DIR).join("initramfs.cpio"),
                });
            }
        }
        let mut cmdline = match boot.get("cmdline") {
            Some(Value::String(c)) => with_hostname(c, name),
            _ => default_cmdline(name),
        };
        // A base file's own mvm.user stays unless a user is chosen.
        if let Some(user) = opts.user.resolve(project)? {
            cmdline = super::user::with_user(&cmdline, &user);
        }
        boot.insert("cmdline".into(), Value::String(cmdline));

        let mut console = Table::new();
        console.insert("output".into(), "file".into());
        console.insert("file".into(), CONSOLE_LOG.into());
        doc.remove("console");
        let mut vsock = Table::new();
        vsock.insert("guest_cid".into(), Value::Integer(3));
        vsock.insert("uds_path".into(), VSOCK_SOCK.into());
        doc.remove("vsock");

        let mut shares = list(&mut doc, "share");
        for s in &mut shares {
            for key in ["source", "upper", "socket"] {
                absolutize(s, key);
            }
        }
        if let Some(project) = project {
            shares.retain(|s| s.get("tag").and_then(Value::as_str) != Some(PROJECT_TAG));
            let mut s = Table::new();
            s.insert("tag".into(), PROJECT_TAG.into());
            s.insert("source".into(), path_value(project));
            s.insert("mount".into(), PROJECT_MOUNT.into());
            s.insert("persist".into(), Value::Boolean(opts.persist));
            // Host edits fire the guest's file watchers (the agent replays them).
            s.insert("watch".into(), Value::Boolean(true));
            shares.push(s);
        }
        let mut volumes = list(&mut doc, "volume");
        for v in &opts.volumes {
            volumes.retain(|t| t.get("name").and_then(Value::as_str) != Some(v.name.as_str()));
            let mut t = Table::new();
            t.insert("name".into(), v.name.clone().into());
            t.insert(
                "size_mib".into(),
                Value::Integer(i64::try_from(v.size_mib).unwrap_or(i64::MAX)),
            );
            if let Some(m) = &v.mount {
                t.insert("mount".into(), m.clone().into());
            }
            volumes.push(t);
        }
        let mut disks = list(&mut doc, "disk");
        for d in &mut disks {
            absolutize(d, "path");
        }
        for key in ["version", "name", "state_root"] {
            doc.remove(key);
        }
        let mut nets = list(&mut doc, "net");
        if let Some(network) = opts.network.name() {
            if !nets.iter().any(|n| n.contains_key("network")) {
                let mut t = Table::new();
                t.insert("network".into(), network.into());
                nets.insert(0, t);
            }
        }
        let mut forwards = list(&mut doc, "forward");
        let mut own_forwards = Vec::new();
        for f in &opts.forwards {
            // The same table the run-time forwards file holds.
            let table = Table::try_from(super::network::file_forward(&f.to_config()))
                .map_err(|e| Error::Usage(format!("cannot write the forward: {e}")))?;
            forwards.push(table);
            own_forwards.push(f.to_config());
        }
        let mut services = list(&mut doc, "service");
        if !opts.services.is_empty() {
            if root.is_empty() {
                return Err(no_image());
            }
            if !nets.iter().any(|n| n.contains_key("network")) {
                return Err(no_network());
            }
            for svc in &opts.services {
                if services
                    .iter()
                    .any(|t| t.get("name").or_else(|| t.get("kind")).and_then(Value::as_str) == Some(svc.name.as_str()))
                {
                    return Err(Error::Usage(format!(
                        "two services named {:?}: give the second another name",
                        svc.name
                    )));
                }
                services.push(super::services::service_table(svc));
                let host_port = self.pick_host_port(name, svc.port, &own_forwards)?;
                let f = microvm_dev::config::ForwardConfig {
                    protocol: mvm_net::forward::Protocol::Tcp,
                    host_address: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
                    host_port,
                    guest_port: svc.port,
                };
                let table = Table::try_from(super::network::file_forward(&f))
                    .map_err(|e| Error::Usage(format!("cannot write the forward: {e}")))?;
                forwards.push(table);
                own_forwards.push(f);
            }
            let volume = super::services::SERVICES_VOLUME;
            if !volumes
                .iter()
                .any(|t| t.get("name").and_then(Value::as_str) == Some(volume))
            {
                let mut t = Table::new();
                t.insert("name".into(), volume.into());
                t.insert(
                    "size_mib".into(),
                    Value::Integer(super::services::SERVICES_VOLUME_MIB as i64),
                );
                t.insert("mount".into(), super::services::SERVICES_MOUNT.into());
                volumes.push(t);
            }
        }

        let env = super::env::env_table(section(&mut doc, "env")?, &opts.env, &opts.pass_env);
        let mut devenv = section(&mut doc, "devenv")?;
        if let Some(file) = &opts.devenv {
            devenv.insert("file".into(), path_value(file));
        }

        let mut security = section(&mut doc, "security")?;
        if let Some(user) = super::vmm_user_for(opts.vmm_user.as_deref()) {
            security.insert("user".into(), Value::String(user));
        }

        let quote = |s: &str| Value::String(s.into()).to_string();
        let mut out = String::new();
        out.push_str(&format!(
            "# VM {name:?}, made by `mvm create` ({} {}){}.\n",
            env!("CARGO_PKG_NAME"),
            env!("CARGO_PKG_VERSION"),
            origin.map_or(String::new(), |o| format!(" from {}", o.display()))
        ));
        out.push_str("# You may edit it (docs/vm-toml.md lists every key); `mvm start` reads it\n");
        out.push_str("# at each start. Keep name, state_root, [vsock] and [console]: mvm relies on them.\n\n");
        out.push_str("version = 1\n");
        out.push_str(&format!("name = {}\n", quote(name)));
        out.push_str(&format!("state_root = {}\n", quote(&self.root.to_string_lossy())));
        // Whatever else the base file had at the top level (unknown keys
        // are rejected by the final check anyway).
        let mut rest = doc;
        let mut sections = String::new();
        for (header, table, order) in [
            ("machine", &machine, &["vcpus", "memory_mib"][..]),
            ("boot", &boot, &["kernel", "initrd", "cmdline"][..]),
            ("console", &console, &["output", "file"][..]),
            ("vsock", &vsock, &["guest_cid", "uds_path"][..]),
            ("root", &root, &["image", "upper", "size_mib"][..]),
            ("env", &env, &["set", "passthrough"][..]),
            ("devenv", &devenv, &["file"][..]),
            ("security", &security, &["seccomp", "user"][..]),
        ] {
            if table.is_empty() {
                continue;
            }
            sections.push_str(&format!("\n[{header}]\n{}", emit(table, order)));
        }
        for (key, items, order) in [
            ("share", shares, &["tag", "source", "mount", "persist", "watch"][..]),
            ("volume", volumes, &["name", "size_mib", "mount"][..]),
            ("disk", disks, &["path"][..]),
            ("net", nets, &["network", "tap", "mac", "bridge"][..]),
            (
                "forward",
                forwards,
                &["host_port", "guest_port", "host_address", "protocol"][..],
            ),
            (
                "service",
                services,
                &[
                    "kind",
                    "name",
                    "port",
                    "databases",
                    "user",
                    "password",
                    "initial_script",
                ][..],
            ),
        ] {
            for item in items {
                sections.push_str(&format!("\n[[{key}]]\n{}", emit(&item, order)));
            }
        }
        let mut plain = Table::new();
        let keys: Vec<String> = rest.keys().cloned().collect();
        for k in keys {
            if let Some(v) = rest.remove(&k) {
                match v {
                    Value::Table(t) => sections.push_str(&format!("\n[{k}]\n{}", emit(&t, &[]))),
                    v => {
                        plain.insert(k, v);
                    }
                }
            }
        }
        out.push_str(&emit(&plain, &[]));
        out.push_str(&sections);
        Ok(out)
    }

    fn kernel(&self, given: Option<&Path>) -> Result<PathBuf> {
        if let Some(p) = given {
            return checked_file("kernel", p);
        }
        if let Some(p) = std::env::var_os(KERNEL_ENV).filter(|v| !v.is_empty()) {
            return checked_file(KERNEL_ENV, Path::new(&p));
        }
        let default = self.root.join(GUEST_DIR).join("vmlinux");
        if default.is_file() {
            return Ok(default);
        }
        Err(Error::NoKernel {
            what: "kernel",
            env: KERNEL_ENV,
            default,
        })
    }

    /// The image file `reference` names: a path, or an image in the store
    /// (the default image is built when missing).
    fn resolve_image(&self, reference: &str, progress: &mut dyn FnMut(crate::image::Progress<'_>)) -> Result<PathBuf> {
        if reference.contains('/') || reference.ends_with(".ext4") {
            return checked_file("image", Path::new(reference));
        }
        let store = self.images();
        if let Some(image) = store.find(reference)? {
            return Ok(image.path);
        }
        if reference == crate::image::DEFAULT_IMAGE {
            let (image, _) = store.build(&crate::image::ImageSpec::default(), progress)?;
            return Ok(image.path);
        }
        Err(Error::UnknownImage {
            reference: reference.into(),
            dir: store.dir().to_path_buf(),
        })
    }

    fn initrd(&self, given: Option<&Path>) -> Result<Option<PathBuf>> {
        if let Some(p) = given {
            return checked_file("initrd", p).map(Some);
        }
        if let Some(p) = std::env::var_os(INITRD_ENV).filter(|v| !v.is_empty()) {
            return checked_file(INITRD_ENV, Path::new(&p)).map(Some);
        }
        let default = self.root.join(GUEST_DIR).join("initramfs.cpio");
        Ok(default.is_file().then_some(default))
    }
}

/// `key = value` lines of a flat table: the keys in `order` first, then
/// the others alphabetically.
fn emit(t: &toml::Table, order: &[&str]) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: &toml::Value| {
        let bare = !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        let key = if bare {
            k.to_string()
        } else {
            toml::Value::String(k.into()).to_string()
        };
        out.push_str(&format!("{key} = {v}\n"));
    };
    for k in order {
        if let Some(v) = t.get(*k) {
            line(k, v);
        }
    }
    for (k, v) in t {
        if !order.contains(&k.as_str()) {
            line(k, v);
        }
    }
    out
}

fn path_value(p: &Path) -> toml::Value {
    toml::Value::String(p.to_string_lossy().into_owned())
}

/// The kernel command line of a new VM.
pub fn default_cmdline(name: &str) -> String {
    format!("console=ttyS0 reboot=k panic=-1 rdinit=/sbin/mvm-agent mvm.hostname={name}")
}

/// `cmdline` with `mvm.hostname=<name>` (replacing any other value).
pub(super) fn with_hostname(cmdline: &str, name: &str) -> String {
    let mut words: Vec<String> = cmdline
        .split_whitespace()
        .filter(|w| !w.starts_with("mvm.hostname="))
        .map(str::to_string)
        .collect();
    words.push(format!("mvm.hostname={name}"));
    words.join(" ")
}

fn checked_file(what: &str, p: &Path) -> Result<PathBuf> {
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() => std::path::absolute(p).map_err(Error::io(format!("{what} {}", p.display()))),
        Ok(_) => Err(Error::Usage(format!("{what} {}: not a regular file", p.display()))),
        Err(e) => Err(Error::Usage(format!("{what} {}: {e}", p.display()))),
    }
}

/// Parse and check a definition written to `file` (in a temporary
/// directory) as it will be once its directory is renamed to `dir`.
pub(super) fn check_definition(file: &Path, dir: &Path) -> Result<()> {
    let mut config = VmConfig::from_file(file).map_err(Error::Invalid)?;
    if let Some(v) = &mut config.vsock {
        let real = dir.join(VSOCK_SOCK);
        if real.as_os_str().len() > microvm_dev::config::MAX_UDS_PATH {
            return Err(Error::Usage(format!(
                "the VM's socket path {} would be longer than {} bytes (a Unix socket limit); use a shorter state directory or VM name",
                real.display(),
                microvm_dev::config::MAX_UDS_PATH
            )));
        }
        // The temporary directory's longer name must not trip the length
        // check above; the directory check still sees a real directory.
        v.uds_path = file.with_file_name("v");
    }
    config.validate(254).map_err(Error::Invalid)
}
