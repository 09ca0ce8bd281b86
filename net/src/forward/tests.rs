//! The "guest" is 127.0.0.1: echo servers on ephemeral ports stand in for
//! its services, and forwards come from other 127.0.0.1 ports.

use super::*;

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A TCP echo server: echoes until EOF, then half-closes, as `cat` would.
fn tcp_echo() -> u16 {
    let listener = TcpListener::bind((LOCAL, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            std::thread::spawn(move || {
                let (mut r, mut w) = (&stream, &stream);
                let _ = io::copy(&mut r, &mut w);
                let _ = stream.shutdown(Shutdown::Write);
            });
        }
    });
    port
}

/// A UDP server that answers each datagram with the datagram and the
/// address it came from.
fn udp_echo() -> u16 {
    let socket = UdpSocket::bind((LOCAL, 0)).unwrap();
    let port = socket.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            let mut reply = buf[..n].to_vec();
            reply.extend_from_slice(format!(" from {from}").as_bytes());
            let _ = socket.send_to(&reply, from);
        }
    });
    port
}

fn spec(protocol: Protocol, host_port: u16, guest_port: u16) -> ForwardSpec {
    ForwardSpec {
        protocol,
        host: SocketAddr::new(LOCAL, host_port),
        guest_port,
    }
}

/// Add a forward from a free host port, retrying should another test take
/// the port between our probe and the bind.
fn add_free(fwd: &mut Forwarder, protocol: Protocol, guest_port: u16) -> ForwardSpec {
    for _ in 0..20 {
        let port = match protocol {
            Protocol::Tcp => TcpListener::bind((LOCAL, 0)).unwrap().local_addr().unwrap().port(),
            Protocol::Udp => UdpSocket::bind((LOCAL, 0)).unwrap().local_addr().unwrap().port(),
        };
        let spec = spec(protocol, port, guest_port);
        match fwd.add(spec.clone()) {
            Ok(()) => return spec,
            Err(Error::PortInUse { .. }) => continue,
            Err(e) => panic!("{e}"),
        }
    }
    panic!("no free port");
}

fn connect_client(spec: &ForwardSpec) -> TcpStream {
    let s = TcpStream::connect(spec.host).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Send `data`, half-close, and read everything the other end returns.
fn round_trip(spec: &ForwardSpec, data: &[u8]) -> Vec<u8> {
    let s = connect_client(spec);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            (&s).write_all(data).unwrap();
            s.shutdown(Shutdown::Write).unwrap();
        });
        let mut got = Vec::new();
        (&s).read_to_end(&mut got).unwrap();
        got
    })
}

/// True when the connection ends (EOF or an error) within a second.
fn closes_soon(s: &TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    match (&*s).read(&mut [0u8; 16]) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut),
    }
}

fn refused(spec: &ForwardSpec) -> bool {
    TcpStream::connect(spec.host).is_err_and(|e| e.kind() == io::ErrorKind::ConnectionRefused)
}

#[test]
fn protocol_parses_and_prints() {
    assert_eq!("tcp".parse::<Protocol>().unwrap(), Protocol::Tcp);
    assert_eq!("UDP".parse::<Protocol>().unwrap(), Protocol::Udp);
    assert!(matches!("sctp".parse::<Protocol>(), Err(Error::Protocol(_))));
    assert_eq!(Protocol::Udp.to_string(), "udp");
    assert_eq!(
        spec(Protocol::Tcp, 8080, 80).to_string(),
        "127.0.0.1:8080/tcp -> guest port 80"
    );
}

#[test]
fn tcp_echo_with_half_close() {
    let mut fwd = Forwarder::new(LOCAL);
    let spec = add_free(&mut fwd, Protocol::Tcp, tcp_echo());
    assert_eq!(round_trip(&spec, b"hello guest"), b"hello guest");
    // Several at once, and the listener survives each.
    std::thread::scope(|scope| {
        for i in 0..8 {
            let spec = &spec;
            scope.spawn(move || {
                let msg = format!("client {i}");
                assert_eq!(round_trip(spec, msg.as_bytes()), msg.as_bytes());
            });
        }
    });
    assert_eq!(fwd.specs(), vec![spec]);
}

#[test]
fn tcp_4_mib_intact() {
    let mut fwd = Forwarder::new(LOCAL);
    let spec = add_free(&mut fwd, Protocol::Tcp, tcp_echo());
    let data: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let got = round_trip(&spec, &data);
    assert_eq!(got.len(), data.len());
    assert!(got == data, "the data changed on the way");
}

#[test]
fn guest_refusing_closes_the_client() {
    let closed = TcpListener::bind((LOCAL, 0)).unwrap().local_addr().unwrap().port();
    let mut fwd = Forwarder::new(LOCAL);
    let spec = add_free(&mut fwd, Protocol::Tcp, closed);
    let s = connect_client(&spec);
    assert!(closes_soon(&s));
    // The listener goes on.
    let s = connect_client(&spec);
    assert!(closes_soon(&s));
}

#[test]
fn port_in_use_is_an_exact_error() {
    let taken = TcpListener::bind((LOCAL, 0)).unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut fwd = Forwarder::new(LOCAL);
    let err = fwd.add(spec(Protocol::Tcp, port, 80)).unwrap_err();
    assert!(matches!(err, Error::PortInUse { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with(&format!("host port 127.0.0.1:{port}/tcp is already in use on the host")),
        "{err}"
    );

    let taken = UdpSocket::bind((LOCAL, 0)).unwrap();
    let port = taken.local_addr().unwrap().port();
    let err = fwd.add(spec(Protocol::Udp, port, 53)).unwrap_err();
    assert!(matches!(err, Error::PortInUse { .. }), "{err:?}");
    assert!(fwd.specs().is_empty());
}

#[test]
fn low_port_without_privilege_is_denied() {
    // Meaningful only where this process may not bind low ports.
    if TcpListener::bind((LOCAL, 1)).is_err_and(|e| e.kind() == io::ErrorKind::PermissionDenied) {
        let err = Forwarder::new(LOCAL).add(spec(Protocol::Tcp, 1, 80)).unwrap_err();
        assert!(matches!(err, Error::PortDenied { .. }), "{err:?}");
        assert!(err.to_string().contains("CAP_NET_BIND_SERVICE"), "{err}");
    }
}

#[test]
fn bad_specs_are_refused() {
    let mut fwd = Forwarder::new(LOCAL);
    let err = fwd.add(spec(Protocol::Tcp, 0, 80)).unwrap_err();
    assert!(matches!(err, Error::Forward { .. }), "{err:?}");
    let err = fwd
        .add(ForwardSpec {
            protocol: Protocol::Tcp,
            host: "192.0.2.1:8080".parse().unwrap(),
            guest_port: 80,
        })
        .unwrap_err();
    assert!(matches!(err, Error::HostAddress { .. }), "{err:?}");
}

#[test]
fn add_again_is_a_no_op_and_a_new_guest_port_replaces() {
    let mut fwd = Forwarder::new(LOCAL);
    let spec = add_free(&mut fwd, Protocol::Tcp, tcp_echo());
    let open = connect_client(&spec);
    fwd.add(spec.clone()).unwrap();
    (&open).write_all(b"still here").unwrap();
    let mut buf = [0u8; 10];
    (&open).read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"still here");

    let other = ForwardSpec {
        guest_port: tcp_echo(),
        ..spec.clone()
    };
    fwd.add(other.clone()).unwrap();
    assert_eq!(fwd.specs(), vec![other.clone()]);
    assert!(closes_soon(&open));
    assert_eq!(round_trip(&other, b"new"), b"new");
}

#[test]
fn remove_closes_the_listener_and_open_connections() {
    let mut fwd = Forwarder::new(LOCAL);
    let echo = tcp_echo();
    let spec = add_free(&mut fwd, Protocol::Tcp, echo);
    let kept = add_free(&mut fwd, Protocol::Tcp, echo);
    let open = connect_client(&spec);
    let other = connect_client(&kept);
    (&open).write_all(b"x").unwrap();
    (&open).read_exact(&mut [0u8; 1]).unwrap();

    let start = Instant::now();
    assert!(fwd.remove(Protocol::Tcp, spec.host));
    assert!(start.elapsed() < Duration::from_millis(500), "{:?}", start.elapsed());
    assert!(!fwd.remove(Protocol::Tcp, spec.host));
    assert!(closes_soon(&open));
    assert!(refused(&spec));
    // The other forward and its connection are untouched.
    (&other).write_all(b"y").unwrap();
    (&other).read_exact(&mut [0u8; 1]).unwrap();
    assert_eq!(fwd.specs(), vec![kept]);
}

#[test]
fn drop_interrupts_a_connection_waiting_for_the_guest() {
    // A listener with a full accept queue drops SYNs: connects to it hang.
    let slow = TcpListener::bind((LOCAL, 0)).unwrap();
    // SAFETY: changes the backlog of a listening socket we own.
    assert_eq!(unsafe { libc::listen(slow.as_raw_fd(), 0) }, 0);
    let slow_addr = slow.local_addr().unwrap();
    let fillers: Vec<TcpStream> = (0..3)
        .filter_map(|_| TcpStream::connect_timeout(&slow_addr, Duration::from_millis(200)).ok())
        .collect();
    assert!(
        TcpStream::connect_timeout(&slow_addr, Duration::from_millis(200)).is_err(),
        "the queue is full"
    );
    let mut fwd = Forwarder::new(LOCAL);
    let spec = add_free(&mut fwd, Protocol::Tcp, slow_addr.port());
    let client = connect_client(&spec);
    client.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let pending = (&client).read(&mut [0u8; 1]).unwrap_err();
    assert!(matches!(pending.kind(), io::ErrorKind::WouldBlock), "{pending}");
    let start = Instant::now();
    drop(fwd);
    assert!(start.elapsed() < Duration::from_secs(1), "{:?}", start.elapsed());
    assert!(closes_soon(&client));
    drop(fillers);
}

#[test]
fn set_reconciles() {
    let mut fwd = Forwarder::new(LOCAL);
    let echo = tcp_echo();
    let a = add_free(&mut fwd, Protocol::Tcp, echo);
    let b = add_free(&mut fwd, Protocol::Tcp, echo);
    let c = add_free(&mut fwd, Protocol::Tcp, echo);
    fwd.remove(Protocol::Tcp, c.host);
    let on_b = connect_client(&b);

    let failures = fwd.set(&[b.clone(), c.clone(), b.clone()]);
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(fwd.specs(), vec![b.clone(), c.clone()]);
    assert!(refused(&a));
    assert_eq!(round_trip(&c, b"c"), b"c");
    // Kept forwards keep their connections.
    (&on_b).write_all(b"b").unwrap();
    (&on_b).read_exact(&mut [0u8; 1]).unwrap();

    let taken = TcpListener::bind((LOCAL, 0)).unwrap();
    let busy = spec(Protocol::Tcp, taken.local_addr().unwrap().port(), echo);
    let twice = ForwardSpec {
        guest_port: 1,
        ..c.clone()
    };
    let failures = fwd.set(&[c.clone(), twice.clone(), busy.clone()]);
    assert_eq!(failures.len(), 2, "{failures:?}");
    assert!(matches!(&failures[0], (s, Error::ForwardTwice { .. }) if *s == twice));
    assert!(matches!(&failures[1], (s, Error::PortInUse { .. }) if *s == busy));
    assert_eq!(fwd.specs(), vec![c.clone()]);
    assert!(closes_soon(&on_b));

    assert!(fwd.set(&[]).is_empty());
    assert!(fwd.specs().is_empty());
    assert!(refused(&c));
}

fn udp_client() -> UdpSocket {
    let s = UdpSocket::bind((LOCAL, 0)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Send `msg` to the forward; return the reply, checking it came from the
/// forward's address.
fn udp_ask(client: &UdpSocket, spec: &ForwardSpec, msg: &str) -> String {
    client.send_to(msg.as_bytes(), spec.host).unwrap();
    let mut buf = [0u8; 2048];
    let (n, from) = client.recv_from(&mut buf).unwrap();
    assert_eq!(from, spec.host);
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

#[test]
fn udp_round_trips_from_two_clients() {
    let mut fwd = Forwarder::new(LOCAL);
    let spec = add_free(&mut fwd, Protocol::Udp, udp_echo());
    let (one, two) = (udp_client(), udp_client());
    let a = udp_ask(&one, &spec, "one");
    let b = udp_ask(&two, &spec, "two");
    assert!(a.starts_with("one from 127.0.0.1:"), "{a}");
    assert!(b.starts_with("two from 127.0.0.1:"), "{b}");
    assert_ne!(a[3..], b[3..], "each client has its own flow");
    // A flow stays while in use.
    assert_eq!(udp_ask(&one, &spec, "one"), a);
}

#[test]
fn udp_flows_expire_and_stop_with_the_forward() {
    let mut fwd = Forwarder::new(LOCAL);
    fwd.udp_idle = Duration::from_millis(200);
    let spec = add_free(&mut fwd, Protocol::Udp, udp_echo());
    let client = udp_client();
    let first = udp_ask(&client, &spec, "x");
    std::thread::sleep(Duration::from_millis(400));
    let second = udp_ask(&client, &spec, "x");
    assert_ne!(first, second, "an idle flow expired, a new one has a new port");

    assert!(fwd.remove(Protocol::Udp, spec.host));
    // The port is free again: the socket is closed.
    UdpSocket::bind(spec.host).unwrap();
}

#[test]
fn ipv6_host_address() {
    let Ok(probe) = TcpListener::bind("[::1]:0") else {
        return; // no IPv6 loopback here
    };
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    let mut fwd = Forwarder::new(LOCAL);
    let spec = ForwardSpec {
        protocol: Protocol::Tcp,
        host: SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port),
        guest_port: tcp_echo(),
    };
    fwd.add(spec.clone()).unwrap();
    assert_eq!(round_trip(&spec, b"six"), b"six");
}

#[test]
fn drop_stops_everything() {
    let mut fwd = Forwarder::new(LOCAL);
    let tcp = add_free(&mut fwd, Protocol::Tcp, tcp_echo());
    let udp = add_free(&mut fwd, Protocol::Udp, udp_echo());
    let open = connect_client(&tcp);
    (&open).write_all(b"x").unwrap();
    (&open).read_exact(&mut [0u8; 1]).unwrap();
    udp_ask(&udp_client(), &udp, "x");

    let start = Instant::now();
    drop(fwd);
    assert!(start.elapsed() < Duration::from_millis(500), "{:?}", start.elapsed());
    assert!(closes_soon(&open));
    assert!(refused(&tcp));
    UdpSocket::bind(udp.host).unwrap();
}

/// A byte sent on `s` comes back (the connection is relayed to the echo
/// server); false when the forward closed it instead.
fn echoes(s: &TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    if (&*s).write_all(b"x").is_err() {
        return false;
    }
    let mut b = [0u8; 1];
    matches!((&*s).read(&mut b), Ok(1) if b == *b"x")
}

/// A new client is closed by the forward at once: a byte it sends is not
/// echoed, and the connection ends within a second.
fn turned_away(spec: &ForwardSpec) -> bool {
    let s = connect_client(spec);
    let _ = (&s).write_all(b"x");
    closes_soon(&s)
}

#[test]
fn tcp_connections_per_forward_are_capped() {
    // Each connection holds four descriptors in this process: client,
    // accepted, towards the guest, and the echo server's end.
    let want = 4 * (MAX_TCP_CONNS as u64 + 16) + 256;
    if !mvm_devices::fd_limit_at_least(want) {
        eprintln!("skipped: the descriptor limit is below {want}");
        return;
    }
    let mut fwd = Forwarder::new(LOCAL);
    let spec = add_free(&mut fwd, Protocol::Tcp, tcp_echo());
    // Fill the forward: each connection is relayed (echoed) before the
    // next opens, so the forward counts it.
    let mut open: Vec<TcpStream> = (0..MAX_TCP_CONNS)
        .map(|i| {
            let s = connect_client(&spec);
            assert!(echoes(&s), "connection {i} of {MAX_TCP_CONNS} is relayed");
            s
        })
        .collect();
    // Beyond the cap: closed at once, however many try.
    for i in 0..3 {
        let start = Instant::now();
        assert!(turned_away(&spec), "connection {} is closed", MAX_TCP_CONNS + 1 + i);
        assert!(start.elapsed() < Duration::from_secs(1), "{:?}", start.elapsed());
    }
    // The open ones are untouched.
    for s in [&open[0], &open[MAX_TCP_CONNS / 2], &open[MAX_TCP_CONNS - 1]] {
        assert!(echoes(s), "an open connection still relays");
    }
    // Two close: two new clients get in (once their threads have ended),
    // and the one after them does not.
    open.drain(..2);
    for _ in 0..2 {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let s = connect_client(&spec);
            if echoes(&s) {
                open.push(s);
                break;
            }
            assert!(Instant::now() < deadline, "no room after connections closed");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert_eq!(open.len(), MAX_TCP_CONNS);
    assert!(turned_away(&spec), "full again");
    assert!(echoes(&open[0]));
}

#[test]
fn udp_flows_per_forward_are_capped() {
    // Each flow holds two descriptors in this process: its client's and
    // the forward's socket towards the guest.
    let want = 2 * (MAX_UDP_FLOWS as u64 + 16) + 256;
    if !mvm_devices::fd_limit_at_least(want) {
        eprintln!("skipped: the descriptor limit is below {want}");
        return;
    }
    let idle = Duration::from_secs(2);
    let mut fwd = Forwarder::new(LOCAL);
    fwd.udp_idle = idle;
    let spec = add_free(&mut fwd, Protocol::Udp, udp_echo());
    let first_flow = Instant::now();
    let clients: Vec<UdpSocket> = (0..MAX_UDP_FLOWS)
        .map(|i| {
            let c = udp_client();
            let reply = udp_ask(&c, &spec, &format!("c{i}"));
            assert!(reply.starts_with(&format!("c{i} from ")), "{reply}");
            c
        })
        .collect();
    // One client more: its datagrams are dropped...
    let late = udp_client();
    late.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    for _ in 0..3 {
        late.send_to(b"late", spec.host).unwrap();
    }
    // ...while the existing flows still relay (their requests queue behind
    // the late ones, so those were handled by the time these are answered).
    assert!(udp_ask(&clients[0], &spec, "first").starts_with("first from "));
    assert!(udp_ask(&clients[MAX_UDP_FLOWS - 1], &spec, "last").starts_with("last from "));
    let dropped = late.recv_from(&mut [0u8; 64]).unwrap_err();
    assert!(
        matches!(dropped.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut),
        "{dropped}"
    );
    assert!(
        first_flow.elapsed() < idle,
        "too slow: flows expired before the cap was checked ({:?})",
        first_flow.elapsed()
    );
    // Once the flows expire, the late client gets one.
    std::thread::sleep(idle + Duration::from_millis(200));
    late.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(udp_ask(&late, &spec, "late").starts_with("late from "));
}
