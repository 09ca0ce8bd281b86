//! Guest root file system images: Debian trees made by `mmdebstrap`,
//! written to ext4 with `mkfs.ext4 -d` (no mount, no loop device), kept
//! read-only and shared by every VM made from them.
//!
//! ```text
//! <image dir>/                    $MVM_IMAGE_DIR, default <state root>/images
//!   <name>-<id>/                  one image; never changed once made
//!     rootfs.ext4                 the file system (sparse, no journal)
//!     image.json                  what it was built from (ImageInfo)
//!   .tmp-<name>-<id>-<pid>/       a build in progress (renamed into place)
//!   .lock                         held while a build runs
//! ```
//!
//! `<id>` is a hash of everything the image is built from (suite, packages,
//! mirror, this builder's recipe), so a build with the same inputs finds
//! the existing image instead of building again, and a VM's `vm.toml`
//! points at a file that never changes under it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::manager::{FileLock, RemoveOnDrop};
use crate::{Error, Result};

/// Environment variable naming the image directory.
pub const IMAGE_DIR_ENV: &str = "MVM_IMAGE_DIR";
/// The image `mvm create` uses unless told otherwise.
pub const DEFAULT_IMAGE: &str = "default";
/// The Debian release images are built from unless told otherwise.
pub const DEFAULT_SUITE: &str = "bookworm";
/// What the default image has on top of Debian's minbase: a shell, the
/// tools a developer reaches for first, a compiler, an editor, and sudo
/// (the VM's user gets password-less sudo from the agent).
pub const DEFAULT_PACKAGES: &[&str] = &[
    "bash",
    "build-essential",
    "ca-certificates",
    "coreutils",
    "curl",
    "git",
    "iproute2",
    "less",
    "nano",
    "procps",
    "sudo",
    "vim-tiny",
];
/// The image file in an image's directory.
pub const ROOTFS: &str = "rootfs.ext4";
const META: &str = "image.json";
/// Changes whenever the build steps below change what an image holds, so
/// old cached images are not taken for new ones.
const RECIPE: &str =
    "mvm-image/4: mmdebstrap minbase, apt lists and caches kept, no safe.directory, ext4 without journal";
/// Longest image name.
const MAX_NAME_LEN: usize = 32;

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// `[a-z0-9][a-z0-9-]*`; VMs name the image by it.
    pub name: String,
    /// Debian suite or codename (`bookworm`, `stable`, `trixie`, ...).
    pub suite: String,
    /// Packages on top of minbase.
    pub packages: Vec<String>,
    /// Debian mirror URL; default: the one mmdebstrap picks (deb.debian.org).
    pub mirror: Option<String>,
}

impl Default for ImageSpec {
    fn default() -> Self {
        ImageSpec {
            name: DEFAULT_IMAGE.into(),
            suite: DEFAULT_SUITE.into(),
            packages: DEFAULT_PACKAGES.iter().map(|p| p.to_string()).collect(),
            mirror: None,
        }
    }
}

impl ImageSpec {
    /// Check every field; the messages name the option to fix.
    pub fn validate(&self) -> Result<()> {
        validate_image_name(&self.name)?;
        let word = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b))
                && s.as_bytes()[0].is_ascii_alphanumeric()
        };
        if !word(&self.suite) {
            return Err(Error::Usage(format!(
                "suite {:?}: expected a Debian suite or codename such as bookworm, stable or trixie",
                self.suite
            )));
        }
        if let Some(bad) = self.packages.iter().find(|p| !word(p)) {
            return Err(Error::Usage(format!(
                "package {bad:?}: not a Debian package name (lowercase letters, digits, '+', '-', '.')"
            )));
        }
        if let Some(m) = &self.mirror {
            let ok = (m.starts_with("http://") || m.starts_with("https://") || m.starts_with("file:/"))
                && !m.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control());
            if !ok {
                return Err(Error::Usage(format!(
                    "mirror {m:?}: expected an http://, https:// or file:/ URL"
                )));
            }
        }
        Ok(())
    }

    /// The packages, sorted and without repeats (their order and repeats
    /// do not change the image).
    fn package_set(&self) -> Vec<String> {
        let mut p = self.packages.clone();
        p.sort();
        p.dedup();
        p
    }

    /// Hash of every input: equal ids, equal images.
    pub fn id(&self) -> String {
        let mut h = Sha256::new();
        for part in [RECIPE, &self.suite, self.mirror.as_deref().unwrap_or("")] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        for p in self.package_set() {
            h.update(p.as_bytes());
            h.update([0]);
        }
        h.finalize()[..6].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// An image `[a-z0-9][a-z0-9-]*`, at most 32 bytes.
pub fn validate_image_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::Usage(format!(
            "image name {name:?}: 1-{MAX_NAME_LEN} of lowercase letters, digits and '-', starting with a letter or digit"
        )))
    }
}

/// A built image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub name: String,
    pub id: String,
    pub suite: String,
    pub packages: Vec<String>,
    pub mirror: Option<String>,
    /// Unix time the build finished.
    pub created: u64,
    /// The file's size (what the guest sees).
    pub size_bytes: u64,
    /// Host disk it takes (the file is sparse).
    #[serde(default)]
    pub disk_bytes: u64,
    /// Seconds the build took.
    pub build_secs: f64,
    /// The image file (filled in when read, not stored).
    #[serde(skip)]
    pub path: PathBuf,
}

impl ImageInfo {
    /// `<name>-<id>`, the image's directory name and full reference.
    pub fn reference(&self) -> String {
        format!("{}-{}", self.name, self.id)
    }
}

/// Progress reports of a build, for a terminal.
pub enum Progress<'a> {
    /// A new step begins.
    Step(&'a str),
    /// A line of detail within the step (mmdebstrap's own progress).
    Detail(&'a str),
}

/// The images in one directory.
#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
}

impl ImageStore {
    pub fn new(dir: PathBuf) -> Self {
        ImageStore { dir }
    }

    /// `$MVM_IMAGE_DIR` if set, else `<state root>/images`.
    pub fn for_state_root(root: &Path) -> Self {
        match std::env::var_os(IMAGE_DIR_ENV) {
            Some(d) if !d.is_empty() => ImageStore::new(PathBuf::from(d)),
            _ => ImageStore::new(root.join("images")),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every image, by name then newest first.
    pub fn list(&self) -> Result<Vec<ImageInfo>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(format!("cannot read {}", self.dir.display()))(e)),
        };
        let mut out: Vec<ImageInfo> = entries
            .filter_map(|e| e.ok())
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .filter_map(|e| read_info(&e.path()))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name).then(b.created.cmp(&a.created)));
        Ok(out)
    }

    /// The image `reference` names: `<name>` (its newest build),
    /// `<name>-<id>`, or an id (or unique id prefix of at least 4).
    pub fn find(&self, reference: &str) -> Result<Option<ImageInfo>> {
        Ok(self.matching(reference)?.into_iter().next())
    }

    /// Every image `reference` names, newest first (a bare name names all
    /// builds of that name).
    fn matching(&self, reference: &str) -> Result<Vec<ImageInfo>> {
        let all = self.list()?;
        let by_name: Vec<ImageInfo> = all.iter().filter(|i| i.name == reference).cloned().collect();
        if !by_name.is_empty() {
            return Ok(by_name);
        }
        let exact: Vec<ImageInfo> = all.iter().filter(|i| i.reference() == reference).cloned().collect();
        if !exact.is_empty() {
            return Ok(exact);
        }
        if reference.len() >= 4 && reference.bytes().all(|b| b.is_ascii_hexdigit()) {
            let by_id: Vec<ImageInfo> = all.into_iter().filter(|i| i.id.starts_with(reference)).collect();
            if by_id.len() > 1 {
                return Err(Error::Usage(format!(
                    "image id {reference:?} is ambiguous: {}",
                    by_id.iter().map(ImageInfo::reference).collect::<Vec<_>>().join(", ")
                )));
            }
            return Ok(by_id);
        }
        Ok(Vec::new())
    }

    /// The image `spec` describes: the cached one if it exists, else built
    /// now. `progress` hears about each step.
    pub fn build(&self, spec: &ImageSpec, progress: &mut dyn FnMut(Progress<'_>)) -> Result<(ImageInfo, bool)> {
        spec.validate()?;
        let id = spec.id();
        let final_dir = self.dir.join(format!("{}-{id}", spec.name));
        if let Some(info) = read_info(&final_dir) {
            return Ok((info, false));
        }
        std::fs::create_dir_all(&self.dir).map_err(Error::io(format!("cannot create {}", self.dir.display())))?;
        // One build at a time: two of the same image would do the work
        // twice, two different ones would compete for the disk.
        let lock_path = self.dir.join(".lock");
        let lock = match FileLock::try_acquire(&lock_path)? {
            Some(lock) => lock,
            None => {
                progress(Progress::Step("waiting for another image build to finish"));
                FileLock::acquire(&lock_path)?
            }
        };
        if let Some(info) = read_info(&final_dir) {
            return Ok((info, false));
        }
        check_root_user()?;
        let mmdebstrap = tool("mmdebstrap", "mmdebstrap")?;
        let mkfs = tool("mkfs.ext4", "e2fsprogs")?;
        let tmp = self.dir.join(format!(".tmp-{}-{id}-{}", spec.name, std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp).map_err(Error::io(format!("cannot create {}", tmp.display())))?;
        let mut guard = RemoveOnDrop(Some(tmp.clone()));
        let started = std::time::Instant::now();
        let tree = tmp.join("tree");
        let packages = spec.package_set();
        progress(Progress::Step(&format!(
            "running mmdebstrap: Debian {} minbase + {} packages",
            spec.suite,
            packages.len()
        )));
        self.mmdebstrap(&mmdebstrap, spec, &packages, &tree, progress)?;

        progress(Progress::Step("measuring the tree"));
        let usage = tree_usage(&tree).map_err(Error::io(format!("cannot read {}", tree.display())))?;
        let size_bytes = image_size(usage.bytes);
        let inodes = usage.inodes + usage.inodes / 4 + 1024;
        let free = free_bytes(&self.dir).map_err(Error::io(format!("cannot stat {}", self.dir.display())))?;
        // The image takes about what the tree takes (sparse file), and the
        // tree is deleted only after.
        if free < usage.bytes + (64 << 20) {
            return Err(no_space(&self.dir, usage.bytes + (64 << 20), free));
        }
        progress(Progress::Step(&format!(
            "writing {ROOTFS} ({} MiB, {} files) with mkfs.ext4 -d",
            size_bytes >> 20,
            usage.inodes
        )));
        let image = tmp.join(ROOTFS);
        let file = std::fs::File::create(&image).map_err(Error::io(format!("cannot create {}", image.display())))?;
        file.set_len(size_bytes)
            .map_err(Error::io(format!("cannot size {}", image.display())))?;
        drop(file);
        let out = Command::new(&mkfs)
            .args([
                "-q",
                "-F",
                "-t",
                "ext4",
                "-O",
                "^has_journal",
                "-m",
                "0",
                "-L",
                "mvm-root",
            ])
            .arg("-N")
            .arg(inodes.to_string())
            .arg("-d")
            .arg(&tree)
            .arg(&image)
            .output()
            .map_err(Error::io(format!("cannot run {}", mkfs.display())))?;
        if !out.status.success() {
            let text = String::from_utf8_lossy(&out.stderr).trim().to_string();
            let free = free_bytes(&self.dir).unwrap_or(u64::MAX);
            if text.contains("No space left") || free < (16 << 20) {
                return Err(no_space(&self.dir, usage.bytes + (64 << 20), free));
            }
            return Err(Error::ImageBuild {
                name: spec.name.clone(),
                step: "mkfs.ext4",
                detail: format!("{}: {text}", out.status),
            });
        }
        progress(Progress::Step("removing the build tree"));
        std::fs::remove_dir_all(&tree).map_err(Error::io(format!("cannot remove {}", tree.display())))?;
        let info = ImageInfo {
            name: spec.name.clone(),
            id,
            suite: spec.suite.clone(),
            packages,
            mirror: spec.mirror.clone(),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            size_bytes,
            disk_bytes: 0,
            build_secs: (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
            path: PathBuf::new(),
        };
        let meta = serde_json::to_string_pretty(&info).map_err(|e| Error::ImageBuild {
            name: spec.name.clone(),
            step: "metadata",
            detail: e.to_string(),
        })?;
        std::fs::write(tmp.join(META), meta + "\n").map_err(Error::io(format!("cannot write {META}")))?;
        std::fs::rename(&tmp, &final_dir).map_err(Error::io(format!(
            "cannot rename {} to {}",
            tmp.display(),
            final_dir.display()
        )))?;
        guard.0 = None;
        drop(lock);
        let info = read_info(&final_dir).ok_or_else(|| Error::ImageBuild {
            name: spec.name.clone(),
            step: "metadata",
            detail: format!("{} unreadable right after the build", final_dir.join(META).display()),
        })?;
        Ok((info, true))
    }

    fn mmdebstrap(
        &self,
        program: &Path,
        spec: &ImageSpec,
        packages: &[String],
        tree: &Path,
        progress: &mut dyn FnMut(Progress<'_>),
    ) -> Result<()> {
        let mut cmd = Command::new(program);
        cmd.arg("--variant=minbase")
            // The package lists stay: apt-get install works offline of an
            // `apt-get update`, and apt-cache can answer at once.
            .arg("--skip=cleanup/apt/lists")
            // apt's binary caches stay too, made now on the host: a guest
            // building them parses 50 MB of package lists in its kernel
            // (ten minutes on hosts that interpret it). The downloaded
            // .debs go.
            .arg("--skip=cleanup/apt/cache")
            .arg("--customize-hook=chroot \"$1\" apt-cache gencaches >/dev/null")
            .arg("--customize-hook=find \"$1/var/cache/apt/archives\" -name '*.deb' -delete")
            // The guest's agent is its init; these only matter to a
            // systemd boot but keep tools like hostname happy.
            .arg("--customize-hook=echo localhost > \"$1/etc/hostname\"")
            // No `safe.directory`: the VM's user has the host user's uid,
            // so git sees the project as its own (docs/manager.md).
            .arg("--customize-hook=mkdir -p \"$1/project\"");
        if !packages.is_empty() {
            cmd.arg(format!("--include={}", packages.join(",")));
        }
        cmd.arg(&spec.suite).arg(tree);
        if let Some(m) = &spec.mirror {
            cmd.arg(m);
        }
        // mmdebstrap reports on stderr; its stdout is for a tarball (unused).
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(Error::io(format!("cannot run {}", program.display())))?;
        let mut tail: std::collections::VecDeque<String> = std::collections::VecDeque::new();
        if let Some(stderr) = child.stderr.take() {
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                progress(Progress::Detail(&line));
                if tail.len() == 12 {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        }
        let status = child
            .wait()
            .map_err(Error::io(format!("waiting for {}", program.display())))?;
        if status.success() {
            return Ok(());
        }
        let free = free_bytes(&self.dir).unwrap_or(u64::MAX);
        if free < (64 << 20) || tail.iter().any(|l| l.contains("No space left on device")) {
            return Err(no_space(&self.dir, 1 << 30, free));
        }
        // apt's own "E:" lines say what was wrong (unknown suite, unknown
        // package, unreachable mirror); keep them, then the rest.
        let errors: Vec<&String> = tail
            .iter()
            .filter(|l| l.starts_with("E: ") && !l.contains("mmdebstrap failed to run"))
            .collect();
        let shown: Vec<&String> = if errors.is_empty() {
            tail.iter().collect()
        } else {
            errors
        };
        Err(Error::ImageBuild {
            name: spec.name.clone(),
            step: "mmdebstrap",
            detail: format!(
                "{status}:\n  {}",
                shown.iter().map(|l| l.as_str()).collect::<Vec<_>>().join("\n  ")
            ),
        })
    }

    /// Delete the images `reference` names, unless a VM uses one.
    /// `users(path)` names the VMs whose root is that image file.
    pub fn remove(&self, reference: &str, users: &dyn Fn(&Path) -> Vec<String>) -> Result<Vec<ImageInfo>> {
        let found = self.matching(reference)?;
        if found.is_empty() {
            return Err(Error::UnknownImage {
                reference: reference.into(),
                dir: self.dir.clone(),
            });
        }
        for image in &found {
            let vms = users(&image.path);
            if !vms.is_empty() {
                return Err(Error::ImageInUse {
                    image: image.reference(),
                    vms: vms.join(", "),
                });
            }
        }
        for image in &found {
            let dir = self.dir.join(image.reference());
            // Renamed first, so a half-deleted image is never found.
            let doomed = self
                .dir
                .join(format!(".rm-{}-{}", image.reference(), std::process::id()));
            std::fs::rename(&dir, &doomed).map_err(Error::io(format!("cannot remove {}", dir.display())))?;
            std::fs::remove_dir_all(&doomed).map_err(Error::io(format!("cannot remove {}", doomed.display())))?;
        }
        Ok(found)
    }
}

/// The metadata of the image in `dir`, if it is a complete image.
fn read_info(dir: &Path) -> Option<ImageInfo> {
    use std::os::unix::fs::MetadataExt;
    let text = std::fs::read_to_string(dir.join(META)).ok()?;
    let mut info: ImageInfo = serde_json::from_str(&text).ok()?;
    let path = dir.join(ROOTFS);
    let meta = std::fs::metadata(&path).ok()?;
    info.size_bytes = meta.len();
    info.disk_bytes = meta.blocks() * 512;
    info.path = path;
    Some(info)
}

/// Bytes and inodes a tree takes (blocks actually allocated, hard links
/// once).
struct Usage {
    bytes: u64,
    inodes: u64,
}

fn tree_usage(root: &Path) -> std::io::Result<Usage> {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut usage = Usage { bytes: 0, inodes: 0 };
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.nlink() > 1 && !meta.is_dir() && !seen.insert(meta.ino()) {
                continue;
            }
            usage.inodes += 1;
            usage.bytes += meta.blocks() * 512;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok(usage)
}

/// The image file's size for a tree of `used` bytes: ext4's metadata and
/// block rounding on top, and some free room (the image is only read, but
/// a full ext4 is slow to allocate from when building). Whole MiB.
fn image_size(used: u64) -> u64 {
    let size = used + used / 5 + (128 << 20);
    size.div_ceil(1 << 20) << 20
}

fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains NUL"))?;
    // SAFETY: statvfs fills the struct; the path is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

fn no_space(dir: &Path, need: u64, free: u64) -> Error {
    Error::NoSpace {
        dir: dir.to_path_buf(),
        need_mib: need.div_ceil(1 << 20),
        free_mib: free >> 20,
    }
}

/// mmdebstrap writes files owned by other users and device nodes, and
/// mkfs.ext4 -d copies ownership as it finds it: only root can do both.
fn check_root_user() -> Result<()> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::Usage(
            "building an image needs root (mmdebstrap creates files of other owners); run mvm image build with sudo"
                .into(),
        ));
    }
    Ok(())
}

fn tool(name: &str, package: &str) -> Result<PathBuf> {
    microvm_dev::state::find_tool(name)
        .ok_or_else(|| Error::Usage(format!("{name} not found: install the Debian package {package}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ImageSpec {
        ImageSpec::default()
    }

    #[test]
    fn id_depends_on_inputs_not_on_order_or_name() {
        let a = spec();
        let mut b = spec();
        b.packages.reverse();
        b.packages.push("git".into());
        b.name = "other".into();
        assert_eq!(a.id(), b.id());
        assert_eq!(a.id().len(), 12);
        let mut c = spec();
        c.suite = "trixie".into();
        assert_ne!(a.id(), c.id());
        let mut d = spec();
        d.packages.push("python3".into());
        assert_ne!(a.id(), d.id());
        let mut e = spec();
        e.mirror = Some("http://ftp.de.debian.org/debian".into());
        assert_ne!(a.id(), e.id());
    }

    #[test]
    fn validation_names_the_bad_value() {
        spec().validate().unwrap();
        let bad = |f: &dyn Fn(&mut ImageSpec), want: &str| {
            let mut s = spec();
            f(&mut s);
            let e = s.validate().unwrap_err();
            assert_eq!(e.exit_code(), 2);
            assert!(e.to_string().contains(want), "{e}");
        };
        bad(&|s| s.name = "Bad".into(), "image name \"Bad\"");
        bad(&|s| s.name = String::new(), "image name");
        bad(&|s| s.name = "-x".into(), "image name");
        bad(&|s| s.name = "a".repeat(33), "image name");
        bad(&|s| s.suite = "book worm".into(), "suite \"book worm\"");
        bad(&|s| s.suite = "--help".into(), "suite");
        bad(&|s| s.packages.push("git;rm".into()), "package \"git;rm\"");
        bad(&|s| s.packages.push("-oDebug".into()), "package");
        bad(&|s| s.packages.push(String::new()), "package \"\"");
        bad(&|s| s.mirror = Some("ftp.debian.org".into()), "mirror");
        bad(&|s| s.mirror = Some("http://x y".into()), "mirror");
    }

    #[test]
    fn sizes_leave_room() {
        assert_eq!(image_size(0), 128 << 20);
        let s = image_size(500 << 20);
        assert!(s >= (600 << 20) + (128 << 20) && s % (1 << 20) == 0);
    }

    fn fake_image(store: &ImageStore, name: &str, id: &str, created: u64) -> PathBuf {
        let dir = store.dir().join(format!("{name}-{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(ROOTFS), b"").unwrap();
        let info = ImageInfo {
            name: name.into(),
            id: id.into(),
            suite: "bookworm".into(),
            packages: vec!["git".into()],
            mirror: None,
            created,
            size_bytes: 0,
            disk_bytes: 0,
            build_secs: 1.0,
            path: PathBuf::new(),
        };
        std::fs::write(dir.join(META), serde_json::to_string(&info).unwrap()).unwrap();
        dir.join(ROOTFS)
    }

    #[test]
    fn list_find_remove() {
        let dir = std::env::temp_dir().join(format!("mvm-images-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = ImageStore::new(dir.clone());
        assert!(store.list().unwrap().is_empty());
        let old = fake_image(&store, "default", "aaaa11112222", 100);
        let new = fake_image(&store, "default", "bbbb11112222", 200);
        let py = fake_image(&store, "py", "cccc11112222", 150);
        // Incomplete builds and leftovers are not images.
        std::fs::create_dir_all(dir.join(".tmp-x-1-2")).unwrap();
        std::fs::create_dir_all(dir.join("broken-123456789012")).unwrap();
        let names: Vec<String> = store.list().unwrap().iter().map(ImageInfo::reference).collect();
        assert_eq!(
            names,
            ["default-bbbb11112222", "default-aaaa11112222", "py-cccc11112222"]
        );
        assert_eq!(store.find("default").unwrap().unwrap().path, new);
        assert_eq!(store.find("default-aaaa11112222").unwrap().unwrap().path, old);
        assert_eq!(store.find("cccc").unwrap().unwrap().path, py);
        assert!(store.find("ccc").unwrap().is_none(), "prefixes need 4 digits");
        assert!(store.find("nothing").unwrap().is_none());
        std::fs::create_dir_all(dir.join("x-aaaa99999999")).unwrap();
        fake_image(&store, "x", "aaaa99999999", 1);
        assert!(store.find("aaaa").unwrap_err().to_string().contains("ambiguous"));

        // In use: refused, nothing removed.
        let users = |p: &Path| if p == py { vec!["dev".to_string()] } else { Vec::new() };
        let e = store.remove("py", &users).unwrap_err().to_string();
        assert!(e.contains("py-cccc11112222") && e.contains("dev"), "{e}");
        assert!(py.exists());
        // A name removes every build of it.
        let gone = store.remove("default", &users).unwrap();
        assert_eq!(gone.len(), 2);
        assert!(!old.exists() && !new.exists());
        assert!(matches!(
            store.remove("default", &users),
            Err(Error::UnknownImage { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
