//! The guest agent binary; everything lives in the library (see its docs
//! for the flags and the static build).

fn main() {
    let code = mvm_agent::main(std::env::args_os().skip(1).collect());
    std::process::exit(code);
}
