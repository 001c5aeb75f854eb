//! An active health check of a service's instances: what every fluxd that routes the service
//! asks each instance, how often, and how many answers in a row change its verdict.

use serde::{Deserialize, Serialize};

use super::InvalidInput;

/// Checks every 2 s unless told otherwise.
pub const DEFAULT_INTERVAL_MS: u32 = 2000;
/// An answer must come within 1 s unless told otherwise.
pub const DEFAULT_TIMEOUT_MS: u32 = 1000;
/// Three failures in a row take an instance out of the pool.
pub const DEFAULT_FALL: u32 = 3;
/// Two passes in a row put a failing instance back.
pub const DEFAULT_RISE: u32 = 2;

/// Shortest interval: more often than 10 checks a second per instance is load, not insight.
pub const MIN_INTERVAL_MS: u32 = 100;
/// Longest interval: one hour.
pub const MAX_INTERVAL_MS: u32 = 3_600_000;
/// Shortest timeout: below this even a loopback answer can miss it under load.
pub const MIN_TIMEOUT_MS: u32 = 10;
/// Largest `fall` and `rise`.
pub const MAX_COUNT: u32 = 100;
/// Longest path: a request line longer than this is a mistake, not a health endpoint.
pub const MAX_PATH_LEN: usize = 1024;

/// What a check asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// Passes when a TCP connect to the instance succeeds.
    Tcp,
    /// Passes when `GET path` answers 2xx or 3xx.
    Http,
}

/// One service's active check, as stored in its record (`health`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    pub kind: CheckKind,
    /// The path `http` checks GET: starts with `/`, printable ASCII without spaces. Absent for
    /// `tcp` checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Time between the starts of two checks of one instance.
    #[serde(default = "default_interval")]
    pub interval_ms: u32,
    /// How long one check may take, connect included; less than the interval.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u32,
    /// Consecutive failures that make an instance failing (out of the pool).
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// Consecutive passes that make a failing instance passing again.
    #[serde(default = "default_rise")]
    pub rise: u32,
}

fn default_interval() -> u32 {
    DEFAULT_INTERVAL_MS
}
fn default_timeout() -> u32 {
    DEFAULT_TIMEOUT_MS
}
fn default_fall() -> u32 {
    DEFAULT_FALL
}
fn default_rise() -> u32 {
    DEFAULT_RISE
}

impl HealthCheck {
    /// A `tcp` check with the default timing.
    pub fn tcp() -> Self {
        Self::with(CheckKind::Tcp, None)
    }

    /// An `http` check of `path` with the default timing.
    pub fn http(path: &str) -> Self {
        Self::with(CheckKind::Http, Some(path.to_string()))
    }

    fn with(kind: CheckKind, path: Option<String>) -> Self {
        HealthCheck {
            kind,
            path,
            interval_ms: DEFAULT_INTERVAL_MS,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            fall: DEFAULT_FALL,
            rise: DEFAULT_RISE,
        }
    }

    /// The spec as `--health` takes it: `tcp` or `http:/path`.
    pub fn spec(&self) -> String {
        match (self.kind, &self.path) {
            (CheckKind::Http, Some(p)) => format!("http:{p}"),
            (CheckKind::Http, None) => "http:".into(),
            (CheckKind::Tcp, _) => "tcp".into(),
        }
    }

    /// One line for people: `http GET /healthz every 2s, timeout 1s, fall 3, rise 2`.
    pub fn describe(&self) -> String {
        let what = match (self.kind, &self.path) {
            (CheckKind::Http, p) => format!("http GET {}", p.as_deref().unwrap_or("")),
            (CheckKind::Tcp, _) => "tcp connect".into(),
        };
        format!(
            "{what} every {}, timeout {}, fall {}, rise {}",
            format_ms(self.interval_ms),
            format_ms(self.timeout_ms),
            self.fall,
            self.rise
        )
    }

    /// Checks the invariants; errors name the field inside `health` (`health.path`, ...).
    pub fn validate(&self) -> Result<(), InvalidInput> {
        match (self.kind, &self.path) {
            (CheckKind::Http, None) => {
                return Err(InvalidInput::new(
                    "health.path",
                    "http checks need a path, like http:/healthz",
                ))
            }
            (CheckKind::Http, Some(p)) => path(p)?,
            (CheckKind::Tcp, Some(p)) => {
                return Err(
                    InvalidInput::new("health.path", "only http checks have a path").value(p),
                )
            }
            (CheckKind::Tcp, None) => {}
        }
        if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&self.interval_ms) {
            return Err(InvalidInput::new(
                "health.interval_ms",
                "must be 100 ms to 1 h (100-3600000)",
            )
            .value(self.interval_ms.to_string()));
        }
        if self.timeout_ms < MIN_TIMEOUT_MS {
            return Err(
                InvalidInput::new("health.timeout_ms", "must be at least 10 ms")
                    .value(self.timeout_ms.to_string()),
            );
        }
        if self.timeout_ms >= self.interval_ms {
            return Err(InvalidInput::new(
                "health.timeout_ms",
                format!("must be less than the interval ({} ms)", self.interval_ms),
            )
            .value(self.timeout_ms.to_string()));
        }
        for (field, n) in [("health.fall", self.fall), ("health.rise", self.rise)] {
            if !(1..=MAX_COUNT).contains(&n) {
                return Err(InvalidInput::new(field, "must be 1-100").value(n.to_string()));
            }
        }
        Ok(())
    }
}

/// `/healthz`: starts with `/`, printable ASCII without spaces (it goes into a request line).
fn path(p: &str) -> Result<(), InvalidInput> {
    let bad = |why: &str| Err(InvalidInput::new("health.path", why.to_string()).value(p));
    if !p.starts_with('/') {
        return bad("must start with /");
    }
    if p.len() > MAX_PATH_LEN {
        return bad("must be at most 1024 bytes");
    }
    if !p.bytes().all(|b| b.is_ascii_graphic()) {
        return bad("must be printable ASCII without spaces");
    }
    Ok(())
}

/// Parses the `--health` spec: `tcp` or `http:/path`, with the default timing.
impl std::str::FromStr for HealthCheck {
    type Err = InvalidInput;
    fn from_str(s: &str) -> Result<Self, InvalidInput> {
        let check = match s.split_once(':') {
            None if s == "tcp" => HealthCheck::tcp(),
            Some(("http", p)) => HealthCheck::http(p),
            _ => {
                return Err(InvalidInput::new("health", "must be tcp or http:/PATH").value(s));
            }
        };
        check.validate().map_err(|e| InvalidInput {
            field: "health".into(),
            ..e
        })?;
        Ok(check)
    }
}

/// `2000` -> `2s`, `1500` -> `1500ms`, `60000` -> `1m`.
pub fn format_ms(ms: u32) -> String {
    match ms {
        m if m % 3_600_000 == 0 => format!("{}h", m / 3_600_000),
        m if m % 60_000 == 0 => format!("{}m", m / 60_000),
        m if m % 1000 == 0 => format!("{}s", m / 1000),
        m => format!("{m}ms"),
    }
}

/// Parses a duration flag: a whole number with `ms`, `s`, `m` or `h` (`2s`, `500ms`), naming
/// `field` on error. A bare number is refused: `2` could mean seconds or milliseconds.
pub fn parse_duration_ms(field: &str, s: &str) -> Result<u32, InvalidInput> {
    let shape = || InvalidInput::new(field, "expected a duration like 2s or 500ms").value(s);
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(shape)?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| shape())?;
    let scale = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(shape()),
    };
    n.checked_mul(scale)
        .and_then(|ms| u32::try_from(ms).ok())
        .ok_or_else(|| InvalidInput::new(field, "too long").value(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        assert_eq!("tcp".parse::<HealthCheck>().unwrap(), HealthCheck::tcp());
        let h: HealthCheck = "http:/healthz".parse().unwrap();
        assert_eq!(h.kind, CheckKind::Http);
        assert_eq!(h.path.as_deref(), Some("/healthz"));
        assert_eq!(h.spec(), "http:/healthz");
        assert_eq!(
            (h.interval_ms, h.timeout_ms, h.fall, h.rise),
            (2000, 1000, 3, 2)
        );
        for bad in [
            "",
            "udp",
            "http",
            "http:",
            "http:healthz",
            "tcp:/x",
            "http:/a b",
            "HTTP:/x",
            "tcp:",
        ] {
            let e = bad.parse::<HealthCheck>().unwrap_err();
            assert_eq!(e.field, "health", "{bad}: {e}");
            assert!(!e.to_string().contains('\n'), "{e}");
        }
        let e = "http:healthz".parse::<HealthCheck>().unwrap_err();
        assert!(e.reason.contains("must start with /"), "{e}");
    }

    #[test]
    fn bounds_name_the_field() {
        let field = |f: &dyn Fn(&mut HealthCheck)| {
            let mut h = HealthCheck::http("/healthz");
            f(&mut h);
            h.validate().err().map(|e| e.field)
        };
        assert_eq!(field(&|_| {}), None);
        assert_eq!(
            field(&|h| h.interval_ms = 99).as_deref(),
            Some("health.interval_ms")
        );
        assert_eq!(
            field(&|h| h.interval_ms = 3_600_001).as_deref(),
            Some("health.interval_ms")
        );
        assert_eq!(
            field(&|h| h.timeout_ms = 9).as_deref(),
            Some("health.timeout_ms")
        );
        assert_eq!(
            field(&|h| h.timeout_ms = 2000).as_deref(),
            Some("health.timeout_ms")
        );
        assert_eq!(field(&|h| h.fall = 0).as_deref(), Some("health.fall"));
        assert_eq!(field(&|h| h.rise = 101).as_deref(), Some("health.rise"));
        assert_eq!(field(&|h| h.path = None).as_deref(), Some("health.path"));
        assert_eq!(
            field(&|h| h.path = Some("/\u{7f}".into())).as_deref(),
            Some("health.path")
        );
        let mut t = HealthCheck::tcp();
        t.path = Some("/x".into());
        assert_eq!(t.validate().unwrap_err().field, "health.path");
        let mut ok = HealthCheck::tcp();
        (ok.interval_ms, ok.timeout_ms, ok.fall, ok.rise) = (100, 10, 1, 100);
        assert!(ok.validate().is_ok());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("d", "2s").unwrap(), 2000);
        assert_eq!(parse_duration_ms("d", "250ms").unwrap(), 250);
        assert_eq!(parse_duration_ms("d", "1m").unwrap(), 60_000);
        assert_eq!(parse_duration_ms("d", "1h").unwrap(), 3_600_000);
        for bad in ["", "2", "s", "2 s", "-1s", "1.5s", "2d", "99999999999h"] {
            assert_eq!(parse_duration_ms("d", bad).unwrap_err().field, "d", "{bad}");
        }
        assert_eq!(format_ms(2000), "2s");
        assert_eq!(format_ms(1500), "1500ms");
        assert_eq!(format_ms(120_000), "2m");
    }

    #[test]
    fn describe_reads_well() {
        assert_eq!(
            HealthCheck::http("/healthz").describe(),
            "http GET /healthz every 2s, timeout 1s, fall 3, rise 2"
        );
        assert_eq!(
            HealthCheck::tcp().describe(),
            "tcp connect every 2s, timeout 1s, fall 3, rise 2"
        );
    }
}
