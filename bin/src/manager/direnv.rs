//! direnv integration: an `.envrc` that says `use mvm`, the library that
//! defines `use_mvm` and `mvm_run` (installed where direnv loads
//! libraries), the per-project shims `mvm_run` makes, and finding (or
//! creating) a project's VM.
//!
//! The library is a thin shell layer: `use mvm` evaluates what
//! `mvm direnv hook` prints ([`Manager::direnv_hook`]), and `mvm_run`
//! calls `mvm direnv shim` ([`write_shims`]).

use std::ffi::OsStr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::env::{export_lines, shell_quote};
use super::{
    check_project, validate_name, CreateOptions, Manager, VmInfo, VmState, GUEST_DIR, IMAGES_DIR, MAX_NAME_LEN, VM_TOML,
};
use crate::{Error, Result};

/// The library's file name in direnv's `lib` directory.
pub const LIB_FILE: &str = "mvm.sh";
/// The second line of every shim: only such files are ever replaced or
/// removed.
pub const SHIM_MARK: &str = "# mvm_run shim";
/// Where, under direnv's layout directory (`.direnv`), shims live.
pub const SHIM_DIR: &str = "mvm/bin";
/// The background start's output, under the layout directory.
pub const START_LOG: &str = "mvm/start.log";

/// direnv's library directory: `$DIRENV_CONFIG/lib`, else
/// `${XDG_CONFIG_HOME:-$HOME/.config}/direnv/lib` (as direnv finds it).
pub fn lib_dir() -> Result<PathBuf> {
    let var = |n: &str| std::env::var_os(n).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = var("DIRENV_CONFIG") {
        return Ok(d.join("lib"));
    }
    let config = match (var("XDG_CONFIG_HOME"), var("HOME")) {
        (Some(x), _) => x,
        (None, Some(home)) => home.join(".config"),
        (None, None) => {
            return Err(Error::Usage(
                "neither XDG_CONFIG_HOME nor HOME is set: cannot tell where direnv's library directory is".into(),
            ))
        }
    };
    Ok(config.join("direnv/lib"))
}

/// The text of the library (`use_mvm`, `mvm_run`); `mvm` is the program
/// used when none is on PATH.
pub fn library(mvm: &Path) -> String {
    LIBRARY.replace("@MVM@", &shell_quote(&mvm.to_string_lossy()))
}

const LIBRARY: &str = r#"# shellcheck shell=bash
# direnv library of mvm (microvm-dev): `use mvm [VM]` and `mvm_run CMD...`.
# Written by `mvm direnv init`, which rewrites it; `mvm direnv lib` prints it.

__mvm_program() {
  if command -v mvm >/dev/null 2>&1; then echo mvm; else echo @MVM@; fi
}

# Usage: use mvm [VM]
#
# Finds the VM whose project is this directory (or VM), creating one if
# there is none; starts it in the background if it is stopped; exports
# MVM_VM, MVM_PROJECT and the VM's host-side variables (`mvm env`).
use_mvm() {
  local mvm out
  mvm=$(__mvm_program)
  if ! out=$("$mvm" direnv hook --layout-dir "$(direnv_layout_dir)" ${1:+--name "$1"} -- "$PWD"); then
    log_error "mvm: the project's VM is not available (see above)"
    return 1
  fi
  eval "$out"
}

# Usage: mvm_run CMD...
#
# Puts shims for CMD... on PATH: each runs the command in the VM, in the
# project subdirectory matching the current one.
mvm_run() {
  if [[ -z ${MVM_VM:-} ]]; then
    log_error "mvm_run: put \`use mvm\` before it in .envrc"
    return 1
  fi
  local mvm dir
  mvm=$(__mvm_program)
  dir="$(direnv_layout_dir)/mvm/bin"
  "$mvm" direnv shim --dir "$dir" ${MVM_PROJECT:+--project "$MVM_PROJECT"} "$MVM_VM" -- "$@" || return 1
  PATH_add "$dir"
}
"#;

/// Write the library to [`lib_dir`]/[`LIB_FILE`] (creating the
/// directory); its path.
pub fn install_library(mvm: &Path) -> Result<PathBuf> {
    let dir = lib_dir()?;
    std::fs::create_dir_all(&dir).map_err(Error::io(format!("cannot create {}", dir.display())))?;
    let path = dir.join(LIB_FILE);
    write_atomic(&path, library(mvm).as_bytes(), 0o644)?;
    Ok(path)
}

/// An `.envrc` that uses the VM (`name`, or the project's) and puts shims
/// for `run` on PATH.
pub fn envrc(name: Option<&str>, run: &[String]) -> String {
    let mut s = String::from("# The project's microvm-dev VM (mvm direnv init); see `mvm direnv --help`.\n");
    s.push_str(&match name {
        Some(n) => format!("use mvm {n}\n"),
        None => "use mvm\n".into(),
    });
    if !run.is_empty() {
        let words: Vec<String> = run.iter().map(|c| shell_word(c)).collect();
        s.push_str(&format!("mvm_run {}\n", words.join(" ")));
    }
    s
}

/// `s` bare when that is safe, else quoted.
fn shell_word(s: &str) -> String {
    let bare = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.+@%:,=".contains(&b));
    if bare {
        s.to_string()
    } else {
        shell_quote(s)
    }
}

/// A command `mvm_run` may make a shim for: a file name.
fn check_command(cmd: &str) -> Result<()> {
    if cmd.is_empty() || cmd == "." || cmd == ".." || cmd.contains('/') || cmd.contains('\0') || cmd.starts_with('-') {
        return Err(Error::Usage(format!(
            "mvm_run {cmd:?}: expected a command name (no '/', not starting with '-')"
        )));
    }
    Ok(())
}

/// What `mvm direnv init` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitReport {
    pub envrc: PathBuf,
    /// False when the file already said exactly this.
    pub envrc_written: bool,
}

/// Write `dir/.envrc` (see [`envrc`]). An existing different file is
/// replaced only with `force`.
pub fn write_envrc(dir: &Path, name: Option<&str>, run: &[String], force: bool) -> Result<InitReport> {
    if let Some(n) = name {
        validate_name(n)?;
    }
    for c in run {
        check_command(c)?;
    }
    let dir = check_project(dir)?;
    let path = dir.join(".envrc");
    let text = envrc(name, run);
    match std::fs::read_to_string(&path) {
        Ok(old) if old == text => {
            return Ok(InitReport {
                envrc: path,
                envrc_written: false,
            })
        }
        Ok(_) if !force => {
            return Err(Error::Usage(format!(
                "{} exists; add `use mvm` to it yourself, or pass --force to replace it",
                path.display()
            )))
        }
        _ => {}
    }
    write_atomic(&path, text.as_bytes(), 0o644)?;
    Ok(InitReport {
        envrc: path,
        envrc_written: true,
    })
}

/// A shim's text: run `cmd` in `vm` (of state root `root`) with `mvm`, in
/// the project subdirectory matching the caller's directory under
/// `project` (without one: in the session's default directory); a
/// terminal gets a PTY, standard input is forwarded.
pub fn shim(mvm: &Path, root: &Path, vm: &str, project: Option<&Path>, cmd: &str) -> String {
    let q = |p: &Path| shell_quote(&p.to_string_lossy());
    let (locate, workdir) = match project {
        Some(p) => (
            format!(
                r#"root={}
here=$(pwd -P)
case "$here/" in
"$root"/*) sub=${{here#"$root"}}; sub=${{sub#/}}; [ -n "$sub" ] || sub=. ;;
*) sub=. ;;
esac
"#,
                q(p)
            ),
            r#" -w "$sub""#,
        ),
        None => (String::new(), ""),
    };
    format!(
        r#"#!/bin/sh
{SHIM_MARK}: `{cmd}` in VM {vm} (from direnv's `mvm_run`; rewritten at each load)
{locate}flags=
if [ -t 0 ]; then
	flags=-i
	if [ -t 1 ]; then flags="-i -t"; fi
fi
# shellcheck disable=SC2086
exec {mvm} --state-dir {root} exec $flags{workdir} {vmq} -- {cmdq} "$@"
"#,
        mvm = q(mvm),
        root = q(root),
        vmq = shell_quote(vm),
        cmdq = shell_quote(cmd),
    )
}

/// Write shims for `cmds` into `dir` (see [`shim`]); their paths.
pub fn write_shims(
    mvm: &Path,
    root: &Path,
    vm: &str,
    project: Option<&Path>,
    dir: &Path,
    cmds: &[String],
) -> Result<Vec<PathBuf>> {
    validate_name(vm)?;
    for c in cmds {
        check_command(c)?;
    }
    std::fs::create_dir_all(dir).map_err(Error::io(format!("cannot create {}", dir.display())))?;
    let mut out = Vec::new();
    for c in cmds {
        let path = dir.join(c);
        if path.exists() && !is_shim(&path) {
            return Err(Error::Usage(format!(
                "{} exists and is not an mvm_run shim; remove it first",
                path.display()
            )));
        }
        write_atomic(&path, shim(mvm, root, vm, project, c).as_bytes(), 0o755)?;
        out.push(path);
    }
    Ok(out)
}

fn is_shim(path: &Path) -> bool {
    std::fs::read_to_string(path).is_ok_and(|t| t.lines().nth(1).is_some_and(|l| l.starts_with(SHIM_MARK)))
}

/// Remove the shims in `dir` (files marked [`SHIM_MARK`]; others stay).
pub fn clear_shims(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_file() && is_shim(&p) {
            let _ = std::fs::remove_file(&p);
        }
    }
}

/// Write a file whole or not at all (readers never see half of it).
fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    mvm_net::host::replace_file(path, data, mode).map_err(Error::io(format!("cannot write {}", path.display())))
}

/// A VM name from a directory's name: lowercase, other characters as
/// '-', at most `max` bytes; "project" when nothing is left.
pub fn name_from_dir(dir: &Path, max: usize) -> String {
    let base = dir
        .file_name()
        .map_or(String::new(), |n| n.to_string_lossy().to_lowercase());
    let mut name = String::new();
    for c in base.chars() {
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        if !(c == '-' && (name.is_empty() || name.ends_with('-'))) {
            name.push(c);
        }
    }
    name.truncate(max);
    let name = name.trim_end_matches('-').to_string();
    if name.is_empty() {
        "project".into()
    } else {
        name
    }
}

/// What `use mvm` found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    pub vm: String,
    pub action: HookAction,
    /// Variables to export (see [`Manager::env_exports`]).
    pub exports: Vec<(String, String)>,
    /// Files whose change should make direnv load again (the definition:
    /// a VM being created appears, an edit of `[env]`).
    pub watch: Vec<PathBuf>,
    /// The background start's log, when one was started.
    pub log: Option<PathBuf>,
}

/// What the VM needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookAction {
    /// It runs.
    None,
    /// It was stopped: it is starting in the background.
    Starting,
    /// There was none: it is being created and started in the background.
    Creating,
}

impl Hook {
    /// Shell code for `use_mvm` to evaluate in direnv's bash.
    pub fn script(&self) -> String {
        let mut s = export_lines(&self.exports);
        if !self.watch.is_empty() {
            let files: Vec<String> = self.watch.iter().map(|p| shell_quote(&p.to_string_lossy())).collect();
            s.push_str(&format!("watch_file {}\n", files.join(" ")));
        }
        let log = self
            .log
            .as_ref()
            .map_or(String::new(), |l| format!(" (log: {})", l.display()));
        let status = match self.action {
            HookAction::None => return s,
            HookAction::Starting => format!("mvm: {} is starting{log}", self.vm),
            HookAction::Creating => format!(
                "mvm: creating VM {} for this project; it starts when ready{log}",
                self.vm
            ),
        };
        s.push_str(&format!("log_status {}\n", shell_quote(&status)));
        s
    }
}

impl Manager {
    /// The VMs whose project share is `dir` (compared after resolving
    /// symbolic links): running ones first, then by name.
    pub fn vms_for_project(&self, dir: &Path) -> Result<Vec<VmInfo>> {
        let dir = check_project(dir)?;
        let mut vms: Vec<VmInfo> = self
            .list()?
            .into_iter()
            .filter(|v| v.project.as_deref() == Some(dir.as_path()))
            .collect();
        // Stable: name order within each group.
        vms.sort_by_key(|v| v.state != VmState::Running);
        Ok(vms)
    }

    /// A name for a new VM of project `dir`: the directory's name made a
    /// VM name, with "-2", "-3", ... when that is taken.
    pub fn name_for_project(&self, dir: &Path) -> Result<String> {
        let dir = check_project(dir)?;
        let base = name_from_dir(&dir, MAX_NAME_LEN - 3);
        let reserved = |n: &str| n == GUEST_DIR || n == IMAGES_DIR || n == mvm_net::host::network::NETWORKS_DIR;
        for i in 1..100 {
            let name = if i == 1 { base.clone() } else { format!("{base}-{i}") };
            if !reserved(&name) && std::fs::symlink_metadata(self.vm_dir(&name)).is_err() {
                return Ok(name);
            }
        }
        Err(Error::Usage(format!(
            "no free VM name for {}: pass one with --name",
            dir.display()
        )))
    }

    /// What `use mvm` does in project `dir`: find VM `name` or the
    /// project's ([`Manager::vms_for_project`]); with none, create one
    /// named after the directory. A stopped VM is started (and a new one
    /// created) by a detached `mvm direnv up` (`mvm` is that program), its
    /// output in `layout_dir`/[`START_LOG`], so the prompt never waits
    /// for a boot. Stale shims in `layout_dir`/[`SHIM_DIR`] are removed
    /// (`mvm_run` writes the current ones).
    pub fn direnv_hook(&self, dir: &Path, name: Option<&str>, layout_dir: &Path, mvm: &Path) -> Result<Hook> {
        let project = check_project(dir)?;
        let found = match name {
            Some(n) => {
                validate_name(n)?;
                self.existing(n).ok().map(|_| self.status(n)).transpose()?
            }
            None => self.vms_for_project(&project)?.into_iter().next(),
        };
        clear_shims(&layout_dir.join(SHIM_DIR));
        let (vm, action, exports) = match found {
            Some(info) => {
                let action = match info.state {
                    VmState::Running => HookAction::None,
                    _ => HookAction::Starting,
                };
                (info.name.clone(), action, self.env_exports(&info.name)?)
            }
            None => {
                let vm = match name {
                    Some(n) => n.to_string(),
                    None => self.name_for_project(&project)?,
                };
                let exports = vec![
                    ("MVM_VM".to_string(), vm.clone()),
                    ("MVM_PROJECT".to_string(), project.to_string_lossy().into_owned()),
                ];
                (vm, HookAction::Creating, exports)
            }
        };
        let mut log = None;
        if action != HookAction::None {
            let path = layout_dir.join(START_LOG);
            let mut args: Vec<&OsStr> = vec![OsStr::new("--state-dir"), self.root.as_os_str()];
            args.extend([OsStr::new("direnv"), OsStr::new("up"), OsStr::new(&vm)]);
            if action == HookAction::Creating {
                args.extend([OsStr::new("--project"), project.as_os_str()]);
            }
            spawn_detached(mvm, &args, &path)?;
            log = Some(path);
        }
        let vm_dir = self.vm_dir(&vm);
        Ok(Hook {
            // Not the pid file: a start that keeps failing would be retried
            // at every prompt.
            watch: vec![vm_dir.join(VM_TOML)],
            vm,
            action,
            exports,
            log,
        })
    }

    /// `mvm direnv up`: create VM `name` for `project` if it does not
    /// exist (as `mvm create NAME --project DIR` would), then start it.
    pub fn direnv_up(&self, name: &str, project: Option<&Path>) -> Result<super::StartOutcome> {
        if self.existing(name).is_err() {
            let Some(project) = project else {
                return Err(Error::UnknownVm {
                    name: name.into(),
                    root: self.root.clone(),
                });
            };
            let mut opts = CreateOptions {
                name: name.into(),
                project: Some(project.to_path_buf()),
                ..Default::default()
            };
            // Like `mvm create`: the project's devenv.nix gives services
            // and variables; what it leaves out goes to the start log.
            if let Some(plan) = opts.apply_devenv()? {
                for note in &plan.notes {
                    eprintln!("devenv: {note}");
                }
            }
            match self.create(&opts) {
                Ok(_) | Err(Error::AlreadyExists { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        self.start(name, &mut super::StartOptions::default())
    }
}

/// Run `program args` detached: its own session, standard input from
/// /dev/null, output appended to `log`, and no other descriptor of ours
/// (direnv waits until every copy of its pipe is closed).
pub fn spawn_detached(program: &Path, args: &[&OsStr], log: &Path) -> Result<u32> {
    if let Some(parent) = log.parent() {
        std::fs::create_dir_all(parent).map_err(Error::io(format!("cannot create {}", parent.display())))?;
    }
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(Error::io(format!("cannot open {}", log.display())))?;
    let err = out.try_clone().map_err(Error::io("cloning the log file"))?;
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: setsid, syscall and fcntl are async-signal-safe; nothing is
    // allocated.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            // Close-on-exec rather than close: std's exec-error pipe must
            // stay open until the exec.
            const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
            if libc::syscall(
                libc::SYS_close_range,
                3 as libc::c_uint,
                libc::c_uint::MAX,
                CLOSE_RANGE_CLOEXEC,
            ) != 0
            {
                for fd in 3..4096 {
                    libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                }
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(Error::io(format!("cannot run {}", program.display())))?;
    // Not waited for: this process ends soon and init reaps it.
    Ok(child.id())
}

/// The `mvm` program for detached starts and shims: this program when it
/// is `mvm`, else `mvm` next to it, else from PATH.
pub fn mvm_program() -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        if exe.file_name() == Some(OsStr::new("mvm")) {
            return exe;
        }
        if let Some(p) = exe.parent().map(|d| d.join("mvm")).filter(|p| p.is_file()) {
            return p;
        }
    }
    PathBuf::from("mvm")
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mvm-direnv-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn names_from_directories() {
        let n = |d: &str| name_from_dir(Path::new(d), 29);
        assert_eq!(n("/home/me/My_App.v2"), "my-app-v2");
        assert_eq!(n("/x/--web--"), "web");
        assert_eq!(n("/x/Émile"), "mile");
        assert_eq!(n("/"), "project");
        assert_eq!(n("/x/___"), "project");
        assert_eq!(n(&format!("/x/{}", "a".repeat(40))).len(), 29);
        assert_eq!(name_from_dir(Path::new("/x/abc-def"), 4), "abc");
        for d in ["/a/b c", "/a/0x", "/a/Z"] {
            validate_name(&n(d)).unwrap();
        }
    }

    #[test]
    fn envrc_text() {
        assert_eq!(envrc(None, &[]).lines().nth(1), Some("use mvm"));
        let t = envrc(Some("web"), &["make".into(), "cargo".into(), "a b".into()]);
        assert!(t.ends_with("use mvm web\nmvm_run make cargo 'a b'\n"), "{t}");
    }

    #[test]
    fn write_envrc_refuses_to_clobber() {
        let d = scratch("envrc");
        let r = write_envrc(&d, None, &["make".into()], false).unwrap();
        assert!(r.envrc_written);
        assert!(!write_envrc(&d, None, &["make".into()], false).unwrap().envrc_written);
        let e = write_envrc(&d, Some("web"), &[], false).unwrap_err();
        assert!(e.to_string().contains("--force"), "{e}");
        assert!(write_envrc(&d, Some("web"), &[], true).unwrap().envrc_written);
        assert!(write_envrc(&d, None, &["a/b".into()], true).is_err());
        assert!(write_envrc(&d, Some("Bad"), &[], true).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn shims_run_the_command_in_the_matching_subdirectory() {
        let d = scratch("shim");
        let project = d.join("it's proj");
        std::fs::create_dir_all(project.join("sub/deeper")).unwrap();
        let project = std::fs::canonicalize(&project).unwrap();
        // A stand-in mvm that prints its arguments.
        let fake = d.join("fake-mvm");
        std::fs::write(&fake, "#!/bin/sh\nfor a; do printf '[%s]' \"$a\"; done\n").unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let bin = d.join(".direnv").join(SHIM_DIR);
        let made = write_shims(
            &fake,
            Path::new("/state"),
            "web",
            Some(&project),
            &bin,
            &["make".into()],
        )
        .unwrap();
        assert_eq!(made, [bin.join("make")]);
        let run = |cwd: &Path| {
            let out = Command::new(bin.join("make"))
                .args(["-j", "it's"])
                .current_dir(cwd)
                .stdin(Stdio::null())
                .output()
                .unwrap();
            String::from_utf8(out.stdout).unwrap()
        };
        assert_eq!(
            run(&project.join("sub/deeper")),
            "[--state-dir][/state][exec][-w][sub/deeper][web][--][make][-j][it's]"
        );
        assert!(run(&project).contains("[-w][.][web]"));
        assert!(run(&d).contains("[-w][.][web]"), "outside the project");
        // Stale shims go, other files stay.
        std::fs::write(bin.join("mine"), "#!/bin/sh\n").unwrap();
        clear_shims(&bin);
        assert!(!bin.join("make").exists() && bin.join("mine").exists());
        let e = write_shims(&fake, Path::new("/s"), "web", Some(&project), &bin, &["mine".into()]).unwrap_err();
        assert!(e.to_string().contains("not an mvm_run shim"), "{e}");
        assert!(write_shims(&fake, Path::new("/s"), "web", None, &bin, &["../x".into()]).is_err());
        // Without a project: no -w.
        write_shims(&fake, Path::new("/s"), "web", None, &bin, &["ls".into()]).unwrap();
        let out = Command::new(bin.join("ls"))
            .arg("-l")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            "[--state-dir][/s][exec][web][--][ls][-l]"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn hook_script() {
        let h = Hook {
            vm: "web".into(),
            action: HookAction::Starting,
            exports: vec![("MVM_VM".into(), "web".into()), ("MVM_PROJECT".into(), "/p q".into())],
            watch: vec![PathBuf::from("/s/web/vm.toml")],
            log: None,
        };
        assert_eq!(
            h.script(),
            "export MVM_VM='web'\nexport MVM_PROJECT='/p q'\nwatch_file '/s/web/vm.toml'\nlog_status 'mvm: web is starting'\n"
        );
        let quiet = Hook {
            action: HookAction::None,
            ..h
        };
        assert!(!quiet.script().contains("log_status"));
    }

    #[test]
    fn library_uses_the_given_program() {
        let lib = library(Path::new("/opt/it's/mvm"));
        assert!(lib.contains("else echo '/opt/it'\\''s/mvm'; fi"), "{lib}");
        assert!(lib.contains("use_mvm() {") && lib.contains("mvm_run() {"));
        let out = Command::new("bash").arg("-n").arg("-c").arg(&lib).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
}
