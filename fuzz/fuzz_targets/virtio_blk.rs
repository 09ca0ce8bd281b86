//! Guest input: virtio-blk requests built from fuzzer bytes (guest memory
//! with a queue of 16 entries at fixed places: descriptors, avail ring and
//! the buffers they point to, all chosen by the fuzzer) must complete with
//! a status or fail the device, never panic, and never write outside the
//! disk image.
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mvm_devices::virtio::VirtioDevice;
use mvm_storage::block::Block;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 0x1_0000;
const DISK: i64 = 64 * 1024;

/// An in-memory disk image (memfd), reached through /proc/self/fd.
fn disk_path() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| {
        // SAFETY: plain syscalls on a fresh descriptor.
        let fd = unsafe { libc::memfd_create(c"fuzz-disk".as_ptr(), 0) };
        assert!(fd >= 0 && unsafe { libc::ftruncate(fd, DISK) } == 0);
        format!("/proc/self/fd/{fd}")
    })
}

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    mem.write_slice(&data[..data.len().min(MEM)], GuestAddress(0)).unwrap();
    let read_only = data.first().is_some_and(|b| b & 1 == 1);
    let mut dev = Block::open(std::path::Path::new(disk_path()), read_only, "fuzz").unwrap();
    let mut q = Queue::new(16).unwrap();
    q.set_size(16);
    q.set_desc_table_address(Some(0x1000), Some(0));
    q.set_avail_ring_address(Some(0x2000), Some(0));
    q.set_used_ring_address(Some(0x3000), Some(0));
    q.set_ready(true);
    let _ = dev.process_queue(0, &mut q, &mem);
    let meta = std::fs::metadata(disk_path()).unwrap();
    assert_eq!(meta.len(), DISK as u64, "the image never grows");
});
