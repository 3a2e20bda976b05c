//! `schema` / `schemas` on a route: the contracts are loaded (read and compiled) while the
//! file is validated, so `natsbridge check` and a reload report a broken schema with its
//! route.

use std::path::Path;

use crate::config::diagnostics::{Diagnostics, Table};
use crate::contract::{Contract, Contracts};

/// The contract at `path`, relative to the routing file's folder.
fn load(path: &str, key: &str, at: Table<'_>, diags: &mut Diagnostics<'_>) -> Option<Contract> {
    let file = diags.locator().file();
    let base = Path::new(file).parent().unwrap_or(Path::new(""));
    Contract::load(base, path).map_err(|e| diags.error(at, Some(key), e.to_string())).ok()
}

/// A route's accepted contract versions: `schema = "…"` (one) or `schemas = ["…", …]`
/// (several versions of one contract), never both.
pub(super) fn route(
    schema: &Option<String>,
    schemas: &Option<Vec<String>>,
    at: Table<'_>,
    diags: &mut Diagnostics<'_>,
) -> Option<Contracts> {
    let (key, paths): (&str, Vec<&String>) = match (schema, schemas) {
        (None, None) => return None,
        (Some(_), Some(_)) => {
            diags.error(at, Some("schemas"), "set `schema` or `schemas`, not both");
            return None;
        }
        (Some(s), None) => ("schema", vec![s]),
        (None, Some(list)) if list.is_empty() => {
            diags.error(at, Some("schemas"), "`schemas` lists no schema");
            return None;
        }
        (None, Some(list)) => ("schemas", list.iter().collect()),
    };
    let loaded: Vec<Option<Contract>> = paths.iter().map(|p| load(p, key, at, diags)).collect();
    let loaded: Option<Vec<Contract>> = loaded.into_iter().collect();
    Contracts::new(loaded?).map_err(|e| diags.error(at, Some(key), e)).ok()
}
