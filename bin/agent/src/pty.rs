//! Pseudo-terminals for `Exec` with a tty.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::sys::cvt;

/// A new PTY pair, both ends close-on-exec (so no other session's child
/// inherits them): (master, slave).
pub fn open() -> io::Result<(OwnedFd, OwnedFd)> {
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: constant NUL-terminated path.
    let master = cvt(unsafe { libc::open(c"/dev/ptmx".as_ptr(), flags) })?;
    // SAFETY: a fresh fd only we own.
    let master = unsafe { OwnedFd::from_raw_fd(master) };
    // SAFETY: no memory arguments.
    cvt(unsafe { libc::unlockpt(master.as_raw_fd()) })?;
    // TIOCGPTPEER (Linux 4.13) opens the slave without a path lookup.
    // SAFETY: the ioctl takes open flags by value.
    let slave = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags) };
    let slave = if slave >= 0 {
        slave
    } else {
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: the buffer is valid for its length.
        let rc = unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        // SAFETY: ptsname_r NUL-terminated the buffer.
        let path = unsafe { CStr::from_ptr(name.as_ptr()) };
        // SAFETY: valid path.
        cvt(unsafe { libc::open(path.as_ptr(), flags) })?
    };
    // SAFETY: a fresh fd only we own.
    Ok((master, unsafe { OwnedFd::from_raw_fd(slave) }))
}

/// Set the terminal size (the kernel signals SIGWINCH to the foreground
/// process group when it changes).
pub fn set_size(fd: &impl AsRawFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: valid pointer to a winsize.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_a_pair_with_a_size() {
        let (master, slave) = open().unwrap();
        set_size(&master, 33, 99).unwrap();
        let mut ws = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        assert_eq!(unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) }, 0);
        assert_eq!((ws.ws_row, ws.ws_col), (33, 99));
        let fl = unsafe { libc::fcntl(slave.as_raw_fd(), libc::F_GETFD) };
        assert_ne!(fl & libc::FD_CLOEXEC, 0);
    }
}
