//! virtio-vsock end to end, one guest boot: a host program connects to a
//! guest echo server through the VMM's socket (`CONNECT 5000`), then a
//! guest program connects to a host echo server on `<uds_path>_6000`.
//! 256 KiB go each way and must come back unchanged.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use mvm_tests::*;

const KIB: usize = 256;

/// Bytes that differ at every offset (a lost or repeated chunk shows).
fn payload(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Send `data` on `stream` from another thread while reading the echo here.
fn echo_round_trip(stream: UnixStream, data: Vec<u8>) -> Vec<u8> {
    let mut writer = stream.try_clone().expect("clone stream");
    let sender = std::thread::spawn(move || {
        writer.write_all(&data).expect("send to the guest");
        writer.shutdown(std::net::Shutdown::Write).expect("half-close");
    });
    let mut back = Vec::new();
    let mut reader = stream;
    reader.read_to_end(&mut back).expect("read the echo");
    sender.join().expect("sender thread");
    back
}

#[test]
fn vsock_echo_host_to_guest_and_guest_to_host() {
    let dir = scratch_dir("vsock");
    let uds = dir.join("v.sock");
    // The host echo server the guest connects to (host port 6000).
    let listener = UnixListener::bind(format!("{}_6000", uds.display())).expect("bind <uds>_6000");
    let host_echo = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("guest connection");
        let mut buf = vec![0u8; 64 << 10];
        let mut total = 0usize;
        loop {
            let n = stream.read(&mut buf).expect("read from the guest");
            if n == 0 {
                break;
            }
            stream.write_all(&buf[..n]).expect("echo to the guest");
            total += n;
        }
        stream.shutdown(std::net::Shutdown::Write).expect("half-close");
        total
    });

    let config = write_config(
        &dir,
        &(guest_config(1, 128, &format!("mvm.scenario=vsock mvm.kib={KIB}"))
            + "[vsock]\nuds_path = \"v.sock\"\nguest_cid = 3\n"),
    );
    let mut vm = RunningVm::start(&config);
    let listening = vm.wait_for("MVM-RESULT vsock_listening=5000", Duration::from_secs(300));

    let mut host_to_guest = None;
    if listening.is_some() {
        // No guest program on port 5999: the host sees the stream close
        // without an OK line.
        let mut refused = UnixStream::connect(&uds).expect("connect to the VMM's vsock socket");
        refused.write_all(b"CONNECT 5999\n").unwrap();
        refused.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut nothing = Vec::new();
        let refused_bytes = refused.read_to_end(&mut nothing).map(|_| nothing.len()).ok();

        let mut stream = UnixStream::connect(&uds).expect("connect to the VMM's vsock socket");
        stream.write_all(b"CONNECT 5000\n").unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let mut ok = String::new();
        BufReader::new(&stream).read_line(&mut ok).expect("OK line");
        stream.set_read_timeout(None).unwrap();
        let data = payload(KIB << 10);
        let back = echo_round_trip(stream, data.clone());
        host_to_guest = Some((refused_bytes, ok, back == data, back.len()));
    }

    let run = vm.finish(Duration::from_secs(420));
    let console = run.console();
    let r = run.results();
    assert!(
        listening.is_some(),
        "the guest never listened: {}\n{console}",
        run.stderr
    );
    let (refused_bytes, ok, same, len) = host_to_guest.unwrap();
    assert_eq!(
        refused_bytes,
        Some(0),
        "a refused CONNECT closes the stream without a reply"
    );
    let port: u32 = ok
        .trim_end()
        .strip_prefix("OK ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("expected `OK <port>`, got {ok:?}"));
    assert!(port >= 1 << 30, "host-side port {port}");
    assert!(same, "host to guest echo came back different ({len} bytes)\n{console}");

    assert_eq!(run.status.code(), Some(0), "stderr: {}\n{console}", run.stderr);
    assert_eq!(r.get("status").map(String::as_str), Some("ok"), "{console}");
    assert_eq!(r["echo_server"], "ok");
    assert_eq!(host_echo.join().expect("host echo"), KIB << 10, "bytes the host echoed");
    assert_eq!(r["vsock_received_bytes"], (KIB << 10).to_string());
    assert_eq!(r["vsock_received_md5"], r["vsock_sent_md5"], "guest to host echo");
    assert!(!uds.exists(), "the VMM removes its socket when the VM stops");
    println!(
        "vsock: {KIB} KiB guest to host and back in {} cs (guest clock)",
        r["vsock_echo_cs"]
    );
}
