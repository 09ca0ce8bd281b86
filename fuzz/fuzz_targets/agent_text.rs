//! Guest-side text the agent parses as init: the kernel command line
//! (`mvm.share=`, `mvm.volume=`, `mvm.hostname=`, `mvm.user=` from the
//! host's configuration), /proc/self/mounts, /etc/passwd and /etc/group
//! (from the guest image). Any text gives a result or warnings, never a
//! panic; accepted share and volume mount points are absolute; an
//! accepted user is not root and its passwd/group lines are one line of
//! seven/four fields.
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
    if let Some(user) = &config.user {
        assert!(user.uid != 0 && user.gid != 0 && user.name != "root");
        assert_eq!(passwd::UserSpec::parse(&user.to_string()).as_ref(), Ok(user));
        if let Some(line) = passwd::passwd_line(&text, user, "/home/x", "/bin/sh") {
            assert!(!line.contains('\n') && line.split(':').count() == 7, "{line:?}");
        }
        if let Some(line) = passwd::group_line(&text, user) {
            assert!(!line.contains('\n') && line.split(':').count() == 4, "{line:?}");
        }
        let groups = passwd::groups_of(&text, &user.name, user.gid);
        assert_eq!(groups.first(), Some(&user.gid));
    }
    for name in text.split([' ', '\n']).take(4) {
        let _ = passwd::find_entry(&text, name);
        let _ = passwd::check_user_name(name);
    }
});
