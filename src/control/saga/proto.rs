//! Sagas between their protobuf form (the gRPC API and the CLI) and their
//! JSON form (the store, the JSON API, the YAML files).

use base64::Engine as _;
use bytes::Bytes;
use prost_types::value::Kind;
use serde_json::Value;

use super::record::{CallRecord, SagaEvent, SagaRecord, SagaState, StepRecord, StepState, Time};
use super::spec::{CallSpec, OnFailure, SagaSpec, StepRetrySpec, StepSpec};
use crate::api;
use crate::values::HumanDuration;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// A JSON value as a `google.protobuf.Value`.
pub fn to_value(value: &Value) -> prost_types::Value {
    let kind = match value {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(to_value).collect(),
        }),
        Value::Object(fields) => Kind::StructValue(prost_types::Struct {
            fields: fields
                .iter()
                .map(|(k, v)| (k.clone(), to_value(v)))
                .collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

/// A `google.protobuf.Value` as JSON; whole numbers stay integers, so
/// `42` is not rendered `42.0` into a path.
pub fn from_value(value: prost_types::Value) -> Value {
    match value.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(b),
        #[allow(clippy::cast_possible_truncation)]
        Some(Kind::NumberValue(n)) if n.fract() == 0.0 && n.abs() < 9.007e15 => {
            Value::from(n as i64)
        }
        Some(Kind::NumberValue(n)) => {
            serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number)
        }
        Some(Kind::StringValue(s)) => Value::String(s),
        Some(Kind::ListValue(list)) => {
            Value::Array(list.values.into_iter().map(from_value).collect())
        }
        Some(Kind::StructValue(s)) => Value::Object(
            s.fields
                .into_iter()
                .map(|(k, v)| (k, from_value(v)))
                .collect(),
        ),
    }
}

fn call_to_proto(call: &CallSpec) -> api::Call {
    api::Call {
        upstream: call.upstream.clone(),
        method: call.method.clone(),
        path: call.path.clone().unwrap_or_default(),
        headers: call.headers.clone().into_iter().collect(),
        body: call.body.as_ref().map(to_value),
        message: call
            .message_base64
            .as_deref()
            .and_then(|m| B64.decode(m.trim()).ok())
            .map(Bytes::from)
            .unwrap_or_default(),
        metadata: call.metadata.clone().into_iter().collect(),
    }
}

fn call_from_proto(call: api::Call) -> CallSpec {
    let grpc = call.method.starts_with('/');
    CallSpec {
        upstream: call.upstream,
        method: call.method,
        path: (!call.path.is_empty()).then_some(call.path),
        headers: call.headers.into_iter().collect(),
        body: call.body.map(from_value),
        message_base64: (grpc && !call.message.is_empty()).then(|| B64.encode(&call.message)),
        metadata: call.metadata.into_iter().collect(),
    }
}

/// A definition as protobuf.
pub fn spec_to_proto(spec: &SagaSpec) -> api::SagaDefinition {
    api::SagaDefinition {
        id: spec.id.clone(),
        input: (!spec.input.is_null()).then(|| to_value(&spec.input)),
        deadline: spec
            .deadline
            .and_then(|d| prost_types::Duration::try_from(d.0).ok()),
        steps: spec
            .steps
            .iter()
            .map(|s| api::StepDefinition {
                name: s.name.clone(),
                action: Some(call_to_proto(&s.action)),
                compensation: s.compensation.as_ref().map(call_to_proto),
                continue_on_failure: s.on_failure == OnFailure::Continue,
                default: s.default.as_ref().map(to_value),
                retry: s.retry.map(|r| api::StepRetry {
                    max_sends: r.max_sends,
                    interval: prost_types::Duration::try_from(r.interval.0).ok(),
                    backoff: r.backoff.unwrap_or_default(),
                    max_interval: r
                        .max_interval
                        .and_then(|m| prost_types::Duration::try_from(m.0).ok()),
                }),
                not_before: timestamp(s.not_before),
            })
            .collect(),
    }
}

fn duration(d: Option<prost_types::Duration>, what: &str) -> Result<std::time::Duration, String> {
    d.and_then(|d| std::time::Duration::try_from(d).ok())
        .ok_or_else(|| format!("{what} is missing or negative"))
}

/// A protobuf definition as a spec, ready for its checks.
pub fn spec_from_proto(definition: api::SagaDefinition) -> Result<SagaSpec, String> {
    let deadline = match definition.deadline {
        None => None,
        Some(d) => Some(HumanDuration(
            std::time::Duration::try_from(d).map_err(|_| "deadline is negative".to_owned())?,
        )),
    };
    let mut steps = Vec::with_capacity(definition.steps.len());
    for (i, step) in definition.steps.into_iter().enumerate() {
        let action = step
            .action
            .ok_or_else(|| format!("steps[{i}].action is missing"))?;
        steps.push(StepSpec {
            name: step.name,
            action: call_from_proto(action),
            compensation: step.compensation.map(call_from_proto),
            on_failure: if step.continue_on_failure {
                OnFailure::Continue
            } else {
                OnFailure::Fail
            },
            default: step.default.map(from_value),
            retry: match step.retry {
                None => None,
                Some(r) => Some(StepRetrySpec {
                    max_sends: r.max_sends,
                    interval: HumanDuration(duration(
                        r.interval,
                        &format!("steps[{i}].retry.interval"),
                    )?),
                    backoff: (r.backoff != 0.0).then_some(r.backoff),
                    max_interval: match r.max_interval {
                        None => None,
                        Some(m) => Some(HumanDuration(duration(
                            Some(m),
                            &format!("steps[{i}].retry.max_interval"),
                        )?)),
                    },
                }),
            },
            not_before: time(step.not_before),
        });
    }
    Ok(SagaSpec {
        id: definition.id,
        input: definition.input.map_or(Value::Null, from_value),
        deadline,
        steps,
    })
}

fn timestamp(t: Option<Time>) -> Option<prost_types::Timestamp> {
    t.map(|t| prost_types::Timestamp::from(t.system()))
}

fn time(t: Option<prost_types::Timestamp>) -> Option<Time> {
    std::time::SystemTime::try_from(t?).ok().map(Time::from)
}

/// A saga state as its protobuf enum.
pub fn state_to_proto(state: SagaState) -> api::SagaState {
    match state {
        SagaState::Running => api::SagaState::Running,
        SagaState::Completed => api::SagaState::Completed,
        SagaState::Compensating => api::SagaState::Compensating,
        SagaState::Compensated => api::SagaState::Compensated,
        SagaState::Failed => api::SagaState::Failed,
        SagaState::Aborted => api::SagaState::Aborted,
    }
}

/// A protobuf saga state (`None`: unspecified or unknown).
pub fn state_from_proto(state: i32) -> Option<SagaState> {
    Some(match api::SagaState::try_from(state).ok()? {
        api::SagaState::Unspecified => return None,
        api::SagaState::Running => SagaState::Running,
        api::SagaState::Completed => SagaState::Completed,
        api::SagaState::Compensating => SagaState::Compensating,
        api::SagaState::Compensated => SagaState::Compensated,
        api::SagaState::Failed => SagaState::Failed,
        api::SagaState::Aborted => SagaState::Aborted,
    })
}

const STEP_STATES: [(StepState, api::StepState); 8] = [
    (StepState::Pending, api::StepState::Pending),
    (StepState::Running, api::StepState::Running),
    (StepState::Succeeded, api::StepState::Succeeded),
    (StepState::Degraded, api::StepState::Degraded),
    (StepState::Failed, api::StepState::Failed),
    (StepState::Compensating, api::StepState::Compensating),
    (StepState::Compensated, api::StepState::Compensated),
    (
        StepState::CompensationFailed,
        api::StepState::CompensationFailed,
    ),
];

fn step_state_to_proto(state: StepState) -> api::StepState {
    STEP_STATES
        .iter()
        .find(|(s, _)| *s == state)
        .map_or(api::StepState::Unspecified, |(_, p)| *p)
}

fn step_state_from_proto(state: i32) -> StepState {
    STEP_STATES
        .iter()
        .find(|(_, p)| *p as i32 == state)
        .map_or(StepState::Pending, |(s, _)| *s)
}

fn call_status(call: &CallRecord) -> api::CallStatus {
    api::CallStatus {
        sends: call.sends,
        attempts: call.attempts,
        started_at: timestamp(call.started_at),
        finished_at: timestamp(call.finished_at),
        status: u32::from(call.status),
        grpc_status: call.grpc_status.unwrap_or(-1),
        answer_summary: call.summary.clone(),
        error: call.error.clone().unwrap_or_default(),
        next_send_at: timestamp(call.next_send_at),
    }
}

fn call_record(call: api::CallStatus) -> CallRecord {
    CallRecord {
        sends: call.sends,
        attempts: call.attempts,
        started_at: time(call.started_at),
        finished_at: time(call.finished_at),
        status: u16::try_from(call.status).unwrap_or_default(),
        grpc_status: (call.grpc_status >= 0).then_some(call.grpc_status),
        summary: call.answer_summary,
        error: (!call.error.is_empty()).then_some(call.error),
        next_send_at: time(call.next_send_at),
    }
}

/// A saga as protobuf; with its definition or without (lists).
pub fn record_to_proto(record: &SagaRecord, with_definition: bool) -> api::Saga {
    api::Saga {
        id: record.id.clone(),
        state: state_to_proto(record.state) as i32,
        steps: record
            .steps
            .iter()
            .zip(&record.definition.steps)
            .map(|(step, spec)| api::StepStatus {
                name: step.name.clone(),
                state: step_state_to_proto(step.state) as i32,
                action: Some(call_status(&step.action)),
                compensation: step.compensation.as_ref().map(call_status),
                has_compensation: spec.compensation.is_some(),
            })
            .collect(),
        error: record.error.clone().unwrap_or_default(),
        created_at: timestamp(Some(record.created_at)),
        updated_at: timestamp(Some(record.updated_at)),
        deadline_at: timestamp(record.deadline_at),
        abort_requested: record.abort_requested,
        dead_letter_id: record.dead_letter_id.clone().unwrap_or_default(),
        definition: with_definition.then(|| spec_to_proto(&record.definition)),
    }
}

/// A protobuf saga as a record (the CLI prints records). Answers are not
/// in the protobuf form, so the record has none; a saga listed without
/// its definition gets an empty one.
pub fn record_from_proto(saga: api::Saga) -> SagaRecord {
    let definition = saga
        .definition
        .and_then(|d| spec_from_proto(d).ok())
        .unwrap_or_else(|| SagaSpec {
            id: saga.id.clone(),
            input: Value::Null,
            deadline: None,
            steps: Vec::new(),
        });
    SagaRecord {
        state: state_from_proto(saga.state).unwrap_or(SagaState::Running),
        steps: saga
            .steps
            .into_iter()
            .map(|s| StepRecord {
                name: s.name,
                state: step_state_from_proto(s.state),
                action: s.action.map(call_record).unwrap_or_default(),
                compensation: s.compensation.map(call_record),
                answer: None,
            })
            .collect(),
        error: (!saga.error.is_empty()).then_some(saga.error),
        created_at: time(saga.created_at).unwrap_or(Time(0)),
        updated_at: time(saga.updated_at).unwrap_or(Time(0)),
        deadline_at: time(saga.deadline_at),
        abort_requested: saga.abort_requested,
        dead_letter_id: (!saga.dead_letter_id.is_empty()).then_some(saga.dead_letter_id),
        definition,
        id: saga.id,
    }
}

/// An event as protobuf.
pub fn event_to_proto(event: &SagaEvent) -> api::SagaEvent {
    api::SagaEvent {
        saga_id: event.saga_id.clone(),
        state: state_to_proto(event.state) as i32,
        step: event.step.clone().unwrap_or_default(),
        step_state: event
            .step_state
            .map_or(api::StepState::Unspecified, step_state_to_proto) as i32,
        message: event.message.clone(),
        at: timestamp(Some(event.at)),
    }
}

/// A protobuf event, as the CLI prints it.
pub fn event_from_proto(event: api::SagaEvent) -> SagaEvent {
    SagaEvent {
        state: state_from_proto(event.state).unwrap_or(SagaState::Running),
        step: (!event.step.is_empty()).then_some(event.step),
        step_state: (event.step_state != 0).then(|| step_state_from_proto(event.step_state)),
        message: event.message,
        at: time(event.at).unwrap_or(Time(0)),
        saga_id: event.saga_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn definitions_round_trip_through_protobuf() {
        let spec: SagaSpec = serde_json::from_value(json!({
            "id": "signup-1",
            "input": {"user": {"name": "Ann", "age": 42, "score": 0.5}},
            "deadline": "30s",
            "steps": [
                {"name": "user", "action": {"upstream": "users", "method": "POST", "path": "/users",
                  "body": {"name": "{{input.user.name}}"}, "headers": {"x-a": "b"}},
                 "compensation": {"upstream": "users", "method": "DELETE", "path": "/users/{{steps.user.body.id}}"}},
                {"name": "mail", "action": {"upstream": "mail", "method": "/mail.v1.Mailer/Send",
                  "message_base64": "CgNhbm4=", "metadata": {"x-b": "c"}},
                 "on_failure": "continue", "default": {"sent": false},
                 "retry": {"max_sends": 5, "interval": "100ms", "max_interval": "2s"}}
            ]
        }))
        .unwrap();
        let back = spec_from_proto(spec_to_proto(&spec)).unwrap();
        assert_eq!(
            serde_json::to_value(&back).unwrap(),
            serde_json::to_value(&spec).unwrap()
        );
        assert_eq!(back.input["user"]["age"], json!(42));
        assert!(back.check().is_ok());
    }
}
