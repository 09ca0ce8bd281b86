//! Guest-side throughput through a project share, the built-in virtio-fs
//! overlay and virtiofsd (over a kernel overlayfs of the same layers) in
//! the same VM and run: sequential read and write of a 64 MiB file, file
//! creates and stats per second, and `ls -lR` of a 10,000-entry tree,
//! timed in the guest (tests/guest/init `scenario_fsbench`). Next to them,
//! the same operations on the host's own file system (the limit).
//!
//! Caveat for PVM development hosts: the guest kernel is interpreted
//! (about 1.5 M instructions/s), so every FUSE request costs the guest
//! milliseconds; the device model's own cost per request is in
//! `device_requests` (criterion, `fs ...` rows).

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use mvm_benches::{report, Row, Stats};
use mvm_tests::{guest_config_in, scratch_dir, share_entry, RunningVm};

const MIB: usize = 64;
const FILES: usize = 1000;
const TREE_DIRS: usize = 100;
const TREE_FILES: usize = 100;

fn make_project(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut big = std::fs::File::create(dir.join("big.bin")).unwrap();
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i * 7 + 3) as u8).collect();
    for _ in 0..MIB {
        big.write_all(&chunk).unwrap();
    }
    for d in 0..TREE_DIRS {
        let sub = dir.join(format!("tree/d{d:02}"));
        std::fs::create_dir_all(&sub).unwrap();
        for f in 0..TREE_FILES {
            std::fs::write(sub.join(format!("f{f:02}")), b"x").unwrap();
        }
    }
}

/// The same work on the host file system: (read, write, creates, stats,
/// walk) in seconds.
fn host_figures(dir: &Path) -> [f64; 5] {
    let timed = |f: &mut dyn FnMut()| {
        let start = Instant::now();
        f();
        start.elapsed().as_secs_f64()
    };
    let read = timed(&mut || {
        let mut file = std::fs::File::open(dir.join("big.bin")).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        while file.read(&mut buf).unwrap() > 0 {}
    });
    let write = timed(&mut || {
        let mut file = std::fs::File::create(dir.join("host-out.bin")).unwrap();
        let buf = vec![0u8; 1 << 20];
        for _ in 0..MIB {
            file.write_all(&buf).unwrap();
        }
        file.sync_all().unwrap();
    });
    std::fs::create_dir_all(dir.join("host-c")).unwrap();
    let creates = timed(&mut || {
        for i in 0..FILES {
            std::fs::File::create(dir.join(format!("host-c/f{i}"))).unwrap();
        }
    });
    let stats = timed(&mut || {
        for i in 0..FILES {
            std::fs::metadata(dir.join(format!("host-c/f{i}"))).unwrap();
        }
    });
    let walk = timed(&mut || {
        for d in std::fs::read_dir(dir.join("tree")).unwrap() {
            let d = d.unwrap().path();
            std::fs::metadata(&d).unwrap();
            for f in std::fs::read_dir(&d).unwrap() {
                std::fs::symlink_metadata(f.unwrap().path()).unwrap();
            }
        }
    });
    let _ = std::fs::remove_dir_all(dir.join("host-c"));
    let _ = std::fs::remove_file(dir.join("host-out.bin"));
    [read, write, creates, stats, walk]
}

fn main() {
    let dir = scratch_dir("bench-fs");
    let project = dir.join("project");
    make_project(&project);
    let mut text = guest_config_in(
        "fsbench",
        &dir.join("state"),
        1,
        256,
        &format!("mvm.scenario=fsbench mvm.fsdirs=/builtin,/virtiofsd mvm.mib={MIB} mvm.files={FILES}"),
    );
    for (tag, backend) in [("builtin", "builtin"), ("virtiofsd", "virtiofsd")] {
        text += &share_entry(tag, &project, backend, false);
    }
    let config = dir.join("fsbench.toml");
    std::fs::write(&config, text).unwrap();
    let run = RunningVm::start(&config).finish(Duration::from_secs(1800));
    let r = run.results();
    assert_eq!(
        r.get("status").map(String::as_str),
        Some("ok"),
        "stderr: {}\n{}",
        run.stderr,
        run.console()
    );
    let secs = |key: &str| -> f64 {
        let cs: f64 = r[key].parse().expect("centiseconds");
        cs.max(1.0) / 100.0
    };
    let host = host_figures(&project);
    let entries = (TREE_DIRS * (TREE_FILES + 1)) as f64;
    let metrics: [(&str, &str, f64, usize); 5] = [
        ("sequential read 64 MiB", "MiB/s", MIB as f64, 0),
        ("sequential write 64 MiB + fsync", "MiB/s", MIB as f64, 1),
        ("file creates", "files/s", FILES as f64, 2),
        ("stats (attribute cache expired)", "stats/s", FILES as f64, 3),
        ("ls -lR of 10,100 entries", "entries/s", entries, 4),
    ];
    let keys = ["read_cs", "write_cs", "create_cs", "stat_cs", "lslr_cs"];
    let mut rows = Vec::new();
    for (name, unit, amount, i) in metrics {
        for backend in ["builtin", "virtiofsd"] {
            rows.push(Row {
                metric: format!("{name}: {backend}"),
                unit: unit.into(),
                ours: Stats::of(&[amount / secs(&format!("{backend}_{}", keys[i]))]),
                target: None,
                peer: None,
            });
        }
        rows.push(Row {
            metric: format!("{name}: host fs (limit)"),
            unit: unit.into(),
            ours: Stats::of(&[amount / host[i].max(1e-9)]),
            target: None,
            peer: None,
        });
    }
    report(
        "guest_fs",
        "guest-side share throughput, built-in virtio-fs overlay vs virtiofsd, same VM; host file system alongside; PVM hosts interpret the guest kernel",
        &rows,
    );
    let _ = std::fs::remove_dir_all(&dir);
}
