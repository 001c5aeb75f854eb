//! What the controller asks for: which VIP:ports go to the proxy, which are refused, which
//! addresses are VIPs (routed locally), and which interfaces' connections may be steered.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};

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
    /// Every VIP:port steered, with its service (for `fluxd debug`) and action.
    pub services: BTreeMap<SocketAddrV4, (String, Action)>,
    /// VIP ranges (`--vip-range`, those the guard allowed): routed locally as a whole, and a
    /// connection to an address in one that is no service is refused.
    pub ranges: BTreeSet<(Ipv4Addr, u8)>,
    /// Interfaces whose connections to VIPs go to the proxy: lo and the bridges, by index.
    pub ifaces: BTreeMap<u32, String>,
}

impl Desired {
    /// The prefixes routed locally and listed in the addresses map: each range, and the /32 of
    /// every VIP outside all of them.
    pub fn addresses(&self) -> BTreeSet<(Ipv4Addr, u8)> {
        let mut out = self.ranges.clone();
        for vip in self.services.keys() {
            if !self.ranges.iter().any(|r| contains(*r, *vip.ip())) {
                out.insert((*vip.ip(), 32));
            }
        }
        out
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
        ] {
            d.services
                .insert(vip.parse().unwrap(), ("s".into(), action));
        }
        let got: Vec<String> = d
            .addresses()
            .iter()
            .map(|(a, l)| format!("{a}/{l}"))
            .collect();
        assert_eq!(got, ["10.1.2.3/32", "198.18.0.0/16"]);
    }
}
