//! Versioned message contracts: a JSON Schema (draft 2020-12, validated by the
//! `jsonschema` crate) per route, named by its path, `…/<name>/v<N>.json`, and checked at
//! the border. Pure: loading reads the schema file once, validation has no I/O.
//!
//! The version travels as `Bridge-Schema: <name>/v<N>`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

/// The header naming the contract a message was checked against.
pub const BRIDGE_SCHEMA: &str = "Bridge-Schema";

/// A loaded schema and the contract version it stands for.
#[derive(Clone)]
pub struct Contract {
    /// `<name>/v<N>`, as `Bridge-Schema` carries it.
    pub id: String,
    /// The contract's name, `agent.execution.requested`.
    pub name: String,
    /// `N` of `v<N>`.
    pub version: u64,
    pub path: PathBuf,
    /// A digest of the schema's text: an edited schema is another contract (a reload
    /// restarts the routes that use it).
    digest: u64,
    validator: Arc<jsonschema::Validator>,
}

impl std::fmt::Debug for Contract {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Contract").field("id", &self.id).field("path", &self.path).field("digest", &self.digest).finish()
    }
}

/// Why a schema file cannot be a contract.
#[derive(Debug, thiserror::Error)]
pub enum ContractError {
    #[error("schema {path}: the file name must be …/<name>/v<N>.json or <name>.v<N>.json (the contract's name and version)")]
    Name { path: String },
    #[error("schema {path}: cannot read: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("schema {path}: not JSON: {source}")]
    Json { path: String, source: serde_json::Error },
    #[error("schema {path}: not a valid JSON Schema (draft 2020-12): {message}")]
    Schema { path: String, message: String },
}

/// One way a message breaks its contract.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// JSON pointer into the message (`""` is the whole message).
    pub instance: String,
    /// The schema keyword that failed (`required`, `type`, …; `json` when not JSON at all).
    pub keyword: String,
    pub message: String,
}

/// The contract versions a route accepts (`schema`, or several via `schemas = [...]`, one
/// contract name), and how a message picks one: the version it names in `Bridge-Schema`
/// (or `ce-dataschema`), else the newest. A named version the route does not accept is
/// refused as `schema-version`, whatever the body.
#[derive(Clone, Debug)]
pub struct Contracts {
    /// Oldest first.
    versions: Vec<Contract>,
}

/// Why a message was refused at the border.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The body breaks the selected contract.
    Schema { schema: String, violations: Vec<Violation> },
    /// The message names a contract version the route does not accept.
    Version { named: String, accepted: Vec<String> },
}

impl Refusal {
    /// The dead-letter reason and metric label: `schema` or `schema-version`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Schema { .. } => "schema",
            Refusal::Version { .. } => "schema-version",
        }
    }

    /// One line saying why, for `Bridge-Dlq-Error` and logs.
    pub fn detail(&self) -> String {
        match self {
            Refusal::Schema { schema, violations } => format!("{schema}: {}", summary(violations)),
            Refusal::Version { named, accepted } => format!("contract {named:?} is not accepted here (accepted: {})", accepted.join(", ")),
        }
    }
}

impl Contracts {
    /// Several versions of one contract; `Err` names what is wrong with the set.
    pub fn new(mut versions: Vec<Contract>) -> Result<Contracts, String> {
        versions.sort_by_key(|c| c.version);
        let Some(first) = versions.first() else { return Err("no schema given".into()) };
        if let Some(other) = versions.iter().find(|c| c.name != first.name) {
            return Err(format!("`schemas` must be versions of one contract, not both {} and {}", first.id, other.id));
        }
        if let Some(w) = versions.windows(2).find(|w| w[0].version == w[1].version) {
            return Err(format!("`schemas` names version {} twice", w[0].id));
        }
        Ok(Contracts { versions })
    }

    /// `<name>/v<N>` of every accepted version, oldest first.
    pub fn ids(&self) -> Vec<String> {
        self.versions.iter().map(|c| c.id.clone()).collect()
    }

    /// The version a message names (a `Bridge-Schema` value, or a `ce-dataschema` URI
    /// ending in `<name>/v<N>` or `<name>/v<N>.json`), else the newest.
    pub fn select(&self, named: Option<&str>) -> Result<&Contract, Refusal> {
        let Some(named) = named.map(str::trim).filter(|n| !n.is_empty()) else {
            return Ok(self.versions.last().expect("never empty"));
        };
        let bare = named.strip_suffix(".json").unwrap_or(named);
        self.versions
            .iter()
            .find(|c| bare == c.id || bare.strip_suffix(c.id.as_str()).is_some_and(|p| p.ends_with('/') || p.ends_with(':')))
            .ok_or_else(|| Refusal::Version { named: named.to_owned(), accepted: self.ids() })
    }

    /// The selected version, when the body satisfies it.
    pub fn check(&self, named: Option<&str>, body: &[u8]) -> Result<&Contract, Refusal> {
        let c = self.select(named)?;
        let violations = c.violations(body);
        if violations.is_empty() {
            Ok(c)
        } else {
            Err(Refusal::Schema { schema: c.id.clone(), violations })
        }
    }
}

/// `ce-dataschema` for a contract with the CloudEvents codec: a URN naming `<name>/v<N>`
/// (the attribute must be an absolute URI), which [`Contracts::select`] reads back.
pub fn dataschema(contract_id: &str) -> String {
    format!("urn:natsbridge:contract:{contract_id}")
}

/// `contracts/agent.execution.requested/v1.json` → `agent.execution.requested/v1`; also the
/// flat form `agent.execution.requested.v1.json`, for where files cannot sit in folders (a
/// Kubernetes ConfigMap's keys, mounted beside the routing file).
pub fn contract_id(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?.strip_suffix(".json")?;
    let (name, version) = match file.rsplit_once(".v") {
        Some((name, n)) => (name, n),
        None => (path.parent()?.file_name()?.to_str()?, file.strip_prefix('v')?),
    };
    if n_is_version(version) && !name.is_empty() {
        Some(format!("{name}/v{version}"))
    } else {
        None
    }
}

fn n_is_version(n: &str) -> bool {
    !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
}

impl Contract {
    /// Reads and compiles the schema at `path` (relative paths resolved against `base`,
    /// the routing file's folder).
    pub fn load(base: &Path, path: &str) -> Result<Contract, ContractError> {
        let full = base.join(path);
        let shown = || path.to_owned();
        let id = contract_id(Path::new(path)).ok_or_else(|| ContractError::Name { path: shown() })?;
        let text = std::fs::read(&full).map_err(|source| ContractError::Read { path: shown(), source })?;
        let schema: serde_json::Value = serde_json::from_slice(&text).map_err(|source| ContractError::Json { path: shown(), source })?;
        let validator = jsonschema::draft202012::options()
            .should_validate_formats(true)
            .build(&schema)
            .map_err(|e| ContractError::Schema { path: shown(), message: e.to_string() })?;
        let (name, version) = id.rsplit_once("/v").expect("contract_id's shape");
        let (name, version) = (name.to_owned(), version.parse().map_err(|_| ContractError::Name { path: shown() })?);
        let digest = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            text.hash(&mut h);
            h.finish()
        };
        Ok(Contract { id, name, version, path: full, digest, validator: Arc::new(validator) })
    }

    /// Every violation of the contract by a message body; none when it conforms.
    pub fn violations(&self, body: &[u8]) -> Vec<Violation> {
        let value: serde_json::Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return vec![Violation { instance: String::new(), keyword: "json".into(), message: format!("not JSON: {e}") }],
        };
        self.validator
            .iter_errors(&value)
            .map(|e| Violation { instance: e.instance_path().to_string(), keyword: e.kind().keyword().to_owned(), message: e.to_string() })
            .collect()
    }
}

/// Violations as one line, for a header such as `Bridge-Dlq-Error`.
pub fn summary(violations: &[Violation]) -> String {
    violations
        .iter()
        .map(|v| format!("{} {}: {}", if v.instance.is_empty() { "/" } else { &v.instance }, v.keyword, v.message))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, rel: &str, text: &str) {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn ids_come_from_the_path() {
        assert_eq!(contract_id(Path::new("contracts/agent.execution.requested/v1.json")).as_deref(), Some("agent.execution.requested/v1"));
        assert_eq!(contract_id(Path::new("a/v12.json")).as_deref(), Some("a/v12"));
        assert_eq!(contract_id(Path::new("agent.execution.requested.v2.json")).as_deref(), Some("agent.execution.requested/v2"));
        assert_eq!(contract_id(Path::new("/etc/natsbridge/o.v1.json")).as_deref(), Some("o/v1"));
        for bad in ["v1.json", "a/v.json", "a/va.json", "a/1.json", "a/v1.yaml", ".v1.json", "o.v.json", "o.vx.json", "o.v1.yaml"] {
            assert_eq!(contract_id(Path::new(bad)), None, "{bad}");
        }
    }

    #[test]
    fn every_violation_is_listed_with_pointer_and_keyword() {
        let dir = tempfile::tempdir().unwrap();
        let schema = r#"{"$schema":"https://json-schema.org/draft/2020-12/schema","type":"object","required":["id","n"],
            "properties":{"id":{"type":"string"},"n":{"type":"integer","minimum":1},"tags":{"type":"array","items":{"type":"string"}}}}"#;
        write(dir.path(), "c/x/v1.json", schema);
        let c = Contract::load(dir.path(), "c/x/v1.json").unwrap();
        assert_eq!(c.id, "x/v1");
        assert!(c.violations(br#"{"id":"a","n":2,"tags":["t"]}"#).is_empty());
        let mut v = c.violations(br#"{"n":0,"tags":["t",3]}"#);
        v.sort_by(|a, b| a.instance.cmp(&b.instance));
        let got: Vec<_> = v.iter().map(|v| (v.instance.as_str(), v.keyword.as_str())).collect();
        assert_eq!(got, [("", "required"), ("/n", "minimum"), ("/tags/1", "type")]);
        assert!(v[0].message.contains("\"id\""), "{}", v[0].message);
        assert_eq!(c.violations(b"nope")[0].keyword, "json");
    }

    #[test]
    fn versions_are_selected_by_name_else_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "c/o/v1.json", r#"{"required":["a"]}"#);
        write(dir.path(), "c/o/v2.json", r#"{"required":["b"]}"#);
        write(dir.path(), "c/p/v3.json", "{}");
        let load = |p: &str| Contract::load(dir.path(), p).unwrap();
        let set = Contracts::new(vec![load("c/o/v2.json"), load("c/o/v1.json")]).unwrap();
        assert_eq!(set.ids(), ["o/v1", "o/v2"]);
        assert_eq!(set.select(None).unwrap().id, "o/v2");
        assert_eq!(set.select(Some("o/v1")).unwrap().id, "o/v1");
        assert_eq!(set.select(Some("https://example.com/contracts/o/v1.json")).unwrap().id, "o/v1");
        assert!(set.select(Some("xo/v1")).is_err(), "a longer name is another contract");
        assert_eq!(set.select(Some(&dataschema("o/v1"))).unwrap().id, "o/v1");
        let r = set.select(Some("o/v3")).unwrap_err();
        assert_eq!((r.reason(), r.detail().contains("o/v1, o/v2")), ("schema-version", true));
        assert_eq!(set.check(Some("o/v1"), br#"{"a":1}"#).unwrap().id, "o/v1");
        let r = set.check(None, br#"{"a":1}"#).unwrap_err();
        assert_eq!(r.reason(), "schema");
        assert!(r.detail().starts_with("o/v2: / required:"), "{}", r.detail());
        assert!(Contracts::new(vec![load("c/o/v1.json"), load("c/p/v3.json")]).is_err());
        assert!(Contracts::new(vec![load("c/o/v1.json"), load("c/o/v1.json")]).is_err());
    }

    #[test]
    fn an_edited_schema_is_another_contract_for_reload() {
        // A route's reload fingerprint is its Debug text: an edit must change it, or the
        // running route would keep checking the old schema.
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "c/o/v1.json", r#"{"required":["a"]}"#);
        let before = format!("{:?}", Contract::load(dir.path(), "c/o/v1.json").unwrap());
        write(dir.path(), "c/o/v1.json", r#"{"required":["b"]}"#);
        let after = format!("{:?}", Contract::load(dir.path(), "c/o/v1.json").unwrap());
        assert_ne!(before, after);
        assert_eq!(after, format!("{:?}", Contract::load(dir.path(), "c/o/v1.json").unwrap()));
    }

    #[test]
    fn broken_schemas_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "c/bad/v1.json", r#"{"type": 12}"#);
        write(dir.path(), "c/txt/v1.json", "not json");
        assert!(matches!(Contract::load(dir.path(), "c/bad/v1.json"), Err(ContractError::Schema { .. })));
        assert!(matches!(Contract::load(dir.path(), "c/txt/v1.json"), Err(ContractError::Json { .. })));
        assert!(matches!(Contract::load(dir.path(), "c/none/v1.json"), Err(ContractError::Read { .. })));
        assert!(matches!(Contract::load(dir.path(), "c/none.json"), Err(ContractError::Name { .. })));
    }
}
