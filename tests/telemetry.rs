//! `[telemetry]`: one trace across the hop. A caller → the egress sidecar → NATS → the
//! ingress sidecar → the app, both sidecars exporting over OTLP/HTTP to a real receiver in
//! the test, which decodes the protobuf with the OpenTelemetry proto types.

mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message as _;
use support::fixtures::{event_outbound, events_route, events_streams, orders_route, routes_toml};
use support::{call, respond, App, NatsServer, Sidecar};

/// The caller's trace: the egress server span must be its child.
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// One exported span, flattened.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    kind: SpanKind,
    trace: String,
    id: String,
    parent: String,
    start: u64,
    attrs: HashMap<String, String>,
}

impl Got {
    fn attr(&self, key: &str) -> &str {
        self.attrs.get(key).map(String::as_str).unwrap_or_else(|| panic!("span {:?} has no {key}: {:?}", self.name, self.attrs))
    }
}

/// A real OTLP/HTTP receiver on port 0: `POST /v1/traces`, protobuf bodies.
struct Receiver {
    addr: SocketAddr,
    /// Exports that arrived (hung or answered).
    hits: Arc<std::sync::atomic::AtomicUsize>,
    spans: Arc<Mutex<Vec<Got>>>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Receiver {
    async fn start() -> Self {
        Self::serve(false).await
    }

    /// A collector that reads each export and never answers.
    async fn hanging() -> Self {
        Self::serve(true).await
    }

    async fn serve(hang: bool) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (spans, requests) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())));
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (s, r, h) = (spans.clone(), requests.clone(), hits.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (s, r, h) = (s.clone(), r.clone(), h.clone());
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (s, r, h) = (s.clone(), r.clone(), h.clone());
                    async move {
                        h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if hang {
                            std::future::pending::<()>().await;
                        }
                        Ok::<_, Infallible>(receive(req, &s, &r).await)
                    }
                });
                tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc));
            }
        });
        Self { addr, hits, spans, requests }
    }

    fn spans(&self) -> Vec<Got> {
        self.spans.lock().unwrap().clone()
    }
}

/// Records what one export carries; answers as a collector does (an empty response).
async fn receive(req: Request<hyper::body::Incoming>, spans: &Mutex<Vec<Got>>, requests: &Mutex<Vec<String>>) -> Response<Full<Bytes>> {
    let ct = req.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    requests.lock().unwrap().push(format!("{} {} {ct}", req.method(), req.uri().path()));
    if req.method() != http::Method::POST || req.uri().path() != "/v1/traces" || ct != "application/x-protobuf" {
        return respond(404, "");
    }
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let export = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf export");
    let mut out = spans.lock().unwrap();
    for rs in export.resource_spans {
        let attrs = rs.resource.map(|r| flatten(&r.attributes)).unwrap_or_default();
        let service = attrs.get("service.name").cloned().unwrap_or_default();
        for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
            out.push(Got {
                service: service.clone(),
                kind: SpanKind::try_from(span.kind).unwrap_or(SpanKind::Unspecified),
                trace: hex(&span.trace_id),
                id: hex(&span.span_id),
                parent: hex(&span.parent_span_id),
                start: span.start_time_unix_nano,
                attrs: flatten(&span.attributes),
                name: span.name,
            });
        }
    }
    let mut res = Response::new(Full::new(Bytes::new()));
    res.headers_mut().insert("content-type", "application/x-protobuf".parse().unwrap());
    res
}

fn flatten(kvs: &[opentelemetry_proto::tonic::common::v1::KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .filter_map(|kv| {
            let v = match kv.value.as_ref()?.value.as_ref()? {
                Value::StringValue(s) => s.clone(),
                Value::IntValue(i) => i.to_string(),
                Value::BoolValue(b) => b.to_string(),
                Value::DoubleValue(d) => d.to_string(),
                other => format!("{other:?}"),
            };
            Some((kv.key.clone(), v))
        })
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn telemetry(receiver: &Receiver, service_name: &str) -> String {
    format!("[telemetry]\notlp_endpoint = \"http://{}\"\nservice_name = \"{service_name}\"\n", receiver.addr)
}

/// The one span of `service` with `kind`.
fn one(spans: &[Got], service: &str, kind: SpanKind) -> Got {
    let found: Vec<_> = spans.iter().filter(|s| s.service == service && s.kind == kind).collect();
    assert_eq!(found.len(), 1, "one {kind:?} span of {service}, got {spans:#?}");
    found[0].clone()
}

/// Stops both sidecars (their stop exports what is still queued), within a bound.
async fn stop_both(a: Sidecar, b: Sidecar) {
    let started = Instant::now();
    let stops = async { tokio::join!(a.stop(), b.stop()) };
    tokio::time::timeout(Duration::from_secs(10), stops).await.expect("both sidecars stop within their drain budget");
    tracing::info!(took = ?started.elapsed(), "sidecars stopped");
}

/// The spans of one call through two sidecars, as the receiver holds them once both have
/// stopped: no waiting after the stop, the stop itself exported them.
async fn trace_one_call(egress_routes: &str, ingress_routes: &str, path: &str, expect: u16) -> (Vec<Got>, App) {
    let _ = tracing_subscriber::fmt().with_env_filter("natsbridge=info").with_test_writer().try_init();
    let nats = NatsServer::start();
    events_streams(&async_nats::jetstream::new(nats.client().await)).await;
    let receiver = Receiver::start().await;
    let app = App::start(|_| respond(200, "{\"ok\":true}")).await;
    let egress_toml = routes_toml("shop", "3s", &format!("{egress_routes}\n{}", telemetry(&receiver, "shop-sidecar")));
    let ingress_toml = routes_toml("billing", "3s", &format!("{ingress_routes}\n{}", telemetry(&receiver, "billing-sidecar")));
    let ingress = Sidecar::start(&ingress_toml, &nats.url(), Some(&app.url())).await;
    let egress = Sidecar::start(&egress_toml, &nats.url(), None).await;
    ingress.wait_ready().await;
    egress.wait_ready().await;

    let traceparent = format!("00-{TRACE}-{CALLER_SPAN}-01");
    let reply = call("POST", &egress.url(path), &[("traceparent", &traceparent), ("content-type", "application/json")], "{}").await;
    assert_eq!(reply.status, expect, "{:?}", String::from_utf8_lossy(&reply.body));
    app.wait_hits(1).await;
    stop_both(egress, ingress).await;
    let spans: Vec<Got> = receiver.spans().into_iter().filter(|s| s.trace == TRACE).collect();
    assert!(receiver.requests.lock().unwrap().iter().all(|r| r == "POST /v1/traces application/x-protobuf"), "{:?}", receiver.requests);
    (spans, app)
}

/// Asserts the four spans' tree: caller → egress server → NATS hop → message → app call,
/// each started no earlier than its parent; the app got the app call's context. Returns
/// them in that order.
fn assert_tree(spans: &[Got], app: &App, hop: SpanKind, message: SpanKind) -> [Got; 4] {
    assert_eq!(spans.len(), 4, "four spans in the caller's trace: {spans:#?}");
    let server = one(spans, "shop-sidecar", SpanKind::Server);
    let hop = one(spans, "shop-sidecar", hop);
    let message = one(spans, "billing-sidecar", message);
    let client = one(spans, "billing-sidecar", SpanKind::Client);
    assert_eq!(server.parent, CALLER_SPAN, "the egress server span is the caller's child");
    assert_eq!(hop.parent, server.id, "the NATS hop is the server span's child");
    assert_eq!(message.parent, hop.id, "the ingress message span is the NATS hop's child, across NATS");
    assert_eq!(client.parent, message.id, "the app call is the message span's child");
    for (parent, child) in [(&server, &hop), (&hop, &message), (&message, &client)] {
        assert!(child.start >= parent.start, "{} starts before its parent {}", child.name, parent.name);
    }
    let seen = app.hits()[0].header("traceparent").unwrap_or_default().to_owned();
    assert_eq!(seen, format!("00-{TRACE}-{}-01", client.id), "the app gets the app call span as its parent");
    [server, hop, message, client]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_jetstream_call_is_one_trace_across_both_sidecars() {
    let ingress = events_route("/events", "dead_letter = \"dlq.events\"");
    let (spans, app) = trace_one_call(&event_outbound("5s"), &ingress, "/events", 202).await;
    let [server, producer, consumer, client] = assert_tree(&spans, &app, SpanKind::Producer, SpanKind::Consumer);
    for (span, route) in [(&server, "event"), (&producer, "event"), (&consumer, "events"), (&client, "events")] {
        assert_eq!(span.attr("natsbridge.route"), route, "{span:#?}");
        assert_eq!(span.attr("natsbridge.mode"), "jetstream", "{span:#?}");
        assert_eq!(span.attr("messaging.destination.name"), "events.created", "{span:#?}");
    }
    assert_eq!((server.attr("http.response.status_code"), producer.attr("http.response.status_code")), ("202", "202"));
    assert_eq!((consumer.attr("http.response.status_code"), client.attr("http.response.status_code")), ("200", "200"));
    assert_eq!((consumer.attr("natsbridge.delivery_count"), client.attr("natsbridge.delivery_count")), ("1", "1"));
    assert_eq!((server.attr("http.route"), server.attr("http.request.method")), ("/events", "POST"));
    assert_eq!((producer.attr("messaging.system"), producer.attr("messaging.operation.type")), ("nats", "publish"));
    assert_eq!(consumer.attr("messaging.operation.type"), "process");
    assert!(client.attr("url.full").ends_with("/events"), "{client:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_call_is_one_trace_with_client_and_server_spans() {
    let egress = r#"[[outbound]]
name = "create-order"
method = "POST"
path = "/orders"
subject = "orders.create"
mode = "request"
"#;
    let (spans, app) = trace_one_call(egress, &orders_route(""), "/orders", 200).await;
    let [server, send, message, client] = assert_tree(&spans, &app, SpanKind::Client, SpanKind::Server);
    assert_eq!((send.attr("natsbridge.mode"), message.attr("natsbridge.mode")), ("request", "request"));
    assert_eq!((server.attr("natsbridge.route"), message.attr("natsbridge.route")), ("create-order", "orders"));
    assert_eq!(message.attr("messaging.destination.name"), "orders.create");
    assert_eq!(client.attr("http.response.status_code"), "200");
    assert!(!message.attrs.contains_key("natsbridge.delivery_count"), "core NATS has no delivery count: {message:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_collector_that_never_answers_delays_no_call_and_not_the_stop() {
    let _ = tracing_subscriber::fmt().with_env_filter("natsbridge=info").with_test_writer().try_init();
    let nats = NatsServer::start();
    let collector = Receiver::hanging().await;
    let app = App::start(|_| respond(200, "{}")).await;
    let egress =
        "[[outbound]]\nname = \"create-order\"\nmethod = \"POST\"\npath = \"/orders\"\nsubject = \"orders.create\"\nmode = \"request\"\n";
    let routes = format!("{egress}\n{}\n{}", orders_route(""), telemetry(&collector, "shop-sidecar"));
    let sidecar = Sidecar::start(&routes_toml("shop", "2s", &routes), &nats.url(), Some(&app.url())).await;
    sidecar.wait_ready().await;
    for _ in 0..20 {
        let started = Instant::now();
        assert_eq!(call("POST", &sidecar.url("/orders"), &[], "{}").await.status, 200);
        assert!(started.elapsed() < Duration::from_secs(2), "a call waited for the collector: {:?}", started.elapsed());
    }
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), sidecar.stop()).await.expect("the sidecar stops");
    let took = started.elapsed();
    // The stop's export reached the collector, which held it: the drain budget (2s) ended it,
    // not the exporter's own timeout (10s).
    assert!(collector.hits.load(std::sync::atomic::Ordering::SeqCst) >= 1, "the stop exported the spans");
    assert!(took < Duration::from_millis(3500), "the stop waited for the collector: {took:?}");
}
