//! What flux needs to know of one container, taken from `docker inspect`, and the address an
//! instance of it gets. Labels and env come from outside (whoever ran the container), so they
//! are carried as given and only checked where they are used.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddrV4};

use bollard::models::{ContainerInspectResponse, HealthStatusEnum};

use super::image::ImageRef;
use crate::model::NetworkMode;

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
    /// Host ports Docker published, by `PORT/tcp`.
    pub published: HashMap<u16, u16>,
    /// The container's IPv4 address on its first network that has one.
    pub ip: Option<Ipv4Addr>,
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
        let published = net
            .and_then(|n| n.ports.as_ref())
            .map(|ports| {
                ports
                    .iter()
                    .filter_map(|(spec, bindings)| {
                        let port: u16 = spec.strip_suffix("/tcp")?.parse().ok()?;
                        let host_port = bindings
                            .as_ref()?
                            .iter()
                            .filter(|b| {
                                // IPv6-only bindings are of no use to IPv4 VIPs.
                                b.host_ip.as_deref().is_none_or(|ip| !ip.contains(':'))
                            })
                            .find_map(|b| b.host_port.as_ref()?.parse::<u16>().ok())?;
                        Some((port, host_port))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut networks: Vec<_> = net
            .and_then(|n| n.networks.as_ref())
            .map(|n| n.iter().collect())
            .unwrap_or_default();
        networks.sort_by_key(|(name, _)| name.as_str());
        let ip = networks
            .iter()
            .find_map(|(_, e)| e.ip_address.as_ref()?.parse::<Ipv4Addr>().ok());
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
            published,
            ip,
            id,
        })
    }

    /// Docker's 12-character short id: unique enough across hosts, and valid as an instance name.
    pub fn short_id(&self) -> String {
        self.id.chars().take(12).collect()
    }

    /// Where to connect for `port`, or None ("no address"): in `local` mode the host's IP and
    /// the port Docker published for it, in `global` mode the container's own IP.
    pub fn address(&self, mode: NetworkMode, host_ip: Ipv4Addr, port: u16) -> Option<SocketAddrV4> {
        match mode {
            NetworkMode::Local => self
                .published
                .get(&port)
                .map(|hp| SocketAddrV4::new(host_ip, *hp)),
            NetworkMode::Global => self.ip.map(|ip| SocketAddrV4::new(ip, port)),
        }
    }
}
