//! Guest input: virtio-net transmit and receive queues in fuzzer-chosen
//! guest memory (rings at fixed places, descriptors and buffers chosen by
//! the fuzzer), with a received frame also from the input, must never
//! panic: requests complete or the device fails.
//!
//! The rings sit in the first 1.5 KiB (transmit at 0x0, receive at 0x300),
//! where inputs of libFuzzer's default size reach: placed at 0x1000 and
//! above, no input under 4 KiB had a descriptor, and a 5-minute campaign
//! covered only the header parsing.
#![no_main]
use std::os::fd::AsRawFd;

use libfuzzer_sys::fuzz_target;
use mvm_devices::virtio::VirtioDevice;
use mvm_fuzz::queue;
use mvm_net::device::Net;
use mvm_net::socket::SocketFrames;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
    let (frame_len, rest) = (usize::from(u16::from_le_bytes([data[0], data[1]])) % 2048, &data[4..]);
    mem.write_slice(&rest[..rest.len().min(0x1_0000)], GuestAddress(0))
        .unwrap();
    let (io, peer) = SocketFrames::pair().unwrap();
    let mut net = Net::new(io, [2, 0, 0, 0, 0, 1]);
    if data[2] & 1 == 1 {
        net.ack_features(net.features());
    }
    let frame: Vec<u8> = rest.iter().copied().cycle().take(frame_len).collect();
    // SAFETY: sends from a valid buffer.
    unsafe { libc::send(peer.as_raw_fd(), frame.as_ptr().cast(), frame.len(), libc::MSG_DONTWAIT) };
    let mut queues = [queue(0x300), queue(0x0)];
    let _ = net.process_queue(1, &mut queues[1], &mem);
    let _ = net.process_event(0, &mut queues, &mem);
    let _ = net.process_queue(0, &mut queues[0], &mem);
});
