//! The dead-letter operations: stored once durable, listed, replayed
//! through their upstream (one replay of a letter at a time, its seal
//! checked), purged.

use std::time::SystemTime;

use super::{ControlPlane, check_id};
use crate::api::purge_dead_letters_request::Target as PurgeTarget;
use crate::api::seal::Seal;
use crate::api::{
    DeadLetter, ListDeadLettersRequest, ListDeadLettersResponse, ReplayDeadLetterResponse,
};
use crate::control::error::{ApiError, page_size};
use crate::control::saga::call::{Prepared, Upstreams, send};

/// Parses a letter listing's page token: the id to continue after, which
/// may be 0 (letter ids start there, unlike checkpoint versions).
fn letter_token(token: &str) -> Result<Option<u64>, ApiError> {
    if token.is_empty() {
        return Ok(None);
    }
    token
        .parse::<u64>()
        .map(Some)
        .map_err(|_| ApiError::Invalid(format!("page_token {token:?} is not one this API gave")))
}

impl ControlPlane {
    /// Stores a dead letter; answers once it is durable.
    pub async fn enqueue_letter(&self, letter: Option<DeadLetter>) -> Result<DeadLetter, ApiError> {
        let _timer = self.timer("dead_letters.Enqueue");
        let letter = letter.ok_or_else(|| ApiError::Invalid("letter is missing".into()))?;
        check_id("upstream", &letter.upstream)?;
        if !letter.capture_id.is_empty() {
            check_id("capture_id", &letter.capture_id)?;
        }
        if letter.method.is_empty() || http::Method::from_bytes(letter.method.as_bytes()).is_err() {
            return Err(ApiError::Invalid(format!(
                "method {:?} is not an HTTP method",
                letter.method
            )));
        }
        if !letter.uri.starts_with('/') || letter.uri.parse::<http::uri::PathAndQuery>().is_err() {
            return Err(ApiError::Invalid(format!(
                "uri {:?} is not a path and query",
                letter.uri
            )));
        }
        if letter.body.len() > self.max_state_bytes {
            return Err(ApiError::Invalid(format!(
                "body is {} bytes, over the limit of {} bytes",
                letter.body.len(),
                self.max_state_bytes
            )));
        }
        for header in &letter.headers {
            if http::HeaderName::from_bytes(header.name.as_bytes()).is_err()
                || http::HeaderValue::from_bytes(&header.value).is_err()
            {
                return Err(ApiError::Invalid(format!(
                    "header {:?} is not valid",
                    header.name
                )));
            }
        }
        let stored = self.store.enqueue_letter(letter, SystemTime::now())?;
        self.commit.durable().await?;
        self.metrics.set_dead_letters(self.store.letter_count());
        Ok(stored)
    }

    /// Letters, oldest first, optionally of one upstream.
    pub fn list_letters(
        &self,
        request: &ListDeadLettersRequest,
    ) -> Result<ListDeadLettersResponse, ApiError> {
        let _timer = self.timer("dead_letters.List");
        let after = letter_token(&request.page_token)?;
        let upstream = (!request.upstream.is_empty()).then_some(request.upstream.as_str());
        let (letters, next) = self.store.list_letters(
            upstream,
            after,
            page_size(request.page_size),
            !request.without_bodies,
        )?;
        Ok(ListDeadLettersResponse {
            letters,
            next_page_token: next.map(|v| v.to_string()).unwrap_or_default(),
        })
    }

    /// One letter.
    pub fn get_letter(&self, id: &str) -> Result<DeadLetter, ApiError> {
        let _timer = self.timer("dead_letters.Get");
        Ok(self.store.get_letter(letter_id(id)?)?)
    }

    /// Sends a letter again under its upstream's policy: delivered, it is
    /// removed; failed, the attempt is recorded on it. Refused, unless
    /// `force`, when it is not sealed by a sidecar holding the letter key
    /// (if the control plane has one) or its body was cut at capture.
    pub async fn replay_letter(
        &self,
        id: &str,
        force: bool,
    ) -> Result<ReplayDeadLetterResponse, ApiError> {
        let _timer = self.timer("dead_letters.Replay");
        let id = letter_id(id)?;
        let mut letter = self.store.get_letter(id)?;
        if let Some(refusal) = self.replay_refusal(id, &letter) {
            if !force {
                self.metrics.replay_refused();
                return Err(ApiError::Precondition(format!(
                    "{refusal}; replay it with force (breakwater dlq replay --force) to send it anyway"
                )));
            }
            tracing::warn!(letter = id, upstream = %letter.upstream, "{refusal}; replayed anyway (forced)");
        }
        let Some(upstreams) = &self.upstreams else {
            return Err(ApiError::Precondition(
                "replay needs the upstreams' policies: start the control plane with --config policies.yaml".into(),
            ));
        };
        if upstreams.get(&letter.upstream).is_none() {
            return Err(ApiError::Precondition(format!(
                "upstream {:?} is not in the policies file, so the letter cannot be sent",
                letter.upstream
            )));
        }
        if !self
            .replaying
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id)
        {
            return Err(ApiError::Precondition(format!(
                "dead letter {id} is being replayed already"
            )));
        }
        let outcome = replay(upstreams, &letter).await;
        self.replaying
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        let response = match outcome {
            Ok(delivered) => {
                self.store.remove_letters(&[id])?;
                self.metrics.replayed(true);
                delivered
            }
            Err(failed) => {
                letter.replays += 1;
                letter.last_replay_error = failed.error.clone();
                letter.last_replay_at = Some(prost_types::Timestamp::from(SystemTime::now()));
                self.store.update_letter(&letter)?;
                self.metrics.replayed(false);
                failed
            }
        };
        self.commit.durable().await?;
        self.metrics.set_dead_letters(self.store.letter_count());
        Ok(response)
    }

    /// Why a letter should not be replayed as it is, if it should not.
    fn replay_refusal(&self, id: u64, letter: &DeadLetter) -> Option<String> {
        let seal = self.letter_key.as_ref().map(|key| key.check(letter));
        match seal {
            Some(Seal::Missing) => Some(format!(
                "dead letter {id} has no seal: it was not captured by a sidecar holding the \
                 letter key (enqueued by hand, or by a sidecar without \
                 control_plane.letter_key_file)"
            )),
            Some(Seal::Invalid) => Some(format!(
                "dead letter {id}'s seal does not match it: it was altered after its capture, \
                 or sealed with another key"
            )),
            Some(Seal::Valid) | None if letter.body_truncated => Some(format!(
                "dead letter {id}'s body was cut when it was captured (longer than max_body, \
                 or not all sent by the caller): a replay would send a different request"
            )),
            Some(Seal::Valid) | None => None,
        }
    }

    /// Removes one letter, an upstream's, or all.
    pub async fn purge_letters(&self, target: Option<PurgeTarget>) -> Result<u64, ApiError> {
        let _timer = self.timer("dead_letters.Purge");
        let ids = match target {
            None => {
                return Err(ApiError::Invalid(
                    "say what to purge: id, upstream or all".into(),
                ));
            }
            Some(PurgeTarget::Id(id)) => vec![letter_id(&id)?],
            Some(PurgeTarget::Upstream(upstream)) => {
                check_id("upstream", &upstream)?;
                self.store.letter_ids(Some(&upstream))?
            }
            Some(PurgeTarget::All(true)) => self.store.letter_ids(None)?,
            Some(PurgeTarget::All(false)) => {
                return Err(ApiError::Invalid(
                    "all must be true to purge every letter".into(),
                ));
            }
        };
        let purged = self.store.remove_letters(&ids)?;
        self.commit.durable().await?;
        self.metrics.set_dead_letters(self.store.letter_count());
        Ok(purged)
    }
}

fn letter_id(id: &str) -> Result<u64, ApiError> {
    id.parse()
        .map_err(|_| ApiError::Invalid(format!("{id:?} is not a dead letter id")))
}

/// Sends a letter through its upstream; `Ok` when the upstream took it (a
/// 2xx answer, and gRPC status 0 for gRPC calls).
async fn replay(
    upstreams: &Upstreams,
    letter: &DeadLetter,
) -> Result<ReplayDeadLetterResponse, ReplayDeadLetterResponse> {
    let failed = |error: String| ReplayDeadLetterResponse {
        delivered: false,
        status: 0,
        grpc_status: -1,
        error,
    };
    let prepared = Prepared::from_letter(letter, REPLAY_HEADER).map_err(failed)?;
    let outcome = send(upstreams, &prepared, None).await;
    let response = ReplayDeadLetterResponse {
        delivered: outcome.ok,
        status: u32::from(outcome.status),
        grpc_status: outcome.grpc_status.unwrap_or(0),
        error: outcome.error.unwrap_or_default(),
    };
    if response.delivered {
        Ok(response)
    } else {
        Err(response)
    }
}

/// Marks a request sent by a replay, with the letter's id.
pub const REPLAY_HEADER: &str = "x-breakwater-replay";
