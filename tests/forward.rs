//! The egress listener as a forward proxy (issue 16): under `HTTP_PROXY`/`HTTPS_PROXY` an
//! app's calls that no route takes still work as without the sidecar. Real clients
//! (Python's urllib, curl), a real nats-server, real HTTP, TLS and WebSocket servers.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use support::fixtures::EXECUTE_AGENT_ROUTE;
use support::*;

fn routes(sink: SocketAddr, ws: SocketAddr, sidecar_extra: &str) -> String {
    format!(
        r#"
[sidecar]
service = "orchestration"
drain_timeout = "5s"
{sidecar_extra}

{EXECUTE_AGENT_ROUTE}timeout = "5s"

# Not migrated yet: plain HTTP, streamed. The timeout bounds the wait for the response
# head once the body is sent, not the upload.
[[outbound]]
name = "legacy"
host = "legacy-service"
path = "/{{*rest}}"
mode = "http"
upstream = "http://{sink}"
timeout = "1s"

[[outbound]]
name = "legacy-limited"
host = "limited-service"
path = "/{{*rest}}"
mode = "http"
upstream = "http://{sink}"
max_body = "1MiB"

[[outbound]]
name = "chat"
host = "ws-service"
path = "/{{*rest}}"
mode = "http"
upstream = "http://{ws}"
"#
    )
}

/// An origin that streams request bodies without keeping them and says what it saw:
/// `<METHOD> <path> bytes=<n> host=<Host> via=<yes|no> proxy-connection=<yes|no>`.
async fn sink() -> SocketAddr {
    serve_tcp(|stream| async move {
        let svc = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
            let (parts, mut body) = req.into_parts();
            let mut n = 0usize;
            while let Some(frame) = body.frame().await {
                n += frame.ok().and_then(|f| f.into_data().ok()).map_or(0, |d| d.len());
            }
            let has = |h: &str| if parts.headers.contains_key(h) { "yes" } else { "no" };
            let host = parts.headers.get("host").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
            let text = format!(
                "{} {} bytes={n} host={host} via={} proxy-connection={}",
                parts.method,
                parts.uri.path(),
                has("via"),
                has("proxy-connection")
            );
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
        });
        let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
    })
    .await
}

/// A WebSocket echo server (tokio-websockets).
async fn ws_echo() -> SocketAddr {
    serve_tcp(|stream| async move {
        let Ok((_req, mut ws)) = tokio_websockets::ServerBuilder::new().accept(stream).await else { return };
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_text() || msg.is_binary() {
                let text = format!("echo: {}", msg.as_text().unwrap_or(""));
                if ws.send(tokio_websockets::Message::text(text)).await.is_err() {
                    return;
                }
            }
        }
    })
    .await
}

/// An HTTPS server for `localhost` whose certificate a test CA signed; returns its
/// address and the CA file.
async fn tls_origin(dir: &Path) -> (SocketAddr, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(DnType::CommonName, "forward test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned()]).unwrap().signed_by(&key, &issuer).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()))
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let addr = serve_tcp(move |stream| {
        let acceptor = acceptor.clone();
        async move {
            let Ok(tls) = acceptor.accept(stream).await else { return };
            let svc = hyper::service::service_fn(|_req: Request<hyper::body::Incoming>| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"secure hello"))))
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), svc).await;
        }
    })
    .await;
    (addr, ca_file)
}

/// A sidecar on [`routes`], ready.
async fn sidecar(nats: &NatsServer, sink: SocketAddr, ws: SocketAddr, sidecar_extra: &str) -> Sidecar {
    let s = Sidecar::start(&routes(sink, ws, sidecar_extra), &nats.url(), None).await;
    s.wait_ready().await;
    s
}

/// What the mixed-app tests run against: NATS with the responder, every origin, and a
/// sidecar on the plain routes.
struct Mixed {
    _dir: tempfile::TempDir,
    _nats: NatsServer,
    sink: SocketAddr,
    ws: SocketAddr,
    tls: SocketAddr,
    ca: PathBuf,
    s: Sidecar,
}

impl Mixed {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let nats = NatsServer::start();
        let (sink, ws) = (sink().await, ws_echo().await);
        let (tls, ca) = tls_origin(dir.path()).await;
        responder(&nats).await;
        let s = sidecar(&nats, sink, ws, "").await;
        Self { _dir: dir, _nats: nats, sink, ws, tls, ca, s }
    }
}

/// What the mixed-app scripts call: a routed URL, an unrouted one, HTTPS (trusting `ca`,
/// named in the variable `ca_var`) and a WebSocket.
fn mixed_calls(sink: SocketAddr, ws: SocketAddr, tls: SocketAddr, ca_var: &'static str, ca: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("ROUTED_URL", "http://agent-service/agents/7/execute".into()),
        ("UNROUTED_URL", format!("http://{sink}/upload")),
        ("HTTPS_URL", format!("https://localhost:{}/secure", tls.port())),
        (ca_var, ca.display().to_string()),
        ("WS_URL", format!("ws://{ws}/chat")),
    ]
}

/// Answers `agent.*.execution.requested` over NATS.
async fn responder(nats: &NatsServer) {
    support::fixtures::responder(nats, "agent.*.execution.requested", |m| {
        (async_nats::HeaderMap::new(), Bytes::from(format!("over NATS on {}", m.subject)))
    })
    .await;
}

/// Runs tests/fixtures/forward_app.py with the proxy variables set to the sidecar and the
/// calls in `env`; returns its output lines.
async fn python_app(egress: SocketAddr, env: &[(&str, String)]) -> Vec<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/forward_app.py");
    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg(script);
    run_app(cmd, egress, env).await
}

/// Runs tests/node/forward_app.mjs (undici from `npm ci`, see scripts/node-env) like
/// [`python_app`].
async fn node_app(egress: SocketAddr, env: &[(&str, String)]) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(root.join("scripts/node-env")).output().unwrap();
    assert!(out.status.success(), "scripts/node-env failed: {}", String::from_utf8_lossy(&out.stderr));
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(root.join("tests/node/forward_app.mjs"));
    run_app(cmd, egress, env).await
}

async fn run_app(mut cmd: tokio::process::Command, egress: SocketAddr, env: &[(&str, String)]) -> Vec<String> {
    cmd.env_remove("NO_PROXY").env_remove("no_proxy").env_remove("ALL_PROXY").env_remove("all_proxy");
    for var in ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"] {
        cmd.env(var, format!("http://{egress}"));
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output()).await.expect("app finished").unwrap();
    assert!(out.status.success(), "app failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}

/// curl through the proxy: `(status, body)`; `status` is the CONNECT status with `-p`.
async fn curl(egress: SocketAddr, args: &[&str]) -> (u16, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-s", "--max-time", "60", "-x", &format!("http://{egress}"), "-w", "\n%{http_code} %{http_connect}"])
        .args(args)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, codes) = text.rsplit_once('\n').unwrap_or(("", &text));
    let (code, connect) = codes.split_once(' ').unwrap_or((codes, "000"));
    let code: u16 = code.parse().unwrap_or(0);
    let status = if code == 0 { connect.parse().unwrap_or(0) } else { code };
    (status, body.to_owned())
}

#[tokio::test]
async fn one_app_mixes_routed_unrouted_https_and_websocket_calls() {
    let m = Mixed::start().await;
    let Mixed { sink, ws, tls, ref ca, ref s, .. } = m;

    let lines = python_app(s.egress, &mixed_calls(sink, ws, tls, "CA_FILE", ca)).await;
    assert_eq!(
        lines,
        vec![
            "routed 200 over NATS on agent.7.execution.requested".to_owned(),
            format!("unrouted 200 POST /upload bytes=5 host={sink} via=yes proxy-connection=no"),
            "https 200 secure hello".to_owned(),
            "websocket 101 echo: hello over the proxy".to_owned(),
        ]
    );

    // The same calls from curl.
    let (status, body) = curl(s.egress, &["http://agent-service/agents/8/execute", "-d", "{}"]).await;
    assert_eq!((status, body.as_str()), (200, "over NATS on agent.8.execution.requested"));
    let (status, body) = curl(s.egress, &[&format!("http://{sink}/hello")]).await;
    assert_eq!((status, body), (200, format!("GET /hello bytes=0 host={sink} via=yes proxy-connection=no")));
    let ca = ca.display().to_string();
    let (status, body) = curl(s.egress, &["--cacert", &ca, &format!("https://localhost:{}/", tls.port())]).await;
    assert_eq!((status, body.as_str()), (200, "secure hello"));

    // Origin form (a base URL pointing at the sidecar) with no route is still a 404.
    let r = get(&s.url("/nowhere")).await.unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["type"], "urn:natsbridge:problem:no-route");

    // The migration's to-do list: what was forwarded, by host.
    let m = s.metrics().await;
    for want in [
        format!(r#"natsbridge_egress_forwarded_total{{host="{sink}",status_class="2xx"}} 2"#),
        r#"natsbridge_egress_requests_total{mode="forward",path="http",route="(unmatched)",status_class="2xx"} 2"#.to_owned(),
        format!(r#"natsbridge_egress_tunnels_total{{host="localhost:{}",kind="connect",outcome="opened"}} 2"#, tls.port()),
        format!(r#"natsbridge_egress_tunnels_total{{host="{ws}",kind="upgrade",outcome="opened"}} 1"#),
    ] {
        assert!(m.contains(&want), "{want} not in\n{m}");
    }
}

/// The same mix from Node: undici tunnels every call through CONNECT, the routed one too.
#[tokio::test]
async fn a_node_app_mixes_the_same_calls() {
    let m = Mixed::start().await;
    let Mixed { sink, ws, tls, ref ca, ref s, .. } = m;
    let lines = node_app(s.egress, &mixed_calls(sink, ws, tls, "NODE_EXTRA_CA_CERTS", ca)).await;
    assert_eq!(
        lines,
        vec![
            "routed 200 over NATS on agent.7.execution.requested".to_owned(),
            // Tunnelled: the sidecar passes bytes, so it adds no Via.
            format!("unrouted 200 POST /upload bytes=5 host={sink} via=no proxy-connection=no"),
            "https 200 secure hello".to_owned(),
            "websocket 101 echo: hello over the proxy".to_owned(),
        ]
    );
    let m = s.metrics().await;
    let want = r#"natsbridge_egress_tunnels_total{host="agent-service:80",kind="connect",outcome="routed"} 1"#;
    assert!(m.contains(want), "{want} not in\n{m}");
}

#[tokio::test]
async fn websocket_upgrades_pass_through_http_routes() {
    let nats = NatsServer::start();
    let (sink, ws) = (sink().await, ws_echo().await);
    let s = sidecar(&nats, sink, ws, "").await;
    let lines = python_app(s.egress, &[("WS_URL", "ws://ws-service/chat".into())]).await;
    assert_eq!(lines, vec!["websocket 101 echo: hello over the proxy"]);
}

#[tokio::test]
async fn unmatched_reject_keeps_the_404() {
    let nats = NatsServer::start();
    let (sink, ws) = (sink().await, ws_echo().await);
    let s = sidecar(&nats, sink, ws, "unmatched = \"reject\"").await;
    let (status, body) = curl(s.egress, &[&format!("http://{sink}/hello")]).await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("urn:natsbridge:problem:no-route"), "{body}");
    // CONNECT is refused too: a closed list means closed for HTTPS as well.
    let (status, _) = curl(s.egress, &["-p", &format!("http://{sink}/hello")]).await;
    assert_eq!(status, 404);
    // Routes still work.
    let (status, body) = curl(s.egress, &["http://legacy-service/x"]).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn calls_to_the_sidecar_itself_are_refused_as_loops() {
    let nats = NatsServer::start();
    let (sink, ws) = (sink().await, ws_echo().await);
    let s = sidecar(&nats, sink, ws, "").await;
    let port = s.egress.port();
    for target in [format!("http://127.0.0.1:{port}/x"), format!("http://localhost:{port}/x")] {
        let (status, body) = curl(s.egress, &[&target]).await;
        assert_eq!(status, 508, "{target}: {body}");
        assert!(body.contains("urn:natsbridge:problem:loop-detected"), "{body}");
    }
    let (status, _) = curl(s.egress, &["-p", &format!("http://127.0.0.1:{port}/x")]).await;
    assert_eq!(status, 508);
    // The sidecar still serves.
    let (status, _) = curl(s.egress, &[&format!("http://{sink}/ok")]).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn connect_allow_limits_tunnels() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start();
    let (sink, ws) = (sink().await, ws_echo().await);
    let (tls, ca) = tls_origin(dir.path()).await;
    let allow = format!("connect_allow = [\"localhost:{}\"]", tls.port());
    let s = sidecar(&nats, sink, ws, &allow).await;
    let ca = ca.display().to_string();
    let (status, body) = curl(s.egress, &["--cacert", &ca, &format!("https://localhost:{}/", tls.port())]).await;
    assert_eq!((status, body.as_str()), (200, "secure hello"));
    let (status, _) = curl(s.egress, &["--cacert", &ca, &format!("https://127.0.0.1:{}/", tls.port())]).await;
    assert_eq!(status, 403);
    let m = s.metrics().await;
    let want = format!(r#"natsbridge_egress_tunnels_total{{host="127.0.0.1:{}",kind="connect",outcome="refused"}} 1"#, tls.port());
    assert!(m.contains(&want), "{want} not in\n{m}");
}

/// A file of `len` bytes in `dir`.
fn payload(dir: &Path, len: usize) -> String {
    let path = dir.join(format!("payload-{len}"));
    std::fs::write(&path, vec![b'x'; len]).unwrap();
    path.display().to_string()
}

#[tokio::test]
async fn http_routes_stream_bodies_under_the_route_limit_and_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start();
    let (sink, ws) = (sink().await, ws_echo().await);
    let s = sidecar(&nats, sink, ws, "").await;

    // 3 MiB at 1 MiB/s: about 3s of upload on a route whose timeout is 1s, and no
    // max_body on the route (the 1 MiB default applies to NATS modes only).
    let file = payload(dir.path(), 3 << 20);
    let (status, body) = curl(s.egress, &["--limit-rate", "1M", "--data-binary", &format!("@{file}"), "http://legacy-service/up"]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, format!("POST /up bytes=3145728 host={sink} via=yes proxy-connection=no"));

    // A route's own max_body still applies: declared, and counted while streaming.
    let file = payload(dir.path(), 2 << 20);
    let (status, body) = curl(s.egress, &["--data-binary", &format!("@{file}"), "http://limited-service/up"]).await;
    assert_eq!(status, 413, "{body}");
    let (status, body) =
        curl(s.egress, &["-H", "Transfer-Encoding: chunked", "--data-binary", &format!("@{file}"), "http://limited-service/up"]).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("urn:natsbridge:problem:body-too-large"), "{body}");
}

/// The sidecar process's resident set, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// Uploads `file` with curl while sampling the sidecar's RSS; returns curl's answer and
/// the highest RSS seen.
async fn upload_sampling_rss(egress: SocketAddr, pid: u32, args: &[&str]) -> ((u16, String), u64) {
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<()>();
    let sampler = tokio::spawn(async move {
        let mut peak = 0;
        loop {
            peak = peak.max(rss(pid));
            tokio::select! {
                _ = &mut done_rx => return peak,
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
        }
    });
    let answer = curl(egress, args).await;
    let _ = done_tx.send(());
    (answer, sampler.await.unwrap())
}

/// 50 MiB through an `http` route and through unmatched forwarding: the real binary's
/// RSS stays flat (a buffered body would add at least its size).
#[tokio::test]
async fn fifty_mib_uploads_keep_the_sidecar_rss_flat() {
    const UPLOAD: usize = 50 << 20;
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start();
    let (sink, ws) = (sink().await, ws_echo().await);
    let p = SidecarProcess::start(&routes(sink, ws, ""), &nats.url(), None);
    p.wait_ready().await;
    let pid = p.child.id();
    let file = format!("@{}", payload(dir.path(), UPLOAD));
    // Warm up both paths (connection pools, buffers), then take the baseline.
    for target in ["http://legacy-service/warm".to_owned(), format!("http://{sink}/warm")] {
        assert_eq!(curl(p.egress, &["-d", "x", &target]).await.0, 200);
    }
    let baseline = rss(pid);
    for target in ["http://legacy-service/big".to_owned(), format!("http://{sink}/big")] {
        let ((status, body), peak) = upload_sampling_rss(p.egress, pid, &["--data-binary", &file, &target]).await;
        assert_eq!(status, 200, "{target}: {body}\n{}", p.log());
        assert!(body.starts_with(&format!("POST /big bytes={UPLOAD} ")), "{body}");
        let grew = peak.saturating_sub(baseline);
        eprintln!("{target}: RSS baseline {} KiB, peak {} KiB, grew {} KiB", baseline >> 10, peak >> 10, grew >> 10);
        assert!(grew < 16 << 20, "{target}: RSS grew by {} KiB during a {} MiB upload", grew >> 10, UPLOAD >> 20);
    }
}

/// Clients such as Node's undici tunnel even `http://` calls through CONNECT: a CONNECT
/// to a host with routes is served by the sidecar, so the routes still apply, while TLS
/// inside such a tunnel still reaches its origin untouched.
#[tokio::test]
async fn connect_to_a_routed_host_still_takes_the_routes() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start();
    let (sink, ws) = (sink().await, ws_echo().await);
    let (tls, ca) = tls_origin(dir.path()).await;
    responder(&nats).await;
    // `localhost` has a route too, so HTTPS to it goes through the sniffing tunnel.
    let toml = routes(sink, ws, "")
        + "\n[[outbound]]\nname = \"local\"\nhost = \"localhost\"\npath = \"/local\"\nmode = \"request\"\nsubject = \"local.x\"\n";
    let s = Sidecar::start(&toml, &nats.url(), None).await;
    s.wait_ready().await;
    let (status, body) = curl(s.egress, &["-p", "http://agent-service/agents/9/execute", "-d", "{}"]).await;
    assert_eq!((status, body.as_str()), (200, "over NATS on agent.9.execution.requested"));
    // Several calls on one tunnel, to an `http` route.
    let (status, body) = curl(s.egress, &["-p", "http://legacy-service/a", "http://legacy-service/b"]).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("GET /a bytes=0") && body.contains("GET /b bytes=0"), "{body}");
    let ca = ca.display().to_string();
    let (status, body) = curl(s.egress, &["--cacert", &ca, &format!("https://localhost:{}/", tls.port())]).await;
    assert_eq!((status, body.as_str()), (200, "secure hello"));
    let m = s.metrics().await;
    let want = format!(r#"natsbridge_egress_tunnels_total{{host="localhost:{}",kind="connect",outcome="routed"}} 1"#, tls.port());
    assert!(m.contains(&want), "{want} not in\n{m}");
}

/// A proxied call whose host and path a route takes, but with a method no route takes,
/// goes to its origin as it would without the sidecar: the route moved that one call, not
/// the path's other methods. Called on the sidecar directly (origin form), it is still 405.
#[tokio::test]
async fn a_proxied_method_no_route_takes_reaches_its_origin() {
    let nats = NatsServer::start();
    let (sink, ws) = (sink().await, ws_echo().await);
    let moved = "[[outbound]]\nname = \"moved\"\nmethod = \"POST\"\nhost = \"127.0.0.1\"\npath = \"/moved\"\nsubject = \"moved.op\"\nmode = \"publish\"\n";
    let s = Sidecar::start(&(routes(sink, ws, "") + moved), &nats.url(), None).await;
    s.wait_ready().await;
    let url = format!("http://127.0.0.1:{}/moved", sink.port());
    let (status, body) = curl(s.egress, &[&url]).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("GET /moved ") && body.contains("via=yes"), "the origin answered, through the proxy: {body}");
    // The moved call itself still takes the route (publish mode answers 202).
    let (status, body) = curl(s.egress, &["-X", "POST", "-d", "x", &url]).await;
    assert_eq!(status, 202, "{body}");
    let r = call("GET", &s.url("/moved"), &[("host", "127.0.0.1")], "").await;
    assert_eq!(r.status, 405, "{}", r.text());
    assert_eq!(r.header("allow"), Some("POST"));
}

/// Plain HTTP inside a CONNECT to a routed host (how Node's undici sends every proxied
/// call) is served as the listener serves it: ambiguous framing is refused, and a request
/// stalled mid-body is closed after `idle_timeout` instead of holding its place for ever.
#[tokio::test]
async fn http_inside_a_routed_tunnel_gets_the_listeners_edge_checks() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let nats = NatsServer::start();
    let (sink, ws) = (sink().await, ws_echo().await);
    let s = sidecar(&nats, sink, ws, "idle_timeout = \"1s\"").await;

    let mut t = connect_tunnel(s.egress, "legacy-service:80").await;
    t.write_all(
        b"POST /x HTTP/1.1\r\nHost: legacy-service\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), t.read_to_end(&mut answer)).await.expect("the refusal closes the tunnel").unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("both Content-Length and Transfer-Encoding"), "{answer}");

    let mut t = connect_tunnel(s.egress, "legacy-service:80").await;
    t.write_all(b"POST /stalled HTTP/1.1\r\nHost: legacy-service\r\nContent-Length: 10\r\n\r\nab").await.unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    // Without the bound, nothing ends this: the body never completes.
    tokio::time::timeout(Duration::from_secs(10), t.read_to_end(&mut rest)).await.expect("the stalled tunnel was closed").ok();
    println!("a stalled request inside a routed tunnel was closed after {:?}", started.elapsed());
}

/// The `content-length` header of a head printed by `curl -I` or `-D -`.
fn content_length(head: &str) -> Option<u64> {
    head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim().eq_ignore_ascii_case("content-length").then(|| value.trim().parse().ok())?
    })
}

/// A HEAD passed through (an `http` route, or a forwarded call) keeps the origin's
/// `Content-Length`: it is hop-by-hop for a NATS hop, but a body passed through unchanged
/// keeps its length, and hyper writes none for a HEAD on its own. It was dropped, so
/// the app saw less than it would without the sidecar (the control below).
#[tokio::test]
async fn a_head_passed_through_keeps_the_origin_content_length() {
    let nats = NatsServer::start();
    let (sink, ws) = (sink().await, ws_echo().await);
    let s = sidecar(&nats, sink, ws, "").await;
    let text = |method: &str| format!("{method} /h bytes=0 host={sink} via=yes proxy-connection=no");

    // Without the sidecar: the origin's own answer to HEAD carries the length.
    let direct = tokio::process::Command::new("curl").args(["-s", "-I", &format!("http://{sink}/h")]).output().await.unwrap();
    let direct = String::from_utf8_lossy(&direct.stdout).into_owned();
    let want = text("HEAD").replace(" via=yes", " via=no").len() as u64;
    assert_eq!(content_length(&direct), Some(want), "control, no sidecar: {direct}");

    for url in ["http://legacy-service/h".to_owned(), format!("http://{sink}/h")] {
        let (status, head) = curl(s.egress, &["-I", &url]).await;
        assert_eq!(status, 200, "{url}: {head}");
        assert_eq!(content_length(&head), Some(text("HEAD").len() as u64), "{url}: {head}");
        // A GET still gets a body of the length it says.
        let (status, out) = curl(s.egress, &["-D", "-", &url]).await;
        assert_eq!(status, 200, "{url}: {out}");
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or_else(|| panic!("{url}: {out}"));
        assert_eq!(body, text("GET"), "{url}");
        assert_eq!(content_length(head), Some(body.len() as u64), "{url}: {head}");
    }
}
