//! End to end: what the guest was promised survives `kill -9` of the VMM.
//!
//! Two boots of the test guest. The first writes and fsyncs a block of a
//! raw disk, a file on the project share (built-in overlay server and
//! virtiofsd, both with persistent upper layers) and a file on an ext4
//! volume, says so, and is killed with SIGKILL. Then, from the host: the
//! block is in the disk image, the files are in the upper layers and the
//! project is untouched. The second boot reads the files back (the
//! volume's journal replayed by its mount) and unmounts the volume, which
//! `e2fsck -n -f` then finds clean.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use mvm_tests::{disk_entries, guest_config_in, scratch_dir, share_entry, write_config, RunningVm};

const TIMEOUT: Duration = Duration::from_secs(900);

fn config(dir: &Path, project: &Path, disk: &Path, cmdline: &str) -> std::path::PathBuf {
    let mut text = guest_config_in("crash", &dir.join("state"), 1, 128, cmdline);
    text += &share_entry("project", project, "builtin", true);
    text += &share_entry("pv", project, "virtiofsd", true);
    text += "[[volume]]\nname = \"data\"\nsize_mib = 16\nmount = \"/data\"\n";
    text += &disk_entries(&[(disk, false, "raw")]);
    write_config(dir, &text)
}

#[test]
fn durable_writes_survive_sigkill_of_the_vmm() {
    let dir = scratch_dir("crash");
    let project = dir.join("project");
    std::fs::create_dir_all(&project).unwrap();
    std::fs::write(project.join("README"), "the host's\n").unwrap();
    let disk = dir.join("raw.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let marker = format!("{}", std::process::id());

    let cmdline = format!("mvm.scenario=crash mvm.fsdirs=/project,/pv mvm.marker={marker}");
    let mut vm = RunningVm::start(&config(&dir, &project, &disk, &cmdline));
    let synced = vm.wait_for("MVM-PAUSE synced", TIMEOUT);
    vm.signal(libc::SIGKILL);
    let run = vm.finish(Duration::from_secs(60));
    let console = run.console();
    assert!(
        synced.is_some(),
        "the guest did not get to its writes:\n{console}\n{}",
        run.stderr
    );
    assert_eq!(run.status.code(), None, "killed by a signal: {:?}", run.status);
    let r = run.results();
    for key in ["raw_synced", "project_synced", "pv_synced", "vol_synced"] {
        assert_eq!(r.get(key).map(String::as_str), Some("ok"), "{key}:\n{console}");
    }

    // The flushed block is in the image.
    let image = std::fs::read(&disk).unwrap();
    let want = format!("block-{marker}\n");
    assert_eq!(
        &image[4096..4096 + want.len()],
        want.as_bytes(),
        "the raw disk's block 8"
    );
    // The fsynced files are in the upper layers, the project untouched.
    let state = dir.join("state/crash");
    for tag in ["project", "pv"] {
        let upper = state.join("overlay").join(tag).join("durable.txt");
        assert_eq!(
            std::fs::read_to_string(&upper).unwrap_or_default(),
            format!("file-{marker}\n"),
            "{}",
            upper.display()
        );
    }
    let entries: Vec<_> = std::fs::read_dir(&project)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(entries, ["README"], "the project gained files");
    assert_eq!(std::fs::read_to_string(project.join("README")).unwrap(), "the host's\n");

    // The next boot finds it all; the volume is clean after its journal
    // replay and a clean unmount.
    let cmdline = "mvm.scenario=crash_check mvm.fsdirs=/project,/pv";
    let run = RunningVm::start(&config(&dir, &project, &disk, cmdline)).finish(TIMEOUT);
    let console = run.console();
    assert_eq!(run.status.code(), Some(0), "{console}\n{}", run.stderr);
    let r = run.results();
    for (key, want) in [
        ("project_durable", format!("file-{marker}")),
        ("pv_durable", format!("file-{marker}")),
        ("vol_durable", format!("volume-{marker}")),
        ("vol_umount", "ok".into()),
        ("status", "ok".into()),
    ] {
        assert_eq!(r.get(key), Some(&want), "{key}:\n{console}");
    }
    let e2fsck = mvm_tests::system_tool("e2fsck", "e2fsprogs");
    let volume = state.join("volumes/data.ext4");
    let out = Command::new(e2fsck).args(["-n", "-f"]).arg(&volume).output().unwrap();
    assert!(
        out.status.success(),
        "e2fsck -n -f {}: {}\n{}",
        volume.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
