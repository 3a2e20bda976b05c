//! `natsbridge graph FILE…`: the event flows of many services' routing files as one graph,
//! who requests, publishes or consumes each subject, through which stream, with dead-letter
//! edges and each edge's mode, codec and contract versions; and the flow's loose ends.
//!
//! - this file: the model ([`Graph`], built by [`Graph::build`]) and the loose ends;
//! - [`render`]: Mermaid, DOT, SVG (laid out in-process by `layout-rs`) and JSON.
//!
//! Pure: it reads validated [`Config`]s, never NATS.

pub mod render;

use std::collections::BTreeMap;

use serde::Serialize;

use crate::config::{Config, InboundMode, OutboundTarget};

/// What a node stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeKind {
    Service,
    Subject,
    Stream,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Node {
    /// Unique, and a valid identifier in Mermaid and DOT.
    pub id: String,
    pub kind: NodeKind,
    pub label: String,
}

/// What an edge stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EdgeKind {
    /// A service sends on a subject (request, publish, jetstream, tunnel).
    Produces,
    /// A service receives from a subject (core subscription) or a stream (consumer).
    Consumes,
    /// A stream stores a subject.
    Stores,
    /// A consumer's given-up messages go to its dead-letter subject.
    DeadLetter,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Edge {
    pub from: String,
    pub to: String,
    pub kind: EdgeKind,
    /// The route's mode (`request`, `publish`, `jetstream`, `tunnel`), when a route made it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub codec: Option<String>,
    /// The route, as `<service>/<route>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// Contract versions (`<name>/v<N>`) the route checks.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub schemas: Vec<String>,
}

impl Edge {
    /// `mode · codec · schemas`, what the pictures write on the edge.
    pub fn label(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        match self.kind {
            EdgeKind::Stores => return "stored".into(),
            EdgeKind::DeadLetter => return "dead letter".into(),
            _ => {}
        }
        parts.extend(self.mode.clone());
        parts.extend(self.codec.clone().filter(|c| c != "raw"));
        if !self.schemas.is_empty() {
            parts.push(self.schemas.join(", "));
        }
        parts.join(" · ")
    }
}

/// A producer and a consumer of one subject that check different contract versions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SchemaMismatch {
    pub subject: String,
    pub producer: String,
    pub produces: Vec<String>,
    pub consumer: String,
    pub accepts: Vec<String>,
}

/// The flow's loose ends.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LooseEnds {
    /// Subjects sent on that no route consumes.
    pub unconsumed: Vec<String>,
    /// Subjects consumed that no route produces.
    pub unproduced: Vec<String>,
    /// Declared streams no route consumes (the dead-letter stream aside).
    pub streams_without_consumer: Vec<String>,
    /// Producer and consumer routes whose contract versions disagree.
    pub schema_mismatches: Vec<SchemaMismatch>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Graph {
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
    pub loose_ends: LooseEnds,
}

/// One route's end of a subject, for matching producers with consumers.
struct End {
    subject: String,
    route: String,
    schemas: Vec<String>,
}

/// Do two subjects (wildcards allowed, `{capture}` tokens counting as `*`) share a subject?
pub fn overlaps(a: &str, b: &str) -> bool {
    let token = |t: &str| if t.contains('{') { "*".to_owned() } else { t.to_owned() };
    let a: Vec<String> = a.split('.').map(token).collect();
    let b: Vec<String> = b.split('.').map(token).collect();
    for i in 0..a.len().max(b.len()) {
        match (a.get(i).map(String::as_str), b.get(i).map(String::as_str)) {
            (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some(x), Some(y)) if x == "*" || y == "*" || x == y => {}
            _ => return false,
        }
    }
    true
}

#[derive(Default)]
struct Builder {
    nodes: BTreeMap<String, Node>,
    edges: Vec<Edge>,
    producers: Vec<End>,
    consumers: Vec<End>,
    /// Stream name → the subjects it captures (declared in any file).
    streams: BTreeMap<String, Vec<String>>,
    consumed_streams: Vec<String>,
    dead_letter_streams: Vec<String>,
}

impl Builder {
    fn node(&mut self, kind: NodeKind, label: &str) -> String {
        let prefix = match kind {
            NodeKind::Service => "svc",
            NodeKind::Subject => "subj",
            NodeKind::Stream => "stream",
        };
        let mut id = format!("{prefix}_");
        id.extend(label.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }));
        // Two labels that clean to one id (`a.b` and `a_b`) stay two nodes.
        let mut unique = id.clone();
        let mut n = 1;
        while self.nodes.get(&unique).is_some_and(|x| x.label != label || x.kind != kind) {
            n += 1;
            unique = format!("{id}_{n}");
        }
        self.nodes.entry(unique.clone()).or_insert_with(|| Node { id: unique.clone(), kind, label: label.to_owned() });
        unique
    }

    fn edge(&mut self, from: String, to: String, kind: EdgeKind, route: Option<(&str, &str, &str, &str)>, schemas: Vec<String>) {
        let (mode, codec, route) = match route {
            Some((service, name, mode, codec)) => (Some(mode.to_owned()), Some(codec.to_owned()), Some(format!("{service}/{name}"))),
            None => (None, None, None),
        };
        let e = Edge { from, to, kind, mode, codec, route, schemas };
        if !self.edges.contains(&e) {
            self.edges.push(e);
        }
    }

    fn file(&mut self, c: &Config) {
        let service = c.sidecar.service.as_str();
        let svc = self.node(NodeKind::Service, service);
        for s in c.streams.iter().filter(|s| !s.reference) {
            self.streams.entry(s.name.clone()).or_default().extend(s.subjects.iter().map(|p| p.as_str().to_owned()));
        }
        if !c.dead_letter.reference {
            let subjects = c.dead_letter.subjects.iter().map(|p| p.as_str().to_owned());
            self.streams.entry(c.dead_letter.stream.clone()).or_default().extend(subjects);
        }
        self.dead_letter_streams.push(c.dead_letter.stream.clone());
        for r in &c.outbound {
            let subject = match &r.target {
                OutboundTarget::Request(t) | OutboundTarget::Publish(t) | OutboundTarget::JetStream(t) => t.as_str().to_owned(),
                OutboundTarget::Tunnel { subject, .. } => subject.clone(),
                OutboundTarget::Http { .. } => continue,
                // The app reads the subject (as a live SSE stream): it consumes it.
                OutboundTarget::Subscribe(sub) => {
                    let route = (service, r.name.as_str(), r.mode().as_str(), r.codec.as_str());
                    let from = self.node(NodeKind::Subject, sub.subject.as_str());
                    self.edge(from, svc.clone(), EdgeKind::Consumes, Some(route), Vec::new());
                    continue;
                }
            };
            let schemas = r.schema.as_ref().map(|s| s.ids()).unwrap_or_default();
            let to = self.node(NodeKind::Subject, &subject);
            let route = (service, r.name.as_str(), r.mode().as_str(), r.codec.as_str());
            self.edge(svc.clone(), to, EdgeKind::Produces, Some(route), schemas.clone());
            self.producers.push(End { subject, route: format!("{service}/{}", r.name), schemas });
        }
        for r in &c.inbound {
            let subject = r.subject.as_str().to_owned();
            let schemas = r.schema.as_ref().map(|s| s.ids()).unwrap_or_default();
            let route = (service, r.name.as_str(), r.mode_name().as_str(), r.codec.as_str());
            let from = self.node(NodeKind::Subject, &subject);
            match &r.mode {
                InboundMode::JetStream(consumer) => {
                    let stream = self.node(NodeKind::Stream, &consumer.stream);
                    self.edge(from, stream.clone(), EdgeKind::Stores, None, Vec::new());
                    self.edge(stream, svc.clone(), EdgeKind::Consumes, Some(route), schemas.clone());
                    self.consumed_streams.push(consumer.stream.clone());
                    let dlq = self.node(NodeKind::Subject, &consumer.dead_letter);
                    self.edge(svc.clone(), dlq.clone(), EdgeKind::DeadLetter, Some(route), Vec::new());
                    let dlq_stream = self.node(NodeKind::Stream, &c.dead_letter.stream);
                    self.edge(dlq, dlq_stream, EdgeKind::Stores, None, Vec::new());
                }
                _ => self.edge(from, svc.clone(), EdgeKind::Consumes, Some(route), schemas.clone()),
            }
            self.consumers.push(End { subject, route: format!("{service}/{}", r.name), schemas });
        }
    }

    /// Producers' subjects stored by a declared stream get their `stored` edge too.
    fn stored_subjects(&mut self) {
        let streams: Vec<(String, Vec<String>)> = self.streams.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let produced: Vec<String> = self.producers.iter().map(|p| p.subject.clone()).collect();
        for subject in produced {
            for (stream, captured) in &streams {
                if captured.iter().any(|c| overlaps(c, &subject)) && !self.dead_letter_streams.contains(stream) {
                    let from = self.node(NodeKind::Subject, &subject);
                    let to = self.node(NodeKind::Stream, stream);
                    self.edge(from, to, EdgeKind::Stores, None, Vec::new());
                }
            }
        }
    }

    fn loose_ends(&self) -> LooseEnds {
        let mut l = LooseEnds::default();
        for p in &self.producers {
            if !self.consumers.iter().any(|c| overlaps(&p.subject, &c.subject)) && !l.unconsumed.contains(&p.subject) {
                l.unconsumed.push(p.subject.clone());
            }
        }
        for c in &self.consumers {
            if !self.producers.iter().any(|p| overlaps(&p.subject, &c.subject)) && !l.unproduced.contains(&c.subject) {
                l.unproduced.push(c.subject.clone());
            }
        }
        for stream in self.streams.keys() {
            if !self.consumed_streams.contains(stream) && !self.dead_letter_streams.contains(stream) {
                l.streams_without_consumer.push(stream.clone());
            }
        }
        for p in self.producers.iter().filter(|p| !p.schemas.is_empty()) {
            for c in self.consumers.iter().filter(|c| !c.schemas.is_empty() && overlaps(&p.subject, &c.subject)) {
                // Every version the producer may send must be one the consumer accepts.
                if p.schemas.iter().any(|v| !c.schemas.contains(v)) {
                    l.schema_mismatches.push(SchemaMismatch {
                        subject: p.subject.clone(),
                        producer: p.route.clone(),
                        produces: p.schemas.clone(),
                        consumer: c.route.clone(),
                        accepts: c.schemas.clone(),
                    });
                }
            }
        }
        l
    }
}

impl Graph {
    /// The flows of every routing file together.
    pub fn build(configs: &[Config]) -> Graph {
        let mut b = Builder::default();
        for c in configs {
            b.file(c);
        }
        b.stored_subjects();
        let loose_ends = b.loose_ends();
        Graph { nodes: b.nodes.into_values().collect(), edges: b.edges, loose_ends }
    }

    pub fn node(&self, id: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// The loose ends as lines for a terminal; empty when there are none.
    pub fn loose_end_lines(&self) -> Vec<String> {
        let l = &self.loose_ends;
        let mut out = Vec::new();
        out.extend(l.unconsumed.iter().map(|s| format!("warning: {s:?} is sent on but no route consumes it")));
        out.extend(l.unproduced.iter().map(|s| format!("warning: {s:?} is consumed but no route produces it")));
        out.extend(l.streams_without_consumer.iter().map(|s| format!("warning: stream {s:?} has no consumer")));
        out.extend(l.schema_mismatches.iter().map(|m| {
            format!(
                "error: {:?}: {} sends {} but {} accepts {}",
                m.subject,
                m.producer,
                m.produces.join(", "),
                m.consumer,
                m.accepts.join(", ")
            )
        }));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_overlap_by_nats_rules() {
        assert!(overlaps("a.b", "a.b"));
        assert!(overlaps("a.{x}", "a.b"));
        assert!(overlaps("a.*", "a.b"));
        assert!(overlaps("a.>", "a.b.c"));
        assert!(overlaps("a.b.c", "a.>"));
        assert!(!overlaps("a.>", "a"));
        assert!(!overlaps("a.b", "a.c"));
        assert!(!overlaps("a.b", "a.b.c"));
        assert!(!overlaps("a.*", "a.b.c"));
    }

    fn config(src: &str) -> Config {
        crate::config::parse(src, "t.toml").unwrap()
    }

    #[test]
    fn producers_streams_consumers_and_loose_ends() {
        let shop = config(
            "[sidecar]\nservice = \"shop\"\n[[streams]]\nname = \"ORDERS\"\nsubjects = [\"orders.>\"]\n[[streams]]\nname = \"IDLE\"\nsubjects = [\"idle.>\"]\n\
             [[outbound]]\nname = \"created\"\npath = \"/o/{k}\"\nmode = \"jetstream\"\nsubject = \"orders.{k}\"\n\
             [[outbound]]\nname = \"ping\"\npath = \"/p\"\nmode = \"publish\"\nsubject = \"ping\"\n",
        );
        let billing = config(
            "[sidecar]\nservice = \"billing\"\n[[inbound]]\nname = \"on-order\"\nsubject = \"orders.created\"\nmode = \"jetstream\"\nstream = \"ORDERS\"\npath = \"/x\"\n\
             [[inbound]]\nname = \"lonely\"\nsubject = \"nobody.sends\"\nmode = \"request\"\npath = \"/y\"\ncodec = \"nestjs\"\n",
        );
        let g = Graph::build(&[shop, billing]);
        let has = |from: &str, to: &str, kind: EdgeKind| g.edges.iter().any(|e| e.from == from && e.to == to && e.kind == kind);
        assert!(has("svc_shop", "subj_orders__k_", EdgeKind::Produces), "{:#?}", g.edges);
        assert!(has("subj_orders__k_", "stream_ORDERS", EdgeKind::Stores));
        assert!(has("subj_orders_created", "stream_ORDERS", EdgeKind::Stores));
        assert!(has("stream_ORDERS", "svc_billing", EdgeKind::Consumes));
        assert!(has("svc_billing", "subj_dlq_billing_on_order", EdgeKind::DeadLetter));
        assert!(has("subj_dlq_billing_on_order", "stream_DLQ", EdgeKind::Stores));
        let e = g.edges.iter().find(|e| e.to == "subj_nobody_sends" || e.from == "subj_nobody_sends").unwrap();
        assert_eq!(e.label(), "request · nestjs");
        assert_eq!(g.loose_ends.unconsumed, ["ping"]);
        assert_eq!(g.loose_ends.unproduced, ["nobody.sends"]);
        assert_eq!(g.loose_ends.streams_without_consumer, ["IDLE"]);
        assert!(g.loose_ends.schema_mismatches.is_empty());
    }
}
