//! The client's address behind trusted proxies (`server.trusted_proxies`,
//! `X-Forwarded-For` and `Forwarded: for=`, SPEC section 1). A leaf.

use std::net::IpAddr;

use axum::http::HeaderMap;
use ipnet::IpNet;

/// The client's address: the TCP peer, unless the peer is a trusted proxy, in which
/// case the right-most `X-Forwarded-For` (or `Forwarded: for=`) hop that is not a
/// trusted proxy.
pub(crate) fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut hops: Vec<IpAddr> = Vec::new();
    for v in headers.get_all("forwarded") {
        let Ok(s) = v.to_str() else { continue };
        for element in s.split(',') {
            for pair in element.split(';') {
                let mut kv = pair.trim().splitn(2, '=');
                if kv.next().is_some_and(|k| k.eq_ignore_ascii_case("for")) {
                    if let Some(ip) = kv.next().and_then(parse_forwarded_node) {
                        hops.push(ip);
                    }
                }
            }
        }
    }
    if hops.is_empty() {
        for v in headers.get_all("x-forwarded-for") {
            let Ok(s) = v.to_str() else { continue };
            hops.extend(s.split(',').filter_map(|h| h.trim().parse::<IpAddr>().ok()));
        }
    }
    hops.into_iter()
        .rev()
        .find(|ip| !is_trusted(ip))
        .unwrap_or(peer)
}

fn parse_forwarded_node(raw: &str) -> Option<IpAddr> {
    let s = raw.trim().trim_matches('"');
    if let Some(v6) = s.strip_prefix('[') {
        return v6.split(']').next()?.parse().ok();
    }
    s.split(':').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn untrusted_peer_cannot_set_the_address() {
        let peer: IpAddr = "203.0.113.9".parse().unwrap();
        let h = headers(&[("x-forwarded-for", "1.2.3.4")]);
        assert_eq!(client_ip(peer, &h, &["10.0.0.0/8".parse().unwrap()]), peer);
    }

    #[test]
    fn rightmost_untrusted_hop_wins() {
        let peer: IpAddr = "10.0.0.2".parse().unwrap();
        let trusted = ["10.0.0.0/8".parse().unwrap()];
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 1.2.3.4, 10.0.0.7")]);
        assert_eq!(
            client_ip(peer, &h, &trusted),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        let h = headers(&[(
            "forwarded",
            "for=6.6.6.6, for=\"[2001:db8::1]:443\";proto=https",
        )]);
        assert_eq!(
            client_ip(peer, &h, &trusted),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
        let h = headers(&[("x-forwarded-for", "10.1.1.1")]);
        assert_eq!(client_ip(peer, &h, &trusted), peer);
    }
}
