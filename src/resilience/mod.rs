//! Resilience: what Breakwater does to each call beyond passing it on.
//!
//! One module per mechanism; [`stack`] builds them into one service per
//! upstream, in the order written down there.

pub mod breaker;
pub mod classify;
pub mod concurrency;
pub mod deadline;
pub mod policy;
pub mod retry;
pub mod stack;
pub mod timeout;

use std::future::Future;
use std::pin::Pin;

use http::Response;

use crate::body::Body;
use crate::edge::ProxyError;

/// The future every layer of the stack returns: one concrete type, so
/// layers compose without generic future types (and without the
/// higher-ranked `Send` errors that nested `async` blocks over generic
/// futures run into).
pub type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, ProxyError>> + Send>>;
