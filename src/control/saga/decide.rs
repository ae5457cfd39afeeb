//! The saga state machine: every decision the executor makes, as a
//! function of the record, the definition, what happened and the time.
//!
//! Nothing here waits, stores or calls. Each function changes the record
//! in place and returns the [`Transition`] to persist (if any) and the
//! next [`Move`]; the executor persists the transition (durably, through
//! the group commit) and only then acts on it. That split is what makes a
//! crash harmless, and what lets these rules be tested under a made-up
//! clock, without a store or an upstream.

use std::collections::BTreeMap;

use super::call::{CallOutcome, Prepared, prepare};
use super::record::{CallRecord, SagaRecord, SagaState, StepState, Time};
use super::spec::{Saga, StepRetry};
use super::template::{Answer, Scope};

/// What the executor does next for one saga.
#[derive(Debug)]
pub(crate) enum Move {
    /// Send a call for step `step` (its compensation when `undo`).
    Send {
        step: usize,
        undo: bool,
        prepared: Box<Prepared>,
    },
    /// A transition was made; decide again.
    Again,
    /// A step waits to be sent again: decide again at this time.
    Wait(Time),
    /// The saga has ended (or is not this executor's to run).
    Done,
}

/// A change made to the record, to persist before anything it announces
/// happens.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Transition {
    /// The step it is about, for watchers.
    pub step: Option<usize>,
    /// What happened, for watchers.
    pub message: String,
    /// What else the executor does with it.
    pub effect: Effect,
}

/// What the executor does beside persisting a transition.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Effect {
    /// Nothing.
    None,
    /// A compensation has its final outcome (counted).
    Compensated { ok: bool },
    /// A compensation finally failed: before the record is saved, a dead
    /// letter of the call is enqueued (with `reason`) and the record names
    /// it. The saga needs a person.
    NeedsPerson { reason: String, attempts: u32 },
}

impl Transition {
    fn new(step: Option<usize>, message: String) -> Self {
        Self {
            step,
            message,
            effect: Effect::None,
        }
    }
}

/// The next transition and move of a saga, as it stands at `now`.
pub(crate) fn next(record: &mut SagaRecord, saga: &Saga, now: Time) -> (Option<Transition>, Move) {
    match record.state {
        SagaState::Running => forward(record, saga, now),
        SagaState::Compensating => backward(record, saga, now),
        _ => (None, Move::Done),
    }
}

fn forward(record: &mut SagaRecord, saga: &Saga, now: Time) -> (Option<Transition>, Move) {
    let deadline_passed = record.deadline_at.is_some_and(|at| at <= now);
    if record.abort_requested || deadline_passed {
        // A step waiting to be sent again is given up.
        for step in &mut record.steps {
            if step.state == StepState::Running && step.action.next_send_at.take().is_some() {
                step.state = StepState::Failed;
            }
        }
        record.state = SagaState::Compensating;
        let message = if record.abort_requested {
            "aborted: compensating"
        } else {
            record.error = Some("the saga's deadline passed".into());
            "deadline passed: compensating"
        };
        return (Some(Transition::new(None, message.into())), Move::Again);
    }
    let Some(i) = record
        .steps
        .iter()
        .position(|s| matches!(s.state, StepState::Pending | StepState::Running))
    else {
        record.state = SagaState::Completed;
        return (Some(Transition::new(None, "completed".into())), Move::Done);
    };
    if let Some(at) = record.steps[i].action.next_send_at.filter(|at| *at > now) {
        return (None, Move::Wait(at));
    }
    // A step not to be sent yet waits, durably: the wait is persisted
    // before it starts, so that a restart waits out what is left of it.
    let entry = &mut record.steps[i];
    if entry.state == StepState::Pending
        && entry.action.sends == 0
        && entry.action.next_send_at.is_none()
        && let Some(at) = saga.steps[i].not_before.filter(|at| *at > now)
    {
        entry.action.next_send_at = Some(at);
        let at_text = humantime::format_rfc3339_millis(at.system());
        let message = format!("step {} waits until {at_text}", saga.steps[i].name);
        return (Some(Transition::new(Some(i), message)), Move::Wait(at));
    }
    let step = &saga.steps[i];
    let key = format!("{}/{}/action", saga.id, step.name);
    let answers = record.answers();
    match prepare(&step.action, &scope(saga, &answers), &key) {
        Err(error) => {
            record.steps[i].action.error = Some(error.clone());
            (Some(fail_step(record, saga, i, error, now)), Move::Again)
        }
        Ok(prepared) => {
            let entry = &mut record.steps[i];
            entry.state = StepState::Running;
            entry.action.sends += 1;
            entry.action.next_send_at = None;
            entry.action.started_at = Some(now);
            let message = format!("step {} sent (send {})", step.name, entry.action.sends);
            let send = Move::Send {
                step: i,
                undo: false,
                prepared: Box::new(prepared),
            };
            (Some(Transition::new(Some(i), message)), send)
        }
    }
}

fn backward(record: &mut SagaRecord, saga: &Saga, now: Time) -> (Option<Transition>, Move) {
    // Steps without a compensation have nothing to undo.
    let pending = record.steps.iter().enumerate().rev().find(|(i, s)| {
        matches!(s.state, StepState::Succeeded | StepState::Compensating)
            && saga.steps[*i].compensation.is_some()
    });
    let Some(i) = pending.map(|(i, _)| i) else {
        record.state = if record.abort_requested {
            SagaState::Aborted
        } else {
            SagaState::Compensated
        };
        let message = record.state.as_str().to_owned();
        return (Some(Transition::new(None, message)), Move::Done);
    };
    let waiting = record.steps[i]
        .compensation
        .as_ref()
        .and_then(|c| c.next_send_at)
        .filter(|at| *at > now);
    if let Some(at) = waiting {
        return (None, Move::Wait(at));
    }
    let step = &saga.steps[i];
    let compensation = step.compensation.as_ref().expect("filtered above");
    let key = format!("{}/{}/compensation", saga.id, step.name);
    let answers = record.answers();
    let prepared = prepare(compensation, &scope(saga, &answers), &key);
    let entry = &mut record.steps[i];
    let call = entry.compensation.get_or_insert_with(CallRecord::default);
    match prepared {
        Err(error) => {
            call.error = Some(error.clone());
            call.finished_at = Some(now);
            entry.state = StepState::CompensationFailed;
            record.state = SagaState::Failed;
            record.error = Some(format!(
                "the compensation of step {} cannot be sent: {error}",
                step.name
            ));
            let transition = Transition {
                step: Some(i),
                message: format!("compensation of {} failed: {error}", step.name),
                effect: Effect::Compensated { ok: false },
            };
            (Some(transition), Move::Done)
        }
        Ok(prepared) => {
            entry.state = StepState::Compensating;
            call.sends += 1;
            call.next_send_at = None;
            call.started_at = Some(now);
            let message = format!("compensation of {} sent (send {})", step.name, call.sends);
            let send = Move::Send {
                step: i,
                undo: true,
                prepared: Box::new(prepared),
            };
            (Some(Transition::new(Some(i), message)), send)
        }
    }
}

/// What the templates of a saga's calls see: its id, input and the
/// answers of the steps done so far.
fn scope<'a>(saga: &'a Saga, answers: &'a BTreeMap<String, Answer>) -> Scope<'a> {
    Scope {
        saga_id: &saga.id,
        input: &saga.input,
        steps: answers,
    }
}

/// A step's action finally failed: it degrades, or the saga compensates.
fn fail_step(
    record: &mut SagaRecord,
    saga: &Saga,
    i: usize,
    error: String,
    now: Time,
) -> Transition {
    let step = &saga.steps[i];
    let entry = &mut record.steps[i];
    entry.action.finished_at = Some(now);
    let message = if let Some(default) = &step.degrade_to {
        entry.state = StepState::Degraded;
        entry.answer = Some(Answer {
            status: 0,
            headers: BTreeMap::new(),
            body: Some(default.clone()),
        });
        format!("step {} degraded to its default: {error}", step.name)
    } else {
        entry.state = StepState::Failed;
        record.state = SagaState::Compensating;
        record.error = Some(format!("step {} failed: {error}", step.name));
        format!("step {} failed: {error}; compensating", step.name)
    };
    Transition::new(Some(i), message)
}

/// A step's action was answered (or failed) with `outcome`.
pub(crate) fn after_action(
    record: &mut SagaRecord,
    saga: &Saga,
    i: usize,
    outcome: CallOutcome,
    now: Time,
) -> Transition {
    let deadline = record.deadline_at;
    let entry = &mut record.steps[i];
    entry.action.record(&outcome);
    let retry = saga.steps[i].retry;
    if let Some(at) = resend_at(retry, &outcome, entry.action.sends, deadline, now) {
        entry.action.next_send_at = Some(at);
        let message = format!(
            "step {} failed (send {}): {}; sent again at {}",
            saga.steps[i].name,
            entry.action.sends,
            outcome.error.unwrap_or_default(),
            humantime::format_rfc3339_millis(at.system())
        );
        return Transition::new(Some(i), message);
    }
    match outcome.error {
        None => {
            entry.state = StepState::Succeeded;
            entry.answer = outcome.answer;
            entry.action.finished_at = Some(now);
            Transition::new(Some(i), format!("step {} succeeded", saga.steps[i].name))
        }
        Some(error) => fail_step(record, saga, i, error, now),
    }
}

/// A step's compensation was answered (or failed) with `outcome`.
pub(crate) fn after_compensation(
    record: &mut SagaRecord,
    saga: &Saga,
    i: usize,
    outcome: CallOutcome,
    now: Time,
) -> Transition {
    let name = &saga.steps[i].name;
    let entry = &mut record.steps[i];
    let call = entry.compensation.get_or_insert_with(CallRecord::default);
    call.record(&outcome);
    call.finished_at = Some(now);
    if let Some(at) = resend_at(saga.steps[i].retry, &outcome, call.sends, None, now) {
        call.next_send_at = Some(at);
        let message = format!(
            "compensation of {name} failed (send {}): {}; sent again at {}",
            call.sends,
            outcome.error.unwrap_or_default(),
            humantime::format_rfc3339_millis(at.system())
        );
        return Transition::new(Some(i), message);
    }
    let attempts = call.attempts;
    match outcome.error {
        None => {
            entry.state = StepState::Compensated;
            Transition {
                step: Some(i),
                message: format!("step {name} compensated"),
                effect: Effect::Compensated { ok: true },
            }
        }
        Some(error) => {
            entry.state = StepState::CompensationFailed;
            record.state = SagaState::Failed;
            record.error = Some(format!("the compensation of step {name} failed: {error}"));
            Transition {
                step: Some(i),
                message: format!("compensation of {name} failed: {error}; needs a person"),
                effect: Effect::NeedsPerson {
                    reason: format!(
                        "saga {}: the compensation of step {name} failed: {error}",
                        saga.id
                    ),
                    attempts,
                },
            }
        }
    }
}

/// An operator asks to abort: the request is recorded on a running saga
/// (`None`: it was asked already, or the saga is compensating); the error
/// says why a finished saga cannot be aborted.
pub(crate) fn abort(record: &mut SagaRecord, reason: &str) -> Result<Option<Transition>, String> {
    match record.state {
        SagaState::Running if !record.abort_requested => {
            record.abort_requested = true;
            let reason = if reason.is_empty() {
                "aborted by an operator".to_owned()
            } else {
                format!("aborted by an operator: {reason}")
            };
            record.error = Some(reason.clone());
            Ok(Some(Transition::new(None, reason)))
        }
        SagaState::Running | SagaState::Compensating => Ok(None),
        other => Err(format!(
            "saga {:?} is {}, not running",
            record.id,
            other.as_str()
        )),
    }
}

/// When a failed call is sent again under its step's `retry`: only for a
/// failure for want of the upstream, while sends remain, and before the
/// deadline.
fn resend_at(
    retry: Option<StepRetry>,
    outcome: &CallOutcome,
    sends: u32,
    deadline: Option<Time>,
    now: Time,
) -> Option<Time> {
    let retry = retry?;
    if !outcome.upstream_wanting() || sends >= retry.max_sends {
        return None;
    }
    let at = Time::from(now.system() + retry.wait_after(sends));
    deadline.is_none_or(|d| at < d).then_some(at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::saga::spec::SagaSpec;

    const T0: Time = Time(1_700_000_000_000);

    fn later(ms: u64) -> Time {
        Time(T0.0 + ms)
    }

    /// Steps `a` (with a compensation) and `b`; `b` as `b` is given.
    fn saga(b: serde_json::Value) -> (SagaRecord, Saga) {
        let spec: SagaSpec = serde_json::from_value(serde_json::json!({
            "id": "s1",
            "deadline": "10s",
            "steps": [
                {"name": "a",
                 "action": {"upstream": "u", "method": "POST", "path": "/a"},
                 "compensation": {"upstream": "u", "method": "POST", "path": "/undo/a"}},
                b,
            ]
        }))
        .unwrap();
        let saga = spec.clone().check().unwrap();
        (SagaRecord::new(spec, &saga, T0), saga)
    }

    /// `b` with a step retry of `max_sends` every `interval`.
    fn retried_b(max_sends: u32, interval: &str) -> serde_json::Value {
        serde_json::json!({
            "name": "b",
            "action": {"upstream": "u", "method": "POST", "path": "/b"},
            "retry": {"max_sends": max_sends, "interval": interval}
        })
    }

    /// Runs `a` to success and sends `b`, from T0 to 2 ms.
    fn a_done_b_sent(record: &mut SagaRecord, saga: &Saga) {
        next(record, saga, T0);
        after_action(record, saga, 0, answered(200), later(1));
        assert_eq!(sent(next(record, saga, later(2)).1), (1, false));
    }

    fn plain_b() -> serde_json::Value {
        serde_json::json!({"name": "b", "action": {"upstream": "u", "method": "POST", "path": "/b"}})
    }

    fn answered(status: u16) -> CallOutcome {
        let ok = (200..300).contains(&status);
        CallOutcome {
            ok,
            status,
            failure: crate::classify::classify_status(
                http::StatusCode::from_u16(status).unwrap(),
                None,
            ),
            error: (!ok).then(|| format!("the upstream answered HTTP {status}")),
            attempts: 1,
            ..CallOutcome::default()
        }
    }

    fn sent(next: Move) -> (usize, bool) {
        match next {
            Move::Send { step, undo, .. } => (step, undo),
            other => panic!("expected a send, got {other:?}"),
        }
    }

    #[test]
    fn a_step_not_to_be_sent_yet_waits_durably_then_goes() {
        // b is not sent before 5 s after T0: 2023-11-14T22:13:25Z.
        let b = serde_json::json!({
            "name": "b",
            "action": {"upstream": "u", "method": "POST", "path": "/b"},
            "not_before": "2023-11-14T22:13:25Z"
        });
        let (mut record, saga) = saga(b);
        let due = Time(1_700_000_005_000);
        assert_eq!(saga.steps[1].not_before, Some(due));
        next(&mut record, &saga, T0);
        after_action(&mut record, &saga, 0, answered(200), later(1));
        // The wait is a transition: persisted before it starts.
        let (transition, mv) = next(&mut record, &saga, later(2));
        assert_eq!(
            transition.unwrap().message,
            "step b waits until 2023-11-14T22:13:25.000Z"
        );
        assert!(matches!(mv, Move::Wait(at) if at == due));
        assert_eq!(record.steps[1].action.next_send_at, Some(due));
        assert_eq!(record.steps[1].state, StepState::Pending);
        // Decided again before it is due (a restart): it waits, and
        // persists nothing new.
        let (transition, mv) = next(&mut record, &saga, later(4000));
        assert!(transition.is_none());
        assert!(matches!(mv, Move::Wait(at) if at == due));
        // Due: sent, once.
        let (_, mv) = next(&mut record, &saga, due);
        assert_eq!(sent(mv), (1, false));
        assert_eq!(record.steps[1].action.sends, 1);
        assert_eq!(record.steps[1].action.next_send_at, None);
        // A time already past does not wait at all.
        let past = serde_json::json!({
            "name": "b",
            "action": {"upstream": "u", "method": "POST", "path": "/b"},
            "not_before": "2020-01-01T00:00:00Z"
        });
        let (mut record, saga) = self::saga(past);
        a_done_b_sent(&mut record, &saga);
    }

    #[test]
    fn steps_run_in_order_and_the_saga_completes() {
        let (mut record, saga) = saga(plain_b());
        let (transition, mv) = next(&mut record, &saga, T0);
        assert_eq!(sent(mv), (0, false));
        assert_eq!(transition.unwrap().message, "step a sent (send 1)");
        assert_eq!(record.steps[0].state, StepState::Running);
        assert_eq!(record.steps[0].action.started_at, Some(T0));

        let t = after_action(&mut record, &saga, 0, answered(200), later(5));
        assert_eq!(t, Transition::new(Some(0), "step a succeeded".into()));
        assert_eq!(record.steps[0].state, StepState::Succeeded);
        assert_eq!(record.steps[0].action.finished_at, Some(later(5)));

        assert_eq!(sent(next(&mut record, &saga, later(6)).1), (1, false));
        after_action(&mut record, &saga, 1, answered(201), later(7));
        let (transition, mv) = next(&mut record, &saga, later(8));
        assert!(matches!(mv, Move::Done));
        assert_eq!(transition.unwrap().message, "completed");
        assert_eq!(record.state, SagaState::Completed);
    }

    #[test]
    fn a_failed_step_compensates_the_ones_before_it_in_reverse() {
        let (mut record, saga) = saga(plain_b());
        a_done_b_sent(&mut record, &saga);
        let t = after_action(&mut record, &saga, 1, answered(400), later(3));
        assert_eq!(
            t.message,
            "step b failed: the upstream answered HTTP 400; compensating"
        );
        assert_eq!(record.state, SagaState::Compensating);
        assert_eq!(record.steps[1].state, StepState::Failed);

        let (transition, mv) = next(&mut record, &saga, later(4));
        assert_eq!(
            sent(mv),
            (0, true),
            "a's compensation; b is not compensated"
        );
        assert_eq!(
            transition.unwrap().message,
            "compensation of a sent (send 1)"
        );
        let t = after_compensation(&mut record, &saga, 0, answered(200), later(5));
        assert_eq!(t.effect, Effect::Compensated { ok: true });
        let (transition, mv) = next(&mut record, &saga, later(6));
        assert!(matches!(mv, Move::Done));
        assert_eq!(transition.unwrap().message, "compensated");
    }

    #[test]
    fn a_step_retry_waits_out_the_upstream_then_sends_again() {
        let (mut record, saga) = saga(retried_b(3, "1s"));
        a_done_b_sent(&mut record, &saga);
        let t = after_action(&mut record, &saga, 1, answered(503), later(3));
        assert!(
            t.message.starts_with(
                "step b failed (send 1): the upstream answered HTTP 503; sent again at"
            )
        );
        assert_eq!(record.steps[1].action.next_send_at, Some(later(1003)));
        assert_eq!(record.state, SagaState::Running);

        let (transition, mv) = next(&mut record, &saga, later(500));
        assert!(transition.is_none());
        assert!(matches!(mv, Move::Wait(at) if at == later(1003)));
        let (transition, mv) = next(&mut record, &saga, later(1003));
        assert_eq!(sent(mv), (1, false));
        assert_eq!(transition.unwrap().message, "step b sent (send 2)");

        // A refusal about the request is not waited out.
        let t = after_action(&mut record, &saga, 1, answered(404), later(1010));
        assert!(t.message.ends_with("; compensating"), "{}", t.message);
        assert_eq!(record.steps[1].action.sends, 2);
    }

    #[test]
    fn the_deadline_gives_up_a_waiting_step_and_compensates() {
        let (mut record, saga) = saga(retried_b(100, "1s"));
        a_done_b_sent(&mut record, &saga);
        after_action(&mut record, &saga, 1, answered(503), later(3));
        let (transition, mv) = next(&mut record, &saga, later(10_000));
        assert!(matches!(mv, Move::Again));
        assert_eq!(transition.unwrap().message, "deadline passed: compensating");
        assert_eq!(record.steps[1].state, StepState::Failed);
        assert_eq!(record.steps[1].action.next_send_at, None);
        assert_eq!(record.error.as_deref(), Some("the saga's deadline passed"));
        // A resend is never scheduled past the deadline.
        let (mut record, saga) = self::saga(retried_b(100, "20s"));
        next(&mut record, &saga, T0);
        let t = after_action(&mut record, &saga, 0, answered(503), later(1));
        assert!(t.message.ends_with("; compensating"), "{}", t.message);
    }

    #[test]
    fn a_failed_compensation_needs_a_person_and_a_dead_letter() {
        let (mut record, saga) = saga(plain_b());
        a_done_b_sent(&mut record, &saga);
        after_action(&mut record, &saga, 1, answered(500), later(3));
        next(&mut record, &saga, later(4));
        let t = after_compensation(&mut record, &saga, 0, answered(500), later(5));
        assert_eq!(
            t.effect,
            Effect::NeedsPerson {
                reason:
                    "saga s1: the compensation of step a failed: the upstream answered HTTP 500"
                        .into(),
                attempts: 1
            }
        );
        assert_eq!(record.state, SagaState::Failed);
        assert_eq!(record.steps[0].state, StepState::CompensationFailed);
        assert!(matches!(next(&mut record, &saga, later(6)).1, Move::Done));
    }

    #[test]
    fn a_step_with_a_default_degrades_and_the_saga_goes_on() {
        let b = serde_json::json!({
            "name": "b",
            "action": {"upstream": "u", "method": "POST", "path": "/b"},
            "on_failure": "continue",
            "default": {"sent": false}
        });
        let (mut record, saga) = saga(b);
        a_done_b_sent(&mut record, &saga);
        let t = after_action(&mut record, &saga, 1, answered(503), later(3));
        assert!(
            t.message.starts_with("step b degraded to its default"),
            "{}",
            t.message
        );
        assert_eq!(record.steps[1].state, StepState::Degraded);
        let answer = record.steps[1].answer.as_ref().unwrap();
        assert_eq!(answer.body, Some(serde_json::json!({"sent": false})));
        assert_eq!(
            next(&mut record, &saga, later(4)).0.unwrap().message,
            "completed"
        );
    }

    #[test]
    fn abort_is_recorded_once_and_refused_once_finished() {
        let (mut record, saga) = saga(plain_b());
        let t = abort(&mut record, "wrong invoice").unwrap().unwrap();
        assert_eq!(t.message, "aborted by an operator: wrong invoice");
        assert_eq!(abort(&mut record, "again").unwrap(), None);
        let (transition, _) = next(&mut record, &saga, T0);
        assert_eq!(transition.unwrap().message, "aborted: compensating");
        let (transition, _) = next(&mut record, &saga, later(1));
        assert_eq!(
            transition.unwrap().message,
            "aborted",
            "nothing was done to undo"
        );
        assert_eq!(
            abort(&mut record, "").unwrap_err(),
            "saga \"s1\" is aborted, not running"
        );
    }
}
