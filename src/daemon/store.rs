//! Opening the store the configuration names, with the credentials its files hold, and the
//! etcd endpoints' addresses that the VIP guard must never let a VIP take.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use super::config::{self, Config, StoreSpec};
use crate::store::{embedded::EmbeddedStore, etcd::EtcdStore, Store};

pub(super) async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match &config.store {
        StoreSpec::Embedded => {
            std::fs::create_dir_all(&config.state_dir).with_context(|| {
                format!("state_dir: cannot create {}", config.state_dir.display())
            })?;
            Arc::new(
                EmbeddedStore::open(&config.state_dir)
                    .await
                    .with_context(|| {
                        format!("store: cannot open {}", config.state_dir.display())
                    })?,
            )
        }
        StoreSpec::Etcd { endpoints } => Arc::new(
            EtcdStore::connect_with(endpoints, &config.etcd_prefix, &etcd_credentials(config)?)
                .await
                .map_err(|e| etcd_hint(e, &config.etcd_access))
                .with_context(|| {
                    let shown = endpoints.join(",");
                    match &config.etcd_access.ca_file {
                        Some(_) => format!(
                            "store: cannot connect to etcd at {} (TLS)",
                            shown.replace("http://", "https://")
                        ),
                        None => format!("store: cannot connect to etcd at {shown}"),
                    }
                })?,
        ),
    })
}

/// A connection that etcd closed says nothing of why: name the settings that usually explain it.
fn etcd_hint(e: crate::store::StoreError, access: &config::EtcdAccess) -> anyhow::Error {
    use crate::store::StoreError;
    let hint = match (&e, &access.ca_file, &access.cert_file) {
        (StoreError::Unavailable(m), None, _) if m.contains("transport error") => {
            "; if etcd serves https, set --etcd-ca-file"
        }
        (StoreError::Unavailable(m), Some(_), None) if m.contains("transport error") => {
            "; if etcd requires client certificates, set --etcd-cert-file and --etcd-key-file"
        }
        _ => "",
    };
    anyhow::anyhow!("{e}{hint}")
}

/// Reads the files named by the etcd TLS and auth settings.
fn etcd_credentials(config: &Config) -> anyhow::Result<crate::store::etcd::Credentials> {
    let a = &config.etcd_access;
    let read = |p: &std::path::Path, key: &str| {
        std::fs::read(p).with_context(|| format!("{key}: cannot read {}", p.display()))
    };
    let password = match &a.password_file {
        Some(p) => Some(
            String::from_utf8(read(p, "etcd_password_file")?)
                .map_err(|_| anyhow::anyhow!("etcd_password_file: not text"))?
                .trim_end_matches(['\n', '\r'])
                .to_string(),
        ),
        None => None,
    };
    Ok(crate::store::etcd::Credentials {
        ca_pem: a
            .ca_file
            .as_deref()
            .map(|p| read(p, "etcd_ca_file"))
            .transpose()?,
        client_pem: match (&a.cert_file, &a.key_file) {
            (Some(c), Some(k)) => Some((read(c, "etcd_cert_file")?, read(k, "etcd_key_file")?)),
            _ => None,
        },
        user: a.user.clone().zip(password),
    })
}

/// The IPv4 addresses of the etcd endpoints, for the VIP guard: a VIP on one of them would cut
/// this host off its store. Host names are resolved once, here; one that does not resolve
/// within a second is left out with a warning (the store connection reports it anyway).
pub(super) async fn etcd_addresses(store: &StoreSpec) -> Vec<(Ipv4Addr, String)> {
    let StoreSpec::Etcd { endpoints } = store else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for endpoint in endpoints {
        let hostport = endpoint
            .strip_prefix("http://")
            .or_else(|| endpoint.strip_prefix("https://"))
            .unwrap_or(endpoint);
        let what = format!("the etcd endpoint {endpoint}");
        let resolved =
            tokio::time::timeout(Duration::from_secs(1), tokio::net::lookup_host(hostport)).await;
        match resolved {
            Ok(Ok(addrs)) => out.extend(addrs.filter_map(|a| match a {
                std::net::SocketAddr::V4(v4) => Some((*v4.ip(), what.clone())),
                std::net::SocketAddr::V6(_) => None,
            })),
            Ok(Err(e)) => {
                tracing::warn!(endpoint = %endpoint, error = %e, "cannot resolve the etcd endpoint; the VIP guard does not protect it")
            }
            Err(_) => {
                tracing::warn!(endpoint = %endpoint, "resolving the etcd endpoint timed out; the VIP guard does not protect it")
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn etcd_endpoints_become_guarded_addresses() {
        let store = StoreSpec::Etcd {
            endpoints: vec![
                "http://203.0.113.7:2379".into(),
                "https://localhost:2379".into(),
            ],
        };
        let got = etcd_addresses(&store).await;
        assert!(got.contains(&(
            "203.0.113.7".parse().unwrap(),
            "the etcd endpoint http://203.0.113.7:2379".to_string()
        )));
        assert!(got.iter().any(|(ip, _)| ip.is_loopback()), "{got:?}");
        assert!(etcd_addresses(&StoreSpec::Embedded).await.is_empty());
    }
}
