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

/// `k=v,k2=v2`, in the order given.
pub fn labels_text<'a>(labels: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = String::new();
    for (k, v) in labels {
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    out
}

/// Writes a command's whole output to stdout. A reader that went away
/// (`psh mcp ls | head`) ends the command quietly, as with other tools;
/// any other failure to write is an error.
pub fn emit(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("error: cannot write the output: {e}");
            std::process::exit(1);
        }
    }
}
