//! The address an instance of a container gets, and a note for people when it gets none or an
//! unusual one, so that `fluxctl query` says why a container gets no traffic.
//!
//! The rules (README, "Containers"):
//! - A container on the host's network (`--net=host`) listens on the host's own addresses: the
//!   host IP and the instance port, in either network mode.
//! - `global` mode: the container's own IP and the instance port.
//! - `local` mode: among the bindings Docker reports for `PORT/tcp`, one on every address
//!   (`0.0.0.0`) or on the host IP itself is reachable from other hosts: the host IP and its
//!   host port. A binding only on another IPv4 address (loopback, a bridge's address) is
//!   reachable from this host alone, so it is used, at that address, only while this is the
//!   only host; otherwise the instance has no address. IPv6 bindings are of no use to IPv4
//!   VIPs.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use super::container::{Binding, Container};
use crate::model::{NetworkMode, MAX_ADDRESS_NOTE};

/// What the choice depends on besides the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressContext {
    pub mode: NetworkMode,
    /// `--host-ip`: where other hosts reach this one.
    pub host_ip: Ipv4Addr,
    /// No other host shares the store: an address that only this host can reach still serves
    /// every client there is.
    pub only_host: bool,
}

/// The address chosen (None: "no address"), and the note that explains it when it needs one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Addressed {
    pub address: Option<SocketAddr>,
    pub note: Option<String>,
}

impl Addressed {
    fn at(address: impl Into<SocketAddr>) -> Self {
        Addressed {
            address: Some(address.into()),
            note: None,
        }
    }

    fn none(why: String) -> Self {
        Addressed {
            address: None,
            note: Some(bounded(why)),
        }
    }
}

/// See the module docs for the rules; for a service with an IPv4 VIP (or none).
pub fn choose(c: &Container, ctx: &AddressContext, port: u16) -> Addressed {
    choose_for(c, ctx, port, false)
}

/// As [`choose`], for a service whose VIP is IPv6 when `vip_v6`: `global` mode then takes the
/// container's global IPv6 address where it has one. Either way a container with no IPv4
/// address but a global IPv6 one is reached at that (the proxy connects across families).
pub fn choose_for(c: &Container, ctx: &AddressContext, port: u16, vip_v6: bool) -> Addressed {
    if c.host_network {
        return Addressed::at(SocketAddrV4::new(ctx.host_ip, port));
    }
    match ctx.mode {
        NetworkMode::Global => match (c.ip, c.ip6) {
            (_, Some(ip6)) if vip_v6 => Addressed::at(SocketAddr::new(ip6.into(), port)),
            (Some(ip), _) => Addressed::at(SocketAddrV4::new(ip, port)),
            (None, Some(ip6)) => Addressed::at(SocketAddr::new(ip6.into(), port)),
            (None, None) => Addressed::none("container has no IPv4 address".into()),
        },
        NetworkMode::Local => local(c.published.get(&port).map_or(&[], Vec::as_slice), ctx, port),
    }
}

/// The same choice for an instance of a `udp` service: in `local` mode, from the bindings
/// Docker reports for `PORT/udp`.
pub fn choose_udp(c: &Container, ctx: &AddressContext, port: u16, vip_v6: bool) -> Addressed {
    if c.host_network || ctx.mode == NetworkMode::Global {
        return choose_for(c, ctx, port, vip_v6);
    }
    let bindings = c.published_udp.get(&port).map_or(&[][..], Vec::as_slice);
    let mut a = local(bindings, ctx, port);
    // `local` words its notes for TCP, the common case.
    a.note = a.note.map(|n| n.replacen("/tcp", "/udp", 1));
    a
}

fn local(bindings: &[Binding], ctx: &AddressContext, port: u16) -> Addressed {
    if bindings.is_empty() {
        return Addressed::none(format!("port {port}/tcp is not published"));
    }
    let reachable = bindings.iter().find_map(|b| match b {
        Binding::Any(hp) => Some(*hp),
        Binding::On(a) if *a.ip() == ctx.host_ip => Some(a.port()),
        _ => None,
    });
    if let Some(hp) = reachable {
        return Addressed::at(SocketAddrV4::new(ctx.host_ip, hp));
    }
    let specific: Vec<SocketAddrV4> = bindings
        .iter()
        .filter_map(|b| match b {
            Binding::On(a) => Some(*a),
            _ => None,
        })
        .collect();
    if let Some(first) = specific.first() {
        let place = match specific.len() {
            1 => first.to_string(),
            n => format!("{first} (and {} more)", n - 1),
        };
        if ctx.only_host {
            return Addressed {
                address: Some(SocketAddr::V4(*first)),
                note: Some(bounded(format!(
                    "port {port}/tcp is published only on {place}; used because this is the only host"
                ))),
            };
        }
        return Addressed::none(format!(
            "port {port}/tcp is published only on {place}, which other hosts cannot reach"
        ));
    }
    if bindings.iter().any(|b| matches!(b, Binding::Ipv6)) {
        return Addressed::none(format!(
            "port {port}/tcp is published only on IPv6 addresses, which flux does not route to"
        ));
    }
    let why = bindings
        .iter()
        .find_map(|b| match b {
            Binding::Malformed(why) => Some(why.as_str()),
            _ => None,
        })
        .unwrap_or("none understood");
    Addressed::none(format!("port {port}/tcp has no usable binding: {why}"))
}

/// Notes are built from short parts (Docker's text is cut by `container::shown`); this keeps
/// the record valid whatever they add up to.
fn bounded(mut note: String) -> String {
    if note.len() > MAX_ADDRESS_NOTE {
        let mut end = MAX_ADDRESS_NOTE - 3;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push_str("...");
    }
    note
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::ContainerInspectResponse;
    use serde_json::json;

    const HOST_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

    /// A running container as `docker inspect` shows it, with these host config and port map.
    fn inspect(network_mode: &str, ports: serde_json::Value) -> Container {
        let v = json!({
            "Id": "0123456789abcdef0123456789abcdef",
            "Name": "/web",
            "Config": { "Image": "webimg:latest" },
            "State": { "Running": true },
            "HostConfig": { "NetworkMode": network_mode },
            "NetworkSettings": {
                "Ports": ports,
                "Networks": if network_mode == "bridge" {
                    json!({ "bridge": { "IPAddress": "172.17.0.2" } })
                } else {
                    json!({ network_mode: { "IPAddress": "" } })
                },
            },
        });
        let r: ContainerInspectResponse = serde_json::from_value(v).unwrap();
        Container::from_inspect(&r, None).unwrap()
    }

    fn ctx(mode: NetworkMode, only_host: bool) -> AddressContext {
        AddressContext {
            mode,
            host_ip: HOST_IP,
            only_host,
        }
    }

    fn local(c: &Container, only_host: bool) -> Addressed {
        choose(c, &ctx(NetworkMode::Local, only_host), 80)
    }

    fn addr(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn host_network_is_the_host_ip_and_instance_port_in_both_modes() {
        let c = inspect("host", json!({}));
        for mode in [NetworkMode::Local, NetworkMode::Global] {
            for only in [true, false] {
                let a = choose(&c, &ctx(mode, only), 8080);
                assert_eq!(
                    a,
                    Addressed::at("192.0.2.10:8080".parse::<SocketAddr>().unwrap())
                );
            }
        }
    }

    #[test]
    fn global_mode_is_the_container_ip_or_says_there_is_none() {
        let c = inspect("bridge", json!({}));
        let a = choose(&c, &ctx(NetworkMode::Global, false), 80);
        assert_eq!(a.address, addr("172.17.0.2:80"));
        assert_eq!(a.note, None);
        let c = inspect("none", json!({}));
        let a = choose(&c, &ctx(NetworkMode::Global, true), 80);
        assert_eq!(a.address, None);
        assert_eq!(a.note.as_deref(), Some("container has no IPv4 address"));
        // An address no record may hold (found by fuzzing: a multicast one) is skipped.
        let r: ContainerInspectResponse = serde_json::from_value(json!({
            "Id": "0123456789abcdef",
            "State": { "Running": true },
            "NetworkSettings": { "Networks": { "bridge": { "IPAddress": "238.17.0.2" } } },
        }))
        .unwrap();
        let c = Container::from_inspect(&r, None).unwrap();
        assert_eq!(c.skipped.len(), 1, "{:?}", c.skipped);
        let a = choose(&c, &ctx(NetworkMode::Global, false), 80);
        assert_eq!(a.address, None);
        assert_eq!(a.note.as_deref(), Some("container has no IPv4 address"));
    }

    #[test]
    fn unpublished_port() {
        for ports in [
            json!({}),
            json!({ "80/tcp": null }),
            json!({ "80/tcp": [] }),
            json!({ "80/udp": [{ "HostIp": "0.0.0.0", "HostPort": "5000" }] }),
            json!({ "81/tcp": [{ "HostIp": "0.0.0.0", "HostPort": "5000" }] }),
        ] {
            let a = local(&inspect("bridge", ports.clone()), true);
            assert_eq!(a.address, None, "{ports}");
            assert_eq!(a.note.as_deref(), Some("port 80/tcp is not published"));
        }
    }

    #[test]
    fn every_address_or_the_host_ip_is_reachable_and_preferred() {
        for (ports, want) in [
            (
                json!([{ "HostIp": "0.0.0.0", "HostPort": "49153" }]),
                "192.0.2.10:49153",
            ),
            (
                json!([{ "HostIp": "", "HostPort": "49153" }]),
                "192.0.2.10:49153",
            ),
            (json!([{ "HostPort": "49153" }]), "192.0.2.10:49153"),
            (
                json!([{ "HostIp": "192.0.2.10", "HostPort": "49154" }]),
                "192.0.2.10:49154",
            ),
            // Loopback first, as `-p 127.0.0.1:HP1:80 -p HP2:80` lists them: HP2 wins.
            (
                json!([
                    { "HostIp": "127.0.0.1", "HostPort": "5001" },
                    { "HostIp": "0.0.0.0", "HostPort": "5002" },
                ]),
                "192.0.2.10:5002",
            ),
            (
                json!([
                    { "HostIp": "198.19.1.1", "HostPort": "5001" },
                    { "HostIp": "192.0.2.10", "HostPort": "5003" },
                ]),
                "192.0.2.10:5003",
            ),
            // IPv6 and malformed bindings are passed over.
            (
                json!([
                    { "HostIp": "::", "HostPort": "5004" },
                    { "HostIp": "0.0.0.0", "HostPort": "x" },
                    { "HostIp": "0.0.0.0", "HostPort": "5005" },
                ]),
                "192.0.2.10:5005",
            ),
        ] {
            for only in [true, false] {
                let a = local(&inspect("bridge", json!({ "80/tcp": ports.clone() })), only);
                assert_eq!(
                    a,
                    Addressed::at(want.parse::<SocketAddr>().unwrap()),
                    "{ports}"
                );
            }
        }
    }

    #[test]
    fn a_binding_other_hosts_cannot_reach_serves_only_a_lone_host() {
        let c = inspect(
            "bridge",
            json!({ "80/tcp": [{ "HostIp": "127.0.0.1", "HostPort": "49153" }] }),
        );
        let a = local(&c, true);
        assert_eq!(a.address, addr("127.0.0.1:49153"));
        assert_eq!(
            a.note.as_deref(),
            Some("port 80/tcp is published only on 127.0.0.1:49153; used because this is the only host")
        );
        let a = local(&c, false);
        assert_eq!(a.address, None);
        assert_eq!(
            a.note.as_deref(),
            Some(
                "port 80/tcp is published only on 127.0.0.1:49153, which other hosts cannot reach"
            )
        );
        // Any other specific address counts the same, and the first one is used.
        let c = inspect(
            "bridge",
            json!({ "80/tcp": [
                { "HostIp": "198.19.1.1", "HostPort": "5001" },
                { "HostIp": "127.0.0.2", "HostPort": "5002" },
            ] }),
        );
        let a = local(&c, true);
        assert_eq!(a.address, addr("198.19.1.1:5001"));
        let a = local(&c, false);
        assert_eq!(a.address, None);
        assert_eq!(
            a.note.as_deref(),
            Some("port 80/tcp is published only on 198.19.1.1:5001 (and 1 more), which other hosts cannot reach")
        );
    }

    #[test]
    fn ipv6_only_and_malformed_bindings_are_no_address_with_the_reason() {
        let a = local(
            &inspect(
                "bridge",
                json!({ "80/tcp": [{ "HostIp": "::", "HostPort": "49153" }] }),
            ),
            true,
        );
        assert_eq!(a.address, None);
        assert_eq!(
            a.note.as_deref(),
            Some("port 80/tcp is published only on IPv6 addresses, which flux does not route to")
        );
        for (binding, why) in [
            (
                json!({ "HostIp": "0.0.0.0", "HostPort": "" }),
                "host port \"\" is not a port",
            ),
            (
                json!({ "HostIp": "0.0.0.0" }),
                "host port \"\" is not a port",
            ),
            (
                json!({ "HostIp": "0.0.0.0", "HostPort": "0" }),
                "host port \"0\" is not a port",
            ),
            (
                json!({ "HostIp": "0.0.0.0", "HostPort": "70000" }),
                "host port \"70000\" is not a port",
            ),
            (
                json!({ "HostIp": "nonsense\u{7}", "HostPort": "1" }),
                "host IP \"nonsense\\u{7}\" is not usable",
            ),
            (
                json!({ "HostIp": "224.0.0.1", "HostPort": "1" }),
                "host IP \"224.0.0.1\" is not usable",
            ),
        ] {
            let c = inspect("bridge", json!({ "80/tcp": [binding.clone()] }));
            assert_eq!(c.skipped.len(), 1, "{binding}: {:?}", c.skipped);
            let a = local(&c, true);
            assert_eq!(a.address, None, "{binding}");
            assert_eq!(
                a.note,
                Some(format!("port 80/tcp has no usable binding: {why}")),
                "{binding}"
            );
        }
    }

    #[test]
    fn odd_port_keys_are_skipped_with_a_reason() {
        let c = inspect(
            "bridge",
            json!({
                "80": [{ "HostPort": "1" }],
                "x/tcp": [{ "HostPort": "2" }],
                "0/tcp": [{ "HostPort": "3" }],
                "80/tcp": [{ "HostPort": "4" }],
            }),
        );
        assert_eq!(c.skipped.len(), 3, "{:?}", c.skipped);
        assert_eq!(local(&c, false).address, addr("192.0.2.10:4"));
    }

    #[test]
    fn notes_stay_within_the_record_limit() {
        let long = format!("{}é", "x".repeat(MAX_ADDRESS_NOTE));
        let b = bounded(long);
        assert!(b.len() <= MAX_ADDRESS_NOTE && b.ends_with("..."), "{b}");
        let many: Vec<serde_json::Value> = (1..=200)
            .map(|i| json!({ "HostIp": format!("10.0.{}.{}", i / 250, i % 250 + 1), "HostPort": "9" }))
            .collect();
        let a = local(&inspect("bridge", json!({ "80/tcp": many })), false);
        assert!(a.note.unwrap().len() <= MAX_ADDRESS_NOTE);
    }

    /// A bridge container with these IPv4 and global IPv6 addresses ("" for none).
    fn dual(ip: &str, ip6: &str) -> Container {
        let v = json!({
            "Id": "0123456789abcdef0123456789abcdef",
            "Name": "/web",
            "Config": { "Image": "webimg:latest" },
            "State": { "Running": true },
            "HostConfig": { "NetworkMode": "bridge" },
            "NetworkSettings": {
                "Networks": { "bridge": { "IPAddress": ip, "GlobalIPv6Address": ip6 } },
            },
        });
        let r: ContainerInspectResponse = serde_json::from_value(v).unwrap();
        Container::from_inspect(&r, None).unwrap()
    }

    #[test]
    fn global_mode_uses_the_global_ipv6_address_for_ipv6_vips_or_ipv4_less_containers() {
        let g = ctx(NetworkMode::Global, false);
        let c = dual("172.17.0.2", "fd00:17::2");
        assert_eq!(choose(&c, &g, 80).address, addr("172.17.0.2:80"));
        assert_eq!(
            choose_for(&c, &g, 80, true).address,
            addr("[fd00:17::2]:80")
        );
        let only6 = dual("", "fd00:17::3");
        assert_eq!(choose(&only6, &g, 80).address, addr("[fd00:17::3]:80"));
        // An IPv6 VIP with a container that has no IPv6 address: its IPv4 one.
        let only4 = dual("172.17.0.4", "");
        assert_eq!(
            choose_for(&only4, &g, 80, true).address,
            addr("172.17.0.4:80")
        );
        // Link-local or mapped addresses are none.
        for bad in ["fe80::1", "::ffff:172.17.0.5", "ff02::1", "zz"] {
            let c = dual("", bad);
            assert_eq!(choose_for(&c, &g, 80, true).address, None, "{bad}");
        }
        // Local mode is unchanged: the host's IP and the published port.
        let l = choose_for(&c, &ctx(NetworkMode::Local, false), 80, true);
        assert_eq!(l.address, None);
    }

    #[test]
    fn udp_services_use_the_udp_bindings_in_local_mode() {
        let c = inspect(
            "bridge",
            json!({
                "53/tcp": [{ "HostIp": "0.0.0.0", "HostPort": "5300" }],
                "53/udp": [{ "HostIp": "0.0.0.0", "HostPort": "5301" }],
            }),
        );
        let local = ctx(NetworkMode::Local, false);
        assert_eq!(choose(&c, &local, 53).address, addr("192.0.2.10:5300"));
        assert_eq!(
            choose_udp(&c, &local, 53, false).address,
            addr("192.0.2.10:5301")
        );
        let global = ctx(NetworkMode::Global, false);
        assert_eq!(
            choose_udp(&c, &global, 53, false).address,
            addr("172.17.0.2:53")
        );
        let tcp_only = inspect(
            "bridge",
            json!({ "53/tcp": [{ "HostIp": "0.0.0.0", "HostPort": "5300" }] }),
        );
        let a = choose_udp(&tcp_only, &local, 53, false);
        assert_eq!(a.address, None);
        assert_eq!(a.note.as_deref(), Some("port 53/udp is not published"));
    }
}
