//! `mvm-agent`: the microvm-dev guest agent, and the protocol the host
//! speaks to it ([`proto`]), shared by both ends.
//!
//! The agent runs in the guest, normally as PID 1 (`rdinit=/sbin/mvm-agent`
//! or `init=`); the host (`mvm`, or any program using the `mvm` library)
//! connects to it over vsock port [`proto::AGENT_PORT`].
//!
//! As PID 1 it mounts the usual file systems ([`init`]), applies the
//! `mvm.*` kernel command line settings ([`cmdline`]; network interfaces
//! by DHCP: [`dhcp`], [`netif`]), reaps every orphan
//! ([`reaper`]), and serves one request per connection ([`server`],
//! [`session`]). Flags: `--listen vsock:<port>` (default port 1024),
//! `--listen unix:<path>` (host tests: no init duties, no power off).
//!
//! # Building the guest binary
//!
//! The agent must be static (the guest may have no libc at all) and must
//! not abort on a panic (a panicking connection thread would kill PID 1
//! and panic the guest kernel), hence its own profile:
//!
//! ```text
//! RUSTFLAGS="-C target-feature=+crt-static" \
//!     cargo build --profile agent -p mvm-agent --target x86_64-unknown-linux-gnu
//! # -> target/x86_64-unknown-linux-gnu/agent/mvm-agent
//! ```
//!
//! (`--target` keeps RUSTFLAGS away from build scripts and proc macros.)

pub mod cmdline;
pub mod dhcp;
pub mod echo;
pub mod init;
pub mod mounts;
pub mod netif;
pub mod passwd;
pub mod power;
pub mod proto;
pub mod pty;
pub mod reaper;
pub mod server;
pub mod services;
pub mod session;
pub mod sys;

use std::ffi::OsString;
use std::io::Write;
use std::sync::Arc;

/// Log one line to stderr (the console, as PID 1) with the agent's prefix.
/// Errors writing it are ignored: there is nowhere else to report them.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::log_line(format_args!($($arg)*))
    };
}

#[doc(hidden)]
pub fn log_line(args: std::fmt::Arguments<'_>) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "mvm-agent: {args}");
}

/// The whole agent; `args` without the program name. Returns the exit
/// status, but never returns when it is PID 1 (init must not exit).
pub fn main(args: Vec<OsString>) -> i32 {
    let is_pid1 = std::process::id() == 1;
    let code = std::panic::catch_unwind(|| run(args, is_pid1)).unwrap_or_else(|_| {
        say!("the agent panicked");
        101
    });
    if is_pid1 {
        say!("cannot serve the host; idling (the guest stays up)");
        loop {
            std::thread::park();
        }
    }
    code
}

fn run(args: Vec<OsString>, is_pid1: bool) -> i32 {
    // As init, argv holds the kernel command-line words the kernel did not
    // know (`nopv`, `noxsave`, ...), not options for us.
    let args = if is_pid1 { &[][..] } else { &args[..] };
    let args = match server::parse_args(args) {
        Ok(server::Command::Run(a)) => a,
        Ok(server::Command::Print(text)) => {
            let _ = std::io::stdout().write_all(text.as_bytes());
            return 0;
        }
        Err(e) => {
            say!("{e}");
            let _ = std::io::stderr().write_all(server::USAGE.as_bytes());
            return 2;
        }
    };
    // Before any thread exists, so every thread inherits it.
    if let Err(e) = reaper::block_sigchld() {
        say!("cannot block SIGCHLD: {e}");
    }
    let init = is_pid1 && matches!(args.listen, server::Listen::Vsock(_));
    if init {
        power::block_signals();
    }
    let config = if init {
        init::setup_system();
        let config = init::read_config();
        if let Some(upper) = config.root {
            if let Err(e) = init::switch_root(upper) {
                // Running on from the initramfs would look like a working
                // VM without the user's system: stop, and say why.
                say!("cannot switch to the root file system: {e}; powering off");
                power::shut_down(proto::PowerAction::Poweroff);
            }
        }
        init::apply(&config);
        power::watch_signals();
        config
    } else {
        cmdline::Config::default()
    };
    let reaper = reaper::Reaper::new();
    if let Err(e) = reaper.start() {
        say!("cannot start the reaper thread: {e}");
        return 1;
    }
    if init {
        // What the host asked for last time, at once: the host sends the
        // list again once it sees the agent (a repeat changes nothing).
        let saved = services::load(std::path::Path::new(services::SAVED));
        if !saved.is_empty() {
            say!("starting {} service(s) kept from the last start", saved.len());
            services::registry().ensure(&reaper, saved);
        }
    }
    let mut warned = false;
    let listener = loop {
        match server::Listener::bind(&args.listen) {
            Ok(l) => break l,
            // Init cannot give up (nor exit): keep trying, quietly.
            Err(e) if init => {
                if !warned {
                    say!("cannot listen on {:?}: {e}; retrying every second", args.listen);
                    warned = true;
                }
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
            Err(e) => {
                say!("cannot listen on {:?}: {e}", args.listen);
                return 1;
            }
        }
    };
    match &args.listen {
        server::Listen::Vsock(port) => say!("ready on vsock port {port}"),
        server::Listen::Unix(path) => say!("ready on unix:{}", path.display()),
    }
    let ctx = Arc::new(session::Context {
        reaper,
        config,
        passwd: "/etc/passwd".into(),
        group: "/etc/group".into(),
        init,
    });
    server::serve(&listener, ctx)
}
