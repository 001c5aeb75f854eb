//! Service names in DNS: fluxd answers `NAME.flux.` (the VIP), `_NAME._tcp.flux.` (SRV: VIP
//! and port) and `NAME.instances.flux.` (the instances live from this host) from the catalog it
//! follows, so names resolve while the store is unreachable.
//!
//! - `settings`: the `--dns-*` settings, checked before anything starts;
//! - `catalog`: what the answers are made of (the followed State and the proxy's route table);
//! - `answer`: the pure part, a query's bytes and a catalog in, the reply out (unit-tested and
//!   fuzzed);
//! - `forward`: relaying queries for other zones to the host's resolvers (`--dns-forward`);
//! - `server`: the UDP and TCP listeners, their limits and the metrics.

pub mod answer;
pub mod catalog;
pub mod forward;
pub mod server;
pub mod settings;

pub use settings::Settings;
