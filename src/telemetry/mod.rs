//! Telemetry in one place: every metric is registered in [`metrics`], and
//! logging is set up in [`logging`]. Layers receive metric handles; they do
//! not register their own.

pub mod logging;
pub mod metrics;
pub mod traces;
