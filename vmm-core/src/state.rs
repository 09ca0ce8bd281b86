//! The VM's state directory, `<state_root>/<name>/`: checks of the shares
//! and volumes that live there, and their preparation at start.
//!
//! Layout (docs/vm-toml.md has the user's view):
//!
//! ```text
//! <state_root>/<name>/
//!   lock                 held (flock) while an mvm-vmm runs this VM
//!   overlay/<tag>/       upper layer of share <tag> (default location)
//!   overlay/<tag>.work/  overlayfs work dir (virtiofsd backend only)
//!   volumes/<name>.ext4  raw ext4 image of volume <name>
//!   forwards.toml        port forwards added at run time (crate::network)
//!   control.sock         the running VMM's control socket (crate::control)
//! ```
//!
//! Checking happens before anything is created, so a bad configuration
//! leaves nothing on disk.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use crate::config::{
    RootConfig, ShareBackend, ShareConfig, VmConfig, VolumeConfig, MAX_NAME_LEN, MAX_TAG_LEN, MAX_VOLUME_MIB,
    MAX_VOLUME_NAME, ROOT_VOLUME,
};
use crate::{Error, Result};

/// The ext4 superblock magic and where it sits in an image.
const EXT4_MAGIC: u16 = 0xEF53;
const EXT4_MAGIC_OFFSET: usize = 1024 + 0x38;
/// Longest guest mount point accepted on the kernel command line.
const MAX_MOUNT_LEN: usize = 255;

/// Where a share's layers are on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareLayers {
    /// The read-only lower layer (the project), or the shared directory
    /// itself without an overlay.
    pub source: PathBuf,
    /// The writable upper layer, with an overlay.
    pub upper: Option<PathBuf>,
    /// Scratch directory kernel overlayfs needs beside the upper layer (on
    /// the same file system), for the virtiofsd backend.
    pub work: Option<PathBuf>,
}

/// A prepared state directory, locked for this VM while it lives.
#[derive(Debug)]
pub struct StateDir {
    pub path: PathBuf,
    _lock: File,
}

fn value(key: &'static str, value: impl std::fmt::Display, reason: impl Into<String>) -> Error {
    Error::ConfigValue {
        key,
        value: value.to_string(),
        reason: reason.into(),
    }
}

fn path_error(key: &'static str, path: &Path, reason: impl Into<String>) -> Error {
    Error::ConfigPath {
        key,
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Check every share and volume (and the VM name when a state directory is
/// needed) without touching the disk beyond reading.
pub(crate) fn validate(config: &VmConfig) -> Result<()> {
    if config.needs_state_dir() {
        check_name(&config.name)?;
    }
    let mut tags = std::collections::HashSet::new();
    for share in &config.shares {
        check_share(config, share)?;
        if !tags.insert(share.tag.as_str()) {
            return Err(value(
                "share.tag",
                format!("{:?}", share.tag),
                "two shares have this tag; each needs its own",
            ));
        }
    }
    let mut names = std::collections::HashSet::new();
    if let Some(root) = &config.root {
        check_root(config, root)?;
        names.insert(ROOT_VOLUME);
    }
    for volume in &config.volumes {
        check_volume(config, volume)?;
        if volume.name == ROOT_VOLUME && config.root.is_some() {
            return Err(value(
                "volume.name",
                format!("{:?}", volume.name),
                "reserved: [root] keeps its writable layer in volume \"root\"; rename this volume",
            ));
        }
        if !names.insert(volume.name.as_str()) {
            return Err(value(
                "volume.name",
                format!("{:?}", volume.name),
                "two volumes have this name; each needs its own",
            ));
        }
    }
    Ok(())
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(value(
            "name",
            format!("{name:?}"),
            format!("names a state directory: 1-{MAX_NAME_LEN} of [A-Za-z0-9._-], not starting with '.'"),
        ))
    }
}

fn check_mount(key: &'static str, mount: &Option<String>) -> Result<()> {
    let Some(mount) = mount else { return Ok(()) };
    // It travels on the kernel command line as `<name>:<mount>`.
    let ok = mount.starts_with('/')
        && mount.len() <= MAX_MOUNT_LEN
        && mount
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b':' && b != b',' && b != b'"')
        && !Path::new(mount).components().any(|c| c == Component::ParentDir);
    if ok {
        Ok(())
    } else {
        Err(value(
            key,
            format!("{mount:?}"),
            format!("an absolute guest path of at most {MAX_MOUNT_LEN} printable characters, without spaces, ':', ',', '\"' or '..'"),
        ))
    }
}

fn check_share(config: &VmConfig, share: &ShareConfig) -> Result<()> {
    let tag = &share.tag;
    if tag.is_empty()
        || tag.len() > MAX_TAG_LEN
        || !tag.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(value(
            "share.tag",
            format!("{tag:?}"),
            format!("1-{MAX_TAG_LEN} of [A-Za-z0-9._-] (the virtio-fs tag has {MAX_TAG_LEN} bytes)"),
        ));
    }
    check_mount("share.mount", &share.mount)?;
    if share.watch {
        let reason = if !share.overlay {
            Some("needs overlay = true (without it the guest's own writes would be echoed back)")
        } else if share.backend != ShareBackend::Builtin {
            Some("needs backend = \"builtin\" (the replay of host changes is answered by the built-in file server)")
        } else if config.vsock.is_none() {
            Some("needs a [vsock] section (host changes reach the guest agent over vsock)")
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(value("share.watch", "true", format!("share {tag:?}: {reason}")));
        }
    }
    if let Some(socket) = &share.socket {
        if share.backend != ShareBackend::Virtiofsd {
            return Err(path_error(
                "share.socket",
                socket,
                "only used with backend = \"virtiofsd\"",
            ));
        }
        if share.upper.is_some() {
            return Err(path_error(
                "share.upper",
                share.upper.as_deref().unwrap_or(Path::new("")),
                "the virtiofsd behind share.socket serves its own directory; an upper layer is not used",
            ));
        }
        let parent = socket
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !parent.is_dir() {
            return Err(path_error(
                "share.socket",
                socket,
                format!("directory {} does not exist", parent.display()),
            ));
        }
        return Ok(());
    }
    let source = &share.source;
    if source.as_os_str().is_empty() {
        return Err(value(
            "share.source",
            "(missing)",
            format!("share {tag:?} needs source = \"<host directory>\""),
        ));
    }
    match std::fs::metadata(source) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(path_error("share.source", source, "not a directory")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(path_error("share.source", source, "directory not found"))
        }
        Err(e) => return Err(path_error("share.source", source, format!("cannot use: {e}"))),
    }
    if !share.overlay {
        if let Some(upper) = &share.upper {
            return Err(path_error("share.upper", upper, "only used with overlay = true"));
        }
        return Ok(());
    }
    let upper = upper_dir(config, share);
    let (source_real, upper_real) = (real_path(source), real_path(&upper));
    let key = if share.upper.is_some() {
        "share.upper"
    } else {
        "state_root"
    };
    if upper_real.starts_with(&source_real) {
        return Err(path_error(
            key,
            &upper,
            format!(
                "the upper layer would be inside the shared source {}; put it elsewhere",
                source.display()
            ),
        ));
    }
    if source_real.starts_with(&upper_real) {
        return Err(path_error(
            key,
            &upper,
            format!("the shared source {} is inside the upper layer", source.display()),
        ));
    }
    if upper.exists() && !upper.is_dir() {
        return Err(path_error(key, &upper, "exists and is not a directory"));
    }
    Ok(())
}

fn check_root(config: &VmConfig, root: &RootConfig) -> Result<()> {
    crate::config::check_file("root.image", &root.image)?;
    if !is_ext4(&root.image) {
        return Err(path_error(
            "root.image",
            &root.image,
            "not an ext4 image (no ext4 superblock); build one with `mvm image build`",
        ));
    }
    if config.boot.initrd.is_none() {
        return Err(value(
            "boot.initrd",
            "(none)",
            "[root] needs an initrd whose init is mvm-agent (it mounts the image); set boot.initrd",
        ));
    }
    if root.size_mib == 0 || root.size_mib > MAX_VOLUME_MIB {
        return Err(value(
            "root.size_mib",
            root.size_mib,
            format!("must be between 1 and {MAX_VOLUME_MIB}"),
        ));
    }
    match root.volume() {
        Some(volume) => check_volume(config, &volume),
        None => Ok(()),
    }
}

fn check_volume(config: &VmConfig, volume: &VolumeConfig) -> Result<()> {
    let name = &volume.name;
    if name.is_empty()
        || name.len() > MAX_VOLUME_NAME
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-".contains(&b))
    {
        return Err(value(
            "volume.name",
            format!("{name:?}"),
            format!("1-{MAX_VOLUME_NAME} of [a-z0-9_-]"),
        ));
    }
    if volume.size_mib == 0 || volume.size_mib > MAX_VOLUME_MIB {
        return Err(value(
            "volume.size_mib",
            volume.size_mib,
            format!("must be between 1 and {MAX_VOLUME_MIB}"),
        ));
    }
    check_mount("volume.mount", &volume.mount)?;
    let image = volume_image(config, volume);
    match std::fs::symlink_metadata(&image) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(path_error(
            "volume.name",
            &image,
            format!("cannot use the volume image: {e}"),
        )),
        Ok(m) if !m.is_file() => Err(path_error(
            "volume.name",
            &image,
            "exists but is not a volume image (not a regular file); move it away",
        )),
        Ok(_) if !is_ext4(&image) => Err(path_error(
            "volume.name",
            &image,
            "exists but is not a volume image (no ext4 superblock); move it away",
        )),
        Ok(_) => Ok(()),
    }
}

fn is_ext4(path: &Path) -> bool {
    let mut head = [0u8; EXT4_MAGIC_OFFSET + 2];
    File::open(path).and_then(|mut f| f.read_exact(&mut head)).is_ok()
        && u16::from_le_bytes([head[EXT4_MAGIC_OFFSET], head[EXT4_MAGIC_OFFSET + 1]]) == EXT4_MAGIC
}

/// The path with symlinks resolved as far as it exists, the rest appended
/// (an upper layer that is not created yet still compares correctly).
fn real_path(path: &Path) -> PathBuf {
    let mut rest = Vec::new();
    let mut cur = path.to_path_buf();
    loop {
        if let Ok(real) = cur.canonicalize() {
            return rest.iter().rev().fold(real, |p, c| p.join(c));
        }
        match (cur.file_name().map(|n| n.to_os_string()), cur.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                cur = parent.to_path_buf();
            }
            _ => return path.to_path_buf(),
        }
    }
}

/// The share's upper layer directory.
pub fn upper_dir(config: &VmConfig, share: &ShareConfig) -> PathBuf {
    share
        .upper
        .clone()
        .unwrap_or_else(|| config.state_dir().join("overlay").join(&share.tag))
}

/// The volume's image file.
pub fn volume_image(config: &VmConfig, volume: &VolumeConfig) -> PathBuf {
    config.state_dir().join("volumes").join(format!("{}.ext4", volume.name))
}

/// The disk serial a volume gets (the guest finds it by this).
pub fn volume_serial(volume: &VolumeConfig) -> String {
    format!("vol-{}", volume.name)
}

impl StateDir {
    /// The locked file's descriptor.
    pub fn lock_fd(&self) -> std::os::fd::RawFd {
        self._lock.as_raw_fd()
    }
}

/// Create and lock the state directory when the VM needs one. Fails when
/// another process runs this VM.
pub(crate) fn open(config: &VmConfig) -> Result<Option<StateDir>> {
    if !config.needs_state_dir() {
        return Ok(None);
    }
    let path = config.state_dir();
    std::fs::create_dir_all(&path).map_err(Error::host(format!("creating state directory {}", path.display())))?;
    let lock_path = path.join("lock");
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(Error::host(format!("opening {}", lock_path.display())))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(Error::AlreadyRunning {
            name: config.name.clone(),
            lock: lock_path,
        });
    }
    Ok(Some(StateDir { path, _lock: lock }))
}

/// Make a share's layers ready: the upper layer exists (emptied unless it
/// persists) and so does the work dir the virtiofsd backend needs.
pub(crate) fn prepare_share(config: &VmConfig, share: &ShareConfig) -> Result<ShareLayers> {
    if !share.overlay {
        return Ok(ShareLayers {
            source: share.source.clone(),
            upper: None,
            work: None,
        });
    }
    let upper = upper_dir(config, share);
    let fresh = !share.persist || !upper.exists();
    if !share.persist && upper.exists() {
        empty_dir(&upper).map_err(Error::host(format!("emptying the upper layer {}", upper.display())))?;
    }
    std::fs::create_dir_all(&upper).map_err(Error::host(format!("creating the upper layer {}", upper.display())))?;
    if fresh {
        like_lower_root(&share.source, &upper).map_err(Error::host(format!(
            "giving {} the owner and mode of {}",
            upper.display(),
            share.source.display()
        )))?;
    }
    let work = match share.backend {
        ShareBackend::Virtiofsd => {
            let name = upper
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let work = upper.with_file_name(format!("{name}.work"));
            // overlayfs wants an empty work dir it owns; stale contents of a
            // killed run are removed.
            if work.exists() {
                empty_dir(&work).map_err(Error::host(format!("emptying {}", work.display())))?;
            }
            std::fs::create_dir_all(&work).map_err(Error::host(format!("creating {}", work.display())))?;
            Some(work)
        }
        ShareBackend::Builtin => None,
    };
    Ok(ShareLayers {
        source: share.source.clone(),
        upper: Some(upper),
        work,
    })
}

/// The merged view's root is the upper layer's root directory: it gets
/// the lower root's owner and mode, so that the guest sees the project
/// directory as the host has it (the guest user who owns it may create
/// files in it). A persistent upper layer keeps what the guest made of
/// it. Ownership is given only when we may (as root).
fn like_lower_root(lower: &Path, upper: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(lower)?;
    match std::os::unix::fs::chown(upper, Some(meta.uid()), Some(meta.gid())) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
        other => other?,
    }
    let mut mode = meta.mode() & 0o7777;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        // Without root's rights the file server needs its own access.
        mode |= 0o700;
    }
    std::fs::set_permissions(upper, std::fs::Permissions::from_mode(mode))
}

/// Remove everything inside `dir` (not `dir` itself), without following
/// symlinks out of it.
fn empty_dir(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            // overlayfs leaves `work/work` mode 000; make it removable.
            let _ = std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o700));
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// The volume's image, created and formatted on first use. The new image
/// is built under a temporary name and renamed into place, so a start that
/// is interrupted never leaves a half-made image under the volume's name.
pub(crate) fn prepare_volume(config: &VmConfig, volume: &VolumeConfig) -> Result<PathBuf> {
    let image = volume_image(config, volume);
    if image.exists() {
        return Ok(image);
    }
    let dir = image.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(Error::host(format!("creating {}", dir.display())))?;
    let tmp = dir.join(format!(".{}.ext4.tmp-{}", volume.name, std::process::id()));
    let made = (|| {
        let file = File::create(&tmp).map_err(Error::host(format!("creating {}", tmp.display())))?;
        file.set_len(volume.size_mib << 20).map_err(Error::host(format!(
            "sizing {} to {} MiB",
            tmp.display(),
            volume.size_mib
        )))?;
        drop(file);
        let mkfs = find_tool("mkfs.ext4").ok_or_else(|| {
            path_error(
                "volume.name",
                &image,
                "mkfs.ext4 not found: install e2fsprogs to create volumes",
            )
        })?;
        // Inode tables and journal are written now, on the host, instead
        // of lazily by the guest kernel (slow where it is interpreted).
        // The new file is sparse, so it reads as zeroes: e2fsprogs 1.47+
        // can skip writing them (a few MiB of host disk instead of tens);
        // older ones reject the option and format the long way.
        let mkfs_with = |extended: &str| {
            Command::new(&mkfs)
                .args(["-q", "-F", "-m", "0", "-E", extended, "-L"])
                .arg(&volume.name)
                .arg(&tmp)
                .output()
                .map_err(Error::host(format!("running {}", mkfs.display())))
        };
        let mut out = mkfs_with("lazy_itable_init=0,lazy_journal_init=0,assume_storage_prezeroed=1")?;
        if !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("assume_storage_prezeroed") {
            out = mkfs_with("lazy_itable_init=0,lazy_journal_init=0")?;
        }
        if !out.status.success() {
            return Err(path_error(
                "volume.name",
                &image,
                format!(
                    "mkfs.ext4 failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
        std::fs::rename(&tmp, &image).map_err(Error::host(format!("renaming {} into place", tmp.display())))
    })();
    if made.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    made.map(|()| image)
}

/// A system tool on PATH or in the sbin directories a non-root PATH lacks.
pub use mvm_net::host::find_tool;

/// The kernel command line words that tell the guest's init what to mount
/// and configure: `mvm.root=volume|tmpfs` (the image is the disk with
/// serial `mvm-root`), `mvm.share=<tag>:<mount>`,
/// `mvm.volume=<name>:<mount>` (the volume's disk has serial
/// `vol-<name>`), `mvm.dhcp=ethN` for each NIC on a managed network.
pub fn guest_init_args(config: &VmConfig) -> Vec<String> {
    // The root first: the agent switches to it before mounting the rest.
    let root = config.root.as_ref().map(|r| match r.upper {
        crate::config::RootUpper::Volume => "mvm.root=volume".to_string(),
        crate::config::RootUpper::Tmpfs => "mvm.root=tmpfs".to_string(),
    });
    let shares = config
        .shares
        .iter()
        .filter_map(|s| s.mount.as_ref().map(|m| format!("mvm.share={}:{m}", s.tag)));
    let volumes = config
        .volumes
        .iter()
        .filter_map(|v| v.mount.as_ref().map(|m| format!("mvm.volume={}:{m}", v.name)));
    // NICs on managed networks get their address by DHCP.
    let dhcp = config
        .nets
        .iter()
        .enumerate()
        .filter(|(_, n)| n.network.is_some())
        .map(|(i, _)| format!("mvm.dhcp=eth{i}"));
    root.into_iter().chain(shares).chain(volumes).chain(dhcp).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Tmp(PathBuf);
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tmp(name: &str) -> Tmp {
        let dir = std::env::temp_dir().join(format!("mvm-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("project")).unwrap();
        Tmp(dir)
    }

    fn config(dir: &Path, extra: &str) -> VmConfig {
        let text = format!("version = 1\nname = \"vm1\"\nstate_root = \"state\"\n[boot]\nkernel = \"k\"\n{extra}");
        VmConfig::from_toml(&text, "vm.toml", dir).unwrap()
    }

    fn err(dir: &Path, extra: &str) -> String {
        let c = config(dir, extra);
        let e = validate(&c).unwrap_err();
        assert!(e.is_config_error(), "{e}");
        e.to_string()
    }

    /// Nothing below the state root may be created by a failed check.
    fn nothing_created(dir: &Path) {
        assert!(!dir.join("state").exists(), "state dir created by a failed check");
    }

    #[test]
    fn good_share_and_volume_validate_and_prepare() {
        let t = tmp("good");
        let c = config(
            &t.0,
            "[[share]]\ntag = \"project\"\nsource = \"project\"\nmount = \"/project\"\n[[volume]]\nname = \"data\"\nsize_mib = 8\nmount = \"/data\"\n",
        );
        validate(&c).unwrap();
        assert_eq!(c.state_dir(), t.0.join("state/vm1"));
        assert_eq!(
            guest_init_args(&c),
            vec!["mvm.share=project:/project", "mvm.volume=data:/data"]
        );
        let state = open(&c).unwrap().unwrap();
        // A second opener of the same VM is refused while the first lives.
        assert!(matches!(open(&c), Err(Error::AlreadyRunning { .. })));
        let layers = prepare_share(&c, &c.shares[0]).unwrap();
        let upper = t.0.join("state/vm1/overlay/project");
        assert_eq!(layers.upper.as_deref(), Some(upper.as_path()));
        assert!(upper.is_dir());
        // The merged root looks like the project's: its owner and mode.
        {
            use std::os::unix::fs::MetadataExt;
            let project = t.0.join("project");
            std::fs::set_permissions(&project, std::os::unix::fs::PermissionsExt::from_mode(0o750)).unwrap();
            // SAFETY: no preconditions.
            let root = unsafe { libc::geteuid() } == 0;
            if root {
                std::os::unix::fs::chown(&project, Some(1234), Some(1235)).unwrap();
            }
            prepare_share(&c, &c.shares[0]).unwrap();
            let meta = std::fs::metadata(&upper).unwrap();
            // (Without root the server keeps rwx for itself: 0o750 has it.)
            assert_eq!(meta.mode() & 0o777, 0o750);
            if root {
                assert_eq!((meta.uid(), meta.gid()), (1234, 1235));
            }
        }
        // Not persistent: emptied at the next start.
        std::fs::write(upper.join("leftover"), b"x").unwrap();
        prepare_share(&c, &c.shares[0]).unwrap();
        assert!(!upper.join("leftover").exists());
        let image = prepare_volume(&c, &c.volumes[0]).unwrap();
        assert_eq!(std::fs::metadata(&image).unwrap().len(), 8 << 20);
        assert!(is_ext4(&image));
        // Reused as it is on the next start.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&image)
            .unwrap()
            .set_len(9 << 20)
            .unwrap();
        prepare_volume(&c, &c.volumes[0]).unwrap();
        assert_eq!(std::fs::metadata(&image).unwrap().len(), 9 << 20);
        validate(&c).unwrap();
        drop(state);
        assert!(open(&c).unwrap().is_some());
    }

    #[test]
    fn persistent_upper_is_kept() {
        let t = tmp("persist");
        let c = config(
            &t.0,
            "[[share]]\ntag = \"p\"\nsource = \"project\"\npersist = true\nbackend = \"virtiofsd\"\n",
        );
        validate(&c).unwrap();
        let layers = prepare_share(&c, &c.shares[0]).unwrap();
        let upper = layers.upper.unwrap();
        std::fs::write(upper.join("kept"), b"x").unwrap();
        // What the guest made of the root directory stays too.
        std::fs::set_permissions(&upper, std::os::unix::fs::PermissionsExt::from_mode(0o751)).unwrap();
        let layers = prepare_share(&c, &c.shares[0]).unwrap();
        assert!(layers.upper.as_ref().unwrap().join("kept").exists());
        let mode = std::os::unix::fs::MetadataExt::mode(&std::fs::metadata(layers.upper.unwrap()).unwrap());
        assert_eq!(mode & 0o777, 0o751);
        assert_eq!(layers.work.unwrap(), t.0.join("state/vm1/overlay/p.work"));
    }

    #[test]
    fn bad_shares_name_the_key_and_create_nothing() {
        let t = tmp("bad");
        std::fs::write(t.0.join("file"), b"x").unwrap();
        std::os::unix::fs::symlink("project", t.0.join("link")).unwrap();
        let cases: &[(&str, &str)] = &[
            ("[[share]]\ntag = \"p\"\nsource = \"missing\"\n", "share.source = "),
            ("[[share]]\ntag = \"p\"\nsource = \"file\"\n", "not a directory"),
            ("[[share]]\ntag = \"p\"\n", "share.source = (missing)"),
            (
                "[[share]]\ntag = \"p\"\nsource = \"project\"\nwatch = true\n",
                "needs a [vsock] section",
            ),
            (
                "[[share]]\ntag = \"p\"\nsource = \"project\"\nwatch = true\noverlay = false\n",
                "needs overlay = true",
            ),
            (
                "[[share]]\ntag = \"p\"\nsource = \"project\"\nupper = \"project/up\"\n",
                "share.upper = ",
            ),
            (
                "[[share]]\ntag = \"p\"\nsource = \"link\"\nupper = \"project/x\"\n",
                "inside the shared source",
            ),
            (
                "[[share]]\ntag = \"p\"\nsource = \"project\"\nupper = \".\"\n",
                "is inside the upper layer",
            ),
            (
                "[[share]]\ntag = \"p\"\nsource = \"project\"\n[[share]]\ntag = \"p\"\nsource = \"project\"\n",
                "two shares have this tag",
            ),
            (
                "[[share]]\ntag = \"0123456789012345678901234567890123456\"\nsource = \"project\"\n",
                "share.tag = ",
            ),
            ("[[share]]\ntag = \"a b\"\nsource = \"project\"\n", "share.tag = "),
            ("[[share]]\ntag = \"\"\nsource = \"project\"\n", "share.tag = "),
            (
                "[[share]]\ntag = \"p\"\nsource = \"project\"\nmount = \"rel\"\n",
                "share.mount = ",
            ),
            (
                "[[share]]\ntag = \"p\"\nsource = \"project\"\nmount = \"/a b\"\n",
                "share.mount = ",
            ),
            (
                "[[share]]\ntag = \"p\"\nsource = \"project\"\noverlay = false\nupper = \"/tmp/u\"\n",
                "only used with overlay",
            ),
            ("[[share]]\ntag = \"p\"\nsocket = \"s.sock\"\n", "share.socket = "),
            ("[[volume]]\nname = \"data\"\nsize_mib = 0\n", "volume.size_mib = 0"),
            ("[[volume]]\nname = \"Data\"\nsize_mib = 1\n", "volume.name = "),
            (
                "[[volume]]\nname = \"abcdefghijklmnopq\"\nsize_mib = 1\n",
                "volume.name = ",
            ),
            (
                "[[volume]]\nname = \"d\"\nsize_mib = 1\n[[volume]]\nname = \"d\"\nsize_mib = 1\n",
                "two volumes have this name",
            ),
        ];
        for (extra, want) in cases {
            let e = err(&t.0, extra);
            assert!(e.contains(want), "{extra}: {e}");
            nothing_created(&t.0);
        }
        // An existing file that is not an ext4 image is not taken over.
        let c = config(&t.0, "[[volume]]\nname = \"d\"\nsize_mib = 1\n");
        let image = volume_image(&c, &c.volumes[0]);
        std::fs::create_dir_all(image.parent().unwrap()).unwrap();
        std::fs::write(&image, vec![0u8; 4096]).unwrap();
        let e = validate(&c).unwrap_err().to_string();
        assert!(
            e.starts_with("volume.name = ") && e.contains("not a volume image"),
            "{e}"
        );
    }

    #[test]
    fn root_image_with_volume_or_tmpfs_upper() {
        let t = tmp("root");
        // A real (small) ext4 image, made the way volumes are.
        let c = config(&t.0, "[[volume]]\nname = \"img\"\nsize_mib = 4\n");
        let image = prepare_volume(&c, &c.volumes[0]).unwrap();
        std::fs::rename(&image, t.0.join("rootfs.ext4")).unwrap();
        std::fs::remove_dir_all(t.0.join("state")).unwrap();
        std::fs::write(t.0.join("i"), b"initrd").unwrap();

        let c = config(&t.0, "initrd = \"i\"\n[root]\nimage = \"rootfs.ext4\"\n");
        validate(&c).unwrap();
        let root = c.root.as_ref().unwrap();
        assert_eq!(root.size_mib, crate::config::DEFAULT_ROOT_MIB);
        assert_eq!(root.volume().unwrap().name, ROOT_VOLUME);
        assert!(c.needs_state_dir());
        assert_eq!(guest_init_args(&c), vec!["mvm.root=volume"]);

        let c = config(
            &t.0,
            "initrd = \"i\"\n[root]\nimage = \"rootfs.ext4\"\nupper = \"tmpfs\"\n[[share]]\ntag = \"p\"\nsource = \"project\"\nmount = \"/p\"\n",
        );
        validate(&c).unwrap();
        assert_eq!(c.root.as_ref().unwrap().volume(), None);
        // The root goes first: the agent switches to it before the rest.
        assert_eq!(guest_init_args(&c), vec!["mvm.root=tmpfs", "mvm.share=p:/p"]);
        nothing_created(&t.0);

        let cases: &[(&str, &str)] = &[
            ("initrd = \"i\"\n[root]\nimage = \"nope.ext4\"\n", "root.image = "),
            ("initrd = \"i\"\n[root]\nimage = \"i\"\n", "not an ext4 image"),
            ("[root]\nimage = \"rootfs.ext4\"\n", "boot.initrd = (none)"),
            (
                "initrd = \"i\"\n[root]\nimage = \"rootfs.ext4\"\nsize_mib = 0\n",
                "root.size_mib = 0",
            ),
            (
                "initrd = \"i\"\n[root]\nimage = \"rootfs.ext4\"\n[[volume]]\nname = \"root\"\nsize_mib = 1\n",
                "reserved",
            ),
        ];
        for (extra, want) in cases {
            let e = err(&t.0, extra);
            assert!(e.contains(want), "{extra}: {e}");
            nothing_created(&t.0);
        }
        let text = "version = 1\n[boot]\nkernel = \"k\"\n[root]\nimage = \"r\"\nupper = \"disk\"\n";
        let e = VmConfig::from_toml(text, "vm.toml", &t.0).unwrap_err().to_string();
        assert!(e.contains("unknown variant `disk`"), "{e}");
    }

    #[test]
    fn bad_vm_name_only_matters_with_a_state_dir() {
        let t = tmp("name");
        let text = "version = 1\nname = \"../x\"\nstate_root = \"state\"\n[boot]\nkernel = \"k\"\n";
        let c = VmConfig::from_toml(text, "vm.toml", &t.0).unwrap();
        validate(&c).unwrap();
        let text = format!("{text}[[volume]]\nname = \"d\"\nsize_mib = 1\n");
        let c = VmConfig::from_toml(&text, "vm.toml", &t.0).unwrap();
        assert!(validate(&c).unwrap_err().to_string().starts_with("name = \"../x\""));
    }

    #[test]
    fn state_root_defaults() {
        let c = VmConfig::from_toml("version = 1\n[boot]\nkernel = \"k\"\n", "vm.toml", Path::new("/x")).unwrap();
        assert_eq!(c.state_root, crate::config::default_state_root());
    }
}
