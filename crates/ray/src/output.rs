//! `-o json|yaml|table|wide` (and `--json`): how a command prints what it shows.
use clap::{Args, ValueEnum};
use serde::Serialize;

/// An output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Columns for people (the default).
    Table,
    /// The table with more columns.
    Wide,
    /// JSON, the API's own shapes.
    Json,
    /// YAML, the same fields as JSON.
    Yaml,
}

/// The output flags of a command that shows something.
#[derive(Args, Clone, Debug, Default)]
pub struct OutputArgs {
    /// Output format: table (default), wide (more columns), json or yaml.
    #[arg(short = 'o', long = "output", value_enum, value_name = "FORMAT")]
    pub output: Option<Format>,
    /// Same as `-o json`.
    #[arg(long, conflicts_with = "output")]
    pub json: bool,
}

impl OutputArgs {
    /// The chosen format.
    pub fn format(&self) -> Format {
        match (self.json, self.output) {
            (true, _) => Format::Json,
            (false, Some(f)) => f,
            (false, None) => Format::Table,
        }
    }

    /// The format for `-o json`-style flags of commands that only know `--json`.
    pub fn of_json(json: bool) -> Self {
        Self { output: None, json }
    }
}

impl Format {
    /// Whether this format is for programs (JSON, YAML) rather than people.
    pub fn is_structured(self) -> bool {
        matches!(self, Format::Json | Format::Yaml)
    }
}

/// `value` as JSON (pretty) or YAML; `None` for the human formats.
pub fn render<T: Serialize>(value: &T, format: Format) -> anyhow::Result<Option<String>> {
    Ok(match format {
        Format::Json => Some(serde_json::to_string_pretty(value)? + "\n"),
        Format::Yaml => Some(serde_yaml::to_string(value)?),
        Format::Table | Format::Wide => None,
    })
}

/// Prints `value` as JSON or YAML and returns true, or returns false for a human format
/// (the caller prints its table).
pub fn print_structured<T: Serialize>(value: &T, format: Format) -> anyhow::Result<bool> {
    match render(value, format)? {
        Some(text) => {
            print!("{text}");
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Lines of left-aligned columns: each column as wide as its widest cell, two spaces
/// apart; the last column is not padded.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i + 1 == header.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(&mut header.iter().copied());
    for r in rows {
        out.push_str(&line(&mut r.iter().map(String::as_str)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_flag_is_an_alias_of_output_json() {
        assert_eq!(OutputArgs::of_json(true).format(), Format::Json);
        assert_eq!(OutputArgs::default().format(), Format::Table);
        let o = OutputArgs {
            output: Some(Format::Yaml),
            json: false,
        };
        assert_eq!(o.format(), Format::Yaml);
    }

    #[test]
    fn yaml_and_json_carry_the_same_fields() {
        #[derive(Serialize)]
        struct S {
            id: &'static str,
            n: u32,
        }
        let s = S { id: "a", n: 3 };
        let y = render(&s, Format::Yaml).unwrap().unwrap();
        assert_eq!(y, "id: a\nn: 3\n");
        let j: serde_json::Value =
            serde_json::from_str(&render(&s, Format::Json).unwrap().unwrap()).unwrap();
        assert_eq!(j["n"], 3);
        assert!(render(&s, Format::Wide).unwrap().is_none());
    }

    #[test]
    fn tables_align_columns() {
        let t = table(
            &["ID", "STATE", "NOTE"],
            &[
                vec!["a".into(), "running".into(), "x".into()],
                vec!["long-id".into(), "dead".into(), "".into()],
            ],
        );
        assert_eq!(
            t,
            "ID       STATE    NOTE\na        running  x\nlong-id  dead\n"
        );
    }
}
