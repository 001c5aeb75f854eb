//! fluxd, the per-host daemon: `run` starts and stops it phase by phase; `config` checks
//! every setting before anything starts; `store` opens the store the configuration names;
//! `steering` chooses between the BPF and the nat path; `dataplane` starts the proxy and the
//! controller and removes the rules at the end;
//! `systemd` tells the supervisor how far start-up got; `memory` hands freed memory back to
//! the kernel after a burst; `dns` starts the DNS responder.

pub mod config;
mod dataplane;
mod dns;
pub mod memory;
mod run;
mod steering;
mod store;
pub mod systemd;

pub use run::run;
