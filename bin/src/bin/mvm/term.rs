//! The host terminal: raw mode with guaranteed restore, window size, and
//! the signals `mvm` turns into messages for the guest.

use std::sync::Mutex;

/// The terminal settings to put back, for the panic hook.
static SAVED: Mutex<Option<(libc::c_int, libc::termios)>> = Mutex::new(None);

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

fn restore(fd: libc::c_int, t: &libc::termios) {
    // SAFETY: tcsetattr with settings tcgetattr returned for this fd.
    unsafe { libc::tcsetattr(fd, libc::TCSADRAIN, t) };
}

/// The terminal on `fd` in raw mode until this is dropped (or the process
/// panics: a hook restores it too, as `panic = "abort"` skips drops).
pub struct RawMode {
    fd: libc::c_int,
    saved: libc::termios,
}

impl RawMode {
    pub fn enable(fd: libc::c_int) -> std::io::Result<RawMode> {
        // SAFETY: tcgetattr fills `saved`; cfmakeraw edits a copy.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut raw = saved;
        unsafe { libc::cfmakeraw(&mut raw) };
        if let Ok(mut s) = SAVED.lock() {
            *s = Some((fd, saved));
        }
        static HOOK: std::sync::Once = std::sync::Once::new();
        HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                if let Ok(s) = SAVED.lock() {
                    if let Some((fd, t)) = s.as_ref() {
                        restore(*fd, t);
                    }
                }
                previous(info);
            }));
        });
        // SAFETY: as above.
        if unsafe { libc::tcsetattr(fd, libc::TCSADRAIN, &raw) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore(self.fd, &self.saved);
        if let Ok(mut s) = SAVED.lock() {
            *s = None;
        }
    }
}

/// Block `signals` in this thread and every thread it starts afterwards,
/// and hand each arrival to `handler` on a dedicated thread.
pub fn forward_signals(signals: &[libc::c_int], handler: impl Fn(libc::c_int) + Send + 'static) {
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
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: waits on a valid signal set.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                handler(sig);
            }
        });
    if spawned.is_err() {
        // SAFETY: undo the block so the signals keep their default effect.
        unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
    }
}
