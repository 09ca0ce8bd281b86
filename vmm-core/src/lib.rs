//! # microvm-dev
//!
//! An embedded KVM virtual machine monitor: link this crate, describe a VM
//! in a [`VmConfig`], and boot a Linux kernel directly (no firmware) inside
//! your process.
//!
//! ```no_run
//! use microvm_dev::{console, Vm, VmConfig, VmExit};
//!
//! # fn main() -> Result<(), microvm_dev::Error> {
//! let mut config = VmConfig::new("vmlinux");
//! config.boot.initrd = Some("initramfs.cpio".into());
//! config.machine.vcpus = 2;
//! config.machine.memory_mib = 256;
//! // Read the serial console from this program instead of stdout.
//! let (tx, mut rx) = console::channel();
//! config.console.output = tx.into();
//!
//! let vm = Vm::new(config)?;          // all checks and setup happen here
//! let handle = vm.handle();           // stop it from any thread
//! let runner = std::thread::spawn(move || vm.run());
//! for line in rx.lines() {
//!     println!("guest: {line}");
//!     if line.contains("login:") {
//!         handle.stop();
//!     }
//! }
//! match runner.join().expect("VM thread")? {
//!     VmExit::PowerOff => println!("guest powered off"),
//!     VmExit::Reboot => println!("guest rebooted"),
//!     VmExit::Crash(report) => eprintln!("guest crashed: {report}"),
//!     VmExit::Stopped(reason) => println!("stopped: {reason:?}"),
//! }
//! # Ok(())
//! # }
//! ```
//!
//! The same configuration can come from a `vm.toml` file
//! ([`VmConfig::from_file`]); the `mvm-vmm run vm.toml` binary is a thin
//! wrapper around exactly this API.
//!
//! Host differences (hardware KVM versus the PVM hypervisor of this
//! project's CI machines) are detected at run time in [`host`].

pub mod config;
pub mod console;
pub mod control;
mod devices;
mod error;
pub mod host;
pub mod memory;
pub mod network;
pub mod privsep;
pub mod seccomp;
pub mod service;
pub mod state;
mod vcpu;
mod vm;
mod watch;
pub mod x86_64;

pub use config::{
    BootConfig, ConsoleConfig, ConsoleInput, ConsoleOutput, MachineConfig, RootConfig, RootUpper, ShareBackend,
    ShareConfig, VmConfig, VolumeConfig,
};
pub use error::{Error, Result};
pub use vm::{CrashReport, StopReason, Vm, VmExit, VmHandle};
