//! HTTP/2 with prior knowledge (h2c) on the egress listener, beside HTTP/1.1 on the same
//! port (issue 13 §5): the same routes, the same limits, the same forward-proxy rules,
//! driven by a real hyper HTTP/2 client against a real sidecar, NATS server and app.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use support::fixtures::responder;
use support::*;

fn routes(app: &str, sidecar_extra: &str) -> String {
    format!(
        r#"
[sidecar]
service = "h2"
{sidecar_extra}

[defaults]
timeout = "2s"
max_body = "1KiB"

[[outbound]]
name = "echo"
method = "POST"
path = "/echo/{{id}}"
subject = "echo.{{id}}"
mode = "request"

[[outbound]]
name = "agent"
method = "POST"
host = "agent-service"
path = "/agents/{{id}}"
subject = "agent.{{id}}"
mode = "request"

[[outbound]]
name = "legacy"
path = "/legacy/{{*rest}}"
mode = "http"
upstream = "{app}"
"#
    )
}

/// An HTTP/2-only client (prior knowledge: no upgrade, no ALPN).
fn h2_client() -> Client {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).http2_only(true).build_http()
}

async fn h2_send(req: Request<Full<Bytes>>) -> Reply {
    let res = h2_client().request(req).await.unwrap();
    assert_eq!(res.version(), Version::HTTP_2, "the sidecar answered over HTTP/2");
    let (parts, body) = res.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    Reply { status: parts.status.as_u16(), headers: parts.headers, body }
}

fn post_req(url: &str, body: &str) -> Request<Full<Bytes>> {
    Request::post(url).body(Full::new(Bytes::copy_from_slice(body.as_bytes()))).unwrap()
}

struct Setup {
    nats: NatsServer,
    app: App,
    sidecar: Sidecar,
}

async fn setup(sidecar_extra: &str) -> Setup {
    let nats = NatsServer::start();
    let app = App::start(|s| respond(201, &format!("app saw {} {} {}", s.method, s.uri, String::from_utf8_lossy(&s.body)))).await;
    let sidecar = Sidecar::start(&routes(&app.url(), sidecar_extra), &nats.url(), None).await;
    sidecar.wait_ready().await;
    Setup { nats, app, sidecar }
}

#[tokio::test]
async fn both_protocols_reach_the_same_request_route_through_nats() {
    let s = setup("").await;
    let _echo = responder(&s.nats, "echo.*", |m| {
        (async_nats::HeaderMap::new(), Bytes::from(format!("{} got {}", m.subject, String::from_utf8_lossy(&m.payload))))
    })
    .await;
    let h1 = post(&s.sidecar.url("/echo/7"), "hi").await;
    let h2 = h2_send(post_req(&s.sidecar.url("/echo/7"), "hi")).await;
    assert_eq!((h1.status, h1.text()), (200, "echo.7 got hi".to_string()));
    assert_eq!((h2.status, h2.text()), (h1.status, h1.text()));
    assert!(h2.header("x-request-id").is_some());
    let m = s.sidecar.metrics().await;
    assert!(
        m.lines().any(|l| l.starts_with("natsbridge_egress_requests_total") && l.contains("route=\"echo\"") && l.ends_with(" 2")),
        "{m}"
    );
}

#[tokio::test]
async fn an_h2_authority_is_the_host_a_route_matches() {
    // Over HTTP/2 `:authority` says where the call goes, as the absolute form does through
    // HTTP_PROXY: agent-service's route takes it.
    let s = setup("").await;
    let _agent = responder(&s.nats, "agent.*", |m| (async_nats::HeaderMap::new(), Bytes::from(format!("agent {}", m.subject)))).await;
    let client = h2_client_to(s.sidecar.egress).await;
    let res = client.send(post_req("http://agent-service/agents/9", "x")).await;
    assert_eq!((res.status, res.text()), (200, "agent agent.9".to_string()));
    // The same path addressed to the sidecar itself: no host route, so 404 as over HTTP/1.
    let h1 = post(&s.sidecar.url("/agents/9"), "x").await;
    let h2 = h2_send(post_req(&s.sidecar.url("/agents/9"), "x")).await;
    assert_eq!(h1.status, 404);
    assert_eq!(h2.status, 404, "{}", h2.text());
    assert_eq!(h2.json()["type"], h1.json()["type"]);
}

#[tokio::test]
async fn an_http_route_passes_through_over_h2() {
    let s = setup("").await;
    let h1 = post(&s.sidecar.url("/legacy/a?q=1"), "one").await;
    let h2 = h2_send(post_req(&s.sidecar.url("/legacy/a?q=1"), "one")).await;
    assert_eq!((h1.status, h1.text()), (201, "app saw POST /legacy/a?q=1 one".to_string()));
    assert_eq!((h2.status, h2.text()), (h1.status, h1.text()));
    let hits = s.app.wait_hits(2).await;
    // The app speaks HTTP/1.1 and gets a Host either way.
    assert!(hits.iter().all(|h| h.header("host") == Some(s.app.addr.to_string().as_str())), "{hits:?}");
}

#[tokio::test]
async fn an_unrouted_h2_call_to_another_authority_is_forwarded() {
    // The forward proxy over HTTP/2: an authority that is not the sidecar and no route.
    let s = setup("").await;
    let client = h2_client_to(s.sidecar.egress).await;
    let res = client.send(post_req(&format!("{}/elsewhere", s.app.url()), "fwd")).await;
    assert_eq!((res.status, res.text()), (201, "app saw POST /elsewhere fwd".to_string()));
    // Addressed to the sidecar itself with no route: 404, not forwarded into a loop.
    let res = h2_send(post_req(&s.sidecar.url("/elsewhere"), "x")).await;
    assert_eq!(res.status, 404, "{}", res.text());
    assert_eq!(s.app.hits().len(), 1);
}

#[tokio::test]
async fn h2_limits_answer_the_same_statuses() {
    let s = setup("max_headers = 20\nmax_header_bytes = \"8KiB\"").await;
    let _echo = responder(&s.nats, "echo.*", |_| (async_nats::HeaderMap::new(), Bytes::from_static(b"ok"))).await;
    // Body past the route's max_body.
    let big = "x".repeat(2048);
    let h1 = post(&s.sidecar.url("/echo/1"), &big).await;
    let h2 = h2_send(post_req(&s.sidecar.url("/echo/1"), &big)).await;
    assert_eq!((h1.status, h2.status), (413, 413), "{}", h2.text());
    // Too many header fields.
    let mut req = post_req(&s.sidecar.url("/echo/1"), "x");
    for i in 0..30 {
        req.headers_mut().insert(http::HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap(), "v".parse().unwrap());
    }
    let res = h2_send(req).await;
    assert_eq!(res.status, 431, "{}", res.text());
    assert_eq!(res.header("content-type"), Some("application/problem+json"));
    // A header block past max_header_bytes: h2 refuses it with 431 before the service.
    let mut req = post_req(&s.sidecar.url("/echo/1"), "x");
    req.headers_mut().insert("x-big", "v".repeat(10 << 10).parse().unwrap());
    let res = h2_send(req).await;
    assert_eq!(res.status, 431);
    // Under the limits, the same connection pool still works.
    let ok = h2_send(post_req(&s.sidecar.url("/echo/1"), "x")).await;
    assert_eq!(ok.status, 200);
}

#[tokio::test]
async fn an_idle_h2_connection_with_pings_outlives_the_header_timeout() {
    // Pings on an idle connection are not a request starting: the header timeout must not
    // cut the connection; the idle timeout (10s) is far off.
    let s = setup("header_read_timeout = \"300ms\"\nidle_timeout = \"10s\"").await;
    let _echo = responder(&s.nats, "echo.*", |_| (async_nats::HeaderMap::new(), Bytes::from_static(b"ok"))).await;
    let client = h2_client_to(s.sidecar.egress).await;
    assert_eq!(client.send(post_req(&s.sidecar.url("/echo/1"), "a")).await.status, 200);
    // Several header timeouts of pings (every 50ms) on an idle connection.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(!client.closed(), "the idle connection was cut");
    assert_eq!(client.send(post_req(&s.sidecar.url("/echo/1"), "b")).await.status, 200);
}

#[tokio::test]
async fn an_h2_connection_that_never_sends_a_request_is_cut_at_the_header_timeout() {
    let s = setup("header_read_timeout = \"300ms\"\nidle_timeout = \"10s\"").await;
    let client = h2_client_to(s.sidecar.egress).await;
    eventually("the silent h2 connection closed", Duration::from_secs(5), || {
        let closed = client.closed();
        async move { closed.then_some(()) }
    })
    .await;
}

/// One HTTP/2 connection to `addr`, whatever authority its requests name; pings every
/// 50ms while idle.
struct H2Conn {
    send: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    done: tokio::task::JoinHandle<()>,
}

async fn h2_client_to(addr: SocketAddr) -> H2Conn {
    let io = TokioIo::new(tokio::net::TcpStream::connect(addr).await.unwrap());
    let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_millis(50))
        .keep_alive_while_idle(true)
        .handshake(io)
        .await
        .unwrap();
    let done = tokio::spawn(async move {
        let _ = conn.await;
    });
    H2Conn { send, done }
}

impl H2Conn {
    async fn send(&self, req: Request<Full<Bytes>>) -> Reply {
        let res = self.send.clone().send_request(req).await.unwrap();
        let (parts, body) = res.into_parts();
        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        Reply { status: parts.status.as_u16(), headers: parts.headers, body }
    }

    fn closed(&self) -> bool {
        self.done.is_finished()
    }
}
