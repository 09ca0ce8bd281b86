//! Network interface configuration with the classic ioctls on an AF_INET
//! datagram socket (no netlink: the agent needs an address, a netmask, a
//! default route and the link up, nothing more), and /etc/resolv.conf.

use std::ffi::CString;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::dhcp::Lease;
use crate::sys;

/// A socket for the interface ioctls.
fn ioctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket call.
    let fd = sys::cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: a fresh fd only we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An `ifreq` naming `ifname` (at most 15 bytes, no NUL), the rest zero.
fn ifreq(ifname: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain data; zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    if ifname.is_empty() || ifname.len() >= ifr.ifr_name.len() || ifname.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {ifname:?}"),
        ));
    }
    for (dst, src) in ifr.ifr_name.iter_mut().zip(ifname.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(ifr)
}

/// An IPv4 socket address (port 0) as the generic `sockaddr` the
/// interface and route ioctls take.
fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: both are 16 bytes of plain data; sockaddr_in is how an
    // AF_INET sockaddr is laid out.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// The error with what was being done in front of it.
fn context(what: String) -> impl FnOnce(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("{what}: {}", sys::error_text(&e)))
}

/// `ip link set <ifname> up`.
pub fn set_up(ifname: &str) -> io::Result<()> {
    let sock = ioctl_socket()?;
    let mut ifr = ifreq(ifname)?;
    // SAFETY: a valid ifreq for both ioctls; the flags member is the one
    // SIOC[GS]IFFLAGS use.
    unsafe {
        sys::cvt(libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr))?;
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        sys::cvt(libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr))?;
    }
    Ok(())
}

/// The interface's Ethernet (MAC) address.
pub fn hw_addr(ifname: &str) -> io::Result<[u8; 6]> {
    let sock = ioctl_socket()?;
    let mut ifr = ifreq(ifname)?;
    // SAFETY: a valid ifreq; SIOCGIFHWADDR fills the hwaddr member, which
    // we read as it was written.
    let hw = unsafe {
        sys::cvt(libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut ifr))?;
        ifr.ifr_ifru.ifru_hwaddr
    };
    if hw.sa_family != libc::ARPHRD_ETHER {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("{ifname} is not an Ethernet interface"),
        ));
    }
    let mut mac = [0u8; 6];
    for (dst, src) in mac.iter_mut().zip(hw.sa_data) {
        *dst = src as u8;
    }
    Ok(mac)
}

/// Give `ifname` the lease's address and netmask (the kernel adds the
/// subnet route), a default route via its router, and write its DNS
/// servers and domain to `resolv_conf` (the real one is /etc/resolv.conf).
/// Applying the same lease again changes nothing.
pub fn apply_lease(ifname: &str, lease: &Lease, resolv_conf: &Path) -> io::Result<()> {
    let sock = ioctl_socket()?;
    let fd = sock.as_raw_fd();
    let mut ifr = ifreq(ifname)?;
    ifr.ifr_ifru.ifru_addr = sockaddr(lease.address);
    // SAFETY: a valid ifreq holding an AF_INET address.
    sys::cvt(unsafe { libc::ioctl(fd, libc::SIOCSIFADDR, &ifr) })
        .map_err(context(format!("cannot set {ifname}'s address to {}", lease.address)))?;
    ifr.ifr_ifru.ifru_netmask = sockaddr(lease.netmask());
    // SAFETY: as above. Also recomputes the broadcast address.
    sys::cvt(unsafe { libc::ioctl(fd, libc::SIOCSIFNETMASK, &ifr) })
        .map_err(context(format!("cannot set {ifname}'s netmask to {}", lease.netmask())))?;
    if let Some(router) = lease.router {
        add_default_route(&sock, ifname, router)
            .map_err(context(format!("cannot add a default route via {router}")))?;
    }
    if let Some(text) = resolv_conf_text(ifname, lease) {
        write_file_replacing(resolv_conf, &text).map_err(context(format!("cannot write {}", resolv_conf.display())))?;
    }
    Ok(())
}

/// `ip route add default via <router> dev <ifname>`; an existing default
/// route is left as it is.
fn add_default_route(sock: &OwnedFd, ifname: &str, router: Ipv4Addr) -> io::Result<()> {
    let dev = CString::new(ifname).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: rtentry is plain data (and a null rt_dev); zero is valid.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr(router);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    // The kernel only reads (copies) the name.
    rt.rt_dev = dev.as_ptr().cast_mut();
    // SAFETY: a valid rtentry whose rt_dev outlives the call.
    match sys::cvt(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCADDRT, &rt) }) {
        Err(e) if e.raw_os_error() != Some(libc::EEXIST) => Err(e),
        _ => Ok(()),
    }
}

/// The resolv.conf for a lease, or None when it names no DNS server and
/// no domain (then the file is left alone).
pub fn resolv_conf_text(ifname: &str, lease: &Lease) -> Option<String> {
    if lease.dns.is_empty() && lease.domain.is_none() {
        return None;
    }
    let mut text = format!("# written by mvm-agent from the DHCP lease of {ifname}\n");
    if let Some(domain) = &lease.domain {
        text += &format!("search {domain}\n");
    }
    for server in &lease.dns {
        text += &format!("nameserver {server}\n");
    }
    Some(text)
}

/// Replace `path` with a file holding `text` in one step (a reader sees
/// the old file or the new one). rename(2) replaces a symlink itself, not
/// its target: a link to systemd-resolved's file becomes our own file.
fn write_file_replacing(path: &Path, text: &str) -> io::Result<()> {
    let name = path.file_name().ok_or(io::ErrorKind::InvalidInput)?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".mvm-agent.tmp");
    let tmp = path.with_file_name(tmp_name);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease() -> Lease {
        Lease {
            address: Ipv4Addr::new(10, 213, 0, 17),
            prefix_len: 24,
            router: Some(Ipv4Addr::new(10, 213, 0, 1)),
            dns: vec![Ipv4Addr::new(10, 213, 0, 1), Ipv4Addr::new(9, 9, 9, 9)],
            domain: Some("mvm".into()),
            lease_secs: None,
            server_id: Ipv4Addr::new(10, 213, 0, 1),
        }
    }

    #[test]
    fn resolv_conf_lists_domain_and_servers() {
        assert_eq!(
            resolv_conf_text("eth0", &lease()).unwrap(),
            "# written by mvm-agent from the DHCP lease of eth0\nsearch mvm\nnameserver 10.213.0.1\nnameserver 9.9.9.9\n"
        );
        let bare = Lease {
            dns: vec![],
            domain: None,
            ..lease()
        };
        assert_eq!(resolv_conf_text("eth0", &bare), None);
    }

    #[test]
    fn replaces_a_symlink_not_its_target() {
        let dir = std::env::temp_dir().join(format!("mvm-agent-resolv-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("stub-resolv.conf");
        std::fs::write(&target, "nameserver 127.0.0.53\n").unwrap();
        let path = dir.join("etc/resolv.conf");
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        write_file_replacing(&path, "nameserver 10.213.0.1\n").unwrap();
        assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "nameserver 10.213.0.1\n");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "nameserver 127.0.0.53\n");
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.join("etc")).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_bad_interface_names() {
        for bad in ["", "sixteen-bytes-xx", "a\0b"] {
            assert_eq!(ifreq(bad).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        }
        assert!(ifreq("fifteen-bytes-x").is_ok());
    }

    #[test]
    fn sockaddr_is_network_order() {
        let sa = sockaddr(Ipv4Addr::new(10, 213, 0, 1));
        assert_eq!(sa.sa_family, libc::AF_INET as libc::sa_family_t);
        let bytes: Vec<u8> = sa.sa_data.iter().map(|&b| b as u8).collect();
        assert_eq!(&bytes[..6], &[0, 0, 10, 213, 0, 1]);
    }
}
