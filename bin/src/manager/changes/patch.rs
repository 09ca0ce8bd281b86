//! Git's patch format: a Myers line diff cut into hunks with three lines
//! of context, the extended headers of `git diff` (modes, new/deleted
//! files, renames, binary files) and a `--stat` summary. Only what `git
//! apply` and patch viewers need: no `index` lines (no blob hashes), no
//! function names after `@@`.

use std::io::{self, Write};

/// Lines of context around a change, as git's default.
const CONTEXT: usize = 3;
/// Bytes searched for a NUL to call a file binary, as git does.
const BINARY_PROBE: usize = 8000;
/// Edit distance past which the middle of a file is shown as replaced
/// whole: the backtracking trace grows with its square.
const MAX_EDIT_DISTANCE: usize = 4096;

/// Git's view of a file mode: 100644, 100755 or 120000 (0: neither).
pub fn git_mode(mode: u32) -> u32 {
    match mode & libc::S_IFMT {
        libc::S_IFLNK => 0o120000,
        libc::S_IFREG if mode & 0o100 != 0 => 0o100755,
        libc::S_IFREG => 0o100644,
        _ => 0,
    }
}

pub fn is_binary(data: &[u8]) -> bool {
    data.iter().take(BINARY_PROBE).any(|&b| b == 0)
}

/// A path as git prints it: quoted C-style when it has control
/// characters, quotes, backslashes or non-ASCII bytes (`core.quotepath`).
pub fn quote(prefix: &str, path: &[u8]) -> String {
    let needs = path.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\' || b >= 0x7f);
    if !needs {
        return format!("{prefix}{}", String::from_utf8_lossy(path));
    }
    let mut out = String::from("\"");
    out.push_str(prefix);
    for &b in path {
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b'\t' => out.push_str("\\t"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\{b:03o}")),
        }
    }
    out.push('"');
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Equal,
    Delete,
    Insert,
}

/// Splits after each newline; the last line may lack one.
fn lines(data: &[u8]) -> Vec<&[u8]> {
    data.split_inclusive(|&b| b == b'\n').collect()
}

/// The shortest edit script from `a` to `b` (Myers' O(ND) algorithm on
/// the part between the common prefix and suffix).
fn edit_script(a: &[&[u8]], b: &[&[u8]]) -> Vec<Op> {
    let prefix = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let suffix = a[prefix..]
        .iter()
        .rev()
        .zip(b[prefix..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let mut ops = vec![Op::Equal; prefix];
    ops.extend(middle(&a[prefix..a.len() - suffix], &b[prefix..b.len() - suffix]));
    ops.extend(std::iter::repeat_n(Op::Equal, suffix));
    ops
}

fn middle(a: &[&[u8]], b: &[&[u8]]) -> Vec<Op> {
    let (n, m) = (a.len() as isize, b.len() as isize);
    let replace_all = || {
        let mut ops = vec![Op::Delete; a.len()];
        ops.extend(std::iter::repeat_n(Op::Insert, b.len()));
        ops
    };
    if n == 0 || m == 0 {
        return replace_all();
    }
    let max = (n + m) as usize;
    let off = max as isize + 1;
    let mut v = vec![0isize; 2 * max + 3];
    // trace[d]: v[-d-1 ..= d+1] before step d.
    let mut trace: Vec<Vec<isize>> = Vec::new();
    let mut done = false;
    for d in 0..=max as isize {
        if d as usize > MAX_EDIT_DISTANCE {
            return replace_all();
        }
        trace.push(v[(off - d - 1) as usize..=(off + d + 1) as usize].to_vec());
        let mut k = -d;
        while k <= d {
            let mut x = if k == -d || (k != d && v[(off + k - 1) as usize] < v[(off + k + 1) as usize]) {
                v[(off + k + 1) as usize]
            } else {
                v[(off + k - 1) as usize] + 1
            };
            let mut y = x - k;
            while x < n && y < m && a[x as usize] == b[y as usize] {
                x += 1;
                y += 1;
            }
            v[(off + k) as usize] = x;
            if x >= n && y >= m {
                done = true;
                break;
            }
            k += 2;
        }
        if done {
            break;
        }
    }
    let mut ops = Vec::new();
    let (mut x, mut y) = (n, m);
    for d in (0..trace.len() as isize).rev() {
        let saved = &trace[d as usize];
        let at = |k: isize| saved[(k + d + 1) as usize];
        let k = x - y;
        let prev_k = if k == -d || (k != d && at(k - 1) < at(k + 1)) {
            k + 1
        } else {
            k - 1
        };
        let prev_x = at(prev_k);
        let prev_y = prev_x - prev_k;
        while x > prev_x && y > prev_y {
            ops.push(Op::Equal);
            x -= 1;
            y -= 1;
        }
        if d > 0 {
            ops.push(if x == prev_x { Op::Insert } else { Op::Delete });
        }
        x = prev_x;
        y = prev_y;
    }
    ops.reverse();
    ops
}

/// Line counts of a text change: (insertions, deletions).
pub fn line_counts(old: &[u8], new: &[u8]) -> (usize, usize) {
    let (a, b) = (lines(old), lines(new));
    let ops = edit_script(&a, &b);
    let ins = ops.iter().filter(|o| **o == Op::Insert).count();
    let del = ops.iter().filter(|o| **o == Op::Delete).count();
    (ins, del)
}

fn write_line(out: &mut dyn Write, mark: u8, line: &[u8]) -> io::Result<()> {
    out.write_all(&[mark])?;
    out.write_all(line)?;
    if !line.ends_with(b"\n") {
        out.write_all(b"\n\\ No newline at end of file\n")?;
    }
    Ok(())
}

/// `@@` range: 1-based start and count, the start being the line before
/// for an empty range, the count left out when it is 1.
fn range(start: usize, count: usize) -> String {
    match count {
        0 => format!("{start},0"),
        1 => format!("{}", start + 1),
        _ => format!("{},{count}", start + 1),
    }
}

/// The hunks turning `old` into `new`.
pub fn write_hunks(out: &mut dyn Write, old: &[u8], new: &[u8]) -> io::Result<()> {
    let (a, b) = (lines(old), lines(new));
    let ops = edit_script(&a, &b);
    // Position of each op in a and b.
    let mut pos = Vec::with_capacity(ops.len());
    let (mut i, mut j) = (0usize, 0usize);
    for op in &ops {
        pos.push((i, j));
        match op {
            Op::Equal => {
                i += 1;
                j += 1;
            }
            Op::Delete => i += 1,
            Op::Insert => j += 1,
        }
    }
    let changed: Vec<usize> = (0..ops.len()).filter(|&k| ops[k] != Op::Equal).collect();
    let mut c = 0;
    while c < changed.len() {
        let first = changed[c];
        let mut last = first;
        while c + 1 < changed.len() && changed[c + 1] - last <= 2 * CONTEXT + 1 {
            c += 1;
            last = changed[c];
        }
        c += 1;
        let start = first.saturating_sub(CONTEXT);
        let end = (last + CONTEXT + 1).min(ops.len());
        let (a0, b0) = pos[start];
        let a_count = ops[start..end].iter().filter(|o| **o != Op::Insert).count();
        let b_count = ops[start..end].iter().filter(|o| **o != Op::Delete).count();
        writeln!(out, "@@ -{} +{} @@", range(a0, a_count), range(b0, b_count))?;
        for k in start..end {
            let (ai, bj) = pos[k];
            match ops[k] {
                Op::Equal => write_line(out, b' ', a[ai])?,
                Op::Delete => write_line(out, b'-', a[ai])?,
                Op::Insert => write_line(out, b'+', b[bj])?,
            }
        }
    }
    Ok(())
}

/// One file's part of a patch, as `git diff` writes it.
pub struct FilePatch<'a> {
    /// Old and new path (equal unless renamed), relative to the project.
    pub old_path: &'a [u8],
    pub new_path: &'a [u8],
    /// Full `st_mode`s; None for an added / deleted file.
    pub old_mode: Option<u32>,
    pub new_mode: Option<u32>,
    /// Contents (a symlink's target); empty for a missing side.
    pub old: &'a [u8],
    pub new: &'a [u8],
}

impl FilePatch<'_> {
    pub fn write(&self, out: &mut dyn Write) -> io::Result<()> {
        let renamed = self.old_path != self.new_path;
        let a = quote("a/", self.old_path);
        let b = quote("b/", self.new_path);
        writeln!(out, "diff --git {a} {b}")?;
        let old_mode = self.old_mode.map(git_mode);
        let new_mode = self.new_mode.map(git_mode);
        match (old_mode, new_mode) {
            (None, Some(m)) => writeln!(out, "new file mode {m:o}")?,
            (Some(m), None) => writeln!(out, "deleted file mode {m:o}")?,
            (Some(o), Some(n)) if o != n => {
                writeln!(out, "old mode {o:o}")?;
                writeln!(out, "new mode {n:o}")?;
            }
            _ => {}
        }
        if renamed {
            let similarity = if self.old == self.new { 100 } else { 0 };
            writeln!(out, "similarity index {similarity}%")?;
            writeln!(out, "rename from {}", quote("", self.old_path))?;
            writeln!(out, "rename to {}", quote("", self.new_path))?;
        }
        if self.old == self.new {
            return Ok(());
        }
        let from = if old_mode.is_some() { a } else { "/dev/null".into() };
        let to = if new_mode.is_some() { b } else { "/dev/null".into() };
        if is_binary(self.old) || is_binary(self.new) {
            return writeln!(out, "Binary files {from} and {to} differ");
        }
        // Git ends a name with a space with a tab there, so that trailing
        // spaces survive.
        let end = |name: &str| if name.contains(' ') { "\t" } else { "" };
        writeln!(out, "--- {from}{}", end(&from))?;
        writeln!(out, "+++ {to}{}", end(&to))?;
        write_hunks(out, self.old, self.new)
    }
}

/// One line of `--stat`.
pub struct StatLine {
    /// `path`, or `old => new` for a rename.
    pub name: String,
    /// None: binary (with old and new sizes).
    pub lines: Option<(usize, usize)>,
    pub sizes: (u64, u64),
}

/// A `git diff --stat` summary (graph scaled to 80 columns as git does).
pub fn write_stat(out: &mut dyn Write, stats: &[StatLine]) -> io::Result<()> {
    if stats.is_empty() {
        return Ok(());
    }
    let name_width = stats.iter().map(|s| s.name.chars().count()).max().unwrap_or(0);
    let max_change = stats
        .iter()
        .filter_map(|s| s.lines.map(|(i, d)| i + d))
        .max()
        .unwrap_or(0);
    let any_binary = stats.iter().any(|s| s.lines.is_none());
    let num_width = max_change.to_string().len().max(if any_binary { 3 } else { 1 });
    // " name | NNN " then the graph.
    let graph_width = 80usize.saturating_sub(name_width + num_width + 4).max(10);
    let (mut ins_total, mut del_total) = (0, 0);
    for s in stats {
        match s.lines {
            Some((ins, del)) => {
                ins_total += ins;
                del_total += del;
                let (mut gi, mut gd) = (ins, del);
                if max_change > graph_width {
                    let scale = |n: usize| {
                        if n == 0 {
                            0
                        } else {
                            (n * graph_width / max_change).max(1)
                        }
                    };
                    gi = scale(ins);
                    gd = scale(del);
                }
                let line = format!(
                    " {:<name_width$} | {:>num_width$} {}{}",
                    s.name,
                    ins + del,
                    "+".repeat(gi),
                    "-".repeat(gd)
                );
                writeln!(out, "{}", line.trim_end())?;
            }
            None => writeln!(
                out,
                " {:<name_width$} | {:>num_width$} {} -> {} bytes",
                s.name, "Bin", s.sizes.0, s.sizes.1
            )?,
        }
    }
    let plural = |n: usize, one: &str, many: &str| if n == 1 { one.to_string() } else { many.to_string() };
    let mut summary = format!(
        " {} {}",
        stats.len(),
        plural(stats.len(), "file changed", "files changed")
    );
    if ins_total > 0 || del_total == 0 {
        summary += &format!(", {ins_total} {}", plural(ins_total, "insertion(+)", "insertions(+)"));
    }
    if del_total > 0 || ins_total == 0 {
        summary += &format!(", {del_total} {}", plural(del_total, "deletion(-)", "deletions(-)"));
    }
    writeln!(out, "{summary}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hunks(old: &str, new: &str) -> String {
        let mut out = Vec::new();
        write_hunks(&mut out, old.as_bytes(), new.as_bytes()).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn hunks_with_context_and_counts() {
        let old: String = (1..=20).map(|i| format!("{i}\n")).collect();
        let new = old.replace("\n5\n", "\nfive\n").replace("\n18\n", "\n");
        assert_eq!(
            hunks(&old, &new),
            "@@ -2,7 +2,7 @@\n 2\n 3\n 4\n-5\n+five\n 6\n 7\n 8\n@@ -15,6 +15,5 @@\n 15\n 16\n 17\n-18\n 19\n 20\n"
        );
        // Close changes share one hunk.
        let new = old.replace("\n5\n", "\nfive\n").replace("\n11\n", "\neleven\n");
        assert!(hunks(&old, &new).starts_with("@@ -2,13 +2,13 @@\n"));
        assert_eq!(hunks("a\n", "a\nb\n"), "@@ -1 +1,2 @@\n a\n+b\n");
        assert_eq!(hunks("", "x\n"), "@@ -0,0 +1 @@\n+x\n");
        assert_eq!(
            hunks("a", "b"),
            "@@ -1 +1 @@\n-a\n\\ No newline at end of file\n+b\n\\ No newline at end of file\n"
        );
    }

    #[test]
    fn myers_finds_a_shortest_script() {
        let a: Vec<&[u8]> = ["a", "b", "c", "a", "b", "b", "a"]
            .iter()
            .map(|s| s.as_bytes())
            .collect();
        let b: Vec<&[u8]> = ["c", "b", "a", "b", "a", "c"].iter().map(|s| s.as_bytes()).collect();
        let ops = edit_script(&a, &b);
        assert_eq!(ops.iter().filter(|o| **o != Op::Equal).count(), 5);
        assert_eq!(ops.iter().filter(|o| **o != Op::Insert).count(), a.len());
        assert_eq!(ops.iter().filter(|o| **o != Op::Delete).count(), b.len());
    }

    #[test]
    fn names_with_spaces_end_with_a_tab() {
        let mut out = Vec::new();
        FilePatch {
            old_path: b"a b.txt",
            new_path: b"a b.txt",
            old_mode: Some(libc::S_IFREG | 0o644),
            new_mode: Some(libc::S_IFREG | 0o644),
            old: b"x\n",
            new: b"y\n",
        }
        .write(&mut out)
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "diff --git a/a b.txt b/a b.txt\n--- a/a b.txt\t\n+++ b/a b.txt\t\n@@ -1 +1 @@\n-x\n+y\n"
        );
    }

    #[test]
    fn quoting_as_git() {
        assert_eq!(quote("a/", b"plain name.txt"), "a/plain name.txt");
        assert_eq!(quote("a/", b"tab\there"), "\"a/tab\\there\"");
        assert_eq!(quote("b/", "é".as_bytes()), "\"b/\\303\\251\"");
    }

    #[test]
    fn stat_lines() {
        let mut out = Vec::new();
        write_stat(
            &mut out,
            &[
                StatLine {
                    name: "a.txt".into(),
                    lines: Some((2, 1)),
                    sizes: (0, 0),
                },
                StatLine {
                    name: "bin".into(),
                    lines: None,
                    sizes: (0, 12),
                },
            ],
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            " a.txt |   3 ++-\n bin   | Bin 0 -> 12 bytes\n 2 files changed, 2 insertions(+), 1 deletion(-)\n"
        );
    }
}
