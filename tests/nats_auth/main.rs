//! NATS security (issue 4 §3): every auth mode and TLS setup against a real nats-server
//! configured for it. Credentials, nkeys, JWTs and certificates are generated here.
//!
//! Each positive case proves the whole path: the sidecar turns ready, and a request on its
//! egress listener reaches a subscriber connected with its own credentials. Each negative
//! case proves readiness stays false (or the start fails with a clear error), and that no
//! secret reaches the log.
//!
//! Token, user and password, and nkeys here; JWT credentials (operator mode) in `jwt.rs`,
//! TLS in `tls.rs`.

mod jwt;
#[path = "../support/mod.rs"]
mod support;
mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures::StreamExt;
use support::*;

const ROUTES: &str = r#"
[sidecar]
service = "authtest"

[[outbound]]
name = "events"
method = "POST"
path = "/events"
subject = "auth.events"
mode = "publish"
"#;

/// The routing file with a `[nats]` section (auth keys and optional `[nats.tls]`).
fn routes(nats: &str) -> String {
    format!("{ROUTES}\n[nats]\nconnect_timeout = \"2s\"\n{nats}\n")
}

/// The NATS connection stays down for `for_` (as `/statusz` says), never up.
async fn assert_never_ready(admin: SocketAddr, for_: Duration) {
    let deadline = Instant::now() + for_;
    let mut seen_unready = false;
    while Instant::now() < deadline {
        if let Some(v) = statusz(admin).await {
            let nats = &v["components"]["nats"];
            assert_ne!(nats["state"], "up", "sidecar connected: {v}");
            let why = nats["reason"].as_str().unwrap_or_default();
            assert!(why.starts_with("not connected to NATS") || nats["state"] == "starting", "{v}");
            seen_unready = true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen_unready, "the admin listener never answered");
}

/// The sidecar's egress request reaches a subscriber that authenticated on its own.
async fn assert_flows(sidecar_egress: SocketAddr, subscriber: async_nats::Client) {
    let mut sub = subscriber.subscribe("auth.events").await.unwrap();
    // A flush only writes the SUB; the server may process another connection's publish
    // first. Our own probe coming back proves the subscription is live.
    subscriber.publish("auth.events", "probe".into()).await.unwrap();
    let probe = tokio::time::timeout(Duration::from_secs(5), sub.next()).await.expect("probe within 5s").unwrap();
    assert_eq!(&probe.payload[..], b"probe");
    let r = call("POST", &format!("http://{sidecar_egress}/events"), &[], "hello").await;
    assert_eq!(r.status, 202, "{}", r.text());
    let msg = match tokio::time::timeout(Duration::from_secs(5), sub.next()).await {
        Ok(m) => m.unwrap(),
        Err(_) => panic!("no message within 5s; subscriber state {:?}", subscriber.connection_state()),
    };
    assert_eq!(&msg.payload[..], b"hello");
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A sidecar child process with extra environment and log level; stderr goes to its log.
fn spawn_process(toml: &str, nats_url: &str, env: &[(&str, &str)], log_level: &str) -> SidecarProcess {
    SidecarProcess::start_with(toml, nats_url, |cmd| {
        cmd.arg("--log-level").arg(log_level);
        cmd.env_remove("NATSBRIDGE_LOG_LEVEL");
        for (k, v) in env {
            cmd.env(k, v);
        }
    })
}

fn assert_secret_not_logged(log: &str, secret: &str) {
    assert!(!log.is_empty(), "empty log");
    assert!(!log.contains(secret), "the secret appears in the log:\n{log}");
}

// ---------------------------------------------------------------------------------------
// Token

const TOKEN: &str = "tok-8c1f9e2a7d4b4f0e9a3c";

fn token_server() -> NatsServer {
    NatsServer::start_with(&format!("authorization {{ token: \"{TOKEN}\" }}"))
}

#[tokio::test]
async fn token_from_file_authenticates() {
    let nats = token_server();
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "token", &format!("{TOKEN}\n"));
    let s = Sidecar::start_with_env(&routes(&format!("token_file = {:?}", f.display().to_string())), &nats.url(), None, &[]).await;
    s.wait_ready().await;
    let sub = async_nats::ConnectOptions::with_token(TOKEN.into()).connect(nats.url()).await.unwrap();
    assert_flows(s.egress, sub).await;
}

#[tokio::test]
async fn token_from_env_authenticates_and_never_appears_in_a_trace_log() {
    let nats = token_server();
    let p = spawn_process(&routes("token_env = \"NB_TEST_TOKEN\""), &nats.url(), &[("NB_TEST_TOKEN", TOKEN)], "trace");
    p.wait_ready().await;
    let sub = async_nats::ConnectOptions::with_token(TOKEN.into()).connect(nats.url()).await.unwrap();
    assert_flows(p.egress, sub).await;
    let log = p.log();
    assert!(log.contains("TRACE"), "not a trace log:\n{log}");
    assert_secret_not_logged(&log, TOKEN);
}

#[tokio::test]
async fn wrong_token_is_refused_and_readiness_stays_false() {
    let nats = token_server();
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "token", "not-the-token-3b9d");
    let s = Sidecar::start_with_env(&routes(&format!("token_file = {:?}", f.display().to_string())), &nats.url(), None, &[]).await;
    assert_never_ready(s.admin, Duration::from_secs(2)).await;
    // And the egress answers 503 instead of queueing into a connection that never comes.
    let r = call("POST", &format!("http://{}/events", s.egress), &[], "x").await;
    assert_eq!(r.status, 503, "{}", r.text());
}

#[tokio::test]
async fn no_credentials_against_an_auth_server_is_refused() {
    let nats = token_server();
    let s = Sidecar::start_with_env(&routes(""), &nats.url(), None, &[]).await;
    assert_never_ready(s.admin, Duration::from_secs(2)).await;
}

// ---------------------------------------------------------------------------------------
// User and password

const PASSWORD: &str = "pw-5e0b7c1d9f2a46e8b3d1";

fn user_server() -> NatsServer {
    NatsServer::start_with(&format!("authorization {{ users = [ {{ user: \"bridge\", password: \"{PASSWORD}\" }} ] }}"))
}

#[tokio::test]
async fn user_and_password_file_authenticate() {
    let nats = user_server();
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "pass", PASSWORD);
    let s = Sidecar::start_with_env(
        &routes(&format!("user = \"bridge\"\npassword_file = {:?}", f.display().to_string())),
        &nats.url(),
        None,
        &[],
    )
    .await;
    s.wait_ready().await;
    let sub = async_nats::ConnectOptions::with_user_and_password("bridge".into(), PASSWORD.into()).connect(nats.url()).await.unwrap();
    assert_flows(s.egress, sub).await;
}

#[tokio::test]
async fn user_and_password_env_authenticate_and_never_appear_in_a_trace_log() {
    let nats = user_server();
    let p = spawn_process(
        &routes("user = \"bridge\"\npassword_env = \"NB_TEST_PASSWORD\""),
        &nats.url(),
        &[("NB_TEST_PASSWORD", PASSWORD)],
        "trace",
    );
    p.wait_ready().await;
    let sub = async_nats::ConnectOptions::with_user_and_password("bridge".into(), PASSWORD.into()).connect(nats.url()).await.unwrap();
    assert_flows(p.egress, sub).await;
    assert_secret_not_logged(&p.log(), PASSWORD);
}

/// The chart's injector hands each sidecar its user as `NATSBRIDGE_NATS_URL` from a Secret
/// (`nats://<service>:<password>@host:4222`), with no credentials in routes.toml. async-nats
/// never sends URL userinfo by itself.
#[tokio::test]
async fn credentials_in_the_nats_url_environment_authenticate_and_never_appear_in_a_trace_log() {
    let nats = user_server();
    let port = nats.url().rsplit(':').next().unwrap().to_owned();
    let url = format!("nats://bridge:{PASSWORD}@127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "routes.toml", &routes(""));
    let egress: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_natsbridge"));
    cmd.arg("run").arg("--config").arg(&path).arg("--listen").arg(egress.to_string()).arg("--admin-listen").arg(admin.to_string());
    cmd.args(["--log-level", "trace"]).env_remove("NATSBRIDGE_LOG_LEVEL").env("NATSBRIDGE_NATS_URL", &url);
    let log = std::fs::File::create(dir.path().join("sidecar.log")).unwrap();
    let child = cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap();
    let p = SidecarProcess { child, egress, admin, dir };
    p.wait_ready().await;
    let sub = async_nats::ConnectOptions::with_user_and_password("bridge".into(), PASSWORD.into()).connect(nats.url()).await.unwrap();
    assert_flows(p.egress, sub).await;
    assert_secret_not_logged(&p.log(), PASSWORD);
}

#[tokio::test]
async fn wrong_password_keeps_readiness_false_and_is_logged_clearly_without_the_secret() {
    let nats = user_server();
    let wrong = "wrong-pw-77a1c0e4d2";
    let p = spawn_process(
        &routes("user = \"bridge\"\npassword_env = \"NB_TEST_PASSWORD\""),
        &nats.url(),
        &[("NB_TEST_PASSWORD", wrong)],
        "trace",
    );
    // Wait for the admin listener, then hold: never ready.
    let admin = p.admin;
    eventually("admin listener", Duration::from_secs(20), || async move { get(&format!("http://{admin}/readyz")).await.ok().map(|_| ()) })
        .await;
    assert_never_ready(p.admin, Duration::from_secs(3)).await;
    // /statusz says why, not only that NATS is not connected.
    let r = get(&format!("http://{admin}/statusz")).await.unwrap();
    assert_eq!(
        r.json()["failing"]["nats"],
        "not connected to NATS: the server rejected the credentials (authorization violation)",
        "{}",
        r.text()
    );
    assert!(!r.text().contains(wrong));
    let log = p.log();
    let clear = log.lines().filter(|l| l.contains("NATS rejected the credentials (authorization violation)")).count();
    assert!(clear >= 1, "no clear auth failure line:\n{log}");
    // Reconnect attempts repeat every ≤2 s; the sidecar's own line is rate-limited to one
    // per 30 s, so it appears once here however many attempts were made.
    assert_eq!(clear, 1, "the auth failure was logged more than once:\n{log}");
    let line = log.lines().find(|l| l.contains("NATS rejected the credentials")).unwrap();
    assert!(line.contains("user \\\"bridge\\\"") || line.contains("user \"bridge\""), "{line}");
    assert!(line.contains("env:NB_TEST_PASSWORD"), "the line should say where the secret came from: {line}");
    assert_secret_not_logged(&log, wrong);
}

// ---------------------------------------------------------------------------------------
// Nkeys

fn nkey_server(user: &nkeys::KeyPair) -> NatsServer {
    NatsServer::start_with(&format!("authorization {{ users = [ {{ nkey: \"{}\" }} ] }}", user.public_key()))
}

#[tokio::test]
async fn nkey_seed_file_authenticates() {
    let user = nkeys::KeyPair::new_user();
    let nats = nkey_server(&user);
    let dir = tempfile::tempdir().unwrap();
    let seed = user.seed().unwrap();
    let f = write(dir.path(), "seed", &format!("{seed}\n"));
    let s = Sidecar::start_with_env(&routes(&format!("nkey_seed_file = {:?}", f.display().to_string())), &nats.url(), None, &[]).await;
    s.wait_ready().await;
    let sub = async_nats::ConnectOptions::with_nkey(seed).connect(nats.url()).await.unwrap();
    assert_flows(s.egress, sub).await;
}

#[tokio::test]
async fn nkey_seed_env_authenticates_and_never_appears_in_a_trace_log() {
    let user = nkeys::KeyPair::new_user();
    let nats = nkey_server(&user);
    let seed = user.seed().unwrap();
    let p = spawn_process(&routes("nkey_seed_env = \"NB_TEST_SEED\""), &nats.url(), &[("NB_TEST_SEED", &seed)], "trace");
    p.wait_ready().await;
    assert_secret_not_logged(&p.log(), &seed);
}

#[tokio::test]
async fn an_unknown_nkey_is_refused() {
    let allowed = nkeys::KeyPair::new_user();
    let nats = nkey_server(&allowed);
    let other = nkeys::KeyPair::new_user().seed().unwrap();
    let s = Sidecar::start_with_env(&routes("nkey_seed_env = \"SEED\""), &nats.url(), None, &[("SEED", &other)]).await;
    assert_never_ready(s.admin, Duration::from_secs(2)).await;
}

#[tokio::test]
async fn a_malformed_nkey_seed_fails_the_start_without_quoting_it() {
    let nats = NatsServer::start();
    // A user *public* key where the seed belongs: the classic mistake.
    let public = nkeys::KeyPair::new_user().public_key();
    let s = Sidecar::start_with_env(&routes("nkey_seed_env = \"SEED\""), &nats.url(), None, &[("SEED", &public)]).await;
    let e = s.start_error().await;
    assert!(e.contains("env:SEED") && e.contains("nkey seed"), "{e}");
    assert!(!e.contains(&public), "{e}");
    // An account seed is a seed, but not a user's.
    let account = nkeys::KeyPair::new_account().seed().unwrap();
    let s = Sidecar::start_with_env(&routes("nkey_seed_env = \"SEED\""), &nats.url(), None, &[("SEED", &account)]).await;
    let e = s.start_error().await;
    assert!(e.contains("user nkey seed"), "{e}");
    assert!(!e.contains(&account), "{e}");
}
