//! Privilege separation: run the VMM as an unprivileged user.
//!
//! Only a few steps of starting a VM need privilege: opening `/dev/kvm`
//! and `/dev/net/tun`, making a TAP a bridge port and the managed network
//! around it (bridge, nftables, dnsmasq), mounting virtiofsd's overlay and
//! starting virtiofsd, reading files beneath directories the VMM user may
//! not enter (`/root/.cache`, a 0700 home). A root process ("keeper")
//! does those ([`prepare`]), then starts the VMM as `[security] user`
//! with no capabilities, an empty bounding set and `no_new_privs`
//! ([`spawn`]), handing it the descriptors it opened ([`Handoff`]). The
//! keeper handles no guest input: it waits for the VMM, keeps the network
//! whole (dnsmasq restarts), and undoes its steps when the VMM ends.
//!
//! What crosses from keeper to VMM, as one TOML argument (`--handoff`):
//!
//! ```text
//! kvm = 3                                  # an open /dev/kvm
//! [[tap]]  nic = 0  fd = 4  ip = "10.77.0.5"   # an attached TAP, its address
//! [[share]] tag = "project" socket = ".../overlay/project.sock"  # virtiofsd
//! [[path]] key = "boot.kernel"  fd = 5     # read through /proc/self/fd/5
//! ```

use std::ffi::CString;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use mvm_net::host::network::{Attachment, Network};
use mvm_storage::fs::host_overlay::HostOverlay;
use mvm_storage::fs::virtiofsd::Virtiofsd;

use crate::config::{ShareBackend, VmConfig};
use crate::{Error, Result};

/// The user the VMM runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl VmmUser {
    /// The host account `name` (from the passwd database).
    pub fn lookup(name: &str) -> Result<VmmUser> {
        let missing = |reason: String| Error::ConfigValue {
            key: "security.user",
            value: name.to_string(),
            reason,
        };
        let c_name = CString::new(name).map_err(|_| missing("a user name has no NUL byte".into()))?;
        let mut buf = vec![0u8; 16 * 1024];
        // SAFETY: a zeroed passwd is a valid out-parameter.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; buf outlives it.
        let rc = unsafe {
            libc::getpwnam_r(
                c_name.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut found,
            )
        };
        if rc != 0 || found.is_null() {
            return Err(missing(format!(
                "the host has no such user; create it (`useradd --system --no-create-home --shell \
                 /usr/sbin/nologin {name}`, as scripts/setup-host.sh does) or set another"
            )));
        }
        if pwd.pw_uid == 0 {
            return Err(missing("it is root; the point is to run without root's rights".into()));
        }
        Ok(VmmUser {
            name: name.to_string(),
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
        })
    }
}

/// The user to run `config`'s VMM as, when this process may switch to it:
/// `[security] user` if set and we are root.
pub fn user_to_switch_to(config: &VmConfig) -> Result<Option<VmmUser>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    config.security.user.as_deref().map(VmmUser::lookup).transpose()
}

/// What a privileged process prepared for the VMM: descriptors it opened
/// and facts it established. An embedding program that prepares these
/// itself builds one and passes it to [`crate::Vm::with_handoff`].
#[derive(Debug, Default)]
pub struct Handoff {
    /// An open `/dev/kvm`.
    pub kvm: Option<OwnedFd>,
    /// TAPs, already bridge ports (and attached to their managed network,
    /// which the preparing process keeps: no dnsmasq watch in the VMM).
    pub taps: Vec<HandoffTap>,
    /// virtiofsd sockets served for shares (by tag): the VMM connects.
    pub virtiofsd: Vec<(String, PathBuf)>,
    /// Files and directories opened for the VMM, by configuration key
    /// (`boot.kernel`, `boot.initrd`, `root.image`, `share.<tag>.source`):
    /// the VMM reads them through `/proc/self/fd/<fd>`.
    pub paths: Vec<(String, OwnedFd)>,
    /// This VMM boots the machine again after a guest reboot: its console
    /// file is appended to, as by a VMM that reboots in-process.
    pub rebooted: bool,
    /// A pipe to the preparing process: one byte once the VM is built, so
    /// that it keeps the address pins it made (a start that fails undoes
    /// them, as [`Attachment`] does in-process).
    pub ready: Option<OwnedFd>,
}

/// A TAP for NIC `nic`, with the address the managed network gave the VM.
#[derive(Debug)]
pub struct HandoffTap {
    pub nic: usize,
    pub fd: OwnedFd,
    pub ip: Option<Ipv4Addr>,
}

#[derive(serde::Serialize, serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct HandoffText {
    kvm: Option<RawFd>,
    #[serde(default)]
    tap: Vec<TapText>,
    #[serde(default)]
    share: Vec<ShareText>,
    #[serde(default)]
    path: Vec<PathText>,
    #[serde(default)]
    rebooted: bool,
    ready: Option<RawFd>,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TapText {
    nic: usize,
    fd: RawFd,
    ip: Option<Ipv4Addr>,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ShareText {
    tag: String,
    socket: PathBuf,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PathText {
    key: String,
    fd: RawFd,
}

fn handoff_error(reason: String) -> Error {
    Error::ConfigValue {
        key: "--handoff",
        value: String::new(),
        reason,
    }
}

impl Handoff {
    /// The argument that describes this handoff to a child that inherits
    /// its descriptors (same numbers).
    pub fn to_arg(&self) -> String {
        let text = HandoffText {
            kvm: self.kvm.as_ref().map(AsRawFd::as_raw_fd),
            tap: self
                .taps
                .iter()
                .map(|t| TapText {
                    nic: t.nic,
                    fd: t.fd.as_raw_fd(),
                    ip: t.ip,
                })
                .collect(),
            share: self
                .virtiofsd
                .iter()
                .map(|(tag, socket)| ShareText {
                    tag: tag.clone(),
                    socket: socket.clone(),
                })
                .collect(),
            path: self
                .paths
                .iter()
                .map(|(key, fd)| PathText {
                    key: key.clone(),
                    fd: fd.as_raw_fd(),
                })
                .collect(),
            rebooted: self.rebooted,
            ready: self.ready.as_ref().map(AsRawFd::as_raw_fd),
        };
        toml::to_string(&text).unwrap_or_default()
    }

    /// Take over the descriptors `arg` names, in this process: each must
    /// be open, above stderr, and named once.
    pub fn from_arg(arg: &str) -> Result<Handoff> {
        let text: HandoffText = toml::from_str(arg).map_err(|e| handoff_error(e.message().trim().to_string()))?;
        let mut seen = Vec::new();
        let mut take = |fd: RawFd| -> Result<OwnedFd> {
            // SAFETY: F_GETFD only asks whether the descriptor is open.
            if fd <= 2 || seen.contains(&fd) || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                return Err(handoff_error(format!(
                    "descriptor {fd} is not an inherited, open descriptor above 2 named once"
                )));
            }
            seen.push(fd);
            // Inherited without close-on-exec; the programs the VMM starts
            // (mkfs.ext4) must not get them.
            // SAFETY: fcntl on an open descriptor.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            // SAFETY: the parent passed this open descriptor to us alone,
            // and it is taken once (checked above).
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        };
        let kvm = text.kvm.map(&mut take).transpose()?;
        let mut taps = Vec::new();
        for t in text.tap {
            taps.push(HandoffTap {
                nic: t.nic,
                fd: take(t.fd)?,
                ip: t.ip,
            });
        }
        let mut paths = Vec::new();
        for p in text.path {
            paths.push((p.key, take(p.fd)?));
        }
        let ready = text.ready.map(&mut take).transpose()?;
        Ok(Handoff {
            kvm,
            taps,
            virtiofsd: text.share.into_iter().map(|s| (s.tag, s.socket)).collect(),
            paths,
            rebooted: text.rebooted,
            ready,
        })
    }

    /// Tell the preparing process the VM is built (see [`Handoff::ready`]).
    pub(crate) fn built(&mut self) {
        if let Some(fd) = self.ready.take() {
            let mut pipe = std::fs::File::from(fd);
            if let Err(e) = std::io::Write::write_all(&mut pipe, b"1") {
                log::warn!("cannot tell the preparing process the VM is built: {e}");
            }
        }
    }

    /// Point `config`'s paths at the descriptors opened for them.
    pub fn apply_paths(&self, config: &mut VmConfig) {
        for (key, fd) in &self.paths {
            let path = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
            match key.as_str() {
                "boot.kernel" => config.boot.kernel = path,
                "boot.initrd" => config.boot.initrd = Some(path),
                "root.image" => {
                    if let Some(root) = config.root.as_mut() {
                        root.image = path;
                    }
                }
                other => {
                    let tag = other.strip_prefix("share.").and_then(|k| k.strip_suffix(".source"));
                    if let Some(share) = config.shares.iter_mut().find(|s| Some(s.tag.as_str()) == tag) {
                        share.source = path;
                    }
                }
            }
        }
    }

    /// The TAP prepared for NIC `nic`, if any.
    pub(crate) fn take_tap(&mut self, nic: usize) -> Option<HandoffTap> {
        let at = self.taps.iter().position(|t| t.nic == nic)?;
        Some(self.taps.remove(at))
    }

    /// The virtiofsd socket served for share `tag`, if any.
    pub(crate) fn virtiofsd_socket(&self, tag: &str) -> Option<&Path> {
        self.virtiofsd.iter().find(|(t, _)| t == tag).map(|(_, s)| s.as_path())
    }
}

/// What [`prepare`] set up; dropping it undoes it (virtiofsd stopped, its
/// overlay unmounted, the TAPs closed, which removes them from the host).
/// Address pins stay, as for any VM that ran.
pub struct Prepared {
    pub handoff: Handoff,
    /// The managed networks the VM is on, for [`crate::network::supervise`].
    pub networks: Vec<Network>,
    served: Vec<(Virtiofsd, Option<HostOverlay>)>,
    attachments: Vec<Attachment>,
    /// The read end of [`Handoff::ready`].
    ready: std::fs::File,
}

impl Prepared {
    /// After the VMM ended: keep the address pins if it had built the VM
    /// (it wrote to the ready pipe); else dropping this undoes them.
    pub fn settle(&mut self) {
        let mut byte = [0u8; 1];
        if matches!(std::io::Read::read(&mut self.ready, &mut byte), Ok(1)) {
            self.attachments.iter_mut().for_each(Attachment::keep);
        }
    }
}

/// As root, prepare what `config`'s VMM needs privilege for, for `user`:
/// the state directory (created, and owned by `user` from its first
/// unprivileged run on), `/dev/kvm`, the TAPs on their bridges and
/// networks, virtiofsd for `backend = "virtiofsd"` shares, and the boot
/// files and share sources opened for reading.
pub fn prepare(config: &VmConfig, user: &VmmUser) -> Result<Prepared> {
    // A configuration the VMM would refuse changes nothing on the host.
    config.validate(u32::from(crate::x86_64::mptable::MAX_VCPUS))?;
    let mut handoff = Handoff::default();
    if config.needs_state_dir() {
        own_state_dir(&config.state_dir(), user)?;
    }
    handoff.kvm = Some(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map_err(Error::host("opening /dev/kvm for the VMM"))?
            .into(),
    );
    let mut attachments = Vec::new();
    let mut networks = Vec::new();
    for (i, net) in config.nets.iter().enumerate() {
        let (tap, attachment) = crate::devices::open_tap(config, i, net)?;
        let ip = attachment.as_ref().map(Attachment::ip);
        if let Some(a) = attachment {
            networks.push(a.network().clone());
            attachments.push(a);
        }
        handoff.taps.push(HandoffTap {
            nic: i,
            fd: tap.into_fd(),
            ip,
        });
    }
    let mut served = Vec::new();
    for share in config.shares.iter().filter(|s| s.backend == ShareBackend::Virtiofsd) {
        if share.socket.is_some() {
            continue; // the user's own virtiofsd
        }
        let layers = crate::state::prepare_share(config, share)?;
        let (daemon, overlay) = crate::devices::with_virtiofsd(share, &layers, None, |spec| spec.serve())?;
        chown(daemon.socket(), user)?;
        handoff
            .virtiofsd
            .push((share.tag.clone(), daemon.socket().to_path_buf()));
        served.push((daemon, overlay));
    }
    // The VMM reads these through the descriptors (they may sit beneath
    // directories it cannot enter); `key` names them in an error.
    let mut open_path = |name: String, key: &'static str, path: &Path| -> Result<()> {
        let fd = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open(path)
            .map_err(|e| Error::ConfigPath {
                key,
                path: path.to_path_buf(),
                reason: format!("cannot open it: {e}"),
            })?;
        handoff.paths.push((name, fd.into()));
        Ok(())
    };
    use std::os::unix::fs::OpenOptionsExt;
    open_path("boot.kernel".into(), "boot.kernel", &config.boot.kernel)?;
    if let Some(initrd) = &config.boot.initrd {
        open_path("boot.initrd".into(), "boot.initrd", initrd)?;
    }
    if let Some(root) = &config.root {
        open_path("root.image".into(), "root.image", &root.image)?;
    }
    for share in config.shares.iter().filter(|s| s.backend == ShareBackend::Builtin) {
        open_path(format!("share.{}.source", share.tag), "share.source", &share.source)?;
    }
    let (ready, ready_write) = pipe()?;
    handoff.ready = Some(ready_write);
    Ok(Prepared {
        handoff,
        networks,
        served,
        attachments,
        ready,
    })
}

impl Drop for Prepared {
    fn drop(&mut self) {
        // virtiofsd first, then its overlay (busy while it serves).
        for (mut daemon, overlay) in self.served.drain(..) {
            daemon.stop();
            drop(overlay);
        }
    }
}

/// A pipe (read end, write end), both close-on-exec; the read end does
/// not block.
fn pipe() -> Result<(std::fs::File, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 into a two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(Error::host("creating the VMM's ready pipe")(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: two new descriptors only we own.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // The VMM's end blocks as usual.
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETFL, 0) };
    Ok((read.into(), write))
}

/// Give `dir` (the VM's state directory) to `user`: created if missing;
/// when it belongs to someone else (a VM that ran as root before), every
/// entry in it is given to `user` too, since the VMM writes all of them
/// (console log, sockets, volume images, upper layers). Symlinks are not
/// followed.
fn own_state_dir(dir: &Path, user: &VmmUser) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    std::fs::create_dir_all(dir).map_err(Error::host(format!("creating state directory {}", dir.display())))?;
    let meta = std::fs::symlink_metadata(dir).map_err(Error::host(format!("reading {}", dir.display())))?;
    if (meta.uid(), meta.gid()) == (user.uid, user.gid) {
        return Ok(());
    }
    chown_tree(dir, user)
}

fn chown_tree(path: &Path, user: &VmmUser) -> Result<()> {
    chown(path, user)?;
    let meta = std::fs::symlink_metadata(path).map_err(Error::host(format!("reading {}", path.display())))?;
    if meta.is_dir() {
        let entries = std::fs::read_dir(path).map_err(Error::host(format!("listing {}", path.display())))?;
        for entry in entries.flatten() {
            chown_tree(&entry.path(), user)?;
        }
    }
    Ok(())
}

fn chown(path: &Path, user: &VmmUser) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid)).map_err(Error::host(format!(
        "giving {} to user {}",
        path.display(),
        user.name
    )))
}

/// Start `cmd` (the VMM, given `handoff.to_arg()`) as `user`: the
/// handoff's descriptors inherited, no supplementary groups, every
/// capability gone (bounding and ambient sets included), `no_new_privs`,
/// and SIGKILL should this process die first (an orphaned VMM would hold
/// the TAPs with no one to clean up).
pub fn spawn(mut cmd: Command, handoff: &Handoff, user: &VmmUser) -> Result<Child> {
    let mut keep: Vec<RawFd> = handoff.kvm.iter().map(AsRawFd::as_raw_fd).collect();
    keep.extend(handoff.taps.iter().map(|t| t.fd.as_raw_fd()));
    keep.extend(handoff.paths.iter().map(|(_, fd)| fd.as_raw_fd()));
    keep.extend(handoff.ready.iter().map(AsRawFd::as_raw_fd));
    let (uid, gid) = (user.uid, user.gid);
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe system calls on values copied in.
    unsafe {
        cmd.pre_exec(move || drop_privileges(&keep, uid, gid));
    }
    cmd.spawn()
        .map_err(Error::host(format!("starting the VMM as user {}", user.name)))
}

/// In the child, before exec: see [`spawn`].
fn drop_privileges(keep: &[RawFd], uid: u32, gid: u32) -> std::io::Result<()> {
    let check = |rc: libc::c_int| {
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY: plain system calls on integers (see the caller).
    unsafe {
        for &fd in keep {
            check(libc::fcntl(fd, libc::F_SETFD, 0))?;
        }
        // The bounding set needs CAP_SETPCAP to shrink: while still root.
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) < 0
                && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        check(libc::setgroups(0, std::ptr::null()))?;
        check(libc::setresgid(gid, gid, gid))?;
        // From uid 0 to another, permitted, effective and ambient
        // capabilities are cleared (no SECBIT_KEEP_CAPS).
        check(libc::setresuid(uid, uid, uid))?;
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        // Set after the uid change, which clears it.
        check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
    }
    Ok(())
}

/// What `status` of a child VMM means as this process's own exit status
/// (128+N for a signal, as a shell reports it).
pub fn exit_status(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        (None, None) => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev_null() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    /// The argument names the same descriptors and facts, and the other
    /// side takes them over; bad descriptor numbers are refused.
    #[test]
    fn handoff_round_trip_and_refusals() {
        let handoff = Handoff {
            kvm: Some(dev_null()),
            taps: vec![HandoffTap {
                nic: 1,
                fd: dev_null(),
                ip: Some(Ipv4Addr::new(10, 77, 0, 5)),
            }],
            virtiofsd: vec![("project".into(), PathBuf::from("/state/overlay/project.sock"))],
            paths: vec![
                ("boot.kernel".into(), dev_null()),
                ("share.project.source".into(), dev_null()),
            ],
            rebooted: true,
            ready: None,
        };
        let arg = handoff.to_arg();
        let raw: Vec<RawFd> = handoff
            .kvm
            .iter()
            .chain(handoff.taps.iter().map(|t| &t.fd))
            .chain(handoff.paths.iter().map(|(_, fd)| fd))
            .map(AsRawFd::as_raw_fd)
            .collect();
        // The other side owns them now: forget ours without closing.
        let Handoff { kvm, taps, paths, .. } = handoff;
        std::mem::forget((kvm, taps, paths));
        let mut taken = Handoff::from_arg(&arg).unwrap();
        assert!(taken.rebooted);
        assert_eq!(taken.kvm.as_ref().map(AsRawFd::as_raw_fd), Some(raw[0]));
        let tap = taken.take_tap(1).unwrap();
        assert_eq!(
            (tap.fd.as_raw_fd(), tap.ip),
            (raw[1], Some(Ipv4Addr::new(10, 77, 0, 5)))
        );
        assert!(taken.take_tap(0).is_none());
        assert_eq!(
            taken.virtiofsd_socket("project"),
            Some(Path::new("/state/overlay/project.sock"))
        );
        let mut config = VmConfig::new("/boot/vmlinux");
        config.shares.push(crate::config::ShareConfig {
            tag: "project".into(),
            source: "/home/u/p".into(),
            overlay: true,
            persist: false,
            upper: None,
            backend: ShareBackend::Builtin,
            socket: None,
            mount: None,
            watch: false,
        });
        taken.apply_paths(&mut config);
        assert_eq!(config.boot.kernel, PathBuf::from(format!("/proc/self/fd/{}", raw[2])));
        assert_eq!(
            config.shares[0].source,
            PathBuf::from(format!("/proc/self/fd/{}", raw[3]))
        );
        // SAFETY: F_GETFD on a descriptor we own: close-on-exec again.
        assert_eq!(
            unsafe { libc::fcntl(raw[0], libc::F_GETFD) } & libc::FD_CLOEXEC,
            libc::FD_CLOEXEC
        );

        for bad in ["kvm = 1", "kvm = 999999", "[[tap]]\nnic = 0\nfd = 2", "surprise = 1"] {
            assert!(Handoff::from_arg(bad).is_err(), "{bad:?} was taken");
        }
        let fd = dev_null();
        let twice = format!(
            "[[path]]\nkey = \"boot.kernel\"\nfd = {0}\n[[path]]\nkey = \"boot.initrd\"\nfd = {0}\n",
            fd.as_raw_fd()
        );
        let e = Handoff::from_arg(&twice).unwrap_err();
        assert!(e.to_string().contains("named once"), "{e}");
        // The first was taken (and closed with the error); ours is gone.
        std::mem::forget(fd);
    }

    #[test]
    fn users_are_looked_up_and_root_is_refused() {
        assert!(VmmUser::lookup("root").unwrap_err().to_string().contains("root"));
        let e = VmmUser::lookup("no-such-user-mvm").unwrap_err();
        assert!(e.to_string().contains("useradd"), "{e}");
        let nobody = VmmUser::lookup("nobody").unwrap();
        assert_ne!(nobody.uid, 0);
    }
}
