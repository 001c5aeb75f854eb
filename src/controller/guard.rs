//! The VIP guard (CVE-2020-8554 in kube-proxy): a service VIP is a way to capture traffic, so
//! before any redirect is rendered each fluxd refuses the VIPs that would capture real traffic
//! on this host: a VIP equal to an address of one of its own interfaces, its default gateway,
//! one of its DNS resolvers or an etcd endpoint, or inside a protected range
//! (`--protected-range`). A `--vip-range` that contains such an address or overlaps a protected
//! range gets no rule either, since its one rule would capture the same traffic.
//!
//! Pure apart from [`Addresses::read`]: the controller reads the addresses at every sync and on
//! the drift timer (addresses, routes and resolvers come and go) and judges the whole catalog
//! again each time.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// The addresses a VIP must not take on this host, sorted, each with what it is ("an address
/// of eth0", "this host's default gateway (via eth0)", ...). Every interface address counts,
/// whether its interface is up or not: Linux accepts traffic for a local address on any
/// interface.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Addresses(Vec<(IpAddr, String)>);

impl Addresses {
    /// The addresses as the kernel and `/etc/resolv.conf` have them now, plus `fixed` (the
    /// etcd endpoints, resolved at start). A failure to read the interfaces is logged by the
    /// caller and leaves the guard with the last addresses read; an unreadable route table or
    /// resolv.conf simply adds nothing.
    pub fn read(fixed: &[(Ipv4Addr, String)]) -> nix::Result<Addresses> {
        let mut all: Vec<_> = nix::ifaddrs::getifaddrs()?
            .filter_map(|a| {
                let addr = a.address?;
                let ip = match (addr.as_sockaddr_in(), addr.as_sockaddr_in6()) {
                    (Some(v4), _) => IpAddr::V4(v4.ip()),
                    (_, Some(v6)) => IpAddr::V6(v6.ip()),
                    _ => return None,
                };
                Some((ip, format!("an address of {}", a.interface_name)))
            })
            .collect();
        let read = |path| std::fs::read_to_string(path).unwrap_or_default();
        all.extend(default_gateways(&read("/proc/net/route")));
        all.extend(super::guard_v6::default_gateways(&read(
            "/proc/net/ipv6_route",
        )));
        all.extend(resolvers(&read("/etc/resolv.conf")));
        all.extend(
            fixed
                .iter()
                .map(|(ip, what)| (IpAddr::V4(*ip), what.clone())),
        );
        Ok(Addresses::new(all))
    }

    pub fn new(mut all: Vec<(IpAddr, String)>) -> Addresses {
        all.sort();
        all.dedup();
        Addresses(all)
    }

    /// What `ip` is, if it is one of these addresses.
    fn holder(&self, ip: IpAddr) -> Option<&str> {
        self.0
            .iter()
            .find(|(a, _)| *a == ip)
            .map(|(_, what)| what.as_str())
    }

    /// The first address inside `net`, with its interface.
    fn inside(&self, net: &Ipv4Net) -> Option<(Ipv4Addr, &str)> {
        self.0.iter().find_map(|(a, what)| match a {
            IpAddr::V4(a) if net.contains(a) => Some((*a, what.as_str())),
            _ => None,
        })
    }
}

/// The gateways of the default routes in `/proc/net/route` (this network namespace's), whose
/// addresses are the kernel's own words in native byte order.
fn default_gateways(route: &str) -> Vec<(IpAddr, String)> {
    const RTF_GATEWAY: u32 = 0x2;
    let hex = |s: &str| u32::from_str_radix(s, 16).ok();
    route
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (iface, dest, gw, flags, mask) =
                (f.first()?, f.get(1)?, f.get(2)?, f.get(3)?, f.get(7)?);
            let gw = hex(gw)?;
            let default = hex(dest)? == 0 && hex(mask)? == 0;
            (default && gw != 0 && hex(flags)? & RTF_GATEWAY != 0).then(|| {
                let ip = IpAddr::V4(Ipv4Addr::from(gw.to_ne_bytes()));
                (ip, format!("this host's default gateway (via {iface})"))
            })
        })
        .collect()
}

/// The `nameserver` lines of resolv.conf, IPv4 and IPv6 (a `%zone` suffix dropped: a
/// link-local resolver cannot be a VIP anyway).
fn resolvers(conf: &str) -> Vec<(IpAddr, String)> {
    conf.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            let word = words.next()?;
            let ip: IpAddr = word.split('%').next()?.parse().ok()?;
            Some((ip, "a DNS resolver in /etc/resolv.conf".to_string()))
        })
        .collect()
}

/// A service this host does not redirect, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedVip {
    pub service: String,
    pub vip: SocketAddr,
    /// For operators, e.g. `is 10.0.0.5, an address of eth0`.
    pub reason: String,
}

/// A `--vip-range` that gets no rule on this host, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedRange {
    pub range: Ipv4Net,
    pub reason: String,
}

/// What the guard decided for one catalog state and one set of addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Refused services, by name.
    pub refused: BTreeMap<String, RefusedVip>,
    /// VIP ranges that get their rule.
    pub ranges: Vec<Ipv4Net>,
    /// VIP ranges that do not.
    pub refused_ranges: Vec<RefusedRange>,
}

impl Verdict {
    /// Judges every service VIP and every VIP range against this host's addresses and the
    /// protected ranges.
    pub fn judge<'a>(
        services: impl IntoIterator<Item = (&'a str, SocketAddr)>,
        vip_ranges: &[Ipv4Net],
        own: &Addresses,
        protected: &[Ipv4Net],
    ) -> Verdict {
        let mut verdict = Verdict::default();
        for (service, vip) in services {
            if let Some(reason) = vip_problem(vip.ip(), own, protected) {
                verdict.refused.insert(
                    service.to_string(),
                    RefusedVip {
                        service: service.to_string(),
                        vip,
                        reason,
                    },
                );
            }
        }
        for range in vip_ranges {
            match range_problem(range, own, protected) {
                Some(reason) => verdict.refused_ranges.push(RefusedRange {
                    range: *range,
                    reason,
                }),
                None => verdict.ranges.push(*range),
            }
        }
        verdict
    }

    /// Whether this host redirects `service`'s VIP.
    pub fn allows(&self, service: &str) -> bool {
        !self.refused.contains_key(service)
    }
}

/// Why `ip` must not be a VIP on this host, if it must not. Protected ranges are IPv4 ones.
pub fn vip_problem(ip: IpAddr, own: &Addresses, protected: &[Ipv4Net]) -> Option<String> {
    if let Some(what) = own.holder(ip) {
        return Some(format!("is {ip}, {what}"));
    }
    let IpAddr::V4(ip) = ip else {
        return None;
    };
    protected
        .iter()
        .find(|p| p.contains(&ip))
        .map(|p| format!("in protected range {p}"))
}

/// Why `range` must get no rule on this host, if it must not.
pub fn range_problem(range: &Ipv4Net, own: &Addresses, protected: &[Ipv4Net]) -> Option<String> {
    if let Some((ip, what)) = own.inside(range) {
        return Some(format!("contains {ip}, {what}"));
    }
    protected
        .iter()
        .find(|p| p.contains(range) || range.contains(*p))
        .map(|p| format!("overlaps protected range {p}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own() -> Addresses {
        Addresses::new(vec![
            ("10.0.0.5".parse().unwrap(), "an address of eth0".into()),
            ("127.0.0.1".parse().unwrap(), "an address of lo".into()),
            (
                "198.19.1.1".parse().unwrap(),
                "an address of docker0".into(),
            ),
        ])
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_addresses_gateways_and_resolvers_are_refused() {
        let own = Addresses::new(vec![
            ("fd00:1::5".parse().unwrap(), "an address of eth0".into()),
            ("::1".parse().unwrap(), "an address of lo".into()),
        ]);
        let p = vip_problem("fd00:1::5".parse().unwrap(), &own, &[]);
        assert_eq!(p.as_deref(), Some("is fd00:1::5, an address of eth0"));
        assert_eq!(vip_problem("fd00:1::6".parse().unwrap(), &own, &[]), None);
        let conf = "nameserver 192.0.2.53\nnameserver fd00:53::1\nnameserver fe80::1%eth0\n";
        let r = resolvers(conf);
        assert_eq!(r.len(), 3);
        assert_eq!(r[1].0, "fd00:53::1".parse::<IpAddr>().unwrap());
        assert_eq!(r[2].0, "fe80::1".parse::<IpAddr>().unwrap());
        let v = Verdict::judge([("web", "[fd00:1::5]:80".parse().unwrap())], &[], &own, &[]);
        assert!(!v.allows("web"));
    }

    #[test]
    fn own_addresses_are_refused_with_their_interface() {
        let p = vip_problem("10.0.0.5".parse().unwrap(), &own(), &[]);
        assert_eq!(p.as_deref(), Some("is 10.0.0.5, an address of eth0"));
        let p = vip_problem("198.19.1.1".parse().unwrap(), &own(), &[]);
        assert_eq!(p.as_deref(), Some("is 198.19.1.1, an address of docker0"));
        // A neighbour of an own address is not an own address.
        assert_eq!(vip_problem("10.0.0.6".parse().unwrap(), &own(), &[]), None);
    }

    #[test]
    fn protected_ranges_are_refused() {
        let protected = [net("10.0.0.0/8"), net("192.168.0.0/16")];
        let p = vip_problem("10.9.9.9".parse().unwrap(), &own(), &protected);
        assert_eq!(p.as_deref(), Some("in protected range 10.0.0.0/8"));
        // An own address is named as such even inside a protected range.
        let p = vip_problem("10.0.0.5".parse().unwrap(), &own(), &protected);
        assert_eq!(p.as_deref(), Some("is 10.0.0.5, an address of eth0"));
        assert_eq!(
            vip_problem("198.18.0.1".parse().unwrap(), &own(), &protected),
            None
        );
    }

    #[test]
    fn ranges_with_own_addresses_or_protected_overlap_get_no_rule() {
        let protected = [net("198.18.128.0/17")];
        let p = range_problem(&net("10.0.0.0/24"), &own(), &[]);
        assert_eq!(p.as_deref(), Some("contains 10.0.0.5, an address of eth0"));
        // Overlap either way round.
        let p = range_problem(&net("198.18.0.0/16"), &own(), &protected);
        assert_eq!(
            p.as_deref(),
            Some("overlaps protected range 198.18.128.0/17")
        );
        let p = range_problem(&net("198.18.200.0/24"), &own(), &protected);
        assert_eq!(
            p.as_deref(),
            Some("overlaps protected range 198.18.128.0/17")
        );
        assert_eq!(
            range_problem(&net("198.18.0.0/17"), &own(), &protected),
            None
        );
    }

    #[test]
    fn verdict_refuses_only_the_unsafe() {
        let services = [
            ("web", "198.18.0.10:80".parse().unwrap()),
            ("bad", "10.0.0.5:80".parse().unwrap()),
            ("lan", "192.168.1.1:443".parse().unwrap()),
        ];
        let v = Verdict::judge(
            services,
            &[net("198.18.0.0/16"), net("10.0.0.0/16")],
            &own(),
            &[net("192.168.0.0/16")],
        );
        assert!(v.allows("web"));
        assert!(!v.allows("bad"));
        assert_eq!(v.refused["lan"].reason, "in protected range 192.168.0.0/16");
        assert_eq!(v.refused.len(), 2);
        assert_eq!(v.ranges, vec![net("198.18.0.0/16")]);
        assert_eq!(v.refused_ranges.len(), 1);
        assert_eq!(v.refused_ranges[0].range, net("10.0.0.0/16"));
    }

    #[test]
    fn reads_this_hosts_addresses() {
        let etcd: (Ipv4Addr, String) = (
            "203.0.113.9".parse().unwrap(),
            "an etcd endpoint".to_string(),
        );
        let own = Addresses::read(std::slice::from_ref(&etcd)).unwrap();
        assert!(own.0.iter().all(|(_, what)| !what.is_empty()), "{own:?}");
        assert!(
            own.0.contains(&(IpAddr::V4(etcd.0), etcd.1.clone())),
            "{own:?}"
        );
    }

    #[test]
    fn default_gateways_from_the_route_table() {
        // /proc/net/route of a host with a default route via 192.0.2.1 on eth0, a link route,
        // and a second (non-default) gateway route.
        let gw = u32::from_ne_bytes([192, 0, 2, 1]);
        let other = u32::from_ne_bytes([192, 0, 2, 254]);
        let net = u32::from_ne_bytes([192, 0, 2, 0]);
        let mask = u32::from_ne_bytes([255, 255, 255, 0]);
        let table = format!(
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
             eth0\t00000000\t{gw:08X}\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
             eth0\t{net:08X}\t00000000\t0001\t0\t0\t0\t{mask:08X}\t0\t0\t0\n\
             eth1\t0A000000\t{other:08X}\t0003\t0\t0\t0\t000000FF\t0\t0\t0\n"
        );
        assert_eq!(
            default_gateways(&table),
            vec![(
                "192.0.2.1".parse().unwrap(),
                "this host's default gateway (via eth0)".to_string()
            )]
        );
        assert!(default_gateways("garbage\nx y z\n").is_empty());
    }

    #[test]
    fn resolvers_from_resolv_conf() {
        let conf =
            "# comment\nsearch example.org\nnameserver 10.255.255.53\nnameserver ::1\nnameserver\n";
        // IPv6 resolvers count too: an IPv6 VIP must not take one.
        assert_eq!(
            resolvers(conf),
            vec![
                (
                    "10.255.255.53".parse().unwrap(),
                    "a DNS resolver in /etc/resolv.conf".to_string()
                ),
                (
                    "::1".parse().unwrap(),
                    "a DNS resolver in /etc/resolv.conf".to_string()
                )
            ]
        );
        let own = Addresses::new(resolvers(conf));
        assert_eq!(
            vip_problem("10.255.255.53".parse().unwrap(), &own, &[]).as_deref(),
            Some("is 10.255.255.53, a DNS resolver in /etc/resolv.conf")
        );
        assert_eq!(
            range_problem(&net("10.0.0.0/8"), &own, &[]).as_deref(),
            Some("contains 10.255.255.53, a DNS resolver in /etc/resolv.conf")
        );
    }
}
