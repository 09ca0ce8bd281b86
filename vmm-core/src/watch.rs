//! Host changes to a share's source reach the guest's file watchers: for
//! each share with `watch = true`, a [`TreeWatcher`] reports what the host
//! changed, and the guest agent replays it (`FsEvents` on vsock) as the
//! local operation the guest kernel turns into inotify events. The file
//! server answers those replays from the state the host already made
//! (`mvm_storage::fs::overlay::ECHO_GID_*`), so nothing is written twice.
//!
//! One thread per VM polls every watcher. Events of a burst are gathered
//! for up to [`GATHER`] (an editor's save is several events), then sent.
//! Before the agent listens (early boot) a batch is dropped: the guest has
//! cached nothing yet, so nothing of it is stale.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mvm_agent::proto::{self, FsChange, Message};
use mvm_storage::fs::watch::TreeWatcher;
use vmm_sys_util::eventfd::EventFd;

use crate::config::VmConfig;
use crate::{Error, Result};

/// How long a burst of events is gathered before it is sent: after the
/// first event, until 10 ms pass without one, at most this long.
const GATHER: Duration = Duration::from_millis(50);
const QUIET: Duration = Duration::from_millis(10);
/// A batch frame stays well under the protocol's 1 MiB frame limit.
const MAX_BATCH_BYTES: usize = 256 << 10;
/// How long the agent may take to replay one batch.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(60);
/// After a failed connection, batches are dropped for this long.
const RETRY: Duration = Duration::from_secs(1);

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
}

/// Starts watching the shares with `watch = true` (none: no thread).
pub(crate) fn start(config: &VmConfig) -> Result<Option<Watching>> {
    let mut watched = Vec::new();
    for share in config.shares.iter().filter(|s| s.watch) {
        let watcher = TreeWatcher::new(&share.source).map_err(|e| Error::Share {
            tag: share.tag.clone(),
            reason: e.to_string(),
        })?;
        log::debug!("share {}: watching {} directories", share.tag, watcher.watched());
        watched.push(Watched {
            tag: share.tag.clone(),
            watcher,
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
        .spawn(move || run(&mut watched, &thread_stop, &mut agent))
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
        let ready = {
            // SAFETY: the eventfd outlives this borrow.
            let mut fds = vec![unsafe { BorrowedFd::borrow_raw(stop.as_raw_fd()) }];
            fds.extend(watched.iter().map(|w| w.watcher.fd()));
            poll(&fds, None)
        };
        if ready.first().copied().unwrap_or(true) {
            return;
        }
        for (w, _) in watched.iter_mut().zip(&ready[1..]).filter(|(_, r)| **r) {
            let start = Instant::now();
            let changes = gather(&mut w.watcher);
            log::trace!(
                "share {}: gathered {} changes in {:?}",
                w.tag,
                changes.len(),
                start.elapsed()
            );
            if !changes.is_empty() {
                agent.send(&w.tag, changes);
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
    changes
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
    fn send(&mut self, tag: &str, changes: Vec<FsChange>) {
        let mut batch = Vec::new();
        let mut bytes = 0;
        for c in changes {
            bytes += change_bytes(&c);
            batch.push(c);
            if bytes >= MAX_BATCH_BYTES {
                self.send_batch(tag, std::mem::take(&mut batch));
                bytes = 0;
            }
        }
        if !batch.is_empty() {
            self.send_batch(tag, batch);
        }
    }

    fn send_batch(&mut self, tag: &str, changes: Vec<FsChange>) {
        let count = changes.len();
        let Some(conn) = self.connection() else {
            log::debug!("share {tag}: {count} host changes not replayed (the guest agent is not listening)");
            return;
        };
        let msg = Message::FsEvents {
            tag: tag.to_string(),
            changes,
        };
        let start = Instant::now();
        let result = proto::write_message(conn, &msg).and_then(|()| proto::read_message(conn));
        match result {
            Ok(Message::Ok) => log::debug!(
                "share {tag}: {count} host changes replayed in {:.1} ms",
                start.elapsed().as_secs_f64() * 1000.0
            ),
            Ok(Message::Error(e)) => log::warn!("share {tag}: the guest agent did not replay host changes: {e}"),
            Ok(other) => {
                log::warn!("share {tag}: the guest agent answered {} to FsEvents", other.name());
                self.conn = None;
            }
            Err(e) => {
                log::debug!("share {tag}: connection to the guest agent lost: {e}");
                self.conn = None;
            }
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
}
