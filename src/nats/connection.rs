//! The NATS connection: connect options from `[nats]` (auth, TLS, reconnect forever with
//! backoff), secrets resolved at connect time and never logged, and connection events
//! turned into metrics, readiness and a count of connects (see [`connect`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{ConnectOptions, Event};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::config::{redact_userinfo, Nats, NatsAuth, Secret};
use crate::health::{Component, Readiness};
use crate::metrics::Metrics;

/// Why the connection could not even be attempted. Messages name where a secret lives,
/// never its value.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot read secret {0:?}: {1}")]
    Secret(Secret, &'static str),
    #[error("cannot read secret {0:?}: {1}")]
    SecretFile(Secret, #[source] std::io::Error),
    #[error("cannot read NATS credentials file {0}: {1}")]
    Credentials(String, std::io::Error),
    #[error("NATS TLS {0} {1}: {2}")]
    Tls(&'static str, String, &'static str),
    #[error("NATS TLS {0} {1}: {2}")]
    TlsFile(&'static str, String, #[source] std::io::Error),
    #[error("cannot connect to NATS: {}", redact_userinfo(&.0.to_string()))]
    Connect(#[from] async_nats::ConnectError),
    #[error("cannot connect to NATS at {servers} within {}: {why}", humantime::format_duration(*.timeout))]
    Unreachable { servers: String, timeout: Duration, why: String },
}

/// Looks up an environment variable. Passed in: the library never reads the environment.
pub type EnvLookup<'a> = &'a (dyn Fn(&str) -> Option<String> + Sync);

fn resolve(secret: &Secret, env: EnvLookup<'_>) -> Result<String, ConnectError> {
    let value = match secret {
        Secret::File(p) => {
            std::fs::read_to_string(p).map(|s| s.trim().to_owned()).map_err(|e| ConnectError::SecretFile(secret.clone(), e))?
        }
        Secret::Env(v) => env(v).map(|s| s.trim().to_owned()).ok_or_else(|| ConnectError::Secret(secret.clone(), "variable is not set"))?,
    };
    // An empty secret would silently connect without credentials.
    if value.is_empty() {
        return Err(ConnectError::Secret(secret.clone(), "it is empty"));
    }
    Ok(value)
}

/// A user nkey seed is `SU` + 56 base32 characters. Checked up front: async-nats would
/// only fail at every connect attempt with "failed signing nonce". The message never
/// quotes the value.
fn check_user_seed(secret: &Secret, seed: &str) -> Result<(), ConnectError> {
    let base32 = seed.bytes().all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b));
    if seed.len() != 58 || !base32 {
        return Err(ConnectError::Secret(secret.clone(), "not an nkey seed (expected 58 base32 characters starting with SU)"));
    }
    if !seed.starts_with("SU") {
        return Err(ConnectError::Secret(secret.clone(), "not a user nkey seed (it must start with SU)"));
    }
    Ok(())
}

/// TLS files are read at every connect attempt; a missing or unreadable one fails the
/// start instead of looping on "TLS error".
fn check_pem(what: &'static str, path: &std::path::Path) -> Result<(), ConnectError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConnectError::TlsFile(what, path.display().to_string(), e))?;
    if !text.contains("-----BEGIN ") {
        return Err(ConnectError::Tls(what, path.display().to_string(), "no PEM block in the file"));
    }
    Ok(())
}

/// Credentials written into a server URL (`nats://user:pass@host`, `nats://token@host`).
#[derive(Debug, PartialEq, Eq)]
enum UrlCredentials {
    UserPassword(String, String),
    Token(String),
}

/// The credentials of the first server URL that carries some, percent-decoded. async-nats
/// parses but never sends them, and a URL Secret (`NATSBRIDGE_NATS_URL`, as the chart's
/// injector hands out) is how injected sidecars get their user: without this they would
/// connect anonymously and be refused.
fn url_credentials(servers: &[String]) -> Option<UrlCredentials> {
    let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
    servers.iter().filter_map(|s| s.parse::<async_nats::ServerAddr>().ok()).find_map(|addr| {
        let user = decode(addr.username()?);
        Some(match addr.password() {
            Some(p) => UrlCredentials::UserPassword(user, decode(p)),
            None => UrlCredentials::Token(user),
        })
    })
}

/// How the sidecar authenticates, for log lines: where the secret lives, never its value.
fn auth_description(auth: &NatsAuth, servers: &[String]) -> String {
    match auth {
        NatsAuth::None => match url_credentials(servers) {
            Some(UrlCredentials::UserPassword(user, _)) => format!("user {user:?} with the password from the server URL"),
            Some(UrlCredentials::Token(_)) => "token from the server URL".into(),
            None => "no credentials".into(),
        },
        NatsAuth::Token(s) => format!("token from {s:?}"),
        NatsAuth::UserPassword { user, password } => format!("user {user:?} with the password from {password:?}"),
        NatsAuth::NkeySeed(s) => format!("nkey seed from {s:?}"),
        NatsAuth::Credentials(p) => format!("credentials file {}", p.display()),
    }
}

/// Builds the connect options for `nats`, named `natsbridge-<service>`.
/// `readiness`, when given, carries the connection's state and why connecting fails
/// (rejected credentials, TLS failure, …) so `/statusz` says more than "not connected".
pub async fn options(
    nats: &Nats,
    service: &str,
    metrics: &Metrics,
    readiness: Option<Arc<Readiness>>,
    connects: Option<tokio::sync::watch::Sender<u64>>,
    env: EnvLookup<'_>,
) -> Result<ConnectOptions, ConnectError> {
    let mut opts = match &nats.auth {
        NatsAuth::Credentials(path) => {
            ConnectOptions::with_credentials_file(path).await.map_err(|e| ConnectError::Credentials(path.display().to_string(), e))?
        }
        _ => ConnectOptions::new(),
    };
    opts = match &nats.auth {
        NatsAuth::None => match url_credentials(&nats.servers) {
            Some(UrlCredentials::UserPassword(user, password)) => opts.user_and_password(user, password),
            Some(UrlCredentials::Token(token)) => opts.token(token),
            None => opts,
        },
        NatsAuth::Credentials(_) => opts,
        NatsAuth::Token(t) => opts.token(resolve(t, env)?),
        NatsAuth::UserPassword { user, password } => opts.user_and_password(user.clone(), resolve(password, env)?),
        NatsAuth::NkeySeed(s) => {
            let seed = resolve(s, env)?;
            check_user_seed(s, &seed)?;
            opts.nkey(seed)
        }
    };
    if let Some(tls) = &nats.tls {
        if let Some(ca) = &tls.ca_file {
            check_pem("ca_file", ca)?;
            opts = opts.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
            check_pem("cert_file", cert)?;
            check_pem("key_file", key)?;
            opts = opts.add_client_certificate(cert.clone(), key.clone());
        }
        opts = opts.require_tls(tls.require);
    }
    if let Some(prefix) = &nats.inbox_prefix {
        // Reply subjects (ours, see `replies`) are made under it.
        opts = opts.custom_inbox_prefix(prefix.clone());
    }
    let events = metrics.clone();
    let logs = Arc::new(EventLog { auth: auth_description(&nats.auth, &nats.servers), readiness, connects, ..Default::default() });
    let seen = Arc::new(AtomicBool::new(false));
    Ok(opts
        .name(format!("natsbridge-{service}"))
        .connection_timeout(nats.connect_timeout)
        // The sidecar must start and serve while NATS is down, and never give up.
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(reconnect_delay)
        // Each request carries its own route timeout.
        .request_timeout(None)
        .event_callback(move |event| {
            let m = events.clone();
            let logs = logs.clone();
            let seen = seen.clone();
            async move { on_event(&m, &logs, &seen, event) }
        }))
}

/// Exponential backoff from 50 ms, capped at 2 s so recovery after an outage is quick.
fn reconnect_delay(attempts: usize) -> Duration {
    let exp = 50u64.saturating_mul(1 << attempts.min(6));
    Duration::from_millis(exp.min(2_000))
}

/// Rate limits for event log lines: a NATS outage or a rejected credential repeats the
/// same event at every reconnect attempt.
#[derive(Default)]
struct EventLog {
    auth: String,
    readiness: Option<Arc<Readiness>>,
    /// Counts every (re)connect, for what must start over on a new connection.
    connects: Option<tokio::sync::watch::Sender<u64>>,
    slow: Mutex<Option<Instant>>,
    /// The last connect failure logged, when, and how many identical ones were not.
    failure: Mutex<Option<(String, Instant, u64)>>,
}

/// Identical connect failures are logged once per this period (and the first at once).
const REPEAT_LOG: Duration = Duration::from_secs(30);

impl EventLog {
    /// Should this connect failure be logged now? Returns how many identical ones were
    /// suppressed since the last line.
    fn failure(&self, what: &str) -> Option<u64> {
        if let Some(r) = &self.readiness {
            r.fail(&Component::NATS, format!("not connected to NATS: {}", failure_reason(what)));
        }
        let mut last = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        match last.as_mut() {
            Some((w, at, n)) if w == what && at.elapsed() < REPEAT_LOG => {
                *n += 1;
                None
            }
            _ => {
                let suppressed = match last.take() {
                    Some((w, _, n)) if w == what => n,
                    _ => 0,
                };
                *last = Some((what.to_owned(), Instant::now(), 0));
                Some(suppressed)
            }
        }
    }

    fn connected(&self) {
        if let Some(r) = &self.readiness {
            r.pass(&Component::NATS);
        }
        if let Some(c) = &self.connects {
            c.send_modify(|n| *n += 1);
        }
        *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn disconnected(&self) {
        if let Some(r) = &self.readiness {
            r.fail(&Component::NATS, "disconnected from NATS; reconnecting");
        }
    }
}

/// Why a connect attempt failed, for people reading `/statusz`.
fn failure_reason(what: &str) -> String {
    match what {
        "authorization violation" => "the server rejected the credentials (authorization violation)".into(),
        "failed signing nonce" => "signing the server nonce failed (bad nkey seed or credentials?)".into(),
        "TLS error" => "the TLS handshake failed (certificate, CA or TLS requirement mismatch)".into(),
        other => other.to_owned(),
    }
}

fn on_event(m: &Metrics, logs: &EventLog, seen: &AtomicBool, event: Event) {
    match event {
        Event::Connected => {
            logs.connected();
            if !seen.swap(true, Ordering::Relaxed) {
                tracing::info!("connected to NATS");
            } else {
                m.nats_reconnects.inc();
                tracing::info!("reconnected to NATS");
            }
            m.nats_connected.set(1);
        }
        Event::Disconnected => {
            m.nats_connected.set(0);
            logs.disconnected();
            tracing::warn!("disconnected from NATS; reconnecting");
        }
        Event::SlowConsumer(sid) => {
            m.slow_consumers.inc();
            // Slow-consumer storms would flood the log: one line per 10 s at most.
            let mut last = logs.slow.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                *last = Some(Instant::now());
                tracing::warn!(sid, total = m.slow_consumers.get(), "NATS slow consumer: messages were dropped by the client");
            }
        }
        Event::LameDuckMode => tracing::warn!("NATS server entered lame duck mode"),
        Event::ServerError(async_nats::ServerError::AuthorizationViolation) => {
            if let Some(suppressed) = logs.failure("authorization violation") {
                tracing::error!(auth = %logs.auth, suppressed, "NATS rejected the credentials (authorization violation); check the [nats] auth settings");
            }
        }
        Event::ServerError(e) => tracing::warn!(error = %e, "NATS server error"),
        // Connect attempts that failed: once per kind and 30 s, not once per attempt.
        Event::ClientError(async_nats::ClientError::Other(what)) => {
            if let Some(suppressed) = logs.failure(&what) {
                match what.as_str() {
                    "authorization violation" => tracing::error!(
                        auth = %logs.auth,
                        suppressed,
                        "NATS rejected the credentials (authorization violation); check the [nats] auth settings; retrying"
                    ),
                    "failed signing nonce" => tracing::error!(
                        auth = %logs.auth,
                        suppressed,
                        "cannot authenticate to NATS: signing the server nonce failed (bad nkey seed or credentials?); retrying"
                    ),
                    "TLS error" => {
                        tracing::error!(suppressed, "NATS TLS handshake failed (certificate, CA or TLS requirement mismatch); retrying")
                    }
                    _ => tracing::warn!(error = %redact_userinfo(&what), suppressed, "cannot connect to NATS; retrying"),
                }
            }
        }
        Event::ClientError(e) => tracing::warn!(error = %e, "NATS client error"),
        Event::Draining | Event::Closed => m.nats_connected.set(0),
    }
}

/// Connects (in the background if the server is not up yet). `connects` counts every
/// connect and reconnect: a pull request the old connection's server held may be gone (a
/// restarted server forgets it), and a pull loop must not wait for it.
pub async fn connect(
    nats: &Nats,
    service: &str,
    metrics: &Metrics,
    readiness: Arc<Readiness>,
    connects: tokio::sync::watch::Sender<u64>,
    env: EnvLookup<'_>,
) -> Result<async_nats::Client, ConnectError> {
    readiness.starting(&Component::NATS, "first connection attempt under way");
    let opts = options(nats, service, metrics, Some(readiness), Some(connects), env).await?;
    Ok(opts.connect(nats.servers.clone()).await?)
}

/// Connects for a one-shot command (`provision`, `dlq`): waits up to `timeout` for the
/// first connection and fails with the last error the client reported, instead of
/// retrying in the background forever like [`connect`]. No metrics are recorded.
pub async fn connect_now(nats: &Nats, service: &str, env: EnvLookup<'_>, timeout: Duration) -> Result<async_nats::Client, ConnectError> {
    let last = Arc::new(Mutex::new(None::<String>));
    let seen = last.clone();
    // Replaces the sidecar's event callback: remember why connecting fails, log nothing.
    let opts = options(nats, service, &Metrics::new(), None, None, env).await?.event_callback(move |event| {
        let seen = seen.clone();
        async move {
            let why = match event {
                Event::ServerError(e) => e.to_string(),
                Event::ClientError(e) => e.to_string(),
                _ => return,
            };
            *seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        }
    });
    let client = opts.connect(nats.servers.clone()).await?;
    let deadline = Instant::now() + timeout;
    while !is_connected(&client) {
        if Instant::now() >= deadline {
            let why = last.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_else(|| "no server answered".into());
            // Dropping the last handle stops the background reconnects.
            drop(client);
            // Server URLs may carry credentials (`nats://user:pass@…`), and so may the
            // client's error text.
            let (servers, why) = (redact_userinfo(&nats.servers.join(", ")), redact_userinfo(&why));
            return Err(ConnectError::Unreachable { servers, timeout, why });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(client)
}

/// How long a JetStream API call (stream and consumer info, KV reads and writes, creating
/// or updating streams, consumers and buckets, a publish's ack) may wait for its answer.
pub const JETSTREAM_API_TIMEOUT: Duration = Duration::from_secs(5);

/// A JetStream context whose every API call has a deadline. The connection is built with
/// `request_timeout(None)` (each core request carries its own route timeout), and
/// async-nats 0.51 bounds API requests by the connection's request timeout unless the
/// context sets one: `async_nats::jetstream::new` would let `kv.entry`, `consumer_info`
/// or `get_key_value` wait forever for a reply lost in a node restart.
pub fn jetstream(client: async_nats::Client) -> async_nats::jetstream::Context {
    async_nats::jetstream::ContextBuilder::new().timeout(JETSTREAM_API_TIMEOUT).build(client)
}

/// Is the client connected right now?
pub fn is_connected(client: &async_nats::Client) -> bool {
    client.connection_state() == async_nats::connection::State::Connected
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped() {
        assert_eq!(reconnect_delay(0), Duration::from_millis(50));
        assert_eq!(reconnect_delay(3), Duration::from_millis(400));
        assert_eq!(reconnect_delay(100), Duration::from_secs(2));
    }

    #[test]
    fn seeds_are_checked_without_being_quoted() {
        let s = Secret::Env("SEED".into());
        let user = format!("SU{}", "A".repeat(56));
        assert!(check_user_seed(&s, &user).is_ok());
        let account = format!("SA{}", "A".repeat(56));
        let e = check_user_seed(&s, &account).unwrap_err().to_string();
        assert!(e.contains("user nkey seed") && !e.contains(&account), "{e}");
        let public = format!("U{}", "A".repeat(55));
        let e = check_user_seed(&s, &public).unwrap_err().to_string();
        assert!(e.contains("not an nkey seed") && !e.contains(&public), "{e}");
        let e = resolve(&s, &|_| Some("  \n".into())).unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
    }

    #[test]
    fn repeated_connect_failures_are_logged_once_per_period_with_a_count() {
        let log = EventLog::default();
        assert_eq!(log.failure("authorization violation"), Some(0));
        assert_eq!(log.failure("authorization violation"), None);
        assert_eq!(log.failure("authorization violation"), None);
        // A different failure is news: logged at once.
        assert_eq!(log.failure("IO error"), Some(0));
        // After a successful connection, the next failure is logged again.
        log.connected();
        assert_eq!(log.failure("IO error"), Some(0));
        // Once the period has passed, the line says how many were not logged.
        *log.failure.lock().unwrap() = Some(("IO error".into(), Instant::now() - REPEAT_LOG, 7));
        assert_eq!(log.failure("IO error"), Some(7));
    }

    #[test]
    fn auth_is_described_by_where_the_secret_lives() {
        let d = auth_description(&NatsAuth::UserPassword { user: "bridge".into(), password: Secret::File("/run/pw".into()) }, &[]);
        assert_eq!(d, "user \"bridge\" with the password from file:/run/pw");
        assert_eq!(auth_description(&NatsAuth::Token(Secret::Env("T".into())), &[]), "token from env:T");
        let url = ["nats://orders:s3cret@nats:4222".to_owned()];
        assert_eq!(auth_description(&NatsAuth::None, &url), "user \"orders\" with the password from the server URL");
    }

    #[test]
    fn url_credentials_come_from_the_first_url_that_has_some_percent_decoded() {
        let urls = |u: &[&str]| u.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            url_credentials(&urls(&["nats://a:4222", "nats://or%40ders:p%3Aw@b:4222"])),
            Some(UrlCredentials::UserPassword("or@ders".into(), "p:w".into()))
        );
        assert_eq!(url_credentials(&urls(&["tls://tok@a:4222"])), Some(UrlCredentials::Token("tok".into())));
        assert_eq!(url_credentials(&urls(&["nats://a:4222"])), None);
    }

    #[test]
    fn secrets_resolve_from_env_and_files_and_are_never_printed() {
        let env = |k: &str| (k == "TOKEN").then(|| "s3cret\n".to_owned());
        assert_eq!(resolve(&Secret::Env("TOKEN".into()), &env).unwrap(), "s3cret");
        let err = resolve(&Secret::Env("NOPE".into()), &env).unwrap_err().to_string();
        assert!(err.contains("env:NOPE"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        std::fs::write(&p, "filetoken\n").unwrap();
        assert_eq!(resolve(&Secret::File(p), &env).unwrap(), "filetoken");
    }
}
