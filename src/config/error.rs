//! Configuration errors that point at the file, line, column and field.
//!
//! Every error a user can make in a policy file, syntax or meaning, is
//! reported in one shape: `policies.yaml:14:15: upstreams.ocr.protocol: ...`.
//! Editors and CI logs turn that prefix into a link.

use std::fmt;

/// One problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// 1-based line, or 0 when the problem has no position (an unreadable file).
    pub line: u64,
    /// 1-based column, or 0 when unknown.
    pub column: u64,
    /// Dotted path of the offending field, such as `upstreams.ocr.protocol`.
    pub field: String,
    /// What is wrong, in one sentence.
    pub message: String,
}

/// Every problem found in one configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file as the user named it.
    pub file: String,
    /// At least one diagnostic, in file order.
    pub diagnostics: Vec<Diagnostic>,
}

impl ConfigError {
    pub(crate) fn single(file: &str, diagnostic: Diagnostic) -> Self {
        Self {
            file: file.to_owned(),
            diagnostics: vec![diagnostic],
        }
    }
}

/// `file:line:column: field: {kind}message`, leaving out what is unknown.
pub(super) fn located(file: &str, d: &Diagnostic, kind: &str) -> String {
    let mut line = file.to_owned();
    if d.line > 0 {
        line.push_str(&format!(":{}:{}", d.line, d.column));
    }
    if !d.field.is_empty() {
        line.push_str(": ");
        line.push_str(&d.field);
    }
    line.push_str(": ");
    line.push_str(kind);
    line.push_str(&d.message);
    line
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            f.write_str(&located(&self.file, d, ""))?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}
