//! A service's own time limits: overrides of fluxd's daemon-wide `--connect-timeout-ms`,
//! `--http-response-timeout-ms` and `--half-close-timeout-ms`, for the one service whose
//! instances are slower (or must fail faster) than the rest.

use serde::{Deserialize, Serialize};

use super::InvalidInput;

/// Each limit in milliseconds; absent means "the daemon's flag", so a record that sets none
/// has no `timeouts` at all and encodes as it did before the field existed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceTimeouts {
    /// Per connect attempt to an instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_ms: Option<u64>,
    /// `http` services: until an instance's response headers (then 504).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_response_ms: Option<u64>,
    /// `tcp` services: idle limit of a half-closed connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub half_close_ms: Option<u64>,
}

/// Each field's record name, command-line flag and accepted range: the same ranges fluxd
/// accepts for its daemon-wide flags (`daemon/config.rs`), so a service can ask for nothing
/// the daemon would refuse.
pub const LIMITS: [(&str, &str, u64, u64); 3] = [
    ("connect_ms", "connect-timeout-ms", 10, 60_000),
    (
        "http_response_ms",
        "http-response-timeout-ms",
        100,
        3_600_000,
    ),
    ("half_close_ms", "half-close-timeout-ms", 100, 86_400_000),
];

impl ServiceTimeouts {
    /// Nothing overridden: left out of the record.
    pub fn is_empty(&self) -> bool {
        *self == ServiceTimeouts::default()
    }

    /// The fields in `LIMITS` order, for checks and display.
    pub fn fields(&self) -> [Option<u64>; 3] {
        [self.connect_ms, self.http_response_ms, self.half_close_ms]
    }

    /// The field named by its record name, for edits and flags.
    pub fn field_mut(&mut self, name: &str) -> Option<&mut Option<u64>> {
        match name {
            "connect_ms" => Some(&mut self.connect_ms),
            "http_response_ms" => Some(&mut self.http_response_ms),
            "half_close_ms" => Some(&mut self.half_close_ms),
            _ => None,
        }
    }

    /// Checks each given limit against its range; the error names `timeouts.FIELD`.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        for ((field, _, lo, hi), v) in LIMITS.iter().zip(self.fields()) {
            if let Some(v) = v {
                if !(*lo..=*hi).contains(&v) {
                    return Err(InvalidInput::new(
                        format!("timeouts.{field}"),
                        format!("must be {lo}-{hi} milliseconds"),
                    )
                    .value(v.to_string()));
                }
            }
        }
        Ok(())
    }

    /// `connect 500ms, http-response 2000ms`: the overrides as people read them; empty when
    /// none.
    pub fn describe(&self) -> String {
        LIMITS
            .iter()
            .zip(self.fields())
            .filter_map(|((_, flag, _, _), v)| {
                let name = flag.trim_end_matches("-timeout-ms");
                v.map(|v| format!("{name} {v}ms"))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Parses a flag's value: milliseconds, or `default` to drop the override (`service set`).
pub fn parse_flag(flag: &str, text: &str) -> Result<Option<u64>, InvalidInput> {
    if text == "default" {
        return Ok(None);
    }
    let (_, _, lo, hi) = LIMITS
        .iter()
        .find(|(_, f, _, _)| *f == flag)
        .copied()
        .unwrap_or((flag, flag, 0, u64::MAX));
    let bad = || {
        InvalidInput::new(flag, format!("must be {lo}-{hi} milliseconds, or default")).value(text)
    };
    let v: u64 = text.parse().map_err(|_| bad())?;
    if !(lo..=hi).contains(&v) {
        return Err(bad());
    }
    Ok(Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_is_left_out_and_each_limit_is_bounded() {
        assert!(ServiceTimeouts::default().is_empty());
        let t: ServiceTimeouts = serde_json::from_str(r#"{"connect_ms":500}"#).unwrap();
        assert_eq!(t.connect_ms, Some(500));
        assert_eq!(serde_json::to_string(&t).unwrap(), r#"{"connect_ms":500}"#);
        assert_eq!(t.describe(), "connect 500ms");
        t.validate().unwrap();
        for (json, field) in [
            (r#"{"connect_ms":9}"#, "timeouts.connect_ms"),
            (r#"{"connect_ms":60001}"#, "timeouts.connect_ms"),
            (r#"{"http_response_ms":99}"#, "timeouts.http_response_ms"),
            (r#"{"half_close_ms":86400001}"#, "timeouts.half_close_ms"),
        ] {
            let t: ServiceTimeouts = serde_json::from_str(json).unwrap();
            assert_eq!(t.validate().unwrap_err().field, field, "{json}");
        }
        // The bounds themselves are accepted.
        let t = ServiceTimeouts {
            connect_ms: Some(10),
            http_response_ms: Some(3_600_000),
            half_close_ms: Some(100),
        };
        t.validate().unwrap();
        assert!(serde_json::from_str::<ServiceTimeouts>(r#"{"read_ms":1}"#).is_err());
    }

    #[test]
    fn flags_take_milliseconds_or_default() {
        assert_eq!(parse_flag("connect-timeout-ms", "250").unwrap(), Some(250));
        assert_eq!(parse_flag("connect-timeout-ms", "default").unwrap(), None);
        for bad in ["5", "1s", "-1", "70000"] {
            let e = parse_flag("connect-timeout-ms", bad).unwrap_err();
            assert_eq!(e.field, "connect-timeout-ms", "{bad}");
            assert!(e.to_string().contains("10-60000"), "{e}");
        }
    }
}
