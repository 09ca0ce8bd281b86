//! The device against mock guest memory and real host sockets.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::*;

// Descriptor flags (virtio 1.x, 2.7.5).
const N: u16 = 1;
const W: u16 = 2;
const CID: u64 = 3;
const QSIZE: u16 = 256;

fn d(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mvm-vsock-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A device with its three queues in mock guest memory, buffers handed
/// out the way Linux 6.1 does (header and payload in separate descriptors).
struct Guest {
    mem: &'static GuestMemoryMmap,
    rxq: MockSplitQueue<'static, GuestMemoryMmap>,
    txq: MockSplitQueue<'static, GuestMemoryMmap>,
    queues: Vec<Queue>,
    dev: Vsock,
    dir: PathBuf,
    rx_next: u16,
    tx_next: u16,
    rx_seen: u16,
    /// Receive chain head → (header address, payload address).
    rx_bufs: HashMap<u16, (u64, u64)>,
    next_addr: u64,
}

impl Guest {
    fn new(name: &str) -> Guest {
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap(),
        ));
        let rxq = MockSplitQueue::create(mem, GuestAddress(0x1_0000), QSIZE);
        let txq = MockSplitQueue::create(mem, GuestAddress(0x2_0000), QSIZE);
        let evq = MockSplitQueue::create(mem, GuestAddress(0x3_0000), QSIZE);
        let queues = vec![
            rxq.create_queue().unwrap(),
            txq.create_queue().unwrap(),
            evq.create_queue().unwrap(),
        ];
        let dir = scratch(name);
        let mut dev = Vsock::new(CID, &dir.join("v.sock")).unwrap();
        dev.connect_timeout = Duration::from_millis(50);
        Guest {
            mem,
            rxq,
            txq,
            queues,
            dev,
            dir,
            rx_next: 0,
            tx_next: 0,
            rx_seen: 0,
            rx_bufs: HashMap::new(),
            next_addr: 0x10_0000,
        }
    }

    fn alloc(&mut self, len: usize) -> u64 {
        let addr = self.next_addr;
        self.next_addr += (len as u64 + 0xfff) & !0xfff;
        assert!(self.next_addr < 0x100_0000, "test ran out of guest memory");
        addr
    }

    fn sock(&self) -> PathBuf {
        self.dir.join("v.sock")
    }

    /// Hand the device `count` receive buffers of `payload` bytes each.
    fn give_rx(&mut self, count: usize, payload: u32) {
        for _ in 0..count {
            let (h, p) = (self.alloc(HDR_LEN), self.alloc(payload as usize));
            let head = self.rx_next;
            self.rxq
                .add_desc_chains(&[d(h, HDR_LEN as u32, W | N, head + 1), d(p, payload, W, 0)], head)
                .unwrap();
            self.rx_bufs.insert(head, (h, p));
            self.rx_next += 2;
        }
    }

    /// Queue a packet on the transmit queue (header and payload in
    /// separate descriptors) without running the device.
    fn put_tx(&mut self, hdr: Header, payload: &[u8]) {
        let h = self.alloc(HDR_LEN);
        self.mem.write_slice(&hdr.to_bytes(), GuestAddress(h)).unwrap();
        let head = self.tx_next;
        if payload.is_empty() {
            self.txq.add_desc_chains(&[d(h, HDR_LEN as u32, 0, 0)], head).unwrap();
            self.tx_next += 1;
        } else {
            let p = self.alloc(payload.len());
            self.mem.write_slice(payload, GuestAddress(p)).unwrap();
            self.txq
                .add_desc_chains(
                    &[d(h, HDR_LEN as u32, N, head + 1), d(p, payload.len() as u32, 0, 0)],
                    head,
                )
                .unwrap();
            self.tx_next += 2;
        }
    }

    fn send(&mut self, hdr: Header, payload: &[u8]) -> std::result::Result<bool, DeviceError> {
        self.put_tx(hdr, payload);
        self.run()
    }

    fn run(&mut self) -> std::result::Result<bool, DeviceError> {
        self.dev.queue_notified(TX, &mut self.queues, self.mem)
    }

    /// Packets the device placed in receive buffers since the last call.
    fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        let used = self.rxq.used().idx().load();
        while self.rx_seen != used {
            let elem = self.rxq.used().ring().ref_at(self.rx_seen as usize).unwrap().load();
            let (h, p) = self.rx_bufs[&(elem.id() as u16)];
            let mut raw = [0u8; HDR_LEN];
            self.mem.read_slice(&mut raw, GuestAddress(h)).unwrap();
            let hdr = Header::from_bytes(&raw);
            let mut payload = vec![0u8; elem.len() as usize - HDR_LEN];
            self.mem.read_slice(&mut payload, GuestAddress(p)).unwrap();
            assert_eq!(hdr.len as usize, payload.len(), "used length matches the header");
            out.push((hdr, payload));
            self.rx_seen += 1;
        }
        out
    }

    fn tx_used(&self) -> u16 {
        self.txq.used().idx().load()
    }
}

/// A packet from the guest (CID 3) to the host.
fn pkt(op: u16, guest_port: u32, host_port: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port: guest_port,
        dst_port: host_port,
        kind: TYPE_STREAM,
        op,
        buf_alloc: CONN_BUF,
        ..Header::default()
    }
}

fn rw(guest_port: u32, host_port: u32, len: usize) -> Header {
    Header {
        len: len as u32,
        ..pkt(op::RW, guest_port, host_port)
    }
}

fn ops(packets: &[(Header, Vec<u8>)]) -> Vec<u16> {
    packets.iter().map(|(h, _)| h.op).collect()
}

fn read_line(stream: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    String::from_utf8(line).unwrap()
}

/// Host program connects through `CONNECT`; returns its stream and the
/// host port the device allocated.
fn host_connect(g: &mut Guest, guest_port: u32) -> (UnixStream, u32) {
    let mut host = UnixStream::connect(g.sock()).unwrap();
    host.write_all(format!("CONNECT {guest_port}\n").as_bytes()).unwrap();
    g.give_rx(1, 4096);
    g.run().unwrap();
    let got = g.received();
    assert_eq!(ops(&got), [op::REQUEST]);
    let req = got[0].0;
    assert_eq!(
        (req.src_cid, req.dst_cid, req.dst_port, req.kind),
        (HOST_CID, CID, guest_port, TYPE_STREAM)
    );
    assert!(req.src_port >= FIRST_LOCAL_PORT);
    g.send(pkt(op::RESPONSE, guest_port, req.src_port), &[]).unwrap();
    assert_eq!(read_line(&mut host), format!("OK {}", req.src_port));
    (host, req.src_port)
}

#[test]
fn config_space_is_the_guest_cid() {
    let g = Guest::new("config");
    let mut cid = [0u8; 8];
    g.dev.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), CID);
    let mut past = [0xffu8; 4];
    g.dev.read_config(6, &mut past);
    assert_eq!(past, [0xff; 4], "reads past the end leave data untouched");
    assert_eq!(g.dev.device_type(), 19);
    assert_eq!(g.dev.queue_max_sizes().len(), 3);
}

#[test]
fn host_initiated_connection_carries_data_both_ways_and_closes() {
    let mut g = Guest::new("host-init");
    let (mut host, port) = host_connect(&mut g, 52);
    host.write_all(b"hello guest").unwrap();
    g.give_rx(2, 4096);
    g.run().unwrap();
    let got = g.received();
    assert_eq!(ops(&got), [op::RW]);
    assert_eq!(got[0].1, b"hello guest");
    assert_eq!((got[0].0.src_port, got[0].0.dst_port), (port, 52));
    assert_eq!(got[0].0.buf_alloc, CONN_BUF);

    g.send(rw(52, port, 11), b"hello host!").unwrap();
    let mut buf = [0u8; 11];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello host!");

    // The guest closes: the host sees end of file, the guest a reset.
    let close = Header {
        flags: SHUTDOWN_RCV | SHUTDOWN_SEND,
        ..pkt(op::SHUTDOWN, 52, port)
    };
    g.send(close, &[]).unwrap();
    assert_eq!(host.read(&mut buf).unwrap(), 0);
    assert_eq!(ops(&g.received()), [op::RST]);
    assert_eq!(g.dev.connections(), 0);
}

#[test]
fn data_sent_with_the_connect_line_is_not_lost() {
    let mut g = Guest::new("pipelined");
    let mut host = UnixStream::connect(g.sock()).unwrap();
    host.write_all(b"CONNECT 7\nearly bytes").unwrap();
    g.give_rx(3, 4096);
    g.run().unwrap();
    let req = g.received()[0].0;
    g.send(pkt(op::RESPONSE, 7, req.src_port), &[]).unwrap();
    let got = g.received();
    assert_eq!(ops(&got), [op::RW]);
    assert_eq!(got[0].1, b"early bytes");
    assert_eq!(read_line(&mut host), format!("OK {}", req.src_port));
}

#[test]
fn guest_refusal_or_silence_closes_the_host_stream() {
    let mut g = Guest::new("refused");
    let mut host = UnixStream::connect(g.sock()).unwrap();
    host.write_all(b"CONNECT 9\n").unwrap();
    g.give_rx(1, 4096);
    g.run().unwrap();
    let req = g.received()[0].0;
    g.send(pkt(op::RST, 9, req.src_port), &[]).unwrap();
    let mut rest = String::new();
    host.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "", "no OK line, just end of file");

    // No answer at all: closed after the connect timeout.
    let mut host = UnixStream::connect(g.sock()).unwrap();
    host.write_all(b"CONNECT 10\n").unwrap();
    g.give_rx(1, 4096);
    g.run().unwrap();
    assert_eq!(ops(&g.received()), [op::REQUEST]);
    std::thread::sleep(Duration::from_millis(80));
    g.run().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(host.read_to_string(&mut rest).unwrap(), 0);
    assert_eq!(g.dev.connections(), 0);
}

#[test]
fn bad_connect_lines_close_the_client() {
    let mut g = Guest::new("bad-line");
    for line in [&b"HELLO\n"[..], b"CONNECT x\n", &[b'7'; 40]] {
        let mut host = UnixStream::connect(g.sock()).unwrap();
        host.write_all(line).unwrap();
        g.run().unwrap();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // Closed with our unread bytes in it: end of file or a reset.
        let mut rest = Vec::new();
        match host.read_to_end(&mut rest) {
            Ok(n) => assert_eq!(n, 0, "{line:?}"),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{line:?}"),
        }
    }
    assert_eq!(g.dev.connections(), 0);
    assert!(g.received().is_empty());
}

#[test]
fn guest_initiated_connection_reaches_the_port_socket() {
    let mut g = Guest::new("guest-init");
    let listener = UnixListener::bind(format!("{}_6000", g.sock().display())).unwrap();
    g.give_rx(4, 4096);
    g.send(pkt(op::REQUEST, 1234, 6000), &[]).unwrap();
    let got = g.received();
    assert_eq!(ops(&got), [op::RESPONSE]);
    assert_eq!((got[0].0.src_port, got[0].0.dst_port), (6000, 1234));
    let (mut host, _) = listener.accept().unwrap();

    g.send(rw(1234, 6000, 4), b"ping").unwrap();
    let mut buf = [0u8; 4];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    host.write_all(b"pong").unwrap();
    drop(host); // and end of file after it
    g.run().unwrap();
    let got = g.received();
    assert_eq!(ops(&got), [op::RW, op::SHUTDOWN]);
    assert_eq!(got[0].1, b"pong");
    assert_eq!(got[1].0.flags, SHUTDOWN_SEND);
}

#[test]
fn guest_connection_without_host_listener_is_reset() {
    let mut g = Guest::new("no-listener");
    g.give_rx(1, 4096);
    g.send(pkt(op::REQUEST, 1, 7777), &[]).unwrap();
    let got = g.received();
    assert_eq!(ops(&got), [op::RST]);
    assert_eq!((got[0].0.src_port, got[0].0.dst_port), (7777, 1));
}

#[test]
fn host_data_respects_the_guest_credit() {
    let mut g = Guest::new("credit");
    let (mut host, port) = host_connect(&mut g, 80);
    // The guest says it has room for 8 KiB only.
    let small = Header {
        buf_alloc: 8192,
        ..pkt(op::CREDIT_UPDATE, 80, port)
    };
    g.send(small, &[]).unwrap();
    host.write_all(&vec![7u8; 64 * 1024]).unwrap();
    g.give_rx(8, 4096);
    g.run().unwrap();
    let got = g.received();
    let data: usize = got.iter().map(|(_, p)| p.len()).sum();
    assert_eq!(data, 8192, "{:?}", ops(&got));
    assert_eq!(got.last().unwrap().0.op, op::CREDIT_REQUEST);
    // The guest consumed it all: the rest may come.
    let consumed = Header {
        buf_alloc: 8192,
        fwd_cnt: 8192,
        ..pkt(op::CREDIT_UPDATE, 80, port)
    };
    g.send(consumed, &[]).unwrap();
    let got = g.received();
    assert_eq!(got.iter().map(|(_, p)| p.len()).sum::<usize>(), 8192);
}

#[test]
fn guest_data_gets_credit_updates_and_overruns_are_reset() {
    let mut g = Guest::new("overrun");
    let (host, port) = host_connect(&mut g, 81);
    g.give_rx(64, 4096);
    // The host reads nothing: its socket fills, then our buffer; the
    // guest going past CONN_BUF breaks the credit rules.
    let chunk = vec![1u8; MAX_PAYLOAD];
    let mut reset = false;
    for _ in 0..40 {
        g.send(rw(81, port, chunk.len()), &chunk).unwrap();
        if ops(&g.received()).contains(&op::RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "a guest ignoring its credit is reset");
    assert_eq!(g.dev.connections(), 0);
    drop(host);

    // A well-behaved transfer: the host reads, and the guest hears about
    // the freed space without asking.
    let (mut host, port) = host_connect(&mut g, 82);
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        host.read_to_end(&mut all).unwrap();
        all.len()
    });
    let mut updates = 0;
    let mut sent = 0;
    for _ in 0..6 {
        g.send(rw(82, port, chunk.len()), &chunk).unwrap();
        sent += chunk.len();
        std::thread::sleep(Duration::from_millis(20));
        g.run().unwrap();
        updates += g
            .received()
            .iter()
            .filter(|(h, _)| h.op == op::CREDIT_UPDATE && h.fwd_cnt > 0)
            .count();
    }
    assert!(updates > 0, "credit updates while the host drains");
    let close = Header {
        flags: SHUTDOWN_RCV | SHUTDOWN_SEND,
        ..pkt(op::SHUTDOWN, 82, port)
    };
    g.send(close, &[]).unwrap();
    for _ in 0..100 {
        if g.dev.connections() == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
        g.run().unwrap();
    }
    assert_eq!(
        reader.join().unwrap(),
        sent,
        "every byte reached the host before the close"
    );
}

#[test]
fn unknown_connections_wrong_types_and_forged_sources() {
    let mut g = Guest::new("hostile-packets");
    g.give_rx(8, 4096);
    // Data for a connection that does not exist: reset.
    g.send(rw(5, 6, 3), b"abc").unwrap();
    assert_eq!(ops(&g.received()), [op::RST]);
    // A reset for one that does not exist: nothing (no reset storms).
    g.send(pkt(op::RST, 5, 6), &[]).unwrap();
    assert!(g.received().is_empty());
    // SEQPACKET was not offered: reset.
    let seq = Header {
        kind: 2,
        ..pkt(op::REQUEST, 5, 6)
    };
    g.send(seq, &[]).unwrap();
    assert_eq!(ops(&g.received()), [op::RST]);
    // Unknown operation on a live connection: reset.
    let (_host, port) = host_connect(&mut g, 90);
    g.send(pkt(99, 90, port), &[]).unwrap();
    assert_eq!(ops(&g.received()), [op::RST]);
    assert_eq!(g.dev.connections(), 0);
    // Forged source CID, or a destination other than the host: dropped.
    let forged = Header {
        src_cid: 42,
        ..pkt(op::REQUEST, 5, 6)
    };
    g.send(forged, &[]).unwrap();
    let elsewhere = Header {
        dst_cid: 7,
        ..pkt(op::REQUEST, 5, 6)
    };
    g.send(elsewhere, &[]).unwrap();
    assert!(g.received().is_empty());
    assert_eq!(g.tx_used(), 7, "every packet was consumed");
}

#[test]
fn malformed_chains_fail_the_device() {
    let cases: Vec<(&str, Vec<RawDescriptor>)> = vec![
        ("header cut short", vec![d(0x10_0000, 20, 0, 0)]),
        (
            "header split, second part missing",
            vec![d(0x10_0000, 20, N, 1), d(0x10_1000, 4, 0, 0)],
        ),
        ("write-only header", vec![d(0x10_0000, 44, W, 0)]),
        ("outside guest memory", vec![d(0xffff_0000, 44, 0, 0)]),
        ("next past the table", vec![d(0x10_0000, 44, N, 300)]),
        ("loop", vec![d(0x10_0000, 20, N, 1), d(0x10_1000, 24, N, 0)]),
    ];
    for (what, descs) in cases {
        let mut g = Guest::new("malformed");
        g.mem
            .write_slice(&rw(1, 2, 0).to_bytes(), GuestAddress(0x10_0000))
            .unwrap();
        g.txq.add_desc_chains(&descs, 0).unwrap();
        assert!(g.run().is_err(), "{what}");
    }

    // A header split across descriptors is fine...
    let mut g = Guest::new("split-header");
    let bytes = pkt(op::REQUEST, 1, 2).to_bytes();
    g.mem.write_slice(&bytes[..10], GuestAddress(0x10_0000)).unwrap();
    g.mem.write_slice(&bytes[10..], GuestAddress(0x10_1000)).unwrap();
    g.txq
        .add_desc_chains(&[d(0x10_0000, 10, N, 1), d(0x10_1000, 34, 0, 0)], 0)
        .unwrap();
    g.give_rx(1, 4096);
    assert!(g.run().is_ok());
    assert_eq!(ops(&g.received()), [op::RST], "no listener on host port 2");
    // ...a length beyond the chain is not.
    let mut g = Guest::new("long-len");
    g.put_tx(rw(1, 2, 100), b"only ten b");
    assert!(g.run().is_err());
    // Nor is a receive buffer that cannot hold a header.
    let mut g = Guest::new("tiny-rx");
    g.rxq.add_desc_chains(&[d(0x10_0000, 16, W, 0)], 0).unwrap();
    g.send(pkt(op::REQUEST, 1, 2), &[]).unwrap_err();
}

#[test]
fn replies_are_bounded_when_the_guest_gives_no_receive_buffers() {
    let mut g = Guest::new("backlog");
    for i in 0..MAX_BACKLOG as u32 {
        g.dev.backlog.push_back(((i, i), op::RST, 0));
    }
    g.send(pkt(op::REQUEST, 1, 2), &[]).unwrap();
    assert_eq!(g.tx_used(), 0, "transmit work waits while replies are backed up");
    g.give_rx(2, 64);
    g.run().unwrap();
    assert_eq!(g.tx_used(), 1, "and resumes once the guest took them");
}

#[test]
fn socket_file_lifecycle() {
    let dir = scratch("lifecycle");
    let path = dir.join("s.sock");
    // A stale socket (nobody listening) is replaced.
    drop(UnixListener::bind(&path).unwrap());
    let dev = Vsock::new(CID, &path).unwrap();
    // A live one is refused, naming the file.
    let err = Vsock::new(CID, &path).err().unwrap().to_string();
    assert!(err.contains("s.sock") && err.contains("listening"), "{err}");
    drop(dev);
    assert!(!path.exists(), "removed when the device goes");
    std::fs::write(&path, b"not a socket").unwrap();
    let err = Vsock::new(CID, &path).err().unwrap().to_string();
    assert!(err.contains("not a socket"), "{err}");
    for cid in [0, 1, 2, u64::from(u32::MAX)] {
        assert!(Vsock::new(cid, &dir.join("c.sock")).is_err(), "CID {cid}");
    }
}

/// True when `stream` is still open with nothing to read.
fn still_open(stream: &UnixStream) -> bool {
    stream.set_nonblocking(true).unwrap();
    let open = matches!(
        (&*stream).read(&mut [0u8; 1]),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
    );
    stream.set_nonblocking(false).unwrap();
    open
}

#[test]
fn connections_are_capped_both_ways() {
    let want = MAX_CONNECTIONS as u64 + 256;
    if !crate::fd_limit_at_least(want) {
        eprintln!("skipped: the descriptor limit is below {want}");
        return;
    }
    let mut g = Guest::new("conn-cap");
    let listener = UnixListener::bind(format!("{}_6000", g.sock().display())).unwrap();
    listener.set_nonblocking(true).unwrap();
    g.give_rx(8, 64);
    // Fill the table: all but one directly (each like a guest connection
    // to host port 5000), the last one by a real guest connection.
    for i in 0..MAX_CONNECTIONS as u32 - 1 {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let hdr = pkt(op::REQUEST, 10_000 + i, 5000);
        g.dev
            .conns
            .insert((5000, 10_000 + i), Connection::new(ours, State::Established, &hdr));
    }
    g.send(pkt(op::REQUEST, 1, 6000), &[]).unwrap();
    assert_eq!(ops(&g.received()), [op::RESPONSE]);
    let _accepted = listener.accept().unwrap();
    assert_eq!(g.dev.connections(), MAX_CONNECTIONS);

    // A guest connection past the cap is reset; the host never sees it.
    g.send(pkt(op::REQUEST, 2, 6000), &[]).unwrap();
    assert_eq!(ops(&g.received()), [op::RST]);
    assert_eq!(
        listener.accept().unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock,
        "no host connection was made"
    );
    // A host connection past the cap is closed; the guest never sees it.
    let mut host = UnixStream::connect(g.sock()).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    g.run().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(host.read(&mut [0u8; 16]).unwrap(), 0, "closed without an OK line");
    assert!(g.received().is_empty(), "no REQUEST to the guest");
    assert_eq!(g.dev.connections(), MAX_CONNECTIONS);

    // One closes: a new connection gets its place.
    g.send(pkt(op::RST, 10_000, 5000), &[]).unwrap();
    assert_eq!(g.dev.connections(), MAX_CONNECTIONS - 1);
    g.send(pkt(op::REQUEST, 3, 6000), &[]).unwrap();
    assert_eq!(ops(&g.received()), [op::RESPONSE]);
    assert_eq!(g.dev.connections(), MAX_CONNECTIONS);
}

#[test]
fn host_clients_without_a_connect_line_are_capped() {
    let mut g = Guest::new("client-cap");
    let mut waiting: Vec<UnixStream> = (0..MAX_CLIENTS)
        .map(|_| UnixStream::connect(g.sock()).unwrap())
        .collect();
    g.run().unwrap();
    assert_eq!(g.dev.clients.len(), MAX_CLIENTS);
    // One more is closed at once; the others stay.
    let mut extra = UnixStream::connect(g.sock()).unwrap();
    g.run().unwrap();
    assert_eq!(g.dev.clients.len(), MAX_CLIENTS);
    extra.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(extra.read(&mut [0u8; 1]).unwrap(), 0, "closed");
    assert!(waiting.iter().all(still_open));
    // One goes away: room for another.
    drop(waiting.remove(0));
    g.run().unwrap();
    assert_eq!(g.dev.clients.len(), MAX_CLIENTS - 1);
    let another = UnixStream::connect(g.sock()).unwrap();
    g.run().unwrap();
    assert_eq!(g.dev.clients.len(), MAX_CLIENTS);
    assert!(still_open(&another));
}

#[test]
fn guest_data_for_a_stalled_host_is_buffered_up_to_conn_buf_only() {
    let mut g = Guest::new("stalled-host");
    let (_host, port) = host_connect(&mut g, 83);
    let key = (port, 83);
    // The host program never reads; a small socket buffer makes the
    // device buffer at once.
    let fd = g.dev.conns[&key].stream.as_raw_fd();
    let size: libc::c_int = 4096;
    // SAFETY: sets an int option on a valid socket.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&raw const size).cast(),
            std::mem::size_of_val(&size) as libc::socklen_t,
        )
    };
    assert_eq!(r, 0);
    g.give_rx(16, 4096);
    let buffered = |g: &Guest| g.dev.conns.get(&key).map(|c| c.to_host.len());
    let chunk = vec![1u8; MAX_PAYLOAD];
    for _ in 0..20 {
        if buffered(&g).unwrap() > 0 {
            break;
        }
        g.send(rw(83, port, chunk.len()), &chunk).unwrap();
    }
    assert!(buffered(&g).unwrap() > 0, "the host socket is full");
    // Within the credit (every byte not handed to the host counts against
    // the CONN_BUF the device advertised), up to exactly CONN_BUF.
    for _ in 0..20 {
        let b = buffered(&g).expect("a guest within its credit is not reset");
        if b == CONN_BUF as usize {
            break;
        }
        let n = (CONN_BUF as usize - b).min(MAX_PAYLOAD);
        g.send(rw(83, port, n), &chunk[..n]).unwrap();
        assert!(!ops(&g.received()).contains(&op::RST));
    }
    assert_eq!(buffered(&g), Some(CONN_BUF as usize));
    // One byte more: the connection is reset and its buffer freed.
    g.send(rw(83, port, 1), b"x").unwrap();
    assert!(ops(&g.received()).contains(&op::RST));
    assert_eq!(buffered(&g), None);
    assert_eq!(g.dev.connections(), 0);
}

#[test]
fn host_data_is_read_only_as_far_as_the_guest_credit() {
    // Not a multiple of the receive buffers: the credit, not the buffers,
    // must end the transfer.
    const CREDIT: u32 = 10_000;
    let pattern = |from: usize, len: usize| -> Vec<u8> { (from..from + len).map(|i| (i % 251) as u8).collect() };
    let mut g = Guest::new("stalled-guest");
    let (mut host, port) = host_connect(&mut g, 84);
    let key = (port, 84);
    let credit = |fwd_cnt: u32| Header {
        buf_alloc: CREDIT,
        fwd_cnt,
        ..pkt(op::CREDIT_UPDATE, 84, port)
    };
    g.send(credit(0), &[]).unwrap();
    // Receive buffers for eight times the credit: only the credit limits.
    g.give_rx(32, 4096);
    // The host program writes as fast as it can, the guest reads nothing.
    host.set_nonblocking(true).unwrap();
    let mut written = 0;
    for _ in 0..10 {
        loop {
            match host.write(&pattern(written, 8192)) {
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        g.run().unwrap();
    }
    let got = g.received();
    let data: Vec<u8> = got
        .iter()
        .filter(|(h, _)| h.op == op::RW)
        .flat_map(|(_, p)| p.clone())
        .collect();
    assert_eq!(data.len(), CREDIT as usize, "exactly the credit reached the guest");
    assert_eq!(data, pattern(0, CREDIT as usize));
    assert_eq!(
        got.iter().filter(|(h, _)| h.op == op::CREDIT_REQUEST).count(),
        1,
        "{:?}",
        ops(&got)
    );
    assert!(
        written > CREDIT as usize,
        "the host kept writing until its socket was full ({written} bytes)"
    );
    // The rest waits in the host socket, not in the device: it holds no
    // per-connection buffer towards the guest, and its one read buffer is
    // a packet's worth.
    assert!(g.dev.conns[&key].to_host.is_empty());
    assert_eq!(g.dev.buf.len(), MAX_PAYLOAD);
    // The guest consumed it: the next bytes follow on, none lost.
    g.send(credit(CREDIT), &[]).unwrap();
    let data: Vec<u8> = g
        .received()
        .iter()
        .filter(|(h, _)| h.op == op::RW)
        .flat_map(|(_, p)| p.clone())
        .collect();
    assert_eq!(data, pattern(CREDIT as usize, CREDIT as usize));
}
