//! Client authentication (`[auth]`): `none` (`?client=ID`) or `jwt` (HS256, RS256, or
//! keys by `kid` from a JWKS file), and the channel patterns a token grants.
//!
//! Keys are loaded once at startup ([`Auth::load`]); a bad key file is a startup
//! error ([`ConfigError`]); a refused token says why in a [`TokenError`]. Every token's `alg` must be the algorithm of the key that checks it
//! (no `none`, no HS/RS confusion); `exp` and `sub` are required, and `nbf`, when
//! present, is checked with the same leeway as `exp`. The `Authorization` scheme
//! `Bearer` is matched case-insensitively ([`bearer`]).

use std::collections::HashMap;
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;

use crate::config::{AuthMode, AuthSection};

/// What a valid token says.
#[derive(Clone, Debug, PartialEq)]
pub struct Identity {
    /// `sub`.
    pub client_id: String,
    /// `exp`, seconds since the epoch.
    pub exp: u64,
    /// Channel patterns (`channels`); none = no channel.
    pub channels: Vec<String>,
    /// `meta`, kept on the connection.
    pub meta: Value,
}

impl Identity {
    /// Whether the token grants `channel`.
    pub fn may_subscribe(&self, channel: &str) -> bool {
        self.channels.iter().any(|p| channel_matches(p, channel))
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    channels: Vec<String>,
    #[serde(default)]
    meta: Value,
}

/// The verifier built from `[auth]`.
pub enum Auth {
    /// `mode = "none"`.
    None,
    /// `mode = "jwt"`.
    Jwt(Box<JwtAuth>),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::None => f.write_str("Auth::None"),
            Auth::Jwt(_) => f.write_str("Auth::Jwt"),
        }
    }
}

/// Keys and checks for `mode = "jwt"`.
pub struct JwtAuth {
    /// The single key (HS256 secret or RS256 public key), if configured.
    key: Option<(DecodingKey, Algorithm)>,
    /// Keys by `kid` from the JWKS file.
    by_kid: HashMap<String, (DecodingKey, Algorithm)>,
    audience: Option<String>,
    issuer: Option<String>,
    leeway_secs: u64,
}

/// Why a token was refused (logged at debug; the client sees `unauthorized`).
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// `auth.mode = "none"` verifies no token.
    #[error("tokens are not used with auth mode none")]
    NotJwt,
    /// Over [`MAX_TOKEN`] bytes.
    #[error("token too long ({0} bytes)")]
    TooLong(usize),
    /// The header is not a JWT header.
    #[error("bad token: {0}")]
    Header(#[source] jsonwebtoken::errors::Error),
    /// A `kid` the JWKS file does not hold.
    #[error("unknown kid {0:?}")]
    UnknownKid(String),
    /// No `kid`, and no single key to fall back on.
    #[error("token has no kid and no single key is configured")]
    NoKey,
    /// The token's `alg` is not its key's (no `none`, no HS/RS confusion).
    #[error("alg {token:?} does not match the key ({key:?})")]
    AlgMismatch {
        /// The token's `alg`.
        token: Algorithm,
        /// The key's algorithm.
        key: Algorithm,
    },
    /// Signature, claims (`exp`, `nbf`, `aud`, `iss`, `sub`) or their format.
    #[error("invalid token: {0}")]
    Invalid(#[source] jsonwebtoken::errors::Error),
    /// `sub` is not a valid client id.
    #[error("sub: {0}")]
    Sub(#[source] crate::admission::BadRequest),
    /// `meta` is neither absent nor an object.
    #[error("meta must be an object")]
    Meta,
}

/// Why `[auth]` is refused at startup.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `auth.leeway_ms` over [`MAX_LEEWAY_MS`].
    #[error("auth.leeway_ms must be at most {MAX_LEEWAY_MS} (a day)")]
    Leeway,
    /// `auth.hs256_secret` under 32 bytes.
    #[error("auth.hs256_secret must be at least 32 bytes")]
    ShortSecret,
    /// A key file that cannot be read.
    #[error("auth.{setting} {path}: {source}")]
    Read {
        /// `rs256_public_key_file` or `jwks_file`.
        setting: &'static str,
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// `auth.rs256_public_key_file` is not an RSA public key in PEM.
    #[error("auth.rs256_public_key_file {path}: {source}")]
    Rs256Key {
        /// The file.
        path: String,
        /// Why.
        source: jsonwebtoken::errors::Error,
    },
    /// `auth.jwks_file` is not a JWKS document.
    #[error("auth.jwks_file {path}: {source}")]
    Jwks {
        /// The file.
        path: String,
        /// Why.
        source: serde_json::Error,
    },
    /// A JWKS key without `kid`.
    #[error("auth.jwks_file {path}: every key needs a kid")]
    NoKid {
        /// The file.
        path: String,
    },
    /// A JWKS key of a type Tether does not use.
    #[error("auth.jwks_file: key {kid} has an unsupported type")]
    UnsupportedKey {
        /// Its `kid`.
        kid: String,
    },
    /// A JWKS key that cannot be used.
    #[error("auth.jwks_file: key {kid}: {source}")]
    BadJwk {
        /// Its `kid`.
        kid: String,
        /// Why.
        source: jsonwebtoken::errors::Error,
    },
    /// `mode = "jwt"` and no key source.
    #[error("auth.mode = \"jwt\" needs hs256_secret, rs256_public_key_file or jwks_file")]
    NoKeySource,
    /// Both a secret and an RSA key.
    #[error("set only one of auth.hs256_secret and auth.rs256_public_key_file")]
    TwoKeys,
}

/// Why `tether token` could not mint a token.
#[derive(Debug, thiserror::Error)]
#[error("cannot sign the token: {0}")]
pub struct MintError(#[from] jsonwebtoken::errors::Error);

/// Longest token accepted, in bytes.
pub const MAX_TOKEN: usize = 16 * 1024;

impl Auth {
    /// Builds the verifier, reading key files.
    pub fn load(cfg: &AuthSection) -> Result<Auth, ConfigError> {
        if matches!(cfg.mode, AuthMode::None) {
            return Ok(Auth::None);
        }
        if cfg.leeway_ms > MAX_LEEWAY_MS {
            return Err(ConfigError::Leeway);
        }
        let mut key = None;
        let mut count = 0;
        if !cfg.hs256_secret.is_empty() {
            if cfg.hs256_secret.len() < 32 {
                return Err(ConfigError::ShortSecret);
            }
            key = Some((
                DecodingKey::from_secret(cfg.hs256_secret.as_bytes()),
                Algorithm::HS256,
            ));
            count += 1;
        }
        if !cfg.rs256_public_key_file.is_empty() {
            key = Some((load_rs256(&cfg.rs256_public_key_file)?, Algorithm::RS256));
            count += 1;
        }
        let mut by_kid = HashMap::new();
        if !cfg.jwks_file.is_empty() {
            by_kid = load_jwks(&cfg.jwks_file)?;
            count += 1;
        }
        if count == 0 {
            return Err(ConfigError::NoKeySource);
        }
        if key.is_some() && count > 1 && by_kid.is_empty() {
            return Err(ConfigError::TwoKeys);
        }
        Ok(Auth::Jwt(Box::new(JwtAuth {
            key,
            by_kid,
            audience: (!cfg.audience.is_empty()).then(|| cfg.audience.clone()),
            issuer: (!cfg.issuer.is_empty()).then(|| cfg.issuer.clone()),
            leeway_secs: cfg.leeway_ms.div_ceil(1000),
        })))
    }

    /// Whether tokens are required.
    pub fn is_jwt(&self) -> bool {
        matches!(self, Auth::Jwt(_))
    }

    /// Checks a token; never panics on any input.
    pub fn verify(&self, token: &str) -> Result<Identity, TokenError> {
        let Auth::Jwt(j) = self else {
            return Err(TokenError::NotJwt);
        };
        if token.len() > MAX_TOKEN {
            return Err(TokenError::TooLong(token.len()));
        }
        let header = jsonwebtoken::decode_header(token).map_err(TokenError::Header)?;
        let (key, alg) = match &header.kid {
            Some(kid) if !j.by_kid.is_empty() => j
                .by_kid
                .get(kid)
                .ok_or_else(|| TokenError::UnknownKid(kid.clone()))?,
            _ => j.key.as_ref().ok_or(TokenError::NoKey)?,
        };
        if header.alg != *alg {
            return Err(TokenError::AlgMismatch {
                token: header.alg,
                key: *alg,
            });
        }
        let mut v = Validation::new(*alg);
        v.leeway = j.leeway_secs;
        // RFC 7519 4.1.5: a token is not accepted before its `nbf` (when present).
        v.validate_nbf = true;
        // A configured `aud`/`iss` must be present, not only right when present.
        let mut required = vec!["exp", "sub"];
        if j.audience.is_some() {
            required.push("aud");
        }
        if j.issuer.is_some() {
            required.push("iss");
        }
        v.set_required_spec_claims(&required);
        match &j.audience {
            Some(a) => v.set_audience(&[a]),
            None => v.validate_aud = false,
        }
        if let Some(i) = &j.issuer {
            v.set_issuer(&[i]);
        }
        let data = jsonwebtoken::decode::<Claims>(token, key, &v).map_err(TokenError::Invalid)?;
        let c = data.claims;
        crate::admission::validate_client_id(&c.sub).map_err(TokenError::Sub)?;
        if !(c.meta.is_null() || c.meta.is_object()) {
            return Err(TokenError::Meta);
        }
        Ok(Identity {
            client_id: c.sub,
            exp: c.exp,
            channels: c.channels,
            meta: c.meta,
        })
    }

    /// When an open connection holding `id` must close (4003): `exp` plus leeway, at
    /// most [`MAX_TOKEN_LIFETIME`] from now. Never panics, whatever `exp` says.
    pub fn expires_at(&self, id: &Identity) -> tokio::time::Instant {
        let left = time_left(
            id.exp,
            self.leeway_secs(),
            jsonwebtoken::get_current_timestamp(),
        );
        let now = tokio::time::Instant::now();
        // `left` is capped far below what an `Instant` holds; halving is a fallback
        // for a platform whose clock cannot reach that far.
        let mut left = left;
        loop {
            if let Some(at) = now.checked_add(left) {
                return at;
            }
            left /= 2;
        }
    }

    /// Seconds of leeway after `exp` before an open connection is closed.
    pub fn leeway_secs(&self) -> u64 {
        match self {
            Auth::Jwt(j) => j.leeway_secs,
            Auth::None => 0,
        }
    }
}

/// An RS256 public key from a PEM file.
fn load_rs256(path: &str) -> Result<DecodingKey, ConfigError> {
    let pem = std::fs::read(path).map_err(|source| ConfigError::Read {
        setting: "rs256_public_key_file",
        path: path.to_owned(),
        source,
    })?;
    DecodingKey::from_rsa_pem(&pem).map_err(|source| ConfigError::Rs256Key {
        path: path.to_owned(),
        source,
    })
}

/// The keys of a JWKS file by `kid`, each with the algorithm its type implies.
fn load_jwks(path: &str) -> Result<HashMap<String, (DecodingKey, Algorithm)>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        setting: "jwks_file",
        path: path.to_owned(),
        source,
    })?;
    let set: JwkSet = serde_json::from_str(&text).map_err(|source| ConfigError::Jwks {
        path: path.to_owned(),
        source,
    })?;
    let mut by_kid = HashMap::new();
    for jwk in &set.keys {
        let Some(kid) = jwk.common.key_id.clone() else {
            return Err(ConfigError::NoKid {
                path: path.to_owned(),
            });
        };
        let alg = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::OctetKey(_) => Algorithm::HS256,
            AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
            _ => return Err(ConfigError::UnsupportedKey { kid }),
        };
        match DecodingKey::from_jwk(jwk) {
            Ok(k) => by_kid.insert(kid, (k, alg)),
            Err(source) => return Err(ConfigError::BadJwk { kid, source }),
        };
    }
    Ok(by_kid)
}

/// The credentials of an `Authorization: Bearer <credentials>` value, or `None` for
/// another scheme. The scheme is case-insensitive (RFC 7235 2.1).
pub fn bearer(authorization: &str) -> Option<&str> {
    let (scheme, credentials) = authorization.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| credentials.trim())
}

/// The largest `auth.leeway_ms`: a day. More would make the clock arithmetic of
/// `exp`/`nbf` checks meaningless.
pub const MAX_LEEWAY_MS: u64 = 24 * 3600 * 1000;

/// The furthest ahead a token's expiry is scheduled. A later `exp` (up to `u64::MAX`)
/// means "does not expire while this process runs".
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// How long until a token with `exp` (plus `leeway` seconds) expires, at `now`
/// (seconds since the epoch): saturating, and capped at [`MAX_TOKEN_LIFETIME`].
fn time_left(exp: u64, leeway: u64, now: u64) -> Duration {
    let left = exp.saturating_add(leeway).saturating_sub(now);
    Duration::from_secs(left).min(MAX_TOKEN_LIFETIME)
}

/// Longest pattern considered; a longer one matches nothing.
const MAX_PATTERN: usize = 400;

/// Whether `channel` matches `pattern`: `*` matches within one `:`- or `/`-separated
/// segment, `**` across segments, anything else literally.
///
/// One pass over the channel per pattern token, O(pattern × channel) with no
/// backtracking: `reach[i]` says whether the pattern read so far matches the
/// channel's first `i` bytes.
pub fn channel_matches(pattern: &str, channel: &str) -> bool {
    if pattern.len() > MAX_PATTERN {
        return false;
    }
    let c = channel.as_bytes();
    let mut reach = vec![false; c.len() + 1];
    reach[0] = true;
    let mut p = pattern.as_bytes();
    while !p.is_empty() {
        let token = match p {
            [b'*', b'*', rest @ ..] => {
                p = rest;
                Token::AnyDepth
            }
            [b'*', rest @ ..] => {
                p = rest;
                Token::AnySegment
            }
            [x, rest @ ..] => {
                p = rest;
                Token::Byte(*x)
            }
            [] => break,
        };
        if !token.advance(c, &mut reach) {
            return false;
        }
    }
    reach[c.len()]
}

/// One step of a channel pattern.
#[derive(Clone, Copy)]
enum Token {
    /// `**`: any bytes.
    AnyDepth,
    /// `*`: any bytes but the segment separators `:` and `/`.
    AnySegment,
    /// A literal byte.
    Byte(u8),
}

impl Token {
    /// Moves `reach` past this token in one pass over `c`; false when nothing is
    /// reachable any more.
    fn advance(self, c: &[u8], reach: &mut [bool]) -> bool {
        #[cfg(test)]
        steps::add(reach.len() as u64);
        let mut any = false;
        match self {
            Token::AnyDepth => {
                let mut seen = false;
                for r in reach.iter_mut() {
                    seen |= *r;
                    *r = seen;
                    any |= seen;
                }
            }
            Token::AnySegment => {
                let mut carry = false;
                for (i, r) in reach.iter_mut().enumerate() {
                    if i > 0 && matches!(c[i - 1], b':' | b'/') {
                        carry = false;
                    }
                    carry |= *r;
                    *r = carry;
                    any |= carry;
                }
            }
            Token::Byte(x) => {
                // Right to left, so each cell reads its left neighbour's old value.
                for i in (1..reach.len()).rev() {
                    reach[i] = reach[i - 1] && c[i - 1] == x;
                    any |= reach[i];
                }
                reach[0] = false;
            }
        }
        any
    }
}

/// Matcher work counted per thread, so a test can bound it without a clock.
#[cfg(test)]
mod steps {
    use std::cell::Cell;
    thread_local!(static STEPS: Cell<u64> = const { Cell::new(0) });
    pub fn add(n: u64) {
        STEPS.with(|s| s.set(s.get().saturating_add(n)));
    }
    pub fn take() -> u64 {
        STEPS.with(|s| s.replace(0))
    }
}

/// Mints an HS256 development token (`tether token`).
pub fn mint_hs256(
    secret: &str,
    sub: &str,
    channels: &[String],
    ttl_secs: u64,
) -> Result<String, MintError> {
    let now = jsonwebtoken::get_current_timestamp();
    let exp = now.saturating_add(ttl_secs);
    let claims = serde_json::json!({"sub": sub, "exp": exp, "iat": now, "channels": channels});
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_follow_the_segment_rules() {
        assert!(channel_matches("news", "news"));
        assert!(!channel_matches("news", "news2"));
        assert!(channel_matches("chat:*", "chat:room1"));
        assert!(!channel_matches("chat:*", "chat:room1:sub"));
        assert!(!channel_matches("chat:*", "chat/room1"));
        assert!(channel_matches("chat:**", "chat:room1:sub"));
        assert!(channel_matches("chat/**", "chat/a/b/c"));
        assert!(channel_matches("user.*:inbox", "user.42:inbox"));
        assert!(channel_matches("**", "anything/at:all"));
        assert!(!channel_matches("*", "a:b"));
        assert!(channel_matches("a*c", "abbbc"));
    }

    /// `*a*a*a*a*b` against 150 and 200 `a`s (no `b`): a backtracking matcher takes
    /// billions of steps; this one at most one pass over the name per pattern token.
    #[test]
    fn adversarial_patterns_match_in_bounded_steps() {
        for (pattern, channel, want) in [
            ("*a*a*a*a*b".to_owned(), "a".repeat(150), false),
            ("*a*a*a*a*b".to_owned(), "a".repeat(200), false),
            (
                "*a*a*a*a*b".to_owned(),
                format!("{}b", "a".repeat(149)),
                true,
            ),
            ("**a**a**a**a**b".to_owned(), "a:".repeat(100), false),
            (
                "**a**a**a**a**b".to_owned(),
                format!("{}b", "a/".repeat(99)),
                true,
            ),
            (
                "*a*a*a*a*b".to_owned(),
                format!("{}:b", "a".repeat(148)),
                false,
            ),
            ("*a".repeat(100) + "*b", "a".repeat(200), false),
        ] {
            steps::take();
            assert_eq!(
                channel_matches(&pattern, &channel),
                want,
                "{pattern} {channel}"
            );
            let taken = steps::take();
            let bound = (pattern.len() as u64 + 1) * (channel.len() as u64 + 1);
            assert!(taken <= bound, "{pattern}: {taken} steps > {bound}");
        }
    }

    /// The former recursive matcher: the specification the linear one must equal.
    fn reference(pattern: &str, channel: &str) -> bool {
        fn go(p: &[u8], c: &[u8]) -> bool {
            match p {
                [] => c.is_empty(),
                [b'*', b'*', rest @ ..] => (0..=c.len()).any(|i| go(rest, &c[i..])),
                [b'*', rest @ ..] => {
                    let seg = c
                        .iter()
                        .position(|b| *b == b':' || *b == b'/')
                        .unwrap_or(c.len());
                    (0..=seg).any(|i| go(rest, &c[i..]))
                }
                [x, rest @ ..] => c.first() == Some(x) && go(rest, &c[1..]),
            }
        }
        pattern.len() <= MAX_PATTERN && go(pattern.as_bytes(), channel.as_bytes())
    }

    /// Every string over `alphabet` of length `0..=max`.
    fn all_strings(alphabet: &[char], max: usize) -> Vec<String> {
        let mut out = vec![String::new()];
        let mut last = vec![String::new()];
        for _ in 0..max {
            last = last
                .iter()
                .flat_map(|s| alphabet.iter().map(move |c| format!("{s}{c}")))
                .collect();
            out.extend(last.iter().cloned());
        }
        out
    }

    #[test]
    fn the_linear_matcher_agrees_with_the_recursive_one() {
        let patterns = all_strings(&['a', 'b', '*', ':', '/'], 5);
        let channels = all_strings(&['a', 'b', ':', '/'], 5);
        for p in &patterns {
            for c in &channels {
                assert_eq!(channel_matches(p, c), reference(p, c), "{p:?} {c:?}");
            }
        }
        let long = "x".repeat(MAX_PATTERN + 1);
        assert!(!channel_matches(&long, &long));
        assert!(channel_matches(
            &"x".repeat(MAX_PATTERN),
            &"x".repeat(MAX_PATTERN)
        ));
    }

    fn jwt(secret: &str) -> Auth {
        Auth::load(&AuthSection {
            mode: AuthMode::Jwt,
            hs256_secret: secret.into(),
            audience: "aud1".into(),
            ..Default::default()
        })
        .unwrap()
    }

    fn sign(claims: Value, alg: Algorithm, secret: &str) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(alg),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn tokens_are_checked() {
        let secret = "0123456789abcdef0123456789abcdef";
        let a = jwt(secret);
        let now = jsonwebtoken::get_current_timestamp();
        let good = sign(
            json_claims("u1", now + 60, "aud1"),
            Algorithm::HS256,
            secret,
        );
        let id = a.verify(&good).unwrap();
        assert_eq!(id.client_id, "u1");
        assert!(id.may_subscribe("chat:x") && !id.may_subscribe("other"));
        for bad in [
            sign(
                json_claims("u1", now - 3600, "aud1"),
                Algorithm::HS256,
                secret,
            ),
            sign(
                json_claims("u1", now + 60, "aud2"),
                Algorithm::HS256,
                secret,
            ),
            sign(
                json_claims("u1", now + 60, "aud1"),
                Algorithm::HS256,
                "another-secret-another-secret-xx",
            ),
            sign(
                json_claims("u1", now + 60, "aud1"),
                Algorithm::HS384,
                secret,
            ),
            sign(
                serde_json::json!({"exp": now + 60, "aud": "aud1"}),
                Algorithm::HS256,
                secret,
            ),
            sign(
                serde_json::json!({"sub": "u1", "aud": "aud1"}),
                Algorithm::HS256,
                secret,
            ),
            "e30.e30.".into(),
            "garbage".into(),
            String::new(),
            // alg none
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ1MSIsImV4cCI6OTk5OTk5OTk5OX0.".into(),
        ] {
            assert!(a.verify(&bad).is_err(), "{bad}");
        }
    }

    fn json_claims(sub: &str, exp: u64, aud: &str) -> Value {
        serde_json::json!({"sub": sub, "exp": exp, "aud": aud, "channels": ["chat:*"]})
    }

    #[test]
    fn extreme_exp_values_never_panic() {
        let year = 365 * 24 * 3600;
        for exp in [u64::MAX, i64::MAX as u64, 1 << 63, (1 << 63) - 1, 0] {
            for (leeway, now) in [(0, 0), (5, 1_700_000_000), (u64::MAX, u64::MAX)] {
                let left = time_left(exp, leeway, now);
                assert!(left <= MAX_TOKEN_LIFETIME, "{exp} {leeway} {now}");
            }
        }
        assert_eq!(time_left(u64::MAX, 5, 1_700_000_000), MAX_TOKEN_LIFETIME);
        assert_eq!(time_left(0, 5, 1_700_000_000), Duration::ZERO);
        assert_eq!(time_left(100, 5, 90), Duration::from_secs(15));

        let secret = "0123456789abcdef0123456789abcdef";
        let a = jwt(secret);
        let now = tokio::time::Instant::now();
        for exp in [u64::MAX, i64::MAX as u64, 1 << 63] {
            let t = sign(json_claims("u1", exp, "aud1"), Algorithm::HS256, secret);
            let id = a.verify(&t).unwrap();
            assert_eq!(id.exp, exp);
            let at = a.expires_at(&id);
            assert!(at > now + Duration::from_secs(9 * year), "{exp}");
            assert!(
                at <= tokio::time::Instant::now() + MAX_TOKEN_LIFETIME,
                "{exp}"
            );
        }
        let expired = sign(json_claims("u1", 0, "aud1"), Algorithm::HS256, secret);
        assert!(a.verify(&expired).is_err());
        let id = Identity {
            client_id: "u1".into(),
            exp: 0,
            channels: vec![],
            meta: Value::Null,
        };
        assert!(a.expires_at(&id) <= tokio::time::Instant::now());
        for exp in [
            serde_json::json!(-1),
            serde_json::json!(i64::MIN),
            serde_json::json!(1e300),
        ] {
            let t = sign(
                serde_json::json!({"sub": "u1", "exp": exp, "aud": "aud1"}),
                Algorithm::HS256,
                secret,
            );
            assert!(a.verify(&t).is_err(), "{exp}");
        }
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for v in ["Bearer abc", "bearer abc", "BEARER abc", "bEaReR  abc "] {
            assert_eq!(bearer(v), Some("abc"), "{v}");
        }
        for v in ["Basic abc", "Bearerabc", "abc", "", "Bearer"] {
            assert_eq!(bearer(v), None, "{v}");
        }
    }

    #[test]
    fn nbf_is_checked_with_the_leeway() {
        let secret = "0123456789abcdef0123456789abcdef";
        let a = jwt(secret);
        let now = jsonwebtoken::get_current_timestamp();
        let with_nbf = |nbf: Value| {
            let mut c = json_claims("u1", now + 3600, "aud1");
            c["nbf"] = nbf;
            sign(c, Algorithm::HS256, secret)
        };
        assert!(a.verify(&with_nbf((now + 86_400).into())).is_err());
        assert!(a.verify(&with_nbf((now + 60).into())).is_err());
        assert!(a.verify(&with_nbf("tomorrow".into())).is_err());
        // The default leeway is 5 s.
        assert!(a.verify(&with_nbf((now + 3).into())).is_ok());
        assert!(a.verify(&with_nbf((now - 60).into())).is_ok());
    }

    #[test]
    fn token_refusals_are_typed_and_carry_their_source() {
        use std::error::Error as _;
        let secret = "0123456789abcdef0123456789abcdef";
        let a = jwt(secret);
        let now = jsonwebtoken::get_current_timestamp();
        let expired = sign(
            json_claims("u1", now - 3600, "aud1"),
            Algorithm::HS256,
            secret,
        );
        let e = a.verify(&expired).unwrap_err();
        assert!(matches!(e, TokenError::Invalid(_)), "{e:?}");
        assert!(e.source().is_some());
        let e = a.verify("garbage").unwrap_err();
        assert!(
            matches!(e, TokenError::Header(_)) && e.source().is_some(),
            "{e:?}"
        );
        let hs384 = sign(
            json_claims("u1", now + 60, "aud1"),
            Algorithm::HS384,
            secret,
        );
        assert!(matches!(
            a.verify(&hs384),
            Err(TokenError::AlgMismatch {
                token: Algorithm::HS384,
                key: Algorithm::HS256
            })
        ));
        let long = "x".repeat(MAX_TOKEN + 1);
        assert!(matches!(a.verify(&long), Err(TokenError::TooLong(n)) if n == MAX_TOKEN + 1));
        let bad_sub = sign(
            json_claims("has space", now + 60, "aud1"),
            Algorithm::HS256,
            secret,
        );
        assert!(matches!(a.verify(&bad_sub), Err(TokenError::Sub(_))));
        let mut c = json_claims("u1", now + 60, "aud1");
        c["meta"] = serde_json::json!([1]);
        let bad_meta = sign(c, Algorithm::HS256, secret);
        assert!(matches!(a.verify(&bad_meta), Err(TokenError::Meta)));
        assert!(matches!(
            Auth::None.verify(&expired),
            Err(TokenError::NotJwt)
        ));
    }

    #[test]
    fn startup_errors_are_typed_and_carry_their_source() {
        use std::error::Error as _;
        let secret = "0123456789abcdef0123456789abcdef";
        let jwt_cfg = |f: fn(&mut AuthSection)| {
            let mut cfg = AuthSection {
                mode: AuthMode::Jwt,
                ..Default::default()
            };
            f(&mut cfg);
            Auth::load(&cfg).map(|_| ()).unwrap_err()
        };
        let e = jwt_cfg(|c| c.rs256_public_key_file = "/nonexistent/key.pem".into());
        assert!(matches!(e, ConfigError::Read { .. }), "{e:?}");
        let io = e.source().and_then(|s| s.downcast_ref::<std::io::Error>());
        assert_eq!(io.map(|e| e.kind()), Some(std::io::ErrorKind::NotFound));
        assert_eq!(
            e.to_string(),
            format!(
                "auth.rs256_public_key_file /nonexistent/key.pem: {}",
                io.unwrap()
            )
        );
        assert!(matches!(
            jwt_cfg(|c| c.hs256_secret = "short".into()),
            ConfigError::ShortSecret
        ));
        assert!(matches!(jwt_cfg(|_| {}), ConfigError::NoKeySource));
        assert_eq!(
            jwt_cfg(|_| {}).to_string(),
            "auth.mode = \"jwt\" needs hs256_secret, rs256_public_key_file or jwks_file"
        );
        let dir = std::env::temp_dir().join(format!("tether-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let jwks = dir.join("jwks.json");
        std::fs::write(&jwks, "{not json").unwrap();
        let path = jwks.display().to_string();
        let e = Auth::load(&AuthSection {
            mode: AuthMode::Jwt,
            jwks_file: path.clone(),
            ..Default::default()
        })
        .map(|_| ())
        .unwrap_err();
        assert!(
            matches!(&e, ConfigError::Jwks { path: p, .. } if *p == path),
            "{e:?}"
        );
        assert!(e.source().is_some_and(|s| s.is::<serde_json::Error>()));
        std::fs::write(&jwks, r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#).unwrap();
        let e = Auth::load(&AuthSection {
            mode: AuthMode::Jwt,
            jwks_file: path,
            ..Default::default()
        })
        .map(|_| ())
        .unwrap_err();
        assert!(matches!(e, ConfigError::NoKid { .. }), "{e:?}");
        let _ = std::fs::remove_dir_all(&dir);
        // `tether token --ttl` near 2^64 saturates instead of overflowing.
        let minted = mint_hs256(secret, "u1", &[], u64::MAX).unwrap();
        let no_aud = Auth::load(&AuthSection {
            mode: AuthMode::Jwt,
            hs256_secret: secret.into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(no_aud.verify(&minted).unwrap().exp, u64::MAX);
    }

    #[test]
    fn issuer_is_checked_when_set() {
        let secret = "0123456789abcdef0123456789abcdef";
        let a = Auth::load(&AuthSection {
            mode: AuthMode::Jwt,
            hs256_secret: secret.into(),
            issuer: "https://issuer.example".into(),
            ..Default::default()
        })
        .unwrap();
        let now = jsonwebtoken::get_current_timestamp();
        let with = |iss: Option<&str>| {
            let mut c = serde_json::json!({"sub": "u1", "exp": now + 60});
            if let Some(i) = iss {
                c["iss"] = i.into();
            }
            sign(c, Algorithm::HS256, secret)
        };
        assert!(a.verify(&with(Some("https://issuer.example"))).is_ok());
        assert!(a.verify(&with(Some("https://evil.example"))).is_err());
        assert!(a.verify(&with(None)).is_err());
    }

    #[test]
    fn short_secrets_and_missing_keys_are_startup_errors() {
        assert!(Auth::load(&AuthSection {
            mode: AuthMode::Jwt,
            hs256_secret: "short".into(),
            ..Default::default()
        })
        .is_err());
        assert!(Auth::load(&AuthSection {
            mode: AuthMode::Jwt,
            ..Default::default()
        })
        .is_err());
        assert!(Auth::load(&AuthSection {
            mode: AuthMode::Jwt,
            hs256_secret: "0123456789abcdef0123456789abcdef".into(),
            leeway_ms: u64::MAX,
            ..Default::default()
        })
        .is_err());
    }
}
