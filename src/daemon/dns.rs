//! Starts the DNS responder (`--dns-listen`) once the catalog is followed and the data plane's
//! route table exists, so that its first answer already knows every service.

use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::dataplane::Dataplane;
use crate::catalog::State;
use crate::dns::server::{self, Listeners, Responder};
use crate::dns::Settings;

pub(super) fn start(
    settings: &Settings,
    listeners: Listeners,
    states: watch::Receiver<Arc<State>>,
    dataplane: Option<&Dataplane>,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let responder = Responder::new(
        settings,
        states,
        dataplane.map(|d| d.status.clone()),
        dataplane.map(|d| d.status.metrics.dns.clone()),
    )?;
    tracing::info!(
        listen = ?listeners.addresses(),
        domain = %settings.domain,
        "DNS responder listening (udp and tcp)"
    );
    Ok(server::spawn(listeners, Arc::new(responder), stop))
}
