//! `fluxd run`, phase by phase: check what the data plane needs, open the store and this
//! host's session, publish the host, bind every listener, start the sources (store follower,
//! Docker agent), the data plane and the API servers, tell systemd, then on SIGTERM or SIGINT
//! stop in the reverse order so that nothing is left half-done.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use netfilter::{CommandRunner, Netfilter};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::config::Config;
use super::dataplane::{start_dataplane, Dataplane};
use super::steering;
use super::store::open_store;
use super::systemd;
use crate::api::{handlers::Api, server};
use crate::catalog::follow::Follower;
use crate::catalog::{Catalog, State};
use crate::docker::{Agent, AgentConfig, LocalInstances};
use crate::model::Host;
use crate::store::Store;

pub async fn run(config: Config) -> anyhow::Result<()> {
    // Before anything else: nat needs ipset (checked next), bpf does not.
    let steering = steering::choose(&config).await?;
    check_prerequisites(&config, steering.bpf.is_some()).await?;
    systemd::status("opening the store");
    let store = open_session(&config).await?;
    let catalog = Catalog::new(store.clone());
    let mut listeners = Listeners::bind(&config).await?;
    publish_host(&catalog, &config, &listeners.http).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let sources = Sources::start(&config, &store, &stop_rx).await?;
    let dataplane = if config.dataplane {
        systemd::status("installing rules");
        let local = sources.local.clone();
        Some(
            start_dataplane(
                &config,
                steering,
                sources.states.clone(),
                local,
                stop_rx.clone(),
            )
            .await?,
        )
    } else {
        None
    };
    let dns_addresses = listeners
        .dns
        .as_ref()
        .map(|l| l.addresses())
        .unwrap_or_default();
    let dns_tasks = match (&config.dns, listeners.dns.take()) {
        (Some(settings), Some(l)) => super::dns::start(
            settings,
            l,
            sources.states.clone(),
            dataplane.as_ref(),
            &stop_rx,
        )?,
        _ => Vec::new(),
    };
    let servers = Servers::start(
        listeners,
        Arc::new(Api {
            catalog: catalog.clone(),
            host_name: config.host_name.clone(),
            dataplane: dataplane.as_ref().map(|d| d.status.clone()),
            followed: sources.states.clone(),
            vip_ranges: config.vip_ranges.clone(),
            dns: dns_addresses,
        }),
        &config,
        &stop_rx,
    );
    tracing::info!(
        host = %config.host_name,
        ip = %config.host_ip,
        api = %config.api.display(),
        "fluxd ready"
    );
    let watchdog = notify_ready(&config, dataplane.as_ref(), &servers, stop_rx);

    wait_for_stop_signal().await?;
    tracing::info!("stopping");
    systemd::stopping();
    let _ = stop_tx.send(true);
    if let Some(w) = watchdog {
        let _ = w.await;
    }
    servers.stopped().await;
    for t in dns_tasks {
        let _ = t.await;
    }
    if let Some(d) = dataplane {
        d.stop(config.keep_rules).await;
    }
    sources.stopped().await;
    // A clean stop withdraws this host and its instances at once instead of after the TTL.
    store
        .close(true)
        .await
        .context("store: could not withdraw this host")?;
    tracing::info!("stopped");
    Ok(())
}

/// On the nat path without VIP ranges every service VIP is matched through an ipset: without
/// ipset, fail now with one clear line rather than at the first service. The bpf path needs no
/// ipset.
async fn check_prerequisites(config: &Config, bpf: bool) -> anyhow::Result<()> {
    if config.dataplane && !bpf && config.vip_ranges.is_empty() {
        let check =
            tokio::task::spawn_blocking(|| Netfilter::new(CommandRunner::new()).check_ipset())
                .await?;
        if let Err(e) = check {
            anyhow::bail!(e);
        }
    }
    Ok(())
}

/// Opens the store and this host's session, which every host-bound record hangs on.
async fn open_session(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let store = open_store(config).await?;
    // The lease is a second shorter than the promised TTL: etcd revokes expired leases on a
    // 500 ms scan, and `--host-ttl` is the bound operators rely on, not the lease length.
    let lease_ttl = config
        .host_ttl
        .saturating_sub(Duration::from_secs(1))
        .max(Duration::from_secs(1));
    store
        .start_session(lease_ttl)
        .await
        .context("store: cannot open this host's session")?;
    Ok(store)
}

/// The HTTP listener is bound before the host is published, so the record carries the port
/// actually bound.
async fn publish_host(
    catalog: &Catalog,
    config: &Config,
    http: &tokio::net::TcpListener,
) -> anyhow::Result<()> {
    let host = Host {
        name: config.host_name.clone(),
        ip: config.host_ip,
        network_mode: config.network_mode,
        version: crate::version::VERSION.to_string(),
        commit: Some(crate::version::COMMIT.to_string()),
        started_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        http: advertised_http(http.local_addr()?, config.host_ip),
    };
    catalog
        .register_host(&host)
        .await
        .context("store: cannot publish this host")
}

/// The API's listeners, bound before anything is served so that a port in use stops fluxd at
/// start with one line.
struct Listeners {
    http: tokio::net::TcpListener,
    unix: tokio::net::UnixListener,
    remote: Option<(tokio::net::TcpListener, server::RemoteTls)>,
    /// `--dns-listen`: taken by the DNS responder when it starts.
    dns: Option<crate::dns::server::Listeners>,
}

impl Listeners {
    async fn bind(config: &Config) -> anyhow::Result<Listeners> {
        let http = tokio::net::TcpListener::bind(config.http)
            .await
            .with_context(|| format!("http: cannot listen on {}", config.http))?;
        let unix = server::bind_unix(&config.api, &config.api_group)?;
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
        let dns = match &config.dns {
            Some(settings) => Some(crate::dns::server::Listeners::bind(settings).await?),
            None => None,
        };
        Ok(Listeners {
            http,
            unix,
            remote,
            dns,
        })
    }
}

/// What feeds the data plane: the store follower's catalog states and the Docker agent's
/// view of this host's containers.
struct Sources {
    states: watch::Receiver<Arc<State>>,
    local: Option<watch::Receiver<Option<Arc<LocalInstances>>>>,
    follow_task: JoinHandle<()>,
    agent_task: Option<JoinHandle<()>>,
}

impl Sources {
    async fn start(
        config: &Config,
        store: &Arc<dyn Store>,
        stop: &watch::Receiver<bool>,
    ) -> anyhow::Result<Sources> {
        let (follower, states) = Follower::start(store.clone())
            .await
            .context("store: cannot read services")?;
        let follow_task = tokio::spawn(follower.run(stop.clone()));
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
            tokio::spawn(agent.run(stop.clone()))
        });
        Ok(Sources {
            states,
            local,
            follow_task,
            agent_task,
        })
    }

    /// Waits for the follower and the agent, which watch the same stop signal.
    async fn stopped(self) {
        if let Some(t) = self.agent_task {
            let _ = t.await;
        }
        let _ = self.follow_task.await;
    }
}

/// The API servers: the local unix socket, the read-only HTTP listener and the remote API.
struct Servers {
    api_task: JoinHandle<()>,
    http_task: JoinHandle<()>,
}

impl Servers {
    fn start(
        listeners: Listeners,
        api: Arc<Api>,
        config: &Config,
        stop: &watch::Receiver<bool>,
    ) -> Servers {
        let http_task = tokio::spawn(server::serve_http(
            listeners.http,
            api.clone(),
            stop.clone(),
        ));
        if let Some((l, tls)) = listeners.remote {
            tokio::spawn(server::serve_remote(l, tls, api.clone(), stop.clone()));
        }
        let api_task = tokio::spawn(server::serve_unix(
            listeners.unix,
            config.api.clone(),
            api,
            stop.clone(),
        ));
        Servers {
            api_task,
            http_task,
        }
    }

    async fn stopped(self) {
        let _ = self.api_task.await;
        let _ = self.http_task.await;
    }
}

/// Rules are installed (start_dataplane waited for the first sync), the proxy, HTTP and API
/// listeners are bound and their servers running: tell systemd, then keep its watchdog fed
/// while the controller turns and no long-running task has ended.
fn notify_ready(
    config: &Config,
    dataplane: Option<&Dataplane>,
    servers: &Servers,
    stop: watch::Receiver<bool>,
) -> Option<JoinHandle<()>> {
    systemd::ready(&ready_status(config, dataplane));
    let mut live = systemd::Liveness {
        controller: dataplane.map(|d| d.status.clone()),
        tasks: vec![
            ("api", servers.api_task.abort_handle()),
            ("http", servers.http_task.abort_handle()),
        ],
    };
    if let Some(d) = dataplane {
        live.tasks
            .extend(d.tasks.iter().map(|t| ("data plane", t.abort_handle())));
    }
    systemd::spawn_watchdog(live, stop)
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

async fn wait_for_stop_signal() -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
