//! fluxctl: defines services and rules, and answers "which containers serve X, and which are
//! live". Input is checked here with the model's own checks before anything is sent, and again
//! by fluxd; a refusal is one line on stderr and exit status 2, an unreachable daemon exit 1.

pub mod output;

use std::collections::BTreeMap;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};
use serde::Serialize;

use crate::api::client::{Client, ClientError, Endpoint};
use crate::api::views::{InstanceQuery, InstanceState, InstanceView, ServiceInfo};
use crate::model::check::parse_duration_ms;
use crate::model::{
    validate, Balance, HealthCheck, Instance, InvalidInput, Protocol, Rule, Selector, Service,
    Validate,
};

#[derive(Parser)]
#[command(
    name = "fluxctl",
    version,
    about = "Define flux services and rules; see which containers serve them"
)]
pub struct Cli {
    /// fluxd's API: unix:///PATH, http://HOST:PORT (read-only) or https://HOST:PORT (the
    /// remote API: needs a token).
    #[arg(
        long,
        global = true,
        env = "FLUX_API",
        default_value = "unix:///run/fluxd/fluxd.sock"
    )]
    pub api: String,
    #[command(flatten)]
    pub remote: crate::api::client::RemoteFlags,
    /// Print one JSON document on stdout instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Add or remove services.
    #[command(subcommand)]
    Service(ServiceCmd),
    /// List services with their instance counts.
    List,
    /// Show services with their rules and instances (all services if no name is given).
    Info {
        /// Service name.
        name: Option<String>,
    },
    /// Add or replace a selection rule: containers matching it become instances.
    Select(SelectArgs),
    /// Remove a selection rule (its instances leave the service).
    Deselect {
        /// Service name.
        service: String,
        /// Rule name.
        rule: String,
    },
    /// Which containers are instances, and which are live as seen from this host.
    Query(QueryArgs),
    /// Add or remove static instances (backends that are not containers).
    #[command(subcommand)]
    Instance(InstanceCmd),
    /// Print a shell completion script for fluxctl.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: crate::docs::Shell,
    },
    /// Write fluxctl's man pages (one per command) into a directory.
    Man {
        /// Directory to write the pages into (created if missing).
        dir: std::path::PathBuf,
    },
}

#[derive(Subcommand)]
pub enum ServiceCmd {
    /// Define a service: a VIP:port that clients connect to.
    Add {
        /// Service name: [a-z0-9][a-z0-9-]{0,62}.
        name: String,
        /// The service address (VIP) clients connect to, IP:PORT.
        #[arg(long)]
        address: String,
        /// tcp (default) or http.
        #[arg(long)]
        protocol: Option<String>,
        /// Container port to connect to (default: the VIP's port).
        #[arg(long)]
        instance_port: Option<String>,
        /// round-robin (default), random or least-conn.
        #[arg(long)]
        balance: Option<String>,
        #[command(flatten)]
        health: Box<HealthArgs>,
    },
    /// Remove services with their rules and static instances.
    Rm {
        /// Services to remove.
        names: Vec<String>,
        /// Remove every service.
        #[arg(long, conflicts_with = "names")]
        all: bool,
    },
    /// Same as `fluxctl list`.
    List,
}

#[derive(Args)]
pub struct SelectorArgs {
    /// Image repository, without tag.
    #[arg(long)]
    pub image: Option<String>,
    /// Image tag.
    #[arg(long)]
    pub tag: Option<String>,
    /// Container labels, k=v,k=v.
    #[arg(long)]
    pub labels: Option<String>,
    /// Container environment, k=v,k=v.
    #[arg(long)]
    pub env: Option<String>,
}

impl SelectorArgs {
    pub fn to_selector(&self) -> Result<Selector, InvalidInput> {
        let pairs =
            |field: &str, v: &Option<String>| -> Result<BTreeMap<String, String>, InvalidInput> {
                match v {
                    Some(s) => validate::parse_pairs(field, s),
                    None => Ok(BTreeMap::new()),
                }
            };
        Ok(Selector {
            image: self.image.clone(),
            tag: self.tag.clone(),
            labels: pairs("labels", &self.labels)?,
            env: pairs("env", &self.env)?,
        })
    }
}

/// The active health check of `service add`.
#[derive(Args, Default)]
pub struct HealthArgs {
    /// Active health check of every instance: tcp (connect succeeds) or http:/PATH (GET PATH
    /// answers 2xx or 3xx); failing instances leave the pool [default: none, passive only].
    #[arg(long, value_name = "tcp|http:/PATH")]
    pub health: Option<String>,
    /// Time between checks of one instance, like 2s or 500ms (100ms-1h) [default: 2s].
    #[arg(long, value_name = "DURATION")]
    pub health_interval: Option<String>,
    /// How long one check may take, less than the interval [default: 1s].
    #[arg(long, value_name = "DURATION")]
    pub health_timeout: Option<String>,
    /// Failed checks in a row that take an instance out of the pool (1-100) [default: 3].
    #[arg(long, value_name = "N")]
    pub health_fall: Option<String>,
    /// Passed checks in a row that put a failing instance back (1-100) [default: 2].
    #[arg(long, value_name = "N")]
    pub health_rise: Option<String>,
}

impl HealthArgs {
    /// The check these flags describe; None without `--health`. Errors name the flag.
    pub fn to_check(&self) -> Result<Option<HealthCheck>, InvalidInput> {
        let Some(spec) = &self.health else {
            let given = [
                ("health-interval", &self.health_interval),
                ("health-timeout", &self.health_timeout),
                ("health-fall", &self.health_fall),
                ("health-rise", &self.health_rise),
            ];
            if let Some((flag, v)) = given.iter().find(|(_, v)| v.is_some()) {
                return Err(InvalidInput::new(*flag, "needs --health tcp|http:/PATH")
                    .value(v.as_deref().unwrap_or_default()));
            }
            return Ok(None);
        };
        let mut check: HealthCheck = spec.parse()?;
        if let Some(d) = &self.health_interval {
            check.interval_ms = parse_duration_ms("health-interval", d)?;
        }
        if let Some(d) = &self.health_timeout {
            check.timeout_ms = parse_duration_ms("health-timeout", d)?;
        }
        let count = |flag: &str, v: &str| {
            v.parse::<u32>()
                .map_err(|_| InvalidInput::new(flag, "must be 1-100").value(v))
        };
        if let Some(n) = &self.health_fall {
            check.fall = count("health-fall", n)?;
        }
        if let Some(n) = &self.health_rise {
            check.rise = count("health-rise", n)?;
        }
        check.validate().map_err(|e| {
            let flag = match e.field.as_str() {
                "health.interval_ms" => "health-interval",
                "health.timeout_ms" => "health-timeout",
                "health.fall" => "health-fall",
                "health.rise" => "health-rise",
                _ => "health",
            };
            InvalidInput {
                field: flag.into(),
                ..e
            }
        })?;
        Ok(Some(check))
    }
}

#[derive(Args)]
pub struct SelectArgs {
    /// Service name.
    pub service: String,
    /// Rule name (an existing rule of that name is replaced).
    pub rule: String,
    #[command(flatten)]
    pub selector: SelectorArgs,
    /// Container port for containers this rule matches (overrides the service's).
    #[arg(long)]
    pub instance_port: Option<String>,
}

#[derive(Args)]
pub struct QueryArgs {
    /// Only instances of this service.
    #[arg(long)]
    pub service: Option<String>,
    /// Only instances on this host.
    #[arg(long)]
    pub host: Option<String>,
    /// live, failed, failing (active health check) or no-address.
    #[arg(long)]
    pub state: Option<String>,
    /// Only instances selected by this rule.
    #[arg(long)]
    pub rule: Option<String>,
    #[command(flatten)]
    pub selector: SelectorArgs,
    /// Print only instance names, one per line.
    #[arg(long, short, conflicts_with_all = ["format"])]
    pub quiet: bool,
    /// Print each instance with a template, e.g. '{{address}} {{state}}'.
    #[arg(long)]
    pub format: Option<String>,
}

#[derive(Subcommand)]
pub enum InstanceCmd {
    /// Register IP:PORT as an instance of a service.
    Add {
        /// Service name.
        service: String,
        /// Instance name.
        name: String,
        /// The backend's address, IP:PORT.
        #[arg(long)]
        address: String,
    },
    /// Remove a static instance.
    Rm {
        /// Service name.
        service: String,
        /// Instance name.
        name: String,
    },
}

/// What a command failed with, and so which exit status it gets.
enum Failure {
    Usage(String),
    Runtime(String),
}

impl From<InvalidInput> for Failure {
    fn from(e: InvalidInput) -> Self {
        Failure::Usage(e.to_string())
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Rejected { .. } | ClientError::Setup(_) => Failure::Usage(e.to_string()),
            _ => Failure::Runtime(e.to_string()),
        }
    }
}

pub async fn main(cli: Cli) -> ExitCode {
    let docs = match &cli.command {
        Command::Completions { shell } => Some(crate::docs::completions(Cli::command(), *shell)),
        Command::Man { dir } => Some(crate::docs::man_pages(Cli::command(), dir)),
        _ => None,
    };
    if let Some(r) = docs {
        return match r {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("fluxctl: {e}");
                ExitCode::from(1)
            }
        };
    }
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(m)) => {
            eprintln!("fluxctl: {m}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(m)) => {
            eprintln!("fluxctl: {m}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let auth = cli.remote.auth().map_err(Failure::Usage)?;
    let client = Client::with_auth(Endpoint::parse(&cli.api)?, &auth)?;
    let json = cli.json;
    match cli.command {
        Command::Service(ServiceCmd::Add {
            name,
            address,
            protocol,
            instance_port,
            balance,
            health,
        }) => {
            let service = Service {
                address: validate::parse_socket_addr("address", &address)?,
                protocol: protocol
                    .as_deref()
                    .map(str::parse)
                    .transpose()?
                    .unwrap_or(Protocol::Tcp),
                instance_port: instance_port
                    .as_deref()
                    .map(|p| validate::parse_port("instance_port", p))
                    .transpose()?,
                balance: balance
                    .as_deref()
                    .map(str::parse)
                    .transpose()?
                    .unwrap_or(Balance::RoundRobin),
                health: health.to_check()?,
                name,
            };
            service.validate()?;
            let info: ServiceInfo = client.post("/v1/services", body(&service)).await?;
            print(json, &info, || {
                format!(
                    "added service {} at {}\n",
                    info.service.name, info.service.address
                )
            });
        }
        Command::Service(ServiceCmd::Rm { names, all }) => {
            let names = if all {
                let all: Vec<ServiceInfo> = client.get("/v1/services").await?;
                all.into_iter().map(|s| s.service.name).collect()
            } else if names.is_empty() {
                return Err(Failure::Usage(
                    "service rm: give service names or --all".into(),
                ));
            } else {
                for n in &names {
                    validate::name("name", n)?;
                }
                names
            };
            let mut removed = Vec::new();
            for n in &names {
                let _: serde_json::Value = client.delete(&format!("/v1/services/{n}")).await?;
                removed.push(n.clone());
            }
            print(json, &serde_json::json!({ "removed": removed }), || {
                removed
                    .iter()
                    .map(|n| format!("removed service {n}\n"))
                    .collect()
            });
        }
        Command::List | Command::Service(ServiceCmd::List) => {
            let services: Vec<ServiceInfo> = client.get("/v1/services").await?;
            print(json, &services, || list_text(&services));
        }
        Command::Info { name } => {
            let services: Vec<ServiceInfo> = match name {
                Some(n) => {
                    validate::name("service", &n)?;
                    vec![client.get(&format!("/v1/services/{n}")).await?]
                }
                None => client.get("/v1/services").await?,
            };
            print(json, &services, || {
                services
                    .iter()
                    .map(info_text)
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Command::Select(a) => {
            let rule = Rule {
                service: a.service.clone(),
                name: a.rule.clone(),
                selector: a.selector.to_selector()?,
                instance_port: a
                    .instance_port
                    .as_deref()
                    .map(|p| validate::parse_port("instance_port", p))
                    .transpose()?,
            };
            rule.validate()?;
            let stored: Rule = client
                .put(
                    &format!("/v1/services/{}/rules/{}", a.service, a.rule),
                    body(&rule),
                )
                .await?;
            print(json, &stored, || {
                format!(
                    "selected {} for {}: {}\n",
                    stored.name,
                    stored.service,
                    output::selector(&stored.selector)
                )
            });
        }
        Command::Deselect { service, rule } => {
            validate::name("service", &service)?;
            validate::name("rule", &rule)?;
            let _: serde_json::Value = client
                .delete(&format!("/v1/services/{service}/rules/{rule}"))
                .await?;
            print(json, &serde_json::json!({ "removed": rule }), || {
                format!("deselected {rule} from {service}\n")
            });
        }
        Command::Query(q) => query(&client, json, q).await?,
        Command::Completions { .. } | Command::Man { .. } => {}
        Command::Instance(InstanceCmd::Add {
            service,
            name,
            address,
        }) => {
            let instance = Instance::new_static(
                &service,
                &name,
                validate::parse_socket_addr("address", &address)?,
            );
            instance.validate()?;
            let view: InstanceView = client
                .post(
                    &format!("/v1/services/{service}/instances"),
                    body(&instance),
                )
                .await?;
            print(json, &view, || {
                format!("added instance {name} of {service} at {address}\n")
            });
        }
        Command::Instance(InstanceCmd::Rm { service, name }) => {
            validate::name("service", &service)?;
            validate::name("name", &name)?;
            let _: serde_json::Value = client
                .delete(&format!("/v1/services/{service}/instances/{name}"))
                .await?;
            print(json, &serde_json::json!({ "removed": name }), || {
                format!("removed instance {name} of {service}\n")
            });
        }
    }
    Ok(())
}

async fn query(client: &Client, json: bool, q: QueryArgs) -> Result<(), Failure> {
    if let Some(t) = &q.format {
        output::check_template(t)?;
    }
    let filter = InstanceQuery {
        service: q.service,
        host: q.host,
        rule: q.rule,
        state: q.state.as_deref().map(InstanceState::parse).transpose()?,
        selector: q.selector.to_selector()?,
    };
    let qs = filter.to_query_string();
    let views: Vec<InstanceView> = client.get(&format!("/v1/instances?{qs}")).await?;
    if json {
        print(true, &views, String::new);
    } else if q.quiet {
        for v in &views {
            println!("{}", v.instance.name);
        }
    } else if let Some(t) = &q.format {
        for v in &views {
            println!("{}", output::render_template(t, v));
        }
    } else {
        print!("{}", output::instance_table(&views));
    }
    Ok(())
}

fn body<T: Serialize>(v: &T) -> Vec<u8> {
    crate::model::encode(v)
}

fn print<T: Serialize>(json: bool, value: &T, text: impl FnOnce() -> String) {
    if json {
        match serde_json::to_string_pretty(value) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("fluxctl: cannot print JSON: {e}"),
        }
    } else {
        print!("{}", text());
    }
}

fn list_text(services: &[ServiceInfo]) -> String {
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
                s.service.address.to_string(),
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
        })
        .collect();
    let mut out = output::table(
        &[
            "NAME",
            "ADDRESS",
            "PROTOCOL",
            "RULES",
            "INSTANCES",
            "LIVE",
            "HEALTH-CHECK",
        ],
        &rows,
    );
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

fn info_text(s: &ServiceInfo) -> String {
    let svc = &s.service;
    let mut out = format!(
        "service {}  address {}  protocol {}  instance-port {}  balance {}\n",
        svc.name,
        svc.address,
        svc.protocol,
        svc.default_instance_port(),
        svc.balance
    );
    if let Some(h) = &svc.health {
        out.push_str(&format!("health check: {}\n", h.describe()));
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
    if s.rules.is_empty() {
        out.push_str("rules: none\n");
    } else {
        let rows: Vec<Vec<String>> = s
            .rules
            .iter()
            .map(|r| {
                vec![
                    r.name.clone(),
                    output::selector(&r.selector),
                    r.instance_port
                        .map(|p| p.to_string())
                        .unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        out.push_str(&output::table(
            &["RULE", "SELECTOR", "INSTANCE-PORT"],
            &rows,
        ));
    }
    if s.instances.is_empty() {
        out.push_str("instances: none\n");
    } else {
        out.push_str(&output::instance_table(&s.instances));
    }
    out
}
