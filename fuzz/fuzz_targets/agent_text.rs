//! Guest-side text the agent parses as init: the kernel command line
//! (`mvm.share=`, `mvm.volume=`, `mvm.hostname=` from the host's
//! configuration), /proc/self/mounts and /etc/passwd (from the guest
//! image). Any text gives a result or warnings, never a panic; accepted
//! share and volume mount points are absolute.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mvm_agent::{cmdline, mounts, passwd};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (config, warnings) = cmdline::Config::parse(&text);
    for w in &warnings {
        assert!(!w.is_empty());
    }
    let safe = |dir: &str| dir.starts_with('/') && !dir.split('/').any(|c| c == "..");
    for share in &config.shares {
        assert!(safe(&share.dir), "{:?}", share.dir);
    }
    for volume in &config.volumes {
        assert!(safe(&volume.dir), "{:?}", volume.dir);
    }
    let _ = config.project_dir();
    let _ = mounts::parse(&text);
    let _ = passwd::parse_root(&text);
});
