//! Feeds arbitrary bytes to the frame decoder, as a hostile peer would, and
//! walks into any batch payload, as a broker would. The decoder must return
//! errors, never panic, and never hand back a frame larger than its limit.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use meridian_wire::{batch_messages, decode_frame, Frame};

/// Small enough that the fuzzer reaches the limit, large enough for batches.
const MAX_FRAME_SIZE: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let mut buffer = BytesMut::from(data);
    loop {
        let length_before = buffer.len();
        match decode_frame(&mut buffer, MAX_FRAME_SIZE) {
            Ok(Some(frame)) => {
                assert!(length_before - buffer.len() <= MAX_FRAME_SIZE);
                if let Frame::Payload(payload_command) = frame {
                    let entry = payload_command.entry;
                    if let Ok(messages) = batch_messages(&entry.metadata, entry.payload) {
                        for message in messages.take(100_000) {
                            let _ = message;
                        }
                    }
                }
            }
            Ok(None) => break,
            Err(_) => {
                // Errors about the size field leave the buffer untouched;
                // anything else consumed the frame. Either way a real
                // connection would close here.
                break;
            }
        }
    }
});
