//! What flux needs to know of one container, taken from `docker inspect`. Labels, env and port
//! bindings come from outside (whoever ran the container, and Docker), so they are carried as
//! given, odd ones included, and only judged where they are used (`address` chooses among the
//! bindings).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4};

use bollard::models::{ContainerInspectResponse, HealthStatusEnum, PortBinding, PortMap};

use super::image::ImageRef;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    /// Full container id.
    pub id: String,
    /// Name without Docker's leading '/'.
    pub name: String,
    pub image: ImageRef,
    pub labels: BTreeMap<String, String>,
    pub env: BTreeMap<String, String>,
    /// Running, not paused, and not unhealthy or still starting by its own healthcheck.
    pub serving: bool,
    /// `HostConfig.NetworkMode` is `host`: the container listens on the host's own addresses,
    /// and Docker publishes nothing for it.
    pub host_network: bool,
    /// What Docker published for each `PORT/tcp`, in Docker's order. A port with no entry
    /// (or an empty one) is not published.
    pub published: BTreeMap<u16, Vec<Binding>>,
    /// The container's IPv4 address on its first network that has a usable one.
    pub ip: Option<Ipv4Addr>,
    /// What was left out of the above because Docker reported it in a shape flux cannot use,
    /// for the agent's log.
    pub skipped: Vec<String>,
    /// The container's global IPv6 address (Docker's `GlobalIPv6Address`) on its first
    /// network that has a usable one; `global` mode uses it for IPv6 VIPs (see `address`).
    pub ip6: Option<Ipv6Addr>,
    /// What Docker published for each `PORT/udp`, for `udp` services, as `published` is for
    /// `PORT/tcp`.
    pub published_udp: BTreeMap<u16, Vec<Binding>>,
}

/// One host binding of a container port, as Docker reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binding {
    /// On every address of the host (`0.0.0.0`, or no address given).
    Any(u16),
    /// On one IPv4 address of the host only (`-p 127.0.0.1::80`).
    On(SocketAddrV4),
    /// On an IPv6 address: of no use to IPv4 VIPs.
    Ipv6,
    /// Not understood (no port, port 0, an address that is no address); why, for the note.
    Malformed(String),
}

impl Binding {
    fn parse(b: &PortBinding) -> Binding {
        let ip_text = b.host_ip.as_deref().unwrap_or("");
        let ip = match ip_text {
            "" | "0.0.0.0" => None,
            t if t.contains(':') => return Binding::Ipv6,
            t => match t.parse::<Ipv4Addr>() {
                Ok(ip) if usable_host_ip(ip) => Some(ip),
                _ => return Binding::Malformed(format!("host IP {} is not usable", shown(t))),
            },
        };
        let port_text = b.host_port.as_deref().unwrap_or("");
        let port = match port_text.parse::<u16>() {
            Ok(p) if p != 0 => p,
            _ => {
                return Binding::Malformed(format!("host port {} is not a port", shown(port_text)))
            }
        };
        match ip {
            None => Binding::Any(port),
            Some(ip) => Binding::On(SocketAddrV4::new(ip, port)),
        }
    }
}

/// An address an instance may be published with (see `validate::backend`): a binding (or a
/// container IP) on any other address is malformed, not a reason to write a record every reader
/// refuses.
fn usable_host_ip(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast())
}

/// Text from Docker quoted (control characters escaped) and cut short, for notes and logs.
fn shown(s: &str) -> String {
    const MAX: usize = 40;
    let cut: String = s.chars().take(MAX).collect();
    let more = if s.chars().count() > MAX { "..." } else { "" };
    format!("{cut:?}{more}")
}

/// `PORT/tcp` entries of Docker's port map. Other protocols are not flux's business; a key that
/// is not `PORT/PROTO` is skipped with a reason.
fn published_tcp(ports: &PortMap, skipped: &mut Vec<String>) -> BTreeMap<u16, Vec<Binding>> {
    published_of(ports, "tcp", skipped)
}

/// `PORT/proto` entries of Docker's port map, as [`published_tcp`] reads `PORT/tcp`.
fn published_of(
    ports: &PortMap,
    wanted: &str,
    skipped: &mut Vec<String>,
) -> BTreeMap<u16, Vec<Binding>> {
    let mut out = BTreeMap::new();
    for (spec, bindings) in ports {
        let Some((port, proto)) = spec.split_once('/') else {
            skipped.push(format!("port {} has no protocol", shown(spec)));
            continue;
        };
        if proto != wanted {
            continue;
        }
        let port = match port.parse::<u16>() {
            Ok(p) if p != 0 => p,
            _ => {
                skipped.push(format!("port {} is not a port", shown(spec)));
                continue;
            }
        };
        let bindings: Vec<Binding> = bindings
            .iter()
            .flatten()
            .map(|b| {
                let parsed = Binding::parse(b);
                if let Binding::Malformed(why) = &parsed {
                    skipped.push(format!("binding of {port}/{wanted}: {why}"));
                }
                parsed
            })
            .collect();
        out.insert(port, bindings);
    }
    out
}

impl Container {
    /// `resolved_image` replaces the config's image when that is an id (see `image::is_image_id`).
    pub fn from_inspect(
        c: &ContainerInspectResponse,
        resolved_image: Option<&str>,
    ) -> Option<Container> {
        let id = c.id.clone()?;
        let config = c.config.as_ref();
        let image = resolved_image
            .map(str::to_string)
            .or_else(|| config.and_then(|c| c.image.clone()))
            .unwrap_or_default();
        let labels = config
            .and_then(|c| c.labels.clone())
            .unwrap_or_default()
            .into_iter()
            .collect();
        let env = config
            .and_then(|c| c.env.clone())
            .unwrap_or_default()
            .iter()
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        let state = c.state.as_ref();
        let running = state.and_then(|s| s.running).unwrap_or(false);
        let paused = state.and_then(|s| s.paused).unwrap_or(false);
        let health = state.and_then(|s| s.health.as_ref()).and_then(|h| h.status);
        let healthy = !matches!(
            health,
            Some(HealthStatusEnum::UNHEALTHY | HealthStatusEnum::STARTING)
        );
        let net = c.network_settings.as_ref();
        let mut skipped = Vec::new();
        let published = net
            .and_then(|n| n.ports.as_ref())
            .map(|ports| published_tcp(ports, &mut skipped))
            .unwrap_or_default();
        // Keys without a protocol were reported once, above.
        let published_udp = net
            .and_then(|n| n.ports.as_ref())
            .map(|ports| published_of(ports, "udp", &mut Vec::new()))
            .unwrap_or_default();
        let host_network = c
            .host_config
            .as_ref()
            .and_then(|h| h.network_mode.as_deref())
            == Some("host");
        let mut networks: Vec<_> = net
            .and_then(|n| n.networks.as_ref())
            .map(|n| n.iter().collect())
            .unwrap_or_default();
        networks.sort_by_key(|(name, _)| name.as_str());
        let ip = networks.iter().find_map(|(name, e)| {
            let ip = e.ip_address.as_ref()?.parse::<Ipv4Addr>().ok()?;
            if usable_host_ip(ip) {
                return Some(ip);
            }
            skipped.push(format!(
                "address {ip} on network {} is not usable",
                shown(name)
            ));
            None
        });
        // Link-local, mapped and multicast ones are no backend address (`validate::backend`).
        let ip6 = networks.iter().find_map(|(_, e)| {
            let ip = e.global_ipv6_address.as_ref()?.parse::<Ipv6Addr>().ok()?;
            let usable = !(ip.is_unspecified()
                || ip.is_multicast()
                || ip.to_ipv4_mapped().is_some()
                || (ip.segments()[0] & 0xffc0) == 0xfe80);
            usable.then_some(ip)
        });
        Some(Container {
            name: c
                .name
                .clone()
                .unwrap_or_default()
                .trim_start_matches('/')
                .to_string(),
            image: ImageRef::parse(&image),
            labels,
            env,
            serving: running && !paused && healthy,
            host_network,
            published,
            ip,
            skipped,
            ip6,
            published_udp,
            id,
        })
    }

    /// Docker's 12-character short id: unique enough across hosts, and valid as an instance name.
    pub fn short_id(&self) -> String {
        self.id.chars().take(12).collect()
    }
}
