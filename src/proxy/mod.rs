//! The data plane's userspace half: the listener that VIP connections reach (redirected by nat
//! rules, or handed over by the bpf steering), the per-instance health (passive, and the active
//! checker), and forwarding: small payloads copied through a per-thread buffer, streams spliced
//! through pipes.

pub mod activation;
pub mod activation6;
pub mod balancer;
mod buffer;
mod connect;
mod destination;
pub mod health;
pub mod http;
pub mod limits;
mod listener;
mod pipe;
pub(crate) mod proxy_header;
mod reset;
pub mod route_table;
mod session;
mod tcp;
pub mod udp;
mod way;

pub use destination::VipSource;
pub use listener::{Proxy, ProxyConfig};
