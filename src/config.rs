//! fluxd's configuration: flags, then `FLUXD_*` environment variables, then a TOML file, then
//! defaults, in that order of precedence. Every setting is checked here, before anything starts.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use serde::Deserialize;

use crate::api::client::Endpoint;
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
}

/// The remote API (`--api-listen`): TLS with a bearer token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteApi {
    pub listen: SocketAddr,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub token_file: PathBuf,
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
        macro_rules! pick {
            ($f:ident) => {
                args.$f.clone().or(file.$f.clone())
            };
        }
        let store = parse_store(&pick!(store).unwrap_or_else(|| "embedded".into()))?;
        let api = match Endpoint::parse(
            &pick!(api).unwrap_or_else(|| "unix:///run/fluxd/fluxd.sock".into()),
        )? {
            Endpoint::Unix(p) => p,
            Endpoint::Tcp(_) | Endpoint::Https(_) => {
                bail!("api: fluxd serves its local API on a unix:// socket only (see --api-listen)")
            }
        };
        let http_s = pick!(http).unwrap_or_else(|| "127.0.0.1:7070".into());
        let http: SocketAddr = http_s
            .parse()
            .map_err(|_| anyhow::anyhow!("http: expected ADDR:PORT (got \"{http_s}\")"))?;
        let host_name = match pick!(host_name) {
            Some(h) => h,
            None => nix::unistd::gethostname()
                .context("host_name: cannot read the hostname; set --host-name")?
                .to_string_lossy()
                .into_owned(),
        };
        validate::host_name("host_name", &host_name)?;
        let host_ip = match pick!(host_ip) {
            Some(s) => s
                .parse()
                .map_err(|_| anyhow::anyhow!("host_ip: expected an IPv4 address (got \"{s}\")"))?,
            None => detect_host_ip(),
        };
        let network_mode = match pick!(network_mode).as_deref() {
            None | Some("local") => NetworkMode::Local,
            Some("global") => NetworkMode::Global,
            Some(other) => bail!("network_mode: must be local or global (got \"{other}\")"),
        };
        let etcd_prefix = pick!(etcd_prefix).unwrap_or_else(|| "/flux/".into());
        if !etcd_prefix.starts_with('/') || !etcd_prefix.ends_with('/') {
            bail!("etcd_prefix: must start and end with '/' (got \"{etcd_prefix}\")");
        }
        let ttl = pick!(host_ttl).unwrap_or(15);
        if !(2..=300).contains(&ttl) {
            bail!("host_ttl: must be 2-300 seconds (got {ttl})");
        }
        let log_format = match pick!(log_format).as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => bail!("log_format: must be text or json (got \"{other}\")"),
        };
        let proxy_port = pick!(proxy_port).unwrap_or(7171);
        if proxy_port == 0 {
            bail!("proxy_port: must be 1-65535 (got 0)");
        }
        let bridge_interfaces: Vec<String> = pick!(bridge_interfaces)
            .unwrap_or_else(|| "docker0,br-+".into())
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        for i in &bridge_interfaces {
            let ok = i.len() <= 15
                && i.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'+'));
            if !ok {
                bail!("bridge_interfaces: not an interface name (got \"{i}\")");
            }
        }
        let connect_timeout_ms = pick!(connect_timeout_ms).unwrap_or(2500);
        if !(10..=60_000).contains(&connect_timeout_ms) {
            bail!("connect_timeout_ms: must be 10-60000 (got {connect_timeout_ms})");
        }
        let http_response_timeout_ms = pick!(http_response_timeout_ms).unwrap_or(60_000);
        if !(100..=3_600_000).contains(&http_response_timeout_ms) {
            bail!("http_response_timeout_ms: must be 100-3600000 (got {http_response_timeout_ms})");
        }
        let half_close_timeout_ms = pick!(half_close_timeout_ms).unwrap_or(120_000);
        if !(100..=86_400_000).contains(&half_close_timeout_ms) {
            bail!("half_close_timeout_ms: must be 100-86400000 (got {half_close_timeout_ms})");
        }
        let max_connections = pick!(max_connections).unwrap_or(8000);
        if max_connections == 0 {
            bail!("max_connections: must be at least 1");
        }
        let drain_seconds = pick!(drain_seconds).unwrap_or(10);
        if drain_seconds > 3600 {
            bail!("drain_seconds: must be 0-3600 (got {drain_seconds})");
        }
        let mut vip_ranges = Vec::new();
        for r in pick!(vip_range).unwrap_or_default() {
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
            vip_ranges.push(net.trunc());
        }
        let mut protected_ranges = Vec::new();
        for r in pick!(protected_range).unwrap_or_default() {
            let net: ipnet::Ipv4Net = r.trim().parse().map_err(|_| {
                anyhow::anyhow!(
                    "--protected-range: expected an IPv4 CIDR like 10.0.0.0/8 (got \"{r}\")"
                )
            })?;
            protected_ranges.push(net.trunc());
        }
        let api_group = pick!(api_group).unwrap_or_else(|| "flux".into());
        if api_group.is_empty() || api_group.contains(['/', ':', ' ']) {
            bail!("api_group: not a group name (got \"{api_group}\")");
        }
        let remote_api = match pick!(api_listen) {
            None => None,
            Some(a) => {
                let listen: SocketAddr = a
                    .parse()
                    .map_err(|_| anyhow::anyhow!("api_listen: expected ADDR:PORT (got \"{a}\")"))?;
                let need = |v: Option<PathBuf>, key: &str| {
                    v.ok_or_else(|| anyhow::anyhow!("{key}: required with api_listen"))
                };
                Some(RemoteApi {
                    listen,
                    cert_file: need(pick!(api_cert_file), "api_cert_file")?,
                    key_file: need(pick!(api_key_file), "api_key_file")?,
                    token_file: need(pick!(api_token_file), "api_token_file")?,
                })
            }
        };
        let etcd_access = EtcdAccess {
            ca_file: pick!(etcd_ca_file),
            cert_file: pick!(etcd_cert_file),
            key_file: pick!(etcd_key_file),
            user: pick!(etcd_user),
            password_file: pick!(etcd_password_file),
        };
        if etcd_access.cert_file.is_some() != etcd_access.key_file.is_some() {
            bail!(
                "etcd_cert_file: a client certificate needs both etcd_cert_file and etcd_key_file"
            );
        }
        if etcd_access.cert_file.is_some() && etcd_access.ca_file.is_none() {
            bail!("etcd_cert_file: a client certificate needs TLS: set etcd_ca_file too");
        }
        if etcd_access.user.is_some() != etcd_access.password_file.is_some() {
            bail!("etcd_user: etcd auth needs both etcd_user and etcd_password_file");
        }
        Ok(Config {
            api_group,
            remote_api,
            etcd_access,
            vip_ranges,
            protected_ranges,
            proxy_port,
            keep_rules: pick!(keep_rules).unwrap_or(false),
            bridge_interfaces,
            connect_timeout: Duration::from_millis(connect_timeout_ms),
            http_response_timeout: Duration::from_millis(http_response_timeout_ms),
            half_close_timeout: Duration::from_millis(half_close_timeout_ms),
            max_connections,
            drain: Duration::from_secs(drain_seconds),
            store,
            state_dir: pick!(state_dir).unwrap_or_else(|| "/var/lib/fluxd".into()),
            api,
            http,
            host_name,
            host_ip,
            docker: parse_docker(
                &pick!(docker).unwrap_or_else(|| "unix:///var/run/docker.sock".into()),
            )?,
            network_mode,
            dataplane: !pick!(no_dataplane).unwrap_or(false),
            etcd_prefix,
            host_ttl: Duration::from_secs(ttl),
            log_format,
        })
    }
}

fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("config: cannot read {}", path.display()))?;
    parse_file(&text).map_err(|msg| anyhow::anyhow!("config: {}: {msg}", path.display()))
}

fn parse_file(text: &str) -> Result<FileConfig, String> {
    toml::from_str(text).map_err(|e| e.message().to_string())
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
        let text = include_str!("../packaging/fluxd.toml");
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
