//! The local API: fluxctl's (and later the web UI's) way into fluxd.
//!
//! Routes (JSON bodies; errors are `{"error": "...", "field": "..."}` with 400 for bad input,
//! 404 for unknown names, 409 for conflicts, 503 when the store is unavailable):
//! - `GET /v1/services`, `POST /v1/services` (a Service), `GET|DELETE /v1/services/{name}`
//! - `PUT|DELETE /v1/services/{svc}/rules/{rule}` (a Rule)
//! - `POST /v1/services/{svc}/instances` (a static Instance), `DELETE .../instances/{name}`
//! - `GET /v1/instances?service=&host=&rule=&state=&image=&tag=&label=k=v&env=k=v`
//! - `GET /v1/hosts`, `GET /v1/host`, `GET /healthz`, `GET /readyz`

pub mod client;
mod cluster;
pub mod debug;
pub mod handlers;
pub mod server;
pub mod views;

/// Group allowed to use the socket besides root by default (`--api-group`); created by
/// `scripts/install`.
pub const SOCKET_GROUP: &str = "flux";
