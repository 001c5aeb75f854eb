//! What the controller asks for, in its own terms (services and VIPs), before it becomes rule
//! text.

use std::net::{Ipv4Addr, SocketAddrV4};

/// One service address: in [`Desired::redirects`], one whose connections flux's proxy must
/// receive; in [`Desired::rejects`], one whose connections must be refused.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Redirect {
    /// Written into the rule's comment so an operator (and `fluxd debug`) can tell which
    /// service a kernel rule serves.
    pub service: String,
    /// The address clients connect to; only TCP connections to exactly this IP and port are
    /// redirected.
    pub vip: SocketAddrV4,
}

/// The complete state flux wants in the nat and filter tables. Always the full set, never a
/// delta: applying it makes the kernel match it whatever was there before.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Every VIP to capture; order does not matter, [`crate::render`] sorts them.
    pub redirects: Vec<Redirect>,
    /// The VIPs of services with no instance to send to: refused at once (a TCP reset to the
    /// client's first packet) instead of redirected to a proxy that could only accept and then
    /// reset the connection. VIP ranges do not cover them: the refusal comes first. Order does
    /// not matter.
    pub rejects: Vec<Redirect>,
    /// Whether [`Desired::rejects`] are refused, which needs ipset (the refusal matches the
    /// [`crate::EMPTY_SET`] set). When false they are redirected like [`Desired::redirects`],
    /// and neither the set nor its rules are installed (and any left from before are removed).
    pub reject_empty: bool,
    /// The local port fluxd's listener accepts redirected connections on.
    pub proxy_port: u16,
    /// Interfaces whose incoming traffic is redirected (e.g. `docker0`, `br-+`, with iptables'
    /// trailing `+` wildcard). Traffic from the host's own processes is always redirected;
    /// traffic arriving from the LAN never is, so a VIP cannot be used to capture
    /// neighbours' connections.
    pub bridge_interfaces: Vec<String>,
    /// Address ranges reserved for VIPs. Each becomes one rule sending every TCP connection to
    /// the range to the proxy, which finds the service from the original destination itself:
    /// matching then costs the same at 10,000 services as at 10, and adding or removing a
    /// service changes no rule. VIPs outside every range keep a rule of their own.
    pub vip_ranges: Vec<VipRange>,
    /// Services forwarded by the kernel (DNAT) rather than by the proxy. Their VIPs are no
    /// members of [`crate::VIP_SET`] and no VIP range takes them; a service with no instance
    /// belongs in [`Desired::rejects`] instead. How proxied services are steered does not
    /// change how these are rendered. Order does not matter.
    pub forwards: Vec<Forward>,
    /// `udp` services relayed by fluxd: each VIP:port's datagrams are redirected to the local
    /// port of that service's own socket. Order does not matter.
    pub udp_redirects: Vec<UdpRedirect>,
}

/// One `udp` service's redirect: datagrams to `vip` (UDP) go to fluxd's socket on `port`. In
/// [`Desired::udp_redirects`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UdpRedirect {
    /// Written into the rule's comment, as for [`Redirect::service`].
    pub service: String,
    /// The address clients send to; only UDP to exactly this IP and port is redirected.
    pub vip: SocketAddrV4,
    /// The local port of the service's relay socket.
    pub port: u16,
}

/// An IPv4 network, `addr/prefix_len`, with `addr` the network address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipRange {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

impl VipRange {
    fn mask(&self) -> u32 {
        match self.prefix_len {
            0 => 0,
            n => u32::MAX << (32 - u32::from(n.min(32))),
        }
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr) & self.mask()
    }
}

impl std::fmt::Display for VipRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// A service whose connections the kernel forwards itself: its VIP:port is rewritten (DNAT)
/// straight to one of its instances, spread at random, with no proxy in the path. In
/// [`Desired::forwards`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Forward {
    /// Written into the rules' comments, as for [`Redirect::service`].
    pub service: String,
    /// The address clients connect to.
    pub vip: SocketAddrV4,
    /// The service's instances, in any order. Those not on [`Destination::standby`] share new
    /// connections evenly; at least one must be, or the service gets no rule (it is reported in
    /// [`crate::Ruleset::rejected`]).
    pub destinations: Vec<Destination>,
}

/// One instance of a [`Forward`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Destination {
    /// The instance's name, written into its rule's comment (`flux:SERVICE/INSTANCE`) so that
    /// `fluxd debug` can say which instance each rule sends to.
    pub instance: String,
    /// Where its connections are sent.
    pub addr: SocketAddrV4,
    /// True while no new connection may go to it (its active health check fails): it gets no
    /// rule, but it is still the service's, so connections already forwarded to it are left
    /// alone ([`crate::Unforwarded`] lists only instances that left the service).
    pub standby: bool,
}
