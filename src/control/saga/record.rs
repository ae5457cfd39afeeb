//! The durable record of a saga: its state, each step's progress and each
//! call's outcome, stored as one JSON document (see `store`) and shown
//! as it is by the APIs; and the events watchers get.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::spec::{Saga, SagaSpec};
use super::template::Answer;
use crate::control::store::StoreError;

/// A saga's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SagaState {
    /// Its actions run.
    Running,
    /// Every step succeeded (or degraded).
    Completed,
    /// A step failed, the deadline passed or it was aborted: the
    /// compensations run.
    Compensating,
    /// Everything done was undone.
    Compensated,
    /// A compensation failed after every retry: a person must look.
    Failed,
    /// An operator aborted it, and everything done was undone.
    Aborted,
}

impl SagaState {
    /// Every state.
    pub const ALL: [SagaState; 6] = [
        SagaState::Running,
        SagaState::Completed,
        SagaState::Compensating,
        SagaState::Compensated,
        SagaState::Failed,
        SagaState::Aborted,
    ];

    /// Its name, as in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            SagaState::Running => "running",
            SagaState::Completed => "completed",
            SagaState::Compensating => "compensating",
            SagaState::Compensated => "compensated",
            SagaState::Failed => "failed",
            SagaState::Aborted => "aborted",
        }
    }

    /// The state named `text`.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Whether the saga has ended.
    pub fn finished(self) -> bool {
        !matches!(self, SagaState::Running | SagaState::Compensating)
    }
}

/// A step's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    /// Not started.
    Pending,
    /// Its action was sent; no answer is recorded yet.
    Running,
    /// Its action succeeded.
    Succeeded,
    /// Its action failed, and its `default` stands in.
    Degraded,
    /// Its action failed.
    Failed,
    /// Its compensation was sent; no answer is recorded yet.
    Compensating,
    /// Its compensation succeeded.
    Compensated,
    /// Its compensation failed after every retry.
    CompensationFailed,
}

/// A wall-clock time: milliseconds in memory, RFC 3339 in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Time(pub u64);

impl Time {
    /// Now.
    pub fn now() -> Self {
        Self::from(SystemTime::now())
    }

    /// As a `SystemTime`.
    pub fn system(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.0)
    }
}

impl From<SystemTime> for Time {
    fn from(t: SystemTime) -> Self {
        let ms = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
        Self(u64::try_from(ms).unwrap_or(u64::MAX))
    }
}

impl Serialize for Time {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_millis(self.system()))
    }
}

impl<'de> Deserialize<'de> for Time {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_rfc3339_weak(&text)
            .map(Time::from)
            .map_err(serde::de::Error::custom)
    }
}

/// How one call (an action or a compensation) went.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CallRecord {
    /// Times it was sent; a restart while it was in flight sends it again.
    pub sends: u32,
    /// Attempts made under the upstream's retry policy, over every send.
    pub attempts: u32,
    /// When the latest send started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When its answer (or failure) was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// The answer's HTTP status (0: no answer).
    #[serde(default)]
    pub status: u16,
    /// The answer's gRPC status, for gRPC calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<i32>,
    /// The answer's first bytes.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub summary: String,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When it is sent again (the step's `retry`), after a failure for
    /// want of the upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_send_at: Option<Time>,
}

/// One step's progress.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRecord {
    /// The step's name.
    pub name: String,
    /// Where it is.
    pub state: StepState,
    /// Its action.
    pub action: CallRecord,
    /// Its compensation, once started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation: Option<CallRecord>,
    /// What later steps see: the action's answer, or the step's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<Answer>,
}

/// A saga as stored and as the APIs show it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SagaRecord {
    /// Its id.
    pub id: String,
    /// Its state.
    pub state: SagaState,
    /// Why it compensated, failed or was aborted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When it was started.
    pub created_at: Time,
    /// Its latest transition.
    pub updated_at: Time,
    /// When its deadline passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_at: Option<Time>,
    /// An operator asked to abort it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub abort_requested: bool,
    /// The dead letter of the compensation that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_id: Option<String>,
    /// Each step's progress, in order.
    pub steps: Vec<StepRecord>,
    /// The definition, as submitted.
    pub definition: SagaSpec,
}

impl SagaRecord {
    /// A new saga's record: running, every step pending.
    pub fn new(spec: SagaSpec, saga: &Saga, now: Time) -> Self {
        let deadline_at = saga.deadline.map(|d| {
            Time(
                now.0
                    .saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            )
        });
        Self {
            id: spec.id.clone(),
            state: SagaState::Running,
            error: None,
            created_at: now,
            updated_at: now,
            deadline_at,
            abort_requested: false,
            dead_letter_id: None,
            steps: saga
                .steps
                .iter()
                .map(|s| StepRecord {
                    name: s.name.clone(),
                    state: StepState::Pending,
                    action: CallRecord::default(),
                    compensation: None,
                    answer: None,
                })
                .collect(),
            definition: spec,
        }
    }

    /// Decodes a stored record.
    pub fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        serde_json::from_slice(bytes)
            .map_err(|e| StoreError::Storage(format!("a saga record does not decode: {e}")))
    }

    /// What later steps see of the steps done so far, by name.
    pub(super) fn answers(&self) -> BTreeMap<String, Answer> {
        self.steps
            .iter()
            .filter_map(|s| Some((s.name.clone(), s.answer.clone()?)))
            .collect()
    }
}

/// Something that happened to a saga, for watchers.
#[derive(Debug, Clone, Serialize)]
pub struct SagaEvent {
    /// The saga.
    pub saga_id: String,
    /// Its state after the event.
    pub state: SagaState,
    /// The step it is about, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// That step's state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_state: Option<StepState>,
    /// What happened.
    pub message: String,
    /// When.
    pub at: Time,
}

impl SagaEvent {
    /// The event that describes a saga as it is now (the first one a
    /// watcher of one saga gets).
    pub fn snapshot(record: &SagaRecord) -> Self {
        Self {
            saga_id: record.id.clone(),
            state: record.state,
            step: None,
            step_state: None,
            message: format!("saga is {}", record.state.as_str()),
            at: record.updated_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_and_times_read_as_rfc3339() {
        for state in SagaState::ALL {
            assert_eq!(SagaState::parse(state.as_str()), Some(state));
        }
        assert!(SagaState::Failed.finished());
        assert!(!SagaState::Compensating.finished());
        let t = Time(1_700_000_000_123);
        let text = serde_json::to_string(&t).unwrap();
        assert_eq!(text, "\"2023-11-14T22:13:20.123Z\"");
        assert_eq!(serde_json::from_str::<Time>(&text).unwrap(), t);
    }
}
