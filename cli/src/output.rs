//! Printing for people: aligned tables, and YAML or JSON for machines.

use clap::ValueEnum;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Format {
    #[default]
    Text,
    Yaml,
    Json,
}

/// Prints rows under a header with columns padded to their widest cell.
pub fn table<S: AsRef<str>>(header: &[&str], rows: &[Vec<S>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.as_ref().chars().count());
            }
        }
    }
    let mut out = String::with_capacity(
        (rows.len() + 2) * (widths.iter().sum::<usize>() + 2 * widths.len() + 1),
    );
    let mut line = |cells: &mut dyn Iterator<Item = &str>, n: usize| {
        let start = out.len();
        for (i, c) in cells.enumerate() {
            out.push_str(c);
            if i + 1 < n {
                let pad = widths[i].saturating_sub(c.chars().count()) + 2;
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        let trimmed = out[start..].trim_end().len();
        out.truncate(start + trimmed);
        out.push('\n');
    };
    line(&mut header.iter().copied(), header.len());
    let rules: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    line(&mut rules.iter().map(String::as_str), rules.len());
    for r in rows {
        line(&mut r.iter().map(|c| c.as_ref()), r.len());
    }
    out
}

/// YAML documents separated by `---`, or one JSON array.
pub fn structured(values: &[serde_json::Value], format: Format) -> String {
    match format {
        Format::Json => serde_json::to_string_pretty(values).unwrap_or_default() + "\n",
        _ => values
            .iter()
            .map(|v| yaml_serde::to_string(v).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("---\n"),
    }
}

pub fn labels_text(labels: &std::collections::BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}
