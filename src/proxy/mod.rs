//! The data plane's userspace half: the listener that nat rules redirect VIP connections to,
//! the per-instance health (passive, and the active checker), and zero-copy forwarding.

pub mod activation;
pub mod check;
pub mod health;
pub mod http;
pub mod limits;
mod listener;
pub mod pipe;
pub mod routes;
pub mod splice;
pub mod verdict;

pub use listener::{Proxy, ProxyConfig};
