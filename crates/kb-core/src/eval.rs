//! Keyword quality metrics, shared by every tool that reports quality (`kb-eval`, training
//! reports, scripts scoring a predictions file).
//!
//! ## Definitions
//!
//! Each row has a gold keyword list and a predicted one. Both are first turned into **sets**
//! by [`keyword_set`]: every keyword is trimmed and put in Unicode NFC
//! ([`normalize_keyword`]), mapped to its canonical spelling when a [`Synonyms`] table is
//! given, and empty keywords and repeats are dropped (a keyword listed twice counts once).
//! Keywords are then compared by [`Matching::key`]: by default **whitespace inside a keyword
//! is ignored** (`가능여부` = `가능 여부`: a spacing variant is the same knowledge-graph node);
//! with [`Matching::strict_spacing`] the strings must be equal. Comparison is case-sensitive
//! (synonym matching itself ignores the case of Latin letters).
//!
//! For a row with gold set `G` and predicted set `P`, the true positives are `|G ∩ P|`.
//! - **Row precision** is `|G ∩ P| / |P|`, **row recall** `|G ∩ P| / |G|`, **row F1** their
//!   harmonic mean `2PR / (P + R)`. A row whose gold and prediction are both empty scores
//!   P = R = F1 = 1; otherwise an empty denominator gives 0 (an empty prediction for a non-empty
//!   gold has P = R = 0), and F1 is 0 when P + R = 0.
//! - **Macro** precision, recall and F1 are the means of the row values over rows.
//! - **Micro** precision, recall and F1 are computed once from the true positives, predicted
//!   and gold keywords summed over all rows, with the same empty-denominator rule.
//! - **Exact match** is the share of rows whose predicted set equals the gold set (order is
//!   ignored).
//! - **Mean keywords per row** counts set sizes, for the gold and the predicted side.

use std::collections::HashMap;
use std::path::Path;

use serde::Serialize;

use crate::error::Result;
pub use crate::synonyms::normalize_keyword;
use crate::synonyms::Synonyms;

/// How two keywords are compared.
#[derive(Debug, Clone, Copy, Default)]
pub struct Matching<'a> {
    /// Map variants to their canonical term first.
    pub synonyms: Option<&'a Synonyms>,
    /// Compare whitespace too (`가능여부` ≠ `가능 여부`); by default it is ignored.
    pub strict_spacing: bool,
}

impl<'a> Matching<'a> {
    /// The default matching (whitespace ignored) with `synonyms`.
    pub fn with_synonyms(synonyms: Option<&'a Synonyms>) -> Self {
        Self {
            synonyms,
            ..Self::default()
        }
    }

    /// A keyword as shown: normalised ([`normalize_keyword`]) or its canonical spelling.
    pub fn shown(&self, keyword: &str) -> String {
        match self.synonyms {
            Some(s) => s.canonical(keyword).into_owned(),
            None => normalize_keyword(keyword),
        }
    }

    /// What keywords are compared on: [`Matching::shown`], without whitespace unless
    /// [`Matching::strict_spacing`].
    pub fn key(&self, keyword: &str) -> String {
        let shown = self.shown(keyword);
        if self.strict_spacing {
            shown
        } else {
            shown.chars().filter(|c| !c.is_whitespace()).collect()
        }
    }
}

/// The keyword set of one side of a row, as shown ([`Matching::shown`]), without empty
/// keywords and without repeats by [`Matching::key`], in first appearance order.
pub fn keyword_set(keywords: &[String], matching: &Matching<'_>) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(keywords.len());
    let mut keys: Vec<String> = Vec::with_capacity(keywords.len());
    for kw in keywords {
        let key = matching.key(kw);
        if !key.is_empty() && !keys.contains(&key) {
            keys.push(key);
            out.push(matching.shown(kw));
        }
    }
    out
}

/// `num / den`, or (when `den` is 0) 1 if `both_empty` (nothing to find and nothing found)
/// else 0.
fn ratio(num: usize, den: usize, both_empty: bool) -> f64 {
    if den == 0 {
        if both_empty {
            1.0
        } else {
            0.0
        }
    } else {
        num as f64 / den as f64
    }
}

fn f1(p: f64, r: f64) -> f64 {
    if p + r == 0.0 {
        0.0
    } else {
        2.0 * p * r / (p + r)
    }
}

/// Precision, recall and F1.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Prf {
    /// Share of predicted keywords that are gold keywords.
    pub precision: f64,
    /// Share of gold keywords that were predicted.
    pub recall: f64,
    /// Harmonic mean of precision and recall.
    pub f1: f64,
}

impl Prf {
    /// The scores of `tp` true positives among `predicted` predicted and `gold` gold keywords.
    pub fn from_counts(tp: usize, predicted: usize, gold: usize) -> Self {
        let both_empty = predicted == 0 && gold == 0;
        let precision = ratio(tp, predicted, both_empty);
        let recall = ratio(tp, gold, both_empty);
        Self {
            precision,
            recall,
            f1: f1(precision, recall),
        }
    }
}

/// The comparison of one row's gold and predicted keywords.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RowScore {
    /// Gold keyword set ([`keyword_set`]).
    pub gold: Vec<String>,
    /// Predicted keyword set ([`keyword_set`]).
    pub predicted: Vec<String>,
    /// Gold keywords not predicted, in gold order.
    pub missed: Vec<String>,
    /// Predicted keywords not in the gold set, in predicted order.
    pub extra: Vec<String>,
    /// Number of predicted keywords that are gold keywords.
    pub true_positives: usize,
    /// Row precision, recall and F1.
    pub scores: Prf,
    /// Whether the two sets are equal.
    pub exact: bool,
}

impl RowScore {
    /// Compares `gold` with `predicted` as [`keyword_set`]s under `matching`.
    pub fn new(gold: &[String], predicted: &[String], matching: &Matching<'_>) -> Self {
        let gold = keyword_set(gold, matching);
        let predicted = keyword_set(predicted, matching);
        let keys =
            |set: &[String]| -> Vec<String> { set.iter().map(|k| matching.key(k)).collect() };
        let (gold_keys, predicted_keys) = (keys(&gold), keys(&predicted));
        let missed: Vec<String> = gold
            .iter()
            .zip(&gold_keys)
            .filter(|(_, key)| !predicted_keys.contains(key))
            .map(|(k, _)| k.clone())
            .collect();
        let extra: Vec<String> = predicted
            .iter()
            .zip(&predicted_keys)
            .filter(|(_, key)| !gold_keys.contains(key))
            .map(|(k, _)| k.clone())
            .collect();
        let true_positives = gold.len() - missed.len();
        let scores = Prf::from_counts(true_positives, predicted.len(), gold.len());
        Self {
            exact: missed.is_empty() && extra.is_empty(),
            gold,
            predicted,
            missed,
            extra,
            true_positives,
            scores,
        }
    }
}

/// Keyword counts summed over rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Rows scored.
    pub rows: usize,
    /// Predicted keywords that are gold keywords.
    pub true_positives: usize,
    /// Predicted keywords (set sizes summed).
    pub predicted: usize,
    /// Gold keywords (set sizes summed).
    pub gold: usize,
    /// Rows whose predicted set equals the gold set.
    pub exact: usize,
}

/// Corpus-level scores (see the module documentation for the definitions).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Micro-averaged precision, recall and F1 (from counts summed over rows).
    pub micro: Prf,
    /// Macro-averaged precision, recall and F1 (means of the row values).
    #[serde(rename = "macro")]
    pub macro_: Prf,
    /// Share of rows whose predicted set equals the gold set.
    pub exact_match: f64,
    /// Mean size of the predicted keyword sets.
    pub mean_predicted: f64,
    /// Mean size of the gold keyword sets.
    pub mean_gold: f64,
    /// The sums behind the figures.
    pub counts: Counts,
}

/// Accumulates rows and produces a [`Summary`].
#[derive(Debug, Clone, Default)]
pub struct Scorer {
    counts: Counts,
    sum_p: f64,
    sum_r: f64,
    sum_f1: f64,
}

impl Scorer {
    /// An empty scorer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one scored row.
    pub fn add(&mut self, row: &RowScore) {
        self.counts.rows += 1;
        self.counts.true_positives += row.true_positives;
        self.counts.predicted += row.predicted.len();
        self.counts.gold += row.gold.len();
        self.counts.exact += usize::from(row.exact);
        self.sum_p += row.scores.precision;
        self.sum_r += row.scores.recall;
        self.sum_f1 += row.scores.f1;
    }

    /// The scores of the rows added so far (all zero when there are none).
    pub fn summary(&self) -> Summary {
        let c = self.counts;
        let mean = |x: f64| if c.rows == 0 { 0.0 } else { x / c.rows as f64 };
        Summary {
            micro: if c.rows == 0 {
                Prf::from_counts(0, 0, 1)
            } else {
                Prf::from_counts(c.true_positives, c.predicted, c.gold)
            },
            macro_: Prf {
                precision: mean(self.sum_p),
                recall: mean(self.sum_r),
                f1: mean(self.sum_f1),
            },
            exact_match: mean(c.exact as f64),
            mean_predicted: mean(c.predicted as f64),
            mean_gold: mean(c.gold as f64),
            counts: c,
        }
    }
}

/// Scores `(gold, predicted)` keyword lists row by row under `matching`; returns the row scores
/// and the summary.
pub fn evaluate<'a, I>(rows: I, matching: &Matching<'_>) -> (Vec<RowScore>, Summary)
where
    I: IntoIterator<Item = (&'a [String], &'a [String])>,
{
    let mut scorer = Scorer::new();
    let scored: Vec<RowScore> = rows
        .into_iter()
        .map(|(g, p)| {
            let row = RowScore::new(g, p, matching);
            scorer.add(&row);
            row
        })
        .collect();
    (scored, scorer.summary())
}

/// One row of a predictions file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prediction {
    /// The question, as written in the file.
    pub query: String,
    /// Its predicted keywords (split with [`crate::keywords::split_keywords`]; may be empty).
    pub keywords: Vec<String>,
    /// 1-based line number in the file.
    pub line: usize,
}

/// Predictions read from a file, indexed by query.
#[derive(Debug, Clone, Default)]
pub struct Predictions {
    /// Rows in file order.
    pub rows: Vec<Prediction>,
    by_query: HashMap<String, usize>,
}

impl Predictions {
    /// Reads a predictions TSV: a header with a `query` column and a `keyword` column (the data
    /// format) or a `keywords` column (`kb-extract`'s TSV output); other columns are ignored.
    /// Keywords are comma-separated and may be empty (an empty prediction). A row with the
    /// wrong number of fields, an empty query, or a query already seen (after
    /// [`normalize_keyword`]) is an error naming the file and line.
    pub fn read_tsv(path: &Path) -> Result<Self> {
        Self::parse_tsv(&crate::tsv::read_bytes(path)?, path)
    }

    /// Parses predictions TSV bytes ([`crate::tsv`]'s format); `path` names the file in
    /// messages.
    pub fn parse_tsv(bytes: &[u8], path: &Path) -> Result<Self> {
        let reader = crate::tsv::Reader::new(bytes, path)?;
        let keyword_col = reader
            .column("keyword")
            .or_else(|| reader.column("keywords"));
        let (Some(qcol), Some(kcol)) = (reader.column("query"), keyword_col) else {
            return Err(reader.error(
                reader.header_line(),
                format!(
                    "the header must contain a `query` and a `keyword` (or `keywords`) column, tab-separated; found {:?}",
                    reader.header()
                ),
            ));
        };
        let mut out = Self::default();
        for row in reader {
            let row = row.map_err(|e| crate::tsv::line_error(path, e.line, e.problem))?;
            let (line, query) = (row.line, &row.fields[qcol]);
            let fail = |problem: String| crate::tsv::line_error(path, line, problem);
            if query.is_empty() {
                return Err(fail("field `query` is empty".into()));
            }
            let key = normalize_keyword(query);
            if let Some(&first) = out.by_query.get(&key) {
                return Err(fail(format!(
                    "query {query:?} already appears at line {}",
                    out.rows[first].line
                )));
            }
            out.by_query.insert(key, out.rows.len());
            out.rows.push(Prediction {
                query: query.clone(),
                keywords: crate::keywords::split_keywords(&row.fields[kcol]),
                line,
            });
        }
        Ok(out)
    }

    /// The prediction for `query` (matched after [`normalize_keyword`]).
    pub fn get(&self, query: &str) -> Option<&Prediction> {
        self.by_query
            .get(&normalize_keyword(query))
            .map(|&i| &self.rows[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kws(s: &str) -> Vec<String> {
        crate::keywords::split_keywords(s)
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn hand_computed_rows_and_corpus() {
        // Row 1: gold {a,b,c,d}, pred {a,b,x}: tp 2, P 2/3, R 1/2, F1 4/7.
        // Row 2: gold {e,f}, pred {e,f}: exact.
        // Row 3: gold {g}, pred {}: P 0, R 0, F1 0.
        let gold = [kws("a, b, c, d"), kws("e, f"), kws("g")];
        let pred = [kws("a, x, b"), kws("f, e"), vec![]];
        let (rows, s) = evaluate(
            gold.iter()
                .zip(pred.iter())
                .map(|(g, p)| (g.as_slice(), p.as_slice())),
            &Matching::default(),
        );
        assert_eq!(rows[0].missed, ["c", "d"]);
        assert_eq!(rows[0].extra, ["x"]);
        assert!(close(rows[0].scores.f1, 4.0 / 7.0));
        assert!(rows[1].exact && !rows[0].exact && !rows[2].exact);
        assert_eq!(
            s.counts,
            Counts {
                rows: 3,
                true_positives: 4,
                predicted: 5,
                gold: 7,
                exact: 1
            }
        );
        // Micro: P 4/5, R 4/7, F1 = 2*(4/5)(4/7)/((4/5)+(4/7)) = 2/3.
        assert!(close(s.micro.precision, 0.8));
        assert!(close(s.micro.recall, 4.0 / 7.0));
        assert!(close(s.micro.f1, 2.0 / 3.0));
        // Macro: P (2/3 + 1 + 0)/3, R (1/2 + 1 + 0)/3, F1 (4/7 + 1 + 0)/3.
        assert!(close(s.macro_.precision, 5.0 / 9.0));
        assert!(close(s.macro_.recall, 0.5));
        assert!(close(s.macro_.f1, 11.0 / 21.0));
        assert!(close(s.exact_match, 1.0 / 3.0));
        assert!(close(s.mean_predicted, 5.0 / 3.0));
        assert!(close(s.mean_gold, 7.0 / 3.0));
    }

    #[test]
    fn duplicates_count_once_after_normalisation() {
        // " a", "a" and the NFD spelling of "직구" collapse; gold {a, 직구}, pred {a, 직구}.
        let nfd: String = unicode_normalization::UnicodeNormalization::nfd("직구").collect();
        let gold = vec!["a".to_string(), " a ".to_string(), "직구".to_string()];
        let pred = vec!["a".to_string(), nfd, "a".to_string(), "직구".to_string()];
        let r = RowScore::new(&gold, &pred, &Matching::default());
        assert_eq!(
            (r.gold.len(), r.predicted.len(), r.true_positives),
            (2, 2, 2)
        );
        assert!(r.exact);
        assert_eq!(r.scores, Prf::from_counts(2, 2, 2));
        assert!(close(r.scores.f1, 1.0));
    }

    #[test]
    fn synonyms_fold_variants_before_scoring() {
        let syn = Synonyms::parse(
            "해외직구\t직구\n개인통관고유부호\t통관번호\n",
            Path::new("s.tsv"),
        )
        .unwrap();
        let gold = kws("직구, 통관번호, 관세, 방법");
        let pred = kws("해외직구, 개인통관고유부호, 직구, 관세");
        let plain = RowScore::new(&gold, &pred, &Matching::default());
        // Without synonyms: pred {해외직구, 개인통관고유부호, 직구, 관세}, tp {직구, 관세}.
        assert_eq!(plain.true_positives, 2);
        assert!(close(plain.scores.precision, 0.5) && close(plain.scores.recall, 0.5));
        // With: gold {해외직구, 개인통관고유부호, 관세, 방법}, pred {해외직구, 개인통관고유부호, 관세}.
        let mapped = RowScore::new(&gold, &pred, &Matching::with_synonyms(Some(&syn)));
        assert_eq!(mapped.predicted, ["해외직구", "개인통관고유부호", "관세"]);
        assert_eq!(mapped.true_positives, 3);
        assert_eq!(mapped.missed, ["방법"]);
        assert!(mapped.extra.is_empty());
        assert!(close(mapped.scores.precision, 1.0));
        assert!(close(mapped.scores.recall, 0.75));
        assert!(close(mapped.scores.f1, 6.0 / 7.0));
    }

    #[test]
    fn whitespace_inside_keywords_is_ignored_unless_strict() {
        let gold = kws("가능 여부, 여행자 휴대품 신고, 관세");
        let pred = kws("가능여부, 여행자휴대품 신고, 관 세, 가능 여부");
        let r = RowScore::new(&gold, &pred, &Matching::default());
        assert!(r.exact, "{r:?}");
        assert_eq!(r.predicted, ["가능여부", "여행자휴대품 신고", "관 세"]);
        let strict = Matching {
            strict_spacing: true,
            ..Matching::default()
        };
        let r = RowScore::new(&gold, &pred, &strict);
        // Only `가능 여부`, also predicted with its space, matches strictly.
        assert_eq!(r.true_positives, 1);
        assert_eq!(r.predicted.len(), 4);
    }

    #[test]
    fn empty_rows() {
        let none: Vec<String> = vec![];
        let both = RowScore::new(&none, &none, &Matching::default());
        assert_eq!(
            both.scores,
            Prf {
                precision: 1.0,
                recall: 1.0,
                f1: 1.0
            }
        );
        assert!(both.exact);
        let extra_only = RowScore::new(&none, &kws("a"), &Matching::default());
        assert_eq!(
            extra_only.scores,
            Prf {
                precision: 0.0,
                recall: 0.0,
                f1: 0.0
            }
        );
        // Micro over two empty rows is 1; over an empty scorer everything is 0.
        let mut s = Scorer::new();
        assert_eq!(s.summary().micro.f1, 0.0);
        s.add(&both);
        s.add(&both);
        assert_eq!(s.summary().micro.f1, 1.0);
        assert_eq!(s.summary().exact_match, 1.0);
    }

    #[test]
    fn predictions_files() {
        let p = Predictions::parse_tsv(
            "\u{feff}query\tkeywords\ttext\r\n q1 \ta, b, a\tx\r\nq2\t\t\n".as_bytes(),
            Path::new("p.tsv"),
        )
        .unwrap();
        assert_eq!(p.rows.len(), 2);
        assert_eq!(p.get("q1").unwrap().keywords, ["a", "b"]);
        assert!(p.get("q2").unwrap().keywords.is_empty());
        assert_eq!(p.get("q2").unwrap().line, 3);
        assert!(p.get("q3").is_none());

        let e = Predictions::parse_tsv(b"query\tkeyword\nq\ta\nq\tb\n", Path::new("p.tsv"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("p.tsv: line 3:") && e.contains("line 2"), "{e}");
        let e = Predictions::parse_tsv(b"query\tkeyword\nq\ta\tz\n", Path::new("p.tsv"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("p.tsv: line 2:") && e.contains("fields"), "{e}");
        let e = Predictions::parse_tsv(b"q\tk\n", Path::new("p.tsv"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("p.tsv: line 1:") && e.contains("header"), "{e}");
    }
}
