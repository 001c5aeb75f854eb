//! The Docker source: containers become instances of the services whose rules select them.

pub mod address;
pub mod agent;
pub mod container;
pub mod image;
pub mod matching;

pub use agent::{Agent, AgentConfig, LocalInstances};
