//! A wiretap on a fault server: every message it routes, kept with its time, so a failed
//! case can print the timeline of one event (its deliveries, acks, and the idempotency
//! store's reads and writes with the server's answers) instead of only a count.

use super::*;

/// One message the server routed.
#[derive(Clone, Debug)]
pub(crate) struct Wire {
    pub at: Duration,
    pub subject: String,
    pub reply: Option<String>,
    /// `name=value` pairs, joined.
    pub headers: String,
    pub payload: String,
}

pub(crate) struct Wiretap {
    start: Instant,
    log: Arc<Mutex<Vec<Wire>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Wiretap {
    /// Subscribes to `>` on its own connection, which reconnects (and resubscribes) when
    /// the server restarts; what is routed while it is away is not seen.
    pub async fn start(url: &str) -> Self {
        let client =
            async_nats::ConnectOptions::new().subscription_capacity(1 << 20).retry_on_initial_connect().connect(url).await.unwrap();
        let mut sub = support::subscribe_synced(&client, ">").await;
        let (start, log) = (Instant::now(), Arc::new(Mutex::new(Vec::new())));
        let task = tokio::spawn({
            let log = log.clone();
            async move {
                let _client = client;
                while let Some(m) = futures::StreamExt::next(&mut sub).await {
                    let headers = m
                        .headers
                        .as_ref()
                        .map(|h| {
                            h.iter()
                                .map(|(n, v)| format!("{n}={}", v.iter().map(|v| v.as_str()).collect::<Vec<_>>().join(",")))
                                .collect::<Vec<_>>()
                                .join(" ")
                        })
                        .unwrap_or_default();
                    let payload = String::from_utf8_lossy(&m.payload[..m.payload.len().min(200)]).into_owned();
                    let wire = Wire {
                        at: start.elapsed(),
                        subject: m.subject.to_string(),
                        reply: m.reply.map(|r| r.to_string()),
                        headers,
                        payload,
                    };
                    log.lock().unwrap().push(wire);
                }
            }
        });
        Self { start, log, task }
    }

    /// Since the tap started.
    pub fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// The messages `pick` selects, and the answers sent to their reply subjects, in order.
    pub fn thread(&self, pick: impl Fn(&Wire) -> bool) -> Vec<Wire> {
        let log = self.log.lock().unwrap();
        let replies: std::collections::HashSet<&str> = log.iter().filter(|w| pick(w)).filter_map(|w| w.reply.as_deref()).collect();
        log.iter().filter(|w| pick(w) || replies.contains(w.subject.as_str())).cloned().collect()
    }
}

impl Drop for Wiretap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Display for Wire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:>9.3}s {}", self.at.as_secs_f64(), self.subject)?;
        if let Some(r) = &self.reply {
            write!(f, " reply={r}")?;
        }
        if !self.headers.is_empty() {
            write!(f, " [{}]", self.headers)?;
        }
        write!(f, " {}", self.payload)
    }
}
