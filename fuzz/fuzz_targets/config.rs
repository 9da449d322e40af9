//! The config parser never panics on any file text.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tether_server::config::Config;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::from_toml("fuzz.toml", text);
    }
});
