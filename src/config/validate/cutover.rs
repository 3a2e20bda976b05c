//! An outbound route's `upstream` and `cutover` on a NATS mode: the HTTP service the
//! route replaces and how calls are shared while it moves over.

use crate::config::diagnostics::{Diagnostics, Table};
use crate::config::raw::{RawCutover, RawOutbound};
use crate::config::values::parse_http_url;
use crate::config::{Cutover, Sticky};

/// The route's cut-over (`None` when it has none, or had errors, all reported). `http`
/// routes take `upstream` as their target and refuse `cutover`; NATS modes take the two
/// together.
pub(super) fn cutover(raw: &RawOutbound, at: Table<'_>, diags: &mut Diagnostics<'_>) -> Option<Cutover> {
    let mode = raw.mode.as_str();
    if mode == "http" {
        if raw.cutover.is_some() {
            diags.error(at, Some("cutover"), "`cutover` does not apply to mode \"http\" (it splits a NATS route with its `upstream`)");
        }
        return None;
    }
    let (upstream, cut) = match (&raw.upstream, &raw.cutover) {
        (None, None) => return None,
        (Some(_), None) => {
            diags.error(
                at,
                Some("upstream"),
                format!("`upstream` on mode \"{mode}\" is the HTTP side of a cut-over: add `cutover = {{ nats_percent = … }}`"),
            );
            return None;
        }
        (None, Some(_)) => {
            diags.error(at, Some("cutover"), "`cutover` needs `upstream` (the HTTP service this route replaces)");
            return None;
        }
        (Some(u), Some(c)) => (u, c),
    };
    let errors_before = diags.error_count();
    let upstream = parse_http_url(upstream).map_err(|e| diags.error(at, Some("upstream"), format!("`upstream`: {e}"))).ok();
    let nats_percent = percent(cut, at, diags);
    let sticky = cut.sticky.as_deref().and_then(|s| sticky(s, at, diags));
    if cut.shadow && matches!(mode, "publish" | "jetstream") {
        diags.error(
            at,
            Some("cutover"),
            format!("`cutover.shadow` does not apply to mode \"{mode}\": its answer is an acknowledgement, not the service's reply, so there is nothing to compare"),
        );
    }
    if cut.shadow_unsafe && !cut.shadow {
        diags.error(at, Some("cutover"), "`cutover.shadow_unsafe` needs `shadow = true`");
    }
    if diags.error_count() > errors_before {
        return None;
    }
    Some(Cutover {
        upstream: upstream?,
        nats_percent: nats_percent?,
        sticky,
        shadow: cut.shadow,
        shadow_unsafe: cut.shadow_unsafe,
        fallback: cut.fallback,
    })
}

fn percent(cut: &RawCutover, at: Table<'_>, diags: &mut Diagnostics<'_>) -> Option<u8> {
    match cut.nats_percent {
        Some(p @ 0..=100) => Some(p as u8),
        Some(p) => {
            diags.error(at, Some("cutover"), format!("`cutover.nats_percent` must be 0 to 100, not {p}"));
            None
        }
        None => {
            diags.error(at, Some("cutover"), "`cutover` needs `nats_percent` (0: all HTTP, 100: all NATS)");
            None
        }
    }
}

/// `header:<name>`: the only key kind so far.
fn sticky(s: &str, at: Table<'_>, diags: &mut Diagnostics<'_>) -> Option<Sticky> {
    let parsed = s.split_once(':').and_then(|(kind, name)| match kind.trim() {
        "header" => http::HeaderName::from_bytes(name.trim().as_bytes()).ok().map(Sticky::Header),
        _ => None,
    });
    if parsed.is_none() {
        diags.error(at, Some("cutover"), format!("`cutover.sticky` {s:?} must be \"header:<Header-Name>\""));
    }
    parsed
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{errors, MINIMAL};
    use crate::config::{parse, Sticky};

    fn route(mode_keys: &str, extra: &str) -> String {
        format!("{MINIMAL}[[outbound]]\nname = \"exec\"\npath = \"/a/{{id}}\"\n{mode_keys}\n{extra}\n")
    }

    const REQUEST: &str = "mode = \"request\"\nsubject = \"a.{id}\"";

    #[test]
    fn a_cutover_parses() {
        let src = route(
            REQUEST,
            "upstream = \"http://agent:3000\"\ncutover = { nats_percent = 10, sticky = \"header:X-Workflow-Id\", shadow = true, fallback = true }",
        );
        let c = parse(&src, "t.toml").unwrap();
        let cut = c.outbound[0].cutover.as_ref().unwrap();
        assert_eq!(cut.nats_percent, 10);
        assert_eq!(cut.sticky, Some(Sticky::Header(http::HeaderName::from_static("x-workflow-id"))));
        assert!(cut.shadow && cut.fallback && !cut.shadow_unsafe);
        assert_eq!(cut.upstream.authority().unwrap().as_str(), "agent:3000");
        assert!(cut.shadows(&http::Method::GET) && !cut.shadows(&http::Method::POST));
    }

    #[test]
    fn each_mistake_is_reported_at_its_line_with_the_route() {
        let cases = [
            ("upstream = \"http://a:1\"", "is the HTTP side of a cut-over"),
            ("cutover = { nats_percent = 5 }", "`cutover` needs `upstream`"),
            ("upstream = \"http://a:1\"\ncutover = { nats_percent = 101 }", "must be 0 to 100, not 101"),
            ("upstream = \"http://a:1\"\ncutover = { shadow = true }", "needs `nats_percent`"),
            ("upstream = \"http://a:1\"\ncutover = { nats_percent = 1, sticky = \"cookie:x\" }", "must be \"header:<Header-Name>\""),
            ("upstream = \"http://a:1\"\ncutover = { nats_percent = 1, shadow_unsafe = true }", "needs `shadow = true`"),
            ("upstream = \"ftp://a:1\"\ncutover = { nats_percent = 1 }", "must be an http:// URL"),
            ("upstream = \"http://a:1\"\ncutover = { nats_percent = 1, bogus = 1 }", "unknown field `bogus`"),
        ];
        for (extra, want) in cases {
            let e = errors(&route(REQUEST, extra));
            assert_eq!(e.len(), 1, "{extra}: {e:#?}");
            assert!(e[0].contains(want) && e[0].contains("route \"exec\""), "{extra}: {}", e[0]);
            // The key's own line, after the 5 lines of the file's head and the route's.
            assert!(e[0].starts_with("t.toml:") && !e[0].starts_with("t.toml:1:"), "{}", e[0]);
        }
    }

    #[test]
    fn shadow_needs_an_answer_to_compare() {
        let e = errors(&route(
            "mode = \"jetstream\"\nsubject = \"a.{id}\"",
            "upstream = \"http://a:1\"\ncutover = { nats_percent = 0, shadow = true }",
        ));
        assert!(e.len() == 1 && e[0].contains("does not apply to mode \"jetstream\""), "{e:#?}");
        let e = errors(&route("mode = \"http\"\nupstream = \"http://a:1\"", "cutover = { nats_percent = 0 }"));
        assert!(e.len() == 1 && e[0].contains("`cutover` does not apply to mode \"http\""), "{e:#?}");
    }
}
