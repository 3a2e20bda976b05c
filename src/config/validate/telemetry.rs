//! The `[telemetry]` section.

use super::duration;
use crate::config::diagnostics::{Diagnostics, TableStart};
use crate::config::raw::RawTelemetry;
use crate::config::telemetry::{DEFAULT_EXPORT_TIMEOUT, TRACES_PATH};
use crate::config::values::parse_http_url;
use crate::config::Telemetry;

/// `None` when `otlp_endpoint` is unusable (reported).
pub(super) fn telemetry(raw: RawTelemetry, start: TableStart, service: &str, diags: &mut Diagnostics<'_>) -> Option<Telemetry> {
    let at = start.unnamed();
    let traces_url = match parse_http_url(&raw.otlp_endpoint) {
        Ok(url) => Some(traces_url(&url)),
        Err(e) => {
            // Plain HTTP only: the exporter has no TLS stack of its own; a collector agent
            // on the node or in the pod is the usual endpoint.
            diags.error(
                at,
                Some("otlp_endpoint"),
                format!("`otlp_endpoint`: {e} (an OTLP/HTTP collector, like \"http://otel-collector:4318\")"),
            );
            None
        }
    };
    let sample_ratio = raw.sample_ratio.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&sample_ratio) {
        diags.error(at, Some("sample_ratio"), format!("`sample_ratio` must be between 0 and 1, not {sample_ratio}"));
    }
    let service_name = raw.service_name.unwrap_or_else(|| service.to_owned());
    if service_name.trim().is_empty() {
        diags.error(at, Some("service_name"), "`service_name` must not be empty");
    }
    let export_timeout = duration(at, "export_timeout", &raw.export_timeout, DEFAULT_EXPORT_TIMEOUT, diags);
    if export_timeout.is_zero() {
        diags.error(at, Some("export_timeout"), "`export_timeout` must be more than 0");
    }
    Some(Telemetry { traces_url: traces_url?, service_name, sample_ratio, export_timeout })
}

/// `http://collector:4318` → `http://collector:4318/v1/traces`; a URL already ending in
/// `/v1/traces` is kept.
fn traces_url(url: &http::Uri) -> http::Uri {
    let path = url.path().trim_end_matches('/');
    if path.ends_with(TRACES_PATH) {
        return url.clone();
    }
    let authority = url.authority().map(|a| a.as_str()).unwrap_or_default();
    format!("http://{authority}{path}{TRACES_PATH}").parse().unwrap_or_else(|_| url.clone())
}

#[cfg(test)]
mod tests {
    use crate::config::parse;
    use crate::config::test_support::{errors, MINIMAL};

    #[test]
    fn no_section_no_telemetry() {
        assert!(parse(MINIMAL, "t.toml").unwrap().telemetry.is_none());
    }

    #[test]
    fn the_endpoint_gets_the_traces_path_and_the_service_is_the_default_name() {
        let c = parse(&format!("{MINIMAL}[telemetry]\notlp_endpoint = \"http://collector:4318\"\n"), "t.toml").unwrap();
        let t = c.telemetry.unwrap();
        assert_eq!(t.traces_url.to_string(), "http://collector:4318/v1/traces");
        assert_eq!(t.service_name, "orchestration");
        assert_eq!((t.sample_ratio, t.export_timeout), (1.0, super::DEFAULT_EXPORT_TIMEOUT));
        let src = format!(
            "{MINIMAL}[telemetry]\notlp_endpoint = \"http://c:4318/otlp/v1/traces/\"\nservice_name = \"orders-sidecar\"\nsample_ratio = 0.25\nexport_timeout = \"2s\"\n"
        );
        let t = parse(&src, "t.toml").unwrap().telemetry.unwrap();
        assert_eq!(t.traces_url.to_string(), "http://c:4318/otlp/v1/traces/");
        assert_eq!((t.service_name.as_str(), t.sample_ratio), ("orders-sidecar", 0.25));
        assert_eq!(t.export_timeout, std::time::Duration::from_secs(2));
    }

    #[test]
    fn every_bad_key_is_reported_at_its_line() {
        let src =
            format!("{MINIMAL}\n[telemetry]\notlp_endpoint = \"https://collector:4318\"\nsample_ratio = 1.5\nexport_timeout = \"0s\"\n");
        let e = errors(&src);
        assert_eq!(e.len(), 3, "{e:#?}");
        assert!(e[0].starts_with("t.toml:5: `otlp_endpoint`"), "{}", e[0]);
        assert!(e[1].starts_with("t.toml:6: `sample_ratio` must be between 0 and 1"), "{}", e[1]);
        assert!(e[2].starts_with("t.toml:7: `export_timeout` must be more than 0"), "{}", e[2]);
    }

    #[test]
    fn unknown_keys_and_a_missing_endpoint_are_refused() {
        let e = errors(&format!("{MINIMAL}[telemetry]\notlp_endpoint = \"http://c:4318\"\nendpoint = \"x\"\n"));
        assert_eq!(e.len(), 1, "{e:#?}");
        assert!(e[0].starts_with("t.toml:5: [telemetry]: unknown field `endpoint`"), "{}", e[0]);
        let e = errors(&format!("{MINIMAL}[telemetry]\nservice_name = \"x\"\n"));
        assert_eq!(e.len(), 1, "{e:#?}");
        assert!(e[0].contains("missing field `otlp_endpoint`"), "{}", e[0]);
    }
}
