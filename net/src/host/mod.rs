//! The host side of a managed network: the bridge and bridge ports
//! ([`netlink`]), dnsmasq ([`dnsmasq`]), nftables ([`nft`]), and the
//! network itself with its state and address pins ([`network`]).

pub mod dnsmasq;
pub mod netlink;
pub mod network;
pub mod nft;
pub mod subnet;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::Error;

/// A program by name: on `PATH`, else in the sbin and bin directories
/// (`PATH` of a non-root shell often lacks /usr/sbin).
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Run a host tool to its end, `stdin` written to it: its stdout, or an
/// error with `what` and its stderr (which says what went wrong).
pub(crate) fn run_tool(cmd: &mut Command, what: String, stdin: Option<&str>) -> Result<String, Error> {
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let spawn_error = |source| Error::Spawn {
        what: what.clone(),
        source,
    };
    let mut child = cmd.spawn().map_err(spawn_error)?;
    if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
        input.write_all(text.as_bytes()).map_err(spawn_error)?;
    }
    let out = child.wait_with_output().map_err(spawn_error)?;
    if !out.status.success() {
        return Err(Error::Command {
            what,
            output: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Replace `path` with `bytes` in one step (a reader, or a restart after
/// a crash, sees the old or the new file, never half of one): written to a
/// temporary file, fsynced, renamed over `path`, the directory fsynced.
/// Mode 0644.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

#[cfg(test)]
pub(crate) mod testing {
    /// Run `body` on a thread in a new network namespace (root only), so
    /// nothing touches the host's interfaces: unshare affects that thread,
    /// and the programs it starts (nft, dnsmasq, ip) inherit it.
    pub(crate) fn in_new_netns<F: FnOnce() + Send + 'static>(body: F) {
        std::thread::spawn(move || {
            // SAFETY: plain syscall; it changes only this thread's netns.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
            body();
        })
        .join()
        .unwrap();
    }
}
