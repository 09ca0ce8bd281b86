//! Guest-influenced input: the KVM internal-error data the VMM decodes
//! (lengths and counts come from the failed instruction) must not panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let suberror = u32::from_le_bytes(data[0..4].try_into().unwrap());
    let ndata = u32::from_le_bytes(data[4..8].try_into().unwrap());
    let words: Vec<u64> = data[8..]
        .chunks(8)
        .take(16)
        .map(|c| {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            u64::from_le_bytes(w)
        })
        .collect();
    let e = microvm_dev::host::InternalError::decode(suberror, ndata, &words);
    assert!(e.instruction.len() <= 15);
    let _ = e.to_string();
});
