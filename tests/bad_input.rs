//! Bad input through the CLI and straight to the API: each is refused with one line naming the
//! field, and the store is unchanged afterwards (same revision, same records).

mod support;

use flux::api::client::{Client, ClientError, Endpoint};
use support::etcd::Etcd;
use support::fluxd::Fluxd;

/// (fluxctl arguments, the field the error must name)
fn cli_cases() -> Vec<(Vec<String>, &'static str)> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let huge = "1".repeat(100_000);
    let long_name = "a".repeat(64);
    vec![
        (
            s(&["service", "add", "Web", "--address", "10.128.0.9:80"]),
            "name",
        ),
        (
            s(&["service", "add", "", "--address", "10.128.0.9:80"]),
            "name",
        ),
        (
            s(&["service", "add", "--address", "10.128.0.9:80", "--", "-web"]),
            "name",
        ),
        (
            s(&["service", "add", &long_name, "--address", "10.128.0.9:80"]),
            "name",
        ),
        (
            s(&["service", "add", "wéb", "--address", "10.128.0.9:80"]),
            "name",
        ),
        (
            s(&["service", "add", "x", "--address", "127.0.0.1:80"]),
            "address",
        ),
        (
            s(&["service", "add", "x", "--address", "0.0.0.0:80"]),
            "address",
        ),
        (
            s(&["service", "add", "x", "--address", "224.0.0.1:80"]),
            "address",
        ),
        (
            s(&["service", "add", "x", "--address", "255.255.255.255:80"]),
            "address",
        ),
        (
            s(&["service", "add", "x", "--address", "169.254.169.254:80"]),
            "address",
        ),
        (
            s(&["service", "add", "x", "--address", "10.128.0.9:0"]),
            "address",
        ),
        (
            s(&["service", "add", "x", "--address", "10.128.0.9:65536"]),
            "address",
        ),
        (
            s(&["service", "add", "x", "--address", "10.128.0.9"]),
            "address",
        ),
        (s(&["service", "add", "x", "--address", ""]), "address"),
        (s(&["service", "add", "x", "--address", &huge]), "address"),
        (
            s(&["service", "add", "x", "--address", "١٠.0.0.1:80"]),
            "address",
        ),
        (
            s(&[
                "service",
                "add",
                "x",
                "--address",
                "10.128.0.9:80",
                "--protocol",
                "sctp",
            ]),
            "protocol",
        ),
        (
            s(&[
                "service",
                "add",
                "x",
                "--address",
                "10.128.0.9:80",
                "--instance-port",
                "0",
            ]),
            "instance_port",
        ),
        (
            s(&[
                "service",
                "add",
                "x",
                "--address",
                "10.128.0.9:80",
                "--instance-port",
                "99999999999999999999",
            ]),
            "instance_port",
        ),
        (
            s(&[
                "service",
                "add",
                "x",
                "--address",
                "10.128.0.9:80",
                "--balance",
                "fastest",
            ]),
            "balance",
        ),
        // Clashes with the service the test starts with.
        (
            s(&["service", "add", "other", "--address", "10.128.0.1:80"]),
            "address",
        ),
        (
            s(&["service", "add", "web", "--address", "10.128.0.9:80"]),
            "name",
        ),
        (
            s(&["select", "nosuch", "v1", "--image", "nginx"]),
            "service",
        ),
        (s(&["select", "web", "V1", "--image", "nginx"]), "rule"),
        (s(&["select", "web", "v1"]), "selector"),
        (s(&["select", "web", "v1", "--labels", "tier"]), "labels"),
        (
            s(&["select", "web", "v1", "--labels", "a=1,,b=2"]),
            "labels",
        ),
        (s(&["select", "web", "v1", "--labels", "a=1,a=2"]), "labels"),
        (s(&["select", "web", "v1", "--env", "=x"]), "env"),
        (
            s(&["select", "web", "v1", "--labels", "a=\u{1b}[31m"]),
            "labels",
        ),
        (
            s(&[
                "select",
                "web",
                "v1",
                "--labels",
                &format!("a={}", "v".repeat(5000)),
            ]),
            "labels",
        ),
        (
            s(&["select", "web", "v1", "--image", "nginx:1.25"]),
            "image",
        ),
        (s(&["select", "web", "v1", "--image", "NGINX"]), "image"),
        (s(&["select", "web", "v1", "--tag", "bad tag"]), "tag"),
        (
            s(&[
                "select",
                "web",
                "v1",
                "--image",
                "nginx",
                "--instance-port",
                "x",
            ]),
            "instance_port",
        ),
        (
            s(&["instance", "add", "web", "i1", "--address", "nope"]),
            "address",
        ),
        (
            s(&["instance", "add", "web", "i1", "--address", "0.0.0.0:80"]),
            "address",
        ),
        (
            s(&[
                "instance",
                "add",
                "nosuch",
                "i1",
                "--address",
                "192.0.2.1:80",
            ]),
            "service",
        ),
        (
            s(&["instance", "add", "web", "I 1", "--address", "192.0.2.1:80"]),
            "name",
        ),
        (s(&["query", "--state", "sleeping"]), "state"),
        (s(&["query", "--format", "{{nope}}"]), "format"),
    ]
}

/// (method, path, body, the field the error must name)
fn api_cases() -> Vec<(&'static str, &'static str, Vec<u8>, &'static str)> {
    let b = |s: &str| s.as_bytes().to_vec();
    vec![
        ("POST", "/v1/services", b("not json"), "body"),
        ("POST", "/v1/services", b(""), "body"),
        ("POST", "/v1/services", vec![b'{'; 300_000], "body"),
        (
            "POST",
            "/v1/services",
            b(r#"{"name":"x","address":"10.128.0.9:80","extra":1}"#),
            "extra",
        ),
        (
            "POST",
            "/v1/services",
            b(r#"{"name":7,"address":"10.128.0.9:80"}"#),
            "name",
        ),
        ("POST", "/v1/services", b(r#"{"name":"x"}"#), "address"),
        (
            "POST",
            "/v1/services",
            b(r#"{"name":"x","address":"[::1]:80"}"#),
            "address",
        ),
        (
            "POST",
            "/v1/services",
            b(r#"{"name":"x","address":"10.128.0.9:80","protocol":"sctp"}"#),
            "protocol",
        ),
        (
            "POST",
            "/v1/services",
            b(r#"{"name":"x","address":"10.128.0.9:80","instance_port":70000}"#),
            "instance_port",
        ),
        (
            "POST",
            "/v1/services",
            b(r#"{"name":"x","address":"10.128.0.1:80"}"#),
            "address",
        ),
        (
            "PUT",
            "/v1/services/web/rules/v1",
            b(r#"{"service":"web","name":"v2","selector":{"image":"a"}}"#),
            "name",
        ),
        (
            "PUT",
            "/v1/services/web/rules/v1",
            b(r#"{"service":"web","name":"v1","selector":{"imag":"a"}}"#),
            "selector.imag",
        ),
        (
            "PUT",
            "/v1/services/web/rules/v1",
            b(r#"{"service":"web","name":"v1","selector":{"labels":{"a=b":"c"}}}"#),
            "labels",
        ),
        (
            "PUT",
            "/v1/services/nosuch/rules/v1",
            b(r#"{"service":"nosuch","name":"v1","selector":{"image":"a"}}"#),
            "service",
        ),
        (
            "POST",
            "/v1/services/web/instances",
            b(r#"{"service":"web","name":"i","origin":"container","address":"192.0.2.1:80"}"#),
            "origin",
        ),
        (
            "POST",
            "/v1/services/web/instances",
            b(r#"{"service":"web","name":"i","origin":"static"}"#),
            "address",
        ),
        ("GET", "/v1/instances?state=zombie", vec![], "state"),
        ("GET", "/v1/instances?colour=red", vec![], "colour"),
    ]
}

async fn store_fingerprint(client: &Client) -> (serde_json::Value, serde_json::Value) {
    (
        client.get("/v1/store").await.unwrap(),
        client.get("/v1/services").await.unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_changes_nothing_embedded() {
    let d = Fluxd::embedded();
    let client = Client::new(Endpoint::Unix(d.socket.clone()));
    d.ok(&["service", "add", "web", "--address", "10.128.0.1:80"]);
    d.ok(&["select", "web", "v1", "--image", "nginx"]);
    let before = store_fingerprint(&client).await;
    refuse_all(&d, &client).await;
    assert_eq!(
        before,
        store_fingerprint(&client).await,
        "the store changed"
    );
}

/// On etcd the check is literally byte for byte: etcd's own dump, header revision included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_changes_nothing_etcd() {
    let etcd = Etcd::start();
    let d = Fluxd::etcd(&etcd.endpoint, "h1", &[]);
    let client = Client::new(Endpoint::Unix(d.socket.clone()));
    d.ok(&["service", "add", "web", "--address", "10.128.0.1:80"]);
    d.ok(&["select", "web", "v1", "--image", "nginx"]);
    let dump = || etcd.ctl(&["get", "--prefix", "/flux/", "-w", "json"]);
    let before = dump();
    assert!(before.contains("revision"));
    refuse_all(&d, &client).await;
    assert_eq!(before, dump(), "etcd changed");
}

async fn refuse_all(d: &Fluxd, client: &Client) {
    let cases = cli_cases();
    assert!(cases.len() >= 20);
    for (args, field) in cases {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = tokio::task::block_in_place(|| d.ctl(&argv));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: not one line: {err}");
        assert!(
            err.starts_with(&format!("fluxctl: {field}: ")),
            "{args:?}: expected the error to name {field}: {err}"
        );
        assert!(err.len() < 400, "{args:?}: message too long: {err}");
    }

    for (method, path, body, field) in api_cases() {
        let result: Result<serde_json::Value, ClientError> = match method {
            "POST" => client.post(path, body).await,
            "PUT" => client.put(path, body).await,
            _ => client.get(path).await,
        };
        match result {
            Err(ClientError::Rejected { status, message }) => {
                assert!((400..500).contains(&status), "{method} {path}: {status}");
                assert!(
                    message.starts_with(&format!("{field}: ")),
                    "{method} {path}: expected the error to name {field}: {message}"
                );
                assert!(!message.contains('\n'), "{message}");
            }
            other => panic!("{method} {path}: expected a refusal, got {other:?}"),
        }
    }
}
