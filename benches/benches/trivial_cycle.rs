//! (a) Trivial guest cycle: an ELF that writes one byte to the UART and
//! requests an i8042 reset, run as a whole `mvm-vmm` process many times:
//! wall time, CPU time and peak RSS with a 128 MiB guest.
//!
//! Peer on the same host (shared/HOST-KVM.md): Firecracker runs the same
//! cycle in 24 ms median wall, 3 ms CPU, 4.3 MiB peak RSS.
//! Targets: at most 12 ms median wall and 3 MiB peak RSS.

use std::process::{Command, Stdio};

use mvm_benches::{measure, report, vmm_binary, Row, Stats};
use mvm_tests::{scratch_dir, trivial_guest, write_config};

fn main() {
    let runs: usize = std::env::var("MVM_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let dir = scratch_dir("bench-trivial");
    let kernel = dir.join("trivial.elf");
    std::fs::write(&kernel, trivial_guest(b'.')).expect("write guest");
    let config = write_config(
        &dir,
        &format!(
            "version = 1\n[machine]\nvcpus = 1\nmemory_mib = 128\n[boot]\nkernel = \"{}\"\n[console]\noutput = \"none\"\ninput = \"none\"\n",
            kernel.display()
        ),
    );
    let bin = vmm_binary();
    let (mut wall, mut cpu, mut rss) = (Vec::new(), Vec::new(), Vec::new());
    // Warm the page cache and the binary once.
    let _ = measure(
        Command::new(&bin)
            .arg("run")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    for _ in 0..runs {
        let run = measure(
            Command::new(&bin)
                .arg("run")
                .arg(&config)
                .env("MVM_LOG", "error")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .expect("run mvm-vmm");
        assert_eq!(run.exit_code, 3, "the trivial guest ends with a reset (exit 3)");
        wall.push(run.wall.as_secs_f64() * 1e3);
        cpu.push(run.cpu.as_secs_f64() * 1e3);
        rss.push(run.max_rss_kib as f64 / 1024.0);
    }
    report(
        "trivial_cycle",
        "whole mvm-vmm process: start, 128 MiB VM, guest writes 1 byte to the UART and resets via i8042, exit",
        &[
            Row {
                metric: "wall time".into(),
                unit: "ms".into(),
                ours: Stats::of(&wall),
                target: Some(12.0),
                peer: Some(("Firecracker".into(), 24.0)),
            },
            Row {
                metric: "CPU time (user+sys)".into(),
                unit: "ms".into(),
                ours: Stats::of(&cpu),
                target: None,
                peer: Some(("Firecracker".into(), 3.0)),
            },
            Row {
                metric: "peak RSS".into(),
                unit: "MiB".into(),
                ours: Stats::of(&rss),
                target: Some(3.0),
                peer: Some(("Firecracker".into(), 4.3)),
            },
        ],
    );
    let _ = std::fs::remove_dir_all(&dir);
}
