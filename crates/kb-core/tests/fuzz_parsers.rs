//! Property tests ("fuzzing") of every parser that reads what a user or a file hands kb-core:
//! the TSV reader and the data, predictions and synonyms files built on it, `config.json` and
//! `generation_config.json`, and the tokenizer front end (encoding, decoding, the grounded
//! decoding constraint). Each target feeds arbitrary input (bytes, JSON values, Unicode) and
//! input shaped like the real thing (files written by `tsv::write_row`, the fixture configs with
//! fields dropped or changed) and checks that nothing panics and that every refusal is an error
//! naming the file and the line (`FILE: line N: …`) or the field (`FILE: field `F`: …`).
//!
//! Every target runs 256 cases by default, a few seconds in all; `PROPTEST_CASES=N` runs N cases
//! of each (and prints every target's rate with `--nocapture`). One target, long:
//!
//! ```text
//! PROPTEST_CASES=1000000 cargo test -p kb-core --features cli --test fuzz_parsers \
//!     tsv_arbitrary_bytes -- --nocapture
//! ```
//!
//! A failure prints the shrunk input; nothing is written to disk (no regression files): a bug
//! found here gets a plain regression test next to the code it fixes.

mod common;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::OnceLock;
use std::time::Instant;

use kb_core::candle_core::{DType, Device};
use kb_core::data::Dataset;
use kb_core::eval::Predictions;
use kb_core::generation::{DerivedTerms, Grounding};
use kb_core::synonyms::{normalize_keyword, Synonyms};
use kb_core::tsv;
use kb_core::{BartConfig, GenerationConfig, KeywordModel, KoTokenizer};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};
use serde_json::{Map, Number, Value};
use unicode_normalization::UnicodeNormalization;

// ---------------------------------------------------------------------------------------------
// Running a target
// ---------------------------------------------------------------------------------------------

/// `PROPTEST_CASES`, else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// How the cases of a target ended (`"ok"`, `"error"`, …), counted, to show (and, on a full
/// run, check) that the generators reach every outcome.
#[derive(Default)]
struct Tally(RefCell<BTreeMap<&'static str, u64>>);

impl Tally {
    fn add(&self, outcome: &'static str) {
        *self.0.borrow_mut().entry(outcome).or_default() += 1;
    }
}

/// Runs `test` on `default_cases` (or `PROPTEST_CASES`) values of `strategy`, prints the rate,
/// and checks that every outcome of `expected` was seen when at least 256 cases ran.
fn run<S: Strategy>(
    name: &str,
    default_cases: u32,
    expected: &[&str],
    strategy: S,
    test: impl Fn(S::Value, &Tally) -> Result<(), TestCaseError>,
) {
    let config = ProptestConfig {
        cases: cases(default_cases),
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let tally = Tally::default();
    let started = Instant::now();
    TestRunner::new(config.clone())
        .run(&strategy, |v| test(v, &tally))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let took = started.elapsed().as_secs_f64();
    let tally = tally.0.into_inner();
    eprintln!(
        "{name}: {} cases in {took:.1} s ({:.0} cases/s); outcomes {tally:?}",
        config.cases,
        f64::from(config.cases) / took
    );
    if config.cases >= 256 {
        for outcome in expected {
            assert!(
                tally.contains_key(outcome),
                "{name}: no `{outcome}` case in {tally:?}"
            );
        }
    }
}

/// A temporary folder for files the readers read back, in memory (`/dev/shm`) where there is
/// one: writing a file per case to disk is most of a case's time otherwise.
fn scratch_dir() -> tempfile::TempDir {
    tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("temporary folder")
}

/// Lines of `bytes` as an editor shows them (at least 1; a final `\n` ends the last line).
fn line_count(bytes: &[u8]) -> usize {
    let newlines = bytes.iter().filter(|&&b| b == b'\n').count();
    (newlines + usize::from(bytes.last().is_some_and(|&b| b != b'\n'))).max(1)
}

/// Checks that `message` is `PATH: line N: …` with `1 ≤ N ≤ lines`; returns N.
fn line_of_error(message: &str, path: &Path, lines: usize) -> Result<usize, TestCaseError> {
    let prefix = format!("{}: line ", path.display());
    let rest = message.strip_prefix(&prefix).ok_or_else(|| {
        TestCaseError::fail(format!("{message:?} does not start with {prefix:?}"))
    })?;
    let digits = rest.find(": ").map(|end| &rest[..end]);
    let line: usize = digits.and_then(|d| d.parse().ok()).ok_or_else(|| {
        TestCaseError::fail(format!("{message:?}: no `line N: ` after the file name"))
    })?;
    prop_assert!(
        (1..=lines).contains(&line),
        "{message:?}: line {line} is not one of the file's {lines} lines"
    );
    Ok(line)
}

// ---------------------------------------------------------------------------------------------
// TSV files
// ---------------------------------------------------------------------------------------------

const TSV_PATH: &str = "fuzz/데이터 파일.tsv";

/// A piece of a TSV file: a delimiter, a line break, a quote, a column name, a BOM, NUL, bytes
/// that are not UTF-8, Hangul (composed or as jamo), or any character or byte.
fn tsv_chunk() -> impl Strategy<Value = Vec<u8>> {
    let pieces: Vec<&'static [u8]> = vec![
        b"\t",
        b"\t",
        b"\n",
        b"\r\n",
        b"\r",
        b"\"",
        b"\"\"",
        b" ",
        b"query",
        b"keyword",
        b"keywords",
        b"\xEF\xBB\xBF",
        b"\0",
        b"\xFF",
        b"\xC3",
        b"\xE0\x80",
        b"\xED\xA0\x80",
        "가".as_bytes(),
        "\u{1100}\u{1161}".as_bytes(),
        "\u{3000}".as_bytes(),
        b"#",
        b",",
        b"q",
        b"k",
    ];
    prop_oneof![
        6 => prop::sample::select(pieces).prop_map(<[u8]>::to_vec),
        1 => any::<char>().prop_map(|c| c.to_string().into_bytes()),
        1 => any::<u8>().prop_map(|b| vec![b]),
    ]
}

/// Bytes for a TSV reader: a soup of [`tsv_chunk`]s (maybe after a BOM, maybe after a header
/// the data readers accept, so that their row checks run), or any bytes at all.
fn tsv_bytes() -> impl Strategy<Value = Vec<u8>> {
    let header = || {
        prop::sample::select(vec![
            "",
            "query\tkeyword\n",
            "keyword\tquery\r\n",
            "query\tkeywords\n",
            "id\tquery\tkeyword\n",
            "\n\nquery\tkeyword\tkeywords\n",
            "query\n",
        ])
    };
    prop_oneof![
        4 => (any::<bool>(), header(), vec(tsv_chunk(), 0..80)).prop_map(|(bom, header, chunks)| {
            let mut out = if bom { b"\xEF\xBB\xBF".to_vec() } else { Vec::new() };
            out.extend_from_slice(header.as_bytes());
            out.extend(chunks.into_iter().flatten());
            out
        }),
        1 => vec(any::<u8>(), 0..300),
        2 => (header(), vec(tsv_line(), 0..8), vec((any::<prop::sample::Index>(), tsv_chunk()), 0..3))
            .prop_map(|(header, lines, splices)| {
                let mut out = header.as_bytes().to_vec();
                out.extend(lines.into_iter().flatten());
                for (at, chunk) in splices {
                    let at = at.index(out.len() + 1);
                    out.splice(at..at, chunk);
                }
                out
            }),
    ]
}

/// A line of short cells (maybe quoted) separated by tabs, with its line break.
fn tsv_line() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![3 => Just(2..3usize), 1 => Just(1..5usize)]
            .prop_flat_map(|n| vec("[가-힣a-z ]{0,6}|\"[가-힣a-z\t\n\" ]{0,6}\"", n)),
        prop::sample::select(vec!["\n", "\r\n", "\r", ""]),
    )
        .prop_map(|(cells, eol)| format!("{}{eol}", cells.join("\t")).into_bytes())
}

/// What the reader made of a file: the header (or the error), and the rows.
struct Read {
    /// The header and its line, or the line of the error.
    header: Result<(Vec<String>, usize), usize>,
    rows: Vec<Result<tsv::Record, tsv::RowError>>,
}

/// Reads `bytes` with [`tsv::Reader`] and checks what every reader promises: errors name the
/// file and a line of it; rows come in file order, after the header, with as many fields as the
/// header, trimmed and in NFC.
fn read_checked(bytes: &[u8], path: &Path) -> Result<Read, TestCaseError> {
    let lines = line_count(bytes);
    let reader = match tsv::Reader::new(bytes, path) {
        Ok(r) => r,
        Err(e) => {
            let line = line_of_error(&e.to_string(), path, lines)?;
            return Ok(Read {
                header: Err(line),
                rows: Vec::new(),
            });
        }
    };
    let header = reader.header().to_vec();
    let header_line = reader.header_line();
    prop_assert!((1..=lines).contains(&header_line));
    prop_assert!(!header.is_empty());
    for h in &header {
        prop_assert_eq!(h, &tsv::clean_field(h));
    }
    let mut rows = Vec::new();
    let mut last = header_line;
    for row in reader {
        let line = match &row {
            Ok(r) => {
                prop_assert_eq!(r.fields.len(), header.len(), "{:?}", r);
                for f in &r.fields {
                    prop_assert_eq!(f, &tsv::clean_field(f));
                }
                r.line
            }
            Err(e) => {
                line_of_error(
                    &tsv::line_error(path, e.line, &e.problem).to_string(),
                    path,
                    lines,
                )?;
                e.line
            }
        };
        prop_assert!(
            line >= last && line <= lines,
            "row at line {line} after line {last} (of {lines}): {row:?}"
        );
        last = line;
        rows.push(row);
        prop_assert!(rows.len() <= bytes.len(), "more rows than bytes");
    }
    Ok(Read {
        header: Ok((header, header_line)),
        rows,
    })
}

/// What [`Dataset::parse_tsv`] must make of a file the reader read as `read`: `Ok(examples)` as
/// `(query, keyword, line)`, or the line of the error.
fn expected_dataset(
    read: &Read,
    skip_bad_rows: bool,
) -> Result<Vec<(String, String, usize)>, usize> {
    let (header, header_line) = match &read.header {
        Err(line) => return Err(*line),
        Ok(h) => h,
    };
    let col = |name: &str| header.iter().position(|h| h == name);
    let (Some(q), Some(k)) = (col("query"), col("keyword")) else {
        return Err(*header_line);
    };
    let mut examples = Vec::new();
    for row in &read.rows {
        match row {
            Ok(r) if !r.fields[q].is_empty() && !r.fields[k].is_empty() => {
                examples.push((r.fields[q].clone(), r.fields[k].clone(), r.line))
            }
            _ if skip_bad_rows => {}
            Ok(r) => return Err(r.line),
            Err(e) => return Err(e.line),
        }
    }
    if examples.is_empty() {
        return Err(1);
    }
    Ok(examples)
}

/// Checks [`Dataset::parse_tsv`] (both modes) and [`Predictions::parse_tsv`] on `bytes` against
/// what the reader made of them.
fn check_data_readers(bytes: &[u8], read: &Read, tally: &Tally) -> Result<(), TestCaseError> {
    let path = Path::new(TSV_PATH);
    let lines = line_count(bytes);
    for skip in [false, true] {
        let got = Dataset::parse_tsv(bytes, path, skip);
        match (got, expected_dataset(read, skip)) {
            (Ok(d), Ok(want)) => {
                let got: Vec<_> = d
                    .examples
                    .iter()
                    .map(|e| (e.query.clone(), e.keyword.clone(), e.line))
                    .collect();
                prop_assert_eq!(got, want);
                prop_assert!(skip || d.skipped.is_empty());
                for b in &d.skipped {
                    prop_assert!((1..=lines).contains(&b.line), "{:?}", b);
                }
                tally.add(if skip {
                    "dataset ok (skipping)"
                } else {
                    "dataset ok"
                });
            }
            (Err(e), Err(want)) => {
                let line = line_of_error(&e.to_string(), path, lines)?;
                prop_assert_eq!(line, want, "{}", e);
                tally.add("dataset error");
            }
            (got, want) => {
                return Err(TestCaseError::fail(format!(
                    "Dataset::parse_tsv (skip {skip}) gave {got:?}, expected {want:?}"
                )))
            }
        }
    }
    match Predictions::parse_tsv(bytes, path) {
        Ok(p) => {
            let mut seen = HashSet::new();
            for row in &p.rows {
                prop_assert!(!row.query.is_empty());
                prop_assert!(seen.insert(normalize_keyword(&row.query)), "{:?}", row);
                prop_assert!((1..=lines).contains(&row.line));
                prop_assert_eq!(p.get(&row.query), Some(row));
                for k in &row.keywords {
                    prop_assert!(!k.is_empty() && !k.contains([',', '，']), "{:?}", row);
                }
            }
            // Every row the reader read, in order.
            let read_lines: Vec<usize> = read.rows.iter().flatten().map(|r| r.line).collect();
            let got_lines: Vec<usize> = p.rows.iter().map(|r| r.line).collect();
            prop_assert_eq!(got_lines, read_lines);
            tally.add("predictions ok");
        }
        Err(e) => {
            line_of_error(&e.to_string(), path, lines)?;
            tally.add("predictions error");
        }
    }
    Ok(())
}

/// Any bytes: the reader, the data reader (both modes) and the predictions reader never panic,
/// refuse only with `FILE: line N: …` naming a line of the file, and agree with one another.
#[test]
fn tsv_arbitrary_bytes() {
    run(
        "tsv_arbitrary_bytes",
        256,
        &[
            "dataset ok (skipping)",
            "dataset error",
            "predictions error",
        ],
        tsv_bytes(),
        |bytes, tally| {
            let read = read_checked(&bytes, Path::new(TSV_PATH))?;
            check_data_readers(&bytes, &read, tally)
        },
    );
}

/// A field's text: anything, or the characters that need quoting or cleaning (tabs, line
/// breaks, quotes, leading/trailing spaces, NUL, decomposed Hangul, full-width spaces).
fn field_text() -> impl Strategy<Value = String> {
    let special = prop::sample::select(vec![
        "\t",
        "\n",
        "\r",
        "\r\n",
        "\"",
        "\"\"",
        " ",
        "  ",
        "\u{3000}",
        "\u{0B}",
        "\u{0C}",
        "\0",
        "\u{1100}\u{1161}",
        "가",
        "a",
        ",",
        "#",
        "\u{feff}",
        "e\u{301}",
        "\u{85}",
    ]);
    prop_oneof![
        2 => vec(special, 0..10).prop_map(|v| v.concat()),
        1 => "[가-힣a-z ,]{0,12}",
        1 => any::<String>(),
        1 => Just(String::new()),
    ]
}

/// How a file is laid out: BOM, CRLF line ends, blank lines before rows, final line break.
#[derive(Debug, Clone)]
struct Layout {
    bom: bool,
    crlf: bool,
    blank_lines_before: Vec<u8>,
    final_newline: bool,
}

fn layout(rows: usize) -> impl Strategy<Value = Layout> {
    (
        any::<bool>(),
        any::<bool>(),
        vec(prop_oneof![6 => Just(0u8), 1 => 1u8..3], rows + 1),
        prop_oneof![4 => Just(true), 1 => Just(false)],
    )
        .prop_map(|(bom, crlf, blank_lines_before, final_newline)| Layout {
            bom,
            crlf,
            blank_lines_before,
            final_newline,
        })
}

/// Writes `rows` (each already a line's bytes, ending in `\n`) as `layout` says; returns the
/// file and the 1-based line each row starts on.
fn lay_out(rows: &[Vec<u8>], layout: &Layout) -> (Vec<u8>, Vec<usize>) {
    let mut out = if layout.bom {
        b"\xEF\xBB\xBF".to_vec()
    } else {
        Vec::new()
    };
    let eol: &[u8] = if layout.crlf { b"\r\n" } else { b"\n" };
    let mut starts = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        for _ in 0..layout.blank_lines_before[i] {
            out.extend_from_slice(eol);
        }
        starts.push(out.iter().filter(|&&b| b == b'\n').count() + 1);
        let body = row.strip_suffix(b"\n").unwrap_or(row);
        out.extend_from_slice(body);
        let last = i + 1 == rows.len();
        if !last || layout.final_newline {
            out.extend_from_slice(eol);
        }
    }
    (out, starts)
}

fn written(fields: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    tsv::write_row(&mut out, fields).expect("writing to memory");
    out
}

/// Whether the reader skips a row of these fields as blank.
fn is_blank(fields: &[String]) -> bool {
    fields
        .iter()
        .all(|f| f.bytes().all(|b| b.is_ascii_whitespace()))
}

/// Rows written by `tsv::write_row`, with any header, layout, BOM and line ends, read back: the
/// same header, and every row that is not blank with its fields trimmed and in NFC, on the line
/// it was written on.
#[test]
fn tsv_written_rows_read_back() {
    let file = (1usize..6)
        .prop_flat_map(|cols| {
            let header = ("[a-z][a-z0-9_]{0,7}", vec(field_text(), cols - 1));
            let rows = vec(vec(field_text(), cols), 0..8);
            (header, rows)
        })
        .prop_flat_map(|(header, rows)| {
            let n = rows.len();
            (Just(header), Just(rows), layout(n + 1))
        });
    run(
        "tsv_written_rows_read_back",
        256,
        &["rows", "no rows"],
        file,
        |((first, rest), rows, layout), tally| {
            let header: Vec<String> = std::iter::once(first).chain(rest).collect();
            let lines: Vec<Vec<u8>> = std::iter::once(&header)
                .chain(&rows)
                .map(|f| written(f))
                .collect();
            let (bytes, starts) = lay_out(&lines, &layout);
            let path = Path::new(TSV_PATH);
            let reader = tsv::Reader::new(&bytes, path).map_err(|e| {
                TestCaseError::fail(format!("{e}: {:?}", String::from_utf8_lossy(&bytes)))
            })?;
            let want_header: Vec<String> = header.iter().map(|h| tsv::clean_field(h)).collect();
            prop_assert_eq!(reader.header(), want_header.as_slice());
            prop_assert_eq!(reader.header_line(), starts[0]);
            let got: Vec<tsv::Record> = reader
                .collect::<Result<_, _>>()
                .map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
            let want: Vec<tsv::Record> = rows
                .iter()
                .zip(&starts[1..])
                .filter(|(r, _)| !is_blank(r))
                .map(|(r, &line)| tsv::Record {
                    line,
                    fields: r.iter().map(|f| tsv::clean_field(f)).collect(),
                })
                .collect();
            tally.add(if want.is_empty() { "no rows" } else { "rows" });
            prop_assert_eq!(got, want, "file {:?}", String::from_utf8_lossy(&bytes));
            Ok(())
        },
    );
}

/// A way to damage one row of a data file.
#[derive(Debug, Clone, Copy)]
enum Damage {
    None,
    DropField,
    ExtraField,
    NotUtf8,
}

/// A query or keyword field: text, blank, or one of a few spellings of the same question (so
/// that predictions files repeat queries).
fn data_field() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[가-힣a-z ,]{1,12}",
        1 => prop::sample::select(vec!["같은 질문", " 같은 질문 ", "\u{1100}\u{1161}\u{11ab}\u{110b}\u{1173}\u{11ab} 질문", "", " ", "a, b ,, c"]).prop_map(String::from),
        1 => field_text(),
    ]
}

/// Data and predictions files as tools write them (`query`/`keyword`/other columns in any order,
/// some rows blank, a few damaged): the readers return exactly the good rows, or fail at the
/// first bad one, naming its line.
#[test]
fn tsv_data_and_prediction_files() {
    let columns = prop::sample::select(vec![
        vec!["query", "keyword"],
        vec!["keyword", "query"],
        vec!["id", "query", "keyword"],
        vec!["query", "keywords"],
        vec!["query", "keywords", "text"],
    ]);
    let row = (
        data_field(),
        data_field(),
        "[a-z0-9]{0,4}",
        prop_oneof![12 => Just(Damage::None), 1 => Just(Damage::DropField), 1 => Just(Damage::ExtraField), 1 => Just(Damage::NotUtf8)],
    );
    let file = (columns, vec(row, 0..10)).prop_flat_map(|(cols, rows)| {
        let n = rows.len();
        (Just(cols), Just(rows), layout(n + 1))
    });
    run(
        "tsv_data_and_prediction_files",
        256,
        &[
            "dataset ok",
            "dataset error",
            "predictions ok",
            "predictions error",
        ],
        file,
        |(cols, rows, layout), tally| {
            let header: Vec<String> = cols.iter().map(|c| c.to_string()).collect();
            let mut lines = vec![written(&header)];
            // For each row: its fields as read back (None when the row is bad), or skipped.
            let mut expected: Vec<Option<Option<Vec<String>>>> = Vec::new();
            for (q, k, other, damage) in &rows {
                let mut fields: Vec<String> = cols
                    .iter()
                    .map(|c| match *c {
                        "query" => q.clone(),
                        "keyword" | "keywords" => k.clone(),
                        _ => other.clone(),
                    })
                    .collect();
                match damage {
                    Damage::DropField => {
                        fields.pop();
                    }
                    Damage::ExtraField => fields.push("extra".into()),
                    _ => {}
                }
                let mut line = written(&fields);
                if let Damage::NotUtf8 = damage {
                    line.insert(line.len() - 1, 0xFF);
                }
                let blank = !matches!(damage, Damage::NotUtf8) && is_blank(&fields);
                expected.push(if blank {
                    None
                } else if fields.len() != cols.len() || matches!(damage, Damage::NotUtf8) {
                    Some(None)
                } else {
                    Some(Some(fields.iter().map(|f| tsv::clean_field(f)).collect()))
                });
                lines.push(line);
            }
            let (bytes, starts) = lay_out(&lines, &layout);
            let path = Path::new(TSV_PATH);
            let lines_in_file = line_count(&bytes);
            let qcol = cols.iter().position(|c| *c == "query").unwrap();
            let kcol = cols
                .iter()
                .position(|c| *c == "keyword" || *c == "keywords")
                .unwrap();

            // The data reader (only files with a `keyword` column).
            if cols.contains(&"keyword") {
                let mut want: Result<Vec<(String, String, usize)>, usize> = Ok(Vec::new());
                for (e, &line) in expected.iter().zip(&starts[1..]) {
                    let Ok(v) = &mut want else { break };
                    match e {
                        None => {}
                        Some(Some(f)) if !f[qcol].is_empty() && !f[kcol].is_empty() => {
                            v.push((f[qcol].clone(), f[kcol].clone(), line))
                        }
                        Some(_) => want = Err(line),
                    }
                }
                if want.as_ref().is_ok_and(Vec::is_empty) {
                    want = Err(1);
                }
                match (Dataset::parse_tsv(&bytes, path, false), want) {
                    (Ok(d), Ok(want)) => {
                        let got: Vec<_> = d
                            .examples
                            .iter()
                            .map(|e| (e.query.clone(), e.keyword.clone(), e.line))
                            .collect();
                        prop_assert_eq!(got, want);
                        tally.add("dataset ok");
                    }
                    (Err(e), Err(line)) => {
                        prop_assert_eq!(
                            line_of_error(&e.to_string(), path, lines_in_file)?,
                            line,
                            "{}",
                            e
                        );
                        tally.add("dataset error");
                    }
                    (got, want) => {
                        return Err(TestCaseError::fail(format!(
                            "Dataset::parse_tsv gave {got:?}, expected {want:?}; file {:?}",
                            String::from_utf8_lossy(&bytes)
                        )))
                    }
                }
            }

            // The predictions reader.
            let mut want: Result<Vec<(String, Vec<String>, usize)>, usize> = Ok(Vec::new());
            let mut seen = HashSet::new();
            for (e, &line) in expected.iter().zip(&starts[1..]) {
                let Ok(v) = &mut want else { break };
                match e {
                    None => {}
                    Some(Some(f)) if !f[qcol].is_empty() && seen.insert(f[qcol].clone()) => {
                        v.push((
                            f[qcol].clone(),
                            kb_core::keywords::split_keywords(&f[kcol]),
                            line,
                        ))
                    }
                    Some(_) => want = Err(line),
                }
            }
            match (Predictions::parse_tsv(&bytes, path), want) {
                (Ok(p), Ok(want)) => {
                    let got: Vec<_> = p
                        .rows
                        .iter()
                        .map(|r| (r.query.clone(), r.keywords.clone(), r.line))
                        .collect();
                    prop_assert_eq!(got, want);
                    tally.add("predictions ok");
                }
                (Err(e), Err(line)) => {
                    prop_assert_eq!(
                        line_of_error(&e.to_string(), path, lines_in_file)?,
                        line,
                        "{}",
                        e
                    );
                    tally.add("predictions error");
                }
                (got, want) => {
                    return Err(TestCaseError::fail(format!(
                        "Predictions::parse_tsv gave {got:?}, expected {want:?}; file {:?}",
                        String::from_utf8_lossy(&bytes)
                    )))
                }
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Synonyms files
// ---------------------------------------------------------------------------------------------

const SYNONYMS_PATH: &str = "fuzz/동의어.tsv";

/// Text of a synonyms file: tabs, line breaks, comments, BOMs, Latin letters in both cases
/// (including those whose lower case is longer, `İ` → `i̇`), composed and decomposed Hangul,
/// spaces of several kinds, or any character.
fn synonyms_text() -> impl Strategy<Value = String> {
    let pieces = prop::sample::select(vec![
        "\t",
        "\t",
        "\n",
        "\n",
        "\r\n",
        "\r",
        "#",
        " ",
        "\u{3000}",
        "\u{feff}",
        "a",
        "A",
        "b",
        "B",
        "é",
        "É",
        "e\u{301}",
        "İ",
        "i\u{307}",
        "ß",
        "ǅ",
        "Å",
        "\u{212b}",
        "가",
        "\u{1100}\u{1161}",
        "직구",
        "해외직구",
        "\0",
    ]);
    prop_oneof![
        5 => vec(prop_oneof![8 => pieces.prop_map(String::from), 1 => any::<char>().prop_map(String::from)], 0..60)
            .prop_map(|v| v.concat()),
        1 => any::<String>(),
    ]
}

/// Checks a loaded synonyms table against the text it came from: every entry line's canonical
/// maps to itself and its variants to it; `apply` leaves no empty keyword or repeat.
fn check_synonyms(s: &Synonyms, text: &str) -> Result<(), TestCaseError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut entries = 0;
    for (_, line) in tsv::numbered_lines(text) {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        entries += 1;
        let fields: Vec<&str> = line.split('\t').collect();
        let canonical = normalize_keyword(fields[0]);
        for f in &fields {
            prop_assert_eq!(s.canonical(f), canonical.as_str(), "{:?}", line);
        }
        let applied = s.apply(&fields.iter().map(|f| f.to_string()).collect::<Vec<_>>());
        prop_assert_eq!(applied, vec![canonical.clone()]);
    }
    prop_assert_eq!(s.len(), entries);
    Ok(())
}

/// Any text: `Synonyms::parse` never panics; it loads a table that maps each line's terms to
/// its canonical, or refuses with `FILE: line N: …` naming a line of the text. Any bytes through
/// the file path (`Synonyms::read`): the same, invalid UTF-8 included.
#[test]
fn synonyms_arbitrary_text() {
    let input = prop_oneof![
        4 => synonyms_text().prop_map(|t| (t.into_bytes(), false)),
        1 => vec(any::<u8>(), 0..200).prop_map(|b| (b, true)),
        1 => (synonyms_text(), any::<prop::sample::Index>(), prop::sample::select(vec![&b"\xFF"[..], b"\xC3", b"\xED\xA0\x80"]))
            .prop_map(|(t, at, bad)| {
                let mut b = t.into_bytes();
                let at = at.index(b.len() + 1);
                b.splice(at..at, bad.iter().copied());
                (b, true)
            }),
    ];
    let dir = scratch_dir();
    let file = dir.path().join("동의어.tsv");
    run(
        "synonyms_arbitrary_text",
        256,
        &["ok", "error"],
        input,
        |(bytes, through_file), tally| {
            let lines = line_count(&bytes);
            let (result, path) = if through_file {
                std::fs::write(&file, &bytes).expect("writing the file");
                (Synonyms::read(&file), file.as_path())
            } else {
                let text = std::str::from_utf8(&bytes).expect("generated as text");
                (
                    Synonyms::parse(text, Path::new(SYNONYMS_PATH)),
                    Path::new(SYNONYMS_PATH),
                )
            };
            match result {
                Ok(s) => {
                    let text = std::str::from_utf8(&bytes).expect("a loaded file is UTF-8");
                    check_synonyms(&s, text)?;
                    tally.add("ok");
                }
                Err(e) => {
                    line_of_error(&e.to_string(), path, lines)?;
                    tally.add("error");
                }
            }
            Ok(())
        },
    );
}

/// Synonyms files written from distinct terms (one entry a line, with comments, blank lines,
/// CRLF, a BOM, padding around fields) load, and map every spelling of a term to its canonical.
#[test]
fn synonyms_valid_files() {
    // Now and then a term from a small pool, so that some files repeat a term.
    let term = || {
        prop_oneof![
            6 => "[가-힣]{1,4}( ?[a-zA-Z]{1,3})?",
            1 => prop::sample::select(vec!["직구", "해외직구", "HS 코드", "hs 코드"]).prop_map(String::from),
        ]
    };
    let entries = vec((term(), vec(term(), 1..4)), 0..8);
    let file = (entries, any::<bool>(), any::<bool>(), vec(0u8..4, 8));
    run(
        "synonyms_valid_files",
        256,
        &["ok", "refused (duplicate terms)"],
        file,
        |(entries, bom, crlf, extras), tally| {
            let eol = if crlf { "\r\n" } else { "\n" };
            let mut text = String::from(if bom { "\u{feff}" } else { "" });
            let mut keys = HashSet::new();
            let mut distinct = true;
            for (i, (canonical, variants)) in entries.iter().enumerate() {
                match extras[i] {
                    1 => text.push_str(&format!("# {canonical}{eol}")),
                    2 => text.push_str(&format!("  {eol}")),
                    _ => {}
                }
                let pad = if extras[i] == 3 { " " } else { "" };
                text.push_str(&format!("{pad}{canonical}{pad}"));
                for v in variants {
                    text.push_str(&format!("\t{pad}{v}"));
                }
                text.push_str(eol);
                for t in std::iter::once(canonical).chain(variants) {
                    distinct &= keys.insert(kb_core::synonyms::match_key(t));
                }
            }
            let parsed = Synonyms::parse(&text, Path::new(SYNONYMS_PATH));
            if !distinct {
                let e = parsed.err().ok_or_else(|| {
                    TestCaseError::fail(format!("a repeated term was accepted: {text:?}"))
                })?;
                line_of_error(
                    &e.to_string(),
                    Path::new(SYNONYMS_PATH),
                    line_count(text.as_bytes()),
                )?;
                tally.add("refused (duplicate terms)");
                return Ok(());
            }
            let s = parsed.map_err(|e| TestCaseError::fail(format!("{e}: {text:?}")))?;
            prop_assert_eq!(s.len(), entries.len());
            for (canonical, variants) in &entries {
                for t in std::iter::once(canonical).chain(variants) {
                    prop_assert_eq!(s.canonical(t), canonical.as_str());
                    prop_assert_eq!(s.canonical(&t.to_uppercase()), canonical.as_str());
                    let nfd: String = t.nfd().collect();
                    prop_assert_eq!(s.canonical(&format!(" {nfd} ")), canonical.as_str());
                }
            }
            check_synonyms(&s, &text)?;
            tally.add("ok");
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------------
// config.json and generation_config.json
// ---------------------------------------------------------------------------------------------

fn fixture_json(name: &str) -> Map<String, Value> {
    let path = common::fixture("tiny-kobart").join(name);
    let text = std::fs::read_to_string(&path).expect("fixture");
    match serde_json::from_str(&text).expect("fixture JSON") {
        Value::Object(m) => m,
        _ => panic!("{name} is not an object"),
    }
}

/// The fixture's `config.json`, parsed.
fn fixture_config() -> &'static BartConfig {
    static CFG: OnceLock<BartConfig> = OnceLock::new();
    CFG.get_or_init(|| {
        BartConfig::from_file(&common::fixture("tiny-kobart/config.json")).expect("fixture config")
    })
}

/// The fields of `config.json` that `BartConfig` reads.
fn bart_fields() -> Vec<String> {
    match serde_json::to_value(BartConfig::kobart_v1_shapes()).expect("serializable") {
        Value::Object(m) => m.keys().cloned().collect(),
        _ => unreachable!(),
    }
}

/// The fields of `generation_config.json` that `GenerationConfig` reads.
const GENERATION_FIELDS: [&str; 13] = [
    "num_beams",
    "max_length",
    "max_new_tokens",
    "min_length",
    "length_penalty",
    "early_stopping",
    "no_repeat_ngram_size",
    "forced_eos_token_id",
    "forced_bos_token_id",
    "decoder_start_token_id",
    "eos_token_id",
    "pad_token_id",
    "do_sample",
];

/// Any JSON value, nested a few levels; object keys are often fields of the config files.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| Value::Number(n.into())),
        any::<u64>().prop_map(|n| Value::Number(n.into())),
        any::<f64>().prop_map(|f| Number::from_f64(f).map_or(Value::Null, Value::Number)),
        any::<String>().prop_map(Value::String),
        interesting_value(),
    ];
    let mut keys = bart_fields();
    keys.extend(GENERATION_FIELDS.iter().map(|f| f.to_string()));
    let key = prop_oneof![3 => prop::sample::select(keys), 1 => any::<String>()];
    leaf.prop_recursive(3, 48, 8, move |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            vec((key.clone(), inner), 0..8).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Values worth trying in any field: zero, one, negatives, the limits of every integer type,
/// fractions, huge floats, the names the fields take, other types.
fn interesting_value() -> impl Strategy<Value = Value> {
    let numbers: Vec<Value> = vec![
        0.into(),
        1.into(),
        2.into(),
        3.into(),
        4.into(),
        7.into(),
        63.into(),
        64.into(),
        65.into(),
        128.into(),
        693.into(),
        694.into(),
        (-1).into(),
        (-64).into(),
        i64::MIN.into(),
        i64::MAX.into(),
        u64::MAX.into(),
        (u64::MAX - 1).into(),
        (1u64 << 31).into(),
        (1u64 << 32).into(),
        ((1u64 << 32) + 3).into(),
        ((1u64 << 53) + 1).into(),
        0.0.into(),
        (-0.0).into(),
        0.5.into(),
        0.999.into(),
        1.0.into(),
        1.5.into(),
        64.0.into(),
        (-1.5).into(),
        1e308.into(),
        (-1e308).into(),
        f64::MIN_POSITIVE.into(),
        5e-324.into(),
    ];
    let others: Vec<Value> = vec![
        "bart".into(),
        "mbart".into(),
        "t5".into(),
        "gelu".into(),
        "gelu_new".into(),
        "swish".into(),
        "mish".into(),
        "never".into(),
        "".into(),
        "64".into(),
        true.into(),
        false.into(),
        Value::Null,
        serde_json::json!([]),
        serde_json::json!([1, 2]),
        serde_json::json!([1, -1]),
        serde_json::json!([u64::MAX]),
        serde_json::json!([[1]]),
        serde_json::json!({}),
        serde_json::json!({"a": 1}),
    ];
    prop_oneof![
        2 => prop::sample::select(numbers),
        1 => prop::sample::select(others),
        1 => (0u64..100_000).prop_map(Value::from),
    ]
}

/// `PATH: field `F`: message` → F; fails unless the message has that form.
fn config_error_field(message: &str, path: &Path) -> Result<String, TestCaseError> {
    let prefix = format!("{}: field `", path.display());
    let rest = message.strip_prefix(&prefix).ok_or_else(|| {
        TestCaseError::fail(format!("{message:?} does not start with {prefix:?}"))
    })?;
    let field = rest
        .find("`: ")
        .map(|end| &rest[..end])
        .ok_or_else(|| TestCaseError::fail(format!("{message:?}: no field name")))?;
    prop_assert!(!field.is_empty(), "{message:?}: empty field name");
    Ok(field.to_string())
}

/// What a loaded `config.json` promises (the rules of `BartConfig`'s documentation), and that
/// everything derived from it can be computed without a panic.
fn check_bart_config(cfg: &BartConfig, path: &Path) -> Result<(), TestCaseError> {
    prop_assert!(cfg.vocab_size > 0 && cfg.d_model > 0 && cfg.max_position_embeddings > 0);
    prop_assert!(cfg.encoder_ffn_dim > 0 && cfg.decoder_ffn_dim > 0);
    for heads in [cfg.encoder_attention_heads, cfg.decoder_attention_heads] {
        prop_assert!(heads > 0 && cfg.d_model.is_multiple_of(heads));
    }
    prop_assert!(matches!(
        cfg.model_type.as_deref(),
        None | Some("bart" | "mbart")
    ));
    prop_assert!(cfg.activation().is_ok());
    for p in [cfg.dropout, cfg.attention_dropout, cfg.activation_dropout] {
        prop_assert!((0.0..1.0).contains(&p));
    }
    prop_assert!(cfg.encoder_layerdrop == 0.0 && cfg.decoder_layerdrop == 0.0);
    prop_assert_eq!(cfg.extra_pos_embeddings, 2);
    prop_assert!(
        !cfg.static_position_embeddings && !cfg.add_bias_logits && !cfg.do_blenderbot_90_layernorm
    );
    prop_assert!(cfg.decoder_start_token_id.is_some());
    let ids = [
        cfg.pad_token_id,
        cfg.bos_token_id,
        cfg.decoder_start_token_id,
        cfg.forced_eos_token_id,
        cfg.forced_bos(),
    ];
    for id in ids.into_iter().flatten().chain(cfg.eos_ids()) {
        prop_assert!(
            (id as usize) < cfg.vocab_size,
            "token id {id}, vocab_size {}",
            cfg.vocab_size
        );
    }
    // The derived values.
    let _ = (
        cfg.pre_layer_norm(),
        cfg.final_layer_norm(),
        cfg.embed_scale(),
        cfg.decoder_start(),
    );
    prop_assert!(cfg.position_table_rows() > cfg.max_position_embeddings);
    // The generation settings it implies when a folder has no generation_config.json.
    match GenerationConfig::from_model_config(cfg) {
        Ok(g) => prop_assert!(g.validate().is_ok(), "{:?}: {:?}", g, g.validate()),
        Err(e) => {
            let field = config_error_field(&e.to_string(), Path::new("config.json"))?;
            prop_assert!(bart_fields().contains(&field), "{}", e);
        }
    }
    // Written back and read again, it loads the same.
    let text = serde_json::to_string(cfg).expect("serializable");
    let again = BartConfig::from_json_str(&text, path)
        .map_err(|e| TestCaseError::fail(format!("a loaded config does not load again: {e}")))?;
    let (a, b) = (
        serde_json::to_value(&again).unwrap(),
        serde_json::to_value(cfg).unwrap(),
    );
    prop_assert!(same_json(&a, &b), "written {b} and read back {a}");
    Ok(())
}

/// Whether two JSON values are equal, floats to their last bit or two (serde_json without its
/// `float_roundtrip` feature may read back a float it wrote 1 ulp away).
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            x == y || (x - y).abs() <= 4.0 * f64::EPSILON * x.abs().max(y.abs())
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

/// Loads `text` as `config.json` and checks the outcome: a config that keeps its promises, or an
/// error naming the file and (for an object) one of the fields `BartConfig` reads. Returns the
/// error's field and message.
fn load_bart_config(
    text: &str,
    tally: &Tally,
) -> Result<Result<BartConfig, (String, String)>, TestCaseError> {
    let path = Path::new("fuzz/모델/config.json");
    match BartConfig::from_json_str(text, path) {
        Ok(cfg) => {
            check_bart_config(&cfg, path)?;
            tally.add("ok");
            Ok(Ok(cfg))
        }
        Err(e) => {
            let message = e.to_string();
            let field = config_error_field(&message, path)?;
            if let Ok(Value::Object(_)) = serde_json::from_str::<Value>(text) {
                prop_assert!(
                    bart_fields().contains(&field),
                    "{message:?}: `{field}` is not a field of config.json"
                );
                tally.add("error (object)");
            } else {
                tally.add("error");
            }
            Ok(Err((field, message)))
        }
    }
}

/// Any JSON value, and objects with config fields set to odd values: `BartConfig` never panics,
/// and loads a config that keeps its promises or names the field it refuses.
#[test]
fn bart_config_arbitrary_json() {
    let fields = bart_fields();
    let config_like = vec(
        (
            prop::sample::select(fields),
            prop_oneof![3 => interesting_value(), 1 => json_value()],
        ),
        0..12,
    )
    .prop_map(|kv| Value::Object(kv.into_iter().collect()));
    let text = prop_oneof![
        1 => json_value().prop_map(|v| v.to_string()),
        2 => config_like.prop_map(|v| v.to_string()),
        1 => (json_value(), any::<prop::sample::Index>(), "[\\PC]{0,4}").prop_map(|(v, cut, junk)| {
            let t = v.to_string();
            let mut at = cut.index(t.len() + 1);
            while !t.is_char_boundary(at) {
                at -= 1;
            }
            format!("{}{junk}", &t[..at])
        }),
    ];
    run(
        "bart_config_arbitrary_json",
        256,
        &["ok", "error", "error (object)"],
        text,
        |text, tally| load_bart_config(&text, tally).map(drop),
    );
}

/// One change to a config file: a field dropped or set to a value.
#[derive(Debug, Clone)]
enum Mutation {
    Drop(String),
    Set(String, Value),
}

fn mutate(base: &Map<String, Value>, mutations: &[Mutation]) -> Map<String, Value> {
    let mut m = base.clone();
    for mutation in mutations {
        match mutation {
            Mutation::Drop(k) => {
                m.remove(k);
            }
            Mutation::Set(k, v) => {
                m.insert(k.clone(), v.clone());
            }
        }
    }
    m
}

fn mutations(fields: Vec<String>) -> impl Strategy<Value = Vec<Mutation>> {
    let field = prop::sample::select(fields);
    let one = prop_oneof![
        1 => field.clone().prop_map(Mutation::Drop),
        4 => (field.clone(), interesting_value()).prop_map(|(k, v)| Mutation::Set(k, v)),
        1 => (field, json_value()).prop_map(|(k, v)| Mutation::Set(k, v)),
    ];
    vec(one, 1..4)
}

/// The fixture's `config.json` (and every field `BartConfig` reads) with 1–3 fields dropped or
/// set to odd values (other types, zero, negative, huge, fractional): never a panic; a config
/// that keeps its promises, or an error naming the file and a field — one that was changed, or
/// one the changed field constrains (its message then names the changed field).
#[test]
fn bart_config_fixture_mutations() {
    let base = fixture_json("config.json");
    let mut fields: Vec<String> = base.keys().cloned().collect();
    fields.extend(bart_fields());
    fields.sort();
    fields.dedup();
    run(
        "bart_config_fixture_mutations",
        256,
        &["ok", "error (object)"],
        mutations(fields),
        |muts, tally| {
            let text = Value::Object(mutate(&base, &muts)).to_string();
            if let Err((field, message)) = load_bart_config(&text, tally)? {
                let touched = muts.iter().any(|m| {
                    let k = match m {
                        Mutation::Drop(k) | Mutation::Set(k, _) => k,
                    };
                    *k == field || message.contains(k.as_str())
                });
                prop_assert!(touched, "{message:?} names no changed field of {muts:?}");
            }
            Ok(())
        },
    );
}

/// Changes that keep a config valid by `BartConfig`'s documented rules (bigger vocabularies,
/// widths that heads divide, any layer count, any positive size, supported activations, extra
/// fields): the fixture config with any of them still loads.
fn accepted_mutations(max_layers: u64) -> impl Strategy<Value = Vec<Mutation>> {
    let set = |k: &'static str, v: BoxedStrategy<Value>| {
        v.prop_map(move |v| Mutation::Set(k.to_string(), v)).boxed()
    };
    let big = || {
        prop_oneof![
            1u64..1000,
            Just(1u64 << 32),
            Just((1 << 32) + 1),
            Just(u64::MAX - 2),
            1..=u64::MAX - 2,
        ]
    };
    let one = prop_oneof![
        set(
            "vocab_size",
            prop_oneof![
                694u64..100_000,
                694u64..,
                Just(1u64 << 32),
                Just((1 << 32) + 2),
                Just(u64::MAX)
            ]
            .prop_map(Value::from)
            .boxed()
        ),
        // Multiples of 64, which every head count here divides.
        set(
            "d_model",
            prop_oneof![
                (1u64..64).prop_map(|k| k * 64),
                Just(1u64 << 38),
                Just(u64::MAX / 64 * 64)
            ]
            .prop_map(Value::from)
            .boxed()
        ),
        set(
            "encoder_layers",
            (0..=max_layers).prop_map(Value::from).boxed()
        ),
        set(
            "decoder_layers",
            (0..=max_layers).prop_map(Value::from).boxed()
        ),
        set("encoder_ffn_dim", big().prop_map(Value::from).boxed()),
        set("decoder_ffn_dim", big().prop_map(Value::from).boxed()),
        set(
            "max_position_embeddings",
            big().prop_map(Value::from).boxed()
        ),
        set(
            "encoder_attention_heads",
            prop::sample::select(vec![1u64, 2, 4, 8, 16, 32, 64])
                .prop_map(Value::from)
                .boxed()
        ),
        set(
            "decoder_attention_heads",
            prop::sample::select(vec![1u64, 2, 4, 8, 16, 32, 64])
                .prop_map(Value::from)
                .boxed()
        ),
        set("dropout", (0.0f64..1.0).prop_map(Value::from).boxed()),
        set(
            "activation_function",
            prop::sample::select(vec![
                "gelu",
                "gelu_new",
                "gelu_pytorch_tanh",
                "gelu_fast",
                "relu",
                "silu",
                "swish",
                "tanh"
            ])
            .prop_map(Value::from)
            .boxed()
        ),
        set(
            "model_type",
            prop::sample::select(vec![Value::from("bart"), Value::from("mbart"), Value::Null])
                .boxed()
        ),
        set(
            "scale_embedding",
            any::<bool>().prop_map(Value::from).boxed()
        ),
        set(
            "tie_word_embeddings",
            any::<bool>().prop_map(Value::from).boxed()
        ),
        set(
            "normalize_embedding",
            any::<bool>().prop_map(Value::from).boxed()
        ),
        set(
            "eos_token_id",
            prop_oneof![
                (0u64..694).prop_map(Value::from),
                vec(0u64..694, 1..4).prop_map(Value::from)
            ]
            .boxed()
        ),
        (any::<String>(), json_value()).prop_map(|(k, v)| Mutation::Set(format!("x_{k}"), v)),
    ];
    vec(one, 1..4)
}

/// The fixture config with changes its rules allow still loads (and keeps its promises).
#[test]
fn bart_config_accepted_mutations() {
    let base = fixture_json("config.json");
    run(
        "bart_config_accepted_mutations",
        256,
        &["ok"],
        accepted_mutations(u64::MAX),
        |muts, tally| {
            let text = Value::Object(mutate(&base, &muts)).to_string();
            match load_bart_config(&text, tally)? {
                Ok(_) => Ok(()),
                Err((_, message)) => Err(TestCaseError::fail(format!("{message} after {muts:?}"))),
            }
        },
    );
}

/// What a loaded `generation_config.json` promises: settings that pass their own validation,
/// token ids inside the model's vocabulary, and the same settings when written and read again.
fn check_generation_config(
    g: &GenerationConfig,
    cfg: &BartConfig,
    path: &Path,
) -> Result<(), TestCaseError> {
    prop_assert!(g.validate().is_ok(), "{:?}", g.validate());
    prop_assert!(g.effective_max_length() >= 2);
    let ids = [
        Some(g.decoder_start_token_id),
        g.pad_token_id,
        g.forced_eos_token_id,
        g.forced_bos_token_id,
    ];
    for id in ids
        .into_iter()
        .flatten()
        .chain(g.eos_token_ids.iter().copied())
    {
        prop_assert!(
            (id as usize) < cfg.vocab_size,
            "token id {id}, vocab_size {}",
            cfg.vocab_size
        );
    }
    let written = g.to_json();
    let again = GenerationConfig::from_json_str(&written.to_string(), path, cfg)
        .map_err(|e| TestCaseError::fail(format!("{written} does not load again: {e}")))?;
    prop_assert!(
        same_json(&again.to_json(), &written),
        "{} became {}",
        written,
        again.to_json()
    );
    Ok(())
}

/// Loads `text` as `generation_config.json` for the fixture model and checks the outcome, as
/// [`load_bart_config`] does.
fn load_generation_config(
    text: &str,
    tally: &Tally,
) -> Result<Result<GenerationConfig, (String, String)>, TestCaseError> {
    let path = Path::new("fuzz/모델/generation_config.json");
    let cfg = fixture_config();
    match GenerationConfig::from_json_str(text, path, cfg) {
        Ok(g) => {
            check_generation_config(&g, cfg, path)?;
            tally.add("ok");
            Ok(Ok(g))
        }
        Err(e) => {
            let message = e.to_string();
            let field = config_error_field(&message, path)?;
            if let Ok(Value::Object(_)) = serde_json::from_str::<Value>(text) {
                prop_assert!(
                    GENERATION_FIELDS.contains(&field.as_str()),
                    "{message:?}: `{field}` is not a field of generation_config.json"
                );
                tally.add("error (object)");
            } else {
                tally.add("error");
            }
            Ok(Err((field, message)))
        }
    }
}

/// Any JSON value, and objects with generation fields set to odd values: `GenerationConfig`
/// never panics, and loads settings that keep their promises or names the field it refuses.
#[test]
fn generation_config_arbitrary_json() {
    let fields: Vec<String> = GENERATION_FIELDS.iter().map(|f| f.to_string()).collect();
    let generation_like = vec(
        (
            prop::sample::select(fields),
            prop_oneof![3 => interesting_value(), 1 => json_value()],
        ),
        0..8,
    )
    .prop_map(|kv| Value::Object(kv.into_iter().collect()));
    let text = prop_oneof![
        1 => json_value().prop_map(|v| v.to_string()),
        3 => generation_like.prop_map(|v| v.to_string()),
        1 => (json_value(), any::<prop::sample::Index>(), "[\\PC]{0,4}").prop_map(|(v, cut, junk)| {
            let t = v.to_string();
            let mut at = cut.index(t.len() + 1);
            while !t.is_char_boundary(at) {
                at -= 1;
            }
            format!("{}{junk}", &t[..at])
        }),
    ];
    run(
        "generation_config_arbitrary_json",
        256,
        &["ok", "error", "error (object)"],
        text,
        |text, tally| load_generation_config(&text, tally).map(drop),
    );
}

/// The fixture's `generation_config.json` (and every field `GenerationConfig` reads) with 1–3
/// fields dropped or set to odd values: settings that keep their promises, or an error naming
/// the file and a changed field (or one whose message names the changed field).
#[test]
fn generation_config_fixture_mutations() {
    let base = fixture_json("generation_config.json");
    let mut fields: Vec<String> = base.keys().cloned().collect();
    fields.extend(GENERATION_FIELDS.iter().map(|f| f.to_string()));
    fields.sort();
    fields.dedup();
    run(
        "generation_config_fixture_mutations",
        256,
        &["ok", "error (object)"],
        mutations(fields),
        |muts, tally| {
            let text = Value::Object(mutate(&base, &muts)).to_string();
            if let Err((field, message)) = load_generation_config(&text, tally)? {
                let touched = muts.iter().any(|m| {
                    let k = match m {
                        Mutation::Drop(k) | Mutation::Set(k, _) => k,
                    };
                    *k == field || message.contains(k.as_str())
                });
                prop_assert!(touched, "{message:?} names no changed field of {muts:?}");
            }
            Ok(())
        },
    );
}

/// Any bytes as a model folder's `config.json` and `generation_config.json`, read from disk
/// (invalid UTF-8 included): never a panic; an error names the file (and, for a config error,
/// a field).
#[test]
fn config_files_arbitrary_bytes() {
    let bytes = prop_oneof![
        2 => vec(any::<u8>(), 0..200),
        2 => json_value().prop_map(|v| v.to_string().into_bytes()),
        1 => (json_value(), any::<prop::sample::Index>(), prop::sample::select(vec![&b"\xFF"[..], b"\xC3", b"\xED\xA0\x80", b"\0", b"\xEF\xBB\xBF"]))
            .prop_map(|(v, at, bad)| {
                let mut b = v.to_string().into_bytes();
                let at = at.index(b.len() + 1);
                b.splice(at..at, bad.iter().copied());
                b
            }),
    ];
    let dir = scratch_dir();
    let config = dir.path().join("config.json");
    let generation = dir.path().join("generation_config.json");
    run(
        "config_files_arbitrary_bytes",
        256,
        &["ok", "error"],
        bytes,
        |bytes, tally| {
            std::fs::write(&config, &bytes).expect("writing config.json");
            std::fs::write(&generation, &bytes).expect("writing generation_config.json");
            let check_error = |e: kb_core::Error, path: &Path| -> Result<(), TestCaseError> {
                let message = e.to_string();
                prop_assert!(
                    message.starts_with(&format!("{}: ", path.display())),
                    "{message:?}"
                );
                if let kb_core::Error::Config { .. } = e {
                    config_error_field(&message, path)?;
                }
                tally.add("error");
                Ok(())
            };
            match BartConfig::from_file(&config) {
                Ok(cfg) => {
                    check_bart_config(&cfg, &config)?;
                    tally.add("ok");
                }
                Err(e) => check_error(e, &config)?,
            }
            let cfg = fixture_config();
            match GenerationConfig::from_model_dir(dir.path(), cfg) {
                Ok(g) => {
                    check_generation_config(&g, cfg, &generation)?;
                    tally.add("ok");
                }
                Err(e) => check_error(e, &generation)?,
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Loading a model whose config.json was changed
// ---------------------------------------------------------------------------------------------

/// The fixture config with changes its rules allow (at most 6 layers, so that building what it
/// asks for stays cheap), in a model folder with the fixture's tokenizer and weights — as they
/// are, or without `final_logits_bias` (which loading then fills with zeros of `vocab_size`):
/// loading never panics; it gives a model that extracts keywords, or an error.
#[test]
fn mutated_configs_load_cleanly() {
    let fixture = common::fixture("tiny-kobart");
    let root = scratch_dir();
    let mut dirs = Vec::new();
    for (name, drop_bias) in [("as-is", false), ("no-final-logits-bias", true)] {
        let dir = root.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ] {
            std::fs::copy(fixture.join(f), dir.join(f)).unwrap();
        }
        let mut tensors = kb_core::candle_core::safetensors::load(
            fixture.join("model.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        if drop_bias {
            assert!(tensors.remove("final_logits_bias").is_some());
        }
        kb_core::candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
        dirs.push(dir);
    }
    let base = fixture_json("config.json");
    let input = (
        accepted_mutations(6),
        prop::sample::select(dirs),
        any::<bool>(),
    );
    run(
        "mutated_configs_load_cleanly",
        256,
        &["loaded", "refused"],
        input,
        |(muts, dir, with_generation), tally| {
            let config = Value::Object(mutate(&base, &muts)).to_string();
            std::fs::write(dir.join("config.json"), config).unwrap();
            let generation = dir.join("generation_config.json");
            if with_generation {
                std::fs::copy(fixture.join("generation_config.json"), &generation).unwrap();
            } else if generation.exists() {
                std::fs::remove_file(&generation).unwrap();
            }
            match KeywordModel::load_dir(&dir, DType::F32, &Device::Cpu) {
                Ok(model) => {
                    let mut g = model.generation.clone();
                    g.max_length = 6;
                    g.num_beams = 2;
                    match model.extract(&["관세 얼마인가요?"], &g, None) {
                        Ok(out) => {
                            prop_assert_eq!(out.len(), 1);
                            let vocab = model.config.vocab_size;
                            prop_assert!(out[0].ids.iter().all(|&id| (id as usize) < vocab));
                            tally.add("loaded");
                        }
                        Err(e) => {
                            prop_assert!(!e.to_string().is_empty());
                            tally.add("loaded, extraction refused");
                        }
                    }
                }
                Err(e) => {
                    prop_assert!(!e.to_string().is_empty());
                    tally.add("refused");
                }
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Tokenizer front end
// ---------------------------------------------------------------------------------------------

/// The fixture model (tokenizer, config, weights), loaded once.
fn fixture_model() -> &'static KeywordModel {
    static MODEL: OnceLock<KeywordModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        KeywordModel::load_dir(&common::fixture("tiny-kobart"), DType::F32, &Device::Cpu)
            .expect("fixture model")
    })
}

fn tokenizer() -> &'static KoTokenizer {
    &fixture_model().tokenizer
}

/// Any Unicode: arbitrary strings (characters of every plane; Rust strings hold no surrogate),
/// lone combining marks, NUL and control characters, zero-width and bidirectional marks,
/// noncharacters, emoji ZWJ sequences, right-to-left text, Hangul composed and as jamo, the
/// tokenizer's special tokens.
fn short_unicode() -> impl Strategy<Value = String> {
    let pieces = prop::sample::select(vec![
        "\u{300}",
        "\u{301}\u{302}\u{303}",
        "\u{20DD}",
        "\u{1AB0}",
        "\u{0}",
        "\u{1}",
        "\u{7F}",
        "\u{9F}",
        "\u{85}",
        "\t",
        "\n",
        "\r",
        "\u{b}",
        " ",
        "\u{3000}",
        "\u{200B}",
        "\u{200C}",
        "\u{200D}",
        "\u{2028}",
        "\u{2029}",
        "\u{202E}",
        "\u{2066}",
        "\u{FEFF}",
        "\u{FFFE}",
        "\u{FFFF}",
        "\u{FFFD}",
        "\u{10FFFF}",
        "\u{E000}",
        "\u{E0041}",
        "\u{FE0F}",
        "\u{1F3FD}",
        "\u{1100}",
        "\u{1161}",
        "\u{11A8}",
        "가",
        "▁",
        "<s>",
        "</s>",
        "<pad>",
        "<unk>",
        "<mask>",
        "<usr>",
        "관세",
        "ﾀ",
        "Ａ",
        "ﬁ",
        "İ",
        "ß",
        "a",
        ",",
        "，",
    ]);
    let emoji = prop::sample::select(vec![
        "👩", "👨", "👧", "👦", "❤", "🏳", "🌈", "💋", "🧑", "🏽", "🏿", "\u{FE0F}", "\u{200D}",
        "🇰", "🇷",
    ]);
    prop_oneof![
        4 => any::<String>(),
        1 => prop::sample::select(vec!["", " ", "\u{3000}\t\n"]).prop_map(String::from),
        3 => vec(pieces, 0..40).prop_map(|v| v.concat()),
        2 => "[가-힣 ?!.,]{0,40}",
        1 => vec(emoji, 0..24).prop_map(|v| v.concat()),
        1 => "[\u{0590}-\u{05FF}\u{0600}-\u{06FF}\u{200E}\u{200F}\u{202A}-\u{202E}\u{2066}-\u{2069} 0-9]{0,40}",
        1 => vec(any::<char>(), 0..64).prop_map(|v| v.into_iter().collect()),
    ]
}

/// [`short_unicode`] and, one case in 200, a 100,000-character text.
fn unicode_text() -> impl Strategy<Value = String> {
    prop_oneof![
        199 => short_unicode(),
        1 => "[\\PC가-힣]{1,8}".prop_map(|seed| seed.chars().cycle().take(100_000).collect()),
    ]
}

/// Any Unicode text: `KoTokenizer::encode` never panics and gives ids inside the vocabulary;
/// decoding them (and any ids at all) never panics; a batch encodes as its texts one by one.
#[test]
fn tokenizer_encode_decode_any_unicode() {
    let vocab = tokenizer().vocab_size();
    let input = (
        unicode_text(),
        vec(
            prop_oneof![3 => 0..vocab as u32 + 8, 1 => any::<u32>()],
            0..16,
        ),
    );
    run(
        "tokenizer_encode_decode_any_unicode",
        256,
        &["tokens", "no tokens"],
        input,
        |(text, any_ids), tally| {
            let tok = tokenizer();
            let ids = tok
                .encode(&text)
                .map_err(|e| TestCaseError::fail(format!("{e}")))?;
            prop_assert!(ids.iter().all(|&id| (id as usize) < vocab), "{:?}", ids);
            tok.decode(&ids)
                .map_err(|e| TestCaseError::fail(format!("{e}")))?;
            let _ = tok.decode(&any_ids);
            if text.len() < 1000 {
                let batch = tok
                    .encode_batch(&[&text, "관세", &text])
                    .map_err(|e| TestCaseError::fail(format!("{e}")))?;
                prop_assert_eq!(&batch[0], &ids);
                prop_assert_eq!(&batch[2], &ids);
            }
            tally.add(if ids.is_empty() {
                "no tokens"
            } else {
                "tokens"
            });
            Ok(())
        },
    );
}

/// Batches of any Unicode queries: `KeywordModel::encode_queries` never panics; it gives each
/// query's tokens cut to the limit (and the model's positions), or refuses a query that has no
/// tokens.
#[test]
fn encode_queries_any_unicode() {
    let input = (
        vec(unicode_text(), 1..5),
        prop::option::of(prop_oneof![Just(0usize), 1usize..300]),
    );
    run(
        "encode_queries_any_unicode",
        256,
        &["ok", "error"],
        input,
        |(queries, max_input_tokens), tally| {
            let model = fixture_model();
            let refs: Vec<&str> = queries.iter().map(String::as_str).collect();
            let limit = max_input_tokens
                .unwrap_or(usize::MAX)
                .min(model.config.max_position_embeddings);
            let each: Vec<Vec<u32>> = refs
                .iter()
                .map(|q| {
                    model
                        .tokenizer
                        .encode(q)
                        .map_err(|e| TestCaseError::fail(format!("{e}")))
                })
                .collect::<Result<_, _>>()?;
            match model.encode_queries(&refs, max_input_tokens) {
                Ok(rows) => {
                    prop_assert_eq!(rows.len(), queries.len());
                    for (row, full) in rows.iter().zip(&each) {
                        prop_assert!(!full.is_empty());
                        prop_assert_eq!(row.as_slice(), &full[..full.len().min(limit)]);
                        prop_assert!(row
                            .iter()
                            .all(|&id| (id as usize) < model.config.vocab_size));
                    }
                    tally.add("ok");
                }
                Err(e) => {
                    let message = e.to_string();
                    let empty = refs.iter().zip(&each).find(|(_, ids)| ids.is_empty());
                    prop_assert!(
                        empty.is_some(),
                        "refused {queries:?} though every query has tokens: {message}"
                    );
                    prop_assert!(message.contains("no tokens"), "{message}");
                    tally.add("error");
                }
            }
            Ok(())
        },
    );
}

/// Grounded decoding on random inputs: for any derived terms, any input (encoded text, any ids,
/// any string) and any hypothesis (any ids, or a walk through what it allows), the constraint
/// never panics, allows only ids inside the vocabulary (always at least one), and its mask
/// keeps exactly the allowed ids.
#[test]
fn grounding_random_inputs() {
    let vocab = tokenizer().vocab_size() as u32;
    let id = move || prop_oneof![4 => 0..vocab + 8, 1 => any::<u32>()];
    let input = prop_oneof![
        2 => unicode_text().prop_map(|t| (Some(t), Vec::new())),
        1 => vec(id(), 0..24).prop_map(|ids| (None, ids)),
    ];
    let hypothesis = prop_oneof![
        1 => vec(id(), 0..8).prop_map(|ids| (ids, Vec::new())),
        2 => vec(any::<prop::sample::Index>(), 0..10).prop_map(|walk| (Vec::new(), walk)),
    ];
    let terms = vec(prop_oneof![unicode_text(), "[가-힣 ]{1,6}"], 0..5);
    let cases = (terms, input, any::<String>(), hypothesis);
    run(
        "grounding_random_inputs",
        256,
        &["walked"],
        cases,
        |(terms, (text, ids), raw_input, (generated, walk)), tally| {
            let tok = tokenizer();
            let derived = DerivedTerms {
                terms: terms.into_iter().map(|t| (t, 1)).collect(),
            };
            let g = Grounding::new(tok, &derived);
            let ids = match text {
                Some(t) => tok
                    .encode(&t)
                    .map_err(|e| TestCaseError::fail(format!("{e}")))?,
                None => ids,
            };
            let input = g.input_text(&ids);
            let check = |input: &str, generated: &[u32]| -> Result<Vec<u32>, TestCaseError> {
                let allowed = g.allowed(input, generated);
                prop_assert!(!allowed.is_empty());
                prop_assert!(allowed.iter().all(|&id| id < vocab), "{:?}", allowed);
                let mut scores = vec![0.0f32; vocab as usize];
                g.mask(&mut scores, input, generated);
                let kept: HashSet<u32> =
                    (0..vocab).filter(|&i| scores[i as usize] == 0.0).collect();
                prop_assert_eq!(kept, allowed.iter().copied().collect::<HashSet<u32>>());
                Ok(allowed)
            };
            check(&input, &generated)?;
            check(&raw_input, &generated)?;
            // A walk through the constraint: each step takes one of the allowed tokens.
            let mut hypothesis = Vec::new();
            for step in &walk {
                let allowed = check(&input, &hypothesis)?;
                let next = allowed[step.index(allowed.len())];
                if tok.special().eos.contains(&next) {
                    break;
                }
                hypothesis.push(next);
                tally.add("walked");
            }
            Ok(())
        },
    );
}
