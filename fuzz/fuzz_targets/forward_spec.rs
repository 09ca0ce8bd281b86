//! User input for port forwards: `mvm port`/`--forward` specs
//! (`[ADDRESS:]HOST:GUEST[/udp]`, `PORT[/udp]`) and the run-time forwards
//! file (`forwards.toml`, `[[forward]]` tables). Anything parses or fails
//! with a one-line error; what parses has ports in 1-65535.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match text.parse::<mvm::manager::PortSpec>() {
        Ok(spec) => assert!(spec.host_port > 0 && spec.guest_port > 0),
        Err(e) => assert!(!e.to_string().contains('\n'), "multi-line error: {e}"),
    }
    if let Ok((port, _)) = mvm::manager::parse_host_port(text) {
        assert!(port > 0);
    }
    if let Ok(file) = toml::from_str::<microvm_dev::network::ForwardsFile>(text) {
        match microvm_dev::config::parse_forwards(file.forward) {
            Ok(forwards) => assert!(forwards.iter().all(|f| f.host_port > 0 && f.guest_port > 0)),
            Err(e) => assert!(!e.to_string().contains('\n'), "multi-line error: {e}"),
        }
    }
});
