//! flux's kernel steering: a BPF `sk_lookup` program hands each new connection to a VIP:port
//! straight to fluxd's listening socket, with no NAT rule and no conntrack NAT.
//!
//! Three things together (the controller decides what, this crate only applies it):
//! - **local routes** (`local VIP dev lo` in the `local` table, [`routes`]): the VIP ranges
//!   as whole prefixes, every other VIP as a /32, so that the kernel delivers VIP traffic
//!   locally instead of routing it away;
//! - **the program** ([`program`]), attached to the network namespace: for a SYN to a local
//!   address it looks up VIP:port in a map and hands the connection to fluxd's listener
//!   (`bpf_sk_assign`; a reuseport group keeps its own balancing), or refuses it (a service
//!   with no instance; an address of flux's but no service on that port; a connection from an
//!   interface that is neither lo nor a bridge), or lets the usual lookup go on (anything else);
//! - **pins** ([`pins`]): the link and maps pinned on a bpf file system, so the program keeps
//!   steering to a socket that outlives fluxd (systemd's) across a restart, as kept nat rules
//!   did.
//!
//! The program is assembled at run time from a few dozen instructions ([`asm`]) and loaded with
//! raw `bpf(2)` calls ([`sys`]): no compiler at build time, no object file, no library.
//!
//! ```no_run
//! use steering::{Action, Desired, Steering};
//! use netfilter::CommandRunner;
//!
//! let s = Steering::load("/sys/fs/bpf/flux".as_ref(), CommandRunner::new())?;
//! let listener = std::net::TcpListener::bind("0.0.0.0:7171")?;
//! s.set_socket(std::os::fd::AsFd::as_fd(&listener))?;
//! let mut desired = Desired::default();
//! desired.services.insert("198.18.0.10:80".parse()?, ("web".into(), Action::Proxy));
//! desired.ifaces = steering::interfaces::steered(&["docker0".into()])?;
//! s.apply(&desired)?;
//! assert!(s.drift(&desired)?.is_clean());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#[cfg(not(target_endian = "little"))]
compile_error!("steering lays out bpf(2) attributes for little-endian machines only");

mod asm;
mod desired;
mod drift;
mod error;
mod installed;
pub mod interfaces;
mod maps;
pub mod pins;
mod program;
pub mod routes;
mod steering;
mod sys;

pub use desired::{Action, Desired};
pub use drift::Drift;
pub use error::Error;
pub use installed::{Installed, LinkState};
pub use steering::{remove_leftovers, Steering};
