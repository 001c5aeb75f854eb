//! Metrics, collected where the connection is made (the client's host): per service and
//! instance, connections, connect failures and retries, bytes each way, connect latency and
//! connection duration. The proxy holds direct handles (shared atomics), so counting costs an
//! atomic add and no lookup; `/metrics` renders the registry in the Prometheus exposition
//! format (OpenMetrics text).

pub mod histogram;
pub mod history;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use histogram::{AtomicHistogram, CONNECT_BUCKETS, DURATION_BUCKETS, REQUEST_BUCKETS};

/// Who a series is about. `host` is the host the instance runs on (empty for static
/// instances); image and tag let dashboards compare versions of a service.
#[derive(Debug, Clone, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct InstanceLabels {
    pub service: String,
    pub instance: String,
    pub host: String,
    pub image: String,
    pub tag: String,
}

/// Variant names are the label values, hence snake case.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelValue)]
pub enum Direction {
    /// From the client to the instance.
    to_instance,
    /// From the instance to the client.
    to_client,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct BytesLabels {
    #[prometheus(flatten)]
    instance: InstanceLabels,
    direction: Direction,
}

/// Status classes of `http` responses, in the order of `HttpMetrics::responses`.
pub const CODE_CLASSES: [&str; 4] = ["2xx", "3xx", "4xx", "5xx"];

/// The index in `CODE_CLASSES` of a status code. Informational codes never end a proxied
/// exchange (upgrades are not supported); anything outside 200..=599 counts with its nearest
/// class.
pub fn code_class(status: u16) -> usize {
    (status / 100).clamp(2, 5) as usize - 2
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct CodeLabels {
    #[prometheus(flatten)]
    instance: InstanceLabels,
    code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct CheckLabels {
    #[prometheus(flatten)]
    instance: InstanceLabels,
    /// `pass` or `fail`.
    result: &'static str,
}

/// The series of one instance's active health check (services with a `health` check only).
#[derive(Debug, Clone)]
pub struct CheckMetrics {
    pub passed: Counter,
    pub failed: Counter,
    /// 1 while the check's verdict is failing (the instance is out of the pool), else 0.
    pub failing: Gauge,
}

#[derive(Clone)]
struct Buckets(&'static [f64]);

impl MetricConstructor<AtomicHistogram> for Buckets {
    fn new_metric(&self) -> AtomicHistogram {
        AtomicHistogram::new(self.0)
    }
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
}

impl HttpMetrics {
    pub fn requests(&self) -> u64 {
        self.responses.iter().map(|c| c.get()).sum()
    }
}

pub struct Metrics {
    registry: Registry,
    connections: Family<InstanceLabels, Counter>,
    active: Family<InstanceLabels, Gauge>,
    connect_failures: Family<InstanceLabels, Counter>,
    retries: Family<InstanceLabels, Counter>,
    bytes: Family<BytesLabels, Counter>,
    connect_seconds: Family<InstanceLabels, AtomicHistogram, Buckets>,
    duration_seconds: Family<InstanceLabels, AtomicHistogram, Buckets>,
    http_requests: Family<CodeLabels, Counter>,
    http_retries: Family<InstanceLabels, Counter>,
    request_seconds: Family<InstanceLabels, AtomicHistogram, Buckets>,
    health_checks: Family<CheckLabels, Counter>,
    check_failing: Family<InstanceLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("flux");
        let m = Metrics {
            connections: Family::default(),
            active: Family::default(),
            connect_failures: Family::default(),
            retries: Family::default(),
            bytes: Family::default(),
            connect_seconds: Family::new_with_constructor(Buckets(CONNECT_BUCKETS)),
            duration_seconds: Family::new_with_constructor(Buckets(DURATION_BUCKETS)),
            http_requests: Family::default(),
            http_retries: Family::default(),
            request_seconds: Family::new_with_constructor(Buckets(REQUEST_BUCKETS)),
            health_checks: Family::default(),
            check_failing: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "connections",
            "Connections proxied to an instance",
            m.connections.clone(),
        );
        registry.register(
            "connections_active",
            "Connections open to an instance now",
            m.active.clone(),
        );
        registry.register(
            "connect_failures",
            "Connect attempts to an instance that failed (the next instance was tried)",
            m.connect_failures.clone(),
        );
        registry.register(
            "connect_retries",
            "Connections that reached an instance after another instance failed",
            m.retries.clone(),
        );
        registry.register(
            "transferred_bytes",
            "Bytes moved between clients and an instance",
            m.bytes.clone(),
        );
        registry.register(
            "connect_duration_seconds",
            "Time to connect to an instance",
            m.connect_seconds.clone(),
        );
        registry.register(
            "connection_duration_seconds",
            "Lifetime of proxied connections",
            m.duration_seconds.clone(),
        );
        registry.register(
            "http_requests",
            "Requests to an instance of an http service, by response status class (code)",
            m.http_requests.clone(),
        );
        registry.register(
            "http_retries",
            "Requests answered by an instance after an attempt on another instance or a closed pooled connection failed",
            m.http_retries.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time from a request's head to the last byte of its response, for http services",
            m.request_seconds.clone(),
        );
        registry.register(
            "health_checks",
            "Active health checks of an instance, by result (pass or fail)",
            m.health_checks.clone(),
        );
        registry.register(
            "health_check_failing",
            "1 while an instance's active health check is failing (out of the pool on this host)",
            m.check_failing.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The handles of one instance's active check, creating its series.
    pub fn check(&self, labels: &InstanceLabels) -> CheckMetrics {
        let result = |result| CheckLabels {
            instance: labels.clone(),
            result,
        };
        let passed = self.health_checks.get_or_create(&result("pass")).clone();
        let failed = self.health_checks.get_or_create(&result("fail")).clone();
        let failing = self.check_failing.get_or_create(labels).clone();
        CheckMetrics {
            passed,
            failed,
            failing,
        }
    }

    /// Drops the series of an instance's active check (the check or the instance is gone).
    pub fn forget_check(&self, labels: &InstanceLabels) {
        for result in ["pass", "fail"] {
            self.health_checks.remove(&CheckLabels {
                instance: labels.clone(),
                result,
            });
        }
        self.check_failing.remove(labels);
    }

    /// The handles for one instance, creating its series; `http` adds the per-request ones.
    pub fn instance(&self, labels: &InstanceLabels, http: bool) -> InstanceMetrics {
        let bytes = |direction| BytesLabels {
            instance: labels.clone(),
            direction,
        };
        // One statement per lookup: get_or_create returns a read guard, and a second lookup
        // in the same family while the first guard lives would deadlock on the write lock.
        let bytes_to_instance = self
            .bytes
            .get_or_create(&bytes(Direction::to_instance))
            .clone();
        let bytes_to_client = self
            .bytes
            .get_or_create(&bytes(Direction::to_client))
            .clone();
        let connections = self.connections.get_or_create(labels).clone();
        let active = self.active.get_or_create(labels).clone();
        let connect_failures = self.connect_failures.get_or_create(labels).clone();
        let retries = self.retries.get_or_create(labels).clone();
        let connect_seconds = self.connect_seconds.get_or_create(labels).clone();
        let duration_seconds = self.duration_seconds.get_or_create(labels).clone();
        let http = http.then(|| {
            let code = |code| CodeLabels {
                instance: labels.clone(),
                code,
            };
            let responses =
                CODE_CLASSES.map(|c| self.http_requests.get_or_create(&code(c)).clone());
            let retries = self.http_retries.get_or_create(labels).clone();
            let request_seconds = self.request_seconds.get_or_create(labels).clone();
            HttpMetrics {
                responses,
                retries,
                request_seconds,
            }
        });
        InstanceMetrics {
            connections,
            active,
            connect_failures,
            retries,
            bytes_to_instance,
            bytes_to_client,
            connect_seconds,
            duration_seconds,
            http,
        }
    }

    /// Drops the series of an instance that is gone, so that /metrics does not grow forever.
    pub fn forget(&self, labels: &InstanceLabels) {
        self.connections.remove(labels);
        self.active.remove(labels);
        self.connect_failures.remove(labels);
        self.retries.remove(labels);
        for direction in [Direction::to_instance, Direction::to_client] {
            self.bytes.remove(&BytesLabels {
                instance: labels.clone(),
                direction,
            });
        }
        self.connect_seconds.remove(labels);
        self.duration_seconds.remove(labels);
        for code in CODE_CLASSES {
            self.http_requests.remove(&CodeLabels {
                instance: labels.clone(),
                code,
            });
        }
        self.http_retries.remove(labels);
        self.request_seconds.remove(labels);
        self.forget_check(labels);
    }

    /// The exposition text for `/metrics`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let check = m.check(&l);
        check.failed.inc();
        check.failing.set(1);
        let text = m.encode();
        assert!(text.contains(r#"flux_health_checks_total{service="web",instance="b0",host="h1",image="docker.io/library/web",tag="v1",result="fail"} 1"#), "{text}");
        assert!(text.contains(r#"flux_health_check_failing{service="web",instance="b0",host="h1",image="docker.io/library/web",tag="v1"} 1"#), "{text}");
        m.forget(&l);
        assert!(!m.encode().contains("b0"));
    }
}
