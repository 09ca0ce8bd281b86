//! What a VM changed in its project share, read from the share's layers:
//! the project directory (lower, read-only for the VM) and the VM's upper
//! layer in kernel overlayfs' format (`userxattr`: a whiteout is a
//! character device 0/0, an opaque directory has `user.overlay.opaque=y`).
//!
//! - [`scan`] lists the changes (git's view: regular files and symlinks;
//!   directories only through what they hold, special files not at all).
//! - [`write_diff`] / [`write_stat`] print them as `git diff` does.
//! - [`conflicts`] finds host entries that changed since the VM took them;
//!   [`apply`] writes the changes into the project when there are none.
//! - [`reset`] drops changes from the upper layer.
//!
//! These read and write the layers only: on a running VM the caller keeps
//! the file server still meanwhile (see [`crate::manager::Manager::diff`]).
//!
//! Conflict rule, per path `P` that apply would write or remove, with `H`
//! the host entry at `P` now and `E` the VM's upper entry:
//! - `E` was copied up from the host (it carries the origin the file server
//!   records at copy-up, `user.mvm.origin` = inode, size, mtime, ctime of
//!   the host entry then): conflict if `H` is that inode and its size,
//!   mtime or ctime differ; if `H` is another inode or gone, as below.
//! - otherwise (new in the VM, renamed there, or replacing `H` with a new
//!   file as editors and `sed -i` do): conflict if `H` exists, differs from
//!   `E`, and its ctime is later than `E`'s (`H` appeared or changed after
//!   the VM's last change to `P`); a copied-up `E` whose host entry is gone
//!   (deleted on the host, not renamed in the VM) is a conflict too.
//! - `P` deleted in the VM (a whiteout, or beneath an opaque directory or
//!   one replaced by a file): conflict if `H`'s ctime is later than the
//!   whiteout's (or that directory's, or the replacing entry's) ctime.
//!
//! An `H` identical to `E` (type, content, git mode) is never a conflict.

mod patch;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsStr, OsString};
use std::fs::{File, Metadata};
use std::io::{self, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

pub use patch::git_mode;

/// The attribute the file server puts on copied-up entries.
pub const ORIGIN_XATTR: &str = match mvm_storage::fs::overlay::ORIGIN_XATTR.to_str() {
    Ok(name) => name,
    Err(_) => panic!("the origin attribute's name is ASCII"),
};
const OPAQUE_XATTR: &str = "user.overlay.opaque";

/// The two layers of a project share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layers {
    /// The project directory on the host.
    pub lower: PathBuf,
    /// The VM's upper layer.
    pub upper: PathBuf,
}

/// A file as one side of a change saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryInfo {
    /// Full `st_mode` (type and permission bits).
    pub mode: u32,
    pub size: u64,
    pub ino: u64,
    /// ctime in nanoseconds since the epoch.
    pub ctime_ns: i128,
}

impl EntryInfo {
    fn of(md: &Metadata) -> EntryInfo {
        EntryInfo {
            mode: md.mode(),
            size: md.size(),
            ino: md.ino(),
            ctime_ns: ctime_ns(md),
        }
    }

    fn is_symlink(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFLNK
    }
}

fn ctime_ns(md: &Metadata) -> i128 {
    i128::from(md.ctime()) * 1_000_000_000 + i128::from(md.ctime_nsec())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeKind {
    /// New in the VM (nothing at the path on the host).
    Added,
    /// Deleted in the VM.
    Deleted,
    /// Content or git mode (the executable bit) changed.
    Modified,
    /// A file became a symlink or the reverse.
    TypeChanged,
    /// Deleted at `from`, added at `path` with identical content.
    Renamed { from: PathBuf },
}

/// One changed path, relative to the project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub path: PathBuf,
    pub kind: ChangeKind,
    /// The host side (at `from` for a rename); None when added.
    pub old: Option<EntryInfo>,
    /// The VM side; None when deleted.
    pub new: Option<EntryInfo>,
    /// For a deletion: ctime (ns) of what deleted it in the upper layer
    /// (whiteout, opaque directory, replacing entry).
    pub deleted_at: Option<i128>,
}

impl Change {
    /// The path on the host side (`from` for a rename).
    pub fn old_path(&self) -> &Path {
        match &self.kind {
            ChangeKind::Renamed { from } => from,
            _ => &self.path,
        }
    }
}

/// The changes of a VM, sorted by path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeSet {
    pub changes: Vec<Change>,
    /// Host directories the VM no longer has (removed by `apply` once
    /// emptied), parents before children.
    pub removed_dirs: Vec<PathBuf>,
    /// Where the deletions come from: for each whiteout or opaque-hidden
    /// directory, the path of the upper entry that deletes it.
    whiteouts: Vec<PathBuf>,
}

impl ChangeSet {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}

/// A path `apply` refuses to write, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub path: PathBuf,
    pub reason: String,
}

/// Checks `mvm diff`-style path arguments: relative to the project (or
/// absolute inside `project`), no `..`; returns them normalized.
pub fn normalize_paths(project: &Path, paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    for p in paths {
        let rel = if p.is_absolute() {
            p.strip_prefix(project)
                .map_err(|_| format!("{} is not inside the project {}", p.display(), project.display()))?
        } else {
            p.as_path()
        };
        let mut norm = PathBuf::new();
        for c in rel.components() {
            match c {
                Component::Normal(n) => norm.push(n),
                Component::CurDir => {}
                _ => return Err(format!("{}: give a path inside the project, without '..'", p.display())),
            }
        }
        out.push(norm);
    }
    Ok(out)
}

/// Paths a command works on: all (empty list) or those at or below one of
/// the prefixes.
struct Filter<'a>(&'a [PathBuf]);

impl Filter<'_> {
    fn matches(&self, p: &Path) -> bool {
        self.0.is_empty() || self.0.iter().any(|f| f.as_os_str().is_empty() || p.starts_with(f))
    }

    /// Whether something at or below `p` may match.
    fn relevant(&self, p: &Path) -> bool {
        self.matches(p) || self.0.iter().any(|f| f.starts_with(p))
    }
}

fn lstat_opt(path: &Path) -> io::Result<Option<Metadata>> {
    match std::fs::symlink_metadata(path) {
        Ok(md) => Ok(Some(md)),
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR) => Ok(None),
        Err(e) => Err(e),
    }
}

fn is_whiteout(md: &Metadata) -> bool {
    md.file_type().is_char_device() && md.rdev() == 0
}

fn is_tracked(md: &Metadata) -> bool {
    md.file_type().is_file() || md.file_type().is_symlink()
}

fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// An extended attribute of `path` itself (symlinks not followed).
fn get_xattr(path: &Path, name: &str) -> io::Result<Option<Vec<u8>>> {
    let (p, n) = (
        cpath(path)?,
        CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
    );
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and buffer of the given length.
    let len = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if len < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENODATA) | Some(libc::ENOTSUP) | Some(libc::ERANGE) => Ok(None),
            _ => Err(e),
        };
    }
    buf.truncate(len as usize);
    Ok(Some(buf))
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let (p, n) = (
        cpath(path)?,
        CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
    );
    // SAFETY: valid C strings and buffer.
    let ret = unsafe { libc::lsetxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A copied-up entry's origin: (ino, size, mtime ns, ctime ns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Origin {
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

fn parse_time(s: &str) -> Option<i128> {
    let (sec, nsec) = s.split_once('.')?;
    Some(sec.parse::<i128>().ok()? * 1_000_000_000 + nsec.parse::<i128>().ok()?)
}

fn read_origin(path: &Path) -> io::Result<Option<Origin>> {
    let Some(value) = get_xattr(path, ORIGIN_XATTR)? else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(&value);
    let mut it = text.split_ascii_whitespace();
    let origin = (|| {
        Some(Origin {
            ino: it.next()?.parse().ok()?,
            size: it.next()?.parse().ok()?,
            mtime_ns: parse_time(it.next()?)?,
            ctime_ns: parse_time(it.next()?)?,
        })
    })();
    Ok(origin)
}

/// The origin value for a host entry, as the file server writes it.
fn origin_value(md: &Metadata) -> String {
    mvm_storage::fs::overlay::format_origin(
        md.ino(),
        md.size(),
        (md.mtime(), md.mtime_nsec()),
        (md.ctime(), md.ctime_nsec()),
    )
}

fn origin_matches(origin: &Origin, md: &Metadata) -> bool {
    origin.ino == md.ino()
        && origin.size == md.size()
        && origin.mtime_ns == i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec())
        && origin.ctime_ns == ctime_ns(md)
}

/// A regular file's content or a symlink's target.
pub fn read_content(path: &Path, md: &Metadata) -> io::Result<Vec<u8>> {
    if md.file_type().is_symlink() {
        return Ok(std::fs::read_link(path)?.into_os_string().into_vec());
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NOATIME)
        .open(path)
        .or_else(|_| {
            // O_NOATIME needs ownership; the data is what matters.
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
        })?;
    let mut data = Vec::with_capacity(md.size() as usize);
    file.read_to_end(&mut data)?;
    Ok(data)
}

/// Whether two entries have the same type and content (sizes first, then
/// the bytes in chunks).
fn same_content(a: &Path, amd: &Metadata, b: &Path, bmd: &Metadata) -> io::Result<bool> {
    if amd.file_type().is_symlink() != bmd.file_type().is_symlink() || amd.size() != bmd.size() {
        return Ok(false);
    }
    if amd.file_type().is_symlink() {
        return Ok(std::fs::read_link(a)? == std::fs::read_link(b)?);
    }
    let open = |p: &Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(p)
    };
    let (mut fa, mut fb) = (open(a)?, open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let n = read_full(&mut fa, &mut ba)?;
        let m = read_full(&mut fb, &mut bb)?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Names in a directory, sorted; the file server's temporary names are
/// left out.
fn names(dir: &Path) -> io::Result<Vec<OsString>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let b = name.as_bytes();
        if b.starts_with(b".mvm-whiteout-") || b.starts_with(b".mvm-new-") {
            continue;
        }
        out.push(name);
    }
    out.sort();
    Ok(out)
}

struct Scan<'a> {
    layers: &'a Layers,
    filter: Filter<'a>,
    set: ChangeSet,
}

impl Scan<'_> {
    fn lower(&self, p: &Path) -> PathBuf {
        self.layers.lower.join(p)
    }

    fn upper(&self, p: &Path) -> PathBuf {
        self.layers.upper.join(p)
    }

    /// Everything of the host at `p` (described by `md`) is gone in the VM,
    /// by the upper entry at `by` whose ctime is `at`.
    fn deleted(&mut self, p: &Path, md: &Metadata, at: i128, by: &Path) -> io::Result<()> {
        if !self.filter.relevant(p) {
            return Ok(());
        }
        if md.is_dir() {
            if self.filter.matches(p) {
                self.set.removed_dirs.push(p.to_path_buf());
            }
            for name in names(&self.lower(p))? {
                let sub = p.join(&name);
                if let Some(smd) = lstat_opt(&self.lower(&sub))? {
                    self.deleted(&sub, &smd, at, by)?;
                }
            }
        } else if is_tracked(md) && self.filter.matches(p) {
            self.set.changes.push(Change {
                path: p.to_path_buf(),
                kind: ChangeKind::Deleted,
                old: Some(EntryInfo::of(md)),
                new: None,
                deleted_at: Some(at),
            });
            self.set.whiteouts.push(by.to_path_buf());
        }
        Ok(())
    }

    fn added(&mut self, p: &Path, md: &Metadata) {
        if self.filter.matches(p) {
            self.set.changes.push(Change {
                path: p.to_path_buf(),
                kind: ChangeKind::Added,
                old: None,
                new: Some(EntryInfo::of(md)),
                deleted_at: None,
            });
        }
    }

    /// Walks the upper directory `rel`; `hidden`: the host directory at
    /// `rel` does not show through (opaque here or above, or not a
    /// directory on the host).
    fn walk(&mut self, rel: &Path, hidden: bool) -> io::Result<()> {
        let mut seen = HashSet::new();
        for name in names(&self.upper(rel))? {
            let p = rel.join(&name);
            seen.insert(name);
            if !self.filter.relevant(&p) {
                continue;
            }
            let Some(umd) = lstat_opt(&self.upper(&p))? else {
                continue;
            };
            let lmd = lstat_opt(&self.lower(&p))?;
            let uct = ctime_ns(&umd);
            if is_whiteout(&umd) {
                if let Some(l) = lmd {
                    self.deleted(&p, &l, uct, &p)?;
                }
            } else if umd.is_dir() {
                let opaque = get_xattr(&self.upper(&p), OPAQUE_XATTR)?.is_some_and(|v| v == b"y");
                let lower_dir = lmd.as_ref().is_some_and(|l| l.is_dir());
                if let Some(l) = lmd.as_ref().filter(|l| !l.is_dir()) {
                    self.deleted(&p, l, uct, &p)?;
                }
                self.walk(&p, hidden || opaque || !lower_dir)?;
            } else if is_tracked(&umd) {
                match lmd {
                    None => self.added(&p, &umd),
                    Some(l) if l.is_dir() => {
                        self.deleted(&p, &l, uct, &p)?;
                        self.added(&p, &umd);
                    }
                    Some(l) if is_tracked(&l) => {
                        if !self.filter.matches(&p) {
                            continue;
                        }
                        let kind = if l.file_type().is_symlink() != umd.file_type().is_symlink() {
                            ChangeKind::TypeChanged
                        } else if !same_content(&self.lower(&p), &l, &self.upper(&p), &umd)?
                            || git_mode(l.mode()) != git_mode(umd.mode())
                        {
                            ChangeKind::Modified
                        } else {
                            continue;
                        };
                        self.set.changes.push(Change {
                            path: p.clone(),
                            kind,
                            old: Some(EntryInfo::of(&l)),
                            new: Some(EntryInfo::of(&umd)),
                            deleted_at: Some(uct),
                        });
                    }
                    Some(_) => self.added(&p, &umd),
                }
            }
        }
        if hidden {
            let Some(dir_md) = lstat_opt(&self.lower(rel))? else {
                return Ok(());
            };
            if !dir_md.is_dir() {
                return Ok(());
            }
            let at = lstat_opt(&self.upper(rel))?.map_or(0, |m| ctime_ns(&m));
            for name in names(&self.lower(rel))? {
                if seen.contains(&name) {
                    continue;
                }
                let p = rel.join(&name);
                if let Some(l) = lstat_opt(&self.lower(&p))? {
                    self.deleted(&p, &l, at, rel)?;
                }
            }
        }
        Ok(())
    }

    /// Pairs a deletion and an addition of identical non-empty content
    /// into a rename (git's 100% similarity).
    fn find_renames(&mut self) -> io::Result<()> {
        let mut deleted: HashMap<(bool, u64), Vec<usize>> = HashMap::new();
        for (i, c) in self.set.changes.iter().enumerate() {
            if let (ChangeKind::Deleted, Some(old)) = (&c.kind, &c.old) {
                if old.size > 0 {
                    deleted.entry((old.is_symlink(), old.size)).or_default().push(i);
                }
            }
        }
        if deleted.is_empty() {
            return Ok(());
        }
        let mut gone = HashSet::new();
        let mut renames = Vec::new();
        for (i, c) in self.set.changes.iter().enumerate() {
            let (ChangeKind::Added, Some(new)) = (&c.kind, &c.new) else {
                continue;
            };
            let Some(candidates) = deleted.get(&(new.is_symlink(), new.size)) else {
                continue;
            };
            let upper = self.upper(&c.path);
            let Some(umd) = lstat_opt(&upper)? else { continue };
            for &d in candidates {
                if gone.contains(&d) {
                    continue;
                }
                let from = &self.set.changes[d].path;
                let Some(lmd) = lstat_opt(&self.lower(from))? else {
                    continue;
                };
                if same_content(&self.lower(from), &lmd, &upper, &umd)? {
                    gone.insert(d);
                    gone.insert(i);
                    renames.push(Change {
                        path: c.path.clone(),
                        kind: ChangeKind::Renamed { from: from.clone() },
                        old: self.set.changes[d].old,
                        new: c.new,
                        deleted_at: self.set.changes[d].deleted_at,
                    });
                    break;
                }
            }
        }
        let mut i = 0;
        self.set.changes.retain(|_| {
            i += 1;
            !gone.contains(&(i - 1))
        });
        self.set.changes.extend(renames);
        Ok(())
    }
}

/// The VM's changes to the project, limited to `paths` (prefixes relative
/// to the project; empty: all).
pub fn scan(layers: &Layers, paths: &[PathBuf]) -> io::Result<ChangeSet> {
    let mut scan = Scan {
        layers,
        filter: Filter(paths),
        set: ChangeSet::default(),
    };
    scan.walk(Path::new(""), false)?;
    scan.find_renames()?;
    // Git's order: by path; a type change shows as the deletion first.
    scan.set.changes.sort_by(|a, b| a.path.cmp(&b.path));
    scan.set.removed_dirs.sort();
    scan.set.removed_dirs.dedup();
    Ok(scan.set)
}

fn bytes(p: &Path) -> &[u8] {
    p.as_os_str().as_bytes()
}

/// Content of both sides of a change.
fn sides(layers: &Layers, c: &Change) -> io::Result<(Vec<u8>, Vec<u8>)> {
    let old = match &c.old {
        Some(_) => {
            let p = layers.lower.join(c.old_path());
            match lstat_opt(&p)? {
                Some(md) => read_content(&p, &md)?,
                None => Vec::new(),
            }
        }
        None => Vec::new(),
    };
    let new = match &c.new {
        Some(_) => {
            let p = layers.upper.join(&c.path);
            match lstat_opt(&p)? {
                Some(md) => read_content(&p, &md)?,
                None => Vec::new(),
            }
        }
        None => Vec::new(),
    };
    Ok((old, new))
}

/// The changes as a patch in `git diff`'s format (`git apply` takes it
/// in the project directory).
pub fn write_diff(layers: &Layers, set: &ChangeSet, out: &mut dyn Write) -> io::Result<()> {
    for c in &set.changes {
        let (old, new) = sides(layers, c)?;
        let mut file = |old_mode: Option<u32>, new_mode: Option<u32>, old: &[u8], new: &[u8]| {
            patch::FilePatch {
                old_path: bytes(c.old_path()),
                new_path: bytes(&c.path),
                old_mode,
                new_mode,
                old,
                new,
            }
            .write(out)
        };
        let old_mode = c.old.map(|e| e.mode);
        let new_mode = c.new.map(|e| e.mode);
        if c.kind == ChangeKind::TypeChanged {
            // Git shows a type change as a deletion and an addition.
            file(old_mode, None, &old, &[])?;
            file(None, new_mode, &[], &new)?;
        } else {
            file(old_mode, new_mode, &old, &new)?;
        }
    }
    Ok(())
}

/// A `git diff --stat` summary of the changes.
pub fn write_stat(layers: &Layers, set: &ChangeSet, out: &mut dyn Write) -> io::Result<()> {
    let mut stats = Vec::new();
    for c in &set.changes {
        let (old, new) = sides(layers, c)?;
        let name = match &c.kind {
            ChangeKind::Renamed { from } => format!(
                "{} => {}",
                patch::quote("", bytes(from)),
                patch::quote("", bytes(&c.path))
            ),
            _ => patch::quote("", bytes(&c.path)),
        };
        let lines = if patch::is_binary(&old) || patch::is_binary(&new) {
            None
        } else {
            Some(patch::line_counts(&old, &new))
        };
        stats.push(patch::StatLine {
            name,
            lines,
            sizes: (old.len() as u64, new.len() as u64),
        });
    }
    patch::write_stat(out, &stats)
}

/// Why writing the VM's entry at `p` would overwrite a host change.
fn write_conflict(layers: &Layers, p: &Path, renamed_inos: &HashSet<u64>) -> io::Result<Option<String>> {
    let upper = layers.upper.join(p);
    let Some(umd) = lstat_opt(&upper)? else {
        return Ok(Some("the VM's copy is gone; run `mvm diff` again".into()));
    };
    let host = layers.lower.join(p);
    let origin = read_origin(&upper)?;
    let Some(hmd) = lstat_opt(&host)? else {
        return Ok(match origin {
            Some(o) if !renamed_inos.contains(&o.ino) => Some("deleted on the host since the VM copied it".into()),
            _ => None,
        });
    };
    if is_tracked(&hmd) && same_content(&host, &hmd, &upper, &umd)? && git_mode(hmd.mode()) == git_mode(umd.mode()) {
        return Ok(None);
    }
    if let Some(o) = origin.filter(|o| o.ino == hmd.ino()) {
        return Ok((!origin_matches(&o, &hmd)).then(|| "changed on the host since the VM copied it".into()));
    }
    Ok((ctime_ns(&hmd) > ctime_ns(&umd)).then(|| "changed on the host after the VM's change".into()))
}

/// Host entries that changed since the VM took them (the rule is in the
/// module's documentation).
pub fn conflicts(layers: &Layers, set: &ChangeSet) -> io::Result<Vec<Conflict>> {
    let renamed_inos: HashSet<u64> = set
        .changes
        .iter()
        .filter(|c| matches!(c.kind, ChangeKind::Deleted | ChangeKind::Renamed { .. }))
        .filter_map(|c| c.old.map(|o| o.ino))
        .collect();
    let mut out = Vec::new();
    for c in &set.changes {
        let mut push = |path: &Path, reason: String| {
            out.push(Conflict {
                path: path.to_path_buf(),
                reason,
            })
        };
        if matches!(c.kind, ChangeKind::Deleted | ChangeKind::Renamed { .. }) {
            let from = c.old_path();
            if let Some(hmd) = lstat_opt(&layers.lower.join(from))? {
                if ctime_ns(&hmd) > c.deleted_at.unwrap_or(i128::MAX) {
                    push(from, "changed on the host after the VM deleted it".into());
                }
            }
        }
        if c.new.is_some() {
            if let Some(reason) = write_conflict(layers, &c.path, &renamed_inos)? {
                push(&c.path, reason);
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out.dedup_by(|a, b| a.path == b.path);
    Ok(out)
}

/// What `apply` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Paths written (added, modified, renamed to).
    pub written: Vec<PathBuf>,
    /// Paths removed from the project.
    pub removed: Vec<PathBuf>,
    /// Directories the VM removed that could not be removed on the host
    /// (not empty: things git does not track, such as sockets).
    pub kept_dirs: Vec<PathBuf>,
}

/// Creates the missing directories above `p` in the project, with the
/// modes of the VM's directories, refusing to go through a symlink.
fn make_parents(layers: &Layers, p: &Path) -> io::Result<()> {
    let mut cur = PathBuf::new();
    let Some(parent) = p.parent() else { return Ok(()) };
    for c in parent.components() {
        cur.push(c);
        let host = layers.lower.join(&cur);
        match lstat_opt(&host)? {
            Some(md) if md.is_dir() => {}
            Some(_) => {
                return Err(io::Error::other(format!(
                    "{} is not a directory on the host",
                    host.display()
                )))
            }
            None => {
                std::fs::create_dir(&host)?;
                if let Some(umd) = lstat_opt(&layers.upper.join(&cur))? {
                    std::fs::set_permissions(&host, std::fs::Permissions::from_mode(umd.mode() & 0o7777))?;
                }
                own_like_parent(&host, None);
            }
        }
    }
    Ok(())
}

/// New host entries belong to the host entry they replace, or to their
/// directory's owner (not to root when mvm runs as root).
fn own_like_parent(path: &Path, replaced: Option<&Metadata>) {
    // SAFETY: no arguments.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let owner = match replaced {
        Some(md) => Some((md.uid(), md.gid())),
        None => path
            .parent()
            .and_then(|d| std::fs::symlink_metadata(d).ok())
            .map(|md| (md.uid(), md.gid())),
    };
    if let Some((uid, gid)) = owner {
        let _ = std::os::unix::fs::lchown(path, Some(uid), Some(gid));
    }
}

/// Writes the VM's entry at `p` into the project: complete under a
/// temporary name, then renamed into place.
fn write_entry(layers: &Layers, p: &Path) -> io::Result<()> {
    let upper = layers.upper.join(p);
    let umd = std::fs::symlink_metadata(&upper)?;
    make_parents(layers, p)?;
    let host = layers.lower.join(p);
    let replaced = lstat_opt(&host)?;
    if replaced.as_ref().is_some_and(|md| md.is_dir()) {
        return Err(io::Error::other(format!(
            "{} is a directory on the host",
            host.display()
        )));
    }
    let mut tmp_name = OsString::from(".mvm-apply-");
    tmp_name.push(format!("{}-", std::process::id()));
    tmp_name.push(p.file_name().unwrap_or(OsStr::new("x")));
    let tmp = host.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        if umd.file_type().is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&upper)?, &tmp)?;
        } else {
            let mut src = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&upper)?;
            let mut dst = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            io::copy(&mut src, &mut dst)?;
            dst.set_permissions(std::fs::Permissions::from_mode(umd.mode() & 0o7777))?;
            dst.set_modified(umd.modified()?)?;
        }
        own_like_parent(&tmp, replaced.as_ref());
        std::fs::rename(&tmp, &host)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes the changes into the project when no path conflicts (else
/// returns the conflicts and writes nothing). Afterwards the written upper
/// entries carry the new host entries as their origin and the whiteouts
/// of removed paths are gone, so the changes no longer show and a later
/// host edit is again a conflict. Upper entries stay (a running VM may
/// have them open); `reset` drops them.
pub fn apply(layers: &Layers, set: &ChangeSet) -> io::Result<Result<Applied, Vec<Conflict>>> {
    let found = conflicts(layers, set)?;
    if !found.is_empty() {
        return Ok(Err(found));
    }
    let mut done = Applied::default();
    for c in &set.changes {
        if matches!(c.kind, ChangeKind::Deleted | ChangeKind::Renamed { .. }) {
            let from = c.old_path();
            let host = layers.lower.join(from);
            if lstat_opt(&host)?.is_some_and(|md| !md.is_dir()) {
                std::fs::remove_file(&host)?;
                done.removed.push(from.to_path_buf());
            }
        }
    }
    for dir in set.removed_dirs.iter().rev() {
        let host = layers.lower.join(dir);
        match std::fs::remove_dir(&host) {
            Ok(()) => done.removed.push(dir.clone()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                log::debug!("apply: keeping {}: {e}", host.display());
                done.kept_dirs.push(dir.clone());
            }
        }
    }
    for c in &set.changes {
        if c.new.is_some() {
            write_entry(layers, &c.path)?;
            done.written.push(c.path.clone());
            let upper = layers.upper.join(&c.path);
            if let (Some(hmd), Some(umd)) = (lstat_opt(&layers.lower.join(&c.path))?, lstat_opt(&upper)?) {
                if !umd.file_type().is_symlink() {
                    set_xattr(&upper, ORIGIN_XATTR, origin_value(&hmd).as_bytes())?;
                }
            }
        }
    }
    // A whiteout over nothing hides nothing: dropping it changes nothing
    // the guest sees, and a path the host creates later shows in the VM.
    let mut whiteouts = set.whiteouts.clone();
    whiteouts.sort();
    whiteouts.dedup();
    for w in whiteouts {
        let upper = layers.upper.join(&w);
        if lstat_opt(&layers.lower.join(&w))?.is_none() && lstat_opt(&upper)?.is_some_and(|md| is_whiteout(&md)) {
            std::fs::remove_file(&upper)?;
        }
    }
    Ok(Ok(done))
}

/// Drops the VM's changes at or below `paths` (all of them when empty)
/// from the upper layer; returns the upper entries removed. A path below
/// a directory the VM deleted or replaced cannot be reset alone.
pub fn reset(layers: &Layers, paths: &[PathBuf]) -> io::Result<Result<Vec<PathBuf>, String>> {
    let mut removed = Vec::new();
    if paths.is_empty() || paths.iter().any(|p| p.as_os_str().is_empty()) {
        for name in std::fs::read_dir(&layers.upper)? {
            let p = PathBuf::from(name?.file_name());
            remove_upper(layers, &p)?;
            removed.push(p);
        }
        removed.sort();
        return Ok(Ok(removed));
    }
    for p in paths {
        // Above p, every upper entry must be a directory that lets the
        // host show through, or resetting p would not bring the host back.
        let mut cur = PathBuf::new();
        for c in p.parent().map(|d| d.components()).into_iter().flatten() {
            cur.push(c);
            let Some(md) = lstat_opt(&layers.upper.join(&cur))? else {
                break;
            };
            let opaque = md.is_dir() && get_xattr(&layers.upper.join(&cur), OPAQUE_XATTR)?.is_some_and(|v| v == b"y");
            let hides = !md.is_dir() || opaque;
            if hides && lstat_opt(&layers.lower.join(p))?.is_some() {
                return Ok(Err(format!(
                    "{} is inside {}, which the VM deleted or replaced; reset {} instead",
                    p.display(),
                    cur.display(),
                    cur.display()
                )));
            }
        }
        if lstat_opt(&layers.upper.join(p))?.is_some() {
            remove_upper(layers, p)?;
            removed.push(p.clone());
        }
    }
    Ok(Ok(removed))
}

fn remove_upper(layers: &Layers, p: &Path) -> io::Result<()> {
    let path = layers.upper.join(p);
    match std::fs::symlink_metadata(&path) {
        Ok(md) if md.is_dir() => std::fs::remove_dir_all(&path),
        Ok(_) => std::fs::remove_file(&path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}
