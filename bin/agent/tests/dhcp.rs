//! The DHCP client against a real dnsmasq configured like the host's (one
//! address pinned per MAC, DNS and domain `mvm`), across a veth pair
//! between two network namespaces. Needs root, `ip` and dnsmasq; skipped
//! (with a note) without them.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mvm_agent::dhcp::{self, DhcpError, Lease};
use mvm_agent::netif;

const GUEST_MAC: &str = "02:00:00:00:00:42";
const SERVER_IF: &str = "srv0";

/// Two namespaces (server, client) joined by a veth pair: `srv0`
/// (10.213.0.1/24) in the server's, `eth0` in the client's; and dnsmasq.
/// Dropping it stops dnsmasq and deletes the namespaces (and so the pair).
struct Lab {
    server_ns: String,
    client_ns: String,
    dir: PathBuf,
    dnsmasq: Option<Child>,
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn dnsmasq_path() -> Option<&'static str> {
    ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq", "/sbin/dnsmasq"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

impl Lab {
    /// None (after saying why) when this machine cannot run the test.
    fn new() -> Option<Lab> {
        // SAFETY: geteuid has no arguments and cannot fail.
        if unsafe { libc::geteuid() } != 0 || dnsmasq_path().is_none() {
            eprintln!("skipped: needs root and dnsmasq");
            return None;
        }
        let id = std::process::id();
        let lab = Lab {
            server_ns: format!("mvm-dhcp-s-{id}"),
            client_ns: format!("mvm-dhcp-c-{id}"),
            dir: std::env::temp_dir().join(format!("mvm-agent-dhcp-{id}")),
            dnsmasq: None,
        };
        let _ = std::fs::remove_dir_all(&lab.dir);
        std::fs::create_dir_all(&lab.dir).unwrap();
        for ns in [&lab.server_ns, &lab.client_ns] {
            let added = Command::new("ip").args(["netns", "add", ns]).status();
            if !added.is_ok_and(|s| s.success()) {
                eprintln!("skipped: cannot create network namespace {ns}");
                return None;
            }
        }
        let (s, c) = (lab.server_ns.as_str(), lab.client_ns.as_str());
        ip(&[
            "-n", s, "link", "add", SERVER_IF, "type", "veth", "peer", "name", "eth0", "netns", c,
        ]);
        ip(&["-n", c, "link", "set", "eth0", "address", GUEST_MAC]);
        ip(&["-n", s, "addr", "add", "10.213.0.1/24", "dev", SERVER_IF]);
        ip(&["-n", s, "link", "set", SERVER_IF, "up"]);
        ip(&["-n", s, "link", "set", "lo", "up"]);
        Some(lab)
    }

    fn start_dnsmasq(&mut self) {
        let log = self.dir.join("dnsmasq.log");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.server_ns])
            .arg(dnsmasq_path().unwrap())
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-hosts",
                "--no-resolv",
                "--bind-interfaces",
                "--log-dhcp",
                "--user=root",
                "--group=root",
                "--domain=mvm",
                "--dhcp-range=10.213.0.0,static,255.255.255.0,infinite",
            ])
            .arg(format!("--interface={SERVER_IF}"))
            .arg(format!("--dhcp-host={GUEST_MAC},10.213.0.42,guest1,infinite"))
            .arg(format!("--pid-file={}", self.dir.join("dnsmasq.pid").display()))
            .arg(format!("--dhcp-leasefile={}", self.dir.join("leases").display()))
            .arg(format!("--log-facility={}", log.display()))
            .stdin(Stdio::null())
            .spawn()
            .expect("start dnsmasq");
        self.dnsmasq = Some(child);
        // Not required (the client retries) but quicker: wait until it serves.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !std::fs::read_to_string(&log).is_ok_and(|l| l.contains("DHCP")) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dnsmasq.log")).unwrap_or_default()
    }

    /// Run `f` on a thread inside the client's namespace.
    fn in_client<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.client_ns);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap();
            // SAFETY: an fd we hold; only this thread changes namespace.
            assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut child) = self.dnsmasq.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in [&self.server_ns, &self.client_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn configures_an_interface_from_dnsmasq() {
    let Some(mut lab) = Lab::new() else { return };

    // Nothing answers yet: a bounded wait, then a clear error.
    let (silence, took) = lab.in_client(|| {
        let start = Instant::now();
        (dhcp::acquire("eth0", "guest1", Duration::from_secs(1)), start.elapsed())
    });
    assert!(
        matches!(
            silence,
            Err(DhcpError::Timeout {
                waiting_for: "offer",
                ..
            })
        ),
        "{silence:?}"
    );
    assert!(took < Duration::from_secs(3), "{took:?}");
    let missing = lab.in_client(|| dhcp::acquire("nosuch0", "guest1", Duration::from_secs(1)));
    assert!(
        matches!(missing, Err(DhcpError::Io("cannot bring the interface up", _))),
        "{missing:?}"
    );

    lab.start_dnsmasq();
    let resolv_conf = lab.dir.join("etc/resolv.conf");
    // Like systemd-resolved's: the link is replaced, its target left alone.
    let stub = lab.dir.join("stub-resolv.conf");
    std::fs::write(&stub, "nameserver 127.0.0.53\n").unwrap();
    std::fs::create_dir_all(lab.dir.join("etc")).unwrap();
    std::os::unix::fs::symlink(&stub, &resolv_conf).unwrap();

    let path = resolv_conf.clone();
    let (lease, renewed) = lab
        .in_client(move || {
            // What the agent runs at boot: acquire and apply.
            let lease = dhcp::configure("eth0", "guest1", &path, dhcp::DEFAULT_TIMEOUT)?;
            // Again: nothing changes, nothing fails (the route exists already).
            netif::apply_lease("eth0", &lease, &path).map_err(|e| DhcpError::Io("apply again", e))?;
            let renewed = dhcp::renew("eth0", "guest1", &lease, Duration::from_secs(30))?;
            // Renewing an address the server does not give us: refused,
            // and a new discover gets the right one.
            let wrong = Lease {
                address: Ipv4Addr::new(10, 213, 0, 99),
                ..lease.clone()
            };
            let corrected = dhcp::renew("eth0", "guest1", &wrong, Duration::from_secs(30))?;
            assert_eq!(corrected, lease);
            Ok::<_, DhcpError>((lease, renewed))
        })
        .unwrap_or_else(|e| panic!("{e}\ndnsmasq log:\n{}", lab.log()));

    let server = Ipv4Addr::new(10, 213, 0, 1);
    assert_eq!(
        lease,
        Lease {
            address: Ipv4Addr::new(10, 213, 0, 42),
            prefix_len: 24,
            router: Some(server),
            dns: vec![server],
            domain: Some("mvm".into()),
            lease_secs: None,
            server_id: server,
        }
    );
    assert_eq!(renewed, lease);
    assert_eq!(
        lease.to_string(),
        "10.213.0.42/24 via 10.213.0.1, dns 10.213.0.1 (lease infinite)"
    );

    let c = lab.client_ns.as_str();
    let addr = ip(&["-n", c, "-4", "-o", "addr", "show", "dev", "eth0"]);
    assert!(addr.contains("inet 10.213.0.42/24 brd 10.213.0.255 "), "{addr}");
    let default = ip(&["-n", c, "route", "show", "default"]);
    assert_eq!(default.trim(), "default via 10.213.0.1 dev eth0", "{default}");
    let routes = ip(&["-n", c, "route", "show"]);
    assert!(
        routes.contains("10.213.0.0/24 dev eth0 proto kernel scope link src 10.213.0.42"),
        "{routes}"
    );
    let link = ip(&["-n", c, "link", "show", "dev", "eth0"]);
    assert!(link.contains(",UP"), "{link}");

    assert!(std::fs::symlink_metadata(&resolv_conf).unwrap().is_file());
    assert_eq!(
        std::fs::read_to_string(&resolv_conf).unwrap(),
        "# written by mvm-agent from the DHCP lease of eth0\nsearch mvm\nnameserver 10.213.0.1\n"
    );
    assert_eq!(std::fs::read_to_string(&stub).unwrap(), "nameserver 127.0.0.53\n");
    let log = lab.log();
    assert!(
        log.contains("DHCPACK(srv0) 10.213.0.42 02:00:00:00:00:42 guest1"),
        "{log}"
    );
    assert!(log.contains("DHCPNAK(srv0) 10.213.0.99 02:00:00:00:00:42"), "{log}");
}
