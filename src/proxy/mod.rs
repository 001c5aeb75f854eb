//! The data plane's userspace half: the listener that nat rules redirect VIP connections to,
//! the per-instance health (passive, and the active checker), and zero-copy forwarding.

pub mod activation;
pub mod health;
pub mod http;
pub mod limits;
mod listener;
pub mod pipe;
pub mod route_table;
pub mod splice;
mod tcp;

pub use listener::{Proxy, ProxyConfig};
