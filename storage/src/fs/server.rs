//! The FUSE server: one request in, one reply out.
//!
//! [`Server::handle`] takes the bytes the guest made readable (header,
//! arguments, write payload) and fills a reply (header and body) that never
//! exceeds the space the guest made writable. Every length, name and number
//! is checked before the [`FileSystem`] sees it: a malformed request gets an
//! error reply (`EINVAL` mostly), a request the server does not implement
//! `ENOSYS`; only input that leaves no way to reply (a header cut short, no
//! room for the reply header) is a [`RequestError`], which the device turns
//! into a failed device.
//!
//! Replies are built in a caller-owned `Vec` that keeps its capacity across
//! requests, so the steady state allocates nothing here; the device copies
//! the reply into guest memory once (the price of keeping the server free of
//! guest-memory types, which also lets the fuzzer drive it directly).

use std::ffi::CStr;
use std::io;
use std::mem::size_of;
use std::time::Duration;

use vm_memory::ByteValued;

use super::abi::{self, fattr, init_flags, opcode};
use super::{Context, DirEntry, Entry, FileSystem, SetAttr, SetTime};

/// Largest write payload, and largest read, the guest is told about
/// (`max_write`, and `max_pages` × 4 KiB).
pub const MAX_WRITE: usize = 1 << 20;
/// Largest read or directory listing served in one reply.
pub const MAX_READ: usize = MAX_WRITE;
/// `max_pages` offered: 256 pages of 4 KiB, i.e. [`MAX_WRITE`].
pub const MAX_PAGES: u16 = 256;
/// Longest request the device accepts: a full write plus room for the
/// header and arguments (the longest are SYMLINK's two paths and SETXATTR's
/// name and 64 KiB value, both below this).
pub const MAX_REQUEST: usize = MAX_WRITE + 4096;
pub const IN_HEADER_SIZE: usize = size_of::<abi::InHeader>();
pub const OUT_HEADER_SIZE: usize = size_of::<abi::OutHeader>();

const NAME_MAX: usize = 255;
const PATH_MAX: usize = 4096;
const XATTR_NAME_MAX: usize = 255;
const XATTR_SIZE_MAX: usize = 64 * 1024;
const RENAME_NOREPLACE: u32 = 1;
const RENAME_EXCHANGE: u32 = 2;

/// Capabilities offered at INIT (the guest keeps those it also has).
///
/// Not offered, on purpose:
/// - `POSIX_LOCKS`, `FLOCK_LOCKS`: the guest kernel then implements
///   `fcntl`/`flock` locks itself, which is exact here because the writable
///   layer belongs to this one VM and no other process shares its files.
///   GETLK/SETLK/SETLKW still get a well-formed `ENOSYS` reply.
/// - `WRITEBACK_CACHE`: writes must reach the file system as the guest
///   issues them, and the kernel would also send reads on write-only handles.
/// - `SETXATTR_EXT`, `DONT_MASK`, `HANDLE_KILLPRIV(_V2)`: they change the
///   request layouts or semantics; the classic ones are decoded here.
/// - `EXPORT_SUPPORT`: it makes the guest look up `.` and `..`, which the
///   server refuses as names.
const OFFERED_FLAGS: u32 = init_flags::ASYNC_READ
    | init_flags::ATOMIC_O_TRUNC
    | init_flags::BIG_WRITES
    | init_flags::DO_READDIRPLUS
    | init_flags::READDIRPLUS_AUTO
    | init_flags::PARALLEL_DIROPS
    | init_flags::MAX_PAGES
    | init_flags::CACHE_SYMLINKS;
/// Background requests (readahead, async reads) the guest keeps in flight.
const MAX_BACKGROUND: u16 = 16;
const CONGESTION_THRESHOLD: u16 = 12;

/// A request that cannot be answered at all: the device must fail.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("FUSE request of {len} bytes is shorter than its {IN_HEADER_SIZE}-byte header")]
    ShortHeader { len: usize },
    #[error(
        "FUSE request (opcode {opcode}) needs a reply, but the guest left {available} writable bytes, \
         fewer than the {OUT_HEADER_SIZE}-byte reply header"
    )]
    NoReplySpace { opcode: u32, available: usize },
}

/// A positive errno for the reply header.
type Errno = i32;

/// The FUSE protocol on top of a [`FileSystem`].
pub struct Server<F: FileSystem + ?Sized> {
    /// The negotiated minor version once INIT succeeded.
    minor: Option<u32>,
    fs: Box<F>,
}

impl<F: FileSystem> Server<F> {
    pub fn new(fs: F) -> Self {
        Self::from_box(Box::new(fs))
    }
}

impl<F: FileSystem + ?Sized> Server<F> {
    /// A server over an already boxed (possibly `dyn`) file system.
    pub fn from_box(fs: Box<F>) -> Self {
        Server { minor: None, fs }
    }

    pub fn fs(&self) -> &F {
        &self.fs
    }

    pub fn fs_mut(&mut self) -> &mut F {
        &mut self.fs
    }

    /// The minor protocol version negotiated by INIT, if the guest mounted.
    pub fn minor(&self) -> Option<u32> {
        self.minor
    }

    /// Forget the session (device reset or VM stop): the file system drops
    /// every node and handle, and the next request must be INIT.
    pub fn reset(&mut self) {
        self.minor = None;
        self.fs.destroy();
    }

    /// Handle one request. `request` is the device-readable bytes (header,
    /// arguments, write payload); `reply` is cleared and receives the reply
    /// (out header and body), at most `max_reply` bytes (the guest's
    /// writable space). Returns `Ok(None)` for requests that get no reply
    /// (FORGET, BATCH_FORGET, INTERRUPT), else `Ok(Some(reply.len()))`.
    ///
    /// The header's `len` must not exceed `request.len()` (else `EINVAL`);
    /// bytes past `len` are ignored.
    pub fn handle(
        &mut self,
        request: &[u8],
        max_reply: usize,
        reply: &mut Vec<u8>,
    ) -> Result<Option<usize>, RequestError> {
        reply.clear();
        let header: abi::InHeader = read_struct(request).ok_or(RequestError::ShortHeader { len: request.len() })?;
        let args = usize::try_from(header.len)
            .ok()
            .filter(|len| *len >= IN_HEADER_SIZE)
            .and_then(|len| request.get(IN_HEADER_SIZE..len));
        if matches!(header.opcode, opcode::FORGET | opcode::BATCH_FORGET | opcode::INTERRUPT) {
            match args {
                Some(args) if self.minor.is_some() => self.no_reply(&header, args),
                _ => log::debug!(
                    "virtio-fs: dropped {} request before INIT or with a bad length",
                    header.opcode
                ),
            }
            return Ok(None);
        }
        if max_reply < OUT_HEADER_SIZE {
            return Err(RequestError::NoReplySpace {
                opcode: header.opcode,
                available: max_reply,
            });
        }
        reply.extend_from_slice(abi::OutHeader::default().as_slice());
        // Bounded by MAX_READ so the length always fits the header's u32.
        let limit = OUT_HEADER_SIZE + (max_reply - OUT_HEADER_SIZE).min(MAX_READ);
        let mut body = Body { buf: reply, limit };
        let result = match args {
            Some(args) => self.dispatch(&header, Args { rest: args }, &mut body),
            None => Err(libc::EINVAL),
        };
        let error = match result {
            Ok(()) => 0,
            Err(errno) => {
                reply.truncate(OUT_HEADER_SIZE);
                -errno
            }
        };
        if error != 0 && error != -libc::ENOSYS {
            log::trace!("virtio-fs: opcode {} -> errno {}", header.opcode, -error);
        }
        let len = reply.len();
        let out = abi::OutHeader {
            len: u32::try_from(len).unwrap_or(u32::MAX),
            error,
            unique: header.unique,
        };
        if let Some(head) = reply.get_mut(..OUT_HEADER_SIZE) {
            head.copy_from_slice(out.as_slice());
        }
        Ok(Some(len))
    }

    /// FORGET, BATCH_FORGET, INTERRUPT: acted on if well formed, never answered.
    fn no_reply(&mut self, header: &abi::InHeader, args: &[u8]) {
        let mut args = Args { rest: args };
        match header.opcode {
            opcode::FORGET => {
                if let Ok(inp) = args.take::<abi::ForgetIn>() {
                    self.fs.forget(header.nodeid, inp.nlookup);
                }
            }
            opcode::BATCH_FORGET => {
                let Ok(inp) = args.take::<abi::BatchForgetIn>() else {
                    return;
                };
                let one = size_of::<abi::ForgetOne>();
                let fits = (inp.count as usize)
                    .checked_mul(one)
                    .is_some_and(|need| need <= args.rest.len());
                if !fits {
                    log::debug!("virtio-fs: BATCH_FORGET count {} exceeds its payload", inp.count);
                    return;
                }
                for chunk in args.rest.chunks_exact(one).take(inp.count as usize) {
                    if let Some(f) = read_struct::<abi::ForgetOne>(chunk) {
                        self.fs.forget(f.nodeid, f.nlookup);
                    }
                }
            }
            // INTERRUPT: every request completes before the next is read,
            // so there is never anything to interrupt.
            _ => {}
        }
    }

    fn dispatch(&mut self, h: &abi::InHeader, mut args: Args<'_>, body: &mut Body<'_>) -> Result<(), Errno> {
        if h.opcode == opcode::INIT {
            return self.init(args, body);
        }
        if self.minor.is_none() {
            return Err(libc::EIO);
        }
        // Replies of fixed size are checked before the file system acts, so
        // that a created node or opened handle is never lost to a reply that
        // does not fit.
        if fixed_reply_size(h.opcode) > body.room() {
            return Err(libc::EINVAL);
        }
        let ctx = Context {
            uid: h.uid,
            gid: h.gid,
            pid: h.pid,
        };
        let ino = h.nodeid;
        let fs = &mut *self.fs;
        match h.opcode {
            opcode::DESTROY => {
                self.minor = None;
                fs.destroy();
                Ok(())
            }
            opcode::LOOKUP => {
                let name = args.name()?;
                body.entry(&fs.lookup(ctx, ino, name).map_err(errno)?)
            }
            opcode::GETATTR => {
                let inp: abi::GetattrIn = args.take()?;
                let handle = (inp.getattr_flags & abi::GETATTR_FH != 0).then_some(inp.fh);
                let (attr, valid) = fs.getattr(ctx, ino, handle).map_err(errno)?;
                body.attr(&attr, valid)
            }
            opcode::SETATTR => {
                let inp: abi::SetattrIn = args.take()?;
                let set = set_attr(&inp)?;
                let (attr, valid) = fs.setattr(ctx, ino, set).map_err(errno)?;
                body.attr(&attr, valid)
            }
            opcode::READLINK => {
                let target = fs.readlink(ctx, ino).map_err(errno)?;
                if target.len() > body.room() {
                    return Err(libc::ENAMETOOLONG);
                }
                body.push(&target)
            }
            opcode::SYMLINK => {
                let name = args.name()?;
                let target = args.cstr()?;
                if target.is_empty() {
                    return Err(libc::ENOENT);
                }
                if target.count_bytes() >= PATH_MAX {
                    return Err(libc::ENAMETOOLONG);
                }
                body.entry(&fs.symlink(ctx, ino, name, target).map_err(errno)?)
            }
            opcode::MKNOD => {
                let inp: abi::MknodIn = args.take()?;
                let name = args.name()?;
                body.entry(&fs.mknod(ctx, ino, name, inp.mode, inp.rdev, inp.umask).map_err(errno)?)
            }
            opcode::MKDIR => {
                let inp: abi::MkdirIn = args.take()?;
                let name = args.name()?;
                body.entry(&fs.mkdir(ctx, ino, name, inp.mode, inp.umask).map_err(errno)?)
            }
            opcode::UNLINK => fs.unlink(ctx, ino, args.name()?).map_err(errno),
            opcode::RMDIR => fs.rmdir(ctx, ino, args.name()?).map_err(errno),
            opcode::RENAME | opcode::RENAME2 => {
                let (new_parent, flags) = if h.opcode == opcode::RENAME {
                    (args.take::<abi::RenameIn>()?.newdir, 0)
                } else {
                    let inp: abi::Rename2In = args.take()?;
                    (inp.newdir, inp.flags)
                };
                // RENAME_WHITEOUT is the overlay's business, never the guest's.
                if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0 || flags == RENAME_NOREPLACE | RENAME_EXCHANGE {
                    return Err(libc::EINVAL);
                }
                let name = args.name()?;
                let new_name = args.name()?;
                fs.rename(ctx, ino, name, new_parent, new_name, flags).map_err(errno)
            }
            opcode::LINK => {
                let inp: abi::LinkIn = args.take()?;
                let new_name = args.name()?;
                body.entry(&fs.link(ctx, inp.oldnodeid, ino, new_name).map_err(errno)?)
            }
            opcode::OPEN | opcode::OPENDIR => {
                let inp: abi::OpenIn = args.take()?;
                let (fh, open_flags) = if h.opcode == opcode::OPEN {
                    fs.open(ctx, ino, inp.flags)
                } else {
                    fs.opendir(ctx, ino, inp.flags)
                }
                .map_err(errno)?;
                body.put(&open_out(fh, open_flags))
            }
            opcode::CREATE => {
                let inp: abi::CreateIn = args.take()?;
                let name = args.name()?;
                let (entry, fh, open_flags) = fs
                    .create(ctx, ino, name, inp.mode, inp.flags, inp.umask)
                    .map_err(errno)?;
                body.entry(&entry)?;
                body.put(&open_out(fh, open_flags))
            }
            opcode::READ => {
                let inp: abi::ReadIn = args.take()?;
                check_offset(inp.offset)?;
                let size = (inp.size as usize).min(MAX_READ).min(body.room());
                let start = body.buf.len();
                body.buf.resize(start + size, 0);
                let data = body.buf.get_mut(start..).ok_or(libc::EIO)?;
                match fs.read(ino, inp.fh, inp.offset, data) {
                    Ok(n) => {
                        body.buf.truncate(start + n.min(size));
                        Ok(())
                    }
                    Err(e) => Err(errno(e)),
                }
            }
            opcode::WRITE => {
                let inp: abi::WriteIn = args.take()?;
                let data = args.rest;
                if data.len() != inp.size as usize || data.len() > MAX_WRITE {
                    return Err(libc::EINVAL);
                }
                check_offset(inp.offset)?;
                let n = fs.write(ctx, ino, inp.fh, inp.offset, data, inp.flags).map_err(errno)?;
                body.put(&abi::WriteOut {
                    size: n.min(data.len()) as u32,
                    padding: 0,
                })
            }
            opcode::STATFS => {
                let s = fs.statfs(ctx, ino).map_err(errno)?;
                body.put(&abi::StatfsOut {
                    st: abi::Kstatfs {
                        blocks: s.blocks,
                        bfree: s.bfree,
                        bavail: s.bavail,
                        files: s.files,
                        ffree: s.ffree,
                        bsize: s.bsize,
                        namelen: s.namelen,
                        frsize: s.frsize,
                        ..Default::default()
                    },
                })
            }
            opcode::FLUSH => {
                let inp: abi::FlushIn = args.take()?;
                fs.flush(ino, inp.fh).map_err(errno)
            }
            opcode::RELEASE | opcode::RELEASEDIR => {
                let inp: abi::ReleaseIn = args.take()?;
                if h.opcode == opcode::RELEASE {
                    fs.release(ino, inp.fh)
                } else {
                    fs.releasedir(ino, inp.fh)
                }
                .map_err(errno)
            }
            opcode::FSYNC | opcode::FSYNCDIR => {
                let inp: abi::FsyncIn = args.take()?;
                let datasync = inp.fsync_flags & abi::FSYNC_FDATASYNC != 0;
                if h.opcode == opcode::FSYNC {
                    fs.fsync(ino, inp.fh, datasync)
                } else {
                    fs.fsyncdir(ino, inp.fh, datasync)
                }
                .map_err(errno)
            }
            opcode::READDIR => {
                let inp: abi::ReadIn = args.take()?;
                readdir(fs, ctx, ino, &inp, body)
            }
            opcode::READDIRPLUS => {
                let inp: abi::ReadIn = args.take()?;
                readdirplus(fs, ctx, ino, &inp, body)
            }
            opcode::SETXATTR => {
                let inp: abi::SetxattrIn = args.take()?;
                let name = args.xattr_name()?;
                let value = args.rest;
                if value.len() != inp.size as usize {
                    return Err(libc::EINVAL);
                }
                if value.len() > XATTR_SIZE_MAX {
                    return Err(libc::E2BIG);
                }
                fs.setxattr(ctx, ino, name, value, inp.flags).map_err(errno)
            }
            opcode::GETXATTR => {
                let inp: abi::GetxattrIn = args.take()?;
                let name = args.xattr_name()?;
                let value = fs.getxattr(ctx, ino, name).map_err(errno)?;
                body.xattr(inp.size, &value)
            }
            opcode::LISTXATTR => {
                let inp: abi::GetxattrIn = args.take()?;
                let names = fs.listxattr(ctx, ino).map_err(errno)?;
                body.xattr(inp.size, &names)
            }
            opcode::REMOVEXATTR => {
                let name = args.xattr_name()?;
                fs.removexattr(ctx, ino, name).map_err(errno)
            }
            opcode::ACCESS => {
                let inp: abi::AccessIn = args.take()?;
                if inp.mask & !(libc::R_OK | libc::W_OK | libc::X_OK) as u32 != 0 {
                    return Err(libc::EINVAL);
                }
                fs.access(ctx, ino, inp.mask).map_err(errno)
            }
            opcode::FALLOCATE => {
                let inp: abi::FallocateIn = args.take()?;
                check_offset(inp.offset)?;
                let end = inp.offset.checked_add(inp.length).ok_or(libc::EFBIG)?;
                if end > i64::MAX as u64 {
                    return Err(libc::EFBIG);
                }
                fs.fallocate(ino, inp.fh, inp.mode, inp.offset, inp.length)
                    .map_err(errno)
            }
            opcode::LSEEK => {
                let inp: abi::LseekIn = args.take()?;
                if inp.whence > libc::SEEK_HOLE as u32 {
                    return Err(libc::EINVAL);
                }
                let offset = fs.lseek(ino, inp.fh, inp.offset, inp.whence).map_err(errno)?;
                body.put(&abi::LseekOut { offset })
            }
            opcode::COPY_FILE_RANGE => {
                let inp: abi::CopyFileRangeIn = args.take()?;
                check_offset(inp.off_in)?;
                check_offset(inp.off_out)?;
                // The reply counts in a u32.
                let len = inp.len.min(u64::from(u32::MAX));
                let n = fs
                    .copy_file_range(
                        ino,
                        inp.fh_in,
                        inp.off_in,
                        inp.nodeid_out,
                        inp.fh_out,
                        inp.off_out,
                        len,
                        inp.flags,
                    )
                    .map_err(errno)?;
                body.put(&abi::WriteOut {
                    size: u32::try_from(n as u64).unwrap_or(u32::MAX).min(len as u32),
                    padding: 0,
                })
            }
            opcode::SYNCFS => {
                args.take::<abi::SyncfsIn>()?;
                fs.syncfs(ino).map_err(errno)
            }
            // Locking stays in the guest kernel (see OFFERED_FLAGS); the
            // rest is not implemented. The guest remembers ENOSYS per opcode.
            _ => Err(libc::ENOSYS),
        }
    }

    fn init(&mut self, mut args: Args<'_>, body: &mut Body<'_>) -> Result<(), Errno> {
        // Kernels before 7.36 send only the first 16 bytes.
        let mut inp = abi::InitIn::default();
        let given = args.rest.len().min(size_of::<abi::InitIn>());
        if given < abi::INIT_IN_COMPAT_SIZE {
            return Err(libc::EINVAL);
        }
        let src = args.bytes(given)?;
        inp.as_mut_slice()
            .get_mut(..given)
            .ok_or(libc::EINVAL)?
            .copy_from_slice(src);
        if inp.major < abi::KERNEL_VERSION {
            log::debug!(
                "virtio-fs: guest speaks FUSE {}.{}, 7.{} or later is needed",
                inp.major,
                inp.minor,
                abi::MIN_KERNEL_MINOR_VERSION
            );
            return Err(libc::EPROTO);
        }
        if inp.major > abi::KERNEL_VERSION {
            // Answer with our version only: the kernel retries INIT with it.
            return body.put(&abi::InitOut {
                major: abi::KERNEL_VERSION,
                minor: abi::KERNEL_MINOR_VERSION,
                ..Default::default()
            });
        }
        if inp.minor < abi::MIN_KERNEL_MINOR_VERSION {
            log::debug!(
                "virtio-fs: guest speaks FUSE 7.{}, 7.{} or later is needed",
                inp.minor,
                abi::MIN_KERNEL_MINOR_VERSION
            );
            return Err(libc::EPROTO);
        }
        if self.minor.is_some() {
            // One mount per session; a new one comes after DESTROY or a reset.
            return Err(libc::EIO);
        }
        if size_of::<abi::InitOut>() > body.room() {
            return Err(libc::EINVAL);
        }
        let minor = inp.minor.min(abi::KERNEL_MINOR_VERSION);
        let flags = inp.flags & OFFERED_FLAGS;
        let max_pages = if flags & init_flags::MAX_PAGES != 0 {
            MAX_PAGES
        } else {
            0
        };
        body.put(&abi::InitOut {
            major: abi::KERNEL_VERSION,
            minor,
            max_readahead: inp.max_readahead,
            flags,
            max_background: MAX_BACKGROUND,
            congestion_threshold: CONGESTION_THRESHOLD,
            max_write: MAX_WRITE as u32,
            time_gran: 1,
            max_pages,
            ..Default::default()
        })?;
        log::debug!("virtio-fs: guest mounted with FUSE 7.{minor}, flags {flags:#x}");
        self.minor = Some(minor);
        Ok(())
    }
}

/// Body size of the replies whose size does not depend on the file system.
fn fixed_reply_size(op: u32) -> usize {
    match op {
        opcode::LOOKUP | opcode::SYMLINK | opcode::MKNOD | opcode::MKDIR | opcode::LINK => size_of::<abi::EntryOut>(),
        opcode::CREATE => size_of::<abi::EntryOut>() + size_of::<abi::OpenOut>(),
        opcode::GETATTR | opcode::SETATTR => size_of::<abi::AttrOut>(),
        opcode::OPEN | opcode::OPENDIR => size_of::<abi::OpenOut>(),
        opcode::WRITE | opcode::COPY_FILE_RANGE => size_of::<abi::WriteOut>(),
        opcode::STATFS => size_of::<abi::StatfsOut>(),
        opcode::LSEEK => size_of::<abi::LseekOut>(),
        _ => 0,
    }
}

fn readdir<F: FileSystem + ?Sized>(
    fs: &mut F,
    ctx: Context,
    ino: u64,
    inp: &abi::ReadIn,
    body: &mut Body<'_>,
) -> Result<(), Errno> {
    let start = body.buf.len();
    let end = start + (inp.size as usize).min(MAX_READ).min(body.room());
    let buf = &mut *body.buf;
    let result = fs.readdir(ctx, ino, inp.fh, inp.offset, &mut |d: DirEntry<'_>| {
        if !valid_dirent_name(d.name) {
            return true;
        }
        let dirent = dirent(&d);
        let len = abi::dirent_align(abi::DIRENT_NAME_OFFSET + d.name.len());
        if buf.len() + len > end {
            return false;
        }
        push_record(buf, dirent.as_slice(), d.name, len);
        true
    });
    listing_result(result, buf.len() > start)
}

fn readdirplus<F: FileSystem + ?Sized>(
    fs: &mut F,
    ctx: Context,
    ino: u64,
    inp: &abi::ReadIn,
    body: &mut Body<'_>,
) -> Result<(), Errno> {
    let start = body.buf.len();
    let end = start + (inp.size as usize).min(MAX_READ).min(body.room());
    let buf = &mut *body.buf;
    let result = fs.readdirplus(ctx, ino, inp.fh, inp.offset, &mut |d: DirEntry<'_>, e: Entry| {
        if !valid_dirent_name(d.name) {
            return false;
        }
        let record = abi::DirentPlus {
            entry_out: entry_out(&e),
            dirent: dirent(&d),
        };
        let len = abi::dirent_align(size_of::<abi::DirentPlus>() + d.name.len());
        if buf.len() + len > end {
            return false;
        }
        push_record(buf, record.as_slice(), d.name, len);
        true
    });
    listing_result(result, buf.len() > start)
}

/// A name the guest kernel accepts in a directory record. The file system
/// should never produce another; one that it does is left out (readdir) or
/// ends the listing (readdirplus, where taking it would count a lookup the
/// guest never sees).
fn valid_dirent_name(name: &[u8]) -> bool {
    let ok = !name.is_empty() && name.len() <= NAME_MAX && !name.contains(&b'/') && !name.contains(&0);
    if !ok {
        log::warn!(
            "virtio-fs: file system listed an invalid name {:?}",
            String::from_utf8_lossy(name)
        );
    }
    ok
}

/// An error after some records were taken still returns those records:
/// for READDIRPLUS they already count as lookups the guest must learn of.
fn listing_result(result: io::Result<()>, any: bool) -> Result<(), Errno> {
    match result {
        Ok(()) => Ok(()),
        Err(_) if any => Ok(()),
        Err(e) => Err(errno(e)),
    }
}

fn push_record(buf: &mut Vec<u8>, fixed: &[u8], name: &[u8], len: usize) {
    let start = buf.len();
    buf.extend_from_slice(fixed);
    buf.extend_from_slice(name);
    buf.resize(start + len, 0);
}

fn dirent(d: &DirEntry<'_>) -> abi::Dirent {
    abi::Dirent {
        ino: d.ino,
        off: d.next_offset,
        namelen: d.name.len() as u32,
        kind: d.kind,
    }
}

/// The reply body under construction: never grows past `limit` (the
/// guest's writable space), which is what lets the device copy any reply
/// without a second check.
struct Body<'a> {
    buf: &'a mut Vec<u8>,
    limit: usize,
}

impl Body<'_> {
    fn room(&self) -> usize {
        self.limit.saturating_sub(self.buf.len())
    }

    fn push(&mut self, bytes: &[u8]) -> Result<(), Errno> {
        if bytes.len() > self.room() {
            return Err(libc::ERANGE);
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    fn put<T: ByteValued>(&mut self, value: &T) -> Result<(), Errno> {
        self.push(value.as_slice())
    }

    fn entry(&mut self, entry: &Entry) -> Result<(), Errno> {
        self.put(&entry_out(entry))
    }

    fn attr(&mut self, attr: &super::Attr, valid: Duration) -> Result<(), Errno> {
        self.put(&abi::AttrOut {
            attr_valid: valid.as_secs(),
            attr_valid_nsec: valid.subsec_nanos(),
            dummy: 0,
            attr: fuse_attr(attr),
        })
    }

    /// GETXATTR/LISTXATTR: `size` 0 asks for the length; a smaller buffer
    /// than the value is `ERANGE`, as for getxattr(2).
    fn xattr(&mut self, size: u32, value: &[u8]) -> Result<(), Errno> {
        if size == 0 {
            let size = u32::try_from(value.len()).map_err(|_| libc::E2BIG)?;
            return self.put(&abi::GetxattrOut { size, padding: 0 });
        }
        if value.len() > size as usize {
            return Err(libc::ERANGE);
        }
        self.push(value)
    }
}

/// Cursor over a request's arguments; every read is bounds-checked.
struct Args<'a> {
    rest: &'a [u8],
}

impl<'a> Args<'a> {
    fn take<T: ByteValued + Default>(&mut self) -> Result<T, Errno> {
        let bytes = self.bytes(size_of::<T>())?;
        read_struct(bytes).ok_or(libc::EINVAL)
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], Errno> {
        let (head, rest) = self.rest.split_at_checked(n).ok_or(libc::EINVAL)?;
        self.rest = rest;
        Ok(head)
    }

    /// A NUL-terminated string.
    fn cstr(&mut self) -> Result<&'a CStr, Errno> {
        let nul = self.rest.iter().position(|b| *b == 0).ok_or(libc::EINVAL)?;
        let s = self.bytes(nul + 1)?;
        CStr::from_bytes_with_nul(s).map_err(|_| libc::EINVAL)
    }

    /// One path component: not empty, not `.` or `..`, no `/`.
    fn name(&mut self) -> Result<&'a CStr, Errno> {
        let name = self.cstr()?;
        let bytes = name.to_bytes();
        if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
            return Err(libc::EINVAL);
        }
        if bytes.len() > NAME_MAX {
            return Err(libc::ENAMETOOLONG);
        }
        Ok(name)
    }

    fn xattr_name(&mut self) -> Result<&'a CStr, Errno> {
        let name = self.cstr()?;
        if name.is_empty() {
            return Err(libc::EINVAL);
        }
        if name.count_bytes() > XATTR_NAME_MAX {
            return Err(libc::ERANGE);
        }
        Ok(name)
    }
}

/// A struct from the front of `bytes` (which need not be aligned).
fn read_struct<T: ByteValued + Default>(bytes: &[u8]) -> Option<T> {
    let mut value = T::default();
    value.as_mut_slice().copy_from_slice(bytes.get(..size_of::<T>())?);
    Some(value)
}

/// File offsets are `loff_t` in the guest: larger values are not offsets.
fn check_offset(offset: u64) -> Result<(), Errno> {
    if offset > i64::MAX as u64 {
        Err(libc::EINVAL)
    } else {
        Ok(())
    }
}

fn set_attr(inp: &abi::SetattrIn) -> Result<SetAttr, Errno> {
    let has = |bit: u32| inp.valid & bit != 0;
    let time = |set: u32, now: u32, secs: u64, nsecs: u32| -> Result<Option<SetTime>, Errno> {
        if has(now) {
            Ok(Some(SetTime::Now))
        } else if has(set) {
            if nsecs >= 1_000_000_000 {
                return Err(libc::EINVAL);
            }
            Ok(Some(SetTime::At(secs as i64, nsecs)))
        } else {
            Ok(None)
        }
    };
    Ok(SetAttr {
        // chmod changes permission bits only; the type bits the kernel
        // sends along are not the guest's to change.
        mode: has(fattr::MODE).then_some(inp.mode & 0o7777),
        uid: has(fattr::UID).then_some(inp.uid),
        gid: has(fattr::GID).then_some(inp.gid),
        size: has(fattr::SIZE).then_some(inp.size),
        atime: time(fattr::ATIME, fattr::ATIME_NOW, inp.atime, inp.atimensec)?,
        mtime: time(fattr::MTIME, fattr::MTIME_NOW, inp.mtime, inp.mtimensec)?,
        handle: has(fattr::FH).then_some(inp.fh),
    })
}

fn fuse_attr(a: &super::Attr) -> abi::Attr {
    abi::Attr {
        ino: a.inode(),
        size: a.size,
        blocks: a.blocks,
        // Two's complement on the wire: the kernel reads them back as s64.
        atime: a.atime as u64,
        mtime: a.mtime as u64,
        ctime: a.ctime as u64,
        atimensec: a.atime_nsec,
        mtimensec: a.mtime_nsec,
        ctimensec: a.ctime_nsec,
        mode: a.mode,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: a.blksize,
        flags: 0,
    }
}

fn entry_out(e: &Entry) -> abi::EntryOut {
    abi::EntryOut {
        nodeid: e.attr.ino,
        generation: e.generation,
        entry_valid: e.entry_timeout.as_secs(),
        attr_valid: e.attr_timeout.as_secs(),
        entry_valid_nsec: e.entry_timeout.subsec_nanos(),
        attr_valid_nsec: e.attr_timeout.subsec_nanos(),
        attr: fuse_attr(&e.attr),
    }
}

fn open_out(fh: u64, open_flags: u32) -> abi::OpenOut {
    abi::OpenOut {
        fh,
        open_flags,
        padding: 0,
    }
}

/// The errno for the reply header: the OS error if it is one the kernel
/// accepts (1..512), else the nearest match by kind, else `EIO`.
fn errno(e: io::Error) -> Errno {
    if let Some(n) = e.raw_os_error().filter(|n| (1..512).contains(n)) {
        return n;
    }
    match e.kind() {
        io::ErrorKind::NotFound => libc::ENOENT,
        io::ErrorKind::PermissionDenied => libc::EACCES,
        io::ErrorKind::AlreadyExists => libc::EEXIST,
        io::ErrorKind::InvalidInput => libc::EINVAL,
        io::ErrorKind::Unsupported => libc::EOPNOTSUPP,
        _ => libc::EIO,
    }
}

/// A small in-memory file system for the tests of the server and the
/// device: a root with a file `hello` (node 2, with an xattr) and a
/// directory `sub` (node 3). It records what the server passed it.
#[cfg(test)]
pub(crate) mod test_fs {
    use std::collections::BTreeMap;
    use std::ffi::CStr;
    use std::io;
    use std::time::Duration;

    use crate::fs::{Attr, Context, DirEntry, Entry, FileSystem, OpenFlags, SetAttr, StatFs, ROOT_ID};

    pub struct Node {
        pub parent: u64,
        pub name: Vec<u8>,
        pub mode: u32,
        pub data: Vec<u8>,
        pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
        pub lookups: u64,
    }

    pub struct MemFs {
        pub nodes: BTreeMap<u64, Node>,
        next: u64,
        pub forgets: Vec<(u64, u64)>,
        pub destroyed: usize,
        pub last_setattr: Option<SetAttr>,
        pub last_getattr_handle: Option<u64>,
        pub last_read_len: usize,
    }

    fn enosys() -> io::Error {
        io::Error::from_raw_os_error(libc::ENOSYS)
    }

    fn enoent() -> io::Error {
        io::Error::from_raw_os_error(libc::ENOENT)
    }

    impl MemFs {
        pub fn new() -> MemFs {
            let mut fs = MemFs {
                nodes: BTreeMap::new(),
                next: 2,
                forgets: Vec::new(),
                destroyed: 0,
                last_setattr: None,
                last_getattr_handle: None,
                last_read_len: 0,
            };
            fs.nodes.insert(
                ROOT_ID,
                Node {
                    parent: ROOT_ID,
                    name: Vec::new(),
                    mode: libc::S_IFDIR | 0o755,
                    data: Vec::new(),
                    xattrs: Vec::new(),
                    lookups: 0,
                },
            );
            let hello = fs.add(ROOT_ID, b"hello", libc::S_IFREG | 0o644);
            let node = fs.nodes.get_mut(&hello).unwrap();
            node.data = b"hello world\n".to_vec();
            node.xattrs.push((b"user.greeting".to_vec(), b"hi".to_vec()));
            fs.add(ROOT_ID, b"sub", libc::S_IFDIR | 0o755);
            fs
        }

        fn add(&mut self, parent: u64, name: &[u8], mode: u32) -> u64 {
            let ino = self.next;
            self.next += 1;
            self.nodes.insert(
                ino,
                Node {
                    parent,
                    name: name.to_vec(),
                    mode,
                    data: Vec::new(),
                    xattrs: Vec::new(),
                    lookups: 0,
                },
            );
            ino
        }

        fn node(&self, ino: u64) -> io::Result<&Node> {
            self.nodes.get(&ino).ok_or_else(enoent)
        }

        pub fn attr(&self, ino: u64) -> io::Result<Attr> {
            let n = self.node(ino)?;
            Ok(Attr {
                ino,
                size: n.data.len() as u64,
                mode: n.mode,
                nlink: 1,
                blksize: 4096,
                mtime: 1_700_000_000,
                ..Default::default()
            })
        }

        fn entry(&mut self, ino: u64) -> io::Result<Entry> {
            let attr = self.attr(ino)?;
            if let Some(n) = self.nodes.get_mut(&ino) {
                n.lookups += 1;
            }
            Ok(Entry {
                attr,
                generation: 0,
                entry_timeout: Duration::from_secs(1),
                attr_timeout: Duration::from_millis(1500),
            })
        }

        fn child(&self, parent: u64, name: &[u8]) -> Option<u64> {
            self.nodes
                .iter()
                .find(|(ino, n)| **ino != ROOT_ID && n.parent == parent && n.name == name)
                .map(|(ino, _)| *ino)
        }

        /// `.`, `..` and the children of `ino`, in node order.
        fn listing(&self, ino: u64) -> io::Result<Vec<(u64, Vec<u8>, u32)>> {
            let dir = self.node(ino)?;
            if dir.mode & libc::S_IFMT != libc::S_IFDIR {
                return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
            }
            let mut out = vec![
                (ino, b".".to_vec(), libc::DT_DIR as u32),
                (dir.parent, b"..".to_vec(), libc::DT_DIR as u32),
            ];
            for (child, n) in &self.nodes {
                if *child != ROOT_ID && n.parent == ino {
                    out.push((*child, n.name.clone(), (n.mode & libc::S_IFMT) >> 12));
                }
            }
            Ok(out)
        }

        fn new_entry(&mut self, parent: u64, name: &CStr, mode: u32) -> io::Result<Entry> {
            self.node(parent)?;
            if self.child(parent, name.to_bytes()).is_some() {
                return Err(io::Error::from_raw_os_error(libc::EEXIST));
            }
            let ino = self.add(parent, name.to_bytes(), mode);
            self.entry(ino)
        }
    }

    impl FileSystem for MemFs {
        fn lookup(&mut self, _: Context, parent: u64, name: &CStr) -> io::Result<Entry> {
            let ino = self.child(parent, name.to_bytes()).ok_or_else(enoent)?;
            self.entry(ino)
        }
        fn forget(&mut self, ino: u64, nlookup: u64) {
            self.forgets.push((ino, nlookup));
        }
        fn getattr(&mut self, _: Context, ino: u64, handle: Option<u64>) -> io::Result<(Attr, Duration)> {
            self.last_getattr_handle = handle;
            Ok((self.attr(ino)?, Duration::from_secs(2)))
        }
        fn setattr(&mut self, _: Context, ino: u64, set: SetAttr) -> io::Result<(Attr, Duration)> {
            self.last_setattr = Some(set);
            if let Some(size) = set.size {
                self.nodes
                    .get_mut(&ino)
                    .ok_or_else(enoent)?
                    .data
                    .resize(size as usize, 0);
            }
            Ok((self.attr(ino)?, Duration::from_secs(2)))
        }
        fn readlink(&mut self, _: Context, ino: u64) -> io::Result<Vec<u8>> {
            Ok(self.node(ino)?.data.clone())
        }
        fn symlink(&mut self, _: Context, parent: u64, name: &CStr, target: &CStr) -> io::Result<Entry> {
            let e = self.new_entry(parent, name, libc::S_IFLNK | 0o777)?;
            self.nodes.get_mut(&e.attr.ino).ok_or_else(enoent)?.data = target.to_bytes().to_vec();
            Ok(e)
        }
        fn mknod(&mut self, _: Context, _: u64, _: &CStr, _: u32, _: u32, _: u32) -> io::Result<Entry> {
            Err(io::Error::from_raw_os_error(libc::EPERM))
        }
        fn mkdir(&mut self, _: Context, parent: u64, name: &CStr, mode: u32, umask: u32) -> io::Result<Entry> {
            self.new_entry(parent, name, libc::S_IFDIR | (mode & !umask & 0o7777))
        }
        fn unlink(&mut self, _: Context, parent: u64, name: &CStr) -> io::Result<()> {
            let ino = self.child(parent, name.to_bytes()).ok_or_else(enoent)?;
            self.nodes.remove(&ino);
            Ok(())
        }
        fn rmdir(&mut self, ctx: Context, parent: u64, name: &CStr) -> io::Result<()> {
            self.unlink(ctx, parent, name)
        }
        fn rename(&mut self, _: Context, _: u64, _: &CStr, _: u64, _: &CStr, _: u32) -> io::Result<()> {
            Err(enosys())
        }
        fn link(&mut self, _: Context, _: u64, _: u64, _: &CStr) -> io::Result<Entry> {
            Err(enosys())
        }
        fn open(&mut self, _: Context, ino: u64, _: u32) -> io::Result<(u64, OpenFlags)> {
            self.node(ino)?;
            Ok((100 + ino, 0))
        }
        fn create(
            &mut self,
            _: Context,
            parent: u64,
            name: &CStr,
            mode: u32,
            _: u32,
            umask: u32,
        ) -> io::Result<(Entry, u64, OpenFlags)> {
            let e = self.new_entry(parent, name, libc::S_IFREG | (mode & !umask & 0o7777))?;
            Ok((e, 100 + e.attr.ino, 0))
        }
        fn read(&mut self, ino: u64, _: u64, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
            self.last_read_len = buf.len();
            let data = &self.node(ino)?.data;
            let start = (offset as usize).min(data.len());
            let n = buf.len().min(data.len() - start);
            buf[..n].copy_from_slice(&data[start..start + n]);
            Ok(n)
        }
        fn write(&mut self, _: Context, ino: u64, _: u64, offset: u64, data: &[u8], _: u32) -> io::Result<usize> {
            let node = self.nodes.get_mut(&ino).ok_or_else(enoent)?;
            let end = offset as usize + data.len();
            if node.data.len() < end {
                node.data.resize(end, 0);
            }
            node.data[offset as usize..end].copy_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self, _: u64, _: u64) -> io::Result<()> {
            Ok(())
        }
        fn fsync(&mut self, _: u64, _: u64, _: bool) -> io::Result<()> {
            Ok(())
        }
        fn release(&mut self, _: u64, _: u64) -> io::Result<()> {
            Ok(())
        }
        fn opendir(&mut self, _: Context, ino: u64, _: u32) -> io::Result<(u64, OpenFlags)> {
            self.node(ino)?;
            Ok((200 + ino, 0))
        }
        fn readdir(
            &mut self,
            _: Context,
            ino: u64,
            _: u64,
            offset: u64,
            add: &mut dyn FnMut(DirEntry<'_>) -> bool,
        ) -> io::Result<()> {
            for (i, (child, name, kind)) in self.listing(ino)?.iter().enumerate().skip(offset as usize) {
                let d = DirEntry {
                    ino: *child,
                    next_offset: i as u64 + 1,
                    kind: *kind,
                    name,
                };
                if !add(d) {
                    break;
                }
            }
            Ok(())
        }
        fn readdirplus(
            &mut self,
            _: Context,
            ino: u64,
            _: u64,
            offset: u64,
            add: &mut dyn FnMut(DirEntry<'_>, Entry) -> bool,
        ) -> io::Result<()> {
            for (i, (child, name, kind)) in self.listing(ino)?.iter().enumerate().skip(offset as usize) {
                let d = DirEntry {
                    ino: *child,
                    next_offset: i as u64 + 1,
                    kind: *kind,
                    name,
                };
                let e = Entry {
                    attr: self.attr(*child)?,
                    generation: 0,
                    entry_timeout: Duration::from_secs(1),
                    attr_timeout: Duration::from_secs(1),
                };
                if !add(d, e) {
                    break;
                }
                if i >= 2 {
                    if let Some(n) = self.nodes.get_mut(child) {
                        n.lookups += 1;
                    }
                }
            }
            Ok(())
        }
        fn releasedir(&mut self, _: u64, _: u64) -> io::Result<()> {
            Ok(())
        }
        fn fsyncdir(&mut self, _: u64, _: u64, _: bool) -> io::Result<()> {
            Ok(())
        }
        fn statfs(&mut self, _: Context, _: u64) -> io::Result<StatFs> {
            Ok(StatFs {
                blocks: 1000,
                bfree: 500,
                bavail: 400,
                files: 100,
                ffree: 50,
                bsize: 4096,
                namelen: 255,
                frsize: 4096,
            })
        }
        fn setxattr(&mut self, _: Context, ino: u64, name: &CStr, value: &[u8], _: u32) -> io::Result<()> {
            let node = self.nodes.get_mut(&ino).ok_or_else(enoent)?;
            node.xattrs.retain(|(n, _)| n != name.to_bytes());
            node.xattrs.push((name.to_bytes().to_vec(), value.to_vec()));
            Ok(())
        }
        fn getxattr(&mut self, _: Context, ino: u64, name: &CStr) -> io::Result<Vec<u8>> {
            self.node(ino)?
                .xattrs
                .iter()
                .find(|(n, _)| n == name.to_bytes())
                .map(|(_, v)| v.clone())
                .ok_or_else(|| io::Error::from_raw_os_error(libc::ENODATA))
        }
        fn listxattr(&mut self, _: Context, ino: u64) -> io::Result<Vec<u8>> {
            let mut out = Vec::new();
            for (n, _) in &self.node(ino)?.xattrs {
                out.extend_from_slice(n);
                out.push(0);
            }
            Ok(out)
        }
        fn removexattr(&mut self, _: Context, _: u64, _: &CStr) -> io::Result<()> {
            Err(enosys())
        }
        fn access(&mut self, _: Context, ino: u64, _: u32) -> io::Result<()> {
            self.node(ino).map(|_| ())
        }
        fn fallocate(&mut self, _: u64, _: u64, _: u32, _: u64, _: u64) -> io::Result<()> {
            Err(enosys())
        }
        fn lseek(&mut self, _: u64, _: u64, offset: u64, _: u32) -> io::Result<u64> {
            Ok(offset)
        }
        fn copy_file_range(
            &mut self,
            _: u64,
            _: u64,
            _: u64,
            _: u64,
            _: u64,
            _: u64,
            _: u64,
            _: u64,
        ) -> io::Result<usize> {
            Err(enosys())
        }
        fn syncfs(&mut self, _: u64) -> io::Result<()> {
            Ok(())
        }
        fn destroy(&mut self) {
            self.destroyed += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_fs::MemFs;
    use super::*;
    use crate::fs::ROOT_ID;

    const BIG: usize = 2 * MAX_READ;

    fn bytes<T: ByteValued>(v: &T) -> Vec<u8> {
        v.as_slice().to_vec()
    }

    fn request(op: u32, nodeid: u64, args: &[u8]) -> Vec<u8> {
        let h = abi::InHeader {
            len: (IN_HEADER_SIZE + args.len()) as u32,
            opcode: op,
            unique: 0x1234,
            nodeid,
            uid: 1000,
            gid: 1000,
            pid: 42,
            padding: 0,
        };
        let mut r = bytes(&h);
        r.extend_from_slice(args);
        r
    }

    fn init_in(major: u32, minor: u32, flags: u32) -> Vec<u8> {
        bytes(&abi::InitIn {
            major,
            minor,
            max_readahead: 128 * 1024,
            flags,
            ..Default::default()
        })
    }

    /// Run a request; return the reply header and body.
    fn call_with(s: &mut Server<MemFs>, req: &[u8], max: usize) -> (abi::OutHeader, Vec<u8>) {
        let mut reply = Vec::new();
        let len = s.handle(req, max, &mut reply).unwrap().expect("a reply");
        assert_eq!(len, reply.len());
        assert!(len <= max, "reply of {len} bytes exceeds the {max} writable");
        let h: abi::OutHeader = read_struct(&reply).unwrap();
        assert_eq!(h.len as usize, len);
        assert_eq!(h.unique, 0x1234);
        (h, reply[OUT_HEADER_SIZE..].to_vec())
    }

    fn call(s: &mut Server<MemFs>, op: u32, nodeid: u64, args: &[u8]) -> (abi::OutHeader, Vec<u8>) {
        call_with(s, &request(op, nodeid, args), BIG)
    }

    fn errno_of(s: &mut Server<MemFs>, op: u32, nodeid: u64, args: &[u8]) -> i32 {
        let (h, body) = call(s, op, nodeid, args);
        if h.error != 0 {
            assert!(body.is_empty(), "error replies carry no body");
        }
        -h.error
    }

    fn mounted() -> Server<MemFs> {
        let mut s = Server::new(MemFs::new());
        let (h, _) = call(&mut s, opcode::INIT, 0, &init_in(7, 37, u32::MAX));
        assert_eq!(h.error, 0);
        s
    }

    fn name(n: &str) -> Vec<u8> {
        let mut v = n.as_bytes().to_vec();
        v.push(0);
        v
    }

    fn read_in(fh: u64, offset: u64, size: u32) -> Vec<u8> {
        bytes(&abi::ReadIn {
            fh,
            offset,
            size,
            ..Default::default()
        })
    }

    #[test]
    fn init_negotiates_version_and_flags() {
        let mut s = Server::new(MemFs::new());
        let (h, body) = call(&mut s, opcode::INIT, 0, &init_in(7, 37, u32::MAX));
        assert_eq!((h.error, body.len()), (0, 64));
        let out: abi::InitOut = read_struct(&body).unwrap();
        assert_eq!((out.major, out.minor), (7, 36));
        assert_eq!(out.flags, OFFERED_FLAGS);
        for refused in [
            init_flags::POSIX_LOCKS,
            init_flags::FLOCK_LOCKS,
            init_flags::WRITEBACK_CACHE,
            init_flags::SETXATTR_EXT,
            init_flags::DONT_MASK,
            init_flags::EXPORT_SUPPORT,
        ] {
            assert_eq!(out.flags & refused, 0, "flag {refused:#x} offered");
        }
        assert_eq!((out.max_write, out.max_pages), (1 << 20, 256));
        assert_eq!(out.max_readahead, 128 * 1024);
        assert_eq!(s.minor(), Some(36));
        // A second INIT in the same session is refused.
        assert_eq!(errno_of(&mut s, opcode::INIT, 0, &init_in(7, 37, 0)), libc::EIO);

        // An old kernel: 16-byte init_in, minor 31, no MAX_PAGES.
        let mut s = Server::new(MemFs::new());
        let (h, body) = call(&mut s, opcode::INIT, 0, &init_in(7, 31, init_flags::ASYNC_READ)[..16]);
        let out: abi::InitOut = read_struct(&body).unwrap();
        assert_eq!(
            (h.error, out.minor, out.flags, out.max_pages),
            (0, 31, init_flags::ASYNC_READ, 0)
        );
    }

    #[test]
    fn init_refuses_other_versions() {
        let mut s = Server::new(MemFs::new());
        // A newer major: answer with ours and wait for a retry.
        let (h, body) = call(&mut s, opcode::INIT, 0, &init_in(8, 0, u32::MAX));
        let out: abi::InitOut = read_struct(&body).unwrap();
        assert_eq!((h.error, out.major, out.minor, out.flags), (0, 7, 36, 0));
        assert_eq!(s.minor(), None);
        assert_eq!(errno_of(&mut s, opcode::LOOKUP, ROOT_ID, &name("hello")), libc::EIO);
        assert_eq!(errno_of(&mut s, opcode::INIT, 0, &init_in(6, 99, 0)), libc::EPROTO);
        assert_eq!(errno_of(&mut s, opcode::INIT, 0, &init_in(7, 30, 0)), libc::EPROTO);
        assert_eq!(
            errno_of(&mut s, opcode::INIT, 0, &init_in(7, 31, 0)[..15]),
            libc::EINVAL
        );
        assert_eq!(s.minor(), None);
        let (h, _) = call(&mut s, opcode::INIT, 0, &init_in(7, 36, 0));
        assert_eq!(h.error, 0);
    }

    #[test]
    fn requests_before_init_fail_with_eio() {
        let mut s = Server::new(MemFs::new());
        for op in [opcode::LOOKUP, opcode::GETATTR, opcode::DESTROY, 9999] {
            assert_eq!(errno_of(&mut s, op, ROOT_ID, &name("hello")), libc::EIO, "opcode {op}");
        }
        let mut reply = Vec::new();
        let forget = request(opcode::FORGET, 2, &bytes(&abi::ForgetIn { nlookup: 1 }));
        assert_eq!(s.handle(&forget, 0, &mut reply), Ok(None));
        assert!(s.fs().forgets.is_empty());
    }

    #[test]
    fn destroy_ends_the_session() {
        let mut s = mounted();
        let (h, body) = call(&mut s, opcode::DESTROY, 0, &[]);
        assert_eq!((h.error, body.len(), s.fs().destroyed), (0, 0, 1));
        assert_eq!(errno_of(&mut s, opcode::LOOKUP, ROOT_ID, &name("hello")), libc::EIO);
        assert_eq!(call(&mut s, opcode::INIT, 0, &init_in(7, 37, 0)).0.error, 0);
        s.reset();
        assert_eq!((s.minor(), s.fs().destroyed), (None, 2));
    }

    #[test]
    fn lookup_and_getattr_encode_entries() {
        let mut s = mounted();
        let (h, body) = call(&mut s, opcode::LOOKUP, ROOT_ID, &name("hello"));
        assert_eq!((h.error, body.len()), (0, 128));
        let e: abi::EntryOut = read_struct(&body).unwrap();
        assert_eq!((e.nodeid, e.attr.ino, e.attr.size), (2, 2, 12));
        assert_eq!((e.entry_valid, e.entry_valid_nsec), (1, 0));
        assert_eq!((e.attr_valid, e.attr_valid_nsec), (1, 500_000_000));
        assert_eq!(e.attr.mode, libc::S_IFREG | 0o644);
        assert_eq!(s.fs().nodes[&2].lookups, 1);
        assert_eq!(errno_of(&mut s, opcode::LOOKUP, ROOT_ID, &name("nope")), libc::ENOENT);

        let args = bytes(&abi::GetattrIn {
            getattr_flags: abi::GETATTR_FH,
            dummy: 0,
            fh: 77,
        });
        let (h, body) = call(&mut s, opcode::GETATTR, 2, &args);
        let a: abi::AttrOut = read_struct(&body).unwrap();
        assert_eq!((h.error, body.len(), a.attr_valid, a.attr.size), (0, 104, 2, 12));
        assert_eq!(a.attr.mtime, 1_700_000_000);
        assert_eq!(s.fs().last_getattr_handle, Some(77));
        let args = bytes(&abi::GetattrIn::default());
        call(&mut s, opcode::GETATTR, 2, &args);
        assert_eq!(s.fs().last_getattr_handle, None);
        // Arguments shorter than their struct.
        assert_eq!(errno_of(&mut s, opcode::GETATTR, 2, &args[..8]), libc::EINVAL);
    }

    #[test]
    fn setattr_maps_valid_bits() {
        let mut s = mounted();
        let args = bytes(&abi::SetattrIn {
            valid: fattr::MODE | fattr::SIZE | fattr::ATIME | fattr::ATIME_NOW | fattr::MTIME | fattr::FH,
            fh: 9,
            size: 5,
            mode: libc::S_IFREG | 0o4600,
            atime: 1,
            mtime: 123,
            mtimensec: 456,
            uid: 77,
            ..Default::default()
        });
        let (h, body) = call(&mut s, opcode::SETATTR, 2, &args);
        let a: abi::AttrOut = read_struct(&body).unwrap();
        assert_eq!((h.error, a.attr.size), (0, 5));
        let set = s.fs().last_setattr.unwrap();
        assert_eq!(
            set,
            SetAttr {
                mode: Some(0o4600),
                uid: None,
                gid: None,
                size: Some(5),
                atime: Some(SetTime::Now),
                mtime: Some(SetTime::At(123, 456)),
                handle: Some(9),
            }
        );
        let args = bytes(&abi::SetattrIn {
            valid: fattr::MTIME,
            mtimensec: 1_000_000_000,
            ..Default::default()
        });
        assert_eq!(errno_of(&mut s, opcode::SETATTR, 2, &args), libc::EINVAL);
    }

    /// Decode READDIR records: (ino, off, type, name), checking alignment.
    fn dirents(body: &[u8]) -> Vec<(u64, u64, u32, String)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < body.len() {
            assert_eq!(at % 8, 0);
            let d: abi::Dirent = read_struct(&body[at..]).unwrap();
            let name = &body[at + 24..at + 24 + d.namelen as usize];
            let len = abi::dirent_align(24 + d.namelen as usize);
            assert!(
                body[at + 24 + d.namelen as usize..at + len].iter().all(|b| *b == 0),
                "padding is zero"
            );
            out.push((d.ino, d.off, d.kind, String::from_utf8(name.to_vec()).unwrap()));
            at += len;
        }
        assert_eq!(at, body.len());
        out
    }

    #[test]
    fn readdir_aligns_records_and_respects_sizes() {
        let mut s = mounted();
        let (h, body) = call(&mut s, opcode::READDIR, ROOT_ID, &read_in(201, 0, 4096));
        assert_eq!(h.error, 0);
        // ".", "..", "hello", "sub": 32 + 32 + 32 + 32.
        assert_eq!(body.len(), 128);
        let all = dirents(&body);
        let names: Vec<_> = all.iter().map(|d| d.3.as_str()).collect();
        assert_eq!(names, [".", "..", "hello", "sub"]);
        assert_eq!(all[2], (2, 3, libc::DT_REG as u32, "hello".into()));
        assert_eq!(all[3].2, libc::DT_DIR as u32);

        // A size that holds two records and a bit: two records.
        let (_, body) = call(&mut s, opcode::READDIR, ROOT_ID, &read_in(201, 0, 70));
        let first = dirents(&body);
        assert_eq!(first.len(), 2);
        // Continue from the last offset.
        let (_, body) = call(&mut s, opcode::READDIR, ROOT_ID, &read_in(201, first[1].1, 4096));
        let rest: Vec<_> = dirents(&body).into_iter().map(|d| d.3).collect();
        assert_eq!(rest, ["hello", "sub"]);
        // The guest's writable space limits too: header + one record.
        let (_, body) = call_with(
            &mut s,
            &request(opcode::READDIR, ROOT_ID, &read_in(201, 0, 4096)),
            16 + 40,
        );
        assert_eq!(dirents(&body).len(), 1);
        // Nothing fits: an empty listing, not an error.
        let (h, body) = call(&mut s, opcode::READDIR, ROOT_ID, &read_in(201, 0, 10));
        assert_eq!((h.error, body.len()), (0, 0));
        // Past the end.
        let (h, body) = call(&mut s, opcode::READDIR, ROOT_ID, &read_in(201, 99, 4096));
        assert_eq!((h.error, body.len()), (0, 0));
        assert_eq!(
            errno_of(&mut s, opcode::READDIR, 2, &read_in(1, 0, 4096)),
            libc::ENOTDIR
        );
    }

    #[test]
    fn readdirplus_counts_only_records_taken() {
        let mut s = mounted();
        // Room for ".", ".." and "hello" (160 bytes each), not "sub".
        let (h, body) = call(&mut s, opcode::READDIRPLUS, ROOT_ID, &read_in(201, 0, 3 * 160 + 100));
        assert_eq!((h.error, body.len()), (0, 3 * 160));
        let third: abi::DirentPlus = read_struct(&body[320..]).unwrap();
        assert_eq!((third.entry_out.nodeid, third.entry_out.attr.size), (2, 12));
        assert_eq!((third.dirent.ino, third.dirent.off, third.dirent.namelen), (2, 3, 5));
        assert_eq!(&body[320 + 152..320 + 157], b"hello");
        assert_eq!(s.fs().nodes[&2].lookups, 1);
        assert_eq!(
            s.fs().nodes[&3].lookups,
            0,
            "the record that did not fit is not counted"
        );
        let (_, body) = call(&mut s, opcode::READDIRPLUS, ROOT_ID, &read_in(201, 3, 4096));
        let last: abi::DirentPlus = read_struct(&body).unwrap();
        assert_eq!((body.len(), last.entry_out.nodeid), (160, 3));
    }

    #[test]
    fn xattr_size_probe_and_erange() {
        let mut s = mounted();
        let mut args = bytes(&abi::GetxattrIn { size: 0, padding: 0 });
        args.extend_from_slice(&name("user.greeting"));
        let (h, body) = call(&mut s, opcode::GETXATTR, 2, &args);
        let out: abi::GetxattrOut = read_struct(&body).unwrap();
        assert_eq!((h.error, body.len(), out.size), (0, 8, 2));
        args[0] = 1;
        assert_eq!(errno_of(&mut s, opcode::GETXATTR, 2, &args), libc::ERANGE);
        args[0] = 100;
        let (h, body) = call(&mut s, opcode::GETXATTR, 2, &args);
        assert_eq!((h.error, body.as_slice()), (0, &b"hi"[..]));
        let mut missing = bytes(&abi::GetxattrIn { size: 100, padding: 0 });
        missing.extend_from_slice(&name("user.none"));
        assert_eq!(errno_of(&mut s, opcode::GETXATTR, 2, &missing), libc::ENODATA);
        // Empty and unterminated names.
        let mut bad = bytes(&abi::GetxattrIn { size: 100, padding: 0 });
        bad.push(0);
        assert_eq!(errno_of(&mut s, opcode::GETXATTR, 2, &bad), libc::EINVAL);
        bad.pop();
        bad.extend_from_slice(b"user.x");
        assert_eq!(errno_of(&mut s, opcode::GETXATTR, 2, &bad), libc::EINVAL);

        let list = bytes(&abi::GetxattrIn { size: 0, padding: 0 });
        let (_, body) = call(&mut s, opcode::LISTXATTR, 2, &list);
        assert_eq!(read_struct::<abi::GetxattrOut>(&body).unwrap().size, 14);
        let list = bytes(&abi::GetxattrIn { size: 14, padding: 0 });
        let (_, body) = call(&mut s, opcode::LISTXATTR, 2, &list);
        assert_eq!(body, b"user.greeting\0");
        let list = bytes(&abi::GetxattrIn { size: 13, padding: 0 });
        assert_eq!(errno_of(&mut s, opcode::LISTXATTR, 2, &list), libc::ERANGE);

        // SETXATTR: the value must be exactly `size` bytes.
        let mut set = bytes(&abi::SetxattrIn { size: 3, flags: 0 });
        set.extend_from_slice(&name("user.new"));
        set.extend_from_slice(b"abc");
        assert_eq!(errno_of(&mut s, opcode::SETXATTR, 2, &set), 0);
        set.push(b'd');
        assert_eq!(errno_of(&mut s, opcode::SETXATTR, 2, &set), libc::EINVAL);
    }

    #[test]
    fn names_are_checked() {
        let mut s = mounted();
        for bad in [&b"hello"[..], b"\0", b".\0", b"..\0", b"a/b\0", b"/\0", b""] {
            assert_eq!(
                errno_of(&mut s, opcode::LOOKUP, ROOT_ID, bad),
                libc::EINVAL,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = name(&"x".repeat(256));
        assert_eq!(errno_of(&mut s, opcode::LOOKUP, ROOT_ID, &long), libc::ENAMETOOLONG);
        // Both names of a rename are checked.
        let mut args = bytes(&abi::RenameIn { newdir: ROOT_ID });
        args.extend_from_slice(&name("hello"));
        args.extend_from_slice(b"..\0");
        assert_eq!(errno_of(&mut s, opcode::RENAME, ROOT_ID, &args), libc::EINVAL);
        let mut args = bytes(&abi::Rename2In {
            newdir: ROOT_ID,
            flags: 4, // RENAME_WHITEOUT
            padding: 0,
        });
        args.extend_from_slice(&name("hello"));
        args.extend_from_slice(&name("other"));
        assert_eq!(errno_of(&mut s, opcode::RENAME2, ROOT_ID, &args), libc::EINVAL);
        // MKDIR with a good name works; a symlink target may hold '/'.
        let mut args = bytes(&abi::MkdirIn {
            mode: 0o755,
            umask: 0o022,
        });
        args.extend_from_slice(&name("new"));
        assert_eq!(errno_of(&mut s, opcode::MKDIR, ROOT_ID, &args), 0);
        let mut args = name("link");
        args.extend_from_slice(&name("../a/b"));
        assert_eq!(errno_of(&mut s, opcode::SYMLINK, ROOT_ID, &args), 0);
        let mut args = name("link2");
        args.extend_from_slice(b"\0");
        assert_eq!(errno_of(&mut s, opcode::SYMLINK, ROOT_ID, &args), libc::ENOENT);
    }

    #[test]
    fn hostile_headers() {
        let mut s = mounted();
        let mut reply = vec![1, 2, 3];
        assert_eq!(
            s.handle(&[0u8; 39], BIG, &mut reply),
            Err(RequestError::ShortHeader { len: 39 })
        );
        // len past the buffer, or shorter than the header: EINVAL.
        let mut req = request(opcode::LOOKUP, ROOT_ID, &name("hello"));
        req[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert_eq!(call_with(&mut s, &req, BIG).0.error, -libc::EINVAL);
        req[0..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert_eq!(call_with(&mut s, &req, BIG).0.error, -libc::EINVAL);
        req[0..4].copy_from_slice(&20u32.to_ne_bytes());
        assert_eq!(call_with(&mut s, &req, BIG).0.error, -libc::EINVAL);
        // len cutting the name short: no NUL within the arguments.
        req[0..4].copy_from_slice(&43u32.to_ne_bytes());
        assert_eq!(call_with(&mut s, &req, BIG).0.error, -libc::EINVAL);
        // Bytes past len are ignored.
        let mut req = request(opcode::LOOKUP, ROOT_ID, &name("hello"));
        req.extend_from_slice(b"trailing");
        assert_eq!(call_with(&mut s, &req, BIG).0.error, 0);
        // No room for a reply header.
        assert_eq!(
            s.handle(&req, 15, &mut reply),
            Err(RequestError::NoReplySpace {
                opcode: opcode::LOOKUP,
                available: 15
            })
        );
        // Room for the header but not the entry: refused before the
        // lookup, so no lookup is counted.
        let before = s.fs().nodes[&2].lookups;
        assert_eq!(call_with(&mut s, &req, 16 + 127).0.error, -libc::EINVAL);
        assert_eq!(s.fs().nodes[&2].lookups, before);
    }

    #[test]
    fn unknown_and_lock_opcodes_get_enosys() {
        let mut s = mounted();
        for op in [
            9999,
            opcode::GETLK,
            opcode::SETLK,
            opcode::SETLKW,
            opcode::IOCTL,
            opcode::BMAP,
            opcode::TMPFILE,
        ] {
            assert_eq!(errno_of(&mut s, op, ROOT_ID, &[0u8; 64]), libc::ENOSYS, "opcode {op}");
        }
    }

    #[test]
    fn forgets_are_checked_against_their_payload() {
        let mut s = mounted();
        let mut reply = Vec::new();
        let forget = request(opcode::FORGET, 2, &bytes(&abi::ForgetIn { nlookup: 3 }));
        assert_eq!(s.handle(&forget, 0, &mut reply), Ok(None));
        assert_eq!(s.fs().forgets, [(2, 3)]);
        // Short FORGET: ignored.
        assert_eq!(s.handle(&forget[..44], 0, &mut reply), Ok(None));
        let mut batch = bytes(&abi::BatchForgetIn { count: 2, dummy: 0 });
        batch.extend_from_slice(&bytes(&abi::ForgetOne { nodeid: 3, nlookup: 1 }));
        batch.extend_from_slice(&bytes(&abi::ForgetOne { nodeid: 4, nlookup: 2 }));
        assert_eq!(
            s.handle(&request(opcode::BATCH_FORGET, 0, &batch), 0, &mut reply),
            Ok(None)
        );
        assert_eq!(s.fs().forgets, [(2, 3), (3, 1), (4, 2)]);
        // A count larger than the payload: nothing is forgotten.
        for count in [3, u32::MAX] {
            batch[0..4].copy_from_slice(&count.to_ne_bytes());
            assert_eq!(
                s.handle(&request(opcode::BATCH_FORGET, 0, &batch), 0, &mut reply),
                Ok(None)
            );
        }
        assert_eq!(s.fs().forgets.len(), 3);
        // INTERRUPT has no reply either.
        let int = request(opcode::INTERRUPT, 0, &bytes(&abi::InterruptIn { unique: 1 }));
        assert_eq!(s.handle(&int, 0, &mut reply), Ok(None));
    }

    #[test]
    fn reads_are_capped_and_writes_checked() {
        let mut s = mounted();
        let (h, body) = call(&mut s, opcode::READ, 2, &read_in(102, 6, u32::MAX));
        assert_eq!((h.error, body.as_slice()), (0, &b"world\n"[..]));
        assert_eq!(s.fs().last_read_len, MAX_READ);
        let (_, body) = call_with(&mut s, &request(opcode::READ, 2, &read_in(102, 0, 4096)), 16 + 5);
        assert_eq!(body, b"hello");
        assert_eq!(s.fs().last_read_len, 5);
        assert_eq!(
            errno_of(&mut s, opcode::READ, 2, &read_in(102, u64::MAX, 10)),
            libc::EINVAL
        );

        let write = |size: u32, data: &[u8]| {
            let mut args = bytes(&abi::WriteIn {
                fh: 102,
                offset: 0,
                size,
                ..Default::default()
            });
            args.extend_from_slice(data);
            args
        };
        let (h, body) = call(&mut s, opcode::WRITE, 2, &write(3, b"HEL"));
        let out: abi::WriteOut = read_struct(&body).unwrap();
        assert_eq!((h.error, out.size), (0, 3));
        assert_eq!(s.fs().nodes[&2].data, b"HELlo world\n");
        assert_eq!(errno_of(&mut s, opcode::WRITE, 2, &write(4, b"abc")), libc::EINVAL);
        assert_eq!(errno_of(&mut s, opcode::WRITE, 2, &write(2, b"abc")), libc::EINVAL);
        let huge = vec![0u8; MAX_WRITE + 1];
        assert_eq!(
            errno_of(&mut s, opcode::WRITE, 2, &write(huge.len() as u32, &huge)),
            libc::EINVAL
        );
    }

    #[test]
    fn create_open_statfs_and_friends() {
        let mut s = mounted();
        let mut args = bytes(&abi::CreateIn {
            flags: libc::O_RDWR as u32,
            mode: libc::S_IFREG | 0o644,
            umask: 0o022,
            open_flags: 0,
        });
        args.extend_from_slice(&name("made"));
        let (h, body) = call(&mut s, opcode::CREATE, ROOT_ID, &args);
        assert_eq!((h.error, body.len()), (0, 144));
        let e: abi::EntryOut = read_struct(&body).unwrap();
        let o: abi::OpenOut = read_struct(&body[128..]).unwrap();
        assert_eq!(o.fh, 100 + e.nodeid);
        // Too little room for entry + open: refused before creating.
        let req = request(opcode::CREATE, ROOT_ID, &{
            let mut a = args.clone();
            a.truncate(16);
            a.extend_from_slice(&name("other"));
            a
        });
        assert_eq!(call_with(&mut s, &req, 16 + 143).0.error, -libc::EINVAL);
        assert_eq!(errno_of(&mut s, opcode::LOOKUP, ROOT_ID, &name("other")), libc::ENOENT);

        let (h, body) = call(&mut s, opcode::OPEN, 2, &bytes(&abi::OpenIn::default()));
        assert_eq!((h.error, read_struct::<abi::OpenOut>(&body).unwrap().fh), (0, 102));
        let (_, body) = call(&mut s, opcode::STATFS, ROOT_ID, &[]);
        let st: abi::StatfsOut = read_struct(&body).unwrap();
        assert_eq!((body.len(), st.st.blocks, st.st.namelen), (80, 1000, 255));
        let release = bytes(&abi::ReleaseIn {
            fh: 102,
            ..Default::default()
        });
        assert_eq!(errno_of(&mut s, opcode::RELEASE, 2, &release), 0);
        assert_eq!(errno_of(&mut s, opcode::FLUSH, 2, &release), 0);
        assert_eq!(errno_of(&mut s, opcode::FSYNC, 2, &release[..16]), 0);
        assert_eq!(
            errno_of(
                &mut s,
                opcode::ACCESS,
                2,
                &bytes(&abi::AccessIn { mask: 8, padding: 0 })
            ),
            libc::EINVAL
        );
        assert_eq!(
            errno_of(
                &mut s,
                opcode::ACCESS,
                2,
                &bytes(&abi::AccessIn { mask: 4, padding: 0 })
            ),
            0
        );
        let lseek = bytes(&abi::LseekIn {
            fh: 102,
            offset: 7,
            whence: 9,
            padding: 0,
        });
        assert_eq!(errno_of(&mut s, opcode::LSEEK, 2, &lseek), libc::EINVAL);
        let fallocate = bytes(&abi::FallocateIn {
            fh: 102,
            offset: i64::MAX as u64,
            length: 1,
            ..Default::default()
        });
        assert_eq!(errno_of(&mut s, opcode::FALLOCATE, 2, &fallocate), libc::EFBIG);
        assert_eq!(errno_of(&mut s, opcode::SYNCFS, ROOT_ID, &[0u8; 8]), 0);
        assert_eq!(
            errno_of(&mut s, opcode::MKNOD, ROOT_ID, &{
                let mut a = bytes(&abi::MknodIn::default());
                a.extend_from_slice(&name("fifo"));
                a
            }),
            libc::EPERM
        );
    }

    #[test]
    fn io_errors_become_errnos() {
        assert_eq!(errno(io::Error::from_raw_os_error(libc::ENOENT)), libc::ENOENT);
        assert_eq!(errno(io::Error::from_raw_os_error(0)), libc::EIO);
        assert_eq!(errno(io::Error::from_raw_os_error(-5)), libc::EIO);
        assert_eq!(errno(io::Error::from_raw_os_error(4000)), libc::EIO);
        assert_eq!(errno(io::ErrorKind::NotFound.into()), libc::ENOENT);
        assert_eq!(errno(io::Error::other("x")), libc::EIO);
    }
}
