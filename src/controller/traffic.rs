//! What the balancer needs to know of a service beyond its instances (see `proxy::balancer`):
//! its rules' weights, its drain marks, and which instances run on this host. Read from the
//! routed State per service; a route is rebuilt when any of it changes.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use crate::catalog::State;
use crate::model::{traffic::DEFAULT_WEIGHT, Instance, Origin, Service};
use crate::proxy::balancer::{Group, Traffic};

/// The inputs of one service's traffic control, compared between builds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inputs {
    /// The service's rules and the weight each sets, by name.
    rules: Vec<(String, Option<u16>)>,
    /// Instances with a drain mark.
    drained: BTreeSet<String>,
    /// This host's name and IP, for locality.
    host: String,
    host_ip: Option<Ipv4Addr>,
}

impl Inputs {
    pub fn of(state: &State, service: &str, host: &str) -> Inputs {
        Inputs {
            rules: state
                .rules_of(service)
                .map(|r| (r.name.clone(), r.weight))
                .collect(),
            drained: state
                .drains_of(service)
                .map(|d| d.instance.clone())
                .collect(),
            host: host.to_string(),
            host_ip: state.hosts.get(host).map(|h| h.ip),
        }
    }

    /// Whether rules share by weight: only once some rule of the service sets one. A service
    /// whose rules set none keeps one pool of all its instances, as before weights existed
    /// (two rules of 3 and 1 instances then get 3/4 and 1/4, not half each).
    fn weighted(&self) -> bool {
        self.rules.iter().any(|(_, w)| w.is_some())
    }

    /// The route's groups: with weights, the static instances' group (index 0, default weight,
    /// also home to instances of a rule just removed), then one per rule; else one group.
    pub fn traffic(&self, service: &Service) -> Traffic {
        let mut groups = vec![Group {
            name: String::new(),
            weight: DEFAULT_WEIGHT,
        }];
        if self.weighted() {
            groups.extend(self.rules.iter().map(|(name, w)| Group {
                name: name.clone(),
                weight: w.unwrap_or(DEFAULT_WEIGHT),
            }));
        }
        Traffic {
            groups,
            locality: service.locality,
            affinity: service.affinity,
        }
    }

    /// The group of an instance (see `traffic`).
    pub fn group(&self, i: &Instance) -> usize {
        if !self.weighted() {
            return 0;
        }
        i.rule
            .as_deref()
            .and_then(|r| self.rules.iter().position(|(name, _)| name == r))
            .map_or(0, |at| at + 1)
    }

    pub fn drained(&self, i: &Instance) -> bool {
        self.drained.contains(&i.name)
    }

    /// Whether an instance runs on this host: a container enrolled by this host's agent, or a
    /// static instance at a loopback address or this host's IP. A static instance elsewhere
    /// counts as another host's, even if this host has the address on another interface: flux
    /// knows one IP per host.
    pub fn local(&self, i: &Instance) -> bool {
        match i.origin {
            Origin::Container => i.host.as_deref() == Some(self.host.as_str()),
            Origin::Static => i.address.is_some_and(|a| {
                a.ip().is_loopback() || Some(a.ip()) == self.host_ip.map(std::net::IpAddr::V4)
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Rule;
    use std::sync::Arc;

    fn state(weights: &[(&str, Option<u16>)]) -> State {
        let mut s = State::default();
        for (name, weight) in weights {
            let r = Rule {
                service: "web".into(),
                name: name.to_string(),
                selector: crate::model::Selector {
                    tag: Some("x".into()),
                    ..Default::default()
                },
                instance_port: None,
                weight: *weight,
            };
            s.rules
                .insert(("web".into(), name.to_string()), Arc::new(r));
        }
        s
    }

    fn container(rule: &str, host: &str) -> Instance {
        Instance {
            origin: Origin::Container,
            host: Some(host.into()),
            rule: Some(rule.into()),
            ..Instance::new_static("web", "c1", "192.0.2.9:80".parse().unwrap())
        }
    }

    #[test]
    fn rules_without_weights_are_one_pool() {
        let inputs = Inputs::of(&state(&[("v1", None), ("v2", None)]), "web", "h1");
        assert_eq!(inputs.group(&container("v2", "h1")), 0);
        let service: Service =
            crate::model::decode(br#"{"name":"web","address":"198.18.0.1:80"}"#).unwrap();
        assert_eq!(inputs.traffic(&service).groups.len(), 1);
    }

    #[test]
    fn one_weight_makes_every_rule_a_group() {
        let inputs = Inputs::of(&state(&[("v1", Some(90)), ("v2", None)]), "web", "h1");
        let service: Service =
            crate::model::decode(br#"{"name":"web","address":"198.18.0.1:80"}"#).unwrap();
        let weights: Vec<u16> = inputs
            .traffic(&service)
            .groups
            .iter()
            .map(|g| g.weight)
            .collect();
        assert_eq!(weights, [100, 90, 100]);
        assert_eq!(inputs.group(&container("v1", "h1")), 1);
        assert_eq!(inputs.group(&container("v2", "h1")), 2);
        assert_eq!(inputs.group(&container("gone", "h1")), 0);
        let s = Instance::new_static("web", "s1", "192.0.2.9:80".parse().unwrap());
        assert_eq!(inputs.group(&s), 0);
    }

    #[test]
    fn locality_of_containers_and_static_instances() {
        let inputs = Inputs::of(&State::default(), "web", "h1");
        assert!(inputs.local(&container("v1", "h1")));
        assert!(!inputs.local(&container("v1", "h2")));
        let lo = Instance::new_static("web", "s1", "127.0.0.1:80".parse().unwrap());
        let far = Instance::new_static("web", "s2", "192.0.2.9:80".parse().unwrap());
        assert!(inputs.local(&lo));
        assert!(!inputs.local(&far));
    }
}
