//! RFC 6455 framing for what the server sends. Server frames are unmasked, so a
//! frame's bytes are the same for every recipient: a message is framed once per
//! publish and the very same bytes are written to every subscriber's socket.

/// Opcode of a text frame, with FIN set.
const FIN_TEXT: u8 = 0x81;

/// The header of a single unfragmented, unmasked text frame carrying `len` bytes:
/// 2 bytes up to 125, 4 up to 65,535, else 10 (RFC 6455 section 5.2).
pub fn text_header(len: usize) -> ([u8; 10], usize) {
    let mut h = [0u8; 10];
    h[0] = FIN_TEXT;
    if len < 126 {
        h[1] = len as u8;
        (h, 2)
    } else if len <= u16::MAX as usize {
        h[1] = 126;
        h[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        (h, 4)
    } else {
        h[1] = 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        (h, 10)
    }
}

/// A whole text frame (header + `payload`), ready to write as is.
pub fn text_frame(payload: &[u8]) -> Vec<u8> {
    let (h, n) = text_header(payload.len());
    let mut out = Vec::with_capacity(n + payload.len());
    out.extend_from_slice(&h[..n]);
    out.extend_from_slice(payload);
    out
}

/// Where the payload starts in a frame made by [`text_frame`].
pub fn payload_offset(frame: &[u8]) -> usize {
    match frame.get(1).map(|b| b & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_at_every_boundary() {
        for (len, hdr) in [
            (0, 2),
            (125, 2),
            (126, 4),
            (65_535, 4),
            (65_536, 10),
            (1 << 20, 10),
        ] {
            let payload = vec![b'x'; len];
            let f = text_frame(&payload);
            assert_eq!(f.len(), len + hdr, "len {len}");
            assert_eq!(f[0], 0x81);
            assert_eq!(payload_offset(&f), hdr);
            let decoded = match hdr {
                2 => (f[1] & 0x7f) as usize,
                4 => u16::from_be_bytes([f[2], f[3]]) as usize,
                _ => u64::from_be_bytes(f[2..10].try_into().unwrap_or_default()) as usize,
            };
            assert_eq!(decoded, len);
            assert_eq!(f[1] & 0x80, 0, "server frames are unmasked");
            assert_eq!(&f[hdr..], &payload[..]);
        }
    }
}
