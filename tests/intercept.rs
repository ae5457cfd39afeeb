//! Transparent interception with real redirection: `breakwater init` sets
//! its rules in a network namespace the test created, and an unmodified
//! `curl` to an upstream's own address (in a second namespace of the
//! test's) goes through the sidecar and gets its policy, while a
//! connection to anywhere else is relayed byte for byte. Needs root, `ip`
//! and `iptables` (`.ci/run` installs them); without them each test says
//! so and skips.

mod support;

use std::time::Duration;

use support::netns::Pair;

const BIN: &str = env!("CARGO_BIN_EXE_breakwater");

/// What `iptables -t nat -S` and `ip6tables -t nat -S` list in `ns`.
async fn listing(ns: &str) -> String {
    let mut out = String::new();
    for binary in ["iptables", "ip6tables"] {
        let listed = Pair::run(ns, binary, &["-t", "nat", "-S"]).await;
        assert!(listed.status.success(), "{listed:?}");
        out.push_str(&String::from_utf8_lossy(&listed.stdout));
    }
    out
}

async fn init(ns: &str, args: &[&str]) -> String {
    let out = Pair::run(ns, BIN, &[&["init"], args].concat()).await;
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn init_sets_its_rules_once_prints_them_and_cleanup_restores_the_table() {
    let Some(pair) = Pair::new() else { return };
    let ns = &pair.agent;
    let before = listing(ns).await;
    assert!(!before.contains("BREAKWATER"), "{before}");

    let planned = init(ns, &["--exclude-uid", "1337", "--dry-run"]).await;
    assert_eq!(listing(ns).await, before, "a dry run changes nothing");
    let args = ["--exclude-uid", "1337", "--exclude-ports", "5432,6379"];
    let set = init(ns, &args).await;
    assert!(
        set.contains("iptables -t nat -A BREAKWATER_OUTPUT -m owner --uid-owner 1337 -j RETURN"),
        "{set}"
    );
    assert!(planned.lines().count() >= 6, "{planned}");
    let once = listing(ns).await;
    let again = init(ns, &args).await;
    assert_eq!(listing(ns).await, once, "set twice: one set of rules");
    assert!(
        again.starts_with("iptables -t nat -F BREAKWATER_OUTPUT"),
        "{again}"
    );
    for family in once.split("-P PREROUTING").skip(1) {
        assert_eq!(
            family
                .matches("-A OUTPUT -p tcp -j BREAKWATER_OUTPUT")
                .count(),
            1,
            "{once}"
        );
        let chain: Vec<&str> = family
            .lines()
            .filter(|l| l.starts_with("-A BREAKWATER_OUTPUT"))
            .collect();
        assert_eq!(
            chain,
            [
                "-A BREAKWATER_OUTPUT -m owner --uid-owner 1337 -j RETURN",
                "-A BREAKWATER_OUTPUT -o lo -j RETURN",
                "-A BREAKWATER_OUTPUT -p tcp -m multiport --dports 5432,6379 -j RETURN",
                "-A BREAKWATER_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
            ],
            "{once}"
        );
    }

    let cleaned = init(ns, &["--cleanup"]).await;
    assert!(
        cleaned.contains("iptables -t nat -X BREAKWATER_OUTPUT"),
        "{cleaned}"
    );
    assert_eq!(listing(ns).await, before, "as it was");
    let nothing = init(ns, &["--cleanup"]).await;
    assert!(nothing.contains("nothing to remove"), "{nothing}");

    let refused = Pair::run(ns, BIN, &["init"]).await;
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--exclude-uid"));
}

#[tokio::test]
async fn the_injected_init_container_sets_the_rules_the_sidecar_needs() {
    let Some(pair) = Pair::new() else { return };
    let ns = &pair.agent;
    let before = listing(ns).await;
    // What the injector adds to a pod that excludes its database's port.
    let review: serde_json::Value = serde_json::from_slice(
        &std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/admission/annotated-pod.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut pod = review["request"]["object"].clone();
    pod["metadata"]["annotations"]["breakwater.io/exclude-outbound-ports"] = "5432".into();
    let pod = breakwater::inject::preview(&pod, &breakwater::inject::Settings::default()).unwrap();
    let containers = pod["spec"]["initContainers"].as_array().unwrap();
    let (init_container, sidecar) = (&containers[0], &containers[1]);
    let args: Vec<&str> = init_container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    // Its command, run as the init container would run it.
    let out = Pair::run(ns, BIN, &args).await;
    assert!(out.status.success(), "{out:?}");
    let set = listing(ns).await;
    let uid = sidecar["securityContext"]["runAsUser"].to_string();
    let port = sidecar["ports"][0]["containerPort"].to_string();
    for rule in [
        format!("-A BREAKWATER_OUTPUT -m owner --uid-owner {uid} -j RETURN"),
        "-A BREAKWATER_OUTPUT -p tcp -m multiport --dports 5432 -j RETURN".to_owned(),
        format!("-A BREAKWATER_OUTPUT -p tcp -j REDIRECT --to-ports {port}"),
    ] {
        assert!(set.contains(&rule), "{rule} not in:\n{set}");
    }
    init(ns, &["--cleanup"]).await;
    assert_eq!(listing(ns).await, before);
}

/// An upstream that answers 503 to its first two `GET /flaky`s and 200
/// after, and `GET /count` with how many `/flaky`s it has had.
const FLAKY: &str = r#"
import http.server, socket, sys
hits = [0]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/count":
            code, body = 200, str(hits[0]).encode()
        else:
            hits[0] += 1
            code, body = (503, b"busy") if hits[0] <= 2 else (200, b"ok")
        self.send_response(code)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
Server((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"#;

async fn curl(ns: &str, url: &str) -> (u16, String) {
    let out = Pair::run(ns, "curl", &["-s", "-m", "10", "-w", "\n%{http_code}", url]).await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.parse().unwrap_or(0), body.to_owned())
}

/// The sum of a metric's series for `upstream` in the sidecar's
/// `/metrics`, read inside the agent's namespace; it must be there.
async fn metric(ns: &str, name: &str, upstream: &str) -> f64 {
    let (status, text) = curl(ns, "http://127.0.0.1:15000/metrics").await;
    assert_eq!(status, 200);
    let prefix = format!("{name}{{upstream=\"{upstream}\"");
    let values: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    assert!(!values.is_empty(), "no {prefix} in {text}");
    values.iter().sum()
}

/// `breakwater_intercepted_connections_total{kind}` in the agent's
/// namespace.
async fn intercepted(ns: &str, kind: &str) -> f64 {
    let (_, text) = curl(ns, "http://127.0.0.1:15000/metrics").await;
    let series = format!("breakwater_intercepted_connections_total{{kind=\"{kind}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series)?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in {text}"))
}

/// A TCP echo: every byte back, until the caller is done. Retries its
/// bind until the namespace's address is up.
const ECHO: &str = r#"
import socket, sys, threading, time
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((sys.argv[1], int(sys.argv[2])))
server.listen()
def serve(conn):
    while True:
        data = conn.recv(65536)
        if not data:
            break
        conn.sendall(data)
    conn.close()
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"#;

/// Waits (10 s at most) until something listens at the address.
const LISTENING: &str = r#"
import socket, sys, time
for _ in range(200):
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.05)
sys.exit(1)
"#;

/// Sends 1 MiB of random bytes to the echo, reads them back, and prints
/// both digests.
const ECHO_CLIENT: &str = r#"
import hashlib, os, socket, sys, threading
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
data = os.urandom(1 << 20)
if sys.argv[3:] == ["tls"]:
    data = b"\x16\x03\x01" + data
threading.Thread(target=lambda: (s.sendall(data), s.shutdown(socket.SHUT_WR))).start()
back = b""
while len(back) < len(data):
    chunk = s.recv(65536)
    if not chunk:
        break
    back += chunk
print(hashlib.sha256(data).hexdigest(), hashlib.sha256(back).hexdigest())
"#;

/// Starts an echo on the upstreams' `port`, waits for it from its own
/// namespace (where nothing is redirected), and sends it 1 MiB from the
/// agent's (`tls`: starting as a ClientHello does); the bytes must come
/// back as sent. Answers the echo, to keep it running.
async fn echo_round_trip(pair: &Pair, port: &str, tls: bool) -> tokio::process::Child {
    let ip = pair.upstream_ip.as_str();
    let echo = Pair::command(&pair.upstream, "python3")
        .args(["-c", ECHO, ip, port])
        .spawn()
        .unwrap();
    let up = Pair::run(&pair.upstream, "python3", &["-c", LISTENING, ip, port]).await;
    assert!(up.status.success(), "the echo never listened: {up:?}");
    let kind = if tls { "tls" } else { "plain" };
    let sent = Pair::run(&pair.agent, "python3", &["-c", ECHO_CLIENT, ip, port, kind]).await;
    assert!(sent.status.success(), "{sent:?}");
    let report = String::from_utf8_lossy(&sent.stdout);
    let (out, back) = report.trim().split_once(' ').unwrap();
    assert_eq!(out, back, "the same bytes came back");
    echo
}

/// The sidecar in the agent's namespace, as UID 1337, with `policy`
/// (written into `dir`, which must be readable by that UID); ready.
async fn sidecar_as_1337(
    pair: &Pair,
    dir: &std::path::Path,
    policy: &str,
) -> tokio::process::Child {
    let file = dir.join("policy.yaml");
    std::fs::write(&file, policy).unwrap();
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let sidecar = Pair::command(&pair.agent, "setpriv")
        .args(["--reuid", "1337", "--regid", "1337", "--clear-groups", BIN])
        .args(["sidecar", "--config"])
        .arg(&file)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    eventually_200(&pair.agent, "http://127.0.0.1:15000/readyz").await;
    sidecar
}

/// A readable temporary directory (the sidecar runs as UID 1337).
fn shared_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    dir
}

async fn eventually_200(ns: &str, url: &str) {
    for _ in 0..200 {
        if curl(ns, url).await.0 == 200 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} never answered 200");
}

#[tokio::test]
async fn redirected_connections_get_their_upstream_s_policy_or_are_relayed_byte_for_byte() {
    let Some(pair) = Pair::new() else { return };
    let dir = shared_dir();
    let script = dir.path().join("flaky.py");
    std::fs::write(&script, FLAKY).unwrap();
    let upstream = format!("{}:8080", pair.upstream_ip);
    let _flaky = Pair::command(&pair.upstream, "python3")
        .arg(&script)
        .args([&pair.upstream_ip, "8080"])
        .spawn()
        .unwrap();
    let count = format!("http://{upstream}/count");
    eventually_200(&pair.agent, &count).await;

    // The upstream is declared by name, as a Service is; the agent calls
    // the address it resolves to, so its Host names no upstream and the
    // sidecar goes by where the connection was going.
    pair.agent_hosts(&format!(
        "127.0.0.1 localhost\n{} flaky-svc\n",
        pair.upstream_ip
    ));
    let _sidecar = sidecar_as_1337(
        &pair,
        dir.path(),
        "upstreams:\n  web:\n    address: 'flaky-svc:8080'\n    retry: {max_attempts: 3, backoff: {base: 1ms, max: 2ms}}\n  secure:\n    address: 'flaky-svc:9443'\n",
    )
    .await;
    init(&pair.agent, &["--exclude-uid", "1337"]).await;

    // curl knows nothing of the sidecar: it calls the upstream's address.
    let (status, body) = curl(&pair.agent, &format!("http://{upstream}/flaky")).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "ok"),
        "retried through the sidecar"
    );
    assert_eq!(
        metric(&pair.agent, "breakwater_retries_total", "web").await,
        2.0
    );
    let requests = metric(&pair.agent, "breakwater_requests_total", "web").await;
    assert_eq!(requests, 1.0);
    // Three sends, and not one more: the sidecar's own connections went
    // to the upstream, not back to itself.
    assert_eq!(curl(&pair.agent, &count).await, (200, "3".to_owned()));
    assert_eq!(intercepted(&pair.agent, "upstream").await, 2.0);

    // Anything else is relayed where it was going, byte for byte: 1 MiB
    // to an echo that no upstream claims.
    let _echo = echo_round_trip(&pair, "9000", false).await;
    assert_eq!(intercepted(&pair.agent, "passthrough").await, 1.0);
    assert_eq!(intercepted(&pair.agent, "loop").await, 0.0);

    // TLS to an upstream's address is the agent's own: relayed, not read
    // (the echo stands in for a TLS server; the bytes start as a
    // ClientHello does).
    let _tls = echo_round_trip(&pair, "9443", true).await;
    assert_eq!(intercepted(&pair.agent, "tls-passthrough").await, 1.0);

    init(&pair.agent, &["--cleanup"]).await;
    let (status, _) = curl(&pair.agent, &format!("http://{upstream}/flaky")).await;
    assert_eq!(status, 200);
    assert_eq!(curl(&pair.agent, &count).await, (200, "4".to_owned()));
    assert_eq!(
        metric(&pair.agent, "breakwater_requests_total", "web").await,
        requests + 1.0,
        "after cleanup, only the /count before it went through the sidecar"
    );
}

/// An HTTPS server: `GET` answers `tls ok`; argv: address, port, cert,
/// key.
const TLS_SERVER: &str = r#"
import http.server, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"tls ok"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), H)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[3], sys.argv[4])
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"#;

#[tokio::test]
async fn tls_is_routed_by_its_server_name_under_the_upstream_s_connect_policy() {
    let Some(pair) = Pair::new() else { return };
    let dir = shared_dir();
    let pki = support::tls::Pki::new();
    let names = ["api.example.test", "other.example.test"];
    let signed = pki.sign("server", &names, false);
    let ip = pair.upstream_ip.clone();
    let mut server = Pair::command(&pair.upstream, "python3")
        .args(["-c", TLS_SERVER, &ip, "8443"])
        .arg(&signed.cert_file)
        .arg(&signed.key_file)
        .spawn()
        .unwrap();
    let up = Pair::run(&pair.upstream, "python3", &["-c", LISTENING, &ip, "8443"]).await;
    assert!(up.status.success(), "{up:?}");
    // The upstream's own address is elsewhere (the agent's address, where
    // nothing listens): only the server name can route the connection.
    pair.agent_hosts(&format!(
        "127.0.0.1 localhost\n{} model-svc\n",
        pair.agent_ip
    ));
    let _sidecar = sidecar_as_1337(
        &pair,
        dir.path(),
        "upstreams:\n  model:\n    address: 'model-svc:8443'\n    sni: [API.example.test]\n    retry: {max_attempts: 3, backoff: {base: 1ms, max: 2ms}}\n    circuit_breaker: {consecutive_failures: 3, open_for: 60s}\n",
    )
    .await;
    init(&pair.agent, &["--exclude-uid", "1337"]).await;
    let ca = pki.ca_file.to_str().unwrap().to_owned();
    let https = |name: &str| {
        let (ca, ip) = (ca.clone(), ip.clone());
        let resolve = format!("{name}:8443:{ip}");
        let url = format!("https://{name}:8443/");
        let ns = pair.agent.clone();
        async move {
            let out = Pair::run(
                &ns,
                "curl",
                &[
                    "-s",
                    "-m",
                    "10",
                    "--cacert",
                    &ca,
                    "--resolve",
                    &resolve,
                    "-w",
                    "\n%{http_code}",
                    &url,
                ],
            )
            .await;
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };

    // The agent's own TLS, end to end: the sidecar only read its name.
    assert_eq!(https("api.example.test").await, "tls ok\n200");
    assert_eq!(intercepted(&pair.agent, "tls-passthrough").await, 1.0);
    // A name no upstream declares goes where it was going, as any other
    // connection does.
    assert_eq!(https("other.example.test").await, "tls ok\n200");
    assert_eq!(intercepted(&pair.agent, "passthrough").await, 1.0);

    // The upstream goes down: three connects (two retries), each a failure
    // for the breaker, which opens; the next connection is refused at
    // once, with no connect.
    server.kill().await.unwrap();
    server.wait().await.unwrap();
    assert_eq!(https("api.example.test").await, "\n000");
    assert_eq!(intercepted(&pair.agent, "connect-failure").await, 1.0);
    assert_eq!(
        metric(&pair.agent, "breakwater_retries_total", "model").await,
        2.0
    );
    assert_eq!(https("api.example.test").await, "\n000");
    assert_eq!(intercepted(&pair.agent, "circuit-open").await, 1.0);
    assert_eq!(
        metric(&pair.agent, "breakwater_retries_total", "model").await,
        2.0,
        "an open circuit makes no attempt"
    );
    let (_, state) = curl(&pair.agent, "http://127.0.0.1:15000/circuits").await;
    assert!(state.contains("open"), "{state}");
}

#[tokio::test]
async fn redirected_ipv6_connections_get_their_upstream_s_policy() {
    let Some(pair) = Pair::new() else { return };
    let Some(ip6) = pair.upstream_ip6.clone() else {
        assert!(
            std::env::var_os("BREAKWATER_REQUIRE_PEERS").is_none(),
            "the namespaces have no IPv6"
        );
        eprintln!("SKIPPED: the namespaces have no IPv6");
        return;
    };
    let dir = shared_dir();
    let script = dir.path().join("flaky.py");
    std::fs::write(&script, FLAKY).unwrap();
    let _flaky = Pair::command(&pair.upstream, "python3")
        .arg(&script)
        .args([&ip6, "8080"])
        .spawn()
        .unwrap();
    let count = format!("http://[{ip6}]:8080/count");
    eventually_200(&pair.agent, &count).await;
    let _sidecar = sidecar_as_1337(
        &pair,
        dir.path(),
        &format!("upstreams:\n  web6:\n    address: '[{ip6}]:8080'\n    retry: {{max_attempts: 3, backoff: {{base: 1ms, max: 2ms}}}}\n"),
    )
    .await;
    init(&pair.agent, &["--exclude-uid", "1337", "--ipv6", "on"]).await;
    // curl to the upstream's IPv6 address: redirected to the sidecar's
    // IPv6 loopback, served with the upstream's policy.
    let (status, body) = curl(&pair.agent, &format!("http://[{ip6}]:8080/flaky")).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "ok"),
        "retried through the sidecar"
    );
    assert_eq!(
        metric(&pair.agent, "breakwater_retries_total", "web6").await,
        2.0
    );
    assert_eq!(intercepted(&pair.agent, "upstream").await, 1.0);
    assert_eq!(curl(&pair.agent, &count).await, (200, "3".to_owned()));
}

/// Sends one byte and prints how many came back before the connection
/// ended.
const ONE_BYTE: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
try:
    s.sendall(b"x")
    print(len(s.recv(16)))
except ConnectionResetError:
    print(0)
"#;

#[tokio::test]
async fn with_unmatched_deny_a_connection_going_elsewhere_is_closed() {
    let Some(pair) = Pair::new() else { return };
    let dir = shared_dir();
    let ip = pair.upstream_ip.clone();
    let _sidecar = sidecar_as_1337(
        &pair,
        dir.path(),
        &format!("intercept: {{unmatched: deny}}\nupstreams:\n  web: {{address: '{ip}:8080'}}\n"),
    )
    .await;
    let _echo = Pair::command(&pair.upstream, "python3")
        .args(["-c", ECHO, &ip, "9000"])
        .spawn()
        .unwrap();
    let up = Pair::run(&pair.upstream, "python3", &["-c", LISTENING, &ip, "9000"]).await;
    assert!(up.status.success(), "{up:?}");
    let direct = Pair::run(&pair.agent, "python3", &["-c", ONE_BYTE, &ip, "9000"]).await;
    assert_eq!(
        String::from_utf8_lossy(&direct.stdout).trim(),
        "1",
        "before init: {direct:?}"
    );
    init(&pair.agent, &["--exclude-uid", "1337"]).await;
    let denied = Pair::run(&pair.agent, "python3", &["-c", ONE_BYTE, &ip, "9000"]).await;
    assert_eq!(
        String::from_utf8_lossy(&denied.stdout).trim(),
        "0",
        "{denied:?}"
    );
    assert_eq!(intercepted(&pair.agent, "denied").await, 1.0);
    assert_eq!(intercepted(&pair.agent, "passthrough").await, 0.0);
}
