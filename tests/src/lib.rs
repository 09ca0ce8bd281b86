//! Helpers for end-to-end tests and benchmarks: where the test guest and
//! the `mvm-vmm` binary are, writing a `vm.toml`, running the VMM with a
//! time limit, reading the guest's `MVM-RESULT` lines, and building tiny
//! ELF guests.
//!
//! The test guest (kernel + initramfs) is built by `tests/guest/build.sh`,
//! which links it into `target/guest/`. `MVM_GUEST_DIR` overrides that.

pub mod direnv;
pub mod mvm_cli;
pub mod watch;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The workspace root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Directory holding `vmlinux`, `bzImage` and `initramfs.cpio`.
pub fn guest_dir() -> PathBuf {
    std::env::var_os("MVM_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/guest"))
}

/// A test guest file; panics with the command to run when it is missing,
/// so a test cannot pass without a guest.
pub fn guest_file(name: &str) -> PathBuf {
    let path = guest_dir().join(name);
    assert!(
        path.exists(),
        "test guest file {} is missing: run `bash tests/guest/build.sh` first",
        path.display()
    );
    path
}

/// The `mvm-vmm` binary of the same profile as the running test.
pub fn mvm_vmm() -> PathBuf {
    workspace_bin("mvm-vmm")
}

/// A binary of this workspace, of the same profile as the running test.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let bin = profile_dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build --workspace --bins`, same profile as the tests)",
        bin.display()
    );
    bin
}

/// Every thread of VMM process `pid` but its main thread runs under a
/// seccomp filter of its own (more filters than the process inherited,
/// which is what this test process has: none on a plain host, a sandbox's
/// under a container runtime), and threads named in `expected` are among
/// them. Returns the threads' names.
pub fn assert_threads_confined(pid: u32, expected: &[&str]) -> Vec<String> {
    fn filters(status: &str) -> u32 {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp_filters:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
    let inherited = filters(&std::fs::read_to_string("/proc/self/status").unwrap_or_default());
    let mut names = Vec::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the VMM's threads");
    for task in tasks.flatten() {
        let tid = task.file_name().to_string_lossy().into_owned();
        let name = std::fs::read_to_string(task.path().join("comm"))
            .unwrap_or_default()
            .trim()
            .to_string();
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let own = filters(&status);
        if tid == pid.to_string() {
            assert_eq!(
                own, inherited,
                "the main thread builds and tears down the VM, unfiltered"
            );
        } else {
            assert!(
                own > inherited,
                "thread {tid} ({name}) has no seccomp filter of its own:\n{status}"
            );
        }
        names.push(name);
    }
    for want in expected {
        assert!(names.iter().any(|n| n == want), "no thread {want} among {names:?}");
    }
    names
}

/// The unprivileged VMM a root `mvm-vmm` (the keeper, `keeper` its pid)
/// runs when `[security] user` is set: its one child, checked to run as
/// `uid` with no capability left (bounding set included) and
/// `no_new_privs`, while the keeper stays root. Returns the child's pid.
pub fn assert_vmm_unprivileged(keeper: u32, uid: u32) -> u32 {
    let field = |status: &str, key: &str| -> String {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    // The keeper starts it once the host side is prepared.
    let child = || {
        let children = std::fs::read_to_string(format!("/proc/{keeper}/task/{keeper}/children")).unwrap_or_default();
        children
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
            .find(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "mvm-vmm"))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let vmm = loop {
        match child() {
            Some(pid) => break pid,
            None if std::time::Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(100)),
            None => panic!("the keeper {keeper} runs no mvm-vmm child"),
        }
    };
    let keeper_status = std::fs::read_to_string(format!("/proc/{keeper}/status")).unwrap_or_default();
    assert_eq!(field(&keeper_status, "Uid:"), "0 0 0 0", "the keeper runs as root");
    let status = std::fs::read_to_string(format!("/proc/{vmm}/status")).unwrap_or_default();
    let id = format!("{uid} {uid} {uid} {uid}");
    assert_eq!(field(&status, "Uid:"), id, "the VMM's uids:\n{status}");
    assert_eq!(field(&status, "Groups:"), "", "no supplementary groups:\n{status}");
    for cap in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        assert_eq!(field(&status, cap), "0000000000000000", "{cap} of the VMM:\n{status}");
    }
    assert_eq!(field(&status, "NoNewPrivs:"), "1", "no_new_privs:\n{status}");
    vmm
}

/// The uid of host account `name`.
pub fn host_uid(name: &str) -> Option<u32> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

/// A fresh scratch directory for one test.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mvm-test-{}-{}", name, std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Write `vm.toml` into `dir` and return its path.
pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("vm.toml");
    std::fs::write(&path, text).expect("write vm.toml");
    path
}

/// A `vm.toml` for the test guest booted from its ELF `vmlinux`.
pub fn guest_config(vcpus: u32, memory_mib: u32, cmdline_extra: &str) -> String {
    guest_config_with("vmlinux", vcpus, memory_mib, true, cmdline_extra)
}

/// [`guest_config`] for VM `name` with its state under `state_root`
/// (what upper layers of shares and volumes need).
pub fn guest_config_in(name: &str, state_root: &Path, vcpus: u32, memory_mib: u32, cmdline_extra: &str) -> String {
    guest_config(vcpus, memory_mib, cmdline_extra).replacen(
        "version = 1\n",
        &format!(
            "version = 1\nname = \"{name}\"\nstate_root = \"{}\"\n",
            state_root.display()
        ),
        1,
    )
}

/// A `[[share]]` of `source` as `tag`, mounted at `/<tag>`, served by
/// `backend` ("builtin" or "virtiofsd").
pub fn share_entry(tag: &str, source: &Path, backend: &str, persist: bool) -> String {
    format!(
        "[[share]]\ntag = \"{tag}\"\nsource = \"{}\"\npersist = {persist}\nbackend = \"{backend}\"\nmount = \"/{tag}\"\n",
        source.display()
    )
}

/// A `vm.toml` for the test guest booted from `kernel` (`vmlinux` or
/// `bzImage`) in the guest directory; without `acpi` the guest finds its
/// devices through the command line.
pub fn guest_config_with(kernel: &str, vcpus: u32, memory_mib: u32, acpi: bool, cmdline_extra: &str) -> String {
    format!(
        "version = 1\n[machine]\nvcpus = {vcpus}\nmemory_mib = {memory_mib}\nacpi = {acpi}\n[boot]\nkernel = \"{}\"\ninitrd = \"{}\"\ncmdline = \"console=ttyS0 reboot=k panic=-1 {cmdline_extra}\"\n[console]\ninput = \"stdin\"\n",
        guest_file(kernel).display(),
        guest_file("initramfs.cpio").display()
    )
}

/// `[[disk]]` entries for a `vm.toml`: (image, read-only, serial).
pub fn disk_entries(disks: &[(&Path, bool, &str)]) -> String {
    disks
        .iter()
        .map(|(path, ro, serial)| {
            format!(
                "[[disk]]\npath = \"{}\"\nread_only = {ro}\nserial = \"{serial}\"\n",
                path.display()
            )
        })
        .collect()
}

/// A system tool that may live outside a non-root PATH (`mkfs.ext4`,
/// `debugfs` are in /usr/sbin); panics naming the package when missing.
pub fn system_tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{name} not found: install {package} (scripts/setup-host.sh does)"))
}

/// Create a raw disk image of `size` bytes that starts with `head`.
pub fn make_disk(path: &Path, size: usize, head: &[u8]) {
    let mut bytes = vec![0u8; size];
    bytes[..head.len()].copy_from_slice(head);
    std::fs::write(path, bytes).expect("write disk image");
}

/// A running `mvm-vmm` whose console lines arrive on a channel.
pub struct RunningVm {
    child: Child,
    lines: mpsc::Receiver<(Duration, String)>,
    started: Instant,
    /// Every console line so far, with its arrival time.
    pub transcript: Vec<(Duration, String)>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

/// A test that fails before `finish` must not leave its VMM running.
impl Drop for RunningVm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// How a run ended.
pub struct Finished {
    pub status: ExitStatus,
    pub transcript: Vec<(Duration, String)>,
    pub stderr: String,
}

impl Finished {
    /// The guest's `MVM-RESULT key=value` lines.
    pub fn results(&self) -> BTreeMap<String, String> {
        parse_results(self.transcript.iter().map(|(_, l)| l.as_str()))
    }

    /// The console output as one string.
    pub fn console(&self) -> String {
        self.transcript
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Parse `MVM-RESULT key=value` lines.
pub fn parse_results<'a>(lines: impl Iterator<Item = &'a str>) -> BTreeMap<String, String> {
    lines
        .filter_map(|l| l.trim_end().split_once("MVM-RESULT ").map(|(_, kv)| kv))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl RunningVm {
    /// Start `mvm-vmm run <config>` with piped stdin, stdout and stderr.
    pub fn start(config: &Path) -> Self {
        Self::start_bin(&mvm_vmm(), config)
    }

    pub fn start_bin(bin: &Path, config: &Path) -> Self {
        Self::start_command(Command::new(bin), config)
    }

    /// Start `mvm-vmm run <config>` inside network namespace `ns`.
    pub fn start_in_netns(ns: &str, config: &Path) -> Self {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(mvm_vmm());
        Self::start_command(cmd, config)
    }

    fn start_command(mut cmd: Command, config: &Path) -> Self {
        let started = Instant::now();
        let mut child = cmd
            .arg("run")
            .arg(config)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mvm-vmm");
        let stdout = child.stdout.take().expect("stdout");
        let mut stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut buf = Vec::new();
            while reader.read_until(b'\n', &mut buf).map(|n| n > 0).unwrap_or(false) {
                let line = String::from_utf8_lossy(&buf).trim_end_matches(['\r', '\n']).to_string();
                if tx.send((started.elapsed(), line)).is_err() {
                    break;
                }
                buf.clear();
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        RunningVm {
            child,
            lines,
            started,
            transcript: Vec::new(),
            stderr: Some(stderr),
        }
    }

    /// Wait for a console line containing `needle`; `None` on timeout
    /// (counted from the VMM's start) or when the VMM's output ends first.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Option<Duration> {
        let deadline = self.started + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((at, line)) => {
                    let hit = line.contains(needle);
                    self.transcript.push((at, line));
                    if hit {
                        return Some(at);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Send bytes to the guest console.
    pub fn send(&mut self, bytes: &[u8]) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin.write_all(bytes).expect("write to mvm-vmm stdin");
        stdin.flush().expect("flush");
    }

    /// The VMM's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Signal the VMM.
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }

    /// Wait for the VMM to exit, killing it after `timeout` from now (not
    /// from its start: a caller that signalled it after a slow boot still
    /// gives it the whole `timeout` to exit).
    pub fn finish(mut self, timeout: Duration) -> Finished {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let status = self.child.wait().expect("wait");
                let rest: Vec<_> = self.lines.try_iter().collect();
                self.transcript.extend(rest);
                panic!(
                    "mvm-vmm did not exit within {timeout:?} (killed: {status}); console so far:\n{}",
                    self.transcript
                        .iter()
                        .map(|(_, l)| l.as_str())
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The reader thread ends with the pipe; collect what is left.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.transcript.push(line);
        }
        let stderr = self.stderr.take().and_then(|h| h.join().ok()).unwrap_or_default();
        Finished {
            status,
            transcript: std::mem::take(&mut self.transcript),
            stderr,
        }
    }
}

/// Run `mvm-vmm run <config>` to completion without input.
pub fn run_to_end(config: &Path, timeout: Duration) -> Finished {
    RunningVm::start(config).finish(timeout)
}

/// A minimal ELF64 x86-64 executable whose single segment holds `code`,
/// loaded and entered at `load_addr`: a guest for the VMM's own tests and
/// benchmarks that needs no kernel.
pub fn elf_guest(code: &[u8], load_addr: u64) -> Vec<u8> {
    const CODE_OFFSET: u64 = 0x1000;
    let mut elf = Vec::with_capacity(CODE_OFFSET as usize + code.len());
    elf.extend_from_slice(b"\x7fELF");
    elf.extend_from_slice(&[2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // 64-bit, LE, v1, SysV
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&load_addr.to_le_bytes()); // entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // program headers right after
    elf.extend_from_slice(&0u64.to_le_bytes()); // no section headers
    elf.extend_from_slice(&0u32.to_le_bytes());
    elf.extend_from_slice(&64u16.to_le_bytes());
    elf.extend_from_slice(&56u16.to_le_bytes());
    elf.extend_from_slice(&1u16.to_le_bytes());
    elf.extend_from_slice(&[0; 6]);
    // PT_LOAD, R+X
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&5u32.to_le_bytes());
    elf.extend_from_slice(&CODE_OFFSET.to_le_bytes());
    elf.extend_from_slice(&load_addr.to_le_bytes());
    elf.extend_from_slice(&load_addr.to_le_bytes());
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes());
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes());
    elf.extend_from_slice(&0x1000u64.to_le_bytes());
    elf.resize(CODE_OFFSET as usize, 0);
    elf.extend_from_slice(code);
    elf
}

/// Guest code: write `byte` to COM1, then pulse the i8042 reset line.
pub fn uart_then_reset_code(byte: u8) -> Vec<u8> {
    vec![
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, byte, // mov al, byte
        0xee, // out dx, al
        0xb0, 0xfe, // mov al, 0xfe
        0xe6, 0x64, // out 0x64, al
        0xf4, // hlt
        0xeb, 0xfd, // jmp hlt
    ]
}

/// The trivial benchmark guest: one byte to the UART, then reset.
pub fn trivial_guest(byte: u8) -> Vec<u8> {
    elf_guest(&uart_then_reset_code(byte), 0x10_0000)
}

/// Poll `done` every 200 ms until it holds or `timeout` passes; its last
/// answer.
pub fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    done()
}

/// `ip netns exec <ns> <args>`, standard input from /dev/null.
pub fn in_ns(ns: &str, args: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("ip netns exec")
}

/// A network namespace made for a test and deleted on drop; needs root and
/// iproute2. [`Self::with_tap`] gives it a TAP with an address, the host
/// side of a guest's virtio-net.
pub struct NetNs(pub String);

impl NetNs {
    pub fn new(name: String) -> NetNs {
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", &name]);
        let ns = NetNs(name);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// A namespace holding TAP `tap` (with a vnet header) at `cidr`, up.
    pub fn with_tap(name: String, tap: &str, cidr: &str) -> NetNs {
        let ns = NetNs::new(name);
        ns.ip(&["tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"]);
        ns.ip(&["addr", "add", cidr, "dev", tap]);
        ns.ip(&["link", "set", tap, "up"]);
        ns
    }

    /// Run `ip -n <ns> <args>`; panics when it fails.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.0.as_str()];
        all.extend_from_slice(args);
        ip(&all);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?} failed (root and iproute2 needed)");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_parse_with_noise() {
        let lines = [
            "[ 1.0] x",
            "MVM-RESULT a=1",
            "\rMVM-RESULT cmdline=x=y z",
            "MVM-RESULT bad",
            "MVM-DONE",
        ];
        let r = parse_results(lines.into_iter());
        assert_eq!(r.len(), 2);
        assert_eq!(r["a"], "1");
        assert_eq!(r["cmdline"], "x=y z");
    }

    #[test]
    fn elf_guest_has_one_loadable_segment() {
        let elf = trivial_guest(b'X');
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(u64::from_le_bytes(elf[24..32].try_into().unwrap()), 0x10_0000);
        assert_eq!(&elf[0x1000..0x1006], &[0x66, 0xba, 0xf8, 0x03, 0xb0, b'X']);
    }
}
