//! `[env]`: the environment of `mvm shell`/`exec` sessions. The VMM only
//! checks it; `mvm` applies it when it starts a program in the guest.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::{Error, Result};

/// Session environment settings of a VM (`[env]` in vm.toml).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvConfig {
    /// Set in every session (after the agent's defaults), by name.
    pub set: BTreeMap<String, String>,
    /// Host variables copied into sessions when they start: names, or
    /// patterns where `*` matches any text (`GITHUB_*`). Their values are
    /// read at exec time and never stored.
    pub passthrough: Vec<String>,
}

impl EnvConfig {
    /// Whether host variable `name` is passed through.
    pub fn passes(&self, name: &str) -> bool {
        self.passthrough.iter().any(|p| pattern_matches(p, name))
    }

    pub(crate) fn from_file(file: FileEnv) -> Result<Self> {
        for (name, value) in &file.set {
            if !is_env_name(name) {
                return Err(Error::ConfigValue {
                    key: "env.set",
                    value: format!("{name:?}"),
                    reason: NAME_RULE.into(),
                });
            }
            if value.contains('\0') {
                return Err(Error::ConfigValue {
                    key: "env.set",
                    value: format!("{name} = {value:?}"),
                    reason: "an environment value cannot contain a NUL character".into(),
                });
            }
        }
        for pattern in &file.passthrough {
            check_pattern(pattern).map_err(|reason| Error::ConfigValue {
                key: "env.passthrough",
                value: format!("{pattern:?}"),
                reason,
            })?;
        }
        Ok(EnvConfig {
            set: file.set,
            passthrough: file.passthrough,
        })
    }
}

const NAME_RULE: &str = "a variable name is a letter or '_', then letters, digits and '_'";

/// `[A-Za-z_][A-Za-z0-9_]*`: what every shell accepts as a variable name.
pub fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A passthrough entry: a name where `*` may stand for any text; not `*`
/// alone, which would copy the host's PATH and HOME into the guest.
pub fn check_pattern(pattern: &str) -> std::result::Result<(), String> {
    if pattern.is_empty() || pattern.bytes().all(|b| b == b'*') {
        return Err("name the variables (a pattern such as \"GITHUB_*\"); \"*\" alone would copy the host's PATH and HOME into the guest".into());
    }
    let first = pattern.as_bytes()[0];
    let ok = (first.is_ascii_alphabetic() || first == b'_' || first == b'*')
        && pattern
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'*');
    if ok {
        Ok(())
    } else {
        Err(format!("{NAME_RULE}; '*' matches any text"))
    }
}

/// Whether `name` matches `pattern`, where `*` matches any (possibly
/// empty) text and everything else itself; case-sensitive.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    // Greedy with backtracking to the last star: linear in practice.
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(&c) if c == n[ni] => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// `[env]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileEnv {
    #[serde(default)]
    set: BTreeMap<String, String>,
    #[serde(default)]
    passthrough: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::VmConfig;
    use std::path::Path;

    fn parse(env: &str) -> Result<VmConfig> {
        let text = format!("version = 1\n[boot]\nkernel = \"k\"\n{env}");
        VmConfig::from_toml(&text, "vm.toml", Path::new("/etc/vms"))
    }

    #[test]
    fn patterns() {
        for (p, n, m) in [
            ("AWS_PROFILE", "AWS_PROFILE", true),
            ("AWS_PROFILE", "AWS_PROFILE2", false),
            ("AWS_PROFILE", "aws_profile", false),
            ("GITHUB_*", "GITHUB_TOKEN", true),
            ("GITHUB_*", "GITHUB_", true),
            ("GITHUB_*", "GITHUB", false),
            ("GITHUB_*", "MY_GITHUB_TOKEN", false),
            ("*_TOKEN", "NPM_TOKEN", true),
            ("*_TOKEN", "NPM_TOKENS", false),
            ("A*B*C", "AxxBxxC", true),
            ("A*B*C", "ABC", true),
            ("A*B*C", "AxxBxx", false),
            ("A*B*C", "ACBC", true),
            ("*A*", "XAX", true),
            ("A**", "A", true),
            ("MVM_PASS_*", "MVM_PASS_TOKEN", true),
            ("MVM_PASS_*", "MVM_OTHER", false),
        ] {
            assert_eq!(pattern_matches(p, n), m, "{p} ~ {n}");
        }
    }

    #[test]
    fn names() {
        for good in ["A", "_", "a1", "AWS_PROFILE", "_x_9"] {
            assert!(is_env_name(good), "{good}");
        }
        for bad in ["", "1A", "A-B", "A B", "A=B", "É", "A*"] {
            assert!(!is_env_name(bad), "{bad}");
        }
    }

    #[test]
    fn section_defaults_and_values() {
        assert_eq!(parse("").unwrap().env, EnvConfig::default());
        let c =
            parse("[env]\nset = { EDITOR = \"vim\", A_1 = \"x y\" }\npassthrough = [\"AWS_PROFILE\", \"GITHUB_*\"]\n")
                .unwrap();
        assert_eq!(c.env.set.get("EDITOR").map(String::as_str), Some("vim"));
        assert_eq!(c.env.set.len(), 2);
        assert!(c.env.passes("GITHUB_TOKEN") && c.env.passes("AWS_PROFILE"));
        assert!(!c.env.passes("HOME"));
    }

    #[test]
    fn bad_entries_name_key_and_value() {
        let e = |env: &str| parse(env).unwrap_err().to_string();
        assert_eq!(
            e("[env]\nset = { \"1BAD\" = \"x\" }\n"),
            format!("env.set = \"1BAD\": {NAME_RULE}")
        );
        assert!(e("[env]\nset = { \"A-B\" = \"x\" }\n").starts_with("env.set = \"A-B\": "));
        assert!(e("[env]\nset = { A = \"x\\u0000y\" }\n").starts_with("env.set = A = \"x\\0y\": "));
        assert!(e("[env]\npassthrough = [\"*\"]\n").starts_with("env.passthrough = \"*\": name the variables"));
        assert!(e("[env]\npassthrough = [\"\"]\n").starts_with("env.passthrough = \"\": "));
        assert!(e("[env]\npassthrough = [\"GIT HUB\"]\n").starts_with("env.passthrough = \"GIT HUB\": "));
        assert!(e("[env]\npassthrough = [\"9*\"]\n").starts_with("env.passthrough = \"9*\": "));
        assert!(e("[env]\nset = { A = 1 }\n").contains("invalid type"));
        assert!(e("[env]\npass = [\"A\"]\n").contains("unknown field `pass`"));
    }
}
