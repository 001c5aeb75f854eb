//! The local API's routes: JSON in, JSON out, one handler per operation. Every body goes
//! through `model::decode`, so the API refuses exactly what the CLI refuses, with the same
//! messages.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;

use super::views::{ErrorBody, HostView, InstanceQuery, InstanceView, ServiceInfo};
use crate::catalog::{Catalog, CatalogError, State};
use crate::controller::Status;
use crate::metrics::history::GroupBy;
use crate::model::{self, Instance, InvalidInput, Origin, Rule, Service};
use crate::proxy::health::HealthView;
use crate::store::StoreError;
use tokio::sync::watch;

pub type Body = Full<Bytes>;

/// How long a read waits for the store before it answers from the followed state.
const STORE_READ_WAIT: std::time::Duration = std::time::Duration::from_millis(800);

/// What the handlers share: the catalog, this host's name, and the data plane's status
/// (absent with `--no-dataplane`).
pub struct Api {
    pub catalog: Catalog,
    pub host_name: String,
    pub dataplane: Option<Arc<Status>>,
    /// The catalog as this fluxd last followed it, answered from while the store is down.
    pub followed: watch::Receiver<Arc<State>>,
    /// With ranges configured, new services must have their VIP inside one.
    pub vip_ranges: Vec<ipnet::Ipv4Net>,
    /// The DNS responder's listening addresses (`--dns-listen`; empty when it is off).
    pub dns: Vec<std::net::SocketAddr>,
}

impl Api {
    /// The catalog, read from the store so that a write is visible to the next read; while the
    /// store is unreachable, the last state followed, so that operators still see what this
    /// host routes by.
    async fn state(&self) -> Result<Arc<State>, CatalogError> {
        // Known down: answer now rather than after a request's timeout.
        if self.catalog.store().unreachable_since().is_some() {
            return Ok(self.followed.borrow().clone());
        }
        // A store that is slow to answer (an etcd member just died and the client has not
        // moved on yet) is not waited for either: the followed state is a moment old at most.
        match tokio::time::timeout(STORE_READ_WAIT, self.catalog.load()).await {
            Ok(Ok(s)) => Ok(Arc::new(s)),
            Ok(Err(CatalogError::Store(StoreError::Unavailable(why)))) => {
                tracing::debug!(%why, "store unavailable; answering from the last followed state");
                Ok(self.followed.borrow().clone())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => {
                tracing::debug!("store slow to answer; answering from the last followed state");
                Ok(self.followed.borrow().clone())
            }
        }
    }

    /// The service as this host routes it: its health and whether the VIP guard refused it.
    fn service_info(&self, state: &State, service: &Service) -> ServiceInfo {
        let mut info = ServiceInfo::from_state(state, service, |i| self.health(i));
        info.refused = self.dataplane.as_ref().and_then(|d| {
            d.guard
                .load()
                .refused
                .get(&service.name)
                .map(|r| r.reason.clone())
        });
        info
    }

    /// This host's view of one instance's health, if the data plane routes to it.
    fn health(&self, i: &Instance) -> Option<HealthView> {
        let status = self.dataplane.as_ref()?;
        let routes = status.routes.load();
        let route = routes.by_name.get(&i.service)?;
        route
            .backends
            .iter()
            .find(|b| b.instance == i.name && Some(b.addr) == i.address)
            .map(|b| b.view())
    }
}

/// An answer that is not a success, with the status it maps to.
struct Failure(StatusCode, ErrorBody);

impl From<CatalogError> for Failure {
    fn from(e: CatalogError) -> Self {
        let (status, input) = match e {
            CatalogError::Invalid(i) => (StatusCode::BAD_REQUEST, i),
            CatalogError::NotFound(i) => (StatusCode::NOT_FOUND, i),
            CatalogError::Conflict(i) => (StatusCode::CONFLICT, i),
            CatalogError::Store(s) => return s.into(),
        };
        Failure(
            status,
            ErrorBody {
                error: input.to_string(),
                field: Some(input.field),
            },
        )
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorBody {
                error: e.to_string(),
                field: None,
            },
        )
    }
}

impl From<InvalidInput> for Failure {
    fn from(e: InvalidInput) -> Self {
        CatalogError::Invalid(e).into()
    }
}

type Answer = Result<Response<Body>, Failure>;

pub async fn handle(api: Arc<Api>, req: Request<Incoming>) -> Response<Body> {
    match route(&api, req).await {
        Ok(r) => r,
        Err(Failure(status, body)) => json(status, &body),
    }
}

async fn route(api: &Api, req: Request<Incoming>) -> Answer {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (&method, segs.as_slice()) {
        (&Method::GET, ["healthz"]) => Ok(text(StatusCode::OK, "ok\n")),
        (&Method::GET, ["readyz"]) => {
            api.catalog.store().get("readyz").await?;
            Ok(text(StatusCode::OK, "ready\n"))
        }
        (&Method::GET, ["v1", "services"]) => list_services(api).await,
        (&Method::POST, ["v1", "services"]) => add_service(api, req).await,
        (&Method::GET, ["v1", "services", name]) => service_info(api, name).await,
        (&Method::PATCH, ["v1", "services", name]) => {
            let name = name.to_string();
            edit_service(api, req, &name).await
        }
        (&Method::DELETE, ["v1", "services", name]) => {
            api.catalog.remove_service(name).await?;
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({ "removed": name }),
            ))
        }
        (&Method::PUT, ["v1", "services", svc, "rules", rule]) => {
            let (svc, rule) = (svc.to_string(), rule.to_string());
            put_rule(api, req, &svc, &rule).await
        }
        (&Method::DELETE, ["v1", "services", svc, "rules", rule]) => {
            api.catalog.remove_rule(svc, rule).await?;
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({ "removed": rule }),
            ))
        }
        (&Method::POST, ["v1", "services", svc, "instances"]) => {
            let svc = svc.to_string();
            add_instance(api, req, &svc).await
        }
        (&Method::DELETE, ["v1", "services", svc, "instances", name]) => {
            api.catalog.remove_static_instance(svc, name).await?;
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({ "removed": name }),
            ))
        }
        (&Method::PUT, ["v1", "services", svc, "instances", name, "drain"]) => {
            api.catalog.drain(svc, name).await?;
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({ "service": svc, "instance": name, "drained": true }),
            ))
        }
        (&Method::DELETE, ["v1", "services", svc, "instances", name, "drain"]) => {
            api.catalog.undrain(svc, name).await?;
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({ "service": svc, "instance": name, "drained": false }),
            ))
        }
        (&Method::GET, ["v1", "instances"]) => query_instances(api, &query).await,
        (&Method::GET, ["v1", "hosts"]) => list_hosts(api).await,
        (&Method::GET, ["v1", "store"]) => {
            // The revision tells an operator (and the tests) whether anything was written.
            let listing = api.catalog.store().list("").await?;
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({ "revision": listing.revision, "keys": listing.kvs.len() }),
            ))
        }
        (&Method::GET, ["metrics"]) => Ok(metrics(api)),
        (&Method::GET, ["v1", "series"]) => series(api, &query).await,
        (&Method::GET, ["v1", "debug"]) => {
            let mut view =
                super::debug::DebugView::gather(&api.host_name, api.dataplane.clone()).await;
            view.dns = api.dns.iter().map(|a| a.to_string()).collect();
            Ok(json(StatusCode::OK, &view))
        }
        (&Method::GET, ["v1", "host"]) => Ok(json(StatusCode::OK, &host_view(api))),
        _ => Err(Failure(
            StatusCode::NOT_FOUND,
            ErrorBody {
                error: format!("no route for {method} {path}"),
                field: None,
            },
        )),
    }
}

/// This host's name and whether its picture of the catalog is current: while the store's watch
/// fails, everything this fluxd answers about services and instances is as last seen.
fn host_view(api: &Api) -> serde_json::Value {
    let since_ms = api
        .catalog
        .store()
        .unreachable_since()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64);
    let rules = api.dataplane.as_ref().and_then(|d| d.rules.as_ref());
    let steering = rules.map(|r| {
        serde_json::json!({
            "mode": if r.steering.is_some() { "bpf" } else { "nat" },
            "fallback": r.steering_fallback,
        })
    });
    serde_json::json!({
        "name": api.host_name,
        "build": crate::version::Build::this(),
        // How VIP connections reach the proxy (absent without a data plane).
        "steering": steering,
        // The DNS responder's addresses, UDP and TCP (empty when it is off).
        "dns": api.dns,
        "store": {
            "reachable": since_ms.is_none(),
            "unreachable_since_ms": since_ms,
            "followed_revision": api.followed.borrow().revision,
        },
    })
}

async fn list_hosts(api: &Api) -> Answer {
    let state = api.state().await?;
    // One store request per host, concurrently: a cluster of a hundred hosts answers in one
    // round trip's time. A host whose last renewal cannot be read is shown without it.
    let seen = futures::future::join_all(
        state
            .hosts
            .keys()
            .map(|name| api.catalog.host_last_seen(name)),
    )
    .await;
    let views: Vec<HostView> = state
        .hosts
        .values()
        .zip(seen)
        .map(|(h, seen)| HostView {
            host: (**h).clone(),
            instances: state
                .instances
                .values()
                .filter(|i| i.host.as_deref() == Some(h.name.as_str()))
                .count(),
            last_seen_unix_ms: seen
                .ok()
                .flatten()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as u64),
        })
        .collect();
    Ok(json(StatusCode::OK, &views))
}

async fn list_services(api: &Api) -> Answer {
    let state = api.state().await?;
    let infos: Vec<ServiceInfo> = state
        .services
        .values()
        .map(|s| api.service_info(&state, s))
        .collect();
    Ok(json(StatusCode::OK, &infos))
}

async fn service_info(api: &Api, name: &str) -> Answer {
    let state = api.state().await?;
    let service = state.services.get(name).ok_or_else(|| {
        Failure::from(CatalogError::NotFound(
            InvalidInput::new("service", "no service of this name").value(name),
        ))
    })?;
    Ok(json(StatusCode::OK, &api.service_info(&state, service)))
}

async fn add_service(api: &Api, req: Request<Incoming>) -> Answer {
    let service: Service = model::decode(&body(req).await?)?;
    in_vip_ranges(api, &service)?;
    api.catalog.add_service(&service).await?;
    // A service just created has no rules or instances yet: no need to re-read the catalog,
    // which made adding n services cost O(n^2).
    Ok(json(
        StatusCode::CREATED,
        &ServiceInfo {
            service,
            rules: vec![],
            instances: vec![],
            refused: None,
        },
    ))
}

/// With ranges configured, a service's VIP must be inside one; a service without a VIP takes
/// no address from any range.
fn in_vip_ranges(api: &Api, service: &Service) -> Result<(), InvalidInput> {
    // The ranges are IPv4 ones: with any configured, an IPv6 VIP is outside them all.
    let outside = |vip: std::net::SocketAddr| match vip {
        std::net::SocketAddr::V4(v4) => !api.vip_ranges.iter().any(|r| r.contains(v4.ip())),
        std::net::SocketAddr::V6(_) => true,
    };
    if !api.vip_ranges.is_empty() && service.address.is_some_and(outside) {
        let ranges: Vec<String> = api.vip_ranges.iter().map(|r| r.to_string()).collect();
        return Err(InvalidInput::new(
            "address",
            format!(
                "outside the VIP ranges of this host ({})",
                ranges.join(", ")
            ),
        )
        .value(service.address_text()));
    }
    Ok(())
}

/// `fluxctl service set`: the given fields change, in one transaction with the VIP claim.
async fn edit_service(api: &Api, req: Request<Incoming>, name: &str) -> Answer {
    let edit: model::ServiceEdit = model::decode(&body(req).await?)?;
    let service = api
        .catalog
        .edit_service(name, &edit, |s| in_vip_ranges(api, s))
        .await?;
    let state = api.state().await?;
    Ok(json(StatusCode::OK, &api.service_info(&state, &service)))
}

async fn put_rule(api: &Api, req: Request<Incoming>, svc: &str, name: &str) -> Answer {
    let rule: Rule = model::decode(&body(req).await?)?;
    if rule.service != svc {
        return Err(InvalidInput::new("service", "does not match the URL").value(&rule.service))?;
    }
    if rule.name != name {
        return Err(InvalidInput::new("name", "does not match the URL").value(&rule.name))?;
    }
    api.catalog.put_rule(&rule).await?;
    Ok(json(StatusCode::OK, &rule))
}

async fn add_instance(api: &Api, req: Request<Incoming>, svc: &str) -> Answer {
    let instance: Instance = model::decode(&body(req).await?)?;
    if instance.service != svc {
        return Err(
            InvalidInput::new("service", "does not match the URL").value(&instance.service)
        )?;
    }
    if instance.origin != Origin::Static {
        return Err(InvalidInput::new(
            "origin",
            "only static instances can be added by hand",
        ))?;
    }
    api.catalog.add_static_instance(&instance).await?;
    Ok(json(StatusCode::CREATED, &InstanceView::new(&instance)))
}

async fn query_instances(api: &Api, query: &str) -> Answer {
    let q = InstanceQuery::parse(query)?;
    let state = api.state().await?;
    let views: Vec<InstanceView> = state
        .instances
        .values()
        .map(|i| {
            InstanceView::with_health(i, api.health(i))
                .drained(state.is_drained(&i.service, &i.name))
        })
        .filter(|v| q.matches(v, &state.hosts))
        .collect();
    Ok(json(StatusCode::OK, &views))
}

/// Prometheus exposition (OpenMetrics text) of every routed instance's series.
fn metrics(api: &Api) -> Response<Body> {
    let text = api
        .dataplane
        .as_ref()
        .map(|d| d.metrics.encode())
        .unwrap_or_else(|| "# EOF\n".to_string());
    Response::builder()
        .status(StatusCode::OK)
        .header(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
        .body(Full::new(Bytes::from(text)))
        .expect("static headers are valid")
}

/// Chart lines for one service from this host's history: `?service=web&group=tag`.
async fn series(api: &Api, query: &str) -> Answer {
    let mut service = None;
    let mut group = GroupBy::Instance;
    let mut group_text = "instance".to_string();
    let mut cluster = false;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "service" => service = Some(v.into_owned()),
            "group" => {
                group = GroupBy::parse(&v).ok_or_else(|| {
                    InvalidInput::new("group", "must be instance, image, tag, host or label:NAME")
                        .value(v.as_ref())
                })?;
                group_text = v.into_owned();
            }
            "scope" => {
                cluster = match v.as_ref() {
                    "host" => false,
                    "cluster" => true,
                    _ => {
                        return Err(
                            InvalidInput::new("scope", "must be host or cluster").value(v.as_ref())
                        )?
                    }
                }
            }
            other => {
                return Err(InvalidInput::new(
                    other.to_string(),
                    "unknown query parameter",
                ))?
            }
        }
    }
    let service = service.ok_or_else(|| InvalidInput::new("service", "required"))?;
    let lines = api
        .dataplane
        .as_ref()
        .map(|d| {
            let routes = d.routes.load();
            let backends = routes.by_name.get(&service).map(|r| &r.backends[..]);
            let routed = backends.unwrap_or_default().iter();
            d.history
                .series(&service, &group, routed.map(|b| (&b.labels, &b.extra)))
        })
        .unwrap_or_default();
    let own = serde_json::json!({
        "host": api.host_name,
        "service": service,
        "interval_ms": crate::metrics::history::INTERVAL_MS,
        "series": lines,
    });
    if !cluster {
        return Ok(json(StatusCode::OK, &own));
    }
    let state = api.state().await?;
    let hosts: Vec<&model::Host> = state.hosts.values().map(|h| &**h).collect();
    let mut view = super::cluster::gather(&api.host_name, own, &hosts, &service, &group_text).await;
    view["host"] = serde_json::Value::String(api.host_name.clone());
    view["service"] = serde_json::Value::String(service);
    Ok(json(StatusCode::OK, &view))
}

/// Reads a request body, refusing anything larger than a record can be.
async fn body(req: Request<Incoming>) -> Result<Bytes, Failure> {
    match Limited::new(req.into_body(), model::MAX_RECORD_BYTES)
        .collect()
        .await
    {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) => Err(InvalidInput::new("body", format!("could not be read: {e}")).into()),
    }
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let mut bytes = serde_json::to_vec_pretty(value).unwrap_or_default();
    bytes.push(b'\n');
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .expect("static headers are valid")
}

fn text(status: StatusCode, s: &'static str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from_static(s.as_bytes())))
        .expect("static headers are valid")
}
