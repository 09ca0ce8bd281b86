//! Host changes to a share's source reach the guest's file watchers: for
//! each share with `watch = true`, a [`TreeWatcher`] reports what the host
//! changed, and the guest agent replays it (`FsEvents` on vsock) as the
//! local operation the guest kernel turns into inotify events. The file
//! server answers those replays from the state the host already made
//! (`mvm_storage::fs::overlay::ECHO_GID_*`), so nothing is written twice.
//!
//! While a share's every host change is replayed, its file server gives
//! the guest long cache timeouts ([`OverlayOptions::WATCHED`]): the replays
//! refresh what changed, and stats of what did not cost no request. If a
//! change may have been missed (inotify queue overflow, watch limit), the
//! timeouts go back to 1 s.
//!
//! One thread per VM polls every watcher. Events of a burst are gathered
//! for up to [`GATHER`] (an editor's save is several events), then sent.
//! Before the agent listens (early boot, a reboot) they are kept, up to
//! [`MAX_PENDING`], and sent once it does.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mvm_agent::proto::{self, FsChange, Message};
use mvm_storage::fs::locked;
use mvm_storage::fs::overlay::{Overlay, OverlayOptions};
use mvm_storage::fs::watch::{self, TreeWatcher};
use vmm_sys_util::eventfd::EventFd;

use crate::config::VmConfig;
use crate::devices::LiveShare;
use crate::{Error, Result};

/// How long a burst of events is gathered before it is sent: after the
/// first event, until 10 ms pass without one, at most this long.
const GATHER: Duration = Duration::from_millis(50);
const QUIET: Duration = Duration::from_millis(10);
/// A batch frame stays well under the protocol's 1 MiB frame limit, and
/// its replay short (each change is a few requests of the guest kernel:
/// tens of milliseconds where it is interpreted).
const MAX_BATCH_BYTES: usize = 256 << 10;
const MAX_BATCH_CHANGES: usize = 128;
/// How long the agent may take to replay one batch.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(300);
/// After a failed connection, the next attempt is this much later.
const RETRY: Duration = Duration::from_secs(1);
/// Changes kept for an agent that does not listen yet (a booting guest);
/// beyond, they are dropped and the share's cache timeouts shortened.
const MAX_PENDING: usize = 100_000;

/// The watcher thread; stopped when dropped.
pub(crate) struct Watching {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Watching {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Watched {
    tag: String,
    watcher: TreeWatcher,
    fs: Arc<Mutex<Overlay>>,
    /// Changes not replayed yet (the agent is not listening yet).
    pending: Vec<FsChange>,
    /// Changes were dropped.
    missed: bool,
    /// The file server hands out long cache timeouts
    /// ([`OverlayOptions::WATCHED`]) while no change can be missed.
    long_cache: bool,
}

impl Watched {
    /// Keeps `changes` until the agent takes them. Past [`MAX_PENDING`]
    /// all pending changes are dropped instead, and the share gets short
    /// cache timeouts (the guest rereads what it caches within 1 s).
    fn keep(&mut self, changes: Vec<FsChange>) {
        self.pending.extend(changes);
        if self.pending.len() > MAX_PENDING {
            log::warn!(
                "share {}: {} host changes waiting for the guest agent, dropped",
                self.tag,
                self.pending.len()
            );
            self.pending.clear();
            self.missed = true;
        }
        self.check_complete();
    }

    /// Back to short cache timeouts once a change may have been missed
    /// (queue overflow, directories left unwatched).
    fn check_complete(&mut self) {
        if self.long_cache && (self.missed || self.watcher.overflows > 0 || self.watcher.unwatched > 0) {
            locked(&self.fs).set_options(OverlayOptions::default());
            self.long_cache = false;
            log::warn!(
                "share {}: host changes may have been missed; the guest now caches entries for 1 s",
                self.tag
            );
        }
    }
}

/// Starts watching the shares with `watch = true` (none: no thread).
pub(crate) fn start(
    config: &VmConfig,
    live: &[LiveShare],
    confine: mvm_devices::ThreadStart,
) -> Result<Option<Watching>> {
    let mut watched = Vec::new();
    for share in config.shares.iter().filter(|s| s.watch) {
        let Some(fs) = live.iter().find(|l| l.tag == share.tag).map(|l| Arc::clone(&l.fs)) else {
            continue;
        };
        let watcher = TreeWatcher::new(&share.source).map_err(|e| Error::Share {
            tag: share.tag.clone(),
            reason: e.to_string(),
        })?;
        log::debug!("share {}: watching {} directories", share.tag, watcher.watched());
        let long_cache = watcher.unwatched == 0;
        if long_cache {
            locked(&fs).set_options(OverlayOptions::WATCHED);
        }
        watched.push(Watched {
            tag: share.tag.clone(),
            watcher,
            fs,
            pending: Vec::new(),
            missed: false,
            long_cache,
        });
    }
    let Some(vsock) = config.vsock.as_ref().filter(|_| !watched.is_empty()) else {
        return Ok(None);
    };
    let stop = Arc::new(EventFd::new(libc::EFD_CLOEXEC).map_err(Error::host("creating an eventfd"))?);
    let mut agent = Agent {
        uds: vsock.uds_path.clone(),
        conn: None,
        retry_at: Instant::now(),
    };
    let thread_stop = Arc::clone(&stop);
    let thread = std::thread::Builder::new()
        .name("mvm-watch".into())
        .spawn(move || {
            mvm_devices::run_thread_start(&confine);
            run(&mut watched, &thread_stop, &mut agent)
        })
        .map_err(Error::host("starting the share watcher thread"))?;
    Ok(Some(Watching {
        stop,
        thread: Some(thread),
    }))
}

/// Waits until one of `fds` is readable or `timeout` passes (`None`:
/// forever); returns which are readable.
fn poll(fds: &[BorrowedFd<'_>], timeout: Option<Duration>) -> Vec<bool> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    // SAFETY: a valid array of pollfd of the given length.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if n <= 0 {
        return vec![false; fds.len()];
    }
    pfds.iter().map(|p| p.revents != 0).collect()
}

fn run(watched: &mut [Watched], stop: &EventFd, agent: &mut Agent) {
    loop {
        // Changes kept for an agent not listening yet are retried.
        let waiting = watched.iter().any(|w| !w.pending.is_empty());
        let ready = {
            // SAFETY: the eventfd outlives this borrow.
            let mut fds = vec![unsafe { BorrowedFd::borrow_raw(stop.as_raw_fd()) }];
            fds.extend(watched.iter().map(|w| w.watcher.fd()));
            poll(&fds, waiting.then_some(RETRY))
        };
        if ready.first().copied().unwrap_or(true) {
            return;
        }
        for (w, ready) in watched.iter_mut().zip(&ready[1..]) {
            if *ready {
                let start = Instant::now();
                let changes = gather(&mut w.watcher);
                log::trace!(
                    "share {}: gathered {} changes in {:?}",
                    w.tag,
                    changes.len(),
                    start.elapsed()
                );
                w.keep(changes);
            }
            if !w.pending.is_empty() {
                agent.deliver(&w.tag, &mut w.pending);
            }
        }
    }
}

/// The changes of one burst.
fn gather(watcher: &mut TreeWatcher) -> Vec<FsChange> {
    let start = Instant::now();
    let mut changes = Vec::new();
    loop {
        match watcher.read_changes() {
            Ok(more) => changes.extend(more),
            Err(e) => {
                log::warn!("reading share changes: {e}");
                break;
            }
        }
        let left = GATHER.saturating_sub(start.elapsed());
        if left.is_zero() || !poll(&[watcher.fd()], Some(left.min(QUIET)))[0] {
            break;
        }
    }
    watch::coalesce(changes)
}

fn change_bytes(c: &FsChange) -> usize {
    16 + match c {
        FsChange::Move { from, to, .. } => from.len() + to.len(),
        FsChange::Arrive { path, .. }
        | FsChange::Leave { path, .. }
        | FsChange::Modify { path, .. }
        | FsChange::Attrib { path, .. } => path.len(),
    }
}

/// The connection to the guest agent, opened when there is something to
/// send and kept.
struct Agent {
    uds: PathBuf,
    conn: Option<UnixStream>,
    retry_at: Instant,
}

impl Agent {
    /// Sends `pending` in batches; each one the agent answered leaves
    /// it. What is left waits for a connection.
    fn deliver(&mut self, tag: &str, pending: &mut Vec<FsChange>) {
        while !pending.is_empty() {
            let mut bytes = 0;
            let count = pending
                .iter()
                .take(MAX_BATCH_CHANGES)
                .take_while(|c| {
                    let fits = bytes < MAX_BATCH_BYTES;
                    bytes += change_bytes(c);
                    fits
                })
                .count();
            let Some(conn) = self.connection() else {
                log::debug!("share {tag}: {} host changes wait for the guest agent", pending.len());
                return;
            };
            let msg = Message::FsEvents {
                tag: tag.to_string(),
                changes: pending[..count].to_vec(),
            };
            let start = Instant::now();
            match proto::write_message(conn, &msg).and_then(|()| proto::read_message(conn)) {
                Ok(Message::Ok) => log::debug!(
                    "share {tag}: {count} host changes replayed in {:.1} ms",
                    start.elapsed().as_secs_f64() * 1000.0
                ),
                Ok(Message::Error(e)) => {
                    log::warn!("share {tag}: the guest agent did not replay host changes: {e}")
                }
                Ok(other) => {
                    log::warn!("share {tag}: the guest agent answered {} to FsEvents", other.name());
                    self.conn = None;
                    return;
                }
                Err(e) => {
                    log::debug!("share {tag}: connection to the guest agent lost: {e}");
                    self.conn = None;
                    return;
                }
            }
            pending.drain(..count);
        }
    }

    fn connection(&mut self) -> Option<&mut UnixStream> {
        if self.conn.is_none() && Instant::now() >= self.retry_at {
            let software = format!("mvm-vmm {}", env!("CARGO_PKG_VERSION"));
            match proto::connect_vsock(&self.uds, proto::AGENT_PORT, Duration::from_secs(5), &software) {
                Ok((stream, _)) => {
                    let _ = stream.set_read_timeout(Some(REPLAY_TIMEOUT));
                    self.conn = Some(stream);
                }
                Err(e) => {
                    log::debug!("guest agent: {e}");
                    self.retry_at = Instant::now() + RETRY;
                }
            }
        }
        self.conn.as_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_gids_agree_between_agent_and_file_server() {
        use mvm_storage::fs::overlay as fs;
        assert_eq!(proto::ECHO_GID_MODIFY, fs::ECHO_GID_MODIFY);
        assert_eq!(proto::ECHO_GID_ENTRY, fs::ECHO_GID_ENTRY);
        assert_eq!(proto::ECHO_GID_DIR, fs::ECHO_GID_DIR);
    }

    #[test]
    fn pending_changes_are_capped_then_dropped_with_short_caching() {
        use mvm_storage::fs::{Context, FileSystem, ROOT_ID};
        let dir = std::env::temp_dir().join(format!("mvm-watch-pending-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fs = Arc::new(Mutex::new(Overlay::new(None, &dir, OverlayOptions::WATCHED).unwrap()));
        let mut w = Watched {
            tag: "t".into(),
            watcher: TreeWatcher::new(&dir).unwrap(),
            fs: Arc::clone(&fs),
            pending: Vec::new(),
            missed: false,
            long_cache: true,
        };
        let ctx = Context { uid: 0, gid: 0, pid: 1 };
        let cache = || locked(&fs).getattr(ctx, ROOT_ID, None).unwrap().1;
        let change = |i: usize| FsChange::Modify {
            path: format!("f{i}").into_bytes(),
            size: i as u64,
        };
        // Up to the cap, burst by burst: all kept, long caching stays.
        for burst in 0..MAX_PENDING / 1000 {
            w.keep((burst * 1000..(burst + 1) * 1000).map(change).collect());
        }
        assert_eq!(w.pending.len(), MAX_PENDING);
        assert!(!w.missed && w.long_cache);
        assert_eq!(cache(), OverlayOptions::WATCHED.attr_timeout);
        // One more: everything pending is dropped, the share is marked as
        // having missed changes, and the guest caches for 1 s only.
        w.keep(vec![change(MAX_PENDING)]);
        assert!(w.pending.is_empty());
        assert!(w.missed && !w.long_cache);
        assert_eq!(cache(), OverlayOptions::default().attr_timeout);
        assert!(cache() < OverlayOptions::WATCHED.attr_timeout);
        // Later changes are kept again, and a single burst past the cap is
        // dropped as a whole.
        w.keep(vec![change(0)]);
        assert_eq!(w.pending.len(), 1);
        w.keep((0..MAX_PENDING).map(change).collect());
        assert!(w.pending.is_empty());
        assert!(!w.long_cache);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
