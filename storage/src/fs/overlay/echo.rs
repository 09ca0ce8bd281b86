//! Echoes: the guest agent replays a change the host made to the lower
//! layer (the project) as the file operation a local edit would be, so
//! that the guest kernel emits the inotify events its file watchers wait
//! for. A FUSE file system cannot push events into the guest (virtio-fs in
//! Linux 6.1 has no notification queue), but an operation the guest kernel
//! carries out itself does fire its watchers.
//!
//! Echo requests are told apart by the caller's gid (the agent sets its
//! fsgid for them). They never change a layer: each one succeeds only
//! where the merged view already shows the change, and otherwise fails, so
//! a stray echo cannot delete, truncate or create anything.
//!
//! | gid | the agent calls | the overlay answers |
//! |-----|-----------------|---------------------|
//! | [`ECHO_GID_MODIFY`] | `open(O_WRONLY)`, `ftruncate`, `close`; `chmod` | a read-only handle of the lower file; setattr answers the lower file's attributes unchanged |
//! | [`ECHO_GID_ENTRY`], [`ECHO_GID_DIR`] | `mknodat`, `mkdirat`, `symlinkat`, `unlinkat`, `renameat` on one name in an open parent | a name the lower layer shows is hidden from lookup (so it can be "created"); a name that is gone is found again (so it can be "removed" or "renamed") |
//!
//! The agent opens parent directories under its normal gid, so only the
//! last component of a path gets echo lookups. Entries copied up in this
//! VM are the VM's own: echoes on them fail (`EBUSY`).

use std::ffi::CStr;
use std::io;
use std::time::Duration;

use super::{errno, kind_of, Layer, Node, Overlay};
use crate::fs::{Attr, Context, Entry, OpenFlags};

/// Caller gid of echoed content and attribute changes.
pub const ECHO_GID_MODIFY: u32 = 0x6d76_6d00;
/// Caller gid of echoed arrivals and departures of a non-directory.
pub const ECHO_GID_ENTRY: u32 = 0x6d76_6d01;
/// Caller gid of echoed arrivals and departures of a directory.
pub const ECHO_GID_DIR: u32 = 0x6d76_6d02;

/// What an echo request replays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Echo {
    Modify,
    /// An entry arrived or left; `dir`: a directory.
    Entry {
        dir: bool,
    },
}

impl Echo {
    pub(super) fn of(ctx: Context) -> Option<Echo> {
        match ctx.gid {
            ECHO_GID_MODIFY => Some(Echo::Modify),
            ECHO_GID_ENTRY => Some(Echo::Entry { dir: false }),
            ECHO_GID_DIR => Some(Echo::Entry { dir: true }),
            _ => None,
        }
    }
}

/// Attributes of an entry that is gone from the lower layer: enough for
/// the guest to hold a dentry it is about to remove.
fn gone_attr(id: u64, kind: u32) -> Attr {
    Attr {
        ino: id,
        st_ino: super::node_ino(id),
        mode: kind | if kind == libc::S_IFDIR { 0o755 } else { 0o644 },
        nlink: 1,
        blksize: 4096,
        ..Attr::default()
    }
}

impl Overlay {
    /// Echo lookup: an entry shown only by the lower layer is hidden (it
    /// "arrives" next); a name that is gone is found again with its old
    /// node, or a new one of the echoed kind (it "leaves" next).
    pub(super) fn echo_lookup(&mut self, echo: Echo, parent: u64, name: &CStr) -> io::Result<Entry> {
        let Echo::Entry { dir } = echo else {
            return self.lookup_found(parent, name);
        };
        match self.probe(parent, name)? {
            Some(found) if found.upper.is_none() => Err(errno(libc::ENOENT)),
            Some(_) => self.lookup_found(parent, name),
            None => {
                self.node(parent)?;
                let key = (parent, name.to_owned());
                let id = match self.by_name.get(&key) {
                    Some(&id) => id,
                    None => {
                        let id = self.next_id;
                        self.next_id += 1;
                        self.nodes.insert(
                            id,
                            Node {
                                names: Vec::new(),
                                lookups: 0,
                                children: 0,
                                kind: if dir { libc::S_IFDIR } else { libc::S_IFREG },
                                upper: false,
                                lower: false,
                            },
                        );
                        self.add_name(id, parent, name);
                        id
                    }
                };
                let node = self.node_mut(id)?;
                node.lookups = node.lookups.saturating_add(1);
                let kind = node.kind;
                Ok(Entry {
                    attr: gone_attr(id, kind),
                    generation: 0,
                    entry_timeout: Duration::ZERO,
                    attr_timeout: Duration::ZERO,
                })
            }
        }
    }

    /// Echo of a new entry (mknod, mkdir, symlink): the lower layer shows
    /// it already; answer its entry.
    pub(super) fn echo_arrive(&mut self, echo: Echo, parent: u64, name: &CStr) -> io::Result<Entry> {
        if !matches!(echo, Echo::Entry { .. }) {
            return Err(errno(libc::EPERM));
        }
        match self.probe(parent, name)? {
            Some(found) if found.upper.is_none() => self.lookup_found(parent, name),
            Some(_) => Err(errno(libc::EBUSY)),
            None => Err(errno(libc::ENOENT)),
        }
    }

    /// Echo of a removal (unlink, rmdir): the name must be gone from the
    /// merged view; only the node table forgets it.
    pub(super) fn echo_leave(&mut self, echo: Echo, parent: u64, name: &CStr) -> io::Result<()> {
        if !matches!(echo, Echo::Entry { .. }) {
            return Err(errno(libc::EPERM));
        }
        if self.probe(parent, name)?.is_some() {
            return Err(errno(libc::EBUSY));
        }
        if let Some(&id) = self.by_name.get(&(parent, name.to_owned())) {
            self.remove_name(id, parent, name);
        }
        Ok(())
    }

    /// Echo of a rename: the source must be gone and the destination shown
    /// by the lower layer alone; the node moves to its new name.
    pub(super) fn echo_rename(
        &mut self,
        echo: Echo,
        (parent, name): (u64, &CStr),
        (new_parent, new_name): (u64, &CStr),
    ) -> io::Result<()> {
        if !matches!(echo, Echo::Entry { .. }) {
            return Err(errno(libc::EPERM));
        }
        if self.probe(parent, name)?.is_some() {
            return Err(errno(libc::EBUSY));
        }
        match self.probe(new_parent, new_name)? {
            Some(found) if found.upper.is_none() => {}
            Some(_) => return Err(errno(libc::EBUSY)),
            None => return Err(errno(libc::ENOENT)),
        }
        self.node(new_parent)?;
        if let Some(&id) = self.by_name.get(&(parent, name.to_owned())) {
            // The new name first, so the node is never without one.
            self.add_name(id, new_parent, new_name);
            self.remove_name(id, parent, name);
        }
        Ok(())
    }

    /// Echo open: a read-only handle of the lower file, whatever access
    /// the guest asked for (nothing is copied up; a write through it
    /// fails).
    pub(super) fn echo_open(&mut self, echo: Echo, ino: u64) -> io::Result<(u64, OpenFlags)> {
        let node = self.node(ino)?;
        if echo != Echo::Modify || node.kind != libc::S_IFREG {
            return Err(errno(libc::EPERM));
        }
        if node.upper || !node.lower {
            return Err(errno(libc::EBUSY));
        }
        self.open_node(ino, libc::O_RDONLY as u32)
    }

    /// Echo setattr (ftruncate, chmod): nothing changes; the answer is the
    /// lower file's current attributes, which the guest takes as the
    /// result (and drops cached pages past a changed size).
    pub(super) fn echo_setattr(&mut self, echo: Echo, ino: u64) -> io::Result<(Attr, Duration)> {
        let node = self.node(ino)?;
        if echo != Echo::Modify {
            return Err(errno(libc::EPERM));
        }
        if node.upper || !node.lower {
            return Err(errno(libc::EBUSY));
        }
        let (dir, name) = self.locate(Layer::Lower, ino)?;
        let st = super::sys::stat_at(std::os::fd::AsFd::as_fd(&dir), &name)?;
        if kind_of(&st) != self.node(ino)?.kind {
            return Err(errno(libc::EBUSY));
        }
        Ok((self.attr(ino, &st), self.options.attr_timeout))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::overlay::OverlayOptions;
    use crate::fs::{FileSystem, SetAttr, ROOT_ID};
    use std::ffi::CString;
    use std::path::{Path, PathBuf};

    struct Dirs {
        dir: PathBuf,
        lower: PathBuf,
        upper: PathBuf,
    }

    impl Dirs {
        fn new(tag: &str) -> Dirs {
            let dir = std::env::temp_dir().join(format!("mvm-echo-{}-{tag}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let (lower, upper) = (dir.join("lower"), dir.join("upper"));
            std::fs::create_dir_all(lower.join("src")).unwrap();
            std::fs::create_dir_all(&upper).unwrap();
            std::fs::write(lower.join("src/main.rs"), b"fn main() {}\n").unwrap();
            std::fs::write(lower.join("README"), b"readme\n").unwrap();
            Dirs { dir, lower, upper }
        }

        fn overlay(&self) -> Overlay {
            Overlay::new(Some(&self.lower), &self.upper, OverlayOptions::default()).unwrap()
        }

        fn upper_entries(&self) -> Vec<PathBuf> {
            let mut out = Vec::new();
            let mut pending = vec![self.upper.clone()];
            while let Some(d) = pending.pop() {
                for e in std::fs::read_dir(&d).unwrap() {
                    let e = e.unwrap();
                    out.push(e.path().strip_prefix(&self.upper).unwrap().to_path_buf());
                    if e.file_type().unwrap().is_dir() {
                        pending.push(e.path());
                    }
                }
            }
            out
        }
    }

    impl Drop for Dirs {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn ctx(gid: u32) -> Context {
        Context { uid: 0, gid, pid: 1 }
    }

    fn user() -> Context {
        ctx(0)
    }

    fn c(s: &str) -> CString {
        CString::new(s).unwrap()
    }

    fn errno_of<T: std::fmt::Debug>(r: io::Result<T>) -> i32 {
        r.unwrap_err().raw_os_error().unwrap()
    }

    fn src(fs: &mut Overlay) -> u64 {
        fs.lookup(user(), ROOT_ID, &c("src")).unwrap().attr.ino
    }

    fn write(path: &Path, data: &[u8]) {
        std::fs::write(path, data).unwrap();
    }

    #[test]
    fn host_created_file_is_hidden_then_arrives() {
        let d = Dirs::new("arrive");
        let mut fs = d.overlay();
        let dir = src(&mut fs);
        assert_eq!(errno_of(fs.lookup(user(), dir, &c("new.rs"))), libc::ENOENT);
        write(&d.lower.join("src/new.rs"), b"new\n");
        let entry_ctx = ctx(ECHO_GID_ENTRY);
        // The echo's own lookup does not see it (so mknod can go ahead)...
        assert_eq!(errno_of(fs.lookup(entry_ctx, dir, &c("new.rs"))), libc::ENOENT);
        // ...while everyone else does.
        assert_eq!(fs.lookup(user(), dir, &c("new.rs")).unwrap().attr.size, 4);
        let e = fs
            .mknod(entry_ctx, dir, &c("new.rs"), libc::S_IFREG | 0o644, 0, 0)
            .unwrap();
        assert_eq!(e.attr.size, 4);
        assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFREG);
        std::fs::create_dir(d.lower.join("src/sub")).unwrap();
        let e = fs.mkdir(ctx(ECHO_GID_DIR), dir, &c("sub"), 0o755, 0).unwrap();
        assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFDIR);
        // Nothing arrived that the lower layer does not have.
        assert_eq!(
            errno_of(fs.mknod(entry_ctx, dir, &c("nope"), libc::S_IFREG, 0, 0)),
            libc::ENOENT
        );
        assert!(d.upper_entries().is_empty(), "{:?}", d.upper_entries());
    }

    #[test]
    fn host_deleted_entries_are_found_again_then_leave() {
        let d = Dirs::new("leave");
        let mut fs = d.overlay();
        let dir = src(&mut fs);
        let known = fs.lookup(user(), dir, &c("main.rs")).unwrap().attr.ino;
        std::fs::remove_file(d.lower.join("src/main.rs")).unwrap();
        std::fs::remove_file(d.lower.join("README")).unwrap();
        assert_eq!(errno_of(fs.lookup(user(), dir, &c("main.rs"))), libc::ENOENT);
        let entry_ctx = ctx(ECHO_GID_ENTRY);
        // The node the guest knows comes back for the echo's unlink.
        let again = fs.lookup(entry_ctx, dir, &c("main.rs")).unwrap();
        assert_eq!(again.attr.ino, known);
        assert_eq!(again.entry_timeout, Duration::ZERO);
        fs.unlink(entry_ctx, dir, &c("main.rs")).unwrap();
        // One never looked up gets a node of the echoed kind.
        let readme = fs.lookup(entry_ctx, ROOT_ID, &c("README")).unwrap();
        assert_eq!(readme.attr.mode & libc::S_IFMT, libc::S_IFREG);
        fs.unlink(entry_ctx, ROOT_ID, &c("README")).unwrap();
        fs.forget(readme.attr.ino, 1);
        std::fs::remove_dir(d.lower.join("src")).unwrap();
        let gone = fs.lookup(ctx(ECHO_GID_DIR), ROOT_ID, &c("src")).unwrap();
        assert_eq!(gone.attr.ino, dir);
        fs.rmdir(ctx(ECHO_GID_DIR), ROOT_ID, &c("src")).unwrap();
        assert!(d.upper_entries().is_empty(), "no whiteout: {:?}", d.upper_entries());
    }

    #[test]
    fn host_rename_moves_the_node() {
        let d = Dirs::new("rename");
        let mut fs = d.overlay();
        let dir = src(&mut fs);
        let id = fs.lookup(user(), dir, &c("main.rs")).unwrap().attr.ino;
        std::fs::rename(d.lower.join("src/main.rs"), d.lower.join("lib.rs")).unwrap();
        let e = ctx(ECHO_GID_ENTRY);
        assert_eq!(fs.lookup(e, dir, &c("main.rs")).unwrap().attr.ino, id);
        assert_eq!(errno_of(fs.lookup(e, ROOT_ID, &c("lib.rs"))), libc::ENOENT);
        fs.rename(e, dir, &c("main.rs"), ROOT_ID, &c("lib.rs"), 0).unwrap();
        // The same host inode under its new name: the same node.
        assert_eq!(fs.lookup(user(), ROOT_ID, &c("lib.rs")).unwrap().attr.ino, id);
        // A source still shown (or a destination not) is not a rename.
        assert_eq!(
            errno_of(fs.rename(e, ROOT_ID, &c("lib.rs"), dir, &c("x"), 0)),
            libc::EBUSY
        );
        assert!(d.upper_entries().is_empty());
    }

    #[test]
    fn host_modify_opens_read_only_and_changes_nothing() {
        let d = Dirs::new("modify");
        let mut fs = d.overlay();
        let dir = src(&mut fs);
        let ino = fs.lookup(user(), dir, &c("main.rs")).unwrap().attr.ino;
        write(&d.lower.join("src/main.rs"), b"fn main() { println!(); }\n");
        let m = ctx(ECHO_GID_MODIFY);
        let (h, _) = fs.open(m, ino, libc::O_WRONLY as u32).unwrap();
        let set = SetAttr {
            size: Some(0),
            handle: Some(h),
            ..SetAttr::default()
        };
        let (attr, _) = fs.setattr(m, ino, set).unwrap();
        assert_eq!(attr.size, 26, "the lower file's size, not the one asked for");
        assert!(fs.write(m, ino, h, 0, b"x", 0).is_err());
        fs.release(ino, h).unwrap();
        assert_eq!(std::fs::read(d.lower.join("src/main.rs")).unwrap().len(), 26);
        assert!(d.upper_entries().is_empty());
    }

    #[test]
    fn echoes_never_touch_the_vms_own_entries() {
        let d = Dirs::new("own");
        let mut fs = d.overlay();
        let dir = src(&mut fs);
        let ino = fs.lookup(user(), dir, &c("main.rs")).unwrap().attr.ino;
        // The VM writes main.rs (copy-up) and makes mine.rs.
        let (h, _) = fs.open(user(), ino, libc::O_WRONLY as u32).unwrap();
        fs.write(user(), ino, h, 0, b"mine", 0).unwrap();
        fs.release(ino, h).unwrap();
        fs.create(
            user(),
            dir,
            &c("mine.rs"),
            libc::S_IFREG | 0o644,
            libc::O_WRONLY as u32,
            0,
        )
        .unwrap();
        let (e, m) = (ctx(ECHO_GID_ENTRY), ctx(ECHO_GID_MODIFY));
        assert_eq!(errno_of(fs.unlink(e, dir, &c("main.rs"))), libc::EBUSY);
        assert_eq!(errno_of(fs.unlink(e, dir, &c("mine.rs"))), libc::EBUSY);
        assert_eq!(errno_of(fs.open(m, ino, libc::O_WRONLY as u32)), libc::EBUSY);
        let set = SetAttr {
            size: Some(0),
            ..SetAttr::default()
        };
        assert_eq!(errno_of(fs.setattr(m, ino, set)), libc::EBUSY);
        assert_eq!(fs.lookup(e, dir, &c("mine.rs")).unwrap().attr.size, 0);
        assert_eq!(
            errno_of(fs.mknod(e, dir, &c("mine.rs"), libc::S_IFREG, 0, 0)),
            libc::EBUSY
        );
        // Operations that have no echo meaning are refused outright.
        assert_eq!(
            errno_of(fs.create(e, dir, &c("n"), libc::S_IFREG | 0o644, libc::O_WRONLY as u32, 0)),
            libc::EPERM
        );
        assert_eq!(errno_of(fs.link(e, ino, dir, &c("l"))), libc::EPERM);
        assert_eq!(errno_of(fs.setxattr(e, ino, &c("user.x"), b"1", 0)), libc::EPERM);
        assert_eq!(std::fs::read(d.upper.join("src/main.rs")).unwrap(), b"mineain() {}\n");
        assert!(d.upper.join("src/mine.rs").exists());
    }
}
