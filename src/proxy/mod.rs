//! The data plane's userspace half: the listener that nat rules redirect VIP connections to,
//! the per-instance passive health, and zero-copy forwarding.

pub mod activation;
pub mod health;
pub mod http;
mod listener;
pub mod pipe;
pub mod routes;
pub mod splice;

pub use listener::{Proxy, ProxyConfig};
