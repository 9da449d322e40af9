//! TLS for `wss://`: the default client configuration (the system's root
//! certificates, rustls on the `ring` provider). An app with its own CA gives its own
//! configuration to `ClientBuilder::tls_config`.

use std::sync::Arc;

use rustls::ClientConfig;

use crate::ClientError;

/// A configuration trusting the system's root certificates.
pub(crate) fn system_roots() -> Result<Arc<ClientConfig>, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(ClientError::NoRootCertificates);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}
