//! fluxctl's command line, as clap reads it: every flag is taken as text and checked with the
//! model's own checks, so a bad value gets the same one-line error from fluxctl as from fluxd.

use std::collections::BTreeMap;

use clap::{Args, Parser, Subcommand};

use crate::model::{
    validate, Balance, Forwarding, InvalidInput, Protocol, Rule, Selector, Service, Validate,
};

#[derive(Parser)]
#[command(
    name = "fluxctl",
    version = crate::version::LONG,
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
    List {
        /// Also list each service's selection rules.
        #[arg(long, short)]
        verbose: bool,
    },
    /// Show services with their rules and instances; without a name, every service and first
    /// the live hosts.
    Info {
        /// Service name.
        name: Option<String>,
    },
    /// The live hosts: name, IP, when last seen, instances, fluxd version.
    Hosts,
    /// Print fluxctl's version and build, and those of the fluxd it talks to.
    Version,
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
    Add(ServiceAddArgs),
    /// Change a service in place: only the given fields; its VIP keeps routing throughout.
    Set(super::service_set::ServiceSetArgs),
    /// Remove services with their rules and static instances.
    Rm {
        /// Services to remove.
        names: Vec<String>,
        /// Remove every service.
        #[arg(long, conflicts_with = "names")]
        all: bool,
    },
    /// Same as `fluxctl list`.
    List {
        /// Also list each service's selection rules.
        #[arg(long, short)]
        verbose: bool,
    },
}

/// `fluxctl service add`.
#[derive(Args)]
pub struct ServiceAddArgs {
    /// Service name: [a-z0-9][a-z0-9-]{0,62}.
    pub name: String,
    /// The service address (VIP) clients connect to, IP:PORT; or `none` for a service only
    /// `fluxd edge` publishes (no VIP, no rule; needs --instance-port).
    #[arg(long)]
    pub address: String,
    /// tcp (default), http or udp.
    #[arg(long)]
    pub protocol: Option<String>,
    /// Container port to connect to (default: the VIP's port).
    #[arg(long)]
    pub instance_port: Option<String>,
    /// round-robin (default), random or least-conn.
    #[arg(long)]
    pub balance: Option<String>,
    /// Who forwards connections: proxy (default: connect retry, per-connection metrics) or
    /// kernel (iptables DNAT straight to a live instance, for bulk-heavy tcp services that can
    /// do without retry and per-connection metrics).
    #[arg(long, value_name = "proxy|kernel")]
    pub forward: Option<String>,
    #[command(flatten)]
    pub health: Box<super::health_args::HealthArgs>,
    #[command(flatten)]
    pub traffic: super::traffic_args::ServiceTrafficArgs,
    #[command(flatten)]
    pub tuning: super::service_set::ServiceTuningArgs,
}

impl ServiceAddArgs {
    /// The service these flags describe, checked; errors name the flag.
    pub fn to_service(&self) -> Result<Service, InvalidInput> {
        let service = Service {
            name: self.name.clone(),
            address: match self.address.as_str() {
                "none" => None,
                a => Some(validate::parse_socket_addr("address", a)?),
            },
            protocol: self
                .protocol
                .as_deref()
                .map(str::parse)
                .transpose()?
                .unwrap_or(Protocol::Tcp),
            instance_port: self
                .instance_port
                .as_deref()
                .map(|p| validate::parse_port("instance_port", p))
                .transpose()?,
            balance: self
                .balance
                .as_deref()
                .map(str::parse)
                .transpose()?
                .unwrap_or(Balance::RoundRobin),
            health: self.health.to_check()?,
            forward: self
                .forward
                .as_deref()
                .map(str::parse)
                .transpose()?
                .unwrap_or(Forwarding::Proxy),
            locality: self.traffic.locality()?,
            affinity: self.traffic.affinity()?,
            timeouts: Default::default(),
            proxy_protocol: None,
            instance_protocol: None,
        };
        service.validate()?;
        self.tuning.apply_to(service)
    }
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
    /// This rule's share of new connections, 0-1000 [default: 100]; 0 drains the rule (no new
    /// connections, open ones untouched).
    #[arg(long, value_name = "0..1000")]
    pub weight: Option<String>,
}

impl SelectArgs {
    /// The rule these flags describe, checked; errors name the flag.
    pub fn to_rule(&self) -> Result<Rule, InvalidInput> {
        let rule = Rule {
            service: self.service.clone(),
            name: self.rule.clone(),
            selector: self.selector.to_selector()?,
            instance_port: self
                .instance_port
                .as_deref()
                .map(|p| validate::parse_port("instance_port", p))
                .transpose()?,
            weight: self
                .weight
                .as_deref()
                .map(super::traffic_args::parse_weight)
                .transpose()?,
        };
        rule.validate()?;
        Ok(rule)
    }
}

#[derive(Args)]
pub struct QueryArgs {
    /// Only instances of this service.
    #[arg(long, short)]
    pub service: Option<String>,
    /// Only instances on this host: its name or its IP.
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
    /// Print each instance with a template: '{{address}} {{state}}', or in flux 0.2's Go
    /// template spelling '{{.Address}} {{.State}}', '{{json .}}'.
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
    /// Drain an instance (static or container): no new connections, open ones untouched.
    Drain {
        /// Service name.
        service: String,
        /// Instance name.
        name: String,
    },
    /// Undo `instance drain`: the instance takes new connections again.
    Undrain {
        /// Service name.
        service: String,
        /// Instance name.
        name: String,
    },
}
