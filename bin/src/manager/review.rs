//! `mvm diff`, `apply` and `reset` on a VM: [`super::changes`] on the
//! project share's layers, with the VM's file server held still when it
//! runs (the control socket's `freeze-shares`, see
//! `microvm_dev::control`), so the upper layer is read and changed between
//! two guest requests. A reset on a running VM also has the file server
//! re-read which layer holds the files the guest knows. With the
//! virtiofsd backend the upper layer belongs to a kernel overlayfs mount
//! while the VM runs: `diff` reads it as it is, `apply` and `reset` wait
//! for the VM to stop.

use std::io::Write;
use std::path::{Path, PathBuf};

use microvm_dev::control::FrozenShares;
use microvm_dev::{ShareBackend, VmConfig};

use mvm_agent::proto::{EntryKind, FsChange};

use super::changes::{self, Applied, ChangeKind, ChangeSet, Layers};
use super::{Manager, VmState, PROJECT_TAG, VM_TOML};
use crate::{Error, Result};

/// What `apply` found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    pub changes: ChangeSet,
    /// None for `--check`.
    pub applied: Option<Applied>,
}

/// Why the layers are read or changed (for the freeze's rules).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
}

struct Session {
    layers: Layers,
    frozen: Option<FrozenShares>,
    paths: Vec<PathBuf>,
}

impl Manager {
    /// The layers of VM `name`'s project share, and its backend.
    pub fn project_layers(&self, name: &str) -> Result<(Layers, ShareBackend)> {
        let dir = self.existing(name)?;
        let file = dir.join(VM_TOML);
        let config = VmConfig::from_file(&file).map_err(|source| Error::Config { path: file, source })?;
        let share = config.shares.iter().find(|s| s.tag == PROJECT_TAG).ok_or_else(|| {
            Error::Usage(format!(
                "VM {name:?} has no project share (create it with --project <dir>)"
            ))
        })?;
        if !share.overlay {
            return Err(Error::Usage(format!(
                "VM {name:?} writes to its project directly (overlay = false): there is nothing to diff, apply or reset"
            )));
        }
        let layers = Layers {
            lower: share.source.clone(),
            upper: microvm_dev::state::upper_dir(&config, share),
        };
        Ok((layers, share.backend))
    }

    fn session(&self, name: &str, paths: &[PathBuf], access: Access) -> Result<Session> {
        let (layers, backend) = self.project_layers(name)?;
        let paths = changes::normalize_paths(&layers.lower, paths).map_err(Error::Usage)?;
        let frozen = if self.info(name)?.state != VmState::Running {
            None
        } else if backend == ShareBackend::Virtiofsd {
            if access == Access::Write {
                return Err(Error::Usage(format!(
                    "VM {name:?} runs its project share on virtiofsd, whose kernel overlay must not see its upper layer change underneath; stop it first (`mvm stop {name}`)"
                )));
            }
            None
        } else {
            let dir = self.vm_dir(name);
            Some(FrozenShares::freeze(&dir).map_err(Error::io(format!(
                "cannot pause VM {name:?}'s file server through {}",
                dir.join(microvm_dev::control::CONTROL_SOCKET).display()
            )))?)
        };
        Ok(Session { layers, frozen, paths })
    }

    /// VM `name`'s changes to its project (at or below `paths`, relative to
    /// the project; all when empty).
    pub fn changes(&self, name: &str, paths: &[PathBuf]) -> Result<(Layers, ChangeSet)> {
        let s = self.session(name, paths, Access::Read)?;
        let set = scan(&s.layers, &s.paths)?;
        Ok((s.layers, set))
    }

    /// Write VM `name`'s changes as a patch in git's format (`stat`: a
    /// `git diff --stat` summary instead).
    pub fn diff(&self, name: &str, paths: &[PathBuf], stat: bool, out: &mut dyn Write) -> Result<()> {
        let s = self.session(name, paths, Access::Read)?;
        let set = scan(&s.layers, &s.paths)?;
        let written = if stat {
            changes::write_stat(&s.layers, &set, out)
        } else {
            changes::write_diff(&s.layers, &set, out)
        };
        written.map_err(Error::io("writing the diff"))?;
        drop(s.frozen);
        Ok(())
    }

    /// Apply VM `name`'s changes to its project directory; `check`: only
    /// look. Host paths changed since the VM took them make it fail with
    /// [`Error::Conflicts`] before anything is written.
    pub fn apply(&self, name: &str, paths: &[PathBuf], check: bool) -> Result<ApplyReport> {
        let s = self.session(name, paths, if check { Access::Read } else { Access::Write })?;
        let set = scan(&s.layers, &s.paths)?;
        let conflicts = |found: Vec<changes::Conflict>| Error::Conflicts {
            name: name.into(),
            conflicts: found.into_iter().map(|c| (c.path, c.reason)).collect(),
        };
        if check {
            let found = changes::conflicts(&s.layers, &set).map_err(Error::io("checking the host project"))?;
            if !found.is_empty() {
                return Err(conflicts(found));
            }
            return Ok(ApplyReport {
                changes: set,
                applied: None,
            });
        }
        let applied = changes::apply(&s.layers, &set)
            .map_err(Error::io(format!("applying to {}", s.layers.lower.display())))?
            .map_err(conflicts)?;
        // Apply leaves the upper entries the guest may use in place (it
        // drops only whiteouts over nothing): no refresh needed.
        drop(s.frozen);
        Ok(ApplyReport {
            changes: set,
            applied: Some(applied),
        })
    }

    /// Drop VM `name`'s changes at or below `paths` (all when empty);
    /// returns the upper entries removed.
    pub fn reset(&self, name: &str, paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
        let mut s = self.session(name, paths, Access::Write)?;
        // What the running guest sees change, told to it afterwards.
        let seen = match s.frozen {
            Some(_) => Some(scan(&s.layers, &s.paths)?),
            None => None,
        };
        let removed = changes::reset(&s.layers, &s.paths)
            .map_err(Error::io(format!("resetting {}", s.layers.upper.display())))?
            .map_err(Error::Usage)?;
        if let Some(mut frozen) = s.frozen.take() {
            if !removed.is_empty() {
                frozen.refresh().map_err(Error::io(format!(
                    "VM {name:?}: the changes were dropped, but its file server did not re-read them; restart the VM"
                )))?;
            }
            // The agent's replay goes through the file server: thawed first.
            drop(frozen);
            if let Some(set) = seen.filter(|_| !removed.is_empty()) {
                let replay = reset_replay(&s.layers, &set);
                if let Err(e) = self
                    .agent(name)
                    .and_then(|a| a.open())
                    .and_then(|c| c.fs_events(PROJECT_TAG, replay))
                {
                    log::warn!("VM {name:?}: the guest was not told of the reset ({e}); it sees it within its cache timeout (60 s)");
                }
            }
        }
        Ok(removed)
    }
}

fn scan(layers: &Layers, paths: &[PathBuf]) -> Result<ChangeSet> {
    changes::scan(layers, paths).map_err(Error::io(format!(
        "reading the layers {} and {}",
        layers.lower.display(),
        layers.upper.display()
    )))
}

/// The changes a reset makes to the running guest's view, as the agent
/// replays them: what the VM added leaves, what it deleted or changed
/// shows the host's entry again (arrives, then its content and size are
/// refreshed). Replays that do not apply (an entry the guest still has)
/// are skipped by the agent.
fn reset_replay(layers: &Layers, set: &ChangeSet) -> Vec<FsChange> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = |p: &Path| p.as_os_str().as_bytes().to_vec();
    let mut out = Vec::new();
    let show_host = |p: &Path, out: &mut Vec<FsChange>| {
        let Ok(md) = std::fs::symlink_metadata(layers.lower.join(p)) else {
            return;
        };
        let kind = if md.is_dir() {
            EntryKind::Dir
        } else if md.is_file() {
            EntryKind::File
        } else if md.file_type().is_symlink() {
            EntryKind::Symlink
        } else {
            EntryKind::Other
        };
        out.push(FsChange::Arrive { path: bytes(p), kind });
        if kind == EntryKind::File {
            out.push(FsChange::Modify {
                path: bytes(p),
                size: md.len(),
            });
        }
    };
    let leave = |p: &Path, out: &mut Vec<FsChange>| {
        // Which of the two the guest has is not known: the other fails.
        for dir in [false, true] {
            out.push(FsChange::Leave { path: bytes(p), dir });
        }
    };
    for c in &set.changes {
        match &c.kind {
            ChangeKind::Added => leave(&c.path, &mut out),
            ChangeKind::Renamed { from } => {
                leave(&c.path, &mut out);
                show_host(from, &mut out);
            }
            ChangeKind::Deleted => show_host(&c.path, &mut out),
            ChangeKind::Modified | ChangeKind::TypeChanged => {
                leave(&c.path, &mut out);
                show_host(&c.path, &mut out);
            }
        }
    }
    out
}
