//! What a `udp` service may not have: every setting that only means something for a stream of
//! bytes over TCP. A udp service is relayed per flow by fluxd (`proxy::udp`), so it needs a
//! VIP, and health is passive (an ICMP port unreachable fails an instance).

use super::{Forwarding, InvalidInput, Service};

/// The first setting of `service` (a `udp` one) that makes no sense for datagrams, as a one-line
/// error naming its field.
pub(super) fn validate(service: &Service) -> Result<(), InvalidInput> {
    if service.address.is_none() {
        return Err(InvalidInput::new(
            "address",
            "udp services need a VIP: fluxd edge publishes tcp and http services only",
        )
        .value("none"));
    }
    if let Some(a) = service.address.filter(|a| a.is_ipv6()) {
        // The relay's sockets and the nat path's udp rules are IPv4 only so far.
        return Err(InvalidInput::new(
            "address",
            "udp services take an IPv4 VIP for now (IPv6 VIPs are for tcp and http services)",
        )
        .value(a.to_string()));
    }
    if service.forward == Forwarding::Kernel {
        return Err(InvalidInput::new(
            "forward",
            "kernel forwarding is for tcp services: udp services are relayed per flow by fluxd",
        )
        .value("kernel"));
    }
    if let Some(pp) = service.proxy_protocol {
        return Err(InvalidInput::new(
            "proxy_protocol",
            "is for tcp services: a datagram has no stream to prefix a header to",
        )
        .value(pp.to_string()));
    }
    if let Some(h) = &service.health {
        return Err(InvalidInput::new(
            "health",
            "active checks connect over tcp; udp services rely on passive health (ICMP port unreachable)",
        )
        .value(format!("{:?}", h.kind).to_lowercase()));
    }
    if !service.timeouts.is_empty() {
        return Err(InvalidInput::new(
            "timeouts",
            "connect, http response and half-close limits are for tcp and http services; udp flows expire after fluxd's --udp-idle-ms",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::model::{decode, encode, HealthCheck, Protocol, ProxyProtocol, Service, Validate};

    const UDP: &str =
        r#"{"name":"dns","address":"198.18.0.53:53","protocol":"udp","balance":"round-robin"}"#;

    #[test]
    fn udp_records_round_trip_and_old_ones_are_unchanged() {
        let s: Service = decode(UDP.as_bytes()).unwrap();
        assert_eq!(s.protocol, Protocol::Udp);
        assert_eq!(String::from_utf8(encode(&s)).unwrap(), UDP);
        let v6 = UDP.replace("198.18.0.53:53", "[fd00::53]:53");
        let err = decode::<Service>(v6.as_bytes())
            .map_err(|e| e.to_string())
            .and_then(|s| s.validate().map_err(|e| e.to_string()))
            .unwrap_err();
        assert!(err.contains("address") && err.contains("IPv4"), "{err}");
        let old = UDP.replace("udp", "tcp");
        let t: Service = decode(old.as_bytes()).unwrap();
        assert_eq!(String::from_utf8(encode(&t)).unwrap(), old);
        assert_eq!("udp".parse::<Protocol>().unwrap(), Protocol::Udp);
        assert!("sctp"
            .parse::<Protocol>()
            .unwrap_err()
            .to_string()
            .contains("tcp, http or udp"));
    }

    #[test]
    fn settings_for_streams_are_refused_naming_the_field() {
        let base: Service = decode(UDP.as_bytes()).unwrap();
        let cases = [
            (
                Service {
                    address: None,
                    instance_port: Some(53),
                    ..base.clone()
                },
                "address",
            ),
            (
                Service {
                    forward: crate::model::Forwarding::Kernel,
                    ..base.clone()
                },
                "forward",
            ),
            (
                Service {
                    proxy_protocol: Some(ProxyProtocol::V1),
                    ..base.clone()
                },
                "proxy_protocol",
            ),
            (
                Service {
                    health: Some(HealthCheck::tcp()),
                    ..base.clone()
                },
                "health",
            ),
            (
                Service {
                    timeouts: crate::model::ServiceTimeouts {
                        connect_ms: Some(100),
                        ..Default::default()
                    },
                    ..base.clone()
                },
                "timeouts",
            ),
        ];
        for (s, field) in cases {
            let e = s.validate().unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(!e.to_string().contains('\n'));
        }
    }
}
