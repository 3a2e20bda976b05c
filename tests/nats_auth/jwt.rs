//! JWT credentials (operator mode): an operator, an account and a user signed here, the
//! server in operator mode with a memory resolver. Also the clear start failure for secret
//! files and variables that are missing or empty, whatever the auth mode.

use super::*;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Encodes and signs a NATS JWT (v2): `{"typ":"JWT","alg":"ed25519-nkey"}`.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    let header = b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let iat = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let claims = serde_json::json!({
        "jti": uuid::Uuid::new_v4().simple().to_string().to_uppercase(),
        "iat": iat,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let payload = b64(&serde_json::to_vec(&claims).unwrap());
    let signing_input = format!("{header}.{payload}");
    let sig = issuer.sign(signing_input.as_bytes()).unwrap();
    format!("{signing_input}.{}", b64(&sig))
}

struct Operator {
    conf: String,
    account: nkeys::KeyPair,
    _dir: tempfile::TempDir,
}

/// An operator, one account (JetStream enabled) and the server config that trusts them.
fn operator_mode() -> Operator {
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let op_jwt = jwt(&operator, &operator.public_key(), "test-operator", serde_json::json!({ "type": "operator", "version": 2 }));
    let unlimited = serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true,
        "conn": -1, "leaf": -1, "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1
    });
    let acc_jwt = jwt(
        &operator,
        &account.public_key(),
        "bridge-account",
        serde_json::json!({ "limits": unlimited, "default_permissions": { "pub": {}, "sub": {} }, "type": "account", "version": 2 }),
    );
    // JetStream in operator mode needs a system account.
    let system = nkeys::KeyPair::new_account();
    let sys_jwt = jwt(&operator, &system.public_key(), "SYS", serde_json::json!({ "type": "account", "version": 2 }));
    let dir = tempfile::tempdir().unwrap();
    let op_path = write(dir.path(), "operator.jwt", &op_jwt);
    let conf = format!(
        "operator: {:?}\nsystem_account: {}\nresolver: MEMORY\nresolver_preload: {{\n  {}: \"{}\"\n  {}: \"{}\"\n}}\n",
        op_path.display().to_string(),
        system.public_key(),
        account.public_key(),
        acc_jwt,
        system.public_key(),
        sys_jwt
    );
    Operator { conf, account, _dir: dir }
}

fn user_creds(account: &nkeys::KeyPair) -> (String, String) {
    let user = nkeys::KeyPair::new_user();
    let user_jwt = jwt(
        account,
        &user.public_key(),
        "bridge-user",
        serde_json::json!({ "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2 }),
    );
    let seed = user.seed().unwrap();
    let creds = format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n************************* IMPORTANT *************************\nNKEY Seed printed below can be used to sign and prove identity.\n\n-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n*************************************************************\n"
    );
    (creds, seed)
}

#[tokio::test]
async fn creds_file_authenticates_against_an_operator_mode_server() {
    let op = operator_mode();
    let nats = NatsServer::start_with(&op.conf);
    let dir = tempfile::tempdir().unwrap();
    let (creds, seed) = user_creds(&op.account);
    let f = write(dir.path(), "user.creds", &creds);
    let s = Sidecar::start_with_env(&routes(&format!("creds_file = {:?}", f.display().to_string())), &nats.url(), None, &[]).await;
    s.wait_ready().await;
    let sub = async_nats::ConnectOptions::with_credentials(&creds).unwrap().connect(nats.url()).await.unwrap();
    assert_flows(s.egress, sub).await;
    drop(seed);
}

#[tokio::test]
async fn creds_signed_by_an_untrusted_account_are_refused() {
    let op = operator_mode();
    let nats = NatsServer::start_with(&op.conf);
    let dir = tempfile::tempdir().unwrap();
    let (creds, _) = user_creds(&nkeys::KeyPair::new_account());
    let f = write(dir.path(), "user.creds", &creds);
    let s = Sidecar::start_with_env(&routes(&format!("creds_file = {:?}", f.display().to_string())), &nats.url(), None, &[]).await;
    assert_never_ready(s.admin, Duration::from_secs(2)).await;
}

#[tokio::test]
async fn creds_file_seed_never_appears_in_a_trace_log() {
    let op = operator_mode();
    let nats = NatsServer::start_with(&op.conf);
    let dir = tempfile::tempdir().unwrap();
    let (creds, seed) = user_creds(&op.account);
    let f = write(dir.path(), "user.creds", &creds);
    let p = spawn_process(&routes(&format!("creds_file = {:?}", f.display().to_string())), &nats.url(), &[], "trace");
    p.wait_ready().await;
    assert_secret_not_logged(&p.log(), &seed);
}

#[tokio::test]
async fn missing_or_malformed_creds_files_fail_the_start_clearly() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.creds");
    let s = Sidecar::start_with_env(&routes(&format!("creds_file = {:?}", missing.display().to_string())), &nats.url(), None, &[]).await;
    let e = s.start_error().await;
    assert!(e.contains("credentials file") && e.contains("nope.creds"), "{e}");

    let garbage = write(dir.path(), "garbage.creds", "this is not a creds file\n");
    let s = Sidecar::start_with_env(&routes(&format!("creds_file = {:?}", garbage.display().to_string())), &nats.url(), None, &[]).await;
    let e = s.start_error().await;
    assert!(e.contains("garbage.creds") && e.contains("JWT"), "{e}");

    // A JWT but a broken seed: the seed text must not be echoed.
    let (creds, seed) = user_creds(&nkeys::KeyPair::new_account());
    let broken = creds.replace(&seed, &format!("{}X", &seed[..seed.len() - 1]));
    let f = write(dir.path(), "broken.creds", &broken);
    let s = Sidecar::start_with_env(&routes(&format!("creds_file = {:?}", f.display().to_string())), &nats.url(), None, &[]).await;
    let e = s.start_error().await;
    assert!(e.contains("broken.creds"), "{e}");
    assert!(!e.contains(&seed[..20]), "{e}");
}

#[tokio::test]
async fn missing_secret_files_and_variables_fail_the_start_clearly() {
    let nats = NatsServer::start();
    let s = Sidecar::start_with_env(&routes("token_file = \"/nonexistent/natsbridge/token\""), &nats.url(), None, &[]).await;
    let e = s.start_error().await;
    assert!(e.contains("file:/nonexistent/natsbridge/token"), "{e}");
    let s = Sidecar::start_with_env(&routes("token_env = \"NB_UNSET\""), &nats.url(), None, &[]).await;
    let e = s.start_error().await;
    assert!(e.contains("env:NB_UNSET") && e.contains("not set"), "{e}");
    let s = Sidecar::start_with_env(&routes("token_env = \"NB_EMPTY\""), &nats.url(), None, &[("NB_EMPTY", " \n")]).await;
    let e = s.start_error().await;
    assert!(e.contains("env:NB_EMPTY") && e.contains("empty"), "{e}");
}
