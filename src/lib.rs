//! flux: service routing for Docker hosts.
//!
//! The modules read as the data flow: sources (`store`, later `docker`) feed the `model`;
//! the `catalog` is the typed view of the store; the `api` serves it; `cli` is fluxctl.

pub mod model;
pub mod store;
