//! The data plane's start and stop: the proxy bound before any rule points at it, the
//! controller's first sync done before fluxd says it is ready, the rules removed (or kept) last.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use anyhow::Context;
use arc_swap::ArcSwap;
use netfilter::{CommandRunner, Netfilter};
use tokio::sync::watch;

use super::config::Config;
use super::memory;
use super::steering::Choice;
use super::store::etcd_addresses;
use crate::catalog::State;
use crate::controller::{Controller, Rules, Status};
use crate::docker::LocalInstances;
use crate::proxy::activation::{self, ListenEnv};
use crate::proxy::activation6;
use crate::proxy::route_table::RouteTable;
use crate::proxy::{Proxy, ProxyConfig, VipSource};

/// The running data plane: proxy and controller tasks, and what they share with the API.
pub(super) struct Dataplane {
    pub(super) status: Arc<Status>,
    pub(super) tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The proxy socket came from systemd: it outlives this fluxd and queues new connections
    /// for the next one, so the rules that lead to it stay.
    inherited_socket: bool,
}

impl Dataplane {
    /// Waits for the tasks (they watch the same stop signal; the proxy drains), then removes
    /// the rules unless told to keep them, or unless the proxy socket outlives this process,
    /// so that a restart leaves no VIP unrouted.
    pub(super) async fn stop(self, keep_rules: bool) {
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
        let removed = tokio::task::spawn_blocking(move || {
            let Some(r) = &status.rules else {
                return Ok(());
            };
            // The IPv6 rules (see `controller::nat6`) first, on either path.
            r.netfilter
                .remove6()
                .map_err(|e| format!("IPv6 rules: {e}"))?;
            match &r.steering {
                // Nat rules beside the steering: kernel-forwarded services'.
                Some(s) => s.remove().map_err(|e| e.to_string()).and_then(|()| {
                    match status.applied.lock().as_deref() {
                        Ok(Some(_)) => r.netfilter.remove().map_err(|e| e.to_string()),
                        _ => Ok(()),
                    }
                }),
                None => r.netfilter.remove().map_err(|e| e.to_string()),
            }
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
pub(super) async fn start_dataplane(
    config: &Config,
    steering: Choice,
    states: watch::Receiver<Arc<State>>,
    local: Option<watch::Receiver<Option<Arc<LocalInstances>>>>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Dataplane> {
    let routes = Arc::new(ArcSwap::from_pointee(RouteTable::default()));
    let inherited = activation::proxy_socket(&ListenEnv::from_process(), config.proxy_port)?;
    let mut proxy = Proxy::bind(
        ProxyConfig {
            listen: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, config.proxy_port),
            connect_timeout: config.connect_timeout,
            http_response_timeout: config.http_response_timeout,
            half_close_timeout: config.half_close_timeout,
            max_connections: config.max_connections,
            drain: config.drain,
            // On the bpf path the accepted socket's own address is the VIP; REDIRECT rewrote
            // it, and conntrack kept the original.
            vip_source: if steering.bpf.is_some() {
                VipSource::LocalAddress
            } else {
                VipSource::OriginalDst
            },
        },
        routes.clone(),
        inherited,
    )
    .with_context(|| format!("proxy_port: cannot listen on port {}", config.proxy_port))?;
    if proxy.inherited {
        // An IPv6 socket beside it, if fluxd.socket has one (README, "IPv6 and dual stack").
        if let Some(l6) = activation6::proxy_socket6(&ListenEnv::from_process(), config.proxy_port)
        {
            proxy
                .add_inherited6(l6)
                .context("proxy: cannot use the IPv6 socket passed by systemd")?;
        }
    }
    let inherited_socket = proxy.inherited;
    if let Some(s) = &steering.bpf {
        s.set_socket(proxy.socket())
            .context("steering: cannot hand the proxy socket to the program")?;
    }
    // IPv6 VIPs are steered by the program too when there is an IPv6 listener to hand them to
    // and IPv6 on lo for their local routes; otherwise they keep their ip6tables rules (a
    // route the kernel refuses would fail every route batch, IPv4 included).
    let steer_ipv6 = match (&steering.bpf, proxy.socket6()) {
        (Some(s), Some(l6)) if ipv6_on_loopback() => s
            .set_socket6(l6)
            .context("steering: cannot hand the IPv6 proxy socket to the program")
            .map(|()| true)?,
        (Some(_), _) => {
            tracing::info!(
                "steering: IPv6 VIPs go through ip6tables (no IPv6 listener, or IPv6 is off on lo)"
            );
            false
        }
        _ => false,
    };
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
        // The bpf path refuses by itself (no ipset needed).
        reject_empty: steering.bpf.is_some() || crate::controller::can_refuse_empty().await,
        steering: steering.bpf,
        steering_fallback: steering.fallback,
        steer_ipv6,
        bpf_dir: config.bpf_dir.clone(),
    };
    let status = Status::new(routes, Some(rules));
    let mut controller = Controller::new(status.clone(), config.host_name.clone(), local);
    let first = states.borrow().clone();
    controller.initial_sync(first).await;
    remove_other_path(&status).await;
    let udp = crate::proxy::udp::UdpRelay::new(
        config.udp,
        status.metrics.clone(),
        status.udp.subscribe(),
    );
    let tasks = vec![
        tokio::spawn(proxy.run(stop.clone())),
        tokio::spawn(udp.run(stop.clone())),
        tokio::spawn(controller.run(states, stop.clone())),
        tokio::spawn(sample_history(status.clone(), stop)),
    ];
    Ok(Dataplane {
        status,
        tasks,
        inherited_socket,
    })
}

/// Whether lo has IPv6 (`net.ipv6.conf.lo.disable_ipv6` is 0 in this namespace): the bpf
/// path's IPv6 VIP routes are local routes on lo.
fn ipv6_on_loopback() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/conf/lo/disable_ipv6")
        .is_ok_and(|v| v.trim() == "0")
}

/// Once this fluxd's own path is installed, removes what a fluxd of the other mode left (a
/// switch across a restart with `--keep-rules`): nat rules and sets under bpf, the bpf
/// steering's routes and pins under nat. In that order, VIPs are never unrouted meanwhile.
async fn remove_other_path(status: &Arc<Status>) {
    let status = status.clone();
    let result = tokio::task::spawn_blocking(move || {
        let rules = status.rules.as_ref()?;
        Some(match &rules.steering {
            Some(_) => {
                status.steered.lock().ok()?.as_ref()?;
                // Nat rules this fluxd installed (kernel-forwarded services) replaced any left.
                if status.applied.lock().ok()?.is_some() {
                    return None;
                }
                let leftovers = rules.netfilter.installed().map(|i| i != Default::default());
                match leftovers {
                    Ok(true) => rules.netfilter.remove().map(|()| true),
                    other => other,
                }
                .map_err(|e| e.to_string())
            }
            None => {
                status.applied.lock().ok()?.as_ref()?;
                steering::remove_leftovers(&rules.bpf_dir, &CommandRunner::new())
                    .map_err(|e| e.to_string())
            }
        })
    })
    .await;
    match result {
        Ok(Some(Ok(true))) => {
            tracing::info!("removed the other steering path's rules, left by an earlier fluxd")
        }
        Ok(Some(Err(e))) => {
            tracing::warn!(error = %e, "could not remove the other steering path's leftovers; run fluxd cleanup")
        }
        _ => {}
    }
}

/// Feeds the UI's history every interval until stop, and gives memory back to the kernel once
/// a burst of connections is over.
async fn sample_history(status: Arc<Status>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(
        crate::metrics::history::INTERVAL_MS,
    ));
    let mut trimmer = memory::Trimmer::default();
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
