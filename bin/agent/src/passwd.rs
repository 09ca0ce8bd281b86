//! Root's home and login shell, from /etc/passwd (read by hand: the agent
//! is static, and glibc's NSS does not work from a static binary).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

pub const FALLBACK_SHELL: &str = "/bin/sh";
pub const FALLBACK_HOME: &str = "/root";

/// Root's account as the login needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootAccount {
    pub home: String,
    pub shell: String,
}

/// Root's home (6th field) and shell (7th) from passwd-format text: the
/// first line starting `root:`. Empty fields are `None`.
pub fn parse_root(passwd: &str) -> (Option<String>, Option<String>) {
    let Some(line) = passwd.lines().find(|l| l.starts_with("root:")) else {
        return (None, None);
    };
    let fields: Vec<&str> = line.split(':').collect();
    let field = |i: usize| fields.get(i).filter(|f| !f.is_empty()).map(|f| f.to_string());
    (field(5), field(6))
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
}
