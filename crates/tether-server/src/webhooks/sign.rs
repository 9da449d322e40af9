//! `X-Tether-Signature`: `sha256=` and the lowercase hex HMAC-SHA256 of the body
//! under `[webhooks] secret`.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header value for `body` signed with `secret`.
pub(crate) fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes a key of any length: `new_from_slice` cannot fail for it.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return String::from("sha256=");
    };
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + digest.len() * 2);
    out.push_str("sha256=");
    for b in digest {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

#[cfg(test)]
mod tests {
    use super::signature;

    #[test]
    fn rfc4231_case_2() {
        // RFC 4231, test case 2: key "Jefe".
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
