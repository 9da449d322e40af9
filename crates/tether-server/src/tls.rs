//! TLS (`[tls] cert_file`, `key_file`): the certificate loaded at startup and
//! re-read on SIGHUP, the handshake, HTTP/2 for connections whose ALPN chose it,
//! and the API listener's TLS accept path.
//!
//! Reload swaps the whole rustls `ServerConfig` behind a lock: every handshake
//! takes the config current when it starts, so new handshakes present the new
//! certificate while open connections keep theirs (and a fresh config brings a fresh
//! session cache, so nobody resumes into the old certificate). A reload that fails
//! keeps the current certificate.
//!
//! ALPN offers `h2` then `http/1.1`. A WebSocket upgrade arrives on an `http/1.1`
//! connection (or one without ALPN) and goes through the same HTTP/1 path as plain
//! TCP; `h2` connections carry SSE streams and API calls, many per connection.
//! An `h2` connection on the client listener follows the same socket rules as an
//! HTTP/1 socket: it is pending until a stream commits a connection and dropped if
//! still pending at `limits.handshake_timeout_ms` (the TLS handshake counts inside
//! it). Once it has no open stream for `limits.handshake_timeout_ms` it is sent
//! GOAWAY, and dropped if it is still there (and still idle) that long after; when
//! the drain starts every `h2` connection is sent GOAWAY.

use std::convert::Infallible;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::RwLock;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use tether_core::Phase;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::app::App;
use crate::config::TlsSection;
use crate::socket_info::SocketInfo;

/// ALPN, in the server's order of preference.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The TLS state of one server: where the certificate comes from and the rustls
/// config handshakes use now.
pub(crate) struct Tls {
    cert_file: String,
    key_file: String,
    current: RwLock<Arc<ServerConfig>>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

/// Why `[tls]` could not be loaded; every variant names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file could not be read or parsed.
    #[error("tls.cert_file {file}: {}", pem_error(.source))]
    Cert {
        /// The file.
        file: String,
        /// Why.
        source: pem::Error,
    },
    /// The certificate file holds no certificate.
    #[error("tls.cert_file {0}: no certificate in it (expected PEM \"BEGIN CERTIFICATE\" blocks)")]
    NoCert(String),
    /// The key file holds no private key.
    #[error(
        "tls.key_file {0}: no private key in it (expected PEM \"BEGIN PRIVATE KEY\", \
         \"BEGIN RSA PRIVATE KEY\" or \"BEGIN EC PRIVATE KEY\")"
    )]
    NoKey(String),
    /// The key file could not be read or parsed.
    #[error("tls.key_file {file}: {}", pem_error(.source))]
    Key {
        /// The file.
        file: String,
        /// Why.
        source: pem::Error,
    },
    /// The key does not belong to the certificate (or rustls refused the pair).
    #[error("tls.key_file {key_file} does not fit tls.cert_file {cert_file}: {source}")]
    Mismatch {
        /// The certificate file.
        cert_file: String,
        /// The key file.
        key_file: String,
        /// rustls's reason.
        source: rustls::Error,
    },
    /// rustls could not be set up with the ring provider.
    #[error("TLS: {0}")]
    Provider(#[source] rustls::Error),
}

impl Tls {
    /// Loads `[tls]`; `None` when it is not configured. The error names the file.
    pub(crate) fn from_config(cfg: &TlsSection) -> Result<Option<Arc<Tls>>, TlsError> {
        if !cfg.enabled() {
            return Ok(None);
        }
        let config = server_config(&cfg.cert_file, &cfg.key_file)?;
        Ok(Some(Arc::new(Tls {
            cert_file: cfg.cert_file.clone(),
            key_file: cfg.key_file.clone(),
            current: RwLock::new(Arc::new(config)),
        })))
    }

    /// Re-reads both files; on success new handshakes use them, on failure nothing
    /// changes. Open connections are not touched either way.
    pub(crate) fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.cert_file, &self.key_file)?;
        *self.current.write() = Arc::new(config);
        tracing::info!(cert_file = %self.cert_file, key_file = %self.key_file, "TLS certificate reloaded");
        Ok(())
    }

    /// Runs the server side of a handshake with the current certificate.
    pub(crate) async fn accept(&self, socket: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        let acceptor = TlsAcceptor::from(self.current.read().clone());
        acceptor.accept(socket).await
    }
}

/// Whether ALPN chose HTTP/2 on this connection.
pub(crate) fn is_h2(stream: &TlsStream<TcpStream>) -> bool {
    stream.get_ref().1.alpn_protocol() == Some(b"h2")
}

/// Builds the rustls config from the two PEM files; errors name the file at fault.
fn server_config(cert_file: &str, key_file: &str) -> Result<ServerConfig, TlsError> {
    let certs = CertificateDer::pem_file_iter(cert_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Cert {
            file: cert_file.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCert(cert_file.to_owned()));
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoKey(key_file.to_owned()),
        source => TlsError::Key {
            file: key_file.to_owned(),
            source,
        },
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Provider)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::Mismatch {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            source,
        })?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

fn pem_error(e: &pem::Error) -> String {
    match e {
        pem::Error::Io(io) => io.to_string(),
        e => format!("bad PEM: {e}"),
    }
}

/// HTTP/2 carries the host as `:authority` (in the URI), not as `Host`; handlers
/// (the API's Host check) read `Host`, so give them one.
pub(crate) fn authority_as_host<B>(req: &mut Request<B>) {
    if req.version() != http::Version::HTTP_2 || req.headers().contains_key(header::HOST) {
        return;
    }
    let Some(host) = req
        .uri()
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    else {
        return;
    };
    req.headers_mut().insert(header::HOST, host);
}

/// Counts one open HTTP/2 stream while it lives (request, then response body).
struct StreamGuard(watch::Sender<usize>);

impl StreamGuard {
    fn new(tx: &watch::Sender<usize>) -> Self {
        tx.send_modify(|n| *n += 1);
        StreamGuard(tx.clone())
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Serves one client-listener connection whose ALPN chose `h2` (see the module docs).
/// `until` is the socket's handshake deadline.
pub(crate) async fn serve_h2<S>(
    app: &App,
    info: &SocketInfo,
    io: TlsStream<TcpStream>,
    service: S,
    until: Instant,
) where
    S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    let idle = Duration::from_millis(app.cfg.limits.handshake_timeout_ms.get());
    let (tx, mut streams) = watch::channel(0usize);
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let guard = StreamGuard::new(&tx);
        let answer = service.call(req);
        async move {
            let resp = answer.await?;
            // The guard lives as long as the body: hyper drops it when the stream ends
            // or is reset.
            Ok::<_, Infallible>(resp.map(|body| {
                Body::new(body.map_frame(move |frame| {
                    let _open = &guard;
                    frame
                }))
            }))
        }
    });
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let pending_timer = tokio::time::sleep_until(until);
    tokio::pin!(pending_timer);
    let mut pending_live = true;
    let idle_timer = tokio::time::sleep(idle);
    tokio::pin!(idle_timer);
    let mut idle_live = true;
    let mut counting = true;
    let draining = app.drain.reached(Phase::Draining);
    tokio::pin!(draining);
    let mut goaway = false;
    loop {
        tokio::select! {
            _ = &mut conn => break,
            _ = &mut pending_timer, if pending_live => {
                if info.is_pending() {
                    tracing::debug!(peer = %info.peer, "handshake timed out");
                    break;
                }
                pending_live = false;
            }
            changed = streams.changed(), if counting => {
                if changed.is_err() {
                    counting = false;
                    continue;
                }
                idle_live = *streams.borrow_and_update() == 0;
                if idle_live {
                    idle_timer.as_mut().reset(Instant::now() + idle);
                }
            }
            _ = &mut idle_timer, if idle_live => {
                if goaway {
                    tracing::debug!(peer = %info.peer, "idle HTTP/2 connection did not close after GOAWAY");
                    break;
                }
                conn.as_mut().graceful_shutdown();
                goaway = true;
                idle_timer.as_mut().reset(Instant::now() + idle);
            }
            _ = &mut draining, if !goaway => {
                conn.as_mut().graceful_shutdown();
                goaway = true;
            }
            _ = app.drain.hard_stop().cancelled() => break,
        }
    }
}
