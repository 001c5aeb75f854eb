//! What the kernel holds: the maps' contents, flux's routes, and whether the program is
//! attached and pinned.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use crate::desired::Action;
use crate::routes::Prefix;

/// The steering as read back from the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Installed {
    /// The services maps (IPv4 and IPv6): VIP:port -> action (None for a value no fluxd
    /// writes).
    pub services: BTreeMap<SocketAddr, Option<Action>>,
    /// The addresses maps (VIP ranges, /32s and /128s).
    pub addresses: BTreeSet<Prefix>,
    /// The interfaces map, by index.
    pub ifaces: BTreeSet<u32>,
    /// flux's local routes.
    pub routes: BTreeSet<Prefix>,
    /// Whether the socket map holds a socket (fluxd's listener).
    pub socket: bool,
    pub link: LinkState,
    /// Whether the IPv6 socket map holds a socket (fluxd's IPv6 listener).
    pub socket6: bool,
}

/// The program's attachment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkState {
    /// The kernel's ids, as `bpftool link` and `bpftool prog` show them.
    pub link_id: u32,
    pub prog_id: u32,
    /// Attached to this network namespace (not detached by `bpftool link detach`).
    pub attached: bool,
    /// Pinned in the pin directory, so that it outlives fluxd.
    pub pinned: bool,
}
