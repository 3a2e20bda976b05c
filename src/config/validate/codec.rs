//! `codec` and `pattern` on a route: which wire format it speaks, and for NestJS the
//! pattern that names its subject.

use super::refuse_key;
use crate::config::diagnostics::{Diagnostics, Table};
use crate::config::raw::{RawInbound, RawOutbound};
use crate::config::{CloudEventsRoute, Codec, InboundModeName};
use crate::subject::{SubjectPattern, SubjectTemplate};

fn parse(codec: Option<&str>, at: Table<'_>, diags: &mut Diagnostics<'_>) -> Codec {
    match codec {
        None | Some("raw") => Codec::Raw,
        Some("nestjs") => Codec::NestJs,
        Some("cloudevents") => Codec::CloudEvents,
        Some(other) => {
            diags.error(at, Some("codec"), format!("unknown codec {other:?}; expected \"raw\", \"nestjs\" or \"cloudevents\""));
            Codec::Raw
        }
    }
}

/// An outbound route's codec and NestJS pattern. `nestjs` applies to the NATS modes that
/// carry a body as a packet: request, publish and jetstream.
pub(super) fn outbound(raw: &RawOutbound, at: Table<'_>, diags: &mut Diagnostics<'_>) -> (Codec, Option<serde_json::Value>) {
    let codec = parse(raw.codec.as_deref(), at, diags);
    if codec != Codec::Raw && !matches!(raw.mode.as_str(), "request" | "publish" | "jetstream") {
        diags.error(at, Some("codec"), format!("codec {:?} does not apply to mode {:?}", codec.as_str(), raw.mode));
    }
    let Some(p) = &raw.pattern else { return (codec, None) };
    refuse_key(at, codec.as_str(), "pattern", codec != Codec::NestJs, diags);
    match serde_json::to_value(p) {
        Ok(v) if v.is_string() || v.is_object() => (codec, Some(v)),
        _ => {
            diags.error(at, Some("pattern"), "`pattern` must be a string or a table, e.g. { cmd = \"sum\" }");
            (codec, None)
        }
    }
}

/// The subject a NestJS `pattern` stands for (Nest's normalised text, taken literally).
pub(super) fn pattern_subject(p: &toml::Value, has_subject: bool, at: Table<'_>, diags: &mut Diagnostics<'_>) -> Option<SubjectTemplate> {
    if has_subject {
        diags.error(at, Some("pattern"), "set `pattern` or `subject`, not both: the pattern names the subject");
        return None;
    }
    let v = serde_json::to_value(p).ok()?;
    let subject = crate::codec::nestjs::normalize_pattern(&v);
    SubjectTemplate::literal(&subject)
        .map_err(|e| {
            diags.error(at, Some("pattern"), format!("`pattern` gives the subject {subject:?}, which is not a valid NATS subject: {e}"))
        })
        .ok()
}

/// An inbound route's `pattern`: the subject it subscribes to is Nest's normalised text of
/// it, exactly what a `ClientProxy` sending that pattern publishes on (so `{ cmd = "sum" }`
/// and `'{"cmd":"sum"}'` are the same route).
pub(super) fn inbound_pattern(
    p: &toml::Value,
    raw: &RawInbound,
    at: Table<'_>,
    diags: &mut Diagnostics<'_>,
) -> Option<(String, Option<SubjectPattern>)> {
    let codec = raw.codec.as_deref().unwrap_or("raw");
    refuse_key(at, codec, "pattern", codec != "nestjs", diags);
    if raw.subject.is_some() {
        diags.error(at, Some("pattern"), "set `pattern` or `subject`, not both: the pattern names the subject");
        return None;
    }
    let v = serde_json::to_value(p).ok().filter(|v| v.is_string() || v.is_object());
    let Some(v) = v else {
        diags.error(at, Some("pattern"), "`pattern` must be a string or a table, e.g. { cmd = \"sum\" }");
        return None;
    };
    let text = crate::codec::nestjs::normalize_pattern(&v);
    let parsed = SubjectPattern::parse(&text)
        .map_err(|e| {
            diags.error(at, Some("pattern"), format!("`pattern` gives the subject {text:?}, which is not a valid NATS subject: {e}"))
        })
        .ok();
    Some((text, parsed))
}

/// An inbound route's codec: `nestjs` on request and jetstream routes.
pub(super) fn inbound(codec: Option<&str>, mode: InboundModeName, at: Table<'_>, diags: &mut Diagnostics<'_>) -> Codec {
    let codec = parse(codec, at, diags);
    if codec != Codec::Raw && mode == InboundModeName::Tunnel {
        diags.error(at, Some("codec"), format!("codec {:?} does not apply to mode \"tunnel\"", codec.as_str()));
    }
    codec
}

/// `codec = "cloudevents"` on an outbound route: the source and type of the events made
/// from plain requests; `ce_type` belongs to that codec only.
pub(super) fn cloudevents(
    raw: &RawOutbound,
    codec: Codec,
    service: &str,
    at: Table<'_>,
    diags: &mut Diagnostics<'_>,
) -> Option<CloudEventsRoute> {
    if codec != Codec::CloudEvents {
        refuse_key(at, codec.as_str(), "ce_type", raw.ce_type.is_some(), diags);
        return None;
    }
    if raw.ce_type.as_deref().is_some_and(str::is_empty) {
        diags.error(at, Some("ce_type"), "`ce_type` must not be empty");
    }
    Some(CloudEventsRoute { source: format!("/{service}/{}", raw.name), kind: raw.ce_type.clone() })
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{errors, MINIMAL};
    use crate::config::Codec;

    #[test]
    fn nestjs_patterns_name_the_subject() {
        let src = format!(
            "{MINIMAL}[[outbound]]\nname = \"sum\"\npath = \"/sum\"\nmode = \"request\"\ncodec = \"nestjs\"\npattern = {{ role = \"math\", cmd = \"sum\" }}\n\
             [[outbound]]\nname = \"ev\"\npath = \"/ev\"\nmode = \"publish\"\ncodec = \"nestjs\"\nsubject = \"user.created\"\n"
        );
        let c = crate::config::parse(&src, "t").unwrap();
        assert_eq!(c.outbound[0].codec, Codec::NestJs);
        let crate::config::OutboundTarget::Request(t) = &c.outbound[0].target else { panic!() };
        assert_eq!(t.as_str(), r#"{"cmd":"sum","role":"math"}"#);
        assert_eq!(c.outbound[1].pattern, None);
    }

    #[test]
    fn an_inbound_pattern_subscribes_to_its_normalised_subject() {
        let src = format!(
            "{MINIMAL}[[inbound]]\nname = \"sum\"\nmode = \"request\"\npath = \"/sum\"\ncodec = \"nestjs\"\npattern = {{ role = \"math\", cmd = \"sum\" }}\n\
             [[inbound]]\nname = \"ev\"\nmode = \"request\"\npath = \"/ev\"\ncodec = \"nestjs\"\npattern = \"user.created\"\n"
        );
        let c = crate::config::parse(&src, "t").unwrap();
        assert_eq!(c.inbound[0].subject.as_str(), r#"{"cmd":"sum","role":"math"}"#);
        assert_eq!(c.inbound[1].subject.as_str(), "user.created");
        let bad = format!(
            "{MINIMAL}[[inbound]]\nname = \"a\"\nmode = \"request\"\npath = \"/a\"\npattern = \"a\"\n\
             [[inbound]]\nname = \"b\"\nmode = \"request\"\npath = \"/b\"\ncodec = \"nestjs\"\npattern = \"b\"\nsubject = \"b\"\n\
             [[inbound]]\nname = \"c\"\nmode = \"request\"\npath = \"/c\"\ncodec = \"nestjs\"\npattern = 3\n"
        );
        let e = errors(&bad);
        assert!(e.iter().any(|m| m.contains("\"a\"") && m.contains("`pattern` does not apply to mode \"raw\"")), "{e:#?}");
        assert!(e.iter().any(|m| m.contains("\"b\"") && m.contains("not both")), "{e:#?}");
        assert!(e.iter().any(|m| m.contains("\"c\"") && m.contains("string or a table")), "{e:#?}");
    }

    #[test]
    fn codec_mistakes_are_reported() {
        let src = format!(
            "{MINIMAL}[[outbound]]\nname = \"a\"\npath = \"/a\"\nmode = \"request\"\ncodec = \"avro\"\nsubject = \"a\"\n\
             [[outbound]]\nname = \"b\"\npath = \"/b\"\nmode = \"request\"\npattern = \"b\"\nsubject = \"b\"\n\
             [[outbound]]\nname = \"c\"\npath = \"/c\"\nmode = \"request\"\ncodec = \"nestjs\"\npattern = \"c d\"\n\
             [[outbound]]\nname = \"d\"\npath = \"/d\"\nmode = \"tunnel\"\nservice = \"x\"\ncodec = \"nestjs\"\n\
             [[inbound]]\nname = \"e\"\nmode = \"tunnel\"\ncodec = \"nestjs\"\n"
        );
        let e = errors(&src);
        assert!(e.iter().any(|m| m.contains("\"a\"") && m.contains("unknown codec \"avro\"")), "{e:#?}");
        assert!(e.iter().any(|m| m.contains("\"b\"") && m.contains("`pattern` does not apply to mode \"raw\"")), "{e:#?}");
        assert!(e.iter().any(|m| m.contains("\"b\"") && m.contains("not both")), "{e:#?}");
        assert!(e.iter().any(|m| m.contains("\"c\"") && m.contains("not a valid NATS subject")), "{e:#?}");
        assert!(e.iter().any(|m| m.contains("\"d\"") && m.contains("does not apply to mode \"tunnel\"")), "{e:#?}");
        assert!(e.iter().any(|m| m.contains("\"e\"") && m.contains("does not apply to mode \"tunnel\"")), "{e:#?}");
    }

    #[test]
    fn cloudevents_routes_get_their_source_and_type() {
        let src = format!(
            "{MINIMAL}[[outbound]]\nname = \"ev\"\npath = \"/ev\"\nmode = \"jetstream\"\nsubject = \"ev\"\ncodec = \"cloudevents\"\nce_type = \"com.x.ev\"\n\
             [[outbound]]\nname = \"plain\"\npath = \"/p\"\nmode = \"publish\"\nsubject = \"p\"\ncodec = \"cloudevents\"\n\
             [[inbound]]\nname = \"in\"\nsubject = \"ev\"\nmode = \"request\"\npath = \"/in\"\ncodec = \"cloudevents\"\n"
        );
        let c = crate::config::parse(&src, "t").unwrap();
        let ce = c.outbound[0].cloudevents.as_ref().unwrap();
        assert_eq!((ce.source.as_str(), ce.kind.as_deref()), ("/orchestration/ev", Some("com.x.ev")));
        assert_eq!(c.outbound[1].cloudevents.as_ref().unwrap().kind, None);
        assert_eq!(c.inbound[0].codec, Codec::CloudEvents);
        let bad = format!(
            "{MINIMAL}[[outbound]]\nname = \"a\"\npath = \"/a\"\nmode = \"publish\"\nsubject = \"a\"\nce_type = \"x\"\n\
             [[outbound]]\nname = \"b\"\npath = \"/b\"\nmode = \"tunnel\"\nservice = \"x\"\ncodec = \"cloudevents\"\n\
             [[inbound]]\nname = \"c\"\nmode = \"tunnel\"\ncodec = \"cloudevents\"\n"
        );
        let e = errors(&bad);
        assert!(e.iter().any(|m| m.contains("\"a\"") && m.contains("`ce_type` does not apply to mode \"raw\"")), "{e:#?}");
        assert!(e.iter().any(|m| m.contains("\"b\"") && m.contains("codec \"cloudevents\" does not apply to mode \"tunnel\"")), "{e:#?}");
        assert!(e.iter().any(|m| m.contains("\"c\"") && m.contains("codec \"cloudevents\" does not apply")), "{e:#?}");
    }
}
