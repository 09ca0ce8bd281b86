//! Replaying host changes to a share (`FsEvents`) so that the guest's file
//! watchers see them.
//!
//! An edit on the host changes the share's lower layer behind the guest
//! kernel's back: no inotify event fires in the guest. The agent carries
//! out the operation a local edit would be (mknod, mkdir, unlink, rename,
//! open for writing + ftruncate + close, chmod) under a marker fsgid; the
//! VMM's file server recognises the marker and answers from the state the
//! host already made, changing nothing (storage/src/fs/overlay/echo.rs).
//! The guest kernel updates its caches from the answers and emits the
//! events. Parents are opened under the agent's own gid first, so that
//! only the last component of a path is looked up as an echo.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::cmdline::Config;
use crate::proto::{EntryKind, FsChange, ECHO_GID_DIR, ECHO_GID_ENTRY, ECHO_GID_MODIFY};
use crate::sys::cvt;

/// How a batch went: replayed, and skipped because the change no longer
/// applies (the file server refused it, or the path is gone).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Replayed {
    pub done: usize,
    pub skipped: usize,
}

/// Replays `changes` on the mount of share `tag`.
pub fn replay(config: &Config, tag: &str, changes: &[FsChange]) -> Result<Replayed, String> {
    let mount = config
        .shares
        .iter()
        .find(|s| s.tag == tag)
        .map(|s| s.dir.as_str())
        .ok_or_else(|| format!("no share {tag:?} is mounted"))?;
    let root = open_dir(&path_c(mount.as_bytes())?, None)?;
    let mut out = Replayed::default();
    for change in changes {
        match replay_one(&root, change) {
            Ok(()) => out.done += 1,
            Err(_) => out.skipped += 1,
        }
    }
    Ok(out)
}

fn path_c(bytes: &[u8]) -> Result<CString, String> {
    CString::new(bytes).map_err(|_| "a path with a NUL byte".to_string())
}

/// `O_PATH` directory at `path`, relative to `at` (or absolute).
fn open_dir(path: &CString, at: Option<&OwnedFd>) -> Result<OwnedFd, String> {
    let dirfd = at.map_or(libc::AT_FDCWD, |fd| fd.as_raw_fd());
    // SAFETY: a valid C string; the result is checked.
    let fd = unsafe { libc::openat(dirfd, path.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    let fd = cvt(fd).map_err(|e| format!("{}: {e}", path.to_string_lossy()))?;
    // SAFETY: a fresh descriptor only we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The parent directory (opened) and last component of `path`.
fn split(root: &OwnedFd, path: &[u8]) -> io::Result<(OwnedFd, CString)> {
    let (parent, name) = match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&b"."[..], path),
    };
    let bad = |_| io::Error::from_raw_os_error(libc::EINVAL);
    let dir = open_dir(&CString::new(parent).map_err(bad)?, Some(root))
        .map_err(|_| io::Error::from_raw_os_error(libc::ENOENT))?;
    Ok((dir, CString::new(name).map_err(bad)?))
}

/// Sets this thread's fsgid to an echo marker until dropped.
struct EchoCreds {
    old: u32,
}

impl EchoCreds {
    fn new(gid: u32) -> EchoCreds {
        // SAFETY: setfsgid has no memory arguments; it only affects this
        // thread, and returns the previous value.
        let old = unsafe { libc::setfsgid(gid) } as u32;
        EchoCreds { old }
    }
}

impl Drop for EchoCreds {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::setfsgid(self.old) };
    }
}

fn replay_one(root: &OwnedFd, change: &FsChange) -> io::Result<()> {
    match change {
        FsChange::Arrive { path, kind } => {
            let (dir, name) = split(root, path)?;
            let d = dir.as_raw_fd();
            let gid = if *kind == EntryKind::Dir {
                ECHO_GID_DIR
            } else {
                ECHO_GID_ENTRY
            };
            let _creds = EchoCreds::new(gid);
            // SAFETY (each call): valid C strings and descriptors; results checked.
            cvt(match kind {
                EntryKind::Dir => unsafe { libc::mkdirat(d, name.as_ptr(), 0o755) },
                // The file server answers with the real link; the target
                // given here is not stored anywhere.
                EntryKind::Symlink => unsafe { libc::symlinkat(c"?".as_ptr(), d, name.as_ptr()) },
                EntryKind::File => unsafe { libc::mknodat(d, name.as_ptr(), libc::S_IFREG | 0o644, 0) },
                EntryKind::Other => unsafe { libc::mknodat(d, name.as_ptr(), libc::S_IFIFO | 0o644, 0) },
            })
            .map(drop)
        }
        FsChange::Leave { path, dir: is_dir } => {
            let (dir, name) = split(root, path)?;
            let (gid, flags) = if *is_dir {
                (ECHO_GID_DIR, libc::AT_REMOVEDIR)
            } else {
                (ECHO_GID_ENTRY, 0)
            };
            let _creds = EchoCreds::new(gid);
            // SAFETY: valid C string and descriptor.
            cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
        }
        FsChange::Move { from, to, dir: is_dir } => {
            let (from_dir, from_name) = split(root, from)?;
            let (to_dir, to_name) = split(root, to)?;
            let _creds = EchoCreds::new(if *is_dir { ECHO_GID_DIR } else { ECHO_GID_ENTRY });
            // SAFETY: valid C strings and descriptors.
            cvt(unsafe {
                libc::renameat(
                    from_dir.as_raw_fd(),
                    from_name.as_ptr(),
                    to_dir.as_raw_fd(),
                    to_name.as_ptr(),
                )
            })
            .map(drop)
        }
        FsChange::Modify { path, size } => {
            let (dir, name) = split(root, path)?;
            let _creds = EchoCreds::new(ECHO_GID_MODIFY);
            // O_NONBLOCK: should the entry have become a FIFO, never wait.
            let flags = libc::O_WRONLY | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
            // SAFETY: valid C string and descriptor.
            let fd = cvt(unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags) })?;
            // SAFETY: a fresh descriptor only we own.
            let file = unsafe { File::from_raw_fd(fd) };
            // The truncate is what makes the kernel emit IN_MODIFY (and take
            // the file's new attributes); the close, IN_CLOSE_WRITE.
            let size = libc::off_t::try_from(*size).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
            // SAFETY: a valid descriptor.
            cvt(unsafe { libc::ftruncate(file.as_raw_fd(), size) }).map(drop)
        }
        FsChange::Attrib { path, mode } => {
            let (dir, name) = split(root, path)?;
            let _creds = EchoCreds::new(ECHO_GID_MODIFY);
            // SAFETY: valid C string and descriptor.
            cvt(unsafe { libc::fchmodat(dir.as_raw_fd(), name.as_ptr(), mode & 0o7777, 0) }).map(drop)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_opens_the_parent() {
        let dir = std::env::temp_dir().join(format!("mvm-agent-echo-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("a/b")).unwrap();
        let root = open_dir(&path_c(dir.as_os_str().as_encoded_bytes()).unwrap(), None).unwrap();
        let (_, name) = split(&root, b"a/b/c.txt").unwrap();
        assert_eq!(name.as_bytes(), b"c.txt");
        let (_, name) = split(&root, b"top").unwrap();
        assert_eq!(name.as_bytes(), b"top");
        assert_eq!(
            split(&root, b"missing/x").unwrap_err().raw_os_error(),
            Some(libc::ENOENT)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unknown_share_is_an_error() {
        let config = Config::default();
        assert!(replay(&config, "project", &[]).unwrap_err().contains("project"));
    }

    #[test]
    fn echo_creds_restore_the_fsgid() {
        // SAFETY: querying with an invalid id changes nothing.
        let before = unsafe { libc::setfsgid(u32::MAX) };
        {
            let _c = EchoCreds::new(ECHO_GID_MODIFY);
            assert_eq!(unsafe { libc::setfsgid(u32::MAX) } as u32, ECHO_GID_MODIFY);
        }
        assert_eq!(unsafe { libc::setfsgid(u32::MAX) }, before);
    }
}
