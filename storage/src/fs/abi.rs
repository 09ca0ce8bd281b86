//! The FUSE wire format: the structures and constants of the kernel's
//! `include/uapi/linux/fuse.h` that this server speaks (protocol 7.31 to
//! 7.36; the layouts below are the 7.36 ones, which older minors only
//! extend at the end).
//!
//! All fields are native-endian: the guest runs on the host's CPU (KVM), so
//! its native order is ours. Every struct is `#[repr(C)]` made of plain
//! integers laid out without implicit padding, so any byte pattern is a
//! valid value: that is what makes the `ByteValued` impls sound.

use vm_memory::ByteValued;

/// The protocol version this server implements.
pub const KERNEL_VERSION: u32 = 7;
/// The highest minor version this server implements.
pub const KERNEL_MINOR_VERSION: u32 = 36;
/// The lowest minor version accepted: 7.31 (Linux 5.4, the first kernel
/// with virtio-fs) has every request layout used here.
pub const MIN_KERNEL_MINOR_VERSION: u32 = 31;

/// Request opcodes (`enum fuse_opcode`).
pub mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const REMOVEXATTR: u32 = 24;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const GETLK: u32 = 31;
    pub const SETLK: u32 = 32;
    pub const SETLKW: u32 = 33;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const BMAP: u32 = 37;
    pub const DESTROY: u32 = 38;
    pub const IOCTL: u32 = 39;
    pub const POLL: u32 = 40;
    pub const NOTIFY_REPLY: u32 = 41;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
    pub const LSEEK: u32 = 46;
    pub const COPY_FILE_RANGE: u32 = 47;
    pub const SETUPMAPPING: u32 = 48;
    pub const REMOVEMAPPING: u32 = 49;
    pub const SYNCFS: u32 = 50;
    pub const TMPFILE: u32 = 51;
}

/// `fuse_init_in.flags` / `fuse_init_out.flags` (capabilities).
pub mod init_flags {
    pub const ASYNC_READ: u32 = 1 << 0;
    pub const POSIX_LOCKS: u32 = 1 << 1;
    pub const FILE_OPS: u32 = 1 << 2;
    pub const ATOMIC_O_TRUNC: u32 = 1 << 3;
    pub const EXPORT_SUPPORT: u32 = 1 << 4;
    pub const BIG_WRITES: u32 = 1 << 5;
    pub const DONT_MASK: u32 = 1 << 6;
    pub const SPLICE_WRITE: u32 = 1 << 7;
    pub const SPLICE_MOVE: u32 = 1 << 8;
    pub const SPLICE_READ: u32 = 1 << 9;
    pub const FLOCK_LOCKS: u32 = 1 << 10;
    pub const HAS_IOCTL_DIR: u32 = 1 << 11;
    pub const AUTO_INVAL_DATA: u32 = 1 << 12;
    pub const DO_READDIRPLUS: u32 = 1 << 13;
    pub const READDIRPLUS_AUTO: u32 = 1 << 14;
    pub const ASYNC_DIO: u32 = 1 << 15;
    pub const WRITEBACK_CACHE: u32 = 1 << 16;
    pub const NO_OPEN_SUPPORT: u32 = 1 << 17;
    pub const PARALLEL_DIROPS: u32 = 1 << 18;
    pub const HANDLE_KILLPRIV: u32 = 1 << 19;
    pub const POSIX_ACL: u32 = 1 << 20;
    pub const ABORT_ERROR: u32 = 1 << 21;
    pub const MAX_PAGES: u32 = 1 << 22;
    pub const CACHE_SYMLINKS: u32 = 1 << 23;
    pub const NO_OPENDIR_SUPPORT: u32 = 1 << 24;
    pub const EXPLICIT_INVAL_DATA: u32 = 1 << 25;
    pub const MAP_ALIGNMENT: u32 = 1 << 26;
    pub const SUBMOUNTS: u32 = 1 << 27;
    pub const HANDLE_KILLPRIV_V2: u32 = 1 << 28;
    pub const SETXATTR_EXT: u32 = 1 << 29;
    /// `flags2` is valid (7.36).
    pub const INIT_EXT: u32 = 1 << 30;
}

/// `fuse_setattr_in.valid`: which fields to change.
pub mod fattr {
    pub const MODE: u32 = 1 << 0;
    pub const UID: u32 = 1 << 1;
    pub const GID: u32 = 1 << 2;
    pub const SIZE: u32 = 1 << 3;
    pub const ATIME: u32 = 1 << 4;
    pub const MTIME: u32 = 1 << 5;
    pub const FH: u32 = 1 << 6;
    pub const ATIME_NOW: u32 = 1 << 7;
    pub const MTIME_NOW: u32 = 1 << 8;
    pub const LOCKOWNER: u32 = 1 << 9;
    pub const CTIME: u32 = 1 << 10;
    pub const KILL_SUIDGID: u32 = 1 << 11;
}

/// `fuse_open_out.open_flags`.
pub mod fopen {
    pub const DIRECT_IO: u32 = 1 << 0;
    pub const KEEP_CACHE: u32 = 1 << 1;
    pub const NONSEEKABLE: u32 = 1 << 2;
    pub const CACHE_DIR: u32 = 1 << 3;
    pub const STREAM: u32 = 1 << 4;
    pub const NOFLUSH: u32 = 1 << 5;
}

/// `fuse_getattr_in.getattr_flags`: `fh` is valid.
pub const GETATTR_FH: u32 = 1 << 0;
/// `fuse_fsync_in.fsync_flags`: sync data only.
pub const FSYNC_FDATASYNC: u32 = 1 << 0;
/// `fuse_release_in.release_flags`.
pub const RELEASE_FLUSH: u32 = 1 << 0;
pub const RELEASE_FLOCK_UNLOCK: u32 = 1 << 1;
/// `fuse_write_in.write_flags`.
pub const WRITE_CACHE: u32 = 1 << 0;
pub const WRITE_LOCKOWNER: u32 = 1 << 1;
pub const WRITE_KILL_SUIDGID: u32 = 1 << 2;

/// Offset of the name in a `fuse_dirent` (its fixed part).
pub const DIRENT_NAME_OFFSET: usize = std::mem::size_of::<Dirent>();

/// Round a directory record length up to the 8 bytes records are aligned to.
pub const fn dirent_align(len: usize) -> usize {
    (len + 7) & !7
}

macro_rules! byte_valued {
    ($($t:ty),* $(,)?) => {
        $(
            // SAFETY: a `#[repr(C)]` struct of plain integers without
            // implicit padding (the size tests below check the layouts):
            // every byte pattern is a valid value.
            unsafe impl ByteValued for $t {}
        )*
    };
}

/// `struct fuse_attr`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: u64,
    pub mtime: u64,
    pub ctime: u64,
    pub atimensec: u32,
    pub mtimensec: u32,
    pub ctimensec: u32,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
    /// `FUSE_ATTR_*` (7.32); 0 here.
    pub flags: u32,
}

/// `struct fuse_kstatfs`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Kstatfs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
    pub padding: u32,
    pub spare: [u32; 6],
}

/// `struct fuse_file_lock`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FileLock {
    pub start: u64,
    pub end: u64,
    pub kind: u32,
    pub pid: u32,
}

/// `struct fuse_entry_out`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EntryOut {
    pub nodeid: u64,
    pub generation: u64,
    pub entry_valid: u64,
    pub attr_valid: u64,
    pub entry_valid_nsec: u32,
    pub attr_valid_nsec: u32,
    pub attr: Attr,
}

/// `struct fuse_forget_in`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ForgetIn {
    pub nlookup: u64,
}

/// `struct fuse_forget_one`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ForgetOne {
    pub nodeid: u64,
    pub nlookup: u64,
}

/// `struct fuse_batch_forget_in`, followed by `count` [`ForgetOne`].
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchForgetIn {
    pub count: u32,
    pub dummy: u32,
}

/// `struct fuse_getattr_in`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GetattrIn {
    pub getattr_flags: u32,
    pub dummy: u32,
    pub fh: u64,
}

/// `struct fuse_attr_out`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AttrOut {
    pub attr_valid: u64,
    pub attr_valid_nsec: u32,
    pub dummy: u32,
    pub attr: Attr,
}

/// `struct fuse_mknod_in`, followed by the name.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MknodIn {
    pub mode: u32,
    pub rdev: u32,
    pub umask: u32,
    pub padding: u32,
}

/// `struct fuse_mkdir_in`, followed by the name.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MkdirIn {
    pub mode: u32,
    pub umask: u32,
}

/// `struct fuse_rename_in`, followed by the old and the new name.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RenameIn {
    pub newdir: u64,
}

/// `struct fuse_rename2_in`, followed by the old and the new name.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rename2In {
    pub newdir: u64,
    pub flags: u32,
    pub padding: u32,
}

/// `struct fuse_link_in`, followed by the new name.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LinkIn {
    pub oldnodeid: u64,
}

/// `struct fuse_setattr_in`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SetattrIn {
    pub valid: u32,
    pub padding: u32,
    pub fh: u64,
    pub size: u64,
    pub lock_owner: u64,
    pub atime: u64,
    pub mtime: u64,
    pub ctime: u64,
    pub atimensec: u32,
    pub mtimensec: u32,
    pub ctimensec: u32,
    pub mode: u32,
    pub unused4: u32,
    pub uid: u32,
    pub gid: u32,
    pub unused5: u32,
}

/// `struct fuse_open_in` (also OPENDIR).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OpenIn {
    pub flags: u32,
    /// `FUSE_OPEN_KILL_SUIDGID` (7.33); only with HANDLE_KILLPRIV_V2.
    pub open_flags: u32,
}

/// `struct fuse_create_in`, followed by the name.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CreateIn {
    pub flags: u32,
    pub mode: u32,
    pub umask: u32,
    pub open_flags: u32,
}

/// `struct fuse_open_out`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OpenOut {
    pub fh: u64,
    pub open_flags: u32,
    pub padding: u32,
}

/// `struct fuse_release_in` (also RELEASEDIR).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReleaseIn {
    pub fh: u64,
    pub flags: u32,
    pub release_flags: u32,
    pub lock_owner: u64,
}

/// `struct fuse_flush_in`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FlushIn {
    pub fh: u64,
    pub unused: u32,
    pub padding: u32,
    pub lock_owner: u64,
}

/// `struct fuse_read_in` (also READDIR, READDIRPLUS).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReadIn {
    pub fh: u64,
    pub offset: u64,
    pub size: u32,
    pub read_flags: u32,
    pub lock_owner: u64,
    pub flags: u32,
    pub padding: u32,
}

/// `struct fuse_write_in`, followed by `size` bytes of data.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriteIn {
    pub fh: u64,
    pub offset: u64,
    pub size: u32,
    pub write_flags: u32,
    pub lock_owner: u64,
    pub flags: u32,
    pub padding: u32,
}

/// `struct fuse_write_out` (also COPY_FILE_RANGE).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriteOut {
    pub size: u32,
    pub padding: u32,
}

/// `struct fuse_statfs_out`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StatfsOut {
    pub st: Kstatfs,
}

/// `struct fuse_fsync_in` (also FSYNCDIR).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FsyncIn {
    pub fh: u64,
    pub fsync_flags: u32,
    pub padding: u32,
}

/// `struct fuse_setxattr_in` without SETXATTR_EXT (which this server does
/// not offer), followed by the name and `size` bytes of value.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SetxattrIn {
    pub size: u32,
    pub flags: u32,
}

/// `struct fuse_getxattr_in` (also LISTXATTR); GETXATTR adds the name.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GetxattrIn {
    pub size: u32,
    pub padding: u32,
}

/// `struct fuse_getxattr_out`: the answer to a size query (`size == 0`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GetxattrOut {
    pub size: u32,
    pub padding: u32,
}

/// `struct fuse_lk_in` (GETLK, SETLK, SETLKW).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LkIn {
    pub fh: u64,
    pub owner: u64,
    pub lk: FileLock,
    pub lk_flags: u32,
    pub padding: u32,
}

/// `struct fuse_access_in`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AccessIn {
    pub mask: u32,
    pub padding: u32,
}

/// `struct fuse_init_in` as of 7.36. Kernels before 7.36 send only the
/// first four fields (16 bytes).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InitIn {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u32,
    pub flags2: u32,
    pub unused: [u32; 11],
}

/// The part of [`InitIn`] every kernel sends.
pub const INIT_IN_COMPAT_SIZE: usize = 16;

/// `struct fuse_init_out` as of 7.36 (64 bytes; the full size is right for
/// every minor from 7.23 on).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InitOut {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u32,
    pub max_background: u16,
    pub congestion_threshold: u16,
    pub max_write: u32,
    pub time_gran: u32,
    pub max_pages: u16,
    pub map_alignment: u16,
    pub flags2: u32,
    pub unused: [u32; 7],
}

/// `struct fuse_interrupt_in`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InterruptIn {
    pub unique: u64,
}

/// `struct fuse_fallocate_in`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FallocateIn {
    pub fh: u64,
    pub offset: u64,
    pub length: u64,
    pub mode: u32,
    pub padding: u32,
}

/// `struct fuse_in_header`: starts every request; `len` counts the whole
/// request including this header.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    /// `total_extlen` and padding in newer headers; no extensions are
    /// negotiated here, so always 0 from a conforming kernel.
    pub padding: u32,
}

/// `struct fuse_out_header`: starts every reply; `error` is 0 or a
/// negative errno, `len` counts the whole reply.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OutHeader {
    pub len: u32,
    pub error: i32,
    pub unique: u64,
}

/// `struct fuse_dirent` without its name: the fixed part of a READDIR
/// record. The name follows, and the record is padded to 8 bytes.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dirent {
    pub ino: u64,
    pub off: u64,
    pub namelen: u32,
    pub kind: u32,
}

/// `struct fuse_direntplus` without its name: a READDIRPLUS record.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DirentPlus {
    pub entry_out: EntryOut,
    pub dirent: Dirent,
}

/// `struct fuse_lseek_in`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LseekIn {
    pub fh: u64,
    pub offset: u64,
    pub whence: u32,
    pub padding: u32,
}

/// `struct fuse_lseek_out`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LseekOut {
    pub offset: u64,
}

/// `struct fuse_copy_file_range_in`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CopyFileRangeIn {
    pub fh_in: u64,
    pub off_in: u64,
    pub nodeid_out: u64,
    pub fh_out: u64,
    pub off_out: u64,
    pub len: u64,
    pub flags: u64,
}

/// `struct fuse_syncfs_in`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncfsIn {
    pub padding: u64,
}

byte_valued!(
    Attr,
    Kstatfs,
    FileLock,
    EntryOut,
    ForgetIn,
    ForgetOne,
    BatchForgetIn,
    GetattrIn,
    AttrOut,
    MknodIn,
    MkdirIn,
    RenameIn,
    Rename2In,
    LinkIn,
    SetattrIn,
    OpenIn,
    CreateIn,
    OpenOut,
    ReleaseIn,
    FlushIn,
    ReadIn,
    WriteIn,
    WriteOut,
    StatfsOut,
    FsyncIn,
    SetxattrIn,
    GetxattrIn,
    GetxattrOut,
    LkIn,
    AccessIn,
    InitIn,
    InitOut,
    InterruptIn,
    FallocateIn,
    InHeader,
    OutHeader,
    Dirent,
    DirentPlus,
    LseekIn,
    LseekOut,
    CopyFileRangeIn,
    SyncfsIn,
);

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{align_of, size_of};

    #[test]
    fn sizes_match_the_kernel() {
        // Sizes from include/uapi/linux/fuse.h (7.36 layouts).
        let sizes = [
            ("fuse_attr", size_of::<Attr>(), 88),
            ("fuse_kstatfs", size_of::<Kstatfs>(), 80),
            ("fuse_file_lock", size_of::<FileLock>(), 24),
            ("fuse_entry_out", size_of::<EntryOut>(), 128),
            ("fuse_forget_in", size_of::<ForgetIn>(), 8),
            ("fuse_forget_one", size_of::<ForgetOne>(), 16),
            ("fuse_batch_forget_in", size_of::<BatchForgetIn>(), 8),
            ("fuse_getattr_in", size_of::<GetattrIn>(), 16),
            ("fuse_attr_out", size_of::<AttrOut>(), 104),
            ("fuse_mknod_in", size_of::<MknodIn>(), 16),
            ("fuse_mkdir_in", size_of::<MkdirIn>(), 8),
            ("fuse_rename_in", size_of::<RenameIn>(), 8),
            ("fuse_rename2_in", size_of::<Rename2In>(), 16),
            ("fuse_link_in", size_of::<LinkIn>(), 8),
            ("fuse_setattr_in", size_of::<SetattrIn>(), 88),
            ("fuse_open_in", size_of::<OpenIn>(), 8),
            ("fuse_create_in", size_of::<CreateIn>(), 16),
            ("fuse_open_out", size_of::<OpenOut>(), 16),
            ("fuse_release_in", size_of::<ReleaseIn>(), 24),
            ("fuse_flush_in", size_of::<FlushIn>(), 24),
            ("fuse_read_in", size_of::<ReadIn>(), 40),
            ("fuse_write_in", size_of::<WriteIn>(), 40),
            ("fuse_write_out", size_of::<WriteOut>(), 8),
            ("fuse_statfs_out", size_of::<StatfsOut>(), 80),
            ("fuse_fsync_in", size_of::<FsyncIn>(), 16),
            ("fuse_setxattr_in", size_of::<SetxattrIn>(), 8),
            ("fuse_getxattr_in", size_of::<GetxattrIn>(), 8),
            ("fuse_getxattr_out", size_of::<GetxattrOut>(), 8),
            ("fuse_lk_in", size_of::<LkIn>(), 48),
            ("fuse_access_in", size_of::<AccessIn>(), 8),
            ("fuse_init_in", size_of::<InitIn>(), 64),
            ("fuse_init_out", size_of::<InitOut>(), 64),
            ("fuse_interrupt_in", size_of::<InterruptIn>(), 8),
            ("fuse_fallocate_in", size_of::<FallocateIn>(), 32),
            ("fuse_in_header", size_of::<InHeader>(), 40),
            ("fuse_out_header", size_of::<OutHeader>(), 16),
            ("fuse_dirent", size_of::<Dirent>(), 24),
            ("fuse_direntplus", size_of::<DirentPlus>(), 152),
            ("fuse_lseek_in", size_of::<LseekIn>(), 24),
            ("fuse_lseek_out", size_of::<LseekOut>(), 8),
            ("fuse_copy_file_range_in", size_of::<CopyFileRangeIn>(), 56),
            ("fuse_syncfs_in", size_of::<SyncfsIn>(), 8),
        ];
        for (name, got, want) in sizes {
            assert_eq!(got, want, "{name}");
        }
        assert_eq!(DIRENT_NAME_OFFSET, 24);
    }

    #[test]
    fn records_keep_their_alignment() {
        // Records are packed back to back at 8-byte boundaries, so the
        // fixed parts must not need more than that.
        assert_eq!(align_of::<Dirent>(), 8);
        assert_eq!(align_of::<DirentPlus>(), 8);
        assert_eq!(dirent_align(24 + 1), 32);
        assert_eq!(dirent_align(24 + 8), 32);
        assert_eq!(dirent_align(152 + 3), 160);
        assert_eq!(dirent_align(0), 0);
    }

    #[test]
    fn field_offsets_match_the_kernel() {
        // A few fields whose place is easy to get wrong.
        let h = InHeader {
            nodeid: 0x0102_0304_0506_0708,
            pid: 0xaabb_ccdd,
            ..Default::default()
        };
        let b = h.as_slice();
        assert_eq!(&b[16..24], &0x0102_0304_0506_0708u64.to_ne_bytes());
        assert_eq!(&b[32..36], &0xaabb_ccddu32.to_ne_bytes());
        let o = InitOut {
            max_pages: 0x1234,
            flags2: 0x5566_7788,
            ..Default::default()
        };
        let b = o.as_slice();
        assert_eq!(&b[28..30], &0x1234u16.to_ne_bytes());
        assert_eq!(&b[32..36], &0x5566_7788u32.to_ne_bytes());
        let s = SetattrIn {
            mode: 0o755,
            gid: 7,
            ..Default::default()
        };
        let b = s.as_slice();
        assert_eq!(&b[68..72], &0o755u32.to_ne_bytes());
        assert_eq!(&b[80..84], &7u32.to_ne_bytes());
    }
}
