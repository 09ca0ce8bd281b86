//! User input: any file as the kernel must be recognised or rejected with
//! a reason; an accepted image must describe a sane address range.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = microvm_dev::x86_64::boot::inspect_kernel_bytes(data) {
        assert!(info.load_start <= info.end);
        assert!(info.cmdline_max >= 1);
    }
});
