//! Reading queries: command-line arguments, a text file (one query per line), or a TSV file
//! with a `query` column (the training data format); `-` reads standard input.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};
use kb_core::tsv;

/// Reads queries from `source` (`-` for stdin). Blank lines of a text file are skipped.
pub fn read_queries(source: &str) -> Result<Vec<String>> {
    let (bytes, name) = if source == "-" {
        let mut bytes = Vec::new();
        std::io::stdin()
            .read_to_end(&mut bytes)
            .context("cannot read queries from standard input")?;
        (bytes, "<stdin>")
    } else {
        (tsv::read_bytes(Path::new(source))?, source)
    };
    Ok(parse_query_bytes(&bytes, name)?)
}

/// Parses file content: a TSV whose header has a `query` column, else one query per line.
#[cfg(test)]
fn parse_queries(text: &str, name: &str) -> Result<Vec<String>> {
    Ok(parse_query_bytes(text.as_bytes(), name)?)
}

fn parse_query_bytes(bytes: &[u8], name: &str) -> kb_core::Result<Vec<String>> {
    let path = Path::new(name);
    let text = tsv::decode_text(bytes, path)?;
    let first = tsv::numbered_lines(text)
        .next()
        .map(|(_, l)| l)
        .unwrap_or("");
    let header: Vec<&str> = first.split('\t').map(str::trim).collect();
    if header.len() > 1 && header.contains(&"query") {
        return parse_tsv(bytes, path);
    }
    Ok(tsv::numbered_lines(text)
        .map(|(_, l)| tsv::clean_field(l))
        .filter(|l| !l.is_empty())
        .collect())
}

fn parse_tsv(bytes: &[u8], path: &Path) -> kb_core::Result<Vec<String>> {
    let reader = tsv::Reader::new(bytes, path)?;
    let col = reader
        .column("query")
        .ok_or_else(|| reader.error(reader.header_line(), "no `query` column"))?;
    let mut out = Vec::new();
    for row in reader {
        let mut row = row.map_err(|e| tsv::line_error(path, e.line, e.problem))?;
        if row.fields[col].is_empty() {
            return Err(tsv::line_error(path, row.line, "empty `query` field"));
        }
        out.push(row.fields.swap_remove(col));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_skip_blanks() {
        let q = parse_queries("\u{feff}첫 질문\r\n\n 둘째 질문 \n", "x").unwrap();
        assert_eq!(q, vec!["첫 질문", "둘째 질문"]);
    }

    #[test]
    fn tsv_uses_the_query_column() {
        let q = parse_queries("keyword\tquery\n가, 나\t질문 하나\n다\t질문 둘\n", "x").unwrap();
        assert_eq!(q, vec!["질문 하나", "질문 둘"]);
    }

    #[test]
    fn tsv_errors_name_file_and_line() {
        let err = parse_queries("query\tkeyword\n\t가\n", "data.tsv")
            .unwrap_err()
            .to_string();
        assert!(err.contains("data.tsv") && err.contains("line 2"), "{err}");
        let err = parse_queries("query\tkeyword\n질문\t가\t여분\n", "data.tsv")
            .unwrap_err()
            .to_string();
        assert!(err.contains("data.tsv") && err.contains("line 2"), "{err}");
    }
}
