//! `fluxd edge`: keeps an nginx configuration in step with the instances of chosen services,
//! so that nginx (the public face of an application) follows containers as they come and go.
//!
//! It asks the local fluxd's API for the services and their instances (`GET /v1/services`,
//! every `--interval-ms`), with this host's view of their health; it does not open the store
//! itself (the embedded store belongs to fluxd). The rendered text (`render`) is put in place by
//! `apply`: atomic write, `nginx -t`, reload only on change, last good file back on refusal.

pub mod apply;
pub mod config;
pub mod render;

pub use config::{EdgeArgs, EdgeConfig};

use std::collections::BTreeSet;
use std::net::SocketAddr;

use crate::api::client::Client;
use crate::api::views::{InstanceState, ServiceInfo};
use apply::{Applier, Outcome};
use render::{Instances, Layout};

/// The addresses nginx should list for each published service: the instances with an address
/// that are live as this host sees them. When none is live but some have an address, those
/// are listed all the same: this host's view comes from its own proxy's connects and may be
/// stale, and nginx checks them itself (and answers the 503 page if they all fail).
pub fn choose_instances(layout: &Layout, services: &[ServiceInfo]) -> (Instances, Vec<String>) {
    let mut out = Instances::new();
    let mut missing = Vec::new();
    let wanted: BTreeSet<&str> = layout.sites.iter().map(|s| s.service.as_str()).collect();
    for name in wanted {
        let Some(info) = services.iter().find(|i| i.service.name == name) else {
            missing.push(name.to_string());
            out.insert(name.to_string(), Vec::new());
            continue;
        };
        // Drained instances (a mark, or their rule's weight 0) take no new traffic, from the
        // edge either; not even as the fallback below.
        let drained_rule = |rule: &Option<String>| {
            info.rules
                .iter()
                .any(|r| Some(&r.name) == rule.as_ref() && r.weight == Some(0))
        };
        let pick = |state: Option<InstanceState>| -> Vec<SocketAddr> {
            let mut v: Vec<SocketAddr> = info
                .instances
                .iter()
                .filter(|i| !i.drained && !drained_rule(&i.instance.rule))
                .filter(|i| state.is_none_or(|s| i.state == s))
                .filter_map(|i| i.instance.address)
                .collect();
            v.sort();
            v.dedup();
            v
        };
        let mut addrs = pick(Some(InstanceState::Live));
        if addrs.is_empty() {
            addrs = pick(None);
        }
        out.insert(name.to_string(), addrs);
    }
    (out, missing)
}

/// One rendering from fluxd's current picture: the text, or why there is none.
async fn render_once(
    config: &EdgeConfig,
    client: &Client,
) -> Result<(String, Vec<String>), String> {
    let services: Vec<ServiceInfo> = client
        .get("/v1/services")
        .await
        .map_err(|e| format!("cannot read the services from fluxd: {e}"))?;
    let (instances, missing) = choose_instances(&config.layout, &services);
    let text = match &config.template {
        None => render::render(&config.layout, &instances),
        Some(t) => {
            let template = std::fs::read_to_string(t)
                .map_err(|e| format!("cannot read the template {}: {e}", t.display()))?;
            render::render_template(&template, &config.layout, &instances)
                .map_err(|e| format!("{} {e}", t.display()))?
        }
    };
    Ok((text, missing))
}

/// Runs until SIGTERM or SIGINT (or one round with `--once`). Returns the exit status.
pub async fn run(config: EdgeConfig) -> u8 {
    let client = match Client::with_auth(config.api.clone(), &config.auth) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return 1;
        }
    };
    let mut applier = match Applier::new(
        config.nginx_conf.clone(),
        config.test_cmd.clone(),
        config.reload_cmd.clone(),
    ) {
        Ok(a) => a,
        Err(e) => {
            tracing::error!("cannot read {}: {e}", config.nginx_conf.display());
            return 1;
        }
    };
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot watch SIGTERM: {e}");
            return 1;
        }
    };
    tracing::info!(
        conf = %config.nginx_conf.display(),
        services = ?config.layout.sites.iter().map(|s| &s.service).collect::<Vec<_>>(),
        "fluxd edge started"
    );
    // The last problem reported, so that a lasting one is logged once, not at every round.
    let mut last_problem: Option<String> = None;
    let mut last_missing: Vec<String> = Vec::new();
    let mut last_text: Option<String> = None;
    loop {
        let round = async {
            let mut rendered = render_once(&config, &client).await;
            // Debounce: a text that differs from the last round waits until it holds still.
            if !config.debounce.is_zero() && !config.once {
                for _ in 0..20 {
                    let Ok((text, _)) = &rendered else { break };
                    if last_text.as_deref() == Some(text.as_str()) {
                        break;
                    }
                    last_text = Some(text.clone());
                    tokio::time::sleep(config.debounce).await;
                    rendered = render_once(&config, &client).await;
                }
            }
            rendered
        };
        let rendered = tokio::select! {
            r = round => r,
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        };
        let mut failed = false;
        match rendered {
            Err(why) => {
                failed = true;
                if last_problem.as_deref() != Some(why.as_str()) {
                    tracing::error!("{why}; nginx keeps its current configuration");
                    last_problem = Some(why);
                }
            }
            Ok((text, missing)) => {
                last_text = Some(text.clone());
                if missing != last_missing {
                    if !missing.is_empty() {
                        tracing::warn!(
                            services = ?missing,
                            "no such service in fluxd: answering 503 until it exists"
                        );
                    }
                    last_missing = missing;
                }
                match applier.apply(&text).await {
                    Outcome::Unchanged => {
                        if last_problem.take().is_some() {
                            tracing::info!("fluxd answers again; configuration unchanged");
                        }
                    }
                    Outcome::Applied => {
                        last_problem = None;
                        tracing::info!(
                            conf = %config.nginx_conf.display(),
                            "nginx configuration updated and reloaded"
                        );
                    }
                    Outcome::ReloadFailed(why) => {
                        failed = true;
                        if last_problem.as_deref() != Some(why.as_str()) {
                            tracing::error!(
                                "configuration checked and written, but the reload failed: {why}"
                            );
                            last_problem = Some(why);
                        }
                    }
                    Outcome::Rejected(why) => {
                        failed = true;
                        tracing::error!(
                            "nginx rejected the new configuration; the last good one stays in place: {why}"
                        );
                        last_problem = Some(why);
                    }
                }
            }
        }
        if config.once {
            return u8::from(failed);
        }
        tokio::select! {
            _ = tokio::time::sleep(config.interval) => {}
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    tracing::info!("fluxd edge stopping; nginx keeps the configuration in place");
    0
}

#[cfg(test)]
mod tests {
    use super::config::parse_site;
    use super::*;
    use crate::api::views::InstanceView;
    use crate::model::{Instance, Service};

    fn info(name: &str, instances: &[(&str, Option<&str>, InstanceState)]) -> ServiceInfo {
        let service: Service =
            serde_json::from_value(serde_json::json!({"name": name, "address": "198.18.0.10:80"}))
                .unwrap();
        ServiceInfo {
            service,
            rules: vec![],
            instances: instances
                .iter()
                .map(|(n, addr, state)| {
                    let mut j = serde_json::json!({
                        "service": name, "name": n, "host": "h1", "origin": "static"
                    });
                    if let Some(a) = addr {
                        j["address"] = serde_json::json!(a);
                    }
                    let instance: Instance = serde_json::from_value(j).unwrap();
                    InstanceView {
                        instance,
                        state: *state,
                        health: None,
                        drained: false,
                    }
                })
                .collect(),
            refused: None,
        }
    }

    #[test]
    fn live_instances_are_chosen() {
        use InstanceState::*;
        let layout = Layout {
            sites: vec![
                parse_site("web=:80").unwrap(),
                parse_site("down=:81").unwrap(),
                parse_site("gone=:82").unwrap(),
            ],
            keepalive: 0,
            unavailable_page: None,
        };
        let services = vec![
            info(
                "web",
                &[
                    ("b", Some("10.0.0.2:80"), Live),
                    ("a", Some("10.0.0.1:80"), Live),
                    ("c", Some("10.0.0.3:80"), Failed),
                    ("d", None, NoAddress),
                ],
            ),
            info("down", &[("x", Some("10.0.0.9:80"), Failed)]),
            info("other", &[("y", Some("10.0.0.8:80"), Live)]),
        ];
        let (chosen, missing) = choose_instances(&layout, &services);
        let addrs = |s: &str| -> Vec<String> { chosen[s].iter().map(|a| a.to_string()).collect() };
        assert_eq!(addrs("web"), ["10.0.0.1:80", "10.0.0.2:80"]);
        assert_eq!(addrs("down"), ["10.0.0.9:80"]);
        assert!(addrs("gone").is_empty());
        assert_eq!(missing, ["gone"]);
        assert!(!chosen.contains_key("other"));
    }

    #[test]
    fn drained_instances_are_left_out() {
        use InstanceState::*;
        let layout = Layout {
            sites: vec![parse_site("web=:80").unwrap()],
            keepalive: 0,
            unavailable_page: None,
        };
        let mut web = info(
            "web",
            &[
                ("a", Some("10.0.0.1:80"), Live),
                ("b", Some("10.0.0.2:80"), Live),
                ("c", Some("10.0.0.3:80"), Live),
            ],
        );
        web.instances[0].drained = true;
        web.instances[1].instance.rule = Some("v2".into());
        web.rules = serde_json::from_value(serde_json::json!([
            {"service": "web", "name": "v2", "selector": {"tag": "2"}, "weight": 0}
        ]))
        .unwrap();
        let (chosen, _) = choose_instances(&layout, &[web]);
        let addrs: Vec<String> = chosen["web"].iter().map(|a| a.to_string()).collect();
        assert_eq!(addrs, ["10.0.0.3:80"]);
    }
}
