//! Traffic control: how a service's new connections are shared among its instances beyond the
//! balance policy. Rule weights (canaries, draining a whole version), instance drain marks,
//! locality (this host's instances first) and client-IP affinity. The proxy applies them
//! (`proxy::balancer`); this file holds what the records say.

use serde::{Deserialize, Serialize};

use super::{validate, InvalidInput, Validate};

/// A rule's share when it sets none, and the share of a service's static instances (which
/// belong to no rule) once weights are in effect.
pub const DEFAULT_WEIGHT: u16 = 100;

/// Largest rule weight: shares are relative, 0..1000 gives a tenth of a percent per unit
/// against the default.
pub const MAX_WEIGHT: u16 = 1000;

/// Checks a rule weight named `field`.
pub fn weight(field: &str, w: u16) -> Result<(), InvalidInput> {
    if w > MAX_WEIGHT {
        return Err(
            InvalidInput::new(field, format!("must be 0-{MAX_WEIGHT}")).value(w.to_string())
        );
    }
    Ok(())
}

/// Which instances a host sends a service's new connections to, by where they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Locality {
    /// Every instance alike.
    #[default]
    Any,
    /// This host's instances while one of them is live; the others only when none is (for the
    /// first pick and for retries alike).
    PreferHost,
    /// This host's instances only; none live here refuses the connection.
    HostOnly,
}

impl Locality {
    /// The default, left out of the record so that records that do not set it encode exactly
    /// as they did before the field existed.
    pub fn is_any(&self) -> bool {
        *self == Locality::Any
    }
}

impl std::fmt::Display for Locality {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Locality::Any => "any",
            Locality::PreferHost => "prefer-host",
            Locality::HostOnly => "host-only",
        })
    }
}

impl std::str::FromStr for Locality {
    type Err = InvalidInput;
    fn from_str(s: &str) -> Result<Self, InvalidInput> {
        match s {
            "any" => Ok(Locality::Any),
            "prefer-host" => Ok(Locality::PreferHost),
            "host-only" => Ok(Locality::HostOnly),
            _ => {
                Err(InvalidInput::new("locality", "must be any, prefer-host or host-only").value(s))
            }
        }
    }
}

/// Whether one client keeps reaching the same instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Affinity {
    /// The balance policy picks for every connection (or request) afresh.
    #[default]
    None,
    /// Rendezvous hashing of the client's IP address: every host picks the same instance for a
    /// client, with no shared state; when that one is down, the next-highest.
    ClientIp,
}

impl Affinity {
    /// The default, left out of the record (see [`Locality::is_any`]).
    pub fn is_none(&self) -> bool {
        *self == Affinity::None
    }
}

impl std::fmt::Display for Affinity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Affinity::None => "none",
            Affinity::ClientIp => "client-ip",
        })
    }
}

impl std::str::FromStr for Affinity {
    type Err = InvalidInput;
    fn from_str(s: &str) -> Result<Self, InvalidInput> {
        match s {
            "none" => Ok(Affinity::None),
            "client-ip" => Ok(Affinity::ClientIp),
            _ => Err(InvalidInput::new("affinity", "must be none or client-ip").value(s)),
        }
    }
}

/// The mark that drains one instance: no new connections, open ones untouched. A record of its
/// own (not a field of the instance) because a host's agent rewrites its container instances'
/// records whenever it enrols them again, and the mark must survive that.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drain {
    pub service: String,
    pub instance: String,
}

impl Validate for Drain {
    fn validate(&self) -> Result<(), InvalidInput> {
        validate::name("service", &self.service)?;
        validate::name("instance", &self.instance)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_print_the_same() {
        for l in [Locality::Any, Locality::PreferHost, Locality::HostOnly] {
            assert_eq!(l.to_string().parse::<Locality>().unwrap(), l);
        }
        for a in [Affinity::None, Affinity::ClientIp] {
            assert_eq!(a.to_string().parse::<Affinity>().unwrap(), a);
        }
        assert_eq!("near".parse::<Locality>().unwrap_err().field, "locality");
        assert_eq!("cookie".parse::<Affinity>().unwrap_err().field, "affinity");
    }

    #[test]
    fn weights_above_the_maximum_are_refused() {
        assert!(weight("weight", 0).is_ok());
        assert!(weight("weight", MAX_WEIGHT).is_ok());
        let e = weight("weight", MAX_WEIGHT + 1).unwrap_err();
        assert_eq!(e.field, "weight");
        assert!(e.to_string().contains("0-1000"), "{e}");
    }

    #[test]
    fn drain_marks_are_checked() {
        let ok = br#"{"service":"web","instance":"i1"}"#;
        assert!(crate::model::decode::<Drain>(ok).is_ok());
        let bad = br#"{"service":"web","instance":"Bad Name"}"#;
        assert_eq!(
            crate::model::decode::<Drain>(bad).unwrap_err().field,
            "instance"
        );
    }
}
