//! How fluxctl prints: aligned columns for people, one JSON document for scripts, and the
//! `--format` template for shell loops.

use std::fmt::Write;

use crate::api::views::InstanceView;
use crate::model::Selector;

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
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|v| {
            let mut row = instance_row(v);
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

/// Fields a `--format` template may name, as `{{field}}`.
pub const TEMPLATE_FIELDS: [&str; 12] = [
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
];

/// Checks a template once, before any output, so a typo is a usage error and not a half
/// printed list.
pub fn check_template(t: &str) -> Result<(), crate::model::InvalidInput> {
    let mut rest = t;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| crate::model::InvalidInput::new("format", "unclosed {{").value(t))?;
        let field = after[..end].trim();
        if !TEMPLATE_FIELDS.contains(&field) {
            return Err(crate::model::InvalidInput::new(
                "format",
                format!(
                    "unknown field {{{{{field}}}}}; known: {}",
                    TEMPLATE_FIELDS.join(", ")
                ),
            ));
        }
        rest = &after[end + 2..];
    }
    Ok(())
}

/// Fills `{{field}}` placeholders; `\n` and `\t` escapes are honoured for shell convenience.
pub fn render_template(t: &str, v: &InstanceView) -> String {
    let i = &v.instance;
    let c = i.container.as_ref();
    let value = |f: &str| -> String {
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
            _ => String::new(),
        }
    };
    let mut out = String::new();
    let mut rest = t;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find("}}") {
            Some(end) => {
                out.push_str(&value(after[..end].trim()));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align() {
        let t = table(&["A", "BB"], &[vec!["long".into(), "x".into()]]);
        assert_eq!(t, "A     BB\nlong  x\n");
    }

    #[test]
    fn templates() {
        assert!(check_template("{{address}} {{ state }} {{note}}").is_ok());
        assert!(check_template("{{nope}}").is_err());
        assert!(check_template("{{address").is_err());
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
}
