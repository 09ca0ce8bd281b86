//! Tests on real temporary directories, through the `FileSystem` trait.

use super::*;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A lower and an upper directory, removed on drop, and the lower
/// manifest taken before the overlay touched anything.
struct Env {
    dir: PathBuf,
    lower: PathBuf,
    upper: PathBuf,
    manifest: BTreeMap<PathBuf, String>,
}

impl Env {
    fn new(fill: impl FnOnce(&Path)) -> Env {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("mvm-overlay-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let lower = dir.join("lower");
        let upper = dir.join("upper");
        std::fs::create_dir_all(&lower).unwrap();
        std::fs::create_dir_all(&upper).unwrap();
        fill(&lower);
        let manifest = manifest(&lower);
        Env {
            dir,
            lower,
            upper,
            manifest,
        }
    }

    fn overlay(&self) -> Overlay {
        Overlay::new(Some(&self.lower), &self.upper, OverlayOptions::default()).unwrap()
    }

    fn assert_lower_unchanged(&self) {
        let now = manifest(&self.lower);
        assert_eq!(self.manifest, now, "the lower layer changed");
        // No temporary whiteout is left behind in the upper layer.
        let mut pending = vec![self.upper.clone()];
        while let Some(dir) = pending.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let entry = entry.unwrap();
                assert!(
                    !entry.file_name().to_string_lossy().starts_with(".mvm-"),
                    "{:?}",
                    entry.path()
                );
                if entry.file_type().unwrap().is_dir() {
                    pending.push(entry.path());
                }
            }
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Path -> size, mode, mtime, atime and content hash (target for
/// symlinks), read without touching access times.
fn manifest(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(rel) = pending.pop() {
        let path = root.join(&rel);
        let md = std::fs::symlink_metadata(&path).unwrap();
        let line = if md.file_type().is_symlink() {
            format!("link {:?} mode {:o}", std::fs::read_link(&path).unwrap(), md.mode())
        } else {
            let mut hash = std::collections::hash_map::DefaultHasher::new();
            if md.is_file() {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOATIME)
                    .open(&path)
                    .unwrap();
                let mut data = Vec::new();
                std::io::Read::read_to_end(&mut &file, &mut data).unwrap();
                data.hash(&mut hash);
            }
            if md.is_dir() {
                let fd = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOATIME | libc::O_DIRECTORY)
                    .open(&path)
                    .unwrap();
                for name in sys::read_dir_names(fd.into()).unwrap() {
                    pending.push(rel.join(std::ffi::OsStr::from_encoded_bytes_unchecked_safe(name.as_bytes())));
                }
            }
            format!(
                "size {} mode {:o} mtime {}.{} atime {}.{} hash {:x}",
                md.size(),
                md.mode(),
                md.mtime(),
                md.mtime_nsec(),
                md.atime(),
                md.atime_nsec(),
                hash.finish()
            )
        };
        out.insert(rel, line);
    }
    out
}

trait OsStrExt2 {
    fn from_encoded_bytes_unchecked_safe(bytes: &[u8]) -> &std::ffi::OsStr;
}

impl OsStrExt2 for std::ffi::OsStr {
    fn from_encoded_bytes_unchecked_safe(bytes: &[u8]) -> &std::ffi::OsStr {
        std::os::unix::ffi::OsStrExt::from_bytes(bytes)
    }
}

/// The node tables agree with each other: every name is in both maps,
/// child counts match, nothing unreferenced is kept.
fn check_tables(fs: &Overlay) {
    let mut children: HashMap<u64, u64> = HashMap::new();
    for (&id, node) in &fs.nodes {
        for (p, n) in &node.names {
            assert_eq!(fs.by_name.get(&(*p, n.clone())), Some(&id), "{n:?}");
            assert!(fs.nodes.contains_key(p), "{n:?} names a dropped parent");
            *children.entry(*p).or_default() += 1;
        }
        assert!(
            id == ROOT_ID || node.lookups > 0 || node.children > 0,
            "unreferenced node {id} kept"
        );
    }
    for ((p, n), id) in &fs.by_name {
        assert!(fs.nodes[id].names.contains(&(*p, n.clone())), "{n:?}");
    }
    for (id, node) in &fs.nodes {
        assert_eq!(
            node.children,
            children.get(id).copied().unwrap_or(0),
            "children of {id}"
        );
    }
}

fn ctx() -> Context {
    // SAFETY: no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    Context { uid, gid, pid: 1 }
}

fn c(name: &str) -> CString {
    CString::new(name).unwrap()
}

fn err(result: io::Result<impl std::fmt::Debug>) -> i32 {
    result.unwrap_err().raw_os_error().unwrap()
}

fn lookup(fs: &mut Overlay, parent: u64, name: &str) -> io::Result<Entry> {
    fs.lookup(ctx(), parent, &c(name))
}

/// Resolves a slash-separated path from the root.
fn walk(fs: &mut Overlay, path: &str) -> io::Result<Entry> {
    let mut entry = None;
    let mut parent = ROOT_ID;
    for part in path.split('/') {
        let e = lookup(fs, parent, part)?;
        parent = e.attr.ino;
        entry = Some(e);
    }
    entry.ok_or_else(|| errno(libc::ENOENT))
}

fn read_all(fs: &mut Overlay, ino: u64) -> Vec<u8> {
    let (h, _) = fs.open(ctx(), ino, libc::O_RDONLY as u32).unwrap();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        let n = fs.read(ino, h, out.len() as u64, &mut buf).unwrap();
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    fs.release(ino, h).unwrap();
    out
}

fn write_at(fs: &mut Overlay, ino: u64, flags: i32, offset: u64, data: &[u8]) {
    let (h, _) = fs.open(ctx(), ino, flags as u32).unwrap();
    assert_eq!(fs.write(ctx(), ino, h, offset, data, 0).unwrap(), data.len());
    fs.release(ino, h).unwrap();
}

/// Creates an empty file `name` (mode 0644) in `parent`, closed again.
fn create_file(fs: &mut Overlay, parent: u64, name: &str) -> Entry {
    let (entry, h, _) = fs
        .create(ctx(), parent, &c(name), libc::S_IFREG | 0o644, libc::O_RDWR as u32, 0)
        .unwrap();
    fs.release(entry.attr.ino, h).unwrap();
    entry
}

fn list(fs: &mut Overlay, ino: u64) -> Vec<String> {
    let (h, _) = fs.opendir(ctx(), ino, 0).unwrap();
    let mut names = Vec::new();
    fs.readdir(ctx(), ino, h, 0, &mut |e| {
        names.push(String::from_utf8(e.name.to_vec()).unwrap());
        true
    })
    .unwrap();
    fs.releasedir(ino, h).unwrap();
    names.retain(|n| n != "." && n != "..");
    names.sort();
    names
}

fn fixture(lower: &Path) {
    std::fs::write(lower.join("a.txt"), b"alpha").unwrap();
    std::fs::create_dir_all(lower.join("dir/sub")).unwrap();
    std::fs::write(lower.join("dir/b.txt"), b"beta").unwrap();
    std::fs::write(lower.join("dir/sub/c.txt"), b"gamma").unwrap();
    std::fs::create_dir(lower.join("empty")).unwrap();
    std::os::unix::fs::symlink("a.txt", lower.join("link")).unwrap();
    std::os::unix::fs::symlink("/etc", lower.join("etc_link")).unwrap();
    let x = lower.join("x.txt");
    std::fs::write(&x, b"xattr file").unwrap();
    let path = c(x.to_str().unwrap());
    // SAFETY: valid C strings and buffer.
    let ret = unsafe { libc::setxattr(path.as_ptr(), c"user.test".as_ptr(), b"v1".as_ptr().cast(), 2, 0) };
    assert_eq!(ret, 0, "the temp dir's file system needs user xattrs");
    std::fs::set_permissions(&x, std::fs::Permissions::from_mode(0o640)).unwrap();
    // Times in the past, so a stray access time update would show.
    let old = [
        libc::timespec {
            tv_sec: 1_000_000_000,
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: 1_000_000_000,
            tv_nsec: 0,
        },
    ];
    for p in [
        "a.txt",
        "dir/b.txt",
        "dir/sub/c.txt",
        "x.txt",
        "dir/sub",
        "dir",
        "empty",
    ] {
        let path = c(lower.join(p).to_str().unwrap());
        // SAFETY: valid pointers.
        assert_eq!(
            unsafe { libc::utimensat(libc::AT_FDCWD, path.as_ptr(), old.as_ptr(), 0) },
            0
        );
    }
}

fn upper_stat(env: &Env, rel: &str) -> Option<std::fs::Metadata> {
    std::fs::symlink_metadata(env.upper.join(rel)).ok()
}

fn upper_is_whiteout(env: &Env, rel: &str) -> bool {
    use std::os::unix::fs::FileTypeExt;
    upper_stat(env, rel).is_some_and(|md| md.file_type().is_char_device() && md.rdev() == 0)
}

fn upper_opaque(env: &Env, rel: &str) -> bool {
    let path = c(env.upper.join(rel).to_str().unwrap());
    let mut buf = [0u8; 8];
    // SAFETY: valid pointers and length.
    let n = unsafe { libc::lgetxattr(path.as_ptr(), OPAQUE_XATTR.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    n == 1 && buf[0] == b'y'
}

#[test]
fn create_write_read_append() {
    let env = Env::new(fixture);
    let mut fs = env.overlay();
    let (entry, h, _) = fs
        .create(
            ctx(),
            ROOT_ID,
            &c("new.txt"),
            libc::S_IFREG | 0o644,
            libc::O_RDWR as u32,
            0o022,
        )
        .unwrap();
    let ino = entry.attr.ino;
    assert_eq!(entry.attr.mode, libc::S_IFREG | 0o644);
    assert_eq!(fs.write(ctx(), ino, h, 0, b"hello", 0).unwrap(), 5);
    let mut buf = [0u8; 16];
    assert_eq!(fs.read(ino, h, 0, &mut buf).unwrap(), 5);
    assert_eq!(&buf[..5], b"hello");
    fs.release(ino, h).unwrap();
    write_at(&mut fs, ino, libc::O_WRONLY | libc::O_APPEND, 0, b" world");
    assert_eq!(read_all(&mut fs, ino), b"hello world");
    assert_eq!(std::fs::read(env.upper.join("new.txt")).unwrap(), b"hello world");
    // Appending to a lower file copies it up.
    let a = lookup(&mut fs, ROOT_ID, "a.txt").unwrap().attr.ino;
    write_at(&mut fs, a, libc::O_WRONLY | libc::O_APPEND, 5, b"+");
    assert_eq!(read_all(&mut fs, a), b"alpha+");
    assert_eq!(std::fs::read(env.upper.join("a.txt")).unwrap(), b"alpha+");
    // create of an existing name with O_EXCL
    assert_eq!(
        err(fs.create(
            ctx(),
            ROOT_ID,
            &c("a.txt"),
            0o644,
            (libc::O_RDWR | libc::O_EXCL) as u32,
            0
        )),
        libc::EEXIST
    );
    assert_eq!(fs.getattr(ctx(), a, None).unwrap().0.size, 6);
    check_tables(&fs);
    env.assert_lower_unchanged();
}

#[test]
fn rename_file_and_lower_dir() {
    let env = Env::new(fixture);
    let mut fs = env.overlay();
    let a = lookup(&mut fs, ROOT_ID, "a.txt").unwrap().attr.ino;
    fs.rename(ctx(), ROOT_ID, &c("a.txt"), ROOT_ID, &c("moved.txt"), 0)
        .unwrap();
    assert_eq!(err(lookup(&mut fs, ROOT_ID, "a.txt")), libc::ENOENT);
    assert!(upper_is_whiteout(&env, "a.txt"));
    let moved = lookup(&mut fs, ROOT_ID, "moved.txt").unwrap();
    assert_eq!(moved.attr.ino, a);
    assert_eq!(read_all(&mut fs, a), b"alpha");

    // A lower directory with contents moves whole.
    let dir = lookup(&mut fs, ROOT_ID, "dir").unwrap().attr.ino;
    let sub = lookup(&mut fs, dir, "sub").unwrap().attr.ino;
    let new_dir = fs.mkdir(ctx(), ROOT_ID, &c("target"), 0o755, 0).unwrap().attr.ino;
    fs.rename(ctx(), ROOT_ID, &c("dir"), new_dir, &c("dir2"), 0).unwrap();
    assert_eq!(err(lookup(&mut fs, ROOT_ID, "dir")), libc::ENOENT);
    assert!(upper_is_whiteout(&env, "dir"));
    assert!(upper_opaque(&env, "target/dir2"));
    assert_eq!(walk(&mut fs, "target/dir2").unwrap().attr.ino, dir);
    assert_eq!(list(&mut fs, dir), ["b.txt", "sub"]);
    assert_eq!(lookup(&mut fs, dir, "sub").unwrap().attr.ino, sub);
    let c_txt = walk(&mut fs, "target/dir2/sub/c.txt").unwrap().attr.ino;
    assert_eq!(read_all(&mut fs, c_txt), b"gamma");
    assert_eq!(
        std::fs::read(env.upper.join("target/dir2/sub/c.txt")).unwrap(),
        b"gamma"
    );
    assert!(!list(&mut fs, ROOT_ID).contains(&"dir".to_string()));
    // A new "dir" is a fresh, empty directory.
    let again = fs.mkdir(ctx(), ROOT_ID, &c("dir"), 0o755, 0).unwrap().attr.ino;
    assert_ne!(again, dir);
    assert!(list(&mut fs, again).is_empty());
    check_tables(&fs);
    env.assert_lower_unchanged();
}

#[test]
fn unlink_lower_file_leaves_whiteout() {
    let env = Env::new(fixture);
    let mut fs = env.overlay();
    let dir = lookup(&mut fs, ROOT_ID, "dir").unwrap().attr.ino;
    assert_eq!(list(&mut fs, dir), ["b.txt", "sub"]);
    fs.unlink(ctx(), dir, &c("b.txt")).unwrap();
    assert!(upper_is_whiteout(&env, "dir/b.txt"));
    assert_eq!(list(&mut fs, dir), ["sub"]);
    assert_eq!(err(lookup(&mut fs, dir, "b.txt")), libc::ENOENT);
    assert_eq!(err(fs.unlink(ctx(), dir, &c("b.txt"))), libc::ENOENT);
    assert_eq!(err(fs.unlink(ctx(), dir, &c("sub"))), libc::EISDIR);
    // Re-creating the name replaces the whiteout.
    let (e, h, _) = fs
        .create(ctx(), dir, &c("b.txt"), libc::S_IFREG | 0o600, libc::O_RDWR as u32, 0)
        .unwrap();
    fs.release(e.attr.ino, h).unwrap();
    assert_eq!(read_all(&mut fs, e.attr.ino), b"");
    // An upper-only file leaves nothing behind.
    fs.unlink(ctx(), dir, &c("b.txt")).unwrap();
    fs.create(ctx(), ROOT_ID, &c("tmp"), 0o644, 0, 0)
        .map(|(e, h, _)| fs.release(e.attr.ino, h))
        .unwrap()
        .unwrap();
    fs.unlink(ctx(), ROOT_ID, &c("tmp")).unwrap();
    assert!(upper_stat(&env, "tmp").is_none());
    check_tables(&fs);
    env.assert_lower_unchanged();
}

#[test]
fn rmdir_then_mkdir_is_opaque() {
    let env = Env::new(fixture);
    let mut fs = env.overlay();
    let dir = lookup(&mut fs, ROOT_ID, "dir").unwrap().attr.ino;
    assert_eq!(err(fs.rmdir(ctx(), ROOT_ID, &c("dir"))), libc::ENOTEMPTY);
    let sub = lookup(&mut fs, dir, "sub").unwrap().attr.ino;
    assert_eq!(err(fs.rmdir(ctx(), dir, &c("sub"))), libc::ENOTEMPTY);
    fs.unlink(ctx(), sub, &c("c.txt")).unwrap();
    fs.rmdir(ctx(), dir, &c("sub")).unwrap();
    fs.unlink(ctx(), dir, &c("b.txt")).unwrap();
    assert!(list(&mut fs, dir).is_empty());
    fs.rmdir(ctx(), ROOT_ID, &c("dir")).unwrap();
    assert!(upper_is_whiteout(&env, "dir"));
    assert_eq!(err(fs.rmdir(ctx(), ROOT_ID, &c("a.txt"))), libc::ENOTDIR);
    let again = fs.mkdir(ctx(), ROOT_ID, &c("dir"), 0o750, 0o022).unwrap();
    assert_eq!(again.attr.mode, libc::S_IFDIR | 0o750);
    assert!(upper_opaque(&env, "dir"));
    assert!(list(&mut fs, again.attr.ino).is_empty());
    assert_eq!(err(lookup(&mut fs, again.attr.ino, "b.txt")), libc::ENOENT);
    // The opaque attribute stays invisible to the guest.
    let names = fs.listxattr(ctx(), again.attr.ino).unwrap();
    assert!(!names.windows(8).any(|w| w == b"overlay."));
    assert_eq!(err(fs.getxattr(ctx(), again.attr.ino, OPAQUE_XATTR)), libc::ENODATA);
    assert_eq!(
        err(fs.setxattr(ctx(), again.attr.ino, c"user.overlay.opaque", b"n", 0)),
        libc::EPERM
    );
    assert_eq!(
        err(fs.removexattr(ctx(), again.attr.ino, c"trusted.overlay.x")),
        libc::ENODATA
    );
    // Empty lower directory: rmdir works directly.
    fs.rmdir(ctx(), ROOT_ID, &c("empty")).unwrap();
    assert!(upper_is_whiteout(&env, "empty"));
    check_tables(&fs);
    env.assert_lower_unchanged();
}

#[test]
fn mkdir_nested_and_symlinks() {
    let env = Env::new(fixture);
    let mut fs = env.overlay();
    let mut parent = lookup(&mut fs, ROOT_ID, "dir").unwrap().attr.ino;
    parent = lookup(&mut fs, parent, "sub").unwrap().attr.ino;
    for name in ["p", "q", "r"] {
        parent = fs.mkdir(ctx(), parent, &c(name), 0o755, 0).unwrap().attr.ino;
    }
    assert_eq!(err(fs.mkdir(ctx(), ROOT_ID, &c("dir"), 0o755, 0)), libc::EEXIST);
    assert!(std::fs::metadata(env.upper.join("dir/sub/p/q/r")).unwrap().is_dir());
    assert_eq!(walk(&mut fs, "dir/sub/p/q/r").unwrap().attr.ino, parent);
    // The copied-up parents are not opaque: lower content still shows.
    let sub = walk(&mut fs, "dir/sub").unwrap().attr.ino;
    assert_eq!(list(&mut fs, sub), ["c.txt", "p"]);
    let md = std::fs::metadata(env.upper.join("dir")).unwrap();
    assert_eq!(
        md.mode() & 0o7777,
        std::fs::metadata(env.lower.join("dir")).unwrap().mode() & 0o7777
    );

    let s = fs.symlink(ctx(), parent, &c("ln"), c"../../../c.txt").unwrap();
    assert_eq!(s.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(fs.readlink(ctx(), s.attr.ino).unwrap(), b"../../../c.txt");
    let lower_link = lookup(&mut fs, ROOT_ID, "link").unwrap().attr.ino;
    assert_eq!(fs.readlink(ctx(), lower_link).unwrap(), b"a.txt");
    assert_eq!(err(fs.readlink(ctx(), parent)), libc::EINVAL);
    check_tables(&fs);
    env.assert_lower_unchanged();
}

#[test]
fn hard_links() {
    let env = Env::new(fixture);
    let mut fs = env.overlay();
    let a = lookup(&mut fs, ROOT_ID, "a.txt").unwrap().attr.ino;
    let dir = lookup(&mut fs, ROOT_ID, "dir").unwrap().attr.ino;
    let linked = fs.link(ctx(), a, dir, &c("a-link")).unwrap();
    assert_eq!(linked.attr.ino, a);
    assert_eq!(linked.attr.nlink, 2);
    assert_eq!(fs.getattr(ctx(), a, None).unwrap().0.nlink, 2);
    assert_eq!(lookup(&mut fs, ROOT_ID, "a.txt").unwrap().attr.ino, a);
    write_at(&mut fs, a, libc::O_WRONLY, 0, b"ALPHA");
    let via_link = lookup(&mut fs, dir, "a-link").unwrap().attr.ino;
    assert_eq!(via_link, a);
    assert_eq!(read_all(&mut fs, via_link), b"ALPHA");
    let md1 = std::fs::metadata(env.upper.join("a.txt")).unwrap();
    let md2 = std::fs::metadata(env.upper.join("dir/a-link")).unwrap();
    assert_eq!(md1.ino(), md2.ino());
    // Removing one name keeps the node reachable through the other.
    fs.unlink(ctx(), ROOT_ID, &c("a.txt")).unwrap();
    assert_eq!(read_all(&mut fs, a), b"ALPHA");
    assert_eq!(fs.getattr(ctx(), a, None).unwrap().0.nlink, 1);
    assert_eq!(err(fs.link(ctx(), dir, ROOT_ID, &c("dirlink"))), libc::EPERM);
    check_tables(&fs);
    env.assert_lower_unchanged();
}

#[test]
fn setattr_copies_up_preserving() {
    let env = Env::new(fixture);
    let mut fs = env.overlay();
    let x = lookup(&mut fs, ROOT_ID, "x.txt").unwrap();
    let before = x.attr;
    let (attr, _) = fs
        .setattr(
            ctx(),
            x.attr.ino,
            SetAttr {
                mode: Some(0o600),
                ..SetAttr::default()
            },
        )
        .unwrap();
    assert_eq!(attr.mode, libc::S_IFREG | 0o600);
    assert_eq!(attr.ino, before.ino);
    assert_eq!((attr.mtime, attr.mtime_nsec), (before.mtime, before.mtime_nsec));
    let upper_md = std::fs::metadata(env.upper.join("x.txt")).unwrap();
    assert_eq!(upper_md.mtime(), 1_000_000_000);
    assert_eq!(upper_md.atime(), 1_000_000_000);
    assert_eq!(upper_md.mode() & 0o7777, 0o600);
    assert_eq!(std::fs::read(env.upper.join("x.txt")).unwrap(), b"xattr file");
    assert_eq!(fs.getxattr(ctx(), x.attr.ino, c"user.test").unwrap(), b"v1");
    // Lower metadata unaffected; listxattr shows the copied attribute.
    assert!(fs
        .listxattr(ctx(), x.attr.ino)
        .unwrap()
        .windows(9)
        .any(|w| w == b"user.test"));

    // truncate of a lower file
    let b = walk(&mut fs, "dir/b.txt").unwrap().attr.ino;
    let (attr, _) = fs
        .setattr(
            ctx(),
            b,
            SetAttr {
                size: Some(2),
                ..SetAttr::default()
            },
        )
        .unwrap();
    assert_eq!(attr.size, 2);
    assert_eq!(read_all(&mut fs, b), b"be");
    // utimens with Now and At
    let (attr, _) = fs
        .setattr(
            ctx(),
            b,
            SetAttr {
                atime: Some(SetTime::At(5, 6)),
                mtime: Some(SetTime::Now),
                ..SetAttr::default()
            },
        )
        .unwrap();
    assert_eq!((attr.atime, attr.atime_nsec), (5, 6));
    assert!(attr.mtime > 1_000_000_000);
    // setxattr on a lower file copies it up too
    let c_txt = walk(&mut fs, "dir/sub/c.txt").unwrap().attr.ino;
    fs.setxattr(ctx(), c_txt, c"user.new", b"n", 0).unwrap();
    assert_eq!(fs.getxattr(ctx(), c_txt, c"user.new").unwrap(), b"n");
    fs.removexattr(ctx(), c_txt, c"user.new").unwrap();
    assert_eq!(err(fs.getxattr(ctx(), c_txt, c"user.new")), libc::ENODATA);
    assert!(upper_stat(&env, "dir/sub/c.txt").is_some());
    // ftruncate through a handle, fallocate, lseek
    let (h, _) = fs.open(ctx(), c_txt, libc::O_RDWR as u32).unwrap();
    fs.setattr(
        ctx(),
        c_txt,
        SetAttr {
            size: Some(1 << 20),
            handle: Some(h),
            ..SetAttr::default()
        },
    )
    .unwrap();
    assert_eq!(fs.getattr(ctx(), c_txt, Some(h)).unwrap().0.size, 1 << 20);
    assert_eq!(fs.lseek(c_txt, h, 0, libc::SEEK_DATA as u32).unwrap(), 0);
    let hole = fs.lseek(c_txt, h, 0, libc::SEEK_HOLE as u32).unwrap();
    assert!(hole < 1 << 20);
    fs.fallocate(c_txt, h, 0, 0, 4 << 20).unwrap();
    assert_eq!(fs.getattr(ctx(), c_txt, Some(h)).unwrap().0.size, 4 << 20);
    fs.fsync(c_txt, h, true).unwrap();
    assert_eq!(fs.flush(c_txt, h).unwrap_err().raw_os_error(), Some(libc::ENOSYS));
    fs.release(c_txt, h).unwrap();
    fs.syncfs(ROOT_ID).unwrap();
    assert!(fs.statfs(ctx(), ROOT_ID).unwrap().blocks > 0);
    fs.access(ctx(), c_txt, libc::R_OK as u32).unwrap();
    check_tables(&fs);
    env.assert_lower_unchanged();
}

#[test]
fn sparse_copy_up_keeps_content() {
    let env = Env::new(|lower| {
        let f = File::create(lower.join("sparse")).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"tail", (8 << 20) - 4).unwrap();
    });
    let mut fs = env.overlay();
    let s = lookup(&mut fs, ROOT_ID, "sparse").unwrap().attr.ino;
    write_at(&mut fs, s, libc::O_WRONLY, 4096, b"mid");
    let data = std::fs::read(env.upper.join("sparse")).unwrap();
    assert_eq!(data.len(), 8 << 20);
    assert_eq!(&data[..4], b"head");
    assert_eq!(&data[4096..4099], b"mid");
    assert_eq!(&data[data.len() - 4..], b"tail");
    assert!(data[5000..(8 << 20) - 4].iter().all(|&b| b == 0));
    check_tables(&fs);
    env.assert_lower_unchanged();
}

#[test]
fn mknod_fifo_and_refused_devices() {
    let env = Env::new(fixture);
    let mut fs = env.overlay();
    let f = fs
        .mknod(ctx(), ROOT_ID, &c("fifo"), libc::S_IFIFO | 0o644, 0, 0o022)
        .unwrap();
    assert_eq!(f.attr.mode, libc::S_IFIFO | 0o644);
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::symlink_metadata(env.upper.join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    // Opening it through the overlay would block the VMM: refused.
    assert_eq!(err(fs.open(ctx(), f.attr.ino, libc::O_RDONLY as u32)), libc::EINVAL);
    let s = fs
        .mknod(ctx(), ROOT_ID, &c("sock"), libc::S_IFSOCK | 0o600, 0, 0)
        .unwrap();
    assert_eq!(s.attr.mode & libc::S_IFMT, libc::S_IFSOCK);
    assert_eq!(
        err(fs.mknod(ctx(), ROOT_ID, &c("dev"), libc::S_IFCHR | 0o600, 0x0101, 0)),
        libc::EPERM
    );
    assert_eq!(
        err(fs.mknod(ctx(), ROOT_ID, &c("blk"), libc::S_IFBLK | 0o600, 0x0101, 0)),
        libc::EPERM
    );
    assert!(list(&mut fs, ROOT_ID).contains(&"fifo".to_string()));
    check_tables(&fs);
    env.assert_lower_unchanged();
}

#[test]
fn merged_readdir_lists_each_name_once() {
    let env = Env::new(fixture);
    std::fs::create_dir(env.upper.join("dir")).unwrap();
    std::fs::write(env.upper.join("dir/b.txt"), b"upper beta").unwrap();
    std::fs::write(env.upper.join("dir/only-upper"), b"u").unwrap();
    let mut fs = env.overlay();
    let dir = lookup(&mut fs, ROOT_ID, "dir").unwrap().attr.ino;
    assert_eq!(list(&mut fs, dir), ["b.txt", "only-upper", "sub"]);
    let b = lookup(&mut fs, dir, "b.txt").unwrap().attr.ino;
    assert_eq!(read_all(&mut fs, b), b"upper beta");
    // Reading a lower file leaves its access time alone.
    let sub = lookup(&mut fs, dir, "sub").unwrap().attr.ino;
    let c_txt = lookup(&mut fs, sub, "c.txt").unwrap().attr.ino;
    assert_eq!(read_all(&mut fs, c_txt), b"gamma");
    let root = list(&mut fs, ROOT_ID);
    assert_eq!(root, ["a.txt", "dir", "empty", "etc_link", "link", "x.txt"]);
    // "." and ".." and inode numbers agree with lookup
    let (h, _) = fs.opendir(ctx(), dir, 0).unwrap();
    let mut seen = Vec::new();
    fs.readdir(ctx(), dir, h, 0, &mut |e| {
        seen.push((String::from_utf8(e.name.to_vec()).unwrap(), e.ino, e.kind));
        true
    })
    .unwrap();
    fs.releasedir(dir, h).unwrap();
    let inode = |fs: &mut Overlay, ino| fs.getattr(ctx(), ino, None).unwrap().0.inode();
    assert_eq!(seen[0], (".".to_string(), inode(&mut fs, dir), libc::DT_DIR as u32));
    assert_eq!(
        seen[1],
        ("..".to_string(), inode(&mut fs, ROOT_ID), libc::DT_DIR as u32)
    );
    for (name, ino, _) in &seen[2..] {
        assert_eq!(lookup(&mut fs, dir, name).unwrap().attr.inode(), *ino, "{name}");
    }
    // readdirplus counts only what the callback accepted
    let (h, _) = fs.opendir(ctx(), dir, 0).unwrap();
    let mut taken = Vec::new();
    fs.readdirplus(ctx(), dir, h, 0, &mut |e, entry| {
        if taken.len() == 3 {
            return false;
        }
        assert_eq!(e.ino, entry.attr.inode());
        taken.push((String::from_utf8(e.name.to_vec()).unwrap(), e.next_offset));
        true
    })
    .unwrap();
    assert_eq!(taken.len(), 3);
    let next = taken[2].1;
    let mut rest = Vec::new();
    fs.readdirplus(ctx(), dir, h, next, &mut |e, _| {
        rest.push(String::from_utf8(e.name.to_vec()).unwrap());
        true
    })
    .unwrap();
    fs.releasedir(dir, h).unwrap();
    assert_eq!(taken.len() + rest.len(), 5);
    check_tables(&fs);
    env.assert_lower_unchanged();
}

#[test]
fn large_directory_in_chunks() {
    const N: usize = 10_000;
    let env = Env::new(|lower| {
        std::fs::create_dir(lower.join("big")).unwrap();
        for i in 0..N {
            std::fs::write(lower.join(format!("big/f{i:05}")), b"").unwrap();
        }
    });
    let mut fs = env.overlay();
    let big = lookup(&mut fs, ROOT_ID, "big").unwrap().attr.ino;
    fs.unlink(ctx(), big, &c("f00007")).unwrap();
    fs.create(ctx(), big, &c("zz-upper"), 0o644, 0, 0)
        .map(|(e, h, _)| fs.release(e.attr.ino, h))
        .unwrap()
        .unwrap();
    let (h, _) = fs.opendir(ctx(), big, 0).unwrap();
    let mut names = HashSet::new();
    let mut offset = 0;
    let mut calls = 0;
    loop {
        let mut got = 0;
        let mut last = offset;
        fs.readdir(ctx(), big, h, offset, &mut |e| {
            if got == 97 {
                return false;
            }
            got += 1;
            last = e.next_offset;
            assert!(names.insert(String::from_utf8(e.name.to_vec()).unwrap()), "duplicate");
            true
        })
        .unwrap();
        calls += 1;
        if got == 0 {
            break;
        }
        offset = last;
    }
    fs.releasedir(big, h).unwrap();
    assert!(calls > 100);
    assert_eq!(names.len(), N + 2);
    assert!(names.contains("zz-upper") && !names.contains("f00007") && names.contains("f09999"));
    check_tables(&fs);
    env.assert_lower_unchanged();
}

#[test]
fn inode_numbers_are_stable() {
    let env = Env::new(fixture);
    let mut fs = env.overlay();
    let dir = lookup(&mut fs, ROOT_ID, "dir").unwrap().attr.ino;
    let b = lookup(&mut fs, dir, "b.txt").unwrap().attr.ino;
    let sub = lookup(&mut fs, dir, "sub").unwrap().attr.ino;
    fs.forget(b, 1);
    fs.forget(sub, 1);
    fs.forget(dir, 1);
    assert!(fs.nodes.len() == 1, "every node but the root dropped");
    assert_eq!(err(fs.getattr(ctx(), b, None)), libc::ENOENT);
    let dir2 = lookup(&mut fs, ROOT_ID, "dir").unwrap().attr.ino;
    assert_eq!(dir2, dir);
    assert_eq!(lookup(&mut fs, dir, "b.txt").unwrap().attr.ino, b);
    // copy-up keeps the number; so does a later forget and lookup
    write_at(&mut fs, b, libc::O_WRONLY, 0, b"B");
    assert!(upper_stat(&env, "dir/b.txt").is_some());
    assert_eq!(fs.getattr(ctx(), b, None).unwrap().0.ino, b);
    fs.forget(b, 2);
    fs.forget(dir, 2);
    assert_eq!(walk(&mut fs, "dir/b.txt").unwrap().attr.ino, b);
    assert_eq!(walk(&mut fs, "dir/sub").unwrap().attr.ino, sub);
    // destroy drops everything; numbers survive
    fs.destroy();
    assert_eq!(fs.nodes.len(), 1);
    assert_eq!(walk(&mut fs, "dir/b.txt").unwrap().attr.ino, b);
    assert_eq!(fs.getattr(ctx(), ROOT_ID, None).unwrap().0.ino, ROOT_ID);
    check_tables(&fs);
    env.assert_lower_unchanged();
}

#[test]
fn rename_noreplace_and_exchange() {
    let env = Env::new(fixture);
    let mut fs = env.overlay();
    let a = lookup(&mut fs, ROOT_ID, "a.txt").unwrap().attr.ino;
    let x = lookup(&mut fs, ROOT_ID, "x.txt").unwrap().attr.ino;
    assert_eq!(
        err(fs.rename(
            ctx(),
            ROOT_ID,
            &c("a.txt"),
            ROOT_ID,
            &c("x.txt"),
            libc::RENAME_NOREPLACE
        )),
        libc::EEXIST
    );
    fs.rename(
        ctx(),
        ROOT_ID,
        &c("a.txt"),
        ROOT_ID,
        &c("fresh"),
        libc::RENAME_NOREPLACE,
    )
    .unwrap();
    assert!(upper_is_whiteout(&env, "a.txt"));
    assert_eq!(
        err(fs.rename(ctx(), ROOT_ID, &c("nope"), ROOT_ID, &c("x"), libc::RENAME_EXCHANGE)),
        libc::ENOENT
    );
    assert_eq!(
        err(fs.rename(
            ctx(),
            ROOT_ID,
            &c("fresh"),
            ROOT_ID,
            &c("absent"),
            libc::RENAME_EXCHANGE
        )),
        libc::ENOENT
    );
    fs.rename(ctx(), ROOT_ID, &c("fresh"), ROOT_ID, &c("x.txt"), libc::RENAME_EXCHANGE)
        .unwrap();
    assert_eq!(lookup(&mut fs, ROOT_ID, "x.txt").unwrap().attr.ino, a);
    assert_eq!(lookup(&mut fs, ROOT_ID, "fresh").unwrap().attr.ino, x);
    assert_eq!(read_all(&mut fs, a), b"alpha");
    assert_eq!(read_all(&mut fs, x), b"xattr file");
    // exchange a lower directory with a file
    let dir = lookup(&mut fs, ROOT_ID, "dir").unwrap().attr.ino;
    fs.rename(ctx(), ROOT_ID, &c("dir"), ROOT_ID, &c("fresh"), libc::RENAME_EXCHANGE)
        .unwrap();
    assert_eq!(lookup(&mut fs, ROOT_ID, "fresh").unwrap().attr.ino, dir);
    assert_eq!(lookup(&mut fs, ROOT_ID, "dir").unwrap().attr.ino, x);
    assert_eq!(list(&mut fs, dir), ["b.txt", "sub"]);
    assert!(upper_opaque(&env, "fresh"));
    // Plain rename over a file; a dir over a non-empty dir is refused.
    fs.rename(ctx(), ROOT_ID, &c("x.txt"), ROOT_ID, &c("dir"), 0).unwrap();
    assert_eq!(lookup(&mut fs, ROOT_ID, "dir").unwrap().attr.ino, a);
    assert_eq!(
        err(fs.rename(ctx(), ROOT_ID, &c("empty"), ROOT_ID, &c("fresh"), 0)),
        libc::ENOTEMPTY
    );
    assert_eq!(
        err(fs.rename(ctx(), ROOT_ID, &c("empty"), ROOT_ID, &c("dir"), 0)),
        libc::ENOTDIR
    );
    assert_eq!(
        err(fs.rename(ctx(), ROOT_ID, &c("dir"), ROOT_ID, &c("empty"), 0)),
        libc::EISDIR
    );
    // A directory into its own subtree
    let sub = walk(&mut fs, "fresh/sub").unwrap().attr.ino;
    assert_eq!(
        err(fs.rename(ctx(), ROOT_ID, &c("fresh"), sub, &c("loop"), 0)),
        libc::EINVAL
    );
    assert_eq!(
        err(fs.rename(ctx(), ROOT_ID, &c("a"), ROOT_ID, &c("b"), 4)),
        libc::EINVAL
    );
    check_tables(&fs);
    env.assert_lower_unchanged();
}

#[test]
fn unlinked_open_file_stays_usable() {
    let env = Env::new(fixture);
    let mut fs = env.overlay();
    let (e, h, _) = fs
        .create(ctx(), ROOT_ID, &c("t"), 0o644, libc::O_RDWR as u32, 0)
        .unwrap();
    let ino = e.attr.ino;
    fs.write(ctx(), ino, h, 0, b"data", 0).unwrap();
    fs.unlink(ctx(), ROOT_ID, &c("t")).unwrap();
    let mut buf = [0u8; 4];
    assert_eq!(fs.read(ino, h, 0, &mut buf).unwrap(), 4);
    assert_eq!(fs.getattr(ctx(), ino, Some(h)).unwrap().0.nlink, 0);
    assert_eq!(fs.getattr(ctx(), ino, None).unwrap().0.size, 4);
    fs.setattr(
        ctx(),
        ino,
        SetAttr {
            size: Some(1),
            handle: Some(h),
            ..SetAttr::default()
        },
    )
    .unwrap();
    assert_eq!(fs.getattr(ctx(), ino, Some(h)).unwrap().0.size, 1);
    fs.release(ino, h).unwrap();
    fs.forget(ino, 1);
    assert_eq!(err(fs.getattr(ctx(), ino, None)), libc::ENOENT);
    check_tables(&fs);
    env.assert_lower_unchanged();
}

#[test]
fn copy_file_range_between_handles() {
    let env = Env::new(fixture);
    let mut fs = env.overlay();
    let a = lookup(&mut fs, ROOT_ID, "a.txt").unwrap().attr.ino;
    let (src, _) = fs.open(ctx(), a, libc::O_RDONLY as u32).unwrap();
    let (e, dst, _) = fs
        .create(ctx(), ROOT_ID, &c("copy"), 0o644, libc::O_RDWR as u32, 0)
        .unwrap();
    assert_eq!(fs.copy_file_range(a, src, 1, e.attr.ino, dst, 0, 100, 0).unwrap(), 4);
    fs.release(a, src).unwrap();
    fs.release(e.attr.ino, dst).unwrap();
    assert_eq!(read_all(&mut fs, e.attr.ino), b"lpha");
    check_tables(&fs);
    env.assert_lower_unchanged();
}

#[test]
fn hostile_inputs_fail_without_escaping() {
    let env = Env::new(fixture);
    let mut fs = env.overlay();
    for bogus in [0, 2, 999, u64::MAX] {
        assert!(fs.getattr(ctx(), bogus, None).is_err());
        assert!(lookup(&mut fs, bogus, "a.txt").is_err());
        assert!(fs.opendir(ctx(), bogus, 0).is_err());
        assert!(fs.open(ctx(), bogus, 0).is_err());
        assert!(fs
            .setattr(
                ctx(),
                bogus,
                SetAttr {
                    mode: Some(0o777),
                    ..SetAttr::default()
                }
            )
            .is_err());
        assert!(fs.mkdir(ctx(), bogus, &c("m"), 0o755, 0).is_err());
        assert!(fs.read(ROOT_ID, bogus, 0, &mut [0u8; 4]).is_err());
        assert!(fs.write(ctx(), ROOT_ID, bogus, 0, b"x", 0).is_err());
        assert!(fs.release(ROOT_ID, bogus).is_err());
        assert!(fs.releasedir(ROOT_ID, bogus).is_err());
        assert!(fs.readdir(ctx(), ROOT_ID, bogus, 0, &mut |_| true).is_err());
        assert!(fs.fsync(ROOT_ID, bogus, false).is_err());
        assert!(fs.lseek(ROOT_ID, bogus, 0, 0).is_err());
        fs.forget(bogus, 5);
    }
    for name in ["..", ".", "a/b", ""] {
        assert_eq!(err(lookup(&mut fs, ROOT_ID, name)), libc::EINVAL);
    }
    // A released handle is gone.
    let a = lookup(&mut fs, ROOT_ID, "a.txt").unwrap().attr.ino;
    let (h, _) = fs.open(ctx(), a, 0).unwrap();
    fs.release(a, h).unwrap();
    assert_eq!(err(fs.read(a, h, 0, &mut [0u8; 4])), libc::EBADF);
    assert_eq!(err(fs.release(a, h)), libc::EBADF);
    // Handles of the other kind are refused.
    let (dh, _) = fs.opendir(ctx(), ROOT_ID, 0).unwrap();
    assert_eq!(err(fs.read(ROOT_ID, dh, 0, &mut [0u8; 4])), libc::EBADF);
    assert_eq!(err(fs.release(ROOT_ID, dh)), libc::EBADF);
    fs.releasedir(ROOT_ID, dh).unwrap();
    // A symlink is no directory, whatever it points to.
    let etc = lookup(&mut fs, ROOT_ID, "etc_link").unwrap().attr.ino;
    assert_eq!(err(lookup(&mut fs, etc, "passwd")), libc::ENOTDIR);
    assert!(fs.opendir(ctx(), etc, 0).is_err());
    assert!(fs.open(ctx(), etc, 0).is_err());
    assert!(fs.create(ctx(), etc, &c("evil"), 0o644, 0, 0).is_err());
    assert!(fs.mkdir(ctx(), etc, &c("evil"), 0o755, 0).is_err());
    assert!(fs.symlink(ctx(), etc, &c("evil"), c"x").is_err());
    assert!(fs.rename(ctx(), ROOT_ID, &c("a.txt"), etc, &c("evil"), 0).is_err());
    assert!(fs.link(ctx(), a, etc, &c("evil")).is_err());
    assert!(fs.unlink(ctx(), etc, &c("passwd")).is_err());
    let link = lookup(&mut fs, ROOT_ID, "link").unwrap().attr.ino;
    assert!(fs.open(ctx(), link, 0).is_err());
    assert!(lookup(&mut fs, link, "x").is_err());
    // setattr of a symlink changes the link, never /etc
    fs.setattr(
        ctx(),
        etc,
        SetAttr {
            mtime: Some(SetTime::At(7, 0)),
            ..SetAttr::default()
        },
    )
    .unwrap();
    assert_eq!(
        std::fs::symlink_metadata(env.upper.join("etc_link")).unwrap().mtime(),
        7
    );
    assert!(std::fs::metadata("/etc").unwrap().mtime() != 7);
    assert!(!Path::new("/etc/evil").exists());
    // An upper-layer symlink swapped in for a directory never gets followed.
    let dir = lookup(&mut fs, ROOT_ID, "dir").unwrap().attr.ino;
    std::fs::create_dir(env.upper.join("dir")).unwrap();
    std::fs::remove_dir(env.upper.join("dir")).unwrap();
    std::os::unix::fs::symlink("/etc", env.upper.join("dir")).unwrap();
    assert!(lookup(&mut fs, dir, "passwd").is_err());
    assert!(fs.create(ctx(), dir, &c("evil"), 0o644, 0, 0).is_err());
    assert!(!Path::new("/etc/evil").exists());
    std::fs::remove_file(env.upper.join("dir")).unwrap();
    check_tables(&fs);
    env.assert_lower_unchanged();
}

fn proc_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn handles_do_not_leak() {
    const N: usize = 20_000;
    let env = Env::new(fixture);
    let mut fs = env.overlay();
    let base_fds = fs.open_fds();
    let base_proc = proc_fds();
    let dir = fs.mkdir(ctx(), ROOT_ID, &c("many"), 0o755, 0).unwrap().attr.ino;
    for i in 0..N {
        let (e, h, _) = fs
            .create(ctx(), dir, &c(&format!("f{i}")), 0o644, libc::O_RDWR as u32, 0)
            .unwrap();
        fs.write(ctx(), e.attr.ino, h, 0, b"x", 0).unwrap();
        fs.release(e.attr.ino, h).unwrap();
        let (h, _) = fs.open(ctx(), e.attr.ino, libc::O_RDONLY as u32).unwrap();
        fs.release(e.attr.ino, h).unwrap();
        fs.forget(e.attr.ino, 1);
    }
    let (h, _) = fs.opendir(ctx(), dir, 0).unwrap();
    let mut plus = 0;
    fs.readdirplus(ctx(), dir, h, 0, &mut |_, _| {
        plus += 1;
        true
    })
    .unwrap();
    fs.releasedir(dir, h).unwrap();
    assert_eq!(plus, N + 2);
    assert!(fs.nodes.len() > N);
    // readdirplus counted one lookup per real entry: forget them all.
    let ids: Vec<u64> = fs
        .nodes
        .keys()
        .copied()
        .filter(|&id| id != ROOT_ID && id != dir)
        .collect();
    for id in ids {
        fs.forget(id, 1);
    }
    fs.forget(dir, 1);
    assert_eq!(fs.nodes.len(), 1);
    assert!(fs.by_name.is_empty());
    assert_eq!(fs.open_fds(), base_fds);
    assert!(fs.handles.is_empty());
    // Other tests run in parallel threads and hold a few descriptors.
    assert!(
        proc_fds() < base_proc + 64,
        "{} descriptors now, {base_proc} before",
        proc_fds()
    );
    check_tables(&fs);
    env.assert_lower_unchanged();
}

#[test]
fn handle_cap_answers_emfile() {
    let env = Env::new(fixture);
    let mut fs = env.overlay();
    let (h, _) = fs.opendir(ctx(), ROOT_ID, 0).unwrap();
    // Fill the table with cheap directory handles (they hold no descriptor).
    let entries = match fs.handles.get(&h) {
        Some(Handle::Dir { entries, .. }) => entries.len(),
        _ => unreachable!(),
    };
    assert!(entries > 2);
    for _ in 1..MAX_HANDLES {
        fs.add_handle(Handle::Dir {
            ino: ROOT_ID,
            entries: Vec::new(),
        })
        .unwrap();
    }
    assert_eq!(err(fs.opendir(ctx(), ROOT_ID, 0)), libc::EMFILE);
    let a = lookup(&mut fs, ROOT_ID, "a.txt").unwrap().attr.ino;
    assert_eq!(err(fs.open(ctx(), a, 0)), libc::EMFILE);
    assert_eq!(err(fs.create(ctx(), ROOT_ID, &c("n"), 0o644, 0, 0)), libc::EMFILE);
    fs.releasedir(ROOT_ID, h).unwrap();
    let (h, _) = fs.open(ctx(), a, 0).unwrap();
    fs.release(a, h).unwrap();
}

#[test]
fn no_lower_layer_is_a_passthrough() {
    let env = Env::new(|_| {});
    let mut fs = Overlay::new(None, &env.upper, OverlayOptions::default()).unwrap();
    assert_eq!(fs.open_fds(), 1);
    let d = fs.mkdir(ctx(), ROOT_ID, &c("d"), 0o755, 0).unwrap().attr.ino;
    let (e, h, _) = fs.create(ctx(), d, &c("f"), 0o644, libc::O_RDWR as u32, 0).unwrap();
    fs.write(ctx(), e.attr.ino, h, 0, b"p", 0).unwrap();
    fs.release(e.attr.ino, h).unwrap();
    fs.unlink(ctx(), d, &c("f")).unwrap();
    fs.rmdir(ctx(), ROOT_ID, &c("d")).unwrap();
    assert_eq!(std::fs::read_dir(&env.upper).unwrap().count(), 0);
    let missing = env.dir.join("missing");
    let e = Overlay::new(None, &missing, OverlayOptions::default()).err().unwrap();
    assert!(e.to_string().contains("missing"), "{e}");
}

#[test]
fn new_entries_belong_to_the_requester() {
    let env = Env::new(fixture);
    let mut fs = env.overlay();
    if !fs.as_root {
        return; // only root may give files away
    }
    let guest = Context {
        uid: 1234,
        gid: 4321,
        pid: 7,
    };
    let d = fs.mkdir(guest, ROOT_ID, &c("d"), 0o755, 0).unwrap();
    assert_eq!((d.attr.uid, d.attr.gid), (1234, 4321));
    let (f, h, _) = fs
        .create(guest, d.attr.ino, &c("f"), 0o640, libc::O_WRONLY as u32, 0)
        .unwrap();
    fs.release(f.attr.ino, h).unwrap();
    let s = fs.symlink(guest, d.attr.ino, &c("s"), c"f").unwrap();
    let n = fs
        .mknod(guest, d.attr.ino, &c("p"), libc::S_IFIFO | 0o600, 0, 0)
        .unwrap();
    for e in [f, s, n] {
        assert_eq!((e.attr.uid, e.attr.gid), (1234, 4321));
    }
    let md = std::fs::symlink_metadata(env.upper.join("d/s")).unwrap();
    assert_eq!((md.uid(), md.gid()), (1234, 4321));
    // Copy-up keeps the lower owner.
    let lower_md = std::fs::metadata(env.lower.join("a.txt")).unwrap();
    let a = lookup(&mut fs, ROOT_ID, "a.txt").unwrap().attr.ino;
    write_at(&mut fs, a, libc::O_WRONLY, 0, b"A");
    let upper_md = std::fs::metadata(env.upper.join("a.txt")).unwrap();
    assert_eq!((upper_md.uid(), upper_md.gid()), (lower_md.uid(), lower_md.gid()));
    // An unprivileged writer loses set-id bits.
    fs.setattr(
        ctx(),
        a,
        SetAttr {
            mode: Some(0o6755),
            ..SetAttr::default()
        },
    )
    .unwrap();
    let (h, _) = fs.open(ctx(), a, libc::O_WRONLY as u32).unwrap();
    fs.write(guest, a, h, 0, b"a", WRITE_KILL_SUIDGID).unwrap();
    fs.release(a, h).unwrap();
    assert_eq!(fs.getattr(ctx(), a, None).unwrap().0.mode & 0o7777, 0o755);
    check_tables(&fs);
    env.assert_lower_unchanged();
}

#[test]
fn nested_layers_are_refused() {
    let env = Env::new(|_| {});
    let inner = env.lower.join("upper-inside");
    std::fs::create_dir(&inner).unwrap();
    let e = Overlay::new(Some(&env.lower), &inner, OverlayOptions::default())
        .err()
        .unwrap();
    assert!(matches!(e, crate::Error::LayersNested { .. }), "{e}");
    let e = Overlay::new(Some(&inner), &env.lower, OverlayOptions::default())
        .err()
        .unwrap();
    assert!(matches!(e, crate::Error::LayersNested { .. }), "{e}");
}

#[test]
fn copy_up_keeps_directory_times() {
    let env = Env::new(fixture);
    let mut fs = env.overlay();
    let c_txt = walk(&mut fs, "dir/sub/c.txt").unwrap().attr.ino;
    write_at(&mut fs, c_txt, libc::O_WRONLY, 0, b"G");
    for d in ["dir", "dir/sub"] {
        let md = std::fs::metadata(env.upper.join(d)).unwrap();
        assert_eq!(md.mtime(), 1_000_000_000, "{d}");
    }
    // A deep copy-up (rename of a merged directory) keeps them as well.
    let env = Env::new(fixture);
    let mut fs = env.overlay();
    let dir = lookup(&mut fs, ROOT_ID, "dir").unwrap().attr.ino;
    let sub = lookup(&mut fs, dir, "sub").unwrap().attr.ino;
    let c_txt = lookup(&mut fs, sub, "c.txt").unwrap().attr.ino;
    fs.rename(ctx(), ROOT_ID, &c("dir"), ROOT_ID, &c("moved"), 0).unwrap();
    let md = std::fs::metadata(env.upper.join("moved/sub")).unwrap();
    assert_eq!(md.mtime(), 1_000_000_000);
    assert_eq!(walk(&mut fs, "moved/sub/c.txt").unwrap().attr.ino, c_txt);
    assert_eq!(fs.getattr(ctx(), sub, None).unwrap().0.mtime, 1_000_000_000);
    check_tables(&fs);
    env.assert_lower_unchanged();
}

#[test]
fn lower_hard_links_are_separate_after_copy_up() {
    let env = Env::new(|lower| {
        std::fs::write(lower.join("one"), b"shared").unwrap();
        std::fs::hard_link(lower.join("one"), lower.join("two")).unwrap();
    });
    let mut fs = env.overlay();
    let one = lookup(&mut fs, ROOT_ID, "one").unwrap().attr.ino;
    let two = lookup(&mut fs, ROOT_ID, "two").unwrap().attr.ino;
    assert_ne!(one, two);
    write_at(&mut fs, one, libc::O_WRONLY, 0, b"SHARED");
    assert_eq!(read_all(&mut fs, one), b"SHARED");
    assert_eq!(read_all(&mut fs, two), b"shared");
    fs.forget(one, 1);
    fs.forget(two, 1);
    assert_eq!(lookup(&mut fs, ROOT_ID, "one").unwrap().attr.ino, one);
    assert_eq!(lookup(&mut fs, ROOT_ID, "two").unwrap().attr.ino, two);
    check_tables(&fs);
    env.assert_lower_unchanged();
}

#[test]
fn new_entries_take_the_place_of_whiteouts() {
    let env = Env::new(fixture);
    let mut fs = env.overlay();
    fs.unlink(ctx(), ROOT_ID, &c("a.txt")).unwrap();
    let s = fs.symlink(ctx(), ROOT_ID, &c("a.txt"), c"x.txt").unwrap();
    assert_eq!(fs.readlink(ctx(), s.attr.ino).unwrap(), b"x.txt");
    assert!(std::fs::symlink_metadata(env.upper.join("a.txt"))
        .unwrap()
        .file_type()
        .is_symlink());

    fs.unlink(ctx(), ROOT_ID, &c("x.txt")).unwrap();
    let b = walk(&mut fs, "dir/b.txt").unwrap().attr.ino;
    assert_eq!(fs.link(ctx(), b, ROOT_ID, &c("x.txt")).unwrap().attr.ino, b);
    let x = lookup(&mut fs, ROOT_ID, "x.txt").unwrap().attr.ino;
    assert_eq!(read_all(&mut fs, x), b"beta");

    fs.unlink(ctx(), ROOT_ID, &c("link")).unwrap();
    let f = fs
        .mknod(ctx(), ROOT_ID, &c("link"), libc::S_IFIFO | 0o600, 0, 0)
        .unwrap();
    assert_eq!(f.attr.mode & libc::S_IFMT, libc::S_IFIFO);

    // A new directory renamed onto a deleted lower directory's whiteout.
    fs.rmdir(ctx(), ROOT_ID, &c("empty")).unwrap();
    let d = fs.mkdir(ctx(), ROOT_ID, &c("newd"), 0o755, 0).unwrap().attr.ino;
    fs.rename(ctx(), ROOT_ID, &c("newd"), ROOT_ID, &c("empty"), libc::RENAME_NOREPLACE)
        .unwrap();
    assert_eq!(lookup(&mut fs, ROOT_ID, "empty").unwrap().attr.ino, d);
    assert!(upper_opaque(&env, "empty"));
    assert!(upper_stat(&env, "newd").is_none());
    // A lower directory with contents renamed onto a whiteout.
    fs.rmdir(ctx(), ROOT_ID, &c("empty")).unwrap();
    assert!(upper_is_whiteout(&env, "empty"));
    let dir = lookup(&mut fs, ROOT_ID, "dir").unwrap().attr.ino;
    fs.rename(ctx(), ROOT_ID, &c("dir"), ROOT_ID, &c("empty"), 0).unwrap();
    assert_eq!(lookup(&mut fs, ROOT_ID, "empty").unwrap().attr.ino, dir);
    assert_eq!(list(&mut fs, dir), ["b.txt", "sub"]);
    assert!(upper_is_whiteout(&env, "dir"));
    assert!(upper_opaque(&env, "empty"));
    // A file renamed onto a whiteout, with NOREPLACE.
    let (e, h, _) = fs.create(ctx(), ROOT_ID, &c("new"), 0o644, 0, 0).unwrap();
    fs.release(e.attr.ino, h).unwrap();
    fs.rename(ctx(), ROOT_ID, &c("new"), ROOT_ID, &c("dir"), libc::RENAME_NOREPLACE)
        .unwrap();
    assert_eq!(lookup(&mut fs, ROOT_ID, "dir").unwrap().attr.ino, e.attr.ino);
    assert_eq!(
        list(&mut fs, ROOT_ID),
        ["a.txt", "dir", "empty", "etc_link", "link", "x.txt"]
    );
    check_tables(&fs);
    env.assert_lower_unchanged();
}

#[test]
fn truncating_opens_copy_no_data() {
    let env = Env::new(fixture);
    let mut fs = env.overlay();
    let a = lookup(&mut fs, ROOT_ID, "a.txt").unwrap().attr.ino;
    let (h, _) = fs.open(ctx(), a, (libc::O_WRONLY | libc::O_TRUNC) as u32).unwrap();
    assert_eq!(fs.getattr(ctx(), a, Some(h)).unwrap().0.size, 0);
    fs.write(ctx(), a, h, 0, b"new", 0).unwrap();
    fs.release(a, h).unwrap();
    assert_eq!(read_all(&mut fs, a), b"new");
    // truncate to a smaller size keeps just that much
    let b = walk(&mut fs, "dir/b.txt").unwrap().attr.ino;
    fs.setattr(
        ctx(),
        b,
        SetAttr {
            size: Some(3),
            ..SetAttr::default()
        },
    )
    .unwrap();
    assert_eq!(read_all(&mut fs, b), b"bet");
    // and to a larger one extends with zeros
    let c_txt = walk(&mut fs, "dir/sub/c.txt").unwrap().attr.ino;
    fs.setattr(
        ctx(),
        c_txt,
        SetAttr {
            size: Some(8),
            ..SetAttr::default()
        },
    )
    .unwrap();
    assert_eq!(read_all(&mut fs, c_txt), b"gamma\0\0\0");
    check_tables(&fs);
    env.assert_lower_unchanged();
}

#[test]
fn read_handles_follow_copy_up() {
    let env = Env::new(fixture);
    let mut fs = env.overlay();
    let a = lookup(&mut fs, ROOT_ID, "a.txt").unwrap().attr.ino;
    let (reader, _) = fs.open(ctx(), a, libc::O_RDONLY as u32).unwrap();
    write_at(&mut fs, a, libc::O_WRONLY, 0, b"ALPHA");
    let mut buf = [0u8; 5];
    assert_eq!(fs.read(a, reader, 0, &mut buf).unwrap(), 5);
    assert_eq!(&buf, b"ALPHA");
    fs.release(a, reader).unwrap();
    // also when a deep copy-up (directory rename) brought the file up
    let b = walk(&mut fs, "dir/b.txt").unwrap().attr.ino;
    let (reader, _) = fs.open(ctx(), b, libc::O_RDONLY as u32).unwrap();
    fs.rename(ctx(), ROOT_ID, &c("dir"), ROOT_ID, &c("moved"), 0).unwrap();
    write_at(&mut fs, b, libc::O_WRONLY, 0, b"BETA");
    let mut buf = [0u8; 4];
    assert_eq!(fs.read(b, reader, 0, &mut buf).unwrap(), 4);
    assert_eq!(&buf, b"BETA");
    fs.release(b, reader).unwrap();
    assert_eq!(fs.open_fds(), 2);
    check_tables(&fs);
    env.assert_lower_unchanged();
}

fn upper_origin(env: &Env, rel: &str) -> Option<String> {
    let path = c(env.upper.join(rel).to_str().unwrap());
    let mut buf = [0u8; 128];
    // SAFETY: valid pointers and length.
    let n = unsafe { libc::lgetxattr(path.as_ptr(), ORIGIN_XATTR.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (n >= 0).then(|| String::from_utf8(buf[..n as usize].to_vec()).unwrap())
}

#[test]
fn copy_up_records_the_lower_origin() {
    let env = Env::new(fixture);
    let lower_b = std::fs::metadata(env.lower.join("dir/b.txt")).unwrap();
    let lower_dir = std::fs::metadata(env.lower.join("dir")).unwrap();
    let mut fs = env.overlay();
    let b = walk(&mut fs, "dir/b.txt").unwrap().attr.ino;
    // Truncating copy-up still records the lower size.
    fs.setattr(
        ctx(),
        b,
        SetAttr {
            size: Some(0),
            ..Default::default()
        },
    )
    .unwrap();
    let expect = |md: &std::fs::Metadata| {
        format!(
            "{} {} {}.{} {}.{}",
            md.ino(),
            md.size(),
            md.mtime(),
            md.mtime_nsec(),
            md.ctime(),
            md.ctime_nsec()
        )
    };
    assert_eq!(upper_origin(&env, "dir/b.txt").unwrap(), expect(&lower_b));
    assert_eq!(upper_origin(&env, "dir").unwrap(), expect(&lower_dir));
    // A file the guest creates has none; the guest never sees the attribute.
    create_file(&mut fs, ROOT_ID, "new.txt");
    assert_eq!(upper_origin(&env, "new.txt"), None);
    let names = fs.listxattr(ctx(), b).unwrap();
    assert!(!names.windows(8).any(|w| w == b"user.mvm"), "{names:?}");
    assert_eq!(err(fs.getxattr(ctx(), b, ORIGIN_XATTR)), libc::ENODATA);
    assert_eq!(err(fs.setxattr(ctx(), b, ORIGIN_XATTR, b"x", 0)), libc::EPERM);
    env.assert_lower_unchanged();
}

#[test]
fn refresh_layers_after_the_upper_layer_changed() {
    let env = Env::new(fixture);
    let mut fs = env.overlay();
    let b = walk(&mut fs, "dir/b.txt").unwrap().attr.ino;
    write_at(&mut fs, b, libc::O_WRONLY, 0, b"BETA");
    assert_eq!(read_all(&mut fs, b), b"BETA");
    // Dropped behind the overlay's back, as `mvm reset` does.
    std::fs::remove_file(env.upper.join("dir/b.txt")).unwrap();
    fs.refresh_layers();
    assert_eq!(read_all(&mut fs, b), b"beta");
    assert_eq!(walk(&mut fs, "dir/b.txt").unwrap().attr.ino, b);
    // A whiteout removed: the lower file shows again.
    fs.unlink(ctx(), ROOT_ID, &c("a.txt")).unwrap();
    assert_eq!(err(lookup(&mut fs, ROOT_ID, "a.txt")), libc::ENOENT);
    std::fs::remove_file(env.upper.join("a.txt")).unwrap();
    fs.refresh_layers();
    let a = lookup(&mut fs, ROOT_ID, "a.txt").unwrap().attr.ino;
    assert_eq!(read_all(&mut fs, a), b"alpha");
    check_tables(&fs);
    env.assert_lower_unchanged();
}

#[test]
fn guest_inode_numbers_are_the_hosts_and_unique() {
    let env = Env::new(fixture);
    let mut fs = env.overlay();
    let host_ino = |rel: &str| std::fs::symlink_metadata(env.lower.join(rel)).unwrap().ino();
    // Lower entries show the host's numbers: git's index agrees.
    let a = lookup(&mut fs, ROOT_ID, "a.txt").unwrap();
    assert_eq!(a.attr.inode(), host_ino("a.txt"));
    let dir = walk(&mut fs, "dir").unwrap().attr.ino;
    assert_eq!(fs.getattr(ctx(), dir, None).unwrap().0.inode(), host_ino("dir"));
    // Listings agree with stat, with and without attributes.
    let (h, _) = fs.opendir(ctx(), dir, 0).unwrap();
    let mut plain = BTreeMap::new();
    fs.readdir(ctx(), dir, h, 0, &mut |e| {
        plain.insert(String::from_utf8(e.name.to_vec()).unwrap(), e.ino);
        true
    })
    .unwrap();
    let mut plus = BTreeMap::new();
    fs.readdirplus(ctx(), dir, h, 0, &mut |e, entry| {
        assert_eq!(e.ino, entry.attr.inode());
        plus.insert(String::from_utf8(e.name.to_vec()).unwrap(), e.ino);
        true
    })
    .unwrap();
    fs.releasedir(dir, h).unwrap();
    assert_eq!(plain, plus);
    assert_eq!(plain["b.txt"], host_ino("dir/b.txt"));
    assert_eq!(plain["sub"], host_ino("dir/sub"));
    assert_eq!(plain["."], host_ino("dir"));
    assert_eq!(plain[".."], fs.getattr(ctx(), ROOT_ID, None).unwrap().0.inode());
    // A copy-up keeps the number the guest was shown.
    write_at(&mut fs, a.attr.ino, libc::O_WRONLY, 0, b"A");
    assert!(upper_stat(&env, "a.txt").is_some());
    assert_eq!(
        fs.getattr(ctx(), a.attr.ino, None).unwrap().0.inode(),
        host_ino("a.txt")
    );
    // New entries have numbers of their own, distinct from every other.
    create_file(&mut fs, ROOT_ID, "new.txt");
    let mut seen = BTreeMap::new();
    for path in [
        "a.txt",
        "new.txt",
        "dir",
        "dir/b.txt",
        "dir/sub",
        "dir/sub/c.txt",
        "x.txt",
        "link",
    ] {
        let inode = walk(&mut fs, path).unwrap().attr.inode();
        assert_ne!(inode, 0);
        if let Some(other) = seen.insert(inode, path) {
            panic!("{path} and {other} share inode number {inode}");
        }
    }
    env.assert_lower_unchanged();
}

/// An unprivileged server shows its own files as the project owner's and
/// turns a chown to that owner into one to itself; other owners pass as
/// they are.
#[test]
fn owner_map_shows_the_servers_files_as_the_project_owners() {
    let map = OwnerMap {
        host_uid: 995,
        host_gid: 994,
        guest_uid: 1000,
        guest_gid: 1001,
    };
    assert_eq!(map.shown(995, 994), (1000, 1001));
    assert_eq!(map.shown(0, 0), (0, 0));
    assert_eq!(map.shown(1000, 5), (1000, 5));
    assert_eq!((map.host_uid(1000), map.host_gid(1001)), (995, 994));
    assert_eq!((map.host_uid(7), map.host_gid(u32::MAX)), (7, u32::MAX));
}
