//! Development-only: the watch scenario on one VM (folded into manager.rs).
use mvm_tests::mvm_cli::Mvm;
use mvm_tests::*;

#[test]
fn watch_dev() {
    let dir = scratch_dir("watchdev");
    let project = dir.join("project");
    std::fs::create_dir_all(&project).unwrap();
    std::fs::write(project.join("README"), "the project\n").unwrap();
    std::fs::write(project.join("script.sh"), "echo from-project\n").unwrap();
    let mvm = Mvm::new(dir.join("state"));
    mvm.ok(&[
        "create",
        "--no-image",
        "--no-network",
        "w1",
        "--project",
        project.to_str().unwrap(),
        "--cpus",
        "1",
        "--memory",
        "128",
    ]);
    let t = std::time::Instant::now();
    mvm.ok(&["start", "w1", "--timeout", "600"]);
    eprintln!("booted in {:?}", t.elapsed());
    let lat = mvm_tests::watch::host_edits_reach_guest_watchers(&mvm, "w1", &project);
    for (name, l) in &lat { eprintln!("{name}: guest {:?}, round trip {:?}", l.guest, l.round_trip); }
    let log = std::fs::read_dir(mvm.root.join("w1")).unwrap().map(|e| e.unwrap().path()).collect::<Vec<_>>(); eprintln!("{log:?}");
    mvm.ok(&["stop", "w1"]);
}
