//! Environments: what `mvm shell`/`exec` sessions get (`[env]` of the
//! definition, host variables it passes through, `-e`), and the host-side
//! variables `mvm env` and direnv export.
//!
//! Passed-through values are read from this process's environment when a
//! session starts; they are never written to the definition, logs or debug
//! output ([`SessionSettings`]'s `Debug` hides every value).

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use microvm_dev::config::{is_env_name, EnvConfig};

use super::{Manager, PROJECT_MOUNT, PROJECT_TAG};
use crate::{Error, Result};

/// `mvm exec -e`: `NAME=VALUE`, or `NAME` alone to take the value from
/// this process's environment (skipped when it is not set there).
#[derive(Clone, PartialEq, Eq)]
pub struct EnvArg {
    pub name: String,
    pub value: Option<OsString>,
}

impl std::fmt::Debug for EnvArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "EnvArg({}{})",
            self.name,
            if self.value.is_some() { "=…" } else { "" }
        )
    }
}

impl EnvArg {
    /// Parse `NAME=VALUE` or `NAME` (the value may be any bytes but NUL).
    pub fn parse(arg: &OsStr) -> Result<EnvArg> {
        let bytes = arg.as_bytes();
        let (name, value) = match bytes.iter().position(|&b| b == b'=') {
            Some(i) => (&bytes[..i], Some(OsString::from_vec(bytes[i + 1..].to_vec()))),
            None => (bytes, None),
        };
        let name = String::from_utf8_lossy(name).into_owned();
        if !is_env_name(&name) {
            return Err(Error::Usage(format!(
                "-e {name:?}: expected NAME=VALUE or NAME, where NAME is a letter or '_', then letters, digits and '_'"
            )));
        }
        Ok(EnvArg { name, value })
    }
}

/// What a session gets on top of the agent's defaults, in this order (a
/// later entry replaces an earlier one of the same name): `[env].set`,
/// the `host` variables `[env].passthrough` matches, then `args`.
pub fn session_env<I>(config: &EnvConfig, host: I, args: &[EnvArg]) -> Vec<(Vec<u8>, Vec<u8>)>
where
    I: IntoIterator<Item = (OsString, OsString)>,
{
    let host: Vec<(OsString, OsString)> = host.into_iter().collect();
    let mut env: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut put = |name: &[u8], value: &[u8]| match env.iter_mut().find(|(n, _)| n == name) {
        Some(slot) => slot.1 = value.to_vec(),
        None => env.push((name.to_vec(), value.to_vec())),
    };
    for (name, value) in &config.set {
        put(name.as_bytes(), value.as_bytes());
    }
    let mut passed: Vec<&(OsString, OsString)> = host
        .iter()
        .filter(|(n, _)| n.to_str().is_some_and(|n| config.passes(n)))
        .collect();
    // Host environments come in any order: sessions see a stable one.
    passed.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, value) in passed {
        put(name.as_bytes(), value.as_bytes());
    }
    for arg in args {
        let value = match &arg.value {
            Some(v) => Some(v.as_os_str()),
            None => host
                .iter()
                .find(|(n, _)| n == arg.name.as_str())
                .map(|(_, v)| v.as_os_str()),
        };
        if let Some(v) = value {
            put(arg.name.as_bytes(), v.as_bytes());
        }
    }
    env
}

/// The guest working directory for `-w dir`: relative paths are relative
/// to `project_mount` (the VM's project share).
pub fn guest_workdir(dir: &Path, project_mount: Option<&str>) -> Result<Vec<u8>> {
    if dir.as_os_str().is_empty() {
        return Err(Error::Usage("-w: the directory is empty".into()));
    }
    if dir.is_absolute() {
        return Ok(dir.as_os_str().as_bytes().to_vec());
    }
    let Some(mount) = project_mount else {
        return Err(Error::Usage(format!(
            "-w {}: a relative directory is relative to the project, and this VM has none; give an absolute guest path",
            dir.display()
        )));
    };
    let mut path = std::path::PathBuf::from(mount);
    for c in dir.components() {
        match c {
            std::path::Component::CurDir => {}
            c => path.push(c),
        }
    }
    Ok(path.into_os_string().into_vec())
}

/// Environment and working directory for one session.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SessionSettings {
    /// For [`crate::agent::ExecRequest::env`].
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
    /// For [`crate::agent::ExecRequest::cwd`]; `None`: the agent's default
    /// (the project, else the user's home).
    pub cwd: Option<Vec<u8>>,
}

/// Names only: values may be secrets.
impl std::fmt::Debug for SessionSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.env.iter().map(|(n, _)| String::from_utf8_lossy(n)).collect();
        f.debug_struct("SessionSettings")
            .field("env", &names)
            .field("cwd", &self.cwd.as_deref().map(String::from_utf8_lossy))
            .finish()
    }
}

impl Manager {
    /// The environment and working directory of a session in VM `name`:
    /// its `[env]`, this process's variables that `[env].passthrough`
    /// matches (read now, never stored), then `args`; `workdir` relative
    /// to the project mount.
    pub fn session_settings(&self, name: &str, args: &[EnvArg], workdir: Option<&Path>) -> Result<SessionSettings> {
        let config = self.vm_config(name)?;
        let env = session_env(&config.env, std::env::vars_os(), args);
        let cwd = match workdir {
            None => None,
            Some(dir) => Some(guest_workdir(dir, project_mount(&config))?),
        };
        Ok(SessionSettings { env, cwd })
    }

    /// Host-side variables for VM `name` beyond `MVM_VM` and
    /// `MVM_PROJECT` (which [`Manager::env_exports`] adds).
    ///
    /// Extension point: services the VM runs add their connection
    /// variables (`DATABASE_URL`, `REDIS_URL`, ...) here, from the
    /// definition and the VM's forwards. `mvm env` and direnv's `use mvm`
    /// export whatever this returns.
    pub fn host_env(&self, name: &str) -> Result<Vec<(String, String)>> {
        let config = self.vm_config(name)?;
        let vm_user = super::user::from_cmdline(&config.boot.cmdline).map(|u| u.name);
        let mut reached = Vec::new();
        for s in &config.services {
            let Some(f) = config
                .forwards
                .iter()
                .find(|f| f.guest_port == s.port && f.protocol == mvm_net::forward::Protocol::Tcp)
            else {
                continue;
            };
            // A forward on every address is reached on loopback too.
            let host = if f.host_address.is_unspecified() {
                "127.0.0.1".to_string()
            } else {
                f.host_address.to_string()
            };
            let user = super::services::service_user(s, vm_user.as_deref());
            reached.push((s.clone(), host, f.host_port, user));
        }
        Ok(super::devenv_plan::connection_env(&reached))
    }

    /// Everything `mvm env` prints: `MVM_VM`, `MVM_PROJECT` (when the VM
    /// has a project) and [`Manager::host_env`].
    pub fn env_exports(&self, name: &str) -> Result<Vec<(String, String)>> {
        let info = self.status(name)?;
        let mut vars = vec![("MVM_VM".to_string(), info.name.clone())];
        if let Some(p) = &info.project {
            vars.push(("MVM_PROJECT".into(), p.to_string_lossy().into_owned()));
        }
        vars.extend(self.host_env(name)?);
        Ok(vars)
    }
}

/// Where the guest mounts the VM's project, if it has one.
pub(super) fn project_mount(config: &microvm_dev::VmConfig) -> Option<&str> {
    config
        .shares
        .iter()
        .find(|s| s.tag == PROJECT_TAG)
        .map(|s| s.mount.as_deref().unwrap_or(PROJECT_MOUNT))
}

/// `s` as one POSIX shell word: single-quoted, `'` written as `'\''`.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `export NAME='value'` lines.
pub fn export_lines(vars: &[(String, String)]) -> String {
    vars.iter()
        .map(|(n, v)| format!("export {n}={}\n", shell_quote(v)))
        .collect()
}

/// The `[env]` table `mvm create --env/--pass-env` adds to a definition
/// (merged into `table`, a base file's `[env]` or empty); names and
/// patterns are checked by the VMM's parser afterwards.
pub(super) fn env_table(mut table: toml::Table, set: &[(String, String)], pass: &[String]) -> toml::Table {
    use toml::Value;
    if !set.is_empty() {
        let mut t = match table.remove("set") {
            Some(Value::Table(t)) => t,
            _ => toml::Table::new(),
        };
        for (n, v) in set {
            t.insert(n.clone(), Value::String(v.clone()));
        }
        table.insert("set".into(), Value::Table(t));
    }
    if !pass.is_empty() {
        let mut list = match table.remove("passthrough") {
            Some(Value::Array(a)) => a,
            _ => Vec::new(),
        };
        for p in pass {
            if !list.iter().any(|v| v.as_str() == Some(p)) {
                list.push(Value::String(p.clone()));
            }
        }
        table.insert("passthrough".into(), Value::Array(list));
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs.iter().map(|(n, v)| (n.into(), v.into())).collect()
    }

    fn text(env: &[(Vec<u8>, Vec<u8>)]) -> Vec<(String, String)> {
        env.iter()
            .map(|(n, v)| (String::from_utf8_lossy(n).into(), String::from_utf8_lossy(v).into()))
            .collect()
    }

    fn arg(s: &str) -> EnvArg {
        EnvArg::parse(OsStr::new(s)).unwrap()
    }

    #[test]
    fn env_args() {
        assert_eq!(
            arg("A=b=c"),
            EnvArg {
                name: "A".into(),
                value: Some("b=c".into())
            }
        );
        assert_eq!(arg("A=").value, Some(OsString::new()));
        assert_eq!(arg("A").value, None);
        for bad in ["", "=x", "1A=x", "A B=x", "A-B"] {
            assert!(EnvArg::parse(OsStr::new(bad)).is_err(), "{bad:?}");
        }
        assert!(!format!("{:?}", arg("TOKEN=s3cret")).contains("s3cret"));
    }

    #[test]
    fn merge_order_set_then_host_then_args() {
        let config = EnvConfig {
            set: [("A", "set"), ("B", "set"), ("C", "set"), ("KEEP", "k")]
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            passthrough: vec!["B".into(), "C".into(), "GH_*".into()],
        };
        let host = os(&[
            ("GH_TOKEN", "t"),
            ("C", "host"),
            ("B", "host"),
            ("HOME", "/root"),
            ("FROMHOST", "fh"),
            ("D", "no"),
        ]);
        let args = [arg("C=arg"), arg("FROMHOST"), arg("UNSET_ON_HOST"), arg("E=")];
        let env = text(&session_env(&config, host, &args));
        let get = |n: &str| env.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(get("A"), Some("set"));
        assert_eq!(get("B"), Some("host"));
        assert_eq!(get("C"), Some("arg"));
        assert_eq!(get("GH_TOKEN"), Some("t"));
        assert_eq!(get("FROMHOST"), Some("fh"));
        assert_eq!(get("E"), Some(""));
        assert_eq!((get("HOME"), get("D"), get("UNSET_ON_HOST")), (None, None, None));
        // One entry per name.
        let mut names: Vec<_> = env.iter().map(|(n, _)| n.clone()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), env.len());
        assert!(!format!(
            "{:?}",
            SessionSettings {
                env: session_env(&config, os(&[("GH_TOKEN", "s3cret")]), &[]),
                cwd: None
            }
        )
        .contains("s3cret"));
    }

    #[test]
    fn workdirs() {
        let w = |d: &str, m: Option<&str>| guest_workdir(Path::new(d), m).map(|v| String::from_utf8(v).unwrap());
        assert_eq!(w("sub", Some("/project")).unwrap(), "/project/sub");
        assert_eq!(w("./a/b", Some("/project")).unwrap(), "/project/a/b");
        assert_eq!(w(".", Some("/project")).unwrap(), "/project");
        assert_eq!(w("/tmp", None).unwrap(), "/tmp");
        assert!(w("sub", None).is_err());
        assert!(w("", Some("/project")).is_err());
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("plain"), "'plain'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("it's $HOME `x` \"q\"\n"), "'it'\\''s $HOME `x` \"q\"\n'");
        assert_eq!(
            export_lines(&[("A".into(), "x y".into()), ("B".into(), "'".into())]),
            "export A='x y'\nexport B=''\\'''\n"
        );
        // What sh makes of it.
        let value = "a'b\"c $d `e` \\f\ng";
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "{}printf %s \"$V\"",
                export_lines(&[("V".into(), value.into())])
            ))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), value);
    }

    #[test]
    fn create_writes_patterns_and_sessions_read_values_at_exec_time() {
        let dir = std::env::temp_dir().join(format!("mvm-env-create-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("proj/sub")).unwrap();
        std::fs::write(dir.join("vmlinux"), b"k").unwrap();
        std::fs::write(dir.join("initrd"), b"i").unwrap();
        let base = dir.join("base.toml");
        std::fs::write(
            &base,
            "version = 1\n[boot]\nkernel = \"vmlinux\"\n[env]\nset = { BASE = \"b\", EDITOR = \"nano\" }\npassthrough = [\"AWS_*\"]\n",
        )
        .unwrap();
        let m = Manager::new(dir.join("state"));
        let opts = super::super::CreateOptions {
            name: "envy".into(),
            project: Some(dir.join("proj")),
            from: Some(base),
            kernel: Some(dir.join("vmlinux")),
            initrd: Some(dir.join("initrd")),
            root: super::super::RootChoice::Initramfs,
            network: super::super::NetworkChoice::None,
            env: vec![("EDITOR".into(), "vim".into()), ("QUOTED".into(), "a \"b\" 'c'".into())],
            // PATH: a variable this test process surely has.
            pass_env: vec!["PATH".into(), "AWS_*".into()],
            ..Default::default()
        };
        m.create(&opts).unwrap();
        let text = std::fs::read_to_string(m.vm_dir("envy").join(super::super::VM_TOML)).unwrap();
        let host_path = std::env::var("PATH").unwrap();
        assert!(
            !text.contains(&host_path),
            "a passed-through value was written:\n{text}"
        );
        let c = microvm_dev::VmConfig::from_file(m.vm_dir("envy").join(super::super::VM_TOML)).unwrap();
        assert_eq!(c.env.passthrough, ["AWS_*", "PATH"]);
        let set: Vec<_> = c.env.set.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(set, [("BASE", "b"), ("EDITOR", "vim"), ("QUOTED", "a \"b\" 'c'")]);

        let s = m
            .session_settings("envy", &[arg("X=1")], Some(Path::new("sub")))
            .unwrap();
        assert_eq!(s.cwd.as_deref(), Some(&b"/project/sub"[..]));
        let env = text_of(&s.env);
        assert!(env.contains(&("PATH".into(), host_path.clone())));
        assert!(env.contains(&("EDITOR".into(), "vim".into())) && env.contains(&("X".into(), "1".into())));
        assert!(!format!("{s:?}").contains(&host_path));
        assert!(m.host_env("envy").unwrap().is_empty());
        let exports = m.env_exports("envy").unwrap();
        assert_eq!(exports[0], ("MVM_VM".into(), "envy".into()));
        assert_eq!(
            exports[1],
            (
                "MVM_PROJECT".into(),
                std::fs::canonicalize(dir.join("proj"))
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            )
        );

        // Bad names are refused by the definition check; nothing is left.
        let bad = super::super::CreateOptions {
            name: "bad".into(),
            env: vec![("1X".into(), "v".into())],
            ..opts.clone()
        };
        let e = m.create(&bad).unwrap_err();
        assert_eq!(e.exit_code(), 2, "{e}");
        assert!(!m.vm_dir("bad").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn text_of(env: &[(Vec<u8>, Vec<u8>)]) -> Vec<(String, String)> {
        text(env)
    }
}
