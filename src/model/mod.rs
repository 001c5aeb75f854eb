//! The model: services, rules, instances and hosts, with the one set of checks that every
//! input path (CLI, API, store, Docker) goes through.

mod addr;
#[cfg(test)]
mod addr_tests;
mod error;
pub mod health_check;
mod host;
mod instance;
mod instance_protocol;
mod proxy_protocol;
mod rule;
mod service;
mod service_edit;
pub mod timeouts;
pub mod traffic;
mod udp;
pub mod validate;

pub use error::InvalidInput;
pub use health_check::{CheckKind, HealthCheck};
pub use host::{Host, NetworkMode};
pub use instance::{ContainerInfo, Instance, Origin, MAX_ADDRESS_NOTE};
pub use instance_protocol::InstanceProtocol;
pub use proxy_protocol::ProxyProtocol;
pub use rule::{Rule, Selector};
pub use service::{Balance, Forwarding, Protocol, Service};
pub use service_edit::ServiceEdit;
pub use timeouts::ServiceTimeouts;
pub use traffic::{Affinity, Drain, Locality};

/// A value that can check its own invariants after deserialising.
pub trait Validate {
    fn validate(&self) -> Result<(), InvalidInput>;
}

/// Largest JSON document flux accepts for one record; etcd refuses requests over 1.5 MiB, and
/// no valid record comes near this.
pub const MAX_RECORD_BYTES: usize = 256 * 1024;

/// Decodes and validates one record, naming the field at fault on any error. Used for API
/// bodies, CLI input and every record read back from the store.
pub fn decode<T>(bytes: &[u8]) -> Result<T, InvalidInput>
where
    T: serde::de::DeserializeOwned + Validate,
{
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(
            InvalidInput::new("body", format!("larger than {MAX_RECORD_BYTES} bytes"))
                .value(format!("{} bytes", bytes.len())),
        );
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let reason = strip_position(&e.into_inner().to_string());
        // A missing field is reported on its parent; name the field itself.
        let missing = reason
            .strip_prefix("missing field `")
            .and_then(|r| r.strip_suffix('`'));
        let field = match (path.as_str(), missing) {
            ("." | "", Some(m)) => m.to_string(),
            (p, Some(m)) => format!("{p}.{m}"),
            ("." | "", None) => "body".to_string(),
            (p, None) => p.to_string(),
        };
        InvalidInput::new(field, reason)
    })?;
    value.validate()?;
    Ok(value)
}

/// serde_json appends " at line L column C"; the field name already says where.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// Serialises a record for the store. Model types contain only strings, numbers and maps, so
/// this cannot fail.
pub fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("model types always serialise")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_names_the_field() {
        let e = decode::<Service>(br#"{"name":"web","address":"10.0.0.1:99999"}"#).unwrap_err();
        assert_eq!(e.field, "address");
        let e = decode::<Service>(br#"{"name":"Web","address":"10.0.0.1:80"}"#).unwrap_err();
        assert_eq!(e.field, "name");
        let e = decode::<Service>(br#"{"name":"web","address":"10.0.0.1:80","protocol":"sctp"}"#)
            .unwrap_err();
        assert_eq!(e.field, "protocol");
        let e =
            decode::<Service>(br#"{"name":"web","address":"10.0.0.1:80","instance_port":70000}"#)
                .unwrap_err();
        assert_eq!(e.field, "instance_port");
        let e = decode::<Service>(br#"{"name":"web","address":"10.0.0.1:80","x":1}"#).unwrap_err();
        assert_eq!(e.field, "x");
        assert!(e.reason.contains("unknown field"), "{e}");
        let e = decode::<Service>(b"not json").unwrap_err();
        assert_eq!(e.field, "body");
    }

    #[test]
    fn round_trip() {
        let s: Service =
            decode(br#"{"name":"web","address":"10.128.0.1:80","protocol":"http"}"#).unwrap();
        assert_eq!(s.protocol, Protocol::Http);
        let again: Service = decode(&encode(&s)).unwrap();
        assert_eq!(s, again);
    }

    #[test]
    fn a_service_may_have_no_address_but_then_an_instance_port() {
        let s: Service =
            decode(br#"{"name":"edge","address":"none","instance_port":8080}"#).unwrap();
        assert_eq!(s.address, None);
        assert_eq!(s.default_instance_port(), 8080);
        assert_eq!(s.address_text(), "none");
        assert!(String::from_utf8(encode(&s))
            .unwrap()
            .contains(r#""address":"none""#));
        assert_eq!(decode::<Service>(&encode(&s)).unwrap(), s);
        let e = decode::<Service>(br#"{"name":"edge","address":"none"}"#).unwrap_err();
        assert_eq!(e.field, "instance_port", "{e}");
        // Forgetting the field is not the same as saying none.
        let e = decode::<Service>(br#"{"name":"edge","instance_port":8080}"#).unwrap_err();
        assert_eq!(e.field, "address", "{e}");
        let e = decode::<Service>(br#"{"name":"edge","address":"nowhere"}"#).unwrap_err();
        assert_eq!(e.field, "address", "{e}");
        assert!(e.reason.contains("or none"), "{e}");
        // Records written before the field could be none load as they always did.
        let old: Service = decode(br#"{"name":"web","address":"10.128.0.1:80"}"#).unwrap();
        assert_eq!(old.address, Some("10.128.0.1:80".parse().unwrap()));
    }

    #[test]
    fn forward_is_optional_and_only_for_tcp_services_with_a_vip() {
        // A record without it encodes exactly as before the field existed.
        let s: Service = decode(br#"{"name":"web","address":"10.128.0.1:80"}"#).unwrap();
        assert_eq!(s.forward, Forwarding::Proxy);
        assert!(!String::from_utf8(encode(&s)).unwrap().contains("forward"));
        let explicit: Service =
            decode(br#"{"name":"web","address":"10.128.0.1:80","forward":"proxy"}"#).unwrap();
        assert_eq!(encode(&explicit), encode(&s));
        let k: Service =
            decode(br#"{"name":"bulk","address":"10.128.0.2:80","forward":"kernel"}"#).unwrap();
        assert_eq!(k.forward, Forwarding::Kernel);
        assert!(String::from_utf8(encode(&k))
            .unwrap()
            .contains(r#""forward":"kernel""#));
        assert_eq!(decode::<Service>(&encode(&k)).unwrap(), k);
        for (body, reason) in [
            (
                r#"{"name":"w","address":"10.128.0.1:80","protocol":"http","forward":"kernel"}"#,
                "for tcp services",
            ),
            (
                r#"{"name":"w","address":"none","instance_port":80,"forward":"kernel"}"#,
                "address none",
            ),
            (
                r#"{"name":"w","address":"10.128.0.1:80","balance":"least-conn","forward":"kernel"}"#,
                "least-conn",
            ),
            (
                r#"{"name":"w","address":"10.128.0.1:80","forward":"dnat"}"#,
                "kernel",
            ),
        ] {
            let e = decode::<Service>(body.as_bytes()).unwrap_err();
            assert_eq!(e.field, "forward", "{body}: {e}");
            assert!(e.reason.contains(reason), "{body}: {e}");
        }
    }

    #[test]
    fn timeouts_and_proxy_protocol_are_optional_and_checked() {
        // A record without them encodes byte for byte as before the fields existed.
        let old =
            br#"{"name":"web","address":"10.128.0.1:80","protocol":"tcp","balance":"round-robin"}"#;
        let s: Service = decode(old).unwrap();
        assert_eq!(s.timeouts, ServiceTimeouts::default());
        assert_eq!(s.proxy_protocol, None);
        assert_eq!(encode(&s), old.to_vec());
        let s: Service = decode(
            br#"{"name":"db","address":"10.128.0.2:5432","timeouts":{"connect_ms":300,"half_close_ms":5000},"proxy_protocol":"v2"}"#,
        )
        .unwrap();
        assert_eq!(s.timeouts.connect_ms, Some(300));
        assert_eq!(s.proxy_protocol, Some(ProxyProtocol::V2));
        let text = String::from_utf8(encode(&s)).unwrap();
        assert!(
            text.ends_with(
                r#""timeouts":{"connect_ms":300,"half_close_ms":5000},"proxy_protocol":"v2"}"#
            ),
            "{text}"
        );
        assert_eq!(decode::<Service>(&encode(&s)).unwrap(), s);
        for (body, field) in [
            (r#""timeouts":{"connect_ms":5}"#, "timeouts.connect_ms"),
            (r#""timeouts":{"idle_ms":5}"#, "timeouts.idle_ms"),
            (r#""proxy_protocol":"v3""#, "proxy_protocol"),
            (
                r#""protocol":"http","proxy_protocol":"v1""#,
                "proxy_protocol",
            ),
            (
                r#""forward":"kernel","proxy_protocol":"v1""#,
                "proxy_protocol",
            ),
        ] {
            let json = format!(r#"{{"name":"web","address":"10.128.0.1:80",{body}}}"#);
            let e = decode::<Service>(json.as_bytes()).unwrap_err();
            assert_eq!(e.field, field, "{body}: {e}");
        }
    }

    #[test]
    fn instance_protocol_is_optional_and_checked() {
        // Absent (auto), a record encodes byte for byte as before the field existed.
        let old = br#"{"name":"web","address":"10.128.0.1:80","protocol":"http","balance":"round-robin"}"#;
        let s: Service = decode(old).unwrap();
        assert_eq!(s.instance_protocol, None);
        assert_eq!(encode(&s), old.to_vec());
        let s: Service = decode(
            br#"{"name":"web","address":"10.128.0.1:80","protocol":"http","instance_protocol":"h2"}"#,
        )
        .unwrap();
        assert_eq!(s.instance_protocol, Some(InstanceProtocol::H2));
        let text = String::from_utf8(encode(&s)).unwrap();
        assert!(text.ends_with(r#""instance_protocol":"h2"}"#), "{text}");
        assert_eq!(decode::<Service>(&encode(&s)).unwrap(), s);
        for body in [
            r#""protocol":"http","instance_protocol":"h3""#,
            r#""instance_protocol":"h2""#,
        ] {
            let json = format!(r#"{{"name":"web","address":"10.128.0.1:80",{body}}}"#);
            let e = decode::<Service>(json.as_bytes()).unwrap_err();
            assert_eq!(e.field, "instance_protocol", "{body}: {e}");
        }
    }

    #[test]
    fn health_is_optional_and_checked() {
        // A record without a check encodes exactly as before the field existed.
        let s: Service = decode(br#"{"name":"web","address":"10.128.0.1:80"}"#).unwrap();
        assert_eq!(s.health, None);
        assert!(!String::from_utf8(encode(&s)).unwrap().contains("health"));
        let s: Service = decode(
            br#"{"name":"web","address":"10.128.0.1:80","health":{"kind":"http","path":"/healthz","interval_ms":500,"timeout_ms":100}}"#,
        )
        .unwrap();
        let h = s.health.clone().unwrap();
        assert_eq!(
            (h.interval_ms, h.timeout_ms, h.fall, h.rise),
            (500, 100, 3, 2)
        );
        assert_eq!(decode::<Service>(&encode(&s)).unwrap(), s);
        for (body, field) in [
            (r#"{"kind":"http","path":"healthz"}"#, "health.path"),
            (r#"{"kind":"http"}"#, "health.path"),
            (r#"{"kind":"tcp","interval_ms":50}"#, "health.interval_ms"),
            (r#"{"kind":"tcp","fall":0}"#, "health.fall"),
            (r#"{"kind":"udp"}"#, "health.kind"),
            (r#"{"kind":"tcp","x":1}"#, "health.x"),
        ] {
            let json = format!(r#"{{"name":"web","address":"10.128.0.1:80","health":{body}}}"#);
            let e = decode::<Service>(json.as_bytes()).unwrap_err();
            assert_eq!(e.field, field, "{body}: {e}");
        }
    }
}
