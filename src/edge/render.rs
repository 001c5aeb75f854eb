//! The nginx configuration `fluxd edge` keeps: a pure function of the chosen services and their
//! instances, so that it is tested without nginx. The text goes into nginx's `http` context
//! (an include file such as `/etc/nginx/conf.d/flux.conf`): one `upstream flux_NAME` and one
//! `server` block per service, or whatever an operator's template makes of them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Where one service is published: `--service NAME=[ADDR]:PORT[@SERVER_NAME,...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    pub service: String,
    /// nginx `listen` argument: `8080` (every address) or `127.0.0.1:8080`, `[::1]:8080`.
    pub listen: String,
    /// `server_name`s; empty means any name.
    pub server_names: Vec<String>,
}

/// Everything the rendering depends on besides the instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub sites: Vec<Site>,
    /// Idle kept-alive connections to instances, per nginx worker.
    pub keepalive: u32,
    /// The 503 page served while a service has no live instance; None for the built-in one.
    pub unavailable_page: Option<PathBuf>,
}

/// The instances to list per service (only those the caller judged live), by service name.
pub type Instances = BTreeMap<String, Vec<SocketAddr>>;

/// The internal location the 503 page is served from.
const UNAVAILABLE_URI: &str = "/__flux_unavailable";

/// The built-in 503 page. It is embedded in nginx's configuration as a quoted string, so it
/// holds no `'`, `\` or `$`.
pub const DEFAULT_UNAVAILABLE_PAGE: &str = "<!doctype html>\n<html><head><title>503 Service Unavailable</title></head>\n<body><h1>Service unavailable</h1><p>No instance of this service is running. Please try again shortly.</p></body></html>\n";

const HEADER: &str =
    "# Written by `fluxd edge`; rewritten whenever the services' instances change.\n";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    #[error("template: unclosed '{{{{' at line {0}")]
    Unclosed(usize),
    #[error("template: unknown placeholder {{{{{name}}}}} at line {line} (known: upstreams, servers, upstream:NAME, server:NAME, instances:NAME, upstream_name:NAME)")]
    Unknown { name: String, line: usize },
    #[error("template: {{{{{name}}}}} at line {line} names a service that is not published with --service")]
    NotPublished { name: String, line: usize },
}

/// The whole configuration without a template: a header, the upstreams, then the servers.
pub fn render(layout: &Layout, instances: &Instances) -> String {
    let mut out = String::from(HEADER);
    out += &upstreams(layout, instances);
    out += &servers(layout, instances);
    out
}

/// Fills a template's placeholders: `{{upstreams}}`, `{{servers}}` (every service's blocks),
/// `{{upstream:NAME}}`, `{{server:NAME}}` (one service's block), `{{instances:NAME}}` (the
/// `server ADDR:PORT ...;` lines of one upstream, for an operator's own upstream block) and
/// `{{upstream_name:NAME}}` (`flux_NAME`, for `proxy_pass http://...`). Everything else is
/// copied as is; an unknown placeholder is an error, so a typo never reaches nginx.
pub fn render_template(
    template: &str,
    layout: &Layout,
    instances: &Instances,
) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(template.len() * 2);
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out += &rest[..start];
        let line = template[..template.len() - rest.len() + start]
            .matches('\n')
            .count()
            + 1;
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or(TemplateError::Unclosed(line))?;
        let name = after[..end].trim();
        let site = |svc: &str| {
            layout
                .sites
                .iter()
                .find(|s| s.service == svc)
                .ok_or_else(|| TemplateError::NotPublished {
                    name: name.to_string(),
                    line,
                })
        };
        match name.split_once(':') {
            None if name == "upstreams" => out += &upstreams(layout, instances),
            None if name == "servers" => out += &servers(layout, instances),
            Some(("upstream", svc)) => {
                let s = site(svc)?;
                out += &upstream(&s.service, layout.keepalive, live(instances, svc));
            }
            Some(("server", svc)) => {
                let s = site(svc)?;
                out += &server(s, layout, !live(instances, svc).is_empty());
            }
            Some(("instances", svc)) => {
                site(svc)?;
                out += &server_lines(live(instances, svc), "");
            }
            Some(("upstream_name", svc)) => {
                site(svc)?;
                out += &upstream_name(svc);
            }
            _ => {
                return Err(TemplateError::Unknown {
                    name: name.to_string(),
                    line,
                })
            }
        }
        rest = &after[end + 2..];
    }
    out += rest;
    Ok(out)
}

fn live<'a>(instances: &'a Instances, svc: &str) -> &'a [SocketAddr] {
    instances.get(svc).map_or(&[], Vec::as_slice)
}

pub fn upstream_name(service: &str) -> String {
    format!("flux_{service}")
}

fn upstreams(layout: &Layout, instances: &Instances) -> String {
    let mut seen = std::collections::BTreeSet::new();
    layout
        .sites
        .iter()
        .filter(|s| seen.insert(s.service.as_str()))
        .map(|s| upstream(&s.service, layout.keepalive, live(instances, &s.service)))
        .collect()
}

fn servers(layout: &Layout, instances: &Instances) -> String {
    layout
        .sites
        .iter()
        .map(|s| server(s, layout, !live(instances, &s.service).is_empty()))
        .collect()
}

/// One `server` line per instance. A failed attempt takes the instance out for 5 s
/// (`max_fails=1 fail_timeout=5s`), so a stopped container costs one refused connect per 5 s,
/// retried on the next instance, until flux drops it from the list. With no instance, one
/// `down` placeholder keeps the upstream valid (nginx refuses an empty one) for templates that
/// use it; the generated server blocks answer 503 themselves then.
fn server_lines(addrs: &[SocketAddr], indent: &str) -> String {
    if addrs.is_empty() {
        return format!("{indent}server 127.0.0.1:1 down; # no live instance\n");
    }
    addrs
        .iter()
        .map(|a| format!("{indent}server {a} max_fails=1 fail_timeout=5s;\n"))
        .collect()
}

fn upstream(service: &str, keepalive: u32, addrs: &[SocketAddr]) -> String {
    let mut s = format!("upstream {} {{\n", upstream_name(service));
    s += &server_lines(addrs, "    ");
    if keepalive > 0 {
        let _ = writeln!(s, "    keepalive {keepalive};");
    }
    s += "}\n";
    s
}

fn server(site: &Site, layout: &Layout, has_instances: bool) -> String {
    let mut s = String::from("server {\n");
    let _ = writeln!(s, "    listen {};", site.listen);
    if !site.server_names.is_empty() {
        let _ = writeln!(s, "    server_name {};", site.server_names.join(" "));
    }
    // nginx's own 502/504 (every instance failed or timed out) become the 503 page too; an
    // instance's own error responses pass through (proxy_intercept_errors is off).
    let _ = writeln!(s, "    error_page 502 503 504 =503 {UNAVAILABLE_URI};");
    s += "    location / {\n";
    if has_instances {
        let _ = writeln!(
            s,
            "        proxy_pass http://{};",
            upstream_name(&site.service)
        );
        s += "        proxy_http_version 1.1;\n";
        s += "        proxy_set_header Connection \"\";\n";
        s += "        proxy_set_header Host $host;\n";
        s += "        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n";
        s += "        proxy_set_header X-Forwarded-Proto $scheme;\n";
        s += "        proxy_connect_timeout 2s;\n";
        s += "        proxy_next_upstream error timeout http_502 http_503 http_504;\n";
        s += "        proxy_next_upstream_timeout 15s;\n";
    } else {
        s += "        return 503;\n";
    }
    s += "    }\n";
    let _ = writeln!(s, "    location = {UNAVAILABLE_URI} {{");
    s += "        internal;\n";
    s += "        default_type text/html;\n";
    s += "        add_header Retry-After 5 always;\n";
    match &layout.unavailable_page {
        Some(p) => {
            let _ = writeln!(s, "        alias \"{}\";", p.display());
        }
        None => {
            let _ = writeln!(s, "        return 503 '{DEFAULT_UNAVAILABLE_PAGE}';");
        }
    }
    s += "    }\n}\n";
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout {
            sites: vec![
                Site {
                    service: "web".into(),
                    listen: "8080".into(),
                    server_names: vec!["example.com".into(), "www.example.com".into()],
                },
                Site {
                    service: "api".into(),
                    listen: "127.0.0.1:8081".into(),
                    server_names: vec![],
                },
            ],
            keepalive: 16,
            unavailable_page: None,
        }
    }

    fn instances() -> Instances {
        let mut m = Instances::new();
        m.insert(
            "web".into(),
            vec![
                "10.0.0.1:80".parse().unwrap(),
                "10.0.0.2:80".parse().unwrap(),
            ],
        );
        m
    }

    #[test]
    fn upstream_and_server_per_service() {
        let text = render(&layout(), &instances());
        assert_eq!(
            text,
            format!(
                "{HEADER}upstream flux_web {{
    server 10.0.0.1:80 max_fails=1 fail_timeout=5s;
    server 10.0.0.2:80 max_fails=1 fail_timeout=5s;
    keepalive 16;
}}
upstream flux_api {{
    server 127.0.0.1:1 down; # no live instance
    keepalive 16;
}}
server {{
    listen 8080;
    server_name example.com www.example.com;
    error_page 502 503 504 =503 /__flux_unavailable;
    location / {{
        proxy_pass http://flux_web;
        proxy_http_version 1.1;
        proxy_set_header Connection \"\";
        proxy_set_header Host $host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_connect_timeout 2s;
        proxy_next_upstream error timeout http_502 http_503 http_504;
        proxy_next_upstream_timeout 15s;
    }}
    location = /__flux_unavailable {{
        internal;
        default_type text/html;
        add_header Retry-After 5 always;
        return 503 '{DEFAULT_UNAVAILABLE_PAGE}';
    }}
}}
server {{
    listen 127.0.0.1:8081;
    error_page 502 503 504 =503 /__flux_unavailable;
    location / {{
        return 503;
    }}
    location = /__flux_unavailable {{
        internal;
        default_type text/html;
        add_header Retry-After 5 always;
        return 503 '{DEFAULT_UNAVAILABLE_PAGE}';
    }}
}}
"
            )
        );
    }

    #[test]
    fn same_input_same_text_and_page_file() {
        let mut l = layout();
        l.unavailable_page = Some("/srv/sorry page.html".into());
        l.keepalive = 0;
        let a = render(&l, &instances());
        assert_eq!(a, render(&l, &instances()));
        assert!(a.contains("alias \"/srv/sorry page.html\";"), "{a}");
        assert!(!a.contains("keepalive"), "{a}");
        assert!(!DEFAULT_UNAVAILABLE_PAGE.contains(['\'', '\\', '$']));
    }

    #[test]
    fn one_upstream_for_a_service_published_twice() {
        let mut l = layout();
        l.sites.push(Site {
            service: "web".into(),
            listen: "8443".into(),
            server_names: vec![],
        });
        let text = render(&l, &instances());
        assert_eq!(text.matches("upstream flux_web {").count(), 1);
        assert_eq!(text.matches("proxy_pass http://flux_web;").count(), 2);
    }

    #[test]
    fn template_placeholders() {
        let t = "# mine\n{{ upstream:web }}server { listen 9; location / { proxy_pass http://{{upstream_name:web}}; } }\nupstream own {\n{{instances:api}}}\n";
        let text = render_template(t, &layout(), &instances()).unwrap();
        assert!(text.starts_with("# mine\nupstream flux_web {\n"), "{text}");
        assert!(
            text.contains(
                "proxy_pass http://flux_web; } }\nupstream own {\nserver 127.0.0.1:1 down;"
            ),
            "{text}"
        );
        let all = render_template("{{upstreams}}{{servers}}", &layout(), &instances()).unwrap();
        assert_eq!(format!("{HEADER}{all}"), render(&layout(), &instances()));
    }

    #[test]
    fn template_errors() {
        let l = layout();
        let i = instances();
        assert_eq!(
            render_template("a\nb {{servers", &l, &i),
            Err(TemplateError::Unclosed(2))
        );
        assert_eq!(
            render_template("{{upstream}}", &l, &i),
            Err(TemplateError::Unknown {
                name: "upstream".into(),
                line: 1
            })
        );
        let e = render_template("\n\n{{server:db}}", &l, &i).unwrap_err();
        assert_eq!(
            e,
            TemplateError::NotPublished {
                name: "server:db".into(),
                line: 3
            }
        );
        assert!(e.to_string().contains("line 3"), "{e}");
        assert!(render_template("{{bogus}}", &l, &i)
            .unwrap_err()
            .to_string()
            .starts_with("template: unknown placeholder {{bogus}}"));
    }
}
