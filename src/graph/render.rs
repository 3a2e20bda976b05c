//! The graph as text: Mermaid (for READMEs), DOT (for Graphviz), SVG (laid out and drawn
//! in-process by the `layout-rs` crate, no Graphviz binary) and JSON.
//!
//! Services are boxes, subjects rounded, streams cylinders; dead-letter edges are dashed.

use super::{EdgeKind, Graph, NodeKind};

/// The output formats `natsbridge graph --format` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Mermaid,
    Dot,
    Svg,
    Json,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "mermaid" => Some(Format::Mermaid),
            "dot" => Some(Format::Dot),
            "svg" => Some(Format::Svg),
            "json" => Some(Format::Json),
            _ => None,
        }
    }
}

pub fn render(g: &Graph, format: Format) -> Result<String, String> {
    match format {
        Format::Mermaid => Ok(mermaid(g)),
        Format::Dot => Ok(dot(g, false)),
        Format::Svg => svg(g),
        Format::Json => serde_json::to_string_pretty(g).map(|s| s + "\n").map_err(|e| e.to_string()),
    }
}

/// Mermaid `flowchart LR`; labels quoted, their `"` written `#quot;`.
pub fn mermaid(g: &Graph) -> String {
    let q = |s: &str| s.replace('"', "#quot;");
    let mut out = String::from("flowchart LR\n");
    for n in &g.nodes {
        let label = q(&n.label);
        let shape = match n.kind {
            NodeKind::Service => format!("[\"{label}\"]"),
            NodeKind::Subject => format!("([\"{label}\"])"),
            NodeKind::Stream => format!("[(\"{label}\")]"),
        };
        out.push_str(&format!("  {}{shape}\n", n.id));
    }
    for e in &g.edges {
        let arrow = if e.kind == EdgeKind::DeadLetter { "-.->" } else { "-->" };
        let label = e.label();
        if label.is_empty() {
            out.push_str(&format!("  {} {arrow} {}\n", e.from, e.to));
        } else {
            out.push_str(&format!("  {} {arrow}|\"{}\"| {}\n", e.from, q(&label), e.to));
        }
    }
    out
}

/// A DOT string literal's inside.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// DOT. `for_layout`: the shapes `layout-rs` draws (boxes told apart by fill) instead of
/// Graphviz's.
pub fn dot(g: &Graph, for_layout: bool) -> String {
    let mut out = String::from("digraph natsbridge {\n  rankdir=LR;\n");
    for n in &g.nodes {
        let attrs = match (n.kind, for_layout) {
            (NodeKind::Service, false) => "shape=box, style=filled, fillcolor=\"#dbeafe\"",
            (NodeKind::Subject, false) => "shape=box, style=rounded",
            (NodeKind::Stream, false) => "shape=cylinder, style=filled, fillcolor=\"#fef3c7\"",
            (NodeKind::Service, true) => "shape=box, fillcolor=\"#dbeafe\"",
            (NodeKind::Subject, true) => "shape=box, fillcolor=\"white\"",
            (NodeKind::Stream, true) => "shape=box, fillcolor=\"#fef3c7\"",
        };
        out.push_str(&format!("  {} [label=\"{}\", {attrs}];\n", n.id, esc(&n.label)));
    }
    for e in &g.edges {
        let style = if e.kind == EdgeKind::DeadLetter { ", style=dashed" } else { "" };
        out.push_str(&format!("  {} -> {} [label=\"{}\"{style}];\n", e.from, e.to, esc(&e.label())));
    }
    out.push_str("}\n");
    out
}

/// SVG, laid out by `layout-rs` from [`dot`]'s output.
pub fn svg(g: &Graph) -> Result<String, String> {
    use layout::backends::svg::SVGWriter;
    use layout::gv::{DotParser, GraphBuilder};
    let text = dot(g, true);
    let mut parser = DotParser::new(&text);
    let ast = parser.process().map_err(|e| format!("laying out the graph: {e}"))?;
    let mut builder = GraphBuilder::new();
    builder.visit_graph(&ast);
    let mut visual = builder.get();
    let mut writer = SVGWriter::new();
    visual.do_it(false, false, false, &mut writer);
    Ok(writer.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{Edge, Node};

    fn tiny() -> Graph {
        let node = |id: &str, kind, label: &str| Node { id: id.into(), kind, label: label.into() };
        let edge = |from: &str, to: &str, kind, mode: Option<&str>| Edge {
            from: from.into(),
            to: to.into(),
            kind,
            mode: mode.map(Into::into),
            codec: Some("raw".into()),
            route: None,
            schemas: vec!["o/v1".into()],
        };
        Graph {
            nodes: vec![
                node("svc_a", NodeKind::Service, "a \"q\""),
                node("subj_x", NodeKind::Subject, "x.>"),
                node("stream_S", NodeKind::Stream, "S"),
            ],
            edges: vec![edge("svc_a", "subj_x", EdgeKind::Produces, Some("publish")), edge("svc_a", "subj_x", EdgeKind::DeadLetter, None)],
            loose_ends: Default::default(),
        }
    }

    #[test]
    fn mermaid_and_dot_quote_labels_and_dash_dead_letters() {
        let m = mermaid(&tiny());
        assert!(m.starts_with("flowchart LR\n"));
        assert!(m.contains("svc_a[\"a #quot;q#quot;\"]") && m.contains("subj_x([\"x.>\"])") && m.contains("stream_S[(\"S\")]"), "{m}");
        assert!(m.contains("svc_a -->|\"publish · o/v1\"| subj_x") && m.contains("svc_a -.->|\"dead letter\"| subj_x"), "{m}");
        let d = dot(&tiny(), false);
        assert!(d.contains("svc_a [label=\"a \\\"q\\\"\"") && d.contains("style=dashed"), "{d}");
        let s = svg(&tiny()).unwrap();
        assert!(s.contains("<svg") && s.contains("svg>"), "{s}");
        assert!(s.contains(">x.&gt;<") || s.contains(">x.><"), "{s}");
    }
}
