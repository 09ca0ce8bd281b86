//! PID 1 duties: the file systems every program expects, the console,
//! host name, loopback, the host's shares and volumes, the VM's user, and
//! DHCP.
//!
//! Nothing here is fatal: a failure is logged and the agent goes on (a
//! guest without /dev/shm is still better than a kernel panic).

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, IntoRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::cmdline::{volume_serial, Config, RootUpper, ROOT_SERIAL, ROOT_VOLUME};
use crate::{dhcp, mounts, netif, say, sys};

const NOSUID: libc::c_ulong = libc::MS_NOSUID;
const NODEV: libc::c_ulong = libc::MS_NODEV;
const NOEXEC: libc::c_ulong = libc::MS_NOEXEC;

/// Mount the standard file systems and make sure fds 0-2 are the console.
pub fn setup_system() {
    if std::fs::metadata(mounts::PROC_MOUNTS).is_err() {
        mount_at("proc", "/proc", "proc", NOSUID | NODEV | NOEXEC, None);
    }
    let mounted = mounts::current();
    let mount = |source: &str, target: &str, fstype: &str, flags, data: Option<&str>| {
        if !mounts::is_mounted(&mounted, target) {
            mount_at(source, target, fstype, flags, data);
        }
    };
    mount("devtmpfs", "/dev", "devtmpfs", NOSUID, Some("mode=0755"));
    console_stdio();
    mount("sysfs", "/sys", "sysfs", NOSUID | NODEV | NOEXEC, None);
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        NOSUID | NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    );
    if std::fs::symlink_metadata("/dev/ptmx").is_err() {
        if let Err(e) = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx") {
            say!("cannot create /dev/ptmx: {e}");
        }
    }
    mount("shm", "/dev/shm", "tmpfs", NOSUID | NODEV, Some("mode=1777"));
    mount("run", "/run", "tmpfs", NOSUID | NODEV, Some("mode=755"));
    mount("tmp", "/tmp", "tmpfs", NOSUID | NODEV, Some("mode=1777"));
}

fn mount_at(source: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: Option<&str>) {
    if let Err(e) = std::fs::create_dir_all(target) {
        say!("cannot create {target}: {e}");
        return;
    }
    if let Err(e) = sys::mount(source, target, fstype, flags, data) {
        say!("cannot mount {fstype} on {target}: {}", sys::error_text(&e));
    }
}

/// Fds 0-2 on /dev/console if the kernel could not open it for us (the
/// initramfs had no /dev/console).
fn console_stdio() {
    let missing: Vec<i32> = (0..3).filter(|&fd| !sys::fd_is_open(fd)).collect();
    if missing.is_empty() {
        return;
    }
    let console = match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/console")
    {
        Ok(f) => f,
        Err(_) => return, // nowhere to log to either
    };
    let raw = console.as_raw_fd();
    for fd in missing {
        if fd != raw {
            // SAFETY: dup2 onto a free standard fd.
            unsafe { libc::dup2(raw, fd) };
        }
    }
    if raw <= 2 {
        // It landed on a standard fd: keep it open.
        let _ = console.into_raw_fd();
    }
}

/// statfs type of ramfs (the kernel's initramfs without tmpfs); not in libc.
const RAMFS_MAGIC: libc::c_long = 0x8584_58f6;
/// Where the image root is put together, in the initramfs.
const STAGE: &str = "/.mvm-root";
/// The file systems [`setup_system`] mounted, moved into the new root.
const MOVED: [&str; 5] = ["/dev", "/proc", "/sys", "/run", "/tmp"];

/// Leave the initramfs for an overlayfs root: the image (disk
/// [`ROOT_SERIAL`], read-only ext4) under a writable layer (volume
/// [`ROOT_VOLUME`] or tmpfs). Like `switch_root`: the new root is moved
/// onto `/` and chrooted into, the initramfs files are deleted to give
/// their memory back, and the agent goes on running from memory.
pub fn switch_root(upper: RootUpper) -> Result<(), String> {
    let sys_block = Path::new("/sys/block");
    let lower = format!("{STAGE}/lower");
    let rw = format!("{STAGE}/rw");
    let new_root = format!("{STAGE}/root");
    for dir in [&lower, &rw, &new_root] {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {dir}: {e}"))?;
    }
    let mount = |source: &str, target: &str, fstype: &str, flags, data: Option<&str>| {
        sys::mount(source, target, fstype, flags, data)
            .map_err(|e| format!("cannot mount {source} ({fstype}) on {target}: {}", sys::error_text(&e)))
    };
    let image = find_disk(sys_block, ROOT_SERIAL).ok_or(format!("no disk with serial {ROOT_SERIAL}"))?;
    mount(&format!("/dev/{image}"), &lower, "ext4", libc::MS_RDONLY, None)?;
    match upper {
        RootUpper::Volume => {
            let serial = volume_serial(ROOT_VOLUME);
            let dev = find_disk(sys_block, &serial).ok_or(format!("no disk with serial {serial}"))?;
            mount(&format!("/dev/{dev}"), &rw, "ext4", 0, None)?;
        }
        RootUpper::Tmpfs => mount("rootfs-upper", &rw, "tmpfs", 0, Some("mode=0755"))?,
    }
    let (upper_dir, work_dir) = (format!("{rw}/upper"), format!("{rw}/work"));
    for dir in [&upper_dir, &work_dir] {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {dir}: {e}"))?;
    }
    mount(
        "overlay",
        &new_root,
        "overlay",
        0,
        Some(&format!("lowerdir={lower},upperdir={upper_dir},workdir={work_dir}")),
    )?;
    let mounted = mounts::current();
    for dir in MOVED.iter().filter(|d| mounts::is_mounted(&mounted, d)) {
        let target = format!("{new_root}{dir}");
        std::fs::create_dir_all(&target).map_err(|e| format!("cannot create {target}: {e}"))?;
        mount(dir, &target, "", libc::MS_MOVE, None)?;
    }
    delete_initramfs();
    std::env::set_current_dir(&new_root).map_err(|e| format!("cannot enter {new_root}: {e}"))?;
    mount(".", "/", "", libc::MS_MOVE, None)?;
    let dot = sys::cstring(".").map_err(|e| e.to_string())?;
    // SAFETY: a valid NUL-terminated path.
    sys::cvt(unsafe { libc::chroot(dot.as_ptr()) }).map_err(|e| format!("cannot chroot: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("cannot enter the new root: {e}"))?;
    Ok(())
}

/// Remove the initramfs's files (on the root file system itself, not on
/// anything mounted below it, and not the staging directory).
fn delete_initramfs() {
    use std::os::unix::fs::MetadataExt;
    // Only ever an initramfs (ramfs or tmpfs): never a disk the agent was
    // started on by mistake.
    // SAFETY: statfs fills the struct; the path is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c"/".as_ptr(), &mut st) } != 0 || !matches!(st.f_type, RAMFS_MAGIC | libc::TMPFS_MAGIC) {
        say!("the root file system is not an initramfs; leaving its files alone");
        return;
    }
    let Ok(root) = std::fs::symlink_metadata("/") else {
        return;
    };
    let Ok(entries) = std::fs::read_dir("/") else { return };
    let stage = Path::new(STAGE);
    for entry in entries.filter_map(|e| e.ok()) {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if path == stage || meta.dev() != root.dev() {
            continue;
        }
        let removed = if meta.is_dir() {
            remove_tree_on(&path, root.dev())
        } else {
            std::fs::remove_file(&path)
        };
        if let Err(e) = removed {
            say!("cannot remove {} from the initramfs: {e}", path.display());
        }
    }
}

/// `rm -r` that does not descend into other file systems.
fn remove_tree_on(dir: &Path, dev: u64) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let meta = std::fs::symlink_metadata(&path)?;
        if meta.dev() != dev {
            continue;
        }
        if meta.is_dir() {
            remove_tree_on(&path, dev)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    std::fs::remove_dir(dir)
}

/// Read the kernel command line; log what it got wrong.
pub fn read_config() -> Config {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let (config, problems) = Config::parse(&cmdline);
    for p in problems {
        say!("{p}");
    }
    config
}

/// Host name, loopback, shares, volumes, environment.
pub fn apply(config: &Config) {
    if let Err(e) = set_hostname(&config.hostname) {
        say!("cannot set the host name to {}: {e}", config.hostname);
    }
    if let Err(e) = netif::set_up("lo") {
        say!("cannot bring up lo: {e}");
    }
    for share in &config.shares {
        mount_at(&share.tag, &share.dir, "virtiofs", 0, None);
    }
    for volume in &config.volumes {
        let serial = volume_serial(&volume.name);
        match find_disk(Path::new("/sys/block"), &serial) {
            Some(dev) => mount_at(&format!("/dev/{dev}"), &volume.dir, "ext4", 0, None),
            None => say!("volume {}: no disk with serial {serial}", volume.name),
        }
    }
    if let Some(user) = &config.user {
        ensure_user(user);
    }
    ensure_hosts_entry(Path::new("/etc/hosts"), &config.hostname);
    // The agent's own environment (the kernel gives init almost none);
    // nothing else runs yet, so setting it is not racy.
    std::env::set_var("PATH", crate::session::DEFAULT_PATH);
    std::env::set_var("HOME", "/root");
    let _ = std::env::set_current_dir("/");
    // Last: a finite lease starts a renewal thread, and the environment
    // above is set while the agent is still single-threaded. The host
    // waits for the agent anyway, so the network is ready when it serves.
    for ifname in &config.dhcp {
        configure_interface(ifname, &config.hostname);
    }
}

/// The VM's user's account, home and sudo rule (on the root file system:
/// with an image root, the VM's persistent layer keeps them).
fn ensure_user(user: &crate::cmdline::UserSpec) {
    match crate::passwd::ensure_user(&crate::passwd::Files::new("/"), user) {
        Ok(done) => {
            for note in &done.notes {
                say!("{note}");
            }
            if !done.created.is_empty() {
                say!("user {user}: created {}", done.created.join(", "));
            }
        }
        Err(e) => say!("cannot set up user {}: {e}", user.name),
    }
}

/// The line `/etc/hosts` needs so that the host name resolves (sudo and
/// others look it up and complain on every run when it does not): none
/// when a line names it already.
pub fn hosts_line(hosts: &str, hostname: &str) -> Option<String> {
    let named = hosts.lines().any(|l| {
        let l = l.split('#').next().unwrap_or_default();
        l.split_whitespace().skip(1).any(|n| n.eq_ignore_ascii_case(hostname))
    });
    (!named).then(|| format!("127.0.1.1\t{hostname}"))
}

/// Add the host name to /etc/hosts (Debian's convention, 127.0.1.1) if
/// it is missing; a guest without the file gets one with localhost too.
fn ensure_hosts_entry(path: &Path, hostname: &str) {
    use std::io::Write;
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => "127.0.0.1\tlocalhost\n".into(),
        Err(e) => return say!("cannot read {}: {e}", path.display()),
    };
    let Some(line) = hosts_line(&text, hostname) else {
        return;
    };
    let existed = path.exists();
    let sep = if text.is_empty() || text.ends_with('\n') {
        ""
    } else {
        "\n"
    };
    let add = if existed {
        format!("{sep}{line}\n")
    } else {
        format!("{text}{line}\n")
    };
    let written = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o644)
        .open(path)
        .and_then(|mut f| f.write_all(add.as_bytes()));
    if let Err(e) = written {
        say!("cannot add {hostname} to {}: {e}", path.display());
    }
}

/// How long an interface may take to appear after the agent starts.
const INTERFACE_WAIT: Duration = Duration::from_secs(5);

/// DHCP on `ifname`, one log line either way; failure is not fatal.
fn configure_interface(ifname: &str, hostname: &str) {
    let sys_dir = Path::new("/sys/class/net").join(ifname);
    let deadline = Instant::now() + INTERFACE_WAIT;
    while !sys_dir.exists() {
        if Instant::now() >= deadline {
            say!("{ifname}: no such network interface; not configured");
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let start = Instant::now();
    match dhcp::configure(ifname, hostname, Path::new("/etc/resolv.conf"), dhcp::DEFAULT_TIMEOUT) {
        Ok(lease) => say!("{ifname}: {lease} (in {:.1} s)", start.elapsed().as_secs_f64()),
        Err(e) => say!(
            "{ifname}: DHCP failed after {:.1} s, the interface is not configured: {e}",
            start.elapsed().as_secs_f64()
        ),
    }
}

fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`.
    sys::cvt(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })?;
    Ok(())
}

/// The virtio-blk disk (`vdX` under `sys_block`) whose serial is `serial`.
pub fn find_disk(sys_block: &Path, serial: &str) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(sys_block)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("vd"))
        .collect();
    names.sort();
    names.into_iter().find(|n| {
        std::fs::read_to_string(sys_block.join(n).join("serial"))
            .is_ok_and(|s| s.trim_end_matches(['\n', '\0']).trim() == serial)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_a_tree_on_one_file_system() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("mvm-agent-rmtree-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("a/b/c")).unwrap();
        std::fs::write(dir.join("a/b/c/file"), b"x").unwrap();
        std::fs::write(dir.join("a/top"), b"y").unwrap();
        std::os::unix::fs::symlink("/etc", dir.join("a/link")).unwrap();
        let dev = std::fs::metadata(&dir).unwrap().dev();
        remove_tree_on(&dir.join("a"), dev).unwrap();
        assert!(!dir.join("a").exists());
        // The symlink's target is not followed.
        assert!(Path::new("/etc").is_dir());
        // Entries of another device are left alone (and so is their parent).
        std::fs::create_dir_all(dir.join("d/e")).unwrap();
        assert!(remove_tree_on(&dir.join("d"), dev.wrapping_add(1)).is_err());
        assert!(dir.join("d/e").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hosts_entry_for_the_host_name() {
        let debian = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n";
        assert_eq!(hosts_line(debian, "dev").as_deref(), Some("127.0.1.1\tdev"));
        assert_eq!(hosts_line("127.0.1.1 other DEV\n", "dev"), None);
        assert_eq!(
            hosts_line("# 127.0.1.1 dev\n", "dev").as_deref(),
            Some("127.0.1.1\tdev")
        );
        assert_eq!(hosts_line("dev 1.2.3.4\n", "dev").as_deref(), Some("127.0.1.1\tdev"));

        let dir = std::env::temp_dir().join(format!("mvm-agent-hosts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let hosts = dir.join("hosts");
        ensure_hosts_entry(&hosts, "dev");
        ensure_hosts_entry(&hosts, "dev");
        assert_eq!(
            std::fs::read_to_string(&hosts).unwrap(),
            "127.0.0.1\tlocalhost\n127.0.1.1\tdev\n"
        );
        std::fs::write(&hosts, "127.0.0.1 localhost").unwrap();
        ensure_hosts_entry(&hosts, "web");
        assert_eq!(
            std::fs::read_to_string(&hosts).unwrap(),
            "127.0.0.1 localhost\n127.0.1.1\tweb\n"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn finds_the_disk_by_serial() {
        let dir = std::env::temp_dir().join(format!("mvm-agent-sysblock-{}", std::process::id()));
        for (dev, serial) in [("vda", "root\n"), ("vdb", "vol-data\n"), ("sda", "vol-other")] {
            std::fs::create_dir_all(dir.join(dev)).unwrap();
            std::fs::write(dir.join(dev).join("serial"), serial).unwrap();
        }
        std::fs::create_dir_all(dir.join("vdc")).unwrap();
        assert_eq!(find_disk(&dir, "vol-data").as_deref(), Some("vdb"));
        assert_eq!(find_disk(&dir, "vol-other"), None);
        assert_eq!(find_disk(&dir, "vol-nope"), None);
        assert_eq!(find_disk(&dir.join("missing"), "vol-data"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
