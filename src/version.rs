//! Which flux this is: the crate version and the commit it was built from (see `build.rs`).

use serde::{Deserialize, Serialize};

/// `0.1.0`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The commit, 12 hex digits, or `unknown` outside a git checkout.
pub const COMMIT: &str = env!("FLUX_BUILD_COMMIT");

/// The commit's date, `YYYY-MM-DD`, empty when unknown.
pub const DATE: &str = env!("FLUX_BUILD_DATE");

/// What `--version` prints after the program name: `0.1.0 (build 75ff79e4a1b2, 2026-12-06)`.
/// (concat! takes the literals env! expands to, so the line is built at compile time.)
pub const LONG: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (build ",
    env!("FLUX_BUILD_COMMIT"),
    ", ",
    env!("FLUX_BUILD_DATE"),
    ")"
);

/// The version and build of one program, as `fluxctl version --json` and `GET /v1/host` give it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Build {
    pub version: String,
    pub commit: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub date: String,
}

impl Build {
    /// This program's build.
    pub fn this() -> Build {
        Build {
            version: VERSION.into(),
            commit: COMMIT.into(),
            date: DATE.into(),
        }
    }
}

impl std::fmt::Display for Build {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (build {}", self.version, self.commit)?;
        if !self.date.is_empty() {
            write!(f, ", {}", self.date)?;
        }
        f.write_str(")")
    }
}
