//! `breakwater dlq list|show|replay|purge`.

use super::say;
use super::{Authorized, CliError, Remote, print_json, print_table, time};
use crate::api::dead_letters_client::DeadLettersClient;
use crate::api::json::LetterJson;
use crate::api::purge_dead_letters_request::Target as PurgeTarget;
use crate::api::{
    DeadLetter, GetDeadLetterRequest, ListDeadLettersRequest, PurgeDeadLettersRequest,
    ReplayDeadLetterRequest, ReplayDeadLetterResponse,
};

/// Lists dead letters, oldest first.
pub async fn dlq_list(
    remote: &Remote,
    upstream: String,
    page_size: u32,
    page_token: String,
) -> Result<(), CliError> {
    let page = remote
        .dead_letters()
        .await?
        .list(ListDeadLettersRequest {
            upstream,
            page_size,
            page_token,
            without_bodies: !remote.json,
        })
        .await?
        .into_inner();
    if remote.json {
        let letters: Vec<LetterJson> = page.letters.into_iter().map(LetterJson::from).collect();
        print_json(
            &serde_json::json!({"letters": letters, "next_page_token": page.next_page_token}),
        );
        return Ok(());
    }
    let rows: Vec<[String; 7]> = page
        .letters
        .iter()
        .map(|l| {
            [
                l.id.clone(),
                l.upstream.clone(),
                format!("{} {}", l.method, l.uri),
                l.reason.clone(),
                l.attempts.to_string(),
                l.replays.to_string(),
                time(l.failed_at.as_ref()),
            ]
        })
        .collect();
    print_table(
        [
            "ID", "UPSTREAM", "REQUEST", "REASON", "ATTEMPTS", "REPLAYS", "FAILED",
        ],
        &rows,
    );
    if !page.next_page_token.is_empty() {
        say!("more: --page-token {}", page.next_page_token);
    }
    Ok(())
}

/// Shows one letter, with its headers and body; a gRPC body by its field
/// names when `descriptors` (a `FileDescriptorSet`) has its method.
pub async fn dlq_show(
    remote: &Remote,
    id: String,
    descriptors: Option<&std::path::Path>,
) -> Result<(), CliError> {
    let descriptors = descriptors
        .map(super::wire::Descriptors::read)
        .transpose()
        .map_err(CliError::Usage)?;
    let letter = remote
        .dead_letters()
        .await?
        .get(GetDeadLetterRequest { id })
        .await?
        .into_inner();
    if remote.json {
        print_json(&LetterJson::from(letter));
    } else {
        print_letter(&letter, descriptors.as_ref());
    }
    Ok(())
}

fn print_letter(l: &DeadLetter, descriptors: Option<&super::wire::Descriptors>) {
    say!("id         {}", l.id);
    say!("upstream   {}", l.upstream);
    say!("source     {}", l.source);
    say!(
        "request    {} {}{}",
        l.method,
        l.uri,
        if l.grpc { " (gRPC)" } else { "" }
    );
    say!("reason     {} after {} attempts", l.reason, l.attempts);
    say!("failed     {}", time(l.failed_at.as_ref()));
    say!("replays    {}", l.replays);
    if !l.last_replay_error.is_empty() {
        say!(
            "last error {} ({})",
            l.last_replay_error,
            time(l.last_replay_at.as_ref())
        );
    }
    for header in &l.headers {
        say!(
            "header     {}: {}",
            header.name,
            String::from_utf8_lossy(&header.value)
        );
    }
    let seal = match l.seal.is_empty() {
        true => "none (a replay is refused where the control plane has a letter key)",
        false => "present (checked by the control plane at replay)",
    };
    say!("seal       {seal}");
    let request = match descriptors {
        Some(d) if l.grpc => d
            .request_of(&l.uri)
            .inspect_err(|why| say!("types      not named: {why}"))
            .ok(),
        _ => None,
    };
    let cut = if l.body_truncated { " (truncated)" } else { "" };
    say!(
        "body{cut}       {}",
        super::wire::body(&l.body, l.grpc, request.as_ref())
    );
}

/// What to replay or purge.
#[derive(Debug, Clone)]
pub enum Selection {
    /// These letters.
    Ids(Vec<String>),
    /// Every letter of an upstream.
    Upstream(String),
    /// Every letter.
    All,
}

/// Replays letters (with `force`, even those the control plane refuses);
/// fails if any stays undelivered.
pub async fn dlq_replay(
    remote: &Remote,
    selection: Selection,
    force: bool,
) -> Result<(), CliError> {
    let mut client = remote.dead_letters().await?;
    let ids = match selection {
        Selection::Ids(ids) => ids,
        Selection::Upstream(upstream) => all_ids(&mut client, upstream).await?,
        Selection::All => all_ids(&mut client, String::new()).await?,
    };
    let mut results = Vec::new();
    let mut failed = 0;
    for id in ids {
        let request = ReplayDeadLetterRequest {
            id: id.clone(),
            force,
        };
        // A refused letter is one outcome among the others, not the end
        // of a replay of many.
        let (outcome, refused) = match client.replay(request).await {
            Ok(outcome) => (outcome.into_inner(), false),
            Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                let refused = ReplayDeadLetterResponse {
                    error: format!("refused: {}", status.message()),
                    grpc_status: -1,
                    ..Default::default()
                };
                (refused, true)
            }
            Err(status) => return Err(status.into()),
        };
        if !outcome.delivered {
            failed += 1;
        }
        results.push((id, outcome, refused));
    }
    if remote.json {
        let json: Vec<serde_json::Value> = results
            .iter()
            .map(|(id, o, _)| {
                serde_json::json!({"id": id, "delivered": o.delivered, "status": o.status, "error": o.error})
            })
            .collect();
        print_json(&json);
    } else {
        for (id, o, refused) in &results {
            match (o.delivered, refused) {
                (true, _) => say!("{id}: delivered ({}), removed", o.status),
                // The refusal's error says so.
                (false, true) => say!("{id}: {}", o.error),
                (false, false) => say!("{id}: failed again: {}", o.error),
            }
        }
        // One letter's line says it all; several get a count.
        if results.len() > 1 {
            say!(
                "{} of {} delivered; {failed} stay in the queue",
                results.len() - failed,
                results.len()
            );
        }
    }
    if failed > 0 {
        return Err(CliError::Usage(match failed {
            1 => "1 letter was not delivered and stays in the queue".to_owned(),
            n => format!("{n} letters were not delivered and stay in the queue"),
        }));
    }
    Ok(())
}

async fn all_ids(
    client: &mut DeadLettersClient<Authorized>,
    upstream: String,
) -> Result<Vec<String>, CliError> {
    let mut ids = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list(ListDeadLettersRequest {
                upstream: upstream.clone(),
                page_size: 1000,
                page_token,
                without_bodies: true,
            })
            .await?
            .into_inner();
        ids.extend(page.letters.into_iter().map(|l| l.id));
        if page.next_page_token.is_empty() {
            return Ok(ids);
        }
        page_token = page.next_page_token;
    }
}

/// Purges letters.
pub async fn dlq_purge(remote: &Remote, selection: Selection) -> Result<(), CliError> {
    let mut client = remote.dead_letters().await?;
    let targets = match selection {
        Selection::Ids(ids) => ids.into_iter().map(PurgeTarget::Id).collect(),
        Selection::Upstream(upstream) => vec![PurgeTarget::Upstream(upstream)],
        Selection::All => vec![PurgeTarget::All(true)],
    };
    let mut purged = 0;
    for target in targets {
        purged += client
            .purge(PurgeDeadLettersRequest {
                target: Some(target),
            })
            .await?
            .into_inner()
            .purged;
    }
    if remote.json {
        print_json(&serde_json::json!({"purged": purged}));
    } else {
        match purged {
            1 => say!("1 letter purged"),
            n => say!("{n} letters purged"),
        }
    }
    Ok(())
}
