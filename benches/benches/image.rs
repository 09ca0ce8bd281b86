//! Debian root file system images:
//!
//! - image build, cold (a fresh image directory: mmdebstrap fetches from
//!   the Debian archive, then mkfs.ext4 -d) and cached (same inputs: found,
//!   not built);
//! - `mvm start` to agent-ready with the default Debian image versus the
//!   test initramfs alone (same kernel, 1 vCPU, 256 MiB);
//! - `mvm exec vm -- true` on the Debian root;
//! - host disk of N VMs over one image (the image counted once), after each
//!   ran and wrote a little.
//!
//! `MVM_BENCH_BOOT_RUNS` (default 2) boots of each kind,
//! `MVM_BENCH_RUNS` (default 30) execs, `MVM_BENCH_VMS` (default 3) VMs.
//! Set `MVM_BENCH_COLD=0` to skip the cold build (it needs the Debian
//! archive and a minute or more).
//!
//! Caveat for PVM development hosts: the guest kernel is interpreted
//! (shared/HOST-KVM.md), so boots take tens of seconds; on VMX/SVM hosts
//! the same boots take well under a second of kernel time.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mvm::image::{ImageSpec, ImageStore};
use mvm::manager::RootChoice;
use mvm::{CreateOptions, Manager, StartOptions, StartOutcome};
use mvm_benches::{cli_exec_true, report, Row};
use mvm_tests::mvm_cli::image_cache_dir;
use mvm_tests::{guest_file, mvm_vmm, scratch_dir, workspace_bin};

fn env_count(key: &str, default: usize) -> usize {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Host disk a file or tree takes (allocated blocks).
fn disk_bytes(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let own = meta.blocks() * 512;
    if !meta.is_dir() {
        return own;
    }
    own + std::fs::read_dir(path)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| disk_bytes(&e.path())).sum())
        .unwrap_or(0)
}

fn start(manager: &Manager, name: &str) -> f64 {
    let outcome = manager
        .start(
            name,
            &mut StartOptions {
                timeout: Duration::from_secs(900),
                progress: None,
            },
        )
        .expect("start");
    let StartOutcome::Started { ready_after, .. } = outcome else {
        panic!("{name} was already running")
    };
    ready_after.as_secs_f64()
}

fn main() {
    let boots = env_count("MVM_BENCH_BOOT_RUNS", 2);
    let execs = env_count("MVM_BENCH_RUNS", 30);
    let vms = env_count("MVM_BENCH_VMS", 3);
    let cold = std::env::var("MVM_BENCH_COLD").map_or(true, |v| v != "0");
    let dir = scratch_dir("bench-image");
    std::env::set_var("MVM_VMM", mvm_vmm());
    std::env::set_var("MVM_IMAGE_DIR", image_cache_dir());
    let quiet = &mut |_: mvm::image::Progress<'_>| {};

    // Build: cold in a directory of its own, then cached in the shared one.
    let mut cold_secs = Vec::new();
    if cold {
        let t = Instant::now();
        let fresh = ImageStore::new(dir.join("cold-images"));
        fresh.build(&ImageSpec::default(), quiet).expect("cold build");
        cold_secs.push(t.elapsed().as_secs_f64());
        let _ = std::fs::remove_dir_all(dir.join("cold-images"));
    }
    let store = ImageStore::new(image_cache_dir());
    store.build(&ImageSpec::default(), quiet).expect("build");
    let mut cached_ms = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let (_, built) = store.build(&ImageSpec::default(), quiet).expect("cached build");
        assert!(!built);
        cached_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let image = store.find("default").expect("list").expect("default image");

    let manager = Manager::new(dir.join("state"));
    let project = dir.join("project");
    std::fs::create_dir_all(&project).unwrap();
    let create = |name: &str, root: RootChoice| {
        manager
            .create(&CreateOptions {
                name: name.into(),
                project: Some(project.clone()),
                cpus: Some(1),
                memory_mib: Some(256),
                kernel: Some(guest_file("vmlinux")),
                initrd: Some(guest_file("initramfs.cpio")),
                root,
                network: mvm::manager::NetworkChoice::None,
                ..Default::default()
            })
            .expect("create")
    };
    create("initramfs", RootChoice::Initramfs);
    for i in 0..vms {
        create(&format!("deb{i}"), RootChoice::DefaultImage);
    }

    // Boots, alternating the two kinds so that machine load hits both.
    let (mut deb_ready, mut ram_ready) = (Vec::new(), Vec::new());
    for i in 0..boots {
        ram_ready.push(start(&manager, "initramfs"));
        manager.stop("initramfs", Duration::from_secs(120)).expect("stop");
        deb_ready.push(start(&manager, "deb0"));
        if i + 1 < boots {
            manager.stop("deb0", Duration::from_secs(120)).expect("stop");
        }
    }

    let mvm_bin = workspace_bin("mvm");
    let exec_ms = cli_exec_true(&mvm_bin, manager.root(), "deb0", execs);
    // Each VM runs once and writes a little (1 MiB under /root), as a
    // developer's first minutes would.
    let write = [
        "exec",
        "deb0",
        "--",
        "sh",
        "-c",
        "head -c 1048576 /dev/urandom > /root/blob && sync",
    ];
    let run_cli = |args: &[&str]| {
        let status = Command::new(&mvm_bin)
            .args(args)
            .env("MVM_STATE_DIR", manager.root())
            .stdin(Stdio::null())
            .status()
            .expect("mvm");
        assert!(status.success(), "mvm {args:?}");
    };
    run_cli(&write);
    manager.stop("deb0", Duration::from_secs(120)).expect("stop");
    for i in 1..vms {
        let name = format!("deb{i}");
        start(&manager, &name);
        let mut args = write;
        args[1] = &name;
        run_cli(&args);
        manager.stop(&name, Duration::from_secs(120)).expect("stop");
    }
    let per_vm: Vec<f64> = (0..vms)
        .map(|i| disk_bytes(&manager.vm_dir(&format!("deb{i}"))) as f64 / (1 << 20) as f64)
        .collect();
    let image_mib = disk_bytes(&image.path) as f64 / (1 << 20) as f64;
    let total = image_mib + per_vm.iter().sum::<f64>();
    let full_copies = vms as f64 * image_mib;

    let row = Row::plain;
    let mut rows = Vec::new();
    if !cold_secs.is_empty() {
        rows.push(row("image build, cold (mmdebstrap + mkfs)", "s", &cold_secs));
    }
    rows.extend([
        row("image build, cached", "ms", &cached_ms),
        row("start to agent-ready, Debian root", "s", &deb_ready),
        row("start to agent-ready, initramfs only", "s", &ram_ready),
        row("mvm exec -- true, Debian root (CLI)", "ms", &exec_ms),
        row("image on disk (counted once)", "MiB", &[image_mib]),
        row("each VM's own state on disk", "MiB", &per_vm),
        row(&format!("{vms} VMs + image, total"), "MiB", &[total]),
        row(&format!("{vms} full image copies (for scale)"), "MiB", &[full_copies]),
    ]);
    report(
        "image",
        "Debian root images: build, boot, exec, disk; 1 vCPU, 256 MiB; PVM hosts interpret the guest kernel",
        &rows,
    );
    for i in 0..vms {
        let _ = manager.rm(&format!("deb{i}"), true);
    }
    let _ = manager.rm("initramfs", true);
    let _ = std::fs::remove_dir_all(&dir);
}
