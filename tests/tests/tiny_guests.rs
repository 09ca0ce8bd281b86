//! Guests of a few instructions (no kernel): exits, crashes and stopping,
//! checked through the binary and through the library API. Fast: no
//! guest kernel to interpret.

use std::time::Duration;

use microvm_dev::{console, ConsoleOutput, Vm, VmConfig, VmExit};
use mvm_tests::*;

const QUICK: Duration = Duration::from_secs(60);

fn tiny_vm(dir: &std::path::Path, code: &[u8]) -> std::path::PathBuf {
    let kernel = dir.join("guest.elf");
    std::fs::write(&kernel, elf_guest(code, 0x10_0000)).unwrap();
    write_config(dir, &format!("version = 1\n[boot]\nkernel = \"{}\"\n[console]\ninput = \"none\"\n", kernel.display()))
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
    let mut vm = RunningVm::start(&tiny_vm(&dir, &[0xeb, 0xfe]));
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
    config.console.output = ConsoleOutput::Writer(Box::new(tx));
    let vm = Vm::new(config).expect("VM builds");
    let handle = vm.handle();
    let runner = std::thread::spawn(move || vm.run());
    assert_eq!(rx.read_line_timeout(QUICK), Ok(Some("ok".to_string())));
    handle.stop();
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
    assert!(Vm::new(config).err().expect("too many vCPUs").to_string().contains("machine.vcpus = 255"));
    config = VmConfig::new(&kernel);
    config.machine.memory_mib = u32::MAX;
    assert!(Vm::new(config).err().expect("absurd memory").is_config_error());
    config = VmConfig::new(&kernel);
    config.boot.cmdline = "a\0b".into();
    assert!(Vm::new(config).err().expect("NUL in cmdline").to_string().starts_with("boot.cmdline"));
}
