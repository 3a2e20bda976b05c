//! TLS: a test CA, server and client certificates made here; server-only TLS and mutual
//! TLS, and the refusals.

use super::*;

struct Pki {
    dir: tempfile::TempDir,
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

/// A test CA, a server certificate for 127.0.0.1/localhost and a client certificate.
fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.distinguished_name.push(DnType::CommonName, "natsbridge test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().unwrap();
    let mut sp = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    sp.distinguished_name.push(DnType::CommonName, "nats-server");
    sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = sp.signed_by(&server_key, &issuer).unwrap();

    let client_key = KeyPair::generate().unwrap();
    let mut cp = CertificateParams::new(vec!["natsbridge".to_owned()]).unwrap();
    cp.distinguished_name.push(DnType::CommonName, "natsbridge");
    cp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = cp.signed_by(&client_key, &issuer).unwrap();

    let d = dir.path().to_owned();
    Pki {
        ca: write(&d, "ca.pem", &ca_cert.pem()),
        server_cert: write(&d, "server.pem", &server_cert.pem()),
        server_key: write(&d, "server-key.pem", &server_key.serialize_pem()),
        client_cert: write(&d, "client.pem", &client_cert.pem()),
        client_key: write(&d, "client-key.pem", &client_key.serialize_pem()),
        dir,
    }
}

fn tls_server(pki: &Pki, verify: bool) -> NatsServer {
    NatsServer::start_with(&format!(
        "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: {verify}\n  timeout: 2\n}}",
        pki.server_cert.display().to_string(),
        pki.server_key.display().to_string(),
        pki.ca.display().to_string()
    ))
}

fn tls_section(pki: &Pki, client_cert: bool, require: bool) -> String {
    let mut s = format!("[nats.tls]\nca_file = {:?}\nrequire = {require}\n", pki.ca.display().to_string());
    if client_cert {
        s += &format!("cert_file = {:?}\nkey_file = {:?}\n", pki.client_cert.display().to_string(), pki.client_key.display().to_string());
    }
    s
}

async fn tls_subscriber(pki: &Pki, nats: &NatsServer) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .add_root_certificates(pki.ca.clone())
        .add_client_certificate(pki.client_cert.clone(), pki.client_key.clone())
        .require_tls(true)
        .connect(nats.url())
        .await
        .unwrap()
}

#[tokio::test]
async fn tls_with_the_test_ca_connects() {
    let pki = pki();
    let nats = tls_server(&pki, false);
    let s = Sidecar::start_with_env(&routes(&tls_section(&pki, false, true)), &nats.url(), None, &[]).await;
    s.wait_ready().await;
    assert_flows(s.egress, tls_subscriber(&pki, &nats).await).await;
}

#[tokio::test]
async fn tls_scheme_url_connects_too() {
    let pki = pki();
    let nats = tls_server(&pki, false);
    let url = format!("tls://127.0.0.1:{}", nats.port);
    let s = Sidecar::start_with_env(&routes(&tls_section(&pki, false, false)), &url, None, &[]).await;
    s.wait_ready().await;
}

#[tokio::test]
async fn tls_without_the_ca_is_refused() {
    let pki = pki();
    let nats = tls_server(&pki, false);
    // No ca_file: the system roots do not trust the test CA.
    let s = Sidecar::start_with_env(&routes("[nats.tls]\nrequire = true\n"), &nats.url(), None, &[]).await;
    assert_never_ready(s.admin, Duration::from_secs(2)).await;
}

#[tokio::test]
async fn mutual_tls_with_a_client_certificate_connects() {
    let pki = pki();
    let nats = tls_server(&pki, true);
    let s = Sidecar::start_with_env(&routes(&tls_section(&pki, true, true)), &nats.url(), None, &[]).await;
    s.wait_ready().await;
    assert_flows(s.egress, tls_subscriber(&pki, &nats).await).await;
}

#[tokio::test]
async fn mutual_tls_without_a_client_certificate_is_refused() {
    let pki = pki();
    let nats = tls_server(&pki, true);
    let s = Sidecar::start_with_env(&routes(&tls_section(&pki, false, true)), &nats.url(), None, &[]).await;
    assert_never_ready(s.admin, Duration::from_secs(2)).await;
}

#[tokio::test]
async fn require_tls_refuses_a_plaintext_server() {
    let pki = pki();
    let nats = NatsServer::start();
    let s = Sidecar::start_with_env(&routes(&tls_section(&pki, false, true)), &nats.url(), None, &[]).await;
    assert_never_ready(s.admin, Duration::from_secs(2)).await;
}

#[tokio::test]
async fn tls_and_a_token_together() {
    let pki = pki();
    let nats = NatsServer::start_with(&format!(
        "authorization {{ token: \"{TOKEN}\" }}\ntls {{\n  cert_file: {:?}\n  key_file: {:?}\n}}",
        pki.server_cert.display().to_string(),
        pki.server_key.display().to_string()
    ));
    let toml = routes(&format!("token_env = \"T\"\n{}", tls_section(&pki, false, true)));
    let s = Sidecar::start_with_env(&toml, &nats.url(), None, &[("T", TOKEN)]).await;
    s.wait_ready().await;
}

#[tokio::test]
async fn missing_tls_files_fail_the_start_clearly() {
    let pki = pki();
    let nats = NatsServer::start();
    let s = Sidecar::start_with_env(&routes("[nats.tls]\nca_file = \"/nonexistent/ca.pem\"\n"), &nats.url(), None, &[]).await;
    let e = s.start_error().await;
    assert!(e.contains("ca_file") && e.contains("/nonexistent/ca.pem"), "{e}");
    let not_pem = write(pki.dir.path(), "not.pem", "hello");
    let toml = routes(&format!(
        "[nats.tls]\ncert_file = {:?}\nkey_file = {:?}\n",
        not_pem.display().to_string(),
        pki.client_key.display().to_string()
    ));
    let s = Sidecar::start_with_env(&toml, &nats.url(), None, &[]).await;
    let e = s.start_error().await;
    assert!(e.contains("cert_file") && e.contains("PEM"), "{e}");
}
