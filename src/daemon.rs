//! `fluxd run`: opens the store, publishes this host, serves the local API, and on SIGTERM or
//! SIGINT stops in the reverse order so that nothing is left half-done.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::api::{routes::Api, server};
use crate::catalog::follow::Follower;
use crate::catalog::{Catalog, State};
use crate::config::{Config, StoreSpec};
use crate::controller::{Controller, Rules, Status};
use crate::docker::{Agent, AgentConfig, LocalInstances};
use crate::model::Host;
use crate::proxy::activation::{self, ListenEnv};
use crate::proxy::routes::RouteTable;
use crate::proxy::{Proxy, ProxyConfig};
use crate::store::{embedded::EmbeddedStore, etcd::EtcdStore, Store};
use arc_swap::ArcSwap;
use netfilter::{CommandRunner, Netfilter};
use std::net::{Ipv4Addr, SocketAddrV4};

pub async fn run(config: Config) -> anyhow::Result<()> {
    // Without VIP ranges every service VIP is matched through an ipset: without ipset, fail
    // now with one clear line rather than at the first service.
    if config.dataplane && config.vip_ranges.is_empty() {
        let check =
            tokio::task::spawn_blocking(|| Netfilter::new(CommandRunner::new()).check_ipset())
                .await?;
        if let Err(e) = check {
            anyhow::bail!(e);
        }
    }
    crate::systemd::status("opening the store");
    let store = open_store(&config).await?;
    // The lease is a second shorter than the promised TTL: etcd revokes expired leases on a
    // 500 ms scan, and `--host-ttl` is the bound operators rely on, not the lease length.
    let lease_ttl = config
        .host_ttl
        .saturating_sub(std::time::Duration::from_secs(1))
        .max(std::time::Duration::from_secs(1));
    store
        .start_session(lease_ttl)
        .await
        .context("store: cannot open this host's session")?;
    let catalog = Catalog::new(store.clone());
    // Bound before the host is published, so the record carries the port actually bound.
    let http = tokio::net::TcpListener::bind(config.http)
        .await
        .with_context(|| format!("http: cannot listen on {}", config.http))?;
    let host = Host {
        name: config.host_name.clone(),
        ip: config.host_ip,
        network_mode: config.network_mode,
        version: env!("CARGO_PKG_VERSION").to_string(),
        started_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        http: advertised_http(http.local_addr()?, config.host_ip),
    };
    catalog
        .register_host(&host)
        .await
        .context("store: cannot publish this host")?;

    let listener = server::bind_unix(&config.api, &config.api_group)?;
    let remote = match &config.remote_api {
        Some(r) => {
            let tls = server::RemoteTls::load(r)?;
            let l = tokio::net::TcpListener::bind(r.listen)
                .await
                .with_context(|| format!("api_listen: cannot listen on {}", r.listen))?;
            tracing::info!(listen = %l.local_addr()?, "remote API (TLS, bearer token) listening");
            Some((l, tls))
        }
        None => None,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let (follower, states) = Follower::start(store.clone())
        .await
        .context("store: cannot read services")?;
    let follow_task = tokio::spawn(follower.run(stop_rx.clone()));
    let mut local = None;
    let agent_task = config.docker.as_ref().map(|socket| {
        let (agent, local_rx) = Agent::new(
            AgentConfig {
                socket: socket.display().to_string(),
                host: config.host_name.clone(),
                host_ip: config.host_ip,
                mode: config.network_mode,
            },
            store.clone(),
            states.clone(),
        );
        local = Some(local_rx);
        tokio::spawn(agent.run(stop_rx.clone()))
    });
    let dataplane = if config.dataplane {
        crate::systemd::status("installing rules");
        Some(start_dataplane(&config, states.clone(), local, stop_rx.clone()).await?)
    } else {
        None
    };
    let api = Arc::new(Api {
        catalog: catalog.clone(),
        host_name: config.host_name.clone(),
        dataplane: dataplane.as_ref().map(|d| d.status.clone()),
        followed: states.clone(),
        vip_ranges: config.vip_ranges.clone(),
    });
    let http_task = tokio::spawn(server::serve_http(http, api.clone(), stop_rx.clone()));
    if let Some((l, tls)) = remote {
        tokio::spawn(server::serve_remote(l, tls, api.clone(), stop_rx.clone()));
    }
    let watchdog_stop = stop_rx.clone();
    let api_task = tokio::spawn(server::serve_unix(
        listener,
        config.api.clone(),
        api,
        stop_rx,
    ));
    tracing::info!(
        host = %config.host_name,
        ip = %config.host_ip,
        api = %config.api.display(),
        "fluxd ready"
    );
    // Rules are installed (start_dataplane waited for the first sync), the proxy, HTTP and API
    // listeners are bound and their servers running: tell systemd, then keep its watchdog fed
    // while the controller turns and no long-running task has ended.
    crate::systemd::ready(&ready_status(&config, dataplane.as_ref()));
    let mut live = crate::systemd::Liveness {
        controller: dataplane.as_ref().map(|d| d.status.clone()),
        tasks: vec![
            ("api", api_task.abort_handle()),
            ("http", http_task.abort_handle()),
        ],
    };
    if let Some(d) = &dataplane {
        live.tasks
            .extend(d.tasks.iter().map(|t| ("data plane", t.abort_handle())));
    }
    let watchdog = crate::systemd::spawn_watchdog(live, watchdog_stop);

    wait_for_stop_signal().await?;
    tracing::info!("stopping");
    crate::systemd::stopping();
    let _ = stop_tx.send(true);
    if let Some(w) = watchdog {
        let _ = w.await;
    }
    let _ = api_task.await;
    let _ = http_task.await;
    if let Some(d) = dataplane {
        d.stop(config.keep_rules).await;
    }
    if let Some(t) = agent_task {
        let _ = t.await;
    }
    let _ = follow_task.await;
    // A clean stop withdraws this host and its instances at once instead of after the TTL.
    store
        .close(true)
        .await
        .context("store: could not withdraw this host")?;
    tracing::info!("stopped");
    Ok(())
}

/// The STATUS= line sent with READY=1.
fn ready_status(config: &Config, dataplane: Option<&Dataplane>) -> String {
    match dataplane {
        Some(d) => format!(
            "routing {} services; proxy on port {}; API {}",
            d.status.routes.load().services.len(),
            config.proxy_port,
            config.api.display()
        ),
        None => format!("serving (no data plane); API {}", config.api.display()),
    }
}

/// The address other hosts can reach the HTTP API on: the host IP for a wildcard listener, the
/// listener's own address for a specific one, none for loopback.
fn advertised_http(bound: std::net::SocketAddr, host_ip: Ipv4Addr) -> Option<SocketAddrV4> {
    match bound {
        std::net::SocketAddr::V4(a) if a.ip().is_loopback() => None,
        std::net::SocketAddr::V4(a) if a.ip().is_unspecified() => {
            Some(SocketAddrV4::new(host_ip, a.port()))
        }
        std::net::SocketAddr::V4(a) => Some(a),
        std::net::SocketAddr::V6(a) if a.ip().is_unspecified() => {
            Some(SocketAddrV4::new(host_ip, a.port()))
        }
        std::net::SocketAddr::V6(_) => None,
    }
}

/// The running data plane: proxy and controller tasks, and what they share with the API.
struct Dataplane {
    status: Arc<Status>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The proxy socket came from systemd: it outlives this fluxd and queues new connections
    /// for the next one, so the rules that lead to it stay.
    inherited_socket: bool,
}

impl Dataplane {
    /// Waits for the tasks (they watch the same stop signal; the proxy drains), then removes
    /// the rules unless told to keep them, or unless the proxy socket outlives this process,
    /// so that a restart leaves no VIP unrouted.
    async fn stop(self, keep_rules: bool) {
        for t in self.tasks {
            let _ = t.await;
        }
        if keep_rules {
            tracing::info!("keeping flux's rules installed (--keep-rules)");
            return;
        }
        if self.inherited_socket {
            tracing::info!(
                "keeping flux's rules installed: the proxy socket from systemd queues new connections for the next fluxd (stopping fluxd.socket runs fluxd cleanup)"
            );
            return;
        }
        let status = self.status.clone();
        let removed = tokio::task::spawn_blocking(move || match &status.rules {
            Some(r) => r.netfilter.remove(),
            None => Ok(()),
        })
        .await;
        match removed {
            Ok(Ok(())) => tracing::info!("removed flux's rules"),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "could not remove flux's rules; run fluxd cleanup")
            }
            Err(e) => tracing::error!(error = %e, "rule removal task failed"),
        }
    }
}

/// Binds the proxy, installs the rules for the current store state, then follows the store.
/// The listener is bound before any rule points at it, so no redirected connection is refused.
async fn start_dataplane(
    config: &Config,
    states: watch::Receiver<Arc<State>>,
    local: Option<watch::Receiver<Option<Arc<LocalInstances>>>>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Dataplane> {
    let routes = Arc::new(ArcSwap::from_pointee(RouteTable::default()));
    let inherited = activation::proxy_socket(&ListenEnv::from_process(), config.proxy_port)?;
    let proxy = Proxy::bind(
        ProxyConfig {
            listen: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, config.proxy_port),
            connect_timeout: config.connect_timeout,
            http_response_timeout: config.http_response_timeout,
            half_close_timeout: config.half_close_timeout,
            max_connections: config.max_connections,
            drain: config.drain,
        },
        routes.clone(),
        inherited,
    )
    .with_context(|| format!("proxy_port: cannot listen on port {}", config.proxy_port))?;
    let inherited_socket = proxy.inherited;
    // Only a repair depends on conntrack (see controller::clear_unredirected): without it,
    // say so once and route anyway.
    let conntrack =
        tokio::task::spawn_blocking(|| Netfilter::new(CommandRunner::new()).check_conntrack())
            .await?;
    if let Err(e) = &conntrack {
        tracing::warn!(error = %e, "conntrack entries will not be cleared when a VIP is routed");
    }
    let rules = Rules {
        conntrack: std::sync::atomic::AtomicBool::new(conntrack.is_ok()),
        netfilter: Netfilter::new(CommandRunner::new()),
        reader: Netfilter::new(CommandRunner::with_prefix(vec![
            "nice".into(),
            "-n".into(),
            "19".into(),
        ])),
        proxy_port: config.proxy_port,
        bridge_interfaces: config.bridge_interfaces.clone(),
        vip_ranges: config.vip_ranges.clone(),
        protected_ranges: config.protected_ranges.clone(),
        protected_addresses: etcd_addresses(&config.store).await,
        reject_empty: crate::controller::can_refuse_empty().await,
    };
    let status = Status::new(routes, Some(rules));
    let mut controller = Controller::new(status.clone(), config.host_name.clone(), local);
    let first = states.borrow().clone();
    controller.initial_sync(first).await;
    let tasks = vec![
        tokio::spawn(proxy.run(stop.clone())),
        tokio::spawn(controller.run(states, stop.clone())),
        tokio::spawn(sample_history(status.clone(), stop)),
    ];
    Ok(Dataplane {
        status,
        tasks,
        inherited_socket,
    })
}

/// Feeds the UI's history every interval until stop, and gives memory back to the kernel once
/// a burst of connections is over.
async fn sample_history(status: Arc<Status>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(
        crate::metrics::history::INTERVAL_MS,
    ));
    let mut trimmer = crate::memory::Trimmer::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                status.sample();
                if trimmer.observe(status.open_connections()) {
                    tracing::debug!("returned free memory to the kernel after a burst");
                }
            }
            _ = stop.changed() => return,
        }
    }
}

async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match &config.store {
        StoreSpec::Embedded => {
            std::fs::create_dir_all(&config.state_dir).with_context(|| {
                format!("state_dir: cannot create {}", config.state_dir.display())
            })?;
            Arc::new(
                EmbeddedStore::open(&config.state_dir)
                    .await
                    .with_context(|| {
                        format!("store: cannot open {}", config.state_dir.display())
                    })?,
            )
        }
        StoreSpec::Etcd { endpoints } => Arc::new(
            EtcdStore::connect_with(endpoints, &config.etcd_prefix, &etcd_credentials(config)?)
                .await
                .map_err(|e| etcd_hint(e, &config.etcd_access))
                .with_context(|| {
                    let shown = endpoints.join(",");
                    match &config.etcd_access.ca_file {
                        Some(_) => format!(
                            "store: cannot connect to etcd at {} (TLS)",
                            shown.replace("http://", "https://")
                        ),
                        None => format!("store: cannot connect to etcd at {shown}"),
                    }
                })?,
        ),
    })
}

/// A connection that etcd closed says nothing of why: name the settings that usually explain it.
fn etcd_hint(e: crate::store::StoreError, access: &crate::config::EtcdAccess) -> anyhow::Error {
    use crate::store::StoreError;
    let hint = match (&e, &access.ca_file, &access.cert_file) {
        (StoreError::Unavailable(m), None, _) if m.contains("transport error") => {
            "; if etcd serves https, set --etcd-ca-file"
        }
        (StoreError::Unavailable(m), Some(_), None) if m.contains("transport error") => {
            "; if etcd requires client certificates, set --etcd-cert-file and --etcd-key-file"
        }
        _ => "",
    };
    anyhow::anyhow!("{e}{hint}")
}

/// Reads the files named by the etcd TLS and auth settings.
fn etcd_credentials(config: &Config) -> anyhow::Result<crate::store::etcd::Credentials> {
    let a = &config.etcd_access;
    let read = |p: &std::path::Path, key: &str| {
        std::fs::read(p).with_context(|| format!("{key}: cannot read {}", p.display()))
    };
    let password = match &a.password_file {
        Some(p) => Some(
            String::from_utf8(read(p, "etcd_password_file")?)
                .map_err(|_| anyhow::anyhow!("etcd_password_file: not text"))?
                .trim_end_matches(['\n', '\r'])
                .to_string(),
        ),
        None => None,
    };
    Ok(crate::store::etcd::Credentials {
        ca_pem: a
            .ca_file
            .as_deref()
            .map(|p| read(p, "etcd_ca_file"))
            .transpose()?,
        client_pem: match (&a.cert_file, &a.key_file) {
            (Some(c), Some(k)) => Some((read(c, "etcd_cert_file")?, read(k, "etcd_key_file")?)),
            _ => None,
        },
        user: a.user.clone().zip(password),
    })
}

async fn wait_for_stop_signal() -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// The IPv4 addresses of the etcd endpoints, for the VIP guard: a VIP on one of them would cut
/// this host off its store. Host names are resolved once, here; one that does not resolve
/// within a second is left out with a warning (the store connection reports it anyway).
async fn etcd_addresses(store: &StoreSpec) -> Vec<(Ipv4Addr, String)> {
    let StoreSpec::Etcd { endpoints } = store else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for endpoint in endpoints {
        let hostport = endpoint
            .strip_prefix("http://")
            .or_else(|| endpoint.strip_prefix("https://"))
            .unwrap_or(endpoint);
        let what = format!("the etcd endpoint {endpoint}");
        let resolved =
            tokio::time::timeout(Duration::from_secs(1), tokio::net::lookup_host(hostport)).await;
        match resolved {
            Ok(Ok(addrs)) => out.extend(addrs.filter_map(|a| match a {
                std::net::SocketAddr::V4(v4) => Some((*v4.ip(), what.clone())),
                std::net::SocketAddr::V6(_) => None,
            })),
            Ok(Err(e)) => {
                tracing::warn!(endpoint = %endpoint, error = %e, "cannot resolve the etcd endpoint; the VIP guard does not protect it")
            }
            Err(_) => {
                tracing::warn!(endpoint = %endpoint, "resolving the etcd endpoint timed out; the VIP guard does not protect it")
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn etcd_endpoints_become_guarded_addresses() {
        let store = StoreSpec::Etcd {
            endpoints: vec![
                "http://203.0.113.7:2379".into(),
                "https://localhost:2379".into(),
            ],
        };
        let got = etcd_addresses(&store).await;
        assert!(got.contains(&(
            "203.0.113.7".parse().unwrap(),
            "the etcd endpoint http://203.0.113.7:2379".to_string()
        )));
        assert!(got.iter().any(|(ip, _)| ip.is_loopback()), "{got:?}");
        assert!(etcd_addresses(&StoreSpec::Embedded).await.is_empty());
    }
}
