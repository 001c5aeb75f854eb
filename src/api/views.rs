//! What the API returns: the records of the model plus what this host knows about them.
//! fluxctl and the web UI read these shapes; scripts read them through `--json`.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::catalog::State;
use crate::docker::image::{canonical_repository, split_filter};
use crate::model::{validate, Host, Instance, InvalidInput, Rule, Selector, Service};
use crate::proxy::health::HealthView;

/// How an instance looks from this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    /// Has an address and has not failed since its last success (or was never tried).
    #[serde(rename = "live")]
    Live,
    /// The last connect failed; retried after a backoff.
    #[serde(rename = "failed")]
    Failed,
    /// Its active health check fails: out of the pool on this host whatever connects do (unless
    /// every instance of the service fails it: then all are tried, see `proxy::route_table`).
    #[serde(rename = "failing")]
    Failing,
    /// Matches a rule but has no usable address, so gets no traffic.
    #[serde(rename = "no address")]
    NoAddress,
}

impl InstanceState {
    pub fn as_str(&self) -> &'static str {
        match self {
            InstanceState::Live => "live",
            InstanceState::Failed => "failed",
            InstanceState::Failing => "failing",
            InstanceState::NoAddress => "no address",
        }
    }

    /// Accepts the spelling scripts are likely to use for `no address`.
    pub fn parse(s: &str) -> Result<Self, InvalidInput> {
        match s {
            "live" => Ok(InstanceState::Live),
            "failed" => Ok(InstanceState::Failed),
            "failing" => Ok(InstanceState::Failing),
            "no address" | "no-address" | "noaddress" => Ok(InstanceState::NoAddress),
            _ => Err(
                InvalidInput::new("state", "must be live, failed, failing or no-address").value(s),
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceView {
    #[serde(flatten)]
    pub instance: Instance,
    pub state: InstanceState,
    /// This host's record of connecting to it; absent without a data plane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthView>,
    /// It carries a drain mark (`fluxctl instance drain`): no new connections.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drained: bool,
}

impl InstanceView {
    /// Without health: an addressable instance counts as live until a connect to it fails.
    pub fn new(instance: &Instance) -> Self {
        Self::with_health(instance, None)
    }

    /// The state from the address and this host's health: a failing active check outranks a
    /// passive failure, because it alone keeps the instance out of the pool.
    pub fn with_health(instance: &Instance, health: Option<HealthView>) -> Self {
        let state = match (&instance.address, &health) {
            (None, _) => InstanceState::NoAddress,
            (Some(_), Some(h)) if h.check_failing() => InstanceState::Failing,
            (Some(_), Some(h)) if !h.live => InstanceState::Failed,
            (Some(_), _) => InstanceState::Live,
        };
        InstanceView {
            instance: instance.clone(),
            state,
            health,
            drained: false,
        }
    }

    /// The same view with the instance's drain mark.
    pub fn drained(mut self, drained: bool) -> Self {
        self.drained = drained;
        self
    }
}

/// A service with its rules and instances, for `list` and `info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    #[serde(flatten)]
    pub service: Service,
    pub rules: Vec<Rule>,
    pub instances: Vec<InstanceView>,
    /// Why this host does not route the service (the VIP guard refused its VIP); absent when
    /// it does, or without a data plane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

impl ServiceInfo {
    pub fn from_state(
        state: &State,
        service: &Service,
        health: impl Fn(&Instance) -> Option<HealthView>,
    ) -> Self {
        ServiceInfo {
            service: service.clone(),
            rules: state.rules_of(&service.name).cloned().collect(),
            instances: state
                .instances_of(&service.name)
                .map(|i| {
                    InstanceView::with_health(i, health(i))
                        .drained(state.is_drained(&i.service, &i.name))
                })
                .collect(),
            refused: None,
        }
    }
}

/// Whether `i` was enrolled by the host named `host`, or by the host whose IP `host` is.
fn on_host(i: &Instance, host: &str, hosts: &imbl::OrdMap<String, Arc<Host>>) -> bool {
    let Some(name) = &i.host else {
        return false;
    };
    if name == host {
        return true;
    }
    match host.parse::<std::net::Ipv4Addr>() {
        Ok(ip) => hosts.get(name).is_some_and(|h| h.ip == ip),
        Err(_) => false,
    }
}

/// A live host as `GET /v1/hosts` and `fluxctl info` show it: its record, how many instances
/// it enrolled, and when it last proved alive to the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostView {
    #[serde(flatten)]
    pub host: Host,
    /// Container instances this host's agent enrolled, over all services.
    pub instances: usize,
    /// When its fluxd last renewed its session (to the second with etcd; now for this host
    /// with the embedded store); absent when the store cannot tell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_unix_ms: Option<u64>,
}

/// The body of every error answer; `field` is absent for errors that are not about input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// `fluxctl query` filters, sent as URL query parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceQuery {
    pub service: Option<String>,
    pub host: Option<String>,
    pub rule: Option<String>,
    pub state: Option<InstanceState>,
    /// Matched against the container the instance came from.
    pub selector: Selector,
}

impl InstanceQuery {
    pub fn to_query_string(&self) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        let mut add = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                q.append_pair(k, v);
            }
        };
        add("service", &self.service);
        add("host", &self.host);
        add("rule", &self.rule);
        add("state", &self.state.map(|s| s.as_str().to_string()));
        add("image", &self.selector.image);
        add("tag", &self.selector.tag);
        for (k, v) in &self.selector.labels {
            q.append_pair("label", &format!("{k}={v}"));
        }
        for (k, v) in &self.selector.env {
            q.append_pair("env", &format!("{k}={v}"));
        }
        q.finish()
    }

    /// Reads the query string. Filters are taken as users type them: `image` in any form
    /// Docker accepts (`nginx` = `docker.io/library/nginx`), with an optional `:TAG`.
    pub fn parse(query: &str) -> Result<Self, InvalidInput> {
        let mut out = InstanceQuery::default();
        let mut image_tag = None;
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            let v = v.into_owned();
            match k.as_ref() {
                "service" => out.service = Some(v),
                "host" => out.host = Some(v),
                "rule" => out.rule = Some(v),
                "state" => out.state = Some(InstanceState::parse(&v)?),
                "image" => {
                    // Checked as `select` checks an image, once the tag is split off: a
                    // filter that names no possible image is a typo, not an empty answer.
                    let (repository, tag) = split_filter(&v);
                    validate::image("image", &repository).map_err(|e| e.value(&v))?;
                    if let Some(t) = &tag {
                        validate::tag("image", t).map_err(|e| e.value(&v))?;
                    }
                    out.selector.image = Some(repository);
                    image_tag = tag;
                }
                "tag" => out.selector.tag = Some(v),
                "label" | "env" => {
                    let (a, b) = v.split_once('=').ok_or_else(|| {
                        InvalidInput::new(k.to_string(), "expected key=value").value(&v)
                    })?;
                    let map: &mut BTreeMap<String, String> = if k == "label" {
                        &mut out.selector.labels
                    } else {
                        &mut out.selector.env
                    };
                    map.insert(a.to_string(), b.to_string());
                }
                other => {
                    return Err(InvalidInput::new(
                        other.to_string(),
                        "unknown query parameter",
                    ))
                }
            }
        }
        match (image_tag, &out.selector.tag) {
            (Some(t), Some(tag)) if t != *tag => {
                return Err(InvalidInput::new(
                    "tag",
                    format!("differs from the tag in --image (:{t})"),
                )
                .value(tag))
            }
            (Some(t), _) => out.selector.tag = Some(t),
            (None, _) => {}
        }
        Ok(out)
    }

    /// Whether `view` passes every filter. `host` is a host name or a host's IP, looked up in
    /// `hosts` (the live hosts' records).
    pub fn matches(&self, view: &InstanceView, hosts: &imbl::OrdMap<String, Arc<Host>>) -> bool {
        let i = &view.instance;
        let eq = |want: &Option<String>, have: Option<&String>| {
            want.as_ref().is_none_or(|w| Some(w) == have)
        };
        let c = i.container.as_ref();
        // Records hold the canonical form already; older ones may not.
        let image_ok = self
            .selector
            .image
            .as_ref()
            .is_none_or(|w| c.is_some_and(|c| canonical_repository(&c.image) == *w));
        let tag_ok = eq(&self.selector.tag, c.map(|c| &c.tag));
        let labels_ok = self
            .selector
            .labels
            .iter()
            .all(|(k, v)| c.and_then(|c| c.labels.get(k)) == Some(v));
        // Env is not part of the published record (it may hold secrets), so an env filter
        // can only match static instances' absence of it: refuse nothing, match nothing.
        let env_ok = self.selector.env.is_empty();
        eq(&self.service, Some(&i.service))
            && self.host.as_ref().is_none_or(|h| on_host(i, h, hosts))
            && eq(&self.rule, i.rule.as_ref())
            && self.state.is_none_or(|s| s == view.state)
            && image_ok
            && tag_ok
            && labels_ok
            && env_ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_filters_are_taken_in_any_form_docker_accepts() {
        let q = InstanceQuery::parse("image=nginx:1.25").unwrap();
        assert_eq!(q.selector.image.as_deref(), Some("docker.io/library/nginx"));
        assert_eq!(q.selector.tag.as_deref(), Some("1.25"));
        let q = InstanceQuery::parse("tag=v2&image=registry:5000/team/app:v2").unwrap();
        assert_eq!(q.selector.image.as_deref(), Some("registry:5000/team/app"));
        assert_eq!(InstanceQuery::parse(&q.to_query_string()).unwrap(), q);
        let e = InstanceQuery::parse("image=nginx:1.25&tag=1.26").unwrap_err();
        assert_eq!(e.field, "tag");
        // Found by fuzzing (cli_query): a second ':' in the last component names no image.
        for bad in ["registry:5000/team/app:r:x", "Nginx", "nginx:", "nginx:-1"] {
            let e = InstanceQuery::parse(&format!("image={bad}")).unwrap_err();
            assert_eq!(e.field, "image", "{bad}: {e}");
        }
    }
}
