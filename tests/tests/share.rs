//! Project sharing end to end (`[[share]]`, `[[volume]]`): a project tree
//! made here is shared into the test guest twice - through the built-in
//! virtio-fs overlay and through virtiofsd over a kernel overlayfs - and the
//! guest runs the whole file scenario on both (tests/guest/init,
//! `scenario_share`). Then:
//! - the project is unchanged, byte for byte and timestamp for timestamp,
//!   while the upper layers hold the changes and the whiteouts;
//! - the VMM's descriptor count stays flat while the guest opens and closes
//!   thousands of files;
//! - a restart of the same VM (persist = true) sees its changes and its
//!   volume's contents; another VM over the same project (persist = false)
//!   sees none of them, and starts from an empty upper layer.
//!
//! Three boots in all (the guest kernel is interpreted on the CI hosts).

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mvm_tests::*;

/// Generous: boot 1 runs the whole scenario on two shares, about 10 minutes
/// on an idle PVM host (the guest kernel is interpreted; since the guest
/// kernel has inotify, its cold lookups cost about 1.7x what they did).
const TIMEOUT: Duration = Duration::from_secs(3600);
/// Entries of many/: enough for a listing of many READDIR replies and the
/// 1,000-file descriptor churn (the server's own chunking is unit-tested
/// with 10,000).
const MANY: usize = 3_000;
/// Extra open/close rounds of one file for the descriptor check.
const OPENS: usize = 1_000;
/// Files of many/ the descriptor check opens (f00000-f00999).
const CHURN: usize = 1_000;

fn write(path: &Path, data: &[u8]) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(path, data).unwrap();
}

/// The project tree the guest's `fs_checks` expects.
fn make_project(dir: &Path) {
    write(&dir.join("README.md"), b"hello from the host\n");
    write(&dir.join("src/main.c"), b"int main(void) { return 0; }\n");
    write(&dir.join("src/lib/util.c"), b"util\n");
    write(&dir.join("docs/old.txt"), b"old\n");
    write(&dir.join("docs/keep.txt"), b"keep\n");
    std::fs::create_dir_all(dir.join("emptydir")).unwrap();
    write(&dir.join("olddir/file.txt"), b"x\n");
    write(&dir.join("bin.sh"), b"#!/bin/sh\n");
    std::fs::set_permissions(dir.join("bin.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    write(&dir.join("trunc.txt"), b"0123456789");
    // 8 MiB that no compression or sparse trick shortcuts.
    let mut big = vec![0u8; 8 << 20];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for chunk in big.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    write(&dir.join("big.bin"), &big);
    std::fs::create_dir_all(dir.join("many")).unwrap();
    for i in 0..MANY {
        std::fs::write(dir.join(format!("many/f{i:05}")), b"").unwrap();
    }
}

/// path -> (kind and mode, size, mtime, ctime, atime, content hash) of
/// every entry below `root`, symlinks not followed.
type Manifest = BTreeMap<PathBuf, (u32, u64, (i64, i64), (i64, i64), (i64, i64), u64)>;

fn manifest(root: &Path) -> Manifest {
    let mut out = Manifest::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for name in list_noatime(&dir) {
            let path = dir.join(name);
            let m = std::fs::symlink_metadata(&path).unwrap();
            let hash = if m.is_file() {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                read_noatime(&path).hash(&mut h);
                h.finish()
            } else if m.file_type().is_symlink() {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                std::fs::read_link(&path).unwrap().hash(&mut h);
                h.finish()
            } else {
                0
            };
            if m.is_dir() {
                stack.push(path.clone());
            }
            out.insert(
                path.strip_prefix(root).unwrap().to_path_buf(),
                (
                    m.mode(),
                    m.size(),
                    (m.mtime(), m.mtime_nsec()),
                    (m.ctime(), m.ctime_nsec()),
                    (m.atime(), m.atime_nsec()),
                    hash,
                ),
            );
        }
    }
    out
}

/// The names in a directory, listed without touching its atime (which
/// `std::fs::read_dir` would).
fn list_noatime(dir: &Path) -> Vec<std::ffi::OsString> {
    use std::os::unix::ffi::OsStrExt;
    let c_dir = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid path; the descriptor goes to fdopendir, which owns
    // it from then on and closedir releases both.
    let mut names = Vec::new();
    unsafe {
        let fd = libc::open(
            c_dir.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOATIME | libc::O_CLOEXEC,
        );
        assert!(fd >= 0, "open {}: {}", dir.display(), std::io::Error::last_os_error());
        let stream = libc::fdopendir(fd);
        assert!(!stream.is_null(), "fdopendir {}", dir.display());
        loop {
            let entry = libc::readdir(stream);
            if entry.is_null() {
                break;
            }
            let name = std::ffi::CStr::from_ptr((*entry).d_name.as_ptr()).to_bytes();
            if name != b"." && name != b".." {
                names.push(std::ffi::OsStr::from_bytes(name).to_os_string());
            }
        }
        libc::closedir(stream);
    }
    names
}

/// The file's bytes, read without touching its atime (the manifest checks
/// that the VMs leave atimes alone; its own reads must too).
fn read_noatime(path: &Path) -> Vec<u8> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOATIME)
        .open(path)
        .unwrap();
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).unwrap();
    bytes
}

fn md5(path: &Path) -> String {
    let mut child = Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("md5sum");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(&read_noatime(path)).expect("feed md5sum");
    }
    let out = child.wait_with_output().expect("md5sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let c_name = std::ffi::CString::new(name).unwrap();
    let mut buf = [0u8; 256];
    // SAFETY: valid C strings and a buffer of the size passed.
    let n = unsafe { libc::lgetxattr(c_path.as_ptr(), c_name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (n >= 0).then(|| buf[..n as usize].to_vec())
}

fn is_whiteout(path: &Path) -> bool {
    std::fs::symlink_metadata(path)
        .map(|m| m.file_type().is_char_device() && m.rdev() == 0)
        .unwrap_or(false)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

struct Vm<'a> {
    name: &'a str,
    persist: bool,
    volume: bool,
    virtiofsd: bool,
    cmdline: String,
    /// `[security] user`: the VMM runs as this user, root prepares.
    vmm_user: Option<&'a str>,
}

fn vm_config(dir: &Path, project: &Path, vm: &Vm) -> PathBuf {
    let mut text = guest_config_in(vm.name, &dir.join("state"), 1, 128, &vm.cmdline);
    text += &share_entry("project", project, "builtin", vm.persist);
    if vm.virtiofsd {
        text += &share_entry("pv", project, "virtiofsd", vm.persist);
    }
    if vm.volume {
        text += "[[volume]]\nname = \"data\"\nsize_mib = 16\nmount = \"/data\"\n";
    }
    if let Some(user) = vm.vmm_user {
        text += &format!("[security]\nuser = \"{user}\"\n");
    }
    let path = dir.join(format!("{}.toml", vm.name));
    std::fs::write(&path, text).unwrap();
    path
}

fn expect(r: &BTreeMap<String, String>, key: &str, want: &str, console: &str) {
    assert_eq!(
        r.get(key).map(String::as_str),
        Some(want),
        "result {key}; console:\n{console}"
    );
}

/// What `fs_checks` reports for a share labelled `p`.
fn check_scenario(r: &BTreeMap<String, String>, p: &str, big_md5: &str, console: &str) {
    let e = |k: &str, v: &str| expect(r, &format!("{p}_{k}"), v, console);
    e("readme", "hello from the host");
    e("create", "created in the guest");
    e("append_lines", "2");
    e("rename_file", "ok");
    e("rename_dir", "util");
    e("unlink", "ok");
    e("rmdir", "ok");
    e("opaque", "olddir/*");
    e("mkdir_p", "deep");
    e("readlink", "README.md");
    e("hardlink", "2 2 same-ino");
    e("chmod", "600");
    e("ino_stable", "yes");
    e("truncate", "01234");
    e("fifo", "through-fifo");
    e("fallocate", "1048576");
    e("big_md5", big_md5);
    e("big2_md5", big_md5);
    e("many", &MANY.to_string());
    e("ls_la", "ok");
    let listed: Vec<&str> = r[&format!("{p}_ls")].split(' ').collect();
    let mut unique = listed.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(listed.len(), unique.len(), "{p}: duplicate names in ls -a: {listed:?}");
    let want = [
        ".",
        "..",
        "README.md",
        "a",
        "big.bin",
        "big2.bin",
        "bin.sh",
        "docs",
        "falloc.bin",
        "fifo",
        "hard",
        "link",
        "many",
        "olddir",
        "renamed.txt",
        "src2",
        "trunc.txt",
    ];
    assert_eq!(unique, want, "{p}: merged listing");
}

/// The upper layer holds the guest's changes in overlayfs's format.
fn check_upper(upper: &Path, big_md5: &str) {
    let read =
        |p: &str| std::fs::read_to_string(upper.join(p)).unwrap_or_else(|e| panic!("{}: {e}", upper.join(p).display()));
    assert_eq!(read("README.md"), "hello from the host\nappended by the guest\n");
    assert_eq!(read("renamed.txt"), "created in the guest\n");
    assert_eq!(
        std::fs::metadata(upper.join("hard")).unwrap().ino(),
        std::fs::metadata(upper.join("renamed.txt")).unwrap().ino()
    );
    assert_eq!(read("src2/lib/util.c"), "util\n");
    assert_eq!(read("a/b/c/f"), "deep\n");
    assert_eq!(read("trunc.txt"), "01234");
    for gone in ["src", "docs/old.txt", "emptydir"] {
        assert!(
            is_whiteout(&upper.join(gone)),
            "{gone} is a whiteout in {}",
            upper.display()
        );
    }
    assert!(
        !upper.join("created.txt").exists(),
        "no trace of a name that never was in the lower layer"
    );
    assert_eq!(
        xattr(&upper.join("olddir"), "user.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(std::fs::read_link(upper.join("link")).unwrap(), Path::new("README.md"));
    assert!(std::fs::symlink_metadata(upper.join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    assert_eq!(std::fs::metadata(upper.join("bin.sh")).unwrap().mode() & 0o7777, 0o600);
    assert_eq!(md5(&upper.join("big2.bin")), big_md5);
    assert!(!upper.join("big.bin").exists(), "reading a file does not copy it up");
    assert!(
        !upper.join("many").exists(),
        "listing and opening files read-only copies nothing up"
    );
}

#[test]
fn project_share_overlay_persistence_and_isolation() {
    let dir = scratch_dir("share");
    let project = dir.join("project");
    make_project(&project);
    let before = manifest(&project);
    let big_md5 = md5(&project.join("big.bin"));

    // Boot 1: the whole scenario on both backends, the descriptor check,
    // a marker on the volume.
    let alpha = Vm {
        name: "alpha",
        persist: true,
        volume: true,
        virtiofsd: true,
        cmdline: format!("mvm.scenario=share mvm.fsdirs=/project,/pv mvm.opens={OPENS} mvm.volmark=kept-on-the-volume"),
        vmm_user: None,
    };
    let config = vm_config(&dir, &project, &alpha);
    let mut vm = RunningVm::start(&config);
    let pid = vm.pid();
    assert!(
        vm.wait_for("MVM-PAUSE fd-before", TIMEOUT).is_some(),
        "scenario reached the descriptor check:\n{}",
        transcript(&vm)
    );
    let fds_before = open_fds(pid);
    vm.send(b"go\n");
    assert!(
        vm.wait_for("MVM-PAUSE fd-after", TIMEOUT).is_some(),
        "descriptor churn finished:\n{}",
        transcript(&vm)
    );
    let fds_after = open_fds(pid);
    vm.send(b"go\n");
    let run = vm.finish(TIMEOUT);
    let console = run.console();
    assert_eq!(
        run.status.code(),
        Some(0),
        "stderr: {}\nconsole:\n{console}",
        run.stderr
    );
    let r = run.results();
    expect(&r, "mount_project", "ok", &console);
    expect(&r, "mount_pv", "ok", &console);
    expect(&r, "mount_data", "ok", &console);
    check_scenario(&r, "project", &big_md5, &console);
    check_scenario(&r, "pv", &big_md5, &console);
    expect(&r, "vol_written", "ok", &console);
    expect(&r, "status", "ok", &console);
    assert!(
        fds_before > 0 && fds_after <= fds_before,
        "VMM descriptors: {fds_before} before {CHURN} + {OPENS} opens, {fds_after} after"
    );
    eprintln!(
        "share: {CHURN} + {OPENS} open/close in the guest from {} to {} s of guest uptime; VMM fds {fds_before} -> {fds_after}",
        r["opens_started"], r["opens_done"]
    );
    // Where the time goes (seconds since mvm-vmm started, console arrival).
    for key in ["mount_project", "project_ls_la", "pv_ls_la", "opens_done", "status"] {
        if let Some((at, _)) = run
            .transcript
            .iter()
            .find(|(_, l)| l.contains(&format!("MVM-RESULT {key}=")))
        {
            eprintln!("share: {key} at {:.1} s", at.as_secs_f64());
        }
    }

    let after = manifest(&project);
    assert_eq!(before.len(), after.len(), "the project gained or lost entries");
    for (path, was) in &before {
        assert_eq!(after.get(path), Some(was), "{} changed in the project", path.display());
    }
    let state = dir.join("state");
    check_upper(&state.join("alpha/overlay/project"), &big_md5);
    check_upper(&state.join("alpha/overlay/pv"), &big_md5);

    // Boots 2 and 3 at once: alpha again (persistent upper layers and
    // volume), and beta over the same project without persistence, whose
    // upper layer has a file left from "an earlier run". alpha now runs
    // unprivileged: its root keeper gives it the state directory the root
    // run made, serves /pv with virtiofsd and hands over /dev/kvm and the
    // files.
    let again = Vm {
        cmdline: "mvm.scenario=share_state mvm.fsdirs=/project,/pv".into(),
        vmm_user: Some("microvm-dev"),
        ..alpha
    };
    let beta = Vm {
        name: "beta",
        persist: false,
        volume: false,
        virtiofsd: false,
        cmdline: "mvm.scenario=share_state mvm.fsdirs=/project".into(),
        vmm_user: None,
    };
    write(&state.join("beta/overlay/project/leftover"), b"from an earlier run\n");
    let second = RunningVm::start(&vm_config(&dir, &project, &again));
    let third = RunningVm::start(&vm_config(&dir, &project, &beta));
    let vmm_uid = mvm_tests::host_uid("microvm-dev").expect("the microvm-dev user (scripts/setup-host.sh)");
    mvm_tests::assert_vmm_unprivileged(second.pid(), vmm_uid);
    let (second, third) = (second.finish(TIMEOUT), third.finish(TIMEOUT));
    for run in [&second, &third] {
        assert_eq!(
            run.status.code(),
            Some(0),
            "stderr: {}\nconsole:\n{}",
            run.stderr,
            run.console()
        );
    }
    let (r, c) = (second.results(), second.console());
    for p in ["project", "pv"] {
        expect(&r, &format!("{p}_renamed"), "created in the guest", &c);
        expect(&r, &format!("{p}_readme_lines"), "2", &c);
    }
    expect(&r, "vol_marker", "kept-on-the-volume", &c);
    let (r, c) = (third.results(), third.console());
    expect(&r, "project_renamed", "absent", &c);
    expect(&r, "project_readme_lines", "1", &c);
    expect(&r, "project_leftover", "absent", &c);
    expect(&r, "vol_marker", "absent", &c);
    let after = manifest(&project);
    assert_eq!(before, after, "the project is unchanged after all three runs");
    let _ = std::fs::remove_dir_all(&dir);
}

fn transcript(vm: &RunningVm) -> String {
    vm.transcript
        .iter()
        .map(|(_, l)| l.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The manifest must not change what it records (atimes included), or the
/// check above could not tell the VMs' doing from its own.
#[test]
fn manifest_does_not_touch_atimes() {
    let dir = scratch_dir("manifest");
    write(&dir.join("a/b/file"), b"content");
    write(&dir.join("top"), b"x");
    let first = manifest(&dir);
    assert_eq!(first.len(), 4);
    assert_eq!(manifest(&dir), first);
    let _ = std::fs::remove_dir_all(&dir);
}
