//! The `mvm` binary on bad input: exit statuses, messages, and nothing
//! left behind. No VM boots here (the integration tests in tests/ do that).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

struct Env {
    dir: PathBuf,
}

impl Env {
    fn new() -> Env {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "mvm-cli-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("state")).unwrap();
        std::fs::create_dir_all(dir.join("proj")).unwrap();
        std::fs::write(dir.join("vmlinux"), b"not a kernel").unwrap();
        std::fs::write(dir.join("initrd"), b"not an initrd").unwrap();
        Env { dir }
    }

    fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    fn mvm(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_mvm"))
            .args(args)
            .env("MVM_STATE_DIR", self.state())
            .env("MVM_KERNEL", self.dir.join("vmlinux"))
            .env("MVM_INITRD", self.dir.join("initrd"))
            // Nothing in these tests may start a VMM.
            .env("MVM_VMM", self.dir.join("no-such-vmm"))
            // Nor build an image (an empty image directory of its own).
            .env("MVM_IMAGE_DIR", self.dir.join("images"))
            .env_remove("MVM_LOG")
            .output()
            .unwrap()
    }

    fn project(&self) -> String {
        self.dir.join("proj").display().to_string()
    }

    /// State root entries other than the lock file.
    fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.state())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != ".lock")
            .collect();
        v.sort();
        v
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn expect(o: &Output, code: i32, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
}

#[test]
fn unknown_vm_is_a_usage_error_naming_it() {
    let e = Env::new();
    for args in [
        &["status", "ghost"][..],
        &["start", "ghost"],
        &["stop", "ghost"],
        &["restart", "ghost"],
        &["rm", "ghost"],
        &["logs", "ghost"],
        &["shell", "ghost"],
        &["exec", "ghost", "--", "true"],
    ] {
        let o = e.mvm(args);
        expect(&o, 2, "no VM named \"ghost\"");
        assert!(stderr(&o).starts_with("mvm: error: "), "{args:?}");
    }
}

#[test]
fn bad_names_are_refused() {
    let e = Env::new();
    let long = "a".repeat(33);
    for name in ["Bad_Name", long.as_str(), "é", "a.b", "a b"] {
        let o = e.mvm(&["create", "--no-image", name, "--project", &e.project()]);
        expect(&o, 2, "invalid VM name");
        let o = e.mvm(&["status", name]);
        expect(&o, 2, "invalid VM name");
    }
    assert!(e.entries().is_empty());
}

#[test]
fn bad_project_creates_nothing() {
    let e = Env::new();
    let missing = e.dir.join("missing").display().to_string();
    expect(
        &e.mvm(&["create", "--no-image", "web", "--project", &missing]),
        2,
        "no such directory",
    );
    let file = e.dir.join("vmlinux").display().to_string();
    expect(
        &e.mvm(&["create", "--no-image", "web", "--project", &file]),
        2,
        "not a directory",
    );
    assert!(e.entries().is_empty(), "{:?}", e.entries());
}

#[test]
fn create_twice_and_list() {
    let e = Env::new();
    let o = e.mvm(&[
        "create",
        "--no-image",
        "web",
        "--project",
        &e.project(),
        "--cpus",
        "3",
        "--memory",
        "300",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    expect(
        &e.mvm(&["create", "--no-image", "web", "--project", &e.project()]),
        2,
        "already exists",
    );
    assert_eq!(e.entries(), ["web"]);

    let o = e.mvm(&["list"]);
    assert!(o.status.success());
    let text = String::from_utf8(o.stdout).unwrap();
    let mut lines = text.lines();
    assert!(
        lines
            .next()
            .unwrap()
            .starts_with("NAME  STATE    PID  CPUS  MEMORY  IP  UPTIME  PROJECT"),
        "{text}"
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    // No address before the first start.
    assert_eq!(&row[..7], ["web", "stopped", "-", "3", "300M", "-", "-"]);

    let o = e.mvm(&["list", "--json"]);
    let json = String::from_utf8(o.stdout).unwrap();
    assert!(
        json.trim_start().starts_with('[')
            && json.contains("\"name\": \"web\"")
            && json.contains("\"state\": \"stopped\""),
        "{json}"
    );
    let o = e.mvm(&["status", "web", "--json"]);
    let json = String::from_utf8(o.stdout).unwrap();
    assert!(
        json.contains("\"memory_mib\": 300") && json.contains("\"mac\": \""),
        "{json}"
    );

    // Not running: exec and shell say so; stop has nothing to do.
    expect(&e.mvm(&["exec", "web", "--", "true"]), 1, "is not running");
    let o = e.mvm(&["stop", "web"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("was not running"));

    let o = e.mvm(&["rm", "web"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(e.entries().is_empty());
}

#[test]
fn rm_refuses_a_running_vm() {
    let e = Env::new();
    assert!(e
        .mvm(&["create", "--no-image", "busy", "--project", &e.project()])
        .status
        .success());
    // Stand in for a running mvm-vmm: hold its pid file lock.
    let held = mvm::pidfile::PidFile::acquire(&e.state().join("busy/vmm.pid")).unwrap();
    expect(&e.mvm(&["rm", "busy"]), 1, "is running");
    assert!(e.state().join("busy/vm.toml").exists());
    let o = e.mvm(&["status", "busy"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("state:     running"));
    let o = e.mvm(&["start", "busy"]);
    assert!(o.status.success());
    assert!(stderr(&o).contains("busy is already running"));
    drop(held);
}

#[test]
fn start_with_an_invalid_definition_starts_nothing() {
    let e = Env::new();
    assert!(e
        .mvm(&["create", "--no-image", "web", "--project", &e.project()])
        .status
        .success());
    let file = e.state().join("web/vm.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, text.replace("[machine]", "[machine\n")).unwrap();
    let o = e.mvm(&["start", "web"]);
    let err = stderr(&o);
    expect(&o, 2, &file.display().to_string());
    assert!(err.contains("vm.toml:"), "names no line: {err}");
    for f in ["vmm.pid", "vmm.log", "console.log", "vsock.sock"] {
        assert!(!e.state().join("web").join(f).exists(), "{f} exists");
    }
    // list still shows it, as broken.
    let o = e.mvm(&["list"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("broken"));
}

#[test]
fn start_reports_a_missing_vmm() {
    let e = Env::new();
    assert!(e
        .mvm(&["create", "--no-image", "web", "--project", &e.project()])
        .status
        .success());
    expect(&e.mvm(&["start", "web", "--timeout", "1"]), 1, "cannot run mvm-vmm");
}

#[test]
fn missing_kernel_says_what_to_do() {
    let e = Env::new();
    let o = Command::new(env!("CARGO_BIN_EXE_mvm"))
        .args(["create", "--no-image", "web", "--project", &e.project()])
        .env("MVM_STATE_DIR", e.state())
        .env_remove("MVM_KERNEL")
        .env_remove("MVM_INITRD")
        .output()
        .unwrap();
    expect(&o, 2, "--kernel");
    assert!(e.entries().is_empty());
}

#[test]
fn help_usage_and_completions() {
    let e = Env::new();
    for cmd in [
        "create",
        "start",
        "stop",
        "restart",
        "rm",
        "list",
        "status",
        "logs",
        "shell",
        "exec",
        "image",
        "completions",
    ] {
        let o = e.mvm(&[cmd, "--help"]);
        assert_eq!(o.status.code(), Some(0), "{cmd} --help");
        assert!(!o.stdout.is_empty());
    }
    let o = e.mvm(&["--help"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("Exit status"));
    // clap's own usage errors exit 2.
    assert_eq!(e.mvm(&["exec", "web", "true"]).status.code(), Some(2));
    assert_eq!(e.mvm(&["frobnicate"]).status.code(), Some(2));
    assert_eq!(e.mvm(&["create"]).status.code(), Some(2));
    let o = e.mvm(&["completions", "bash"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("mvm"));
    expect(
        &e.mvm(&[
            "create",
            "--no-image",
            "v",
            "--project",
            &e.project(),
            "--volume",
            "data",
        ]),
        2,
        "volume \"data\"",
    );
}

#[test]
fn state_dir_flag_overrides_the_environment() {
    let e = Env::new();
    let other = e.dir.join("other");
    let o = e.mvm(&[
        "--state-dir",
        &other.display().to_string(),
        "create",
        "--no-image",
        "web",
        "--project",
        &e.project(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(other.join("web/vm.toml").exists());
    assert!(e.entries().is_empty());
    assert!(Path::new(&other).join(".lock").exists());
}

/// `logs` prints the console log; `logs -f` keeps printing what is
/// appended, and starts over when a new start truncates the file.
#[test]
fn logs_prints_and_follows_the_console() {
    use std::io::{BufRead, BufReader, Write};
    let e = Env::new();
    assert!(e
        .mvm(&["create", "--no-image", "web", "--project", &e.project()])
        .status
        .success());
    let console = e.state().join("web/console.log");
    std::fs::write(&console, "first boot\n").unwrap();
    let o = e.mvm(&["logs", "web"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "first boot\n");

    let mut follow = Command::new(env!("CARGO_BIN_EXE_mvm"))
        .args(["logs", "-f", "web"])
        .env("MVM_STATE_DIR", e.state())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(follow.stdout.take().unwrap()).lines();
    // A line that never comes must fail the test, not hang it.
    let pid = follow.id() as libc::pid_t;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let finished = done.clone();
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(30));
        if !finished.load(std::sync::atomic::Ordering::SeqCst) {
            // SAFETY: plain kill(2) of our child, not yet waited for.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    });
    assert_eq!(lines.next().unwrap().unwrap(), "first boot");
    let mut f = std::fs::OpenOptions::new().append(true).open(&console).unwrap();
    writeln!(f, "appended later").unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "appended later");
    // A new start truncates the file: -f begins again from the top.
    std::fs::write(&console, "second boot\n").unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "second boot");
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    follow.kill().unwrap();
    follow.wait().unwrap();
}

#[test]
fn image_options_and_commands_on_bad_input() {
    let e = Env::new();
    let p = e.project();
    expect(
        &e.mvm(&["create", "v", "--project", &p, "--no-image", "--ephemeral"]),
        2,
        "--ephemeral and --root-size apply to an image root",
    );
    expect(
        &e.mvm(&["create", "v", "--project", &p, "--image", "x", "--no-image"]),
        2,
        "cannot be used with",
    );
    expect(
        &e.mvm(&["create", "v", "--project", &p, "--ephemeral", "--root-size", "10"]),
        2,
        "cannot be used with",
    );
    expect(
        &e.mvm(&["create", "v", "--project", &p, "--image", "nope"]),
        2,
        "no image \"nope\"",
    );
    let not_ext4 = e.dir.join("vmlinux").display().to_string();
    expect(
        &e.mvm(&["create", "v", "--project", &p, "--image", &not_ext4]),
        2,
        "not an ext4 image",
    );
    expect(&e.mvm(&["create", "images", "--no-image"]), 2, "reserved");
    assert!(e.entries().is_empty(), "{:?}", e.entries());

    let o = e.mvm(&["image", "list"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("NAME "));
    let o = e.mvm(&["image", "list", "--json"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "[]");
    expect(&e.mvm(&["image", "rm", "nope"]), 2, "no image \"nope\"");
    expect(&e.mvm(&["image", "build", "--suite", "a b"]), 2, "suite \"a b\"");
    expect(&e.mvm(&["image", "build", "--name", "A"]), 2, "image name \"A\"");
    expect(
        &e.mvm(&["image", "build", "--packages", "git,$(x)"]),
        2,
        "package \"$(x)\"",
    );
    expect(&e.mvm(&["image", "build", "--mirror", "deb.debian.org"]), 2, "mirror");
}

#[test]
fn user_option_is_checked_stored_and_shown() {
    let e = Env::new();
    let create = |name: &str, extra: &[&str]| {
        let mut args = vec!["create", "--no-image", "--no-network", name, "--project"];
        let p = e.project();
        args.push(&p);
        args.extend_from_slice(extra);
        e.mvm(&args)
    };
    for (bad, want) in [
        ("dev:0:5", "uid 0 is root's"),
        ("dev:5:0", "gid 0 is root's"),
        ("bad name:5", "a user name is"),
        ("-x:5", "not starting with '-'"),
        ("dev:five", "uid \"five\""),
        ("nosuchuser-mvm", "the host has no user"),
    ] {
        expect(&create("u", &[&format!("--user={bad}")]), 2, want);
    }
    assert!(e.entries().is_empty());

    let o = create("u", &["--user", "dev:1234:1235"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let toml = std::fs::read_to_string(e.state().join("u/vm.toml")).unwrap();
    assert!(toml.contains(" mvm.user=dev:1234:1235\""), "{toml}");
    let o = e.mvm(&["status", "u", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        json["user"],
        serde_json::json!({"name": "dev", "uid": 1234, "gid": 1235})
    );
    let o = e.mvm(&["status", "u"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("user:      dev (uid 1234, gid 1235)"));

    // `--user root`: no user. (These tests run as root over a project
    // root owns, so the default is no user too.)
    for (name, extra) in [("r", &["--user", "root"][..]), ("d", &[][..])] {
        let o = create(name, extra);
        assert!(o.status.success(), "{}", stderr(&o));
        let o = e.mvm(&["list", "--json"]);
        let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let vm = json.as_array().unwrap().iter().find(|v| v["name"] == name).unwrap();
        // SAFETY: no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!(vm["user"], serde_json::Value::Null, "{name}");
        }
    }
    // Under sudo: the user who ran it.
    let o = Command::new(env!("CARGO_BIN_EXE_mvm"))
        .args(["create", "--no-image", "--no-network", "s"])
        .env("MVM_STATE_DIR", e.state())
        .env("MVM_KERNEL", e.dir.join("vmlinux"))
        .env("MVM_INITRD", e.dir.join("initrd"))
        .env("MVM_IMAGE_DIR", e.dir.join("images"))
        .env("SUDO_USER", "alice")
        .env("SUDO_UID", "1000")
        .env("SUDO_GID", "1001")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let toml = std::fs::read_to_string(e.state().join("s/vm.toml")).unwrap();
    // SAFETY: no preconditions.
    if unsafe { libc::getuid() } == 0 {
        assert!(toml.contains(" mvm.user=alice:1000:1001\""), "{toml}");
    }

    // --root is an option of exec and shell (the VM does not run here).
    expect(&e.mvm(&["exec", "--root", "u", "--", "id"]), 1, "is not running");
    expect(&e.mvm(&["shell", "--root", "u"]), 1, "is not running");
}
