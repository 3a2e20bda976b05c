//! Micro-benchmarks of the pure hot-path pieces: route lookup (10, 1,000 and 10,000 routes),
//! subject rendering, header mapping in both directions, reply → response, and the
//! JetStream ack/nak decision (`ingress::policy::outcome_for`).
//!
//! `cargo bench --bench micro` (about a minute), or `cargo bench --bench micro -- --quick`.

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};

use natsbridge::codec;
use natsbridge::config::{Outbound, OutboundTarget};
use natsbridge::egress::routes::RouteTable;
use natsbridge::subject::SubjectTemplate;

/// `n` realistic routes, in groups of four per service: a static path, a one-capture
/// path, a two-capture path, and a host-scoped route (the HTTP_PROXY style).
fn routes(n: usize) -> Vec<Outbound> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let g = i / 4;
        let (method, host, path, subject) = match i % 4 {
            0 => (Some(Method::GET), None, format!("/svc{g}/v1/status"), format!("svc{g}.status")),
            1 => (Some(Method::POST), None, format!("/svc{g}/v1/items/{{item_id}}"), format!("svc{g}.items.{{item_id}}.updated")),
            2 => (None, None, format!("/svc{g}/v1/items/{{item_id}}/parts/{{part}}"), format!("svc{g}.items.{{item_id}}.parts.{{part}}")),
            _ => (
                Some(Method::POST),
                Some(format!("svc{g}.internal")),
                "/v1/orders/{order_id}/execute".to_string(),
                format!("svc{g}.orders.{{order_id}}.execute"),
            ),
        };
        out.push(Outbound {
            name: format!("route-{i}"),
            line: i + 1,
            method,
            host,
            path,
            target: OutboundTarget::Request(SubjectTemplate::parse(&subject).unwrap()),
            timeout: Duration::from_secs(5),
            max_body: 1 << 20,
            allow_nats_headers: Default::default(),
            codec: Default::default(),
            pattern: None,
            schema: None,
            cutover: None,
            stream: Default::default(),
            ttl: None,
            always_async: false,
            async_ttl: Duration::from_secs(3600),
            cloudevents: None,
        });
    }
    out
}

fn config() -> Criterion {
    Criterion::default().measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500)).sample_size(50)
}

fn route_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_lookup");
    for n in [10usize, 1_000, 10_000] {
        let table = RouteTable::from_routes(routes(n));
        assert_eq!(table.len(), n);
        // A route in the middle of the table: its group's one-capture path, reached
        // through the sidecar's own Host (no host route matches, so both trees are tried).
        let g_mid = (n / 2) / 4;
        let path = format!("/svc{g_mid}/v1/items/42");
        let m = table.lookup(&Method::POST, Some("127.0.0.1:4280"), &path).unwrap();
        assert_eq!(m.route.name, format!("route-{}", g_mid * 4 + 1));
        g.bench_with_input(BenchmarkId::new("param_path", n), &n, |b, _| {
            b.iter(|| {
                let m = table.lookup(black_box(&Method::POST), black_box(Some("127.0.0.1:4280")), black_box(&path)).unwrap();
                black_box(m.index)
            })
        });
        // The host-scoped route of the same group (absolute-form / HTTP_PROXY requests).
        let host = format!("svc{g_mid}.internal:80");
        let m = table.lookup(&Method::POST, Some(&host), "/v1/orders/7/execute").unwrap();
        assert_eq!(m.route.name, format!("route-{}", g_mid * 4 + 3));
        g.bench_with_input(BenchmarkId::new("host_route", n), &n, |b, _| {
            b.iter(|| {
                let m = table.lookup(black_box(&Method::POST), black_box(Some(host.as_str())), black_box("/v1/orders/7/execute")).unwrap();
                black_box(m.index)
            })
        });
    }
    g.finish();
}

fn subject_render(c: &mut Criterion) {
    let mut g = c.benchmark_group("subject_render");
    let one = SubjectTemplate::parse("agent.{agent_id}.execution.requested").unwrap();
    g.bench_function("one_capture", |b| b.iter(|| black_box(one.render(|_| Some(black_box("agent-7f3a"))).unwrap())));
    let two = SubjectTemplate::parse("tenant.{tenant}.agent.{agent_id}.run").unwrap();
    g.bench_function("two_captures_percent_encoded", |b| {
        b.iter(|| black_box(two.render(|n| Some(if n == "tenant" { black_box("acme%2Dcorp") } else { black_box("42") })).unwrap()))
    });
    let fixed = SubjectTemplate::parse("workflow.execution.started").unwrap();
    g.bench_function("literal", |b| b.iter(|| black_box(fixed.render(|_| None).unwrap())));
    g.finish();
}

/// What a typical service-to-service call carries.
fn request_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("host", "agent-service:4280"),
        ("content-type", "application/json"),
        ("content-length", "1024"),
        ("accept", "application/json"),
        ("user-agent", "legacy-orchestrator/3.2"),
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ("x-request-id", "0b9e0d9a-6c1f-4f37-9f3e-8d2b9a1f0c11"),
        ("authorization", "Bearer eyJhbGciOiJIUzI1NiJ9.e30.abc"),
    ] {
        h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    h
}

fn header_mapping(c: &mut Criterion) {
    let mut g = c.benchmark_group("headers");
    let req = request_headers();
    g.bench_function("http_to_nats", |b| b.iter(|| black_box(codec::http_to_nats_headers(black_box(&req)))));
    let nats = codec::http_to_nats_headers(&req);
    g.bench_function("nats_to_http", |b| b.iter(|| black_box(codec::nats_to_http_headers(black_box(&nats), &[]))));
    let mut app_res = HeaderMap::new();
    app_res.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    app_res.insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("1024"));
    app_res.insert(HeaderName::from_static("x-request-id"), HeaderValue::from_static("0b9e0d9a-6c1f-4f37-9f3e-8d2b9a1f0c11"));
    app_res.insert(http::header::DATE, HeaderValue::from_static("Tue, 01 Jul 2025 10:00:00 GMT"));
    g.bench_function("response_to_reply", |b| {
        b.iter(|| black_box(codec::response_to_reply_headers(black_box(StatusCode::OK), black_box(&app_res))))
    });
    g.bench_function("tunnel_encode", |b| {
        b.iter(|| black_box(codec::tunnel_request_headers(&Method::POST, black_box("/v1/models/m1/infer"), Some("stream=false"), &req)))
    });
    let tunnel = codec::tunnel_request_headers(&Method::POST, "/v1/models/m1/infer", Some("stream=false"), &req);
    g.bench_function("tunnel_decode", |b| b.iter(|| black_box(codec::decode_tunnel_request(Some(black_box(&tunnel))).unwrap())));
    g.finish();
}

fn reply_to_response(c: &mut Criterion) {
    let mut g = c.benchmark_group("reply_to_response");
    let payload = Bytes::from(vec![b'x'; 1024]);
    let mut app_res = HeaderMap::new();
    app_res.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    app_res.insert(HeaderName::from_static("x-request-id"), HeaderValue::from_static("0b9e0d9a-6c1f-4f37-9f3e-8d2b9a1f0c11"));
    app_res.insert(http::header::DATE, HeaderValue::from_static("Tue, 01 Jul 2025 10:00:00 GMT"));
    let reply = codec::response_to_reply_headers(StatusCode::OK, &app_res);
    g.bench_function("ok_with_headers", |b| {
        b.iter(|| black_box(codec::reply_to_response(Some(black_box(&reply)), payload.clone()).unwrap()))
    });
    g.bench_function("no_headers", |b| b.iter(|| black_box(codec::reply_to_response(None, payload.clone()).unwrap())));
    let mut micro = async_nats::HeaderMap::new();
    micro.insert(codec::SERVICE_ERROR_CODE, "404");
    micro.insert(codec::SERVICE_ERROR, "no such agent");
    g.bench_function("micro_error", |b| b.iter(|| black_box(codec::reply_to_response(Some(black_box(&micro)), Bytes::new()).unwrap())));
    g.finish();
}

fn ack_decision(c: &mut Criterion) {
    use natsbridge::ingress::policy::{outcome_for, Attempt, Policy};
    let mut g = c.benchmark_group("ack_decision");
    let backoff = [Duration::from_secs(1), Duration::from_secs(5), Duration::from_secs(30)];
    let policy = Policy { max_deliver: 5, backoff: &backoff };
    let now = std::time::SystemTime::now();
    g.bench_function("ack_2xx", |b| {
        b.iter(|| black_box(outcome_for(black_box(Attempt::Status(StatusCode::OK)), None, black_box(1), &policy, now)))
    });
    g.bench_function("nak_backoff_5xx", |b| {
        b.iter(|| black_box(outcome_for(black_box(Attempt::Status(StatusCode::SERVICE_UNAVAILABLE)), None, black_box(2), &policy, now)))
    });
    g.bench_function("nak_retry_after", |b| {
        b.iter(|| {
            black_box(outcome_for(
                black_box(Attempt::Status(StatusCode::TOO_MANY_REQUESTS)),
                black_box(Some("7")),
                black_box(2),
                &policy,
                now,
            ))
        })
    });
    g.bench_function("dead_letter_poison", |b| {
        b.iter(|| black_box(outcome_for(black_box(Attempt::Status(StatusCode::UNPROCESSABLE_ENTITY)), None, black_box(1), &policy, now)))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = route_lookup, subject_render, header_mapping, reply_to_response, ack_decision
}
criterion_main!(benches);
