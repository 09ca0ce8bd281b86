//! A host overlay mount for the virtiofsd backend: the project directory
//! as the read-only lower layer, a per-VM upper directory for the guest's
//! changes, merged at a directory that virtiofsd then shares.
//!
//! Kernel overlayfs with `userxattr`, so the upper layer has the same
//! on-disk format the in-process [`super::overlay`] uses: whiteouts are
//! character devices 0/0, opaque directories carry `user.overlay.opaque`.
//! Mounting needs `CAP_SYS_ADMIN`; without it, `fuse-overlayfs` is used
//! when installed (its unprivileged upper layer differs: whiteouts are
//! `.wh.` files, since only root may create device nodes).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::Error;

/// How the merged view is mounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverlayKind {
    /// Kernel overlayfs through mount(2).
    Kernel,
    /// The `fuse-overlayfs` program (no privilege needed).
    Fuse,
}

/// A mounted overlay; unmounted (lazily, so a process still inside does
/// not keep it busy) and its mountpoint removed on drop.
#[derive(Debug)]
pub struct HostOverlay {
    lower: PathBuf,
    merged: PathBuf,
    /// A read-only, noatime bind mount of `lower` that the kernel overlay
    /// uses as its lower layer: overlayfs's copy-up opens lower files
    /// without O_NOATIME, which would touch the project's atimes, and the
    /// read-only mount makes "never written" a property of the mount.
    lower_view: Option<PathBuf>,
    kind: OverlayKind,
    mounted: bool,
}

impl HostOverlay {
    /// The work directory overlayfs needs next to `upper` (it must be on
    /// the same file system): `<upper>.work`.
    pub fn work_dir_for(upper: &Path) -> PathBuf {
        let mut name = upper.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        name.push(".work");
        upper.with_file_name(name)
    }

    /// Mount `lower` (read-only, never written) under `upper` at `merged`,
    /// with [`Self::work_dir_for`]`(upper)` as the work directory. `upper`,
    /// the work directory and `merged` are created when missing; `merged`
    /// must be empty.
    pub fn mount(lower: &Path, upper: &Path, merged: &Path) -> Result<Self, Error> {
        let err = |reason: String| Error::HostOverlay {
            lower: lower.to_path_buf(),
            merged: merged.to_path_buf(),
            reason,
        };
        if !lower.is_dir() {
            return Err(err("the project directory does not exist or is not a directory".into()));
        }
        let work = Self::work_dir_for(upper);
        while is_mountpoint(merged) {
            // Left by a VMM that was killed before it could unmount.
            log::warn!("unmounting a stale mount at {}", merged.display());
            umount_lazy(merged).map_err(|e| err(format!("cannot unmount what is mounted there already: {e}")))?;
        }
        for (what, dir) in [("upper", upper), ("work", work.as_path()), ("mount", merged)] {
            std::fs::create_dir_all(dir)
                .map_err(|e| err(format!("cannot create the {what} directory {}: {e}", dir.display())))?;
        }
        let absolute = |p: &Path| std::fs::canonicalize(p).map_err(|e| err(format!("{}: {e}", p.display())));
        let (lower_abs, upper_abs, work_abs) = (absolute(lower)?, absolute(upper)?, absolute(&work)?);
        // Option values cannot carry these (',' separates options, ':'
        // separates lower layers).
        for p in [&lower_abs, &upper_abs, &work_abs] {
            if p.as_os_str()
                .as_bytes()
                .iter()
                .any(|b| matches!(b, b',' | b':' | b'\\'))
            {
                return Err(err(format!(
                    "{} contains ',', ':' or '\\', which overlay mount options cannot express; use another path",
                    p.display()
                )));
            }
        }
        let options = |lower: &Path| {
            format!(
                "lowerdir={},upperdir={},workdir={}",
                lower.display(),
                upper_abs.display(),
                work_abs.display()
            )
        };
        let view = sibling(merged, "lower");
        let lower_view = match bind_read_only(&lower_abs, &view) {
            Ok(()) => Some(view),
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => None,
            Err(e) => {
                return Err(err(format!(
                    "cannot bind-mount the project read-only at {}: {e}",
                    view.display()
                )))
            }
        };
        let kernel_options = format!("{},userxattr", options(lower_view.as_deref().unwrap_or(&lower_abs)));
        let options = options(&lower_abs);
        let kind = match mount_kernel(&kernel_options, merged) {
            Ok(()) => OverlayKind::Kernel,
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                mount_fuse(&options, merged).map_err(|reason| {
                    err(format!(
                        "mounting overlayfs needs root (CAP_SYS_ADMIN), and fuse-overlayfs {reason}; \
                         run as root, install fuse-overlayfs, or use the in-process backend"
                    ))
                })?;
                OverlayKind::Fuse
            }
            Err(e) => {
                if let Some(view) = &lower_view {
                    let _ = unmount_view(view);
                }
                return Err(err(format!("mount -t overlay -o {kernel_options}: {e}")));
            }
        };
        // fuse-overlayfs reads the project itself (it could not use a bind
        // mount made by root anyway); keep no view for it.
        let lower_view = match kind {
            OverlayKind::Kernel => lower_view,
            OverlayKind::Fuse => {
                if let Some(view) = &lower_view {
                    let _ = unmount_view(view);
                }
                None
            }
        };
        log::debug!("overlay {options} mounted at {} ({kind:?})", merged.display());
        Ok(HostOverlay {
            lower: lower.to_path_buf(),
            merged: merged.to_path_buf(),
            lower_view,
            kind,
            mounted: true,
        })
    }

    /// Where the merged view is.
    pub fn merged(&self) -> &Path {
        &self.merged
    }

    /// The read-only layer.
    pub fn lower(&self) -> &Path {
        &self.lower
    }

    pub fn kind(&self) -> OverlayKind {
        self.kind
    }

    /// Unmount and remove the mountpoint; idempotent. The upper and work
    /// directories stay: they are the VM's changes.
    pub fn unmount(&mut self) {
        if !std::mem::take(&mut self.mounted) {
            return;
        }
        let result = match self.kind {
            OverlayKind::Kernel => umount_lazy(&self.merged),
            OverlayKind::Fuse => fusermount_unmount(&self.merged),
        };
        match result {
            Ok(()) => {
                if let Err(e) = std::fs::remove_dir(&self.merged) {
                    log::warn!("cannot remove the overlay mountpoint {}: {e}", self.merged.display());
                }
            }
            Err(e) => log::error!("cannot unmount the overlay at {}: {e}", self.merged.display()),
        }
        if let Some(view) = self.lower_view.take() {
            if let Err(e) = unmount_view(&view) {
                log::error!("cannot unmount the project's read-only view at {}: {e}", view.display());
            }
        }
    }
}

/// `<dir>/<name>.<ext>` for `<dir>/<name>`.
fn sibling(path: &Path, ext: &str) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".");
    name.push(ext);
    path.with_file_name(name)
}

/// Bind-mount `source` at `view` (created when missing; a stale mount
/// there is replaced), then make that mount read-only and noatime.
fn bind_read_only(source: &Path, view: &Path) -> std::io::Result<()> {
    while is_mountpoint(view) {
        log::warn!("unmounting a stale mount at {}", view.display());
        umount_lazy(view)?;
    }
    std::fs::create_dir_all(view)?;
    let (src, target) = (cstring(source)?, cstring(view)?);
    // SAFETY: valid NUL-terminated paths; no data argument.
    if unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    } != 0
    {
        let e = std::io::Error::last_os_error();
        let _ = std::fs::remove_dir(view);
        return Err(e);
    }
    let flags =
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOATIME | libc::MS_NODEV | libc::MS_NOSUID;
    // SAFETY: as above; a remount of the bind mount just made.
    if unsafe {
        libc::mount(
            std::ptr::null(),
            target.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    } != 0
    {
        let e = std::io::Error::last_os_error();
        let _ = unmount_view(view);
        return Err(e);
    }
    Ok(())
}

fn unmount_view(view: &Path) -> std::io::Result<()> {
    umount_lazy(view)?;
    std::fs::remove_dir(view)
}

impl Drop for HostOverlay {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// Whether something is mounted at `dir` (from /proc/self/mountinfo: a
/// bind mount of the same file system has its parent's device number, so
/// comparing st_dev would miss it).
fn is_mountpoint(dir: &Path) -> bool {
    let Ok(dir) = std::fs::canonicalize(dir) else {
        return false;
    };
    mount_points().is_ok_and(|points| points.contains(&dir))
}

/// Every mount point of this process's mount namespace, from
/// /proc/self/mountinfo.
pub fn mount_points() -> std::io::Result<Vec<PathBuf>> {
    use std::os::unix::ffi::OsStringExt;
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|point| PathBuf::from(std::ffi::OsString::from_vec(unescape_mountinfo(point))))
        .collect())
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .and_then(|d| std::str::from_utf8(d).ok().and_then(|d| u8::from_str_radix(d, 8).ok()));
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

fn cstring(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
}

fn mount_kernel(options: &str, merged: &Path) -> std::io::Result<()> {
    let target = cstring(merged)?;
    let data = CString::new(options).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: all strings are valid and NUL-terminated for the call.
    let rc = unsafe {
        libc::mount(
            c"overlay".as_ptr(),
            target.as_ptr(),
            c"overlay".as_ptr(),
            libc::MS_NODEV | libc::MS_NOSUID,
            data.as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn umount_lazy(merged: &Path) -> std::io::Result<()> {
    let target = cstring(merged)?;
    // SAFETY: a valid path string; MNT_DETACH is a valid flag.
    if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Mount with fuse-overlayfs, which returns once the mount is in place.
fn mount_fuse(options: &str, merged: &Path) -> Result<(), String> {
    let out = mvm_devices::unblock_signals_in_child(&mut Command::new("fuse-overlayfs"))
        .arg("-o")
        .arg(options)
        .arg(merged)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .output()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                "is not installed (Debian: apt-get install fuse-overlayfs)".to_string()
            } else {
                format!("cannot run: {e}")
            }
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn fusermount_unmount(merged: &Path) -> std::io::Result<()> {
    let mut last = std::io::Error::from(std::io::ErrorKind::NotFound);
    for prog in ["fusermount3", "fusermount"] {
        match Command::new(prog)
            .arg("-u")
            .arg("-z")
            .arg(merged)
            .stdin(Stdio::null())
            .output()
        {
            Ok(out) if out.status.success() => return Ok(()),
            Ok(out) => {
                return Err(std::io::Error::other(format!(
                    "{prog}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )))
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    fn is_mountpoint(p: &Path) -> bool {
        let p = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(p.to_str().unwrap()))
    }

    #[test]
    fn mountinfo_unescapes() {
        assert_eq!(unescape_mountinfo("/a\\040b\\134c"), b"/a b\\c");
        assert_eq!(unescape_mountinfo("/x\\04"), b"/x\\04");
        assert!(mount_points().unwrap().contains(&PathBuf::from("/")));
    }

    fn getxattr(p: &Path, name: &str) -> Option<Vec<u8>> {
        let path = cstring(p).unwrap();
        let name = CString::new(name).unwrap();
        let mut buf = [0u8; 64];
        // SAFETY: valid strings and buffer.
        let n = unsafe { libc::lgetxattr(path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        (n >= 0).then(|| buf[..n as usize].to_vec())
    }

    #[test]
    fn work_dir_is_a_sibling_of_upper() {
        assert_eq!(
            HostOverlay::work_dir_for(Path::new("/state/vm1/upper")),
            Path::new("/state/vm1/upper.work")
        );
    }

    #[test]
    fn unusable_paths_are_refused() {
        let base = std::env::temp_dir().join(format!("mvm-hostovl-bad-{}", std::process::id()));
        let err = HostOverlay::mount(&base.join("nope"), &base.join("u"), &base.join("m")).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        let lower = base.join("a,b");
        std::fs::create_dir_all(&lower).unwrap();
        let err = HostOverlay::mount(&lower, &base.join("u"), &base.join("m")).unwrap_err();
        assert!(err.to_string().contains("cannot express"), "{err}");
        std::fs::remove_dir_all(base).unwrap();
    }

    /// Needs root (CAP_SYS_ADMIN); skipped otherwise.
    #[test]
    fn changes_land_in_upper_in_the_userxattr_format() {
        // SAFETY: no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("not root: kernel overlay mount not tested");
            return;
        }
        let base = std::env::temp_dir().join(format!("mvm-hostovl-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (lower, upper, merged) = (base.join("project"), base.join("vm/upper"), base.join("vm/merged"));
        std::fs::create_dir_all(lower.join("dir")).unwrap();
        std::fs::write(lower.join("gone.txt"), "lower").unwrap();
        std::fs::write(lower.join("kept.txt"), "lower").unwrap();
        std::fs::write(lower.join("dir/inner"), "x").unwrap();

        let mut ovl = HostOverlay::mount(&lower, &upper, &merged).unwrap();
        assert_eq!(ovl.kind(), OverlayKind::Kernel);
        assert!(is_mountpoint(&merged));
        assert_eq!(std::fs::read_to_string(merged.join("kept.txt")).unwrap(), "lower");

        std::fs::remove_file(merged.join("gone.txt")).unwrap();
        std::fs::write(merged.join("new.txt"), "upper").unwrap();
        std::fs::write(merged.join("kept.txt"), "changed").unwrap();
        std::fs::remove_dir_all(merged.join("dir")).unwrap();
        std::fs::create_dir(merged.join("dir")).unwrap();
        assert!(!merged.join("gone.txt").exists());
        assert!(!merged.join("dir/inner").exists());

        // Whiteout: a 0/0 character device in upper.
        let wh = std::fs::symlink_metadata(upper.join("gone.txt")).unwrap();
        assert!(wh.file_type().is_char_device() && wh.rdev() == 0, "whiteout");
        // Re-created directory: opaque, marked with the user.* xattr.
        assert_eq!(
            getxattr(&upper.join("dir"), "user.overlay.opaque").as_deref(),
            Some(&b"y"[..])
        );
        assert_eq!(std::fs::read_to_string(upper.join("new.txt")).unwrap(), "upper");
        assert_eq!(std::fs::read_to_string(upper.join("kept.txt")).unwrap(), "changed");
        // The project is untouched.
        assert_eq!(std::fs::read_to_string(lower.join("gone.txt")).unwrap(), "lower");
        assert_eq!(std::fs::read_to_string(lower.join("kept.txt")).unwrap(), "lower");
        assert!(lower.join("dir/inner").exists());

        // A file kept open does not stop the (lazy) unmount.
        let open = std::fs::File::open(merged.join("kept.txt")).unwrap();
        ovl.unmount();
        assert!(!is_mountpoint(&merged));
        assert!(!merged.exists(), "mountpoint removed");
        drop(open);

        // Mounting again shows the same changes, also over a stale mount
        // that a killed VMM left; drop unmounts.
        std::mem::forget(HostOverlay::mount(&lower, &upper, &merged).unwrap());
        assert!(is_mountpoint(&merged));
        let ovl = HostOverlay::mount(&lower, &upper, &merged).unwrap();
        let stacked = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.split(' ').nth(4) == merged.to_str())
            .count();
        assert_eq!(stacked, 1, "the stale mount was replaced, not stacked on");
        // The overlay reads the project through a read-only, noatime view.
        let view = sibling(&merged, "lower");
        let view_line = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .find(|l| l.split(' ').nth(4) == view.to_str())
            .map(str::to_string)
            .expect("the project's view is mounted");
        let options = view_line.split(' ').nth(5).unwrap_or_default();
        assert!(
            options.split(',').any(|o| o == "ro") && options.contains("noatime"),
            "{view_line}"
        );
        assert!(!merged.join("gone.txt").exists());
        assert_eq!(std::fs::read_to_string(merged.join("new.txt")).unwrap(), "upper");
        drop(ovl);
        assert!(!is_mountpoint(&merged));
        assert!(!view.exists(), "the view is unmounted and removed");
        std::fs::remove_dir_all(base).unwrap();
    }
}
