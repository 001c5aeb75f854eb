//! fluxd's configuration: flags, then `FLUXD_*` environment variables, then a TOML file, then
//! defaults, in that order of precedence. Every setting is checked here, before anything starts.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use serde::Deserialize;

use crate::api::server::RemoteApi;
use crate::model::{validate, NetworkMode};

/// `fluxd run` flags. Each is optional here so that an unset flag can fall through to the
/// environment (clap reads `FLUXD_*`) and then to the config file.
#[derive(Debug, Clone, Default, Args)]
pub struct RunArgs {
    /// Read settings from this TOML file (keys as the flags, with underscores).
    #[arg(long, env = "FLUXD_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// `embedded` (one host, default) or `etcd://HOST:PORT[,HOST:PORT...]`.
    #[arg(long, env = "FLUXD_STORE")]
    pub store: Option<String>,
    /// Where the embedded store keeps its data [default: /var/lib/fluxd].
    #[arg(long, env = "FLUXD_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Local API socket [default: unix:///run/fluxd/fluxd.sock].
    #[arg(long, env = "FLUXD_API", value_name = "unix:///PATH")]
    pub api: Option<String>,
    /// Web UI and metrics address [default: 127.0.0.1:7070].
    #[arg(long, env = "FLUXD_HTTP", value_name = "ADDR:PORT")]
    pub http: Option<String>,
    /// This host's name in the store [default: the hostname].
    #[arg(long, env = "FLUXD_HOST_NAME")]
    pub host_name: Option<String>,
    /// This host's IP, published for `local` network mode [default: auto-detected].
    #[arg(long, env = "FLUXD_HOST_IP")]
    pub host_ip: Option<String>,
    /// Docker endpoint, or `none` to enrol no containers [default: unix:///var/run/docker.sock].
    #[arg(long, env = "FLUXD_DOCKER", value_name = "unix:///PATH")]
    pub docker: Option<String>,
    /// `local` (host IP + published port, default) or `global` (container IP).
    #[arg(long, env = "FLUXD_NETWORK_MODE")]
    pub network_mode: Option<String>,
    /// Run without iptables rules and proxy (store and API only).
    #[arg(long, env = "FLUXD_NO_DATAPLANE", num_args = 0..=1, default_missing_value = "true")]
    pub no_dataplane: Option<bool>,
    /// Key prefix in etcd [default: /flux/].
    #[arg(long, env = "FLUXD_ETCD_PREFIX")]
    pub etcd_prefix: Option<String>,
    /// Seconds within which a dead host's records vanish [default: 15].
    #[arg(long, env = "FLUXD_HOST_TTL", value_name = "SECONDS")]
    pub host_ttl: Option<u64>,
    /// Log format: `text` or `json` [default: text].
    #[arg(long, env = "FLUXD_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Port of the proxy listener that VIP connections are redirected to [default: 7171].
    #[arg(long, env = "FLUXD_PROXY_PORT")]
    pub proxy_port: Option<u16>,
    /// Leave flux's iptables rules installed on a clean stop (for restarts and upgrades).
    #[arg(long, env = "FLUXD_KEEP_RULES", num_args = 0..=1, default_missing_value = "true")]
    pub keep_rules: Option<bool>,
    /// How VIP connections reach the proxy: `bpf` (a BPF sk_lookup program and local routes,
    /// no NAT), `nat` (iptables REDIRECT), or `auto`: bpf when it loads and attaches, else nat
    /// [default: auto].
    #[arg(long, env = "FLUXD_STEERING", value_name = "auto|bpf|nat")]
    pub steering: Option<String>,
    /// Directory on a bpf file system where the steering program is pinned, so that it
    /// outlives fluxd (one subdirectory per network namespace) [default: /sys/fs/bpf/flux].
    #[arg(long, env = "FLUXD_BPF_DIR", value_name = "DIR")]
    pub bpf_dir: Option<PathBuf>,
    /// Interfaces whose incoming traffic to VIPs is redirected, comma-separated; `+` is a
    /// wildcard [default: docker0,br-+].
    #[arg(long, env = "FLUXD_BRIDGE_INTERFACES", value_name = "IFACES")]
    pub bridge_interfaces: Option<String>,
    /// Per-attempt connect timeout to an instance, in milliseconds [default: 2500]. Longer
    /// than the kernel's first SYN retransmit (1 s), so a SYN dropped by a full accept queue
    /// is retried by the kernel instead of failing the instance.
    #[arg(long, env = "FLUXD_CONNECT_TIMEOUT_MS", value_name = "MS")]
    pub connect_timeout_ms: Option<u64>,
    /// How long an `http` service's instance may take to start answering a request (its
    /// response headers), in milliseconds, before the client gets 504 [default: 60000, as
    /// nginx's proxy_read_timeout].
    #[arg(long, env = "FLUXD_HTTP_RESPONSE_TIMEOUT_MS", value_name = "MS")]
    pub http_response_timeout_ms: Option<u64>,
    /// `tcp` services: once one side of a connection has closed its sending half, how long
    /// the other direction may move no byte before both are closed, in milliseconds [default:
    /// 120000, as conntrack's FIN_WAIT timeout].
    #[arg(long, env = "FLUXD_HALF_CLOSE_TIMEOUT_MS", value_name = "MS")]
    pub half_close_timeout_ms: Option<u64>,
    /// Most concurrent proxied connections [default: 8000].
    #[arg(long, env = "FLUXD_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// On a stop, seconds that established proxied connections may go on before they are cut
    /// (new connections are no longer accepted meanwhile) [default: 10].
    #[arg(long, env = "FLUXD_DRAIN_SECONDS", value_name = "SECONDS")]
    pub drain_seconds: Option<u64>,
    /// Address range reserved for VIPs, CIDR (repeatable, or comma-separated in the
    /// environment). New services must have their VIP inside; each range is one nat rule, so
    /// matching costs the same for any number of services [default: none, one rule per VIP].
    #[arg(
        long = "vip-range",
        env = "FLUXD_VIP_RANGE",
        value_delimiter = ',',
        value_name = "CIDR"
    )]
    pub vip_range: Option<Vec<String>>,
    /// Address range no VIP may capture on this host, CIDR (repeatable, or comma-separated in
    /// the environment): a service whose VIP is inside is not routed here, nor is a VIP range
    /// that overlaps it. VIPs equal to an address of this host's interfaces are refused
    /// whatever this says [default: none].
    #[arg(
        long = "protected-range",
        env = "FLUXD_PROTECTED_RANGES",
        value_delimiter = ',',
        value_name = "CIDR"
    )]
    pub protected_range: Option<Vec<String>>,
    /// Group that may use the local API socket besides root (mode 0660) [default: flux].
    #[arg(long, env = "FLUXD_API_GROUP", value_name = "GROUP")]
    pub api_group: Option<String>,
    /// Serve the full (read-write) API over TLS on this address, for fluxctl on other machines
    /// (needs --api-cert-file, --api-key-file and --api-token-file) [default: off].
    #[arg(long, env = "FLUXD_API_LISTEN", value_name = "ADDR:PORT")]
    pub api_listen: Option<String>,
    /// PEM certificate chain of the remote API.
    #[arg(long, env = "FLUXD_API_CERT_FILE", value_name = "FILE")]
    pub api_cert_file: Option<PathBuf>,
    /// PEM private key of the remote API.
    #[arg(long, env = "FLUXD_API_KEY_FILE", value_name = "FILE")]
    pub api_key_file: Option<PathBuf>,
    /// File holding the bearer token that remote API clients must send (at least 16 characters).
    #[arg(long, env = "FLUXD_API_TOKEN_FILE", value_name = "FILE")]
    pub api_token_file: Option<PathBuf>,
    /// PEM CA that signed etcd's server certificate; turns on TLS to etcd (https).
    #[arg(long, env = "FLUXD_ETCD_CA_FILE", value_name = "FILE")]
    pub etcd_ca_file: Option<PathBuf>,
    /// PEM client certificate for etcd (`--client-cert-auth`); needs --etcd-key-file.
    #[arg(long, env = "FLUXD_ETCD_CERT_FILE", value_name = "FILE")]
    pub etcd_cert_file: Option<PathBuf>,
    /// PEM private key of the etcd client certificate.
    #[arg(long, env = "FLUXD_ETCD_KEY_FILE", value_name = "FILE")]
    pub etcd_key_file: Option<PathBuf>,
    /// etcd user (etcd auth enabled); needs --etcd-password-file.
    #[arg(long, env = "FLUXD_ETCD_USER", value_name = "USER")]
    pub etcd_user: Option<String>,
    /// File holding the etcd user's password.
    #[arg(long, env = "FLUXD_ETCD_PASSWORD_FILE", value_name = "FILE")]
    pub etcd_password_file: Option<PathBuf>,
    /// Answer DNS queries for service names on this address, UDP and TCP (repeatable, or
    /// comma-separated in the environment) [default: off].
    #[arg(
        long = "dns-listen",
        env = "FLUXD_DNS_LISTEN",
        value_delimiter = ',',
        value_name = "ADDR:PORT"
    )]
    pub dns_listen: Option<Vec<String>>,
    /// Domain the DNS names are under: NAME.DOMAIN, _NAME._tcp.DOMAIN,
    /// NAME.instances.DOMAIN [default: flux].
    #[arg(long, env = "FLUXD_DNS_DOMAIN", value_name = "DOMAIN")]
    pub dns_domain: Option<String>,
    /// Relay queries for other names to resolvers instead of refusing them: alone, the host's
    /// (/etc/resolv.conf); with values, those (IP or IP:PORT, repeatable) [default: refuse].
    #[arg(
        long = "dns-forward",
        env = "FLUXD_DNS_FORWARD",
        value_delimiter = ',',
        num_args = 0..=1,
        default_missing_value = crate::dns::settings::FORWARD_HOST,
        value_name = "IP[:PORT]"
    )]
    pub dns_forward: Option<Vec<String>>,
    /// `udp` services: how long a flow (one client address) keeps its instance with no
    /// datagram either way, in milliseconds [default: 30000].
    #[arg(long, env = "FLUXD_UDP_IDLE_MS", value_name = "MS")]
    pub udp_idle_ms: Option<u64>,
    /// `udp` services: most flows at once over all of them (each holds one socket); datagrams
    /// of new flows beyond it are dropped and counted [default: 65536].
    #[arg(long, env = "FLUXD_UDP_MAX_FLOWS", value_name = "N")]
    pub udp_max_flows: Option<u64>,
}

/// The same settings as read from a config file; unknown keys are refused so that a typo is
/// not silently ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    store: Option<String>,
    state_dir: Option<PathBuf>,
    api: Option<String>,
    http: Option<String>,
    host_name: Option<String>,
    host_ip: Option<String>,
    docker: Option<String>,
    network_mode: Option<String>,
    no_dataplane: Option<bool>,
    etcd_prefix: Option<String>,
    host_ttl: Option<u64>,
    log_format: Option<String>,
    proxy_port: Option<u16>,
    keep_rules: Option<bool>,
    steering: Option<String>,
    bpf_dir: Option<PathBuf>,
    bridge_interfaces: Option<String>,
    connect_timeout_ms: Option<u64>,
    http_response_timeout_ms: Option<u64>,
    half_close_timeout_ms: Option<u64>,
    max_connections: Option<usize>,
    drain_seconds: Option<u64>,
    vip_range: Option<Vec<String>>,
    protected_range: Option<Vec<String>>,
    api_group: Option<String>,
    api_listen: Option<String>,
    api_cert_file: Option<PathBuf>,
    api_key_file: Option<PathBuf>,
    api_token_file: Option<PathBuf>,
    etcd_ca_file: Option<PathBuf>,
    etcd_cert_file: Option<PathBuf>,
    etcd_key_file: Option<PathBuf>,
    etcd_user: Option<String>,
    etcd_password_file: Option<PathBuf>,
    dns_listen: Option<Vec<String>>,
    dns_domain: Option<String>,
    dns_forward: Option<Vec<String>>,
    udp_idle_ms: Option<u64>,
    udp_max_flows: Option<u64>,
}

/// How fluxd authenticates to etcd: files, read when the store is opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdAccess {
    /// TLS (https) when set.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// User and the file holding its password.
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    Embedded,
    Etcd { endpoints: Vec<String> },
}

/// `--steering`: how VIP connections reach the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SteeringMode {
    /// BPF when it loads and attaches here, else nat (with one log line saying why).
    Auto,
    /// BPF `sk_lookup` and local routes; fluxd does not start without them.
    Bpf,
    /// iptables REDIRECT to the proxy port.
    Nat,
}

/// Where the steering program is pinned unless `--bpf-dir` says otherwise: systemd mounts a
/// bpf file system on /sys/fs/bpf.
pub const DEFAULT_BPF_DIR: &str = "/sys/fs/bpf/flux";

fn parse_steering(s: Option<&str>) -> anyhow::Result<SteeringMode> {
    match s {
        None | Some("auto") => Ok(SteeringMode::Auto),
        Some("bpf") => Ok(SteeringMode::Bpf),
        Some("nat") => Ok(SteeringMode::Nat),
        Some(other) => bail!("steering: must be auto, bpf or nat (got \"{other}\")"),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The checked configuration the daemon runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub store: StoreSpec,
    pub state_dir: PathBuf,
    pub api: PathBuf,
    pub http: SocketAddr,
    pub host_name: String,
    pub host_ip: Ipv4Addr,
    /// Path of the Docker socket; None with `--docker none`.
    pub docker: Option<PathBuf>,
    pub network_mode: NetworkMode,
    pub dataplane: bool,
    pub etcd_prefix: String,
    pub host_ttl: Duration,
    pub log_format: LogFormat,
    pub proxy_port: u16,
    pub keep_rules: bool,
    /// How VIP connections reach the proxy.
    pub steering: SteeringMode,
    /// Where the BPF steering is pinned.
    pub bpf_dir: PathBuf,
    pub bridge_interfaces: Vec<String>,
    pub connect_timeout: Duration,
    pub http_response_timeout: Duration,
    pub half_close_timeout: Duration,
    pub max_connections: usize,
    pub drain: Duration,
    pub vip_ranges: Vec<ipnet::Ipv4Net>,
    /// See [`crate::controller::guard`].
    pub protected_ranges: Vec<ipnet::Ipv4Net>,
    /// Group of the local API socket.
    pub api_group: String,
    pub remote_api: Option<RemoteApi>,
    pub etcd_access: EtcdAccess,
    /// The DNS responder; None when it is off (no `--dns-listen`).
    pub dns: Option<crate::dns::Settings>,
    /// `udp` services' flow table limits.
    pub udp: crate::proxy::udp::UdpSettings,
}

/// Where a setting can come from, flags first: clap has already put `FLUXD_*` variables into
/// `args`.
struct Sources<'a> {
    args: &'a RunArgs,
    file: &'a FileConfig,
}

/// The setting `$f` from the flags (or environment), else from the file.
macro_rules! pick {
    ($s:expr, $f:ident) => {
        $s.args.$f.clone().or($s.file.$f.clone())
    };
}

impl Config {
    pub fn load(args: &RunArgs) -> anyhow::Result<Config> {
        let file = match &args.config {
            Some(p) => read_file(p)?,
            None => FileConfig::default(),
        };
        Self::resolve(args, file)
    }

    /// The config a `fluxd run --config FILE` with no other flag would get from a file holding
    /// `text`: parsed and validated exactly as [`Config::load`] does (used by the fuzz target).
    pub fn from_toml_str(text: &str) -> anyhow::Result<Config> {
        let file = parse_file(text).map_err(|msg| anyhow::anyhow!("config: {msg}"))?;
        Self::resolve(&RunArgs::default(), file)
    }

    fn resolve(args: &RunArgs, file: FileConfig) -> anyhow::Result<Config> {
        let s = Sources { args, file: &file };
        let (host_name, host_ip, network_mode) = host_identity(&s)?;
        Ok(Config {
            store: parse_store(&pick!(s, store).unwrap_or_else(|| "embedded".into()))?,
            state_dir: pick!(s, state_dir).unwrap_or_else(|| "/var/lib/fluxd".into()),
            api: parse_api(
                &pick!(s, api).unwrap_or_else(|| "unix:///run/fluxd/fluxd.sock".into()),
            )?,
            http: parse_http(&pick!(s, http).unwrap_or_else(|| "127.0.0.1:7070".into()))?,
            host_name,
            host_ip,
            docker: parse_docker(
                &pick!(s, docker).unwrap_or_else(|| "unix:///var/run/docker.sock".into()),
            )?,
            network_mode,
            dataplane: !pick!(s, no_dataplane).unwrap_or(false),
            etcd_prefix: parse_etcd_prefix(
                pick!(s, etcd_prefix).unwrap_or_else(|| "/flux/".into()),
            )?,
            host_ttl: Duration::from_secs(in_range(
                "host_ttl",
                pick!(s, host_ttl),
                15,
                2..=300,
                "seconds",
            )?),
            log_format: parse_log_format(pick!(s, log_format).as_deref())?,
            proxy_port: parse_proxy_port(pick!(s, proxy_port).unwrap_or(7171))?,
            keep_rules: pick!(s, keep_rules).unwrap_or(false),
            steering: parse_steering(pick!(s, steering).as_deref())?,
            bpf_dir: pick!(s, bpf_dir).unwrap_or_else(|| DEFAULT_BPF_DIR.into()),
            bridge_interfaces: parse_bridge_interfaces(
                &pick!(s, bridge_interfaces).unwrap_or_else(|| "docker0,br-+".into()),
            )?,
            connect_timeout: Duration::from_millis(in_range(
                "connect_timeout_ms",
                pick!(s, connect_timeout_ms),
                2500,
                10..=60_000,
                "",
            )?),
            http_response_timeout: Duration::from_millis(in_range(
                "http_response_timeout_ms",
                pick!(s, http_response_timeout_ms),
                60_000,
                100..=3_600_000,
                "",
            )?),
            half_close_timeout: Duration::from_millis(in_range(
                "half_close_timeout_ms",
                pick!(s, half_close_timeout_ms),
                120_000,
                100..=86_400_000,
                "",
            )?),
            max_connections: parse_max_connections(pick!(s, max_connections).unwrap_or(8000))?,
            drain: Duration::from_secs(in_range(
                "drain_seconds",
                pick!(s, drain_seconds),
                10,
                0..=3600,
                "",
            )?),
            vip_ranges: parse_vip_ranges(pick!(s, vip_range).unwrap_or_default())?,
            protected_ranges: parse_protected_ranges(
                pick!(s, protected_range).unwrap_or_default(),
            )?,
            api_group: parse_api_group(pick!(s, api_group).unwrap_or_else(|| "flux".into()))?,
            remote_api: remote_api(&s)?,
            etcd_access: etcd_access(&s)?,
            dns: crate::dns::Settings::parse(
                pick!(s, dns_listen).unwrap_or_default(),
                pick!(s, dns_domain),
                pick!(s, dns_forward),
            )?,
            udp: crate::proxy::udp::UdpSettings {
                idle: Duration::from_millis(in_range(
                    "udp_idle_ms",
                    pick!(s, udp_idle_ms),
                    30_000,
                    100..=86_400_000,
                    "",
                )?),
                max_flows: in_range(
                    "udp_max_flows",
                    pick!(s, udp_max_flows),
                    65_536,
                    1..=1_000_000,
                    "",
                )? as usize,
            },
        })
    }
}

/// This host's name, IP and network mode: how it appears to the other hosts.
fn host_identity(s: &Sources) -> anyhow::Result<(String, Ipv4Addr, NetworkMode)> {
    let host_name = match pick!(s, host_name) {
        Some(h) => h,
        None => nix::unistd::gethostname()
            .context("host_name: cannot read the hostname; set --host-name")?
            .to_string_lossy()
            .into_owned(),
    };
    validate::host_name("host_name", &host_name)?;
    let host_ip = match pick!(s, host_ip) {
        Some(ip) => ip
            .parse()
            .map_err(|_| anyhow::anyhow!("host_ip: expected an IPv4 address (got \"{ip}\")"))?,
        None => detect_host_ip(),
    };
    let network_mode = match pick!(s, network_mode).as_deref() {
        None | Some("local") => NetworkMode::Local,
        Some("global") => NetworkMode::Global,
        Some(other) => bail!("network_mode: must be local or global (got \"{other}\")"),
    };
    Ok((host_name, host_ip, network_mode))
}

/// A number setting with its default, refused outside `range` (`unit` only words the error).
fn in_range(
    key: &str,
    value: Option<u64>,
    default: u64,
    range: std::ops::RangeInclusive<u64>,
    unit: &str,
) -> anyhow::Result<u64> {
    let v = value.unwrap_or(default);
    if !range.contains(&v) {
        let unit = if unit.is_empty() {
            String::new()
        } else {
            format!(" {unit}")
        };
        bail!(
            "{key}: must be {}-{}{unit} (got {v})",
            range.start(),
            range.end()
        );
    }
    Ok(v)
}

fn parse_http(s: &str) -> anyhow::Result<SocketAddr> {
    s.parse()
        .map_err(|_| anyhow::anyhow!("http: expected ADDR:PORT (got \"{s}\")"))
}

fn parse_etcd_prefix(prefix: String) -> anyhow::Result<String> {
    if !prefix.starts_with('/') || !prefix.ends_with('/') {
        bail!("etcd_prefix: must start and end with '/' (got \"{prefix}\")");
    }
    Ok(prefix)
}

fn parse_log_format(s: Option<&str>) -> anyhow::Result<LogFormat> {
    match s {
        None | Some("text") => Ok(LogFormat::Text),
        Some("json") => Ok(LogFormat::Json),
        Some(other) => bail!("log_format: must be text or json (got \"{other}\")"),
    }
}

fn parse_proxy_port(port: u16) -> anyhow::Result<u16> {
    if port == 0 {
        bail!("proxy_port: must be 1-65535 (got 0)");
    }
    Ok(port)
}

fn parse_max_connections(n: usize) -> anyhow::Result<usize> {
    if n == 0 {
        bail!("max_connections: must be at least 1");
    }
    Ok(n)
}

/// Comma-separated interface names, `+` as iptables' wildcard.
fn parse_bridge_interfaces(s: &str) -> anyhow::Result<Vec<String>> {
    let names: Vec<String> = s
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    for i in &names {
        let ok = i.len() <= 15
            && i.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'+'));
        if !ok {
            bail!("bridge_interfaces: not an interface name (got \"{i}\")");
        }
    }
    Ok(names)
}

/// VIP ranges, refusing any that would capture real traffic whatever the services say.
fn parse_vip_ranges(ranges: Vec<String>) -> anyhow::Result<Vec<ipnet::Ipv4Net>> {
    let mut out = Vec::new();
    for r in ranges {
        let net: ipnet::Ipv4Net = r.parse().map_err(|_| {
            anyhow::anyhow!("vip_range: expected an IPv4 CIDR like 198.18.0.0/16 (got \"{r}\")")
        })?;
        let ip = net.network();
        if ip.is_loopback()
            || ip.is_unspecified()
            || ip.is_multicast()
            || ip.is_link_local()
            || net.prefix_len() < 8
        {
            bail!("vip_range: {r} would capture real traffic (loopback, multicast, link-local or wider than /8)");
        }
        out.push(net.trunc());
    }
    Ok(out)
}

fn parse_protected_ranges(ranges: Vec<String>) -> anyhow::Result<Vec<ipnet::Ipv4Net>> {
    ranges
        .iter()
        .map(|r| {
            r.trim()
                .parse::<ipnet::Ipv4Net>()
                .map(|n| n.trunc())
                .map_err(|_| {
                    anyhow::anyhow!(
                        "--protected-range: expected an IPv4 CIDR like 10.0.0.0/8 (got \"{r}\")"
                    )
                })
        })
        .collect()
}

fn parse_api_group(group: String) -> anyhow::Result<String> {
    if group.is_empty() || group.contains(['/', ':', ' ']) {
        bail!("api_group: not a group name (got \"{group}\")");
    }
    Ok(group)
}

/// `--api-listen` with the three files it needs, or None.
fn remote_api(s: &Sources) -> anyhow::Result<Option<RemoteApi>> {
    let Some(a) = pick!(s, api_listen) else {
        return Ok(None);
    };
    let listen: SocketAddr = a
        .parse()
        .map_err(|_| anyhow::anyhow!("api_listen: expected ADDR:PORT (got \"{a}\")"))?;
    let need = |v: Option<PathBuf>, key: &str| {
        v.ok_or_else(|| anyhow::anyhow!("{key}: required with api_listen"))
    };
    Ok(Some(RemoteApi {
        listen,
        cert_file: need(pick!(s, api_cert_file), "api_cert_file")?,
        key_file: need(pick!(s, api_key_file), "api_key_file")?,
        token_file: need(pick!(s, api_token_file), "api_token_file")?,
    }))
}

/// TLS and user settings for etcd, refusing halves of a pair.
fn etcd_access(s: &Sources) -> anyhow::Result<EtcdAccess> {
    let access = EtcdAccess {
        ca_file: pick!(s, etcd_ca_file),
        cert_file: pick!(s, etcd_cert_file),
        key_file: pick!(s, etcd_key_file),
        user: pick!(s, etcd_user),
        password_file: pick!(s, etcd_password_file),
    };
    if access.cert_file.is_some() != access.key_file.is_some() {
        bail!("etcd_cert_file: a client certificate needs both etcd_cert_file and etcd_key_file");
    }
    if access.cert_file.is_some() && access.ca_file.is_none() {
        bail!("etcd_cert_file: a client certificate needs TLS: set etcd_ca_file too");
    }
    if access.user.is_some() != access.password_file.is_some() {
        bail!("etcd_user: etcd auth needs both etcd_user and etcd_password_file");
    }
    Ok(access)
}

fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("config: cannot read {}", path.display()))?;
    parse_file(&text).map_err(|msg| anyhow::anyhow!("config: {}: {msg}", path.display()))
}

fn parse_file(text: &str) -> Result<FileConfig, String> {
    toml::from_str(text).map_err(|e| e.message().to_string())
}

/// `unix:///PATH`: the local API is a unix socket only (the remote API is `--api-listen`).
fn parse_api(s: &str) -> anyhow::Result<PathBuf> {
    match s.strip_prefix("unix://") {
        Some(p) if p.starts_with('/') => Ok(PathBuf::from(p)),
        _ if s.starts_with("http://") || s.starts_with("https://") => {
            bail!("api: fluxd serves its local API on a unix:// socket only (see --api-listen)")
        }
        _ => bail!("api: expected unix:///PATH (got \"{s}\")"),
    }
}

/// `unix:///PATH` or `none`.
fn parse_docker(s: &str) -> anyhow::Result<Option<PathBuf>> {
    if s == "none" {
        return Ok(None);
    }
    match s.strip_prefix("unix://") {
        Some(p) if p.starts_with('/') => Ok(Some(PathBuf::from(p))),
        _ => bail!("docker: expected unix:///PATH or none (got \"{s}\")"),
    }
}

/// `embedded` or `etcd://h1:2379,h2:2379`.
pub fn parse_store(s: &str) -> anyhow::Result<StoreSpec> {
    if s == "embedded" {
        return Ok(StoreSpec::Embedded);
    }
    let Some(rest) = s.strip_prefix("etcd://") else {
        bail!("store: must be embedded or etcd://HOST:PORT[,HOST:PORT...] (got \"{s}\")");
    };
    let endpoints: Vec<String> = rest
        .split(',')
        .map(|e| e.trim_end_matches('/').to_string())
        .collect();
    for e in &endpoints {
        let ok = e
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if !ok {
            bail!("store: etcd endpoint must be HOST:PORT (got \"{e}\")");
        }
    }
    Ok(StoreSpec::Etcd {
        endpoints: endpoints.iter().map(|e| format!("http://{e}")).collect(),
    })
}

/// The source address the kernel would use for outside traffic; if there is no default route
/// (an isolated namespace), the first global IPv4 address of an interface that is up.
/// `connect` on a UDP socket sends nothing; it only asks the routing table.
fn detect_host_ip() -> Ipv4Addr {
    let routed = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("192.0.2.1:9").map(|_| s))
        .and_then(|s| s.local_addr())
        .ok()
        .and_then(|a| match a.ip() {
            std::net::IpAddr::V4(ip) if !ip.is_unspecified() => Some(ip),
            _ => None,
        });
    if let Some(ip) = routed {
        return ip;
    }
    let from_ifaces = nix::ifaddrs::getifaddrs().ok().and_then(|addrs| {
        addrs
            .filter(|a| a.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP))
            .filter_map(|a| a.address?.as_sockaddr_in().map(|s| s.ip()))
            .find(|ip| !ip.is_loopback() && !ip.is_link_local())
    });
    from_ifaces.unwrap_or(Ipv4Addr::LOCALHOST)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_specs() {
        assert_eq!(parse_store("embedded").unwrap(), StoreSpec::Embedded);
        assert_eq!(
            parse_store("etcd://a:2379,b:2379").unwrap(),
            StoreSpec::Etcd {
                endpoints: vec!["http://a:2379".into(), "http://b:2379".into()]
            }
        );
        for bad in [
            "",
            "etcd",
            "etcd://",
            "etcd://a",
            "etcd://a:0",
            "consul://a:1",
        ] {
            assert!(parse_store(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn steering_modes() {
        let c = Config::from_toml_str("").unwrap();
        assert_eq!(c.steering, SteeringMode::Auto);
        assert_eq!(c.bpf_dir, Path::new(DEFAULT_BPF_DIR));
        let c = Config::from_toml_str("steering = \"nat\"\nbpf_dir = \"/x\"").unwrap();
        assert_eq!(
            (c.steering, c.bpf_dir.as_path()),
            (SteeringMode::Nat, Path::new("/x"))
        );
        let e = Config::from_toml_str("steering = \"ebpf\"")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "steering: must be auto, bpf or nat (got \"ebpf\")");
    }

    #[test]
    fn flags_beat_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("fluxd.toml");
        std::fs::write(
            &f,
            "host_name = \"from-file\"\nhost_ttl = 9\nhost_ip = \"10.0.0.9\"\n",
        )
        .unwrap();
        let args = RunArgs {
            config: Some(f.clone()),
            host_name: Some("from-flag".into()),
            ..RunArgs::default()
        };
        let c = Config::load(&args).unwrap();
        assert_eq!(c.host_name, "from-flag");
        assert_eq!(c.host_ttl, Duration::from_secs(9));
        std::fs::write(&f, "hostname = \"typo\"\n").unwrap();
        let e = Config::load(&args).unwrap_err().to_string();
        assert!(e.contains("hostname"), "{e}");
    }

    #[test]
    fn protected_ranges() {
        let args = RunArgs {
            protected_range: Some(vec!["10.1.2.3/8".into(), "192.168.0.0/16".into()]),
            ..RunArgs::default()
        };
        let c = Config::load(&args).unwrap();
        assert_eq!(
            c.protected_ranges,
            vec![
                "10.0.0.0/8".parse::<ipnet::Ipv4Net>().unwrap(),
                "192.168.0.0/16".parse().unwrap()
            ]
        );
        let args = RunArgs {
            protected_range: Some(vec!["10.0.0.0/33".into()]),
            ..RunArgs::default()
        };
        let e = Config::load(&args).unwrap_err().to_string();
        assert!(
            e.starts_with("--protected-range: ") && !e.contains('\n'),
            "{e}"
        );
    }

    /// The fuzz target's entry point reads text exactly as `load` reads the file.
    #[test]
    fn from_toml_str_is_load_without_a_file() {
        let text = "host_name = \"h1\"\nhost_ip = \"10.0.0.9\"\nproxy_port = 7000\nvip_range = [\"198.18.0.0/15\"]\n";
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("fluxd.toml");
        std::fs::write(&f, text).unwrap();
        let loaded = Config::load(&RunArgs {
            config: Some(f),
            ..RunArgs::default()
        })
        .unwrap();
        let parsed = Config::from_toml_str(text).unwrap();
        assert_eq!(format!("{loaded:?}"), format!("{parsed:?}"));
        let e = Config::from_toml_str("host_ttl = 1\nhost_name = \"h\"\nhost_ip = \"10.0.0.9\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("host_ttl"), "{e}");
        let e = Config::from_toml_str("hostname = 1")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("config: ") && e.contains("hostname"), "{e}");
    }

    /// packaging/fluxd.toml (installed as /etc/flux/fluxd.toml) loads as it is, and with
    /// every key uncommented; and it names every key a config file takes.
    #[test]
    fn packaged_config() {
        let text = include_str!("../../packaging/fluxd.toml");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("fluxd.toml");
        std::fs::write(&f, text).unwrap();
        let args = RunArgs {
            config: Some(f.clone()),
            ..RunArgs::default()
        };
        Config::load(&args).unwrap();
        let uncommented: String = text
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest) if !rest.starts_with(' ') && !rest.is_empty() => rest,
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&f, &uncommented).unwrap();
        let c = Config::load(&args).unwrap();
        assert_eq!(c.proxy_port, 7171);
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/fluxd"));
        let keys: Vec<&str> = uncommented
            .lines()
            .filter_map(|l| l.split_once(" = ").map(|(k, _)| k))
            .collect();
        let full: FileConfig = toml::from_str(&uncommented).unwrap();
        let debug = format!("{full:?}");
        for field in debug
            .trim_start_matches("FileConfig { ")
            .split(", ")
            .filter_map(|f| f.split_once(": ").map(|(k, _)| k))
        {
            assert!(keys.contains(&field), "packaging/fluxd.toml lacks {field}");
        }
    }
}
