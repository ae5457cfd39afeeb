//! Following the policy file: reload when its content changes, or the
//! content of a file it names (a TLS certificate or key, a credential read
//! from a Secret), and on SIGHUP.
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

/// Calls `reload` with the file's path when its content changes, or that
/// of a file `named` lists (the files the config in force names), or the
/// process gets SIGHUP, until `stop` turns true. The files' content when
/// the future is first polled is the baseline: spawn it right after
/// loading the file.
pub fn run<F, Fut, N>(
    options: WatchOptions,
    stop: watch::Receiver<bool>,
    named: N,
    reload: F,
) -> impl Future<Output = ()>
where
    F: Fn(PathBuf) -> Fut,
    Fut: Future<Output = ()>,
    N: Fn() -> Vec<PathBuf>,
{
    let baseline = content_hash(&options.path, &named());
    follow(options, stop, named, reload, baseline)
}

async fn follow<F, Fut, N>(
    options: WatchOptions,
    mut stop: watch::Receiver<bool>,
    named: N,
    reload: F,
    mut last: Option<u64>,
) where
    F: Fn(PathBuf) -> Fut,
    Fut: Future<Output = ()>,
    N: Fn() -> Vec<PathBuf>,
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
                last = content_hash(&options.path, &named());
                reload(options.path.clone()).await;
            }
            _ = ticker.tick(), if polling => {
                let files = named();
                let now = content_hash(&options.path, &files);
                if now == last || now.is_none() {
                    continue;
                }
                tokio::time::sleep(settle_time(options.interval)).await;
                if content_hash(&options.path, &files) != now {
                    continue;
                }
                tracing::info!(file = %options.path.display(), "policy file or a file it names changed: reloading");
                reload(options.path.clone()).await;
                // The baseline is what the config now in force names.
                last = content_hash(&options.path, &named());
            }
        }
    }
}

/// How long a changed file must stay unchanged before it is read as the
/// new config.
fn settle_time(interval: Duration) -> Duration {
    (interval / 4).clamp(Duration::from_millis(10), Duration::from_millis(250))
}

/// A hash of the policy file's content and of the files it names,
/// following symlinks; `None` while the policy file cannot be read
/// (between a delete and a create, say). A named file that cannot be read
/// counts as a content of its own: its return is a change too. The files
/// are small (a policy, PEM files, tokens) and read in place.
fn content_hash(path: &std::path::Path, named: &[PathBuf]) -> Option<u64> {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    std::fs::read(path).ok()?.hash(&mut hasher);
    for file in named {
        std::fs::read(file).ok().hash(&mut hasher);
    }
    Some(hasher.finish())
}
