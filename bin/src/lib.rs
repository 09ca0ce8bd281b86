//! # mvm
//!
//! Manage microvm-dev VMs: each VM is a directory in a state root
//! (`$MVM_STATE_DIR`, default `/var/lib/microvm-dev`) holding its
//! definition (`vm.toml`) and run-time files. [`Manager`] creates, lists,
//! starts, stops and removes them; [`agent::AgentClient`] talks to the
//! agent inside a running guest (run programs, power off, set the clock).
//! The `mvm` command-line tool is a thin layer over this crate.
//!
//! ```no_run
//! use mvm::{CreateOptions, Manager, StartOptions, StartOutcome};
//! use std::time::Duration;
//!
//! # fn main() -> mvm::Result<()> {
//! let mvm = Manager::new("/tmp/vms".into());
//! mvm.create(&CreateOptions {
//!     name: "build".into(),
//!     project: Some(".".into()),
//!     cpus: Some(4),
//!     kernel: Some("vmlinux".into()),
//!     initrd: Some("initramfs.cpio".into()),
//!     ..Default::default()
//! })?;
//! let mut opts = StartOptions { timeout: Duration::from_secs(120), ..Default::default() };
//! if let StartOutcome::Started { ready_after, .. } = mvm.start("build", &mut opts)? {
//!     println!("ready after {ready_after:?}");
//! }
//! let out = mvm.agent("build")?.exec_output(&["make", "-C", "/project"])?;
//! println!("make: {:?}", out.status);
//! for vm in mvm.list()? {
//!     println!("{} {}", vm.name, vm.state.as_str());
//! }
//! mvm.stop("build", Duration::from_secs(30))?;
//! mvm.rm("build", false)?;
//! # Ok(())
//! # }
//! ```
//!
//! Errors are one enum, [`Error`], whose messages say what to fix;
//! [`Error::exit_code`] maps them to the CLI's exit statuses.

pub mod agent;
pub mod devenv;
mod error;
pub mod image;
pub mod manager;
pub mod pidfile;
pub mod term;

pub use agent::{AgentClient, AgentConnection, ExecControl, ExecResult, ExecSession, Output};
pub use error::{report, Error, Result};
pub use image::{ImageInfo, ImageSpec, ImageStore};
pub use manager::{
    validate_name, CreateOptions, Manager, StartOptions, StartOutcome, StopOutcome, VmInfo, VmState, VolumeSpec,
};
