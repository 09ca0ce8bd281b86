//! x86_64 machine: memory layout, boot protocol, firmware tables, vCPU state.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
