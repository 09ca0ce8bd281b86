//! User input: any text as devenv.nix is read or refused with a
//! positioned error; never a panic or a stack overflow, and what is read
//! is consistent (positions are 1-based, ports are non-zero).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match mvm::devenv::parse(text) {
        Ok(devenv) => {
            assert!(devenv.skipped.iter().all(|s| s.line >= 1 && s.column >= 1));
            assert!(devenv.services.iter().all(|s| s.port != Some(0)));
        }
        Err(e) => assert!(e.line >= 1 && e.column >= 1, "{e}"),
    }
});
