//! End-to-end: boot the test guest to userspace and check, from inside the
//! guest, what the VMM promised. Guest boots are slow on the PVM CI host
//! (the guest kernel is interpreted), so each test boots once and checks
//! many things; timing targets live in the benchmarks, not here.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mvm_tests::*;

/// Generous: a boot to userspace takes well under a minute here.
const BOOT_TIMEOUT: Duration = Duration::from_secs(420);

/// Two vCPUs, 128 MiB, a marker on the command line; the guest reports
/// what it sees, prints from a userspace program, and powers off.
#[test]
fn guest_sees_configured_machine_and_powers_off() {
    let dir = scratch_dir("facts");
    let marker = format!("mvm.marker=e2e-{}", std::process::id());
    let (rw, ro) = disks(&dir);
    let config = write_config(
        &dir,
        &(guest_config(2, 128, &format!("mvm.scenario=facts mvm.end=poweroff {marker}"))
            + &disk_entries(&[(&rw, false, "data-disk"), (&ro, true, "ro-disk")])),
    );
    let started = SystemTime::now();
    let run = run_to_end(&config, BOOT_TIMEOUT);
    let console = run.console();
    let r = run.results();
    assert_eq!(
        run.status.code(),
        Some(0),
        "poweroff exits 0; stderr: {}\nconsole:\n{console}",
        run.stderr
    );
    assert_eq!(r.get("status").map(String::as_str), Some("ok"), "{console}");
    assert_eq!(r.get("ncpus").map(String::as_str), Some("2"), "{console}");
    let mem: u64 = r["mem_total_kib"].parse().expect("mem_total_kib is a number");
    // MemTotal is RAM less what the kernel reserved for itself.
    assert!(
        (100 * 1024..=128 * 1024).contains(&mem),
        "MemTotal {mem} KiB for 128 MiB"
    );
    assert!(
        r["cmdline"].contains(&marker),
        "cmdline {:?} lacks {marker}",
        r["cmdline"]
    );
    assert_eq!(r.get("userspace").map(String::as_str), Some("ok"));
    // SSE registers survive task switches; where AVX ones do not (PVM
    // hosts), init got the VMM's GLIBC_TUNABLES.
    assert_eq!(r.get("fpu").map(String::as_str), Some("ok"), "{console}");
    eprintln!(
        "guest XCR0 {}: xmm {}, ymm {}; GLIBC_TUNABLES {}",
        r["fpu_xcr0"], r["fpu_xmm"], r["fpu_ymm"], r["fpu_glibc_tunables"]
    );
    assert_guest_has_host_time(&run.transcript, started);
    assert_hwrng_works(&r, &console);
    assert_disks_work(&r, &console, &dir);
    assert!(console.contains("mvm-init: start"), "init's output arrived");
    assert!(
        console.contains("mvm-init: hello from a userspace program"),
        "{console}"
    );
    assert!(console.contains("MVM-DONE"));
    // One warning on this host, and nothing else on stderr.
    assert!(run.stderr.lines().count() <= 1, "stderr: {}", run.stderr);
}

const RW_HEAD: &[u8] = b"MVM-DISK-PATTERN";
const RO_HEAD: &[u8] = b"READ-ONLY-DISK!!";

/// A 4 MiB writable and a 1 MiB read-only image with known first bytes.
fn disks(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (rw, ro) = (dir.join("rw.img"), dir.join("ro.img"));
    make_disk(&rw, 4 << 20, RW_HEAD);
    make_disk(&ro, 1 << 20, RO_HEAD);
    (rw, ro)
}

/// virtio-blk, found through ACPI or the command line: the guest sees both
/// disks with their sizes, serials and contents; its write to the first
/// reached the image file (it fsynced, so before the VM ended); the
/// read-only disk refused the write and its image is unchanged.
fn assert_disks_work(r: &std::collections::BTreeMap<String, String>, console: &str, dir: &std::path::Path) {
    let get = |k: &str| r.get(k).map(String::as_str).unwrap_or("<missing>");
    assert_eq!(get("vda_sectors"), "8192", "{console}");
    assert_eq!(get("vda_serial"), "data-disk");
    assert_eq!(get("vda_head").replace(' ', ""), "MVM-DISK-PATTERN");
    assert_eq!(get("vdb_sectors"), "2048");
    assert_eq!(get("vdb_serial"), "ro-disk");
    assert_eq!(get("vdb_head").replace(' ', ""), "READ-ONLY-DISK!!");
    assert_eq!(get("vda_write"), "ok");
    assert_eq!(get("vdb_write"), "refused");
    let rw = std::fs::read(dir.join("rw.img")).unwrap();
    assert_eq!(&rw[1 << 20..(1 << 20) + 20], b"written-by-the-guest");
    assert_eq!(&rw[..16], RW_HEAD);
    let ro = std::fs::read(dir.join("ro.img")).unwrap();
    assert_eq!(&ro[..16], RO_HEAD);
    assert!(ro[16..].iter().all(|b| *b == 0), "read-only image untouched");
}

/// The guest set its clock from the CMOS RTC at boot (rtc-cmos, found
/// through the DSDT or as the x86 platform device): its `date +%s` is the
/// host's time when the line arrived, within 10 s (the RTC counts whole
/// seconds, the line takes its time through the UART) plus 5% of the run
/// so far: from the RTC read on the guest's clock runs on its own, and on
/// PVM hosts under load it was measured drifting by up to 6% (10 s behind
/// 170 s later).
fn assert_guest_has_host_time(transcript: &[(Duration, String)], started: SystemTime) {
    let (at, guest) = transcript
        .iter()
        .find_map(|(at, l)| Some((at, l.split_once("MVM-RESULT date_s=")?.1.trim())))
        .unwrap_or_else(|| panic!("no date_s result; console:\n{transcript:?}"));
    let guest: f64 = guest
        .parse()
        .unwrap_or_else(|_| panic!("date_s {guest:?} is not a number"));
    let host = (started + *at).duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    let difference = guest - host;
    let allowed = 10.0 + at.as_secs_f64() * 0.05;
    eprintln!("guest date +%s {guest}, host {host:.1} when the line arrived after {at:.1?}: {difference:+.1} s");
    assert!(
        difference.abs() <= allowed,
        "guest time {guest} is {difference:+.1} s from the host's {host:.1} (allowed {allowed:.1} s)"
    );
}

/// virtio-rng, found through ACPI or the command line, serves the guest's
/// /dev/hwrng with host bytes.
fn assert_hwrng_works(r: &std::collections::BTreeMap<String, String>, console: &str) {
    assert_eq!(r.get("hwrng").map(String::as_str), Some("virtio_rng.0"), "{console}");
    assert_eq!(r.get("hwrng_bytes").map(String::as_str), Some("4096"), "{console}");
    let head = r.get("hwrng_head").map(String::as_str).unwrap_or("");
    assert_eq!(head.split(' ').count(), 8, "{head:?}");
    assert_ne!(head, "00 00 00 00 00 00 00 00");
}

/// The bzImage of the same kernel (it decompresses itself, interpreted
/// here, so this boot is the slower one), one vCPU, no ACPI (devices on the
/// command line); the host types a line that guest userspace reads back;
/// then the guest reboots, which ends mvm-vmm with status 3.
#[test]
fn bzimage_boots_console_input_reaches_guest_and_reboot_has_its_own_status() {
    let dir = scratch_dir("echo");
    let config = write_config(
        &dir,
        &(guest_config_with("bzImage", 1, 128, false, "mvm.scenario=echo mvm.end=reboot")
            + &disk_entries(&[
                (&disks(&dir).0, false, "data-disk"),
                (&dir.join("ro.img"), true, "ro-disk"),
            ])),
    );
    let started = SystemTime::now();
    let mut vm = RunningVm::start(&config);
    assert!(
        vm.wait_for("waiting for a line on the console", BOOT_TIMEOUT).is_some(),
        "guest never asked for input:\n{}",
        vm.transcript
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    // While the guest runs, every thread but the main one is confined.
    mvm_tests::assert_threads_confined(vm.pid(), &["vcpu0", "mvm-vm", "signals"]);
    vm.send(b"hello-from-the-host\n");
    let run = vm.finish(BOOT_TIMEOUT);
    let r = run.results();
    assert_eq!(
        r.get("echo").map(String::as_str),
        Some("hello-from-the-host"),
        "{}",
        run.console()
    );
    assert_eq!(r.get("status").map(String::as_str), Some("ok"));
    // The kernel prints the command line it got: the device is on it.
    assert!(
        run.console().contains("virtio_mmio.device=4K@0xd0000000:5"),
        "{}",
        run.console()
    );
    assert_hwrng_works(&r, &run.console());
    assert_disks_work(&r, &run.console(), &dir);
    assert_guest_has_host_time(&run.transcript, started);
    assert_eq!(run.status.code(), Some(3), "reboot exits 3; stderr: {}", run.stderr);
}

/// A virtio-blk disk as the root file system (ext4 image made here from the
/// test guest's files, no initramfs): the guest writes a file and syncs,
/// powers off, and the file is in the image on the host.
#[test]
fn ext4_root_on_virtio_blk_persists_a_file() {
    use std::process::{Command, Stdio};
    let dir = scratch_dir("rootfs");
    let staging = dir.join("root");
    std::fs::create_dir_all(&staging).unwrap();
    let unpacked = Command::new("cpio")
        .args(["-idm", "--quiet"])
        .current_dir(&staging)
        .stdin(std::fs::File::open(guest_file("initramfs.cpio")).unwrap())
        .status()
        .expect("run cpio");
    assert!(unpacked.success(), "unpacking the initramfs");
    let image = dir.join("root.img");
    let made = Command::new(system_tool("mkfs.ext4", "e2fsprogs"))
        .args(["-q", "-F", "-L", "root", "-d"])
        .arg(&staging)
        .arg(&image)
        .arg("16M")
        .status()
        .expect("run mkfs.ext4");
    assert!(made.success(), "mkfs.ext4");
    let marker = format!("rootfs-{}", std::process::id());
    let config = write_config(
        &dir,
        &format!(
            "version = 1\n[machine]\nmemory_mib = 128\n[boot]\nkernel = \"{}\"\ncmdline = \"console=ttyS0 reboot=k panic=-1 root=/dev/vda rw rootfstype=ext4 init=/init mvm.scenario=persist mvm.marker={marker}\"\n[console]\ninput = \"none\"\n{}",
            guest_file("vmlinux").display(),
            disk_entries(&[(&image, false, "root")])
        ),
    );
    let run = run_to_end(&config, BOOT_TIMEOUT);
    let r = run.results();
    assert_eq!(run.status.code(), Some(0), "stderr: {}\n{}", run.stderr, run.console());
    assert_eq!(r.get("persist").map(String::as_str), Some("ok"), "{}", run.console());
    assert!(
        r["root_mount"].starts_with("/dev/root / ext4 rw"),
        "{}",
        r["root_mount"]
    );
    let out = Command::new(system_tool("debugfs", "e2fsprogs"))
        .args(["-R", "cat /persist.txt"])
        .arg(&image)
        .stderr(Stdio::null())
        .output()
        .expect("run debugfs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.trim(), format!("persisted-by-the-guest {marker}"));
}
