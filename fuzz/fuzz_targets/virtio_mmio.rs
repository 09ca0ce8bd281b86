//! Guest input: any sequence of register accesses to a virtio-mmio
//! transport (with the entropy device behind it), guest memory contents
//! chosen by the fuzzer (rings, descriptors), and queue notifications,
//! must never panic; failures end in NEEDS_RESET.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mvm_devices::bus::BusDevice;
use mvm_devices::virtio::mmio::MmioTransport;
use mvm_devices::virtio::rng::Rng;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 0x1_0000;

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    // The first part of the input becomes guest memory (rings, buffers).
    let split = data.len().min(4096);
    mem.write_slice(&data[..split], GuestAddress(0)).unwrap();
    let mut t = MmioTransport::new(Box::new(Rng::new()), mem).unwrap();
    // The rest: operations [kind, offset, value x4].
    for op in data[split..].chunks_exact(6) {
        let offset = u64::from(op[1]) * 4 % 0x140;
        let value = [op[2], op[3], op[4], op[5]];
        match op[0] % 5 {
            0 => t.write(offset, &value),
            1 => {
                let mut buf = [0u8; 4];
                t.read(offset, &mut buf);
            }
            2 => t.write(offset, &value[..usize::from(op[2] % 5)]),
            3 => t.process_queue(usize::from(op[3] % 2)),
            _ => {
                let mut buf = vec![0u8; usize::from(op[2] % 9)];
                t.read(offset + u64::from(op[3] % 4), &mut buf);
            }
        }
    }
});
