fn main() {
    eprintln!("mvm-agent: not built yet");
    std::process::exit(1);
}
