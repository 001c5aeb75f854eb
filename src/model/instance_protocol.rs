//! Which HTTP version an `http` service's proxy speaks to its instances.

use serde::{Deserialize, Serialize};

use super::InvalidInput;

/// Set on the service; absent means `auto`: each request goes to its instance in the version
/// the client spoke (HTTP/1.1 or HTTP/2), so HTTP/1.1 clients behave as before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceProtocol {
    /// HTTP/1.1 to every instance, whatever the client spoke (instances without HTTP/2).
    Http1,
    /// HTTP/2 with prior knowledge (h2c) to every instance, whatever the client spoke.
    H2,
}

impl InstanceProtocol {
    /// The CLI's words: `auto` (None, the record's absent field), `http1`, `h2`.
    pub fn parse_setting(s: &str) -> Result<Option<InstanceProtocol>, InvalidInput> {
        match s {
            "auto" => Ok(None),
            "http1" => Ok(Some(InstanceProtocol::Http1)),
            "h2" => Ok(Some(InstanceProtocol::H2)),
            _ => Err(InvalidInput::new("instance_protocol", "must be auto, http1 or h2").value(s)),
        }
    }
}

impl std::fmt::Display for InstanceProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            InstanceProtocol::Http1 => "http1",
            InstanceProtocol::H2 => "h2",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_and_bad_ones_name_the_field() {
        assert_eq!(InstanceProtocol::parse_setting("auto").unwrap(), None);
        assert_eq!(
            InstanceProtocol::parse_setting("h2").unwrap(),
            Some(InstanceProtocol::H2)
        );
        assert_eq!(
            InstanceProtocol::parse_setting("http1").unwrap(),
            Some(InstanceProtocol::Http1)
        );
        let e = InstanceProtocol::parse_setting("h3")
            .unwrap_err()
            .to_string();
        assert!(e.contains("instance_protocol"), "{e}");
    }
}
