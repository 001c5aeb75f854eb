//! A selection rule: which containers become instances of a service.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{validate, InvalidInput, Validate};

/// What a container must have to match. Every given field must match; at least one is given,
/// because an empty selector would enrol every container on every host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    /// Image repository without tag (`nginx`, `registry:5000/team/app`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Image tag; a container whose image has none has tag `latest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Container labels that must be present with these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Container environment variables that must be set to these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

impl Selector {
    pub fn is_empty(&self) -> bool {
        self.image.is_none() && self.tag.is_none() && self.labels.is_empty() && self.env.is_empty()
    }
}

impl Validate for Selector {
    fn validate(&self) -> Result<(), InvalidInput> {
        if self.is_empty() {
            return Err(InvalidInput::new(
                "selector",
                "give at least one of image, tag, labels, env",
            ));
        }
        if let Some(i) = &self.image {
            validate::image("image", i)?;
        }
        if let Some(t) = &self.tag {
            validate::tag("tag", t)?;
        }
        validate::pairs("labels", &self.labels)?;
        validate::pairs("env", &self.env)?;
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// The service this rule enrols containers into; it must exist.
    pub service: String,
    /// Unique within the service.
    pub name: String,
    pub selector: Selector,
    /// Overrides the service's instance port for containers this rule matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_port: Option<u16>,
    /// This rule's share of the service's new connections, 0-1000 (see `model::traffic`);
    /// absent (and not written) means the default, 100. 0 drains the rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u16>,
}

impl Rule {
    /// The weight in effect: the rule's own or the default.
    pub fn weight_or_default(&self) -> u16 {
        self.weight.unwrap_or(super::traffic::DEFAULT_WEIGHT)
    }
}

impl Validate for Rule {
    fn validate(&self) -> Result<(), InvalidInput> {
        validate::name("service", &self.service)?;
        validate::name("rule", &self.name)?;
        self.selector.validate()?;
        if let Some(p) = self.instance_port {
            validate::port("instance_port", p)?;
        }
        if let Some(w) = self.weight {
            super::traffic::weight("weight", w)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{decode, encode};

    const OLD: &str = r#"{"service":"web","name":"v1","selector":{"image":"app","tag":"1"}}"#;

    #[test]
    fn records_without_a_weight_load_and_encode_as_before() {
        let r: Rule = decode(OLD.as_bytes()).unwrap();
        assert_eq!((r.weight, r.weight_or_default()), (None, 100));
        assert_eq!(String::from_utf8(encode(&r)).unwrap(), OLD);
    }

    #[test]
    fn weights_round_trip_and_are_checked() {
        let json = OLD.replace(r#"}}"#, r#"},"weight":0}"#);
        let r: Rule = decode(json.as_bytes()).unwrap();
        assert_eq!(r.weight, Some(0));
        assert_eq!(String::from_utf8(encode(&r)).unwrap(), json);
        let e = decode::<Rule>(OLD.replace(r#"}}"#, r#"},"weight":1001}"#).as_bytes()).unwrap_err();
        assert_eq!(e.field, "weight", "{e}");
    }
}
