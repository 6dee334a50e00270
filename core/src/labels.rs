//! Label matching shared by role `app_labels` and agent resource selectors:
//! literal values, `*`/`?` globs and `^...$` regular expressions.

use std::collections::BTreeMap;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::invalid::Invalid;

/// One compiled value pattern.
#[derive(Debug, Clone)]
pub enum Pattern {
    Any,
    Literal(String),
    Glob(String),
    Regex(Regex),
}

impl Pattern {
    /// Compiles a pattern; `^...$` is a regular expression, `*` and `?` make a glob.
    pub fn parse(p: &str) -> Result<Pattern, Invalid> {
        if p == "*" {
            Ok(Pattern::Any)
        } else if p.starts_with('^') && p.ends_with('$') {
            Regex::new(p)
                .map(Pattern::Regex)
                .map_err(|e| Invalid::new(format!("invalid regular expression {p:?}: {e}")))
        } else if p.contains(['*', '?']) {
            Ok(Pattern::Glob(p.to_string()))
        } else {
            Ok(Pattern::Literal(p.to_string()))
        }
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Literal(l) => l == value,
            Pattern::Glob(g) => glob_match(g.as_bytes(), value.as_bytes()),
            Pattern::Regex(r) => r.is_match(value),
        }
    }
}

/// Iterative glob matcher with `*` (any run) and `?` (one byte); linear backtracking.
pub fn glob_match(pat: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pat.len() && (pat[p] == b'?' || pat[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pat.len() && pat[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    while p < pat.len() && pat[p] == b'*' {
        p += 1;
    }
    p == pat.len()
}

/// A label value in YAML may be one string or a list of strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn values(&self) -> &[String] {
        match self {
            OneOrMany::One(v) => std::slice::from_ref(v),
            OneOrMany::Many(v) => v,
        }
    }
}

/// A compiled label map: every key must match one of its values; the key `*`
/// with the value `*` matches every resource.
#[derive(Debug, Clone, Default)]
pub struct LabelSelector {
    entries: Vec<(String, Vec<Pattern>)>,
}

impl LabelSelector {
    pub fn compile<'a, I, V>(map: I) -> Result<Self, Invalid>
    where
        I: IntoIterator<Item = (&'a String, V)>,
        V: AsRef<[String]>,
    {
        let mut entries = Vec::new();
        for (k, vs) in map {
            let pats = vs
                .as_ref()
                .iter()
                .map(|v| Pattern::parse(v).map_err(|e| e.within(k)))
                .collect::<Result<Vec<_>, _>>()?;
            entries.push((k.clone(), pats));
        }
        Ok(Self { entries })
    }

    pub fn from_single(map: &BTreeMap<String, String>) -> Result<Self, Invalid> {
        Self::compile(map.iter().map(|(k, v)| (k, vec![v.clone()])))
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// An empty selector matches nothing (default deny).
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        if self.entries.is_empty() {
            return false;
        }
        self.entries.iter().all(|(key, pats)| {
            if key == "*" {
                return pats.iter().any(|p| matches!(p, Pattern::Any));
            }
            match labels.get(key) {
                Some(v) => pats.iter().any(|p| p.matches(v)),
                None => false,
            }
        })
    }
}

/// Matches if any of the selectors matches.
pub fn any_matches(selectors: &[LabelSelector], labels: &BTreeMap<String, String>) -> bool {
    selectors.iter().any(|s| s.matches(labels))
}

/// Whether a listed app passes `psh mcp ls`'s filters (the web UI's too):
/// every wanted label has exactly that value, and the search text, if any,
/// is in its name, description, or a label's key or value (ignoring case).
pub fn listing_matches<'a>(
    name: &str,
    description: &str,
    labels: impl IntoIterator<Item = (&'a str, &'a str)> + Clone,
    want: &[(String, String)],
    search: Option<&str>,
) -> bool {
    if !want.iter().all(|(k, v)| {
        labels
            .clone()
            .into_iter()
            .any(|(lk, lv)| lk == k && lv == v)
    }) {
        return false;
    }
    let Some(s) = search else { return true };
    let s = s.to_lowercase();
    name.to_lowercase().contains(&s)
        || description.to_lowercase().contains(&s)
        || labels
            .into_iter()
            .any(|(k, v)| k.to_lowercase().contains(&s) || v.to_lowercase().contains(&s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sel(pairs: &[(&str, &str)]) -> LabelSelector {
        LabelSelector::from_single(&labels(pairs)).expect("valid selector")
    }

    #[test]
    fn selectors_table() {
        let dev = labels(&[("env", "dev")]);
        let prod = labels(&[("env", "prod"), ("team", "infra")]);
        let none = labels(&[]);
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a BTreeMap<String, String>, bool);
        let cases: &[Case<'_>] = &[
            (&[("*", "*")], &dev, true),
            (&[("*", "*")], &none, true),
            (&[("env", "dev")], &dev, true),
            (&[("env", "dev")], &prod, false),
            (&[("env", "prod"), ("team", "infra")], &prod, true),
            (&[("env", "prod"), ("team", "web")], &prod, false),
            (&[("env", "pr*")], &prod, true),
            (&[("env", "d?v")], &dev, true),
            (&[("env", "^(dev|test)$")], &dev, true),
            (&[("env", "^(dev|test)$")], &prod, false),
            (&[("env", "*")], &none, false),
            (&[], &dev, false),
        ];
        for (s, l, want) in cases {
            assert_eq!(sel(s).matches(l), *want, "selector {s:?} on {l:?}");
        }
    }

    #[test]
    fn any_of_several() {
        let s = vec![sel(&[("env", "prod")]), sel(&[("env", "test")])];
        assert!(any_matches(&s, &labels(&[("env", "test")])));
        assert!(!any_matches(&s, &labels(&[("env", "dev")])));
    }

    #[test]
    fn globs() {
        assert!(glob_match(b"search_*", b"search_docs"));
        assert!(!glob_match(b"search_*", b"delete_docs"));
        assert!(glob_match(b"*_*", b"a_b"));
        assert!(glob_match(b"a*b*c", b"axxbyyc"));
        assert!(!glob_match(b"a*b*c", b"axxbyy"));
        assert!(glob_match(b"*", b""));
    }

    #[test]
    fn bad_regex_is_reported() {
        assert!(Pattern::parse("^(unclosed$").is_err());
    }
}
