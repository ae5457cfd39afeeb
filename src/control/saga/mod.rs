//! Sagas: ordered steps whose compensations run in reverse when a later
//! step fails, persisted at every transition and resumed after a crash.
//!
//! | room | what it holds |
//! |---|---|
//! | [`spec`] | a definition as submitted, and checked before it runs |
//! | [`template`] | step references (`{{steps.a.body.id}}`) parsed and filled in |
//! | [`record`] | the durable record: states, steps, calls, events |
//! | [`call`] | one call prepared, sent through the upstream's policy, judged |
//! | [`decide`] | the state machine: what each answer, abort or deadline changes |
//! | [`executor`] | starts, resumes, aborts, watches, persists and acts |
//! | [`proto`] | the records and definitions as the gRPC API's messages |

pub mod call;
pub mod decide;
pub mod executor;
pub mod proto;
pub mod record;
pub mod spec;
pub mod template;

pub use call::Upstreams;
pub use executor::{DEFAULT_WORKERS, Sagas};
pub use record::{CallRecord, SagaEvent, SagaRecord, SagaState, StepRecord, StepState, Time};
