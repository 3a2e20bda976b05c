//! The NATS connection: connect options from `[nats]` (auth, TLS, reconnect forever with
//! backoff), secrets resolved at connect time and never logged, and connection events
//! turned into metrics.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{ConnectOptions, Event};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::config::{Nats, NatsAuth, Secret};
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot read secret {0:?}: {1}")]
    Secret(Secret, String),
    #[error("cannot read NATS credentials file {0}: {1}")]
    Credentials(String, std::io::Error),
    #[error("cannot connect to NATS: {0}")]
    Connect(#[from] async_nats::ConnectError),
    #[error("cannot connect to NATS at {servers} within {}: {why}", humantime::format_duration(*.timeout))]
    Unreachable { servers: String, timeout: Duration, why: String },
}

/// Looks up an environment variable. Passed in: the library never reads the environment.
pub type EnvLookup<'a> = &'a (dyn Fn(&str) -> Option<String> + Sync);

fn resolve(secret: &Secret, env: EnvLookup<'_>) -> Result<String, ConnectError> {
    match secret {
        Secret::File(p) => std::fs::read_to_string(p)
            .map(|s| s.trim().to_owned())
            .map_err(|e| ConnectError::Secret(secret.clone(), e.to_string())),
        Secret::Env(v) => env(v).map(|s| s.trim().to_owned()).ok_or_else(|| ConnectError::Secret(secret.clone(), "variable is not set".into())),
    }
}

/// Builds the connect options for `nats`, named `natsbridge-<service>`.
pub async fn options(nats: &Nats, service: &str, metrics: &Metrics, env: EnvLookup<'_>) -> Result<ConnectOptions, ConnectError> {
    let mut opts = match &nats.auth {
        NatsAuth::Credentials(path) => ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|e| ConnectError::Credentials(path.display().to_string(), e))?,
        _ => ConnectOptions::new(),
    };
    opts = match &nats.auth {
        NatsAuth::None | NatsAuth::Credentials(_) => opts,
        NatsAuth::Token(t) => opts.token(resolve(t, env)?),
        NatsAuth::UserPassword { user, password } => opts.user_and_password(user.clone(), resolve(password, env)?),
        NatsAuth::NkeySeed(s) => opts.nkey(resolve(s, env)?),
    };
    if let Some(tls) = &nats.tls {
        if let Some(ca) = &tls.ca_file {
            opts = opts.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
            opts = opts.add_client_certificate(cert.clone(), key.clone());
        }
        opts = opts.require_tls(tls.require);
    }
    let events = metrics.clone();
    let slow_log = Arc::new(Mutex::new(None::<Instant>));
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
            let slow_log = slow_log.clone();
            let seen = seen.clone();
            async move { on_event(&m, &slow_log, &seen, event) }
        }))
}

/// Exponential backoff from 50 ms, capped at 2 s so recovery after an outage is quick.
fn reconnect_delay(attempts: usize) -> Duration {
    let exp = 50u64.saturating_mul(1 << attempts.min(6));
    Duration::from_millis(exp.min(2_000))
}

fn on_event(m: &Metrics, slow_log: &Mutex<Option<Instant>>, seen: &AtomicBool, event: Event) {
    match event {
        Event::Connected => {
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
            tracing::warn!("disconnected from NATS; reconnecting");
        }
        Event::SlowConsumer(sid) => {
            m.slow_consumers.inc();
            // Slow-consumer storms would flood the log: one line per 10 s at most.
            let mut last = slow_log.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                *last = Some(Instant::now());
                tracing::warn!(sid, total = m.slow_consumers.get(), "NATS slow consumer: messages were dropped by the client");
            }
        }
        Event::LameDuckMode => tracing::warn!("NATS server entered lame duck mode"),
        Event::ServerError(e) => tracing::warn!(error = %e, "NATS server error"),
        Event::ClientError(e) => tracing::warn!(error = %e, "NATS client error"),
        Event::Draining | Event::Closed => m.nats_connected.set(0),
    }
}

/// Connects (in the background if the server is not up yet).
pub async fn connect(nats: &Nats, service: &str, metrics: &Metrics, env: EnvLookup<'_>) -> Result<async_nats::Client, ConnectError> {
    let opts = options(nats, service, metrics, env).await?;
    Ok(opts.connect(nats.servers.clone()).await?)
}

/// Connects for a one-shot command (`provision`, `dlq`): waits up to `timeout` for the
/// first connection and fails with the last error the client reported, instead of
/// retrying in the background forever like [`connect`]. No metrics are recorded.
pub async fn connect_now(nats: &Nats, service: &str, env: EnvLookup<'_>, timeout: Duration) -> Result<async_nats::Client, ConnectError> {
    let last = Arc::new(Mutex::new(None::<String>));
    let seen = last.clone();
    // Replaces the sidecar's event callback: remember why connecting fails, log nothing.
    let opts = options(nats, service, &Metrics::new(), env).await?.event_callback(move |event| {
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
            return Err(ConnectError::Unreachable { servers: nats.servers.join(", "), timeout, why });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(client)
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
