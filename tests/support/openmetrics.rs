//! `/metrics` output parsed by the reference parser (Python's prometheus_client, OpenMetrics,
//! from Debian's python3-prometheus-client), so a test checks what a real scraper reads.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

/// One sample: its name (with any `_total`/`_bucket` suffix), labels and value.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Every sample in `text`; panics with the parser's complaint if it refuses the text.
pub fn samples(text: &str) -> Vec<Sample> {
    let script = r#"
import sys, json
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.append({"name": s.name, "labels": s.labels, "value": s.value})
print(json.dumps(out))
"#;
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (scripts/deps --test installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the reference parser refused the output: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The samples named `name` on the `/metrics` page of a fluxd whose read-only HTTP listens on
/// `http` in `ns`, as (instance, the value of the label `label`) -> value.
pub fn by_instance(
    ns: &super::netns::Netns,
    http: std::net::SocketAddr,
    name: &str,
    label: &str,
) -> std::collections::HashMap<(String, String), f64> {
    let (status, text) = super::browser::http_get(ns, http, "/metrics").unwrap();
    assert_eq!(status, 200, "{text}");
    samples(&text)
        .into_iter()
        .filter(|s| s.name == name)
        .map(|s| {
            let l = |k: &str| s.labels.get(k).cloned().unwrap_or_default();
            ((l("instance"), l(label)), s.value)
        })
        .collect()
}
