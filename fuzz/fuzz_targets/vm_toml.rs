//! User input: any text as vm.toml must parse or fail with an error, and
//! the error message must be one line.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(e) = microvm_dev::VmConfig::from_toml(text, "fuzz.toml", std::path::Path::new("/fuzz")) {
            assert!(!e.to_string().contains('\n'), "multi-line error: {e}");
        }
    }
});
