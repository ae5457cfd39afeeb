//! The control plane's API, shared by its servers and its clients: the
//! code generated from `proto/breakwater/v1` (messages, gRPC servers and
//! clients), the JSON shapes of its records ([`json`]) and the bearer
//! token ([`token`]).

#![allow(missing_docs, clippy::all)]

pub mod json;
pub mod token;

tonic::include_proto!("breakwater.v1");

/// Every message and service, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/breakwater_descriptor.bin"));
