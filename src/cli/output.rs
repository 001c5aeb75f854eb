//! How fluxctl prints: aligned columns for people, one JSON document for scripts, and the
//! `--format` template for shell loops.

use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::api::views::{HostView, InstanceState, InstanceView, ServiceInfo};
use crate::model::{Forwarding, Selector};

/// Left-aligned columns separated by two spaces, header first.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// `image=nginx tag=1.25 labels=tier=front` — the selector as it was given.
pub fn selector(s: &Selector) -> String {
    let mut parts = Vec::new();
    if let Some(i) = &s.image {
        parts.push(format!("image={i}"));
    }
    if let Some(t) = &s.tag {
        parts.push(format!("tag={t}"));
    }
    let kv = |m: &std::collections::BTreeMap<String, String>| {
        m.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    if !s.labels.is_empty() {
        parts.push(format!("labels={}", kv(&s.labels)));
    }
    if !s.env.is_empty() {
        parts.push(format!("env={}", kv(&s.env)));
    }
    parts.join(" ")
}

pub const INSTANCE_HEADER: [&str; 8] = [
    "SERVICE", "INSTANCE", "HOST", "ADDRESS", "STATE", "RULE", "IMAGE", "TAG",
];

pub fn instance_row(v: &InstanceView) -> Vec<String> {
    let i = &v.instance;
    let dash = || "-".to_string();
    vec![
        i.service.clone(),
        i.name.clone(),
        i.host.clone().unwrap_or_else(dash),
        i.address.map(|a| a.to_string()).unwrap_or_else(dash),
        v.state.as_str().to_string(),
        i.rule.clone().unwrap_or_else(dash),
        i.container
            .as_ref()
            .map(|c| c.image.clone())
            .unwrap_or_else(dash),
        i.container
            .as_ref()
            .map(|c| c.tag.clone())
            .unwrap_or_else(dash),
    ]
}

/// The instance table: the usual columns, then a `CHECK` column (the active check's state and
/// why it fails) when any of the instances has an active check, and a last `NOTE` column (why
/// an instance has no address, or an unusual one) when any has a note. Tables without either
/// stay as they always were.
pub fn instance_table(views: &[InstanceView]) -> String {
    let checked = views.iter().any(|v| check_summary(v).is_some());
    let noted = views.iter().any(|v| note(v).is_some());
    let drains = views.iter().any(|v| v.drained);
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|v| {
            let mut row = instance_row(v);
            if drains {
                row.push(if v.drained { "drained" } else { "-" }.to_string());
            }
            if checked {
                row.push(check_summary(v).unwrap_or_else(|| "-".into()));
            }
            if noted {
                row.push(note(v).unwrap_or("-").to_string());
            }
            row
        })
        .collect();
    let mut header = INSTANCE_HEADER.to_vec();
    // A DRAIN column only when some instance is drained, so tables without stay as they were.
    if drains {
        header.push("DRAIN");
    }
    if checked {
        header.push("CHECK");
    }
    if noted {
        header.push("NOTE");
    }
    table(&header, &rows)
}

/// The agent's note on the instance's address (container instances only).
pub fn note(v: &InstanceView) -> Option<&str> {
    v.instance.container.as_ref()?.address_note.as_deref()
}

/// `http GET /healthz answered 503, 3 in a row, since 12:03:04 UTC` (or `passing`, ...), for
/// instances of services with an active check.
pub fn check_summary(v: &InstanceView) -> Option<String> {
    let check = v.health.as_ref()?.check.as_ref()?;
    Some(check.summary())
}

/// Fields a `--format` template may name, as `{{field}}` or, in flux 0.2's Go template
/// spelling, `{{.Field}}` (any case).
pub const TEMPLATE_FIELDS: [&str; 13] = [
    "service",
    "name",
    "host",
    "address",
    "state",
    "rule",
    "image",
    "tag",
    "container",
    "origin",
    "check",
    "note",
    "drained",
];

/// What one `{{...}}` of a template stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placeholder {
    /// A field's text: `{{name}}`, `{{.Name}}`.
    Field(&'static str),
    /// `{{json .}}`: the whole instance as one line of JSON (what `--json` prints per instance).
    JsonAll,
    /// `{{json .Name}}`: one field as a JSON string.
    JsonField(&'static str),
}

/// Reads the text between `{{` and `}}`.
fn placeholder(token: &str) -> Result<Placeholder, crate::model::InvalidInput> {
    let token = token.trim();
    let unknown = || {
        crate::model::InvalidInput::new(
            "format",
            format!(
                "unknown field {{{{{token}}}}}; known: {} (or .Name, json .)",
                TEMPLATE_FIELDS.join(", ")
            ),
        )
    };
    let field = |name: &str| {
        TEMPLATE_FIELDS
            .iter()
            .copied()
            .find(|f| f.eq_ignore_ascii_case(name))
            .ok_or_else(unknown)
    };
    if let Some(arg) = token
        .strip_prefix("json")
        .filter(|a| a.starts_with([' ', '\t']))
    {
        return match arg.trim() {
            "." => Ok(Placeholder::JsonAll),
            a => match a.strip_prefix('.') {
                Some(name) => field(name).map(Placeholder::JsonField),
                None => field(a).map(Placeholder::JsonField),
            },
        };
    }
    match token.strip_prefix('.') {
        Some(name) => field(name).map(Placeholder::Field),
        // The plain spelling is lower case only, as it always was.
        None if TEMPLATE_FIELDS.contains(&token) => field(token).map(Placeholder::Field),
        None => Err(unknown()),
    }
}

/// Checks a template once, before any output, so a typo is a usage error and not a half
/// printed list.
pub fn check_template(t: &str) -> Result<(), crate::model::InvalidInput> {
    let mut rest = t;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| crate::model::InvalidInput::new("format", "unclosed {{").value(t))?;
        placeholder(&after[..end])?;
        rest = &after[end + 2..];
    }
    Ok(())
}

/// One field of an instance as text (empty when it has none).
fn field_text(f: &str, v: &InstanceView) -> String {
    let i = &v.instance;
    let c = i.container.as_ref();
    match f {
        "service" => i.service.clone(),
        "name" => i.name.clone(),
        "host" => i.host.clone().unwrap_or_default(),
        "address" => i.address.map(|a| a.to_string()).unwrap_or_default(),
        "state" => v.state.as_str().to_string(),
        "rule" => i.rule.clone().unwrap_or_default(),
        "image" => c.map(|c| c.image.clone()).unwrap_or_default(),
        "tag" => c.map(|c| c.tag.clone()).unwrap_or_default(),
        "container" => c.map(|c| c.id.clone()).unwrap_or_default(),
        "origin" => format!("{:?}", i.origin).to_lowercase(),
        "check" => check_summary(v).unwrap_or_default(),
        "note" => note(v).unwrap_or_default().to_string(),
        "drained" => v.drained.to_string(),
        _ => String::new(),
    }
}

/// Fills the placeholders of a template checked by [`check_template`]; `\n` and `\t` escapes
/// are honoured for shell convenience.
pub fn render_template(t: &str, v: &InstanceView) -> String {
    let value = |token: &str| -> String {
        match placeholder(token) {
            Ok(Placeholder::Field(f)) => field_text(f, v),
            Ok(Placeholder::JsonAll) => serde_json::to_string(v).unwrap_or_default(),
            Ok(Placeholder::JsonField(f)) => {
                serde_json::to_string(&field_text(f, v)).unwrap_or_default()
            }
            Err(_) => String::new(),
        }
    };
    let mut out = String::new();
    let mut rest = t;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find("}}") {
            Some(end) => {
                out.push_str(&value(&after[..end]));
                rest = &after[end + 2..];
            }
            None => {
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out.replace("\\n", "\n").replace("\\t", "\t")
}

/// `fluxctl list`: one line per service, with a last `FORWARD` column (`proxy` or `kernel`)
/// only when some service is forwarded by the kernel, so lists without any look as they did.
pub fn list_text(services: &[ServiceInfo], verbose: bool) -> String {
    let kernel = services
        .iter()
        .any(|s| s.service.forward == Forwarding::Kernel);
    let rows: Vec<Vec<String>> = services
        .iter()
        .map(|s| {
            let live = s
                .instances
                .iter()
                .filter(|i| i.state == InstanceState::Live)
                .count();
            vec![
                s.service.name.clone(),
                s.service.address_text(),
                s.service.protocol.to_string(),
                s.rules.len().to_string(),
                s.instances.len().to_string(),
                live.to_string(),
                s.service
                    .health
                    .as_ref()
                    .map(|h| h.spec())
                    .unwrap_or_else(|| "-".into()),
            ]
            .into_iter()
            .chain(kernel.then(|| s.service.forward.to_string()))
            .collect()
        })
        .collect();
    let mut header = vec![
        "NAME",
        "ADDRESS",
        "PROTOCOL",
        "RULES",
        "INSTANCES",
        "LIVE",
        "HEALTH-CHECK",
    ];
    if kernel {
        header.push("FORWARD");
    }
    let mut out = table(&header, &rows);
    if verbose {
        out = with_rules_under_rows(&out, services);
    }
    for s in services {
        if let Some(why) = &s.refused {
            out.push_str(&format!(
                "{}: not routed on this host: VIP {why}\n",
                s.service.name
            ));
        }
    }
    out
}

/// `fluxctl list -v`: each service's row followed by its rules, indented, one per line.
fn with_rules_under_rows(table: &str, services: &[ServiceInfo]) -> String {
    let mut lines = table.lines();
    let mut out = String::new();
    if let Some(header) = lines.next() {
        out.push_str(header);
        out.push('\n');
    }
    for (row, s) in lines.zip(services) {
        out.push_str(row);
        out.push('\n');
        let tuning = super::service_text::tuning(&s.service);
        if !tuning.is_empty() {
            out.push_str(&format!("  {tuning}\n"));
        }
        for r in &s.rules {
            out.push_str(&format!("  rule {}: {}", r.name, selector(&r.selector)));
            if let Some(p) = r.instance_port {
                out.push_str(&format!(" instance-port={p}"));
            }
            if let Some(w) = r.weight {
                out.push_str(&format!(" weight={w}"));
            }
            out.push('\n');
        }
    }
    out
}

/// The live hosts, as `fluxctl hosts` and `fluxctl info` print them.
pub fn hosts_text(hosts: &[HostView], now: SystemTime) -> String {
    let rows: Vec<Vec<String>> = hosts
        .iter()
        .map(|h| {
            let version = match &h.host.commit {
                Some(c) => format!("{} ({c})", h.host.version),
                None => h.host.version.clone(),
            };
            vec![
                h.host.name.clone(),
                h.host.ip.to_string(),
                h.last_seen_unix_ms
                    .map(|ms| ago(now, ms))
                    .unwrap_or_else(|| "-".into()),
                h.instances.to_string(),
                version,
            ]
        })
        .collect();
    table(&["HOST", "IP", "LAST-SEEN", "INSTANCES", "VERSION"], &rows)
}

/// `3s ago`, `2m5s ago`, `1h2m ago`: how long before `now` the Unix time `ms` was.
fn ago(now: SystemTime, ms: u64) -> String {
    let now_ms = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let s = now_ms.saturating_sub(ms) / 1000;
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m{}s ago", s / 60, s % 60),
        _ => format!("{}h{}m ago", s / 3600, s % 3600 / 60),
    }
}

/// `fluxctl info`: one service with its rules and instances.
pub fn info_text(s: &ServiceInfo) -> String {
    let svc = &s.service;
    let mut out = format!(
        "service {}  address {}  protocol {}  instance-port {}  balance {}\n",
        svc.name,
        svc.address_text(),
        svc.protocol,
        svc.default_instance_port(),
        svc.balance
    );
    if svc.forward == Forwarding::Kernel {
        out.push_str(
            "forwarded by the kernel: iptables DNAT to a live instance at random; no connect retry, no per-connection metrics\n",
        );
    }
    if let Some(h) = &svc.health {
        out.push_str(&format!("health check: {}\n", h.describe()));
    }
    if let Some(t) = super::traffic_args::describe(svc) {
        out.push_str(&t);
    }
    let tuning = super::service_text::tuning(svc);
    if !tuning.is_empty() {
        out.push_str(&format!("{tuning}\n"));
    }
    if let Some(why) = &s.refused {
        out.push_str(&format!("not routed on this host: VIP {why}\n"));
    }
    let addressed = || s.instances.iter().filter(|i| i.instance.address.is_some());
    if addressed().next().is_some() && addressed().all(|i| i.state == InstanceState::Failing) {
        out.push_str(
            "every instance fails its health check: all are tried as if unchecked (panic mode)\n",
        );
    }
    let weighted = s.rules.iter().any(|r| r.weight.is_some());
    if s.rules.is_empty() {
        out.push_str("rules: none\n");
    } else {
        let rows: Vec<Vec<String>> = s
            .rules
            .iter()
            .map(|r| {
                let mut row = vec![
                    r.name.clone(),
                    selector(&r.selector),
                    r.instance_port
                        .map(|p| p.to_string())
                        .unwrap_or_else(|| "-".into()),
                ];
                if weighted {
                    row.push(r.weight_or_default().to_string());
                }
                row
            })
            .collect();
        let mut header = vec!["RULE", "SELECTOR", "INSTANCE-PORT"];
        // A WEIGHT column once some rule sets one (only then do rules share by weight).
        if weighted {
            header.push("WEIGHT");
        }
        out.push_str(&table(&header, &rows));
    }
    if s.instances.is_empty() {
        out.push_str("instances: none\n");
    } else {
        out.push_str(&instance_table(&s.instances));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align() {
        let t = table(&["A", "BB"], &[vec!["long".into(), "x".into()]]);
        assert_eq!(t, "A     BB\nlong  x\n");
    }

    #[test]
    fn ages_read_as_people_say_them() {
        let now = UNIX_EPOCH + std::time::Duration::from_secs(10_000);
        let at = |s: u64| (10_000 - s) * 1000;
        assert_eq!(ago(now, at(0)), "0s ago");
        assert_eq!(ago(now, at(59)), "59s ago");
        assert_eq!(ago(now, at(125)), "2m5s ago");
        assert_eq!(ago(now, at(3720)), "1h2m ago");
        // A clock that ran ahead on the other host is "now", not a wrap-around.
        assert_eq!(ago(now, 20_000_000), "0s ago");
    }

    #[test]
    fn templates() {
        assert!(check_template("{{address}} {{ state }} {{note}}").is_ok());
        assert!(check_template("{{nope}}").is_err());
        assert!(check_template("{{address").is_err());
        // flux 0.2's Go template spelling.
        assert!(check_template("{{.Name}} {{.State}} {{ json . }} {{json .Address}}").is_ok());
        assert!(check_template("{{.name}}").is_ok());
        assert!(check_template("{{.Nope}}").is_err());
        assert!(check_template("{{json}}").is_err());
        assert!(check_template("{{json .Nope}}").is_err());
        // Plain fields stay lower case, as before.
        assert!(check_template("{{Name}}").is_err());
    }

    #[test]
    fn go_template_spelling_renders_like_the_plain_one() {
        let v = InstanceView::new(&crate::model::Instance::new_static(
            "web",
            "b1",
            "10.0.0.5:80".parse().unwrap(),
        ));
        assert_eq!(
            render_template("{{.Name}} {{.State}} {{name}}\\t{{.ADDRESS}}", &v),
            "b1 live b1\t10.0.0.5:80"
        );
        assert_eq!(render_template("{{json .Name}}", &v), "\"b1\"");
        let all: serde_json::Value =
            serde_json::from_str(&render_template("{{json .}}", &v)).unwrap();
        assert_eq!(all, serde_json::to_value(&v).unwrap());
    }

    fn service_info(json: serde_json::Value) -> ServiceInfo {
        let mut info = json;
        info["rules"] = serde_json::json!([]);
        info["instances"] = serde_json::json!([]);
        serde_json::from_value(info).unwrap()
    }

    #[test]
    fn forward_column_only_when_a_service_is_kernel_forwarded() {
        let web = service_info(serde_json::json!({"name": "web", "address": "198.18.0.10:80"}));
        let bulk = service_info(
            serde_json::json!({"name": "bulk", "address": "198.18.0.11:80", "forward": "kernel"}),
        );
        let t = list_text(std::slice::from_ref(&web), false);
        assert!(!t.contains("FORWARD"), "{t}");
        let t = list_text(&[web.clone(), bulk.clone()], false);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].ends_with("HEALTH-CHECK  FORWARD"), "{t}");
        assert!(
            lines[1].starts_with("web ") && lines[1].ends_with("  proxy"),
            "{t}"
        );
        assert!(
            lines[2].starts_with("bulk ") && lines[2].ends_with("  kernel"),
            "{t}"
        );
        assert!(info_text(&bulk).contains("\nforwarded by the kernel: "));
        assert!(!info_text(&web).contains("kernel"));
    }

    fn container_view(name: &str, note: Option<&str>) -> InstanceView {
        let json = serde_json::json!({
            "service": "web", "name": name, "origin": "container", "host": "h1", "rule": "all",
            "container": {
                "id": "0123456789abcdef", "name": "c", "image": "docker.io/library/webimg",
                "tag": "latest", "address_note": note,
            },
        });
        let i: crate::model::Instance = serde_json::from_value(json).unwrap();
        InstanceView::new(&i)
    }

    #[test]
    fn note_column_only_when_an_instance_has_a_note() {
        let plain = container_view("aaaaaaaaaaaa", None);
        let t = instance_table(std::slice::from_ref(&plain));
        assert!(!t.contains("NOTE"), "{t}");
        let noted = container_view("bbbbbbbbbbbb", Some("port 80/tcp is not published"));
        let t = instance_table(&[plain.clone(), noted.clone()]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].ends_with("  NOTE"), "{t}");
        assert!(lines[1].ends_with("  -"), "{t}");
        assert!(
            lines[2].ends_with(
                "no address  all   docker.io/library/webimg  latest  port 80/tcp is not published"
            ),
            "{t}"
        );
        assert_eq!(
            render_template("{{name}}: {{note}}", &noted),
            "bbbbbbbbbbbb: port 80/tcp is not published"
        );
        assert_eq!(render_template("{{note}}", &plain), "");
    }

    #[test]
    fn drain_and_weight_columns_only_when_used() {
        let plain = container_view("aaaaaaaaaaaa", None);
        let t = instance_table(std::slice::from_ref(&plain));
        assert!(!t.contains("DRAIN"), "{t}");
        let drained = container_view("bbbbbbbbbbbb", None).drained(true);
        let t = instance_table(&[plain.clone(), drained.clone()]);
        assert!(t.lines().next().unwrap().ends_with("DRAIN"), "{t}");
        assert!(t.lines().nth(2).unwrap().ends_with("drained"), "{t}");
        assert_eq!(render_template("{{drained}}", &drained), "true");

        let mut s = service_info(serde_json::json!({"name": "web", "address": "198.18.0.10:80"}));
        s.rules = serde_json::from_value(serde_json::json!([
            {"service": "web", "name": "v1", "selector": {"tag": "1"}, "weight": 90},
            {"service": "web", "name": "v2", "selector": {"tag": "2"}},
        ]))
        .unwrap();
        let info = info_text(&s);
        assert!(info.contains("WEIGHT"), "{info}");
        assert!(
            info.lines()
                .any(|l| l.starts_with("v2") && l.ends_with("100")),
            "{info}"
        );
        let list = list_text(std::slice::from_ref(&s), true);
        assert!(list.contains("rule v1: tag=1 weight=90\n"), "{list}");
        s.service.locality = crate::model::Locality::PreferHost;
        assert!(info_text(&s).contains("traffic: locality prefer-host  affinity none\n"));
    }
}
