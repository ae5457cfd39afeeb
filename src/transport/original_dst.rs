//! Where a redirected connection was going: netfilter keeps the
//! destination its `REDIRECT` rule replaced, and `SO_ORIGINAL_DST` (IPv4)
//! or `IP6T_SO_ORIGINAL_DST` (IPv6) reads it back.

use std::net::SocketAddr;

use tokio::net::TcpStream;

/// The destination `stream` was sent to before a `REDIRECT`; `None` when
/// it came to this port itself (or netfilter tracks nothing).
pub fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let local = stream.local_addr().ok()?;
    let socket = socket2::SockRef::from(stream);
    let found = match local {
        SocketAddr::V4(_) => socket.original_dst_v4(),
        SocketAddr::V6(_) => socket.original_dst_v6(),
    };
    // A connection that was not redirected reads as its own local address.
    found.ok()?.as_socket().filter(|dst| *dst != local)
}
