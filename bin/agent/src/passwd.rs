//! Accounts from /etc/passwd and /etc/group, read and edited by hand: the
//! agent is static, and glibc's NSS does not work from a static binary.
//!
//! The host names a guest user (`mvm.user=<name>:<uid>:<gid>`); at boot
//! [`ensure_user`] gives it an account (passwd, group, shadow entries with
//! a locked password), a home from /etc/skel and password-less sudo, and
//! each `Exec` that names it runs with its ids ([`account`]).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub const FALLBACK_SHELL: &str = "/bin/sh";
pub const FALLBACK_HOME: &str = "/root";
/// The login shell of a user the agent creates, when the guest has it.
pub const USER_SHELL: &str = "/bin/bash";
/// Longest user name (the `utmp` limit most tools keep to).
pub const MAX_USER_NAME: usize = 32;

/// Root's account as the login needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootAccount {
    pub home: String,
    pub shell: String,
}

/// Root's home (6th field) and shell (7th) from passwd-format text: the
/// first line starting `root:`. Empty fields are `None`.
pub fn parse_root(passwd: &str) -> (Option<String>, Option<String>) {
    match find_entry(passwd, "root") {
        Some(e) => (e.home.filter(|h| !h.is_empty()), e.shell.filter(|s| !s.is_empty())),
        None => (None, None),
    }
}

/// Root's account: the shell only if it is an executable file, else
/// /bin/sh; the home as written, else /root.
pub fn root_account(passwd_path: &Path) -> RootAccount {
    let text = std::fs::read_to_string(passwd_path).unwrap_or_default();
    let (home, shell) = parse_root(&text);
    let shell = shell.filter(|s| is_executable(Path::new(s)));
    RootAccount {
        home: home.unwrap_or_else(|| FALLBACK_HOME.into()),
        shell: shell.unwrap_or_else(|| FALLBACK_SHELL.into()),
    }
}

fn is_executable(path: &Path) -> bool {
    path.is_absolute() && std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The user the host asks for: `mvm.user=<name>:<uid>:<gid>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSpec {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl UserSpec {
    /// `<name>:<uid>:<gid>`, checked: a portable name ([`check_user_name`]),
    /// not root, ids that are not 0 nor the "no id" value (u32::MAX).
    pub fn parse(value: &str) -> Result<UserSpec, String> {
        let mut parts = value.split(':');
        let (Some(name), Some(uid), Some(gid), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err("expected <name>:<uid>:<gid>".into());
        };
        check_user_name(name)?;
        let id = |s: &str, what: &str| -> Result<u32, String> {
            match s.parse::<u32>() {
                Ok(0) => Err(format!("{what} 0 is root's; the guest user is not root")),
                Ok(u32::MAX) | Err(_) => Err(format!("{what} {s:?} is not a number from 1 to 4294967294")),
                Ok(n) => Ok(n),
            }
        };
        if name == "root" {
            return Err("\"root\" is the guest's root already".into());
        }
        Ok(UserSpec {
            name: name.into(),
            uid: id(uid, "uid")?,
            gid: id(gid, "gid")?,
        })
    }
}

impl std::fmt::Display for UserSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.name, self.uid, self.gid)
    }
}

/// A POSIX portable user name: 1 to 32 of `A-Z a-z 0-9 . _ -`, not
/// starting with `-` (nor a digit-only name, which tools take for a uid).
pub fn check_user_name(name: &str) -> Result<(), String> {
    let portable = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if name.is_empty() || name.len() > MAX_USER_NAME || !portable || name.starts_with('-') {
        return Err(format!(
            "user name {name:?}: a user name is 1 to {MAX_USER_NAME} letters, digits, '.', '_' or '-', not starting with '-'"
        ));
    }
    if name.bytes().all(|b| b.is_ascii_digit()) || name == "." || name == ".." {
        return Err(format!("user name {name:?}: a user name needs a letter"));
    }
    Ok(())
}

/// One passwd line's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub home: Option<String>,
    pub shell: Option<String>,
}

/// The first passwd line of user `name` (ids that are not numbers are
/// `None`; missing fields too).
pub fn find_entry(passwd: &str, name: &str) -> Option<PasswdEntry> {
    let line = passwd.lines().find(|l| l.split(':').next() == Some(name))?;
    let fields: Vec<&str> = line.split(':').collect();
    let text = |i: usize| fields.get(i).map(|f| f.to_string());
    let id = |i: usize| fields.get(i).and_then(|f| f.parse::<u32>().ok());
    Some(PasswdEntry {
        name: name.into(),
        uid: id(2),
        gid: id(3),
        home: text(5),
        shell: text(6),
    })
}

/// Whether a line of a colon-separated file defines `name` or uses `id`
/// (third field).
fn has_name(text: &str, name: &str) -> bool {
    text.lines().any(|l| l.split(':').next() == Some(name))
}

fn has_id(text: &str, id: u32) -> bool {
    text.lines()
        .any(|l| l.split(':').nth(2).and_then(|f| f.parse::<u32>().ok()) == Some(id))
}

/// The groups that list `name` as a member (group file's 4th field), plus
/// `primary`, without duplicates: the supplementary groups of a login.
pub fn groups_of(group: &str, name: &str, primary: u32) -> Vec<u32> {
    let mut out = vec![primary];
    for line in group.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        let (Some(gid), Some(members)) = (fields.get(2), fields.get(3)) else {
            continue;
        };
        let Ok(gid) = gid.parse::<u32>() else { continue };
        if members.split(',').any(|m| m == name) && !out.contains(&gid) {
            out.push(gid);
        }
    }
    out
}

/// Who runs a program: ids, supplementary groups, home, shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: String,
    pub shell: String,
}

impl Account {
    /// Root, as [`root_account`] finds it (the agent's own ids).
    pub fn root(passwd_path: &Path) -> Account {
        let r = root_account(passwd_path);
        Account {
            name: "root".into(),
            uid: 0,
            gid: 0,
            groups: Vec::new(),
            home: r.home,
            shell: r.shell,
        }
    }
}

/// The account of `name` from the passwd and group files. Its shell falls
/// back to /bin/sh, its home to `/`.
pub fn account(passwd_path: &Path, group_path: &Path, name: &str) -> Result<Account, String> {
    let passwd =
        std::fs::read_to_string(passwd_path).map_err(|e| format!("cannot read {}: {e}", passwd_path.display()))?;
    let entry = find_entry(&passwd, name)
        .ok_or_else(|| format!("no user {name:?} in the guest's {}", passwd_path.display()))?;
    let (Some(uid), Some(gid)) = (entry.uid, entry.gid) else {
        return Err(format!(
            "user {name:?}: {} has no valid uid or gid",
            passwd_path.display()
        ));
    };
    let group = std::fs::read_to_string(group_path).unwrap_or_default();
    let shell = entry
        .shell
        .filter(|s| is_executable(Path::new(s)))
        .unwrap_or_else(|| FALLBACK_SHELL.into());
    let home = entry.home.filter(|h| h.starts_with('/')).unwrap_or_else(|| "/".into());
    Ok(Account {
        name: entry.name,
        uid,
        gid,
        groups: groups_of(&group, name, gid),
        home,
        shell,
    })
}

/// The guest's account files, under `root` (`/` in the guest; a
/// temporary directory in tests).
#[derive(Debug, Clone)]
pub struct Files {
    pub root: PathBuf,
}

impl Files {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Files { root: root.into() }
    }
    fn path(&self, p: &str) -> PathBuf {
        self.root.join(p.trim_start_matches('/'))
    }
}

/// The line to add to a colon-separated file, unless one exists: `None`
/// when `name` is there already.
pub fn passwd_line(passwd: &str, user: &UserSpec, home: &str, shell: &str) -> Option<String> {
    (!has_name(passwd, &user.name)).then(|| format!("{}:x:{}:{}::{home}:{shell}", user.name, user.uid, user.gid))
}

/// The group line for the user's primary group: `None` when a group with
/// that gid exists (it is used as it is) or the name is taken.
pub fn group_line(group: &str, user: &UserSpec) -> Option<String> {
    (!has_id(group, user.gid) && !has_name(group, &user.name)).then(|| format!("{}:x:{}:", user.name, user.gid))
}

/// What [`ensure_user`] did, for the log.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Ensured {
    pub created: Vec<String>,
    pub notes: Vec<String>,
}

/// Give `user` an account in the guest under `files.root` unless it has
/// one: passwd, group, shadow and gshadow entries (password locked: only
/// the agent and sudo let anyone in), a home `/home/<name>` copied from
/// /etc/skel and owned by the user, and `/etc/sudoers.d/mvm-<name>`
/// (NOPASSWD) when sudo is installed. Existing entries and an existing
/// home are kept as they are (the root may be persistent: a second boot
/// finds them); a name already in passwd with another uid is reported.
pub fn ensure_user(files: &Files, user: &UserSpec) -> Result<Ensured, String> {
    let mut done = Ensured::default();
    let home = format!("/home/{}", user.name);
    let shell = if is_executable(&files.path(USER_SHELL)) {
        USER_SHELL
    } else {
        FALLBACK_SHELL
    };
    let passwd_path = files.path("/etc/passwd");
    let passwd = read_or_empty(&passwd_path)?;
    match find_entry(&passwd, &user.name) {
        Some(e) if e.uid != Some(user.uid) => done.notes.push(format!(
            "user {} exists with uid {} (the host asked for {}); it is left as it is",
            user.name,
            e.uid.map_or("?".into(), |u| u.to_string()),
            user.uid
        )),
        _ => {}
    }
    if let Some(line) = passwd_line(&passwd, user, &home, shell) {
        append_line(&passwd_path, &passwd, &line, 0o644)?;
        done.created.push(format!("{} entry", passwd_path.display()));
    }
    let group_path = files.path("/etc/group");
    let group = read_or_empty(&group_path)?;
    if let Some(line) = group_line(&group, user) {
        append_line(&group_path, &group, &line, 0o644)?;
        done.created.push(format!("{} entry", group_path.display()));
    }
    // Shadow files only where the system has them (not in a bare
    // initramfs); their mode (0640, group shadow) is kept by appending.
    let shadow_path = files.path("/etc/shadow");
    if shadow_path.exists() {
        let shadow = read_or_empty(&shadow_path)?;
        if !has_name(&shadow, &user.name) {
            let days = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() / 86_400);
            append_line(
                &shadow_path,
                &shadow,
                &format!("{}:!:{days}:0:99999:7:::", user.name),
                0o640,
            )?;
            done.created.push(format!("{} entry", shadow_path.display()));
        }
    }
    let gshadow_path = files.path("/etc/gshadow");
    if gshadow_path.exists() {
        let gshadow = read_or_empty(&gshadow_path)?;
        if group_line(&group, user).is_some() && !has_name(&gshadow, &user.name) {
            append_line(&gshadow_path, &gshadow, &format!("{}:!::", user.name), 0o640)?;
        }
    }
    let home_path = files.path(&home);
    if std::fs::symlink_metadata(&home_path).is_err() {
        make_home(&files.path("/etc/skel"), &home_path, user.uid, user.gid)?;
        done.created.push(home_path.display().to_string());
    }
    let sudoers_d = files.path("/etc/sudoers.d");
    if sudoers_d.is_dir() {
        // sudo skips files whose names hold '.' (or end in '~').
        let file = sudoers_d.join(format!("mvm-{}", user.name.replace('.', "_")));
        let rule = format!(
            "# Written by mvm-agent: the VM's user needs no password.\n{} ALL=(ALL:ALL) NOPASSWD: ALL\n",
            user.name
        );
        if std::fs::read_to_string(&file).ok().as_deref() != Some(rule.as_str()) {
            write_file(&file, rule.as_bytes(), 0o440)?;
            done.created.push(file.display().to_string());
        }
    }
    Ok(done)
}

fn read_or_empty(path: &Path) -> Result<String, String> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Append `line` to the file (created with `mode` if missing), after a
/// newline if its text lacks a final one.
fn append_line(path: &Path, text: &str, line: &str, mode: u32) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let sep = if text.is_empty() || text.ends_with('\n') {
        ""
    } else {
        "\n"
    };
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(mode)
        .open(path)
        .and_then(|mut f| f.write_all(format!("{sep}{line}\n").as_bytes()))
        .map_err(|e| format!("cannot add to {}: {e}", path.display()))
}

/// Replace a file's content atomically, with `mode` (owned by us: root).
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), String> {
    let tmp = path.with_extension("mvm-tmp");
    let result = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(data)?;
            f.set_permissions(std::fs::Permissions::from_mode(mode))
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// A new home: a copy of `skel` (if any), everything owned by the user,
/// the directory itself private (0700, as Debian's adduser makes it).
fn make_home(skel: &Path, home: &Path, uid: u32, gid: u32) -> Result<(), String> {
    let fail = |what: &str, p: &Path, e: std::io::Error| format!("cannot {what} {}: {e}", p.display());
    if let Some(parent) = home.parent() {
        std::fs::create_dir_all(parent).map_err(|e| fail("create", parent, e))?;
    }
    std::fs::create_dir(home).map_err(|e| fail("create", home, e))?;
    std::fs::set_permissions(home, std::fs::Permissions::from_mode(0o700)).map_err(|e| fail("chmod", home, e))?;
    if skel.is_dir() {
        copy_tree(skel, home, uid, gid)?;
    }
    std::os::unix::fs::lchown(home, Some(uid), Some(gid)).map_err(|e| fail("chown", home, e))
}

/// Copy directories, regular files and symlinks of `from` into `to`
/// (which exists), owned by uid:gid; other file types are skipped.
fn copy_tree(from: &Path, to: &Path, uid: u32, gid: u32) -> Result<(), String> {
    let entries = std::fs::read_dir(from).map_err(|e| format!("cannot read {}: {e}", from.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot read {}: {e}", from.display()))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let meta = std::fs::symlink_metadata(&src).map_err(|e| format!("cannot stat {}: {e}", src.display()))?;
        let kind = meta.file_type();
        let copied = if kind.is_dir() {
            std::fs::create_dir(&dst)
                .and_then(|()| std::fs::set_permissions(&dst, meta.permissions()))
                .map_err(|e| format!("cannot create {}: {e}", dst.display()))
                .and_then(|()| copy_tree(&src, &dst, uid, gid))
        } else if kind.is_symlink() {
            std::fs::read_link(&src)
                .and_then(|t| std::os::unix::fs::symlink(t, &dst))
                .map_err(|e| format!("cannot copy {}: {e}", src.display()))
        } else if kind.is_file() {
            std::fs::copy(&src, &dst)
                .map(|_| ())
                .map_err(|e| format!("cannot copy {}: {e}", src.display()))
        } else {
            continue;
        };
        copied?;
        std::os::unix::fs::lchown(&dst, Some(uid), Some(gid))
            .map_err(|e| format!("cannot chown {}: {e}", dst.display()))?;
    }
    Ok(())
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_root_line() {
        let text = "# comment\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n\
                    root:x:0:0:root:/root:/bin/bash\nroot:x:0:0::/other:/bin/zsh\n";
        assert_eq!(parse_root(text), (Some("/root".into()), Some("/bin/bash".into())));
    }

    #[test]
    fn missing_or_short_lines() {
        assert_eq!(parse_root(""), (None, None));
        assert_eq!(parse_root("rootx:x:0:0::/r:/bin/sh"), (None, None));
        assert_eq!(parse_root("root:x:0:0"), (None, None));
        assert_eq!(parse_root("root:x:0:0::/home/r:"), (Some("/home/r".into()), None));
    }

    #[test]
    fn shell_must_be_executable() {
        let dir = std::env::temp_dir().join(format!("mvm-agent-passwd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let passwd = dir.join("passwd");
        let script = dir.join("notexec");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        std::fs::write(&passwd, format!("root:x:0:0::/myhome:{}\n", script.display())).unwrap();
        assert_eq!(
            root_account(&passwd),
            RootAccount {
                home: "/myhome".into(),
                shell: FALLBACK_SHELL.into()
            }
        );
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(root_account(&passwd).shell, script.display().to_string());
        assert_eq!(
            root_account(&dir.join("missing")),
            RootAccount {
                home: FALLBACK_HOME.into(),
                shell: FALLBACK_SHELL.into()
            }
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn user_spec_parsing() {
        assert_eq!(
            UserSpec::parse("alice:1000:1001").unwrap(),
            UserSpec {
                name: "alice".into(),
                uid: 1000,
                gid: 1001
            }
        );
        assert_eq!(UserSpec::parse("a.b_c-d:5:5").unwrap().to_string(), "a.b_c-d:5:5");
        for bad in [
            "",
            "alice",
            "alice:1000",
            "alice:1000:1000:x",
            "alice:0:1000",
            "alice:1000:0",
            "alice:-1:1",
            "alice:4294967295:1",
            "alice:4294967296:1",
            "root:5:5",
            "-x:5:5",
            "a b:5:5",
            "a/b:5:5",
            "123:5:5",
            ":5:5",
            "alice:x:5",
        ] {
            assert!(UserSpec::parse(bad).is_err(), "{bad}");
        }
        assert!(check_user_name(&"a".repeat(32)).is_ok());
        assert!(check_user_name(&"a".repeat(33)).is_err());
        assert!(check_user_name("é").is_err());
    }

    #[test]
    fn entries_and_groups() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:100:A:/home/alice:/bin/zsh\nbad:x:y:z\n";
        let e = find_entry(passwd, "alice").unwrap();
        assert_eq!((e.uid, e.gid), (Some(1000), Some(100)));
        assert_eq!(e.home.as_deref(), Some("/home/alice"));
        assert_eq!(find_entry(passwd, "bad").unwrap().uid, None);
        assert_eq!(find_entry(passwd, "ali"), None);
        let group = "root:x:0:\nsudo:x:27:bob,alice\nusers:x:100:alice\ndocker:x:999:alicex\nodd\nx:x:nan:alice\n";
        assert_eq!(groups_of(group, "alice", 100), [100, 27]);
        assert_eq!(groups_of(group, "carol", 5), [5]);
        let alice = UserSpec::parse("alice:1000:100").unwrap();
        assert_eq!(passwd_line(passwd, &alice, "/home/alice", "/bin/sh"), None);
        let carol = UserSpec::parse("carol:1234:1234").unwrap();
        assert_eq!(
            passwd_line(passwd, &carol, "/home/carol", "/bin/sh").as_deref(),
            Some("carol:x:1234:1234::/home/carol:/bin/sh")
        );
        // gid 100 exists: used as it is.
        assert_eq!(group_line(group, &alice), None);
        assert_eq!(group_line(group, &carol).as_deref(), Some("carol:x:1234:"));
        // The name is taken by a group with another gid: no duplicate.
        let sudo = UserSpec::parse("sudo:1234:1234").unwrap();
        assert_eq!(group_line(group, &sudo), None);
    }

    fn temp_root(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mvm-agent-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        dir
    }

    #[test]
    fn ensure_user_creates_an_account_once() {
        use std::os::unix::fs::MetadataExt;
        let dir = temp_root("ensure");
        std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/bash").unwrap();
        std::fs::write(dir.join("etc/group"), "root:x:0:\n").unwrap();
        std::fs::write(dir.join("etc/shadow"), "root:*:19000:0:99999:7:::\n").unwrap();
        std::fs::set_permissions(dir.join("etc/shadow"), std::fs::Permissions::from_mode(0o640)).unwrap();
        std::fs::write(dir.join("etc/gshadow"), "root:*::\n").unwrap();
        std::fs::create_dir_all(dir.join("etc/skel/.config")).unwrap();
        std::fs::write(dir.join("etc/skel/.bashrc"), "# rc\n").unwrap();
        std::os::unix::fs::symlink(".bashrc", dir.join("etc/skel/.config/link")).unwrap();
        std::fs::create_dir_all(dir.join("etc/sudoers.d")).unwrap();
        let files = Files::new(&dir);
        let user = UserSpec::parse("dev.user:1234:1235").unwrap();

        let done = ensure_user(&files, &user).unwrap();
        assert!(done.notes.is_empty(), "{done:?}");
        let passwd = std::fs::read_to_string(dir.join("etc/passwd")).unwrap();
        // A missing final newline is supplied.
        assert_eq!(
            passwd,
            "root:x:0:0:root:/root:/bin/bash\ndev.user:x:1234:1235::/home/dev.user:/bin/sh\n"
        );
        assert!(std::fs::read_to_string(dir.join("etc/group"))
            .unwrap()
            .ends_with("\ndev.user:x:1235:\n"));
        let shadow = std::fs::read_to_string(dir.join("etc/shadow")).unwrap();
        assert!(shadow.contains("\ndev.user:!:"), "{shadow}");
        assert_eq!(
            std::fs::metadata(dir.join("etc/shadow")).unwrap().permissions().mode() & 0o777,
            0o640
        );
        assert!(std::fs::read_to_string(dir.join("etc/gshadow"))
            .unwrap()
            .ends_with("dev.user:!::\n"));
        let home = dir.join("home/dev.user");
        let meta = std::fs::metadata(&home).unwrap();
        assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o777), (1234, 1235, 0o700));
        assert_eq!(std::fs::read_to_string(home.join(".bashrc")).unwrap(), "# rc\n");
        let link = std::fs::symlink_metadata(home.join(".config/link")).unwrap();
        assert!(link.file_type().is_symlink());
        assert_eq!(link.uid(), 1234);
        let sudoers = dir.join("etc/sudoers.d/mvm-dev_user");
        assert!(std::fs::read_to_string(&sudoers)
            .unwrap()
            .contains("dev.user ALL=(ALL:ALL) NOPASSWD: ALL\n"));
        assert_eq!(std::fs::metadata(&sudoers).unwrap().mode() & 0o777, 0o440);
        let acc = account(&dir.join("etc/passwd"), &dir.join("etc/group"), "dev.user").unwrap();
        assert_eq!((acc.uid, acc.gid, acc.groups.clone()), (1234, 1235, vec![1235]));
        assert_eq!(acc.home, "/home/dev.user");

        // A second boot: nothing changes, the home is kept.
        std::fs::write(home.join("mine"), "x").unwrap();
        let again = ensure_user(&files, &user).unwrap();
        assert_eq!(again, Ensured::default());
        assert_eq!(std::fs::read_to_string(dir.join("etc/passwd")).unwrap(), passwd);
        assert!(home.join("mine").exists());

        // The same name with another uid is reported, not changed.
        let other = UserSpec::parse("dev.user:999:999").unwrap();
        assert_eq!(ensure_user(&files, &other).unwrap().notes.len(), 1);
        assert!(account(&dir.join("etc/passwd"), &dir.join("etc/group"), "nobody").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ensure_user_in_a_bare_initramfs() {
        let dir = temp_root("bare");
        std::fs::remove_dir_all(dir.join("etc")).unwrap();
        let user = UserSpec::parse("dev:1234:1234").unwrap();
        let done = ensure_user(&Files::new(&dir), &user).unwrap();
        assert_eq!(done.created.len(), 3, "{done:?}");
        assert_eq!(
            std::fs::read_to_string(dir.join("etc/passwd")).unwrap(),
            "dev:x:1234:1234::/home/dev:/bin/sh\n"
        );
        assert!(!dir.join("etc/shadow").exists());
        assert!(dir.join("home/dev").is_dir());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
