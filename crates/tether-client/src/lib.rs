//! Tether's Rust client SDK (SPEC section 13): a WebSocket client that heals itself
//! without a stampede, knows when not to retry, notices a dead socket, and delivers
//! every channel message once and in order across reconnects.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tether_client::ClientError> {
//! use tether_client::{ClientBuilder, Event};
//! let mut client = ClientBuilder::new("ws://127.0.0.1:7700/ws")
//!     .client_id("alice")
//!     .channel("news")
//!     .connect()?;
//! while let Some(event) = client.next_event().await {
//!     if let Event::Message { data, .. } = event {
//!         println!("{data}");
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! Layout: [`machine`] is the state machine as a pure function (every decision, no
//! I/O); [`rule`] maps a close to a branch; [`backoff`] times the retries; [`frame`]
//! reads and writes the wire; the `client` module is the thin I/O shell; [`event`] is
//! what the app reads.
#![warn(missing_docs)]

pub mod backoff;
mod client;
pub mod event;
pub mod frame;
pub mod machine;
pub mod rule;
mod tls;

pub use backoff::Backoff;
pub use client::{Client, ClientBuilder, RefreshError};
pub use event::{Event, State, StateChange, Stats};

/// Why a client could not be built or a call could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL is not `ws://` or `wss://`.
    #[error("not a WebSocket URL (ws:// or wss://): {0}")]
    InvalidUrl(String),
    /// A channel name outside `[A-Za-z0-9_.:/-]{{1,200}}`.
    #[error("invalid channel name {0:?}")]
    InvalidChannel(String),
    /// `connect()` was called outside a tokio runtime.
    #[error("no tokio runtime: call connect() from within one")]
    NoRuntime,
    /// The client is closed.
    #[error("the client is closed")]
    Closed,
    /// A TLS configuration for `wss://` could not be built.
    #[error("TLS setup for wss:// failed: {0}")]
    Tls(#[from] rustls::Error),
    /// `wss://` without a TLS configuration, and no system root certificate was found.
    #[error(
        "no system root certificate found for wss:// (give one with ClientBuilder::tls_config)"
    )]
    NoRootCertificates,
}
