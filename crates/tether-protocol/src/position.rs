//! Positions (`"<epoch>:<offset>"`) and the SSE cursor.
//!
//! The cursor is opaque to clients: `v1.<conn_id>.<position>.<position>…`, one
//! position per channel of the stream in the stream's (sorted) channel order. It
//! names the connection (for the tombstone) and resumes every channel at once.

use std::fmt;

/// Most channels one SSE stream may carry.
pub const MAX_STREAM_CHANNELS: usize = 16;

/// Longest cursor accepted; longer ones count as absent.
pub const MAX_CURSOR_LEN: usize = 4096;

/// A channel position: which history (epoch) and how far in it (offset).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Position {
    /// Changes only when the channel's history is lost.
    pub epoch: String,
    /// Offset of the last message (0 before the first).
    pub offset: u64,
}

impl Position {
    /// Parses `"<epoch>:<offset>"`; `None` for anything else.
    pub fn parse(s: &str) -> Option<Position> {
        let (epoch, offset) = s.rsplit_once(':')?;
        if epoch.is_empty() || epoch.len() > 32 || !epoch.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return None;
        }
        if offset.is_empty() || offset.len() > 20 || !offset.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(Position {
            epoch: epoch.to_owned(),
            offset: offset.parse().ok()?,
        })
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.epoch, self.offset)
    }
}

/// Whether a channel name is valid: `[A-Za-z0-9_.:/-]{1,200}`.
pub fn valid_channel(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'/' | b'-'))
}

/// A parsed SSE cursor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    /// The connection that emitted it.
    pub conn_id: String,
    /// One position per channel of the stream, in the stream's channel order.
    pub positions: Vec<Position>,
}

impl Cursor {
    /// Encodes the cursor.
    pub fn encode(conn_id: &str, positions: &[Position]) -> String {
        let mut s = String::with_capacity(8 + conn_id.len() + positions.len() * 16);
        Self::encode_into(conn_id, positions, &mut s);
        s
    }

    /// Encodes the cursor onto `out` (no allocation of its own: an SSE stream writes
    /// one per event).
    pub fn encode_into(conn_id: &str, positions: &[Position], out: &mut impl std::fmt::Write) {
        let _ = out.write_str("v1.");
        let _ = out.write_str(conn_id);
        for p in positions {
            let _ = write!(out, ".{}:{}", p.epoch, p.offset);
        }
    }

    /// Parses a cursor; `None` when it cannot be parsed or is over its bounds (which
    /// then counts as absent, never as an error).
    pub fn parse(s: &str) -> Option<Cursor> {
        if s.len() > MAX_CURSOR_LEN {
            return None;
        }
        let mut parts = s.strip_prefix("v1.")?.split('.');
        let conn_id = parts.next()?;
        if conn_id.is_empty()
            || !conn_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return None;
        }
        let positions: Option<Vec<Position>> = parts.map(Position::parse).collect();
        let positions = positions?;
        if positions.len() > MAX_STREAM_CHANNELS {
            return None;
        }
        Some(Cursor {
            conn_id: conn_id.to_owned(),
            positions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_and_reject_junk() {
        let p = Position::parse("ab12:42").unwrap();
        assert_eq!((p.epoch.as_str(), p.offset), ("ab12", 42));
        assert_eq!(p.to_string(), "ab12:42");
        for bad in [
            "",
            ":1",
            "ab:",
            "ab:-1",
            "a b:1",
            "ab:1x",
            "ab:99999999999999999999999",
            "ab",
        ] {
            assert!(Position::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn cursor_round_trips_and_bounds_hold() {
        let ps = vec![
            Position {
                epoch: "e1".into(),
                offset: 3,
            },
            Position {
                epoch: "e2".into(),
                offset: 0,
            },
        ];
        let c = Cursor::encode("n1-ab-7", &ps);
        assert_eq!(
            Cursor::parse(&c),
            Some(Cursor {
                conn_id: "n1-ab-7".into(),
                positions: ps
            })
        );
        assert!(Cursor::parse("garbage").is_none());
        assert!(Cursor::parse("v1.").is_none());
        assert!(Cursor::parse("v1.n1.e:x").is_none());
        let many = format!("v1.c{}", ".e:1".repeat(17));
        assert!(Cursor::parse(&many).is_none());
        assert!(Cursor::parse(&format!("v1.{}", "a".repeat(5000))).is_none());
    }

    #[test]
    fn channel_names() {
        assert!(valid_channel("news"));
        assert!(valid_channel("a.b:c/d-e_f"));
        assert!(!valid_channel(""));
        assert!(!valid_channel("sp ace"));
        assert!(!valid_channel(&"x".repeat(201)));
        assert!(!valid_channel("é"));
    }
}
