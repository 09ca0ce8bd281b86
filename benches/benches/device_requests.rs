//! Per-request cost of the device models on mock guest memory (no guest,
//! no KVM): one 4 KiB virtio-rng request, one 4 KiB virtio-blk read and
//! write (on a file in the page cache), including popping the chain,
//! validating it, moving the data and completing it.
//!
//! The physical bound next to these: copying 4 KiB in memory takes well
//! under a microsecond on these hosts, so the figures are dominated by
//! chain handling and, for blk, by the pread/pwrite system calls.

use criterion::{criterion_group, criterion_main, Criterion};
use mvm_devices::virtio::rng::Rng;
use mvm_devices::virtio::VirtioDevice;
use mvm_storage::block::Block;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const NEXT: u16 = 1;
const WRITE: u16 = 2;

fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

/// Submit `descs` as one request to `dev`, `iters` times, on a fresh ring
/// each time (the mock ring holds one chain per setup).
fn bench_device(
    c: &mut Criterion,
    name: &str,
    dev: &mut dyn VirtioDevice,
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
            |mut q| dev.process_queue(0, &mut q, &mem).unwrap(),
            criterion::BatchSize::SmallInput,
        )
    });
}

fn devices(c: &mut Criterion) {
    let mut rng = Rng::new();
    bench_device(
        c,
        "virtio-rng 4 KiB request",
        &mut rng,
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
    bench_device(c, "virtio-blk 4 KiB read", &mut disk, &read, &header(0));
    let write = [
        raw(0x4000, 16, NEXT, 1),
        raw(0x8000, 4096, NEXT, 2),
        raw(0x6000, 1, WRITE, 0),
    ];
    bench_device(c, "virtio-blk 4 KiB write", &mut disk, &write, &header(1));
    let _ = std::fs::remove_file(&path);
}

criterion_group!(benches, devices);
criterion_main!(benches);
