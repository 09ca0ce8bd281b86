//! Working through a project share day to day:
//!
//! - host edit -> guest file watcher: the time from the host's write (or
//!   create, rename, delete) to the line of a recursive inotify watcher in
//!   the guest (`mvm-vsock watch`, the shape of `inotifywait -m -r`)
//!   arriving on the host through `mvm exec`'s output (so an upper bound:
//!   it includes the way back). Target 200 ms.
//! - the same watcher over a tree of 20,000 directories: its start (one
//!   inotify watch per directory, listed through virtio-fs) and an event
//!   deep in the tree;
//! - `find` and `git status` over a 200,000-file project on the Debian
//!   image: cold (first run after the VMM started), again with the guest's
//!   caches dropped (the file server's own warm state), and warm (the
//!   guest's caches too: with a watched share it caches for 60 s, so this
//!   run makes few requests), and the VMM's open descriptors before and
//!   after (the file server keeps none per file). Target: cold at most 2x
//!   the run with dropped guest caches.
//!
//! `MVM_BENCH_EVENTS` (default 20; 0 skips the watcher part), `MVM_BENCH_WATCH_DIRS` (20000),
//! `MVM_BENCH_TREE_FILES` (200000; 0 skips the Debian part).
//!
//! Caveat for PVM development hosts: the guest kernel is interpreted
//! (about 1.5 M instructions/s), so each FUSE request costs the guest about
//! a millisecond; tree walks scale with that, on VMX/SVM hosts they take
//! a small fraction of it.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use mvm_benches::{report, Row};
use mvm_tests::mvm_cli::{describe, Mvm};
use mvm_tests::scratch_dir;
use mvm_tests::watch::{mark, GuestWatcher, Latency};

fn env_count(key: &str, default: usize) -> usize {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// CPU time (user + system) process `pid` has used, in seconds.
fn cpu_secs(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and
    // stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let ticks: f64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse::<f64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz
}

/// `mvm exec vm -- sh -c script`, which must succeed: wall time, the CPU
/// time the VM's process (vCPUs and file server) used meanwhile (unlike
/// wall time, it does not grow when other work shares the host's CPUs),
/// and the output.
fn timed(mvm: &Mvm, vm: &str, script: &str) -> (f64, f64, String) {
    let pid = mvm.pid_of(vm);
    let cpu = cpu_secs(pid);
    let t = Instant::now();
    let out = mvm.run(&["exec", vm, "--", "sh", "-c", script]);
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu_secs(pid) - cpu;
    assert!(out.status.success(), "{script}: {}", describe(&out));
    eprintln!("  {script}: {secs:.1} s, mvm-vmm CPU {cpu:.1} s");
    (secs, cpu, String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn with_target(mut row: Row, target: f64) -> Row {
    row.target = Some(target);
    row
}

fn watcher_part(dir: &Path, rows: &mut Vec<Row>) {
    let events = env_count("MVM_BENCH_EVENTS", 20);
    let dirs = env_count("MVM_BENCH_WATCH_DIRS", 20_000);
    if events == 0 {
        return;
    }
    let project = dir.join("project");
    std::fs::create_dir_all(project.join("small/src")).unwrap();
    for i in 0..dirs {
        std::fs::create_dir_all(project.join(format!("tree/d{:03}/e{:03}", i / 100, i % 100))).unwrap();
    }
    let mvm = Mvm::new(dir.join("state"));
    let p = project.to_str().unwrap();
    mvm.ok(&[
        "create",
        "--no-image",
        "--no-network",
        "watch",
        "--project",
        p,
        "--memory",
        "256",
    ]);
    mvm.ok(&["start", "watch", "--timeout", "900"]);

    let mut w = GuestWatcher::start(&mvm, "watch", "/project/small");
    let names = [
        "host write -> IN_MODIFY",
        "host create -> IN_CREATE",
        "host rename -> IN_MOVED_TO",
        "host delete -> IN_DELETE",
    ];
    let mut guest: [Vec<f64>; 4] = Default::default();
    let mut round: [Vec<f64>; 4] = Default::default();
    let mut record = |k: usize, l: Latency| {
        guest[k].push(ms(l.guest));
        round[k].push(ms(l.round_trip));
    };
    for i in 0..events {
        let f = project.join("small/src/main.rs");
        let t = mark();
        std::fs::write(&f, format!("fn main() {{ /* {i} */ }}\n")).unwrap();
        record(0, w.expect("MODIFY src/main.rs", t));
        w.expect("CLOSE_WRITE src/main.rs", t);
        let n = project.join(format!("small/new{i}.txt"));
        let t = mark();
        std::fs::write(&n, b"x").unwrap();
        record(1, w.expect(&format!("CREATE new{i}.txt"), t));
        let t = mark();
        std::fs::rename(&n, project.join(format!("small/src/moved{i}.txt"))).unwrap();
        record(2, w.expect(&format!("MOVED_TO src/moved{i}.txt"), t));
        let t = mark();
        std::fs::remove_file(project.join(format!("small/src/moved{i}.txt"))).unwrap();
        record(3, w.expect(&format!("DELETE src/moved{i}.txt"), t));
    }
    drop(w);
    for k in 0..4 {
        rows.push(with_target(Row::plain(names[k], "ms", &guest[k]), 200.0));
        rows.push(Row::plain(&format!("{} (+ way back)", &names[k][5..]), "ms", &round[k]));
    }

    if dirs > 0 {
        let t = Instant::now();
        let mut w = GuestWatcher::start(&mvm, "watch", "/project/tree");
        let ready = t.elapsed();
        eprintln!(
            "guest watcher over {} directories ready in {:.1} s",
            w.watched,
            ready.as_secs_f64()
        );
        rows.push(Row::plain(
            &format!("watch {} dirs: start", w.watched),
            "s",
            &[ready.as_secs_f64()],
        ));
        let mut deep = Vec::new();
        for i in 0..events.min(5) {
            let last = dirs - 1;
            let rel = format!("d{:03}/e{:03}/f{i}", last / 100, last % 100);
            let t = mark();
            std::fs::write(project.join("tree").join(&rel), b"x").unwrap();
            deep.push(ms(w.expect(&format!("CREATE {rel}"), t).guest));
        }
        rows.push(with_target(
            Row::plain(&format!("watch {dirs} dirs: create"), "ms", &deep),
            200.0,
        ));
    }
    let pid = mvm.pid_of("watch");
    eprintln!("mvm-vmm descriptors after the watcher part: {}", open_fds(pid));
    mvm.ok(&["stop", "watch"]);
}

fn tree_part(dir: &Path, rows: &mut Vec<Row>) {
    let files = env_count("MVM_BENCH_TREE_FILES", 200_000);
    if files == 0 {
        return;
    }
    let project = dir.join("big");
    let per_dir = 100;
    let t = Instant::now();
    for i in 0..files {
        let d = project.join(format!("m{:03}/d{:03}", i / (per_dir * 100), (i / per_dir) % 100));
        if i % per_dir == 0 {
            std::fs::create_dir_all(&d).unwrap();
        }
        std::fs::write(d.join(format!("f{i}.txt")), format!("{i}\n")).unwrap();
    }
    let git = |args: &[&str]| {
        let out = Command::new("git").arg("-C").arg(&project).args(args).output().unwrap();
        assert!(out.status.success(), "git {args:?}: {}", describe(&out));
    };
    // As in a real project, files older than the index: entries written in
    // the same second as their files are "racily clean", and every git
    // (the host's too) re-reads them all.
    let out = Command::new("find")
        .arg(&project)
        .args(["-exec", "touch", "-h", "-d", "1 hour ago", "{}", "+"])
        .output()
        .unwrap();
    assert!(out.status.success(), "touch: {}", describe(&out));
    git(&["init", "-q"]);
    git(&["add", "-A"]);
    git(&[
        "-c",
        "user.name=bench",
        "-c",
        "user.email=bench@example.com",
        "commit",
        "-qm",
        "tree",
    ]);
    eprintln!("{files}-file git project made in {:.1} s", t.elapsed().as_secs_f64());

    let mvm = Mvm::new(dir.join("state-big"));
    let p = project.to_str().unwrap();
    // As root over a root-owned tree (the benchmark's user): no extra user.
    mvm.ok(&[
        "create",
        "--no-network",
        "--user",
        "root",
        "big",
        "--project",
        p,
        "--memory",
        "1024",
    ]);
    mvm.ok(&["start", "big", "--timeout", "900"]);
    // Each walk three times: cold (first after the VMM started), again
    // with the guest's caches dropped (the file server warm: what a cold
    // start costs beyond a warm one), and warm (the guest's caches too).
    // git first, then find after a restart of the VM, so both start cold.
    let drop_caches = "sync; echo 3 > /proc/sys/vm/drop_caches";
    for (what, script) in [
        ("git status", "cd /project && git status --porcelain | wc -l"),
        ("find", "find /project | wc -l"),
    ] {
        if what == "find" {
            mvm.ok(&["stop", "big"]);
            mvm.ok(&["start", "big", "--timeout", "900"]);
        }
        let pid = mvm.pid_of("big");
        let fds_before = open_fds(pid);
        let (cold, cold_cpu, out) = timed(&mvm, "big", script);
        timed(&mvm, "big", drop_caches);
        let (dropped, dropped_cpu, _) = timed(&mvm, "big", script);
        let (warm, warm_cpu, _) = timed(&mvm, "big", script);
        let fds_after = open_fds(pid);
        eprintln!(
            "{what}: {out}; cold {cold:.1} s (CPU {cold_cpu:.1} s), guest caches dropped {dropped:.1} s \
             (CPU {dropped_cpu:.1} s), warm {warm:.1} s (CPU {warm_cpu:.1} s); mvm-vmm fds {fds_before} -> {fds_after}"
        );
        for (run, wall, cpu) in [
            ("cold", cold, cold_cpu),
            ("guest caches dropped", dropped, dropped_cpu),
            ("warm", warm, warm_cpu),
        ] {
            rows.push(Row::plain(&format!("{what} {files} files: {run}"), "s", &[wall]));
            rows.push(Row::plain(&format!("{what}: {run}, mvm-vmm CPU"), "s", &[cpu]));
        }
        // The file server's share of a cold start: against the run whose
        // guest caches were dropped (the same guest work); CPU time is the
        // figure to trust on a busy host.
        rows.push(with_target(
            Row::plain(&format!("{what}: cold / dropped"), "x", &[cold / dropped]),
            2.0,
        ));
        rows.push(with_target(
            Row::plain(
                &format!("{what}: cold / dropped, CPU"),
                "x",
                &[cold_cpu / dropped_cpu.max(0.01)],
            ),
            2.0,
        ));
        rows.push(Row::plain(&format!("{what}: cold / warm"), "x", &[cold / warm]));
        rows.push(Row::plain(
            &format!("{what}: mvm-vmm fds before"),
            "fds",
            &[fds_before as f64],
        ));
        rows.push(Row::plain(
            &format!("{what}: mvm-vmm fds after"),
            "fds",
            &[fds_after as f64],
        ));
    }
    mvm.ok(&["stop", "big"]);
}

fn main() {
    let dir = scratch_dir("bench-share-day");
    let mut rows = Vec::new();
    watcher_part(&dir, &mut rows);
    tree_part(&dir, &mut rows);
    report(
        "share_day",
        "host edits reaching guest watchers (an upper bound: via mvm exec's output), a 20,000-dir watch, and tree walks on a 200,000-file project",
        &rows,
    );
    let _ = std::fs::remove_dir_all(&dir);
}
