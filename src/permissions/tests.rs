use super::render::{env_name, helm_values, nats_conf, nsc, Password};
use super::*;
use crate::config::parse;

/// A service with every kind of route.
const SERVICE: &str = include_str!("../../tests/fixtures/permissions-orders.toml");

fn perms(src: &str) -> Permissions {
    for_config(&parse(src, "orders.toml").unwrap_or_else(|e| panic!("{e}")))
}

fn has(list: &BTreeMap<String, Vec<String>>, s: &str) -> bool {
    list.contains_key(s)
}

#[test]
fn egress_routes_publish_their_subjects_with_captures_as_one_token() {
    let p = perms(SERVICE);
    assert!(has(&p.publish, "agent.*.execution.requested"), "{:#?}", p.publish);
    assert!(has(&p.publish, "audit.orders"));
    assert!(has(&p.publish, "tool.execution.requested"));
    assert!(has(&p.publish, "$JS.API.STREAM.NAMES"), "the start-up check finds the capturing stream");
    assert!(has(&p.subscribe, "_INBOX.>"), "{:#?}", p.subscribe);
    assert_eq!(template_pattern("a.x{id}.{b}.c"), "a.*.*.c");
}

#[test]
fn ingress_routes_subscribe_in_their_queue_and_answer_under_their_reply_prefixes() {
    let p = perms(SERVICE);
    assert!(has(&p.subscribe, "orders.create orders"), "{:#?}", p.subscribe);
    assert!(has(&p.publish, "_INBOX.>"), "replies to callers: {:#?}", p.publish);
    let custom = perms(&SERVICE.replace("path = \"/orders\"", "path = \"/orders\"\nreply_prefixes = [\"svc.inbox\", \"_INBOX_a.\"]"));
    assert!(has(&custom.publish, "svc.inbox") && has(&custom.publish, "svc.inbox.>") && has(&custom.publish, "_INBOX_a.>"));
}

#[test]
fn jetstream_ingress_gets_its_consumer_acks_dead_letters_and_bucket_and_nothing_wider() {
    let p = perms(SERVICE);
    for s in [
        "$JS.API.STREAM.INFO.ORDERS",
        "$JS.API.CONSUMER.INFO.ORDERS.orders-events",
        "$JS.API.CONSUMER.MSG.NEXT.ORDERS.orders-events",
        "$JS.API.CONSUMER.CREATE.ORDERS.orders-events",
        "$JS.API.CONSUMER.CREATE.ORDERS.orders-events.>",
        "$JS.API.CONSUMER.DURABLE.CREATE.ORDERS.orders-events",
        "$JS.ACK.ORDERS.orders-events.>",
        "$JS.API.STREAM.INFO.DLQ",
        "$KV.natsbridge_idempotency.>",
        "$JS.API.STREAM.INFO.KV_natsbridge_idempotency",
        "$JS.API.DIRECT.GET.KV_natsbridge_idempotency.>",
    ] {
        assert!(has(&p.publish, s), "{s} missing from {:#?}", p.publish);
    }
    assert!(has(&p.publish, "dlq.orders.events"), "the route's dead-letter subject");
    // No wildcard over the API, no deletes, no provisioning when the sidecar does not provision.
    for (s, _) in p.publish.iter().chain(&p.subscribe) {
        assert!(!s.starts_with("$JS.API.>") && !s.contains("DELETE") && !s.contains("STREAM.CREATE") && s != "$JS.API.INFO", "{s}");
        assert!(!s.starts_with("$JS.API.") || !s.contains('*'), "{s}");
    }
}

#[test]
fn provisioning_adds_creating_and_updating_its_streams_only_when_on() {
    let src = format!("{SERVICE}\n[[streams]]\nname = \"ORDERS\"\nsubjects = [\"orders.events.>\"]\n")
        .replace("service = \"orders\"", "service = \"orders\"\nprovision = true");
    let p = perms(&src);
    for s in ["ORDERS", "DLQ", "KV_natsbridge_idempotency"] {
        assert!(has(&p.publish, &format!("$JS.API.STREAM.CREATE.{s}")), "{s}: {:#?}", p.publish);
        assert!(has(&p.publish, &format!("$JS.API.STREAM.UPDATE.{s}")), "{s}");
    }
    assert!(has(&p.publish, "$JS.API.INFO"));
    assert!(!p.publish.keys().any(|s| s.contains("DELETE")));
}

#[test]
fn referenced_streams_are_only_read_when_provisioning() {
    let src = format!("{SERVICE}\n[[streams]]\nname = \"ORDERS\"\nreference = true\n\n[dead_letter]\nreference = true\n")
        .replace("service = \"orders\"", "service = \"orders\"\nprovision = true");
    let p = perms(&src);
    for s in ["ORDERS", "DLQ"] {
        assert!(has(&p.publish, &format!("$JS.API.STREAM.INFO.{s}")), "{s}: {:#?}", p.publish);
        assert!(!has(&p.publish, &format!("$JS.API.STREAM.CREATE.{s}")), "{s}");
        assert!(!has(&p.publish, &format!("$JS.API.STREAM.UPDATE.{s}")), "{s}");
    }
    assert!(has(&p.publish, "$JS.API.STREAM.UPDATE.KV_natsbridge_idempotency"));
}

#[test]
fn a_private_inbox_prefix_replaces_the_shared_one_and_drops_the_note() {
    let shared = perms(SERVICE);
    assert!(shared.notes.iter().any(|n| n.contains("inbox_prefix")));
    let own = perms(&format!("[nats]\ninbox_prefix = \"_INBOX_orders\"\n{SERVICE}"));
    assert!(has(&own.subscribe, "_INBOX_orders.>") && !has(&own.subscribe, "_INBOX.>"), "{:#?}", own.subscribe);
    assert!(own.notes.is_empty());
}

#[test]
fn covered_subjects_are_folded_into_the_wider_one_with_their_reasons() {
    let mut l = BTreeMap::new();
    for (s, why) in [("a.>", "w"), ("a.b", "n"), ("a.*", "m"), ("a.b q", "queue"), ("$JS.ACK.S.d.>", "x")] {
        l.insert(s.to_owned(), vec![why.to_owned()]);
    }
    simplify(&mut l);
    assert_eq!(l.keys().cloned().collect::<Vec<_>>(), ["$JS.ACK.S.d.>", "a.>", "a.b q"]);
    let mut reasons = l["a.>"].clone();
    reasons.sort();
    assert_eq!(reasons, ["m", "n", "w"]);
}

#[test]
fn the_nats_conf_block_has_one_user_per_service_with_quoted_subjects_and_the_password_source() {
    let p = vec![("orders.toml".to_owned(), perms(SERVICE))];
    let conf = nats_conf(&p, &Password::Env("NATS_PASSWORD_{SERVICE}".into()));
    assert!(conf.contains("authorization {\n  users = [\n"), "{conf}");
    assert!(conf.contains("user: \"orders\"\n      password: $NATS_PASSWORD_ORDERS\n"), "{conf}");
    assert!(conf.contains("\"$JS.ACK.ORDERS.orders-events.>\"  # route events (jetstream): acks"), "{conf}");
    assert!(conf.contains("\"orders.create orders\"  # route create (request)"), "{conf}");
    assert!(nats_conf(&p, &Password::Placeholder).contains("password: \"REPLACE-ME-orders\""));
    assert_eq!(env_name("P_{SERVICE}", "tool-service.v2"), "P_TOOL_SERVICE_V2");
}

#[test]
fn nsc_output_adds_and_edits_the_user_with_single_quoted_subjects() {
    let out = nsc(&[("orders.toml".to_owned(), perms(SERVICE))], Some("APP"));
    assert!(out.contains("nsc add user --account 'APP' --name 'orders'\n"), "{out}");
    assert!(out.contains("nsc edit user --account 'APP' --name 'orders' \\\n  --allow-pub "), "{out}");
    assert!(out.contains("  --allow-pub '$JS.ACK.ORDERS.orders-events.>'"), "{out}");
    assert!(out.contains("  --allow-sub 'orders.create orders'"), "{out}");
    assert!(!out.contains("password"));
}

#[test]
fn helm_values_nest_each_service_under_nats_auth_users_with_json_quoted_subjects_and_no_password() {
    let ingress_only = "[sidecar]\nservice = \"sink\"\n[nats]\ninbox_prefix = \"_INBOX_sink\"\n";
    let p = vec![("orders.toml".to_owned(), perms(SERVICE)), ("sink.toml".to_owned(), perms(ingress_only))];
    let out = helm_values(&p);
    assert!(out.contains("nats:\n  auth:\n    users:\n      # service \"orders\" (orders.toml)\n"), "{out}");
    assert!(
        out.contains(
            "      \"orders\":\n        publish:\n          - \"$JS.ACK.ORDERS.orders-events.>\"  # route events (jetstream): acks\n"
        ),
        "{out}"
    );
    assert!(out.contains("        subscribe:\n          - \"$SRV.*\"  # NATS micro discovery"), "{out}");
    assert!(out.contains("          - \"_INBOX.>\"  # replies"), "{out}");
    assert!(out.contains("          - \"orders.create orders\"  # route create (request)\n"), "{out}");
    assert!(out.contains("      # note: replies come back on the shared _INBOX.>"), "{out}");
    // A service that publishes nothing gets an empty list, which the chart turns into deny-all.
    assert!(out.contains("      \"sink\":\n        publish: []\n        subscribe:\n          - \"_INBOX_sink.>\""), "{out}");
    assert!(!out.to_ascii_lowercase().contains("password:"), "{out}");
}

#[test]
fn request_routes_may_cancel_streamed_replies_and_use_the_operations_bucket() {
    let p = perms(SERVICE);
    let r = p.responses.as_ref().expect("a request route reads streamed replies");
    // One cancel per stream message, for as long as the stream may go quiet and then some.
    assert_eq!((r.max, r.expires), (1, Duration::from_secs(30) + CANCEL_SLACK));
    assert!(r.why.iter().any(|w| w.contains("route agent-exec") && w.contains("Bridge-Stream-Control")), "{r:?}");
    let slow = perms(
        &SERVICE
            .replace("subject = \"agent.{id}.execution.requested\"", "subject = \"agent.{id}.execution.requested\"\nstream_stall = \"2m\""),
    );
    assert_eq!(slow.responses.unwrap().expires, Duration::from_secs(120) + CANCEL_SLACK, "the longest stall wins");
    for s in [
        "$KV.natsbridge_operations.>",
        "$JS.API.STREAM.INFO.KV_natsbridge_operations",
        "$JS.API.DIRECT.GET.KV_natsbridge_operations.>",
        "$JS.API.CONSUMER.CREATE.KV_natsbridge_operations.>",
    ] {
        assert!(has(&p.publish, s), "{s} missing from {:#?}", p.publish);
    }
    // Created by provisioning only.
    assert!(!has(&p.publish, "$JS.API.STREAM.CREATE.KV_natsbridge_operations"));
    let prov = perms(&SERVICE.replace("service = \"orders\"", "service = \"orders\"\nprovision = true"));
    assert!(has(&prov.publish, "$JS.API.STREAM.CREATE.KV_natsbridge_operations"), "{:#?}", prov.publish);
    // Without request or tunnel routes: neither.
    let events = perms("[sidecar]\nservice = \"e\"\n[[outbound]]\nname = \"a\"\npath = \"/a\"\nmode = \"publish\"\nsubject = \"a\"\n");
    assert!(events.responses.is_none() && !events.publish.keys().any(|s| s.contains("natsbridge_operations")), "{events:#?}");
}

#[test]
fn the_response_permission_is_rendered_in_every_format() {
    let p = vec![("orders.toml".to_owned(), perms(SERVICE))];
    let conf = nats_conf(&p, &Password::Placeholder);
    assert!(conf.contains("        allow_responses: { max: 1, expires: \"60s\" }\n      }\n"), "{conf}");
    let out = nsc(&p, None);
    assert!(out.contains(" \\\n  --allow-pub-response 1 --response-ttl 60s\n"), "{out}");
    let values = helm_values(&p);
    assert!(values.contains("        responses: { max: 1, expires: \"60s\" }\n"), "{values}");
}
