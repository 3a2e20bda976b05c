//! The HTTP client to the local app, shared by every inbound route and bounded by each
//! route's timeout and body limit.
//!
//! - `pool`: the keep-alive connections to the app.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;

use crate::telemetry::Telemetry;

mod pool;

/// The app's answer, body buffered.
#[derive(Debug)]
pub struct AppResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("the app is unreachable: {0}")]
    Unreachable(String),
    #[error("the app did not answer within {0:?}")]
    Timeout(Duration),
    #[error("invalid app request URI {0:?}")]
    BadUri(String),
    /// The app answered `status`, but its body was over the route's `max_body`.
    #[error("the app's response body is larger than {limit} bytes")]
    TooLarge { status: StatusCode, limit: usize },
}

/// The pooled client. Cheap to clone.
#[derive(Clone)]
pub struct AppClient {
    pool: pool::Pool,
    /// A call made under a message's span gets a client span of its own.
    telemetry: Telemetry,
    /// The `Host` of the app's authority, made once: see [`AppClient::host`].
    host: std::sync::Arc<std::sync::Mutex<Option<(http::uri::Authority, HeaderValue)>>>,
}

impl Default for AppClient {
    fn default() -> Self {
        Self::new()
    }
}

impl AppClient {
    pub fn new() -> Self {
        Self { pool: pool::Pool::default(), telemetry: Telemetry::off(), host: Default::default() }
    }

    /// The client whose calls under a message's span are traced.
    pub fn with_telemetry(self, telemetry: Telemetry) -> Self {
        Self { telemetry, ..self }
    }

    /// One call, bounded by `timeout` from sending to the end of the response body.
    pub async fn call(
        &self,
        method: Method,
        uri: &str,
        headers: HeaderMap,
        body: Bytes,
        timeout: Duration,
        max_body: usize,
    ) -> Result<AppResponse, AppError> {
        let exchange = async {
            let res = self.send(method, uri, headers, body).await?;
            collect(res, max_body).await
        };
        tokio::time::timeout(timeout, exchange).await.map_err(|_| AppError::Timeout(timeout))?
    }

    /// Sends one request and returns once the response head arrived; the body is the
    /// caller's to read (or to drop, which closes the connection). Unbounded in time: the
    /// caller sets the deadline.
    ///
    /// Under a message's span the call gets a client span, ended when the response head
    /// arrives (a streamed body outlives it), and the app gets that span as `traceparent`.
    pub async fn send(&self, method: Method, uri: &str, mut headers: HeaderMap, body: Bytes) -> Result<Response<Incoming>, AppError> {
        let span = self.telemetry.app_call(&method, uri, &mut headers);
        let uri: Uri = uri.parse().map_err(|_| AppError::BadUri(uri.to_owned()))?;
        if !headers.contains_key(http::header::HOST) {
            if let Some(host) = self.host(&uri) {
                headers.insert(http::header::HOST, host);
            }
        }
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        let res = self.pool.send(req).await;
        span.end(res.as_ref().map(|r| r.status()).map_err(|e| e.to_string()));
        res
    }
}

impl AppClient {
    /// `Host` for `uri`, as hyper-util's client set it on an HTTP/1 request that has none
    /// (the host, and the port unless it is the scheme's default), made once per app
    /// authority and then shared (formatting it costs two allocations).
    fn host(&self, uri: &Uri) -> Option<HeaderValue> {
        let authority = uri.authority()?;
        let mut cached = self.host.lock().unwrap_or_else(|e| e.into_inner());
        // Compared as written: `Authority`'s own equality ignores case, the header would not.
        if let Some((_, v)) = cached.as_ref().filter(|(a, _)| a.as_str() == authority.as_str()) {
            return Some(v.clone());
        }
        let value = host_value(uri)?;
        *cached = Some((authority.clone(), value.clone()));
        Some(value)
    }
}

/// hyper-util's `Host` for `uri` (`set_host`, `get_non_default_port`).
fn host_value(uri: &Uri) -> Option<HeaderValue> {
    let host = uri.host()?;
    let secure = matches!(uri.scheme_str(), Some("https" | "wss"));
    let port = uri.port().filter(|p| !matches!((p.as_u16(), secure), (443, true) | (80, false)));
    match port {
        Some(p) => HeaderValue::from_str(&format!("{host}:{p}")).ok(),
        None => HeaderValue::from_str(host).ok(),
    }
}

/// The whole response, its body refused past `max_body`.
pub async fn collect(res: Response<Incoming>, max_body: usize) -> Result<AppResponse, AppError> {
    let (parts, body) = res.into_parts();
    let body = Limited::new(body, max_body).collect().await.map_err(|e| {
        if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
            AppError::TooLarge { status: parts.status, limit: max_body }
        } else {
            AppError::Unreachable(format!("reading the response body: {e}"))
        }
    })?;
    Ok(AppResponse { status: parts.status, headers: parts.headers, body: body.to_bytes() })
}

/// `app_url` as a prefix for request paths: scheme, authority and base path, without a
/// trailing slash.
pub fn base_url(app_url: &Uri) -> String {
    let base = app_url.path().trim_end_matches('/');
    format!("{}://{}{}", app_url.scheme_str().unwrap_or("http"), app_url.authority().map(|a| a.as_str()).unwrap_or("127.0.0.1"), base)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_values_match_hyper_utils_default() {
        let host = |u: &str| host_value(&u.parse().unwrap()).map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(host("http://127.0.0.1:8080/x").as_deref(), Some("127.0.0.1:8080"));
        assert_eq!(host("http://app:80/").as_deref(), Some("app"));
        assert_eq!(host("http://App/").as_deref(), Some("App"));
        assert_eq!(host("https://h:443/").as_deref(), Some("h"));
        assert_eq!(host("https://h:80/").as_deref(), Some("h:80"));
        assert_eq!(host("http://[::1]:3000/").as_deref(), Some("[::1]:3000"));
        assert_eq!(host("/relative"), None);
    }

    #[test]
    fn base_urls() {
        assert_eq!(base_url(&"http://127.0.0.1:3000".parse().unwrap()), "http://127.0.0.1:3000");
        assert_eq!(base_url(&"http://app:3000/v1/".parse().unwrap()), "http://app:3000/v1");
    }
}
