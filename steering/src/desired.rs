//! What the controller asks for: which VIP:ports go to the proxy, which are refused, which
//! addresses are VIPs (routed locally), and which interfaces' connections may be steered.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::routes::Prefix;

/// What happens to a connection to one VIP:port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// Handed to fluxd's listening socket.
    Proxy,
    /// Refused at once (a `tcp` service with no instance): the client's SYN gets a RST.
    Refuse,
}

impl Action {
    pub(crate) fn code(self) -> u32 {
        match self {
            Action::Proxy => crate::maps::ACTION_PROXY,
            Action::Refuse => crate::maps::ACTION_REFUSE,
        }
    }

    pub(crate) fn from_code(code: u32) -> Option<Action> {
        match code {
            crate::maps::ACTION_PROXY => Some(Action::Proxy),
            crate::maps::ACTION_REFUSE => Some(Action::Refuse),
            _ => None,
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Action::Proxy => "proxy",
            Action::Refuse => "refuse",
        })
    }
}

/// The complete steering state flux wants; never a delta.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Every VIP:port steered, IPv4 and IPv6, with its service (for `fluxd debug`) and action.
    pub services: BTreeMap<SocketAddr, (String, Action)>,
    /// IPv4 VIP ranges (`--vip-range`, those the guard allowed): routed locally as a whole, and
    /// a connection to an address in one that is no service is refused.
    pub ranges: BTreeSet<(Ipv4Addr, u8)>,
    /// Interfaces whose connections to VIPs go to the proxy: lo and the bridges, by index.
    pub ifaces: BTreeMap<u32, String>,
}

impl Desired {
    /// The prefixes routed locally and listed in the addresses maps: each range, the /32 of
    /// every IPv4 VIP outside all of them, and the /128 of every IPv6 VIP.
    pub fn addresses(&self) -> BTreeSet<Prefix> {
        let mut out: BTreeSet<Prefix> = self
            .ranges
            .iter()
            .map(|(a, l)| (IpAddr::V4(*a), *l))
            .collect();
        for vip in self.services.keys() {
            match vip {
                SocketAddr::V4(v) if !self.ranges.iter().any(|r| contains(*r, *v.ip())) => {
                    out.insert((vip.ip(), 32));
                }
                SocketAddr::V6(v) => {
                    out.insert((IpAddr::V6(*v.ip()), 128));
                }
                SocketAddr::V4(_) => {}
            }
        }
        out
    }

    /// Whether any IPv6 VIP is steered (the IPv6 listener must then be in its socket map).
    pub fn has_ipv6(&self) -> bool {
        self.services.keys().any(SocketAddr::is_ipv6)
    }
}

/// Whether the prefix `(net, len)` holds `ip`.
pub(crate) fn contains((net, len): (Ipv4Addr, u8), ip: Ipv4Addr) -> bool {
    let mask = match len {
        0 => 0,
        n => u32::MAX << (32 - u32::from(n.min(32))),
    };
    u32::from(ip) & mask == u32::from(net) & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_ranges_and_the_vips_outside_them() {
        let mut d = Desired::default();
        d.ranges.insert(("198.18.0.0".parse().unwrap(), 16));
        for (vip, action) in [
            ("198.18.0.1:80", Action::Proxy),
            ("198.18.0.1:81", Action::Refuse),
            ("10.1.2.3:80", Action::Proxy),
            ("10.1.2.3:443", Action::Proxy),
            ("[fd00:18::a]:80", Action::Proxy),
            ("[fd00:18::a]:81", Action::Refuse),
        ] {
            d.services
                .insert(vip.parse().unwrap(), ("s".into(), action));
        }
        let got: Vec<String> = d
            .addresses()
            .iter()
            .map(|(a, l)| format!("{a}/{l}"))
            .collect();
        assert_eq!(got, ["10.1.2.3/32", "198.18.0.0/16", "fd00:18::a/128"]);
        assert!(d.has_ipv6());
    }
}
