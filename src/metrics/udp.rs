//! `udp` services' series: per instance, datagrams each way ([`DatagramMetrics`], beside the
//! connection series where flows count as connections); per service, the flows open now and
//! the datagrams of new flows that were dropped, by reason ([`FlowMetrics`]).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// One instance's datagram counts; clones share the same counts.
#[derive(Debug, Clone, Default)]
pub struct DatagramMetrics {
    pub to_instance: Counter,
    pub to_client: Counter,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    service: String,
    reason: &'static str,
}

/// Why a datagram that would have opened a flow was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The flow table was at `--udp-max-flows`.
    TableFull,
    /// The service had no instance that takes new flows.
    NoInstance,
    /// No upstream socket could be opened (out of file descriptors, say).
    Socket,
}

impl DropReason {
    fn label(self) -> &'static str {
        match self {
            DropReason::TableFull => "table_full",
            DropReason::NoInstance => "no_instance",
            DropReason::Socket => "socket",
        }
    }
}

/// Handles shared by every udp service's relay; clones count into the same series.
#[derive(Debug, Clone, Default)]
pub struct FlowMetrics {
    flows: Family<ServiceLabels, Gauge>,
    dropped: Family<DropLabels, Counter>,
}

impl FlowMetrics {
    pub(super) fn register(&self, registry: &mut Registry) {
        registry.register(
            "udp_flows",
            "Flows (client addresses with an instance) open now, per udp service",
            self.flows.clone(),
        );
        registry.register(
            "udp_flows_dropped",
            "Datagrams that would have opened a flow of a udp service and were dropped, by reason",
            self.dropped.clone(),
        );
    }

    /// The gauge of `service`'s open flows.
    pub fn flows(&self, service: &str) -> Gauge {
        self.flows
            .get_or_create(&ServiceLabels {
                service: service.to_string(),
            })
            .clone()
    }

    /// One datagram of a new flow of `service` dropped for `reason`.
    pub fn dropped(&self, service: &str, reason: DropReason) {
        self.dropped
            .get_or_create(&DropLabels {
                service: service.to_string(),
                reason: reason.label(),
            })
            .inc();
    }

    /// Drops `service`'s series once its relay is gone.
    pub fn forget(&self, service: &str) {
        let s = ServiceLabels {
            service: service.to_string(),
        };
        self.flows.remove(&s);
        for reason in [
            DropReason::TableFull,
            DropReason::NoInstance,
            DropReason::Socket,
        ] {
            self.dropped.remove(&DropLabels {
                service: service.to_string(),
                reason: reason.label(),
            });
        }
    }
}
