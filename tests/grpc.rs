//! gRPC through the sidecar: every streaming kind, metadata, large
//! messages, status pass-through, synthetic statuses and cancellation.

mod support;

use std::time::Duration;

use breakwater::echo::EchoRequest;
use breakwater::echo::echo_client::EchoClient;
use bytes::Bytes;
use support::*;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request};

/// A client on the shared port, routed by `:authority`.
async fn shared_client(addr: std::net::SocketAddr, authority: &str) -> EchoClient<Channel> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .origin(format!("http://{authority}").parse().unwrap())
        .connect()
        .await
        .unwrap();
    EchoClient::new(channel)
}

fn echo(payload: &'static [u8]) -> EchoRequest {
    EchoRequest {
        payload: Bytes::from_static(payload),
        ..Default::default()
    }
}

async fn setup() -> (GrpcUpstream, breakwater::sidecar::Sidecar) {
    let upstream = GrpcUpstream::start().await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  ocr:\n    address: {}\n    protocol: grpc\n    listen: 127.0.0.1:0\n",
        upstream.addr
    ))
    .await;
    (upstream, sidecar)
}

#[tokio::test]
async fn unary_with_metadata_both_ways() {
    let (upstream, sidecar) = setup().await;
    let mut client = grpc_client(sidecar.upstream_addrs["ocr"]).await;
    let mut request = Request::new(echo(b"invoice-17"));
    request
        .metadata_mut()
        .insert("x-echo-tenant", "acme".parse().unwrap());
    let response = client.unary(request).await.unwrap();
    assert_eq!(response.metadata().get("x-echo-tenant").unwrap(), "acme");
    assert_eq!(response.into_inner().payload, "invoice-17");
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test]
async fn shared_port_routes_by_authority() {
    let (upstream, sidecar) = setup().await;
    let mut client = shared_client(sidecar.proxy_addr, "ocr").await;
    let reply = client.unary(echo(b"via authority")).await.unwrap();
    assert_eq!(reply.into_inner().payload, "via authority");
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test]
async fn client_server_and_bidirectional_streams() {
    let (_upstream, sidecar) = setup().await;
    let mut client = grpc_client(sidecar.upstream_addrs["ocr"]).await;

    let messages = tokio_stream::iter((0..50).map(|_| echo(b"0123456789")));
    let reply = client.client_stream(messages).await.unwrap().into_inner();
    assert_eq!((reply.count, reply.total_bytes), (50, 500));

    let mut stream = client
        .server_stream(EchoRequest {
            payload: Bytes::from_static(b"page"),
            repeat: 20,
            interval_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut counts = Vec::new();
    while let Some(reply) = stream.message().await.unwrap() {
        counts.push(reply.count);
    }
    assert_eq!(counts, (1..=20).collect::<Vec<_>>());

    // Bidirectional: each reply arrives before the next request is sent.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut replies = client
        .bidi_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for i in 1..=5u32 {
        tx.send(EchoRequest {
            payload: Bytes::from(i.to_string()),
            ..Default::default()
        })
        .await
        .unwrap();
        let reply = replies.message().await.unwrap().unwrap();
        assert_eq!(
            (reply.count, reply.payload),
            (i, Bytes::from(i.to_string()))
        );
    }
    drop(tx);
    assert!(replies.message().await.unwrap().is_none());
}

#[tokio::test]
async fn eight_mebibyte_messages_both_ways() {
    let (_upstream, sidecar) = setup().await;
    let mut client = grpc_client(sidecar.upstream_addrs["ocr"]).await;
    let payload = Bytes::from(vec![0xabu8; 8 << 20]);
    let reply = client
        .unary(EchoRequest {
            payload: payload.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.payload.len(), 8 << 20);
    assert_eq!(reply.payload, payload);
}

#[tokio::test]
async fn upstream_status_and_message_pass_through_unchanged() {
    let (_upstream, sidecar) = setup().await;
    let mut client = grpc_client(sidecar.upstream_addrs["ocr"]).await;
    let mut request = Request::new(echo(b"x"));
    request
        .metadata_mut()
        .insert("x-echo-status", "8".parse().unwrap());
    request
        .metadata_mut()
        .insert("x-echo-message", "quota: 10 pages/min".parse().unwrap());
    let status = client.unary(request).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(status.message(), "quota: 10 pages/min");
    assert!(
        status.metadata().get("x-breakwater-error").is_none(),
        "the upstream's own answer"
    );

    // A status in trailers, after messages.
    let mut request = Request::new(EchoRequest {
        payload: Bytes::from_static(b"p"),
        repeat: 3,
        interval_ms: 0,
    });
    request
        .metadata_mut()
        .insert("x-echo-status", "14".parse().unwrap());
    request
        .metadata_mut()
        .insert("x-echo-message", "scanner jammed".parse().unwrap());
    let mut stream = client.server_stream(request).await.unwrap().into_inner();
    let mut n = 0;
    let status = loop {
        match stream.message().await {
            Ok(Some(_)) => n += 1,
            Ok(None) => panic!("the stream ended without its status"),
            Err(status) => break status,
        }
    };
    assert_eq!(n, 3);
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(status.message(), "scanner jammed");
}

#[tokio::test]
async fn unreachable_upstream_is_unavailable_with_a_reason() {
    let closed = closed_port().await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  ocr: {{address: '{closed}', protocol: grpc, listen: '127.0.0.1:0'}}\n"
    ))
    .await;
    let mut client = grpc_client(sidecar.upstream_addrs["ocr"]).await;
    let status = client.unary(echo(b"x")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status
            .message()
            .starts_with("cannot connect to upstream ocr"),
        "{}",
        status.message()
    );
    assert_eq!(
        status.metadata().get("x-breakwater-error").unwrap(),
        "connect-failure"
    );
}

#[tokio::test]
async fn unknown_authority_is_unimplemented() {
    let (upstream, sidecar) = setup().await;
    let mut client = shared_client(sidecar.proxy_addr, "billing").await;
    let status = client.unary(echo(b"x")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
    assert_eq!(
        status.metadata().get("x-breakwater-error").unwrap(),
        "unknown-host"
    );
    assert_eq!(upstream.calls(), 0);
}

#[tokio::test]
async fn cancelling_a_call_resets_the_upstream_stream() {
    let (upstream, sidecar) = setup().await;
    let mut client = grpc_client(sidecar.upstream_addrs["ocr"]).await;
    let mut stream = client
        .server_stream(EchoRequest {
            payload: Bytes::from_static(b"tick"),
            repeat: 10_000,
            interval_ms: 10,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
    drop(stream);
    // The upstream learns of the cancellation through the reset stream.
    tokio::time::timeout(Duration::from_secs(10), async {
        while upstream.cancelled() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the upstream stream was reset");
    assert_eq!(upstream.cancelled(), 1);
}
