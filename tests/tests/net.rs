//! virtio-net end to end, in a network namespace this test makes (no
//! traffic leaves it): a TAP with 10.0.2.1 on the host side, the guest at
//! 10.0.2.15 pings it and moves 1 MiB over TCP each way; the checksums on
//! both sides must match.

use std::process::{Command, Stdio};
use std::time::Duration;

use mvm_tests::*;

const PEER: &str = r#"
import hashlib, os, socket, time
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("10.0.2.1", 5001))
srv.listen(1)
srv.settimeout(400)
conn, _ = srv.accept()
data = b""
while len(data) < (1 << 20):
    chunk = conn.recv(65536)
    if not chunk:
        break
    data += chunk
conn.close()
print("received", len(data), hashlib.md5(data).hexdigest(), flush=True)
payload = os.urandom(1 << 20)
deadline = time.time() + 400
while True:
    try:
        s = socket.create_connection(("10.0.2.15", 5002), timeout=10)
        break
    except OSError:
        if time.time() > deadline:
            raise
        time.sleep(0.5)
# The guest drains slowly (its kernel is interpreted on PVM hosts): allow
# minutes for the whole send, not the connect timeout.
s.settimeout(400)
s.sendall(payload)
s.close()
print("sent", hashlib.md5(payload).hexdigest(), flush=True)
"#;

#[test]
fn guest_pings_host_and_moves_a_mib_each_way_over_tap() {
    let dir = scratch_dir("net");
    let ns = NetNs::with_tap(format!("mvm-e2e-{}", std::process::id()), "mvmtap0", "10.0.2.1/24");
    let script = dir.join("peer.py");
    std::fs::write(&script, PEER).unwrap();
    let peer = Command::new("ip")
        .args(["netns", "exec", &ns.0, "python3"])
        .arg(&script)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the host-side peer");

    let config = write_config(
        &dir,
        &(guest_config(1, 128, "mvm.scenario=net mvm.end=poweroff")
            .replace("version = 1\n", "version = 1\nname = \"nettest\"\n")
            + "[[net]]\ntap = \"mvmtap0\"\n"),
    );
    let run = RunningVm::start_in_netns(&ns.0, &config).finish(Duration::from_secs(420));
    let peer = peer.wait_with_output().expect("peer output");
    let peer_out = String::from_utf8_lossy(&peer.stdout);
    let r = run.results();
    let console = run.console();
    assert_eq!(run.status.code(), Some(0), "stderr: {}\n{console}", run.stderr);
    assert_eq!(
        r.get("status").map(String::as_str),
        Some("ok"),
        "{console}\npeer: {peer_out}"
    );
    let mac = mvm_net::mac_for("nettest", 0).map(|b| format!("{b:02x}")).join(":");
    assert_eq!(r["mac"], mac, "MAC derived from the VM name");
    assert_eq!(r["ping"], "ok");
    assert!(peer.status.success(), "peer failed: {peer_out}");
    let mut lines = peer_out.lines();
    let received: Vec<&str> = lines.next().unwrap_or("").split(' ').collect();
    let sent: Vec<&str> = lines.next().unwrap_or("").split(' ').collect();
    assert_eq!(
        received,
        ["received", "1048576", r["sent_md5"].as_str()],
        "guest to host"
    );
    assert_eq!(sent, ["sent", r["received_md5"].as_str()], "host to guest");
    assert_eq!(r["received_bytes"], "1048576");
}

/// The VMM creates a TAP that does not exist and attaches it to the named
/// bridge; a bridge that does not exist is an error naming it. A spinning
/// 2-byte guest stands in for Linux: only the host side is under test.
#[test]
fn tap_is_created_and_attached_to_the_bridge() {
    let dir = scratch_dir("net-bridge");
    let ns = NetNs::new(format!("mvm-br-{}", std::process::id()));
    ns.ip(&["link", "add", "br-test", "type", "bridge"]);
    let kernel = dir.join("spin.elf");
    std::fs::write(&kernel, elf_guest(&[0xeb, 0xfe], 0x10_0000)).unwrap();
    let toml = |bridge: &str| {
        format!(
            "version = 1\n[boot]\nkernel = \"{}\"\n[console]\noutput = \"none\"\n[[net]]\ntap = \"mvmtap7\"\nbridge = \"{bridge}\"\n",
            kernel.display()
        )
    };
    let config = write_config(&dir, &toml("br-test"));
    let vm = RunningVm::start_in_netns(&ns.0, &config);
    let link = || {
        let out = Command::new("ip")
            .args(["-n", &ns.0, "-o", "link", "show", "mvmtap7"])
            .stderr(Stdio::null())
            .output()
            .expect("run ip");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut seen = String::new();
    for _ in 0..200 {
        seen = link();
        if seen.contains("master br-test") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    vm.signal(libc::SIGTERM);
    let run = vm.finish(Duration::from_secs(60));
    assert!(
        seen.contains("master br-test"),
        "TAP not on the bridge: {seen:?}\n{}",
        run.stderr
    );
    assert_eq!(run.status.code(), Some(128 + libc::SIGTERM), "{}", run.stderr);
    assert_eq!(link(), "", "the TAP the VMM created goes with it");

    let config = write_config(&dir, &toml("no-such-br"));
    let run = RunningVm::start_in_netns(&ns.0, &config).finish(Duration::from_secs(60));
    assert_ne!(run.status.code(), Some(0));
    assert!(run.stderr.contains("no-such-br"), "{}", run.stderr);
}
