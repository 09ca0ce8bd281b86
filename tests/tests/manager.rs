//! End to end: the `mvm` manager with real guests whose PID 1 is
//! `mvm-agent` (the test initramfs, `rdinit=/sbin/mvm-agent`).
//!
//! One scenario, three boots (guest boots are slow on the development
//! host): two VMs over one project started at once (one of them twice,
//! concurrently), `list`, `exec` in each, `shell` driven through tmux, a
//! `kill -9` of one VMM and its restart, `rm` refused while running,
//! `mvm diff` / `apply` / `reset` of a running VM's project changes, host
//! edits firing a recursive inotify watcher in the other VM (and shared
//! writable mmap of a project file there), session environments (`[env]`
//! set and passthrough, `-e`, `-w`) and direnv (`mvm direnv init`, `use
//! mvm`, an `mvm_run` shim), and a clean stop of both.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mvm_tests::direnv::Direnv;
use mvm_tests::mvm_cli::{describe, stderr, stdout, Mvm};
use mvm_tests::{scratch_dir, wait_until};

/// Start timeout handed to `mvm start`: boots take 30-90 s here, longer
/// with two at once on two cores.
const START_TIMEOUT_S: &str = "900";

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// A tmux server of our own, one window running `mvm shell`.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .env_remove("TMUX")
            .env("TERM", "xterm")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("tmux (scripts/setup-host.sh installs it)")
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "mvm"];
        args.extend_from_slice(keys);
        let out = self.run(&args);
        assert!(out.status.success(), "tmux send-keys: {}", describe(&out));
    }

    fn screen(&self) -> String {
        // -J joins wrapped lines; -S - takes the whole history.
        stdout(&self.run(&["capture-pane", "-p", "-J", "-S", "-", "-t", "mvm"]))
    }

    fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        let mut screen = String::new();
        let found = wait_until(timeout, || {
            screen = self.screen();
            screen.contains(needle)
        });
        assert!(found, "{needle:?} did not appear within {timeout:?}; screen:\n{screen}");
        screen
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

fn project_listing(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("read project")
        .flatten()
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).unwrap_or_default())
        })
        .collect();
    files.sort();
    files
}

#[test]
fn manager_runs_vms_from_create_to_rm() {
    let dir = scratch_dir("manager");
    let project = dir.join("project");
    std::fs::create_dir_all(&project).unwrap();
    std::fs::write(project.join("README"), "the project\n").unwrap();
    std::fs::write(project.join("script.sh"), "echo from-project\n").unwrap();
    std::fs::create_dir_all(project.join("sub")).unwrap();
    std::fs::write(project.join("beta-removes"), "gone in beta\n").unwrap();
    let before = project_listing(&project);
    // beta's VMM runs unprivileged (scripts/setup-host.sh makes the user).
    let vmm_uid = mvm_tests::host_uid("microvm-dev").expect("the microvm-dev user (scripts/setup-host.sh)");
    let mvm = Mvm::new(dir.join("state"));
    let p = project.to_str().unwrap();

    // Two copies of one project; alpha's sessions get an environment.
    // alpha's VMM keeps root's rights (--vmm-user root), beta's runs as
    // microvm-dev (the default as root, said explicitly here).
    let out = mvm
        .command(&[
            "create",
            "--no-image",
            "--no-network",
            "--vmm-user",
            "root",
            "alpha",
            "--project",
            p,
            "--cpus",
            "1",
            "--memory",
            "128",
            "--env",
            "MVM_SET=fixed value",
            "--env",
            "MVM_PASS_ORDER=from-set",
            "--pass-env",
            "MVM_PASS_*",
        ])
        .env("MVM_PASS_TOKEN", SECRET)
        .output()
        .unwrap();
    assert!(out.status.success(), "mvm create alpha: {}", describe(&out));
    mvm.ok(&[
        "create",
        "--no-image",
        "--no-network",
        "beta",
        "--project",
        p,
        "--cpus",
        "1",
        "--memory",
        "128",
        "--vmm-user",
        "microvm-dev",
    ]);
    let definition = std::fs::read_to_string(mvm.root.join("alpha/vm.toml")).unwrap();
    assert!(definition.contains("rdinit=/sbin/mvm-agent"), "{definition}");
    assert!(!definition.contains("[security]"), "{definition}");
    let beta_definition = std::fs::read_to_string(mvm.root.join("beta/vm.toml")).unwrap();
    assert!(
        beta_definition.contains("[security]\nuser = \"microvm-dev\""),
        "{beta_definition}"
    );
    assert!(
        definition.contains("[env]") && definition.contains("passthrough = [\"MVM_PASS_*\"]"),
        "{definition}"
    );
    microvm_dev::VmConfig::from_file(mvm.root.join("alpha/vm.toml")).expect("the definition is a valid vm.toml");

    // Start both at once, alpha twice: it must start once.
    let t0 = Instant::now();
    let starts: Vec<_> = ["alpha", "alpha", "beta"]
        .iter()
        .map(|name| {
            mvm.command(&["start", name, "--timeout", START_TIMEOUT_S])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn mvm start")
        })
        .collect();
    let outs: Vec<Output> = starts.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    for out in &outs {
        assert!(out.status.success(), "mvm start: {}", describe(out));
    }
    eprintln!("both VMs ready after {:.1} s", t0.elapsed().as_secs_f64());
    let said_running = outs[..2]
        .iter()
        .filter(|o| format!("{}{}", stdout(o), stderr(o)).contains("already running"))
        .count();
    assert_eq!(
        said_running, 1,
        "one of two concurrent starts says the VM already runs: {outs:?}"
    );

    // Both listed as running, each with its own MAC, state dir and VMM.
    let list = mvm.json(&["list", "--json"]);
    let vms = list.as_array().expect("list --json is an array");
    assert_eq!(vms.len(), 2, "{list}");
    for vm in vms {
        assert_eq!(vm["state"], "running", "{vm}");
        assert_eq!(vm["project"], p, "{vm}");
    }
    assert_ne!(vms[0]["mac"], vms[1]["mac"]);
    assert_ne!(vms[0]["state_dir"], vms[1]["state_dir"]);
    assert_ne!(vms[0]["pid"], vms[1]["pid"]);
    let table = mvm.ok(&["list"]);
    assert!(
        table.contains("alpha") && table.contains("beta") && table.contains("running"),
        "{table}"
    );

    // exec: hostname, working directory, status codes, streams.
    assert_eq!(mvm.ok(&["exec", "alpha", "--", "hostname"]), "alpha\n");
    assert_eq!(mvm.ok(&["exec", "beta", "--", "hostname"]), "beta\n");
    assert_eq!(mvm.ok(&["exec", "alpha", "--", "pwd"]), "/project\n");
    assert_eq!(mvm.ok(&["exec", "alpha", "--", "sh", "script.sh"]), "from-project\n");
    let out = mvm.run(&["exec", "alpha", "--", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", describe(&out));
    let out = mvm.run(&["exec", "alpha", "--", "sh", "-c", "kill -9 $$"]);
    assert_eq!(out.status.code(), Some(137), "killed by SIGKILL: {}", describe(&out));
    let out = mvm.run(&["exec", "alpha", "--", "sh", "-c", "echo out; echo err >&2"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!((stdout(&out).as_str(), stderr(&out).as_str()), ("out\n", "err\n"));
    let out = mvm.run_with_input(&["exec", "alpha", "--", "cat"], b"hi\n");
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(stdout(&out), "hi\n");
    let out = mvm.run(&["exec", "alpha", "--", "no-such-program"]);
    assert_eq!(out.status.code(), Some(127), "{}", describe(&out));
    assert!(stderr(&out).contains("no-such-program"), "{}", describe(&out));
    assert!(stdout(&out).is_empty());
    let out = mvm.run(&["exec", "alpha", "--", "tty"]);
    assert_eq!(stdout(&out), "not a tty\n", "no PTY without -t");
    let out = mvm.run(&["exec", "-t", "alpha", "--", "tty"]);
    assert!(
        stdout(&out).starts_with("/dev/pts/"),
        "a PTY with -t: {}",
        describe(&out)
    );

    session_environment(&mvm);

    // The guest clock follows the host's (set by `mvm start`).
    let guest: i64 = mvm
        .ok(&["exec", "alpha", "--", "date", "+%s"])
        .trim()
        .parse()
        .expect("date +%s");
    let host = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((guest - host).abs() <= 5, "guest clock {guest}, host {host}");

    // Each VM writes to its own upper layer: the other VM and the host
    // never see it.
    mvm.ok(&[
        "exec",
        "alpha",
        "--",
        "sh",
        "-c",
        "echo mine > /project/alpha.txt; rm /project/README",
    ]);
    assert_eq!(mvm.ok(&["exec", "alpha", "--", "cat", "/project/alpha.txt"]), "mine\n");
    let out = mvm.run(&["exec", "beta", "--", "cat", "/project/alpha.txt"]);
    assert_eq!(out.status.code(), Some(1), "beta sees alpha's file: {}", describe(&out));
    assert_eq!(
        mvm.ok(&["exec", "beta", "--", "cat", "/project/README"]),
        "the project\n"
    );
    assert_eq!(project_listing(&project), before, "the host project changed");

    // beta's VMM: unprivileged, every thread but its main one confined,
    // and what the guest makes in the share is the guest's own there and
    // the VMM user's on the host; deleting a project file (a whiteout, no
    // CAP_MKNOD needed) works too.
    let beta_vmm = mvm_tests::assert_vmm_unprivileged(mvm.pid_of("beta") as u32, vmm_uid);
    mvm_tests::assert_threads_confined(beta_vmm, &["vcpu0", "mvm-vm", "mvm-control", "mvm-watch"]);
    let owners = mvm.ok(&[
        "exec",
        "beta",
        "--",
        "sh",
        "-c",
        "cd /project && echo b > beta.txt && rm beta-removes && mkdir made && \
         echo \"$(id -u) $(stat -c %u beta.txt) $(stat -c %u made)\" && ls",
    ]);
    let mut lines = owners.lines();
    let ids: Vec<&str> = lines.next().unwrap_or_default().split(' ').collect();
    assert!(
        ids.len() == 3 && ids[1] == ids[0] && ids[2] == ids[0],
        "owners in beta: {owners}"
    );
    assert!(!owners.contains("beta-removes"), "{owners}");
    let upper = mvm.root.join("beta/overlay/project");
    for made in ["beta.txt", "made"] {
        let meta = std::fs::metadata(upper.join(made)).unwrap();
        assert_eq!(
            std::os::unix::fs::MetadataExt::uid(&meta),
            vmm_uid,
            "{made} in beta's upper layer"
        );
    }
    assert_eq!(project_listing(&project), before, "the host project changed");

    // The console log holds the guest's boot, up to the agent.
    let logs = mvm.ok(&["logs", "alpha"]);
    assert!(logs.contains("mvm-agent: ready on vsock port 1024"), "{logs}");

    // rm refuses a running VM.
    let out = mvm.run(&["rm", "alpha"]);
    assert!(!out.status.success(), "rm of a running VM: {}", describe(&out));
    assert!(stderr(&out).contains("running"), "{}", describe(&out));
    assert!(mvm.root.join("alpha/vm.toml").exists());

    shell_through_tmux(&mvm);

    // Bring alpha's changes back to the host: diff, a conflict, apply.
    review_changes(&mvm, &project);

    // Host edits reach beta at once and fire its file watchers; mmap.
    let latencies = mvm_tests::watch::host_edits_reach_guest_watchers(&mvm, "beta", &project);
    for (step, l) in &latencies {
        eprintln!(
            "host {step} -> beta's watcher: {:.0} ms (guest clock), {:.0} ms back on the host",
            l.guest.as_secs_f64() * 1000.0,
            l.round_trip.as_secs_f64() * 1000.0
        );
    }
    direnv_in_the_project(&mvm, &project, &dir);
    let before = project_listing(&project);

    // kill -9 of beta's VMM: crashed, then it starts again.
    let beta_pid = mvm.pid_of("beta");
    // SAFETY: plain kill(2) of the VMM the pid file names.
    unsafe { libc::kill(beta_pid, libc::SIGKILL) };
    assert!(
        wait_until(Duration::from_secs(30), || !alive(beta_pid)),
        "beta's VMM survived SIGKILL"
    );
    let status = mvm.json(&["status", "beta", "--json"]);
    assert_eq!(status["state"], "crashed", "{status}");
    let tail = status["console_tail"].as_array().map(Vec::len).unwrap_or(0);
    assert!(tail > 0, "a crashed VM shows its last console lines: {status}");
    let table = mvm.ok(&["list"]);
    assert!(table.contains("crashed"), "{table}");
    mvm.ok(&["start", "beta", "--timeout", START_TIMEOUT_S]);
    assert_eq!(mvm.ok(&["exec", "beta", "--", "hostname"]), "beta\n");

    // `reboot` in the guest (busybox signals init): the agent shuts down
    // cleanly and the same VMM boots the guest again.
    let beta_pid = mvm.pid_of("beta");
    let t = Instant::now();
    // Its answer may or may not beat the reboot; it must not be 127.
    let out = mvm.run(&["exec", "beta", "--", "reboot"]);
    assert_ne!(out.status.code(), Some(127), "{}", describe(&out));
    let back = wait_until(Duration::from_secs(900), || {
        std::thread::sleep(Duration::from_secs(2));
        let out = mvm.run(&["exec", "beta", "--", "cat", "/proc/uptime"]);
        // Up again, and not the old guest still shutting down.
        out.status.success()
            && stdout(&out)
                .split('.')
                .next()
                .and_then(|s| s.parse::<u64>().ok())
                .is_some_and(|up| up < t.elapsed().as_secs())
    });
    assert!(
        back,
        "beta did not come back after reboot: {}",
        mvm.ok(&["logs", "beta"])
    );
    eprintln!("beta rebooted in {:.1} s", t.elapsed().as_secs_f64());
    assert_eq!(
        mvm.pid_of("beta"),
        beta_pid,
        "the same VMM process runs the rebooted guest"
    );
    // The console log holds both boots (the guest's serial output may
    // trail its agent's first answers a little).
    let mut logs = String::new();
    let both = wait_until(Duration::from_secs(60), || {
        logs = mvm.ok(&["logs", "beta"]);
        logs.matches("mvm-agent: ready on vsock port").count() == 2
    });
    assert!(both, "the console log lacks a boot:\n{logs}");

    // Stop both through their agents.
    for name in ["alpha", "beta"] {
        let t = Instant::now();
        let said = mvm.ok(&["stop", name, "--timeout", "120"]);
        eprintln!("{name} stopped in {:.1} s: {}", t.elapsed().as_secs_f64(), said.trim());
        assert!(said.to_lowercase().contains("power"), "stopped by the agent: {said}");
        let status = mvm.json(&["status", name, "--json"]);
        assert_eq!(status["state"], "stopped", "{status}");
    }
    let out = mvm.run(&["stop", "alpha"]);
    assert!(out.status.success(), "stopping a stopped VM: {}", describe(&out));

    // rm removes the state directory, never the project.
    mvm.ok(&["rm", "alpha"]);
    assert!(!mvm.root.join("alpha").exists());
    mvm.ok(&["rm", "beta"]);
    assert_eq!(mvm.json(&["list", "--json"]), serde_json::json!([]));
    assert_eq!(project_listing(&project), before, "rm touched the project");
    drop(mvm);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A value passed through from the host: it must reach alpha's sessions
/// and never any file of the VM.
const SECRET: &str = "s3cret-passed-through";

fn env_lines(out: &Output) -> Vec<String> {
    assert!(out.status.success(), "{}", describe(out));
    stdout(out).lines().map(str::to_string).collect()
}

/// alpha's `[env]` (set: MVM_SET, MVM_PASS_ORDER; passthrough: MVM_PASS_*),
/// host variables, `-e` and `-w`; beta has no `[env]`.
fn session_environment(mvm: &Mvm) {
    let run = |args: &[&str]| {
        mvm.command(args)
            .env("MVM_PASS_TOKEN", SECRET)
            .env("MVM_PASS_ORDER", "from-host")
            .env("MVM_OTHER", "not-passed")
            .output()
            .unwrap()
    };
    let env = env_lines(&run(&["exec", "alpha", "--", "env"]));
    let has = |env: &[String], line: &str| env.iter().any(|l| l == line);
    assert!(has(&env, &format!("MVM_PASS_TOKEN={SECRET}")), "passthrough: {env:?}");
    assert!(has(&env, "MVM_SET=fixed value"), "[env].set: {env:?}");
    assert!(has(&env, "MVM_PASS_ORDER=from-host"), "the host wins over set: {env:?}");
    assert!(
        !env.iter().any(|l| l.starts_with("MVM_OTHER=")),
        "outside the allowlist: {env:?}"
    );
    assert!(!env.iter().any(|l| l.starts_with("MVM_STATE_DIR=")), "{env:?}");
    let env = env_lines(&run(&[
        "exec",
        "alpha",
        "-e",
        "MVM_PASS_ORDER=from-e",
        "-e",
        "MVM_OTHER",
        "--env",
        "MVM_NEW=a b",
        "--",
        "env",
    ]));
    assert!(has(&env, "MVM_PASS_ORDER=from-e"), "-e wins: {env:?}");
    assert!(has(&env, "MVM_OTHER=not-passed"), "-e NAME copies mvm's: {env:?}");
    assert!(has(&env, "MVM_NEW=a b"), "{env:?}");
    let env = env_lines(&run(&["exec", "beta", "--", "env"]));
    assert!(
        !env.iter()
            .any(|l| l.starts_with("MVM_PASS_") || l.starts_with("MVM_SET=")),
        "beta has no [env]: {env:?}"
    );
    assert_eq!(
        stdout(&run(&["exec", "alpha", "-w", "sub", "--", "pwd"])),
        "/project/sub\n"
    );
    assert_eq!(
        stdout(&run(&["exec", "alpha", "--workdir", "/tmp", "--", "pwd"])),
        "/tmp\n"
    );
    let out = run(&["exec", "alpha", "-w", "missing", "--", "pwd"]);
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(stderr(&out).contains("/project/missing"), "{}", describe(&out));

    // Never written down on the host.
    for file in ["vm.toml", "vmm.log", "console.log"] {
        let text = std::fs::read_to_string(mvm.root.join("alpha").join(file)).unwrap_or_default();
        assert!(!text.contains(SECRET), "alpha/{file} holds the passed-through value");
    }

    let exports = mvm.ok(&["env", "alpha"]);
    assert!(exports.contains("export MVM_VM='alpha'\n"), "{exports}");
    let json = mvm.json(&["env", "alpha", "--json"]);
    assert_eq!(json["MVM_VM"], "alpha", "{json}");
    assert!(json["MVM_PROJECT"]
        .as_str()
        .is_some_and(|p| exports.contains(&format!("export MVM_PROJECT='{p}'\n"))));
}

/// Real direnv in the project: `mvm direnv init --run pwd`, `direnv
/// allow`, the exported variables, and the `pwd` shim run from a
/// subdirectory (mvm_tests::direnv: scratch HOME, the test's mvm first on
/// PATH).
fn direnv_in_the_project(mvm: &Mvm, project: &Path, scratch: &Path) {
    let d = Direnv::new(mvm, scratch, &[]);
    let run = |program: &Path, args: &[&str], cwd: &Path| d.run(program, args, cwd);
    let direnv = d.direnv.clone();
    let p = project.to_str().unwrap();
    let out = run(&mvm.bin, &["direnv", "init", p, "--run", "pwd"], scratch);
    assert!(
        stderr(&out).contains("the project's VM: alpha (running)"),
        "{}",
        describe(&out)
    );
    let envrc = std::fs::read_to_string(project.join(".envrc")).unwrap();
    assert!(envrc.contains("\nuse mvm\nmvm_run pwd\n"), "{envrc}");
    assert!(d.home.join(".config/direnv/lib/mvm.sh").is_file());
    run(&direnv, &["allow", p], scratch);

    let t = Instant::now();
    let env = env_lines(&run(&direnv, &["exec", p, "env"], scratch));
    eprintln!(
        "direnv exec (use mvm) took {:.0} ms",
        t.elapsed().as_secs_f64() * 1000.0
    );
    assert!(env.iter().any(|l| l == "MVM_VM=alpha"), "{env:?}");
    assert!(env.iter().any(|l| *l == format!("MVM_PROJECT={p}")), "{env:?}");

    // The shim runs `pwd` in alpha, in the subdirectory matching ours.
    let out = run(&direnv, &["exec", p, "pwd"], &project.join("sub"));
    assert_eq!(stdout(&out), "/project/sub\n", "{}", describe(&out));
    let out = run(&direnv, &["exec", p, "pwd"], project);
    assert_eq!(stdout(&out), "/project\n", "{}", describe(&out));
}

/// `mvm diff`, `apply` and `reset` on running alpha, which has already
/// added alpha.txt and deleted README: a change to script.sh and a new
/// file, the patch checked by `git apply`, a host edit refused as a
/// conflict, resolved by `mvm reset`, then the rest applied to the host.
fn review_changes(mvm: &Mvm, project: &Path) {
    mvm.ok(&[
        "exec",
        "alpha",
        "--",
        "sh",
        "-c",
        "echo from-vm >> /project/script.sh; mkdir -p /project/docs; printf 'notes\\n' > /project/docs/notes.txt",
    ]);
    let t = Instant::now();
    let diff = mvm.ok(&["diff", "alpha"]);
    eprintln!("mvm diff of a running VM: {:.0} ms", t.elapsed().as_secs_f64() * 1000.0);
    for needle in [
        "diff --git a/README b/README\ndeleted file mode 100644\n",
        "diff --git a/alpha.txt b/alpha.txt\nnew file mode 100644\n--- /dev/null\n+++ b/alpha.txt\n@@ -0,0 +1 @@\n+mine\n",
        "diff --git a/docs/notes.txt b/docs/notes.txt\nnew file mode 100644\n",
        "--- a/script.sh\n+++ b/script.sh\n@@ -1 +1,2 @@\n echo from-project\n+from-vm\n",
    ] {
        assert!(diff.contains(needle), "{needle:?} not in:\n{diff}");
    }
    // The patch is git's: it applies to a copy of the project.
    let copy = project.with_file_name("project-copy");
    let _ = std::fs::remove_dir_all(&copy);
    let cp = Command::new("cp").arg("-a").arg(project).arg(&copy).status().unwrap();
    assert!(cp.success());
    let patch = project.with_file_name("alpha.patch");
    std::fs::write(&patch, &diff).unwrap();
    let git = Command::new("git")
        .current_dir(&copy)
        .args(["apply", "--check"])
        .arg(&patch)
        .output()
        .expect("git");
    assert!(git.status.success(), "git apply --check: {}", describe(&git));
    let stat = mvm.ok(&["diff", "alpha", "--stat"]);
    assert!(
        stat.contains(" script.sh ") && stat.contains(" files changed, "),
        "{stat}"
    );
    assert_eq!(
        mvm.ok(&["diff", "alpha", "docs"]).lines().next(),
        Some("diff --git a/docs/notes.txt b/docs/notes.txt")
    );
    let check = mvm.ok(&["apply", "alpha", "--check"]);
    assert!(check.contains("would apply cleanly"), "{check}");

    // The host edits script.sh meanwhile: apply refuses, naming it, and
    // writes nothing.
    std::fs::write(project.join("script.sh"), "echo host-edit\n").unwrap();
    let out = mvm.run(&["apply", "alpha"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        stderr(&out).contains("script.sh: changed on the host"),
        "{}",
        describe(&out)
    );
    assert!(!project.join("alpha.txt").exists() && project.join("README").exists());

    // Resolved by dropping the VM's change: the guest sees the host's file.
    let reset = mvm.ok(&["reset", "alpha", "script.sh"]);
    assert_eq!(reset, "reset script.sh\n");
    let mut seen = String::new();
    let fresh = wait_until(Duration::from_secs(10), || {
        seen = mvm.ok(&["exec", "alpha", "--", "cat", "/project/script.sh"]);
        seen == "echo host-edit\n"
    });
    assert!(fresh, "after reset the guest reads {seen:?}");
    let t = Instant::now();
    let applied = mvm.ok(&["apply", "alpha"]);
    eprintln!(
        "mvm apply of a running VM: {:.0} ms",
        t.elapsed().as_secs_f64() * 1000.0
    );
    assert!(
        applied.contains("A  alpha.txt") && applied.contains("D  README"),
        "{applied}"
    );
    assert_eq!(std::fs::read_to_string(project.join("alpha.txt")).unwrap(), "mine\n");
    assert_eq!(
        std::fs::read_to_string(project.join("docs/notes.txt")).unwrap(),
        "notes\n"
    );
    assert_eq!(
        std::fs::read_to_string(project.join("script.sh")).unwrap(),
        "echo host-edit\n"
    );
    assert!(!project.join("README").exists());
    assert_eq!(mvm.ok(&["diff", "alpha"]), "");
    // The guest still reads its files.
    assert_eq!(mvm.ok(&["exec", "alpha", "--", "cat", "/project/alpha.txt"]), "mine\n");
    let _ = std::fs::remove_dir_all(&copy);
    let _ = std::fs::remove_file(&patch);
}

/// `mvm shell alpha` in a tmux window: output, window size, Ctrl-C, exit
/// status, and the host terminal restored afterwards.
fn shell_through_tmux(mvm: &Mvm) {
    let tmux = Tmux {
        socket: format!("mvm-test-{}", std::process::id()),
    };
    let env: Vec<String> = mvm
        .env()
        .iter()
        .map(|(k, v)| format!("{k}='{}'", v.display()))
        .collect();
    let command = format!(
        "env TERM=xterm {} '{}' shell alpha; echo \"SHELL-EXIT=$?\"; exec sleep 600",
        env.join(" "),
        mvm.bin.display()
    );
    let out = tmux.run(&["new-session", "-d", "-s", "mvm", "-x", "100", "-y", "30", &command]);
    assert!(out.status.success(), "tmux new-session: {}", describe(&out));
    let slow = Duration::from_secs(120);

    // Typed text and its output differ, so the output proves execution.
    tmux.keys(&["echo hello-$((6*7))", "Enter"]);
    tmux.wait_for("hello-42", slow);
    tmux.keys(&["echo size1=$(stty size) dir=$(pwd)", "Enter"]);
    tmux.wait_for("size1=30 100 dir=/project", slow);

    let out = tmux.run(&["resize-window", "-t", "mvm", "-x", "120", "-y", "40"]);
    assert!(out.status.success(), "tmux resize-window: {}", describe(&out));
    // The new size travels host SIGWINCH -> Resize -> TIOCSWINSZ.
    let resized = wait_until(slow, || {
        tmux.keys(&["echo size2=$(stty size)", "Enter"]);
        std::thread::sleep(Duration::from_secs(3));
        tmux.screen().contains("size2=40 120")
    });
    assert!(resized, "stty size never showed 40 120:\n{}", tmux.screen());

    // Ctrl-C reaches the guest program: sleep 100 ends at once. The marker
    // is echoed by the shell itself (no second process starts beside
    // `sleep`: on PVM hosts a busybox started next to another one may die
    // of SIGSEGV at start, see tests/guest/init `bb`); such a run is tried
    // again, since it would prove nothing about Ctrl-C.
    let mut interrupted = false;
    for attempt in 0..3 {
        let marker = format!("sleeping-{attempt}-4");
        tmux.keys(&[&format!("echo sleeping-{attempt}-$((2*2)); sleep 100"), "Enter"]);
        tmux.wait_for(&marker, slow);
        // Time for `sleep` to be exec'd and in the terminal's foreground.
        std::thread::sleep(Duration::from_secs(10));
        let t = Instant::now();
        tmux.keys(&["C-c"]);
        let done = format!("after-{attempt}-2-int");
        tmux.keys(&[&format!("echo after-{attempt}-$((1+1))-int"), "Enter"]);
        let screen = tmux.wait_for(&done, Duration::from_secs(60));
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "Ctrl-C did not interrupt sleep 100"
        );
        let run = screen.rsplit(marker.as_str()).next().unwrap_or_default();
        if !run.contains("Segmentation fault") {
            interrupted = true;
            break;
        }
    }
    assert!(
        interrupted,
        "sleep 100 crashed at start three times:\n{}",
        tmux.screen()
    );

    tmux.keys(&["exit 3", "Enter"]);
    tmux.wait_for("SHELL-EXIT=3", slow);
    // The pane's terminal is back in cooked mode: typed text echoes.
    tmux.keys(&["typed-after-exit"]);
    tmux.wait_for("typed-after-exit", Duration::from_secs(10));
}
