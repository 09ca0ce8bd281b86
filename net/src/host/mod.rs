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
    mvm_devices::unblock_signals_in_child(cmd);
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
/// a crash, sees the old or the new file, never half of one). Mode 0644.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    replace_file(path, bytes, 0o644).map_err(|e| Error::io(path, e))
}

/// [`write_atomic`] with file mode `mode`, and the plain I/O error: the
/// bytes go to a temporary file beside `path`, which is fsynced, given
/// `mode` and renamed over `path`; then the directory is fsynced (the
/// rename itself survives a crash). The temporary file is removed on
/// failure.
pub fn replace_file(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let name = path.file_name().map_or("file".into(), |n| n.to_string_lossy());
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::File::open(dir)?.sync_all()
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Set in the child process of `sigkill_mid_write_leaves_old_or_new`:
    /// the file it rewrites until it is killed.
    const WRITER_ENV: &str = "MVM_TEST_ATOMIC_WRITER";
    const SIZE: usize = 4 << 20;

    /// The writer: the file alternately all 'a' and all 'b', forever.
    fn writer(path: &Path) -> ! {
        let versions = [vec![b'a'; SIZE], vec![b'b'; SIZE]];
        for i in 0.. {
            if let Err(e) = replace_file(path, &versions[i % 2], 0o600) {
                eprintln!("writer: {e}");
                std::process::exit(3);
            }
        }
        unreachable!()
    }

    /// A process killed with SIGKILL at any point of `replace_file` leaves
    /// the old file or the new one, whole, with its mode; never a torn or
    /// empty one.
    #[test]
    fn sigkill_mid_write_leaves_old_or_new() {
        if let Some(path) = std::env::var_os(WRITER_ENV) {
            writer(Path::new(&path));
        }
        let dir = std::env::temp_dir().join(format!("mvm-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        replace_file(&path, &vec![b'a'; SIZE], 0o600).unwrap();
        let exe = std::env::current_exe().unwrap();
        for round in 0..12u64 {
            let mut child = Command::new(&exe)
                .args([
                    "--exact",
                    "host::tests::sigkill_mid_write_leaves_old_or_new",
                    "--nocapture",
                ])
                .env(WRITER_ENV, &path)
                .stdout(Stdio::null())
                .spawn()
                .unwrap();
            // Kill at a different point of the write each round.
            std::thread::sleep(std::time::Duration::from_millis(30 + round * 17));
            child.kill().unwrap();
            let status = child.wait().unwrap();
            assert_eq!(
                status.code(),
                None,
                "round {round}: the writer exited by itself: {status}"
            );
            let text = std::fs::read(&path).unwrap();
            assert_eq!(text.len(), SIZE, "round {round}: torn file");
            assert!(
                text.iter().all(|&b| b == text[0]) && (text[0] == b'a' || text[0] == b'b'),
                "round {round}: mixed contents"
            );
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn replace_file_reports_and_cleans_up() {
        let dir = std::env::temp_dir().join(format!("mvm-atomic-err-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A directory where the file should go: the rename fails.
        let path = dir.join("taken");
        std::fs::create_dir_all(path.join("x")).unwrap();
        assert!(replace_file(&path, b"new", 0o644).is_err());
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, ["taken"], "the temporary file stayed");
        let e = write_atomic(&path, b"new").unwrap_err();
        assert!(e.to_string().contains("taken"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
