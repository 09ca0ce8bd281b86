//! Guest-side virtio-net TCP throughput: in a network namespace made here
//! (TAP `mvmtap0`, host 10.0.2.1, guest 10.0.2.15, as in tests/tests/net.rs)
//! the test guest sends 1 MiB (`MVM_BENCH_NET_MIB`) to a host peer and
//! receives as much from it with `/bin/mvm-vsock tcp` (tests/guest/vsock.c:
//! 64 KiB reads and writes, as a real bulk copy makes; busybox nc's 1 KiB
//! ones made its system calls, not TCP, the bottleneck), three rounds, each
//! timed in the guest from the tool's start to its exit. Printed next to
//! the host's physical limits measured here and now: memory copy
//! bandwidth, and how fast the VMM's own TAP writer (`mvm_net::tap::Tap`)
//! pushes frames into the host kernel: 64 KiB TSO frames (what the guest
//! sends, as the VMM offers it TSO) and 1514-byte frames. Those frames are
//! addressed to another MAC, so the host stack drops them right after the
//! TAP: the rate is that of the copy into the host kernel, the ceiling of
//! the guest-to-host path.
//!
//! Needs root and iproute2 (like the virtio-net end-to-end test).
//!
//! Caveat for PVM development hosts: the guest kernel is interpreted
//! (about 1.5 M instructions/s), so the guest-side figures measure the
//! guest TCP/IP stack under interpretation, far below the limits or what a
//! VMX/SVM host reaches: about 130 KiB/s each way (busybox nc's 1 KiB
//! I/O gave 50 KiB/s out and 80 KiB/s in), hence only 1 MiB by default,
//! about 8 s per direction and under 2 minutes for the whole benchmark. The
//! guest times also include starting the tool and the TCP handshake; the
//! peer's clock (first to last byte received) is shown for guest to host.

use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mvm_benches::{host_memcpy_mib_s, report, Row, Stats};
use mvm_net::device::{FrameIo, VNET_HDR_LEN};
use mvm_net::tap::Tap;
use mvm_tests::{guest_config, scratch_dir, write_config, NetNs, RunningVm};

const ROUNDS: usize = 3;
const TAP: &str = "mvmtap0";

/// The host side: receives each guest upload on 5001 (reporting bytes and
/// first-to-last-byte seconds), serves each download on 5002.
const PEER: &str = r#"
import socket, sys, time
mib, rounds = int(sys.argv[1]), int(sys.argv[2])
def server(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("10.0.2.1", port))
    s.listen(1)
    s.settimeout(600)
    return s
up, down = server(5001), server(5002)
zeros = bytes(1 << 20)
for _ in range(rounds):
    conn, _ = up.accept()
    n, first = 0, None
    while True:
        chunk = conn.recv(1 << 20)
        if not chunk:
            break
        if first is None:
            first = time.monotonic()
        n += len(chunk)
    last = time.monotonic()
    conn.close()
    print("received", n, "%.4f" % (last - (first or last)), flush=True)
    conn, _ = down.accept()
    for _ in range(mib):
        conn.sendall(zeros)
    conn.close()
    print("sent", mib << 20, flush=True)
"#;

/// A virtio-net header and an Ethernet/IPv4/TCP frame of `len` bytes to a
/// MAC that is not the TAP's; with `tso`, marked as one TCP segment for the
/// host to cut into MSS-sized ones, as the guest's TSO frames are.
fn frame(len: usize, tso: bool) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN + len];
    if tso {
        f[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
        f[1] = 1; // VIRTIO_NET_HDR_GSO_TCPV4
        f[2..4].copy_from_slice(&54u16.to_le_bytes()); // hdr_len
        f[4..6].copy_from_slice(&1448u16.to_le_bytes()); // gso_size
        f[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start: the TCP header
        f[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset in it
    }
    let e = &mut f[VNET_HDR_LEN..];
    e[..6].copy_from_slice(&[0x02, 0, 0, 0x6d, 0x76, 0x6d]);
    e[6..12].copy_from_slice(&[0x02, 0, 0, 0x6d, 0x76, 0x01]);
    e[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut e[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((len - 14) as u16).to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = 6; // TCP
    ip[12..16].copy_from_slice(&[10, 0, 2, 15]);
    ip[16..20].copy_from_slice(&[10, 0, 2, 1]);
    let sum = ip
        .chunks(2)
        .fold(0u32, |s, w| s + u32::from(u16::from_be_bytes([w[0], w[1]])));
    let sum = (sum & 0xffff) + (sum >> 16);
    ip[10..12].copy_from_slice(&(!((sum & 0xffff) + (sum >> 16)) as u16).to_be_bytes());
    let tcp = &mut e[34..54];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&5001u16.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18; // PSH, ACK
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    f
}

/// MiB/s of Ethernet frames (virtio-net headers not counted) that
/// `Tap::write_frame` moves into the TAP in namespace `ns` for about a
/// second. The thread that enters the namespace is the only one in it.
fn tap_write_mib_s(ns: &str, len: usize, tso: bool) -> f64 {
    let ns_path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let ns_file = std::fs::File::open(&ns_path).expect("open the namespace");
        // SAFETY: setns on a descriptor we own; it moves only this thread.
        let r = unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        let mut tap = Tap::open(TAP).expect("attach to the TAP");
        let frame = frame(len, tso);
        let (mut bytes, start) = (0usize, Instant::now());
        while start.elapsed() < Duration::from_secs(1) {
            for _ in 0..64 {
                tap.write_frame(&frame).expect("TAP write");
            }
            bytes += 64 * len;
        }
        bytes as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64()
    })
    .join()
    .expect("TAP writer")
}

/// Space-separated numbers from a result value.
fn numbers(v: &str) -> Vec<f64> {
    v.split_whitespace().map(|n| n.parse().expect("a number")).collect()
}

fn main() {
    let mib: usize = std::env::var("MVM_BENCH_NET_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let dir = scratch_dir("bench-net");
    let ns = NetNs::with_tap(format!("mvm-bench-{}", std::process::id()), TAP, "10.0.2.1/24");
    let script = dir.join("peer.py");
    std::fs::write(&script, PEER).unwrap();
    let peer = Command::new("ip")
        .args(["netns", "exec", &ns.0, "python3"])
        .arg(&script)
        .args([mib.to_string(), ROUNDS.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the host-side peer");
    let config = write_config(
        &dir,
        &(guest_config(
            1,
            128,
            &format!("mvm.scenario=netbench mvm.mib={mib} mvm.rounds={ROUNDS}"),
        ) + &format!("[[net]]\ntap = \"{TAP}\"\n")),
    );
    let run = RunningVm::start_in_netns(&ns.0, &config).finish(Duration::from_secs(1200));
    let peer = peer.wait_with_output().expect("peer output");
    let peer_out = String::from_utf8_lossy(&peer.stdout);
    let r = run.results();
    assert_eq!(
        r.get("status").map(String::as_str),
        Some("ok"),
        "{}\nstderr: {}\npeer: {peer_out}",
        run.console(),
        run.stderr
    );
    assert!(peer.status.success(), "peer failed: {peer_out}");
    let bytes = (mib << 20).to_string();
    assert!(
        numbers(&r["net_rx_bytes"]).iter().all(|&n| n == (mib << 20) as f64),
        "guest received {}",
        r["net_rx_bytes"]
    );
    let kib = (mib << 10) as f64;
    let mut peer_rx = Vec::new();
    for line in peer_out.lines() {
        let words: Vec<&str> = line.split(' ').collect();
        match words[..] {
            ["received", n, secs] => {
                assert_eq!(n, bytes, "host received: {peer_out}");
                peer_rx.push(kib / secs.parse::<f64>().expect("seconds").max(0.001));
            }
            ["sent", n] => assert_eq!(n, bytes, "host sent: {peer_out}"),
            _ => panic!("peer printed {line:?}"),
        }
    }
    assert_eq!(peer_rx.len(), ROUNDS, "peer: {peer_out}");
    let rates = |key: &str| -> Vec<f64> { numbers(&r[key]).iter().map(|cs| kib / (cs.max(1.0) / 100.0)).collect() };
    let (tx, rx) = (rates("net_tx_cs"), rates("net_rx_cs"));
    let memcpy = host_memcpy_mib_s();
    let tap_tso = tap_write_mib_s(&ns.0, 65_549, true);
    let tap_mtu = tap_write_mib_s(&ns.0, 1514, false);
    // The guest's rates in KiB/s: two decimals of MiB/s would hide them.
    let row = |metric: &str, unit: &str, values: &[f64]| Row {
        metric: metric.into(),
        unit: unit.into(),
        ours: Stats::of(values),
        target: None,
        peer: None,
    };
    let note = format!(
        "guest mvm-vsock tcp (64 KiB I/O), {mib} MiB per direction over virtio-net/TAP, timed in the guest (tool start to exit); host limits measured alongside; PVM hosts interpret the guest kernel"
    );
    report(
        "guest_net",
        &note,
        &[
            row("guest->host TCP", "KiB/s", &tx),
            row("host->guest TCP", "KiB/s", &rx),
            row("guest->host (peer clock)", "KiB/s", &peer_rx),
            row("host memcpy (limit)", "MiB/s", &[memcpy]),
            row("TAP write 64K TSO (limit)", "MiB/s", &[tap_tso]),
            row("TAP write 1514 B (limit)", "MiB/s", &[tap_mtu]),
        ],
    );
    drop(ns);
    let _ = std::fs::remove_dir_all(&dir);
}
