//! Managed networks (net/src/host, net/src/forward.rs), each part in a
//! network namespace made here, so the host's own interfaces, nftables
//! and port numbers are never touched:
//!
//! 1. Host only, no guest: `mvm network up` from cold (bridge, address,
//!    nftables table, dnsmasq start) and `mvm network down`, through the
//!    `mvm` binary (process start included) and through the library;
//!    then `Network::attach` of a fresh TAP for 20 distinct VMs (pin,
//!    dnsmasq host files and SIGHUP, bridge port, isolation).
//! 2. The forwarder's own cost, no guest: 256 MiB uploads on loopback
//!    through `Forwarder` (127.0.0.1:18080 to a local sink) and straight to
//!    the sink, and 200 1-byte requests each way (connect, send, wait for
//!    the sink's close): what a forwarded connection costs to set up.
//! 3. One test guest on the default network (`mvm create --no-image`,
//!    `--forward 18080:5001 --forward 18081:80`): uploads of 1 MiB
//!    (`MVM_BENCH_NET_MIB`) to `mvm-vsock tcp-sink 5001` in the guest, and
//!    HTTP/1.0 GETs of a 2-byte file from busybox httpd, each through the
//!    forward and straight to the guest's address. An upload is timed
//!    from connect to the guest's close after our shutdown(WR); a GET
//!    from connect to the end of the reply.
//!
//! Needs root, iproute2, nftables and dnsmasq (like tests/tests/network.rs),
//! the release `mvm` and `mvm-vmm` (`cargo build --release --workspace
//! --bins`) and the test guest (`bash tests/guest/build.sh`).
//!
//! Caveat for PVM development hosts: the guest kernel is interpreted (about
//! 1.5 M instructions/s; guest TCP moves about 130 KiB/s, see guest_net),
//! so part 3 measures the guest, not the forwarder; part 2 is the
//! forwarder's ceiling. The boot takes 60-90 s there.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mvm_benches::{report, Row};
use mvm_net::forward::{ForwardSpec, Forwarder, Protocol};
use mvm_net::host::network::{Network, DEFAULT_NETWORK};
use mvm_net::tap::Tap;
use mvm_tests::mvm_cli::{describe, Mvm};
use mvm_tests::{scratch_dir, NetNs};

const UP_ROUNDS: usize = 5;
const ATTACHES: usize = 20;
const UPLOAD_ROUNDS: usize = 3;
const GETS: usize = 20;
const LOOPBACK_MIB: usize = 256;
const LOOPBACK_REQUESTS: usize = 200;
const SINK_PORT: u16 = 5001;
const UPLOAD_FORWARD: u16 = 18080;
const HTTP_FORWARD: u16 = 18081;
/// Generous for 1 MiB at the interpreted guest's ~130 KiB/s.
const IO_TIMEOUT: Duration = Duration::from_secs(300);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn env_count(key: &str, default: usize) -> usize {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Run `body` on a thread that entered network namespace `ns` (setns moves
/// only that thread; the threads and programs it starts inherit it).
fn in_netns<T: Send>(ns: &str, body: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(&path).expect("open the namespace");
            // SAFETY: setns on a descriptor we own; it moves only this thread.
            let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
            body()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(30)).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

/// Upload `mib` MiB to the sink at `addr`: the seconds from connect to
/// the sink's close after it read our EOF.
fn upload(addr: SocketAddr, mib: usize) -> f64 {
    let chunk = vec![0x5au8; 1 << 20];
    let start = Instant::now();
    let mut s = connect(addr);
    for _ in 0..mib {
        s.write_all(&chunk).unwrap_or_else(|e| panic!("upload to {addr}: {e}"));
    }
    s.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .unwrap_or_else(|e| panic!("upload to {addr}: waiting for the close: {e}"));
    assert!(rest.is_empty(), "the sink at {addr} answered {} bytes", rest.len());
    start.elapsed().as_secs_f64()
}

/// A 1-byte request to the sink at `addr`: milliseconds from connect to
/// its close.
fn request_ms(addr: SocketAddr) -> f64 {
    let start = Instant::now();
    let mut s = connect(addr);
    s.write_all(b"?").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .unwrap_or_else(|e| panic!("request to {addr}: {e}"));
    ms(start.elapsed())
}

/// An HTTP/1.0 GET of `/i` at `addr` (busybox httpd closes after the
/// reply): milliseconds from connect to the end of the reply.
fn http_get_ms(addr: SocketAddr) -> f64 {
    let start = Instant::now();
    let mut s = connect(addr);
    s.write_all(b"GET /i HTTP/1.0\r\n\r\n").unwrap();
    let mut reply = Vec::new();
    s.read_to_end(&mut reply)
        .unwrap_or_else(|e| panic!("GET from {addr}: {e}"));
    let t = ms(start.elapsed());
    let text = String::from_utf8_lossy(&reply);
    assert!(
        text.starts_with("HTTP/1.") && text.contains(" 200 OK\r\n") && text.ends_with("\r\n\r\nx\n"),
        "GET from {addr}: {text:?}"
    );
    t
}

/// Part 1: `mvm network up`/`down` (CLI and library) and attaches, in `ns`.
fn host_only(ns: &str, mvm: &Mvm) -> Vec<Row> {
    let root = mvm.root.clone();
    let timed = |args: &[&str]| {
        let start = Instant::now();
        let out = mvm.run(args);
        let t = ms(start.elapsed());
        assert!(out.status.success(), "mvm {args:?}: {}", describe(&out));
        t
    };
    let (mut cli_up, mut cli_down) = (Vec::new(), Vec::new());
    for _ in 0..UP_ROUNDS {
        cli_up.push(timed(&["network", "up"]));
        let status = mvm.json(&["network", "status", "--json"]);
        let status = &status[0];
        assert!(
            status["up"] == true && status["nft_table"] == true && status["dnsmasq_pid"].is_i64(),
            "{status}"
        );
        cli_down.push(timed(&["network", "down"]));
    }
    let (lib_up, lib_down, attach) = in_netns(ns, || {
        let net = Network::open(&root, DEFAULT_NETWORK).expect("open the default network");
        let (mut up, mut down) = (Vec::new(), Vec::new());
        for _ in 0..UP_ROUNDS {
            let t = Instant::now();
            net.up().expect("network up");
            up.push(ms(t.elapsed()));
            let t = Instant::now();
            net.down().expect("network down");
            down.push(ms(t.elapsed()));
        }
        net.up().expect("network up");
        let mut taps = Vec::new();
        let mut attach = Vec::new();
        for i in 0..ATTACHES {
            let name = format!("mvmb-tap{i}");
            taps.push(Tap::open(&name).expect("make a TAP"));
            let t = Instant::now();
            let mut a = net
                .attach(&format!("bench{i}"), [2, 0x6d, 0x76, 0x6d, 0xbe, i as u8], &name)
                .expect("attach");
            a.keep();
            attach.push(ms(t.elapsed()));
            assert_eq!(a.ip(), Ipv4Addr::new(10, 213, 0, 2 + i as u8));
        }
        assert_eq!(net.status().expect("status").ports.len(), ATTACHES);
        drop(taps);
        net.down().expect("network down");
        (up, down, attach)
    });
    vec![
        Row::plain("mvm network up (CLI, cold)", "ms", &cli_up),
        Row::plain("mvm network down (CLI)", "ms", &cli_down),
        Row::plain("Network::up (lib, cold)", "ms", &lib_up),
        Row::plain("Network::down (lib)", "ms", &lib_down),
        Row::plain("Network::attach (lib)", "ms", &attach),
    ]
}

/// Part 2: the forwarder relaying `LOOPBACK_MIB` MiB on loopback, and the
/// same straight to the sink, in `ns`: MiB/s per round; and the
/// connection setup it adds (a guest connect and two relay threads per
/// connection), by 1-byte requests.
fn forwarder_loopback(ns: &str) -> Vec<Row> {
    in_netns(ns, || {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the sink");
        let sink = listener.local_addr().unwrap();
        // The sink reads each connection to its EOF and closes it, as the
        // guest's mvm-vsock tcp-sink does; it ends with the process.
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
            }
        });
        let front = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), UPLOAD_FORWARD);
        let mut fwd = Forwarder::new(IpAddr::V4(Ipv4Addr::LOCALHOST));
        fwd.add(ForwardSpec {
            protocol: Protocol::Tcp,
            host: front,
            guest_port: sink.port(),
        })
        .expect("forward on loopback");
        let rate = |addr| -> Vec<f64> {
            upload(addr, 16); // warm-up
            (0..UPLOAD_ROUNDS)
                .map(|_| LOOPBACK_MIB as f64 / upload(addr, LOOPBACK_MIB))
                .collect()
        };
        let via = rate(front);
        let direct = rate(sink);
        let requests = |addr| -> Vec<f64> { (0..LOOPBACK_REQUESTS).map(|_| request_ms(addr)).collect() };
        let req_via = requests(front);
        let req_direct = requests(sink);
        vec![
            Row::plain("loopback via Forwarder", "MiB/s", &via),
            Row::plain("loopback direct", "MiB/s", &direct),
            Row::plain("loopback 1-byte req via Fwd", "ms", &req_via),
            Row::plain("loopback 1-byte req direct", "ms", &req_direct),
        ]
    })
}

/// Part 3: one guest on the default network in `ns`.
fn with_guest(ns: &str, mvm: &Mvm, mib: usize) -> (Vec<Row>, f64) {
    let boot = Instant::now();
    mvm.ok(&[
        "create",
        "g",
        "--no-image",
        "--cpus",
        "1",
        "--memory",
        "128",
        "--forward",
        &format!("{UPLOAD_FORWARD}:{SINK_PORT}"),
        "--forward",
        &format!("{HTTP_FORWARD}:80"),
    ]);
    mvm.ok(&["start", "g", "--timeout", "900"]);
    let boot_s = boot.elapsed().as_secs_f64();
    let status = mvm.json(&["status", "g", "--json"]);
    let ip: Ipv4Addr = status["ip"]
        .as_str()
        .unwrap_or_else(|| panic!("the guest has no address: {status}"))
        .parse()
        .expect("an IPv4 address");
    let script = format!(
        "setsid mvm-vsock tcp-sink {SINK_PORT} </dev/null >/dev/null 2>&1 & \
         mkdir -p /tmp/www && echo x > /tmp/www/i && httpd -p 80 -h /tmp/www"
    );
    let out = mvm.run(&["exec", "g", "--", "sh", "-c", &script]);
    assert!(out.status.success(), "starting the servers: {}", describe(&out));
    let rows = in_netns(ns, || {
        let direct = SocketAddr::new(IpAddr::V4(ip), SINK_PORT);
        let deadline = Instant::now() + Duration::from_secs(60);
        // The sink is up once a connection gets through (it reads the
        // probe's EOF and closes).
        while TcpStream::connect_timeout(&direct, Duration::from_secs(5)).is_err() {
            assert!(Instant::now() < deadline, "the guest's sink never listened");
            std::thread::sleep(Duration::from_millis(500));
        }
        let front = |port| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        let kib = (mib << 10) as f64;
        let rate = |addr| -> Vec<f64> { (0..UPLOAD_ROUNDS).map(|_| kib / upload(addr, mib)).collect() };
        let up_fwd = rate(front(UPLOAD_FORWARD));
        let up_direct = rate(direct);
        let http_direct = SocketAddr::new(IpAddr::V4(ip), 80);
        http_get_ms(front(HTTP_FORWARD)); // warm-up: page cache, httpd's first fork
        let get_fwd: Vec<f64> = (0..GETS).map(|_| http_get_ms(front(HTTP_FORWARD))).collect();
        let get_direct: Vec<f64> = (0..GETS).map(|_| http_get_ms(http_direct)).collect();
        vec![
            Row::plain("host->guest TCP via forward", "KiB/s", &up_fwd),
            Row::plain("host->guest TCP direct", "KiB/s", &up_direct),
            Row::plain("HTTP GET via forward", "ms", &get_fwd),
            Row::plain("HTTP GET direct", "ms", &get_direct),
        ]
    });
    mvm.ok(&["stop", "g"]);
    (rows, boot_s)
}

/// The scratch directory, removed even when the benchmark panics.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() {
    let mib = env_count("MVM_BENCH_NET_MIB", 1).max(1);
    let scratch = Scratch(scratch_dir("bench-network"));
    let dir = scratch.0.clone();
    let pid = std::process::id();
    let load_before = loadavg();
    // Declared before the Mvm values, so dropped after them: Mvm's drop
    // kills the VMMs and dnsmasq, then the namespaces and files go.
    let host_ns = NetNs::new(format!("mvm-bnh-{pid}"));
    let guest_ns = NetNs::new(format!("mvm-bng-{pid}"));
    let mvm_host = Mvm::in_netns(dir.join("state-host"), &host_ns.0);
    let mvm_guest = Mvm::in_netns(dir.join("state-guest"), &guest_ns.0);

    let mut rows = host_only(&host_ns.0, &mvm_host);
    rows.extend(forwarder_loopback(&host_ns.0));
    let (guest_rows, boot_s) = with_guest(&guest_ns.0, &mvm_guest, mib);
    rows.extend(guest_rows);
    let note = format!(
        "managed network in private namespaces; CLI times include `ip netns exec` and the mvm process; \
         guest: busybox test initramfs, 1 vCPU, {mib} MiB uploads to mvm-vsock tcp-sink (64 KiB reads), \
         HTTP/1.0 GETs of a 2-byte file from busybox httpd, boot took {boot_s:.0} s; \
         PVM hosts interpret the guest kernel, so the guest rows measure the guest (the loopback rows \
         are the forwarder's ceiling); load average {load_before} before, {} after; \
         the peers in shared/HOST-KVM.md have no managed-network numbers, so no peer column",
        loadavg()
    );
    report("network", &note, &rows);
    drop((mvm_host, mvm_guest));
    drop((host_ns, guest_ns));
    drop(scratch);
}
