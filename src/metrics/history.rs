//! A short in-memory history of each instance's metrics, so that the web UI can draw live
//! charts of the last 15 minutes without a Prometheus server. A sampler records, every
//! interval, what each instance did during that interval; queries sum instances into groups
//! (by instance, image, tag, host or any label) and turn bucket counts into percentiles.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::histogram::Snapshot;
use super::{InstanceLabels, InstanceMetrics};

/// Sampling interval.
pub const INTERVAL_MS: u64 = 2000;
/// 15 minutes of samples.
pub const CAPACITY: usize = 450;

/// What one instance did during one interval.
#[derive(Debug, Clone)]
struct Sample {
    /// Unix ms at the end of the interval.
    t: u64,
    connections: u64,
    failures: u64,
    bytes_to_instance: u64,
    bytes_to_client: u64,
    active: i64,
    /// Connect latency bucket counts observed in the interval.
    connect: Snapshot,
    /// `http` services: responses by status class, and request latency buckets (empty for
    /// `tcp` services).
    responses: [u64; 4],
    request: Snapshot,
}

/// Running totals last seen, to turn counters into per-interval amounts.
#[derive(Debug, Clone, Default)]
struct Totals {
    connections: u64,
    failures: u64,
    bytes_to_instance: u64,
    bytes_to_client: u64,
    connect: Snapshot,
    responses: [u64; 4],
    request: Snapshot,
}

/// One instance's chart data. Created at the first round in which the instance has done
/// anything (most instances of a large catalog never do, and then cost nothing here); its
/// samples grow as they come, up to [`CAPACITY`].
struct Track {
    labels: InstanceLabels,
    /// Container labels, for grouping by any label.
    extra: BTreeMap<String, String>,
    last: Totals,
    samples: VecDeque<Sample>,
    /// Sampled in the latest round; tracks not seen for a whole history are dropped.
    last_seen: u64,
}

#[derive(Default)]
pub struct History {
    tracks: Mutex<HashMap<InstanceLabels, Track>>,
}

/// How to group instances into chart lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupBy {
    Instance,
    Image,
    Tag,
    Host,
    Label(String),
}

impl GroupBy {
    pub fn parse(s: &str) -> Option<GroupBy> {
        Some(match s {
            "instance" => GroupBy::Instance,
            "image" => GroupBy::Image,
            "tag" => GroupBy::Tag,
            "host" => GroupBy::Host,
            _ => GroupBy::Label(s.strip_prefix("label:")?.to_string()),
        })
    }
}

/// One chart line: a group's values per interval, aligned on `t`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Series {
    pub key: String,
    pub t: Vec<u64>,
    pub connections_per_s: Vec<f64>,
    pub bytes_per_s: Vec<f64>,
    pub errors_per_s: Vec<f64>,
    pub active: Vec<i64>,
    /// Connect latency percentiles in ms; null where no connection was made.
    pub connect_p50_ms: Vec<Option<f64>>,
    pub connect_p99_ms: Vec<Option<f64>>,
    /// `http` services (zero or null for `tcp` ones): requests answered per second, the same
    /// by status class, and request latency percentiles in ms.
    pub requests_per_s: Vec<f64>,
    pub http_2xx_per_s: Vec<f64>,
    pub http_3xx_per_s: Vec<f64>,
    pub http_4xx_per_s: Vec<f64>,
    pub http_5xx_per_s: Vec<f64>,
    pub request_p50_ms: Vec<Option<f64>>,
    pub request_p99_ms: Vec<Option<f64>>,
}

impl History {
    /// Records one interval for every instance currently routed.
    pub fn sample<'a>(
        &self,
        instances: impl Iterator<
            Item = (
                &'a InstanceMetrics,
                &'a InstanceLabels,
                &'a BTreeMap<String, String>,
            ),
        >,
    ) {
        let t = unix_ms();
        let Ok(mut tracks) = self.tracks.lock() else {
            return;
        };
        for (m, labels, extra) in instances {
            // An instance that has done nothing since its series were created needs no track
            // yet: its first track starts from zero, as it would have.
            if !tracks.contains_key(labels) && !has_activity(m) {
                continue;
            }
            let now = Totals {
                connections: m.connections.get(),
                failures: m.connect_failures.get(),
                bytes_to_instance: m.bytes_to_instance.get(),
                bytes_to_client: m.bytes_to_client.get(),
                connect: m.connect_seconds.snapshot(),
                responses: m
                    .http
                    .as_ref()
                    .map_or([0; 4], |h| h.responses.each_ref().map(|c| c.get())),
                request: m
                    .http
                    .as_ref()
                    .map_or_else(Snapshot::default, |h| h.request_seconds.snapshot()),
            };
            // A new track starts from zero: what the instance did before its first round
            // (it is routed at most one interval before) belongs to this interval.
            let track = tracks.entry(labels.clone()).or_insert_with(|| Track {
                labels: labels.clone(),
                extra: extra.clone(),
                last: Totals::default(),
                samples: VecDeque::new(),
                last_seen: t,
            });
            let s = Sample {
                t,
                connections: now.connections.saturating_sub(track.last.connections),
                failures: now.failures.saturating_sub(track.last.failures),
                bytes_to_instance: now
                    .bytes_to_instance
                    .saturating_sub(track.last.bytes_to_instance),
                bytes_to_client: now
                    .bytes_to_client
                    .saturating_sub(track.last.bytes_to_client),
                active: m.active.get(),
                connect: now.connect.since(&track.last.connect),
                responses: std::array::from_fn(|i| {
                    now.responses[i].saturating_sub(track.last.responses[i])
                }),
                request: now.request.since(&track.last.request),
            };
            // An idle interval is not stored: charts read a missing point as nothing happened,
            // and idle instances (most of them, with many services) then cost no memory.
            let idle = s.connections == 0
                && s.failures == 0
                && s.bytes_to_instance == 0
                && s.bytes_to_client == 0
                && s.active == 0
                && s.connect.count() == 0
                && s.responses == [0; 4]
                && s.request.count() == 0;
            if !idle {
                if track.samples.len() == CAPACITY {
                    track.samples.pop_front();
                }
                track.samples.push_back(s);
            }
            track.last = now;
            track.last_seen = t;
        }
        let horizon = t.saturating_sub(INTERVAL_MS * CAPACITY as u64);
        tracks.retain(|_, tr| tr.last_seen >= horizon);
    }

    /// The lines of one service's charts, grouped, oldest first. `routed` are the service's
    /// instances routed now: one that has no track yet (it has done nothing) still gets its
    /// line, empty, as every routed instance does.
    pub fn series<'a>(
        &self,
        service: &str,
        group: &GroupBy,
        routed: impl Iterator<Item = (&'a InstanceLabels, &'a BTreeMap<String, String>)>,
    ) -> Vec<Series> {
        let Ok(tracks) = self.tracks.lock() else {
            return vec![];
        };
        // Per group, per timestamp: summed amounts and merged latency buckets.
        let mut groups: BTreeMap<String, BTreeMap<u64, Sample>> = BTreeMap::new();
        for (labels, extra) in routed.filter(|(l, _)| l.service == service) {
            if !tracks.contains_key(labels) {
                groups.entry(group_key(group, labels, extra)).or_default();
            }
        }
        for tr in tracks.values().filter(|t| t.labels.service == service) {
            let by_t = groups
                .entry(group_key(group, &tr.labels, &tr.extra))
                .or_default();
            for s in &tr.samples {
                // Samples of one round share a timestamp to the ms; round to the interval so
                // that instances sampled a few ms apart still line up.
                let slot = s.t / INTERVAL_MS * INTERVAL_MS;
                by_t.entry(slot)
                    .and_modify(|acc| add(acc, s))
                    .or_insert_with(|| s.clone());
            }
        }
        let secs = INTERVAL_MS as f64 / 1000.0;
        groups
            .into_iter()
            .map(|(key, by_t)| {
                let mut out = Series {
                    key,
                    t: vec![],
                    connections_per_s: vec![],
                    bytes_per_s: vec![],
                    errors_per_s: vec![],
                    active: vec![],
                    connect_p50_ms: vec![],
                    connect_p99_ms: vec![],
                    requests_per_s: vec![],
                    http_2xx_per_s: vec![],
                    http_3xx_per_s: vec![],
                    http_4xx_per_s: vec![],
                    http_5xx_per_s: vec![],
                    request_p50_ms: vec![],
                    request_p99_ms: vec![],
                };
                for (t, s) in by_t {
                    out.t.push(t);
                    out.connections_per_s.push(s.connections as f64 / secs);
                    out.bytes_per_s
                        .push((s.bytes_to_instance + s.bytes_to_client) as f64 / secs);
                    out.errors_per_s.push(s.failures as f64 / secs);
                    out.active.push(s.active);
                    out.connect_p50_ms
                        .push(s.connect.quantile(0.5).map(|v| v * 1000.0));
                    out.connect_p99_ms
                        .push(s.connect.quantile(0.99).map(|v| v * 1000.0));
                    let rate = |n: u64| n as f64 / secs;
                    out.requests_per_s.push(rate(s.responses.iter().sum()));
                    out.http_2xx_per_s.push(rate(s.responses[0]));
                    out.http_3xx_per_s.push(rate(s.responses[1]));
                    out.http_4xx_per_s.push(rate(s.responses[2]));
                    out.http_5xx_per_s.push(rate(s.responses[3]));
                    out.request_p50_ms
                        .push(s.request.quantile(0.5).map(|v| v * 1000.0));
                    out.request_p99_ms
                        .push(s.request.quantile(0.99).map(|v| v * 1000.0));
                }
                out
            })
            .collect()
    }
}

/// Whether an instance has anything to chart: any count moved, or a connection is open.
/// Reads the counters only, without the allocations of a full [`Totals`].
fn has_activity(m: &InstanceMetrics) -> bool {
    m.connections.get() != 0
        || m.connect_failures.get() != 0
        || m.bytes_to_instance.get() != 0
        || m.bytes_to_client.get() != 0
        || m.active.get() != 0
        || m.connect_seconds.count() != 0
        || m.http.as_ref().is_some_and(|h| {
            h.responses.iter().any(|c| c.get() != 0) || h.request_seconds.count() != 0
        })
}

/// The chart line an instance belongs to under `group`.
fn group_key(group: &GroupBy, labels: &InstanceLabels, extra: &BTreeMap<String, String>) -> String {
    let key = match group {
        GroupBy::Instance => labels.instance.clone(),
        GroupBy::Image => labels.image.clone(),
        GroupBy::Tag => labels.tag.clone(),
        GroupBy::Host => labels.host.clone(),
        GroupBy::Label(l) => extra.get(l).cloned().unwrap_or_default(),
    };
    if key.is_empty() {
        "(none)".to_string()
    } else {
        key
    }
}

fn add(acc: &mut Sample, s: &Sample) {
    acc.connections += s.connections;
    acc.failures += s.failures;
    acc.bytes_to_instance += s.bytes_to_instance;
    acc.bytes_to_client += s.bytes_to_client;
    acc.active += s.active;
    for (a, b) in acc.connect.cumulative.iter_mut().zip(&s.connect.cumulative) {
        *a += b;
    }
    acc.connect.sum_seconds += s.connect.sum_seconds;
    for (a, b) in acc.responses.iter_mut().zip(&s.responses) {
        *a += b;
    }
    if acc.request.cumulative.is_empty() {
        acc.request = s.request.clone();
    } else {
        for (a, b) in acc.request.cumulative.iter_mut().zip(&s.request.cumulative) {
            *a += b;
        }
        acc.request.sum_seconds += s.request.sum_seconds;
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn labels(instance: &str, tag: &str) -> InstanceLabels {
        InstanceLabels {
            service: "web".into(),
            instance: instance.into(),
            host: "h1".into(),
            image: "img".into(),
            tag: tag.into(),
        }
    }

    #[test]
    fn groups_versions_into_lines() {
        let m = Metrics::new();
        let h = History::default();
        let ls = [labels("a", "v1"), labels("b", "v1"), labels("c", "v2")];
        let ms: Vec<_> = ls.iter().map(|l| m.instance(l, true)).collect();
        let extra = BTreeMap::new();
        h.sample(ms.iter().zip(&ls).map(|(m, l)| (m, l, &extra)));
        for (i, m) in ms.iter().enumerate() {
            m.connections.inc_by(10 * (i as u64 + 1));
            m.connect_seconds.observe(0.001);
            let http = m.http.as_ref().unwrap();
            http.responses[0].inc_by(4);
            http.responses[3].inc();
            http.request_seconds.observe(0.02);
        }
        h.sample(ms.iter().zip(&ls).map(|(m, l)| (m, l, &extra)));
        let by_tag = h.series("web", &GroupBy::Tag, std::iter::empty());
        assert_eq!(by_tag.len(), 2);
        assert_eq!(by_tag[0].key, "v1");
        let last = |s: &Series| *s.connections_per_s.last().unwrap();
        assert_eq!(last(&by_tag[0]), 30.0 / (INTERVAL_MS as f64 / 1000.0));
        assert_eq!(last(&by_tag[1]), 30.0 / (INTERVAL_MS as f64 / 1000.0));
        assert!(by_tag[0].connect_p50_ms.last().unwrap().is_some());
        let per_s = |n: f64| n / (INTERVAL_MS as f64 / 1000.0);
        assert_eq!(*by_tag[0].requests_per_s.last().unwrap(), per_s(10.0));
        assert_eq!(*by_tag[0].http_2xx_per_s.last().unwrap(), per_s(8.0));
        assert_eq!(*by_tag[0].http_5xx_per_s.last().unwrap(), per_s(2.0));
        let p50 = by_tag[0].request_p50_ms.last().unwrap().unwrap();
        assert!(p50 > 10.0 && p50 <= 25.0, "{p50}");
        assert_eq!(
            h.series("web", &GroupBy::Instance, std::iter::empty())
                .len(),
            3
        );
        assert_eq!(
            GroupBy::parse("label:team"),
            Some(GroupBy::Label("team".into()))
        );
    }

    #[test]
    fn an_idle_instance_has_no_track_but_keeps_its_line() {
        let m = Metrics::new();
        let h = History::default();
        let ls = [labels("busy", "v1"), labels("idle", "v2")];
        let ms: Vec<_> = ls.iter().map(|l| m.instance(l, false)).collect();
        let extra = BTreeMap::new();
        let round = |h: &History| h.sample(ms.iter().zip(&ls).map(|(m, l)| (m, l, &extra)));
        round(&h);
        assert_eq!(h.tracks.lock().unwrap().len(), 0, "nothing happened yet");
        ms[0].connections.inc_by(4);
        round(&h);
        assert_eq!(
            h.tracks.lock().unwrap().len(),
            1,
            "only the busy one is tracked"
        );
        // Everything the busy instance did before its first track counts in that track.
        let routed = || ls.iter().map(|l| (l, &extra));
        let lines = h.series("web", &GroupBy::Instance, routed());
        let keys: Vec<&str> = lines.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(keys, ["busy", "idle"]);
        assert_eq!(
            lines[0].connections_per_s,
            [4.0 / (INTERVAL_MS as f64 / 1000.0)]
        );
        assert!(lines[1].t.is_empty(), "the idle instance's line is empty");
        // An idle instance no longer routed has no line; one of another service neither.
        let lines = h.series("web", &GroupBy::Tag, std::iter::empty());
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].key, "v1");
        // An open connection is activity even before any count moves.
        ms[1].active.set(1);
        round(&h);
        assert_eq!(h.tracks.lock().unwrap().len(), 2);
    }
}
