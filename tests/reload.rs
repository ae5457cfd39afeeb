//! Live reload: from the file (in place and by ConfigMap-style symlink
//! swap), refused when invalid (the old config stays), breaker state kept,
//! listeners added and removed without dropping the others' connections,
//! in-flight requests finished on the old stacks.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use breakwater::sidecar::watch::WatchOptions;
use breakwater::sidecar::{self, ReloadStatus, Sidecar};
use http::{Method, Request, StatusCode};
use support::*;

/// Writes a policy file with free admin and proxy ports.
fn policy(yaml: &str) -> String {
    format!("admin: {{listen: 127.0.0.1:0}}\nproxy: {{listen: 127.0.0.1:0}}\n{yaml}")
}

/// Starts a sidecar that follows `path`, checking it every 10 ms.
async fn watching(path: &Path) -> Sidecar {
    let config = breakwater::config::load(path).unwrap();
    let options = sidecar::Options {
        watch: Some(WatchOptions {
            path: path.to_owned(),
            interval: Duration::from_millis(10),
        }),
        ..sidecar::Options::default()
    };
    sidecar::start(config, options).await.unwrap()
}

/// Waits until the reload status satisfies `done`.
async fn reloaded(sidecar: &Sidecar, done: impl Fn(&ReloadStatus) -> bool) -> ReloadStatus {
    let mut reloads = sidecar.reloads();
    tokio::time::timeout(Duration::from_secs(10), reloads.wait_for(|s| done(s)))
        .await
        .expect("the reload happens")
        .unwrap()
        .clone()
}

fn write(path: &Path, text: &str) {
    // Written to a side file and renamed over, as editors and config
    // tools do, so that the watcher never reads half a file.
    let side = path.with_extension("tmp");
    std::fs::write(&side, text).unwrap();
    std::fs::rename(&side, path).unwrap();
}

async fn status_of(sidecar: &Sidecar, host: &str) -> StatusCode {
    call(sidecar.proxy_addr, host, Method::GET, "/", "")
        .await
        .0
        .status
}

#[tokio::test]
async fn a_changed_file_is_reloaded_and_an_invalid_one_refused() {
    let upstream = HttpUpstream::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policies.yaml");
    write(
        &path,
        &policy(&format!(
            "upstreams:\n  a: {{address: '{}'}}\n",
            upstream.addr
        )),
    );
    let sidecar = watching(&path).await;
    assert_eq!(status_of(&sidecar, "b").await, StatusCode::NOT_FOUND);

    write(
        &path,
        &policy(&format!(
            "upstreams:\n  a: {{address: '{0}'}}\n  b: {{address: '{0}'}}\n",
            upstream.addr
        )),
    );
    reloaded(&sidecar, |s| s.generation == 2).await;
    assert_eq!(status_of(&sidecar, "b").await, StatusCode::OK);
    let admin = sidecar.admin_addr;
    assert_eq!(
        metric_value(admin, "breakwater_config_generation").await,
        2.0
    );
    assert_eq!(
        metric_value(admin, "breakwater_config_reloads_total").await,
        1.0
    );
    let config = admin_json(admin, "/config").await;
    assert_eq!(config["upstreams"][1]["name"], "b");

    // An invalid file is refused with its positioned error; b still works.
    write(&path, &policy("upstreams:\n  a: {address: 'nowhere'}\n"));
    let status = reloaded(&sidecar, |s| s.failures == 1).await;
    let error = status.last_error.unwrap();
    assert!(
        error.contains("policies.yaml:4:16: upstreams.a.address: address \"nowhere\" has no port"),
        "{error}"
    );
    assert_eq!(status.generation, 2);
    assert_eq!(status_of(&sidecar, "b").await, StatusCode::OK);
    assert_eq!(
        metric_value(admin, "breakwater_config_reload_failures_total").await,
        1.0
    );
    assert_eq!(
        metric_value(admin, "breakwater_config_generation").await,
        2.0
    );
}

/// Kubernetes mounts a ConfigMap as `<key> -> ..data/<key>` with
/// `..data -> ..<timestamp>`, and updates it by swapping `..data`.
#[tokio::test]
async fn a_configmap_symlink_swap_is_followed() {
    use std::os::unix::fs::symlink;
    let upstream = HttpUpstream::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let version = |name: &str, yaml: &str| -> PathBuf {
        let versioned = dir.path().join(name);
        std::fs::create_dir(&versioned).unwrap();
        std::fs::write(versioned.join("policies.yaml"), policy(yaml)).unwrap();
        versioned
    };
    let first = version(
        "..2026_11_28_08_00_00.1",
        &format!("upstreams:\n  a: {{address: '{}'}}\n", upstream.addr),
    );
    symlink(first.file_name().unwrap(), dir.path().join("..data")).unwrap();
    let path = dir.path().join("policies.yaml");
    symlink("..data/policies.yaml", &path).unwrap();
    let sidecar = watching(&path).await;
    assert_eq!(status_of(&sidecar, "a").await, StatusCode::OK);

    let second = version(
        "..2026_11_28_08_05_00.2",
        &format!("upstreams:\n  renamed: {{address: '{}'}}\n", upstream.addr),
    );
    symlink(second.file_name().unwrap(), dir.path().join("..data_tmp")).unwrap();
    std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
    std::fs::remove_dir_all(&first).unwrap();

    reloaded(&sidecar, |s| s.generation == 2).await;
    assert_eq!(status_of(&sidecar, "renamed").await, StatusCode::OK);
    assert_eq!(status_of(&sidecar, "a").await, StatusCode::NOT_FOUND);
}

fn parse(yaml: &str) -> breakwater::config::Config {
    breakwater::config::parse("reload.yaml", &policy(yaml)).unwrap()
}

#[tokio::test]
async fn breaker_state_survives_a_reload_that_keeps_the_policy() {
    let upstream = HttpUpstream::echo().await;
    let yaml = |hosts: &str, attempts: u32| {
        format!(
            "upstreams:\n  a: {{address: '{}', hosts: [{hosts}], retry: {{max_attempts: {attempts}}}}}\n",
            upstream.addr
        )
    };
    let sidecar = sidecar(&yaml("", 2)).await;
    let (parts, _) = admin(sidecar.admin_addr, Method::POST, "/circuits/a/open", "").await;
    assert_eq!(parts.status, StatusCode::OK);

    // Routing changed, the policy did not: the circuit stays open.
    sidecar.reload(parse(&yaml("a.internal", 2))).await.unwrap();
    let (parts, _) = call(sidecar.proxy_addr, "a.internal", Method::GET, "/", "").await;
    assert_eq!(parts.headers["x-breakwater-error"], "circuit-open");
    assert_eq!(
        metric_value(
            sidecar.admin_addr,
            "breakwater_circuit_state{upstream=\"a\"}"
        )
        .await,
        1.0
    );

    // The policy changed: a new stack, its circuit closed.
    sidecar.reload(parse(&yaml("a.internal", 3))).await.unwrap();
    assert_eq!(status_of(&sidecar, "a.internal").await, StatusCode::OK);
    assert_eq!(
        metric_value(
            sidecar.admin_addr,
            "breakwater_circuit_state{upstream=\"a\"}"
        )
        .await,
        0.0
    );
    assert_eq!(upstream.requests(), 1);
}

#[tokio::test]
async fn listeners_come_and_go_without_dropping_the_others() {
    let upstream = HttpUpstream::echo().await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  a: {{address: '{0}', listen: 127.0.0.1:0}}\n",
        upstream.addr
    ))
    .await;
    let old_port = sidecar.upstream_addrs["a"];
    // A kept-alive connection on the shared port, and one on a's port.
    let mut shared = h1_connect(sidecar.proxy_addr).await;
    let mut dedicated = h1_connect(old_port).await;
    let get = |host: &str| {
        Request::get("/")
            .header("host", host)
            .body(breakwater::body::empty())
            .unwrap()
    };
    assert_eq!(
        shared.send_request(get("a")).await.unwrap().status(),
        StatusCode::OK
    );

    // b gets a port; a loses its own.
    sidecar
        .reload(parse(&format!(
            "upstreams:\n  a: {{address: '{0}'}}\n  b: {{address: '{0}', listen: 127.0.0.1:0}}\n",
            upstream.addr
        )))
        .await
        .unwrap();
    let listeners = sidecar.listener_addrs().await;
    let b_port = listeners["upstream b"];
    assert!(!listeners.contains_key("upstream a"));
    assert_eq!(listeners["proxy"], sidecar.proxy_addr);
    let (parts, _) = call(b_port, "anything", Method::GET, "/", "").await;
    assert_eq!(parts.status, StatusCode::OK);

    // The shared port's connection was not dropped.
    assert_eq!(
        shared.send_request(get("b")).await.unwrap().status(),
        StatusCode::OK
    );
    // a's old port refuses new connections; its idle connection was closed.
    assert!(tokio::net::TcpStream::connect(old_port).await.is_err());
    assert!(dedicated.send_request(get("a")).await.is_err());
}

#[tokio::test]
async fn in_flight_requests_finish_on_the_old_generation() {
    let (upstream, arrived, release) = gated().await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  a: {{address: '{}'}}\n",
        upstream.addr
    ))
    .await;
    let proxy = sidecar.proxy_addr;
    let first = tokio::spawn(async move { call(proxy, "a", Method::GET, "/", "").await });
    arrived.notified().await;
    sidecar.reload(parse("upstreams: {}\n")).await.unwrap();
    assert_eq!(status_of(&sidecar, "a").await, StatusCode::NOT_FOUND);
    release.notify_one();
    let (parts, body) = first.await.unwrap();
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(body, "done");
}

#[tokio::test]
async fn a_port_that_cannot_be_bound_refuses_the_reload() {
    let upstream = HttpUpstream::echo().await;
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sidecar = sidecar(&format!(
        "upstreams:\n  a: {{address: '{}'}}\n",
        upstream.addr
    ))
    .await;
    let error = sidecar
        .reload(parse(&format!(
            "upstreams:\n  a: {{address: '{0}'}}\n  b: {{address: '{0}', listen: '{1}'}}\n",
            upstream.addr,
            taken.local_addr().unwrap()
        )))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("for upstream b"), "{error}");
    let status = sidecar.reloads().borrow().clone();
    assert_eq!((status.generation, status.failures), (1, 1));
    assert_eq!(status_of(&sidecar, "a").await, StatusCode::OK);
    assert_eq!(status_of(&sidecar, "b").await, StatusCode::NOT_FOUND);
    assert!(!sidecar.listener_addrs().await.contains_key("upstream b"));
}

#[tokio::test]
async fn a_rotated_credential_file_is_followed_without_touching_the_policy() {
    let upstream = HttpUpstream::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("authorization");
    write(&secret, "Bearer sk-first\n");
    let path = dir.path().join("policy.yaml");
    write(
        &path,
        &policy(&format!(
            "upstreams:\n  llm:\n    address: '{}'\n    request_headers: {{authorization: {{from_file: authorization}}}}\n",
            upstream.addr
        )),
    );
    let sidecar = watching(&path).await;
    assert_eq!(status_of(&sidecar, "llm").await, StatusCode::OK);
    assert_eq!(
        upstream.last_seen().headers["authorization"],
        "Bearer sk-first"
    );

    write(&secret, "Bearer sk-rotated\n");
    let status = reloaded(&sidecar, |s| s.generation == 2).await;
    assert_eq!(status.failures, 0, "{status:?}");
    assert_eq!(status_of(&sidecar, "llm").await, StatusCode::OK);
    assert_eq!(
        upstream.last_seen().headers["authorization"],
        "Bearer sk-rotated"
    );

    // A Secret caught missing is a refused reload: the old key stays.
    std::fs::remove_file(&secret).unwrap();
    let status = reloaded(&sidecar, |s| s.failures == 1).await;
    assert!(
        status
            .last_error
            .as_deref()
            .unwrap()
            .contains("authorization"),
        "{status:?}"
    );
    assert_eq!(status_of(&sidecar, "llm").await, StatusCode::OK);
    assert_eq!(
        upstream.last_seen().headers["authorization"],
        "Bearer sk-rotated"
    );
}

#[tokio::test]
async fn a_replaced_ca_file_rebuilds_the_tls_client() {
    let pki = support::tls::Pki::new();
    let server = pki.sign("server", &["localhost"], false);
    let tls_upstream = support::tls::TlsUpstream::start(pki.server_config(&server, false)).await;
    let other = support::tls::Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    // First the wrong CA: every call is a handshake failure.
    std::fs::copy(&other.ca_file, &ca).unwrap();
    let path = dir.path().join("policy.yaml");
    write(
        &path,
        &policy(&format!(
            "upstreams:\n  llm:\n    address: 'localhost:{}'\n    retry: {{max_attempts: 1}}\n    tls: {{ca_file: ca.pem}}\n",
            tls_upstream.addr.port()
        )),
    );
    let sidecar = watching(&path).await;
    let (parts, _) = call(sidecar.proxy_addr, "llm", Method::GET, "/", "").await;
    assert_eq!(parts.headers["x-breakwater-error"], "tls-handshake");

    write(&ca, &std::fs::read_to_string(&pki.ca_file).unwrap());
    let status = reloaded(&sidecar, |s| s.generation == 2).await;
    assert_eq!(status.failures, 0, "{status:?}");
    assert_eq!(status_of(&sidecar, "llm").await, StatusCode::OK);
}
