//! Guest-side virtio-blk throughput: the test guest reads and then writes
//! 16 MiB of /dev/vda with direct I/O (busybox dd, 1 MiB blocks), timed in
//! the guest. Printed next to the host's physical limits measured here and
//! now: memory copy bandwidth and reading the image through the page cache.
//!
//! Caveat for PVM development hosts: the guest kernel is interpreted
//! (about 1.5 M instructions/s), so the guest-side figures measure the
//! guest block layer under interpretation, far below what the device model
//! moves (see `device_requests`) or what a VMX/SVM host reaches.

use std::io::Read;
use std::time::{Duration, Instant};

use mvm_benches::{host_memcpy_mib_s, report, Row, Stats};
use mvm_tests::{disk_entries, guest_config, make_disk, scratch_dir, write_config, RunningVm};

const MIB: usize = 16;

fn host_file_read_mib_s(path: &std::path::Path) -> f64 {
    let mut file = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0usize;
    let start = Instant::now();
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n;
    }
    (total as f64 / (1 << 20) as f64) / start.elapsed().as_secs_f64()
}

fn main() {
    let dir = scratch_dir("bench-io");
    let image = dir.join("disk.img");
    make_disk(&image, 64 << 20, b"");
    let config = write_config(
        &dir,
        &(guest_config(1, 128, &format!("mvm.scenario=blkbench mvm.mib={MIB}"))
            + &disk_entries(&[(&image, false, "bench")])),
    );
    let run = RunningVm::start(&config).finish(Duration::from_secs(600));
    let r = run.results();
    assert_eq!(r.get("status").map(String::as_str), Some("ok"), "{}", run.console());
    let rate = |key: &str| {
        let cs: f64 = r[key].parse().expect("centiseconds");
        MIB as f64 / (cs.max(1.0) / 100.0)
    };
    let (read, write) = (rate("blk_read_cs"), rate("blk_write_cs"));
    let memcpy = host_memcpy_mib_s();
    let host_read = host_file_read_mib_s(&image);
    report(
        "guest_io",
        "guest dd of 16 MiB on virtio-blk (direct I/O, 1 MiB blocks); host limits measured alongside; PVM hosts interpret the guest kernel",
        &[
            Row { metric: "guest blk read".into(), unit: "MiB/s".into(), ours: Stats::of(&[read]), target: None, peer: None },
            Row { metric: "guest blk write+fsync".into(), unit: "MiB/s".into(), ours: Stats::of(&[write]), target: None, peer: None },
            Row { metric: "host memcpy (limit)".into(), unit: "MiB/s".into(), ours: Stats::of(&[memcpy]), target: None, peer: None },
            Row { metric: "host image read (limit)".into(), unit: "MiB/s".into(), ours: Stats::of(&[host_read]), target: None, peer: None },
        ],
    );
    let _ = std::fs::remove_dir_all(&dir);
}
