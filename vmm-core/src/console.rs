//! The guest serial console on the host side: output sinks, a channel the
//! caller can read, and the input pump from standard input (with raw mode
//! for terminals and a Ctrl-A x escape to end the VM).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use mvm_devices::legacy::SerialPort;
use vmm_sys_util::epoll::EventSet;

use crate::config::ConsoleOutput;
use crate::vm::{StopReason, VmShared};
use crate::{Error, Result};

/// Writes straight to file descriptor 1: no buffering, so prompts without
/// a newline appear at once, and no lock shared with the caller's stdout.
struct StdoutWriter;

impl Write for StdoutWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            // SAFETY: writes from a valid buffer of the given length.
            let n = unsafe { libc::write(1, buf.as_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub(crate) fn open_output(output: ConsoleOutput) -> Result<Box<dyn Write + Send>> {
    Ok(match output {
        ConsoleOutput::Stdout => Box::new(StdoutWriter),
        ConsoleOutput::File(path) => Box::new(std::fs::File::create(&path).map_err(|e| Error::ConfigPath {
            key: "console.file",
            path: path.clone(),
            reason: format!("cannot create: {e}"),
        })?),
        ConsoleOutput::Writer(w) => w,
        ConsoleOutput::Null => Box::new(io::sink()),
    })
}

/// Sending half of [`channel`]: put it in the configuration with
/// `config.console.output = sender.into()`.
pub struct ConsoleSender(Sender<Vec<u8>>);

impl From<ConsoleSender> for ConsoleOutput {
    fn from(sender: ConsoleSender) -> Self {
        ConsoleOutput::Writer(Box::new(sender))
    }
}

impl Write for ConsoleSender {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .send(buf.to_vec())
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "console receiver dropped"))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Receiving half of [`channel`]: the console output as it arrives.
/// Reads return end-of-file once the VM is gone.
pub struct ConsoleReceiver {
    rx: Receiver<Vec<u8>>,
    buf: VecDeque<u8>,
}

impl ConsoleReceiver {
    /// Wait up to `timeout` for the next complete line (without its line
    /// ending). `Ok(None)` means the VM is gone and no output is left;
    /// `Err(())` means the timeout passed.
    #[allow(clippy::result_unit_err)]
    pub fn read_line_timeout(&mut self, timeout: Duration) -> std::result::Result<Option<String>, ()> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                let text = String::from_utf8_lossy(&line);
                return Ok(Some(text.trim_end_matches(['\r', '\n']).to_string()));
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(chunk) => self.buf.extend(chunk),
                Err(RecvTimeoutError::Timeout) => return Err(()),
                Err(RecvTimeoutError::Disconnected) if self.buf.is_empty() => return Ok(None),
                Err(RecvTimeoutError::Disconnected) => {
                    let rest: Vec<u8> = self.buf.drain(..).collect();
                    return Ok(Some(String::from_utf8_lossy(&rest).into_owned()));
                }
            }
        }
    }
}

/// Lines of console output (without line endings) until the VM is gone:
/// `for line in receiver.lines() { ... }`.
pub struct Lines<'a>(&'a mut ConsoleReceiver);

impl Iterator for Lines<'_> {
    type Item = String;
    fn next(&mut self) -> Option<String> {
        loop {
            // A long timeout only bounds each wait; the loop waits on.
            if let Ok(line) = self.0.read_line_timeout(Duration::from_secs(3600)) {
                return line;
            }
        }
    }
}

impl ConsoleReceiver {
    /// Iterate over the console output by lines, blocking for each, until
    /// the VM is gone (its last partial line comes last).
    pub fn lines(&mut self) -> Lines<'_> {
        Lines(self)
    }
}

impl Read for ConsoleReceiver {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.buf.is_empty() {
            match self.rx.recv() {
                Ok(chunk) => self.buf.extend(chunk),
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len());
        for (o, b) in out.iter_mut().zip(self.buf.drain(..n)) {
            *o = b;
        }
        Ok(n)
    }
}

/// A console sink the caller reads: put the sender in the configuration
/// (`config.console.output = sender.into()`) and read the receiver, e.g.
/// with [`ConsoleReceiver::lines`].
pub fn channel() -> (ConsoleSender, ConsoleReceiver) {
    let (tx, rx) = mpsc::channel();
    (
        ConsoleSender(tx),
        ConsoleReceiver {
            rx,
            buf: VecDeque::new(),
        },
    )
}

/// Puts a terminal in raw mode and restores it when dropped, on every path
/// out of [`crate::Vm::run`] (and out of any program that holds one: a
/// panic restores it too, since `panic = "abort"` skips drops).
pub struct RawTerminal {
    fd: RawFd,
    saved: libc::termios,
}

/// The settings to put back if the process panics while raw.
static RAW_SAVED: Mutex<Option<(RawFd, libc::termios)>> = Mutex::new(None);

fn restore_terminal(fd: RawFd, saved: &libc::termios) {
    // SAFETY: restores settings read from the same descriptor.
    unsafe { libc::tcsetattr(fd, libc::TCSANOW, saved) };
}

impl RawTerminal {
    /// Raw mode on `fd` if it is a terminal, else `None`.
    pub fn enter(fd: RawFd) -> Result<Option<Self>> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return Ok(None);
        }
        // SAFETY: termios is plain data; tcgetattr fills it.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor and pointer.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(Error::host("reading terminal settings")(io::Error::last_os_error()));
        }
        let mut raw = saved;
        // SAFETY: modifies the struct in place.
        unsafe { libc::cfmakeraw(&mut raw) };
        *RAW_SAVED.lock().unwrap_or_else(|p| p.into_inner()) = Some((fd, saved));
        static HOOK: std::sync::Once = std::sync::Once::new();
        HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                if let Some((fd, t)) = RAW_SAVED.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                    restore_terminal(*fd, t);
                }
                previous(info);
            }));
        });
        // SAFETY: valid descriptor and pointer.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(Error::host("setting terminal raw mode")(io::Error::last_os_error()));
        }
        Ok(Some(RawTerminal { fd, saved }))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore_terminal(self.fd, &self.saved);
        *RAW_SAVED.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// Ctrl-A, the escape key for console commands (as in QEMU and screen).
const ESCAPE: u8 = 0x01;
/// Host input kept while the guest's receive FIFO is full; past this the
/// pump stops reading until the guest drains it.
const PENDING_LIMIT: usize = 4096;

/// The console escape: Ctrl-A x asks to stop the VM, Ctrl-A Ctrl-A sends
/// one Ctrl-A, Ctrl-A followed by anything else sends both bytes.
#[derive(Debug, Default)]
pub(crate) struct EscapeFilter {
    after_escape: bool,
}

impl EscapeFilter {
    /// Queue the guest's share of `bytes` in `out`; true when the user
    /// asked to stop the VM (the rest of the input is dropped then).
    pub(crate) fn feed(&mut self, bytes: &[u8], out: &mut VecDeque<u8>) -> bool {
        for &b in bytes {
            if self.after_escape {
                self.after_escape = false;
                match b {
                    b'x' | b'X' => return true,
                    ESCAPE => out.push_back(ESCAPE),
                    other => out.extend([ESCAPE, other]),
                }
            } else if b == ESCAPE {
                self.after_escape = true;
            } else {
                out.push_back(b);
            }
        }
        false
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InputState {
    Reading,
    /// The guest is not draining its FIFO: stop reading until it does.
    PausedFull,
    /// End of input or a dead descriptor.
    Ended,
}

/// Moves host input into the UART's receive FIFO.
pub(crate) struct InputPump {
    input: RawFd,
    serial: Arc<Mutex<SerialPort>>,
    space_fd: RawFd,
    pending: VecDeque<u8>,
    state: InputState,
    interactive: bool,
    escape: EscapeFilter,
    vm: Arc<VmShared>,
}

impl InputPump {
    pub(crate) fn new(input: RawFd, interactive: bool, serial: Arc<Mutex<SerialPort>>, vm: Arc<VmShared>) -> Self {
        let space_fd = {
            let port = serial.lock().unwrap_or_else(|e| e.into_inner());
            std::os::fd::AsRawFd::as_raw_fd(port.input_space().eventfd())
        };
        InputPump {
            input,
            serial,
            space_fd,
            pending: VecDeque::new(),
            state: InputState::Reading,
            interactive,
            escape: EscapeFilter::default(),
            vm,
        }
    }

    /// Interpret the escape sequence in interactive mode, queue the rest.
    fn take_input(&mut self, bytes: &[u8]) {
        if !self.interactive {
            self.pending.extend(bytes);
        } else if self.escape.feed(bytes, &mut self.pending) {
            self.vm.request_stop(StopReason::ConsoleEscape);
        }
    }

    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut port = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let (front, _) = self.pending.as_slices();
        let n = port.enqueue_input(front);
        self.pending.drain(..n);
    }

    fn read_input(&mut self, ops: &mut EventOps) {
        let mut buf = [0u8; 1024];
        // SAFETY: reads into a valid buffer of the given length.
        let n = unsafe { libc::read(self.input, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if matches!(err.kind(), io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock) {
                return;
            }
            log::warn!("console input: {err}; no more input reaches the guest");
        }
        if n <= 0 {
            let _ = ops.remove(Events::new_raw(self.input, EventSet::IN));
            self.state = InputState::Ended;
            return;
        }
        self.take_input(&buf[..n as usize]);
    }
}

impl MutEventSubscriber for InputPump {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.space_fd {
            let mut count = [0u8; 8];
            // SAFETY: drains the eventfd counter into a valid 8-byte buffer.
            unsafe { libc::read(self.space_fd, count.as_mut_ptr().cast(), 8) };
        } else if events.fd() == self.input && self.state == InputState::Reading {
            self.read_input(ops);
        }
        self.flush();
        match self.state {
            InputState::Reading if self.pending.len() >= PENDING_LIMIT => {
                let _ = ops.remove(Events::new_raw(self.input, EventSet::IN));
                self.state = InputState::PausedFull;
            }
            InputState::PausedFull
                if self.pending.len() < PENDING_LIMIT / 2
                    && ops.add(Events::new_raw(self.input, EventSet::IN)).is_ok() =>
            {
                self.state = InputState::Reading;
            }
            _ => {}
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.input, EventSet::IN)) {
            // epoll refuses regular files and /dev/null (EPERM): such an
            // input has nothing to wait for, so it is not worth a warning.
            let not_pollable = matches!(&e, event_manager::Error::Epoll(errno) if errno.errno() == libc::EPERM);
            if not_pollable {
                log::debug!("standard input cannot be polled; the guest gets no console input");
            } else {
                log::warn!("console input cannot be watched ({e}); the guest gets no console input");
            }
            self.state = InputState::Ended;
        }
        if let Err(e) = ops.add(Events::new_raw(self.space_fd, EventSet::IN)) {
            log::warn!("console input flow control unavailable: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences() {
        let mut f = EscapeFilter::default();
        let mut out = VecDeque::new();
        assert!(!f.feed(b"ls\r", &mut out));
        assert!(!f.feed(&[ESCAPE], &mut out));
        assert!(!f.feed(&[ESCAPE, ESCAPE, b'q'], &mut out)); // split across reads
        assert_eq!(
            out.iter().copied().collect::<Vec<_>>(),
            [b'l', b's', b'\r', ESCAPE, ESCAPE, b'q']
        );
        out.clear();
        assert!(f.feed(&[b'a', ESCAPE, b'x', b'b'], &mut out));
        assert_eq!(out.iter().copied().collect::<Vec<_>>(), [b'a']);
    }

    #[test]
    fn channel_iterates_by_lines_and_converts_into_an_output() {
        let (mut tx, mut rx) = channel();
        let writer = std::thread::spawn(move || {
            tx.write_all(b"one\r\ntw").unwrap();
            tx.write_all(b"o\nthree").unwrap();
            let output: ConsoleOutput = tx.into();
            assert!(matches!(output, ConsoleOutput::Writer(_)));
        });
        assert_eq!(rx.lines().collect::<Vec<_>>(), ["one", "two", "three"]);
        writer.join().unwrap();
    }

    #[test]
    fn channel_delivers_lines_and_eof() {
        let (mut tx, mut rx) = channel();
        tx.write_all(b"hello\r\nwor").unwrap();
        tx.write_all(b"ld\n").unwrap();
        assert_eq!(rx.read_line_timeout(Duration::from_secs(1)), Ok(Some("hello".into())));
        assert_eq!(rx.read_line_timeout(Duration::from_secs(1)), Ok(Some("world".into())));
        assert_eq!(rx.read_line_timeout(Duration::from_millis(10)), Err(()));
        tx.write_all(b"tail").unwrap();
        drop(tx);
        assert_eq!(rx.read_line_timeout(Duration::from_secs(1)), Ok(Some("tail".into())));
        assert_eq!(rx.read_line_timeout(Duration::from_secs(1)), Ok(None));
    }
}
