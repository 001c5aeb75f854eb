//! One udp service's relay: reads the datagrams clients send to its VIP:port, gives each new
//! client address (a flow) an instance by the service's balancing policy and a connected
//! upstream socket of its own, and carries the instance's replies back from the VIP.
//!
//! A flow keeps its instance until it is idle for `--udp-idle-ms`, its instance leaves the
//! route (at once: the next datagram opens a flow to a live instance, so a removed instance is
//! never a black hole, unlike a stale conntrack entry), or the instance answers with ICMP port
//! unreachable (it is marked failed, as a failed connect is, and the flow moves).

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::flows::{Budget, FlowLike, Flows, Slot};
use super::socket::{self, MAX_DATAGRAM};
use crate::metrics::udp::{DropReason, FlowMetrics};
use crate::proxy::health::now_ms;
use crate::proxy::route_table::{Backend, ServiceRoute};

/// Replies read per wake-up of a flow's task before it lets others run.
const REPLY_BATCH: usize = 32;

/// What a service's relay follows: its route (instances, policy) and the interfaces whose
/// datagrams it takes (None: any).
#[derive(Debug, Clone)]
pub struct Inputs {
    pub route: Arc<ServiceRoute>,
    pub ifaces: Option<Arc<BTreeSet<u32>>>,
}

/// Limits and series shared by every service's relay.
#[derive(Clone)]
pub struct Shared {
    pub budget: Arc<Budget>,
    pub idle: Duration,
    pub metrics: FlowMetrics,
}

thread_local! {
    /// Replies are read into this and sent on at once, so an idle flow holds no buffer.
    static REPLY_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; MAX_DATAGRAM]);
}

/// Shared between a flow's entry and the task carrying its replies.
#[derive(Debug, Default)]
struct FlowState {
    last_ms: AtomicU64,
    dead: AtomicBool,
}

/// One client address's flow.
struct Flow {
    backend: Arc<Backend>,
    upstream: Arc<UdpSocket>,
    state: Arc<FlowState>,
    replies: JoinHandle<()>,
    _slot: Slot,
}

impl FlowLike for Flow {
    fn last_ms(&self) -> u64 {
        self.state.last_ms.load(Ordering::Relaxed)
    }
    fn dead(&self) -> bool {
        self.state.dead.load(Ordering::Relaxed)
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.replies.abort();
        self.backend.metrics.active.dec();
    }
}

/// Relays `socket`'s datagrams until `inputs`' sender is dropped (the service is gone) or
/// `stop` fires.
pub async fn run(
    name: String,
    socket: UdpSocket,
    redirected: bool,
    mut inputs: watch::Receiver<Inputs>,
    shared: Shared,
    mut stop: watch::Receiver<bool>,
) {
    let socket = Arc::new(socket);
    let gauge = shared.metrics.flows(&name);
    let mut flows: Flows<Flow> = Flows::default();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let idle_ms = shared.idle.as_millis() as u64;
    let mut sweep = tokio::time::interval(
        (shared.idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(1)),
    );
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A copy of the latest inputs, refreshed when they change, so that a datagram takes no
    // lock and no reference count.
    let mut current = inputs.borrow_and_update().clone();
    loop {
        tokio::select! {
            arrival = socket::recv_arrival(&socket, &mut buf) => match arrival {
                Ok(a) => {
                    let relay = Relay { name: &name, socket: &socket, shared: &shared, redirected };
                    on_datagram(&relay, &current, &mut flows, a, &buf[..a.len]);
                }
                // ICMP errors for replies to clients that went away, and the like: the
                // next datagram is unaffected.
                Err(e) => tracing::trace!(service = %name, error = %e, "udp receive"),
            },
            changed = inputs.changed() => {
                if changed.is_err() {
                    break;
                }
                current = inputs.borrow_and_update().clone();
                let moved = flows.retain(|f| routed(&current.route, &f.backend));
                if moved > 0 {
                    tracing::debug!(service = %name, moved, "flows moved off instances that left");
                }
            }
            _ = sweep.tick() => {
                flows.expire(now_ms(), idle_ms);
            }
            _ = stop.changed() => break,
        }
        gauge.set(flows.len() as i64);
    }
    gauge.set(0);
}

/// One service's relay, as a datagram's handling needs it.
#[derive(Clone, Copy)]
struct Relay<'a> {
    name: &'a str,
    /// The socket clients send to; replies leave from it.
    socket: &'a Arc<UdpSocket>,
    shared: &'a Shared,
    /// Whether datagrams reach it through a nat `REDIRECT` (replies then need their source).
    redirected: bool,
}

/// Whether `backend` (a flow's instance) is still one of `route`'s, at the same address.
fn routed(route: &ServiceRoute, backend: &Backend) -> bool {
    route
        .backends
        .iter()
        .any(|b| b.instance == backend.instance && b.addr == backend.addr)
}

/// One datagram from a client: onto its flow, or a new flow when it has none (or its flow's
/// instance refused it).
fn on_datagram(
    relay: &Relay,
    inputs: &Inputs,
    flows: &mut Flows<Flow>,
    arrival: socket::Arrival,
    payload: &[u8],
) {
    let Relay {
        name,
        socket,
        shared,
        redirected,
    } = *relay;
    // Replies of a redirected flow leave from where its datagrams arrived.
    let reply_from = if redirected { arrival.local } else { None };
    // The bpf path's local route makes the VIP reachable from any interface; like the steering
    // program for TCP, only the host itself and its bridges may use it.
    if let Some(ifaces) = &inputs.ifaces {
        if !ifaces.contains(&arrival.ifindex) {
            tracing::trace!(service = %name, ifindex = arrival.ifindex, to = ?arrival.local, "datagram from an unsteered interface dropped");
            return;
        }
    }
    if let Some(flow) = flows.live(&arrival.client) {
        // Counted before it is sent (see `carry_replies`); a datagram the socket refuses is
        // counted anyway, as it reached fluxd for that instance.
        count_to_instance(&flow.backend, payload.len());
        match send(&flow.upstream, payload) {
            Ok(_) => {
                flow.state.last_ms.store(now_ms(), Ordering::Relaxed);
                return;
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                refused(&flow.backend, &flow.state);
            }
            // A full socket buffer drops the datagram, as the network may.
            Err(_) => return,
        }
        // Refused: the flow is dead; `live` removes it below and a new one takes this datagram.
        flows.live(&arrival.client);
    }
    let Some(slot) = shared.budget.take() else {
        shared.metrics.dropped(name, DropReason::TableFull);
        return;
    };
    let route = &inputs.route;
    let Some(backend) = route
        .connect_order(Some(arrival.client.ip()))
        .into_iter()
        .find(|b| route.takes_new(b))
    else {
        shared.metrics.dropped(name, DropReason::NoInstance);
        return;
    };
    let upstream = match socket::connect_upstream(backend.addr) {
        Ok(u) => Arc::new(u),
        Err(e) => {
            tracing::debug!(service = %name, error = %e, "cannot open an upstream socket");
            shared.metrics.dropped(name, DropReason::Socket);
            return;
        }
    };
    let state = Arc::new(FlowState {
        last_ms: AtomicU64::new(now_ms()),
        dead: AtomicBool::new(false),
    });
    count_to_instance(&backend, payload.len());
    let _ = send(&upstream, payload);
    backend.metrics.connections.inc();
    backend.metrics.active.inc();
    let replies = tokio::spawn(carry_replies(
        upstream.clone(),
        socket.clone(),
        (arrival.client, reply_from),
        backend.clone(),
        state.clone(),
    ));
    flows.insert(
        arrival.client,
        Flow {
            backend,
            upstream,
            state,
            replies,
            _slot: slot,
        },
    );
}

/// Sends on a connected socket at once: tokio's `try_send` answers WouldBlock until the
/// reactor has seen the socket writable, which would lose a new flow's first datagram, and a
/// UDP send only blocks when the socket buffer is full (the datagram is dropped then).
fn send(upstream: &UdpSocket, payload: &[u8]) -> io::Result<usize> {
    socket2::SockRef::from(upstream).send(payload)
}

fn count_to_instance(backend: &Backend, len: usize) {
    backend.metrics.bytes_to_instance.inc_by(len as u64);
    if let Some(u) = &backend.metrics.udp {
        u.to_instance.inc();
    }
}

/// The instance answered a flow's datagram with ICMP port unreachable: it fails like a refused
/// connect, and the flow is dead.
fn refused(backend: &Backend, state: &FlowState) {
    if !state.dead.swap(true, Ordering::Relaxed) {
        backend.health.failed();
        backend.metrics.connect_failures.inc();
    }
}

/// A flow's replies: from its upstream socket back to the client, sent from the service socket
/// (bound to the VIP) until the flow is dropped or the instance refuses it.
async fn carry_replies(
    upstream: Arc<UdpSocket>,
    service: Arc<UdpSocket>,
    (client, from): (SocketAddr, Option<std::net::IpAddr>),
    backend: Arc<Backend>,
    state: Arc<FlowState>,
) {
    let mut answered = false;
    loop {
        if upstream.readable().await.is_err() {
            return;
        }
        let read = REPLY_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            for _ in 0..REPLY_BATCH {
                match upstream.try_recv(&mut buf) {
                    Ok(n) => {
                        // Counted first, so that a client holding the reply sees it counted.
                        backend.metrics.bytes_to_client.inc_by(n as u64);
                        if let Some(u) = &backend.metrics.udp {
                            u.to_client.inc();
                        }
                        state.last_ms.store(now_ms(), Ordering::Relaxed);
                        // A reply the client's socket cannot take now is dropped, as the
                        // network may.
                        let _ = socket::send_reply(&service, &buf[..n], client, from);
                        if !answered {
                            answered = true;
                            backend.health.succeeded();
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        });
        match read {
            Ok(()) => tokio::task::yield_now().await,
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                refused(&backend, &state);
                return;
            }
            Err(e) => {
                tracing::debug!(instance = %backend.instance, error = %e, "udp upstream receive");
                state.dead.store(true, Ordering::Relaxed);
                return;
            }
        }
    }
}
