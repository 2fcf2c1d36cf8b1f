//! Training data: `query`/`keyword` TSV files, their encoding as the original recipe did, and
//! batches padded to their longest row.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::error::{Error, Result};
use crate::tokenizer::KoTokenizer;
use crate::tsv;

/// One row of a data file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// The question.
    pub query: String,
    /// Comma-separated keywords.
    pub keyword: String,
    /// 1-based line number in the file (for messages).
    pub line: usize,
}

/// A row that could not be used, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRow {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub problem: String,
}

/// The rows of a data file, and the rows skipped when `skip_bad_rows` was asked for.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The file read.
    pub path: PathBuf,
    /// Good rows in file order.
    pub examples: Vec<Example>,
    /// Rows skipped (empty unless skipping was asked for).
    pub skipped: Vec<BadRow>,
}

impl Dataset {
    /// Reads a TSV with a header containing `query` and `keyword` (other columns ignored, any
    /// order), as [`crate::tsv`] reads every TSV (BOM, CRLF, pandas-style quoting, trimmed NFC
    /// fields). A bad row is an error naming file and line unless `skip_bad_rows`.
    pub fn read_tsv(path: &Path, skip_bad_rows: bool) -> Result<Self> {
        Self::parse_tsv(&tsv::read_bytes(path)?, path, skip_bad_rows)
    }

    /// Parses TSV bytes; `path` names the file in messages.
    pub fn parse_tsv(bytes: &[u8], path: &Path, skip_bad_rows: bool) -> Result<Self> {
        let reader = tsv::Reader::new(bytes, path)?;
        let (Some(qcol), Some(kcol)) = (reader.column("query"), reader.column("keyword")) else {
            return Err(reader.error(
                reader.header_line(),
                format!(
                    "the header must contain `query` and `keyword` columns (tab-separated); found {:?}",
                    reader.header()
                ),
            ));
        };
        let mut examples = Vec::new();
        let mut skipped = Vec::new();
        let fail = |line: usize, problem: String| tsv::line_error(path, line, problem);
        for row in reader {
            let checked = row
                .map_err(|e| BadRow {
                    line: e.line,
                    problem: e.problem,
                })
                .and_then(|r| {
                    let field = |i: usize, name: &str| {
                        if r.fields[i].is_empty() {
                            Err(BadRow {
                                line: r.line,
                                problem: format!("field `{name}` is empty"),
                            })
                        } else {
                            Ok(r.fields[i].clone())
                        }
                    };
                    Ok(Example {
                        query: field(qcol, "query")?,
                        keyword: field(kcol, "keyword")?,
                        line: r.line,
                    })
                });
            match checked {
                Ok(example) => examples.push(example),
                Err(bad) if skip_bad_rows => skipped.push(bad),
                Err(bad) => return Err(fail(bad.line, bad.problem)),
            }
        }
        if examples.is_empty() {
            return Err(fail(
                1,
                if skipped.is_empty() {
                    "no data rows after the header".into()
                } else {
                    format!("all {} data rows are bad", skipped.len())
                },
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
            examples,
            skipped,
        })
    }

    /// A one-line summary of skipped rows (count and the first few line numbers), if any.
    pub fn skipped_summary(&self) -> Option<String> {
        if self.skipped.is_empty() {
            return None;
        }
        let first: Vec<String> = self
            .skipped
            .iter()
            .take(5)
            .map(|b| format!("line {} ({})", b.line, b.problem))
            .collect();
        Some(format!(
            "{}: skipped {} bad row(s): {}{}",
            self.path.display(),
            self.skipped.len(),
            first.join("; "),
            if self.skipped.len() > 5 { "; …" } else { "" }
        ))
    }
}

/// An example encoded for training.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Encoder input: `encode(query)` truncated to `max_len`.
    pub input_ids: Vec<u32>,
    /// Decoder input: `[decoder_start] + labels[:-1]`.
    pub decoder_input_ids: Vec<u32>,
    /// Targets: `encode(keyword) + [eos]` truncated to `max_len`.
    pub labels: Vec<u32>,
}

impl Encoded {
    /// Tokens the loss is computed over.
    pub fn label_tokens(&self) -> usize {
        self.labels.len()
    }
}

/// Encodes examples exactly as the original recipe did (see [`Encoded`]).
pub fn encode_examples(
    tok: &KoTokenizer,
    examples: &[Example],
    max_len: usize,
) -> Result<Vec<Encoded>> {
    let queries: Vec<&str> = examples.iter().map(|e| e.query.as_str()).collect();
    let keywords: Vec<&str> = examples.iter().map(|e| e.keyword.as_str()).collect();
    let q = tok.encode_batch(&queries)?;
    let k = tok.encode_batch(&keywords)?;
    let special = tok.special();
    q.into_iter()
        .zip(k)
        .zip(examples)
        .map(|((mut input_ids, mut labels), ex)| {
            if input_ids.is_empty() {
                return Err(Error::Invalid(format!(
                    "line {}: query {:?} has no tokens",
                    ex.line, ex.query
                )));
            }
            input_ids.truncate(max_len);
            labels.push(special.eos[0]);
            labels.truncate(max_len);
            let mut decoder_input_ids = vec![special.decoder_start];
            decoder_input_ids.extend_from_slice(&labels[..labels.len() - 1]);
            Ok(Encoded {
                input_ids,
                decoder_input_ids,
                labels,
            })
        })
        .collect()
}

/// A padded batch on a device.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `(b, s)` encoder ids, right-padded.
    pub input_ids: Tensor,
    /// `(b, s)` 1 for real tokens.
    pub attention_mask: Tensor,
    /// `(b, t)` decoder ids, right-padded.
    pub decoder_input_ids: Tensor,
    /// `(b, t)` 1 for real decoder positions.
    pub decoder_attention_mask: Tensor,
    /// `(b, t)` targets (pad where masked).
    pub labels: Tensor,
    /// Rows in the batch.
    pub rows: usize,
    /// Label tokens the loss covers.
    pub label_tokens: usize,
    /// Encoder plus decoder tokens (for tokens/s).
    pub tokens: usize,
}

fn pad_rows(rows: &[&[u32]], pad: u32) -> (Vec<u32>, Vec<u8>, usize) {
    let width = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(rows.len() * width);
    let mut mask = Vec::with_capacity(rows.len() * width);
    for r in rows {
        ids.extend_from_slice(r);
        ids.extend(std::iter::repeat_n(pad, width - r.len()));
        mask.extend(std::iter::repeat_n(1u8, r.len()));
        mask.extend(std::iter::repeat_n(0u8, width - r.len()));
    }
    (ids, mask, width)
}

impl Batch {
    /// Pads `items` to their longest row (not to `max_len`) and moves them to `device`.
    pub fn build(items: &[&Encoded], pad: u32, device: &Device) -> Result<Self> {
        let b = items.len();
        let inputs: Vec<&[u32]> = items.iter().map(|e| e.input_ids.as_slice()).collect();
        let decs: Vec<&[u32]> = items
            .iter()
            .map(|e| e.decoder_input_ids.as_slice())
            .collect();
        let labels: Vec<&[u32]> = items.iter().map(|e| e.labels.as_slice()).collect();
        let (ids, mask, s) = pad_rows(&inputs, pad);
        let (dec, dec_mask, t) = pad_rows(&decs, pad);
        let (lab, _, _) = pad_rows(&labels, pad);
        let label_tokens = items.iter().map(|e| e.label_tokens()).sum();
        let tokens = items
            .iter()
            .map(|e| e.input_ids.len() + e.decoder_input_ids.len())
            .sum();
        Ok(Self {
            input_ids: Tensor::from_vec(ids, (b, s), device)?,
            attention_mask: Tensor::from_vec(mask, (b, s), device)?,
            decoder_input_ids: Tensor::from_vec(dec, (b, t), device)?,
            decoder_attention_mask: Tensor::from_vec(dec_mask, (b, t), device)?,
            labels: Tensor::from_vec(lab, (b, t), device)?,
            rows: b,
            label_tokens,
            tokens,
        })
    }
}

/// The order of rows for one epoch, as batches of indices.
///
/// Rows are shuffled with a generator seeded by `(seed, epoch)`. With `bucket`, rows are then
/// sorted by length inside windows of 50 batches, cut into batches, and the batches shuffled
/// again — batches of similar lengths waste little padding, yet the order stays random.
pub fn epoch_batches(
    lengths: &[usize],
    batch_size: usize,
    seed: u64,
    epoch: usize,
    bucket: bool,
) -> Vec<Vec<usize>> {
    let mut rng =
        rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9));
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(&mut rng);
    if !bucket {
        return order.chunks(batch_size).map(<[usize]>::to_vec).collect();
    }
    let mut batches = Vec::new();
    for window in order.chunks(batch_size * 50) {
        let mut w = window.to_vec();
        w.sort_by_key(|&i| lengths[i]);
        batches.extend(w.chunks(batch_size).map(<[usize]>::to_vec));
    }
    batches.shuffle(&mut rng);
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Dataset> {
        Dataset::parse_tsv(text.as_bytes(), Path::new("data/train.tsv"), false)
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn reads_columns_in_any_order_with_bom_crlf_and_quotes() {
        let d = parse(
            "\u{feff}id\tkeyword\tquery\r\n1\t가, 나\t\"따옴표 \"\"질문\"\"\"\r\n2\t다\t둘째\r\n",
        )
        .unwrap();
        assert_eq!(d.examples.len(), 2);
        assert_eq!(d.examples[0].query, "따옴표 \"질문\"");
        assert_eq!(d.examples[0].keyword, "가, 나");
        assert_eq!(d.examples[1].line, 3);
    }

    #[test]
    fn wrong_field_count_names_the_line() {
        let e = err("query\tkeyword\n질문\t답\n질문만\n");
        assert!(
            e.contains("data/train.tsv: line 3") && e.contains("found 1"),
            "{e}"
        );
    }

    #[test]
    fn empty_fields_name_the_field() {
        let e = err("query\tkeyword\n질문\t \n");
        assert!(
            e.contains("line 2") && e.contains("`keyword` is empty"),
            "{e}"
        );
        let e = err("query\tkeyword\n\t답\n");
        assert!(
            e.contains("line 2") && e.contains("`query` is empty"),
            "{e}"
        );
    }

    #[test]
    fn invalid_utf8_names_the_line() {
        let mut bytes = b"query\tkeyword\n".to_vec();
        bytes.extend_from_slice(b"ok\tfine\n\xff\xfe\tbad\n");
        let e = Dataset::parse_tsv(&bytes, Path::new("x.tsv"), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.tsv: line 3") && e.contains("UTF-8"), "{e}");
    }

    #[test]
    fn missing_columns_and_empty_files() {
        let e = err("question\tanswer\n가\t나\n");
        assert!(
            e.contains("`query` and `keyword`") && e.contains("question"),
            "{e}"
        );
        let e = err("");
        assert!(e.contains("empty"), "{e}");
        let e = err("query\tkeyword\n");
        assert!(e.contains("no data rows"), "{e}");
    }

    #[test]
    fn skip_bad_rows_reports_them() {
        let text = "query\tkeyword\n좋은\t행\n\t빈\n나쁜\n좋은2\t행2\n";
        let d = Dataset::parse_tsv(text.as_bytes(), Path::new("t.tsv"), true).unwrap();
        assert_eq!(d.examples.len(), 2);
        assert_eq!(
            d.skipped.iter().map(|b| b.line).collect::<Vec<_>>(),
            vec![3, 4]
        );
        let s = d.skipped_summary().unwrap();
        assert!(s.contains("skipped 2") && s.contains("line 3"), "{s}");
    }

    #[test]
    fn epochs_shuffle_deterministically_and_cover_every_row() {
        let lengths: Vec<usize> = (0..103).map(|i| i % 17).collect();
        for bucket in [false, true] {
            let a = epoch_batches(&lengths, 8, 7, 0, bucket);
            assert_eq!(a, epoch_batches(&lengths, 8, 7, 0, bucket));
            assert_ne!(a, epoch_batches(&lengths, 8, 7, 1, bucket));
            let mut all: Vec<usize> = a.iter().flatten().copied().collect();
            all.sort();
            assert_eq!(all, (0..103).collect::<Vec<_>>());
            assert_eq!(a.len(), 13);
        }
    }
}
