//! On real temporary layers; the upper layer is made by the in-process
//! overlay (as the VM's file server makes it) or by hand (whiteouts need
//! root: mknod 0/0).

use super::*;
use std::ffi::CStr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use mvm_storage::fs::overlay::{Overlay, OverlayOptions};
use mvm_storage::fs::{Context, FileSystem, SetAttr, ROOT_ID};

static NEXT: AtomicU32 = AtomicU32::new(0);

struct Env {
    dir: PathBuf,
    layers: Layers,
}

impl Env {
    fn new() -> Env {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("mvm-changes-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let layers = Layers {
            lower: dir.join("project"),
            upper: dir.join("upper"),
        };
        std::fs::create_dir_all(&layers.lower).unwrap();
        std::fs::create_dir_all(&layers.upper).unwrap();
        let env = Env { dir, layers };
        env.host("a.txt", &lines(1, 20));
        env.host("dir/b.txt", "beta\n");
        env.host("dir/sub/c.txt", "gamma\n");
        env.host("gone.txt", "to be deleted\n");
        env.host("moved.txt", "a file that moves\nwith two lines\n");
        env.host("script.sh", "#!/bin/sh\necho hi\n");
        std::os::unix::fs::symlink("a.txt", env.layers.lower.join("link")).unwrap();
        env
    }

    fn host(&self, rel: &str, content: &str) {
        let p = self.layers.lower.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    fn overlay(&self) -> Overlay {
        Overlay::new(Some(&self.layers.lower), &self.layers.upper, OverlayOptions::default()).unwrap()
    }

    fn scan(&self, paths: &[&str]) -> ChangeSet {
        let paths: Vec<PathBuf> = paths.iter().map(PathBuf::from).collect();
        scan(&self.layers, &paths).unwrap()
    }

    fn diff(&self, set: &ChangeSet) -> String {
        let mut out = Vec::new();
        write_diff(&self.layers, set, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn lines(from: u32, to: u32) -> String {
    (from..=to).map(|i| format!("line {i}\n")).collect()
}

fn ctx() -> Context {
    Context { uid: 0, gid: 0, pid: 1 }
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

fn walk(fs: &mut Overlay, path: &str) -> u64 {
    let mut ino = ROOT_ID;
    for part in path.split('/') {
        ino = fs.lookup(ctx(), ino, &c(part)).unwrap().attr.ino;
    }
    ino
}

fn write_file(fs: &mut Overlay, path: &str, data: &[u8]) {
    let ino = walk(fs, path);
    let (h, _) = fs.open(ctx(), ino, (libc::O_WRONLY | libc::O_TRUNC) as u32).unwrap();
    fs.write(ctx(), ino, h, 0, data, 0).unwrap();
    fs.release(ino, h).unwrap();
}

fn create_file(fs: &mut Overlay, parent: &str, name: &str, data: &[u8]) {
    let dir = if parent.is_empty() { ROOT_ID } else { walk(fs, parent) };
    let (entry, h, _) = fs
        .create(ctx(), dir, &c(name), libc::S_IFREG | 0o644, libc::O_RDWR as u32, 0)
        .unwrap();
    fs.write(ctx(), entry.attr.ino, h, 0, data, 0).unwrap();
    fs.release(entry.attr.ino, h).unwrap();
}

fn names_of(set: &ChangeSet) -> Vec<String> {
    set.changes
        .iter()
        .map(|c| match &c.kind {
            ChangeKind::Renamed { from } => format!("R {} {}", from.display(), c.path.display()),
            k => format!("{} {}", format!("{k:?}").chars().next().unwrap(), c.path.display()),
        })
        .collect()
}

/// The VM's usual work through the file server: modify, add, delete,
/// rename, chmod +x.
fn vm_work(env: &Env) -> Overlay {
    let mut fs = env.overlay();
    write_file(
        &mut fs,
        "a.txt",
        lines(1, 20).replace("line 5\n", "line five\n").as_bytes(),
    );
    create_file(&mut fs, "dir", "new.txt", b"new file\n");
    create_file(&mut fs, "", "noeol.txt", b"no newline");
    create_file(&mut fs, "", "blob.bin", b"\x00\x01binary");
    fs.unlink(ctx(), ROOT_ID, &c("gone.txt")).unwrap();
    let dir = walk(&mut fs, "dir");
    fs.rename(ctx(), ROOT_ID, &c("moved.txt"), dir, &c("moved.txt"), 0)
        .unwrap();
    let script = walk(&mut fs, "script.sh");
    fs.setattr(
        ctx(),
        script,
        SetAttr {
            mode: Some(0o755),
            ..Default::default()
        },
    )
    .unwrap();
    fs
}

fn git(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new("git").current_dir(dir).args(args).output().unwrap()
}

#[test]
fn changes_and_the_git_patch() {
    let env = Env::new();
    let _fs = vm_work(&env);
    let set = env.scan(&[]);
    assert_eq!(
        names_of(&set),
        [
            "M a.txt",
            "A blob.bin",
            "R moved.txt dir/moved.txt",
            "A dir/new.txt",
            "D gone.txt",
            "A noeol.txt",
            "M script.sh"
        ]
    );
    let diff = env.diff(&set);
    assert!(
        diff.contains(
            "diff --git a/a.txt b/a.txt\n--- a/a.txt\n+++ b/a.txt\n@@ -2,7 +2,7 @@\n line 2\n line 3\n line 4\n-line 5\n+line five\n"
        ),
        "{diff}"
    );
    assert!(diff.contains(
        "diff --git a/blob.bin b/blob.bin\nnew file mode 100644\nBinary files /dev/null and b/blob.bin differ\n"
    ));
    assert!(diff.contains(
        "diff --git a/moved.txt b/dir/moved.txt\nsimilarity index 100%\nrename from moved.txt\nrename to dir/moved.txt\n"
    ));
    assert!(diff.contains("diff --git a/gone.txt b/gone.txt\ndeleted file mode 100644\n--- a/gone.txt\n+++ /dev/null\n@@ -1 +0,0 @@\n-to be deleted\n"));
    assert!(diff.contains("+no newline\n\\ No newline at end of file\n"));
    assert!(diff.contains("diff --git a/script.sh b/script.sh\nold mode 100644\nnew mode 100755\n"));

    // The proof of the format: git applies it to a copy of the project
    // (without the binary file, which needs blob hashes).
    let text_only = ChangeSet {
        changes: set
            .changes
            .iter()
            .filter(|c| !c.path.ends_with("blob.bin"))
            .cloned()
            .collect(),
        ..set.clone()
    };
    let patch = env.dir.join("changes.patch");
    std::fs::write(&patch, env.diff(&text_only)).unwrap();
    let copy = env.dir.join("copy");
    assert!(Command::new("cp")
        .arg("-a")
        .arg(&env.layers.lower)
        .arg(&copy)
        .status()
        .unwrap()
        .success());
    let check = git(&copy, &["apply", "--check", "-v", patch.to_str().unwrap()]);
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    let applied = git(&copy, &["apply", patch.to_str().unwrap()]);
    assert!(applied.status.success(), "{}", String::from_utf8_lossy(&applied.stderr));
    assert_eq!(
        std::fs::read(copy.join("a.txt")).unwrap(),
        std::fs::read(env.layers.upper.join("a.txt")).unwrap()
    );
    assert_eq!(std::fs::read(copy.join("noeol.txt")).unwrap(), b"no newline");
    assert!(!copy.join("gone.txt").exists() && !copy.join("moved.txt").exists());
    assert!(copy.join("dir/moved.txt").exists());
    assert_eq!(std::fs::metadata(copy.join("script.sh")).unwrap().mode() & 0o111, 0o111);

    let mut stat = Vec::new();
    write_stat(&env.layers, &set, &mut stat).unwrap();
    let stat = String::from_utf8(stat).unwrap();
    assert!(stat.starts_with(" a.txt                      |   2 +-\n blob.bin                   | Bin 0 -> 8 bytes\n moved.txt => dir/moved.txt |   0\n"), "{stat}");
    assert!(
        stat.ends_with(" 7 files changed, 3 insertions(+), 2 deletions(-)\n"),
        "{stat}"
    );
}

#[test]
fn path_filters() {
    let env = Env::new();
    let _fs = vm_work(&env);
    assert_eq!(names_of(&env.scan(&["dir"])), ["A dir/moved.txt", "A dir/new.txt"]);
    assert_eq!(names_of(&env.scan(&["a.txt", "gone.txt"])), ["M a.txt", "D gone.txt"]);
    assert!(env.scan(&["dir/sub"]).is_empty());
    assert!(env.scan(&["nothing/here"]).is_empty());
    assert_eq!(
        normalize_paths(Path::new("/p"), &[PathBuf::from("./x/"), PathBuf::from("/p/y/z")]).unwrap(),
        [PathBuf::from("x"), PathBuf::from("y/z")]
    );
    assert!(normalize_paths(Path::new("/p"), &[PathBuf::from("../x")]).is_err());
    assert!(normalize_paths(Path::new("/p"), &[PathBuf::from("/q/x")]).is_err());
}

#[test]
fn deleted_directories_opaque_and_type_changes() {
    let env = Env::new();
    env.host("tree/one.txt", "1\n");
    env.host("tree/deep/two.txt", "2\n");
    env.host("gone/x.txt", "x\n");
    let mut fs = env.overlay();
    // rmdir tree's contents and tree, then mkdir tree again: opaque.
    let deep = walk(&mut fs, "tree/deep");
    fs.unlink(ctx(), deep, &c("two.txt")).unwrap();
    let tree = walk(&mut fs, "tree");
    fs.rmdir(ctx(), tree, &c("deep")).unwrap();
    fs.unlink(ctx(), tree, &c("one.txt")).unwrap();
    fs.rmdir(ctx(), ROOT_ID, &c("tree")).unwrap();
    fs.mkdir(ctx(), ROOT_ID, &c("tree"), 0o755, 0).unwrap();
    create_file(&mut fs, "tree", "fresh.txt", b"fresh\n");
    // A file replaced by a symlink.
    let sub = walk(&mut fs, "dir/sub");
    fs.unlink(ctx(), sub, &c("c.txt")).unwrap();
    fs.symlink(ctx(), sub, &c("c.txt"), c"../b.txt").unwrap();
    drop(fs);
    // A whole directory deleted (whiteout made by hand, as kernel overlayfs would).
    let wo = cpath(&env.layers.upper.join("gone")).unwrap();
    // SAFETY: valid C string.
    assert_eq!(
        unsafe { libc::mknod(wo.as_ptr(), libc::S_IFCHR | 0o600, 0) },
        0,
        "mknod needs root"
    );
    let set = env.scan(&[]);
    assert_eq!(
        names_of(&set),
        [
            "T dir/sub/c.txt",
            "D gone/x.txt",
            "D tree/deep/two.txt",
            "A tree/fresh.txt",
            "D tree/one.txt"
        ]
    );
    assert_eq!(set.removed_dirs, [PathBuf::from("gone"), PathBuf::from("tree/deep")]);
    let diff = env.diff(&set);
    assert!(diff.contains(
        "diff --git a/dir/sub/c.txt b/dir/sub/c.txt\ndeleted file mode 100644\n--- a/dir/sub/c.txt\n+++ /dev/null\n@@ -1 +0,0 @@\n-gamma\ndiff --git a/dir/sub/c.txt b/dir/sub/c.txt\nnew file mode 120000\n--- /dev/null\n+++ b/dir/sub/c.txt\n@@ -0,0 +1 @@\n+../b.txt\n\\ No newline at end of file\n"
    ), "{diff}");
    // Apply and compare the trees.
    let done = apply(&env.layers, &set).unwrap().unwrap();
    assert!(done.kept_dirs.is_empty());
    assert!(!env.layers.lower.join("gone").exists());
    assert!(!env.layers.lower.join("tree/deep").exists());
    assert_eq!(
        std::fs::read(env.layers.lower.join("tree/fresh.txt")).unwrap(),
        b"fresh\n"
    );
    assert_eq!(
        std::fs::read_link(env.layers.lower.join("dir/sub/c.txt")).unwrap(),
        Path::new("../b.txt")
    );
    // The whiteout over nothing is gone; nothing shows any more.
    assert!(!env.layers.upper.join("gone").exists());
    assert!(env.scan(&[]).is_empty(), "{:?}", env.scan(&[]));
}

#[test]
fn apply_round_trip_and_conflicts() {
    let env = Env::new();
    let _fs = vm_work(&env);
    let set = env.scan(&[]);
    assert!(conflicts(&env.layers, &set).unwrap().is_empty());
    // Host edits after the VM's copy-up or deletion: refused, nothing written.
    std::thread::sleep(std::time::Duration::from_millis(20));
    env.host("a.txt", "host edit\n");
    env.host("gone.txt", "host edit of a deleted file\n");
    env.host("dir/new.txt", "the host made it too\n");
    let before = std::fs::read(env.layers.lower.join("script.sh")).unwrap();
    let found = apply(&env.layers, &set).unwrap().unwrap_err();
    let paths: Vec<_> = found.iter().map(|c| c.path.to_str().unwrap().to_string()).collect();
    assert_eq!(paths, ["a.txt", "dir/new.txt", "gone.txt"], "{found:?}");
    assert_eq!(std::fs::read(env.layers.lower.join("script.sh")).unwrap(), before);
    assert!(!env.layers.lower.join("dir/moved.txt").exists());
    // Resolve: drop the VM's a.txt and new.txt, restore nothing else; the
    // host's gone.txt edit stays a conflict until the host deletes it.
    let removed = reset(&env.layers, &[PathBuf::from("a.txt"), PathBuf::from("dir/new.txt")])
        .unwrap()
        .unwrap();
    assert_eq!(removed, [PathBuf::from("a.txt"), PathBuf::from("dir/new.txt")]);
    std::fs::remove_file(env.layers.lower.join("gone.txt")).unwrap();
    let set = env.scan(&[]);
    assert_eq!(
        names_of(&set),
        ["A blob.bin", "R moved.txt dir/moved.txt", "A noeol.txt", "M script.sh"]
    );
    let done = apply(&env.layers, &set).unwrap().unwrap();
    assert_eq!(done.removed, [PathBuf::from("moved.txt")]);
    assert_eq!(
        std::fs::read(env.layers.lower.join("blob.bin")).unwrap(),
        b"\x00\x01binary"
    );
    assert_eq!(std::fs::read(env.layers.lower.join("a.txt")).unwrap(), b"host edit\n");
    assert!(env.layers.lower.join("dir/moved.txt").exists() && !env.layers.lower.join("moved.txt").exists());
    assert_eq!(
        std::fs::metadata(env.layers.lower.join("script.sh")).unwrap().mode() & 0o777,
        0o755
    );
    assert!(env.scan(&[]).is_empty());
    // The applied entries carry the host's new identity: a later host
    // edit is a conflict again, a later VM edit is a change.
    std::thread::sleep(std::time::Duration::from_millis(20));
    env.host("noeol.txt", "host again\n");
    std::fs::write(env.layers.upper.join("noeol.txt"), "vm again\n").unwrap();
    let set = env.scan(&[]);
    assert_eq!(names_of(&set), ["M noeol.txt"]);
    assert_eq!(conflicts(&env.layers, &set).unwrap().len(), 1);
}

#[test]
fn replacing_a_host_file_is_not_a_conflict() {
    // `sed -i` in the VM: a new file renamed over the host's, no origin.
    let env = Env::new();
    let mut fs = env.overlay();
    create_file(&mut fs, "dir", "tmp", b"BETA\n");
    let dir = walk(&mut fs, "dir");
    fs.rename(ctx(), dir, &c("tmp"), dir, &c("b.txt"), 0).unwrap();
    let set = env.scan(&[]);
    assert_eq!(names_of(&set), ["M dir/b.txt"]);
    assert!(conflicts(&env.layers, &set).unwrap().is_empty());
    // The host changing it after that is one.
    std::thread::sleep(std::time::Duration::from_millis(20));
    env.host("dir/b.txt", "host\n");
    assert_eq!(conflicts(&env.layers, &env.scan(&[])).unwrap().len(), 1);
}

#[test]
fn reset_all_or_paths() {
    let env = Env::new();
    let _fs = vm_work(&env);
    let removed = reset(&env.layers, &[PathBuf::from("dir")]).unwrap().unwrap();
    assert_eq!(removed, [PathBuf::from("dir")]);
    // The rename's source whiteout is still there.
    assert_eq!(
        names_of(&env.scan(&[])),
        [
            "M a.txt",
            "A blob.bin",
            "D gone.txt",
            "D moved.txt",
            "A noeol.txt",
            "M script.sh"
        ]
    );
    assert!(reset(&env.layers, &[PathBuf::from("nothing")])
        .unwrap()
        .unwrap()
        .is_empty());
    reset(&env.layers, &[]).unwrap().unwrap();
    assert!(env.scan(&[]).is_empty());
    assert_eq!(std::fs::read_dir(&env.layers.upper).unwrap().count(), 0);
    // Below a directory the VM deleted: refused with what to do instead.
    let wo = cpath(&env.layers.upper.join("dir")).unwrap();
    // SAFETY: valid C string.
    assert_eq!(unsafe { libc::mknod(wo.as_ptr(), libc::S_IFCHR | 0o600, 0) }, 0);
    let why = reset(&env.layers, &[PathBuf::from("dir/b.txt")]).unwrap().unwrap_err();
    assert!(why.contains("reset dir instead"), "{why}");
}

#[test]
fn origin_format_matches_the_file_server() {
    let env = Env::new();
    let mut fs = env.overlay();
    write_file(&mut fs, "dir/b.txt", b"changed\n");
    let origin = read_origin(&env.layers.upper.join("dir/b.txt")).unwrap().unwrap();
    let md = std::fs::symlink_metadata(env.layers.lower.join("dir/b.txt")).unwrap();
    assert!(origin_matches(&origin, &md));
    let name: &CStr = mvm_storage::fs::overlay::ORIGIN_XATTR;
    assert_eq!(name.to_str().unwrap(), ORIGIN_XATTR);
}

/// Not a pass/fail timing: prints how long a scan and a diff of many
/// changed files take (`cargo test -- --nocapture timing`).
#[test]
fn timing_of_many_changes() {
    let env = Env::new();
    let n = 2000;
    for i in 0..n {
        env.host(&format!("many/f{i}.txt"), &lines(1, 50));
        let p = env.layers.upper.join(format!("many/f{i}.txt"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, lines(1, 50).replace("line 25\n", "changed\n")).unwrap();
    }
    let t = std::time::Instant::now();
    let set = env.scan(&[]);
    let scanned = t.elapsed();
    let mut out = Vec::new();
    write_diff(&env.layers, &set, &mut out).unwrap();
    eprintln!(
        "{n} modified files: scan {scanned:?}, scan + diff {:?} ({} bytes)",
        t.elapsed(),
        out.len()
    );
    assert_eq!(set.changes.len(), n);
}

/// Random edits of random files: git applies every patch and gets the
/// VM's content (hunk arithmetic, context merging, missing newlines).
#[test]
fn random_edits_apply_with_git() {
    let env = Env::new();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rand = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let files = 40;
    for i in 0..files {
        let old: Vec<String> = (0..rand(60)).map(|_| format!("w{}\n", rand(8))).collect();
        let mut new = old.clone();
        for _ in 0..rand(8) {
            let at = rand(new.len() as u64 + 1) as usize;
            match rand(3) {
                0 if at < new.len() => {
                    new.remove(at);
                }
                1 if at < new.len() => new[at] = format!("x{}\n", rand(5)),
                _ => new.insert(at, format!("n{}\n", rand(5))),
            }
        }
        let mut old = old.concat();
        let mut new = new.concat();
        if rand(4) == 0 {
            old.pop();
        }
        if rand(4) == 0 {
            new.pop();
        }
        if old.is_empty() {
            old.push_str("keep\n");
        }
        env.host(&format!("r/f {i}"), &old);
        let p = env.layers.upper.join(format!("r/f {i}"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, &new).unwrap();
    }
    let set = env.scan(&["r"]);
    let patch = env.dir.join("random.patch");
    std::fs::write(&patch, env.diff(&set)).unwrap();
    let out = git(&env.layers.lower, &["apply", patch.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for i in 0..files {
        let rel = format!("r/f {i}");
        assert_eq!(
            std::fs::read(env.layers.lower.join(&rel)).unwrap(),
            std::fs::read(env.layers.upper.join(&rel)).unwrap(),
            "{rel}"
        );
    }
}
