//! An overlay file system in this process: a host directory as the
//! read-only lower layer, a per-VM writable upper layer, and the merged view
//! Linux overlayfs would give (whiteouts, opaque directories, copy-up).
//!
//! The upper directory uses the on-disk format of kernel overlayfs mounted
//! with `userxattr`: a whiteout is a character device 0/0, an opaque
//! directory carries `user.overlay.opaque = "y"`. So the same upper
//! directory can also be mounted by the kernel. A copy-up also records the
//! lower entry's identity on the copy ([`ORIGIN_XATTR`], hidden from the
//! guest), so `mvm apply` can tell whether the host changed it since.
//!
//! No descriptor is kept per node (large trees would exhaust them): a node
//! is a (parent, name) pair resolved to a path under a layer root on every
//! call, with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` for the
//! parent directory and `*at` calls without following symlinks for the last
//! component. Node ids (= the guest's `st_ino`) come from a map of host
//! identities that lives as long as the overlay, so they are stable across
//! `forget` and copy-up.
//!
//! Limits: host calls run with the VMM's credentials, so permission checks
//! are the guest kernel's (`access` only compares mode bits); paths deeper
//! than `PATH_MAX` below a layer root fail with `ENAMETOOLONG`; lower hard
//! links become separate files when one is copied up (as in overlayfs
//! without `index=on`).

mod echo;
mod sys;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

use super::{Attr, Context, DirEntry, Entry, FileSystem, OpenFlags, SetAttr, SetTime, StatFs, ROOT_ID};
use echo::Echo;
pub use echo::{ECHO_GID_DIR, ECHO_GID_ENTRY, ECHO_GID_MODIFY};
use sys::{errno, EMPTY};

/// Open handles (files and directories) a guest may hold at once; more
/// answer `EMFILE`, so a guest cannot make the VMM run out of descriptors.
pub const MAX_HANDLES: usize = 65_536;

/// Longest parent chain followed when building a path; deeper is a loop.
const MAX_DEPTH: usize = 4096;

const OPAQUE_XATTR: &CStr = c"user.overlay.opaque";

/// On an upper entry copied up from the lower layer: the lower entry's
/// identity at copy-up, `"<ino> <size> <mtime_sec>.<mtime_nsec>
/// <ctime_sec>.<ctime_nsec>"` (see [`origin_value`]), so the manager can
/// tell whether the host entry changed since the VM took its copy (not
/// on symlinks, which take no `user.*` attributes). Hidden from the guest.
pub const ORIGIN_XATTR: &CStr = c"user.mvm.origin";

/// `FUSE_WRITE_KILL_SUIDGID`: the writer lacks the right to keep set-id bits.
const WRITE_KILL_SUIDGID: u32 = 1 << 2;

/// Bytes moved per step when `copy_file_range` cannot be used.
const COPY_CHUNK: usize = 1 << 20;

/// How long the guest may cache what the overlay tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverlayOptions {
    pub entry_timeout: Duration,
    pub attr_timeout: Duration,
}

impl OverlayOptions {
    /// While every host change to the lower layer is replayed in the
    /// guest (`watch`), its caches are refreshed by the replays, and the
    /// timeouts only bound how long a change the watcher missed stays
    /// unseen. A stat then costs no request for a minute: a warm
    /// `git status` is answered from the guest's cache.
    pub const WATCHED: OverlayOptions = OverlayOptions {
        entry_timeout: Duration::from_secs(60),
        attr_timeout: Duration::from_secs(60),
    };
}

impl Default for OverlayOptions {
    /// 1 s: a host edit no one replays shows within a second.
    fn default() -> Self {
        OverlayOptions {
            entry_timeout: Duration::from_secs(1),
            attr_timeout: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Layer {
    Upper,
    Lower,
}

/// A host object the overlay has given an id to. Lower files with several
/// links are told apart by their name: copy-up separates them (as in
/// overlayfs without an index), so they cannot share a node.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Ident {
    Upper {
        dev: u64,
        ino: u64,
    },
    Lower {
        dev: u64,
        ino: u64,
    },
    LowerLink {
        dev: u64,
        ino: u64,
        parent: u64,
        name: CString,
    },
}

#[derive(Debug)]
struct Node {
    /// (parent, name) pairs; the first is used to build the node's path.
    /// Empty once every name is gone (an unlinked file still open).
    names: Vec<(u64, CString)>,
    lookups: u64,
    /// Live nodes that name this one as a parent.
    children: u64,
    /// `S_IFMT` bits.
    kind: u32,
    /// An entry exists in the upper layer at the node's path.
    upper: bool,
    /// The lower entry at the node's path is part of this node: the data
    /// of a file not yet copied up, or lower contents merged into a dir.
    lower: bool,
}

/// One name of a directory listing, resolved at `opendir`.
#[derive(Debug)]
struct Listed {
    name: CString,
    /// The node id.
    ino: u64,
    /// What the guest sees as its inode number.
    d_ino: u64,
    kind: u32,
}

#[derive(Debug)]
enum Handle {
    File { ino: u64, file: File, upper: bool },
    Dir { ino: u64, entries: Vec<Listed> },
}

/// What a name is in the merged view: its upper entry (never a whiteout)
/// and the lower entry that shows through or merges with it.
#[derive(Debug, Clone, Copy)]
struct Found {
    upper: Option<libc::stat>,
    lower: Option<libc::stat>,
}

impl Found {
    fn stat(&self) -> Option<&libc::stat> {
        self.upper.as_ref().or(self.lower.as_ref())
    }

    fn kind(&self) -> u32 {
        self.stat().map_or(0, |st| st.st_mode & libc::S_IFMT)
    }

    fn is_dir(&self) -> bool {
        self.kind() == libc::S_IFDIR
    }
}

/// The in-process overlay file system served to the guest over virtio-fs.
pub struct Overlay {
    upper: OwnedFd,
    lower: Option<OwnedFd>,
    /// The layers' file systems (their roots' `st_dev`).
    upper_dev: libc::dev_t,
    lower_dev: Option<libc::dev_t>,
    options: OverlayOptions,
    /// Ownership of new entries is set to the caller's only when we may.
    as_root: bool,
    /// Run unprivileged, the server owns every entry it creates; those are
    /// shown as the project's owner's (see [`OwnerMap`]).
    owner_map: Option<OwnerMap>,
    nodes: HashMap<u64, Node>,
    by_name: HashMap<(u64, CString), u64>,
    /// Never shrinks on `forget`: ids stay stable for the overlay's life.
    ids: HashMap<Ident, u64>,
    /// Node id -> the inode number the guest was shown; kept as long.
    guest_inos: HashMap<u64, u64>,
    next_id: u64,
    handles: HashMap<u64, Handle>,
    next_handle: u64,
}

/// How an unprivileged server presents ownership: entries owned by its
/// own uid/gid (everything it created in the upper layer) appear as owned
/// by the lower root's uid/gid (the project owner, who is also the guest
/// user), and a chown to the project owner is a chown to the server's
/// own ids. So the guest user owns what it creates, as with a root server;
/// other owners are shown as they are on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OwnerMap {
    host_uid: u32,
    host_gid: u32,
    guest_uid: u32,
    guest_gid: u32,
}

impl OwnerMap {
    fn shown(&self, uid: u32, gid: u32) -> (u32, u32) {
        (
            if uid == self.host_uid { self.guest_uid } else { uid },
            if gid == self.host_gid { self.guest_gid } else { gid },
        )
    }

    /// The host id a guest chown asks for (`u32::MAX`: unchanged).
    fn host_uid(&self, uid: u32) -> u32 {
        if uid == self.guest_uid {
            self.host_uid
        } else {
            uid
        }
    }

    fn host_gid(&self, gid: u32) -> u32 {
        if gid == self.guest_gid {
            self.host_gid
        } else {
            gid
        }
    }
}

fn open_layer(path: &Path) -> Result<OwnedFd, crate::Error> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(path)
        .map(OwnedFd::from)
        .map_err(|source| crate::Error::Layer {
            path: path.to_path_buf(),
            source,
        })
}

fn check_name(name: &CStr) -> io::Result<()> {
    let bytes = name.to_bytes();
    if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
        return Err(errno(libc::EINVAL));
    }
    if bytes.len() > 255 {
        return Err(errno(libc::ENAMETOOLONG));
    }
    Ok(())
}

fn is_private_xattr(name: &[u8]) -> bool {
    name.starts_with(b"user.overlay.") || name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.mvm.")
}

/// The value of [`ORIGIN_XATTR`] for a lower entry with stat `st`.
pub fn origin_value(st: &libc::stat) -> String {
    format_origin(
        st.st_ino,
        st.st_size as u64,
        (st.st_mtime, st.st_mtime_nsec),
        (st.st_ctime, st.st_ctime_nsec),
    )
}

/// The [`ORIGIN_XATTR`] value: inode, size, mtime and ctime (seconds,
/// nanoseconds), whoever reads the entry's identity.
pub fn format_origin(ino: u64, size: u64, mtime: (i64, i64), ctime: (i64, i64)) -> String {
    format!("{ino} {size} {}.{} {}.{}", mtime.0, mtime.1, ctime.0, ctime.1)
}

/// Records where an upper entry came from; best effort: without it the
/// manager treats the entry as new in the VM (its conflict check is then
/// by times only), which is no reason to fail a copy-up.
fn set_origin(dst: BorrowedFd<'_>, st: &libc::stat) {
    if let Err(e) = sys::set_xattr(dst, ORIGIN_XATTR, origin_value(st).as_bytes(), 0) {
        log::debug!("virtio-fs copy-up: origin not recorded: {e}");
    }
}

fn kind_of(st: &libc::stat) -> u32 {
    st.st_mode & libc::S_IFMT
}

fn ignore_eperm(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EINVAL)) => Ok(()),
        other => other,
    }
}

/// The 32-bit device number encoding FUSE uses (the kernel's `new_encode_dev`).
fn encode_dev(rdev: u64) -> u32 {
    let major = libc::major(rdev as libc::dev_t) as u64;
    let minor = libc::minor(rdev as libc::dev_t) as u64;
    ((minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)) as u32
}

/// The guest's inode numbers: those of the lower layer's file system as
/// they are (git's index on the host recorded them, so the first
/// `git status` in the VM need not re-read every file); those of the
/// upper layer's, when it is another file system, with this bit set.
const UPPER_INO: u64 = 1 << 62;
/// Entries of neither (a file system mounted inside the project, or
/// numbers this large): the node id with this bit set, unique too.
const NODE_INO: u64 = 1 << 63;

fn node_ino(id: u64) -> u64 {
    NODE_INO | id
}

fn to_attr(ino: u64, st: &libc::stat) -> Attr {
    Attr {
        ino,
        st_ino: 0,
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: st.st_atime,
        atime_nsec: st.st_atime_nsec as u32,
        mtime: st.st_mtime,
        mtime_nsec: st.st_mtime_nsec as u32,
        ctime: st.st_ctime,
        ctime_nsec: st.st_ctime_nsec as u32,
        mode: st.st_mode,
        nlink: u32::try_from(st.st_nlink).unwrap_or(u32::MAX),
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: encode_dev(st.st_rdev),
        blksize: st.st_blksize as u32,
    }
}

fn timespec(time: Option<SetTime>) -> io::Result<libc::timespec> {
    Ok(match time {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(SetTime::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(SetTime::At(sec, nsec)) => {
            if nsec >= 1_000_000_000 {
                return Err(errno(libc::EINVAL));
            }
            libc::timespec {
                tv_sec: sec,
                tv_nsec: nsec.into(),
            }
        }
    })
}

fn stat_times(st: &libc::stat) -> [libc::timespec; 2] {
    [
        libc::timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec,
        },
        libc::timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec,
        },
    ]
}

/// Whether the upper directory `name` in `dir` hides the lower one.
fn is_opaque(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<bool> {
    let fd = sys::open_at(dir, name, libc::O_PATH, 0)?;
    match sys::get_xattr(fd.as_fd(), OPAQUE_XATTR) {
        Ok(value) => Ok(value == b"y"),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENODATA) | Some(libc::ENOTSUP)) => Ok(false),
        Err(e) => Err(e),
    }
}

fn set_opaque(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    let fd = sys::open_at(dir, name, libc::O_PATH, 0)?;
    sys::set_xattr(fd.as_fd(), OPAQUE_XATTR, b"y", 0)
}

/// Makes a whiteout under a fresh temporary name in `dir`, to be renamed
/// into place: an operation that needs a whiteout then fails before it
/// changes anything when whiteouts cannot be made, and the lower entry
/// never shows through in between. (A crash leaves at most a stray
/// whiteout, which no listing shows.)
fn temp_whiteout(dir: BorrowedFd<'_>) -> io::Result<CString> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    loop {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name =
            CString::new(format!(".mvm-whiteout-{}-{n}", std::process::id())).map_err(|_| errno(libc::EINVAL))?;
        match sys::mknod_at(dir, &name, libc::S_IFCHR, 0) {
            Ok(()) => return Ok(name),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Puts a whiteout at `name` in `dir` in one step, replacing what the
/// upper layer has there (`upper_dir`: an empty directory, else a
/// non-directory or nothing).
fn whiteout_over(dir: BorrowedFd<'_>, name: &CStr, upper_dir: bool) -> io::Result<()> {
    let tmp = temp_whiteout(dir)?;
    let flags = if upper_dir { libc::RENAME_EXCHANGE } else { 0 };
    if let Err(e) = sys::rename_at(dir, &tmp, dir, name, flags) {
        let _ = sys::unlink_at(dir, &tmp, 0);
        return Err(e);
    }
    if upper_dir {
        // The emptied directory now has the temporary name.
        sys::unlink_at(dir, &tmp, libc::AT_REMOVEDIR)?;
    }
    Ok(())
}

/// Creates an entry at `name` in the upper directory `dir` with `make`
/// (which gets the name to create, and cleans up after itself if it
/// fails). Over a whiteout the entry is made complete under a temporary
/// name first and then takes the whiteout's place in one rename, so a
/// failure never lets the deleted lower entry reappear.
fn create_over<T>(
    dir: BorrowedFd<'_>,
    name: &CStr,
    whiteout: bool,
    is_dir: bool,
    make: impl FnOnce(&CStr) -> io::Result<T>,
) -> io::Result<T> {
    if !whiteout {
        return make(name);
    }
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = CString::new(format!(".mvm-new-{}-{n}", std::process::id())).map_err(|_| errno(libc::EINVAL))?;
    let made = make(&tmp)?;
    // A directory cannot replace a non-directory: swap, then drop the whiteout.
    let flags = if is_dir { libc::RENAME_EXCHANGE } else { 0 };
    if let Err(e) = sys::rename_at(dir, &tmp, dir, name, flags) {
        let _ = sys::unlink_at(dir, &tmp, if is_dir { libc::AT_REMOVEDIR } else { 0 });
        return Err(e);
    }
    if is_dir {
        sys::unlink_at(dir, &tmp, 0)?;
    }
    Ok(made)
}

/// Copies extended attributes except the overlay's own. Attributes the
/// upper file system or our privileges refuse are skipped: copy-up must
/// not fail because `security.*` cannot be set.
fn copy_xattrs(src: BorrowedFd<'_>, dst: BorrowedFd<'_>) -> io::Result<()> {
    let names = match sys::list_xattr(src) {
        Ok(names) => names,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTSUP) | Some(libc::EPERM)) => return Ok(()),
        Err(e) => return Err(e),
    };
    for name in names
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty() && !is_private_xattr(n))
    {
        let Ok(name) = CString::new(name) else { continue };
        let value = match sys::get_xattr(src, &name) {
            Ok(value) => value,
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => continue,
            Err(e) => return Err(e),
        };
        match sys::set_xattr(dst, &name, &value, 0) {
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EPERM) | Some(libc::ENOTSUP) | Some(libc::EACCES)
                ) =>
            {
                log::debug!("virtio-fs copy-up: xattr {name:?} not copied: {e}");
            }
            other => other?,
        }
    }
    Ok(())
}

/// Copies `[start, end)` with `copy_file_range` (reflinks where the file
/// system can), falling back to reads and writes across file systems.
fn copy_range(src: &File, dst: &File, start: u64, end: u64) -> io::Result<()> {
    let mut pos = start;
    let mut fallback = false;
    let mut buf = Vec::new();
    while pos < end {
        let want = usize::try_from(end - pos).unwrap_or(usize::MAX).min(COPY_CHUNK);
        if !fallback {
            match sys::copy_file_range(src.as_fd(), pos, dst.as_fd(), pos, want) {
                Ok(0) => return Ok(()), // the source shrank meanwhile
                Ok(n) => {
                    pos += n as u64;
                    continue;
                }
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EXDEV) | Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::EOPNOTSUPP)
                    ) =>
                {
                    fallback = true;
                }
                Err(e) => return Err(e),
            }
        }
        buf.resize(want, 0);
        let n = src.read_at(&mut buf, pos)?;
        if n == 0 {
            return Ok(());
        }
        dst.write_all_at(buf.get(..n).unwrap_or_default(), pos)?;
        pos += n as u64;
    }
    Ok(())
}

/// Copies a file's data, keeping holes where `SEEK_DATA` finds them.
fn copy_data(src: &File, dst: &File, size: u64) -> io::Result<()> {
    dst.set_len(size)?;
    let mut pos = 0u64;
    while pos < size {
        let start = match sys::lseek(src.as_fd(), pos as i64, libc::SEEK_DATA) {
            Ok(start) => start,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break, // only a hole remains
            Err(_) => {
                // No SEEK_DATA on this file system: copy everything.
                return copy_range(src, dst, pos, size);
            }
        };
        if start >= size {
            break;
        }
        let end = sys::lseek(src.as_fd(), start as i64, libc::SEEK_HOLE)
            .unwrap_or(size)
            .min(size);
        copy_range(src, dst, start, end.max(start + 1).min(size))?;
        pos = end.max(start + 1);
    }
    Ok(())
}

/// Creates `name` in the upper directory `upper` as a copy of the lower
/// entry `name` in `lower` (whose stat is `st`): content, mode, owner when
/// permitted, times and extended attributes. Directories are created empty.
fn copy_entry(lower: BorrowedFd<'_>, upper: BorrowedFd<'_>, name: &CStr, st: &libc::stat) -> io::Result<()> {
    copy_entry_sized(lower, upper, name, st, st.st_size as u64)
}

/// [`copy_entry`] copying only the first `size` bytes of a regular file
/// (0 when it is about to be truncated anyway).
fn copy_entry_sized(
    lower: BorrowedFd<'_>,
    upper: BorrowedFd<'_>,
    name: &CStr,
    st: &libc::stat,
    size: u64,
) -> io::Result<()> {
    let perm = st.st_mode & 0o7777;
    let times = stat_times(st);
    match kind_of(st) {
        libc::S_IFREG => {
            let src = File::from(sys::open_noatime(lower, name, libc::O_RDONLY)?);
            // An unnamed file gets its name only once complete, so a failed
            // copy never leaves a truncated file hiding the lower one.
            let (dst, named) = match sys::open_at(upper, c".", libc::O_TMPFILE | libc::O_RDWR, 0o600) {
                Ok(fd) => (File::from(fd), false),
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EOPNOTSUPP) | Some(libc::EISDIR) | Some(libc::EINVAL)
                    ) =>
                {
                    let fd = sys::open_at(upper, name, libc::O_CREAT | libc::O_EXCL | libc::O_RDWR, 0o600)?;
                    (File::from(fd), true)
                }
                Err(e) => return Err(e),
            };
            let result = (|| {
                copy_data(&src, &dst, size.min(st.st_size as u64))?;
                copy_xattrs(src.as_fd(), dst.as_fd())?;
                set_origin(dst.as_fd(), st);
                ignore_eperm(sys::chown_at(dst.as_fd(), EMPTY, st.st_uid, st.st_gid))?;
                dst.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(perm))?;
                sys::futimens(dst.as_fd(), &times)?;
                if !named {
                    sys::link_tmpfile(dst.as_fd(), upper, name)?;
                }
                Ok(())
            })();
            if result.is_err() && named {
                let _ = sys::unlink_at(upper, name, 0);
            }
            result
        }
        libc::S_IFLNK => {
            let target = sys::readlink_at(lower, name)?;
            let target = CString::new(target).map_err(|_| errno(libc::EINVAL))?;
            sys::symlink_at(&target, upper, name)?;
            ignore_eperm(sys::chown_at(upper, name, st.st_uid, st.st_gid))?;
            sys::utimens_at(upper, name, &times)
        }
        kind => {
            if kind == libc::S_IFDIR {
                sys::mkdir_at(upper, name, 0o700)?;
            } else {
                sys::mknod_at(upper, name, kind | 0o600, st.st_rdev)?;
            }
            let src = sys::open_at(lower, name, libc::O_PATH, 0)?;
            let dst = sys::open_at(upper, name, libc::O_PATH, 0)?;
            copy_xattrs(src.as_fd(), dst.as_fd())?;
            set_origin(dst.as_fd(), st);
            ignore_eperm(sys::chown_at(upper, name, st.st_uid, st.st_gid))?;
            sys::chmod_at(upper, name, perm)?;
            sys::utimens_at(upper, name, &times)
        }
    }
}

/// Joins path components below a layer root ("." for the root itself).
fn join(components: &[&CStr]) -> io::Result<CString> {
    if components.is_empty() {
        return Ok(c".".to_owned());
    }
    let mut path = Vec::new();
    for (i, c) in components.iter().enumerate() {
        if i > 0 {
            path.push(b'/');
        }
        path.extend_from_slice(c.to_bytes());
    }
    CString::new(path).map_err(|_| errno(libc::EINVAL))
}

impl Overlay {
    /// `lower`: the project directory, read-only, never modified (None = no
    /// lower layer: a plain writable passthrough of `upper`). `upper`: this
    /// VM's writable layer (must exist).
    pub fn new(lower: Option<&Path>, upper: &Path, options: OverlayOptions) -> Result<Self, crate::Error> {
        let upper_fd = open_layer(upper)?;
        let lower_fd = lower.map(open_layer).transpose()?;
        if let (Some(lower), Some(lower_fd)) = (lower, &lower_fd) {
            // One layer inside the other would show the upper layer's
            // internals through the lower one (or the other way round).
            // The kernel's own path of each open layer: no walk through
            // directories we may not search (a layer handed over as
            // /proc/self/fd/N beneath a 0700 home).
            let canon = |fd: &OwnedFd, p: &Path| {
                std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).map_err(|source| crate::Error::Layer {
                    path: p.to_path_buf(),
                    source,
                })
            };
            let (l, u) = (canon(lower_fd, lower)?, canon(&upper_fd, upper)?);
            if l.starts_with(&u) || u.starts_with(&l) {
                return Err(crate::Error::LayersNested {
                    lower: lower.to_path_buf(),
                    upper: upper.to_path_buf(),
                });
            }
        }
        let root_opaque = match sys::get_xattr(upper_fd.as_fd(), OPAQUE_XATTR) {
            Ok(value) => value == b"y",
            Err(_) => false,
        };
        let layer_dev = |fd: &OwnedFd, path: &Path| {
            sys::fstat(fd.as_fd())
                .map(|st| st.st_dev)
                .map_err(|source| crate::Error::Layer {
                    path: path.into(),
                    source,
                })
        };
        let upper_dev = layer_dev(&upper_fd, upper)?;
        let lower_dev = match (&lower_fd, lower) {
            (Some(fd), Some(path)) => Some(layer_dev(fd, path)?),
            _ => None,
        };
        let mut overlay = Overlay {
            upper: upper_fd,
            lower: lower_fd,
            upper_dev,
            lower_dev,
            options,
            // SAFETY: geteuid has no preconditions.
            as_root: unsafe { libc::geteuid() } == 0,
            owner_map: None,
            nodes: HashMap::new(),
            by_name: HashMap::new(),
            ids: HashMap::new(),
            guest_inos: HashMap::new(),
            next_id: ROOT_ID + 1,
            handles: HashMap::new(),
            next_handle: 1,
        };
        let root_lower = overlay.lower.is_some() && !root_opaque;
        overlay.nodes.insert(ROOT_ID, Self::root_node(root_lower));
        let st = sys::fstat(overlay.upper.as_fd()).map_err(|source| crate::Error::Layer {
            path: upper.into(),
            source,
        })?;
        overlay.ids.insert(
            Ident::Upper {
                dev: st.st_dev,
                ino: st.st_ino,
            },
            ROOT_ID,
        );
        if let (Some(fd), Some(path)) = (&overlay.lower, lower) {
            let st = sys::fstat(fd.as_fd()).map_err(|source| crate::Error::Layer {
                path: path.into(),
                source,
            })?;
            // SAFETY: geteuid/getegid have no preconditions.
            let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
            if !overlay.as_root && (st.st_uid, st.st_gid) != (uid, gid) {
                overlay.owner_map = Some(OwnerMap {
                    host_uid: uid,
                    host_gid: gid,
                    guest_uid: st.st_uid,
                    guest_gid: st.st_gid,
                });
            }
            overlay.ids.insert(
                Ident::Lower {
                    dev: st.st_dev,
                    ino: st.st_ino,
                },
                ROOT_ID,
            );
        }
        Ok(overlay)
    }

    fn root_node(lower: bool) -> Node {
        Node {
            names: Vec::new(),
            lookups: 1,
            children: 0,
            kind: libc::S_IFDIR,
            upper: true,
            lower,
        }
    }

    /// `st` of node `id` as the guest sees it.
    fn attr(&mut self, id: u64, st: &libc::stat) -> Attr {
        let (uid, gid) = self.shown_owner(st);
        Attr {
            st_ino: self.guest_ino(id, st),
            uid,
            gid,
            ..to_attr(id, st)
        }
    }

    /// The owner the guest sees for `st` (see [`OwnerMap`]).
    fn shown_owner(&self, st: &libc::stat) -> (u32, u32) {
        match &self.owner_map {
            Some(map) => map.shown(st.st_uid, st.st_gid),
            None => (st.st_uid, st.st_gid),
        }
    }

    /// The inode number the guest sees for node `id` (see [`UPPER_INO`]):
    /// the first one it was shown, so a copy-up does not change it.
    fn guest_ino(&mut self, id: u64, st: &libc::stat) -> u64 {
        if let Some(&ino) = self.guest_inos.get(&id) {
            return ino;
        }
        let ino = self.host_ino(id, st);
        self.guest_inos.insert(id, ino);
        ino
    }

    fn host_ino(&self, id: u64, st: &libc::stat) -> u64 {
        let ino = st.st_ino;
        if ino >= UPPER_INO || ino == 0 {
            node_ino(id)
        } else if Some(st.st_dev) == self.lower_dev {
            ino
        } else if st.st_dev == self.upper_dev {
            if self.lower_dev.is_none() {
                ino
            } else {
                UPPER_INO | ino
            }
        } else {
            node_ino(id)
        }
    }

    /// Re-reads which layer holds each known node, after the upper layer
    /// was changed behind the overlay's back (`mvm reset` on a running VM,
    /// done while the overlay is locked). Parents go first: resolving a
    /// name uses its directory's flags. A node whose entry is gone keeps
    /// no layer and answers `ENOENT`; handles already open keep the file
    /// they opened.
    pub fn refresh_layers(&mut self) {
        let mut order: Vec<(usize, u64)> = self
            .nodes
            .keys()
            .filter(|&&id| id != ROOT_ID)
            .map(|&id| (self.components(id).map_or(usize::MAX, |c| c.len()), id))
            .collect();
        order.sort_unstable();
        for (_, id) in order {
            let Some((parent, name)) = self.nodes.get(&id).and_then(|n| n.names.first().cloned()) else {
                continue;
            };
            let found = self.probe(parent, &name).ok().flatten();
            if let Some(found) = &found {
                if let Some(st) = found.upper {
                    self.ids.insert(
                        Ident::Upper {
                            dev: st.st_dev,
                            ino: st.st_ino,
                        },
                        id,
                    );
                }
            }
            if let Some(node) = self.nodes.get_mut(&id) {
                node.upper = found.as_ref().is_some_and(|f| f.upper.is_some());
                node.lower = found.as_ref().is_some_and(|f| f.lower.is_some());
            }
        }
    }

    /// Open host descriptors held right now (for leak tests and benches).
    /// Cache timeouts for answers from now on (answers already given keep
    /// theirs).
    pub fn set_options(&mut self, options: OverlayOptions) {
        self.options = options;
    }

    pub fn open_fds(&self) -> usize {
        let files = self
            .handles
            .values()
            .filter(|h| matches!(h, Handle::File { .. }))
            .count();
        1 + usize::from(self.lower.is_some()) + files
    }

    fn root(&self, layer: Layer) -> io::Result<BorrowedFd<'_>> {
        match layer {
            Layer::Upper => Ok(self.upper.as_fd()),
            Layer::Lower => self
                .lower
                .as_ref()
                .map(|fd| fd.as_fd())
                .ok_or_else(|| errno(libc::ENOENT)),
        }
    }

    fn node(&self, id: u64) -> io::Result<&Node> {
        self.nodes.get(&id).ok_or_else(|| errno(libc::ENOENT))
    }

    fn node_mut(&mut self, id: u64) -> io::Result<&mut Node> {
        self.nodes.get_mut(&id).ok_or_else(|| errno(libc::ENOENT))
    }

    /// The names from the root down to `id`.
    fn components(&self, id: u64) -> io::Result<Vec<&CStr>> {
        let mut out = Vec::new();
        let mut cur = id;
        while cur != ROOT_ID {
            if out.len() >= MAX_DEPTH {
                return Err(errno(libc::ELOOP));
            }
            let (parent, name) = self.node(cur)?.names.first().ok_or_else(|| errno(libc::ENOENT))?;
            out.push(name.as_c_str());
            cur = *parent;
        }
        out.reverse();
        Ok(out)
    }

    fn path(&self, id: u64) -> io::Result<CString> {
        join(&self.components(id)?)
    }

    /// An `O_PATH` descriptor of directory `id` in `layer`.
    fn dir_fd(&self, layer: Layer, id: u64) -> io::Result<OwnedFd> {
        let path = self.path(id)?;
        sys::open_beneath(self.root(layer)?, &path, libc::O_PATH | libc::O_DIRECTORY)
    }

    /// `id` as (its parent directory in `layer`, its name); the root is
    /// (itself, "").
    fn locate(&self, layer: Layer, id: u64) -> io::Result<(OwnedFd, CString)> {
        let comps = self.components(id)?;
        match comps.split_last() {
            None => Ok((
                sys::open_beneath(self.root(layer)?, c".", libc::O_PATH | libc::O_DIRECTORY)?,
                CString::default(),
            )),
            Some((name, parents)) => {
                let dir = sys::open_beneath(self.root(layer)?, &join(parents)?, libc::O_PATH | libc::O_DIRECTORY)?;
                Ok((dir, (*name).to_owned()))
            }
        }
    }

    fn layer_of(&self, id: u64) -> io::Result<Layer> {
        Ok(if self.node(id)?.upper {
            Layer::Upper
        } else {
            Layer::Lower
        })
    }

    /// A file handle's descriptor for a node that has lost all its names.
    fn handle_file_of(&self, id: u64) -> Option<&File> {
        self.handles.values().find_map(|h| match h {
            Handle::File { ino, file, .. } if *ino == id => Some(file),
            _ => None,
        })
    }

    fn stat_node(&self, id: u64) -> io::Result<libc::stat> {
        let node = self.node(id)?;
        if node.names.is_empty() && id != ROOT_ID {
            return match self.handle_file_of(id) {
                Some(file) => sys::fstat(file.as_fd()),
                None => Err(errno(libc::ENOENT)),
            };
        }
        let (dir, name) = self.locate(self.layer_of(id)?, id)?;
        sys::stat_at(dir.as_fd(), &name)
    }

    /// An `O_PATH` descriptor of the node itself in its current layer (or
    /// of an open handle when the node has no name left).
    fn node_fd(&self, id: u64) -> io::Result<OwnedFd> {
        let node = self.node(id)?;
        if node.names.is_empty() && id != ROOT_ID {
            return match self.handle_file_of(id) {
                Some(file) => Ok(file.try_clone()?.into()),
                None => Err(errno(libc::ENOENT)),
            };
        }
        let (dir, name) = self.locate(self.layer_of(id)?, id)?;
        sys::open_at(dir.as_fd(), &name, libc::O_PATH, 0)
    }

    /// Whether the lower layer has an entry at `name` in directory `parent`
    /// that the merged view would show were nothing above it.
    fn lower_has(&self, parent: u64, name: &CStr) -> io::Result<bool> {
        if !self.node(parent)?.lower {
            return Ok(false);
        }
        let dir = match self.dir_fd(Layer::Lower, parent) {
            Ok(dir) => dir,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => return Ok(false),
            Err(e) => return Err(e),
        };
        Ok(sys::stat_opt(dir.as_fd(), name)?.is_some())
    }

    /// Resolves `name` in directory `parent` in the merged view.
    fn probe(&self, parent: u64, name: &CStr) -> io::Result<Option<Found>> {
        check_name(name)?;
        let node = self.node(parent)?;
        if node.kind != libc::S_IFDIR {
            return Err(errno(libc::ENOTDIR));
        }
        let (merge_lower, in_upper) = (node.lower, node.upper);
        let mut upper = None;
        let mut whiteout = false;
        let upper_dir = if in_upper {
            Some(self.dir_fd(Layer::Upper, parent)?)
        } else {
            None
        };
        if let Some(dir) = &upper_dir {
            match sys::stat_opt(dir.as_fd(), name)? {
                Some(st) if sys::is_whiteout(&st) => whiteout = true,
                found => upper = found,
            }
        }
        let mut lower = None;
        if merge_lower && !whiteout && upper.as_ref().is_none_or(|st| kind_of(st) == libc::S_IFDIR) {
            let lower_st = match self.dir_fd(Layer::Lower, parent) {
                Ok(dir) => sys::stat_opt(dir.as_fd(), name)?,
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => None,
                Err(e) => return Err(e),
            };
            lower = match (&upper, lower_st, &upper_dir) {
                (None, Some(st), _) if !sys::is_whiteout(&st) => Some(st),
                (Some(_), Some(st), Some(dir)) if kind_of(&st) == libc::S_IFDIR => {
                    if is_opaque(dir.as_fd(), name)? {
                        None
                    } else {
                        Some(st)
                    }
                }
                _ => None,
            };
        }
        if upper.is_none() && lower.is_none() {
            return Ok(None);
        }
        Ok(Some(Found { upper, lower }))
    }

    /// The node id for what `found` names, made up if never seen.
    fn id_for(&mut self, parent: u64, name: &CStr, found: &Found) -> u64 {
        let upper = found.upper.map(|st| Ident::Upper {
            dev: st.st_dev,
            ino: st.st_ino,
        });
        let lower = found.lower.map(|st| {
            if st.st_nlink > 1 && kind_of(&st) != libc::S_IFDIR {
                Ident::LowerLink {
                    dev: st.st_dev,
                    ino: st.st_ino,
                    parent,
                    name: name.to_owned(),
                }
            } else {
                Ident::Lower {
                    dev: st.st_dev,
                    ino: st.st_ino,
                }
            }
        });
        if let Some(id) = upper.as_ref().and_then(|k| self.ids.get(k)) {
            return *id;
        }
        if let Some(&id) = lower.as_ref().and_then(|k| self.ids.get(k)) {
            if let Some(k) = upper {
                self.ids.insert(k, id);
            }
            return id;
        }
        let id = self.next_id;
        self.next_id += 1;
        for key in [upper, lower].into_iter().flatten() {
            self.ids.insert(key, id);
        }
        id
    }

    fn forget_ident(&mut self, st: &libc::stat) {
        if st.st_nlink <= 1 || kind_of(st) == libc::S_IFDIR {
            self.ids.remove(&Ident::Upper {
                dev: st.st_dev,
                ino: st.st_ino,
            });
        }
    }

    /// Makes (or refreshes) the node for `found` at (`parent`, `name`) and
    /// counts one lookup of it.
    fn insert_node(&mut self, parent: u64, name: &CStr, found: &Found) -> io::Result<u64> {
        let id = self.id_for(parent, name, found);
        if id == ROOT_ID || id == parent {
            // A bind mount of a directory inside itself: refuse the loop.
            return Err(errno(libc::ELOOP));
        }
        if !self.nodes.contains_key(&parent) {
            return Err(errno(libc::ENOENT));
        }
        let node = self.nodes.entry(id).or_insert_with(|| Node {
            names: Vec::new(),
            lookups: 0,
            children: 0,
            kind: 0,
            upper: false,
            lower: false,
        });
        node.kind = found.kind();
        node.upper = found.upper.is_some();
        node.lower = found.lower.is_some();
        node.lookups = node.lookups.saturating_add(1);
        self.add_name(id, parent, name);
        Ok(id)
    }

    /// Gives `id` the name (`parent`, `name`), taking it from any node that
    /// had it. The new reference to `parent` is counted before the old one
    /// goes, so the parent is never dropped in between.
    fn add_name(&mut self, id: u64, parent: u64, name: &CStr) {
        let key = (parent, name.to_owned());
        let other = self.by_name.get(&key).copied();
        if other == Some(id) || !self.nodes.contains_key(&parent) {
            return;
        }
        let Some(node) = self.nodes.get_mut(&id) else { return };
        if !node.names.iter().any(|(p, n)| *p == parent && n.as_c_str() == name) {
            node.names.push((parent, name.to_owned()));
            if let Some(p) = self.nodes.get_mut(&parent) {
                p.children += 1;
            }
        }
        self.by_name.insert(key, id);
        if let Some(other) = other {
            self.remove_name(other, parent, name);
        }
    }

    /// Drops one name of a node (unlink, rename), then the node and its
    /// ancestors that nothing references any more.
    fn remove_name(&mut self, id: u64, parent: u64, name: &CStr) {
        let Some(node) = self.nodes.get_mut(&id) else { return };
        let before = node.names.len();
        node.names.retain(|(p, n)| !(*p == parent && n.as_c_str() == name));
        if node.names.len() == before {
            return;
        }
        let key = (parent, name.to_owned());
        if self.by_name.get(&key) == Some(&id) {
            self.by_name.remove(&key);
        }
        if let Some(p) = self.nodes.get_mut(&parent) {
            p.children = p.children.saturating_sub(1);
        }
        self.maybe_drop(parent);
        self.maybe_drop(id);
    }

    fn maybe_drop(&mut self, id: u64) {
        let mut pending = vec![id];
        while let Some(id) = pending.pop() {
            if id == ROOT_ID {
                continue;
            }
            let unused = self.nodes.get(&id).is_some_and(|n| n.lookups == 0 && n.children == 0);
            if !unused {
                continue;
            }
            let Some(node) = self.nodes.remove(&id) else { continue };
            for (parent, name) in node.names {
                let key = (parent, name);
                if self.by_name.get(&key) == Some(&id) {
                    self.by_name.remove(&key);
                }
                if let Some(p) = self.nodes.get_mut(&parent) {
                    p.children = p.children.saturating_sub(1);
                    pending.push(parent);
                }
            }
        }
    }

    fn entry(&mut self, id: u64, st: &libc::stat) -> Entry {
        Entry {
            attr: self.attr(id, st),
            generation: 0,
            entry_timeout: self.options.entry_timeout,
            attr_timeout: self.options.attr_timeout,
        }
    }

    /// Looks up a name that must exist and returns its entry (counted).
    fn lookup_found(&mut self, parent: u64, name: &CStr) -> io::Result<Entry> {
        let found = self.probe(parent, name)?.ok_or_else(|| errno(libc::ENOENT))?;
        let id = self.insert_node(parent, name, &found)?;
        let st = found.stat().copied().ok_or_else(|| errno(libc::ENOENT))?;
        Ok(self.entry(id, &st))
    }

    /// Brings a node (and the directories above it) into the upper layer.
    fn copy_up(&mut self, id: u64) -> io::Result<()> {
        self.copy_up_sized(id, u64::MAX)
    }

    /// [`Self::copy_up`] copying at most `size` bytes of the node's data
    /// (for an open with `O_TRUNC` or a truncate: no point copying more).
    fn copy_up_sized(&mut self, id: u64, size: u64) -> io::Result<()> {
        let mut chain = Vec::new();
        let mut cur = id;
        while !self.node(cur)?.upper {
            if chain.len() >= MAX_DEPTH {
                return Err(errno(libc::ELOOP));
            }
            chain.push(cur);
            cur = self
                .node(cur)?
                .names
                .first()
                .map(|(p, _)| *p)
                .ok_or_else(|| errno(libc::ENOENT))?;
        }
        // Times of the directory created just before, which creating the
        // next entry inside it has changed.
        let mut parent_times: Option<[libc::timespec; 2]> = None;
        for &n in chain.iter().rev() {
            let (lower_dir, name) = self.locate(Layer::Lower, n)?;
            let (upper_dir, _) = self.locate(Layer::Upper, n)?;
            let st = sys::stat_at(lower_dir.as_fd(), &name)?;
            let size = if n == id { size } else { u64::MAX };
            copy_entry_sized(lower_dir.as_fd(), upper_dir.as_fd(), &name, &st, size)?;
            if let Some(times) = parent_times.take() {
                sys::utimens_at(upper_dir.as_fd(), EMPTY, &times)?;
            }
            parent_times = Some(stat_times(&st));
            let ust = sys::stat_at(upper_dir.as_fd(), &name)?;
            self.ids.insert(
                Ident::Upper {
                    dev: ust.st_dev,
                    ino: ust.st_ino,
                },
                n,
            );
            self.node_mut(n)?.upper = true;
            log::trace!("virtio-fs: copied up {name:?}");
            if kind_of(&st) == libc::S_IFREG {
                self.reopen_handles(n, upper_dir.as_fd(), &name);
            }
        }
        Ok(())
    }

    /// Moves the read-only handles open on the lower copy of `id` to the
    /// new upper copy (`name` in `dir`), so they see writes made from now on.
    fn reopen_handles(&mut self, id: u64, dir: BorrowedFd<'_>, name: &CStr) {
        for file_handle in self.handles.values_mut() {
            if let Handle::File { ino, file, upper } = file_handle {
                if *ino != id || *upper {
                    continue;
                }
                match sys::open_at(dir, name, libc::O_RDONLY, 0) {
                    Ok(fd) => {
                        *file = File::from(fd);
                        *upper = true;
                    }
                    Err(e) => log::debug!("virtio-fs: handle on {name:?} stays on the lower file: {e}"),
                }
            }
        }
    }

    /// Copies everything of directory `id` still only in the lower layer
    /// into the upper one, so the directory can move without its lower
    /// contents (renaming a merged directory).
    fn copy_up_tree(&mut self, id: u64) -> io::Result<()> {
        let created = !self.node(id)?.upper;
        self.copy_up(id)?;
        let top_times = if created {
            let (upper_dir, name) = self.locate(Layer::Upper, id)?;
            Some(stat_times(&sys::stat_at(upper_dir.as_fd(), &name)?))
        } else {
            None
        };
        // Each directory with the times to give it back once filled (for
        // the ones this copy-up creates).
        let mut pending = vec![(self.path(id)?, top_times)];
        while let Some((rel, times)) = pending.pop() {
            let lower = match sys::open_beneath(self.root(Layer::Lower)?, &rel, libc::O_PATH | libc::O_DIRECTORY) {
                Ok(fd) => fd,
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => continue,
                Err(e) => return Err(e),
            };
            let upper = sys::open_beneath(self.root(Layer::Upper)?, &rel, libc::O_PATH | libc::O_DIRECTORY)?;
            let listing =
                sys::open_beneath_noatime(self.root(Layer::Lower)?, &rel, libc::O_RDONLY | libc::O_DIRECTORY)?;
            for name in sys::read_dir_names(listing)? {
                let Some(lst) = sys::stat_opt(lower.as_fd(), &name)? else {
                    continue;
                };
                if sys::is_whiteout(&lst) {
                    continue;
                }
                let sub = || -> io::Result<CString> {
                    let mut path = rel.as_bytes().to_vec();
                    path.push(b'/');
                    path.extend_from_slice(name.to_bytes());
                    CString::new(path).map_err(|_| errno(libc::EINVAL))
                };
                match sys::stat_opt(upper.as_fd(), &name)? {
                    Some(ust) => {
                        let both_dirs = kind_of(&ust) == libc::S_IFDIR && kind_of(&lst) == libc::S_IFDIR;
                        if both_dirs && !is_opaque(upper.as_fd(), &name)? {
                            pending.push((sub()?, None));
                        }
                    }
                    None => {
                        copy_entry(lower.as_fd(), upper.as_fd(), &name, &lst)?;
                        let ust = sys::stat_at(upper.as_fd(), &name)?;
                        if let Some(&known) = self.ids.get(&Ident::Lower {
                            dev: lst.st_dev,
                            ino: lst.st_ino,
                        }) {
                            self.ids.insert(
                                Ident::Upper {
                                    dev: ust.st_dev,
                                    ino: ust.st_ino,
                                },
                                known,
                            );
                        }
                        if kind_of(&lst) == libc::S_IFDIR {
                            pending.push((sub()?, Some(stat_times(&lst))));
                        }
                    }
                }
            }
            if let Some(times) = times {
                sys::utimens_at(upper.as_fd(), EMPTY, &times)?;
            }
        }
        // Live nodes below keep their ids through their new upper copies
        // (also lower files with several links, which have no plain
        // lower identity in the map).
        let open_below: HashSet<u64> = self
            .handles
            .values()
            .filter_map(|h| match h {
                Handle::File { ino, upper: false, .. } => Some(*ino),
                _ => None,
            })
            .collect();
        for n in self.subtree(id) {
            let (dir, name) = self.locate(Layer::Upper, n)?;
            let st = sys::stat_at(dir.as_fd(), &name)?;
            self.ids.insert(
                Ident::Upper {
                    dev: st.st_dev,
                    ino: st.st_ino,
                },
                n,
            );
            self.node_mut(n)?.upper = true;
            if open_below.contains(&n) {
                self.reopen_handles(n, dir.as_fd(), &name);
            }
        }
        Ok(())
    }

    /// Whether `ancestor` is `id` or above it (by first names).
    fn is_ancestor(&self, ancestor: u64, id: u64) -> bool {
        let mut cur = id;
        for _ in 0..MAX_DEPTH {
            if cur == ancestor {
                return true;
            }
            match self.nodes.get(&cur).and_then(|node| node.names.first()) {
                Some((p, _)) => cur = *p,
                None => return false,
            }
        }
        false
    }

    /// Live nodes at or below `id` (by their first name).
    fn subtree(&self, id: u64) -> Vec<u64> {
        self.nodes
            .keys()
            .copied()
            .filter(|&n| self.is_ancestor(id, n))
            .collect()
    }

    /// The merged listing of directory `id` (no whiteouts, each name once).
    fn merged_names(&self, id: u64) -> io::Result<Vec<(CString, Found)>> {
        let node = self.node(id)?;
        if node.kind != libc::S_IFDIR {
            return Err(errno(libc::ENOTDIR));
        }
        let (in_upper, merge_lower) = (node.upper, node.lower);
        let path = self.path(id)?;
        let lower_dir = if merge_lower {
            match sys::open_beneath(self.root(Layer::Lower)?, &path, libc::O_PATH | libc::O_DIRECTORY) {
                Ok(fd) => Some(fd),
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => None,
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        if in_upper {
            let root = self.root(Layer::Upper)?;
            let dir = sys::open_beneath(root, &path, libc::O_PATH | libc::O_DIRECTORY)?;
            for name in sys::read_dir_names(sys::open_beneath(root, &path, libc::O_RDONLY | libc::O_DIRECTORY)?)? {
                let Some(st) = sys::stat_opt(dir.as_fd(), &name)? else {
                    continue;
                };
                if sys::is_whiteout(&st) {
                    seen.insert(name);
                    continue;
                }
                let mut lower = None;
                if let (Some(ldir), true) = (&lower_dir, kind_of(&st) == libc::S_IFDIR) {
                    if let Some(lst) = sys::stat_opt(ldir.as_fd(), &name)? {
                        if kind_of(&lst) == libc::S_IFDIR && !is_opaque(dir.as_fd(), &name)? {
                            lower = Some(lst);
                        }
                    }
                }
                seen.insert(name.clone());
                out.push((name, Found { upper: Some(st), lower }));
            }
        }
        if let Some(ldir) = &lower_dir {
            let listing =
                sys::open_beneath_noatime(self.root(Layer::Lower)?, &path, libc::O_RDONLY | libc::O_DIRECTORY)?;
            for name in sys::read_dir_names(listing)? {
                if seen.contains(&name) {
                    continue;
                }
                let Some(st) = sys::stat_opt(ldir.as_fd(), &name)? else {
                    continue;
                };
                if sys::is_whiteout(&st) {
                    continue;
                }
                out.push((
                    name,
                    Found {
                        upper: None,
                        lower: Some(st),
                    },
                ));
            }
        }
        Ok(out)
    }

    fn add_handle(&mut self, handle: Handle) -> io::Result<u64> {
        if self.handles.len() >= MAX_HANDLES {
            return Err(errno(libc::EMFILE));
        }
        let id = self.next_handle;
        self.next_handle += 1;
        self.handles.insert(id, handle);
        Ok(id)
    }

    fn file(&self, handle: u64) -> io::Result<&File> {
        match self.handles.get(&handle) {
            Some(Handle::File { file, .. }) => Ok(file),
            _ => Err(errno(libc::EBADF)),
        }
    }

    /// Gives a new entry the requester's ownership (when we may). In a
    /// set-group-id directory the group stays the directory's, as Linux does.
    fn own_new(&self, dir: BorrowedFd<'_>, name: &CStr, ctx: Context) -> io::Result<()> {
        if !self.as_root {
            return Ok(());
        }
        let parent = sys::fstat(dir)?;
        let gid = if parent.st_mode & libc::S_ISGID != 0 {
            u32::MAX
        } else {
            ctx.gid
        };
        ignore_eperm(sys::chown_at(dir, name, ctx.uid, gid))
    }

    /// The upper directory of `parent`, ready to receive `name` (which
    /// must be free in the merged view). Returns the directory, whether a
    /// whiteout holds `name` there, and whether the lower layer has
    /// something at `name` that the new entry must keep hidden.
    fn prepare_create(&mut self, parent: u64, name: &CStr) -> io::Result<(OwnedFd, bool, bool)> {
        if self.probe(parent, name)?.is_some() {
            return Err(errno(libc::EEXIST));
        }
        self.copy_up(parent)?;
        let dir = self.dir_fd(Layer::Upper, parent)?;
        let whiteout = sys::stat_opt(dir.as_fd(), name)?.is_some_and(|st| sys::is_whiteout(&st));
        let hides_lower = whiteout || self.lower_has(parent, name)?;
        Ok((dir, whiteout, hides_lower))
    }

    fn open_node(&mut self, ino: u64, flags: u32) -> io::Result<(u64, OpenFlags)> {
        let flags = flags as i32;
        let node = self.node(ino)?;
        let kind = node.kind;
        if kind != libc::S_IFREG && kind != libc::S_IFDIR {
            // Opening a FIFO would block the VMM, a device would reach the host's.
            return Err(errno(libc::EINVAL));
        }
        let write = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        if flags & libc::O_TRUNC != 0 && flags & libc::O_ACCMODE != libc::O_RDONLY {
            self.copy_up_sized(ino, 0)?;
        } else if write {
            self.copy_up(ino)?;
        }
        if self.handles.len() >= MAX_HANDLES {
            return Err(errno(libc::EMFILE));
        }
        let layer = self.layer_of(ino)?;
        let keep = libc::O_ACCMODE | libc::O_APPEND | libc::O_TRUNC | libc::O_SYNC | libc::O_DSYNC;
        let host = (flags & keep) | libc::O_NONBLOCK;
        // An unlinked file cannot be opened again by name (only its
        // existing handles stay usable).
        let (dir, name) = self.locate(layer, ino)?;
        let fd = match layer {
            Layer::Lower => sys::open_noatime(dir.as_fd(), &name, host & !(libc::O_TRUNC | libc::O_ACCMODE))?,
            Layer::Upper => sys::open_at(dir.as_fd(), &name, host, 0)?,
        };
        let st = sys::fstat(fd.as_fd())?;
        if kind_of(&st) != libc::S_IFREG && kind_of(&st) != libc::S_IFDIR {
            return Err(errno(libc::EINVAL));
        }
        if flags & libc::O_NONBLOCK == 0 {
            // SAFETY: plain fcntl calls on a descriptor we own. Only
            // O_NONBLOCK changes: O_NOATIME must stay.
            unsafe {
                let current = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
                if current >= 0 {
                    libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, current & !libc::O_NONBLOCK);
                }
            }
        }
        let handle = self.add_handle(Handle::File {
            ino,
            file: File::from(fd),
            upper: layer == Layer::Upper,
        })?;
        Ok((handle, 0))
    }

    fn rename_inner(
        &mut self,
        (parent, name, src_id, src): (u64, &CStr, u64, &Found),
        (new_parent, new_name, dst): (u64, &CStr, Option<(u64, Found)>),
        flags: u32,
    ) -> io::Result<()> {
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        // A directory cannot move below itself; refuse before copying anything up.
        let dst_id = dst.as_ref().map(|(id, _)| *id);
        if self.is_ancestor(src_id, new_parent) || (exchange && dst_id.is_some_and(|d| self.is_ancestor(d, parent))) {
            return Err(errno(libc::EINVAL));
        }
        if let Some((dst_id, dst)) = &dst {
            if *dst_id == src_id {
                return Ok(()); // two names of one file: rename(2) does nothing
            }
            if !exchange {
                match (src.is_dir(), dst.is_dir()) {
                    (true, false) => return Err(errno(libc::ENOTDIR)),
                    (false, true) => return Err(errno(libc::EISDIR)),
                    (true, true) if !self.merged_names(*dst_id)?.is_empty() => return Err(errno(libc::ENOTEMPTY)),
                    _ => {}
                }
            }
        }
        let src_had_lower = src.is_dir() && self.node(src_id)?.lower;
        if src_had_lower {
            self.copy_up_tree(src_id)?;
        } else {
            self.copy_up(src_id)?;
        }
        let mut dst_had_lower = false;
        if let (true, Some((dst_id, dst))) = (exchange, &dst) {
            dst_had_lower = dst.is_dir() && self.node(*dst_id)?.lower;
            if dst_had_lower {
                self.copy_up_tree(*dst_id)?;
            } else {
                self.copy_up(*dst_id)?;
            }
        }
        self.copy_up(new_parent)?;
        let old_in_lower = self.lower_has(parent, name)?;
        let new_in_lower = self.lower_has(new_parent, new_name)?;
        let old_dir = self.dir_fd(Layer::Upper, parent)?;
        let new_dir = self.dir_fd(Layer::Upper, new_parent)?;
        // Directories are made opaque before they move: harmless where
        // they are (any lower contents there are all copied up by now), and
        // so never missing where they land.
        if src.is_dir() && (src_had_lower || new_in_lower) {
            set_opaque(old_dir.as_fd(), name)?;
        }
        if let (true, Some((_, dst))) = (exchange, &dst) {
            if dst.is_dir() && (dst_had_lower || old_in_lower) {
                set_opaque(new_dir.as_fd(), new_name)?;
            }
        }
        let mut replaced = None;
        let mut onto_whiteout = false;
        if !exchange {
            match &dst {
                Some((dst_id, dst)) if dst.upper.is_some() => {
                    if dst.is_dir() {
                        self.purge_whiteouts(*dst_id)?;
                    }
                    replaced = sys::stat_opt(new_dir.as_fd(), new_name)?;
                }
                _ => {
                    onto_whiteout = sys::stat_opt(new_dir.as_fd(), new_name)?.is_some_and(|st| sys::is_whiteout(&st));
                }
            }
        }
        if onto_whiteout && src.is_dir() {
            // A directory cannot replace the whiteout: swap the two, which
            // leaves the whiteout at the old name, wanted there or removed.
            sys::rename_at(old_dir.as_fd(), name, new_dir.as_fd(), new_name, libc::RENAME_EXCHANGE)?;
            if !old_in_lower {
                sys::unlink_at(old_dir.as_fd(), name, 0)?;
            }
        } else {
            // (The merged view already said the target is free: a whiteout
            // there is simply replaced.)
            let host_flags = if onto_whiteout {
                0
            } else {
                flags & (libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE)
            };
            let whiteout = if !exchange && old_in_lower {
                Some(temp_whiteout(old_dir.as_fd())?)
            } else {
                None
            };
            if let Err(e) = sys::rename_at(old_dir.as_fd(), name, new_dir.as_fd(), new_name, host_flags) {
                if let Some(tmp) = &whiteout {
                    let _ = sys::unlink_at(old_dir.as_fd(), tmp, 0);
                }
                return Err(e);
            }
            if let Some(tmp) = &whiteout {
                sys::rename_at(old_dir.as_fd(), tmp, old_dir.as_fd(), name, 0)?;
            }
        }
        if let Some(st) = replaced {
            self.forget_ident(&st);
        }
        // The tables follow the host: names move, moved trees lose their
        // lower layer (all of it is in the upper one now).
        match dst {
            Some((dst_id, _)) if exchange => {
                // Each name taken over is dropped from the node that had it.
                self.add_name(dst_id, parent, name);
                self.add_name(src_id, new_parent, new_name);
                self.detach_lower(dst_id);
            }
            _ => {
                self.add_name(src_id, new_parent, new_name);
                self.remove_name(src_id, parent, name);
            }
        }
        self.detach_lower(src_id);
        Ok(())
    }

    fn detach_lower(&mut self, id: u64) {
        let is_dir = self.nodes.get(&id).is_some_and(|n| n.kind == libc::S_IFDIR);
        // Only a directory has anything below it; renames of files are common.
        let moved = if is_dir { self.subtree(id) } else { vec![id] };
        for n in moved {
            if let Some(node) = self.nodes.get_mut(&n) {
                node.lower = false;
                node.upper = true;
            }
        }
    }

    /// Removes the whiteouts in upper directory `id` (before removing it or
    /// renaming over it); anything else there means it is not empty.
    fn purge_whiteouts(&self, id: u64) -> io::Result<()> {
        let path = self.path(id)?;
        let root = self.root(Layer::Upper)?;
        let dir = sys::open_beneath(root, &path, libc::O_PATH | libc::O_DIRECTORY)?;
        let names = sys::read_dir_names(sys::open_beneath(root, &path, libc::O_RDONLY | libc::O_DIRECTORY)?)?;
        for name in &names {
            match sys::stat_opt(dir.as_fd(), name)? {
                Some(st) if sys::is_whiteout(&st) => {}
                None => {}
                Some(_) => return Err(errno(libc::ENOTEMPTY)),
            }
        }
        for name in &names {
            sys::unlink_at(dir.as_fd(), name, 0)?;
        }
        Ok(())
    }

    fn rmdir_inner(&mut self, parent: u64, name: &CStr, id: u64, found: &Found) -> io::Result<()> {
        if !self.merged_names(id)?.is_empty() {
            return Err(errno(libc::ENOTEMPTY));
        }
        let whiteout = self.lower_has(parent, name)?;
        if whiteout {
            self.copy_up(parent)?;
        }
        if found.upper.is_some() {
            self.purge_whiteouts(id)?;
        }
        let dir = self.dir_fd(Layer::Upper, parent)?;
        if whiteout {
            whiteout_over(dir.as_fd(), name, found.upper.is_some())?;
        } else if found.upper.is_some() {
            sys::unlink_at(dir.as_fd(), name, libc::AT_REMOVEDIR)?;
        }
        if let Some(st) = &found.upper {
            self.forget_ident(st);
        }
        self.remove_name(id, parent, name);
        Ok(())
    }

    fn setattr_inner(&mut self, ino: u64, set: &SetAttr) -> io::Result<()> {
        let handle_file = match set.handle.map(|h| self.handles.get(&h)) {
            Some(Some(Handle::File { file, upper: true, .. })) => Some(file.try_clone()?),
            _ => None,
        };
        let named = ino == ROOT_ID || !self.node(ino)?.names.is_empty();
        let target: OwnedFd = if named {
            self.copy_up_sized(ino, set.size.unwrap_or(u64::MAX))?;
            self.node_fd(ino)?
        } else {
            handle_file
                .as_ref()
                .ok_or_else(|| errno(libc::ENOENT))?
                .try_clone()?
                .into()
        };
        let st = sys::fstat(target.as_fd())?;
        if set.uid.is_some() || set.gid.is_some() {
            let (mut uid, mut gid) = (set.uid.unwrap_or(u32::MAX), set.gid.unwrap_or(u32::MAX));
            if let Some(map) = &self.owner_map {
                (uid, gid) = (map.host_uid(uid), map.host_gid(gid));
            }
            sys::chown_at(target.as_fd(), EMPTY, uid, gid)?;
        }
        if let Some(mode) = set.mode {
            if kind_of(&st) == libc::S_IFLNK {
                return Err(errno(libc::EOPNOTSUPP));
            }
            sys::chmod_at(target.as_fd(), EMPTY, mode & 0o7777)?;
        }
        if let Some(size) = set.size {
            match kind_of(&st) {
                libc::S_IFREG => {}
                libc::S_IFDIR => return Err(errno(libc::EISDIR)),
                _ => return Err(errno(libc::EINVAL)),
            }
            let file = match handle_file {
                Some(file) => file,
                None => {
                    let (dir, name) = self.locate(Layer::Upper, ino)?;
                    File::from(sys::open_at(dir.as_fd(), &name, libc::O_WRONLY | libc::O_NONBLOCK, 0)?)
                }
            };
            file.set_len(size)?;
        }
        if set.atime.is_some() || set.mtime.is_some() {
            let times = [timespec(set.atime)?, timespec(set.mtime)?];
            sys::utimens_at(target.as_fd(), EMPTY, &times)?;
        }
        Ok(())
    }

    fn dot_entry(&mut self, id: u64) -> Entry {
        let st = self.stat_node(id).ok();
        match st {
            Some(st) => self.entry(id, &st),
            None => Entry {
                attr: Attr {
                    ino: id,
                    st_ino: node_ino(id),
                    mode: libc::S_IFDIR,
                    ..Attr::default()
                },
                generation: 0,
                entry_timeout: Duration::ZERO,
                attr_timeout: Duration::ZERO,
            },
        }
    }
}

impl FileSystem for Overlay {
    fn lookup(&mut self, ctx: Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        if let Some(echo) = Echo::of(ctx) {
            return self.echo_lookup(echo, parent, name);
        }
        self.lookup_found(parent, name)
    }

    fn forget(&mut self, ino: u64, nlookup: u64) {
        if ino == ROOT_ID {
            return;
        }
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.lookups = node.lookups.saturating_sub(nlookup);
            self.maybe_drop(ino);
        }
    }

    fn getattr(&mut self, _ctx: Context, ino: u64, handle: Option<u64>) -> io::Result<(Attr, Duration)> {
        if let Some(h) = handle {
            match self.handles.get(&h) {
                Some(Handle::File { ino: hino, file, .. }) => {
                    let hino = *hino;
                    return Ok((self.attr(hino, &sys::fstat(file.as_fd())?), self.options.attr_timeout));
                }
                Some(Handle::Dir { .. }) => {}
                None => return Err(errno(libc::EBADF)),
            }
        }
        let st = self.stat_node(ino)?;
        Ok((self.attr(ino, &st), self.options.attr_timeout))
    }

    fn setattr(&mut self, ctx: Context, ino: u64, set: SetAttr) -> io::Result<(Attr, Duration)> {
        if let Some(echo) = Echo::of(ctx) {
            return self.echo_setattr(echo, ino);
        }
        let changes = set.mode.is_some()
            || set.uid.is_some()
            || set.gid.is_some()
            || set.size.is_some()
            || set.atime.is_some()
            || set.mtime.is_some();
        if changes {
            self.setattr_inner(ino, &set)?;
        }
        self.getattr(ctx, ino, set.handle)
    }

    fn readlink(&mut self, _ctx: Context, ino: u64) -> io::Result<Vec<u8>> {
        if self.node(ino)?.kind != libc::S_IFLNK {
            return Err(errno(libc::EINVAL));
        }
        let (dir, name) = self.locate(self.layer_of(ino)?, ino)?;
        sys::readlink_at(dir.as_fd(), &name)
    }

    fn symlink(&mut self, ctx: Context, parent: u64, name: &CStr, target: &CStr) -> io::Result<Entry> {
        if let Some(echo) = Echo::of(ctx) {
            return self.echo_arrive(echo, parent, name);
        }
        let (dir, whiteout, _) = self.prepare_create(parent, name)?;
        let dir = dir.as_fd();
        create_over(dir, name, whiteout, false, |n| {
            sys::symlink_at(target, dir, n)?;
            self.own_new(dir, n, ctx)
                .inspect_err(|_| drop(sys::unlink_at(dir, n, 0)))
        })?;
        self.lookup_found(parent, name)
    }

    fn mknod(
        &mut self,
        ctx: Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        _rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        if let Some(echo) = Echo::of(ctx) {
            return self.echo_arrive(echo, parent, name);
        }
        let kind = mode & libc::S_IFMT;
        match kind {
            libc::S_IFIFO | libc::S_IFSOCK | libc::S_IFREG => {}
            libc::S_IFCHR | libc::S_IFBLK => return Err(errno(libc::EPERM)),
            _ => return Err(errno(libc::EINVAL)),
        }
        let (dir, whiteout, _) = self.prepare_create(parent, name)?;
        let dir = dir.as_fd();
        create_over(dir, name, whiteout, false, |n| {
            sys::mknod_at(dir, n, kind | 0o600, 0)?;
            self.own_new(dir, n, ctx)
                .and_then(|()| sys::chmod_at(dir, n, mode & !umask & 0o7777))
                .inspect_err(|_| drop(sys::unlink_at(dir, n, 0)))
        })?;
        self.lookup_found(parent, name)
    }

    fn mkdir(&mut self, ctx: Context, parent: u64, name: &CStr, mode: u32, umask: u32) -> io::Result<Entry> {
        if let Some(echo) = Echo::of(ctx) {
            return self.echo_arrive(echo, parent, name);
        }
        let (dir, whiteout, hides_lower) = self.prepare_create(parent, name)?;
        let dir = dir.as_fd();
        create_over(dir, name, whiteout, true, |n| {
            sys::mkdir_at(dir, n, 0o700)?;
            let finish = || -> io::Result<()> {
                if hides_lower {
                    // Re-created over a deleted lower directory: its old
                    // contents must not show through.
                    set_opaque(dir, n)?;
                }
                self.own_new(dir, n, ctx)?;
                let created = sys::stat_at(dir, n)?;
                let mut perm = mode & !umask & 0o7777;
                perm |= created.st_mode & libc::S_ISGID; // inherited from a set-group-id parent
                sys::chmod_at(dir, n, perm)
            };
            finish().inspect_err(|_| drop(sys::unlink_at(dir, n, libc::AT_REMOVEDIR)))
        })?;
        self.lookup_found(parent, name)
    }

    fn unlink(&mut self, ctx: Context, parent: u64, name: &CStr) -> io::Result<()> {
        if let Some(echo) = Echo::of(ctx) {
            return self.echo_leave(echo, parent, name);
        }
        let found = self.probe(parent, name)?.ok_or_else(|| errno(libc::ENOENT))?;
        if found.is_dir() {
            return Err(errno(libc::EISDIR));
        }
        let whiteout = self.lower_has(parent, name)?;
        if whiteout {
            self.copy_up(parent)?;
        }
        if whiteout {
            whiteout_over(self.dir_fd(Layer::Upper, parent)?.as_fd(), name, false)?;
        } else if found.upper.is_some() {
            sys::unlink_at(self.dir_fd(Layer::Upper, parent)?.as_fd(), name, 0)?;
        }
        if let Some(st) = &found.upper {
            self.forget_ident(st);
        }
        if let Some(&id) = self.by_name.get(&(parent, name.to_owned())) {
            self.remove_name(id, parent, name);
        }
        Ok(())
    }

    fn rmdir(&mut self, ctx: Context, parent: u64, name: &CStr) -> io::Result<()> {
        if let Some(echo) = Echo::of(ctx) {
            return self.echo_leave(echo, parent, name);
        }
        let found = self.probe(parent, name)?.ok_or_else(|| errno(libc::ENOENT))?;
        if !found.is_dir() {
            return Err(errno(libc::ENOTDIR));
        }
        let id = self.insert_node(parent, name, &found)?;
        let result = self.rmdir_inner(parent, name, id, &found);
        self.forget(id, 1);
        result
    }

    fn rename(
        &mut self,
        ctx: Context,
        parent: u64,
        name: &CStr,
        new_parent: u64,
        new_name: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        if let Some(echo) = Echo::of(ctx) {
            if flags != 0 {
                return Err(errno(libc::EPERM));
            }
            return self.echo_rename(echo, (parent, name), (new_parent, new_name));
        }
        let known = libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE;
        if flags & !known != 0 || flags == known {
            return Err(errno(libc::EINVAL));
        }
        let src = self.probe(parent, name)?.ok_or_else(|| errno(libc::ENOENT))?;
        let dst = self.probe(new_parent, new_name)?;
        if flags & libc::RENAME_EXCHANGE != 0 && dst.is_none() {
            return Err(errno(libc::ENOENT));
        }
        if flags & libc::RENAME_NOREPLACE != 0 && dst.is_some() {
            return Err(errno(libc::EEXIST));
        }
        if parent == new_parent && name == new_name {
            return Ok(());
        }
        // Both ends get (temporary) nodes so copy-up can find their paths.
        let src_id = self.insert_node(parent, name, &src)?;
        let dst_node = match &dst {
            Some(found) => match self.insert_node(new_parent, new_name, found) {
                Ok(id) => Some((id, *found)),
                Err(e) => {
                    self.forget(src_id, 1);
                    return Err(e);
                }
            },
            None => None,
        };
        let result = self.rename_inner((parent, name, src_id, &src), (new_parent, new_name, dst_node), flags);
        self.forget(src_id, 1);
        if let Some((id, _)) = dst_node {
            self.forget(id, 1);
        }
        result
    }

    fn link(&mut self, ctx: Context, ino: u64, new_parent: u64, new_name: &CStr) -> io::Result<Entry> {
        if Echo::of(ctx).is_some() {
            return Err(errno(libc::EPERM));
        }
        if self.node(ino)?.kind == libc::S_IFDIR {
            return Err(errno(libc::EPERM));
        }
        if self.probe(new_parent, new_name)?.is_some() {
            return Err(errno(libc::EEXIST));
        }
        self.copy_up(ino)?;
        let (dir, whiteout, _) = self.prepare_create(new_parent, new_name)?;
        let (old_dir, old_name) = self.locate(Layer::Upper, ino)?;
        create_over(dir.as_fd(), new_name, whiteout, false, |n| {
            sys::link_at(old_dir.as_fd(), &old_name, dir.as_fd(), n)
        })?;
        self.lookup_found(new_parent, new_name)
    }

    fn open(&mut self, ctx: Context, ino: u64, flags: u32) -> io::Result<(u64, OpenFlags)> {
        if let Some(echo) = Echo::of(ctx) {
            return self.echo_open(echo, ino);
        }
        self.open_node(ino, flags)
    }

    fn create(
        &mut self,
        ctx: Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        flags: u32,
        umask: u32,
    ) -> io::Result<(Entry, u64, OpenFlags)> {
        if Echo::of(ctx).is_some() {
            return Err(errno(libc::EPERM));
        }
        let oflags = flags as i32;
        if self.probe(parent, name)?.is_some() {
            if oflags & libc::O_EXCL != 0 {
                return Err(errno(libc::EEXIST));
            }
            let entry = self.lookup_found(parent, name)?;
            return match self.open_node(entry.attr.ino, flags) {
                Ok((handle, open_flags)) => Ok((entry, handle, open_flags)),
                Err(e) => {
                    self.forget(entry.attr.ino, 1);
                    Err(e)
                }
            };
        }
        if self.handles.len() >= MAX_HANDLES {
            return Err(errno(libc::EMFILE));
        }
        let (dir, whiteout, _) = self.prepare_create(parent, name)?;
        let dir = dir.as_fd();
        let keep = libc::O_ACCMODE | libc::O_APPEND | libc::O_SYNC | libc::O_DSYNC;
        let perm = mode & !umask & 0o7777;
        let file = create_over(dir, name, whiteout, false, |n| {
            let file = File::from(sys::open_at(
                dir,
                n,
                (oflags & keep) | libc::O_CREAT | libc::O_EXCL,
                perm,
            )?);
            self.own_new(dir, n, ctx)
                .and_then(|()| file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(perm)))
                .inspect_err(|_| drop(sys::unlink_at(dir, n, 0)))?;
            Ok(file)
        })?;
        let entry = self.lookup_found(parent, name)?;
        match self.add_handle(Handle::File {
            ino: entry.attr.ino,
            file,
            upper: true,
        }) {
            Ok(handle) => Ok((entry, handle, 0)),
            Err(e) => {
                self.forget(entry.attr.ino, 1);
                Err(e)
            }
        }
    }

    fn read(&mut self, _ino: u64, handle: u64, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let file = self.file(handle)?;
        let mut done = 0;
        while done < buf.len() {
            let Some(rest) = buf.get_mut(done..) else { break };
            let n = file.read_at(rest, offset.saturating_add(done as u64))?;
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(done)
    }

    fn write(
        &mut self,
        _ctx: Context,
        _ino: u64,
        handle: u64,
        offset: u64,
        data: &[u8],
        flags: u32,
    ) -> io::Result<usize> {
        let file = self.file(handle)?;
        i64::try_from(offset).map_err(|_| errno(libc::EFBIG))?;
        if flags & WRITE_KILL_SUIDGID != 0 {
            // The guest's writer is unprivileged; we write as ourselves, so
            // drop set-id bits the way its kernel would have.
            let st = sys::fstat(file.as_fd())?;
            let mut kill = libc::S_ISUID;
            if st.st_mode & libc::S_IXGRP != 0 {
                kill |= libc::S_ISGID;
            }
            if st.st_mode & kill != 0 {
                let mode = st.st_mode & 0o7777 & !kill;
                file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
            }
        }
        file.write_all_at(data, offset)?;
        Ok(data.len())
    }

    /// Writes reach the host file before they are answered, so a close
    /// has nothing to flush: ENOSYS makes the guest kernel stop sending
    /// FLUSH at all, one round trip less per close(2) (tens of ms each
    /// where the guest kernel is interpreted).
    fn flush(&mut self, _ino: u64, handle: u64) -> io::Result<()> {
        self.file(handle)?;
        Err(errno(libc::ENOSYS))
    }

    fn fsync(&mut self, _ino: u64, handle: u64, datasync: bool) -> io::Result<()> {
        let file = self.file(handle)?;
        if datasync {
            file.sync_data()
        } else {
            file.sync_all()
        }
    }

    fn release(&mut self, _ino: u64, handle: u64) -> io::Result<()> {
        match self.handles.get(&handle) {
            Some(Handle::File { .. }) => {
                self.handles.remove(&handle);
                Ok(())
            }
            _ => Err(errno(libc::EBADF)),
        }
    }

    fn opendir(&mut self, _ctx: Context, ino: u64, _flags: u32) -> io::Result<(u64, OpenFlags)> {
        if self.handles.len() >= MAX_HANDLES {
            return Err(errno(libc::EMFILE));
        }
        let merged = self.merged_names(ino)?;
        let parent = self.node(ino)?.names.first().map_or(ROOT_ID, |(p, _)| *p);
        let mut entries = Vec::with_capacity(merged.len() + 2);
        for (name, id) in [(c".", ino), (c"..", parent)] {
            let d_ino = match self.stat_node(id) {
                Ok(st) => self.guest_ino(id, &st),
                Err(_) => node_ino(id),
            };
            entries.push(Listed {
                name: name.to_owned(),
                ino: id,
                d_ino,
                kind: libc::S_IFDIR,
            });
        }
        for (name, found) in merged {
            let id = self.id_for(ino, &name, &found);
            entries.push(Listed {
                kind: found.kind(),
                ino: id,
                d_ino: found.stat().map_or(node_ino(id), |st| self.guest_ino(id, st)),
                name,
            });
        }
        let handle = self.add_handle(Handle::Dir { ino, entries })?;
        Ok((handle, 0))
    }

    fn readdir(
        &mut self,
        _ctx: Context,
        _ino: u64,
        handle: u64,
        offset: u64,
        add: &mut dyn FnMut(DirEntry<'_>) -> bool,
    ) -> io::Result<()> {
        let Some(Handle::Dir { entries, .. }) = self.handles.get(&handle) else {
            return Err(errno(libc::EBADF));
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, e) in entries.iter().enumerate().skip(start) {
            let entry = DirEntry {
                ino: e.d_ino,
                next_offset: i as u64 + 1,
                kind: e.kind >> 12,
                name: e.name.to_bytes(),
            };
            if !add(entry) {
                break;
            }
        }
        Ok(())
    }

    fn readdirplus(
        &mut self,
        _ctx: Context,
        _ino: u64,
        handle: u64,
        offset: u64,
        add: &mut dyn FnMut(DirEntry<'_>, Entry) -> bool,
    ) -> io::Result<()> {
        let dir = match self.handles.get(&handle) {
            Some(Handle::Dir { ino, .. }) => *ino,
            _ => return Err(errno(libc::EBADF)),
        };
        let mut i = usize::try_from(offset).unwrap_or(usize::MAX);
        let listed = |this: &Self, i: usize| match this.handles.get(&handle) {
            Some(Handle::Dir { entries, .. }) => entries.get(i).map(|e| (e.name.clone(), e.ino, e.kind)),
            _ => None,
        };
        while let Some((name, ino, kind)) = listed(self, i) {
            let dot = name.as_bytes() == b"." || name.as_bytes() == b"..";
            let entry = if dot {
                self.dot_entry(ino)
            } else {
                match self.lookup_found(dir, &name) {
                    Ok(entry) => entry,
                    Err(e) => {
                        // Gone since opendir: leave it out.
                        log::trace!("virtio-fs readdirplus: {name:?}: {e}");
                        i += 1;
                        continue;
                    }
                }
            };
            let de = DirEntry {
                ino: entry.attr.inode(),
                next_offset: i as u64 + 1,
                kind: (if dot { kind } else { entry.attr.mode & libc::S_IFMT }) >> 12,
                name: name.to_bytes(),
            };
            if !add(de, entry) {
                if !dot {
                    self.forget(entry.attr.ino, 1);
                }
                break;
            }
            i += 1;
        }
        Ok(())
    }

    fn releasedir(&mut self, _ino: u64, handle: u64) -> io::Result<()> {
        match self.handles.get(&handle) {
            Some(Handle::Dir { .. }) => {
                self.handles.remove(&handle);
                Ok(())
            }
            _ => Err(errno(libc::EBADF)),
        }
    }

    fn fsyncdir(&mut self, _ino: u64, handle: u64, datasync: bool) -> io::Result<()> {
        let dir = match self.handles.get(&handle) {
            Some(Handle::Dir { ino, .. }) => *ino,
            _ => return Err(errno(libc::EBADF)),
        };
        if !self.node(dir)?.upper {
            return Ok(()); // nothing of ours to flush
        }
        let path = self.path(dir)?;
        let file = File::from(sys::open_beneath(
            self.root(Layer::Upper)?,
            &path,
            libc::O_RDONLY | libc::O_DIRECTORY,
        )?);
        if datasync {
            file.sync_data()
        } else {
            file.sync_all()
        }
    }

    fn statfs(&mut self, _ctx: Context, _ino: u64) -> io::Result<StatFs> {
        let st = sys::fstatvfs(self.upper.as_fd())?;
        Ok(StatFs {
            blocks: st.f_blocks,
            bfree: st.f_bfree,
            bavail: st.f_bavail,
            files: st.f_files,
            ffree: st.f_ffree,
            bsize: st.f_bsize as u32,
            namelen: st.f_namemax as u32,
            frsize: st.f_frsize as u32,
        })
    }

    fn setxattr(&mut self, ctx: Context, ino: u64, name: &CStr, value: &[u8], flags: u32) -> io::Result<()> {
        if Echo::of(ctx).is_some() {
            return Err(errno(libc::EPERM));
        }
        if is_private_xattr(name.to_bytes()) {
            return Err(errno(libc::EPERM));
        }
        self.copy_up(ino)?;
        let fd = self.node_fd(ino)?;
        sys::set_xattr(fd.as_fd(), name, value, flags as i32)
    }

    fn getxattr(&mut self, _ctx: Context, ino: u64, name: &CStr) -> io::Result<Vec<u8>> {
        if is_private_xattr(name.to_bytes()) {
            return Err(errno(libc::ENODATA));
        }
        let fd = self.node_fd(ino)?;
        sys::get_xattr(fd.as_fd(), name)
    }

    fn listxattr(&mut self, _ctx: Context, ino: u64) -> io::Result<Vec<u8>> {
        let fd = self.node_fd(ino)?;
        let names = sys::list_xattr(fd.as_fd())?;
        let mut out = Vec::with_capacity(names.len());
        for name in names
            .split(|&b| b == 0)
            .filter(|n| !n.is_empty() && !is_private_xattr(n))
        {
            out.extend_from_slice(name);
            out.push(0);
        }
        Ok(out)
    }

    fn removexattr(&mut self, ctx: Context, ino: u64, name: &CStr) -> io::Result<()> {
        if Echo::of(ctx).is_some() {
            return Err(errno(libc::EPERM));
        }
        if is_private_xattr(name.to_bytes()) {
            return Err(errno(libc::ENODATA));
        }
        self.copy_up(ino)?;
        let fd = self.node_fd(ino)?;
        sys::remove_xattr(fd.as_fd(), name)
    }

    fn access(&mut self, ctx: Context, ino: u64, mask: u32) -> io::Result<()> {
        let st = self.stat_node(ino)?;
        let mask = mask & 0o7;
        if mask == 0 {
            return Ok(());
        }
        let (st_uid, st_gid) = self.shown_owner(&st);
        let bits = if ctx.uid == 0 {
            // root: read and write always; execute if anyone may (or a dir).
            let x = if kind_of(&st) == libc::S_IFDIR || st.st_mode & 0o111 != 0 {
                1
            } else {
                0
            };
            0o6 | x
        } else if ctx.uid == st_uid {
            (st.st_mode >> 6) & 0o7
        } else if ctx.gid == st_gid {
            (st.st_mode >> 3) & 0o7
        } else {
            st.st_mode & 0o7
        };
        if bits & mask == mask {
            Ok(())
        } else {
            Err(errno(libc::EACCES))
        }
    }

    fn fallocate(&mut self, _ino: u64, handle: u64, mode: u32, offset: u64, length: u64) -> io::Result<()> {
        let file = self.file(handle)?;
        let offset = i64::try_from(offset).map_err(|_| errno(libc::EINVAL))?;
        let length = i64::try_from(length).map_err(|_| errno(libc::EINVAL))?;
        sys::fallocate(file.as_fd(), mode as i32, offset, length)
    }

    fn lseek(&mut self, _ino: u64, handle: u64, offset: u64, whence: u32) -> io::Result<u64> {
        let file = self.file(handle)?;
        let whence = match whence as i32 {
            w @ (libc::SEEK_SET | libc::SEEK_CUR | libc::SEEK_END | libc::SEEK_DATA | libc::SEEK_HOLE) => w,
            _ => return Err(errno(libc::EINVAL)),
        };
        let offset = i64::try_from(offset).map_err(|_| errno(libc::EINVAL))?;
        sys::lseek(file.as_fd(), offset, whence)
    }

    fn copy_file_range(
        &mut self,
        _ino_in: u64,
        handle_in: u64,
        offset_in: u64,
        _ino_out: u64,
        handle_out: u64,
        offset_out: u64,
        len: u64,
        flags: u64,
    ) -> io::Result<usize> {
        if flags != 0 {
            return Err(errno(libc::EINVAL));
        }
        let src = self.file(handle_in)?;
        let dst = self.file(handle_out)?;
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        sys::copy_file_range(src.as_fd(), offset_in, dst.as_fd(), offset_out, len)
    }

    fn syncfs(&mut self, _ino: u64) -> io::Result<()> {
        // syncfs refuses O_PATH descriptors such as the layer root.
        let dir = sys::open_beneath(self.upper.as_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY)?;
        sys::syncfs(dir.as_fd())
    }

    fn destroy(&mut self) {
        self.handles.clear();
        let root_lower = self.nodes.get(&ROOT_ID).is_some_and(|n| n.lower);
        self.nodes.clear();
        self.by_name.clear();
        self.nodes.insert(ROOT_ID, Self::root_node(root_lower));
    }
}
