//! End to end: Debian root file system images (`mvm image build`, built
//! with mmdebstrap from the Debian archive, cached between runs by their
//! inputs) and VMs booted from them.
//!
//! One scenario, four boots in two rounds of two: a VM whose root changes
//! persist and an `--ephemeral` one, both from the default image over one
//! git project; then both restarted. The persistent one has a user (uid
//! 1234, the project's owner) that `mvm exec` runs as. Plus the build's
//! bad inputs.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use mvm_tests::mvm_cli::{describe, stderr, stdout, Mvm};
use mvm_tests::scratch_dir;

const START_TIMEOUT_S: &str = "900";

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().expect("sha256sum");
    assert!(out.status.success(), "sha256sum: {}", describe(&out));
    stdout(&out).split_whitespace().next().unwrap_or_default().to_string()
}

/// A git repository with one commit, as a project.
fn git_project(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("README"), "hello from the host\n").unwrap();
    for args in [
        &["init", "-q", "-b", "main"][..],
        &["add", "README"],
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.org",
            "commit",
            "-q",
            "-m",
            "first",
        ],
    ] {
        let out = Command::new("git").args(args).current_dir(dir).output().expect("git");
        assert!(out.status.success(), "git {args:?}: {}", describe(&out));
    }
}

/// Run `script` with bash in the guest (as the VM's user); its stdout (and
/// stderr on failure).
fn guest_bash(mvm: &Mvm, vm: &str, script: &str) -> String {
    guest_bash_with(mvm, vm, &[], script)
}

/// [`guest_bash`] with `mvm exec` options.
fn guest_bash_with(mvm: &Mvm, vm: &str, options: &[&str], script: &str) -> String {
    let out = mvm.run(&[&["exec"][..], options, &[vm, "--", "bash", "-c", script]].concat());
    assert!(out.status.success(), "{vm}: bash -c {script:?}: {}", describe(&out));
    stdout(&out)
}

/// Two `mvm` commands at once (each boot is minutes of interpreted kernel
/// on the development host; two overlap well on two cores).
fn both(mvm: &Mvm, a: &[&str], b: &[&str]) {
    std::thread::scope(|s| {
        let first = s.spawn(|| mvm.run(a));
        let second = mvm.run(b);
        let first = first.join().expect("thread");
        assert!(first.status.success(), "mvm {a:?}: {}", describe(&first));
        assert!(second.status.success(), "mvm {b:?}: {}", describe(&second));
    });
}

#[test]
fn debian_root_persistent_and_ephemeral() {
    let dir = scratch_dir("image");
    let mvm = Mvm::new(dir.join("state"));
    let project = dir.join("project");
    git_project(&project);
    // Owned by a user the guest gets too (the host needs no such user).
    let out = Command::new("chown")
        .args(["-R", "1234:1234"])
        .arg(&project)
        .output()
        .expect("chown");
    assert!(out.status.success(), "chown: {}", describe(&out));
    let p = project.to_str().unwrap();

    // Cached by its inputs: a second build is immediate.
    let t = Instant::now();
    let reference = mvm.ok(&["image", "build"]).trim().to_string();
    eprintln!("image build: {:.1} s ({reference})", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let again = mvm.run(&["image", "build"]);
    assert!(again.status.success(), "{}", describe(&again));
    assert_eq!(stdout(&again).trim(), reference);
    assert!(stderr(&again).contains("up to date"), "{}", stderr(&again));
    assert!(t.elapsed().as_secs() < 10, "a cached build took {:?}", t.elapsed());
    let images = mvm.json(&["image", "list", "--json"]);
    let image = images
        .as_array()
        .unwrap()
        .iter()
        .find(|i| format!("{}-{}", i["name"].as_str().unwrap(), i["id"].as_str().unwrap()) == reference)
        .unwrap_or_else(|| panic!("{reference} not in {images}"))
        .clone();
    let image_path = image["path"].as_str().unwrap().to_string();
    let checksum = sha256(Path::new(&image_path));

    mvm.ok(&[
        "create",
        "dev",
        "--no-network",
        "--project",
        p,
        "--cpus",
        "1",
        "--memory",
        "256",
        "--user",
        "dev:1234:1234",
    ]);
    mvm.ok(&[
        "create",
        "eph",
        "--no-network",
        "--project",
        p,
        "--cpus",
        "1",
        "--memory",
        "256",
        "--ephemeral",
        "--user",
        "root",
    ]);
    let dev_user = &mvm.json(&["status", "dev", "--json"])["user"];
    assert_eq!(dev_user, &serde_json::json!({"name": "dev", "uid": 1234, "gid": 1234}));
    let listed = mvm.json(&["image", "list", "--json"]);
    let users = &listed
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["path"] == image_path.as_str())
        .unwrap()["used_by"];
    assert_eq!(users, &serde_json::json!(["dev", "eph"]), "{listed}");
    // In use: not removable.
    let rm = mvm.run(&["image", "rm", &reference]);
    assert_eq!(rm.status.code(), Some(1), "{}", describe(&rm));
    assert!(stderr(&rm).contains("dev, eph"), "{}", stderr(&rm));

    let t = Instant::now();
    both(
        &mvm,
        &["start", "dev", "--timeout", START_TIMEOUT_S],
        &["start", "eph", "--timeout", START_TIMEOUT_S],
    );
    eprintln!("two Debian boots: {:.1} s", t.elapsed().as_secs_f64());

    // The userland: bash, git in the project, apt's package lists; and the
    // VM's user: who runs, its home, the project's owner, sudo. (One exec:
    // each dynamically linked program costs seconds of interpreted page
    // faults on the development hosts, apt tens of seconds.)
    let out = guest_bash(
        &mvm,
        "dev",
        "set -e; bash --version | head -1; git --version; cat /etc/debian_version; \
         pwd; cd /project && git status --short --branch && git log --format=%s; \
         apt-cache show hello | grep -c '^Package: hello$'; \
         findmnt -n -o FSTYPE /; \
         id -un; id -u; id -g; echo \"$HOME $USER\"; stat -c %U:%u:%g $HOME /project/README; \
         echo from-guest > /project/new-file; stat -c %u:%g /project/new-file; \
         sudo -n true 2>&1 && echo sudo-ok; sudo -n sh -c 'echo persisted > /root/keep'; sync",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("GNU bash, version 5."), "{out}");
    assert!(lines[1].starts_with("git version 2."), "{out}");
    assert!(lines[2].starts_with("12."), "Debian 12 (bookworm): {out}");
    // Programs start in the project.
    assert_eq!(lines[3], "/project", "{out}");
    // As the project's owner git needs no safe.directory.
    assert_eq!(lines[4], "## main", "git status in /project: {out}");
    assert_eq!(lines[5], "first", "{out}");
    // apt reads the package lists (and the caches made from them) that
    // came with the image.
    assert_eq!(&lines[6..8], ["1", "overlay"], "{out}");
    assert_eq!(
        &lines[8..16],
        [
            "dev",
            "1234",
            "1234",
            "/home/dev dev",
            "dev:1234:1234",
            "dev:1234:1234",
            "1234:1234",
            "sudo-ok"
        ],
        "{out}"
    );
    // The guest's new file is in the VM's upper layer. Its VMM runs as
    // microvm-dev (mvm's default as root), whose files the guest sees as
    // its user's (above); on the host they are the VMM user's.
    let new_file = dir.join("state/dev/overlay/project/new-file");
    let meta = std::fs::metadata(&new_file).expect("the guest's file in the upper layer");
    use std::os::unix::fs::MetadataExt;
    let vmm_uid = mvm_tests::host_uid("microvm-dev").expect("the microvm-dev user (scripts/setup-host.sh)");
    assert_eq!(meta.uid(), vmm_uid);
    assert!(!project.join("new-file").exists());
    // Root stays possible.
    assert_eq!(
        guest_bash_with(&mvm, "dev", &["--root"], "id -u; echo $HOME"),
        "0\n/root\n"
    );
    // The second VM: its own root, nothing of the first one's.
    let out = guest_bash(
        &mvm,
        "eph",
        "set -e; test ! -e /root/keep && echo clean; echo gone > /root/keep-eph; \
         echo changed >> /etc/motd; cat /root/keep-eph",
    );
    assert_eq!(out, "clean\ngone\n");

    let t = Instant::now();
    both(
        &mvm,
        &["restart", "dev", "--timeout", START_TIMEOUT_S],
        &["restart", "eph", "--timeout", START_TIMEOUT_S],
    );
    eprintln!("two Debian restarts: {:.1} s", t.elapsed().as_secs_f64());
    // The root's changes and the user's home (on the persistent layer)
    // survive the restart.
    assert_eq!(
        guest_bash_with(
            &mvm,
            "dev",
            &["--root"],
            "cat /root/keep; ls -a /home/dev | grep -c bashrc; grep -c '^dev:' /etc/passwd"
        ),
        "persisted\n1\n1\n"
    );
    assert_eq!(
        guest_bash(
            &mvm,
            "eph",
            "test ! -e /root/keep-eph && ! grep -q changed /etc/motd && echo fresh"
        ),
        "fresh\n"
    );

    both(&mvm, &["stop", "dev"], &["stop", "eph"]);
    // The persistent layer is a sparse volume: what the guest wrote, not
    // its size.
    let volume = dir.join("state/dev/volumes/root.ext4");
    let meta = std::fs::metadata(&volume).expect("dev's root volume");
    let used = std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
    eprintln!(
        "dev's root volume: {} MiB, {} MiB on disk",
        meta.len() >> 20,
        used >> 20
    );
    assert!(used < meta.len() / 4, "{used} of {}", meta.len());
    assert!(!dir.join("state/eph/volumes/root.ext4").exists());
    assert_eq!(sha256(Path::new(&image_path)), checksum, "the image changed");
    mvm.ok(&["rm", "dev"]);
    mvm.ok(&["rm", "eph"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn image_build_bad_input() {
    let dir = scratch_dir("image-bad");
    let mvm = Mvm::new(dir.join("state"));
    let images = dir.join("images");
    let build = |images: &Path, args: &[&str]| {
        let mut cmd = mvm.command(&[&["image", "build"][..], args].concat());
        cmd.env("MVM_IMAGE_DIR", images);
        cmd.output().expect("mvm")
    };
    let fails = |out: &std::process::Output, code: i32, want: &str| {
        assert_eq!(out.status.code(), Some(code), "{}", describe(out));
        assert!(stderr(out).contains(want), "want {want:?}: {}", describe(out));
    };

    // Refused before anything runs.
    fails(&build(&images, &["--suite", "book worm"]), 2, "suite \"book worm\"");
    fails(&build(&images, &["--packages", "git,-oops"]), 2, "package \"-oops\"");
    fails(&build(&images, &["--name", "Bad"]), 2, "image name \"Bad\"");
    // mmdebstrap's (apt's) own words reach the user.
    fails(
        &build(&images, &["--name", "x", "--suite", "nosuchsuite"]),
        1,
        "nosuchsuite Release' does not have a Release file",
    );
    fails(
        &build(&images, &["--name", "x", "--packages", "bash,no-such-package-mvm"]),
        1,
        "Unable to locate package no-such-package-mvm",
    );
    // Nothing is left of failed builds.
    let left: Vec<String> = std::fs::read_dir(&images)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != ".lock")
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");

    // No space: a 32 MiB file system for the image directory.
    let small = dir.join("small");
    std::fs::create_dir_all(&small).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=32m", "mvm-test-small"])
        .arg(&small)
        .status()
        .expect("mount");
    assert!(mounted.success(), "mounting a tmpfs needs root");
    let out = build(&small, &["--name", "x", "--packages", "bash"]);
    let _ = Command::new("umount").arg(&small).status();
    fails(&out, 1, "no space left in");

    // An image that is not there.
    let mut cmd = mvm.command(&["create", "v", "--image", "nope"]);
    cmd.env("MVM_IMAGE_DIR", &images);
    fails(&cmd.output().unwrap(), 2, "no image \"nope\"");
    let _ = std::fs::remove_dir_all(&dir);
}
