//! What the controller asks for, in its own terms (services and VIPs), before it becomes rule
//! text.

use std::net::SocketAddrV4;

/// One service address whose connections flux's proxy must receive.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Redirect {
    /// Written into the rule's comment so an operator (and `fluxd debug`) can tell which
    /// service a kernel rule serves.
    pub service: String,
    /// The address clients connect to; only TCP connections to exactly this IP and port are
    /// redirected.
    pub vip: SocketAddrV4,
}

/// The complete state flux wants in the nat table. Always the full set, never a delta: applying
/// it makes the kernel match it whatever was there before.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Every VIP to capture; order does not matter, [`crate::render`] sorts them.
    pub redirects: Vec<Redirect>,
    /// The local port fluxd's listener accepts redirected connections on.
    pub proxy_port: u16,
    /// Interfaces whose incoming traffic is redirected (e.g. `docker0`, `br-+`, with iptables'
    /// trailing `+` wildcard). Traffic from the host's own processes is always redirected;
    /// traffic arriving from the LAN never is, so a VIP cannot be used to capture
    /// neighbours' connections.
    pub bridge_interfaces: Vec<String>,
}
