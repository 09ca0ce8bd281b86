//! The `mvm` command-line tool driven from tests and benchmarks, on a
//! private state root, with the test guest as its default kernel and
//! initramfs and the shared image cache ([`image_cache_dir`]).

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use crate::{guest_file, mvm_vmm, workspace_bin};

/// Where tests keep root file system images between runs (they are keyed
/// by their inputs, so a cached one is the one a build would make):
/// `$MVM_TEST_IMAGE_DIR`, else `${XDG_CACHE_HOME:-~/.cache}/microvm-dev/images`.
pub fn image_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MVM_TEST_IMAGE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache"));
    cache.join("microvm-dev/images")
}

/// The `mvm` CLI on a private state root, optionally run inside a network
/// namespace (`ip netns exec`), where its VMs' networks then live.
pub struct Mvm {
    pub root: PathBuf,
    pub bin: PathBuf,
    pub netns: Option<String>,
}

impl Mvm {
    pub fn new(root: PathBuf) -> Self {
        Mvm {
            root,
            bin: workspace_bin("mvm"),
            netns: None,
        }
    }

    /// The same, every command run in network namespace `ns`.
    pub fn in_netns(root: PathBuf, ns: &str) -> Self {
        Mvm {
            root,
            bin: workspace_bin("mvm"),
            netns: Some(ns.to_string()),
        }
    }

    /// Environment for any process that runs `mvm` against our root.
    pub fn env(&self) -> Vec<(&'static str, PathBuf)> {
        vec![
            ("MVM_STATE_DIR", self.root.clone()),
            ("MVM_KERNEL", guest_file("vmlinux")),
            ("MVM_INITRD", guest_file("initramfs.cpio")),
            ("MVM_VMM", mvm_vmm()),
            ("MVM_IMAGE_DIR", image_cache_dir()),
        ]
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        cmd.args(args).envs(self.env()).stdin(Stdio::null());
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run mvm")
    }

    pub fn run_with_input(&self, args: &[&str], input: &[u8]) -> Output {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mvm");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input)
            .expect("write stdin");
        child.wait_with_output().expect("wait mvm")
    }

    /// Run and require success; the stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "mvm {args:?} failed: {}", describe(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let text = self.ok(args);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("mvm {args:?}: not JSON ({e}): {text}"))
    }

    /// The ends of VM `vm`'s console and VMM logs and of its network's
    /// dnsmasq log, for a failure message: what the guest and the host saw.
    pub fn vm_logs(&self, vm: &str) -> String {
        let dir = self.root.join(vm);
        let mut text = String::new();
        for (path, lines) in [
            (dir.join("console.log"), 40),
            (dir.join("vmm.log"), 20),
            (self.root.join("networks/default/dnsmasq.log"), 20),
        ] {
            let body = std::fs::read_to_string(&path).unwrap_or_else(|e| format!("({e})"));
            let tail: Vec<&str> = body.lines().rev().take(lines).collect();
            text.push_str(&format!("\n--- {} (last {lines} lines)\n", path.display()));
            for line in tail.into_iter().rev() {
                text.push_str(line);
                text.push('\n');
            }
        }
        text
    }

    pub fn pid_of(&self, name: &str) -> i32 {
        let status = self.json(&["status", name, "--json"]);
        assert_eq!(status["state"], "running", "{name}: {status}");
        status["pid"].as_i64().expect("pid") as i32
    }
}

/// A failed test must not leave VMMs or dnsmasq behind: kill whatever the
/// pid files name.
impl Drop for Mvm {
    fn drop(&mut self) {
        for entry in std::fs::read_dir(self.root.join("networks"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Some(pid) = std::fs::read_to_string(entry.path().join("dnsmasq.pid"))
                .ok()
                .and_then(|t| t.trim().parse::<i32>().ok())
                .filter(|&p| p > 1)
            {
                // SAFETY: plain kill(2).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        for entry in entries.flatten() {
            let Ok(text) = std::fs::read_to_string(entry.path().join("vmm.pid")) else {
                continue;
            };
            if let Some(pid) = text
                .strip_prefix("running ")
                .and_then(|r| r.split_whitespace().next())
                .and_then(|p| p.parse::<i32>().ok())
            {
                // SAFETY: plain kill(2).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

pub fn describe(out: &Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
