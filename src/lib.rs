//! Breakwater: a resilience sidecar for AI-agent services.
//!
//! Multi-agent systems fail as graphs: one slow agent times out and every
//! agent downstream of it is skipped or fed partial data. Breakwater runs
//! beside each agent and applies each upstream's policy to the agent's
//! outbound HTTP and gRPC calls.
//!
//! The library is the product; the `breakwater` binary only parses
//! arguments and calls [`sidecar::run`], [`config::load`] and [`demo::run`].

#![forbid(unsafe_code)]

pub mod api;
pub mod body;
pub mod classify;
pub mod cli;
pub mod codec;
pub mod commands;
pub mod config;
pub mod control;
pub mod demo;
pub mod edge;
pub mod error;
pub mod example;
pub mod grpc;
pub mod inject;
pub mod intercept;
pub mod jsonrpc;
pub mod matching;
pub mod resilience;
pub mod sidecar;
pub mod telemetry;
pub mod transport;
pub mod upstream;
pub mod values;
pub mod web;

/// Generated code for the demo's OCR agent.
pub mod ocr {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("breakwater.demo.v1");
}

/// Generated code for the built-in example gRPC service.
pub mod echo {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("breakwater.echo.v1");
}

/// The example services' descriptors (echo and the demo's OCR agent), as
/// an encoded `FileDescriptorSet`.
pub const EXAMPLE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/example_descriptor.bin"));
