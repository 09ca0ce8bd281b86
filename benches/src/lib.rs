//! Shared pieces of the benchmarks: running a process while measuring its
//! wall time, CPU time and peak RSS, statistics, and reporting as a table
//! and as JSON (to stdout and `target/bench-results/<name>.json`).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One measured process run.
#[derive(Debug, Clone, Copy)]
pub struct ProcessRun {
    pub wall: Duration,
    pub cpu: Duration,
    pub max_rss_kib: u64,
    pub exit_code: i32,
}

/// Spawn `cmd` (stdio as configured by the caller) and wait for it with
/// `wait4`, which reports the child's CPU time and peak RSS.
pub fn measure(cmd: &mut Command) -> std::io::Result<ProcessRun> {
    let start = Instant::now();
    let child = cmd.spawn()?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data filled by wait4.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child with valid out-pointers.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall = start.elapsed();
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    std::mem::forget(child); // already reaped
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    let exit_code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    Ok(ProcessRun {
        wall,
        cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
        max_rss_kib: usage.ru_maxrss as u64,
        exit_code,
    })
}

/// `mvm exec <vm> -- true` through the `mvm` binary `runs` times, on the
/// state root `state_root`: the wall time of each, in ms.
pub fn cli_exec_true(mvm: &Path, state_root: &Path, vm: &str, runs: usize) -> Vec<f64> {
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            let status = Command::new(mvm)
                .args(["exec", vm, "--", "true"])
                .env("MVM_STATE_DIR", state_root)
                .stdin(Stdio::null())
                .status()
                .expect("mvm exec");
            assert!(status.success(), "mvm exec {vm} -- true: {status}");
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect()
}

/// Order statistics of a sample.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    pub n: usize,
    pub min: f64,
    pub median: f64,
    pub p90: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(values: &[f64]) -> Stats {
        let mut v = values.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Stats {
            n: v.len(),
            min: v[0],
            median: at(0.5),
            p90: at(0.9),
            max: v[v.len() - 1],
        }
    }
}

/// One row of a comparison table.
pub struct Row {
    pub metric: String,
    pub unit: String,
    pub ours: Stats,
    pub target: Option<f64>,
    pub peer: Option<(String, f64)>,
}

impl Row {
    /// A row of our numbers alone: no target, no peer.
    pub fn plain(metric: &str, unit: &str, values: &[f64]) -> Row {
        Row {
            metric: metric.into(),
            unit: unit.into(),
            ours: Stats::of(values),
            target: None,
            peer: None,
        }
    }
}

impl Row {
    fn meets_target(&self) -> Option<bool> {
        self.target.map(|t| self.ours.median <= t)
    }
}

/// Print the table and the JSON, and write the JSON file.
pub fn report(name: &str, note: &str, rows: &[Row]) {
    println!("\n{name}: {note}");
    println!(
        "{:<28} {:>6} {:>14} {:>14} {:>14} {:>10} {:>8} {:>24}",
        "metric", "n", "min", "median", "p90", "target", "met", "peer (same host)"
    );
    for r in rows {
        let f = |v: f64| format!("{v:.2} {}", r.unit);
        println!(
            "{:<28} {:>6} {:>14} {:>14} {:>14} {:>10} {:>8} {:>24}",
            r.metric,
            r.ours.n,
            f(r.ours.min),
            f(r.ours.median),
            f(r.ours.p90),
            r.target.map(f).unwrap_or_else(|| "-".into()),
            match r.meets_target() {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "-",
            },
            r.peer
                .as_ref()
                .map(|(who, v)| format!("{who} {}", f(*v)))
                .unwrap_or_else(|| "-".into()),
        );
    }
    let json_rows: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{{\"metric\":{:?},\"unit\":{:?},\"n\":{},\"min\":{:.4},\"median\":{:.4},\"p90\":{:.4},\"max\":{:.4},\"target\":{},\"met\":{},\"peer\":{}}}",
                r.metric,
                r.unit,
                r.ours.n,
                r.ours.min,
                r.ours.median,
                r.ours.p90,
                r.ours.max,
                r.target.map_or("null".into(), |t| format!("{t}")),
                r.meets_target().map_or("null".into(), |m| m.to_string()),
                r.peer.as_ref().map_or("null".into(), |(who, v)| format!("{{\"name\":{who:?},\"value\":{v}}}")),
            )
        })
        .collect();
    let json = format!(
        "{{\"benchmark\":{name:?},\"note\":{note:?},\"rows\":[{}]}}",
        json_rows.join(",")
    );
    println!("JSON {json}");
    let dir = mvm_tests::repo_root().join("target/bench-results");
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(dir.join(format!("{name}.json")), format!("{json}\n"));
    }
}

/// The release `mvm-vmm` next to this benchmark binary.
pub fn vmm_binary() -> std::path::PathBuf {
    mvm_tests::mvm_vmm()
}

/// The host's memory copy bandwidth in MiB/s (256 MiB, one copy): the
/// physical limit next to guest I/O figures. Both buffers are touched
/// first, so page faults are not timed.
pub fn host_memcpy_mib_s() -> f64 {
    let src = vec![1u8; 256 << 20];
    let mut dst = vec![2u8; 256 << 20];
    let start = std::time::Instant::now();
    dst.copy_from_slice(&src);
    std::hint::black_box(&dst);
    256.0 / start.elapsed().as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_pick_order_statistics() {
        let s = Stats::of(&[5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!((s.n, s.min, s.median, s.max), (5, 1.0, 3.0, 5.0));
        assert_eq!(s.p90, 5.0);
    }

    #[test]
    fn measure_reports_exit_and_rss() {
        let run = measure(Command::new("sh").args(["-c", "exit 3"])).unwrap();
        assert_eq!(run.exit_code, 3);
        assert!(run.max_rss_kib > 0);
    }
}
