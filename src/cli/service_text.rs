//! The per-service settings that only some services have (time limits, PROXY protocol), as
//! `fluxctl info`, `list -v` and `service set` print them: nothing for services without any,
//! so their output reads as it always did.

use crate::model::Service;

/// `proxy-protocol v2; timeouts: connect 500ms` or empty.
pub fn tuning(svc: &Service) -> String {
    let mut parts = Vec::new();
    if let Some(p) = svc.proxy_protocol {
        parts.push(format!("proxy-protocol {p}"));
    }
    if !svc.timeouts.is_empty() {
        parts.push(format!("timeouts: {}", svc.timeouts.describe()));
    }
    if let Some(p) = svc.instance_protocol {
        parts.push(format!("instance-protocol {p}"));
    }
    parts.join("; ")
}

/// What `service set` reports: the service's settings on one line.
pub fn service_line(svc: &Service) -> String {
    let mut line = format!(
        "address {}  protocol {}  instance-port {}  balance {}  health {}  forward {}",
        svc.address_text(),
        svc.protocol,
        svc.default_instance_port(),
        svc.balance,
        svc.health
            .as_ref()
            .map(|h| h.spec())
            .unwrap_or_else(|| "none".into()),
        svc.forward,
    );
    let t = tuning(svc);
    if !t.is_empty() {
        line.push_str("  ");
        line.push_str(&t);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_services_with_settings_show_them() {
        let plain: Service =
            crate::model::decode(br#"{"name":"web","address":"198.18.0.1:80"}"#).unwrap();
        assert_eq!(tuning(&plain), "");
        assert!(!service_line(&plain).contains("proxy-protocol"));
        let tuned: Service = crate::model::decode(
            br#"{"name":"db","address":"198.18.0.2:5432","proxy_protocol":"v1","timeouts":{"connect_ms":300,"half_close_ms":5000}}"#,
        )
        .unwrap();
        assert_eq!(
            tuning(&tuned),
            "proxy-protocol v1; timeouts: connect 300ms, half-close 5000ms"
        );
        assert!(service_line(&tuned).ends_with(&tuning(&tuned)));
    }
}
