//! /proc/self/mounts, parsed.

use crate::proto::Mount;

pub const PROC_MOUNTS: &str = "/proc/self/mounts";

/// Parse mounts-format text (`source target fstype options 0 0`, with
/// spaces and the like octal-escaped).
pub fn parse(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split(' ');
            Some(Mount {
                source: unescape(f.next()?),
                target: unescape(f.next()?),
                fstype: unescape(f.next()?),
            })
        })
        .collect()
}

/// The mounts now, or none if /proc is not there.
pub fn current() -> Vec<Mount> {
    std::fs::read_to_string(PROC_MOUNTS)
        .map(|t| parse(&t))
        .unwrap_or_default()
}

pub fn is_mounted(mounts: &[Mount], target: &str) -> bool {
    mounts.iter().any(|m| m.target == target)
}

/// Undo the kernel's `\ooo` escapes.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'\\' {
            if let Some(oct) = b.get(i + 1..i + 4) {
                if oct.iter().all(|d| (b'0'..=b'7').contains(d)) {
                    let v = oct.iter().fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                    if let Ok(v) = u8::try_from(v) {
                        out.push(v);
                        i += 4;
                        continue;
                    }
                }
            }
        }
        out.push(c);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_unescapes() {
        let m = parse(
            "proc /proc proc rw,nosuid 0 0\nproject /my\\040project virtiofs rw 0 0\nbad\n\
             x /a\\\\b ext4 rw 0 0\ny /t\\9 tmpfs rw 0 0\n",
        );
        assert_eq!(m.len(), 4);
        assert_eq!(m[0].target, "/proc");
        assert_eq!(m[1].target, "/my project");
        assert_eq!(m[1].fstype, "virtiofs");
        assert_eq!(m[2].target, "/a\\\\b");
        assert_eq!(m[3].target, "/t\\9");
        assert!(is_mounted(&m, "/proc"));
        assert!(!is_mounted(&m, "/sys"));
    }
}
