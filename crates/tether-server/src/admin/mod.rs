//! `/admin`: the operator's dashboard (SPEC section 8). The page and its files are
//! embedded in the binary ([`assets`]); the key-for-cookie exchange is [`session`].
//! The dashboard itself only calls the server API, with the session cookie.

mod assets;
mod session;

use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;

pub(crate) use session::Login;

/// The dashboard's routes: the page, its files, and the session exchange.
pub(crate) fn router(login: Arc<Login>) -> Router {
    Router::new()
        .route("/admin", get(assets::page))
        .route("/admin/assets/{*file}", get(assets::file))
        .route("/admin/session", post(session::session).with_state(login))
}

/// Paths served without the API key (still behind the no-key Host check): the page
/// and its files (nothing secret: the data comes from the API) and the exchange,
/// which checks the key itself.
pub(crate) fn opens_without_key(path: &str) -> bool {
    path == "/admin" || path == "/admin/session" || path.starts_with("/admin/assets/")
}
