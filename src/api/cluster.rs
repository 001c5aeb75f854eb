//! The cluster view of a service's charts: every fluxd keeps the series of the connections its
//! own clients made, so the picture of a service across hosts is gathered from each host's
//! read-only HTTP API (advertised in its host record) at the moment it is asked for. Nothing
//! is stored centrally; a host that does not answer is listed as such, not waited for.

use std::time::Duration;

use futures::future::join_all;
use serde_json::{json, Value};

use super::client::{Client, Endpoint};
use crate::model::Host;

/// How long one host may take to answer before the view is returned without it.
const HOST_TIMEOUT: Duration = Duration::from_millis(1500);

/// Each host's series for `service`, keys prefixed with the reporting host's name ("h2 · v1"),
/// and one entry per host saying whether it answered. `own` is this host's answer, which
/// needs no request.
pub async fn gather(
    own_host: &str,
    own: Value,
    hosts: &[&Host],
    service: &str,
    group: &str,
) -> Value {
    let query = format!(
        "/v1/series?{}",
        form_urlencoded::Serializer::new(String::new())
            .append_pair("service", service)
            .append_pair("group", group)
            .finish()
    );
    let others = hosts.iter().filter(|h| h.name != own_host).map(|h| {
        let query = query.clone();
        async move {
            let Some(addr) = h.http else {
                return (
                    h.name.clone(),
                    Err("no HTTP API advertised (it listens on loopback)".to_string()),
                );
            };
            let client = Client::new(Endpoint::Tcp(addr.to_string()));
            let answer = tokio::time::timeout(HOST_TIMEOUT, client.get::<Value>(&query)).await;
            let answer = match answer {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {HOST_TIMEOUT:?}")),
            };
            (h.name.clone(), answer)
        }
    });
    let mut answers = vec![(own_host.to_string(), Ok(own))];
    answers.extend(join_all(others).await);
    merge(answers)
}

/// One series list out of every host's answer.
fn merge(answers: Vec<(String, Result<Value, String>)>) -> Value {
    let mut series = Vec::new();
    let mut hosts = Vec::new();
    let mut interval = Value::Null;
    for (host, answer) in answers {
        match answer {
            Ok(mut v) => {
                if interval.is_null() {
                    interval = v["interval_ms"].take();
                }
                if let Value::Array(lines) = v["series"].take() {
                    for mut line in lines {
                        let key = line["key"].as_str().unwrap_or("").to_string();
                        line["key"] = Value::String(format!("{host} · {key}"));
                        line["from_host"] = Value::String(host.clone());
                        series.push(line);
                    }
                }
                hosts.push(json!({ "name": host, "ok": true }));
            }
            Err(error) => hosts.push(json!({ "name": host, "ok": false, "error": error })),
        }
    }
    json!({ "scope": "cluster", "interval_ms": interval, "series": series, "hosts": hosts })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_named_by_reporting_host_and_failures_listed() {
        let h1 = json!({ "interval_ms": 2000, "series": [{ "key": "v1", "t": [1] }, { "key": "v2", "t": [1] }] });
        let h2 = json!({ "interval_ms": 2000, "series": [{ "key": "v1", "t": [1] }] });
        let v = merge(vec![
            ("h1".into(), Ok(h1)),
            ("h2".into(), Ok(h2)),
            ("h3".into(), Err("no answer".into())),
        ]);
        let keys: Vec<&str> = v["series"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["key"].as_str().unwrap())
            .collect();
        assert_eq!(keys, ["h1 · v1", "h1 · v2", "h2 · v1"]);
        assert_eq!(v["interval_ms"], 2000);
        assert_eq!(v["hosts"][2]["ok"], false);
        assert_eq!(v["hosts"][2]["error"], "no answer");
    }
}
