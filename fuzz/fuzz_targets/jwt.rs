//! Token verification and channel-pattern matching never panic on any input.
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tether_server::auth::{channel_matches, Auth};
use tether_server::config::{AuthMode, AuthSection};

fn auth() -> &'static Auth {
    static AUTH: OnceLock<Auth> = OnceLock::new();
    AUTH.get_or_init(|| {
        let cfg = AuthSection {
            mode: AuthMode::Jwt,
            hs256_secret: "fuzz-secret-fuzz-secret-fuzz-secret".into(),
            audience: "aud".into(),
            ..Default::default()
        };
        match Auth::from_config(&cfg) {
            Ok(a) => a,
            Err(e) => panic!("fuzz setup: {e}"),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = auth().verify(text);
        if let Some((pattern, channel)) = text.split_once('\n') {
            let _ = channel_matches(pattern, channel);
        }
    }
});
