//! A saga as submitted: its steps, their actions and compensations, and
//! the checks made before anything runs.
//!
//! ```yaml
//! id: signup-ann
//! input: {user: {name: Ann, email: ann@example.com}}
//! deadline: 30s
//! steps:
//!   - name: create-user
//!     action: {upstream: users, method: POST, path: /users, body: {name: "{{input.user.name}}"}}
//!     compensation: {upstream: users, method: DELETE, path: "/users/{{steps.create-user.body.id}}"}
//!   - name: send-email
//!     action: {upstream: email, method: /mail.v1.Mailer/Send, message_base64: CgNhbm4=}
//!     on_failure: continue
//!     default: {sent: false}
//! ```
//!
//! A call is HTTP (`method`, `path`, `headers`, `body`) or gRPC (`method`
//! written as `/package.Service/Method`, `message_base64`, `metadata`).
//! Every template is parsed and checked here: an action may refer to the
//! steps before it, a compensation to its own step's answer too.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::template::{self, Reference, Template};
use crate::values::HumanDuration;

/// Longest saga id and step name.
const MAX_NAME_BYTES: usize = 256;

/// A saga as written (JSON over the API, YAML for the CLI).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SagaSpec {
    /// Chosen by the client; starting the same id twice is one saga.
    pub id: String,
    /// The document steps refer to as `input`.
    #[serde(default)]
    pub input: Value,
    /// The whole run's bound; on expiry, the saga compensates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deadline: Option<HumanDuration>,
    /// The steps, in order.
    pub steps: Vec<StepSpec>,
}

/// One step as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    /// Unique within the saga.
    pub name: String,
    /// What the step does.
    pub action: CallSpec,
    /// What undoes it, if anything.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compensation: Option<CallSpec>,
    /// `fail` (default) or `continue`.
    #[serde(default)]
    pub on_failure: OnFailure,
    /// With `continue`: the answer body later steps see when it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default: Option<Value>,
    /// Sends again, durably and after a wait, when the call failed for
    /// want of the upstream (no answer, an open circuit, 5xx, 429): the
    /// saga waits out an outage instead of compensating. Applies to the
    /// compensation too.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<StepRetrySpec>,
    /// Not sent before this time (RFC 3339, such as
    /// `2026-12-05T09:00:00Z`): a durable timer, kept across restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<super::record::Time>,
}

/// A step's own retries, on top of its upstream's policy.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StepRetrySpec {
    /// Sends in all, the first included.
    pub max_sends: u32,
    /// The wait before the second send...
    pub interval: HumanDuration,
    /// ...multiplied by this for each later one (default 2)...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backoff: Option<f64>,
    /// ...up to this (default 1m).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_interval: Option<HumanDuration>,
}

/// A step's checked retries.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepRetry {
    /// Sends in all.
    pub max_sends: u32,
    /// The first wait.
    pub interval: Duration,
    /// Its growth.
    pub backoff: f64,
    /// The longest wait.
    pub max_interval: Duration,
}

impl StepRetry {
    /// The wait after send number `sends` (1 for the first).
    pub fn wait_after(&self, sends: u32) -> Duration {
        let factor = self
            .backoff
            .powi(i32::try_from(sends.saturating_sub(1)).unwrap_or(i32::MAX));
        let wait = self.interval.as_secs_f64() * factor;
        if wait.is_finite() {
            Duration::from_secs_f64(wait.min(self.max_interval.as_secs_f64()))
        } else {
            self.max_interval
        }
    }
}

/// What a step's final failure does to the saga.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// The saga stops and compensates.
    #[default]
    Fail,
    /// The step degrades to its `default`; the saga goes on.
    Continue,
}

/// A call as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CallSpec {
    /// A configured upstream's name.
    pub upstream: String,
    /// An HTTP method, or a gRPC method as `/package.Service/Method`.
    pub method: String,
    /// HTTP: the path and query.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// HTTP: headers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// HTTP: a JSON body.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
    /// gRPC: the request message, base64.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_base64: Option<String>,
    /// gRPC: metadata.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// A checked saga, ready to run.
#[derive(Debug, Clone)]
pub struct Saga {
    /// Its id.
    pub id: String,
    /// Its input.
    pub input: Value,
    /// Its bound, if any.
    pub deadline: Option<Duration>,
    /// Its steps.
    pub steps: Vec<Step>,
}

/// A checked step.
#[derive(Debug, Clone)]
pub struct Step {
    /// Its name.
    pub name: String,
    /// Its action.
    pub action: Call,
    /// Its compensation.
    pub compensation: Option<Call>,
    /// `Some(default)` when its failure degrades instead of failing.
    pub degrade_to: Option<Value>,
    /// Its own retries (1 send when `None`).
    pub retry: Option<StepRetry>,
    /// Not sent before this time.
    pub not_before: Option<super::record::Time>,
}

/// A checked call.
#[derive(Debug, Clone)]
pub struct Call {
    /// The upstream.
    pub upstream: String,
    /// What is sent.
    pub kind: CallKind,
}

/// HTTP or gRPC, with templates parsed.
#[derive(Debug, Clone)]
pub enum CallKind {
    /// An HTTP request.
    Http {
        /// The method.
        method: http::Method,
        /// The path (a template).
        path: Template,
        /// Headers (values are templates).
        headers: Vec<(http::HeaderName, Template)>,
        /// A JSON body (strings are templates).
        body: Option<Value>,
    },
    /// A gRPC unary call.
    Grpc {
        /// `/package.Service/Method`.
        method: String,
        /// The request message.
        message: Bytes,
        /// Metadata (values are templates).
        metadata: Vec<(http::HeaderName, Template)>,
    },
}

fn name_problem(what: &str, name: &str) -> Option<String> {
    if name.is_empty() {
        Some(format!("{what} is empty"))
    } else if name.len() > MAX_NAME_BYTES {
        Some(format!("{what} is over {MAX_NAME_BYTES} bytes"))
    } else if name.chars().any(char::is_control) {
        Some(format!("{what} contains control characters"))
    } else {
        None
    }
}

/// Collects every problem of a spec, each prefixed with where it is.
struct Problems(Vec<String>);

impl Problems {
    fn add(&mut self, at: &str, message: impl fmt::Display) {
        self.0.push(format!("{at}: {message}"));
    }
}

impl SagaSpec {
    /// Checks everything that can be checked before running, and returns
    /// the saga, or every problem found (`steps[1].compensation.path: ...`).
    pub fn check(self) -> Result<Saga, Vec<String>> {
        let mut problems = Problems(Vec::new());
        if let Some(problem) = name_problem("id", &self.id) {
            problems.add("id", problem);
        }
        if self.steps.is_empty() {
            problems.add("steps", "a saga needs at least one step");
        }
        let owned_names: Vec<String> = self.steps.iter().map(|s| s.name.clone()).collect();
        let names: Vec<&str> = owned_names.iter().map(String::as_str).collect();
        let mut seen = HashSet::new();
        for (i, step) in self.steps.iter().enumerate() {
            let at = format!("steps[{i}]");
            if let Some(problem) = name_problem("name", &step.name) {
                problems.add(&format!("{at}.name"), problem);
            } else if !seen.insert(step.name.as_str()) {
                problems.add(
                    &format!("{at}.name"),
                    format!("{:?} is used twice", step.name),
                );
            }
            if step.on_failure == OnFailure::Continue && step.default.is_none() {
                problems.add(
                    &format!("{at}.default"),
                    "on_failure: continue needs a default",
                );
            }
            if let Some(retry) = &step.retry {
                if !(1..=1000).contains(&retry.max_sends) {
                    problems.add(&format!("{at}.retry.max_sends"), "must be 1 to 1000");
                }
                if retry.backoff.is_some_and(|b| !(1.0..=10.0).contains(&b)) {
                    problems.add(&format!("{at}.retry.backoff"), "must be 1 to 10");
                }
                if retry.interval.0.is_zero() {
                    problems.add(&format!("{at}.retry.interval"), "must be positive");
                }
            }
            if step.on_failure == OnFailure::Fail && step.default.is_some() {
                problems.add(
                    &format!("{at}.default"),
                    "a default is only used with on_failure: continue",
                );
            }
        }
        let mut steps = Vec::with_capacity(self.steps.len());
        for (i, step) in self.steps.into_iter().enumerate() {
            let at = format!("steps[{i}]");
            // An action sees the steps before it; a compensation its own
            // step's answer too.
            let action = check_call(
                step.action,
                &format!("{at}.action"),
                i,
                &names,
                &self.input,
                &mut problems,
            );
            let compensation = step.compensation.map(|c| {
                check_call(
                    c,
                    &format!("{at}.compensation"),
                    i + 1,
                    &names,
                    &self.input,
                    &mut problems,
                )
            });
            let retry = step.retry.map(|r| StepRetry {
                max_sends: r.max_sends,
                interval: r.interval.0,
                backoff: r.backoff.unwrap_or(2.0),
                max_interval: r.max_interval.map_or(Duration::from_secs(60), |m| m.0),
            });
            let degrade_to = match step.on_failure {
                OnFailure::Continue => step.default,
                OnFailure::Fail => None,
            };
            // A call with problems is `None`; they are recorded already.
            let compensation = match compensation {
                None => Some(None),
                Some(checked) => checked.map(Some),
            };
            if let (Some(action), Some(compensation)) = (action, compensation) {
                steps.push(Step {
                    name: step.name,
                    action,
                    compensation,
                    degrade_to,
                    retry,
                    not_before: step.not_before,
                });
            }
        }
        if !problems.0.is_empty() {
            return Err(problems.0);
        }
        Ok(Saga {
            id: self.id,
            input: self.input,
            deadline: self.deadline.map(|d| d.0),
            steps,
        })
    }
}

/// Checks a call's references against the steps before `visible`.
fn check_refs(
    references: impl IntoIterator<Item = Reference>,
    at: &str,
    visible: usize,
    names: &[&str],
    input: &Value,
    problems: &mut Problems,
) {
    for reference in references {
        if let Err(e) = template::check(&reference, visible, names, input) {
            problems.add(at, e);
        }
    }
}

/// Checks one call and parses its templates: one rule after another, each
/// naming its field, which reads best as one list.
fn check_call(
    call: CallSpec,
    at: &str,
    visible: usize,
    names: &[&str],
    input: &Value,
    problems: &mut Problems,
) -> Option<Call> {
    let before = problems.0.len();
    if call.upstream.is_empty() {
        problems.add(&format!("{at}.upstream"), "upstream is empty");
    }
    let mut templates = |field: &str, entries: &BTreeMap<String, String>| {
        let mut parsed = Vec::new();
        for (name, value) in entries {
            let field = format!("{at}.{field}.{name}");
            let Ok(header) = http::HeaderName::from_bytes(name.as_bytes()) else {
                problems.add(&field, format!("{name:?} is not a valid header name"));
                continue;
            };
            match Template::parse(value) {
                Ok(t) => {
                    check_refs(
                        t.references().cloned(),
                        &field,
                        visible,
                        names,
                        input,
                        problems,
                    );
                    parsed.push((header, t));
                }
                Err(e) => problems.add(&field, e),
            }
        }
        parsed
    };
    let kind = if call.method.starts_with('/') {
        let metadata = templates("metadata", &call.metadata);
        for (field, set) in [
            ("path", call.path.is_some()),
            ("body", call.body.is_some()),
            ("headers", !call.headers.is_empty()),
        ] {
            if set {
                problems.add(
                    &format!("{at}.{field}"),
                    "a gRPC call has message_base64 and metadata, not path, headers or body",
                );
            }
        }
        let parts: Vec<&str> = call.method[1..].split('/').collect();
        if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
            problems.add(
                &format!("{at}.method"),
                format!("{:?} is not /package.Service/Method", call.method),
            );
        }
        let message = match call
            .message_base64
            .as_deref()
            .map(|m| base64::engine::general_purpose::STANDARD.decode(m.trim()))
        {
            None => Bytes::new(),
            Some(Ok(bytes)) => Bytes::from(bytes),
            Some(Err(e)) => {
                problems.add(
                    &format!("{at}.message_base64"),
                    format!("not valid base64: {e}"),
                );
                Bytes::new()
            }
        };
        CallKind::Grpc {
            method: call.method,
            message,
            metadata,
        }
    } else {
        let headers = templates("headers", &call.headers);
        if call.message_base64.is_some() || !call.metadata.is_empty() {
            problems.add(
                &format!("{at}.message_base64"),
                "message_base64 and metadata are for gRPC calls (method: /package.Service/Method)",
            );
        }
        let method = http::Method::from_bytes(call.method.as_bytes()).unwrap_or_else(|_| {
            problems.add(
                &format!("{at}.method"),
                format!(
                    "{:?} is not an HTTP method or a gRPC /package.Service/Method",
                    call.method
                ),
            );
            http::Method::GET
        });
        let path_text = call.path.unwrap_or_else(|| "/".to_owned());
        if !path_text.starts_with('/') {
            problems.add(
                &format!("{at}.path"),
                format!("{path_text:?} does not start with /"),
            );
        }
        let path = match Template::parse(&path_text) {
            Ok(path) => {
                check_refs(
                    path.references().cloned(),
                    &format!("{at}.path"),
                    visible,
                    names,
                    input,
                    problems,
                );
                path
            }
            Err(e) => {
                problems.add(&format!("{at}.path"), e);
                Template::parse("/").expect("a plain path parses")
            }
        };
        if let Some(body) = &call.body {
            match template::json_references(body) {
                Ok(references) => check_refs(
                    references,
                    &format!("{at}.body"),
                    visible,
                    names,
                    input,
                    problems,
                ),
                Err(e) => problems.add(&format!("{at}.body"), e),
            }
        }
        CallKind::Http {
            method,
            path,
            headers,
            body: call.body,
        }
    };
    (problems.0.len() == before).then_some(Call {
        upstream: call.upstream,
        kind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> SagaSpec {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn a_step_s_not_before_is_a_time_as_yaml_writes_it() {
        let saga = spec(
            "id: later\nsteps:\n  - name: remind\n    action: {upstream: mail, method: POST, path: /mail}\n    not_before: 2026-12-05T09:00:00Z\n",
        )
        .check()
        .unwrap();
        let at = saga.steps[0].not_before.unwrap();
        assert_eq!(
            humantime::format_rfc3339(at.system()).to_string(),
            "2026-12-05T09:00:00Z"
        );
        let bad: Result<SagaSpec, _> = serde_saphyr::from_str(
            "id: x\nsteps:\n  - name: a\n    action: {upstream: u, method: GET, path: /}\n    not_before: tomorrow\n",
        );
        assert!(bad.is_err());
    }

    #[test]
    fn the_classic_signup_saga_checks() {
        let saga = spec(
            "id: signup-ann\ninput: {user: {name: Ann}}\ndeadline: 30s\nsteps:\n  - name: create-user\n    action: {upstream: users, method: POST, path: /users, body: {name: '{{input.user.name}}'}}\n    compensation: {upstream: users, method: DELETE, path: '/users/{{steps.create-user.body.id}}'}\n  - name: create-subscription\n    action: {upstream: billing, method: POST, path: /subscriptions, body: {user: '{{steps.create-user.body.id}}'}}\n    compensation: {upstream: billing, method: DELETE, path: '/subscriptions/{{steps.create-subscription.body.id}}'}\n  - name: send-email\n    action: {upstream: email, method: /mail.v1.Mailer/Send, message_base64: CgNhbm4=, metadata: {x-user: '{{steps.create-user.body.id}}'}}\n",
        )
        .check()
        .unwrap();
        assert_eq!(saga.steps.len(), 3);
        assert_eq!(saga.deadline, Some(Duration::from_secs(30)));
        assert!(saga.steps[0].compensation.is_some());
        match &saga.steps[2].action.kind {
            CallKind::Grpc {
                method, message, ..
            } => {
                assert_eq!(method, "/mail.v1.Mailer/Send");
                assert_eq!(message, &b"\n\x03ann"[..]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_problem_is_named_with_its_place() {
        let problems = spec(
            "id: ''\nsteps:\n  - name: a\n    action: {upstream: u, method: POST, path: '/x/{{steps.b.body.id}}'}\n    on_failure: continue\n  - name: a\n    action: {upstream: u, method: 'NOT A METHOD', path: nope}\n    compensation: {upstream: u, method: /bad, message_base64: '!!'}\n  - name: b\n    action: {upstream: u, method: GET, path: '/{{input.missing}}', body: {v: '{{steps.a.bogus}}'}}\n",
        )
        .check()
        .unwrap_err();
        let expected = [
            "id: id is empty",
            "steps[0].default: on_failure: continue needs a default",
            "steps[1].name: \"a\" is used twice",
            "steps[0].action.path: cannot resolve {{steps.b.body.id}}: step \"b\" does not run before this one",
            "steps[1].action.method: \"NOT A METHOD\" is not an HTTP method",
            "steps[1].action.path: \"nope\" does not start with /",
            "steps[1].compensation.method: \"/bad\" is not /package.Service/Method",
            "steps[1].compensation.message_base64: not valid base64",
            "steps[2].action.path: cannot resolve {{input.missing}}",
            "steps[2].action.body: {{steps.a.bogus}} is not a reference",
        ];
        for e in expected {
            assert!(
                problems.iter().any(|p| p.starts_with(e)),
                "{e:?} not in {problems:#?}"
            );
        }
    }

    #[test]
    fn a_compensation_may_use_its_own_steps_answer_an_action_may_not() {
        let own = "id: s\nsteps:\n  - name: a\n    action: {upstream: u, method: POST, path: '/x/{{steps.a.body.id}}'}\n";
        let problems = spec(own).check().unwrap_err();
        assert!(
            problems[0].contains("step \"a\" does not run before this one"),
            "{problems:?}"
        );
        let comp = "id: s\nsteps:\n  - name: a\n    action: {upstream: u, method: POST, path: /x}\n    compensation: {upstream: u, method: DELETE, path: '/x/{{steps.a.body.id}}'}\n";
        assert!(spec(comp).check().is_ok());
    }
}
