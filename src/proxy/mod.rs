//! The data plane's userspace half: the listener that VIP connections reach (redirected by nat
//! rules, or handed over by the bpf steering),
//! the per-instance health (passive, and the active checker), and zero-copy forwarding.

pub mod activation;
mod destination;
pub mod health;
pub mod http;
pub mod limits;
mod listener;
pub mod pipe;
pub mod route_table;
pub mod splice;
mod tcp;

pub use destination::VipSource;
pub use listener::{Proxy, ProxyConfig};
