//! Forward-proxy tunnels under the listener's limits: open tunnels count against
//! `max_connections` (a tunnel past it is refused 503 with `Retry-After`), and the stop
//! closes them once the drain times out. A real nats-server, a real TCP echo upstream.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::fixtures::routes_toml;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A TCP server that writes back whatever it reads.
async fn echo() -> SocketAddr {
    serve_tcp(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await
}

async fn sidecar(nats: &NatsServer, drain_timeout: &str, sidecar_extra: &str) -> Sidecar {
    let toml = routes_toml("tunnels", drain_timeout, "").replace("[nats]", &format!("{sidecar_extra}\n\n[nats]"));
    let s = Sidecar::start(&toml, &nats.url(), None).await;
    s.wait_nats().await;
    s
}

/// An HTTP/1 `CONNECT` tunnel through the egress listener to `target`.
async fn tunnel(egress: SocketAddr, target: SocketAddr) -> TcpStream {
    connect_tunnel(egress, &target.to_string()).await
}

/// Sends `msg` through the tunnel and reads it back from the echo.
async fn round_trip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back)).await.expect("echo within 5 s").unwrap();
    assert_eq!(back, msg);
}

type H2 = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

/// An HTTP/2 connection (h2c, prior knowledge) to the egress listener.
async fn h2(egress: SocketAddr) -> H2 {
    let io = TokioIo::new(TcpStream::connect(egress).await.unwrap());
    let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.unwrap();
    tokio::spawn(conn);
    send
}

/// A `CONNECT` to `target` on an HTTP/2 connection: its status, headers and body.
async fn h2_connect(send: &mut H2, target: SocketAddr) -> (u16, http::HeaderMap, String) {
    let req = http::Request::builder().method("CONNECT").uri(target.to_string()).body(Empty::<Bytes>::new()).unwrap();
    let res = send.send_request(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let body =
        if parts.status == 200 { String::new() } else { String::from_utf8_lossy(&body.collect().await.unwrap().to_bytes()).into_owned() };
    (parts.status.as_u16(), parts.headers, body)
}

#[tokio::test]
async fn tunnels_count_against_max_connections() {
    let nats = NatsServer::start();
    let upstream = echo().await;
    let s = sidecar(&nats, "5s", "max_connections = 2").await;
    // An HTTP/1 tunnel takes its connection's place over and keeps it while open.
    let mut first = tunnel(s.egress, upstream).await;
    round_trip(&mut first, b"one").await;
    // The h2c connection takes the second place: its CONNECT would be a third.
    let mut h2 = h2(s.egress).await;
    let (status, headers, body) = h2_connect(&mut h2, upstream).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(headers.get("content-type").unwrap(), "application/problem+json");
    assert_eq!(headers.get("retry-after").unwrap(), "1");
    assert!(body.contains("too-many-connections") && body.contains("max_connections = 2"), "{body}");
    round_trip(&mut first, b"still open").await;
    // Once the tunnel closes its place is free again: the h2c CONNECT is served.
    drop(first);
    eventually("the first tunnel closed", Duration::from_secs(10), || async {
        s.metrics().await.contains("natsbridge_egress_tunnels_open 0").then_some(())
    })
    .await;
    let (status, _, body) = h2_connect(&mut h2, upstream).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn the_stop_closes_open_tunnels_after_the_drain_timeout() {
    let nats = NatsServer::start();
    let upstream = echo().await;
    // The idle timeout alone would keep the tunnel for minutes.
    let s = sidecar(&nats, "2s", "idle_timeout = \"300s\"").await;
    let mut open = tunnel(s.egress, upstream).await;
    round_trip(&mut open, b"before").await;
    let stopping = Instant::now();
    s.shutdown.cancel();
    // Draining: the tunnel still carries bytes.
    round_trip(&mut open, b"during the drain").await;
    // Then it is closed, and the sidecar has stopped, within the drain budget (generous:
    // the machine is loaded).
    let mut b = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), open.read(&mut b)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "tunnel still open {:?} after the stop began: {read:?}", stopping.elapsed());
    let mut s = s;
    let task = s.task.take().unwrap();
    tokio::time::timeout(Duration::from_secs(10), task).await.expect("sidecar stopped").unwrap().unwrap();
    assert!(stopping.elapsed() < Duration::from_secs(8), "stop took {:?}", stopping.elapsed());
}
