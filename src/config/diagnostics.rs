//! How problems in the routing file are reported: [`Diagnostic`] (one problem, with its
//! `file:line` and route), [`ConfigError`] (all of them), and the collector the validators
//! push into, which locates each problem from a table's offset and the offending key.

use std::fmt;

/// One problem found in the file, located by line and route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: String,
    pub line: usize,
    pub route: Option<String>,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.file, self.line)?;
        if let Some(route) = &self.route {
            write!(f, "route \"{route}\": ")?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem in a routing file; never empty.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub diagnostics: Vec<Diagnostic>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.diagnostics.len();
        writeln!(f, "{n} error{} in routing file", if n == 1 { "" } else { "s" })?;
        for d in &self.diagnostics {
            writeln!(f, "  {d}")?;
        }
        Ok(())
    }
}

/// Turns byte offsets of the routing file's text into line numbers.
#[derive(Clone, Copy)]
pub(super) struct SourceLocator<'a> {
    src: &'a str,
    file: &'a str,
}

impl<'a> SourceLocator<'a> {
    pub(super) fn new(src: &'a str, file: &'a str) -> Self {
        SourceLocator { src, file }
    }

    pub(super) fn file(&self) -> &'a str {
        self.file
    }

    pub(super) fn line_of(&self, offset: usize) -> usize {
        let offset = offset.min(self.src.len());
        self.src[..offset].bytes().filter(|&b| b == b'\n').count() + 1
    }

    /// The line of `key = …` inside a table, or the table's own line. toml's span of an
    /// array-of-tables element may cover only its header, so scan to the next header.
    pub(super) fn key_line(&self, table: TableStart, key: &str) -> usize {
        let start = table.0.min(self.src.len());
        let mut offset = start;
        for (n, line) in self.src[start..].split_inclusive('\n').enumerate() {
            let trimmed = line.trim_start();
            if n > 0 && trimmed.starts_with('[') {
                break;
            }
            if let Some(rest) = trimmed.strip_prefix(key) {
                if rest.trim_start().starts_with('=') {
                    return self.line_of(offset);
                }
            }
            offset += line.len();
        }
        self.line_of(start)
    }
}

/// The byte offset where a table (a section, one route or one stream) starts in the file.
#[derive(Debug, Clone, Copy)]
pub(super) struct TableStart(pub(super) usize);

impl TableStart {
    /// The whole file, for problems that belong to no table.
    pub(super) const TOP: TableStart = TableStart(0);

    /// This table as the place of a problem that names no route.
    pub(super) fn unnamed(self) -> Table<'static> {
        Table { start: self, route: None }
    }

    /// This table as the place of a problem about the route (or stream) `name`.
    pub(super) fn named(self, name: Option<&str>) -> Table<'_> {
        Table { start: self, route: name }
    }
}

/// Where a problem is: the table it is in and the route it belongs to, if any.
#[derive(Debug, Clone, Copy)]
pub(super) struct Table<'a> {
    pub(super) start: TableStart,
    pub(super) route: Option<&'a str>,
}

/// Collects the errors and warnings of one validation run, in the order they are found.
pub(super) struct Diagnostics<'a> {
    locator: SourceLocator<'a>,
    errors: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
}

impl<'a> Diagnostics<'a> {
    pub(super) fn new(locator: SourceLocator<'a>) -> Self {
        Diagnostics { locator, errors: Vec::new(), warnings: Vec::new() }
    }

    pub(super) fn locator(&self) -> SourceLocator<'a> {
        self.locator
    }

    pub(super) fn line_of(&self, table: TableStart) -> usize {
        self.locator.line_of(table.0)
    }

    /// How many errors so far; a validator compares it before and after to know whether
    /// its own table had any.
    pub(super) fn error_count(&self) -> usize {
        self.errors.len()
    }

    /// An error at `key = …` inside the table, or at the table's header without a key.
    pub(super) fn error(&mut self, at: Table<'_>, key: Option<&str>, message: impl Into<String>) {
        let diagnostic = self.locate(at, key, message.into());
        self.errors.push(diagnostic);
    }

    pub(super) fn warn(&mut self, at: Table<'_>, key: Option<&str>, message: impl Into<String>) {
        let diagnostic = self.locate(at, key, message.into());
        self.warnings.push(diagnostic);
    }

    /// An error on a line already known (a validated item's own line).
    pub(super) fn error_on_line(&mut self, line: usize, route: &str, message: impl Into<String>) {
        self.errors.push(Diagnostic { file: self.locator.file.to_owned(), line, route: Some(route.to_owned()), message: message.into() });
    }

    fn locate(&self, at: Table<'_>, key: Option<&str>, message: String) -> Diagnostic {
        let line = match key {
            Some(k) => self.locator.key_line(at.start, k),
            None => self.locator.line_of(at.start.0),
        };
        Diagnostic { file: self.locator.file.to_owned(), line, route: at.route.map(str::to_owned), message }
    }

    /// The warnings when there were no errors, else every error sorted by line (a stable
    /// sort: problems on one line keep the order they were found in).
    pub(super) fn finish(mut self) -> Result<Vec<Diagnostic>, ConfigError> {
        if self.errors.is_empty() {
            Ok(self.warnings)
        } else {
            self.errors.sort_by_key(|d| d.line);
            Err(ConfigError { diagnostics: self.errors })
        }
    }
}
