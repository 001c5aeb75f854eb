//! The Docker agent: keeps this host's container instances in the store level with the running
//! containers and the rules. It lists containers at start and after every reconnect, follows
//! the event stream, and resyncs fully on a timer (a missed `die` must not leave a dead
//! instance behind). While Docker is unreachable it keeps what it last knew.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use bollard::models::EventMessage;
use bollard::query_parameters::{EventsOptions, ListContainersOptions};
use bollard::Docker;
use futures::StreamExt;
use tokio::sync::watch;
use tokio::time::Instant;

use super::address::{self, AddressContext};
use super::container::Container;
use super::image::is_image_id;
use super::matching::matches;
use crate::catalog::{keys, State};
use crate::model::{self, validate, ContainerInfo, Instance, NetworkMode, Origin};
use crate::store::{Cond, Op, Store, Txn};

/// Full resync period, the safety net for events Docker did not deliver.
const RESYNC: Duration = Duration::from_secs(30);
/// A container sent SIGTERM/SIGKILL leaves the pool at once; if it is still running this long
/// afterwards (it ignored the signal), it comes back.
const STOPPING_GRACE: Duration = Duration::from_secs(15);
/// Labels copied into published instance records: enough to group by, small enough that one
/// container's labels cannot blow up a store record.
const MAX_LABELS: usize = 32;
const MAX_LABEL_VALUE: usize = 256;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Path of the Docker socket.
    pub socket: String,
    pub host: String,
    pub host_ip: Ipv4Addr,
    pub mode: NetworkMode,
}

pub struct Agent {
    config: AgentConfig,
    store: Arc<dyn Store>,
    states: watch::Receiver<Arc<State>>,
    /// Running containers by full id, as last inspected.
    containers: HashMap<String, Container>,
    /// Containers that were sent a stop signal, and when.
    stopping: HashMap<String, Instant>,
    /// What this agent last wrote per key, so unchanged instances are not written again while
    /// the catalog state lags behind our own writes. Cleared at every full resync.
    written: HashMap<String, Option<Instance>>,
    /// This host's instances as the agent sees them, for the local data plane: routing to a
    /// local container must not wait for (or depend on) the store.
    local: watch::Sender<Option<Arc<LocalInstances>>>,
    /// When a failed store write is tried again; None when everything is written.
    retry_at: Option<Instant>,
}

/// This host's container instances by key, as last computed from Docker and the rules.
pub type LocalInstances = BTreeMap<String, Instance>;

impl Agent {
    /// Also returns the channel on which the agent publishes this host's instances; it holds
    /// None until Docker has been listed once.
    pub fn new(
        config: AgentConfig,
        store: Arc<dyn Store>,
        states: watch::Receiver<Arc<State>>,
    ) -> (Agent, watch::Receiver<Option<Arc<LocalInstances>>>) {
        let (local, local_rx) = watch::channel(None);
        let agent = Agent {
            config,
            store,
            states,
            containers: HashMap::new(),
            stopping: HashMap::new(),
            written: HashMap::new(),
            local,
            retry_at: None,
        };
        (agent, local_rx)
    }

    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(200);
        let mut outage_logged = false;
        loop {
            let docker = match self.connect().await {
                Ok(d) => d,
                Err(e) => {
                    if !outage_logged {
                        tracing::warn!(socket = %self.config.socket, error = %e, "Docker unavailable; keeping current instances and retrying");
                        outage_logged = true;
                    }
                    if self.wait_or_reconcile(backoff, &mut stop).await {
                        return;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            };
            if outage_logged {
                tracing::info!("Docker is back; resyncing");
                outage_logged = false;
            }
            backoff = Duration::from_millis(200);
            // Subscribe before listing so that nothing between the two is missed.
            let filters = HashMap::from([("type".to_string(), vec!["container".to_string()])]);
            let mut events = docker.events(Some(EventsOptions {
                filters: Some(filters),
                ..Default::default()
            }));
            // Stop signals seen before the connection broke are history: a daemon that went
            // away stopped its containers, and those with a restart policy were started again
            // before its API answered, with no `start` event for us to see. Kept, they would
            // hold running containers out of the pool for STOPPING_GRACE, and until the next
            // periodic resync. A container still stopping will send its `die` on the new
            // stream, which is subscribed to before the list below.
            self.stopping.clear();
            if let Err(e) = self.resync(&docker).await {
                tracing::warn!(error = %e, "listing containers failed; retrying");
                continue;
            }
            let mut timer = tokio::time::interval_at(Instant::now() + RESYNC, RESYNC);
            loop {
                tokio::select! {
                    ev = events.next() => match ev {
                        Some(Ok(ev)) => self.on_event(&docker, ev).await,
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "Docker event stream failed; reconnecting");
                            break;
                        }
                        None => {
                            tracing::info!("Docker event stream ended; reconnecting");
                            break;
                        }
                    },
                    changed = self.states.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        self.reconcile().await;
                    }
                    _ = timer.tick() => {
                        if let Err(e) = self.resync(&docker).await {
                            tracing::warn!(error = %e, "resync failed; reconnecting");
                            break;
                        }
                    }
                    _ = sleep_until_opt(self.retry_at) => self.reconcile().await,
                    _ = stop.changed() => return,
                }
            }
        }
    }

    async fn connect(&self) -> Result<Docker, bollard::errors::Error> {
        let docker =
            Docker::connect_with_unix(&self.config.socket, 30, bollard::API_DEFAULT_VERSION)?;
        // Speak the daemon's API version, not the crate's newest (dockerd 20.10 knows 1.41).
        docker.negotiate_version().await
    }

    /// Sleeps for `d`, still applying rule changes to the containers already known. Returns
    /// true when asked to stop.
    async fn wait_or_reconcile(&mut self, d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
        let until = Instant::now() + d;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return false,
                _ = sleep_until_opt(self.retry_at) => self.reconcile().await,
                changed = self.states.changed() => {
                    if changed.is_err() {
                        return true;
                    }
                    self.reconcile().await;
                }
                _ = stop.changed() => return true,
            }
        }
    }

    /// Replaces everything known with a fresh list of running containers.
    async fn resync(&mut self, docker: &Docker) -> Result<(), bollard::errors::Error> {
        let list = docker
            .list_containers(Some(ListContainersOptions::default()))
            .await?;
        let mut fresh = HashMap::new();
        for summary in list {
            let Some(id) = summary.id else { continue };
            if let Some(c) = inspect(docker, &id).await {
                fresh.insert(id, c);
            }
        }
        self.containers = fresh;
        self.stopping
            .retain(|id, _| self.containers.contains_key(id));
        self.written.clear();
        self.reconcile().await;
        Ok(())
    }

    async fn on_event(&mut self, docker: &Docker, ev: EventMessage) {
        let Some(actor) = ev.actor else { return };
        let Some(id) = actor.id else { return };
        let action = ev.action.unwrap_or_default();
        match action.as_str() {
            "kill" => {
                let signal = actor
                    .attributes
                    .as_ref()
                    .and_then(|a| a.get("signal"))
                    .map(String::as_str)
                    .unwrap_or("");
                // `docker stop` sends TERM, then KILL: stop sending new connections now, while
                // the container shuts down, rather than after it died.
                if matches!(signal, "15" | "9" | "2" | "SIGTERM" | "SIGKILL" | "SIGINT") {
                    self.stopping.insert(id, Instant::now());
                } else {
                    return;
                }
            }
            "destroy" => {
                self.containers.remove(&id);
                self.stopping.remove(&id);
            }
            a if a == "start"
                || a == "restart"
                || a == "die"
                || a == "stop"
                || a == "pause"
                || a == "unpause"
                || a == "rename"
                || a == "update"
                || a.starts_with("health_status") =>
            {
                if a == "start" || a == "restart" || a == "unpause" {
                    self.stopping.remove(&id);
                }
                match inspect(docker, &id).await {
                    Some(c) => {
                        self.containers.insert(id, c);
                    }
                    None => {
                        self.containers.remove(&id);
                    }
                }
            }
            _ => return,
        }
        self.reconcile().await;
    }

    /// Writes the difference between the instances this host should publish and those it has.
    async fn reconcile(&mut self) {
        let state = self.states.borrow().clone();
        let now = Instant::now();
        self.stopping
            .retain(|_, since| now.duration_since(*since) < STOPPING_GRACE);
        let desired = self.desired(&state);
        if self.local.borrow().as_deref() != Some(&desired) {
            self.local.send_replace(Some(Arc::new(desired.clone())));
        }
        self.retry_at = None;
        let mut actual: BTreeMap<String, &Instance> = BTreeMap::new();
        for i in state.instances.values() {
            if i.origin == Origin::Container && i.host.as_deref() == Some(&self.config.host) {
                actual.insert(keys::instance(&i.service, &i.name), i);
            }
        }
        for (key, inst) in &desired {
            let known = self.written.get(key).map(Option::as_ref);
            let up_to_date = match known {
                Some(w) => w == Some(inst),
                None => actual.get(key).copied() == Some(inst),
            };
            if up_to_date {
                continue;
            }
            let txn = Txn {
                when: vec![Cond::Exists(keys::service(&inst.service))],
                then: vec![Op::Put {
                    key: key.clone(),
                    value: model::encode(inst),
                    bound: true,
                }],
            };
            match self.store.txn(txn).await {
                Ok(_) => {
                    self.written.insert(key.clone(), Some(inst.clone()));
                }
                Err(e) => {
                    tracing::debug!(instance = %key, error = %e, "cannot publish instance; will retry");
                    self.retry_soon();
                }
            }
        }
        let stale: Vec<String> = actual
            .keys()
            .chain(
                self.written
                    .iter()
                    .filter(|(_, v)| v.is_some())
                    .map(|(k, _)| k),
            )
            .filter(|k| !desired.contains_key(*k))
            .cloned()
            .collect();
        for key in stale {
            if self.written.get(&key) == Some(&None) {
                continue;
            }
            match self.store.delete(&key).await {
                Ok(_) => {
                    self.written.insert(key, None);
                }
                Err(e) => {
                    tracing::debug!(instance = %key, error = %e, "cannot withdraw instance; will retry");
                    self.retry_soon();
                }
            }
        }
        // A container that ignored its stop signal comes back when its grace ends: no Docker
        // event marks that moment, so a timer must.
        if let Some(end) = self.stopping.values().min().map(|t| *t + STOPPING_GRACE) {
            self.retry_at = Some(self.retry_at.map_or(end, |r| r.min(end)));
        }
    }

    /// A store write failed (the store logs the outage once): try the difference again soon.
    fn retry_soon(&mut self) {
        self.retry_at
            .get_or_insert(Instant::now() + Duration::from_millis(500));
    }

    /// Every (service, container) pair that a rule selects, as the instance to publish.
    fn desired(&self, state: &State) -> BTreeMap<String, Instance> {
        let mut out = BTreeMap::new();
        // Reconcile runs on every new catalog state, so a host joining or leaving re-decides
        // the addresses that only this host can reach at once.
        let ctx = AddressContext {
            mode: self.config.mode,
            host_ip: self.config.host_ip,
            only_host: only_host(state, &self.config.host),
        };
        for c in self.containers.values() {
            if !c.serving || self.stopping.contains_key(&c.id) {
                continue;
            }
            for service in state.services.values() {
                // Rules come sorted by name: the first that matches names the instance's rule.
                let Some(rule) = state
                    .rules_of(&service.name)
                    .find(|r| matches(&r.selector, c))
                else {
                    continue;
                };
                let port = rule
                    .instance_port
                    .unwrap_or_else(|| service.default_instance_port());
                let vip_v6 = service.address.is_some_and(|a| a.is_ipv6());
                let addressed = if service.protocol == crate::model::Protocol::Udp {
                    address::choose_udp(c, &ctx, port, vip_v6)
                } else {
                    address::choose_for(c, &ctx, port, vip_v6)
                };
                let instance = Instance {
                    service: service.name.clone(),
                    name: c.short_id(),
                    origin: Origin::Container,
                    host: Some(self.config.host.clone()),
                    rule: Some(rule.name.clone()),
                    container: Some(ContainerInfo {
                        id: c.id.clone(),
                        name: c.name.chars().take(128).collect(),
                        image: c.image.repository.clone(),
                        tag: c.image.tag.clone(),
                        labels: publishable_labels(&c.labels),
                        address_note: addressed.note,
                    }),
                    address: addressed.address,
                };
                out.insert(keys::instance(&service.name, &instance.name), instance);
            }
        }
        out
    }
}

/// Whether the catalog knows no host but this one: true on the embedded store, and on etcd while
/// no other fluxd is alive.
fn only_host(state: &State, own: &str) -> bool {
    state.hosts.keys().all(|h| h == own)
}

async fn sleep_until_opt(due: Option<Instant>) {
    match due {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Inspects one container; None if it is gone or not running. An image given by id is named by
/// its first repository tag, so that image selectors still work.
async fn inspect(docker: &Docker, id: &str) -> Option<Container> {
    let c = docker.inspect_container(id, None).await.ok()?;
    let running = c.state.as_ref().and_then(|s| s.running).unwrap_or(false);
    if !running {
        return None;
    }
    let config_image = c
        .config
        .as_ref()
        .and_then(|c| c.image.clone())
        .unwrap_or_default();
    let resolved = if is_image_id(&config_image) {
        docker
            .inspect_image(&config_image)
            .await
            .ok()
            .and_then(|i| i.repo_tags)
            .and_then(|t| t.into_iter().next())
    } else {
        None
    };
    let container = Container::from_inspect(&c, resolved.as_deref())?;
    // Debug only: a container keeps its odd bindings for its whole life, and its instance's
    // note already tells the user when they cost it its address.
    for why in &container.skipped {
        tracing::debug!(container = %container.name, reason = %why, "port binding skipped");
    }
    Some(container)
}

/// Labels that are valid selector pairs and short enough to publish; the rest (malformed or
/// huge, as anyone may set) are left out of the record rather than refused.
pub fn publishable_labels(labels: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    labels
        .iter()
        .filter(|(k, v)| {
            v.len() <= MAX_LABEL_VALUE
                && validate::pairs("labels", &BTreeMap::from([(k.to_string(), v.to_string())]))
                    .is_ok()
        })
        .take(MAX_LABELS)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}
