//! A change to an existing service (`fluxctl service set`, `PATCH /v1/services/NAME`): the
//! fields given replace the service's, the others stay. The result is checked as a whole, like
//! a new service, before anything is written.
//!
//! A field that can be unset (health, proxy protocol, a timeout, the instance port) takes
//! `null` for "back to none / the default"; leaving a field out leaves it as it is.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{
    Affinity, Balance, Forwarding, HealthCheck, InstanceProtocol, InvalidInput, Locality, Protocol,
    ProxyProtocol, Service, Validate,
};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceEdit {
    /// A new VIP (`IP:PORT` or `none`): the claim moves with it.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "vip_out",
        deserialize_with = "vip_in"
    )]
    pub address: Option<Option<SocketAddr>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub instance_port: Option<Option<u16>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<Balance>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub health: Option<Option<HealthCheck>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward: Option<Forwarding>,
    /// By record name (`connect_ms`, ...); `null` drops the override.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub timeouts: BTreeMap<String, Option<u64>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub proxy_protocol: Option<Option<ProxyProtocol>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<Locality>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// `Some(None)` goes back to auto.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub instance_protocol: Option<Option<InstanceProtocol>>,
}

impl ServiceEdit {
    /// Nothing to change.
    pub fn is_empty(&self) -> bool {
        *self == ServiceEdit::default()
    }

    /// `current` with this edit's fields, checked as a whole; errors name the field.
    pub fn apply(&self, current: &Service) -> Result<Service, InvalidInput> {
        let mut s = current.clone();
        // One line per field: a new field of `Service` is editable with one more.
        set(&mut s.address, &self.address);
        set(&mut s.protocol, &self.protocol);
        set(&mut s.instance_port, &self.instance_port);
        set(&mut s.balance, &self.balance);
        set(&mut s.health, &self.health);
        set(&mut s.forward, &self.forward);
        set(&mut s.proxy_protocol, &self.proxy_protocol);
        set(&mut s.locality, &self.locality);
        set(&mut s.affinity, &self.affinity);
        set(&mut s.instance_protocol, &self.instance_protocol);
        for (name, value) in &self.timeouts {
            *s.timeouts
                .field_mut(name)
                .ok_or_else(|| unknown_timeout(name))? = *value;
        }
        s.validate()?;
        Ok(s)
    }
}

fn set<T: Clone>(field: &mut T, to: &Option<T>) {
    if let Some(v) = to {
        *field = v.clone();
    }
}

fn unknown_timeout(name: &str) -> InvalidInput {
    InvalidInput::new(
        format!("timeouts.{name}"),
        "unknown timeout: connect_ms, http_response_ms or half_close_ms",
    )
}

impl Validate for ServiceEdit {
    /// What can be checked without the service: the timeout names. The rest is checked on the
    /// edited service (`apply`).
    fn validate(&self) -> Result<(), InvalidInput> {
        let mut probe = super::ServiceTimeouts::default();
        for name in self.timeouts.keys() {
            probe.field_mut(name).ok_or_else(|| unknown_timeout(name))?;
        }
        Ok(())
    }
}

/// A field that is present, even as `null`, is `Some`: `null` means "unset it".
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

fn vip_in<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<SocketAddr>>, D::Error> {
    super::addr::vip::deserialize(d).map(Some)
}

fn vip_out<S: Serializer>(a: &Option<Option<SocketAddr>>, s: S) -> Result<S::Ok, S::Error> {
    match a {
        Some(a) => super::addr::vip::serialize(a, s),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{decode, encode};

    fn web() -> Service {
        decode(
            br#"{"name":"web","address":"198.18.0.1:80","health":{"kind":"tcp"},"timeouts":{"connect_ms":500}}"#,
        )
        .unwrap()
    }

    #[test]
    fn only_the_given_fields_change() {
        let e: ServiceEdit = decode(br#"{"balance":"random"}"#).unwrap();
        let s = e.apply(&web()).unwrap();
        assert_eq!(s.balance, Balance::Random);
        assert_eq!(
            Service {
                balance: Balance::RoundRobin,
                ..s.clone()
            },
            web()
        );
        assert!(ServiceEdit::default().is_empty());
        assert!(!e.is_empty());
    }

    #[test]
    fn null_unsets_and_absent_keeps() {
        let e: ServiceEdit =
            decode(br#"{"health":null,"timeouts":{"connect_ms":null,"half_close_ms":900}}"#)
                .unwrap();
        let s = e.apply(&web()).unwrap();
        assert_eq!(s.health, None);
        assert_eq!(s.timeouts.connect_ms, None);
        assert_eq!(s.timeouts.half_close_ms, Some(900));
        let e: ServiceEdit =
            decode(br#"{"proxy_protocol":"v2","address":"198.18.0.2:81"}"#).unwrap();
        let s = e.apply(&web()).unwrap();
        assert_eq!(s.proxy_protocol, Some(ProxyProtocol::V2));
        assert_eq!(s.address_text(), "198.18.0.2:81");
        assert!(s.health.is_some());
        // An edit survives its own encoding (the API client sends what fluxctl built).
        assert_eq!(decode::<ServiceEdit>(&encode(&e)).unwrap(), e);
        let unset: ServiceEdit = decode(br#"{"health":null}"#).unwrap();
        assert_eq!(
            String::from_utf8(encode(&unset)).unwrap(),
            r#"{"health":null}"#
        );
    }

    #[test]
    fn the_edited_service_is_checked_as_a_whole() {
        for (body, field) in [
            (
                r#"{"protocol":"http","proxy_protocol":"v1"}"#,
                "proxy_protocol",
            ),
            (r#"{"forward":"kernel","balance":"least-conn"}"#, "forward"),
            (r#"{"address":"none"}"#, "instance_port"),
            (r#"{"timeouts":{"connect_ms":1}}"#, "timeouts.connect_ms"),
        ] {
            let e: ServiceEdit = decode(body.as_bytes()).unwrap();
            assert_eq!(e.apply(&web()).unwrap_err().field, field, "{body}");
        }
        for (body, field) in [
            (r#"{"timeouts":{"read_ms":1}}"#, "timeouts.read_ms"),
            (r#"{"balance":"fastest"}"#, "balance"),
            (r#"{"address":"1.2.3.4"}"#, "address"),
            (r#"{"name":"other"}"#, "name"),
        ] {
            let e = decode::<ServiceEdit>(body.as_bytes()).unwrap_err();
            assert_eq!(e.field, field, "{body}: {e}");
        }
    }
}
