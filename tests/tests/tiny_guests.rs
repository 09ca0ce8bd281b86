//! Guests of a few instructions (no kernel): exits, crashes and stopping,
//! checked through the binary and through the library API. Fast: no
//! guest kernel to interpret.

use std::time::Duration;

use microvm_dev::{console, Vm, VmConfig, VmExit};
use mvm_tests::*;

const QUICK: Duration = Duration::from_secs(60);

fn tiny_vm(dir: &std::path::Path, code: &[u8]) -> std::path::PathBuf {
    let kernel = dir.join("guest.elf");
    std::fs::write(&kernel, elf_guest(code, 0x10_0000)).unwrap();
    write_config(
        dir,
        &format!(
            "version = 1\n[boot]\nkernel = \"{}\"\n[console]\ninput = \"none\"\n",
            kernel.display()
        ),
    )
}

#[test]
fn uart_byte_then_i8042_reset_is_a_reboot() {
    let dir = scratch_dir("tiny-reset");
    let run = run_to_end(&tiny_vm(&dir, &uart_then_reset_code(b'Z')), QUICK);
    assert_eq!(run.status.code(), Some(3), "stderr: {}", run.stderr);
    assert_eq!(run.console(), "Z");
}

#[test]
fn acpi_s5_is_a_poweroff() {
    let dir = scratch_dir("tiny-s5");
    // mov dx, 0x600; mov al, SLP_EN | 5 << 2; out dx, al; hlt
    let code = [0x66, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee, 0xf4, 0xeb, 0xfd];
    let run = run_to_end(&tiny_vm(&dir, &code), QUICK);
    assert_eq!(run.status.code(), Some(0), "stderr: {}", run.stderr);
}

#[test]
fn unemulatable_or_faulting_instruction_is_a_crash_with_details() {
    let dir = scratch_dir("tiny-crash");
    // int3 with no IDT: a triple fault on VMX/SVM, an emulation failure
    // (instruction bytes reported) on the PVM host.
    let run = run_to_end(&tiny_vm(&dir, &[0x90, 0xcc, 0xf4]), QUICK);
    assert_eq!(run.status.code(), Some(4), "stderr: {}", run.stderr);
    assert!(run.stderr.contains("guest crashed: vCPU 0:"), "{}", run.stderr);
    assert!(run.stderr.contains("RIP 0x10000"), "{}", run.stderr);
    if microvm_dev::host::HostKind::detect() != microvm_dev::host::HostKind::Hardware {
        // KVM reports the bytes it fetched (up to 15), starting at RIP.
        assert!(run.stderr.contains("instruction bytes: cc f4"), "{}", run.stderr);
        assert!(run.stderr.contains("(int3) at RIP 0x100001"), "{}", run.stderr);
    }
}

#[test]
fn sigterm_stops_a_spinning_guest() {
    let dir = scratch_dir("tiny-sigterm");
    // jmp $ : spins forever in the guest.
    let vm = RunningVm::start(&tiny_vm(&dir, &[0xeb, 0xfe]));
    std::thread::sleep(Duration::from_millis(300));
    vm.signal(libc::SIGTERM);
    let run = vm.finish(QUICK);
    assert_eq!(run.status.code(), Some(128 + libc::SIGTERM), "stderr: {}", run.stderr);
}

#[test]
fn library_runs_with_channel_console_and_stops_from_another_thread() {
    let dir = scratch_dir("tiny-lib");
    // Print "ok\n", then spin: only a stop from the host ends it.
    let code = [
        0x66, 0xba, 0xf8, 0x03, 0xb0, b'o', 0xee, 0xb0, b'k', 0xee, 0xb0, b'\n', 0xee, 0xeb, 0xfe,
    ];
    let kernel = dir.join("guest.elf");
    std::fs::write(&kernel, elf_guest(&code, 0x10_0000)).unwrap();
    let mut config = VmConfig::new(&kernel);
    config.machine.vcpus = 2;
    let (tx, mut rx) = console::channel();
    config.console.output = tx.into();
    let vm = Vm::new(config).expect("VM builds");
    let handle = vm.handle();
    let runner = std::thread::spawn(move || vm.run());
    assert_eq!(rx.read_line_timeout(QUICK), Ok(Some("ok".to_string())));
    handle.stop();
    // The iterator ends when the VM is gone.
    assert_eq!(rx.lines().count(), 0);
    let exit = runner.join().expect("run thread").expect("run");
    assert_eq!(exit, VmExit::Stopped(microvm_dev::StopReason::Requested));
    // The console sender went away with the VM.
    assert_eq!(rx.read_line_timeout(QUICK), Ok(None));
}

#[test]
fn library_rejects_bad_input_without_panicking() {
    let dir = scratch_dir("tiny-lib-bad");
    let mut config = VmConfig::new(dir.join("nope"));
    let err = Vm::new(config).err().expect("missing kernel is an error");
    assert!(err.is_config_error());
    let kernel = dir.join("k.elf");
    std::fs::write(&kernel, trivial_guest(b'x')).unwrap();
    config = VmConfig::new(&kernel);
    config.machine.vcpus = 255;
    assert!(Vm::new(config)
        .err()
        .expect("too many vCPUs")
        .to_string()
        .contains("machine.vcpus = 255"));
    config = VmConfig::new(&kernel);
    config.machine.memory_mib = u32::MAX;
    assert!(Vm::new(config).err().expect("absurd memory").is_config_error());
    config = VmConfig::new(&kernel);
    config.boot.cmdline = "a\0b".into();
    assert!(Vm::new(config)
        .err()
        .expect("NUL in cmdline")
        .to_string()
        .starts_with("boot.cmdline"));
}

mod terminal {
    use super::*;
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::process::{Command, Stdio};

    fn termios(fd: i32) -> libc::termios {
        // SAFETY: tcgetattr fills a plain struct for a valid descriptor.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            assert_eq!(libc::tcgetattr(fd, &mut t), 0, "tcgetattr");
            t
        }
    }

    fn same(a: &libc::termios, b: &libc::termios) -> bool {
        (a.c_iflag, a.c_oflag, a.c_cflag, a.c_lflag) == (b.c_iflag, b.c_oflag, b.c_cflag, b.c_lflag)
    }

    /// Run a spinning guest on a pseudo-terminal, end it with `end`, and
    /// check the exit status and that the terminal is as it was.
    fn run_on_pty(name: &str, end: impl FnOnce(i32, &std::process::Child), expected_status: i32) {
        let dir = scratch_dir(name);
        let kernel = dir.join("guest.elf");
        std::fs::write(&kernel, elf_guest(&[0xeb, 0xfe], 0x10_0000)).unwrap();
        let config = write_config(
            &dir,
            &format!("version = 1\n[boot]\nkernel = \"{}\"\n", kernel.display()),
        );
        let (mut master, mut slave) = (0, 0);
        // SAFETY: openpty with out-pointers for the two descriptors.
        let r = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(r, 0, "openpty");
        let before = termios(slave);
        assert_ne!(before.c_lflag & libc::ICANON, 0, "a new pty starts in canonical mode");
        // SAFETY: dup of a valid descriptor, owned by the Stdio from then on.
        let dup = || unsafe { OwnedFd::from_raw_fd(libc::dup(slave)) };
        let mut child = Command::new(mvm_vmm())
            .arg("run")
            .arg(&config)
            .env("MVM_LOG", "error")
            .stdin(Stdio::from(dup()))
            .stdout(Stdio::from(dup()))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + QUICK;
        while termios(slave).c_lflag & libc::ICANON != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "mvm-vmm never put the terminal in raw mode"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        end(master, &child);
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(expected_status));
        assert!(same(&termios(slave), &before), "terminal settings restored");
        // SAFETY: closing our own descriptors.
        unsafe {
            libc::close(master);
            libc::close(slave);
        }
    }

    #[test]
    fn ctrl_a_x_stops_the_vm_and_restores_the_terminal() {
        run_on_pty(
            "pty-escape",
            |master, _| {
                // SAFETY: writes two bytes from a valid buffer.
                assert_eq!(unsafe { libc::write(master, [0x01u8, b'x'].as_ptr().cast(), 2) }, 2);
            },
            130,
        );
    }

    #[test]
    fn sigterm_restores_the_terminal() {
        run_on_pty(
            "pty-sigterm",
            |_, child| {
                // SAFETY: signals our own child.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            },
            128 + libc::SIGTERM,
        );
    }
}
