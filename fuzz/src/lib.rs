//! Helpers shared by the fuzz targets.

use virtio_queue::{Queue, QueueT};

/// A ready 16-entry split queue whose descriptor table, available ring and
/// used ring sit at `base`, `base + 0x100` and `base + 0x200` of the
/// fuzzer-written guest memory.
pub fn queue(base: u32) -> Queue {
    let mut q = Queue::new(16).expect("16 is a valid queue size");
    q.set_size(16);
    q.set_desc_table_address(Some(base), Some(0));
    q.set_avail_ring_address(Some(base + 0x100), Some(0));
    q.set_used_ring_address(Some(base + 0x200), Some(0));
    q.set_ready(true);
    q
}
