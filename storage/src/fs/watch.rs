//! Watching a share's source on the host: inotify on every directory of
//! the tree (new ones included as they appear), turned into the changes
//! the guest agent replays (`FsEvents` of the agent protocol; see
//! `overlay::ECHO_GID_*`).
//!
//! Why inotify and not fanotify: fanotify's directory-entry events need
//! `CAP_SYS_ADMIN` (a filesystem or mount mark); inotify works for any user
//! that may read the tree. Its cost is one watch per directory (the
//! kernel's `fs.inotify.max_user_watches`, often 8192 to 1M): a tree with
//! more directories than that is watched in part, with a warning.
//!
//! Only the host's changes are seen: the guest writes to its own upper
//! layer, which is not under the source, so its changes are never echoed
//! back to it.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use crate::Error;

pub use mvm_agent::proto::{EntryKind, FsChange as Change};

const MASK: u32 = libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_MODIFY
    | libc::IN_CLOSE_WRITE
    | libc::IN_ATTRIB
    | libc::IN_ONLYDIR
    | libc::IN_DONT_FOLLOW
    | libc::IN_EXCL_UNLINK;

/// Size of `struct inotify_event` before its name.
const EVENT_HEADER: usize = 16;

/// A recursive inotify watch of one directory tree.
pub struct TreeWatcher {
    fd: OwnedFd,
    root: PathBuf,
    /// Watch descriptor -> directory, relative to the root (empty: root).
    dirs: HashMap<i32, Vec<u8>>,
    wds: HashMap<Vec<u8>, i32>,
    buf: Vec<u8>,
    /// A `IN_MOVED_FROM` waiting for its `IN_MOVED_TO` (cookie, path, dir).
    moved_from: Option<(u32, Vec<u8>, bool)>,
    /// Directories left unwatched for lack of inotify watches.
    pub unwatched: usize,
    /// Times the kernel's event queue overflowed (events were lost).
    pub overflows: u64,
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    if dir.is_empty() {
        name.to_vec()
    } else {
        let mut p = Vec::with_capacity(dir.len() + 1 + name.len());
        p.extend_from_slice(dir);
        p.push(b'/');
        p.extend_from_slice(name);
        p
    }
}

/// Whether `path` is `prefix` or below it.
fn under(path: &[u8], prefix: &[u8]) -> bool {
    path == prefix || (path.starts_with(prefix) && path.get(prefix.len()) == Some(&b'/'))
}

fn kind_of(mode: u32) -> EntryKind {
    match mode & libc::S_IFMT {
        libc::S_IFREG => EntryKind::File,
        libc::S_IFDIR => EntryKind::Dir,
        libc::S_IFLNK => EntryKind::Symlink,
        _ => EntryKind::Other,
    }
}

impl TreeWatcher {
    /// Watches `root` and every directory below it (symlinks are not
    /// followed).
    pub fn new(root: &Path) -> Result<TreeWatcher, Error> {
        let host = |e: io::Error| Error::Watch {
            path: root.to_path_buf(),
            source: e,
        };
        // SAFETY: no arguments but flags.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(host(io::Error::last_os_error()));
        }
        // SAFETY: a fresh descriptor only we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut w = TreeWatcher {
            fd,
            root: root.to_path_buf(),
            dirs: HashMap::new(),
            wds: HashMap::new(),
            buf: vec![0; 256 << 10],
            moved_from: None,
            unwatched: 0,
            overflows: 0,
        };
        w.add_watch(&[]).map_err(host)?;
        let mut ignored = Vec::new();
        w.watch_below(Vec::new(), &mut ignored);
        if w.unwatched > 0 {
            log::warn!(
                "{}: {} directories are not watched (inotify watch limit; raise fs.inotify.max_user_watches): host changes there do not reach the guest's file watchers",
                root.display(),
                w.unwatched
            );
        }
        Ok(w)
    }

    /// The inotify descriptor, to poll for readability.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Directories watched.
    pub fn watched(&self) -> usize {
        self.dirs.len()
    }

    fn host_path(&self, rel: &[u8]) -> PathBuf {
        if rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(OsStr::from_bytes(rel))
        }
    }

    fn add_watch(&mut self, rel: &[u8]) -> io::Result<()> {
        let path = CString::new(self.host_path(rel).into_os_string().into_vec())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // The root itself is followed, as the file server opens it (a
        // symlink, or a /proc/self/fd/N a privileged parent handed over).
        let mask = if rel.is_empty() {
            MASK & !libc::IN_DONT_FOLLOW
        } else {
            MASK
        };
        // SAFETY: a valid descriptor and C string.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), path.as_ptr(), mask) };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        if let Some(old) = self.dirs.insert(wd, rel.to_vec()) {
            // The same directory under a new name (inotify reuses the wd).
            self.wds.remove(&old);
        }
        self.wds.insert(rel.to_vec(), wd);
        Ok(())
    }

    /// Watches the directories below `rel` (already watched itself); with
    /// `arrived`, reports each entry found as arrived (they were made
    /// before the watch that would have told us).
    fn watch_below(&mut self, rel: Vec<u8>, arrived: &mut Vec<Change>) {
        let mut pending = vec![rel];
        while let Some(dir) = pending.pop() {
            let Ok(entries) = std::fs::read_dir(self.host_path(&dir)) else {
                continue;
            };
            for entry in entries.flatten() {
                let Ok(ft) = entry.file_type() else { continue };
                let path = join(&dir, entry.file_name().as_bytes());
                let kind = if ft.is_dir() {
                    EntryKind::Dir
                } else if ft.is_file() {
                    EntryKind::File
                } else if ft.is_symlink() {
                    EntryKind::Symlink
                } else {
                    EntryKind::Other
                };
                arrived.push(Change::Arrive {
                    path: path.clone(),
                    kind,
                });
                if kind == EntryKind::Dir {
                    match self.add_watch(&path) {
                        Ok(()) => pending.push(path),
                        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => self.unwatched += 1,
                        Err(e) => log::debug!("not watching {}: {e}", String::from_utf8_lossy(&path)),
                    }
                }
            }
        }
    }

    /// Stops watching `rel` and everything below it (moved out, deleted).
    fn unwatch(&mut self, rel: &[u8]) {
        let gone: Vec<(Vec<u8>, i32)> = self
            .wds
            .iter()
            .filter(|(p, _)| under(p, rel))
            .map(|(p, wd)| (p.clone(), *wd))
            .collect();
        for (p, wd) in gone {
            self.wds.remove(&p);
            self.dirs.remove(&wd);
            // SAFETY: valid descriptors; a wd already gone is an error we ignore.
            unsafe { libc::inotify_rm_watch(self.fd.as_raw_fd(), wd) };
        }
    }

    /// A directory moved within the tree: its watches keep working, under
    /// new names.
    fn rename_watched(&mut self, from: &[u8], to: &[u8]) {
        let moved: Vec<(Vec<u8>, i32)> = self
            .wds
            .iter()
            .filter(|(p, _)| under(p, from))
            .map(|(p, wd)| (p.clone(), *wd))
            .collect();
        for (old, wd) in moved {
            let mut new = to.to_vec();
            new.extend_from_slice(&old[from.len()..]);
            self.wds.remove(&old);
            self.wds.insert(new.clone(), wd);
            self.dirs.insert(wd, new);
        }
    }

    fn lstat(&self, rel: &[u8]) -> Option<std::fs::Metadata> {
        std::fs::symlink_metadata(self.host_path(rel)).ok()
    }

    /// Reads the events queued now (never blocks) and returns them as
    /// changes, in order, repeated content and attribute changes of a path
    /// folded into one. Empty when nothing happened.
    pub fn read_changes(&mut self) -> io::Result<Vec<Change>> {
        let mut out = Vec::new();
        // Index in `out` of the Modify/Attrib of each path, for folding.
        let mut modified: HashMap<Vec<u8>, usize> = HashMap::new();
        loop {
            // SAFETY: reading into our own buffer of the given length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), self.buf.as_mut_ptr().cast(), self.buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => break,
                    Some(libc::EINTR) => continue,
                    _ => return Err(e),
                }
            }
            let n = n as usize;
            if n == 0 {
                break;
            }
            let mut at = 0;
            while let Some(header) = self.buf.get(at..at + EVENT_HEADER) {
                let word = |i: usize| u32::from_ne_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
                let (wd, mask, cookie, len) = (word(0) as i32, word(4), word(8), word(12) as usize);
                let name_start = at + EVENT_HEADER;
                let Some(raw_name) = self.buf.get(name_start..name_start + len) else {
                    break;
                };
                let name_len = raw_name.iter().position(|&b| b == 0).unwrap_or(len);
                let name = raw_name[..name_len].to_vec();
                at = name_start + len;
                if at > n {
                    break;
                }
                self.event(wd, mask, cookie, &name, &mut out, &mut modified);
            }
        }
        self.flush_moved_from(&mut out);
        Ok(out)
    }

    /// An `IN_MOVED_FROM` whose `IN_MOVED_TO` did not follow: moved out.
    fn flush_moved_from(&mut self, out: &mut Vec<Change>) {
        if let Some((_, path, dir)) = self.moved_from.take() {
            if dir {
                self.unwatch(&path);
            }
            out.push(Change::Leave { path, dir });
        }
    }

    fn event(
        &mut self,
        wd: i32,
        mask: u32,
        cookie: u32,
        name: &[u8],
        out: &mut Vec<Change>,
        modified: &mut HashMap<Vec<u8>, usize>,
    ) {
        if mask & libc::IN_Q_OVERFLOW != 0 {
            self.overflows += 1;
            log::warn!(
                "{}: inotify queue overflow, some host changes do not reach the guest's file watchers",
                self.root.display()
            );
            return;
        }
        if mask & libc::IN_IGNORED != 0 {
            if let Some(rel) = self.dirs.remove(&wd) {
                if self.wds.get(&rel) == Some(&wd) {
                    self.wds.remove(&rel);
                }
            }
            return;
        }
        let Some(dir) = self.dirs.get(&wd) else { return };
        if name.is_empty() {
            return; // an event on the directory itself; its parent reports it
        }
        let path = join(dir, name);
        let is_dir = mask & libc::IN_ISDIR != 0;
        if mask & libc::IN_MOVED_TO != 0 {
            if let Some((c, from, dir)) = self.moved_from.take() {
                if c == cookie {
                    if dir {
                        self.rename_watched(&from, &path);
                    }
                    modified.remove(&from);
                    out.push(Change::Move { from, to: path, dir });
                    return;
                }
                self.moved_from = Some((c, from, dir));
            }
        }
        self.flush_moved_from(out);
        if mask & libc::IN_MOVED_FROM != 0 {
            self.moved_from = Some((cookie, path, is_dir));
        } else if mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0 {
            // The entry may be gone again already: then it never was.
            let Some(md) = self.lstat(&path) else { return };
            let kind = kind_of(md.mode_bits());
            out.push(Change::Arrive {
                path: path.clone(),
                kind,
            });
            if kind == EntryKind::Dir {
                match self.add_watch(&path) {
                    Ok(()) => self.watch_below(path, out),
                    Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                        self.unwatched += 1;
                        log::warn!(
                            "{}: inotify watch limit reached (raise fs.inotify.max_user_watches)",
                            self.root.display()
                        );
                    }
                    Err(e) => log::debug!("not watching {}: {e}", String::from_utf8_lossy(&path)),
                }
            }
        } else if mask & libc::IN_DELETE != 0 {
            modified.remove(&path);
            if is_dir {
                self.unwatch(&path);
            }
            out.push(Change::Leave { path, dir: is_dir });
        } else if mask & (libc::IN_MODIFY | libc::IN_CLOSE_WRITE) != 0 && !is_dir {
            let Some(md) = self.lstat(&path) else { return };
            let change = Change::Modify {
                path: path.clone(),
                size: md.len(),
            };
            match modified.get(&path) {
                Some(&i) if i < out.len() => out[i] = change,
                _ => {
                    modified.insert(path, out.len());
                    out.push(change);
                }
            }
        } else if mask & libc::IN_ATTRIB != 0 {
            let Some(md) = self.lstat(&path) else { return };
            if modified.contains_key(&path) {
                return; // the content echo refreshes the attributes too
            }
            modified.insert(path.clone(), out.len());
            out.push(Change::Attrib {
                path,
                mode: md.mode_bits() & 0o7777,
            });
        }
    }
}

/// Folds what a burst of changes does to a file that did not outlive it:
/// a non-directory created (and perhaps written) then deleted in the
/// burst leaves no trace; one created then renamed (an editor's atomic
/// save) is only renamed. The guest then replays fewer operations, each a
/// few requests of its kernel.
pub fn coalesce(changes: Vec<Change>) -> Vec<Change> {
    let mut out: Vec<Option<Change>> = Vec::with_capacity(changes.len());
    // Indexes in `out` of the Arrive/Modify/Attrib of each path.
    let mut touched: HashMap<Vec<u8>, Vec<usize>> = HashMap::new();
    let mut arrived: HashMap<Vec<u8>, usize> = HashMap::new();
    let forget = |out: &mut Vec<Option<Change>>, touched: &mut HashMap<Vec<u8>, Vec<usize>>, path: &[u8]| {
        for i in touched.remove(path).unwrap_or_default() {
            if let Some(slot) = out.get_mut(i) {
                *slot = None;
            }
        }
    };
    for c in changes {
        match &c {
            Change::Arrive { path, kind } if *kind != EntryKind::Dir => {
                arrived.insert(path.clone(), out.len());
                touched.entry(path.clone()).or_default().push(out.len());
            }
            Change::Modify { path, .. } | Change::Attrib { path, .. } => {
                touched.entry(path.clone()).or_default().push(out.len());
            }
            Change::Leave { path, dir: false } => {
                let was_new = arrived.remove(path).is_some();
                forget(&mut out, &mut touched, path);
                if was_new {
                    continue;
                }
            }
            Change::Move { from, dir: false, .. } => {
                arrived.remove(from);
                forget(&mut out, &mut touched, from);
            }
            _ => {}
        }
        out.push(Some(c));
    }
    out.into_iter().flatten().collect()
}

trait ModeBits {
    fn mode_bits(&self) -> u32;
}

impl ModeBits for std::fs::Metadata {
    fn mode_bits(&self) -> u32 {
        std::os::unix::fs::MetadataExt::mode(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    struct Tree(PathBuf);

    impl Tree {
        fn new(tag: &str) -> Tree {
            let p = std::env::temp_dir().join(format!("mvm-watch-{}-{tag}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(p.join("src")).unwrap();
            std::fs::write(p.join("src/main.rs"), b"fn main() {}\n").unwrap();
            Tree(p)
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Changes until `done` says enough, or 5 s.
    fn collect(w: &mut TreeWatcher, done: impl Fn(&[Change]) -> bool) -> Vec<Change> {
        let mut all = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done(&all) && Instant::now() < deadline {
            all.extend(w.read_changes().unwrap());
            std::thread::sleep(Duration::from_millis(5));
        }
        all
    }

    fn p(s: &str) -> Vec<u8> {
        s.as_bytes().to_vec()
    }

    #[test]
    fn reports_what_a_local_edit_does() {
        let t = Tree::new("edit");
        let mut w = TreeWatcher::new(&t.0).unwrap();
        assert_eq!(w.watched(), 2);
        let mut step = |f: &dyn Fn()| {
            f();
            collect(&mut w, |c| !c.is_empty())
        };
        let modify = |path: &str, size| Change::Modify { path: p(path), size };
        assert_eq!(
            step(&|| std::fs::write(t.0.join("src/main.rs"), b"fn main() { loop {} }\n").unwrap()),
            vec![modify("src/main.rs", 22)]
        );
        let got = step(&|| std::fs::write(t.0.join("new.txt"), b"x").unwrap());
        assert_eq!(
            got[0],
            Change::Arrive {
                path: p("new.txt"),
                kind: EntryKind::File
            }
        );
        assert_eq!(got[1..], [modify("new.txt", 1)][..got.len() - 1]);
        assert_eq!(
            step(&|| std::fs::rename(t.0.join("new.txt"), t.0.join("src/moved.txt")).unwrap()),
            vec![Change::Move {
                from: p("new.txt"),
                to: p("src/moved.txt"),
                dir: false
            }]
        );
        assert_eq!(
            step(&|| std::fs::set_permissions(
                t.0.join("src/moved.txt"),
                std::os::unix::fs::PermissionsExt::from_mode(0o755)
            )
            .unwrap()),
            vec![Change::Attrib {
                path: p("src/moved.txt"),
                mode: 0o755
            }]
        );
        assert_eq!(
            step(&|| std::fs::remove_file(t.0.join("src/moved.txt")).unwrap()),
            vec![Change::Leave {
                path: p("src/moved.txt"),
                dir: false
            }]
        );
    }

    #[test]
    fn new_directories_are_watched_with_what_they_hold() {
        let t = Tree::new("dirs");
        let mut w = TreeWatcher::new(&t.0).unwrap();
        std::fs::create_dir_all(t.0.join("a/b/c")).unwrap();
        std::fs::write(t.0.join("a/b/c/f"), b"1").unwrap();
        let got = collect(&mut w, |c| {
            c.iter()
                .any(|c| matches!(c, Change::Arrive { path, .. } if path == b"a/b/c/f"))
        });
        let arrived: Vec<&[u8]> = got
            .iter()
            .filter_map(|c| match c {
                Change::Arrive { path, .. } => Some(path.as_slice()),
                _ => None,
            })
            .collect();
        for want in [&b"a"[..], b"a/b", b"a/b/c", b"a/b/c/f"] {
            assert!(
                arrived.contains(&want),
                "{:?} not in {got:?}",
                String::from_utf8_lossy(want)
            );
        }
        assert_eq!(w.watched(), 5);
        // Renaming a directory keeps its watches, under the new name.
        std::fs::rename(t.0.join("a"), t.0.join("z")).unwrap();
        collect(&mut w, |c| !c.is_empty());
        std::fs::write(t.0.join("z/b/c/g"), b"2").unwrap();
        let got = collect(&mut w, |c| c.iter().any(|c| matches!(c, Change::Arrive { .. })));
        assert!(got.contains(&Change::Arrive {
            path: p("z/b/c/g"),
            kind: EntryKind::File
        }));
        // Deleting the tree drops its watches.
        std::fs::remove_dir_all(t.0.join("z")).unwrap();
        let got = collect(&mut w, |c| {
            c.iter()
                .any(|c| matches!(c, Change::Leave { path, .. } if path == b"z"))
        });
        assert!(
            got.contains(&Change::Leave {
                path: p("z"),
                dir: true
            }),
            "{got:?}"
        );
        collect(&mut w, |_| false);
        assert_eq!(w.watched(), 2);
    }

    #[test]
    fn short_lived_files_fold_away() {
        let arrive = |p: &str| Change::Arrive {
            path: p.into(),
            kind: EntryKind::File,
        };
        let modify = |p: &str| Change::Modify {
            path: p.into(),
            size: 1,
        };
        let folded = coalesce(vec![
            arrive(".x.swp"),
            modify(".x.swp"),
            Change::Move {
                from: p(".x.swp"),
                to: p("x"),
                dir: false,
            },
            arrive("tmp"),
            modify("tmp"),
            Change::Leave {
                path: p("tmp"),
                dir: false,
            },
            modify("kept"),
            Change::Leave {
                path: p("old"),
                dir: false,
            },
            Change::Arrive {
                path: p("d"),
                kind: EntryKind::Dir,
            },
            Change::Leave {
                path: p("d"),
                dir: true,
            },
        ]);
        assert_eq!(
            folded,
            vec![
                Change::Move {
                    from: p(".x.swp"),
                    to: p("x"),
                    dir: false
                },
                modify("kept"),
                Change::Leave {
                    path: p("old"),
                    dir: false
                },
                Change::Arrive {
                    path: p("d"),
                    kind: EntryKind::Dir
                },
                Change::Leave {
                    path: p("d"),
                    dir: true
                },
            ]
        );
    }

    #[test]
    fn twenty_thousand_directories() {
        let t = Tree::new("many");
        for i in 0..200 {
            for j in 0..100 {
                std::fs::create_dir_all(t.0.join(format!("d{i}/e{j}"))).unwrap();
            }
        }
        let start = Instant::now();
        let mut w = TreeWatcher::new(&t.0).unwrap();
        let took = start.elapsed();
        assert_eq!(w.watched() + w.unwatched, 2 + 200 + 200 * 100);
        eprintln!("watching {} directories took {took:?}", w.watched());
        if w.unwatched == 0 {
            std::fs::write(t.0.join("d199/e99/deep.txt"), b"x").unwrap();
            let got = collect(&mut w, |c| !c.is_empty());
            assert!(got.contains(&Change::Arrive {
                path: p("d199/e99/deep.txt"),
                kind: EntryKind::File
            }));
        }
    }
}
