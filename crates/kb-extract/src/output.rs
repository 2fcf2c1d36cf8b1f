//! Writing results as TSV or JSON Lines.

use std::io::Write;

use anyhow::Result;
use kb_core::Extraction;

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `query<TAB>keywords<TAB>text[<TAB>ids]` with a header line; keywords joined by `, `.
    Tsv,
    /// One JSON object per line: `{"query", "keywords", "text"[, "ids"]}`.
    Jsonl,
}

/// One JSON Lines record, fields in this order.
#[derive(serde::Serialize)]
struct JsonLine<'a> {
    query: &'a str,
    keywords: &'a [String],
    text: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    ids: Option<&'a Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    score: Option<f32>,
}

/// Writes results in order.
pub struct ResultWriter<W: Write> {
    out: W,
    format: Format,
    with_ids: bool,
    with_scores: bool,
}

impl<W: Write> ResultWriter<W> {
    /// Starts the output (writes the TSV header).
    pub fn new(mut out: W, format: Format, with_ids: bool, with_scores: bool) -> Result<Self> {
        if format == Format::Tsv {
            let ids = if with_ids { "\tids" } else { "" };
            let scores = if with_scores { "\tscore" } else { "" };
            writeln!(out, "query\tkeywords\ttext{ids}{scores}")?;
        }
        Ok(Self {
            out,
            format,
            with_ids,
            with_scores,
        })
    }

    /// Writes one result.
    pub fn write(&mut self, r: &Extraction) -> Result<()> {
        match self.format {
            Format::Tsv => {
                let mut fields = vec![
                    r.query.clone(),
                    kb_core::keywords::join_keywords(&r.keywords),
                    r.text.clone(),
                ];
                if self.with_ids {
                    let ids: Vec<String> = r.ids.iter().map(u32::to_string).collect();
                    fields.push(ids.join(" "));
                }
                if self.with_scores {
                    fields.push(r.score.map(|s| s.to_string()).unwrap_or_default());
                }
                kb_core::tsv::write_row(&mut self.out, &fields)?;
            }
            Format::Jsonl => {
                let line = JsonLine {
                    query: &r.query,
                    keywords: &r.keywords,
                    text: &r.text,
                    ids: self.with_ids.then_some(&r.ids),
                    score: if self.with_scores { r.score } else { None },
                };
                writeln!(self.out, "{}", serde_json::to_string(&line)?)?;
            }
        }
        Ok(())
    }

    /// Flushes the output.
    pub fn finish(mut self) -> Result<()> {
        self.out.flush()?;
        Ok(())
    }
}
