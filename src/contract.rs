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
    pub path: PathBuf,
    validator: Arc<jsonschema::Validator>,
}

impl std::fmt::Debug for Contract {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Contract").field("id", &self.id).field("path", &self.path).finish()
    }
}

/// Why a schema file cannot be a contract.
#[derive(Debug, thiserror::Error)]
pub enum ContractError {
    #[error("schema {path}: the file name must be …/<name>/v<N>.json (the contract's name and version)")]
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

/// `contracts/agent.execution.requested/v1.json` → `agent.execution.requested/v1`.
pub fn contract_id(path: &Path) -> Option<String> {
    let version = path.file_name()?.to_str()?.strip_suffix(".json")?;
    let n = version.strip_prefix('v')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let name = path.parent()?.file_name()?.to_str()?;
    (!name.is_empty()).then(|| format!("{name}/{version}"))
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
        Ok(Contract { id, path: full, validator: Arc::new(validator) })
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
        for bad in ["v1.json", "a/v.json", "a/va.json", "a/1.json", "a/v1.yaml"] {
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
