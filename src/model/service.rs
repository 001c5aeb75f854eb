//! A service: a VIP that belongs to no interface, and how to reach its instances.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::traffic::{Affinity, Locality};
use super::{
    validate, HealthCheck, InstanceProtocol, InvalidInput, ProxyProtocol, ServiceTimeouts, Validate,
};

/// What flux understands of the bytes a service carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Opaque bytes, forwarded with splice(2).
    #[default]
    Tcp,
    /// HTTP/1.1, balanced per request with per-request metrics.
    Http,
    /// Datagrams, balanced per flow (client address) by fluxd's UDP relay (`proxy::udp`).
    Udp,
}

/// How the proxy picks an instance for a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// Each live instance in turn: even spread, no shared state beyond a counter.
    #[default]
    RoundRobin,
    /// Uniformly random live instance.
    Random,
    /// Two random live instances, the one with fewer active connections wins.
    LeastConn,
}

/// Who carries a `tcp` service's connections from the VIP to an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    /// fluxd's proxy: connect retry across instances, per-connection metrics, the service's
    /// balance policy.
    #[default]
    Proxy,
    /// The kernel: iptables DNAT from the VIP straight to a live instance, chosen at random,
    /// for bulk-heavy services that can do without connect retry and per-connection metrics.
    Kernel,
}

impl Forwarding {
    /// The default, left out of the record so that records that do not set it encode exactly
    /// as they did before the field existed.
    pub fn is_proxy(&self) -> bool {
        *self == Forwarding::Proxy
    }
}

impl std::fmt::Display for Forwarding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Forwarding::Proxy => "proxy",
            Forwarding::Kernel => "kernel",
        })
    }
}

impl std::str::FromStr for Forwarding {
    type Err = InvalidInput;
    fn from_str(s: &str) -> Result<Self, InvalidInput> {
        match s {
            "proxy" => Ok(Forwarding::Proxy),
            "kernel" => Ok(Forwarding::Kernel),
            _ => Err(InvalidInput::new("forward", "must be proxy or kernel").value(s)),
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Http => "http",
            Protocol::Udp => "udp",
        })
    }
}

impl std::fmt::Display for Balance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Balance::RoundRobin => "round-robin",
            Balance::Random => "random",
            Balance::LeastConn => "least-conn",
        })
    }
}

impl std::str::FromStr for Protocol {
    type Err = InvalidInput;
    fn from_str(s: &str) -> Result<Self, InvalidInput> {
        match s {
            "tcp" => Ok(Protocol::Tcp),
            "http" => Ok(Protocol::Http),
            "udp" => Ok(Protocol::Udp),
            _ => Err(InvalidInput::new("protocol", "must be tcp, http or udp").value(s)),
        }
    }
}

impl std::str::FromStr for Balance {
    type Err = InvalidInput;
    fn from_str(s: &str) -> Result<Self, InvalidInput> {
        match s {
            "round-robin" => Ok(Balance::RoundRobin),
            "random" => Ok(Balance::Random),
            "least-conn" => Ok(Balance::LeastConn),
            _ => Err(
                InvalidInput::new("balance", "must be round-robin, random or least-conn").value(s),
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// Unique name, `[a-z0-9][a-z0-9-]{0,62}`.
    pub name: String,
    /// The VIP clients connect to; the same on every host. None (`"none"`) for a service that
    /// only `fluxd edge` publishes: no VIP, no rule, no claim.
    #[serde(with = "super::addr::vip")]
    pub address: Option<SocketAddr>,
    #[serde(default)]
    pub protocol: Protocol,
    /// Container port to connect to; the VIP's port when absent. A rule may override it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_port: Option<u16>,
    #[serde(default)]
    pub balance: Balance,
    /// Active health check every fluxd routing the service runs against each instance; absent
    /// (and not written) when the service relies on passive health alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCheck>,
    /// Who forwards its connections: the proxy (default, absent from the record) or the
    /// kernel (`tcp` services with a VIP only).
    #[serde(default, skip_serializing_if = "Forwarding::is_proxy")]
    pub forward: Forwarding,
    /// Which hosts' instances a host prefers (see `model::traffic`); absent means any.
    #[serde(default, skip_serializing_if = "Locality::is_any")]
    pub locality: Locality,
    /// Whether a client keeps reaching one instance; absent means none.
    #[serde(default, skip_serializing_if = "Affinity::is_none")]
    pub affinity: Affinity,
    /// Overrides of fluxd's daemon-wide time limits for this service; absent (and not
    /// written) when it uses the daemon's.
    #[serde(default, skip_serializing_if = "ServiceTimeouts::is_empty")]
    pub timeouts: ServiceTimeouts,
    /// `tcp` services: the PROXY protocol header the proxy writes to an instance before the
    /// client's first byte, so it sees the client's address; absent (off) by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<ProxyProtocol>,
    /// `http` services: the HTTP version spoken to instances (`http1` or `h2`); absent means
    /// auto, the version each client spoke.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_protocol: Option<InstanceProtocol>,
}

impl Service {
    /// The port instances listen on, before any rule's override: the service's own, else the
    /// VIP's (a service without a VIP must have one of its own, see `validate`).
    pub fn default_instance_port(&self) -> u16 {
        self.instance_port
            .or(self.address.map(|a| a.port()))
            .unwrap_or_default()
    }

    /// The address as users write it: `IP:PORT` or `none`.
    pub fn address_text(&self) -> String {
        match self.address {
            Some(a) => a.to_string(),
            None => super::addr::vip::NONE.to_string(),
        }
    }
}

impl Validate for Service {
    fn validate(&self) -> Result<(), InvalidInput> {
        validate::name("name", &self.name)?;
        match &self.address {
            Some(a) => validate::vip("address", a)?,
            None if self.instance_port.is_none() => {
                return Err(InvalidInput::new(
                    "instance_port",
                    "required when address is none (there is no VIP port to default to)",
                ))
            }
            None => {}
        }
        if let Some(p) = self.instance_port {
            validate::port("instance_port", p)?;
        }
        if let Some(h) = &self.health {
            h.validate()?;
        }
        if self.forward == Forwarding::Kernel {
            let why = if self.protocol == Protocol::Http {
                Some("kernel forwarding is for tcp services: http services are balanced per request by the proxy")
            } else if self.address.is_none() {
                Some("kernel forwarding needs a VIP to forward from; this service has address none")
            } else if self.address.is_some_and(|a| a.is_ipv6()) {
                Some("kernel forwarding is for IPv4 VIPs; an IPv6 VIP is carried by the proxy")
            } else if self.balance == Balance::LeastConn {
                Some("kernel forwarding spreads connections at random; least-conn needs the proxy")
            } else if !self.locality.is_any() {
                Some("kernel forwarding spreads connections over every instance; locality needs the proxy")
            } else if !self.affinity.is_none() {
                Some("kernel forwarding picks at random per connection; affinity needs the proxy")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(InvalidInput::new("forward", why).value("kernel"));
            }
        }
        self.timeouts.validate()?;
        if self.protocol == Protocol::Udp {
            super::udp::validate(self)?;
        }
        if let Some(pp) = self.proxy_protocol {
            let why = if self.protocol == Protocol::Http {
                Some("is for tcp services: an http service's instances get X-Forwarded-For")
            } else if self.forward == Forwarding::Kernel {
                Some("needs the proxy: kernel forwarding writes no header")
            } else if self.address.is_none() {
                Some("needs a VIP: a service with address none is carried by fluxd edge's nginx alone")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(InvalidInput::new("proxy_protocol", why).value(pp.to_string()));
            }
        }
        if let Some(ip) = self.instance_protocol {
            if self.protocol != Protocol::Http {
                return Err(InvalidInput::new(
                    "instance_protocol",
                    "is for http services: a tcp service's bytes go through unread",
                )
                .value(ip.to_string()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod traffic_tests {
    use super::*;
    use crate::model::{decode, encode};

    const OLD: &str =
        r#"{"name":"web","address":"198.18.0.10:80","protocol":"tcp","balance":"round-robin"}"#;

    #[test]
    fn records_without_traffic_fields_load_and_encode_as_before() {
        let s: Service = decode(OLD.as_bytes()).unwrap();
        assert_eq!((s.locality, s.affinity), (Locality::Any, Affinity::None));
        assert_eq!(String::from_utf8(encode(&s)).unwrap(), OLD);
    }

    #[test]
    fn traffic_fields_round_trip_and_are_checked() {
        let json = OLD.replace(
            r#""round-robin"}"#,
            r#""round-robin","locality":"prefer-host","affinity":"client-ip"}"#,
        );
        let s: Service = decode(json.as_bytes()).unwrap();
        assert_eq!(
            (s.locality, s.affinity),
            (Locality::PreferHost, Affinity::ClientIp)
        );
        assert_eq!(String::from_utf8(encode(&s)).unwrap(), json);
        let bad = OLD.replace(r#""round-robin"}"#, r#""round-robin","locality":"near"}"#);
        assert_eq!(
            decode::<Service>(bad.as_bytes()).unwrap_err().field,
            "locality"
        );
    }

    #[test]
    fn kernel_forwarding_refuses_locality_and_affinity() {
        let base: Service = decode(OLD.as_bytes()).unwrap();
        let kernel = Service {
            forward: Forwarding::Kernel,
            ..base
        };
        assert!(kernel.validate().is_ok());
        for s in [
            Service {
                locality: Locality::HostOnly,
                ..kernel.clone()
            },
            Service {
                affinity: Affinity::ClientIp,
                ..kernel.clone()
            },
        ] {
            let e = s.validate().unwrap_err();
            assert_eq!(e.field, "forward", "{e}");
        }
    }
}
