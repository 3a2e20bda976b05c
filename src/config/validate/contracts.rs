//! `schema` on a route: the contract is loaded (read and compiled) while the file is
//! validated, so `natsbridge check` and a reload report a broken schema with its route.

use std::path::Path;

use crate::config::diagnostics::{Diagnostics, Table};
use crate::contract::Contract;

/// The contract at `path`, relative to the routing file's folder.
pub(super) fn load(path: &str, at: Table<'_>, diags: &mut Diagnostics<'_>) -> Option<Contract> {
    let file = diags.locator().file();
    let base = Path::new(file).parent().unwrap_or(Path::new(""));
    Contract::load(base, path).map_err(|e| diags.error(at, Some("schema"), e.to_string())).ok()
}
