//! Bad input of every kind the user can give: each ends `mvm-vmm` at once
//! with exit status 2 and one clear line naming the key or file.

use std::path::Path;
use std::time::Duration;

use mvm_tests::*;

const QUICK: Duration = Duration::from_secs(60);

fn expect_config_error(dir: &Path, toml: &str, needles: &[&str]) {
    let config = write_config(dir, toml);
    let run = run_to_end(&config, QUICK);
    assert_eq!(run.status.code(), Some(2), "stderr: {}", run.stderr);
    let errors: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("mvm-vmm: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "exactly one error line: {}", run.stderr);
    for needle in needles {
        assert!(errors[0].contains(needle), "{:?} lacks {needle:?}", errors[0]);
    }
    assert!(
        !run.stderr.contains("panicked") && !run.stderr.contains("RUST_BACKTRACE"),
        "{}",
        run.stderr
    );
    assert!(run.transcript.is_empty(), "no guest ran");
}

fn kernel_toml(kernel: &Path, extra_boot: &str, machine: &str) -> String {
    format!(
        "version = 1\n[machine]\n{machine}\n[boot]\nkernel = \"{}\"\n{extra_boot}\n",
        kernel.display()
    )
}

#[test]
fn bad_kernels_and_files() {
    let dir = scratch_dir("bad-kernels");
    let garbage = dir.join("garbage.bin");
    std::fs::write(&garbage, vec![0x5a; 64 * 1024]).unwrap();
    expect_config_error(
        &dir,
        &kernel_toml(&garbage, "", ""),
        &["garbage.bin", "not a Linux kernel"],
    );

    let vmlinux = std::fs::read(guest_file("vmlinux")).unwrap();
    let truncated = dir.join("truncated-vmlinux");
    std::fs::write(&truncated, &vmlinux[..vmlinux.len() / 3]).unwrap();
    expect_config_error(
        &dir,
        &kernel_toml(&truncated, "", ""),
        &["truncated-vmlinux", "truncated"],
    );

    let tiny = dir.join("tiny");
    std::fs::write(&tiny, &vmlinux[..40]).unwrap();
    expect_config_error(&dir, &kernel_toml(&tiny, "", ""), &["tiny", "truncated"]);

    expect_config_error(
        &dir,
        &kernel_toml(&dir.join("no-such-kernel"), "", ""),
        &["boot.kernel", "no-such-kernel", "file not found"],
    );
    expect_config_error(
        &dir,
        &kernel_toml(&guest_file("vmlinux"), "initrd = \"missing.cpio\"", ""),
        &["boot.initrd", "missing.cpio", "file not found"],
    );
}

#[test]
fn bad_disks() {
    let dir = scratch_dir("bad-disks");
    let k = guest_file("vmlinux");
    let odd = dir.join("odd.img");
    std::fs::write(&odd, vec![0u8; 1000]).unwrap();
    let with_disk = |path: &Path, extra: &str| {
        format!(
            "{}[[disk]]\npath = \"{}\"\n{extra}",
            kernel_toml(&k, "", ""),
            path.display()
        )
    };
    expect_config_error(
        &dir,
        &with_disk(&odd, ""),
        &["odd.img", "1000 bytes is not a multiple of 512"],
    );
    expect_config_error(
        &dir,
        &with_disk(&dir.join("none.img"), ""),
        &["disk.path", "none.img", "file not found"],
    );
    let ok = dir.join("ok.img");
    std::fs::write(&ok, vec![0u8; 1024]).unwrap();
    expect_config_error(
        &dir,
        &with_disk(&ok, "serial = \"012345678901234567890\""),
        &["disk.serial", "at most 20"],
    );
    expect_config_error(&dir, &with_disk(&ok, "readonly = true"), &["unknown field `readonly`"]);
}

#[test]
fn bad_values() {
    let dir = scratch_dir("bad-values");
    let k = guest_file("vmlinux");
    expect_config_error(&dir, &kernel_toml(&k, "", "vcpus = 0"), &["machine.vcpus = 0"]);
    expect_config_error(
        &dir,
        &kernel_toml(&k, "", "vcpus = 100000"),
        &["machine.vcpus = 100000", "at most"],
    );
    expect_config_error(
        &dir,
        &kernel_toml(&k, "", "memory_mib = 8"),
        &["machine.memory_mib = 8", "too small", "at least"],
    );
    expect_config_error(
        &dir,
        &kernel_toml(
            &k,
            &format!("initrd = \"{}\"", guest_file("initramfs.cpio").display()),
            "memory_mib = 24",
        ),
        &["machine.memory_mib = 24", "initrd"],
    );
    expect_config_error(
        &dir,
        &kernel_toml(&k, "", "vcpus = \"two\""),
        &["vm.toml:3", "vcpus = \"two\"", "invalid type"],
    );
    expect_config_error(
        &dir,
        &kernel_toml(&k, "", "cpus = 2"),
        &["vm.toml:3", "unknown field `cpus`"],
    );
    expect_config_error(
        &dir,
        &kernel_toml(&k, "", "").replace("version = 1", "version = 7"),
        &["version = 7"],
    );
    expect_config_error(&dir, "version = 1\n[boot]\n", &["missing field `kernel`"]);
    let long = "x".repeat(3000);
    expect_config_error(
        &dir,
        &kernel_toml(&k, &format!("cmdline = \"{long}\""), ""),
        &["boot.cmdline", "at most"],
    );
}

#[test]
fn bad_vsock_sockets() {
    let dir = scratch_dir("bad-vsock");
    let k = guest_file("vmlinux");
    let vsock = |path: &Path| {
        format!(
            "{}[vsock]\nuds_path = \"{}\"\n",
            kernel_toml(&k, "", ""),
            path.display()
        )
    };
    // Another VM (here: any program) already listens on the socket.
    let live = dir.join("live.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
    expect_config_error(&dir, &vsock(&live), &["live.sock", "listening"]);
    let file = dir.join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    expect_config_error(&dir, &vsock(&file), &["plain-file", "not a socket"]);
    expect_config_error(
        &dir,
        &vsock(&dir.join("no-dir/v.sock")),
        &["vsock.uds_path", "does not exist"],
    );
    expect_config_error(
        &dir,
        &(vsock(&dir.join("v.sock")) + "guest_cid = 2\n"),
        &["vsock.guest_cid = 2", "reserved"],
    );
}

#[test]
fn usage_errors() {
    let out = std::process::Command::new(mvm_vmm())
        .arg("frobnicate")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage: mvm-vmm run <vm.toml>"));
    let out = std::process::Command::new(mvm_vmm())
        .args(["run", "/nonexistent/vm.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/vm.toml"));
}

/// Every bad `[[share]]` / `[[volume]]` ends with status 2 naming the key,
/// and leaves nothing on disk: no state directory, no upper layer, no
/// image.
#[test]
fn bad_shares_and_volumes_create_nothing() {
    let dir = scratch_dir("bad-shares");
    let project = dir.join("project");
    std::fs::create_dir_all(&project).unwrap();
    let file = dir.join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let state = dir.join("state");
    let base = format!(
        "version = 1\nname = \"vm1\"\nstate_root = \"{}\"\n[boot]\nkernel = \"{}\"\n",
        state.display(),
        guest_file("vmlinux").display()
    );
    let share = |extra: &str| format!("{base}[[share]]\ntag = \"p\"\n{extra}\n");
    let src = format!("source = \"{}\"", project.display());
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            share("source = \"/no/such/dir\""),
            vec!["share.source", "/no/such/dir", "not found"],
        ),
        (
            share(&format!("source = \"{}\"", file.display())),
            vec!["share.source", "not a directory"],
        ),
        (
            share(&format!("{src}\nupper = \"{}/upper\"", project.display())),
            vec!["share.upper", "inside the shared source"],
        ),
        (
            share(&format!("{src}\nupper = \"{}\"", dir.display())),
            vec!["share.upper", "inside the upper layer"],
        ),
        (
            format!("{}[[share]]\ntag = \"p\"\n{src}\n", share(&src)),
            vec!["share.tag", "two shares"],
        ),
        (
            format!("{base}[[share]]\ntag = \"{}\"\n{src}\n", "t".repeat(37)),
            vec!["share.tag", "1-36"],
        ),
        (
            share(&format!("{src}\nbackend = \"nfs\"")),
            vec!["unknown variant `nfs`"],
        ),
        (share(&format!("{src}\nmount = \"relative\"")), vec!["share.mount"]),
        (
            format!("{base}[[volume]]\nname = \"data\"\nsize_mib = 0\n"),
            vec!["volume.size_mib = 0"],
        ),
        (
            format!("{base}[[volume]]\nname = \"Bad/Name\"\nsize_mib = 1\n"),
            vec!["volume.name"],
        ),
    ];
    for (toml, needles) in &cases {
        expect_config_error(&dir, toml, needles);
        assert!(!state.exists(), "a refused configuration created {}", state.display());
    }
    // A file where the volume's image would be, that is not an image.
    let image = state.join("vm1/volumes/data.ext4");
    std::fs::create_dir_all(image.parent().unwrap()).unwrap();
    std::fs::write(&image, b"not an ext4 image").unwrap();
    expect_config_error(
        &dir,
        &format!("{base}[[volume]]\nname = \"data\"\nsize_mib = 4\n"),
        &["volume.name", "data.ext4", "not a volume image"],
    );
    assert_eq!(std::fs::read(&image).unwrap(), b"not an ext4 image", "left as it was");
    let entries: Vec<_> = std::fs::read_dir(state.join("vm1"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, ["volumes"], "no lock or other state was created");
}
