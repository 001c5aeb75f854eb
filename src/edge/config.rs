//! `fluxd edge`'s flags, and the settings checked from them: which service is published on
//! which nginx listen address and server names, where the file goes, how nginx is checked and
//! reloaded.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::Args;

use super::render::{self, Instances, Layout, Site};
use crate::api::client::{Endpoint, RemoteAuth, RemoteFlags};

/// `fluxd edge` flags.
#[derive(Debug, Clone, Default, Args)]
pub struct EdgeArgs {
    /// A service to publish, and where: NAME=[ADDR]:PORT[@SERVER_NAME,...] (repeatable), e.g.
    /// `web=:80@example.com,www.example.com` or `api=127.0.0.1:8081`. Each becomes one nginx
    /// upstream (`flux_NAME`) and one server block.
    #[arg(
        long = "service",
        value_name = "NAME=[ADDR]:PORT[@NAMES]",
        required = true
    )]
    pub services: Vec<String>,
    /// The file fluxd edge owns and rewrites, included in nginx's `http` block (Debian's
    /// nginx.conf includes /etc/nginx/conf.d/*.conf).
    #[arg(long, value_name = "PATH", required = true)]
    pub nginx_conf: PathBuf,
    /// Render this template instead of the built-in layout; placeholders: {{upstreams}},
    /// {{servers}}, {{upstream:NAME}}, {{server:NAME}}, {{instances:NAME}},
    /// {{upstream_name:NAME}}. Re-read at every check, so edits take effect without a restart.
    #[arg(long, value_name = "FILE")]
    pub template: Option<PathBuf>,
    /// HTML page answered with 503 while a service has no live instance (read by nginx; must
    /// be readable by its workers) [default: a built-in page].
    #[arg(long, value_name = "FILE")]
    pub unavailable_page: Option<PathBuf>,
    /// fluxd's API: unix:///PATH, http://HOST:PORT or https://HOST:PORT (the remote API, with
    /// --token-file; for an nginx on another host than fluxd).
    #[arg(long, env = "FLUX_API", default_value = "unix:///run/fluxd/fluxd.sock")]
    pub api: String,
    #[command(flatten)]
    pub remote: RemoteFlags,
    /// Checks the configuration nginx would load (run with /bin/sh -c).
    #[arg(long, value_name = "CMD", default_value = "nginx -t -q")]
    pub test_cmd: String,
    /// Makes nginx load the new configuration gracefully (run with /bin/sh -c).
    #[arg(long, value_name = "CMD", default_value = "nginx -s reload")]
    pub reload_cmd: String,
    /// How often to ask fluxd for the instances, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub interval_ms: u64,
    /// After a change, wait until the picture has held still this long before rewriting, so a
    /// burst of changes costs one reload.
    #[arg(long, value_name = "MS", default_value_t = 250)]
    pub debounce_ms: u64,
    /// Idle kept-alive connections to instances per nginx worker and upstream (0: none).
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub keepalive: u32,
    /// Render and apply once, then exit (0: in place, 1: fluxd or nginx failed).
    #[arg(long)]
    pub once: bool,
    /// Log format: `text` or `json`.
    #[arg(long, default_value = "text")]
    pub log_format: String,
}

/// The checked settings.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    pub layout: Layout,
    pub nginx_conf: PathBuf,
    pub template: Option<PathBuf>,
    pub api: Endpoint,
    pub auth: RemoteAuth,
    pub test_cmd: String,
    pub reload_cmd: String,
    pub interval: Duration,
    pub debounce: Duration,
    pub once: bool,
    pub json_logs: bool,
}

impl EdgeConfig {
    /// Checks every flag; an error is one line naming the flag.
    pub fn load(args: &EdgeArgs) -> anyhow::Result<EdgeConfig> {
        let mut sites: Vec<Site> = Vec::new();
        for s in &args.services {
            let site = parse_site(s)?;
            for other in &sites {
                let same_names = other.server_names.is_empty() && site.server_names.is_empty()
                    || other
                        .server_names
                        .iter()
                        .any(|n| site.server_names.contains(n));
                if other.listen == site.listen && same_names {
                    bail!(
                        "--service: {} and {} both take listen {} for the same server name",
                        other.service,
                        site.service,
                        site.listen
                    );
                }
            }
            sites.push(site);
        }
        let nginx_conf = args.nginx_conf.clone();
        if !nginx_conf.is_absolute() || nginx_conf.file_name().is_none() {
            bail!(
                "--nginx-conf: expected an absolute file path (got \"{}\")",
                nginx_conf.display()
            );
        }
        match nginx_conf.parent().map(std::fs::metadata) {
            Some(Ok(m)) if m.is_dir() => {}
            _ => bail!(
                "--nginx-conf: the directory of {} does not exist",
                nginx_conf.display()
            ),
        }
        if nginx_conf.is_dir() {
            bail!("--nginx-conf: {} is a directory", nginx_conf.display());
        }
        if let Some(t) = &args.template {
            let text = std::fs::read_to_string(t)
                .map_err(|e| anyhow::anyhow!("--template: cannot read {}: {e}", t.display()))?;
            let layout = Layout {
                sites: sites.clone(),
                keepalive: args.keepalive,
                unavailable_page: None,
            };
            render::render_template(&text, &layout, &Instances::new())
                .map_err(|e| anyhow::anyhow!("--{e}"))?;
        }
        if let Some(p) = &args.unavailable_page {
            let s = p.to_string_lossy();
            if !p.is_absolute() || s.contains(['"', '$', '\\', '\n', ';', '{', '}']) {
                bail!(
                    "--unavailable-page: expected an absolute path without quotes, '$', ';', braces or backslashes (got \"{s}\")"
                );
            }
            std::fs::File::open(p)
                .map_err(|e| anyhow::anyhow!("--unavailable-page: cannot read {s}: {e}"))?;
        }
        let api = Endpoint::parse(&args.api).map_err(|e| anyhow::anyhow!("--{e}"))?;
        let auth = args.remote.auth().map_err(|e| anyhow::anyhow!("--{e}"))?;
        for (flag, cmd) in [
            ("--test-cmd", &args.test_cmd),
            ("--reload-cmd", &args.reload_cmd),
        ] {
            if cmd.trim().is_empty() {
                bail!("{flag}: must not be empty");
            }
        }
        if !(50..=600_000).contains(&args.interval_ms) {
            bail!(
                "--interval-ms: must be 50-600000 (got {})",
                args.interval_ms
            );
        }
        if args.debounce_ms > 60_000 {
            bail!("--debounce-ms: must be 0-60000 (got {})", args.debounce_ms);
        }
        if args.keepalive > 10_000 {
            bail!("--keepalive: must be 0-10000 (got {})", args.keepalive);
        }
        let json_logs = match args.log_format.as_str() {
            "text" => false,
            "json" => true,
            other => bail!("--log-format: must be text or json (got \"{other}\")"),
        };
        Ok(EdgeConfig {
            layout: Layout {
                sites,
                keepalive: args.keepalive,
                unavailable_page: args.unavailable_page.clone(),
            },
            nginx_conf,
            template: args.template.clone(),
            api,
            auth,
            test_cmd: args.test_cmd.clone(),
            reload_cmd: args.reload_cmd.clone(),
            interval: Duration::from_millis(args.interval_ms),
            debounce: Duration::from_millis(args.debounce_ms),
            once: args.once,
            json_logs,
        })
    }
}

/// `NAME=[ADDR]:PORT[@SERVER_NAME,...]`.
pub fn parse_site(s: &str) -> anyhow::Result<Site> {
    let usage = || {
        anyhow::anyhow!(
            "--service: expected NAME=[ADDR]:PORT[@SERVER_NAME,...], e.g. web=:80@example.com (got \"{s}\")"
        )
    };
    let (name, rest) = s.split_once('=').ok_or_else(usage)?;
    crate::model::validate::name("service", name).map_err(|e| anyhow::anyhow!("--service: {e}"))?;
    let (listen, names) = match rest.split_once('@') {
        Some((l, n)) => (l, Some(n)),
        None => (rest, None),
    };
    let listen = if let Some(port) = listen.strip_prefix(':') {
        match port.parse::<u16>() {
            Ok(p) if p > 0 => p.to_string(),
            _ => return Err(usage()),
        }
    } else {
        match listen.parse::<SocketAddr>() {
            Ok(a) if a.port() > 0 => a.to_string(),
            _ => return Err(usage()),
        }
    };
    let mut server_names = Vec::new();
    if let Some(names) = names {
        for n in names.split(',') {
            let ok = !n.is_empty()
                && n.len() <= 253
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'*' | b'_'));
            if !ok {
                bail!("--service: not a server name: \"{n}\" in \"{s}\"");
            }
            server_names.push(n.to_ascii_lowercase());
        }
    }
    Ok(Site {
        service: name.to_string(),
        listen,
        server_names,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(services: &[&str], conf: &std::path::Path) -> EdgeArgs {
        EdgeArgs {
            services: services.iter().map(|s| s.to_string()).collect(),
            nginx_conf: conf.to_path_buf(),
            api: "unix:///run/fluxd/fluxd.sock".into(),
            test_cmd: "nginx -t -q".into(),
            reload_cmd: "nginx -s reload".into(),
            interval_ms: 1000,
            debounce_ms: 250,
            keepalive: 16,
            log_format: "text".into(),
            ..EdgeArgs::default()
        }
    }

    #[test]
    fn sites() {
        let s = parse_site("web=:80@Example.com,www.example.com").unwrap();
        assert_eq!(s.service, "web");
        assert_eq!(s.listen, "80");
        assert_eq!(s.server_names, ["example.com", "www.example.com"]);
        assert_eq!(
            parse_site("api=127.0.0.1:8081").unwrap().listen,
            "127.0.0.1:8081"
        );
        assert_eq!(parse_site("v6=[::1]:8081").unwrap().listen, "[::1]:8081");
        assert!(parse_site("web=:80@").is_err());
        assert!(parse_site("web=:80@a b").is_err());
    }

    #[test]
    fn bad_flags_name_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("flux.conf");
        let cases: Vec<(EdgeArgs, &str)> = vec![
            (args(&["web"], &conf), "--service: expected NAME="),
            (args(&["web=80"], &conf), "--service: expected"),
            (args(&["web=:0"], &conf), "--service: expected"),
            (args(&["web=:99999"], &conf), "--service: expected"),
            (args(&["Web=:80"], &conf), "--service: service"),
            (
                args(&["web=:80", "api=:80"], &conf),
                "--service: web and api",
            ),
            (
                args(&["web=:80"], std::path::Path::new("flux.conf")),
                "--nginx-conf",
            ),
            (
                args(&["web=:80"], &dir.path().join("nope/flux.conf")),
                "--nginx-conf",
            ),
            (args(&["web=:80"], dir.path()), "--nginx-conf"),
            (
                EdgeArgs {
                    template: Some(dir.path().join("missing.tmpl")),
                    ..args(&["web=:80"], &conf)
                },
                "--template: cannot read",
            ),
            (
                EdgeArgs {
                    unavailable_page: Some(dir.path().join("missing.html")),
                    ..args(&["web=:80"], &conf)
                },
                "--unavailable-page: cannot read",
            ),
            (
                EdgeArgs {
                    unavailable_page: Some("/a$b.html".into()),
                    ..args(&["web=:80"], &conf)
                },
                "--unavailable-page: expected",
            ),
            (
                EdgeArgs {
                    api: "tcp://x".into(),
                    ..args(&["web=:80"], &conf)
                },
                "--api",
            ),
            (
                EdgeArgs {
                    interval_ms: 0,
                    ..args(&["web=:80"], &conf)
                },
                "--interval-ms",
            ),
            (
                EdgeArgs {
                    reload_cmd: " ".into(),
                    ..args(&["web=:80"], &conf)
                },
                "--reload-cmd",
            ),
            (
                EdgeArgs {
                    log_format: "xml".into(),
                    ..args(&["web=:80"], &conf)
                },
                "--log-format",
            ),
        ];
        for (a, want) in cases {
            let e = format!("{:#}", EdgeConfig::load(&a).unwrap_err());
            assert!(e.starts_with(want), "{:?}: {e}", a.services);
            assert!(!e.contains('\n'), "{e}");
        }
        let tmpl = dir.path().join("t");
        std::fs::write(&tmpl, "{{server:api}}").unwrap();
        let e = EdgeConfig::load(&EdgeArgs {
            template: Some(tmpl),
            ..args(&["web=:80"], &conf)
        })
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("--template: {{server:api}}"), "{e}");
        // Two services on one port with different names are fine.
        EdgeConfig::load(&args(&["web=:80@a.example", "api=:80@b.example"], &conf)).unwrap();
    }
}
