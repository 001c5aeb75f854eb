//! The traffic-control flags of `fluxctl service add` and `fluxctl select` (see
//! `model::traffic`), kept apart from `args.rs` so each flag's parsing sits in one place.

use clap::Args;

use crate::model::{traffic, Affinity, InvalidInput, Locality};

/// `--locality` and `--affinity` of `service add`.
#[derive(Args, Default)]
pub struct ServiceTrafficArgs {
    /// Which instances get new connections: any (default), prefer-host (this host's while one
    /// is live, the others only when none is) or host-only (this host's only).
    #[arg(long, value_name = "any|prefer-host|host-only")]
    pub locality: Option<String>,
    /// none (default) or client-ip: connections (or requests) from one client IP go to the
    /// same instance on every host while it is live (rendezvous hashing).
    #[arg(long, value_name = "none|client-ip")]
    pub affinity: Option<String>,
}

impl ServiceTrafficArgs {
    pub fn locality(&self) -> Result<Locality, InvalidInput> {
        Ok(self
            .locality
            .as_deref()
            .map(str::parse)
            .transpose()?
            .unwrap_or_default())
    }

    pub fn affinity(&self) -> Result<Affinity, InvalidInput> {
        Ok(self
            .affinity
            .as_deref()
            .map(str::parse)
            .transpose()?
            .unwrap_or_default())
    }
}

/// `fluxctl info`'s line on a service's locality and affinity, when either is not the default.
pub fn describe(s: &crate::model::Service) -> Option<String> {
    if s.locality.is_any() && s.affinity.is_none() {
        return None;
    }
    Some(format!(
        "traffic: locality {}  affinity {}\n",
        s.locality, s.affinity
    ))
}

/// Parses `--weight`: 0-1000.
pub fn parse_weight(v: &str) -> Result<u16, InvalidInput> {
    let w = v.parse::<u16>().map_err(|_| {
        InvalidInput::new("weight", format!("must be 0-{}", traffic::MAX_WEIGHT)).value(v)
    })?;
    traffic::weight("weight", w)?;
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_parse_within_range_only() {
        assert_eq!(parse_weight("0").unwrap(), 0);
        assert_eq!(parse_weight("1000").unwrap(), 1000);
        for bad in ["1001", "-1", "ten", "70000", ""] {
            assert_eq!(parse_weight(bad).unwrap_err().field, "weight", "{bad}");
        }
    }
}
