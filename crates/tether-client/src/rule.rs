//! The reconnect rule: what a client does after a connection ends, from the close
//! code and the `closing` announcement (SPEC section 4's table, as section 13 reads it).

use tether_protocol::Closing;

/// What to do after a connection (or an attempt) ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Branch {
    /// Do not reconnect; a clean end (1000, 4001, a kick or close without reconnect).
    Stop,
    /// Do not reconnect; nothing the client can do will help (4004, 1009, refusals).
    Fatal,
    /// Get a fresh token from the refresher, then reconnect (4003, 4401 with a refresher).
    Refresh,
    /// Reconnect after the server's `retry_ms` (`None`: uniform `[0, min_delay_ms]`).
    ServerDelay(Option<u64>),
    /// Reconnect after full-jitter exponential backoff (a failed attempt, or a drop
    /// with no announcement).
    Backoff,
}

/// Decides the branch. `code` is the close frame's code (`None` when the socket ended
/// without one, or never opened); `announced` the `closing` frame, if one came.
pub fn branch(code: Option<u16>, announced: Option<&Closing>, has_refresher: bool) -> Branch {
    let retry = announced.and_then(|a| a.retry_ms);
    let says_reconnect = announced.map(|a| a.reconnect);
    match code.or(announced.map(|a| a.code.0)) {
        Some(1000 | 4001) => Branch::Stop,
        Some(4002) if says_reconnect == Some(true) => Branch::ServerDelay(retry),
        Some(4002) => Branch::Stop,
        Some(1002 | 1007 | 1009 | 4004) => Branch::Fatal,
        Some(4003 | 4401) if has_refresher => Branch::Refresh,
        Some(4003 | 4401) => Branch::Fatal,
        Some(1001 | 4429 | 4502 | 4503) => Branch::ServerDelay(retry),
        Some(4400..=4499) => Branch::Fatal,
        _ => match says_reconnect {
            Some(true) => Branch::ServerDelay(retry),
            Some(false) => Branch::Stop,
            None => Branch::Backoff,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_protocol::CloseCode;

    fn closing(code: u16, reconnect: bool, retry_ms: Option<u64>) -> Closing {
        Closing {
            code: CloseCode(code),
            reason: "r".into(),
            reconnect,
            retry_ms,
        }
    }

    /// Every code of SPEC section 4's table, announced the way the server announces it
    /// (`reconnect` from the table) and, separately, unannounced.
    #[test]
    fn every_close_code_takes_its_branch() {
        use Branch::*;
        #[rustfmt::skip]
        let table: &[(u16, bool, Branch, Branch, Branch)] = &[
            // code, announced reconnect, branch (announced, retry_ms 900),
            //   branch (unannounced), branch (announced) with a refresher
            (1000, false, Stop, Stop, Stop),
            (1001, true, ServerDelay(Some(900)), ServerDelay(None), ServerDelay(Some(900))),
            (1002, false, Fatal, Fatal, Fatal),
            (1007, false, Fatal, Fatal, Fatal),
            (1009, false, Fatal, Fatal, Fatal),
            (1011, true, ServerDelay(Some(900)), Backoff, ServerDelay(Some(900))),
            (4000, true, ServerDelay(Some(900)), Backoff, ServerDelay(Some(900))),
            (4001, false, Stop, Stop, Stop),
            (4002, false, Stop, Stop, Stop),
            (4002, true, ServerDelay(Some(900)), Stop, ServerDelay(Some(900))),
            (4003, true, Fatal, Fatal, Refresh),
            (4004, false, Fatal, Fatal, Fatal),
            (4005, true, ServerDelay(Some(900)), Backoff, ServerDelay(Some(900))),
            (4008, true, ServerDelay(Some(900)), Backoff, ServerDelay(Some(900))),
            (4029, true, ServerDelay(Some(900)), Backoff, ServerDelay(Some(900))),
            (4401, false, Fatal, Fatal, Refresh),
            (4403, false, Fatal, Fatal, Fatal),
            (4409, false, Fatal, Fatal, Fatal),
            (4429, true, ServerDelay(Some(900)), ServerDelay(None), ServerDelay(Some(900))),
            (4502, true, ServerDelay(Some(900)), ServerDelay(None), ServerDelay(Some(900))),
            (4503, true, ServerDelay(Some(900)), ServerDelay(None), ServerDelay(Some(900))),
        ];
        for &(code, reconnect, announced, bare, refreshed) in table {
            let c = closing(code, reconnect, Some(900));
            assert_eq!(
                branch(Some(code), Some(&c), false),
                announced,
                "{code} announced"
            );
            assert_eq!(branch(Some(code), None, false), bare, "{code} unannounced");
            assert_eq!(
                branch(Some(code), Some(&c), true),
                refreshed,
                "{code} with refresher"
            );
        }
    }

    #[test]
    fn no_close_frame_falls_back_to_the_announcement_then_backoff() {
        assert_eq!(branch(None, None, false), Branch::Backoff);
        assert_eq!(branch(Some(1006), None, false), Branch::Backoff);
        let c = closing(4002, true, None);
        assert_eq!(branch(None, Some(&c), false), Branch::ServerDelay(None));
        let c = closing(4001, false, None);
        assert_eq!(branch(None, Some(&c), false), Branch::Stop);
        // A sweep's own code with reconnect false is honoured.
        let c = closing(4100, false, None);
        assert_eq!(branch(Some(4100), Some(&c), false), Branch::Stop);
    }
}
