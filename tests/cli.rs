//! Issue 2 acceptance on the embedded store: real fluxd and fluxctl binaries, each test with its
//! own state directory and socket.

mod support;

use std::process::Command;

use support::fluxd::{fluxctl, Fluxd};

#[test]
fn service_survives_sigkill_and_restart() {
    let mut d = Fluxd::embedded();
    d.ok(&["service", "add", "web", "--address", "10.128.0.1:80"]);
    let list = d.ok(&["list"]);
    assert!(
        list.contains("web") && list.contains("10.128.0.1:80"),
        "{list}"
    );
    let info = d.json(&["info", "web"]);
    assert_eq!(info[0]["name"], "web");
    assert_eq!(info[0]["address"], "10.128.0.1:80");
    assert_eq!(info[0]["protocol"], "tcp");

    d.kill();
    d.start();
    let info = d.json(&["info", "web"]);
    assert_eq!(info[0]["address"], "10.128.0.1:80", "lost after SIGKILL");
    assert!(d.ok(&["list"]).contains("web"));
}

#[test]
fn select_and_deselect() {
    let d = Fluxd::embedded();
    d.ok(&["service", "add", "web", "--address", "10.128.0.1:80"]);
    d.ok(&[
        "select",
        "web",
        "v1",
        "--image",
        "nginx",
        "--tag",
        "1.25",
        "--labels",
        "tier=front",
    ]);
    let info = d.json(&["info", "web"]);
    let rule = &info[0]["rules"][0];
    assert_eq!(rule["name"], "v1");
    assert_eq!(rule["selector"]["image"], "nginx");
    assert_eq!(rule["selector"]["tag"], "1.25");
    assert_eq!(rule["selector"]["labels"]["tier"], "front");
    let text = d.ok(&["info", "web"]);
    assert!(
        text.contains("image=nginx tag=1.25 labels=tier=front"),
        "{text}"
    );

    d.ok(&["deselect", "web", "v1"]);
    let info = d.json(&["info", "web"]);
    assert_eq!(info[0]["rules"].as_array().unwrap().len(), 0);
    // Deselecting again names what is missing.
    let out = d.ctl(&["deselect", "web", "v1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("rule"));
}

#[test]
fn static_instances_and_query() {
    let d = Fluxd::embedded();
    d.ok(&["service", "add", "db", "--address", "10.128.0.2:5432"]);
    d.ok(&[
        "instance",
        "add",
        "db",
        "primary",
        "--address",
        "192.0.2.10:5432",
    ]);
    d.ok(&[
        "instance",
        "add",
        "db",
        "replica",
        "--address",
        "192.0.2.11:5432",
    ]);
    let q = d.json(&["query", "--service", "db"]);
    assert_eq!(q.as_array().unwrap().len(), 2);
    assert_eq!(q[0]["state"], "live");
    let quiet = d.ok(&["query", "--service", "db", "--quiet"]);
    assert_eq!(quiet, "primary\nreplica\n");
    let fmt = d.ok(&["query", "--format", "{{name}}={{address}}"]);
    assert_eq!(fmt, "primary=192.0.2.10:5432\nreplica=192.0.2.11:5432\n");
    let table = d.ok(&["query"]);
    assert!(table.starts_with("SERVICE"), "{table}");
    // Duplicate name is a conflict, not a silent replace.
    let out = d.ctl(&[
        "instance",
        "add",
        "db",
        "primary",
        "--address",
        "192.0.2.12:5432",
    ]);
    assert_eq!(out.status.code(), Some(2));
    d.ok(&["instance", "rm", "db", "replica"]);
    assert_eq!(d.ok(&["query", "--quiet"]), "primary\n");
    // Removing the service removes its instances and frees its VIP.
    d.ok(&["service", "rm", "db"]);
    assert_eq!(d.ok(&["query", "--quiet"]), "");
    d.ok(&["service", "add", "db2", "--address", "10.128.0.2:5432"]);
}

#[test]
fn unreachable_daemon_exits_1_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = fluxctl(&dir.path().join("nothing.sock"), &["list"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("cannot reach fluxd"), "{err}");
}

#[test]
fn second_daemon_on_same_socket_is_refused() {
    let d = Fluxd::embedded();
    let out = Command::new(env!("CARGO_BIN_EXE_fluxd"))
        .args(["run", "--no-dataplane", "--host-ip", "127.0.0.1"])
        .arg("--state-dir")
        .arg(d.dir.join("other-state"))
        .arg("--api")
        .arg(format!("unix://{}", d.socket.display()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already serving"));
    // The first one still answers.
    d.ok(&["list"]);
}

#[test]
fn socket_mode_is_0660() {
    use std::os::unix::fs::PermissionsExt;
    let d = Fluxd::embedded();
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
}

#[test]
fn clean_stop_removes_socket() {
    let mut d = Fluxd::embedded();
    d.stop();
    assert!(!d.socket.exists());
}

#[test]
fn version_names_the_build_of_fluxctl_and_of_fluxd() {
    let d = Fluxd::embedded();
    let text = d.ok(&["version"]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].starts_with("fluxctl 0."), "{text}");
    assert!(lines[1].starts_with("fluxd   0."), "{text}");
    let v = d.json(&["version"]);
    // The commit the binaries were built from: this checkout's, when it is one.
    let head = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    for who in ["fluxctl", "fluxd"] {
        assert_eq!(v[who]["version"], env!("CARGO_PKG_VERSION"), "{v}");
        assert_eq!(v[who]["commit"], head.as_str(), "{v}");
    }
    assert!(lines[0].contains(&format!("(build {head}")), "{text}");
    // Without a daemon: fluxctl still says what it is, and says why fluxd is missing.
    let gone = support::fluxd::fluxctl(&d.dir.join("nothing.sock"), &["version"]);
    assert_eq!(gone.status.code(), Some(0));
    let out = String::from_utf8_lossy(&gone.stdout);
    assert!(
        out.starts_with("fluxctl 0.") && out.lines().count() == 1,
        "{out}"
    );
    assert!(
        String::from_utf8_lossy(&gone.stderr).contains("fluxd"),
        "{gone:?}"
    );
}

#[test]
fn list_verbose_shows_each_services_rules() {
    let d = Fluxd::embedded();
    d.ok(&["service", "add", "web", "--address", "10.128.0.1:80"]);
    d.ok(&["service", "add", "db", "--address", "10.128.0.2:5432"]);
    d.ok(&["select", "web", "v1", "--image", "nginx", "--tag", "1.25"]);
    d.ok(&[
        "select",
        "web",
        "canary",
        "--labels",
        "track=canary",
        "--instance-port",
        "8080",
    ]);
    let plain = d.ok(&["list"]);
    assert!(!plain.contains("rule "), "{plain}");
    let verbose = d.ok(&["list", "-v"]);
    let lines: Vec<&str> = verbose.lines().collect();
    let web = lines.iter().position(|l| l.starts_with("web ")).unwrap();
    let db = lines.iter().position(|l| l.starts_with("db ")).unwrap();
    // Each rule under its own service's row, nothing under a service without rules.
    assert_eq!(
        lines[web + 1..web + 3],
        [
            "  rule canary: labels=track=canary instance-port=8080",
            "  rule v1: image=nginx tag=1.25",
        ],
        "{verbose}"
    );
    assert!(
        db + 1 == lines.len() || !lines[db + 1].starts_with("  rule"),
        "{verbose}"
    );
    assert_eq!(d.ok(&["service", "list", "--verbose"]), verbose);
}
