//! Guest and host input: any byte stream fed to the host-agent frame
//! decoder (split at arbitrary points) yields messages or an error, never a
//! panic, and every message it accepts re-encodes to a frame that decodes to
//! the same message.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mvm_agent::proto::{FrameDecoder, Message};

fuzz_target!(|data: &[u8]| {
    // First byte picks the split size, so the decoder sees partial frames.
    let Some((&split, stream)) = data.split_first() else {
        return;
    };
    let step = usize::from(split).max(1);
    let mut decoder = FrameDecoder::new();
    'feed: for chunk in stream.chunks(step) {
        decoder.push(chunk);
        loop {
            match decoder.next() {
                Ok(Some(msg)) => {
                    let frame = msg.encode();
                    let again = Message::decode(&frame[4..]).expect("re-encoded frame decodes");
                    assert_eq!(again, msg);
                }
                Ok(None) => break,
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    break 'feed;
                }
            }
        }
    }
    // The same bytes as one frame body.
    let _ = Message::decode(stream);
});
