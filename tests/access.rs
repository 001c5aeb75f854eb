//! Access control (issue 9): the local API socket is for root and the API group only; the
//! remote API needs TLS and a bearer token; fluxd reaches etcd over TLS with a client
//! certificate and as an etcd user.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use support::etcd::{free_port, Etcd, TlsFiles};
use support::fluxd::Fluxd;

/// A group made for one test (a name no install script uses), removed when dropped.
struct TestGroup {
    name: String,
    gid: u32,
}

impl TestGroup {
    fn create() -> TestGroup {
        let name = format!("fluxt{}", std::process::id());
        let out = Command::new("groupadd").arg(&name).output().unwrap();
        assert!(
            out.status.success(),
            "groupadd {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let gid = nix::unistd::Group::from_name(&name)
            .unwrap()
            .expect("group just created")
            .gid
            .as_raw();
        TestGroup { name, gid }
    }
}

impl Drop for TestGroup {
    fn drop(&mut self) {
        let _ = Command::new("groupdel").arg(&self.name).status();
    }
}

/// fluxctl as user `nobody`, in no group but `groups` (setpriv drops root's).
fn fluxctl_as_nobody(socket: &Path, groups: Option<u32>, args: &[&str]) -> Output {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=nobody", "--regid=nogroup"]);
    match groups {
        Some(g) => c.arg(format!("--groups={g}")),
        None => c.arg("--clear-groups"),
    };
    c.arg(env!("CARGO_BIN_EXE_fluxctl"))
        .arg("--api")
        .arg(format!("unix://{}", socket.display()))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn one_line(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err:?}");
    err.trim_end().to_string()
}

fn services(d: &Fluxd) -> Vec<String> {
    d.json(&["list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn socket_is_for_root_and_the_api_group() {
    let group = TestGroup::create();
    let tmp = tempfile::tempdir().unwrap();
    // `nobody` must reach the socket through its directory: only the socket's mode decides.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut d = Fluxd::new(
        tmp.path().to_path_buf(),
        "h1",
        &["--api-group", &group.name],
    );
    d.start();
    let meta = std::fs::metadata(&d.socket).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660, "socket mode");
    assert_eq!(meta.gid(), group.gid, "socket group");
    assert_eq!(meta.uid(), 0, "socket owner");

    let add = ["service", "add", "web", "--address", "10.128.0.1:80"];
    let out = fluxctl_as_nobody(&d.socket, None, &add);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let line = one_line(&out);
    let want = format!(
        "fluxctl: permission denied: the API socket {} is for root and group {}",
        d.socket.display(),
        group.name
    );
    assert!(line.starts_with(&want), "{line}");
    assert!(services(&d).is_empty(), "a refused user changed something");

    let out = fluxctl_as_nobody(&d.socket, Some(group.gid), &add);
    assert!(
        out.status.success(),
        "member of the group: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(services(&d), vec!["web"]);
    d.stop();
}

/// A CA, and a certificate it signed for `127.0.0.1` and `localhost` that serves both as
/// server and as client certificate; PEM files in `dir`.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn make_pki(dir: &Path, tag: &str, cn: &str) -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("flux test CA {tag}"));
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let mut params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let pki = Pki {
        ca: dir.join(format!("{tag}-ca.pem")),
        cert: dir.join(format!("{tag}-cert.pem")),
        key: dir.join(format!("{tag}-key.pem")),
    };
    std::fs::write(&pki.ca, ca.pem()).unwrap();
    std::fs::write(&pki.cert, cert.pem()).unwrap();
    std::fs::write(&pki.key, key.serialize_pem()).unwrap();
    pki
}

fn fluxctl_remote(api: &str, ca: &Path, token: Option<&str>, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fluxctl"));
    c.arg("--api").arg(api).arg("--ca-file").arg(ca);
    c.env_remove("FLUX_TOKEN").env_remove("FLUX_TOKEN_FILE");
    if let Some(t) = token {
        c.env("FLUX_TOKEN", t);
    }
    c.args(args).stdin(Stdio::null()).output().unwrap()
}

#[test]
fn remote_api_needs_tls_and_the_token() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = make_pki(tmp.path(), "api", "fluxd");
    let token = "s3cret-token-0123456789";
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let (cert, key, tok) = (
        pki.cert.display().to_string(),
        pki.key.display().to_string(),
        token_file.display().to_string(),
    );
    let state = tmp.path().join("d");
    std::fs::create_dir(&state).unwrap();
    let mut d = Fluxd::new(
        state,
        "h1",
        &[
            "--api-listen",
            &listen,
            "--api-cert-file",
            &cert,
            "--api-key-file",
            &key,
            "--api-token-file",
            &tok,
        ],
    );
    d.start();
    let api = format!("https://{listen}");
    let add = |name: &str, vip: &str| -> Vec<String> {
        ["service", "add", name, "--address", vip]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    fn args(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }

    // The right token, the right CA: full access, by name or by IP.
    let a = add("web", "10.128.0.1:80");
    let out = fluxctl_remote(&api, &pki.ca, Some(token), &args(&a));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut c = Command::new(env!("CARGO_BIN_EXE_fluxctl"));
    let out = c
        .args(["--api", &format!("https://localhost:{port}"), "--ca-file"])
        .arg(&pki.ca)
        .arg("--token-file")
        .arg(&token_file)
        .args(["--json", "list"])
        .env_remove("FLUX_TOKEN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"web\""));

    // No token, a wrong one, one of the wrong length: 401, one line, nothing changed.
    let b = add("other", "10.128.0.2:80");
    for t in [None, Some("s3cret-token-0123456788"), Some("s3cret")] {
        let out = fluxctl_remote(&api, &pki.ca, t, &args(&b));
        assert_eq!(out.status.code(), Some(1), "token {t:?}: {out:?}");
        let line = one_line(&out);
        assert!(line.contains("unauthorized"), "{line}");
    }
    // Plain HTTP to the TLS listener: no answer at all.
    let out = support::fluxd::fluxctl_api(&format!("http://{listen}"), &args(&b));
    assert!(!out.status.success(), "plain http was answered");
    one_line(&out);
    // A CA that did not sign fluxd's certificate: the client refuses the server.
    let other = make_pki(tmp.path(), "other", "other");
    let out = fluxctl_remote(&api, &other.ca, Some(token), &args(&b));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(one_line(&out).contains("TLS"), "{out:?}");
    assert_eq!(services(&d), vec!["web"]);

    // fluxd debug and fluxd edge take the same flags to the remote API.
    let fluxd = |args: &[&str], token: Option<&Path>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_fluxd"));
        c.args(args).args(["--api", &api, "--ca-file"]).arg(&pki.ca);
        c.env_remove("FLUX_TOKEN").env_remove("FLUX_TOKEN_FILE");
        if let Some(t) = token {
            c.arg("--token-file").arg(t);
        }
        c.stdin(Stdio::null()).output().unwrap()
    };
    let out = fluxd(&["debug", "--json"], Some(&token_file));
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\"drift\""),
        "{out:?}"
    );
    let out = fluxd(&["debug"], None);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(one_line(&out).contains("unauthorized"), "{out:?}");
    let conf = tmp.path().join("edge.conf");
    let edge = |token| {
        let c = conf.display().to_string();
        let args = [
            "edge",
            "--once",
            "--service",
            "web=:8080",
            "--nginx-conf",
            &c,
            "--test-cmd",
            "true",
            "--reload-cmd",
            "true",
        ];
        fluxd(&args, token)
    };
    let out = edge(Some(&token_file));
    assert!(out.status.success(), "{out:?}");
    assert!(std::fs::read_to_string(&conf)
        .unwrap()
        .contains("upstream flux_web"));
    std::fs::remove_file(&conf).unwrap();
    let out = edge(None);
    assert!(!out.status.success(), "edge without a token: {out:?}");
    assert!(!conf.exists(), "edge wrote a file without access");
    d.stop();
}

/// Starts fluxd on the TLS etcd with `extra` flags; returns it unstarted-or-started by `start`.
fn fluxd_on(etcd: &Etcd, dir: &Path, host: &str, extra: &[String]) -> Fluxd {
    let store = format!("etcd://127.0.0.1:{}", etcd.client_port);
    let mut args = vec!["--store".to_string(), store];
    args.extend_from_slice(extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = dir.join("hosts").join(host);
    std::fs::create_dir_all(&d).unwrap();
    Fluxd::new(d, host, &args)
}

/// fluxd's last line on stderr when it refused to start.
fn refusal(d: &mut Fluxd) -> String {
    d.spawn();
    let status = d
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("fluxd did not exit: {}", d.log()));
    assert!(!status.success());
    let log = d.log();
    let last = log.trim_end().lines().last().unwrap_or("").to_string();
    assert!(last.starts_with("fluxd: "), "{log}");
    last
}

#[test]
fn etcd_with_tls_client_certificates_and_auth() {
    let tmp = tempfile::tempdir().unwrap();
    let server = make_pki(tmp.path(), "etcd", "etcd");
    // The client certificate's CN names no etcd user: only the password grants access.
    let client_cert = tmp.path().join("client-cert.pem");
    let client_key = tmp.path().join("client-key.pem");
    std::fs::copy(&server.cert, &client_cert).unwrap();
    std::fs::copy(&server.key, &client_key).unwrap();
    let mut etcd = Etcd::start_tls(TlsFiles {
        ca: server.ca.clone(),
        server_cert: server.cert.clone(),
        server_key: server.key.clone(),
        client_cert: client_cert.clone(),
        client_key: client_key.clone(),
    });
    etcd.enable_auth("rootpw", "flux", "fluxpw", "/flux/");
    let pw = tmp.path().join("pw");
    std::fs::write(&pw, "fluxpw\n").unwrap();
    let bad_pw = tmp.path().join("bad-pw");
    std::fs::write(&bad_pw, "nope\n").unwrap();
    let s = |p: &Path| p.display().to_string();
    let tls = vec![
        "--etcd-ca-file".to_string(),
        s(&server.ca),
        "--etcd-cert-file".into(),
        s(&client_cert),
        "--etcd-key-file".into(),
        s(&client_key),
    ];
    let user = |pw: &Path| {
        vec![
            "--etcd-user".to_string(),
            "flux".into(),
            "--etcd-password-file".into(),
            s(pw),
        ]
    };
    let with = |a: &[String], b: &[String]| [a, b].concat();

    // Everything right: two hosts, one adds, the other sees it (watch), etcd holds it.
    let mut h1 = fluxd_on(&etcd, tmp.path(), "h1", &with(&tls, &user(&pw)));
    h1.start();
    let mut h2 = fluxd_on(&etcd, tmp.path(), "h2", &with(&tls, &user(&pw)));
    h2.start();
    h1.ok(&["service", "add", "web", "--address", "10.128.0.1:80"]);
    assert_eq!(services(&h1), vec!["web"]);
    let seen = support::fluxd::wait_until(Duration::from_secs(10), || {
        services(&h2) == vec!["web".to_string()]
    });
    assert!(seen.is_some(), "h2 never saw web: {}", h2.log());
    assert!(etcd
        .ctl(&["get", "--prefix", "/flux/services/", "--keys-only"])
        .contains("/flux/services/web"));

    // etcd restarts and forgets every token it gave out: both hosts log in again by themselves
    // (a write through h1's API, and h2's watch and lease), no fluxd restart.
    etcd.restart();
    h1.ok(&["service", "add", "api", "--address", "10.128.0.2:80"]);
    let seen = support::fluxd::wait_until(Duration::from_secs(15), || {
        services(&h2) == vec!["api".to_string(), "web".to_string()]
    });
    assert!(
        seen.is_some(),
        "h2 never saw api after etcd's restart: {}",
        h2.log()
    );
    for h in [&h1, &h2] {
        assert!(h.log().contains("logged in to etcd again"), "{}", h.log());
    }
    let hosts = etcd.ctl(&["get", "--prefix", "/flux/hosts/", "--keys-only"]);
    assert!(
        hosts.contains("h1") && hosts.contains("h2"),
        "host records: {hosts}"
    );

    // A wrong password: fluxd refuses to start, in one line.
    let mut bad = fluxd_on(&etcd, tmp.path(), "bad-pw", &with(&tls, &user(&bad_pw)));
    let line = refusal(&mut bad);
    assert!(line.contains("authentication failed"), "{line}");
    eprintln!("wrong password: {line}");

    // No client certificate: refused by etcd's TLS, in one line.
    let ca_only = vec!["--etcd-ca-file".to_string(), s(&server.ca)];
    let mut no_cert = fluxd_on(&etcd, tmp.path(), "no-cert", &with(&ca_only, &user(&pw)));
    let line = refusal(&mut no_cert);
    assert!(line.contains("store: cannot connect to etcd"), "{line}");
    assert!(line.contains("--etcd-cert-file"), "{line}");
    eprintln!("no client certificate: {line}");

    // Plain http to the TLS etcd: refused too.
    let mut plain = fluxd_on(&etcd, tmp.path(), "plain", &user(&pw));
    let line = refusal(&mut plain);
    assert!(line.contains("store: cannot connect to etcd"), "{line}");
    assert!(line.contains("--etcd-ca-file"), "{line}");
    eprintln!("plain http: {line}");

    h2.stop();
    h1.stop();
}
