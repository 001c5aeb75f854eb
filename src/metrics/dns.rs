//! The DNS responder's series: queries answered, by response code, and queries relayed to
//! resolvers (`--dns-forward`), by outcome.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RcodeLabels {
    rcode: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

/// Handles shared by every DNS listener; clones count into the same series.
#[derive(Debug, Clone, Default)]
pub struct DnsMetrics {
    queries: Family<RcodeLabels, Counter>,
    forwarded: Family<ResultLabels, Counter>,
}

impl DnsMetrics {
    pub(super) fn register(&self, registry: &mut Registry) {
        registry.register(
            "dns_queries",
            "DNS queries answered, by response code (forwarded ones by the resolver's)",
            self.queries.clone(),
        );
        registry.register(
            "dns_forwarded",
            "DNS queries for other zones relayed to resolvers, by result (answered, failed)",
            self.forwarded.clone(),
        );
    }

    /// One reply sent with `rcode` (as dig names it: NOERROR, NXDOMAIN, ...).
    pub fn answered(&self, rcode: &str) {
        self.queries
            .get_or_create(&RcodeLabels {
                rcode: rcode.to_string(),
            })
            .inc();
    }

    /// One query relayed; `answered` false when no resolver answered in time.
    pub fn forwarded(&self, answered: bool) {
        let result = if answered { "answered" } else { "failed" };
        self.forwarded
            .get_or_create(&ResultLabels {
                result: result.to_string(),
            })
            .inc();
    }
}
