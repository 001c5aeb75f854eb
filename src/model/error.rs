//! The one error type every refusal of bad input uses, so that the CLI, the API and the
//! store reader all say the same thing: which field, which value, and why.

use std::fmt;

/// A refusal of one input field. Rendered as `field: reason (got "value")`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct InvalidInput {
    /// The field as the user named it (`address`, `labels`, `instance_port`, ...).
    pub field: String,
    /// Why it was refused, phrased as what a valid value looks like.
    pub reason: String,
    /// The offending value, shortened so that huge inputs keep the message on one line.
    pub value: Option<String>,
}

/// Values longer than this are cut in messages; the field is what matters.
const MAX_SHOWN: usize = 64;

impl InvalidInput {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        InvalidInput {
            field: field.into(),
            reason: reason.into(),
            value: None,
        }
    }

    /// Attaches the bad value, escaped and shortened for a one-line message.
    pub fn value(mut self, value: impl AsRef<str>) -> Self {
        self.value = Some(shorten(value.as_ref()));
        self
    }

    /// Prefixes the field with its parent (`labels` inside `selector` becomes `selector.labels`).
    pub fn within(mut self, parent: &str) -> Self {
        self.field = format!("{parent}.{}", self.field);
        self
    }
}

fn shorten(s: &str) -> String {
    let escaped: String = s.escape_debug().collect();
    if escaped.chars().count() <= MAX_SHOWN {
        escaped
    } else {
        let head: String = escaped.chars().take(MAX_SHOWN).collect();
        format!("{head}... ({} bytes)", s.len())
    }
}

impl fmt::Display for InvalidInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(v) => write!(f, "{}: {} (got \"{}\")", self.field, self.reason, v),
            None => write!(f, "{}: {}", self.field, self.reason),
        }
    }
}
