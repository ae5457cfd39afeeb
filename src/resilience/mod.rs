//! Resilience: what Breakwater does to each call beyond passing it on.
//!
//! One module per mechanism; [`stack`] builds them into one service per
//! upstream, in the order written down there.

pub mod classify;
pub mod policy;
