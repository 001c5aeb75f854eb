use std::path::PathBuf;

/// What can go wrong loading, attaching or updating the steering.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bpf(2) call failed: `what` says which (the verifier's words for a refused program).
    #[error("{what}: {source}")]
    Bpf {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The pin directory is not on a bpf file system, so the program could not outlive fluxd.
    #[error("{0}: not on a bpf file system (mount -t bpf bpf /sys/fs/bpf, or --bpf-dir)")]
    NotBpffs(PathBuf),
    /// Reading or changing the pin directory failed.
    #[error("{path}: {source}")]
    Pins {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An `ip` command failed.
    #[error(transparent)]
    Command(#[from] netfilter::Error),
    /// `ip -j route` printed something this crate cannot read.
    #[error("cannot read `ip -j route` output: {0}")]
    Routes(String),
}

pub(crate) trait Context<T> {
    fn bpf(self, what: impl Into<String>) -> Result<T, Error>;
}

impl<T> Context<T> for std::io::Result<T> {
    fn bpf(self, what: impl Into<String>) -> Result<T, Error> {
        self.map_err(|source| Error::Bpf {
            what: what.into(),
            source,
        })
    }
}
