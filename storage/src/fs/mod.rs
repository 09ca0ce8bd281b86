//! virtio-fs: the guest mounts a host directory through FUSE requests that
//! travel on virtio queues (`mount -t virtiofs <tag> <dir>` in the guest).
//!
//! Three layers, each replaceable on its own:
//!
//! - [`abi`]: the FUSE wire format (the kernel's `include/uapi/linux/fuse.h`,
//!   protocol 7.31+), as plain `#[repr(C)]` structs.
//! - [`server`]: decodes one FUSE request from the bytes the guest supplied,
//!   checks every length, name and number, calls a [`FileSystem`], and
//!   encodes the reply. Unknown opcodes answer `ENOSYS`.
//! - [`device`]: the virtio-fs device (type 26): config space with the tag,
//!   a high-priority queue and one request queue, served on the VMM's event
//!   loop with [`mvm_devices::virtio::serve_queue`].
//!
//! The file system behind it is [`overlay::Overlay`]: a host directory as
//! the read-only lower layer and a per-VM writable upper layer, with the
//! semantics of Linux overlayfs, entirely in this process (no host mount, no
//! privilege beyond access to the two directories).
//!
//! Why our own server on the FUSE ABI instead of `fuse-backend-rs`: that
//! crate pins `vm-memory = "=0.17.1"` and `virtio-queue` 0.17 while this
//! workspace is on 0.18 of both, so using it means two copies of guest
//! memory types and glue between them on every request; its overlay keeps
//! an open descriptor per inode (the fd exhaustion users of virtiofsd report
//! on large trees), and its server is written for a different request loop.
//! The FUSE ABI is small and stable (append-only since 7.x), the server is a
//! few hundred lines of checked decoding, and owning it lets every
//! guest-supplied value be validated the way the other devices here do.

use std::ffi::CStr;
use std::io;
use std::time::Duration;

pub mod abi;
pub mod device;
pub mod host_overlay;
pub mod overlay;
pub mod server;
pub mod vhost_user;
pub mod virtiofsd;
pub mod watch;

/// virtio device type of a file system device.
pub const DEVICE_TYPE_FS: u32 = 26;
/// Length of the tag field of the config space.
pub const TAG_LEN: usize = 36;
/// Request queues besides the high-priority one.
pub const NUM_REQUEST_QUEUES: u32 = 1;

/// The virtio-fs config space, the same for the in-process device and the
/// vhost-user frontend: the tag (NUL padded) and the number of request
/// queues (little endian).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSpace([u8; TAG_LEN + 4]);

impl ConfigSpace {
    /// `tag`: 1 to 36 bytes, no NUL or control characters (the guest names
    /// the file system by it in `mount`).
    pub fn new(tag: &str) -> Result<Self, crate::Error> {
        if tag.is_empty() || tag.len() > TAG_LEN || tag.chars().any(char::is_control) {
            return Err(crate::Error::FsTag { tag: tag.to_string() });
        }
        let mut bytes = [0u8; TAG_LEN + 4];
        bytes[..tag.len()].copy_from_slice(tag.as_bytes());
        bytes[TAG_LEN..].copy_from_slice(&NUM_REQUEST_QUEUES.to_le_bytes());
        Ok(ConfigSpace(bytes))
    }

    /// A guest read at `offset`; out-of-range reads leave `data` alone.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let Ok(start) = usize::try_from(offset) else { return };
        if let Some(src) = start.checked_add(data.len()).and_then(|end| self.0.get(start..end)) {
            data.copy_from_slice(src);
        }
    }
}

/// Node id of the root directory (FUSE_ROOT_ID).
pub const ROOT_ID: u64 = 1;

impl Attr {
    /// The inode number the guest sees.
    pub fn inode(&self) -> u64 {
        if self.st_ino != 0 {
            self.st_ino
        } else {
            self.ino
        }
    }
}

/// Who sent a request (from the FUSE request header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Context {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// File attributes as the guest sees them. `ino` is the node id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Attr {
    pub ino: u64,
    /// The inode number the guest's `stat` shows (and listings' `d_ino`),
    /// when it is not the node id: a file system that passes the host's
    /// numbers through keeps tools that record them (git's index) in
    /// agreement with the host. 0: the node id.
    pub st_ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: i64,
    pub atime_nsec: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub ctime: i64,
    pub ctime_nsec: u32,
    /// File type and permission bits (`S_IFREG | 0o644`, ...).
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
}

/// The answer to a lookup (and to create, mkdir, mknod, symlink, link):
/// the node, its attributes, and how long the guest may cache both.
/// Every `Entry` returned counts as one lookup of `attr.ino` that the guest
/// later returns with `forget`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub attr: Attr,
    pub generation: u64,
    pub entry_timeout: Duration,
    pub attr_timeout: Duration,
}

/// A time to set with `setattr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetTime {
    /// The host's current time.
    Now,
    /// Seconds and nanoseconds since the epoch.
    At(i64, u32),
}

/// What `setattr` changes; `None` leaves a field alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
    /// The open handle the change came through (`ftruncate`, `fchmod`).
    pub handle: Option<u64>,
}

/// One directory entry for `readdir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry<'a> {
    pub ino: u64,
    /// The offset to pass to the next `readdir` to continue after this entry.
    pub next_offset: u64,
    /// `DT_*` type (the `S_IFMT` bits of the mode shifted right by 12).
    pub kind: u32,
    pub name: &'a [u8],
}

/// File system statistics for `statfs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// Flags the file system returns from `open`/`create`/`opendir`
/// (`FOPEN_*` of the FUSE ABI).
pub type OpenFlags = u32;

/// A file system served to the guest. Node ids come from `lookup` and the
/// calls that create entries; handles from `open`, `create` and `opendir`.
/// Every id and handle a method receives comes from the guest and may be
/// one never handed out, or one already forgotten or released: such calls
/// return `EBADF`/`ENOENT`-style errors, never panic. Names are single path
/// components that the server has already checked (non-empty, no `/`, not
/// `.` or `..`, no NUL), but implementations must still never reach a path
/// outside their directories.
pub trait FileSystem: Send {
    fn lookup(&mut self, ctx: Context, parent: u64, name: &CStr) -> io::Result<Entry>;
    /// The guest dropped `nlookup` references to `ino`.
    fn forget(&mut self, ino: u64, nlookup: u64);
    /// Attributes; `handle` is set when the guest asks through an open file.
    fn getattr(&mut self, ctx: Context, ino: u64, handle: Option<u64>) -> io::Result<(Attr, Duration)>;
    fn setattr(&mut self, ctx: Context, ino: u64, set: SetAttr) -> io::Result<(Attr, Duration)>;
    fn readlink(&mut self, ctx: Context, ino: u64) -> io::Result<Vec<u8>>;
    fn symlink(&mut self, ctx: Context, parent: u64, name: &CStr, target: &CStr) -> io::Result<Entry>;
    /// Create a FIFO, socket or device node (the implementation may refuse
    /// kinds it does not support with `EPERM`/`EOPNOTSUPP`).
    fn mknod(&mut self, ctx: Context, parent: u64, name: &CStr, mode: u32, rdev: u32, umask: u32) -> io::Result<Entry>;
    fn mkdir(&mut self, ctx: Context, parent: u64, name: &CStr, mode: u32, umask: u32) -> io::Result<Entry>;
    fn unlink(&mut self, ctx: Context, parent: u64, name: &CStr) -> io::Result<()>;
    fn rmdir(&mut self, ctx: Context, parent: u64, name: &CStr) -> io::Result<()>;
    /// `flags`: 0, `RENAME_NOREPLACE` or `RENAME_EXCHANGE` (libc values).
    fn rename(
        &mut self,
        ctx: Context,
        parent: u64,
        name: &CStr,
        new_parent: u64,
        new_name: &CStr,
        flags: u32,
    ) -> io::Result<()>;
    fn link(&mut self, ctx: Context, ino: u64, new_parent: u64, new_name: &CStr) -> io::Result<Entry>;
    /// `flags` are the guest's `open(2)` flags.
    fn open(&mut self, ctx: Context, ino: u64, flags: u32) -> io::Result<(u64, OpenFlags)>;
    fn create(
        &mut self,
        ctx: Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        flags: u32,
        umask: u32,
    ) -> io::Result<(Entry, u64, OpenFlags)>;
    /// Read up to `buf.len()` bytes at `offset`; returns the count (0 at end).
    fn read(&mut self, ino: u64, handle: u64, offset: u64, buf: &mut [u8]) -> io::Result<usize>;
    fn write(&mut self, ctx: Context, ino: u64, handle: u64, offset: u64, data: &[u8], flags: u32)
        -> io::Result<usize>;
    fn flush(&mut self, ino: u64, handle: u64) -> io::Result<()>;
    fn fsync(&mut self, ino: u64, handle: u64, datasync: bool) -> io::Result<()>;
    fn release(&mut self, ino: u64, handle: u64) -> io::Result<()>;
    fn opendir(&mut self, ctx: Context, ino: u64, flags: u32) -> io::Result<(u64, OpenFlags)>;
    /// List entries starting at `offset` (0: the beginning, else a
    /// `next_offset` returned earlier), calling `add` for each until it
    /// returns false (the reply buffer is full; that entry was not taken).
    fn readdir(
        &mut self,
        ctx: Context,
        ino: u64,
        handle: u64,
        offset: u64,
        add: &mut dyn FnMut(DirEntry<'_>) -> bool,
    ) -> io::Result<()>;
    /// Like `readdir`, with each entry looked up. An entry that `add`
    /// accepts (returns true) counts as one lookup of its node, except `.`
    /// and `..`; one it refuses must not count.
    fn readdirplus(
        &mut self,
        ctx: Context,
        ino: u64,
        handle: u64,
        offset: u64,
        add: &mut dyn FnMut(DirEntry<'_>, Entry) -> bool,
    ) -> io::Result<()>;
    fn releasedir(&mut self, ino: u64, handle: u64) -> io::Result<()>;
    fn fsyncdir(&mut self, ino: u64, handle: u64, datasync: bool) -> io::Result<()>;
    fn statfs(&mut self, ctx: Context, ino: u64) -> io::Result<StatFs>;
    fn setxattr(&mut self, ctx: Context, ino: u64, name: &CStr, value: &[u8], flags: u32) -> io::Result<()>;
    /// The whole value (the server answers size queries and `ERANGE`).
    fn getxattr(&mut self, ctx: Context, ino: u64, name: &CStr) -> io::Result<Vec<u8>>;
    /// Names, each followed by a NUL (the server answers size queries).
    fn listxattr(&mut self, ctx: Context, ino: u64) -> io::Result<Vec<u8>>;
    fn removexattr(&mut self, ctx: Context, ino: u64, name: &CStr) -> io::Result<()>;
    /// `mask`: `F_OK` or a combination of `R_OK`, `W_OK`, `X_OK`.
    fn access(&mut self, ctx: Context, ino: u64, mask: u32) -> io::Result<()>;
    fn fallocate(&mut self, ino: u64, handle: u64, mode: u32, offset: u64, length: u64) -> io::Result<()>;
    /// `whence`: `SEEK_SET`, `SEEK_CUR`, `SEEK_END`, `SEEK_DATA`, `SEEK_HOLE`.
    fn lseek(&mut self, ino: u64, handle: u64, offset: u64, whence: u32) -> io::Result<u64>;
    #[allow(clippy::too_many_arguments)]
    fn copy_file_range(
        &mut self,
        ino_in: u64,
        handle_in: u64,
        offset_in: u64,
        ino_out: u64,
        handle_out: u64,
        offset_out: u64,
        len: u64,
        flags: u64,
    ) -> io::Result<usize>;
    /// Flush everything written to stable storage (`syncfs`).
    fn syncfs(&mut self, ino: u64) -> io::Result<()>;
    /// The guest unmounted (FUSE_DESTROY) or the device was reset: drop
    /// every node and handle.
    fn destroy(&mut self);
}

/// A file system shared between the device that serves the guest and the
/// VMM's other threads (the project watcher, the control socket): each
/// request holds the lock for its duration, so another thread holding it
/// sees the layers between two requests.
impl<T: FileSystem> FileSystem for std::sync::Arc<std::sync::Mutex<T>> {
    fn lookup(&mut self, ctx: Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        locked(self).lookup(ctx, parent, name)
    }

    fn forget(&mut self, ino: u64, nlookup: u64) {
        locked(self).forget(ino, nlookup)
    }

    fn getattr(&mut self, ctx: Context, ino: u64, handle: Option<u64>) -> io::Result<(Attr, Duration)> {
        locked(self).getattr(ctx, ino, handle)
    }

    fn setattr(&mut self, ctx: Context, ino: u64, set: SetAttr) -> io::Result<(Attr, Duration)> {
        locked(self).setattr(ctx, ino, set)
    }

    fn readlink(&mut self, ctx: Context, ino: u64) -> io::Result<Vec<u8>> {
        locked(self).readlink(ctx, ino)
    }

    fn symlink(&mut self, ctx: Context, parent: u64, name: &CStr, target: &CStr) -> io::Result<Entry> {
        locked(self).symlink(ctx, parent, name, target)
    }

    fn mknod(&mut self, ctx: Context, parent: u64, name: &CStr, mode: u32, rdev: u32, umask: u32) -> io::Result<Entry> {
        locked(self).mknod(ctx, parent, name, mode, rdev, umask)
    }

    fn mkdir(&mut self, ctx: Context, parent: u64, name: &CStr, mode: u32, umask: u32) -> io::Result<Entry> {
        locked(self).mkdir(ctx, parent, name, mode, umask)
    }

    fn unlink(&mut self, ctx: Context, parent: u64, name: &CStr) -> io::Result<()> {
        locked(self).unlink(ctx, parent, name)
    }

    fn rmdir(&mut self, ctx: Context, parent: u64, name: &CStr) -> io::Result<()> {
        locked(self).rmdir(ctx, parent, name)
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
        locked(self).rename(ctx, parent, name, new_parent, new_name, flags)
    }

    fn link(&mut self, ctx: Context, ino: u64, new_parent: u64, new_name: &CStr) -> io::Result<Entry> {
        locked(self).link(ctx, ino, new_parent, new_name)
    }

    fn open(&mut self, ctx: Context, ino: u64, flags: u32) -> io::Result<(u64, OpenFlags)> {
        locked(self).open(ctx, ino, flags)
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
        locked(self).create(ctx, parent, name, mode, flags, umask)
    }

    fn read(&mut self, ino: u64, handle: u64, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        locked(self).read(ino, handle, offset, buf)
    }

    fn write(
        &mut self,
        ctx: Context,
        ino: u64,
        handle: u64,
        offset: u64,
        data: &[u8],
        flags: u32,
    ) -> io::Result<usize> {
        locked(self).write(ctx, ino, handle, offset, data, flags)
    }

    fn flush(&mut self, ino: u64, handle: u64) -> io::Result<()> {
        locked(self).flush(ino, handle)
    }

    fn fsync(&mut self, ino: u64, handle: u64, datasync: bool) -> io::Result<()> {
        locked(self).fsync(ino, handle, datasync)
    }

    fn release(&mut self, ino: u64, handle: u64) -> io::Result<()> {
        locked(self).release(ino, handle)
    }

    fn opendir(&mut self, ctx: Context, ino: u64, flags: u32) -> io::Result<(u64, OpenFlags)> {
        locked(self).opendir(ctx, ino, flags)
    }

    fn readdir(
        &mut self,
        ctx: Context,
        ino: u64,
        handle: u64,
        offset: u64,
        add: &mut dyn FnMut(DirEntry<'_>) -> bool,
    ) -> io::Result<()> {
        locked(self).readdir(ctx, ino, handle, offset, add)
    }

    fn readdirplus(
        &mut self,
        ctx: Context,
        ino: u64,
        handle: u64,
        offset: u64,
        add: &mut dyn FnMut(DirEntry<'_>, Entry) -> bool,
    ) -> io::Result<()> {
        locked(self).readdirplus(ctx, ino, handle, offset, add)
    }

    fn releasedir(&mut self, ino: u64, handle: u64) -> io::Result<()> {
        locked(self).releasedir(ino, handle)
    }

    fn fsyncdir(&mut self, ino: u64, handle: u64, datasync: bool) -> io::Result<()> {
        locked(self).fsyncdir(ino, handle, datasync)
    }

    fn statfs(&mut self, ctx: Context, ino: u64) -> io::Result<StatFs> {
        locked(self).statfs(ctx, ino)
    }

    fn setxattr(&mut self, ctx: Context, ino: u64, name: &CStr, value: &[u8], flags: u32) -> io::Result<()> {
        locked(self).setxattr(ctx, ino, name, value, flags)
    }

    fn getxattr(&mut self, ctx: Context, ino: u64, name: &CStr) -> io::Result<Vec<u8>> {
        locked(self).getxattr(ctx, ino, name)
    }

    fn listxattr(&mut self, ctx: Context, ino: u64) -> io::Result<Vec<u8>> {
        locked(self).listxattr(ctx, ino)
    }

    fn removexattr(&mut self, ctx: Context, ino: u64, name: &CStr) -> io::Result<()> {
        locked(self).removexattr(ctx, ino, name)
    }

    fn access(&mut self, ctx: Context, ino: u64, mask: u32) -> io::Result<()> {
        locked(self).access(ctx, ino, mask)
    }

    fn fallocate(&mut self, ino: u64, handle: u64, mode: u32, offset: u64, length: u64) -> io::Result<()> {
        locked(self).fallocate(ino, handle, mode, offset, length)
    }

    fn lseek(&mut self, ino: u64, handle: u64, offset: u64, whence: u32) -> io::Result<u64> {
        locked(self).lseek(ino, handle, offset, whence)
    }

    #[allow(clippy::too_many_arguments)]
    fn copy_file_range(
        &mut self,
        ino_in: u64,
        handle_in: u64,
        offset_in: u64,
        ino_out: u64,
        handle_out: u64,
        offset_out: u64,
        len: u64,
        flags: u64,
    ) -> io::Result<usize> {
        locked(self).copy_file_range(
            ino_in, handle_in, offset_in, ino_out, handle_out, offset_out, len, flags,
        )
    }

    fn syncfs(&mut self, ino: u64) -> io::Result<()> {
        locked(self).syncfs(ino)
    }

    fn destroy(&mut self) {
        locked(self).destroy()
    }
}

/// The lock of a shared file system; a thread that panicked while holding
/// it left the state of a finished request (each call is one request).
pub fn locked<T>(fs: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    fs.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
