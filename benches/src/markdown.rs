//! The one Markdown writer: tables with aligned columns, cells escaped so that a `|` in a
//! command or a path cannot break a row, and the shell-quoted command line that made a
//! report (the first thing every report prints).

use std::fmt;

/// How a column's cells are aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// A Markdown table; [`fmt::Display`] writes it, one line a row.
#[derive(Debug, Clone)]
pub struct Table {
    columns: Vec<(String, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new(columns: &[(&str, Align)]) -> Table {
        Table { columns: columns.iter().map(|&(h, a)| (h.to_owned(), a)).collect(), rows: Vec::new() }
    }

    /// Appends a row. Missing cells are left empty; a row with more cells than columns is a
    /// bug in the caller.
    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) {
        let mut row: Vec<String> = cells.into_iter().map(Into::into).collect();
        assert!(
            row.len() <= self.columns.len(),
            "a row of {} cells in a table of {} columns",
            row.len(),
            self.columns.len()
        );
        row.resize(self.columns.len(), String::new());
        self.rows.push(row);
    }

    /// Whether no row was added.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// A cell's text as Markdown: `|` escaped, line breaks as spaces.
fn escape(cell: &str) -> String {
    cell.replace('|', "\\|").replace(['\n', '\r'], " ")
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let line = |f: &mut fmt::Formatter<'_>, cells: &mut dyn Iterator<Item = String>| -> fmt::Result {
            write!(f, "|")?;
            for c in cells {
                if c.is_empty() { write!(f, " |")? } else { write!(f, " {c} |")? }
            }
            writeln!(f)
        };
        line(f, &mut self.columns.iter().map(|(h, _)| escape(h)))?;
        line(
            f,
            &mut self.columns.iter().map(|(_, a)| match a {
                Align::Left => "---".to_owned(),
                Align::Right => "---:".to_owned(),
            }),
        )?;
        for row in &self.rows {
            line(f, &mut row.iter().map(|c| escape(c)))?;
        }
        Ok(())
    }
}

/// `value` with `decimals` decimals, `n/a` when there is none.
pub fn num(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "n/a".into(), |v| format!("{v:.decimals$}"))
}

/// An argument as a shell would need it: as it is when it is plain, single-quoted otherwise.
pub fn quote(arg: &str) -> String {
    if !arg.is_empty() && arg.chars().all(|c| c.is_ascii_alphanumeric() || "-_./,=:+@%".contains(c)) {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// This process's command line, quoted: what to type to make the report again.
pub fn command_line() -> String {
    std::env::args().map(|a| quote(&a)).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_aligns_pads_and_escapes() {
        let mut t = Table::new(&[("tool", Align::Left), ("wall s", Align::Right), ("note", Align::Left)]);
        assert!(t.is_empty());
        t.row(["b3sum", "1.500"]);
        t.row(["`find | xargs b3sum`", "2.000", "two\nlines"]);
        assert_eq!(
            t.to_string(),
            "| tool | wall s | note |\n\
             | --- | ---: | --- |\n\
             | b3sum | 1.500 | |\n\
             | `find \\| xargs b3sum` | 2.000 | two lines |\n"
        );
    }

    #[test]
    #[should_panic(expected = "a row of 2 cells in a table of 1 columns")]
    fn a_row_wider_than_the_table_is_a_bug() {
        Table::new(&[("only", Align::Left)]).row(["a", "b"]);
    }

    #[test]
    fn numbers_and_quoting() {
        assert_eq!(num(Some(1.23456), 2), "1.23");
        assert_eq!(num(None, 2), "n/a");
        assert_eq!(quote("--sizes=100k,1m"), "--sizes=100k,1m");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote(""), "''");
    }
}
