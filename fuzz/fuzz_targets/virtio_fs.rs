//! Guest input of virtio-fs, over an overlay of two temporary directories.
//! The first byte picks the mode:
//!
//! - even: the FUSE server directly. After a valid INIT, the rest is a
//!   sequence of records `[len: u32 LE][max_reply: u32 LE][len bytes]`,
//!   each one request with the guest's writable space.
//! - odd: the device. A valid INIT goes through the request queue first,
//!   then the bytes become guest memory holding the high-priority queue at
//!   0x1000 and the request queue at 0x2000 (descriptors, rings and buffers
//!   all chosen by the fuzzer).
//!
//! Nothing may panic; every reply fits the space the guest gave, and its
//! header's length matches; no file appears outside the two directories.
#![no_main]
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mvm_devices::virtio::VirtioDevice;
use mvm_fuzz::queue;
use mvm_storage::fs::abi::{opcode, InHeader, InitIn, OutHeader};
use mvm_storage::fs::device::VirtioFs;
use mvm_storage::fs::server::Server;
use mvm_storage::fs::FileSystem;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 0x1_0000;
/// Largest writable space a server-mode record may claim.
const MAX_REPLY: usize = 1 << 21;

struct Dirs {
    lower: PathBuf,
    upper: PathBuf,
}

/// A lower layer with a file, a directory and a symlink, and an upper
/// layer; created once per process.
fn dirs() -> &'static Dirs {
    static DIRS: OnceLock<Dirs> = OnceLock::new();
    DIRS.get_or_init(|| {
        let base = std::env::temp_dir().join(format!("mvm-fuzz-fs-{}", std::process::id()));
        let lower = base.join("lower");
        let upper = base.join("upper");
        std::fs::create_dir_all(lower.join("dir")).unwrap();
        std::fs::create_dir_all(&upper).unwrap();
        std::fs::write(lower.join("file"), b"lower file\n").unwrap();
        std::fs::write(lower.join("dir").join("inner"), b"inner\n").unwrap();
        let _ = std::os::unix::fs::symlink("file", lower.join("link"));
        Dirs { lower, upper }
    })
}

/// The file system under test, over a fresh upper layer each run (so the
/// upper directory does not grow across runs).
// integrator: Overlay — adjust to the final `Overlay::new` signature.
fn file_system() -> Box<dyn FileSystem> {
    let d = dirs();
    let _ = std::fs::remove_dir_all(&d.upper);
    std::fs::create_dir_all(&d.upper).unwrap();
    let lower: &Path = &d.lower;
    Box::new(
        mvm_storage::fs::overlay::Overlay::new(Some(lower), &d.upper, Default::default())
            .expect("overlay over temporary directories"),
    )
}

/// A FUSE INIT request as Linux 6.1 sends it.
fn init_request() -> Vec<u8> {
    let args = InitIn {
        major: 7,
        minor: 37,
        max_readahead: 128 * 1024,
        flags: u32::MAX,
        ..Default::default()
    };
    let header = InHeader {
        len: (40 + args.as_slice().len()) as u32,
        opcode: opcode::INIT,
        unique: 1,
        ..Default::default()
    };
    let mut r = header.as_slice().to_vec();
    r.extend_from_slice(args.as_slice());
    r
}

fn check_reply(reply: &[u8], len: usize, max_reply: usize) {
    assert!(len <= max_reply && len == reply.len());
    let mut header = OutHeader::default();
    header.as_mut_slice().copy_from_slice(&reply[..16]);
    assert_eq!(header.len as usize, len);
    assert!(header.error <= 0 && header.error > -4096);
}

fn server_mode(data: &[u8]) {
    let mut server = Server::from_box(file_system());
    let mut reply = Vec::new();
    let init = init_request();
    assert_eq!(server.handle(&init, 4096, &mut reply), Ok(Some(80)));
    let mut rest = data;
    while rest.len() >= 8 {
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let max_reply = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize % MAX_REPLY;
        rest = &rest[8..];
        let (request, tail) = rest.split_at(len.min(rest.len()));
        rest = tail;
        if let Ok(Some(n)) = server.handle(request, max_reply, &mut reply) {
            check_reply(&reply, n, max_reply);
        }
    }
    server.reset();
}

fn device_mode(data: &[u8]) {
    let mut dev = VirtioFs::new("fuzz", file_system()).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    // Mount first: INIT at 0x4000, reply at 0x5000, one chain at 0x3000.
    let init = init_request();
    mem.write_slice(&init, GuestAddress(0x4000)).unwrap();
    let mut desc = [0u8; 32];
    desc[0..8].copy_from_slice(&0x4000u64.to_le_bytes());
    desc[8..12].copy_from_slice(&(init.len() as u32).to_le_bytes());
    desc[12..14].copy_from_slice(&1u16.to_le_bytes()); // NEXT
    desc[14..16].copy_from_slice(&1u16.to_le_bytes());
    desc[16..24].copy_from_slice(&0x5000u64.to_le_bytes());
    desc[24..28].copy_from_slice(&4096u32.to_le_bytes());
    desc[28..30].copy_from_slice(&2u16.to_le_bytes()); // WRITE
    mem.write_slice(&desc, GuestAddress(0x3000)).unwrap();
    mem.write_slice(&[0, 0, 1, 0, 0, 0], GuestAddress(0x3100)).unwrap();
    let mut q = queue(0x3000);
    assert_eq!(dev.process_queue(1, &mut q, &mem).map(|_| ()), Ok(()));

    mem.write_slice(&[0u8; MEM], GuestAddress(0)).unwrap();
    mem.write_slice(&data[..data.len().min(MEM)], GuestAddress(0)).unwrap();
    let mut queues = [queue(0x1000), queue(0x2000)];
    let _ = dev.queue_notified(0, &mut queues, &mem);
    let _ = dev.queue_notified(1, &mut queues, &mem);
    dev.stop();
}

fuzz_target!(|data: &[u8]| {
    match data.first() {
        Some(b) if b & 1 == 0 => server_mode(&data[1..]),
        Some(_) => device_mode(data),
        None => {}
    }
    // The lower layer is read-only, and the overlay stays inside its
    // directories.
    assert_eq!(std::fs::read(dirs().lower.join("file")).unwrap(), b"lower file\n");
    let base = dirs().lower.parent().unwrap().to_path_buf();
    for entry in std::fs::read_dir(&base).unwrap() {
        let name = entry.unwrap().file_name();
        assert!(name == "lower" || name == "upper", "stray {name:?}");
    }
});
