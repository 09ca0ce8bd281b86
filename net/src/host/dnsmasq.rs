//! The network's dnsmasq (Debian's `dnsmasq-base`): DHCP that hands each
//! pinned MAC its fixed address and nothing to strangers, and DNS on the
//! bridge address that answers `<vm>` and `<vm>.mvm` and forwards the rest
//! to the host's resolvers.
//!
//! Files in the network's directory: `dnsmasq.conf` (written at every
//! start), `dnsmasq.pid`, `dnsmasq.leases`, `dhcp-hosts` (one
//! `mac,ip,name,infinite` line per pin; re-read on SIGHUP) and `hosts`
//! (`ip name name.mvm`; re-read on SIGHUP).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::network::{NetworkSpec, Pin, DOMAIN};
use super::{find_tool, run_tool, write_atomic};
use crate::Error;

pub const CONF: &str = "dnsmasq.conf";
pub const PID: &str = "dnsmasq.pid";
pub const LEASES: &str = "dnsmasq.leases";
pub const DHCP_HOSTS: &str = "dhcp-hosts";
pub const HOSTS: &str = "hosts";
pub const LOG: &str = "dnsmasq.log";

/// dnsmasq's configuration for `spec`, its files in `dir`.
pub fn config(spec: &NetworkSpec, dir: &Path) -> String {
    let d = |name: &str| dir.join(name).display().to_string();
    let subnet = spec.subnet;
    let mut text = String::from("# Written by microvm-dev at every start of the network's dnsmasq.\n");
    let _ = writeln!(text, "interface={}", spec.bridge);
    // Only the bridge, even when other dnsmasq instances (libvirt's, a
    // second network's) listen on the same host.
    text.push_str("bind-dynamic\nexcept-interface=lo\n");
    let _ = writeln!(text, "listen-address={}", subnet.gateway());
    let _ = writeln!(
        text,
        "dhcp-range={},static,{},infinite",
        subnet.addr(),
        subnet.netmask()
    );
    text.push_str("dhcp-authoritative\ndhcp-no-override\n");
    let _ = writeln!(text, "dhcp-option=option:router,{}", subnet.gateway());
    let _ = writeln!(text, "dhcp-option=option:dns-server,{}", subnet.gateway());
    let _ = writeln!(text, "domain={DOMAIN}\nlocal=/{DOMAIN}/\ndomain-needed");
    let _ = writeln!(text, "dhcp-hostsfile={}", d(DHCP_HOSTS));
    let _ = writeln!(text, "addn-hosts={}", d(HOSTS));
    let _ = writeln!(text, "dhcp-leasefile={}", d(LEASES));
    let _ = writeln!(text, "pid-file={}", d(PID));
    let _ = writeln!(text, "log-facility={}", d(LOG));
    text
}

/// `dhcp-hosts` and `hosts` for the pins.
pub fn host_files(pins: &[Pin]) -> (String, String) {
    let mut dhcp = String::new();
    let mut hosts = String::new();
    for pin in pins {
        let _ = writeln!(dhcp, "{},{},{},infinite", pin.mac, pin.ip, pin.vm);
        let _ = writeln!(hosts, "{} {} {}.{DOMAIN}", pin.ip, pin.vm, pin.vm);
    }
    (dhcp, hosts)
}

/// Write the pins' files (world-readable: dnsmasq re-reads them after it
/// dropped root).
pub fn write_host_files(dir: &Path, pins: &[Pin]) -> Result<(), Error> {
    let (dhcp, hosts) = host_files(pins);
    write_atomic(&dir.join(DHCP_HOSTS), dhcp.as_bytes())?;
    write_atomic(&dir.join(HOSTS), hosts.as_bytes())
}

/// The running dnsmasq of the network in `dir`: the pid in its pid file,
/// if that process is alive and is a dnsmasq with our configuration (a
/// stale pid file may name a recycled pid).
pub fn running(dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(dir.join(PID)).ok()?;
    let pid: i32 = text.trim().parse().ok().filter(|&p| p > 0)?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let conf = conf_arg(dir);
    let ours = cmdline.split(|&b| b == 0).any(|arg| arg == conf.as_bytes());
    ours.then_some(pid)
}

fn conf_arg(dir: &Path) -> String {
    format!("--conf-file={}", dir.join(CONF).display())
}

/// Start dnsmasq for `spec` (it daemonizes once it listens; a bad
/// configuration or a busy port makes it exit non-zero, with the reason
/// on stderr).
pub fn start(spec: &NetworkSpec, dir: &Path) -> Result<i32, Error> {
    let binary: PathBuf = find_tool("dnsmasq").ok_or(Error::MissingTool {
        tool: "dnsmasq",
        package: "dnsmasq-base",
    })?;
    write_atomic(&dir.join(CONF), config(spec, dir).as_bytes())?;
    let _ = std::fs::remove_file(dir.join(PID));
    for name in [LEASES, LOG] {
        let path = dir.join(name);
        if !path.exists() {
            write_atomic(&path, b"")?;
        }
    }
    let what = format!("starting dnsmasq for network {}", spec.name);
    run_tool(Command::new(&binary).arg(conf_arg(dir)), what.clone(), None)?;
    // The pid file appears as the daemon settles.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(pid) = running(dir) {
            return Ok(pid);
        }
        if Instant::now() > deadline {
            return Err(Error::Command {
                what,
                output: format!("dnsmasq exited but no live process is in {}", dir.join(PID).display()),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How long [`reload`] waits for dnsmasq to say it re-read its files.
const RELOAD_WAIT: Duration = Duration::from_secs(5);
/// How often [`reload`] signals again while it waits.
const RELOAD_RESEND: Duration = Duration::from_millis(200);

/// Make the network's dnsmasq (`pid`, in `dir`) re-read `dhcp-hosts` and
/// `hosts`, and wait until its log says it did. A dnsmasq still starting
/// (its pid file is written before its startup is complete) ignores
/// SIGHUP, and a new pin it never reads leaves that VM without an
/// address: so the signal goes again until the log shows the re-read.
pub fn reload(dir: &Path, pid: i32) -> Result<(), Error> {
    let log = dir.join(LOG);
    let mark = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    let read_line = format!("read {}", dir.join(DHCP_HOSTS).display());
    let deadline = Instant::now() + RELOAD_WAIT;
    loop {
        // SAFETY: kill(2) with a pid our caller verified to be our dnsmasq.
        unsafe { libc::kill(pid, libc::SIGHUP) };
        let resend = Instant::now() + RELOAD_RESEND;
        while Instant::now() < resend {
            if logged_since(&log, mark, &read_line) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if Instant::now() >= deadline {
            return Err(Error::Command {
                what: format!("making dnsmasq (pid {pid}) re-read {}", dir.join(DHCP_HOSTS).display()),
                output: format!(
                    "no \"{read_line}\" in {} within {} s of SIGHUP",
                    log.display(),
                    RELOAD_WAIT.as_secs()
                ),
            });
        }
    }
}

/// Whether `log` has a line containing `needle` past byte `mark`.
fn logged_since(log: &Path, mark: u64, needle: &str) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(log) else {
        return false;
    };
    let mut bytes = Vec::new();
    file.seek(SeekFrom::Start(mark)).is_ok()
        && file.read_to_end(&mut bytes).is_ok()
        && String::from_utf8_lossy(&bytes).lines().any(|l| l.contains(needle))
}

/// Stop the network's dnsmasq, if it runs; waits up to 5 s for it to go.
pub fn stop(dir: &Path) {
    let Some(pid) = running(dir) else {
        return;
    };
    // SAFETY: as in reload.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while running(dir).is_some() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if running(dir).is_some() {
        log::warn!("dnsmasq (pid {pid}) did not stop on SIGTERM within 5 s; killing it");
        // SAFETY: as in reload.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let _ = std::fs::remove_file(dir.join(PID));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_serves_only_pinned_hosts_on_the_bridge() {
        let spec = NetworkSpec {
            name: "default".into(),
            bridge: "virbr-mvm".into(),
            subnet: "10.213.0.0/24".parse().unwrap(),
            isolate: true,
        };
        let text = config(&spec, Path::new("/s/networks/default"));
        for line in [
            "interface=virbr-mvm",
            "listen-address=10.213.0.1",
            "dhcp-range=10.213.0.0,static,255.255.255.0,infinite",
            "dhcp-option=option:router,10.213.0.1",
            "domain=mvm",
            "dhcp-hostsfile=/s/networks/default/dhcp-hosts",
            "pid-file=/s/networks/default/dnsmasq.pid",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
        }
        let pins = [Pin {
            vm: "web".into(),
            mac: "02:11:22:33:44:55".into(),
            ip: "10.213.0.2".parse().unwrap(),
        }];
        let (dhcp, hosts) = host_files(&pins);
        assert_eq!(dhcp, "02:11:22:33:44:55,10.213.0.2,web,infinite\n");
        assert_eq!(hosts, "10.213.0.2 web web.mvm\n");
    }
}
