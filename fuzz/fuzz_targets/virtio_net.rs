//! Guest input: virtio-net transmit and receive queues in fuzzer-chosen
//! guest memory (rings at fixed places, descriptors and buffers chosen by
//! the fuzzer), with a received frame also from the input, must never
//! panic: requests complete or the device fails.
#![no_main]
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use libfuzzer_sys::fuzz_target;
use mvm_devices::virtio::VirtioDevice;
use mvm_fuzz::queue;
use mvm_net::device::{FrameIo, Net};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// One end of a datagram socket pair, standing in for the TAP.
struct Wire(OwnedFd);

impl FrameIo for Wire {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: reads into a valid buffer.
        let n = unsafe {
            libc::recv(
                self.0.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: sends from a valid buffer.
        let n = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
    fn raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
    fn set_offload(&mut self, _flags: u32) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
    let (frame_len, rest) = (usize::from(u16::from_le_bytes([data[0], data[1]])) % 2048, &data[4..]);
    mem.write_slice(&rest[..rest.len().min(0x1_0000)], GuestAddress(0))
        .unwrap();
    let mut fds = [0; 2];
    // SAFETY: socketpair into a two-element array.
    assert_eq!(
        unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, fds.as_mut_ptr()) },
        0
    );
    // SAFETY: both descriptors are new and ours.
    let (dev, peer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let mut net = Net::new(Wire(dev), [2, 0, 0, 0, 0, 1]);
    if data[2] & 1 == 1 {
        net.ack_features(net.features());
    }
    let frame: Vec<u8> = rest.iter().copied().cycle().take(frame_len).collect();
    // SAFETY: sends from a valid buffer.
    unsafe { libc::send(peer.as_raw_fd(), frame.as_ptr().cast(), frame.len(), libc::MSG_DONTWAIT) };
    let mut queues = [queue(0x1000), queue(0x2000)];
    let _ = net.process_queue(1, &mut queues[1], &mem);
    let _ = net.process_event(0, &mut queues, &mem);
    let _ = net.process_queue(0, &mut queues[0], &mem);
});
