//! The SSE cursor parser never panics, and a parsed cursor round-trips.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tether_protocol::Cursor;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(c) = Cursor::parse(text) {
            let again = Cursor::parse(&Cursor::encode(&c.conn_id, &c.positions));
            assert_eq!(again.as_ref(), Some(&c));
        }
    }
});
