//! Config parsing and validation: every kind of error names the file, line,
//! column and field.

use super::*;
use crate::resilience::fallback::Criticality;
use std::time::Duration;

fn error(text: &str) -> String {
    parse("policies.yaml", text).unwrap_err().to_string()
}

#[test]
fn an_empty_file_is_an_error_and_defaults_apply_to_the_rest() {
    for empty in ["", "\n  \n", "# only a comment\n"] {
        assert_eq!(
            parse("p.yaml", empty).unwrap_err().to_string(),
            "p.yaml:1:1: the file is empty: a policy file names the upstreams the sidecar calls, such as `upstreams: {ocr: {address: 'ocr-agent:8080'}}`"
        );
    }
    let config = parse("p.yaml", "upstreams: {}\n").unwrap();
    assert_eq!(config.admin.listen.to_string(), DEFAULT_ADMIN_LISTEN);
    assert_eq!(config.proxy.listen.to_string(), DEFAULT_PROXY_LISTEN);
    assert!(config.upstreams.is_empty());
}

#[test]
fn resolves_upstreams_with_their_routed_hosts() {
    let config = parse(
        "p.yaml",
        "upstreams:\n  ocr:\n    address: ocr-agent:8080\n    protocol: grpc\n    listen: 127.0.0.1:15011\n    hosts: [OCR.internal]\n  llm:\n    address: api.example.com:80\n",
    )
    .unwrap();
    let names: Vec<&str> = config.upstreams.iter().map(|u| &*u.name).collect();
    assert_eq!(names, ["llm", "ocr"], "sorted by name");
    let ocr = config.upstream("ocr").unwrap();
    assert_eq!(ocr.protocol, Protocol::Grpc);
    assert_eq!(ocr.listen.unwrap().port(), 15011);
    assert_eq!(
        ocr.hosts,
        ["ocr", "ocr.internal", "ocr-agent", "ocr-agent:8080"]
    );
    assert_eq!(config.upstream("llm").unwrap().protocol, Protocol::Http1);
}

#[test]
fn unknown_variant_names_line_column_and_field() {
    let text = "admin:\n  listen: 127.0.0.1:15000\nupstreams:\n  ocr:\n    address: ocr-agent:8080\n    protocol: grcp\n";
    assert_eq!(
        error(text),
        "policies.yaml:6:15: upstreams.ocr.protocol: unknown variant \"grcp\", expected one of http1, http2, grpc, mcp, a2a"
    );
}

#[test]
fn unknown_fields_are_errors() {
    let text = "upstreams:\n  ocr:\n    address: a:1\n    adress: b:2\n";
    let message = error(text);
    assert!(
        message.starts_with("policies.yaml:4:5: upstreams.ocr.adress: unknown field \"adress\""),
        "{message}"
    );
    let message = error("admin: {listen: 127.0.0.1:1, port: 2}\n");
    assert!(
        message.starts_with("policies.yaml:1:30: admin.port: unknown field"),
        "{message}"
    );
}

#[test]
fn missing_and_mistyped_fields() {
    let message = error("upstreams:\n  ocr:\n    protocol: grpc\n");
    assert!(
        message.starts_with("policies.yaml:3:5: upstreams.ocr: missing field \"address\""),
        "{message}"
    );
    let message = error("upstreams:\n  ocr:\n    address: [a]\n");
    assert!(
        message.starts_with("policies.yaml:3:14: upstreams.ocr.address:"),
        "{message}"
    );
}

#[test]
fn syntax_errors_have_a_position() {
    let message = error("upstreams:\n  ocr:\n   address: a:1\n  - x\n");
    assert!(message.starts_with("policies.yaml:4:"), "{message}");
}

#[test]
fn address_without_port_or_with_scheme() {
    assert_eq!(
        error("upstreams:\n  ocr:\n    address: ocr-agent\n"),
        "policies.yaml:3:14: upstreams.ocr.address: address \"ocr-agent\" has no port: expected host:port, such as ocr-agent:8080"
    );
    let message = error("upstreams:\n  ocr:\n    address: http://ocr:80\n");
    assert!(message.contains("without a scheme"), "{message}");
}

#[test]
fn duplicate_listen_ports() {
    let text = "proxy: {listen: 127.0.0.1:15001}\nupstreams:\n  ocr:\n    address: a:1\n    listen: 0.0.0.0:15001\n";
    assert_eq!(
        error(text),
        "policies.yaml:5:13: upstreams.ocr.listen: port 15001 is already used by proxy.listen"
    );
    // Port 0 asks for any free port: never a clash.
    parse(
        "p.yaml",
        "admin: {listen: 127.0.0.1:0}\nproxy: {listen: 127.0.0.1:0}\nupstreams:\n  ocr: {address: a:1, listen: 127.0.0.1:0}\n",
    )
    .unwrap();
}

#[test]
fn invalid_listen_address() {
    assert_eq!(
        error("proxy:\n  listen: localhost:80\n"),
        "policies.yaml:2:11: proxy.listen: invalid listen address \"localhost:80\": expected ip:port, such as 127.0.0.1:15001"
    );
}

#[test]
fn server_names_are_host_names_and_route_to_one_upstream() {
    let config = parse(
        "p.yaml",
        "upstreams:\n  model:\n    address: api.example.com:443\n    sni: [API.example.com, eu.api.example.com.]\n",
    )
    .unwrap();
    assert_eq!(
        config.upstreams[0].sni,
        ["api.example.com", "eu.api.example.com"]
    );
    let text = "upstreams:\n  a:\n    address: a:443\n    sni: [x.example, 'x.example:443']\n  b:\n    address: b:443\n    sni: [X.example]\n";
    assert_eq!(
        error(text).lines().collect::<Vec<_>>(),
        [
            "policies.yaml:4:22: upstreams.a.sni[1]: invalid server name \"x.example:443\": expected a host name such as api.example.com, without a port",
            "policies.yaml:7:11: upstreams.b.sni[0]: server name \"x.example\" is already routed to upstream \"a\"",
        ]
    );
}

#[test]
fn two_upstreams_claiming_one_host() {
    let text = "upstreams:\n  ocr:\n    address: a:1\n    hosts: [scan]\n  vision:\n    address: b:1\n    hosts: [Scan]\n";
    assert_eq!(
        error(text),
        "policies.yaml:7:13: upstreams.vision.hosts[0]: host \"scan\" is already routed to upstream \"ocr\""
    );
    let text =
        "upstreams:\n  ocr:\n    address: a:1\n    hosts: [vision]\n  vision:\n    address: b:1\n";
    assert_eq!(
        error(text),
        "policies.yaml:5:3: upstreams.vision: host \"vision\" is already routed to upstream \"ocr\""
    );
}

#[test]
fn shared_address_hosts_are_routed_to_nobody() {
    // Two upstreams on one machine: neither owns the bare host, each keeps
    // its exact host:port.
    let config = parse(
        "p.yaml",
        "upstreams:\n  a: {address: '10.0.0.1:80'}\n  b: {address: '10.0.0.1:81'}\n",
    )
    .unwrap();
    assert_eq!(config.upstream("a").unwrap().hosts, ["a", "10.0.0.1:80"]);
    assert_eq!(config.upstream("b").unwrap().hosts, ["b", "10.0.0.1:81"]);
    // Kept, but said.
    let warnings: Vec<String> = config.warning_lines().collect();
    assert_eq!(
        warnings,
        [
            "p.yaml:3:3: upstreams.b.address: warning: 10.0.0.1 is the host of upstream a's address too, so neither is routed by 10.0.0.1 alone (only by its host:port); name one in its hosts to route 10.0.0.1 to it"
        ]
    );
    assert_eq!(config.upstream("a").unwrap().address_host, None);
    let alone = parse("p.yaml", "upstreams:\n  a: {address: '10.0.0.1:80'}\n").unwrap();
    let a = alone.upstream("a").unwrap();
    assert_eq!(a.address_host.as_deref(), Some("10.0.0.1"));
    assert_eq!(alone.warning_lines().count(), 0);
}

#[test]
fn invalid_upstream_name() {
    assert_eq!(
        error("upstreams:\n  OCR Agent:\n    address: a:1\n"),
        "policies.yaml:2:3: upstreams.OCR Agent: an upstream name must be 1-63 characters of a-z, 0-9, '-', '_' or '.'"
    );
}

#[test]
fn every_problem_is_reported_in_file_order() {
    let text = "upstreams:\n  b:\n    address: nope\n  a:\n    address: x:1\n    listen: bad\n";
    let error = parse("p.yaml", text).unwrap_err();
    let lines: Vec<u64> = error.diagnostics.iter().map(|d| d.line).collect();
    assert_eq!(lines, [3, 6]);
}

#[test]
fn unreadable_file_names_the_file() {
    let error = load(Path::new("/nonexistent/policies.yaml")).unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("/nonexistent/policies.yaml: cannot read the file:"),
        "{error}"
    );
}

#[test]
fn policies_take_builtin_defaults() {
    let config = parse("p.yaml", "upstreams:\n  ocr: {address: 'a:1'}\n").unwrap();
    let policy = &config.upstream("ocr").unwrap().policy;
    assert_eq!(*policy, crate::resilience::policy::Policy::default());
    assert_eq!(policy.timeout, std::time::Duration::from_secs(30));
    assert_eq!(policy.retry.max_attempts, 3);
    assert_eq!(policy.retry.buffer_limit, 64 << 10);
    assert_eq!(
        policy
            .circuit_breaker
            .as_ref()
            .unwrap()
            .consecutive_failures,
        5
    );
    assert_eq!(policy.max_concurrent_requests, 1024);
    assert!(policy.hedge.is_none());
}

#[test]
fn defaults_merge_into_upstreams_field_by_field() {
    let text = "\
defaults:
  timeout: 2s
  retry: {max_attempts: 4, backoff: {base: 10ms, max: 1s}, budget: {ratio: 0.1}}
  circuit_breaker: {consecutive_failures: 3, failure_rate: {window: 50}}
upstreams:
  ocr:
    address: a:1
    per_try_timeout: 500ms
    retry: {backoff: {base: 20ms}, on: [unavailable, 5xx], buffer_limit: 1MiB}
    circuit_breaker: {failure_rate: {threshold: 0.25}}
  llm:
    address: b:1
    timeout: 2m
    circuit_breaker: {enabled: false}
    hedge: {delay: 50ms}
";
    let config = parse("p.yaml", text).unwrap();
    let ocr = &config.upstream("ocr").unwrap().policy;
    assert_eq!(ocr.timeout.as_secs(), 2);
    assert_eq!(ocr.per_try_timeout.unwrap().as_millis(), 500);
    assert_eq!(ocr.retry.max_attempts, 4, "from defaults");
    assert_eq!(ocr.retry.backoff_base.as_millis(), 20, "the upstream wins");
    assert_eq!(ocr.retry.backoff_max.as_secs(), 1, "nested default kept");
    assert_eq!(ocr.retry.budget_ratio, 0.1);
    assert_eq!(ocr.retry.buffer_limit, 1 << 20);
    let breaker = ocr.circuit_breaker.as_ref().unwrap();
    assert_eq!(breaker.consecutive_failures, 3);
    assert_eq!(breaker.window, 50);
    assert_eq!(breaker.failure_rate_threshold, 0.25);
    let llm = &config.upstream("llm").unwrap().policy;
    assert_eq!(llm.timeout.as_secs(), 120);
    assert!(llm.circuit_breaker.is_none());
    let hedge = llm.hedge.as_ref().unwrap();
    assert_eq!((hedge.delay.as_millis(), hedge.max_attempts), (50, 2));
}

#[test]
fn policy_values_are_checked_where_they_are_written() {
    assert_eq!(
        error("defaults:\n  timeout: 30 parsecs\n"),
        "policies.yaml:2:12: defaults.timeout: invalid duration \"30 parsecs\": expected a number with a unit, such as 250ms, 30s or 5m"
    );
    let message = error("upstreams:\n  ocr:\n    address: a:1\n    retry: {on: [unavailabel]}\n");
    assert!(
        message.starts_with(
            "policies.yaml:4:17: upstreams.ocr.retry.on: unknown condition \"unavailabel\""
        ),
        "{message}"
    );
    let message = error("upstreams:\n  ocr:\n    address: a:1\n    retry: {budget: {ratio: 2}}\n");
    assert!(
        message
            .starts_with("policies.yaml:4:29: upstreams.ocr.retry.budget.ratio: 2 is not a ratio"),
        "{message}"
    );
    let message = error("upstreams:\n  ocr:\n    address: a:1\n    retry: {max_attempts: 0}\n");
    assert!(
        message.starts_with("policies.yaml:4:13: upstreams.ocr.retry.max_attempts:"),
        "{message}"
    );
    let message = error("upstreams:\n  ocr:\n    address: a:1\n    retry: {max_attempt: 2}\n");
    assert!(
        message.starts_with("policies.yaml:4:13: upstreams.ocr.retry.max_attempt: unknown field"),
        "{message}"
    );
    assert_eq!(
        error("upstreams:\n  ocr:\n    address: a:1\n    hedge: {max_attempts: 3}\n"),
        "policies.yaml:2:3: upstreams.ocr.hedge.delay: hedging needs a delay, such as 50ms"
    );
}

#[test]
fn optional_upstreams_resolve_their_fallback() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("matches.json"), "{\"matches\":[]}").unwrap();
    let file = dir.path().join("p.yaml");
    std::fs::write(
        &file,
        "upstreams:\n  matching:\n    address: m:1\n    criticality: optional\n    fallback:\n      headers: {content-type: application/json}\n      body_file: matches.json\n      message_base64: CgJoaQ==\n  ranking:\n    address: r:1\n    criticality: optional\n  ocr: {address: o:1}\n",
    )
    .unwrap();
    let config = load(&file).unwrap();
    let matching = config.upstream("matching").unwrap();
    assert_eq!(matching.criticality, Criticality::Optional);
    let fallback = matching.fallback.as_ref().unwrap();
    assert_eq!(fallback.status, http::StatusCode::OK, "200 with a body");
    assert_eq!(fallback.headers["content-type"], "application/json");
    assert_eq!(fallback.body, "{\"matches\":[]}");
    assert_eq!(fallback.message, &b"\x0a\x02hi"[..]);
    let ranking = config.upstream("ranking").unwrap().fallback.as_ref();
    assert_eq!(
        ranking.unwrap().status,
        http::StatusCode::NO_CONTENT,
        "an optional upstream without a fallback block degrades to an empty answer"
    );
    let ocr = config.upstream("ocr").unwrap();
    assert_eq!(ocr.criticality, Criticality::Critical);
    assert!(ocr.fallback.is_none());
}

#[test]
fn fallback_mistakes_are_reported_where_written() {
    let text = "upstreams:\n  ocr:\n    address: o:1\n    fallback: {status: 200}\n  m:\n    address: m:1\n    criticality: optional\n    fallback:\n      status: 99\n      headers: {connection: close, 'bad name': x}\n      body: a\n      body_file: missing.json\n      message_base64: '!!'\n";
    let message = error(text);
    for expected in [
        "policies.yaml:4:15: upstreams.ocr.fallback: a critical upstream never degrades",
        "policies.yaml:9:15: upstreams.m.fallback.status: 99 is not an HTTP status",
        "policies.yaml:10:29: upstreams.m.fallback.headers.connection: this header is set by the sidecar",
        "upstreams.m.fallback.headers.bad name: \"bad name\" is not a valid header name",
        "policies.yaml:12:18: upstreams.m.fallback.body_file: give either body or body_file",
        "policies.yaml:13:23: upstreams.m.fallback.message_base64: not valid base64",
    ] {
        assert!(
            message.contains(expected),
            "{expected:?} not in:\n{message}"
        );
    }
    let message = error("upstreams:\n  m: {address: m:1, criticality: sometimes}\n");
    assert!(
        message.contains("upstreams.m.criticality: unknown variant \"sometimes\", expected"),
        "{message}"
    );
}

#[test]
fn fault_mistakes_are_reported_where_written() {
    let message = error(
        "upstreams:\n  ocr:\n    address: o:1\n    faults:\n      abort: {percent: 5, headers: {'bad name': x}}\n",
    );
    assert!(
        message.contains("policies.yaml:5:7: upstreams.ocr.faults.abort: give status"),
        "{message}"
    );
    assert!(
        message.contains(
            "upstreams.ocr.faults.abort.headers.bad name: \"bad name\" is not a valid header name"
        ),
        "{message}"
    );
    let message = error(
        "upstreams:\n  ocr:\n    address: o:1\n    faults: {delay: {percent: 101, duration: 1s}}\n",
    );
    assert!(
        message.starts_with(
            "policies.yaml:4:31: upstreams.ocr.faults.delay.percent: 101 is not a percentage"
        ),
        "{message}"
    );
    let config = parse(
        "p.yaml",
        "upstreams:\n  ocr:\n    address: o:1\n    faults: {seed: 7, abort: {percent: 2.5, grpc_status: 14}}\n",
    )
    .unwrap();
    let faults = config.upstream("ocr").unwrap().faults.as_ref().unwrap();
    assert_eq!(faults.seed, Some(7));
    assert_eq!(faults.abort.as_ref().unwrap().percent.0, 2.5);
}

#[test]
fn dead_letters_need_a_control_plane_and_resolve_their_spool() {
    let message = error("upstreams:\n  orders: {address: o:1, dead_letter: true}\n");
    assert!(
        message.contains("policies.yaml:2:39: upstreams.orders.dead_letter: dead letters go to the control plane: set control_plane.url"),
        "{message}"
    );
    let message =
        error("control_plane: {url: 'ftp://x'}\ndead_letters: {redact_headers: ['bad header']}\n");
    assert!(
        message.contains("policies.yaml:1:22: control_plane.url: invalid URL \"ftp://x\""),
        "{message}"
    );
    assert!(
        message
            .contains("dead_letters.redact_headers[0]: \"bad header\" is not a valid header name"),
        "{message}"
    );
    let message = error("upstreams:\n  orders: {address: o:1, dead_letter: sometimes}\n");
    assert!(
        message.contains("upstreams.orders.dead_letter: expected true, false, or a block"),
        "{message}"
    );

    let config = parse(
        "/etc/breakwater/p.yaml",
        "control_plane: {url: 'http://cp:7070', token_file: token}\ndead_letters: {spool_dir: spool, max_spool_bytes: 1MiB, redact_headers: [X-Api-Key]}\nupstreams:\n  a: {address: a:1, dead_letter: {max_body: 4KiB}}\n  b: {address: b:1, dead_letter: true}\n  c: {address: c:1, dead_letter: false}\n",
    )
    .unwrap();
    let cp = config.control_plane.as_ref().unwrap();
    assert_eq!(
        cp.token_file.as_deref(),
        Some(std::path::Path::new("/etc/breakwater/token"))
    );
    assert_eq!(
        config.dead_letters.spool_dir,
        std::path::Path::new("/etc/breakwater/spool")
    );
    assert_eq!(config.dead_letters.max_spool_bytes, 1 << 20);
    assert_eq!(config.dead_letters.redact_headers, ["x-api-key"]);
    let max_body = |name: &str| {
        config
            .upstream(name)
            .unwrap()
            .dead_letter
            .map(|d| d.max_body)
    };
    assert_eq!(max_body("a"), Some(4096));
    assert_eq!(max_body("b"), Some(DEFAULT_DEAD_LETTER_MAX_BODY));
    assert_eq!(max_body("c"), None);
}

#[test]
fn streams_are_cut_after_five_idle_minutes_unless_turned_off() {
    let config = parse(
        "p.yaml",
        "defaults: {first_byte_timeout: 2m}\nupstreams:\n  a: {address: 'a:1'}\n  b: {address: 'b:1', stream_idle_timeout: 0s, first_byte_timeout: 0s}\n  c: {address: 'c:1', stream_idle_timeout: 20s}\n",
    )
    .unwrap();
    let timeouts = |name: &str| {
        let p = &config.upstream(name).unwrap().policy;
        (p.stream_idle_timeout, p.first_byte_timeout)
    };
    let s = std::time::Duration::from_secs;
    assert_eq!(timeouts("a"), (Some(s(300)), Some(s(120))));
    assert_eq!(timeouts("b"), (None, None), "0s turns each off");
    assert_eq!(timeouts("c"), (Some(s(20)), Some(s(120))));
}

#[test]
fn settings_that_can_never_apply_are_warned_of_with_their_position() {
    let text = "defaults:\n  retry: {on: [connect-failure]}\nupstreams:\n  web:\n    address: web:80\n    timeout: 2s\n    per_try_timeout: 5s\n    retry: {on: [404, 4xx, 503, unavailable, per-try-timeout]}\n    circuit_breaker: {failure_on: [3xx, 500]}\n  once:\n    address: once:80\n    retry: {max_attempts: 1}\n  grpc:\n    address: grpc:80\n    protocol: grpc\n    retry: {on: [unavailable, 503]}\n";
    let config = parse("p.yaml", text).unwrap();
    let lines: Vec<String> = config.warning_lines().collect();
    let client = "an answer below 500 other than 429 is not a failure (it is the caller's)";
    assert_eq!(
        lines,
        [
            "p.yaml:4:3: upstreams.web.per_try_timeout: warning: per_try_timeout (5s) is not shorter than timeout (2s): the overall timeout always ends the call first".to_owned(),
            format!("p.yaml:4:3: upstreams.web.retry.on: warning: 404 never applies: {client}"),
            format!("p.yaml:4:3: upstreams.web.retry.on: warning: 4xx never applies: only 429 of the 4xx answers is a failure; write 429 ({client})"),
            "p.yaml:4:3: upstreams.web.retry.on: warning: unavailable never applies: a gRPC code, and this upstream speaks http1, whose answers carry none".to_owned(),
            "p.yaml:4:3: upstreams.web.retry.on: warning: per-try-timeout never applies: no per_try_timeout shorter than timeout is set".to_owned(),
            format!("p.yaml:4:3: upstreams.web.circuit_breaker.failure_on: warning: 3xx never applies: {client}"),
            "p.yaml:10:3: upstreams.once.retry.on: warning: never applies: max_attempts is 1, so nothing is retried".to_owned(),
        ]
    );
}

#[test]
fn built_in_defaults_warn_of_nothing() {
    let config = parse(
        "p.yaml",
        "upstreams:\n  web: {address: 'web:80'}\n  rpc: {address: 'rpc:80', protocol: grpc}\n",
    )
    .unwrap();
    assert_eq!(config.warning_lines().count(), 0);
}

#[test]
fn proxy_bounds_its_caller_connections() {
    let config = parse("p.yaml", "upstreams: {}\n").unwrap();
    assert_eq!(
        config.proxy.header_read_timeout,
        DEFAULT_HEADER_READ_TIMEOUT
    );
    assert_eq!(config.proxy.max_connections, None);
    let config = parse(
        "p.yaml",
        "proxy: {listen: '127.0.0.1:0', header_read_timeout: 5s, max_connections: 100}\n",
    )
    .unwrap();
    assert_eq!(
        config.proxy.header_read_timeout,
        std::time::Duration::from_secs(5)
    );
    assert_eq!(config.proxy.max_connections, Some(100));
    assert!(error("proxy: {max_connections: 0}\n").contains("proxy.max_connections"));
    assert!(error("admin: {max_connections: 10}\n").contains("unknown field"));
}

#[test]
fn serde_words_are_put_in_the_users_and_a_typo_gets_the_closest_key() {
    let check = |yaml: &str| error(&format!("upstreams:\n  a: {{address: 'a:1', {yaml}}}\n"));
    assert_eq!(
        check("retry: {max_attempts: x}"),
        "policies.yaml:2:45: upstreams.a.retry.max_attempts: expected a whole number, such as 3"
    );
    assert_eq!(
        check("retry: {max_attempts: 0}"),
        "policies.yaml:2:31: upstreams.a.retry.max_attempts: expected a whole number above 0, such as 3, not 0"
    );
    assert_eq!(
        check("retry: {budget: {ratio: x}}"),
        "policies.yaml:2:47: upstreams.a.retry.budget.ratio: expected a number, such as 0.5"
    );
    let typo = check("retyr: {}");
    assert!(
        typo.starts_with("policies.yaml:2:23: upstreams.a.retyr: unknown field \"retyr\": did you mean \"retry\"? (known here: address, protocol,"),
        "{typo}"
    );
    let far = check("zzzzzz: 1");
    assert!(
        far.contains("unknown field \"zzzzzz\" (known here: "),
        "{far}"
    );
    assert_eq!(
        error("upstreams:\n  a: [1, 2]\n"),
        "policies.yaml:2:6: upstreams.a: expected a block of keys here (`key: value` lines below it, or `{key: value}`)"
    );
}

#[test]
fn every_error_is_reported_each_on_its_line() {
    let text = "\
upstreams:
  ocr:
    address: 'ocr:8080'
    retry:
      max_attempts: three
  llm:
    address: 'llm:443'
    retyr: {max_attempts: 3}
  mail:
    address: 'mail:25'
    timeout: 5 parsecs
  pay:
    address: 'pay:notaport'
";
    let lines: Vec<String> = error(text).lines().map(str::to_owned).collect();
    let starts: Vec<&str> = lines
        .iter()
        .map(|l| l.split(": ").next().unwrap())
        .collect();
    assert_eq!(
        starts,
        [
            "policies.yaml:5:21",
            "policies.yaml:8:5",
            "policies.yaml:11:14",
            "policies.yaml:13:14"
        ],
        "{lines:#?}"
    );
    assert!(lines[0].contains("upstreams.ocr.retry.max_attempts: expected a whole number"));
    assert!(lines[1].contains("did you mean \"retry\"?"));
    assert!(lines[2].contains("upstreams.mail.timeout: invalid duration"));
    assert!(lines[3].contains("upstreams.pay.address: address \"pay:notaport\" has no port"));
}

#[test]
fn what_a_bad_value_leaves_behind_is_not_reported_again() {
    // The address is required: blanking the bad one must not add "missing
    // field address", nor an empty upstream's complaint.
    assert_eq!(
        error("upstreams:\n  a:\n    address: [1, 2]\n  b:\n    timeout: x\n    address: 'b:1'\n"),
        "policies.yaml:3:14: upstreams.a.address: expected a single value here (a name, an address), not a list or a block\n\
         policies.yaml:5:14: upstreams.b.timeout: invalid duration \"x\": expected a number with a unit, such as 250ms, 30s or 5m"
    );
    // The only key of a block.
    let only = error(
        "upstreams:\n  a:\n    address: 'a:1'\n    retry:\n      max_attempts: x\n  b: {address: 'b:1', hedge: 3}\n",
    );
    assert_eq!(only.lines().count(), 2, "{only}");
    assert!(only.contains("policies.yaml:6:"), "{only}");
    // The checks after reading skip the upstream whose value was blanked
    // (its other fields may now look wrong), not the others.
    let checked = error(
        "upstreams:\n  a:\n    address: 'a:nope'\n    retry: {max_attempts: x}\n  b: {address: 'b:nope'}\n",
    );
    assert_eq!(checked.lines().count(), 2, "{checked}");
    assert!(
        checked
            .lines()
            .nth(1)
            .unwrap()
            .starts_with("policies.yaml:5:"),
        "{checked}"
    );
    // An upstream set aside whole (a one-line block) is not "missing" to
    // the failover that names it.
    let named = error(
        "upstreams:\n  a: {address: 'a:1', failover: [b]}\n  b: {address: 'b:1', timeout: x}\n  c: {address: 'c'}\n",
    );
    let fields: Vec<&str> = named
        .lines()
        .map(|l| l.split(": ").nth(1).unwrap())
        .collect();
    assert_eq!(
        fields,
        ["upstreams.b.timeout", "upstreams.c.address"],
        "{named}"
    );
}

#[test]
fn a_syntax_error_is_said_in_plain_words_and_ends_the_search() {
    assert_eq!(
        error("upstreams:\n\tocr: {}\n"),
        "policies.yaml:2:2: YAML indents with spaces, not tabs (YAML said: tabs disallowed within this context (block indentation))"
    );
    let unclosed = error("upstreams:\n  ocr: {address: 'x:1'\n  b: {address: 3}\n");
    assert!(
        unclosed.starts_with("policies.yaml:3:3: upstreams.ocr: expected a `,` between the items"),
        "{unclosed}"
    );
    let indented = error("upstreams:\n  ocr:\n   address: 'x:1'\n    timeout: 1s\n");
    assert!(
        indented.starts_with("policies.yaml:4:5: upstreams.ocr: expected another `key: value` here, indented as far as the keys above it"),
        "{indented}"
    );
    assert_eq!(
        error("upstreams:\n  ocr: {address: 'a:1'}\n  ocr: {address: 'b:1'}\n"),
        "policies.yaml:3:3: upstreams: \"ocr\" is given twice in this block: keep one"
    );
    // A type error above a syntax error: both, and nothing more.
    let both = error("upstreams:\n  a: {address: 'a:1', timeout: x}\n  b: {address: 'b:1'\n");
    assert_eq!(both.lines().count(), 2, "{both}");
    assert!(both.lines().nth(1).unwrap().contains("YAML said"), "{both}");
}

#[test]
fn intercept_unmatched_is_passthrough_unless_deny_is_asked() {
    let base = "upstreams:\n  a: {address: 'a:1'}\n";
    assert_eq!(
        parse("p.yaml", base).unwrap().intercept.unmatched,
        super::Unmatched::Passthrough
    );
    let deny = parse("p.yaml", &format!("intercept: {{unmatched: deny}}\n{base}")).unwrap();
    assert_eq!(deny.intercept.unmatched, super::Unmatched::Deny);
    let wrong = error(&format!("intercept: {{unmatched: drop}}\n{base}"));
    assert!(
        wrong.starts_with(
            "policies.yaml:1:24: intercept.unmatched: unknown variant \"drop\", expected one of"
        ),
        "{wrong}"
    );
}

const ROUTED: &str = "\
defaults:
  timeout: 20s
  retry: {max_attempts: 2, backoff: {base: 5ms}}
upstreams:
  llm:
    address: api.example.com:443
    timeout: 60s
    retry: {max_attempts: 4}
    routes:
      - name: models
        match: {path: {exact: /v1/models}, method: get}
        timeout: 2s
        retry: {backoff: {max: 1s}}
      - name: chat
        match: {path: {prefix: /v1/chat/}, headers: {x-tier: gold}}
        idempotent: true
        circuit_breaker: {consecutive_failures: 3}
      - name: rest
";

#[test]
fn a_route_s_blocks_merge_over_its_upstream_s_which_merge_over_defaults() {
    let config = parse("p.yaml", ROUTED).unwrap();
    let llm = config.upstream("llm").unwrap();
    let names: Vec<&str> = llm.routes.iter().map(|r| &*r.name).collect();
    assert_eq!(names, ["models", "chat", "rest"], "in file order");
    let (models, chat, rest) = (&llm.routes[0], &llm.routes[1], &llm.routes[2]);
    // The route's own field wins; the upstream's next; then defaults.
    assert_eq!(models.policy.timeout, Duration::from_secs(2));
    assert_eq!(models.policy.retry.max_attempts, 4, "from the upstream");
    assert_eq!(
        models.policy.retry.backoff_base,
        Duration::from_millis(5),
        "from defaults"
    );
    assert_eq!(models.policy.retry.backoff_max, Duration::from_secs(1));
    assert_eq!(models.matches.method, Some(http::Method::GET));
    assert_eq!(
        models.matches.path,
        Some(crate::matching::PathMatch::Exact("/v1/models".into()))
    );
    assert_eq!(chat.policy.timeout, Duration::from_secs(60));
    assert_eq!(chat.policy.retry.idempotent, Some(true));
    assert!(chat.own_breaker && !models.own_breaker);
    assert_eq!(
        chat.policy
            .circuit_breaker
            .as_ref()
            .unwrap()
            .consecutive_failures,
        3
    );
    assert_eq!(chat.matches.headers.len(), 1);
    // No match at all: every request the earlier ones leave.
    assert_eq!(rest.matches, crate::matching::RouteMatch::default());
    assert_eq!(rest.policy, llm.policy, "nothing of its own");
    let shown = serde_json::to_value(&**llm).unwrap();
    assert_eq!(
        shown["routes"][0]["match"],
        serde_json::json!({"path": {"exact": "/v1/models"}, "method": "GET"})
    );
    assert_eq!(
        shown["routes"][1]["match"]["path"],
        serde_json::json!({"prefix": "/v1/chat"})
    );
}

#[test]
fn a_route_an_earlier_one_always_takes_is_an_error() {
    let text = "\
upstreams:
  llm:
    address: a:1
    routes:
      - name: v1
        match: {path: {prefix: /v1}}
      - name: models
        match: {path: {exact: /v1/models}, method: GET}
      - name: all
      - name: beta
        match: {path: {prefix: /v1beta}}
";
    assert_eq!(
        error(text),
        "policies.yaml:7:15: upstreams.llm.routes[1].match: route \"models\" is never reached: route \"v1\" before it takes every request it matches; put the narrower route first\n\
         policies.yaml:10:15: upstreams.llm.routes[3].match: route \"beta\" is never reached: route \"all\" before it takes every request it matches; put the narrower route first"
    );
}

#[test]
fn route_mistakes_are_reported_where_written() {
    let text = "\
upstreams:
  svc:
    address: a:1
    routes:
      - name: Bad Name
      - name: one
        match: {path: {exact: v1/x}}
      - name: one
        match: {path: {exact: /y, prefix: /z}}
      - name: re
        match: {path: {regex: '('}, method: 'G T'}
      - name: grpc
        match: {grpc: {service: pkg.Svc}}
      - name: held
        match: {path: {exact: /held}}
        retry: {hold_on_pushback: false}
      - name: degraded
        match: {path: {exact: /d}}
        fallback: {body: '{}'}
";
    let message = error(text);
    for expected in [
        "policies.yaml:5:15: upstreams.svc.routes[0].name: a route name must be",
        "policies.yaml:7:23: upstreams.svc.routes[1].match.path: \"v1/x\" is not a path: a path starts with /",
        "policies.yaml:8:15: upstreams.svc.routes[2].name: another route of this upstream is named \"one\"",
        "policies.yaml:9:23: upstreams.svc.routes[2].match.path: give one of exact, prefix or regex",
        "policies.yaml:11:23: upstreams.svc.routes[3].match.path.regex: not a valid regular expression: unclosed group\n",
        "policies.yaml:11:45: upstreams.svc.routes[3].match.method: \"G T\" is not an HTTP method",
        "policies.yaml:13:23: upstreams.svc.routes[4].match.grpc: a gRPC match needs an upstream with protocol: grpc",
        "policies.yaml:16:16: upstreams.svc.routes[5].retry.hold_on_pushback: an upstream's pushback holds all its calls",
        "policies.yaml:19:19: upstreams.svc.routes[6].fallback: a critical upstream never degrades",
    ] {
        assert!(message.contains(expected), "{expected}\nnot in\n{message}");
    }
}

#[test]
fn a_grpc_route_is_the_path_of_its_service_or_method_and_may_degrade_on_its_own() {
    let text = "\
upstreams:
  invoices:
    address: a:1
    protocol: grpc
    routes:
      - name: create
        match: {grpc: {service: billing.v1.Invoices, method: Create}}
        idempotent: false
      - name: reads
        match: {grpc: {service: billing.v1.Invoices}}
        criticality: optional
";
    let config = parse("p.yaml", text).unwrap();
    let invoices = config.upstream("invoices").unwrap();
    let (create, reads) = (&invoices.routes[0], &invoices.routes[1]);
    assert_eq!(
        create.matches.path,
        Some(crate::matching::PathMatch::Exact(
            "/billing.v1.Invoices/Create".into()
        ))
    );
    assert_eq!(create.policy.retry.idempotent, Some(false));
    assert_eq!(
        reads.matches.path,
        Some(crate::matching::PathMatch::Prefix(
            "/billing.v1.Invoices".into()
        ))
    );
    assert_eq!(create.criticality, Criticality::Critical);
    assert!(create.fallback.is_none());
    assert_eq!(reads.criticality, Criticality::Optional);
    assert!(reads.fallback.is_some(), "an optional route degrades");
    assert!(invoices.fallback.is_none(), "its upstream does not");
}

#[test]
fn the_routes_example_of_the_reference_is_valid() {
    let reference = include_str!("../../docs/configuration.md");
    let section = reference.split("### Routes\n").nth(1).unwrap();
    let yaml = section
        .split("```yaml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .unwrap();
    let config = parse("configuration.md", yaml).unwrap_or_else(|e| panic!("{e}"));
    let billing = config.upstream("billing").unwrap();
    assert_eq!(billing.routes.len(), 2);
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
}

#[test]
fn json_rpc_upstreams_route_by_method_and_may_generate_keys() {
    let config = parse(
        "p.yaml",
        "\
upstreams:
  tools:
    address: 127.0.0.1:9000
    protocol: mcp
    routes:
      - name: calls
        match: {jsonrpc: {method: tools/call}}
        retry: {idempotency_key: generate}
  agent:
    address: 127.0.0.1:9001
    protocol: a2a
  rpc:
    address: 127.0.0.1:9002
    protocol: http2
    jsonrpc: true
  web:
    address: 127.0.0.1:9003
",
    )
    .unwrap();
    use crate::jsonrpc::Dialect;
    let tools = config.upstream("tools").unwrap();
    assert_eq!(tools.protocol, Protocol::Http1);
    assert_eq!(tools.jsonrpc, Some(Dialect::Mcp));
    assert!(!tools.policy.retry.generate_idempotency_key);
    let calls = &tools.routes[0];
    assert_eq!(calls.matches.jsonrpc_method.as_deref(), Some("tools/call"));
    assert_eq!(calls.matches.describe(), "JSON-RPC tools/call");
    assert!(calls.policy.retry.generate_idempotency_key);
    assert_eq!(
        config.upstream("agent").unwrap().jsonrpc,
        Some(Dialect::A2a)
    );
    let rpc = config.upstream("rpc").unwrap();
    assert_eq!(
        (rpc.protocol, rpc.jsonrpc),
        (Protocol::Http2, Some(Dialect::Jsonrpc))
    );
    assert_eq!(config.upstream("web").unwrap().jsonrpc, None);
    // The breaker counts JSON-RPC failures unless told otherwise.
    let breaker = tools.policy.circuit_breaker.as_ref().unwrap();
    assert!(
        breaker
            .failure_on
            .matches(crate::classify::Failure::JsonRpc(-32603))
    );
}

#[test]
fn json_rpc_mistakes_are_reported_where_written() {
    let text = "\
upstreams:
  tools:
    address: a:1
    protocol: mcp
    jsonrpc: true
    routes:
      - name: empty
        match: {jsonrpc: {method: ''}}
  grpc:
    address: a:2
    protocol: grpc
    jsonrpc: true
  web:
    address: a:3
    circuit_breaker: {failure_on: [jsonrpc-error]}
    routes:
      - name: calls
        match: {jsonrpc: {method: tools/call}}
";
    let message = error(text);
    for expected in [
        "policies.yaml:5:14: upstreams.tools.jsonrpc: this protocol is JSON-RPC already: remove jsonrpc",
        "policies.yaml:8:26: upstreams.tools.routes[0].match.jsonrpc.method: expected a method such as tools/call",
        "policies.yaml:12:14: upstreams.grpc.jsonrpc: a gRPC upstream does not speak JSON-RPC",
        "policies.yaml:18:26: upstreams.web.routes[0].match.jsonrpc: a JSON-RPC match needs an upstream that speaks it",
    ] {
        assert!(message.contains(expected), "{expected}\nnot in\n{message}");
    }
    assert_eq!(
        error("upstreams:\n  web:\n    address: a:3\n    retry: {idempotency_key: always}\n"),
        "policies.yaml:4:30: upstreams.web.retry.idempotency_key: unknown value \"always\": expected generate"
    );
    // A condition that can never match is warned of.
    let config = parse(
        "p.yaml",
        "upstreams:\n  web:\n    address: a:3\n    circuit_breaker: {failure_on: [jsonrpc-error]}\n",
    )
    .unwrap();
    let warnings: Vec<String> = config.warning_lines().collect();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("upstreams.web.circuit_breaker.failure_on")
                && w.contains("does not speak JSON-RPC")),
        "{warnings:?}"
    );
}
