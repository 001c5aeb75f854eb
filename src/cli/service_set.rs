//! `fluxctl service set`, and the per-service flags that `service add` shares with it
//! (time limits, PROXY protocol). Each flag becomes one field of a `ServiceEdit`; fluxd applies
//! the edit to the stored service in one transaction.

use clap::Args;

use super::health_args::HealthArgs;
use super::{body, print, Failure};
use crate::api::views::ServiceInfo;
use crate::model::{
    timeouts, validate, InstanceProtocol, InvalidInput, ProxyProtocol, Service, ServiceEdit,
};

/// Per-service flags of both `service add` and `service set`.
#[derive(Args, Default)]
pub struct ServiceTuningArgs {
    /// Per-attempt connect timeout to an instance, in milliseconds (10-60000), instead of
    /// fluxd's --connect-timeout-ms; `default` (set) goes back to fluxd's.
    #[arg(long, value_name = "MS")]
    pub connect_timeout_ms: Option<String>,
    /// `http` services: how long an instance may take to send its response headers before the
    /// client gets 504, in milliseconds (100-3600000), instead of fluxd's flag.
    #[arg(long, value_name = "MS")]
    pub http_response_timeout_ms: Option<String>,
    /// `tcp` services: idle limit of a half-closed connection, in milliseconds (100-86400000),
    /// instead of fluxd's flag.
    #[arg(long, value_name = "MS")]
    pub half_close_timeout_ms: Option<String>,
    /// `tcp` services: write HAProxy's PROXY protocol header (v1 text, v2 binary) to each
    /// instance before the client's bytes, so it sees the client's address; the instance must
    /// expect it. `off` (set) stops [default: off].
    #[arg(long, value_name = "v1|v2|off")]
    pub proxy_protocol: Option<String>,
    /// `http` services: the HTTP version spoken to instances: `http1`, `h2` (HTTP/2 with prior
    /// knowledge, h2c), or `auto`, the version each client spoke [default: auto].
    #[arg(long, value_name = "auto|http1|h2")]
    pub instance_protocol: Option<String>,
}

impl ServiceTuningArgs {
    /// Adds these flags' fields to `edit`; errors name the flag.
    fn fill(&self, edit: &mut ServiceEdit) -> Result<(), InvalidInput> {
        for ((field, flag, _, _), value) in timeouts::LIMITS.iter().zip([
            &self.connect_timeout_ms,
            &self.http_response_timeout_ms,
            &self.half_close_timeout_ms,
        ]) {
            if let Some(v) = value {
                edit.timeouts
                    .insert(field.to_string(), timeouts::parse_flag(flag, v)?);
            }
        }
        if let Some(p) = &self.proxy_protocol {
            edit.proxy_protocol = Some(match p.as_str() {
                "off" => None,
                v => Some(v.parse::<ProxyProtocol>().map_err(|e| InvalidInput {
                    field: "proxy-protocol".into(),
                    reason: "must be v1, v2 or off".into(),
                    ..e
                })?),
            });
        }
        if let Some(p) = &self.instance_protocol {
            edit.instance_protocol =
                Some(
                    InstanceProtocol::parse_setting(p).map_err(|e| InvalidInput {
                        field: "instance-protocol".into(),
                        ..e
                    })?,
                );
        }
        Ok(())
    }

    /// `service add`: these flags on a new service (no `default`/`off` to go back to).
    pub fn apply_to(&self, service: Service) -> Result<Service, InvalidInput> {
        let mut edit = ServiceEdit::default();
        self.fill(&mut edit)?;
        edit.apply(&service)
    }
}

/// `fluxctl service set`.
#[derive(Args)]
pub struct ServiceSetArgs {
    /// Service name.
    pub name: String,
    /// A new VIP, IP:PORT (or `none`): claimed in the same transaction that releases the old.
    #[arg(long)]
    pub address: Option<String>,
    /// tcp, http or udp.
    #[arg(long)]
    pub protocol: Option<String>,
    /// Container port to connect to; `default` for the VIP's port.
    #[arg(long)]
    pub instance_port: Option<String>,
    /// round-robin, random or least-conn.
    #[arg(long)]
    pub balance: Option<String>,
    /// proxy or kernel.
    #[arg(long, value_name = "proxy|kernel")]
    pub forward: Option<String>,
    /// `--health none` removes the active check; the other --health-* flags need --health.
    #[command(flatten)]
    pub health: Box<HealthArgs>,
    #[command(flatten)]
    pub tuning: ServiceTuningArgs,
    #[command(flatten)]
    pub traffic: super::traffic_args::ServiceTrafficArgs,
}

impl ServiceSetArgs {
    /// The edit these flags describe; errors name the flag. One line per field.
    pub fn to_edit(&self) -> Result<ServiceEdit, InvalidInput> {
        validate::name("name", &self.name)?;
        let mut edit = ServiceEdit {
            address: self
                .address
                .as_deref()
                .map(|a| match a {
                    "none" => Ok(None),
                    a => validate::parse_socket_addr("address", a).map(Some),
                })
                .transpose()?,
            protocol: self.protocol.as_deref().map(str::parse).transpose()?,
            instance_port: self
                .instance_port
                .as_deref()
                .map(|p| match p {
                    "default" => Ok(None),
                    p => validate::parse_port("instance_port", p).map(Some),
                })
                .transpose()?,
            balance: self.balance.as_deref().map(str::parse).transpose()?,
            forward: self.forward.as_deref().map(str::parse).transpose()?,
            health: if self.health.health.as_deref() == Some("none") {
                let only = HealthArgs {
                    health: None,
                    ..(*self.health).clone()
                };
                only.to_check()?; // refuses --health-* flags beside `none`
                Some(None)
            } else if self.health.health.is_some() {
                Some(self.health.to_check()?)
            } else {
                self.health.to_check()?; // refuses --health-* flags without --health
                None
            },
            locality: self
                .traffic
                .locality
                .as_deref()
                .map(str::parse)
                .transpose()?,
            affinity: self
                .traffic
                .affinity
                .as_deref()
                .map(str::parse)
                .transpose()?,
            ..ServiceEdit::default()
        };
        self.tuning.fill(&mut edit)?;
        if edit.is_empty() {
            return Err(InvalidInput::new(
                "service set",
                "nothing to change: give at least one flag",
            ));
        }
        Ok(edit)
    }
}

pub(super) async fn service_set(
    client: &crate::api::client::Client,
    json: bool,
    args: &ServiceSetArgs,
) -> Result<(), Failure> {
    let edit = args.to_edit()?;
    let info: ServiceInfo = client
        .patch(&format!("/v1/services/{}", args.name), body(&edit))
        .await?;
    print(json, &info, || {
        format!(
            "changed service {}: {}\n",
            info.service.name,
            super::service_text::service_line(&info.service)
        )
    });
    Ok(())
}
