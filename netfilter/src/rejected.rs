//! What rendering left out: one bad entry is skipped and reported, never blocking the rest.

use std::fmt;
use std::net::SocketAddrV4;

use crate::desired::Redirect;

/// Part of the desired state that [`crate::render`] refused to turn into a rule. One bad entry is
/// skipped and reported instead of blocking every other service's routing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejected {
    /// A redirect that was not rendered.
    Redirect {
        /// The redirect as given.
        redirect: Redirect,
        /// Why, for the operator.
        reason: String,
    },
    /// A refusal of a service with no instance ([`crate::Desired::rejects`]) that was not rendered.
    Refusal {
        /// The entry as given.
        redirect: Redirect,
        /// Why, for the operator.
        reason: String,
    },
    /// A kernel-forwarded service ([`crate::Desired::forwards`]) that got no rule.
    Forward {
        /// The service as given.
        service: String,
        /// Its VIP.
        vip: SocketAddrV4,
        /// Why, for the operator.
        reason: String,
    },
    /// One destination of a kernel-forwarded service that got no rule (the others did).
    Destination {
        /// The service.
        service: String,
        /// The instance as given.
        instance: String,
        /// Its address.
        addr: SocketAddrV4,
        /// Why, for the operator.
        reason: String,
    },
    /// A bridge interface that got no hook.
    BridgeInterface {
        /// The name as given.
        name: String,
        /// Why, for the operator.
        reason: String,
    },
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejected::Redirect { redirect, reason } => write!(
                f,
                "redirect of {} for service {:?} skipped: {reason}",
                redirect.vip, redirect.service
            ),
            Rejected::Refusal { redirect, reason } => write!(
                f,
                "refusal of {} for service {:?} (no instance) skipped: {reason}",
                redirect.vip, redirect.service
            ),
            Rejected::Forward {
                service,
                vip,
                reason,
            } => write!(
                f,
                "kernel forwarding of {vip} for service {service:?} skipped: {reason}"
            ),
            Rejected::Destination {
                service,
                instance,
                addr,
                reason,
            } => write!(
                f,
                "kernel forwarding of service {service:?} to instance {instance:?} at {addr} skipped: {reason}"
            ),
            Rejected::BridgeInterface { name, reason } => {
                write!(f, "bridge interface {name:?} skipped: {reason}")
            }
        }
    }
}
