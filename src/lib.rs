//! flux: service routing for Docker hosts.
//!
//! The modules read as the data flow: sources (`store`, later `docker`) feed the `model`;
//! the `catalog` is the typed view of the store; the `api` serves it; `cli` is fluxctl.

pub mod api;
pub mod catalog;
pub mod cli;
pub mod controller;
pub mod daemon;
pub mod dns;
pub mod docker;
pub mod docs;
pub mod edge;
pub mod metrics;
pub mod model;
pub mod proxy;
pub mod store;
pub mod throttle;
pub mod ui;
pub mod version;
