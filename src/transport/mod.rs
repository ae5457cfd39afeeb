//! The transport: bytes on the wire, below every policy.
//!
//! [`client`] puts one attempt on the wire (HTTP/1.1 pool or the
//! upstream's one HTTP/2 connection, [`h2`]), over TLS where the upstream
//! speaks it ([`tls`]), keeping an HTTP/1.1 upstream's early answer
//! ([`linger`]); [`headers`] knows which
//! headers are hop-by-hop; [`server`] is the accept loop every listener of
//! the sidecar and the control plane runs (over TLS for the control plane
//! when it has a certificate, [`tls::server`]); [`channel`] is the gRPC
//! channel to the control plane, for the sidecar and the CLI; [`original_dst`]
//! reads where a redirected connection was going. Nothing here decides whether an
//! answer failed or what to do about it: that is `resilience`.

pub mod channel;
pub mod client;
pub mod h2;
pub mod headers;
pub mod linger;
pub mod original_dst;
pub mod pace;
pub mod server;
pub mod sni;
pub mod tls;
pub mod upgrade;
