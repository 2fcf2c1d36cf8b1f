//! Reading queries: command-line arguments, a text file (one query per line), or a TSV file
//! with a `query` column (the training data format); `-` reads standard input.

use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// Reads queries from `source` (`-` for stdin). Blank lines of a text file are skipped.
pub fn read_queries(source: &str) -> Result<Vec<String>> {
    let (text, name) = if source == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("cannot read queries from standard input")?;
        (s, "<stdin>".to_string())
    } else {
        let bytes =
            std::fs::read(Path::new(source)).with_context(|| format!("cannot read {source}"))?;
        let s = String::from_utf8(bytes).map_err(|e| {
            let upto = &e.as_bytes()[..e.utf8_error().valid_up_to()];
            let line = upto.iter().filter(|&&b| b == b'\n').count() + 1;
            anyhow::anyhow!("{source}: line {line}: not valid UTF-8")
        })?;
        (s, source.to_string())
    };
    parse_queries(&text, &name)
}

/// Parses file content: a TSV whose header has a `query` column, else one query per line.
pub fn parse_queries(text: &str, name: &str) -> Result<Vec<String>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let first = text.lines().next().unwrap_or("");
    let header: Vec<&str> = first
        .trim_end_matches('\r')
        .split('\t')
        .map(str::trim)
        .collect();
    if header.len() > 1 && header.contains(&"query") {
        return parse_tsv(text, name);
    }
    Ok(text
        .lines()
        .map(|l| l.trim_end_matches('\r').trim())
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

fn parse_tsv(text: &str, name: &str) -> Result<Vec<String>> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(b'\t')
        .flexible(false)
        .from_reader(text.as_bytes());
    let headers = reader
        .headers()
        .with_context(|| format!("{name}: bad header"))?
        .clone();
    let col = headers
        .iter()
        .position(|h| h.trim() == "query")
        .with_context(|| format!("{name}: no `query` column"))?;
    let mut out = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| {
            let line = e.position().map(|p| p.line()).unwrap_or(0);
            anyhow::anyhow!("{name}: line {line}: {e}")
        })?;
        let line = record.position().map(|p| p.line()).unwrap_or(0);
        let q = record.get(col).unwrap_or("").trim();
        if q.is_empty() {
            bail!("{name}: line {line}: empty `query` field");
        }
        out.push(q.to_string());
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
