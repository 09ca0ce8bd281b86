//! A Linux TAP device with a virtio-net header on every frame, created by
//! name or taken over when it already exists.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::device::{FrameIo, VNET_HDR_LEN};
use crate::Error;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// Sets the TAP's offloads (the VMM's seccomp filters allow it by number).
pub const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
const SIOCGIFINDEX: libc::c_ulong = 0x8933;
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

#[repr(C)]
#[derive(Clone, Copy)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> Result<Self, Error> {
        crate::check_interface_name(name).map_err(|_| Error::Name(name.to_string()))?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        Ok(req)
    }

    fn set_short(&mut self, v: i16) {
        self.data[..2].copy_from_slice(&v.to_ne_bytes());
    }

    fn short(&self) -> i16 {
        i16::from_ne_bytes([self.data[0], self.data[1]])
    }

    fn int(&self) -> i32 {
        i32::from_ne_bytes([self.data[0], self.data[1], self.data[2], self.data[3]])
    }
}

fn ioctl(fd: RawFd, request: libc::c_ulong, arg: *mut libc::c_void) -> io::Result<()> {
    // SAFETY: every caller passes a request with a pointer to the argument
    // type that request expects (an ifreq or an integer).
    if unsafe { libc::ioctl(fd, request, arg) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// An open TAP device.
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Create the TAP `name`, or attach to it if it exists (a persistent
    /// TAP made by `ip tuntap add ... vnet_hdr`), with virtio-net headers.
    pub fn open(name: &str) -> Result<Tap, Error> {
        let fail = |what: &'static str| {
            let name = name.to_string();
            move |source| Error::Tap { name, what, source }
        };
        let mut req = IfReq::new(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(fail("opening /dev/net/tun"))?;
        req.set_short(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
        ioctl(file.as_raw_fd(), TUNSETIFF, (&mut req as *mut IfReq).cast()).map_err(fail("TUNSETIFF"))?;
        let mut hdr_len = VNET_HDR_LEN as libc::c_int;
        ioctl(
            file.as_raw_fd(),
            TUNSETVNETHDRSZ,
            (&mut hdr_len as *mut libc::c_int).cast(),
        )
        .map_err(fail("TUNSETVNETHDRSZ"))?;
        let tap = Tap {
            file,
            name: name.to_string(),
        };
        tap.set_up().map_err(fail("bringing the interface up"))?;
        Ok(tap)
    }

    /// Take over a TAP another process opened and passed on (a privileged
    /// parent of an unprivileged VMM): `fd` must be attached to a TAP
    /// with virtio-net headers and no packet information, as
    /// [`Tap::open`] makes it; the kernel says which (TUNGETIFF).
    pub fn from_fd(fd: std::os::fd::OwnedFd) -> Result<Tap, Error> {
        let file = File::from(fd);
        let raw = file.as_raw_fd();
        let fail = |what: &'static str| {
            move |source| Error::Tap {
                name: format!("(descriptor {raw})"),
                what,
                source,
            }
        };
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        ioctl(file.as_raw_fd(), TUNGETIFF, (&mut req as *mut IfReq).cast())
            .map_err(fail("TUNGETIFF (is it a TAP descriptor?)"))?;
        let wanted = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if req.short() & wanted != wanted {
            return Err(fail("checking its flags")(io::Error::other(format!(
                "flags {:#x}: a TAP with IFF_NO_PI and IFF_VNET_HDR is needed",
                req.short()
            ))));
        }
        let len = req.name.iter().position(|&b| b == 0).unwrap_or(libc::IFNAMSIZ);
        let name = String::from_utf8_lossy(&req.name[..len]).into_owned();
        // SAFETY: fcntl on a descriptor we own.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        // SAFETY: as above; the device reads and writes without blocking.
        if flags < 0 || unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(fail("making it non-blocking")(io::Error::last_os_error()));
        }
        Ok(Tap { file, name })
    }

    /// The descriptor, to hand to another process ([`Tap::from_fd`]).
    pub fn into_fd(self) -> std::os::fd::OwnedFd {
        self.file.into()
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn control_socket() -> io::Result<File> {
        // SAFETY: a plain datagram socket for interface ioctls.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: we own the new descriptor.
        Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
    }

    fn set_up(&self) -> io::Result<()> {
        let sock = Self::control_socket()?;
        let mut req = IfReq::new(&self.name).map_err(|e| io::Error::other(e.to_string()))?;
        ioctl(sock.as_raw_fd(), SIOCGIFFLAGS, (&mut req as *mut IfReq).cast())?;
        let flags = req.short() | libc::IFF_UP as i16;
        req.set_short(flags);
        ioctl(sock.as_raw_fd(), SIOCSIFFLAGS, (&mut req as *mut IfReq).cast())
    }

    /// Add this TAP to the Linux bridge `bridge`.
    pub fn attach_to_bridge(&self, bridge: &str) -> Result<(), Error> {
        let fail = |source| Error::Bridge {
            bridge: bridge.to_string(),
            tap: self.name.clone(),
            source,
        };
        let sock = Self::control_socket().map_err(fail)?;
        let mut req = IfReq::new(&self.name)?;
        ioctl(sock.as_raw_fd(), SIOCGIFINDEX, (&mut req as *mut IfReq).cast()).map_err(fail)?;
        let index = req.int();
        let mut breq = IfReq::new(bridge)?;
        breq.data[..4].copy_from_slice(&index.to_ne_bytes());
        ioctl(sock.as_raw_fd(), SIOCBRADDIF, (&mut breq as *mut IfReq).cast()).map_err(fail)
    }
}

impl FrameIo for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        let n = self.file.write(frame)?;
        if n != frame.len() {
            return Err(io::Error::other(format!("TAP took {n} of {} bytes", frame.len())));
        }
        Ok(())
    }

    fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        ioctl(
            self.file.as_raw_fd(),
            TUNSETOFFLOAD,
            flags as usize as *mut libc::c_void,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(matches!(IfReq::new(""), Err(Error::Name(_))));
        assert!(matches!(IfReq::new("a-very-long-name0"), Err(Error::Name(_))));
        assert!(IfReq::new("tap0").is_ok());
        assert!(matches!(Tap::open("x\0y"), Err(Error::Name(_))));
    }

    /// A TAP passed on as a descriptor is taken over with its name; a
    /// descriptor that is not a TAP is refused.
    #[test]
    fn from_fd_takes_over_a_tap_and_refuses_others() {
        crate::host::testing::in_new_netns(|| {
            let tap = Tap::open("mvmfd0").unwrap();
            let dup: std::os::fd::OwnedFd = tap.file.try_clone().unwrap().into();
            let taken = Tap::from_fd(dup).unwrap();
            assert_eq!(taken.name(), "mvmfd0");
            let null: std::os::fd::OwnedFd = File::open("/dev/null").unwrap().into();
            let e = Tap::from_fd(null).err().unwrap();
            assert!(e.to_string().contains("TUNGETIFF"), "{e}");
        });
    }
}
