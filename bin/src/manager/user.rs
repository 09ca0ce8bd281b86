//! The VM's user: who `mvm shell` and `mvm exec` run as in the guest.
//!
//! It has the host user's name, uid and gid, so that the project's files
//! (which the share shows with their host owners) belong to it, the files
//! it creates in the share belong to the host user, and git trusts the
//! repository. It is stored in the definition as the kernel command line
//! word `mvm.user=<name>:<uid>:<gid>`; the guest agent creates the account
//! at boot. A definition without the word (older ones, or `--user root`)
//! has no user: programs run as root.

use std::ffi::{CStr, CString};
use std::path::Path;
use std::str::FromStr;

use serde::Serialize;

use crate::{Error, Result};

/// The kernel command line key.
pub const USER_KEY: &str = "mvm.user";

/// A guest user: name, uid, gid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GuestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl std::fmt::Display for GuestUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.name, self.uid, self.gid)
    }
}

/// Who a new VM's user is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum UserChoice {
    /// The host user who creates it ([`default_user`]).
    #[default]
    Caller,
    /// None: programs run as root (`--user root`).
    Root,
    /// This one (`--user NAME[:UID[:GID]]`).
    User(GuestUser),
}

impl FromStr for UserChoice {
    type Err = Error;

    /// `root`, or `NAME[:UID[:GID]]`; a missing uid or gid comes from the
    /// host's account of that name.
    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: String| {
            Error::Usage(format!(
                "--user {s:?}: {why}; expected NAME[:UID[:GID]], e.g. dev:1000:1000"
            ))
        };
        let mut parts = s.split(':');
        let name = parts.next().unwrap_or_default();
        let uid = parts.next();
        let gid = parts.next();
        if parts.next().is_some() {
            return Err(bad("too many ':'".into()));
        }
        if name == "root" && uid.is_none_or(|u| u == "0") && gid.is_none_or(|g| g == "0") {
            return Ok(UserChoice::Root);
        }
        mvm_agent::passwd::check_user_name(name).map_err(bad)?;
        let id = |text: &str, what: &str| -> Result<u32> {
            text.parse::<u32>()
                .ok()
                .filter(|&n| n != u32::MAX)
                .ok_or_else(|| bad(format!("{what} {text:?} is not a number from 0 to 4294967294")))
        };
        let host = || host_user_by_name(name);
        let uid = match uid {
            Some(u) => id(u, "uid")?,
            None => {
                host()
                    .ok_or_else(|| bad(format!("the host has no user {name:?} to take the uid from")))?
                    .uid
            }
        };
        let gid = match gid {
            Some(g) => id(g, "gid")?,
            None => host().filter(|h| h.uid == uid).map_or(uid, |h| h.gid),
        };
        let user = GuestUser {
            name: name.into(),
            uid,
            gid,
        };
        check(&user).map_err(bad)?;
        Ok(UserChoice::User(user))
    }
}

/// The rules the guest agent applies too (it ignores a user that breaks
/// them): uid and gid 0 are root's.
fn check(user: &GuestUser) -> std::result::Result<(), String> {
    if user.name == "root" {
        return Err("root is the guest's root already (use --user root for no user)".into());
    }
    if user.uid == 0 {
        return Err(format!("uid 0 is root's; {} needs another uid", user.name));
    }
    if user.gid == 0 {
        return Err(format!("gid 0 is root's group; {} needs another gid", user.name));
    }
    Ok(())
}

impl UserChoice {
    /// The user to give a VM over `project`, if any.
    pub fn resolve(&self, project: Option<&Path>) -> Result<Option<GuestUser>> {
        match self {
            UserChoice::Root => Ok(None),
            UserChoice::User(u) => Ok(Some(u.clone())),
            UserChoice::Caller => default_user(&Environment::current(), project),
        }
    }
}

/// What [`default_user`] looks at (a test gives its own).
#[derive(Debug, Clone, Default)]
pub struct Environment {
    pub uid: u32,
    pub gid: u32,
    pub sudo_user: Option<String>,
    pub sudo_uid: Option<String>,
    pub sudo_gid: Option<String>,
}

impl Environment {
    pub fn current() -> Environment {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Environment {
            // SAFETY: getuid/getgid have no preconditions.
            uid: unsafe { libc::getuid() },
            gid: unsafe { libc::getgid() },
            sudo_user: var("SUDO_USER"),
            sudo_uid: var("SUDO_UID"),
            sudo_gid: var("SUDO_GID"),
        }
    }
}

/// The default user of a new VM:
/// 1. under sudo, the user who ran sudo (`SUDO_USER`, `SUDO_UID`,
///    `SUDO_GID`), unless that is root;
/// 2. else the calling user, unless it is root;
/// 3. else (root itself) the owner of the project directory, unless
///    root owns it or the host has no name for its uid: the project's
///    files then belong to the guest user, as on the host;
/// 4. else none (programs run as root, who owns the project anyway).
pub fn default_user(env: &Environment, project: Option<&Path>) -> Result<Option<GuestUser>> {
    let sudo_uid = env.sudo_uid.as_deref().and_then(|u| u.parse::<u32>().ok());
    if let (Some(name), Some(uid)) = (&env.sudo_user, sudo_uid) {
        if uid != 0 && name != "root" {
            let gid = env
                .sudo_gid
                .as_deref()
                .and_then(|g| g.parse::<u32>().ok())
                .or_else(|| host_user_by_uid(uid).map(|h| h.gid))
                .unwrap_or(uid);
            return named(name.clone(), uid, gid, "SUDO_USER").map(Some);
        }
    }
    if env.uid != 0 {
        let name = host_user_by_uid(env.uid).map(|h| h.name).ok_or_else(|| {
            Error::Usage(format!(
                "uid {} has no name on this host; name the VM's user with --user NAME:UID:GID",
                env.uid
            ))
        })?;
        return named(name, env.uid, env.gid, "your user").map(Some);
    }
    if let Some(project) = project {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(project).map_err(Error::io(format!("cannot stat {}", project.display())))?;
        if meta.uid() != 0 {
            if let Some(host) = host_user_by_uid(meta.uid()) {
                return named(host.name, meta.uid(), host.gid, "the project's owner").map(Some);
            }
        }
    }
    Ok(None)
}

fn named(name: String, uid: u32, gid: u32, whose: &str) -> Result<GuestUser> {
    let user = GuestUser { name, uid, gid };
    mvm_agent::passwd::check_user_name(&user.name)
        .and_then(|()| check(&user))
        .map_err(|why| {
            Error::Usage(format!(
                "{whose} cannot be the VM's user ({why}); choose one with --user NAME:UID:GID, or --user root"
            ))
        })?;
    Ok(user)
}

/// A host account (through the C library: NSS, LDAP and all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

pub fn host_user_by_uid(uid: u32) -> Option<HostUser> {
    getpw(|pwd, buf, result| {
        // SAFETY: every pointer is valid for the call; buf's length is given.
        unsafe { libc::getpwuid_r(uid, pwd, buf.as_mut_ptr(), buf.len(), result) }
    })
}

pub fn host_user_by_name(name: &str) -> Option<HostUser> {
    let c = CString::new(name).ok()?;
    getpw(|pwd, buf, result| {
        // SAFETY: as above; `c` is a valid C string.
        unsafe { libc::getpwnam_r(c.as_ptr(), pwd, buf.as_mut_ptr(), buf.len(), result) }
    })
}

fn getpw(
    call: impl Fn(*mut libc::passwd, &mut [libc::c_char], *mut *mut libc::passwd) -> libc::c_int,
) -> Option<HostUser> {
    let mut size = 1024;
    loop {
        let mut buf = vec![0 as libc::c_char; size];
        // SAFETY: passwd is plain old data; zeroes are a valid value.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = call(&mut pwd, &mut buf, &mut result);
        if rc == libc::ERANGE && size < (1 << 20) {
            size *= 4;
            continue;
        }
        if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
            return None;
        }
        // SAFETY: getpw*_r filled pw_name with a C string in `buf`.
        let name = unsafe { CStr::from_ptr(pwd.pw_name) }.to_str().ok()?.to_string();
        return Some(HostUser {
            name,
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
        });
    }
}

/// The user a kernel command line names (`None` when it has no valid
/// `mvm.user=` word; the last valid one counts, as in the guest).
pub fn from_cmdline(cmdline: &str) -> Option<GuestUser> {
    let spec = cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("mvm.user="))
        .filter_map(|v| mvm_agent::passwd::UserSpec::parse(v).ok())
        .next_back()?;
    Some(GuestUser {
        name: spec.name,
        uid: spec.uid,
        gid: spec.gid,
    })
}

/// `cmdline` with `mvm.user=` set to `user` (replacing any other).
pub fn with_user(cmdline: &str, user: &GuestUser) -> String {
    let mut words: Vec<String> = cmdline
        .split_whitespace()
        .filter(|w| !w.starts_with("mvm.user="))
        .map(str::to_string)
        .collect();
    words.push(format!("{USER_KEY}={user}"));
    words.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, uid: u32, gid: u32) -> GuestUser {
        GuestUser {
            name: name.into(),
            uid,
            gid,
        }
    }

    #[test]
    fn parses_the_option() {
        assert_eq!(
            "dev:1234:1235".parse::<UserChoice>().unwrap(),
            UserChoice::User(user("dev", 1234, 1235))
        );
        // The gid defaults to the uid when the host does not know the name.
        assert_eq!(
            "nosuchuser-mvm:1234".parse::<UserChoice>().unwrap(),
            UserChoice::User(user("nosuchuser-mvm", 1234, 1234))
        );
        // From the host's account (every host has `nobody`).
        assert_eq!(
            "nobody".parse::<UserChoice>().unwrap(),
            UserChoice::User(user("nobody", 65534, 65534))
        );
        assert_eq!("root".parse::<UserChoice>().unwrap(), UserChoice::Root);
        assert_eq!("root:0:0".parse::<UserChoice>().unwrap(), UserChoice::Root);
        for (bad, want) in [
            ("dev:0:1", "uid 0 is root's"),
            ("dev:1:0", "gid 0 is root's"),
            ("root:5", "root is the guest's root"),
            ("dev:x", "uid \"x\""),
            ("dev:1:2:3", "too many"),
            ("-dev:1", "not starting with '-'"),
            ("a b:1", "a user name is"),
            ("", "a user name is"),
            ("nosuchuser-mvm", "the host has no user"),
            ("dev:4294967295", "not a number"),
        ] {
            let e = bad.parse::<UserChoice>().unwrap_err().to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn default_user_rules() {
        let sudo = Environment {
            uid: 0,
            gid: 0,
            sudo_user: Some("alice".into()),
            sudo_uid: Some("1000".into()),
            sudo_gid: Some("1001".into()),
        };
        assert_eq!(default_user(&sudo, None).unwrap(), Some(user("alice", 1000, 1001)));
        // sudo from root: root.
        let sudo_root = Environment {
            sudo_user: Some("root".into()),
            sudo_uid: Some("0".into()),
            ..Default::default()
        };
        assert_eq!(default_user(&sudo_root, None).unwrap(), None);
        // A plain user: its name from the host.
        let nobody = Environment {
            uid: 65534,
            gid: 65534,
            ..Default::default()
        };
        assert_eq!(default_user(&nobody, None).unwrap(), Some(user("nobody", 65534, 65534)));
        let nameless = Environment {
            uid: 3_999_999,
            gid: 5,
            ..Default::default()
        };
        assert!(default_user(&nameless, None)
            .unwrap_err()
            .to_string()
            .contains("--user"));
        // Root: the project's owner, when it is not root and has a name.
        let root = Environment::default();
        let dir = std::env::temp_dir().join(format!("mvm-user-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // SAFETY: no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!(default_user(&root, Some(&dir)).unwrap(), None);
            std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
            assert_eq!(
                default_user(&root, Some(&dir)).unwrap(),
                Some(user("nobody", 65534, 65534))
            );
            std::os::unix::fs::chown(&dir, Some(3_999_999), Some(5)).unwrap();
            assert_eq!(default_user(&root, Some(&dir)).unwrap(), None);
        }
        assert_eq!(default_user(&root, None).unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stored_in_the_command_line() {
        let u = user("dev", 1234, 1235);
        let c = with_user("console=ttyS0 mvm.user=old:1:1 mvm.hostname=x", &u);
        assert_eq!(c, "console=ttyS0 mvm.hostname=x mvm.user=dev:1234:1235");
        assert_eq!(from_cmdline(&c), Some(u));
        assert_eq!(from_cmdline("console=ttyS0"), None);
        assert_eq!(from_cmdline("mvm.user=dev:0:0"), None);
        assert_eq!(from_cmdline("mvm.user=a:5:5 mvm.user=b:6:6").unwrap().name, "b");
        assert_eq!(host_user_by_uid(0).unwrap().name, "root");
        assert_eq!(host_user_by_name("root").unwrap().uid, 0);
        assert_eq!(host_user_by_name("nosuchuser-mvm"), None);
    }
}
