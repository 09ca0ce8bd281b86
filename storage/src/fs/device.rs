//! The virtio-fs device (type 26): FUSE requests on virtio queues.
//!
//! Queue 0 is the high-priority queue (the guest sends FORGET and
//! BATCH_FORGET there, without reply buffers), queue 1 the one request
//! queue. Each chain is one request: its device-readable buffers (header,
//! arguments, write payload) come first, its device-writable buffers (the
//! reply) after them. A chain that breaks that shape (a header cut short,
//! readable after writable buffers, a request longer than [`MAX_REQUEST`],
//! no room for the reply header, buffers outside guest memory) fails the
//! device; a well-formed chain with a bad request gets a FUSE error reply.
//!
//! Requests are served on the VMM's event loop, like the other devices
//! (the [`VirtioDevice`] trait is driven from it): each notification runs
//! the queued requests to completion, one at a time. That keeps the file
//! system single-threaded (`&mut self`); the cost is that a slow host file
//! system delays the VM's other devices while a request runs.

use std::io::{Read, Write};

use mvm_devices::virtio::{serve_queue, DeviceError, VirtioDevice};
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::GuestMemoryMmap;

use super::server::{Server, IN_HEADER_SIZE, MAX_REQUEST};
use super::{ConfigSpace, FileSystem, DEVICE_TYPE_FS};
use crate::Error;

/// 1024 descriptors: a 1 MiB read or write ([`super::server::MAX_WRITE`])
/// is 256 page buffers plus headers, each its own descriptor (Linux does
/// not use indirect descriptors unless offered, and none are). With 256
/// such a request would not fit an empty ring, and the guest would wait for
/// room forever.
const QUEUE_SIZE: u16 = 1024;

/// A directory served to the guest under a tag (`mount -t virtiofs <tag>`).
pub struct VirtioFs {
    server: Server<dyn FileSystem>,
    config: ConfigSpace,
    sizes: [u16; 2],
    /// Readable bytes of the current request, reused across requests
    /// (grows once to the largest request seen, at most MAX_REQUEST).
    request: Vec<u8>,
    /// The reply under construction, reused likewise.
    reply: Vec<u8>,
}

impl VirtioFs {
    /// A device serving `fs` under `tag`: 1 to 36 bytes, no NUL or control
    /// characters (the guest names the file system by it in `mount`).
    pub fn new(tag: &str, fs: Box<dyn FileSystem>) -> Result<Self, Error> {
        Ok(VirtioFs {
            server: Server::from_box(fs),
            config: ConfigSpace::new(tag)?,
            sizes: [QUEUE_SIZE; 2],
            request: Vec::new(),
            reply: Vec::new(),
        })
    }

    /// The file system behind the device.
    pub fn file_system(&self) -> &dyn FileSystem {
        self.server.fs()
    }
}

impl VirtioDevice for VirtioFs {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, DeviceError> {
        let VirtioFs {
            server, request, reply, ..
        } = self;
        serve_queue(index, queue, mem, |chain| {
            serve_chain(server, request, reply, chain, mem)
        })
    }

    /// A reset is a new mount: the guest starts over with INIT, and
    /// everything it held is dropped.
    fn reset(&mut self) {
        self.server.reset();
    }

    /// Close every file the guest held open now, not at drop.
    fn stop(&mut self) {
        self.server.reset();
    }
}

/// One request: gather its readable bytes, let the server answer, copy the
/// reply into the writable buffers. Returns the bytes written.
fn serve_chain(
    server: &mut Server<dyn FileSystem>,
    request: &mut Vec<u8>,
    reply: &mut Vec<u8>,
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
) -> Result<u32, DeviceError> {
    let head = chain.head_index();
    let fail = |reason: String| DeviceError::Chain { head, reason };
    // The reader and writer filter by direction; the order is ours to check.
    let mut writable_seen = false;
    for desc in chain.clone() {
        if desc.is_write_only() {
            writable_seen = true;
        } else if writable_seen {
            return Err(fail("device-readable buffer after a device-writable one".into()));
        }
    }
    let mut reader = chain
        .clone()
        .reader(mem)
        .map_err(|e| fail(format!("readable buffers: {e}")))?;
    let mut writer = chain.writer(mem).map_err(|e| fail(format!("writable buffers: {e}")))?;
    let len = reader.available_bytes();
    if len < IN_HEADER_SIZE {
        return Err(fail(format!(
            "FUSE request of {len} bytes is shorter than its {IN_HEADER_SIZE}-byte header"
        )));
    }
    if len > MAX_REQUEST {
        return Err(fail(format!(
            "FUSE request of {len} bytes is longer than the {MAX_REQUEST} bytes allowed"
        )));
    }
    request.resize(len, 0);
    reader
        .read_exact(request)
        .map_err(|e| fail(format!("reading the request: {e}")))?;
    let max_reply = writer.available_bytes();
    let Some(n) = server
        .handle(request, max_reply, reply)
        .map_err(|e| fail(e.to_string()))?
    else {
        return Ok(0);
    };
    // The server never builds a reply longer than `max_reply`, so this
    // write cannot fall short of the writable buffers.
    debug_assert!(n <= max_reply && n == reply.len());
    let bytes = reply
        .get(..n)
        .ok_or_else(|| fail("reply length out of bounds".into()))?;
    writer
        .write_all(bytes)
        .map_err(|e| fail(format!("writing the reply: {e}")))?;
    u32::try_from(n).map_err(|_| fail("reply longer than 4 GiB".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::abi::{self, opcode};
    use crate::fs::server::test_fs::MemFs;
    use crate::fs::ROOT_ID;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{ByteValued, Bytes, GuestAddress};

    // Descriptor flags (virtio 1.x, 2.7.5).
    const N: u16 = 1;
    const W: u16 = 2;
    const REQ: u64 = 0x4000;
    const REQ2: u64 = 0x5000;
    const OUT: u64 = 0x8000;
    const OUT2: u64 = 0x9000;
    const OUT3: u64 = 0xa000;

    fn d(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    fn mem(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    fn device() -> VirtioFs {
        VirtioFs::new("shared", Box::new(MemFs::new())).unwrap()
    }

    /// Write a request at `addr`; return its length.
    fn put_request(m: &GuestMemoryMmap, addr: u64, op: u32, nodeid: u64, args: &[u8]) -> u32 {
        let len = abi::InHeader::default().as_slice().len() + args.len();
        let h = abi::InHeader {
            len: len as u32,
            opcode: op,
            unique: u64::from(op) + 100,
            nodeid,
            ..Default::default()
        };
        m.write_slice(h.as_slice(), GuestAddress(addr)).unwrap();
        m.write_slice(args, GuestAddress(addr + 40)).unwrap();
        len as u32
    }

    fn init_args() -> Vec<u8> {
        abi::InitIn {
            major: 7,
            minor: 37,
            flags: u32::MAX,
            ..Default::default()
        }
        .as_slice()
        .to_vec()
    }

    /// Submit chains on queue `index`; return the result and the used lengths.
    fn submit(
        dev: &mut VirtioFs,
        m: &GuestMemoryMmap,
        index: usize,
        descs: &[RawDescriptor],
    ) -> (Result<bool, DeviceError>, Vec<u32>) {
        let vq = MockSplitQueue::create(m, GuestAddress(0x1000), 16);
        vq.add_desc_chains(descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let r = dev.process_queue(index, &mut q, m);
        let used = (0..vq.used().idx().load())
            .map(|i| vq.used().ring().ref_at(i as usize).unwrap().load().len())
            .collect();
        (r, used)
    }

    fn out_header(m: &GuestMemoryMmap, addr: u64) -> abi::OutHeader {
        m.read_obj(GuestAddress(addr)).unwrap()
    }

    /// INIT through the request queue.
    fn mount(dev: &mut VirtioFs, m: &GuestMemoryMmap) {
        let len = put_request(m, REQ, opcode::INIT, 0, &init_args());
        let (r, used) = submit(dev, m, 1, &[d(REQ, len, N, 1), d(OUT, 4096, W, 0)]);
        assert_eq!((r, used), (Ok(true), vec![16 + 64]));
        assert_eq!(out_header(m, OUT).error, 0);
    }

    #[test]
    fn init_and_lookup_round_trip() {
        let m = mem(0x10_0000);
        let mut dev = device();
        let init = put_request(&m, REQ, opcode::INIT, 0, &init_args());
        let lookup = put_request(&m, REQ2, opcode::LOOKUP, ROOT_ID, b"hello\0");
        // The lookup's header is split over two readable descriptors and
        // its reply over two writable ones.
        let descs = [
            d(REQ, init, N, 1),
            d(OUT, 4096, W, 0),
            d(REQ2, 10, N, 3),
            d(REQ2 + 10, lookup - 10, N, 4),
            d(OUT2, 20, W | N, 5),
            d(OUT3, 200, W, 0),
        ];
        let (r, used) = submit(&mut dev, &m, 1, &descs);
        assert_eq!(r, Ok(true));
        assert_eq!(used, [80, 16 + 128]);
        let h = out_header(&m, OUT);
        assert_eq!((h.len, h.error, h.unique), (80, 0, 126));
        let init: abi::InitOut = m.read_obj(GuestAddress(OUT + 16)).unwrap();
        assert_eq!((init.major, init.minor, init.max_write), (7, 36, 1 << 20));
        let h = out_header(&m, OUT2);
        assert_eq!((h.len, h.error, h.unique), (144, 0, 101));
        let mut reply = [0u8; 144];
        m.read_slice(&mut reply[..20], GuestAddress(OUT2)).unwrap();
        m.read_slice(&mut reply[20..], GuestAddress(OUT3)).unwrap();
        let mut entry = abi::EntryOut::default();
        entry.as_mut_slice().copy_from_slice(&reply[16..]);
        assert_eq!((entry.nodeid, entry.attr.size), (2, 12));

        // A reset ends the session: the next request must be INIT.
        dev.reset();
        put_request(&m, REQ2, opcode::LOOKUP, ROOT_ID, b"hello\0");
        let (r, _) = submit(&mut dev, &m, 1, &[d(REQ2, lookup, N, 1), d(OUT, 4096, W, 0)]);
        assert_eq!((r, out_header(&m, OUT).error), (Ok(true), -libc::EIO));
    }

    #[test]
    fn forget_on_hiprio_needs_no_reply_buffer() {
        let m = mem(0x10_0000);
        let mut dev = device();
        mount(&mut dev, &m);
        let len = put_request(&m, REQ, opcode::FORGET, 2, &1u64.to_ne_bytes());
        let (r, used) = submit(&mut dev, &m, 0, &[d(REQ, len, 0, 0)]);
        assert_eq!((r, used), (Ok(true), vec![0]));
        // A request that needs a reply but has no writable buffer fails.
        let len = put_request(&m, REQ, opcode::GETATTR, 2, &[0u8; 16]);
        let (r, _) = submit(&mut dev, &m, 0, &[d(REQ, len, 0, 0)]);
        assert!(matches!(r, Err(DeviceError::Chain { .. })), "{r:?}");
    }

    #[test]
    fn hostile_chains_fail_the_device() {
        let m = mem(0x40_0000);
        let mut dev = device();
        mount(&mut dev, &m);
        let len = put_request(&m, REQ, opcode::LOOKUP, ROOT_ID, b"hello\0");
        let cases: Vec<(&str, Vec<RawDescriptor>)> = vec![
            (
                "request outside memory",
                vec![d(0xffff_0000, len, N, 1), d(OUT, 4096, W, 0)],
            ),
            (
                "reply outside memory",
                vec![d(REQ, len, N, 1), d(0x3f_ff00, 4096, W, 0)],
            ),
            ("wrapping address", vec![d(u64::MAX - 8, len, N, 1), d(OUT, 4096, W, 0)]),
            (
                "readable after writable",
                vec![d(OUT, 4096, W | N, 1), d(REQ, len, N, 2), d(OUT2, 16, W, 0)],
            ),
            ("short header", vec![d(REQ, 39, N, 1), d(OUT, 4096, W, 0)]),
            ("no readable part", vec![d(OUT, 4096, W, 0)]),
            ("reply header does not fit", vec![d(REQ, len, N, 1), d(OUT, 15, W, 0)]),
            (
                "request too long",
                vec![d(0x10_0000, (MAX_REQUEST + 1) as u32, N, 1), d(OUT, 4096, W, 0)],
            ),
            ("next past the table", vec![d(REQ, len, N, 40)]),
        ];
        for (what, descs) in cases {
            let (r, _) = submit(&mut dev, &m, 1, &descs);
            assert!(matches!(r, Err(DeviceError::Chain { head: 0, .. })), "{what}: {r:?}");
        }
        // A well-formed chain with a bad request gets an error reply.
        let len = put_request(&m, REQ, opcode::LOOKUP, ROOT_ID, b"..\0");
        let (r, used) = submit(&mut dev, &m, 1, &[d(REQ, len, N, 1), d(OUT, 4096, W, 0)]);
        assert_eq!((r, used), (Ok(true), vec![16]));
        assert_eq!(out_header(&m, OUT).error, -libc::EINVAL);
    }

    #[test]
    fn config_space_holds_the_tag() {
        let dev = device();
        assert_eq!(dev.device_type(), 26);
        assert_eq!(dev.queue_max_sizes(), [1024, 1024]);
        let mut tag = [0xffu8; 36];
        dev.read_config(0, &mut tag);
        assert_eq!(&tag[..6], b"shared");
        assert!(tag[6..].iter().all(|b| *b == 0), "NUL padded");
        let mut queues = [0u8; 4];
        dev.read_config(36, &mut queues);
        assert_eq!(u32::from_le_bytes(queues), 1);
        let mut beyond = [0u8; 4];
        dev.read_config(38, &mut beyond);
        assert_eq!(beyond, [0; 4], "out-of-range reads stay zero");
        dev.read_config(u64::MAX, &mut beyond);
        assert_eq!(beyond, [0; 4]);
    }

    #[test]
    fn tags_are_checked() {
        let full = "t".repeat(36);
        let dev = VirtioFs::new(&full, Box::new(MemFs::new())).unwrap();
        let mut tag = [0u8; 36];
        dev.read_config(0, &mut tag);
        assert_eq!(&tag[..], full.as_bytes());
        for bad in [String::new(), "t".repeat(37), "a\0b".into(), "a\nb".into()] {
            let e = VirtioFs::new(&bad, Box::new(MemFs::new())).err().unwrap().to_string();
            assert!(e.contains("1 to 36 bytes"), "{e}");
        }
    }

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
    }

    /// 100,000 opens and closes through the device over the real overlay
    /// (10,000 lower files, each looked up, opened, released and
    /// forgotten ten times) leave the overlay's and the process's
    /// descriptor counts where they were.
    #[test]
    fn hundred_thousand_opens_leave_no_descriptor_behind() {
        use crate::fs::overlay::{Overlay, OverlayOptions};
        const FILES: usize = 10_000;
        const ROUNDS: usize = 10;
        let base = std::env::temp_dir().join(format!("mvm-fs-device-fds-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("lower")).unwrap();
        std::fs::create_dir_all(base.join("upper")).unwrap();
        for i in 0..FILES {
            std::fs::write(base.join(format!("lower/f{i}")), b"x").unwrap();
        }
        let overlay = Overlay::new(
            Some(&base.join("lower")),
            &base.join("upper"),
            OverlayOptions::default(),
        )
        .unwrap();
        let mut dev = VirtioFs::new("fds", Box::new(overlay)).unwrap();
        let m = mem(0x10_0000);
        mount(&mut dev, &m);
        let call = |dev: &mut VirtioFs, op: u32, node: u64, args: &[u8]| -> Vec<u8> {
            let len = put_request(&m, REQ, op, node, args);
            let (r, used) = submit(dev, &m, 1, &[d(REQ, len, N, 1), d(OUT, 4096, W, 0)]);
            assert_eq!(r, Ok(true));
            let mut reply = vec![0u8; used[0] as usize];
            m.read_slice(&mut reply, GuestAddress(OUT)).unwrap();
            assert_eq!(out_header(&m, OUT).error, 0, "opcode {op}");
            reply
        };
        let fds_before = open_fds();
        for round in 0..ROUNDS {
            for i in 0..FILES {
                let entry = call(&mut dev, opcode::LOOKUP, ROOT_ID, format!("f{i}\0").as_bytes());
                let node = u64::from_le_bytes(entry[16..24].try_into().unwrap());
                let open = abi::OpenIn {
                    flags: libc::O_RDONLY as u32,
                    open_flags: 0,
                };
                let opened = call(&mut dev, opcode::OPEN, node, open.as_slice());
                let fh = u64::from_le_bytes(opened[16..24].try_into().unwrap());
                let release = abi::ReleaseIn {
                    fh,
                    ..Default::default()
                };
                call(&mut dev, opcode::RELEASE, node, release.as_slice());
                // FORGET goes on the high-priority queue and has no reply.
                let forget = abi::ForgetIn { nlookup: 1 };
                let len = put_request(&m, REQ, opcode::FORGET, node, forget.as_slice());
                let (r, _) = submit(&mut dev, &m, 0, &[d(REQ, len, 0, 0)]);
                assert!(r.is_ok());
            }
            let now = open_fds();
            assert!(
                now <= fds_before + 64,
                "round {round}: process descriptors {fds_before} -> {now}"
            );
        }
        // Other tests run in parallel threads of this process: allow them
        // a margin, far below one descriptor per open.
        let fds_after = open_fds();
        assert!(
            fds_after <= fds_before + 64,
            "process descriptors {fds_before} -> {fds_after}"
        );
        let _ = std::fs::remove_dir_all(&base);
    }
}
