//! (b) Boot to guest userspace: from `mvm-vmm` process start to the test
//! guest's init printing its first line (`mvm-init: start`), and to the
//! guest having powered off. One vCPU, 128 MiB.
//!
//! On the PVM development hosts the guest kernel is interpreted: the naive
//! first measurement in shared/HOST-KVM.md reached `Run /init` after 184 s,
//! the best recorded there after 71-73 s; Firecracker, Cloud Hypervisor and
//! QEMU do not reach userspace on this host at all. Target: at most 45 s.

use std::time::Duration;

use mvm_benches::{report, Row, Stats};
use mvm_tests::{guest_config, scratch_dir, write_config, RunningVm};

fn main() {
    let runs: usize = std::env::var("MVM_BENCH_BOOT_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let dir = scratch_dir("bench-boot");
    let config = write_config(&dir, &guest_config(1, 128, "mvm.scenario=facts mvm.end=poweroff"));
    let (mut first_line, mut done) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let mut vm = RunningVm::start(&config);
        let at = vm
            .wait_for("mvm-init: start", Duration::from_secs(600))
            .expect("init's first line");
        let end = vm.wait_for("MVM-DONE", Duration::from_secs(600)).expect("scenario end");
        let run = vm.finish(Duration::from_secs(600));
        assert_eq!(run.status.code(), Some(0), "guest powers off: {}", run.stderr);
        first_line.push(at.as_secs_f64());
        done.push(end.as_secs_f64());
    }
    report(
        "boot_userspace",
        "mvm-vmm process start to the test guest's init output; 1 vCPU, 128 MiB, PVM host interprets the guest kernel",
        &[
            Row {
                metric: "to init's first line".into(),
                unit: "s".into(),
                ours: Stats::of(&first_line),
                target: Some(45.0),
                peer: Some(("HOST-KVM.md best".into(), 71.0)),
            },
            Row {
                metric: "to scenario done".into(),
                unit: "s".into(),
                ours: Stats::of(&done),
                target: None,
                peer: Some(("HOST-KVM.md best".into(), 87.0)),
            },
        ],
    );
    let _ = std::fs::remove_dir_all(&dir);
}
