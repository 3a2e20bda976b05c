//! The webhook served over real TLS: certificate rotation followed, unusable TLS material
//! refused, request bodies capped and deadlined.

use super::*;

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        Self { dir: tempfile::tempdir().unwrap() }
    }

    fn cert_path(&self) -> std::path::PathBuf {
        self.dir.path().join("tls.crt")
    }

    fn key_path(&self) -> std::path::PathBuf {
        self.dir.path().join("tls.key")
    }

    /// Writes a fresh self-signed certificate for the webhook's Service name and returns its DER
    /// (for the client's trust store). `mtime` makes the rotation visible regardless of the file
    /// system's timestamp granularity.
    fn issue(&self, mtime: SystemTime) -> rustls::pki_types::CertificateDer<'static> {
        let names = vec!["natsbridge-inject.natsbridge.svc".to_string(), "localhost".to_string()];
        let ck = rcgen::generate_simple_self_signed(names).unwrap();
        std::fs::write(self.key_path(), ck.signing_key.serialize_pem()).unwrap();
        std::fs::write(self.cert_path(), ck.cert.pem()).unwrap();
        for p in [self.cert_path(), self.key_path()] {
            std::fs::File::options().write(true).open(p).unwrap().set_modified(mtime).unwrap();
        }
        ck.cert.der().clone()
    }
}

fn client_config(trust: &rustls::pki_types::CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trust.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// An HTTP/1 connection to the webhook the way the API server opens it: TLS verified against
/// the CA bundle, with the Service DNS name as SNI.
async fn connect<B>(
    addr: std::net::SocketAddr,
    trust: &rustls::pki_types::CertificateDer<'static>,
) -> Result<hyper::client::conn::http1::SendRequest<B>, String>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(client_config(trust));
    let name = rustls::pki_types::ServerName::try_from("natsbridge-inject.natsbridge.svc").unwrap();
    let tls = connector.connect(name, tcp).await.map_err(|e| format!("TLS: {e}"))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(sender)
}

/// One HTTPS request the way the API server makes it: TLS verified against the CA bundle, with
/// the Service DNS name as SNI.
async fn https(
    addr: std::net::SocketAddr,
    trust: &rustls::pki_types::CertificateDer<'static>,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> Result<(u16, Bytes), String> {
    let mut sender = connect(addr, trust).await?;
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "natsbridge-inject.natsbridge.svc")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, body))
}

#[tokio::test]
async fn serves_the_webhook_over_tls_and_follows_certificate_rotation() {
    let pki = Pki::new();
    let t0 = SystemTime::now() - Duration::from_secs(3600);
    let first = pki.issue(t0);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = inject::tls_config(&pki.cert_path(), &pki.key_path()).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(inject::serve(listener, tls, settings(), async {
        let _ = stop_rx.await;
    }));

    // The listener is bound before serve() starts, so the first request needs no readiness wait.
    let (status, body) = https(addr, &first, "GET", "/healthz", vec![]).await.unwrap();
    assert_eq!((status, &body[..]), (200, &b"ok\n"[..]));

    let (status, body) = https(addr, &first, "POST", "/mutate", serde_json::to_vec(&review(&plain_pod())).unwrap()).await.unwrap();
    assert_eq!(status, 200);
    let resp: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(resp["response"]["allowed"], true);
    let raw = base64::engine::general_purpose::STANDARD.decode(resp["response"]["patch"].as_str().unwrap()).unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&raw).unwrap();
    let mut pod = plain_pod();
    json_patch::patch(&mut pod, &patch).unwrap();
    assert_eq!(pod["spec"]["initContainers"][0]["restartPolicy"], "Always");

    let (status, _) = https(addr, &first, "POST", "/mutate", b"not json".to_vec()).await.unwrap();
    assert_eq!(status, 400);
    let (status, _) = https(addr, &first, "POST", "/mutate", b"{}".to_vec()).await.unwrap();
    assert_eq!(status, 400);
    let (status, _) = https(addr, &first, "GET", "/mutate", vec![]).await.unwrap();
    assert_eq!(status, 405);
    let (status, _) = https(addr, &first, "GET", "/nope", vec![]).await.unwrap();
    assert_eq!(status, 404);

    // Rotate the certificate the way cert-manager does (files replaced in place). The next
    // handshake must present the new one: a client trusting only the new cert now succeeds and
    // one trusting only the old cert fails.
    let second = pki.issue(t0 + Duration::from_secs(60));
    let (status, _) = https(addr, &second, "GET", "/healthz", vec![]).await.unwrap();
    assert_eq!(status, 200);
    let err = https(addr, &first, "GET", "/healthz", vec![]).await.unwrap_err();
    assert!(err.starts_with("TLS"), "{err}");

    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server).await.expect("serve stops on shutdown").unwrap().unwrap();
}

#[tokio::test]
async fn run_refuses_unusable_tls_material() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tls.crt"), "not a pem").unwrap();
    std::fs::write(dir.path().join("tls.key"), "not a pem").unwrap();
    let cli = Cli::try_parse_from([
        "inject",
        "--sidecar-image",
        "i",
        "--nats-url",
        "nats://n:4222",
        "--tls-cert",
        dir.path().join("tls.crt").to_str().unwrap(),
        "--tls-key",
        dir.path().join("tls.key").to_str().unwrap(),
    ])
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = inject::run(cli.inject, listener, std::future::pending()).await.unwrap_err();
    assert!(matches!(err, inject::InjectError::BadTls { .. }), "{err}");

    let missing = inject::tls_config(&dir.path().join("absent.crt"), &dir.path().join("tls.key")).unwrap_err();
    assert!(matches!(missing, inject::InjectError::ReadTls { .. }), "{missing}");
}

/// A `POST /mutate` that declares `declared` body bytes and never sends them: its status.
async fn stalled_body(
    addr: std::net::SocketAddr,
    trust: &rustls::pki_types::CertificateDer<'static>,
    declared: usize,
) -> Result<u16, String> {
    let mut sender = connect(addr, trust).await?;
    let (_keep, rx) = futures::channel::mpsc::channel::<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>(1);
    let req = http::Request::builder()
        .method("POST")
        .uri("/mutate")
        .header("host", "natsbridge-inject.natsbridge.svc")
        .header("content-length", declared.to_string())
        .body(http_body_util::StreamBody::new(rx))
        .unwrap();
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    Ok(resp.status().as_u16())
}

/// The webhook cannot be pushed out of memory: bodies over 3 MiB get 413 unread, a body
/// that stalls gets 408 after the read deadline (so stalled reviews cannot hold the slots
/// forever), and many stalled connections at once do not stop it answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_bodies_are_capped_and_deadlined() {
    let pki = Pki::new();
    let cert = pki.issue(SystemTime::now() - Duration::from_secs(3600));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = inject::tls_config(&pki.cert_path(), &pki.key_path()).unwrap();
    let _server = tokio::spawn(inject::serve(listener, tls, settings(), std::future::pending()));

    // A JSON array of tiny elements: as a serde_json::Value it takes ~16 times its size.
    let array = |bytes: usize| format!("[{}0]", "0,".repeat(bytes / 2)).into_bytes();
    assert_eq!(stalled_body(addr, &cert, 64 << 20).await.unwrap(), 413, "a declared length over the cap is refused unread");
    // Under the cap, not a review: refused without building the array.
    let (status, body) = https(addr, &cert, "POST", "/mutate", array(inject::MAX_BODY - 1024)).await.unwrap();
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));

    // More stalled bodies than connections allowed: each ends with 408 by the
    // deadline, and a real review is answered all the same.
    let stalled: Vec<_> = (0..inject::MAX_CONNECTIONS + 4)
        .map(|_| {
            let cert = cert.clone();
            tokio::spawn(async move { stalled_body(addr, &cert, 100).await })
        })
        .collect();
    let review = serde_json::to_vec(&review(&plain_pod())).unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(60), https(addr, &cert, "POST", "/mutate", review)).await;
    assert_eq!(answered.expect("answered despite stalled connections").unwrap().0, 200);
    for s in stalled {
        let status = tokio::time::timeout(Duration::from_secs(60), s).await.expect("a stalled body is cut off").unwrap();
        assert_eq!(status.unwrap(), 408);
    }
}
