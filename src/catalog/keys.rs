//! The store's key layout. Every other module names keys through these functions, so the
//! layout is written down once.

use std::net::SocketAddr;

pub const SERVICES: &str = "services/";
pub const VIPS: &str = "vips/";
pub const RULES: &str = "rules/";
pub const INSTANCES: &str = "instances/";
pub const HOSTS: &str = "hosts/";
pub const DRAINS: &str = "drains/";

pub fn service(name: &str) -> String {
    format!("{SERVICES}{name}")
}

/// The claim that makes a VIP:port unique across services: created in the same transaction as
/// the service, so two concurrent `service add` cannot both win.
pub fn vip(addr: &SocketAddr) -> String {
    format!("{VIPS}{addr}")
}

pub fn rule(service: &str, rule: &str) -> String {
    format!("{RULES}{service}/{rule}")
}

/// Trailing slash so that `web` does not also match `web-2`.
pub fn rules_of(service: &str) -> String {
    format!("{RULES}{service}/")
}

pub fn instance(service: &str, name: &str) -> String {
    format!("{INSTANCES}{service}/{name}")
}

pub fn instances_of(service: &str) -> String {
    format!("{INSTANCES}{service}/")
}

/// The drain mark of one instance: a record apart from the instance's, which a host's agent
/// rewrites at will (see `model::Drain`).
pub fn drain(service: &str, instance: &str) -> String {
    format!("{DRAINS}{service}/{instance}")
}

pub fn drains_of(service: &str) -> String {
    format!("{DRAINS}{service}/")
}

pub fn host(name: &str) -> String {
    format!("{HOSTS}{name}")
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::catalog::{Decoded, State};
    use crate::model::{self, Host, Instance, Rule, Selector, Service};
    use crate::store::KeyValue;

    #[test]
    fn each_record_has_its_documented_key() {
        let addr: SocketAddr = "198.18.0.10:80".parse().expect("a valid VIP");
        assert_eq!(service("web"), "services/web");
        assert_eq!(vip(&addr), "vips/198.18.0.10:80");
        assert_eq!(rule("web", "v1"), "rules/web/v1");
        assert_eq!(instance("web", "c0ffee"), "instances/web/c0ffee");
        assert_eq!(host("node-1.example"), "hosts/node-1.example");
        assert_eq!(drain("web", "c0ffee"), "drains/web/c0ffee");
    }

    #[test]
    fn a_services_prefixes_hold_its_records_and_no_siblings() {
        for (prefix, of) in [
            (rules_of("web"), rule as fn(&str, &str) -> String),
            (instances_of("web"), instance),
            (drains_of("web"), drain),
        ] {
            assert!(of("web", "a").starts_with(&prefix), "{prefix}");
            assert!(!of("web-2", "a").starts_with(&prefix), "{prefix}");
            assert!(!of("we", "b").starts_with(&prefix), "{prefix}");
            assert!(!service("web").starts_with(&prefix), "{prefix}");
        }
    }

    #[test]
    fn records_written_under_their_keys_are_read_back_as_written() {
        let web = Service {
            name: "web-2".into(),
            address: Some("198.18.0.10:80".parse().expect("a valid VIP")),
            protocol: Default::default(),
            instance_port: Some(8080),
            balance: Default::default(),
            health: None,
            forward: Default::default(),
            locality: Default::default(),
            affinity: Default::default(),
            timeouts: Default::default(),
            proxy_protocol: None,
            instance_protocol: None,
        };
        let v1 = Rule {
            service: "web-2".into(),
            name: "v1".into(),
            selector: Selector {
                image: Some("nginx".into()),
                ..Selector::default()
            },
            instance_port: None,
            weight: None,
        };
        let i1 = Instance::new_static("web-2", "i1", "192.0.2.1:80".parse().expect("valid"));
        let h1 = Host {
            name: "node-1.example".into(),
            ip: "192.0.2.1".parse().expect("valid"),
            network_mode: Default::default(),
            version: "test".into(),
            commit: None,
            started_at: 1,
            http: None,
        };
        let kvs: Vec<KeyValue> = [
            (service(&web.name), model::encode(&web)),
            (vip(&web.address.unwrap()), web.name.as_bytes().to_vec()),
            (rule(&v1.service, &v1.name), model::encode(&v1)),
            (instance(&i1.service, &i1.name), model::encode(&i1)),
            (host(&h1.name), model::encode(&h1)),
        ]
        .into_iter()
        .zip(1..)
        .map(|((key, value), rev)| KeyValue {
            key,
            value,
            create_revision: rev,
            mod_revision: rev,
        })
        .collect();
        let s = State::from_kvs(kvs.iter(), 5, &mut Decoded::default());
        assert_eq!(s.skipped, Vec::<String>::new());
        let key = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(s.services["web-2"], Arc::new(web));
        assert_eq!(s.rules[&key("web-2", "v1")], Arc::new(v1));
        assert_eq!(s.instances[&key("web-2", "i1")], Arc::new(i1));
        assert_eq!(s.hosts["node-1.example"], Arc::new(h1));
    }
}
