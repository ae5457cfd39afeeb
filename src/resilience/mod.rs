//! Resilience: what Breakwater does to each call beyond passing it on.
//!
//! One module per mechanism; [`stack`] composes them for each upstream,
//! in the order written down there.

pub mod breaker;
pub mod concurrency;
pub mod connect;
pub mod deadline;
pub mod fallback;
pub mod faults;
pub mod hold;
pub mod policy;
pub mod retry;
pub mod stack;
pub mod stream;
