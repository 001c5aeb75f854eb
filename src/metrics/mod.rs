//! Metrics, collected where the connection is made (the client's host): per service and
//! instance, connections, connect failures and retries, bytes each way, connect latency and
//! connection duration. The proxy holds direct handles (shared atomics), so counting costs an
//! atomic add and no lookup; `/metrics` renders every instance's series in the Prometheus
//! exposition format (OpenMetrics text).
//!
//! The series live in one map entry per instance, its labels stored once ([`Metrics`]), and a
//! collector writes them family by family at each scrape: a prometheus-client `Family` per
//! series kind kept its own map entry, labels and all, for every instance, which made the
//! series of 10,000 idle instances cost about 2 KiB each.

pub mod dns;
pub mod histogram;
pub mod history;
pub mod udp;

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabel, EncodeLabelSet, EncodeMetric, LabelSetEncoder,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use histogram::{AtomicHistogram, CONNECT_BUCKETS, DURATION_BUCKETS, REQUEST_BUCKETS};

/// Who a series is about. `host` is the host the instance runs on (empty for static
/// instances); image and tag let dashboards compare versions of a service.
#[derive(
    Debug, Clone, Hash, PartialEq, Eq, PartialOrd, Ord, prometheus_client::encoding::EncodeLabelSet,
)]
pub struct InstanceLabels {
    pub service: String,
    pub instance: String,
    pub host: String,
    pub image: String,
    pub tag: String,
}

/// Status classes of `http` responses, in the order of `HttpMetrics::responses`.
pub const CODE_CLASSES: [&str; 4] = ["2xx", "3xx", "4xx", "5xx"];

/// Results of `Upgrade` requests, in the order of `HttpMetrics::upgrades`: the instance
/// switched protocols (101), or answered anything else.
pub const UPGRADE_RESULTS: [&str; 2] = ["switched", "refused"];

/// The index in `CODE_CLASSES` of a status code. Informational codes never end a proxied
/// exchange (a 101 is counted in `HttpMetrics::upgrades` instead); anything outside
/// 200..=599 counts with its nearest class.
pub fn code_class(status: u16) -> usize {
    (status / 100).clamp(2, 5) as usize - 2
}

/// The `grpc_status` label values of `grpc_responses`: the codes gRPC defines (0 OK to 16
/// UNAUTHENTICATED), then `other` for a value that is none of them.
pub const GRPC_STATUSES: [&str; 18] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    "other",
];

/// The index in `GRPC_STATUSES` of a `grpc-status` value.
pub fn grpc_status_index(value: &[u8]) -> usize {
    std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.parse::<u8>().ok())
        .filter(|&c| usize::from(c) < GRPC_STATUSES.len() - 1)
        .map_or(GRPC_STATUSES.len() - 1, usize::from)
}

/// The series of one instance's active health check (services with a `health` check only).
#[derive(Debug, Clone)]
pub struct CheckMetrics {
    pub passed: Counter,
    pub failed: Counter,
    /// 1 while the check's verdict is failing (the instance is out of the pool), else 0.
    pub failing: Gauge,
}

/// The handles of one instance's series; clones share the same counts.
#[derive(Debug, Clone)]
pub struct InstanceMetrics {
    pub connections: Counter,
    pub active: Gauge,
    pub connect_failures: Counter,
    /// Connections that reached this instance after another one failed.
    pub retries: Counter,
    pub bytes_to_instance: Counter,
    pub bytes_to_client: Counter,
    pub connect_seconds: AtomicHistogram,
    pub duration_seconds: AtomicHistogram,
    /// Per-request series; only instances of `http` services have them.
    pub http: Option<HttpMetrics>,
    /// Datagram counts; only instances of `udp` services have them (their flows count as
    /// `connections`, their payload bytes as `transferred_bytes`).
    pub udp: Option<udp::DatagramMetrics>,
}

/// The per-request series of an instance of an `http` service.
#[derive(Debug, Clone)]
pub struct HttpMetrics {
    /// Responses by status class, indexed like `CODE_CLASSES`.
    pub responses: [Counter; 4],
    /// Requests answered by this instance after an attempt on another one (or on a closed
    /// pooled connection) failed.
    pub retries: Counter,
    /// From the request head received to the response's last byte handed to the client.
    pub request_seconds: AtomicHistogram,
    /// `Upgrade` requests by result, indexed like `UPGRADE_RESULTS`.
    pub upgrades: [Counter; 2],
    /// gRPC calls the instance ended, by `grpc-status`, indexed like `GRPC_STATUSES`.
    pub grpc: [Counter; 18],
}

impl HttpMetrics {
    pub fn requests(&self) -> u64 {
        self.responses.iter().map(|c| c.get()).sum()
    }

    fn new() -> HttpMetrics {
        HttpMetrics {
            responses: Default::default(),
            retries: Counter::default(),
            request_seconds: AtomicHistogram::new(REQUEST_BUCKETS),
            upgrades: Default::default(),
            grpc: Default::default(),
        }
    }
}

impl InstanceMetrics {
    fn new() -> InstanceMetrics {
        InstanceMetrics {
            connections: Counter::default(),
            active: Gauge::default(),
            connect_failures: Counter::default(),
            retries: Counter::default(),
            bytes_to_instance: Counter::default(),
            bytes_to_client: Counter::default(),
            connect_seconds: AtomicHistogram::new(CONNECT_BUCKETS),
            duration_seconds: AtomicHistogram::new(DURATION_BUCKETS),
            http: None,
            udp: None,
        }
    }
}

/// Every instance's series: what `/metrics` lists.
pub struct Metrics {
    registry: Registry,
    series: std::sync::Arc<Series>,
    /// The DNS responder's series (listed with no sample while it is off).
    pub dns: dns::DnsMetrics,
    /// `udp` services' flow table series.
    pub udp: udp::FlowMetrics,
}

/// The series of every instance, by labels.
#[derive(Debug, Default)]
struct Series {
    instances: RwLock<HashMap<InstanceLabels, Entry>>,
}

/// One instance's series: those of its connections (while it is routed) and those of its
/// active check (while it is checked), each dropped on its own.
#[derive(Debug, Default)]
struct Entry {
    instance: Option<InstanceMetrics>,
    check: Option<CheckMetrics>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("flux");
        let series = std::sync::Arc::new(Series::default());
        registry.register_collector(Box::new(series.clone()));
        let dns = dns::DnsMetrics::default();
        dns.register(&mut registry);
        let udp = udp::FlowMetrics::default();
        udp.register(&mut registry);
        Metrics {
            registry,
            series,
            dns,
            udp,
        }
    }

    /// Changes the entry of `labels` (created if need be), dropping it once it holds nothing.
    fn with_entry<R>(&self, labels: &InstanceLabels, f: impl FnOnce(&mut Entry) -> R) -> R {
        let mut map = self
            .series
            .instances
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let r = match map.get_mut(labels) {
            Some(e) => f(e),
            None => {
                let mut e = Entry::default();
                let r = f(&mut e);
                map.insert(labels.clone(), e);
                r
            }
        };
        if map
            .get(labels)
            .is_some_and(|e| e.instance.is_none() && e.check.is_none())
        {
            map.remove(labels);
        }
        r
    }

    /// The handles of one instance's active check, creating its series.
    pub fn check(&self, labels: &InstanceLabels) -> CheckMetrics {
        self.with_entry(labels, |e| {
            e.check
                .get_or_insert_with(|| CheckMetrics {
                    passed: Counter::default(),
                    failed: Counter::default(),
                    failing: Gauge::default(),
                })
                .clone()
        })
    }

    /// Drops the series of an instance's active check (the check or the instance is gone).
    pub fn forget_check(&self, labels: &InstanceLabels) {
        self.with_entry(labels, |e| e.check = None);
    }

    /// The handles for one instance, creating its series; `http` adds the per-request ones
    /// (kept until the instance is forgotten, like every series).
    pub fn instance(&self, labels: &InstanceLabels, http: bool) -> InstanceMetrics {
        self.with_entry(labels, |e| {
            let m = e.instance.get_or_insert_with(InstanceMetrics::new);
            if http && m.http.is_none() {
                m.http = Some(HttpMetrics::new());
            }
            let mut handles = m.clone();
            if !http {
                handles.http = None;
            }
            handles.udp = None;
            handles
        })
    }

    /// The handles for one instance of a `udp` service, creating its series and the datagram
    /// counts (kept until the instance is forgotten).
    pub fn udp_instance(&self, labels: &InstanceLabels) -> InstanceMetrics {
        self.with_entry(labels, |e| {
            let m = e.instance.get_or_insert_with(InstanceMetrics::new);
            let udp = m.udp.get_or_insert_with(Default::default).clone();
            InstanceMetrics {
                http: None,
                udp: Some(udp),
                ..m.clone()
            }
        })
    }

    /// Drops the series of an instance that is gone, so that /metrics does not grow forever.
    pub fn forget(&self, labels: &InstanceLabels) {
        self.series
            .instances
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(labels);
    }

    /// The exposition text for `/metrics`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// An instance's labels and, for families that split a series further, one more label.
struct SeriesLabels<'a> {
    instance: &'a InstanceLabels,
    extra: Option<(&'static str, &'static str)>,
}

impl EncodeLabelSet for SeriesLabels<'_> {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelSet::encode(self.instance, encoder)?;
        if let Some(pair) = &self.extra {
            pair.encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

/// One metric family: its name, help and type, and how each instance's entry yields its
/// series (none, one, or one per value of an extra label).
struct Family {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    series: SeriesOf,
}

/// A family's series in one entry, handed one by one to `out` with their extra label.
type SeriesOf = for<'e> fn(
    &'e Entry,
    &mut dyn FnMut(Option<(&'static str, &'static str)>, &'e dyn EncodeMetric),
);

/// The families in the order `/metrics` lists them. Help texts end with a period, as the
/// registry writes them.
const FAMILIES: [Family; 15] = [
    Family {
        name: "connections",
        help: "Connections proxied to an instance.",
        kind: MetricType::Counter,
        series: |e, out| {
            if let Some(m) = &e.instance {
                out(None, &m.connections)
            }
        },
    },
    Family {
        name: "connections_active",
        help: "Connections open to an instance now.",
        kind: MetricType::Gauge,
        series: |e, out| {
            if let Some(m) = &e.instance {
                out(None, &m.active)
            }
        },
    },
    Family {
        name: "connect_failures",
        help: "Connect attempts to an instance that failed (the next instance was tried).",
        kind: MetricType::Counter,
        series: |e, out| {
            if let Some(m) = &e.instance {
                out(None, &m.connect_failures)
            }
        },
    },
    Family {
        name: "connect_retries",
        help: "Connections that reached an instance after another instance failed.",
        kind: MetricType::Counter,
        series: |e, out| {
            if let Some(m) = &e.instance {
                out(None, &m.retries)
            }
        },
    },
    Family {
        name: "transferred_bytes",
        help: "Bytes moved between clients and an instance.",
        kind: MetricType::Counter,
        series: |e, out| {
            if let Some(m) = &e.instance {
                out(Some(("direction", "to_instance")), &m.bytes_to_instance);
                out(Some(("direction", "to_client")), &m.bytes_to_client);
            }
        },
    },
    Family {
        name: "connect_duration_seconds",
        help: "Time to connect to an instance.",
        kind: MetricType::Histogram,
        series: |e, out| {
            if let Some(m) = &e.instance {
                out(None, &m.connect_seconds)
            }
        },
    },
    Family {
        name: "connection_duration_seconds",
        help: "Lifetime of proxied connections.",
        kind: MetricType::Histogram,
        series: |e, out| {
            if let Some(m) = &e.instance {
                out(None, &m.duration_seconds)
            }
        },
    },
    Family {
        name: "http_requests",
        help: "Requests to an instance of an http service, by response status class (code).",
        kind: MetricType::Counter,
        series: |e, out| {
            if let Some(h) = e.instance.as_ref().and_then(|m| m.http.as_ref()) {
                for (code, c) in CODE_CLASSES.iter().zip(&h.responses) {
                    out(Some(("code", code)), c);
                }
            }
        },
    },
    Family {
        name: "http_retries",
        help: "Requests answered by an instance after an attempt on another instance or a closed pooled connection failed.",
        kind: MetricType::Counter,
        series: |e, out| {
            if let Some(h) = e.instance.as_ref().and_then(|m| m.http.as_ref()) {
                out(None, &h.retries)
            }
        },
    },
    Family {
        name: "http_request_duration_seconds",
        help: "Time from a request's head to the last byte of its response, for http services.",
        kind: MetricType::Histogram,
        series: |e, out| {
            if let Some(h) = e.instance.as_ref().and_then(|m| m.http.as_ref()) {
                out(None, &h.request_seconds)
            }
        },
    },
    Family {
        name: "http_upgrades",
        help: "Upgrade requests (WebSocket and others) to an instance of an http service, by result (switched or refused).",
        kind: MetricType::Counter,
        series: |e, out| {
            if let Some(h) = e.instance.as_ref().and_then(|m| m.http.as_ref()) {
                for (result, c) in UPGRADE_RESULTS.iter().zip(&h.upgrades) {
                    out(Some(("result", result)), c);
                }
            }
        },
    },
    Family {
        name: "grpc_responses",
        help: "gRPC calls an instance of an http service ended, by grpc-status (listed once seen).",
        kind: MetricType::Counter,
        series: |e, out| {
            if let Some(h) = e.instance.as_ref().and_then(|m| m.http.as_ref()) {
                // Only the statuses seen: 18 series per instance of every http service would
                // mostly be zeros (most http services carry no gRPC at all).
                for (status, c) in GRPC_STATUSES.iter().zip(&h.grpc) {
                    if c.get() > 0 {
                        out(Some(("grpc_status", status)), c);
                    }
                }
            }
        },
    },
    Family {
        name: "udp_datagrams",
        help: "Datagrams relayed between clients and an instance of a udp service.",
        kind: MetricType::Counter,
        series: |e, out| {
            if let Some(u) = e.instance.as_ref().and_then(|m| m.udp.as_ref()) {
                out(Some(("direction", "to_instance")), &u.to_instance);
                out(Some(("direction", "to_client")), &u.to_client);
            }
        },
    },
    Family {
        name: "health_checks",
        help: "Active health checks of an instance, by result (pass or fail).",
        kind: MetricType::Counter,
        series: |e, out| {
            if let Some(c) = &e.check {
                out(Some(("result", "pass")), &c.passed);
                out(Some(("result", "fail")), &c.failed);
            }
        },
    },
    Family {
        name: "health_check_failing",
        help: "1 while an instance's active health check is failing (out of the pool on this host).",
        kind: MetricType::Gauge,
        series: |e, out| {
            if let Some(c) = &e.check {
                out(None, &c.failing)
            }
        },
    },
];

impl Collector for Series {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let map = self
            .instances
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        for family in &FAMILIES {
            let mut found = Vec::new();
            for (labels, entry) in map.iter() {
                (family.series)(entry, &mut |extra, metric| {
                    found.push((
                        SeriesLabels {
                            instance: labels,
                            extra,
                        },
                        metric,
                    ))
                });
            }
            // A family with no series is not listed at all, as the registry did.
            if found.is_empty() {
                continue;
            }
            let mut metric_encoder =
                encoder.encode_descriptor(family.name, family.help, None, family.kind)?;
            for (labels, metric) in &found {
                metric.encode(metric_encoder.encode_family(labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_statuses_are_counted_once_seen() {
        let m = Metrics::new();
        let l = InstanceLabels {
            service: "g".into(),
            instance: "i1".into(),
            host: String::new(),
            image: String::new(),
            tag: String::new(),
        };
        let http = m.instance(&l, true).http.unwrap();
        assert!(!m.encode().contains("flux_grpc_responses"));
        for v in [&b"0"[..], b"5", b"16", b"17", b"x", b"", b"-1"] {
            http.grpc[grpc_status_index(v)].inc();
        }
        let text = m.encode();
        for (status, n) in [("0", 1), ("5", 1), ("16", 1), ("other", 4)] {
            let line = format!(
                r#"flux_grpc_responses_total{{service="g",instance="i1",host="",image="",tag="",grpc_status="{status}"}} {n}"#
            );
            assert!(text.contains(&line), "{line} in {text}");
        }
        assert!(!text.contains(r#"grpc_status="1""#), "{text}");
    }

    #[test]
    fn series_follow_instances() {
        let m = Metrics::new();
        let l = InstanceLabels {
            service: "web".into(),
            instance: "b0".into(),
            host: "h1".into(),
            image: "docker.io/library/web".into(),
            tag: "v1".into(),
        };
        let h = m.instance(&l, false);
        h.connections.inc();
        h.bytes_to_client.inc_by(64);
        h.connect_seconds.observe(0.001);
        let text = m.encode();
        assert!(text.contains(r#"flux_connections_total{service="web",instance="b0",host="h1",image="docker.io/library/web",tag="v1"} 1"#), "{text}");
        assert!(text.contains(r#"direction="to_client"} 64"#), "{text}");
        assert!(
            text.contains("flux_connect_duration_seconds_bucket"),
            "{text}"
        );
        assert!(!text.contains("flux_http_requests"), "{text}");
        let http = m.instance(&l, true).http.unwrap();
        http.responses[code_class(503)].inc();
        http.request_seconds.observe(0.01);
        let text = m.encode();
        assert!(text.contains(r#"flux_http_requests_total{service="web",instance="b0",host="h1",image="docker.io/library/web",tag="v1",code="5xx"} 1"#), "{text}");
        assert!(
            text.contains("flux_http_request_duration_seconds_bucket"),
            "{text}"
        );
        http.upgrades[0].inc();
        let text = m.encode();
        assert!(text.contains(r#"flux_http_upgrades_total{service="web",instance="b0",host="h1",image="docker.io/library/web",tag="v1",result="switched"} 1"#), "{text}");
        assert!(text.contains(r#"tag="v1",result="refused"} 0"#), "{text}");
        let check = m.check(&l);
        check.failed.inc();
        check.failing.set(1);
        let text = m.encode();
        assert!(text.contains(r#"flux_health_checks_total{service="web",instance="b0",host="h1",image="docker.io/library/web",tag="v1",result="fail"} 1"#), "{text}");
        assert!(text.contains(r#"flux_health_check_failing{service="web",instance="b0",host="h1",image="docker.io/library/web",tag="v1"} 1"#), "{text}");
        m.forget(&l);
        assert!(!m.encode().contains("b0"));
    }

    #[test]
    fn one_entry_per_instance_shares_its_series() {
        let m = Metrics::new();
        let l = InstanceLabels {
            service: "web".into(),
            instance: "b0".into(),
            host: String::new(),
            image: String::new(),
            tag: String::new(),
        };
        let tcp = m.instance(&l, false);
        tcp.connections.inc();
        // Asking again, with the per-request series, gives the same counts plus those.
        let http = m.instance(&l, true);
        assert_eq!(http.connections.get(), 1);
        assert!(http.http.is_some() && tcp.http.is_none());
        assert!(m.instance(&l, false).http.is_none());
        // A check's series come and go on their own.
        m.check(&l).passed.inc();
        m.forget_check(&l);
        let text = m.encode();
        assert!(!text.contains("flux_health_checks"), "{text}");
        assert!(text.contains("flux_http_requests_total"), "{text}");
        assert_eq!(m.series.instances.read().unwrap().len(), 1);
        // A check without connection series still has its own entry, dropped with it.
        m.forget(&l);
        m.check(&l).failed.inc();
        assert!(!m.encode().contains("flux_connections_total"));
        m.forget_check(&l);
        assert_eq!(m.encode(), "# EOF\n");
        assert_eq!(m.series.instances.read().unwrap().len(), 0);
    }
}
