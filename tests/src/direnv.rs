//! Real direnv (Debian's `direnv`) driven from tests, against the `mvm`
//! of a test ([`Mvm`]): HOME and the XDG directories are scratch ones
//! (direnv's library directory and allow database), the test's `mvm` is
//! first on PATH so `use mvm` calls it, and commands run in the `mvm`'s
//! network namespace when it has one.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::mvm_cli::{describe, Mvm};

pub struct Direnv {
    pub direnv: PathBuf,
    pub home: PathBuf,
    path: OsString,
    env: Vec<(&'static str, PathBuf)>,
    netns: Option<String>,
}

impl Direnv {
    /// For `mvm`, with `extra_path` (e.g. a directory of links such as
    /// `create-microvm-env`) before `mvm`'s own directory on PATH.
    pub fn new(mvm: &Mvm, scratch: &Path, extra_path: &[&Path]) -> Direnv {
        let home = scratch.join("home");
        std::fs::create_dir_all(&home).expect("create the scratch HOME");
        let mut dirs: Vec<PathBuf> = extra_path.iter().map(|p| p.to_path_buf()).collect();
        dirs.extend(mvm.bin.parent().map(Path::to_path_buf));
        dirs.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
        Direnv {
            direnv: crate::system_tool("direnv", "direnv"),
            path: std::env::join_paths(dirs).expect("PATH"),
            env: mvm.env(),
            netns: mvm.netns.clone(),
            home,
        }
    }

    /// `program args` in `cwd` with this environment (and namespace).
    pub fn command(&self, program: &Path, args: &[&str], cwd: &Path) -> Command {
        let mut c = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
            None => Command::new(program),
        };
        c.args(args)
            .current_dir(cwd)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("HOME", &self.home)
            .env("XDG_CONFIG_HOME", self.home.join(".config"))
            .env("XDG_DATA_HOME", self.home.join(".local/share"))
            .env("XDG_CACHE_HOME", self.home.join(".cache"))
            .env("PATH", &self.path)
            .stdin(Stdio::null());
        // A test run from a direnv-managed shell must not look loaded.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("DIRENV_") {
                c.env_remove(k);
            }
        }
        c
    }

    /// Run it and require success.
    pub fn run(&self, program: &Path, args: &[&str], cwd: &Path) -> Output {
        let out = self.command(program, args, cwd).output().expect("run");
        assert!(
            out.status.success(),
            "{} {args:?}: {}",
            program.display(),
            describe(&out)
        );
        out
    }

    /// `direnv ARGS` in `cwd`, required to succeed.
    pub fn direnv(&self, args: &[&str], cwd: &Path) -> Output {
        self.run(&self.direnv, args, cwd)
    }
}
