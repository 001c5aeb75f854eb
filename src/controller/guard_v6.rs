//! The IPv6 default gateways the VIP guard protects, read from `/proc/net/ipv6_route` (this
//! network namespace's): an IPv6 VIP equal to one would capture the host's outgoing traffic.

use std::net::{IpAddr, Ipv6Addr};

/// The next hops of the default routes (`::/0` with a gateway) in `/proc/net/ipv6_route`,
/// whose lines are `dest plen src plen next_hop metric refcnt use flags iface`, addresses as
/// 32 hex digits in network order.
pub(super) fn default_gateways(route: &str) -> Vec<(IpAddr, String)> {
    const RTF_GATEWAY: u32 = 0x2;
    route
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (dest, plen, gw, flags, iface) =
                (f.first()?, f.get(1)?, f.get(4)?, f.get(8)?, f.get(9)?);
            let default = hex128(dest)? == 0 && u8::from_str_radix(plen, 16).ok()? == 0;
            let gw = hex128(gw)?;
            let flags = u32::from_str_radix(flags, 16).ok()?;
            (default && gw != 0 && flags & RTF_GATEWAY != 0).then(|| {
                (
                    IpAddr::V6(Ipv6Addr::from(gw)),
                    format!("this host's default gateway (via {iface})"),
                )
            })
        })
        .collect()
}

fn hex128(s: &str) -> Option<u128> {
    (s.len() == 32).then_some(())?;
    u128::from_str_radix(s, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_route_gateways_only() {
        let table = "\
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000001 00000000 00000003 eth0
fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001 eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200 lo
";
        let gws = default_gateways(table);
        assert_eq!(
            gws,
            vec![(
                "fd00::1".parse().unwrap(),
                "this host's default gateway (via eth0)".to_string()
            )]
        );
        assert!(default_gateways("garbage\n0 0 0").is_empty());
    }
}
