//! The pid file `mvm-vmm run --pid-file <path>` keeps: how the manager
//! knows whether a VM runs, and how its last run ended.
//!
//! While it runs, `mvm-vmm` holds an exclusive `flock` on the file and the
//! file reads `running <pid> <start unix time>\n`. At every orderly exit it
//! rewrites it to `exited <status> <unix time> <reason>\n`. A file that is
//! not locked but still says `running` belongs to an `mvm-vmm` that was
//! killed (SIGKILL, OOM killer) or crashed.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What the pid file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// `running <pid> <started>`.
    Running { pid: u32, started: u64 },
    /// `exited <status> <at> <reason>`.
    Exited { status: i32, at: u64, reason: String },
}

impl Record {
    /// The file's content, one line.
    pub fn to_line(&self) -> String {
        match self {
            Record::Running { pid, started } => format!("running {pid} {started}\n"),
            Record::Exited { status, at, reason } => {
                let reason: String = reason.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
                format!("exited {status} {at} {reason}\n")
            }
        }
    }

    /// Parse the file's content; `None` if it is not a record (empty, or
    /// written by something else).
    pub fn parse(text: &str) -> Option<Record> {
        let line = text.lines().next()?;
        let mut parts = line.splitn(4, ' ');
        match parts.next()? {
            "running" => Some(Record::Running {
                pid: parts.next()?.parse().ok()?,
                started: parts.next()?.parse().ok()?,
            }),
            "exited" => Some(Record::Exited {
                status: parts.next()?.parse().ok()?,
                at: parts.next()?.parse().ok()?,
                reason: parts.next().unwrap_or("").to_string(),
            }),
            _ => None,
        }
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub(crate) fn flock(file: &File, op: libc::c_int) -> std::io::Result<()> {
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The pid file of a running `mvm-vmm`, locked for the life of the process.
#[derive(Debug)]
pub struct PidFile {
    file: File,
}

/// Why [`PidFile::acquire`] failed.
#[derive(Debug)]
pub enum AcquireError {
    /// Another process holds the lock; the pid it wrote, if readable.
    Locked(Option<u32>),
    Io(std::io::Error),
}

/// Open (or create) a file that is used through `flock`: read-write,
/// never truncated, not inherited by programs we start.
pub(crate) fn open_lock_file(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
}

impl PidFile {
    /// Open or create `path`, lock it (retrying briefly: a manager probing
    /// the lock holds it for microseconds) and write `running <our pid>`.
    pub fn acquire(path: &Path) -> Result<PidFile, AcquireError> {
        let mut file = open_lock_file(path).map_err(AcquireError::Io)?;
        let mut tries = 0;
        loop {
            match flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
                Ok(()) => break,
                Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) && tries < 10 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {
                    let mut text = String::new();
                    let _ = file.read_to_string(&mut text);
                    let pid = match Record::parse(&text) {
                        Some(Record::Running { pid, .. }) => Some(pid),
                        _ => None,
                    };
                    return Err(AcquireError::Locked(pid));
                }
                Err(e) => return Err(AcquireError::Io(e)),
            }
        }
        let mut pf = PidFile { file };
        pf.write(&Record::Running {
            pid: std::process::id(),
            started: unix_now(),
        })
        .map_err(AcquireError::Io)?;
        Ok(pf)
    }

    /// Lock an existing pid file if nobody holds it, without writing
    /// (to record how a killed process ended).
    pub fn try_take(path: &Path) -> Option<PidFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .ok()?;
        flock(&file, libc::LOCK_EX | libc::LOCK_NB).ok()?;
        Some(PidFile { file })
    }

    /// Replace the content with `record`.
    pub fn write(&mut self, record: &Record) -> std::io::Result<()> {
        self.file.set_len(0)?;
        self.file.seek(SeekFrom::Start(0))?;
        self.file.write_all(record.to_line().as_bytes())?;
        self.file.flush()
    }

    /// The locked file descriptor (a forked helper closes its copy so the
    /// lock goes with this process).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

/// What a pid file tells an observer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// A process holds the lock.
    pub locked: bool,
    /// The content, if it is a record.
    pub record: Option<Record>,
}

/// Read `path` and probe its lock without disturbing its holder; `None`
/// when there is no file (the VM never started).
pub fn observe(path: &Path) -> std::io::Result<Option<Observed>> {
    let mut file = match OpenOptions::new().read(true).custom_flags(libc::O_CLOEXEC).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let locked = match flock(&file, libc::LOCK_SH | libc::LOCK_NB) {
        Ok(()) => {
            flock(&file, libc::LOCK_UN)?;
            false
        }
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => true,
        Err(e) => return Err(e),
    };
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    Ok(Some(Observed {
        locked,
        record: Record::parse(&text),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        for r in [
            Record::Running {
                pid: 42,
                started: 1_800_000_000,
            },
            Record::Exited {
                status: 0,
                at: 5,
                reason: "the guest powered off".into(),
            },
            Record::Exited {
                status: 143,
                at: 5,
                reason: String::new(),
            },
        ] {
            assert_eq!(Record::parse(&r.to_line()), Some(r));
        }
        assert_eq!(Record::parse(""), None);
        assert_eq!(Record::parse("running x 1\n"), None);
        assert_eq!(Record::parse("garbage\n"), None);
        let multi = Record::Exited {
            status: 4,
            at: 1,
            reason: "a\nb".into(),
        };
        assert!(matches!(Record::parse(&multi.to_line()), Some(Record::Exited { reason, .. }) if reason == "a b"));
    }

    #[test]
    fn lock_is_exclusive_and_observed() {
        let dir = std::env::temp_dir().join(format!("mvm-pidfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vmm.pid");
        assert_eq!(observe(&path).unwrap(), None);
        let mut held = PidFile::acquire(&path).unwrap();
        let seen = observe(&path).unwrap().unwrap();
        assert!(seen.locked);
        assert!(matches!(seen.record, Some(Record::Running { pid, .. }) if pid == std::process::id()));
        assert!(matches!(PidFile::acquire(&path), Err(AcquireError::Locked(Some(_)))));
        held.write(&Record::Exited {
            status: 0,
            at: 1,
            reason: "done".into(),
        })
        .unwrap();
        drop(held);
        let seen = observe(&path).unwrap().unwrap();
        assert!(!seen.locked);
        assert!(matches!(seen.record, Some(Record::Exited { status: 0, .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
