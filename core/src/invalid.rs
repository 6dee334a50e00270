//! Validation errors: what is wrong, in which field, and where in a file.
//! Paths are built structurally (`within`), never by patching messages.

use std::fmt;

use crate::error::Error;

/// Where in a file a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub file: String,
    /// 1-based.
    pub line: usize,
    pub column: Option<usize>,
}

/// A value that breaks a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", Render(self))]
pub struct Invalid {
    pub at: Option<Position>,
    /// The field path, e.g. `spec.mcp.command`; empty for the value itself.
    pub field: String,
    /// What is wrong and what to do about it.
    pub message: String,
}

struct Render<'a>(&'a Invalid);

impl fmt::Display for Render<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = self.0;
        if let Some(p) = &e.at {
            write!(f, "{}:{}", p.file, p.line)?;
            if let Some(c) = p.column {
                write!(f, ":{c}")?;
            }
            f.write_str(": ")?;
        }
        if !e.field.is_empty() {
            write!(f, "{}: ", e.field)?;
        }
        f.write_str(&e.message)
    }
}

impl Invalid {
    /// A problem with a value as a whole.
    pub fn new(message: impl Into<String>) -> Self {
        Invalid {
            at: None,
            field: String::new(),
            message: message.into(),
        }
    }

    /// A problem with one field.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Invalid {
            at: None,
            field: field.into(),
            message: message.into(),
        }
    }

    /// The same problem seen from an enclosing value: `outer` is prefixed
    /// to the field path (`within("spec.roles[0]")`).
    pub fn within(mut self, outer: &str) -> Self {
        self.field = match (outer.is_empty(), self.field.is_empty()) {
            (true, _) => self.field,
            (false, true) => outer.to_string(),
            (false, false) if self.field.starts_with('[') => format!("{outer}{}", self.field),
            (false, false) => format!("{outer}.{}", self.field),
        };
        self
    }

    /// Places the problem in a file.
    pub fn at(mut self, file: &str, line: usize, column: Option<usize>) -> Self {
        self.at = Some(Position {
            file: file.to_string(),
            line,
            column,
        });
        self
    }
}

impl From<Invalid> for Error {
    fn from(e: Invalid) -> Self {
        Error::bad_request(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_position_and_path() {
        let e = Invalid::field("command", "required")
            .within("spec.mcp")
            .at("a.yaml", 3, Some(5));
        assert_eq!(e.to_string(), "a.yaml:3:5: spec.mcp.command: required");
        assert_eq!(Invalid::new("bad").within("x").to_string(), "x: bad");
        assert_eq!(
            Invalid::field("[2]", "bad")
                .within("spec.roles")
                .to_string(),
            "spec.roles[2]: bad"
        );
    }
}
