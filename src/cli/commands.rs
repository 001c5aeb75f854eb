//! fluxctl's commands other than `query`: each turns its checked flags into one API request
//! and prints the answer (text for people, `--json` for scripts).

use super::args::{SelectArgs, ServiceAddArgs};
use std::time::SystemTime;

use super::output::{hosts_text, info_text, list_text, selector};
use super::{body, print, Failure};
use crate::api::client::Client;
use crate::api::views::{HostView, InstanceView, ServiceInfo};
use crate::model::{validate, Instance, Rule, Validate};
use crate::version::Build;

pub(super) async fn service_add(
    client: &Client,
    json: bool,
    args: &ServiceAddArgs,
) -> Result<(), Failure> {
    let service = args.to_service()?;
    let info: ServiceInfo = client.post("/v1/services", body(&service)).await?;
    print(json, &info, || {
        format!(
            "added service {} at {}\n",
            info.service.name,
            info.service.address_text()
        )
    });
    Ok(())
}

pub(super) async fn service_rm(
    client: &Client,
    json: bool,
    names: Vec<String>,
    all: bool,
) -> Result<(), Failure> {
    let names = if all {
        let all: Vec<ServiceInfo> = client.get("/v1/services").await?;
        all.into_iter().map(|s| s.service.name).collect()
    } else if names.is_empty() {
        return Err(Failure::Usage(
            "service rm: give service names or --all".into(),
        ));
    } else {
        for n in &names {
            validate::name("name", n)?;
        }
        names
    };
    let mut removed = Vec::new();
    for n in &names {
        let _: serde_json::Value = client.delete(&format!("/v1/services/{n}")).await?;
        removed.push(n.clone());
    }
    print(json, &serde_json::json!({ "removed": removed }), || {
        removed
            .iter()
            .map(|n| format!("removed service {n}\n"))
            .collect()
    });
    Ok(())
}

pub(super) async fn list(client: &Client, json: bool, verbose: bool) -> Result<(), Failure> {
    let services: Vec<ServiceInfo> = client.get("/v1/services").await?;
    print(json, &services, || list_text(&services, verbose));
    Ok(())
}

pub(super) async fn hosts(client: &Client, json: bool) -> Result<(), Failure> {
    let hosts: Vec<HostView> = client.get("/v1/hosts").await?;
    print(json, &hosts, || hosts_text(&hosts, SystemTime::now()));
    Ok(())
}

/// fluxctl's own build always; fluxd's when it answers. An unreachable fluxd is said on stderr
/// and is no failure: the command's first job is to say what this fluxctl is.
pub(super) async fn version(client: &Client, json: bool) -> Result<(), Failure> {
    let daemon = match client.get::<serde_json::Value>("/v1/host").await {
        Ok(host) => serde_json::from_value::<Build>(host["build"].clone()).ok(),
        Err(e) => {
            eprintln!("fluxctl: fluxd: {e}");
            None
        }
    };
    let client_build = Build::this();
    print(
        json,
        &serde_json::json!({ "fluxctl": client_build, "fluxd": daemon }),
        || {
            let mut out = format!("fluxctl {client_build}\n");
            if let Some(d) = &daemon {
                out.push_str(&format!("fluxd   {d}\n"));
            }
            out
        },
    );
    Ok(())
}

/// `--json` stays the list of services it always was (scripts read it); the hosts are in
/// `fluxctl hosts --json`.
pub(super) async fn info(client: &Client, json: bool, name: Option<String>) -> Result<(), Failure> {
    let (services, hosts): (Vec<ServiceInfo>, Vec<HostView>) = match name {
        Some(n) => {
            validate::name("service", &n)?;
            (
                vec![client.get(&format!("/v1/services/{n}")).await?],
                vec![],
            )
        }
        None if json => (client.get("/v1/services").await?, vec![]),
        None => (
            client.get("/v1/services").await?,
            client.get("/v1/hosts").await?,
        ),
    };
    print(json, &services, || {
        let mut out = String::new();
        if !hosts.is_empty() {
            out.push_str(&hosts_text(&hosts, SystemTime::now()));
            out.push('\n');
        }
        out.push_str(
            &services
                .iter()
                .map(info_text)
                .collect::<Vec<_>>()
                .join("\n"),
        );
        out
    });
    Ok(())
}

pub(super) async fn select(client: &Client, json: bool, args: &SelectArgs) -> Result<(), Failure> {
    let rule = args.to_rule()?;
    let stored: Rule = client
        .put(
            &format!("/v1/services/{}/rules/{}", rule.service, rule.name),
            body(&rule),
        )
        .await?;
    print(json, &stored, || {
        format!(
            "selected {} for {}: {}\n",
            stored.name,
            stored.service,
            selector(&stored.selector)
        )
    });
    Ok(())
}

pub(super) async fn deselect(
    client: &Client,
    json: bool,
    service: &str,
    rule: &str,
) -> Result<(), Failure> {
    validate::name("service", service)?;
    validate::name("rule", rule)?;
    let _: serde_json::Value = client
        .delete(&format!("/v1/services/{service}/rules/{rule}"))
        .await?;
    print(json, &serde_json::json!({ "removed": rule }), || {
        format!("deselected {rule} from {service}\n")
    });
    Ok(())
}

pub(super) async fn instance_add(
    client: &Client,
    json: bool,
    service: &str,
    name: &str,
    address: &str,
) -> Result<(), Failure> {
    let instance = Instance::new_static(
        service,
        name,
        validate::parse_socket_addr("address", address)?,
    );
    instance.validate()?;
    let view: InstanceView = client
        .post(
            &format!("/v1/services/{service}/instances"),
            body(&instance),
        )
        .await?;
    print(json, &view, || {
        format!("added instance {name} of {service} at {address}\n")
    });
    Ok(())
}

pub(super) async fn instance_rm(
    client: &Client,
    json: bool,
    service: &str,
    name: &str,
) -> Result<(), Failure> {
    validate::name("service", service)?;
    validate::name("name", name)?;
    let _: serde_json::Value = client
        .delete(&format!("/v1/services/{service}/instances/{name}"))
        .await?;
    print(json, &serde_json::json!({ "removed": name }), || {
        format!("removed instance {name} of {service}\n")
    });
    Ok(())
}

/// `instance drain` (`drain`) or `instance undrain`.
pub(super) async fn instance_drain(
    client: &Client,
    json: bool,
    service: &str,
    name: &str,
    drain: bool,
) -> Result<(), Failure> {
    validate::name("service", service)?;
    validate::name("instance", name)?;
    let path = format!("/v1/services/{service}/instances/{name}/drain");
    let _: serde_json::Value = if drain {
        client.put(&path, body(&serde_json::json!({}))).await?
    } else {
        client.delete(&path).await?
    };
    let done = if drain { "drained" } else { "undrained" };
    print(
        json,
        &serde_json::json!({ "service": service, "instance": name, "drained": drain }),
        || format!("{done} instance {name} of {service}\n"),
    );
    Ok(())
}
