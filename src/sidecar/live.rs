//! The live configuration: one generation of upstreams and routes, swapped
//! whole on reload.
//!
//! Every request loads the current [`Live`] once (one atomic load, no
//! lock), takes the `Arc` of its upstream and lets go: a reload swaps in a
//! new generation for the requests that start after it, while the requests
//! in flight finish on the upstream they started with. An upstream whose
//! address, protocol and policy did not change keeps its client, its stack
//! and so its breaker state, retry budget, concurrency slots and runtime
//! faults across reloads.

use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;

use super::route::Routes;
use crate::config::Config;
use crate::telemetry::metrics::Metrics;
use crate::upstream::Upstream;

/// The cell every listener and the admin endpoint read the live
/// configuration from.
pub type LiveCell = Arc<ArcSwap<Live>>;

/// One generation of the configuration, ready to serve.
#[derive(Debug)]
pub struct Live {
    /// 1 for the configuration the sidecar started with, then one more per
    /// successful reload.
    pub generation: u64,
    /// The configuration.
    pub config: Arc<Config>,
    /// Every upstream, sorted by name.
    upstreams: Vec<Arc<Upstream>>,
    routes: Routes,
    config_json: Bytes,
}

impl Live {
    /// Builds a generation, reusing the upstreams of `previous` whose
    /// stack did not change.
    pub fn build(
        config: Config,
        generation: u64,
        metrics: &Metrics,
        previous: Option<&Live>,
    ) -> Self {
        let upstreams: Vec<Arc<Upstream>> = config
            .upstreams
            .iter()
            .map(|c| {
                let reused = previous
                    .and_then(|p| p.upstream(&c.name))
                    .and_then(|old| old.reuse(c));
                Arc::new(reused.unwrap_or_else(|| Upstream::new(c.clone(), metrics)))
            })
            .collect();
        let routes = Routes::new(&upstreams);
        let config_json = serde_json::to_vec_pretty(&config).expect("the config serializes");
        Self {
            generation,
            config: Arc::new(config),
            upstreams,
            routes,
            config_json: Bytes::from(config_json),
        }
    }

    /// An upstream by name.
    pub fn upstream(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.upstreams
            .binary_search_by(|u| (*u.config.name).cmp(name))
            .ok()
            .map(|i| &self.upstreams[i])
    }

    /// Every upstream, sorted by name.
    pub fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.upstreams
    }

    /// The shared port's host table.
    pub fn routes(&self) -> &Routes {
        &self.routes
    }

    /// The configuration as JSON, rendered once.
    pub fn config_json(&self) -> Bytes {
        self.config_json.clone()
    }
}
