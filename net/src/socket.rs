//! [`SocketFrames`]: a [`FrameIo`] over one end of a Unix `SOCK_SEQPACKET`
//! socket pair, which keeps frame boundaries as a TAP does. It carries
//! frames where no TAP can be made (unit tests, fuzzing, benchmarks) or to
//! a userspace switch holding the other end.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::device::FrameIo;

pub struct SocketFrames {
    fd: OwnedFd,
}

impl SocketFrames {
    /// A connected pair: the device's end and the peer's (blocking) descriptor.
    pub fn pair() -> io::Result<(SocketFrames, OwnedFd)> {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two descriptors into the array.
        if unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        } != 0
        {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors are new and owned from here on.
        let (ours, peer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok((SocketFrames { fd: ours }, peer))
    }
}

impl FrameIo for SocketFrames {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: receives into a valid buffer of the given length.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: sends from a valid buffer of the given length.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The peer receives whatever the guest's features allow; nothing to set.
    fn set_offload(&mut self, _flags: u32) -> io::Result<()> {
        Ok(())
    }
}
