//! The host terminal and signals, for the binaries: whether a descriptor
//! is a terminal, its window size, and signals handled on a thread of their
//! own. (Raw mode is `microvm_dev::console::RawTerminal`.)

pub fn isatty(fd: libc::c_int) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

/// Rows and columns of the terminal on stdin or stdout.
pub fn window_size() -> Option<(u16, u16)> {
    for fd in [libc::STDIN_FILENO, libc::STDOUT_FILENO] {
        // SAFETY: TIOCGWINSZ writes one winsize into `ws`.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_row > 0 && ws.ws_col > 0 {
            return Some((ws.ws_row, ws.ws_col));
        }
    }
    None
}

/// Block `signals` in this thread and every thread it starts afterwards,
/// and hand each arrival to `handler` on a dedicated thread. If that thread
/// cannot start, the signals keep their default effect and the error says
/// why.
///
/// The thread runs `confine` first (the VMM installs its seccomp filter).
pub fn forward_signals(
    signals: &[libc::c_int],
    confine: impl FnOnce() + Send + 'static,
    handler: impl Fn(libc::c_int) + Send + 'static,
) -> std::io::Result<()> {
    // SAFETY: sigset operations on a local set, then a mask change for
    // this thread (the caller has not started other threads yet).
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .stack_size(64 << 10)
        .spawn(move || {
            confine();
            loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: waits on a valid signal set.
                if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                    handler(sig);
                }
            }
        });
    if let Err(e) = spawned {
        // SAFETY: undo the block so the signals keep their default effect.
        unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
        return Err(e);
    }
    Ok(())
}
