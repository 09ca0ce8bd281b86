//! The host-edit scenario of a running VM's project share: a recursive
//! inotify watcher in the guest (`mvm-vsock watch`, the shape of
//! `inotifywait -m -r`) while the host writes, creates, renames and
//! deletes in the project; the guest's reads see the host's content at
//! once, and the VM's own changes are neither echoed back nor overwritten.
//! Shared by the manager test and the overlay benchmark.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use crate::mvm_cli::{describe, Mvm};

/// How long an expected guest event may take before the scenario fails
/// (a correctness bound for loaded CI hosts; the latency itself is
/// measured, and belongs to the benchmark).
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// When a host change was made: the host's monotonic and wall clocks.
#[derive(Debug, Clone, Copy)]
pub struct Mark {
    pub at: Instant,
    pub wall: SystemTime,
}

/// Now, before a host change.
pub fn mark() -> Mark {
    Mark {
        at: Instant::now(),
        wall: SystemTime::now(),
    }
}

/// How long a host change took to reach the guest's watcher.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    /// Host change -> the watcher's read of the event, by the guest's
    /// wall clock corrected by its measured offset from the host's.
    pub guest: Duration,
    /// Host change -> the watcher's line arriving on the host through
    /// `mvm exec` (an upper bound: it includes the way back).
    pub round_trip: Duration,
}

/// The guest watcher's output lines, with when the host received each.
pub struct GuestWatcher {
    child: Child,
    lines: mpsc::Receiver<(Instant, String)>,
    seen: Vec<(Instant, String)>,
    /// Directories it watched at start.
    pub watched: usize,
    /// The guest's wall clock minus the host's, in nanoseconds.
    pub clock_offset_ns: i64,
}

/// The guest's wall clock minus the host's, in nanoseconds, from the
/// agent's `Info` answer: of five exchanges, the one with the shortest
/// round trip, against its midpoint (off by at most half of it).
pub fn clock_offset(mvm: &Mvm, vm: &str) -> i64 {
    use mvm_agent::proto::{self, Message};
    let uds = mvm.root.join(vm).join("vsock.sock");
    let unix_ns = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos() as i64;
    let mut best: Option<(Duration, i64)> = None;
    for _ in 0..5 {
        let (mut stream, _) = proto::connect_vsock(&uds, proto::AGENT_PORT, Duration::from_secs(30), "mvm-tests")
            .expect("connect to the guest agent");
        let t0 = SystemTime::now();
        proto::write_message(&mut stream, &Message::Info).expect("Info");
        let info = match proto::read_message(&mut stream).expect("InfoReply") {
            Message::InfoReply(info) => info,
            other => panic!("agent answered {other:?}"),
        };
        let t1 = SystemTime::now();
        let rtt = t1.duration_since(t0).unwrap_or_default();
        let mid = unix_ns(t0) + rtt.as_nanos() as i64 / 2;
        if best.is_none_or(|(r, _)| rtt < r) {
            best = Some((rtt, info.clock_unix_ns - mid));
        }
    }
    best.map_or(0, |(_, o)| o)
}

impl GuestWatcher {
    /// Starts `mvm-vsock watch <dir>` in `vm` and waits for its "ready".
    pub fn start(mvm: &Mvm, vm: &str, dir: &str) -> GuestWatcher {
        let mut child = mvm
            .command(&["exec", vm, "--", "/bin/mvm-vsock", "watch", dir])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn mvm exec (guest watcher)");
        let out = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        let mut w = GuestWatcher {
            child,
            lines,
            seen: Vec::new(),
            watched: 0,
            clock_offset_ns: clock_offset(mvm, vm),
        };
        let ready = w
            .wait_for(|l| l.starts_with("ready "), Duration::from_secs(600))
            .unwrap_or_else(|| panic!("the guest watcher never got ready: {:?}", w.seen));
        w.watched = ready.1["ready ".len()..].parse().expect("ready N");
        w
    }

    /// The first line from now on that `want` accepts, and when it came.
    pub fn wait_for(&mut self, want: impl Fn(&str) -> bool, timeout: Duration) -> Option<(Instant, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let (at, line) = self.lines.recv_timeout(left).ok()?;
            self.seen.push((at, line.clone()));
            if want(&line) {
                return Some((at, line));
            }
        }
    }

    /// Waits for `event` ("MODIFY README") made after `since`.
    pub fn expect(&mut self, event: &str, since: Mark) -> Latency {
        let is = |l: &str| l.rsplit_once(' ').is_some_and(|(e, _)| e == event);
        match self.wait_for(is, EVENT_TIMEOUT) {
            Some((at, line)) => {
                let ns: i64 = line.rsplit_once(' ').and_then(|(_, n)| n.parse().ok()).unwrap_or(0);
                let host_ns = ns.saturating_sub(self.clock_offset_ns).max(0) as u64;
                let guest_time = SystemTime::UNIX_EPOCH + Duration::from_nanos(host_ns);
                Latency {
                    guest: guest_time.duration_since(since.wall).unwrap_or_default(),
                    round_trip: at.saturating_duration_since(since.at),
                }
            }
            None => panic!(
                "the guest watcher did not report {event:?} within {EVENT_TIMEOUT:?}; it reported: {:?}",
                self.seen.iter().map(|(_, l)| l).collect::<Vec<_>>()
            ),
        }
    }

    /// Events reported so far, without their times (for checks that
    /// something did not happen).
    pub fn drain(&mut self, settle: Duration) -> Vec<String> {
        while let Ok((at, line)) = self.lines.recv_timeout(settle) {
            self.seen.push((at, line));
        }
        self.seen
            .iter()
            .map(|(_, l)| l.rsplit_once(' ').map_or(l.as_str(), |(e, _)| e).to_string())
            .collect()
    }
}

impl Drop for GuestWatcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Latencies (host change -> guest watcher line on the host) of the
/// scenario's steps, by name.
pub type Latencies = Vec<(&'static str, Latency)>;

fn guest(mvm: &Mvm, vm: &str, script: &str) -> String {
    let out = mvm.run(&["exec", vm, "--", "sh", "-c", script]);
    assert!(out.status.success(), "guest `{script}`: {}", describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs the scenario on `vm`, whose project share of `project` is mounted
/// at /project; it adds `notes.md`, `tool.sh`, `data.bin` and `src/` to
/// the project (they must not exist).
pub fn host_edits_reach_guest_watchers(mvm: &Mvm, vm: &str, project: &Path) -> Latencies {
    let mut lat = Latencies::new();
    std::fs::write(project.join("notes.md"), "notes\n").unwrap();
    std::fs::write(project.join("tool.sh"), "echo from-host\n").unwrap();
    // The guest caches the file and its attributes first, so that a stale
    // cache would show.
    assert_eq!(
        guest(mvm, vm, "cat /project/notes.md; stat -c %s /project/notes.md"),
        "notes\n6\n"
    );
    // The VM's own copy of tool.sh (copied up in its upper layer).
    guest(mvm, vm, "echo 'echo from-vm' > /project/tool.sh");

    // Shared and private writable mappings of a project file: the shared
    // write lands in the VM's upper layer, the host file stays as it was.
    std::fs::write(project.join("data.bin"), vec![b'x'; 8192]).unwrap();
    assert_eq!(guest(mvm, vm, "/bin/mvm-vsock mmap /project/data.bin"), "mmap ok\n");
    let upper = std::fs::read(mvm.root.join(vm).join("overlay/project/data.bin")).expect("data.bin copied up");
    assert!(upper.starts_with(b"shared-mmapxxxxxxxxx"), "{:?}", &upper[..32]);
    assert_eq!(upper.len(), 8192);
    assert_eq!(std::fs::read(project.join("data.bin")).unwrap(), vec![b'x'; 8192]);

    let mut w = GuestWatcher::start(mvm, vm, "/project");
    assert!(w.watched >= 1);

    // A content change: the events of a local write, and the new content
    // and size on the guest's next read.
    let t = mark();
    std::fs::write(project.join("notes.md"), "edited on the host, longer than before\n").unwrap();
    lat.push(("modify", w.expect("MODIFY notes.md", t)));
    w.expect("CLOSE_WRITE notes.md", t);
    assert_eq!(
        guest(mvm, vm, "cat /project/notes.md; stat -c %s /project/notes.md"),
        "edited on the host, longer than before\n39\n"
    );

    // A new file, renamed, then deleted.
    std::fs::create_dir_all(project.join("src")).unwrap();
    w.expect("CREATE,ISDIR src", mark());
    let t = mark();
    std::fs::write(project.join("src/new.rs"), "fn main() {}\n").unwrap();
    lat.push(("create", w.expect("CREATE src/new.rs", t)));
    assert_eq!(guest(mvm, vm, "cat /project/src/new.rs"), "fn main() {}\n");
    let t = mark();
    std::fs::rename(project.join("src/new.rs"), project.join("src/lib.rs")).unwrap();
    lat.push(("rename", w.expect("MOVED_TO src/lib.rs", t)));
    assert_eq!(guest(mvm, vm, "ls /project/src"), "lib.rs\n");
    let t = mark();
    std::fs::remove_file(project.join("src/lib.rs")).unwrap();
    lat.push(("delete", w.expect("DELETE src/lib.rs", t)));
    assert_eq!(guest(mvm, vm, "ls /project/src"), "");

    // An editor's atomic save: a temporary file renamed over the original.
    let t = mark();
    std::fs::write(project.join(".notes.md.swp"), "saved atomically\n").unwrap();
    std::fs::rename(project.join(".notes.md.swp"), project.join("notes.md")).unwrap();
    lat.push(("atomic save", w.expect("MOVED_TO notes.md", t)));
    assert_eq!(guest(mvm, vm, "cat /project/notes.md"), "saved atomically\n");

    // The VM's own copy is the VM's: a host change to the same file is
    // neither shown nor allowed to touch it.
    std::fs::write(project.join("tool.sh"), "echo from-host-again\n").unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(guest(mvm, vm, "sh /project/tool.sh"), "from-vm\n");

    // A change the guest makes itself is reported once (by its own kernel),
    // not echoed back from the host.
    guest(mvm, vm, "echo mine > /project/guest.txt");
    let seen = w.drain(Duration::from_secs(2));
    let creates = seen.iter().filter(|l| *l == "CREATE guest.txt").count();
    assert_eq!(creates, 1, "{seen:?}");
    assert!(
        !project.join("guest.txt").exists(),
        "the guest's file reached the host tree"
    );
    lat
}
