//! Per-request cost of the device models on mock guest memory (no guest,
//! no KVM): one 4 KiB virtio-rng request, one 4 KiB virtio-blk read and
//! write (on a file in the page cache), one 1514-byte virtio-net transmit
//! (into a datagram socket a thread drains, standing in for the TAP) and
//! one 4 KiB virtio-vsock packet on an open connection (into the host
//! program's Unix socket, drained by a thread), each including popping the
//! chain, validating it, moving the data and completing it. The virtio-fs
//! rows are whole FUSE requests through the built-in device and overlay
//! (GETATTR, 4 KiB READ and WRITE of an open file).
//!
//! The physical bound next to these: copying 4 KiB in memory takes well
//! under a microsecond on these hosts, so the figures are dominated by
//! chain handling and the system call that moves the data.

use criterion::{criterion_group, criterion_main, Criterion};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mvm_devices::virtio::rng::Rng;
use mvm_devices::virtio::vsock::packet::{op, Header, HOST_CID, TYPE_STREAM};
use mvm_devices::virtio::vsock::Vsock;
use mvm_devices::virtio::VirtioDevice;
use mvm_net::device::Net;
use mvm_net::socket::SocketFrames;
use mvm_storage::block::Block;
use mvm_storage::fs::abi;
use mvm_storage::fs::device::VirtioFs;
use mvm_storage::fs::overlay::{Overlay, OverlayOptions};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

const NEXT: u16 = 1;
const WRITE: u16 = 2;

fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

/// Submit `descs` as one request on queue `index` of `dev`, `iters`
/// times, on a fresh ring each time (the mock ring holds one chain per
/// setup).
fn bench_device(
    c: &mut Criterion,
    name: &str,
    dev: &mut dyn VirtioDevice,
    index: usize,
    descs: &[RawDescriptor],
    prep: &dyn Fn(&GuestMemoryMmap),
) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    prep(&mem);
    c.bench_function(name, |b| {
        b.iter_batched(
            || {
                let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
                vq.add_desc_chains(descs, 0).unwrap();
                let q: Queue = vq.create_queue().unwrap();
                q
            },
            |mut q| dev.process_queue(index, &mut q, &mem).unwrap(),
            criterion::BatchSize::SmallInput,
        )
    });
}

/// A socket pair standing in for the TAP; a thread drains the peer.
fn drained_frames() -> SocketFrames {
    let (ours, peer) = SocketFrames::pair().unwrap();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 70_000];
        // SAFETY: reads into a valid buffer until the socket closes.
        while unsafe { libc::recv(peer.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) } > 0 {}
    });
    ours
}

/// A vsock device with one open guest connection (guest port 1000 to host
/// port 1, where a thread reads everything and counts it in the result).
fn vsock_with_connection() -> (Vsock, Arc<AtomicUsize>) {
    let dir = std::env::temp_dir().join(format!("mvm-bench-vsock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let uds = dir.join("v.sock");
    let _ = std::fs::remove_file(format!("{}_1", uds.display()));
    let listener = std::os::unix::net::UnixListener::bind(format!("{}_1", uds.display())).unwrap();
    let mut dev = Vsock::new(3, &uds).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    mem.write_slice(&vsock_header(op::REQUEST, 0).to_bytes(), GuestAddress(0x4000))
        .unwrap();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
    vq.add_desc_chains(&[raw(0x4000, 44, 0, 0)], 0).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    dev.process_queue(1, &mut q, &mem).unwrap();
    let (mut stream, _) = listener.accept().unwrap();
    let drained = Arc::new(AtomicUsize::new(0));
    let count = drained.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n @ 1..) = stream.read(&mut buf) {
            count.fetch_add(n, Ordering::SeqCst);
        }
    });
    assert_eq!(dev.connections(), 1);
    (dev, drained)
}

fn vsock_header(op: u16, len: u32) -> Header {
    Header {
        src_cid: 3,
        dst_cid: HOST_CID,
        src_port: 1000,
        dst_port: 1,
        len,
        kind: TYPE_STREAM,
        op,
        buf_alloc: 1 << 18,
        ..Header::default()
    }
}

fn devices(c: &mut Criterion) {
    let mut rng = Rng::new();
    bench_device(
        c,
        "virtio-rng 4 KiB request",
        &mut rng,
        0,
        &[raw(0x8000, 4096, WRITE, 0)],
        &|_| {},
    );

    let path = std::env::temp_dir().join(format!("mvm-bench-disk-{}", std::process::id()));
    std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
    let mut disk = Block::open(&path, false, "bench").unwrap();
    let header = |kind: u32| {
        move |m: &GuestMemoryMmap| {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&kind.to_le_bytes());
            h[8..16].copy_from_slice(&8u64.to_le_bytes());
            m.write_slice(&h, GuestAddress(0x4000)).unwrap();
        }
    };
    let read = [
        raw(0x4000, 16, NEXT, 1),
        raw(0x8000, 4096, WRITE | NEXT, 2),
        raw(0x6000, 1, WRITE, 0),
    ];
    bench_device(c, "virtio-blk 4 KiB read", &mut disk, 0, &read, &header(0));
    let write = [
        raw(0x4000, 16, NEXT, 1),
        raw(0x8000, 4096, NEXT, 2),
        raw(0x6000, 1, WRITE, 0),
    ];
    bench_device(c, "virtio-blk 4 KiB write", &mut disk, 0, &write, &header(1));
    let _ = std::fs::remove_file(&path);

    let mut net = Net::new(drained_frames(), [2, 0, 0, 0, 0, 1]);
    let frame = [raw(0x8000, 12 + 1514, 0, 0)];
    bench_device(c, "virtio-net 1514-byte transmit", &mut net, 1, &frame, &|_| {});

    // A real guest sends only within the credit the host program's reading
    // frees; so does this one: it waits (untimed) until the host program
    // is less than 128 KiB behind before each packet.
    let (mut vsock, drained) = vsock_with_connection();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    mem.write_slice(&vsock_header(op::RW, 4096).to_bytes(), GuestAddress(0x4000))
        .unwrap();
    let mut sent = 0usize;
    c.bench_function("virtio-vsock 4 KiB packet", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
                vq.add_desc_chains(&[raw(0x4000, 44, NEXT, 1), raw(0x8000, 4096, 0, 0)], 0)
                    .unwrap();
                let mut q: Queue = vq.create_queue().unwrap();
                while sent - drained.load(Ordering::SeqCst) > 128 << 10 {
                    std::hint::spin_loop();
                }
                let start = Instant::now();
                vsock.process_queue(1, &mut q, &mem).unwrap();
                timed += start.elapsed();
                sent += 4096;
            }
            timed
        })
    });
    assert_eq!(
        vsock.connections(),
        1,
        "the connection stayed open: every packet was forwarded"
    );
}

/// One FUSE request: the in-header (with the total length) and `args`.
fn fuse_request(opcode: u32, nodeid: u64, args: &[u8]) -> Vec<u8> {
    let header = abi::InHeader {
        len: (std::mem::size_of::<abi::InHeader>() + args.len()) as u32,
        opcode,
        unique: 1,
        nodeid,
        ..Default::default()
    };
    let mut bytes = header.as_slice().to_vec();
    bytes.extend_from_slice(args);
    bytes
}

/// Run one request through queue 1 of `fs` and return the reply.
fn fs_call(fs: &mut VirtioFs, mem: &GuestMemoryMmap, request: &[u8]) -> Vec<u8> {
    mem.write_slice(request, GuestAddress(0x10000)).unwrap();
    let vq = MockSplitQueue::create(mem, GuestAddress(0x1000), 16);
    vq.add_desc_chains(
        &[raw(0x10000, request.len() as u32, NEXT, 1), raw(0x20000, 8192, WRITE, 0)],
        0,
    )
    .unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    fs.process_queue(1, &mut q, mem).unwrap();
    let len = vq.used().ring().ref_at(0).unwrap().load().len() as usize;
    let mut reply = vec![0u8; len];
    mem.read_slice(&mut reply, GuestAddress(0x20000)).unwrap();
    reply
}

/// The built-in virtio-fs device over the real overlay (project in the
/// page cache): GETATTR, a 4 KiB READ and a 4 KiB WRITE of an open file,
/// each a whole request through the queue (decode, file system call,
/// reply into guest memory).
fn fs_devices(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("mvm-bench-fs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("lower")).unwrap();
    std::fs::create_dir_all(dir.join("upper")).unwrap();
    std::fs::write(dir.join("lower/file"), vec![5u8; 1 << 20]).unwrap();
    let overlay = Overlay::new(Some(&dir.join("lower")), &dir.join("upper"), OverlayOptions::default()).unwrap();
    let mut fs = VirtioFs::new("bench", Box::new(overlay)).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let init = abi::InitIn {
        major: 7,
        minor: 36,
        max_readahead: 1 << 20,
        ..Default::default()
    };
    fs_call(&mut fs, &mem, &fuse_request(abi::opcode::INIT, 0, init.as_slice()));
    let entry = fs_call(&mut fs, &mem, &fuse_request(abi::opcode::LOOKUP, 1, b"file\0"));
    let out_len = std::mem::size_of::<abi::OutHeader>();
    let nodeid = u64::from_le_bytes(entry[out_len..out_len + 8].try_into().unwrap());
    let open = abi::OpenIn {
        flags: libc::O_RDWR as u32,
        open_flags: 0,
    };
    let opened = fs_call(&mut fs, &mem, &fuse_request(abi::opcode::OPEN, nodeid, open.as_slice()));
    let fh = u64::from_le_bytes(opened[out_len..out_len + 8].try_into().unwrap());

    let getattr = fuse_request(abi::opcode::GETATTR, nodeid, abi::GetattrIn::default().as_slice());
    let read = abi::ReadIn {
        fh,
        offset: 8192,
        size: 4096,
        ..Default::default()
    };
    let read = fuse_request(abi::opcode::READ, nodeid, read.as_slice());
    let write_in = abi::WriteIn {
        fh,
        offset: 8192,
        size: 4096,
        ..Default::default()
    };
    let mut write = fuse_request(abi::opcode::WRITE, nodeid, &[write_in.as_slice(), &[9u8; 4096]].concat());
    let total = write.len() as u32;
    write[0..4].copy_from_slice(&total.to_le_bytes());
    for (name, request, reply_len) in [
        ("virtio-fs GETATTR", &getattr, 8192u32),
        ("virtio-fs 4 KiB READ", &read, 8192),
        ("virtio-fs 4 KiB WRITE", &write, 64),
    ] {
        let descs = [
            raw(0x10000, request.len() as u32, NEXT, 1),
            raw(0x20000, reply_len, WRITE, 0),
        ];
        // Each request succeeds (out header error 0) before it is timed.
        let reply = fs_call(&mut fs, &mem, request);
        assert_eq!(&reply[4..8], &[0u8; 4], "{name} failed: {reply:?}");
        let request = request.clone();
        bench_device(c, name, &mut fs, 1, &descs, &move |m| {
            m.write_slice(&request, GuestAddress(0x10000)).unwrap();
        });
    }
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, devices, fs_devices);
criterion_main!(benches);
