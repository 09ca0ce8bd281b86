//! End to end: managed networks, entirely inside network namespaces this
//! test makes. The "host" namespace runs `mvm` (so its bridge, dnsmasq and
//! nftables table live there); an "internet" namespace behind it serves
//! HTTP and DNS on the documentation address 198.51.100.1 and has no route
//! back to the guests (only NAT gets replies home); a "lan" namespace
//! stands for another machine on the host's LAN.
//!
//! One scenario, five boots: VMs `a` and `b` start together, then `a`
//! again with `c` and `d` on a shared segment. It checks the DHCP address and its pin, names through
//! dnsmasq, NAT with and without a drop FORWARD policy (as Docker leaves
//! it), isolation between the VMs (directly and routed via the host),
//! declared and run-time forwards (TCP from 127.0.0.1 and from the LAN, UDP),
//! their collisions, removal, and the run-time forward after a restart.
//! A second test takes bad input and failed starts (no boot).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use mvm_tests::mvm_cli::{describe, stderr, stdout, Mvm};
use mvm_tests::{in_ns, mvm_vmm, scratch_dir, wait_until, NetNs};

const START_TIMEOUT_S: &str = "900";
const INTERNET: &str = "198.51.100.1";
const LAN_HOST: &str = "172.31.77.1";

fn spawn_in_ns(ns: &str, args: &[&str]) -> Child {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ip netns exec")
}

/// Children (servers in the namespaces) killed on drop.
struct Servers(Vec<Child>);

impl Drop for Servers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `/etc/netns/<ns>/resolv.conf`, which `ip netns exec` mounts over
/// /etc/resolv.conf: the host namespace's upstream DNS is the "internet".
struct ResolvConf(std::path::PathBuf);

impl ResolvConf {
    fn new(ns: &str, text: &str) -> ResolvConf {
        let dir = Path::new("/etc/netns").join(ns);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("resolv.conf"), text).unwrap();
        ResolvConf(dir)
    }
}

impl Drop for ResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The three namespaces and their links.
struct World {
    host: NetNs,
    internet: NetNs,
    lan: NetNs,
    _resolv: ResolvConf,
    _servers: Servers,
}

fn world(tag: &str, dir: &Path) -> World {
    let pid = std::process::id();
    let host = NetNs::new(format!("mvm-{tag}h-{pid}"));
    let internet = NetNs::new(format!("mvm-{tag}i-{pid}"));
    let lan = NetNs::new(format!("mvm-{tag}l-{pid}"));
    // host <-> internet: the host's uplink and default route.
    host.ip(&[
        "link",
        "add",
        "uplink0",
        "type",
        "veth",
        "peer",
        "name",
        "wan0",
        "netns",
        &internet.0,
    ]);
    host.ip(&["addr", "add", "203.0.113.2/24", "dev", "uplink0"]);
    host.ip(&["link", "set", "uplink0", "up"]);
    host.ip(&["route", "add", "default", "via", "203.0.113.1"]);
    internet.ip(&["addr", "add", "203.0.113.1/24", "dev", "wan0"]);
    internet.ip(&["link", "set", "wan0", "up"]);
    internet.ip(&["addr", "add", &format!("{INTERNET}/32"), "dev", "lo"]);
    // host <-> lan.
    host.ip(&[
        "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", &lan.0,
    ]);
    host.ip(&["addr", "add", &format!("{LAN_HOST}/24"), "dev", "lan0"]);
    host.ip(&["link", "set", "lan0", "up"]);
    lan.ip(&["addr", "add", "172.31.77.2/24", "dev", "eth0"]);
    lan.ip(&["link", "set", "eth0", "up"]);

    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("hello.txt"), "hello from the internet\n").unwrap();
    let http = spawn_in_ns(
        &internet.0,
        &[
            "python3",
            "-m",
            "http.server",
            "--bind",
            INTERNET,
            "--directory",
            www.to_str().unwrap(),
            "8000",
        ],
    );
    let dns = spawn_in_ns(
        &internet.0,
        &[
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            &format!("--listen-address={INTERNET}"),
            &format!("--address=/internet.test/{INTERNET}"),
            "--user=root",
            &format!("--pid-file={}", dir.join("internet-dns.pid").display()),
        ],
    );
    let resolv = ResolvConf::new(&host.0, &format!("nameserver {INTERNET}\n"));
    World {
        host,
        internet,
        lan,
        _resolv: resolv,
        _servers: Servers(vec![http, dns]),
    }
}

/// A program that listens on 127.0.0.1:`port` in namespace `ns` (until
/// the returned value drops), once it does.
fn hold_port(ns: &str, port: u16) -> Servers {
    let script =
        format!("import socket,time; s=socket.socket(); s.bind(('127.0.0.1',{port})); s.listen(); time.sleep(600)");
    let holder = Servers(vec![spawn_in_ns(ns, &["python3", "-c", &script])]);
    let listening = wait_until(Duration::from_secs(10), || {
        stdout(&in_ns(ns, &["ss", "-ltn"])).contains(&format!("127.0.0.1:{port}"))
    });
    assert!(listening, "nothing listens on 127.0.0.1:{port}");
    holder
}

/// `mvm start` of each VM at once.
fn start_together(mvm: &Mvm, vms: &[&str]) {
    std::thread::scope(|s| {
        let starts: Vec<_> = vms
            .iter()
            .map(|vm| s.spawn(move || mvm.run(&["start", vm, "--timeout", START_TIMEOUT_S])))
            .collect();
        for (vm, t) in vms.iter().zip(starts) {
            let out = t.join().unwrap();
            assert!(out.status.success(), "start {vm}: {}", describe(&out));
        }
    });
}

/// `mvm exec <vm> -- sh -c <script>`: status and output.
fn guest(mvm: &Mvm, vm: &str, script: &str) -> (bool, String) {
    let out = mvm.run(&["exec", vm, "--", "sh", "-c", script]);
    (out.status.success(), format!("{}{}", stdout(&out), stderr(&out)))
}

fn guest_ok(mvm: &Mvm, vm: &str, script: &str) -> String {
    let (ok, text) = guest(mvm, vm, script);
    assert!(ok, "in {vm}: {script}: {text}{}", mvm.vm_logs(vm));
    text
}

/// [`guest_ok`] for network clients whose output must contain `expect`,
/// tried up to three times: busybox's clients in the test guest now and
/// then die of SIGSEGV on PVM hosts (see the console log), which says
/// nothing about the network.
fn guest_fetch(mvm: &Mvm, vm: &str, script: &str, expect: &str) -> String {
    let mut last = String::new();
    for attempt in 1..=3 {
        let (_, text) = guest(mvm, vm, script);
        if text.contains(expect) {
            return text;
        }
        eprintln!("attempt {attempt} in {vm}: {script}: {text}");
        last = text;
    }
    panic!(
        "in {vm}: {script}: no {expect:?} in three attempts; last: {last}{}",
        mvm.vm_logs(vm)
    );
}

/// A shell line for the guest: an HTTP/1.0 GET with busybox nc, connect
/// timeout 8 s (busybox wget's `-T` makes it die of SIGSEGV).
fn nc_get(host: &str, port: u16, path: &str) -> String {
    format!("printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' | nc -w 8 {host} {port}")
}

/// An HTTP GET from namespace `ns` (python3: busybox wget's `-T` crashes
/// it); the body, or None.
fn http_get(ns: &str, url: &str) -> Option<String> {
    let script =
        "import sys, urllib.request\nsys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=20).read().decode())";
    let out = in_ns(ns, &["python3", "-c", script, url]);
    out.status.success().then(|| stdout(&out))
}

const UDP_ECHO: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(15)
for _ in range(4):
    s.sendto(b"udp through the forward", ("127.0.0.1", int(sys.argv[1])))
    try:
        print(s.recvfrom(100)[0].decode())
        break
    except socket.timeout:
        pass
"#;

#[test]
fn managed_network_end_to_end() {
    let dir = scratch_dir("network");
    let w = world("n", &dir);
    let h = w.host.0.clone();
    let mvm = Mvm::in_netns(dir.join("state"), &h);
    let common = ["--no-image", "--cpus", "1", "--memory", "128"];
    let mut create_a = vec!["create", "a", "--vmm-user", "microvm-dev"];
    create_a.extend_from_slice(&common);
    create_a.extend_from_slice(&["--forward", "18080:80", "--forward", "0.0.0.0:18081:80"]);
    mvm.ok(&create_a);
    // a's VMM runs as microvm-dev (the default as root, said explicitly
    // here: root prepares its TAP and network), b's keeps root's rights.
    let mut create_b = vec!["create", "b", "--vmm-user", "root"];
    create_b.extend_from_slice(&common);
    mvm.ok(&create_b);
    let toml = std::fs::read_to_string(dir.join("state/a/vm.toml")).unwrap();
    assert!(toml.contains("network = \"default\""), "{toml}");

    // Both at once: two attaches race for the network's lock.
    start_together(&mvm, &["a", "b"]);
    let net = mvm.json(&["network", "status", "--json"]);
    let net = &net[0];
    assert_eq!(net["up"], true, "{net}");
    let dnsmasq_pid = net["dnsmasq_pid"]
        .as_i64()
        .unwrap_or_else(|| panic!("no dnsmasq: {net}"));
    // Started by a VMM, whose threads block the stop signals: it must not
    // inherit that, or it never re-reads its hosts on SIGHUP (a VM started
    // next gets no address) and outlives `mvm network down`.
    let status = std::fs::read_to_string(format!("/proc/{dnsmasq_pid}/status")).unwrap();
    assert!(
        status.lines().any(|l| l == "SigBlk:\t0000000000000000"),
        "dnsmasq blocks signals: {status}"
    );
    assert_eq!(net["nft_table"], true, "{net}");
    let ip = |vm: &str| -> String {
        let s = mvm.json(&["status", vm, "--json"]);
        s["ip"]
            .as_str()
            .unwrap_or_else(|| panic!("{vm} has no ip: {s}"))
            .to_string()
    };
    let (ip_a, ip_b) = (ip("a"), ip("b"));
    // The VMM of a VM with forwards: unprivileged, with its TAP by
    // descriptor, each of its threads confined; its root keeper keeps the
    // network whole.
    let a_keeper = mvm.json(&["status", "a", "--json"])["pid"]
        .as_u64()
        .expect("a's VMM pid") as u32;
    let vmm_uid = mvm_tests::host_uid("microvm-dev").expect("the microvm-dev user (scripts/setup-host.sh)");
    let a_vmm = mvm_tests::assert_vmm_unprivileged(a_keeper, vmm_uid);
    mvm_tests::assert_threads_confined(
        a_vmm,
        &["vcpu0", "mvm-vm", "mvm-control", "fwd-tcp-18080", "fwd-tcp-18081"],
    );
    let keeper_threads: Vec<String> = std::fs::read_dir(format!("/proc/{a_keeper}/task"))
        .unwrap()
        .flatten()
        .map(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .unwrap_or_default()
                .trim()
                .to_string()
        })
        .collect();
    assert!(
        keeper_threads.iter().any(|t| t == "mvm-net-watch"),
        "{keeper_threads:?}"
    );
    // b's VMM (root) watches its network itself, confined.
    let b_vmm = mvm.json(&["status", "b", "--json"])["pid"].as_u64().expect("b's pid") as u32;
    mvm_tests::assert_threads_confined(b_vmm, &["vcpu0", "mvm-vm", "mvm-control", "mvm-net-watch"]);
    assert_ne!(ip_a, ip_b);
    for addr in [&ip_a, &ip_b] {
        assert!(addr.starts_with("10.213.0."), "{addr}");
    }
    let list = mvm.ok(&["list"]);
    assert!(list.contains(&ip_a) && list.contains(&ip_b), "{list}");

    // DHCP gave each guest its pin, with router and DNS.
    let eth0 = guest_ok(&mvm, "a", "ip -4 addr show eth0; ip route; cat /etc/resolv.conf");
    assert!(eth0.contains(&format!("inet {ip_a}/24")), "{eth0}");
    assert!(eth0.contains("default via 10.213.0.1"), "{eth0}");
    assert!(eth0.contains("nameserver 10.213.0.1"), "{eth0}");
    assert!(guest_ok(&mvm, "b", "ip -4 addr show eth0").contains(&format!("inet {ip_b}/24")));

    // Names through dnsmasq, from the host side.
    for name in ["a", "a.mvm"] {
        let out = in_ns(&h, &["busybox", "nslookup", name, "10.213.0.1"]);
        assert!(stdout(&out).contains(&ip_a), "nslookup {name}: {}", describe(&out));
    }
    // ... and outside names from the guest, through dnsmasq and upstream.
    // (The stand-in internet's DNS refuses the AAAA query: only A counts.)
    guest_fetch(&mvm, "a", "nslookup internet.test", &format!("Address: {INTERNET}"));

    // NAT: the internet has no route to 10.213.0.0/24.
    let fetch = nc_get("internet.test", 8000, "/hello.txt");
    let fetch = fetch.as_str();
    guest_fetch(&mvm, "a", fetch, "hello from the internet");
    // Isolation (before the drop policy below, which would hide a missing
    // rule of ours): b serves, the host reaches it, a does not.
    guest_ok(&mvm, "b", "echo b-secret > /tmp/index.html && httpd -p 8080 -h /tmp");
    let from_host = wait_until(Duration::from_secs(30), || {
        http_get(&h, &format!("http://{ip_b}:8080/index.html")).is_some_and(|b| b.contains("b-secret"))
    });
    assert!(from_host, "b's server is not reachable from the host");
    let (pinged, text) = guest(&mvm, "a", &format!("ping -c 2 -W 3 {ip_b}"));
    assert!(!pinged, "a pinged b: {text}");
    let (_, text) = guest(&mvm, "a", &nc_get(&ip_b, 8080, "/index.html"));
    assert!(!text.contains("b-secret"), "a reached b over TCP: {text}");
    // Routed through the host instead of over the bridge.
    guest_ok(&mvm, "a", &format!("ip route add {ip_b}/32 via 10.213.0.1"));
    let (pinged, text) = guest(&mvm, "a", &format!("ping -c 2 -W 3 {ip_b}"));
    assert!(!pinged, "a pinged b via the host: {text}");
    let (_, text) = guest(&mvm, "a", &nc_get(&ip_b, 8080, "/index.html"));
    assert!(!text.contains("b-secret"), "a reached b via the host: {text}");
    guest_ok(&mvm, "a", &format!("ip route del {ip_b}/32"));

    // A drop FORWARD policy in the filter table, as Docker sets it: the
    // VMM's watch puts our accept rules there within seconds.
    let policy = in_ns(&h, &["iptables", "-P", "FORWARD", "DROP"]);
    assert!(policy.status.success(), "iptables: {}", describe(&policy));
    let ours = wait_until(Duration::from_secs(30), || {
        stdout(&in_ns(&h, &["nft", "list", "chain", "ip", "filter", "FORWARD"])).contains("microvm-dev network default")
    });
    assert!(ours, "no accept rule of ours in the FORWARD chain");
    guest_fetch(&mvm, "a", fetch, "hello from the internet");

    // Declared forwards: 127.0.0.1 only, and every address (the LAN).
    let serve_a = "mkdir -p /tmp/www && echo served-by-a > /tmp/www/index.html && httpd -p 80 -h /tmp/www";
    guest_ok(&mvm, "a", serve_a);
    let body = http_get(&h, "http://127.0.0.1:18080/index.html");
    assert_eq!(body.as_deref(), Some("served-by-a\n"));
    let body = http_get(&w.lan.0, &format!("http://{LAN_HOST}:18081/index.html"));
    assert_eq!(body.as_deref(), Some("served-by-a\n"), "from the LAN");
    assert_eq!(
        http_get(&w.lan.0, &format!("http://{LAN_HOST}:18080/index.html")),
        None,
        "18080 is loopback-only"
    );

    // Run-time forwards: TCP, UDP, collisions, removal.
    mvm.ok(&["port", "a", "18082:80"]);
    assert_eq!(
        http_get(&h, "http://127.0.0.1:18082/index.html").as_deref(),
        Some("served-by-a\n")
    );
    mvm.ok(&["port", "a", "0.0.0.0:18083:80"]);
    assert_eq!(
        http_get(&w.lan.0, &format!("http://{LAN_HOST}:18083/index.html")).as_deref(),
        Some("served-by-a\n")
    );
    guest_ok(&mvm, "a", "setsid mvm-vsock udp-echo 5000 </dev/null >/dev/null 2>&1 &");
    mvm.ok(&["port", "a", "15000:5000/udp"]);
    let script = dir.join("udp.py");
    std::fs::write(&script, UDP_ECHO).unwrap();
    let echo = in_ns(&h, &["python3", script.to_str().unwrap(), "15000"]);
    assert_eq!(stdout(&echo).trim(), "udp through the forward", "{}", describe(&echo));
    for (args, needle) in [
        (&["port", "b", "18082:80"][..], "already forwarded to VM \"a\""),
        (&["port", "a", "18082:81"][..], "already forwarded to its port 80"),
        (&["port", "a", "99999:80"][..], "not a number from 1 to 65535"),
    ] {
        let out = mvm.run(args);
        assert!(
            !out.status.success() && stderr(&out).contains(needle),
            "{args:?}: {}",
            describe(&out)
        );
    }
    // A port some other program holds on the host: refused, not recorded.
    let _holder = hold_port(&h, 18090);
    let out = mvm.run(&["port", "a", "18090:80"]);
    assert!(
        !out.status.success() && stderr(&out).contains("already in use on the host"),
        "{}",
        describe(&out)
    );
    let listed = mvm.json(&["port", "a", "--list", "--json"]);
    let ports: Vec<i64> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["host_port"].as_i64().unwrap())
        .collect();
    assert_eq!(ports, vec![18080, 18081, 18082, 18083, 15000], "{listed}");
    mvm.ok(&["port", "a", "--rm", "18082"]);
    assert_eq!(
        http_get(&h, "http://127.0.0.1:18082/index.html"),
        None,
        "removed forward still open"
    );
    let out = mvm.run(&["port", "a", "--rm", "18080"]);
    assert!(stderr(&out).contains("declared in its vm.toml"), "{}", describe(&out));

    // Restart: same address by DHCP, run-time forwards back. At the same
    // time c and d boot on a shared segment, where VMs may talk.
    mvm.ok(&["stop", "a"]);
    let lab = mvm.json(&[
        "network",
        "up",
        "--name",
        "lab",
        "--subnet",
        "10.214.0.0/24",
        "--shared",
        "--json",
    ]);
    assert_eq!(
        (lab["up"].as_bool(), lab["isolate"].as_bool()),
        (Some(true), Some(false)),
        "{lab}"
    );
    for vm in ["c", "d"] {
        let mut create = vec!["create", vm, "--network", "lab"];
        create.extend_from_slice(&common);
        mvm.ok(&create);
    }
    start_together(&mvm, &["a", "c", "d"]);
    let ip_d = ip("d");
    assert!(ip_d.starts_with("10.214.0."), "{ip_d}");
    guest_ok(&mvm, "d", "echo d-open > /tmp/index.html && httpd -p 8080 -h /tmp");
    guest_fetch(&mvm, "c", &format!("ping -c 2 -W 3 {ip_d}"), "2 packets received");
    guest_fetch(&mvm, "c", &nc_get(&ip_d, 8080, "/index.html"), "d-open");
    // The segments are apart: a (default network) cannot reach d.
    let (_, text) = guest(&mvm, "a", &nc_get(&ip_d, 8080, "/index.html"));
    assert!(!text.contains("d-open"), "a reached d on the other network: {text}");
    mvm.ok(&["stop", "c"]);
    mvm.ok(&["stop", "d"]);
    assert_eq!(ip("a"), ip_a);
    assert!(guest_ok(&mvm, "a", "ip -4 addr show eth0").contains(&format!("inet {ip_a}/24")));
    guest_ok(&mvm, "a", serve_a);
    assert_eq!(
        http_get(&w.lan.0, &format!("http://{LAN_HOST}:18083/index.html")).as_deref(),
        Some("served-by-a\n"),
        "run-time forward after the restart"
    );
    assert_eq!(
        http_get(&h, "http://127.0.0.1:18080/index.html").as_deref(),
        Some("served-by-a\n")
    );
    assert_eq!(
        http_get(&h, "http://127.0.0.1:18082/index.html"),
        None,
        "removed forward came back"
    );

    // dnsmasq is supervised: killed, it comes back.
    let pid = mvm.json(&["network", "status", "--json"])[0]["dnsmasq_pid"]
        .as_i64()
        .unwrap();
    // SAFETY: plain kill(2) of the network's dnsmasq.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let mut restarted = None;
    let back = wait_until(Duration::from_secs(30), || {
        restarted = mvm.json(&["network", "status", "--json"])[0]["dnsmasq_pid"]
            .as_i64()
            .filter(|&p| p != pid);
        restarted.is_some()
    });
    assert!(back, "dnsmasq was not restarted");

    // Down is refused while VMs run, then takes everything away.
    let out = mvm.run(&["network", "down"]);
    assert!(stderr(&out).contains("stop those VMs first"), "{}", describe(&out));
    mvm.ok(&["stop", "a"]);
    mvm.ok(&["stop", "b"]);
    mvm.ok(&["network", "down"]);
    // Its dnsmasq is gone (SIGTERM reached it), not merely forgotten.
    let restarted = restarted.unwrap_or_default();
    let gone = wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(format!("/proc/{restarted}/cmdline")).map_or(true, |c| !c.contains("dnsmasq"))
    });
    assert!(gone, "dnsmasq {restarted} outlived network down");
    let out = mvm.run(&["network", "rm", "lab"]);
    assert!(stderr(&out).contains("used by VM(s) c, d"), "{}", describe(&out));
    mvm.ok(&["rm", "c"]);
    mvm.ok(&["rm", "d"]);
    mvm.ok(&["network", "rm", "lab"]);
    let status = &mvm.json(&["network", "status", "--json"])[0];
    assert_eq!(status["up"], false, "{status}");
    assert_eq!(status["nft_table"], false, "{status}");
    assert!(status["dnsmasq_pid"].is_null(), "{status}");
    assert_eq!(status["pins"].as_array().map(Vec::len), Some(2), "pins stay: {status}");
    // Removing a VM forgets its address.
    mvm.ok(&["rm", "b"]);
    let pins = &mvm.json(&["network", "status", "--json"])[0]["pins"];
    assert_eq!(pins.as_array().map(Vec::len), Some(1), "{pins}");
    assert_eq!(pins[0]["vm"], "a", "{pins}");
    let tables = stdout(&in_ns(&h, &["nft", "list", "ruleset"]));
    assert!(
        !tables.contains("mvm-default") && !tables.contains("mvm-lab") && !tables.contains("microvm-dev"),
        "{tables}"
    );
    assert!(
        tables.contains("policy drop"),
        "the FORWARD chain we did not make is left alone"
    );
    drop(w.internet);
}

/// Bad names in vm.toml, and starts that fail half-way: no TAP, no rule,
/// no pin, no dnsmasq left behind.
#[test]
fn bad_network_input_and_rollback() {
    let dir = scratch_dir("network-bad");
    // Interface names are checked with the rest of the configuration.
    for (tap, needle) in [
        ("a-tap-name-longer-than-ifnamsiz", "net.tap = "),
        ("bad/name", "net.tap = "),
    ] {
        let file = dir.join("bad.toml");
        std::fs::write(
            &file,
            format!("version = 1\nname = \"x\"\n[boot]\nkernel = \"/nonexistent\"\n[[net]]\ntap = \"{tap}\"\n"),
        )
        .unwrap();
        let out = Command::new(mvm_vmm()).arg("run").arg(&file).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{tap}: {}", describe(&out));
        assert!(stderr(&out).contains(needle), "{tap}: {}", describe(&out));
    }

    let host = NetNs::new(format!("mvm-rb-{}", std::process::id()));
    let h = host.0.clone();
    let mvm = Mvm::in_netns(dir.join("state"), &h);
    // Run unprivileged: the root keeper must undo what it prepared when the
    // VMM fails (the ready pipe tells it the VM was never built).
    mvm.ok(&[
        "create",
        "r",
        "--no-image",
        "--memory",
        "128",
        "--forward",
        "18099:80",
        "--vmm-user",
        "microvm-dev",
    ]);
    let nothing_left = |why: &str| {
        let links = stdout(&in_ns(&h, &["ip", "-o", "link"]));
        assert!(
            !links.contains("virbr-mvm") && !links.contains(": mvm"),
            "{why}: {links}"
        );
        let rules = stdout(&in_ns(&h, &["nft", "list", "ruleset"]));
        assert!(!rules.contains("mvm-default"), "{why}: {rules}");
        let status = &mvm.json(&["network", "status", "--json"])[0];
        assert!(status["dnsmasq_pid"].is_null(), "{why}: {status}");
        assert_eq!(
            status["pins"].as_array().map(Vec::len).unwrap_or(0),
            0,
            "{why}: {status}"
        );
    };
    let failing = |tool: &str, message: &str| {
        let bin = dir.join(format!("fake-{tool}"));
        std::fs::create_dir_all(&bin).unwrap();
        let path = bin.join(tool);
        std::fs::write(&path, format!("#!/bin/sh\necho '{message}' >&2\nexit 1\n")).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default())
    };
    for (tool, message) in [
        ("dnsmasq", "dnsmasq: failed to create listening socket: Address in use"),
        ("nft", "Error: Could not process rule: Operation not supported"),
    ] {
        let out = mvm
            .command(&["start", "r", "--timeout", "120"])
            .env("PATH", failing(tool, message))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{tool}: {}", describe(&out));
        assert!(stderr(&out).contains(message), "{tool}: {}", describe(&out));
        eprintln!("{tool} failing: {}", stderr(&out));
        nothing_left(tool);
    }
    // A host port in use: the forward fails after the network came up.
    let _holder = hold_port(&h, 18099);
    let out = mvm.run(&["start", "r", "--timeout", "120"]);
    assert!(
        stderr(&out).contains("already in use on the host"),
        "{}",
        describe(&out)
    );
    nothing_left("port in use");
    // A TAP name held by another kind of interface.
    host.ip(&["link", "add", "mvmbusy0", "type", "veth", "peer", "name", "mvmbusy1"]);
    let base = dir.join("base.toml");
    std::fs::write(
        &base,
        "version = 1\n[[net]]\nnetwork = \"default\"\ntap = \"mvmbusy0\"\n",
    )
    .unwrap();
    mvm.ok(&[
        "create",
        "t",
        "--no-image",
        "--no-network",
        "--memory",
        "128",
        "--vmm-user",
        "microvm-dev",
        "--from",
        base.to_str().unwrap(),
    ]);
    let out = mvm.run(&["start", "t", "--timeout", "120"]);
    assert!(stderr(&out).contains("mvmbusy0"), "{}", describe(&out));
    host.ip(&["link", "del", "mvmbusy0"]);
    nothing_left("TAP");
    // Forward collisions between VMs and bad specs are refused up front.
    mvm.ok(&["create", "s", "--no-image", "--memory", "128"]);
    for (args, needle, code) in [
        (&["port", "s", "18099:80"][..], "already forwarded to VM \"r\"", 1),
        (&["port", "s", "0:80"][..], "not a number from 1 to 65535", 2),
        (&["port", "s", "80"][..], "is not a forward", 2),
        (&["port", "s", "8080:80/sctp"][..], "not tcp or udp", 2),
        (
            &["create", "u", "--forward", "70000:1"][..],
            "not a number from 1 to 65535",
            2,
        ),
        (&["network", "up", "--name", "lab"][..], "give its --subnet", 2),
        (
            &["network", "up", "--name", "lab", "--subnet", "10.9.0.1/24"][..],
            "did you mean 10.9.0.0/24",
            2,
        ),
    ] {
        let out = mvm.run(args);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", describe(&out));
        assert!(stderr(&out).contains(needle), "{args:?}: {}", describe(&out));
    }
}
