//! Following the policy file: reload when its content changes, and on
//! SIGHUP.
//!
//! The file is polled, not watched with inotify. Kubernetes updates a
//! mounted ConfigMap by writing a new timestamped directory and swapping a
//! `..data` symlink to it; the file the sidecar was given is a symlink
//! into `..data`, so an inotify watch on it (or on its directory) sees
//! nothing, or sees the old inode go away, depending on how the watch was
//! set. Reading the file every interval and comparing a hash of its content
//! follows every kind of update (in place, rename over, symlink swap) with
//! no platform code, for the price of reading a small file every couple of
//! seconds. A change is reloaded once its content has settled (two reads a
//! moment apart agree), so a file caught half-written is not reported as
//! invalid.

use std::future::Future;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

/// How to follow the policy file.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// The policy file.
    pub path: PathBuf,
    /// How often its content is compared; zero turns polling off (SIGHUP
    /// still reloads).
    pub interval: Duration,
}

/// Calls `reload` with the file's path when its content changes or the
/// process gets SIGHUP, until `stop` turns true. The file's content at the
/// time of the call is the baseline: call it right after loading the file.
pub fn run<F, Fut>(
    options: WatchOptions,
    stop: watch::Receiver<bool>,
    reload: F,
) -> impl Future<Output = ()>
where
    F: Fn(PathBuf) -> Fut,
    Fut: Future<Output = ()>,
{
    let baseline = std::fs::read(&options.path).ok().map(|bytes| hash(&bytes));
    follow(options, stop, reload, baseline)
}

async fn follow<F, Fut>(
    options: WatchOptions,
    mut stop: watch::Receiver<bool>,
    reload: F,
    mut last: Option<u64>,
) where
    F: Fn(PathBuf) -> Fut,
    Fut: Future<Output = ()>,
{
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(hangup) => Some(hangup),
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGHUP; reloads follow the file only");
            None
        }
    };
    let polling = !options.interval.is_zero();
    let mut ticker = tokio::time::interval(if polling {
        options.interval
    } else {
        Duration::from_secs(3600)
    });
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = async { let _ = stop.wait_for(|stop| *stop).await; } => break,
            Some(()) = async { hangup.as_mut()?.recv().await } => {
                tracing::info!(file = %options.path.display(), "SIGHUP: reloading");
                last = content_hash(&options.path).await;
                reload(options.path.clone()).await;
            }
            _ = ticker.tick(), if polling => {
                let now = content_hash(&options.path).await;
                if now == last || now.is_none() {
                    continue;
                }
                tokio::time::sleep(settle_time(options.interval)).await;
                if content_hash(&options.path).await != now {
                    continue;
                }
                last = now;
                tracing::info!(file = %options.path.display(), "policy file changed: reloading");
                reload(options.path.clone()).await;
            }
        }
    }
}

/// How long a changed file must stay unchanged before it is read as the
/// new config.
fn settle_time(interval: Duration) -> Duration {
    (interval / 4).clamp(Duration::from_millis(10), Duration::from_millis(250))
}

/// A hash of the file's content, following symlinks; `None` while it
/// cannot be read (between a delete and a create, say).
async fn content_hash(path: &std::path::Path) -> Option<u64> {
    let bytes = tokio::fs::read(path).await.ok()?;
    Some(hash(&bytes))
}

fn hash(bytes: &[u8]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}
