//! The active health-check flags that `fluxctl service add` and `service set` share.

use clap::Args;

use crate::model::health_check::parse_duration_ms;
use crate::model::{HealthCheck, InvalidInput};

/// The active health check of `service add`.
#[derive(Args, Default, Clone)]
pub struct HealthArgs {
    /// Active health check of every instance: tcp (connect succeeds) or http:/PATH (GET PATH
    /// answers 2xx or 3xx); failing instances leave the pool; `none` (service set) removes it
    /// [default: none, passive only].
    #[arg(long, value_name = "tcp|http:/PATH|none")]
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
