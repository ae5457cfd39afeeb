//! Running sagas: the executor that starts, resumes, aborts, watches and
//! drives each saga, one persisted transition at a time.
//!
//! The rule that makes a crash harmless: a transition is durable (written
//! and flushed by the group commit) before the call it announces is sent.
//! A restart therefore finds each unfinished saga either between two calls
//! (it goes on) or with a call marked as sent and no answer recorded (it
//! sends it again, with the same `Idempotency-Key`, so a participant that
//! honours the key applies it once). What each transition is, is decided
//! in `decide`; this module persists it and acts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::{Semaphore, broadcast};

use super::call::{Prepared, Upstreams, send};
use super::decide::{self, Effect, Move, Transition};
use super::record::{SagaEvent, SagaRecord, SagaState, Time};
use super::spec::{Saga, SagaSpec};
use crate::api::seal::LetterKey;
use crate::control::error::{ApiError, after_id, id_token, page_size as page_size_for};
use crate::control::metrics::ControlMetrics;
use crate::control::store::{GroupCommit, Store, StoreError};

/// How many sagas run at once by default; the rest wait their turn.
pub const DEFAULT_WORKERS: usize = 256;
/// Events kept for slow watchers before they fall behind.
const EVENT_BUFFER: usize = 4096;

/// A saga running in this process: its record behind the lock its
/// transitions take, and a bell that ends a wait early (an abort).
struct InFlight {
    record: tokio::sync::Mutex<SagaRecord>,
    wake: tokio::sync::Notify,
}

/// Starts, runs, resumes, aborts and shows sagas.
pub struct Sagas {
    store: Arc<dyn Store>,
    commit: GroupCommit,
    metrics: Arc<ControlMetrics>,
    upstreams: Option<Arc<Upstreams>>,
    pool: Arc<Semaphore>,
    max_record_bytes: usize,
    /// Seals the letters of failed compensations, as a sidecar seals its
    /// own.
    letter_key: Option<LetterKey>,
    /// The sagas running in this process, each record behind the lock its
    /// transitions take.
    running: Mutex<HashMap<String, Arc<InFlight>>>,
    events: broadcast::Sender<SagaEvent>,
    /// Set when the control plane stops: watches end.
    stopping: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for Sagas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sagas").finish_non_exhaustive()
    }
}

impl Sagas {
    /// The executor over `store`, calling `upstreams`, running at most
    /// `workers` sagas at once.
    pub fn new(
        store: Arc<dyn Store>,
        commit: GroupCommit,
        metrics: Arc<ControlMetrics>,
        upstreams: Option<Arc<Upstreams>>,
        workers: usize,
        max_record_bytes: usize,
        letter_key: Option<LetterKey>,
    ) -> Self {
        Self {
            store,
            commit,
            metrics,
            upstreams,
            pool: Arc::new(Semaphore::new(workers.max(1))),
            max_record_bytes,
            letter_key,
            running: Mutex::default(),
            events: broadcast::channel(EVENT_BUFFER).0,
            stopping: tokio::sync::watch::channel(false).0,
        }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<InFlight>>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends every watch (the control plane is stopping).
    pub fn end_watches(&self) {
        self.stopping.send_replace(true);
    }

    /// Events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<SagaEvent> {
        self.events.subscribe()
    }

    /// Checks and starts a saga; answers once it is durable. A saga with
    /// that id already exists: it is answered as it is, with `false`.
    pub async fn start(self: &Arc<Self>, spec: SagaSpec) -> Result<(SagaRecord, bool), ApiError> {
        let Some(upstreams) = &self.upstreams else {
            return Err(ApiError::Precondition(
                "sagas need the upstreams' policies: start the control plane with --config policies.yaml"
                    .into(),
            ));
        };
        if let Some(existing) = self.store.get_saga(&spec.id)? {
            // It may have been written by a start still waiting for its
            // flush: answer once it is durable too.
            self.commit.durable().await?;
            return Ok((SagaRecord::decode(&existing)?, false));
        }
        let saga = spec.clone().check().map_err(|problems| {
            ApiError::Invalid(format!("the saga is invalid: {}", problems.join("; ")))
        })?;
        let mut unknown = Vec::new();
        for (i, step) in saga.steps.iter().enumerate() {
            let calls = [
                ("action", Some(&step.action)),
                ("compensation", step.compensation.as_ref()),
            ];
            for (what, call) in calls {
                if let Some(call) = call.filter(|c| upstreams.get(&c.upstream).is_none()) {
                    unknown.push(format!(
                        "steps[{i}].{what}.upstream: there is no upstream {:?} in the policies file",
                        call.upstream
                    ));
                }
            }
        }
        if !unknown.is_empty() {
            return Err(ApiError::Invalid(format!(
                "the saga is invalid: {}",
                unknown.join("; ")
            )));
        }
        let record = SagaRecord::new(spec, &saga, Time::now());
        let bytes = serde_json::to_vec(&record).expect("records serialize");
        if bytes.len() > self.max_record_bytes {
            return Err(ApiError::Invalid(format!(
                "the saga is {} bytes, over the limit of {} bytes",
                bytes.len(),
                self.max_record_bytes
            )));
        }
        let created = self
            .store
            .create_saga(&record.id, SagaState::Running.as_str(), &bytes)?;
        self.commit.durable().await?;
        if !created {
            let existing = self
                .store
                .get_saga(&record.id)?
                .ok_or_else(|| ApiError::Internal("a saga vanished".into()))?;
            return Ok((SagaRecord::decode(&existing)?, false));
        }
        self.metrics.saga_entered(SagaState::Running.as_str());
        self.emit(&record, None, "started".to_owned());
        self.spawn(record.clone(), saga);
        Ok((record, true))
    }

    fn spawn(self: &Arc<Self>, record: SagaRecord, saga: Saga) {
        let cell = Arc::new(InFlight {
            record: tokio::sync::Mutex::new(record),
            wake: tokio::sync::Notify::new(),
        });
        self.running().insert(saga.id.clone(), cell.clone());
        tokio::spawn(self.clone().drive(cell, saga));
    }

    /// How many sagas are in each state, as stored.
    pub fn counts(&self) -> Result<Vec<(SagaState, u64)>, StoreError> {
        Ok(self
            .store
            .saga_counts()?
            .into_iter()
            .filter_map(|(state, count)| Some((SagaState::parse(&state)?, count)))
            .collect())
    }

    /// Resumes every unfinished saga (at start); returns how many.
    pub async fn resume(self: &Arc<Self>) -> Result<usize, StoreError> {
        for (state, count) in self.counts()? {
            self.metrics.set_sagas(state.as_str(), count);
        }
        let mut resumed = 0;
        for state in [SagaState::Running, SagaState::Compensating] {
            let mut after: Option<String> = None;
            loop {
                let (records, next) =
                    self.store
                        .list_sagas(Some(state.as_str()), after.as_deref(), 1000)?;
                for bytes in records {
                    // One unreadable record must not keep the others (and
                    // the control plane) from starting.
                    let record = match SagaRecord::decode(&bytes) {
                        Ok(record) => record,
                        Err(error) => {
                            tracing::error!(%error, "a stored saga is unreadable; it is left as it is");
                            continue;
                        }
                    };
                    if record.state.finished() || self.running().contains_key(&record.id) {
                        continue;
                    }
                    match record.definition.clone().check() {
                        Ok(saga) => {
                            self.spawn(record, saga);
                            resumed += 1;
                        }
                        Err(problems) => tracing::error!(
                            saga = %record.id,
                            problems = %problems.join("; "),
                            "a stored saga no longer passes its checks; it is left as it is"
                        ),
                    }
                }
                match next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
        }
        Ok(resumed)
    }

    /// One saga, as last persisted.
    pub fn get(&self, id: &str) -> Result<SagaRecord, ApiError> {
        let bytes = self
            .store
            .get_saga(id)?
            .ok_or_else(|| ApiError::NotFound(format!("no saga {id:?}")))?;
        Ok(SagaRecord::decode(&bytes)?)
    }

    /// Sagas by id after `after`, all or in one state.
    pub fn list(
        &self,
        state: Option<SagaState>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<SagaRecord>, Option<String>), ApiError> {
        let (records, next) = self
            .store
            .list_sagas(state.map(SagaState::as_str), after, limit)?;
        let records = records
            .iter()
            .map(|b| SagaRecord::decode(b))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((records, next))
    }

    /// A page of sagas, all or in one state, by id; the token continues
    /// a listing (empty: from the start), and the next one is empty at
    /// the end.
    pub fn list_page(
        &self,
        state: Option<SagaState>,
        page_size: u32,
        page_token: &str,
    ) -> Result<(Vec<SagaRecord>, String), ApiError> {
        let after = after_id(page_token)?;
        let (records, next) = self.list(state, after.as_deref(), page_size_for(page_size))?;
        let next = next.as_deref().map_or_else(String::new, id_token);
        Ok((records, next))
    }

    /// Events of one saga (its current state first, then each transition
    /// until it ends) or of every saga (from now on, endless). A watcher
    /// that falls more than a few thousand events behind gets an error
    /// and should watch again.
    pub fn watch(
        &self,
        id: Option<String>,
    ) -> Result<
        impl futures_util::Stream<Item = Result<SagaEvent, String>> + Send + 'static,
        ApiError,
    > {
        let events = self.subscribe();
        let first = match &id {
            Some(id) => Some(SagaEvent::snapshot(&self.get(id)?)),
            None => None,
        };
        let stopping = self.stopping.subscribe();
        let state = (events, stopping, first, id, false);
        Ok(futures_util::stream::unfold(
            state,
            |(mut events, mut stopping, mut first, id, ended)| async move {
                if ended {
                    return None;
                }
                if let Some(event) = first.take() {
                    let end = event.state.finished();
                    return Some((Ok(event), (events, stopping, None, id, end)));
                }
                loop {
                    let received = tokio::select! {
                        received = events.recv() => received,
                        _ = stopping.wait_for(|s| *s) => return None,
                    };
                    match received {
                        Ok(event) if id.as_ref().is_some_and(|id| *id != event.saga_id) => {}
                        Ok(event) => {
                            let end = id.is_some() && event.state.finished();
                            return Some((Ok(event), (events, stopping, None, id, end)));
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            let error = format!("the watch fell {n} events behind; watch again");
                            return Some((Err(error), (events, stopping, None, id, true)));
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            },
        ))
    }

    /// Asks a running saga to stop: once the step in flight (if any) has
    /// its answer, what was done is compensated and the saga ends
    /// `aborted`; a step waiting to be sent again stops waiting. Durable
    /// when it answers.
    pub async fn abort(&self, id: &str, reason: &str) -> Result<SagaRecord, ApiError> {
        let cell = self.running().get(id).cloned();
        let Some(cell) = cell else {
            let record = self.get(id)?;
            return Err(ApiError::Precondition(format!(
                "saga {id:?} is {}, not running",
                record.state.as_str()
            )));
        };
        let mut record = cell.record.lock().await;
        let from = record.state;
        if let Some(transition) =
            decide::abort(&mut record, reason).map_err(ApiError::Precondition)?
        {
            self.save(&mut record, from, transition.step, transition.message)
                .await?;
            cell.wake.notify_one();
        }
        Ok(record.clone())
    }

    /// Writes a transition durably, then tells metrics and watchers.
    async fn save(
        &self,
        record: &mut SagaRecord,
        from: SagaState,
        step: Option<usize>,
        message: String,
    ) -> Result<(), StoreError> {
        record.updated_at = Time::now();
        let bytes = serde_json::to_vec(record).expect("records serialize");
        self.store
            .save_saga(&record.id, from.as_str(), record.state.as_str(), &bytes)?;
        self.commit.durable().await?;
        if from != record.state {
            self.metrics.saga_left(from.as_str());
            self.metrics.saga_entered(record.state.as_str());
        }
        self.emit(record, step, message);
        Ok(())
    }

    fn emit(&self, record: &SagaRecord, step: Option<usize>, message: String) {
        if self.events.receiver_count() == 0 {
            return;
        }
        let step = step.and_then(|i| record.steps.get(i));
        let _ = self.events.send(SagaEvent {
            saga_id: record.id.clone(),
            state: record.state,
            step: step.map(|s| s.name.clone()),
            step_state: step.map(|s| s.state),
            message,
            at: record.updated_at,
        });
    }

    async fn drive(self: Arc<Self>, cell: Arc<InFlight>, saga: Saga) {
        let permit = self.pool.clone().acquire_owned().await;
        if let Err(error) = self.run(&cell, &saga).await {
            tracing::error!(
                saga = %saga.id,
                %error,
                "a saga stopped: its transition could not be stored; it resumes when the control plane restarts"
            );
        }
        drop(permit);
        self.running().remove(&saga.id);
    }

    /// Decides, persists, then acts, until the saga ends.
    async fn run(&self, cell: &InFlight, saga: &Saga) -> Result<(), StoreError> {
        let upstreams = self
            .upstreams
            .clone()
            .expect("sagas only start with upstreams");
        loop {
            let next = {
                let mut record = cell.record.lock().await;
                let from = record.state;
                let (transition, next) = decide::next(&mut record, saga, Time::now());
                if let Some(transition) = transition {
                    self.apply(&mut record, saga, from, transition, None)
                        .await?;
                }
                next
            };
            match next {
                Move::Done => return Ok(()),
                Move::Again => {}
                Move::Wait(until) => {
                    let left = until
                        .system()
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    // An abort rings the bell: it need not wait out a step's
                    // retry interval.
                    tokio::select! {
                        () = tokio::time::sleep(left) => {}
                        () = cell.wake.notified() => {}
                    }
                }
                Move::Send {
                    step,
                    undo,
                    prepared,
                } => {
                    let deadline = if undo {
                        None
                    } else {
                        cell.record.lock().await.deadline_at
                    };
                    let outcome = send(&upstreams, &prepared, deadline).await;
                    let what = if undo { "compensation" } else { "action" };
                    self.metrics.observe_saga_call(
                        &prepared.upstream,
                        what,
                        outcome.ok,
                        outcome.took,
                    );
                    let mut record = cell.record.lock().await;
                    let from = record.state;
                    let now = Time::now();
                    let transition = if undo {
                        decide::after_compensation(&mut record, saga, step, outcome, now)
                    } else {
                        decide::after_action(&mut record, saga, step, outcome, now)
                    };
                    self.apply(&mut record, saga, from, transition, Some(&prepared))
                        .await?;
                }
            }
        }
    }

    /// Carries out a transition's effect, then persists it.
    async fn apply(
        &self,
        record: &mut SagaRecord,
        saga: &Saga,
        from: SagaState,
        transition: Transition,
        prepared: Option<&Prepared>,
    ) -> Result<(), StoreError> {
        match transition.effect {
            Effect::None => {}
            Effect::Compensated { ok } => self.metrics.compensated(ok),
            Effect::NeedsPerson { reason, attempts } => {
                self.metrics.compensated(false);
                let prepared = prepared.expect("a compensation that was sent");
                // The letter first: the record names it.
                let mut letter = prepared.letter(&saga.id, reason, attempts);
                if let Some(key) = &self.letter_key {
                    letter.seal = key.seal(&letter);
                }
                let letter = self.store.enqueue_letter(letter, SystemTime::now())?;
                self.metrics.set_dead_letters(self.store.letter_count());
                let error = record.error.get_or_insert_with(String::new);
                error.push_str(&format!("; it is dead letter {}", letter.id));
                tracing::error!(saga = %saga.id, error = %error, letter = %letter.id, "a compensation failed: the saga needs a person");
                record.dead_letter_id = Some(letter.id);
            }
        }
        self.save(record, from, transition.step, transition.message)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::saga::call::Upstreams;
    use crate::control::store::SledStore;

    #[tokio::test]
    async fn an_unreadable_record_does_not_keep_the_others_from_resuming() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        store
            .create_saga("broken", "running", b"{not json")
            .unwrap();
        let spec: SagaSpec = serde_json::from_value(serde_json::json!({
            "id": "fine",
            "steps": [{"name": "a", "action": {"upstream": "u", "method": "GET", "path": "/"}}]
        }))
        .unwrap();
        let saga = spec.clone().check().unwrap();
        let record = SagaRecord::new(spec, &saga, Time::now());
        let bytes = serde_json::to_vec(&record).unwrap();
        store.create_saga("fine", "running", &bytes).unwrap();
        let config =
            crate::config::parse("t.yaml", "upstreams:\n  u: {address: '127.0.0.1:9'}\n").unwrap();
        let commit = GroupCommit::start(store.clone(), |_| {});
        let sagas = Arc::new(Sagas::new(
            store,
            commit,
            Arc::new(ControlMetrics::new()),
            Some(Arc::new(Upstreams::new(&config))),
            4,
            1 << 20,
            None,
        ));
        assert_eq!(sagas.resume().await.unwrap(), 1);
    }
}
