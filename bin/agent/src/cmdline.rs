//! The agent's settings from the kernel command line (`mvm.*` words).
//!
//! ```text
//! mvm.hostname=<name>        the guest's host name (default "mvm")
//! mvm.root=volume|tmpfs      switch to an overlayfs root: the ext4 image on
//!                            the disk with serial "mvm-root" (read-only)
//!                            under a writable layer on the disk with serial
//!                            "vol-root" (ext4) or in tmpfs
//! mvm.share=<tag>:<dir>      mount virtio-fs <tag> on <dir> (repeatable)
//! mvm.volume=<name>:<dir>    mount the virtio-blk disk with serial
//!                            "vol-<name>" (ext4) on <dir> (repeatable)
//! mvm.dhcp=<ifname>          configure network interface <ifname> by
//!                            DHCPv4 (address, default route, DNS;
//!                            repeatable)
//! mvm.user=<name>:<uid>:<gid> the VM's user: created at boot if missing,
//!                            and who `Exec`s run as by default
//! ```
//!
//! The host writes these, but a bad value must not take the guest down: it
//! is logged and skipped.

pub use crate::passwd::UserSpec;

/// A virtio-fs share to mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    pub tag: String,
    pub dir: String,
}

/// An ext4 volume (virtio-blk disk found by its serial) to mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub name: String,
    pub dir: String,
}

/// Where an image root's writes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootUpper {
    Volume,
    Tmpfs,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub hostname: String,
    /// Boot from the root image, with this writable layer.
    pub root: Option<RootUpper>,
    pub shares: Vec<Share>,
    pub volumes: Vec<Volume>,
    /// Network interfaces to configure by DHCP, in order.
    pub dhcp: Vec<String>,
    /// The VM's user (its account is made at boot).
    pub user: Option<UserSpec>,
}

pub const DEFAULT_HOSTNAME: &str = "mvm";

impl Default for Config {
    fn default() -> Self {
        Config {
            hostname: DEFAULT_HOSTNAME.into(),
            root: None,
            shares: Vec::new(),
            volumes: Vec::new(),
            dhcp: Vec::new(),
            user: None,
        }
    }
}

impl Config {
    /// Parse a kernel command line; returns the settings and one message
    /// per word that was refused (for the log).
    pub fn parse(cmdline: &str) -> (Config, Vec<String>) {
        let mut config = Config::default();
        let mut problems = Vec::new();
        for word in cmdline.split_ascii_whitespace() {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            let result = match key {
                "mvm.hostname" => check_hostname(value).map(|h| config.hostname = h.into()),
                "mvm.root" => parse_root(value).map(|r| config.root = Some(r)),
                "mvm.share" => split_pair(value, "tag").map(|(tag, dir)| {
                    config.shares.push(Share {
                        tag: tag.into(),
                        dir: dir.into(),
                    })
                }),
                "mvm.volume" => split_pair(value, "name")
                    .and_then(|(name, dir)| check_volume_name(name).map(|()| (name, dir)))
                    .map(|(name, dir)| {
                        config.volumes.push(Volume {
                            name: name.into(),
                            dir: dir.into(),
                        })
                    }),
                "mvm.dhcp" => check_ifname(value).map(|name| config.dhcp.push(name.into())),
                "mvm.user" => UserSpec::parse(value).map(|u| config.user = Some(u)),
                k if k.starts_with("mvm.") => Err("unknown setting".into()),
                _ => Ok(()),
            };
            if let Err(why) = result {
                problems.push(format!("kernel command line: ignoring {word:?}: {why}"));
            }
        }
        (config, problems)
    }

    /// Where a program runs when the host names no directory: the first
    /// share (the project).
    pub fn project_dir(&self) -> Option<&str> {
        self.shares.first().map(|s| s.dir.as_str())
    }
}

/// `<first>:<dir>`, both checked.
fn split_pair<'a>(value: &'a str, what: &str) -> Result<(&'a str, &'a str), String> {
    let (first, dir) = value
        .split_once(':')
        .ok_or_else(|| format!("expected <{what}>:<directory>"))?;
    if first.is_empty() {
        return Err(format!("empty {what}"));
    }
    check_dir(dir)?;
    Ok((first, dir))
}

/// A mount point: absolute, not `/` itself, no `..` (nothing that could
/// land on top of the system's own directories by accident).
pub fn check_dir(dir: &str) -> Result<(), String> {
    if !dir.starts_with('/') {
        return Err(format!("directory {dir:?} is not absolute"));
    }
    if dir.split('/').any(|c| c == "..") {
        return Err(format!("directory {dir:?} contains \"..\""));
    }
    if dir.split('/').all(|c| c.is_empty() || c == ".") {
        return Err("cannot mount on /".into());
    }
    Ok(())
}

fn parse_root(value: &str) -> Result<RootUpper, String> {
    match value {
        "volume" => Ok(RootUpper::Volume),
        "tmpfs" => Ok(RootUpper::Tmpfs),
        _ => Err("expected \"volume\" or \"tmpfs\"".into()),
    }
}

fn check_hostname(name: &str) -> Result<&str, String> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if name.is_empty() || name.len() > 64 || !ok_chars {
        return Err("a host name is 1 to 64 letters, digits, '-' or '.'".into());
    }
    Ok(name)
}

/// A network interface name as Linux accepts it (`dev_valid_name`; the
/// kernel's isspace() also counts \v and 0xa0).
pub fn check_ifname(name: &str) -> Result<&str, String> {
    let bad_char = name
        .bytes()
        .any(|b| matches!(b, b'/' | b':' | 0 | 0x0b | 0xa0) || b.is_ascii_whitespace());
    if name.is_empty() || name.len() > 15 || name == "." || name == ".." || bad_char {
        return Err("an interface name is 1 to 15 bytes, not \".\" or \"..\", without '/', ':' or spaces".into());
    }
    Ok(name)
}

fn check_volume_name(name: &str) -> Result<(), String> {
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
        return Err("a volume name is letters, digits, '-', '_' or '.'".into());
    }
    Ok(())
}

/// The virtio-blk serial of the root image.
pub const ROOT_SERIAL: &str = "mvm-root";
/// The volume that holds an image root's writable layer.
pub const ROOT_VOLUME: &str = "root";

/// The virtio-blk serial the host gives volume `name` (the device holds at
/// most 20 bytes of it).
pub fn volume_serial(name: &str) -> String {
    let mut s = format!("vol-{name}");
    s.truncate(20);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hostname_shares_and_volumes() {
        let (c, problems) = Config::parse(
            "console=ttyS0 quiet mvm.hostname=myapp mvm.root=tmpfs mvm.share=project:/project \
             mvm.share=cache:/var/cache/x mvm.volume=data:/var/lib/data mvm.dhcp=eth0 mvm.dhcp=enp0s1.100 \
             mvm.user=dev:1234:1235 rdinit=/sbin/mvm-agent\n",
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(c.hostname, "myapp");
        assert_eq!(c.root, Some(RootUpper::Tmpfs));
        assert_eq!(Config::parse("mvm.root=volume").0.root, Some(RootUpper::Volume));
        assert_eq!(
            c.shares,
            vec![
                Share {
                    tag: "project".into(),
                    dir: "/project".into()
                },
                Share {
                    tag: "cache".into(),
                    dir: "/var/cache/x".into()
                },
            ]
        );
        assert_eq!(
            c.volumes,
            vec![Volume {
                name: "data".into(),
                dir: "/var/lib/data".into()
            }]
        );
        assert_eq!(c.project_dir(), Some("/project"));
        assert_eq!(c.dhcp, ["eth0", "enp0s1.100"]);
        assert_eq!(c.user.as_ref().map(|u| u.to_string()).as_deref(), Some("dev:1234:1235"));
    }

    #[test]
    fn defaults_without_settings() {
        let (c, problems) = Config::parse("console=ttyS0 root=/dev/vda");
        assert!(problems.is_empty());
        assert_eq!(c, Config::default());
        assert_eq!(c.hostname, "mvm");
        assert_eq!(c.project_dir(), None);
    }

    #[test]
    fn refuses_bad_values() {
        for bad in [
            "mvm.share=project:relative",
            "mvm.share=:/x",
            "mvm.share=project",
            "mvm.share=project:/a/../etc",
            "mvm.share=project:/",
            "mvm.share=project://.",
            "mvm.share=project:",
            "mvm.volume=:/data",
            "mvm.volume=da/ta:/data",
            "mvm.volume=data:data",
            "mvm.hostname=",
            "mvm.hostname=bad_name!",
            "mvm.root=",
            "mvm.root=disk",
            "mvm.frobnicate=1",
            "mvm.dhcp=",
            "mvm.dhcp=.",
            "mvm.dhcp=..",
            "mvm.dhcp=eth0:1",
            "mvm.dhcp=a/b",
            "mvm.dhcp=sixteen-bytes-xx",
            "mvm.user=",
            "mvm.user=dev",
            "mvm.user=dev:0:0",
            "mvm.user=root:1:1",
            "mvm.user=-dev:1:1",
            "mvm.user=dev:1:x",
        ] {
            let (c, problems) = Config::parse(bad);
            assert_eq!(c, Config::default(), "{bad}");
            assert_eq!(problems.len(), 1, "{bad}");
        }
        let long = format!("mvm.hostname={}", "a".repeat(65));
        assert_eq!(Config::parse(&long).1.len(), 1);
        // A good word after a bad one still counts.
        let (c, problems) = Config::parse("mvm.share=x:y mvm.share=p:/p");
        assert_eq!(problems.len(), 1);
        assert_eq!(c.project_dir(), Some("/p"));
    }

    #[test]
    fn checks_interface_names() {
        for good in ["eth0", "a", "...", "fifteen-bytes-x", "br-0.1_x", "é"] {
            assert_eq!(check_ifname(good), Ok(good), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "sixteen-bytes-xx",
            "a:b",
            "a/b",
            "a\tb",
            "a\nb",
            "a\x0bb",
            "a\0",
            "\u{e0}",
        ] {
            assert!(check_ifname(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn volume_serial_fits_the_device_field() {
        assert_eq!(volume_serial("data"), "vol-data");
        assert_eq!(volume_serial("a-very-long-volume-name"), "vol-a-very-long-volu");
    }
}
