//! Tab-separated text files: the one reader (and writer) of the project's TSV formats — the
//! `query`/`keyword` data, kb-extract's query files and TSV output, kb-eval's predictions and
//! reports — and the shared decoding of line-oriented text files (the synonyms file).
//!
//! What every reader here accepts: UTF-8 with or without a byte-order mark, LF or CRLF line ends,
//! fields quoted as pandas' `read_csv(sep='\t')` and `to_csv(sep='\t')` write them (a field that
//! starts with `"` runs to the closing quote and may contain tabs, newlines and doubled `""`),
//! blank lines ignored. Fields are trimmed and put in Unicode NFC, so text typed on different
//! systems compares equal. Every problem is an error `FILE: line N: what` with the line number
//! of the file as an editor shows it (CRLF files included; the csv crate's own line count is
//! off for them, so lines are counted here from byte offsets).

use std::path::{Path, PathBuf};

use unicode_normalization::UnicodeNormalization;

use crate::error::{Error, Result};

/// The error `PATH: line N: problem`.
pub fn line_error(path: &Path, line: usize, problem: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("{}: line {line}: {problem}", path.display()))
}

/// Reads a whole file; a failure names the path.
pub fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// The text of a file's bytes without its byte-order mark; invalid UTF-8 is an error naming the
/// line it is on.
pub fn decode_text<'a>(bytes: &'a [u8], path: &Path) -> Result<&'a str> {
    let bytes = strip_bom(bytes);
    std::str::from_utf8(bytes).map_err(|e| {
        line_error(
            path,
            line_of_offset(bytes, e.valid_up_to()),
            "the file is not valid UTF-8",
        )
    })
}

/// The lines of `text` with their 1-based numbers, without the `\n` and a `\r` before it.
pub fn numbered_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.split('\n')
        .enumerate()
        .map(|(i, l)| (i + 1, l.strip_suffix('\r').unwrap_or(l)))
}

/// `s` trimmed and in Unicode NFC.
pub fn clean_field(s: &str) -> String {
    s.trim().nfc().collect()
}

/// Byte offsets of every `\n` in `bytes`.
fn newline_offsets(bytes: &[u8]) -> Vec<usize> {
    bytes
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .map(|(i, _)| i)
        .collect()
}

fn strip_bom(bytes: &[u8]) -> &[u8] {
    bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes)
}

/// 1-based line of byte `offset` in `bytes`.
fn line_of_offset(bytes: &[u8], offset: usize) -> usize {
    bytes[..offset.min(bytes.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// One data row: its line and its fields (trimmed, NFC), as many as the header has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// 1-based line the row starts on.
    pub line: usize,
    /// The fields, in header order.
    pub fields: Vec<String>,
}

/// A row that cannot be read, with its line and the reason (without the file name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowError {
    /// 1-based line.
    pub line: usize,
    /// What is wrong.
    pub problem: String,
}

/// A TSV file with a header line, read row by row.
pub struct Reader<'a> {
    path: &'a Path,
    header: Vec<String>,
    header_line: usize,
    reader: csv::Reader<&'a [u8]>,
    /// The content (without the BOM), for line numbers.
    bytes: &'a [u8],
    /// Byte offsets of every `\n`, for line numbers.
    newlines: Vec<usize>,
    record: csv::ByteRecord,
}

impl<'a> Reader<'a> {
    /// Starts reading `bytes` (the file's content; `path` names it in messages) and reads its
    /// header, the first line that is not blank. An empty file or an unreadable header is an
    /// error.
    pub fn new(bytes: &'a [u8], path: &'a Path) -> Result<Self> {
        let bytes = strip_bom(bytes);
        let mut this = Self {
            path,
            header: Vec::new(),
            header_line: 1,
            reader: csv::ReaderBuilder::new()
                .delimiter(b'\t')
                .flexible(true)
                .has_headers(false)
                .from_reader(bytes),
            bytes,
            newlines: newline_offsets(bytes),
            record: csv::ByteRecord::new(),
        };
        let empty = || line_error(path, 1, "the file is empty (expected a header line)");
        match this.next() {
            None => Err(empty()),
            Some(Err(e)) => Err(this.error(e.line, format!("unreadable header: {}", e.problem))),
            Some(Ok(header)) => {
                this.header = header.fields;
                this.header_line = header.line;
                Ok(this)
            }
        }
    }

    /// The header's column names (trimmed, NFC).
    pub fn header(&self) -> &[String] {
        &self.header
    }

    /// The line the header is on.
    pub fn header_line(&self) -> usize {
        self.header_line
    }

    /// The index of column `name`, if the header has it.
    pub fn column(&self, name: &str) -> Option<usize> {
        self.header.iter().position(|h| h == name)
    }

    /// The error `FILE: line N: problem` for this file.
    pub fn error(&self, line: usize, problem: impl std::fmt::Display) -> Error {
        line_error(self.path, line, problem)
    }

    /// The file's name, as given.
    pub fn path(&self) -> &Path {
        self.path
    }

    /// 1-based line of the first byte at or after `byte` that is not a line break: csv reports
    /// a record as starting where the previous one ended (at the `\n` of a CRLF, or before the
    /// blank lines it skipped).
    fn line_at(&self, byte: u64) -> usize {
        let mut at = (byte as usize).min(self.bytes.len());
        while matches!(self.bytes.get(at), Some(b'\r' | b'\n')) {
            at += 1;
        }
        self.newlines.partition_point(|&nl| nl < at) + 1
    }

    /// Whether the header has not been read yet (only while [`Reader::new`] runs).
    fn header_line_pending(&self) -> bool {
        self.header.is_empty()
    }

    fn line_of(&self, record: &csv::ByteRecord, fallback: usize) -> usize {
        record
            .position()
            .map(|p| self.line_at(p.byte()))
            .unwrap_or(fallback)
    }
}

impl Iterator for Reader<'_> {
    type Item = std::result::Result<Record, RowError>;

    /// The next data row: blank lines are skipped; a row whose field count differs from the
    /// header's, an unreadable row (an unclosed quote) or a field that is not UTF-8 is a
    /// [`RowError`].
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let hint = self.line_at(self.reader.position().byte());
            match self.reader.read_byte_record(&mut self.record) {
                Ok(false) => return None,
                Ok(true) => {}
                Err(e) => {
                    let line = e.position().map(|p| self.line_at(p.byte())).unwrap_or(hint);
                    return Some(Err(RowError {
                        line,
                        problem: format!("unreadable row: {e}"),
                    }));
                }
            }
            let line = self.line_of(&self.record, hint);
            if self
                .record
                .iter()
                .all(|f| f.iter().all(u8::is_ascii_whitespace))
            {
                continue;
            }
            if self.header_line_pending() {
                // The header itself: any number of fields.
                return Some(
                    decode_fields(&self.record)
                        .map(|fields| Record { line, fields })
                        .map_err(|problem| RowError { line, problem }),
                );
            }
            if self.record.len() != self.header.len() {
                return Some(Err(RowError {
                    line,
                    problem: format!(
                        "expected {} tab-separated fields like the header, found {}",
                        self.header.len(),
                        self.record.len()
                    ),
                }));
            }
            return Some(match decode_fields(&self.record) {
                Ok(fields) => Ok(Record { line, fields }),
                Err(problem) => Err(RowError { line, problem }),
            });
        }
    }
}

fn decode_fields(record: &csv::ByteRecord) -> std::result::Result<Vec<String>, String> {
    record
        .iter()
        .enumerate()
        .map(|(i, raw)| {
            std::str::from_utf8(raw)
                .map(clean_field)
                .map_err(|_| format!("field {} is not valid UTF-8", i + 1))
        })
        .collect()
}

/// A field as written to a TSV file: quoted (with `"` doubled) when it contains a tab, a line
/// break or a double quote, or starts or ends with a space, so that [`Reader`] and pandas read
/// back the same text.
pub fn quote_field(field: &str) -> std::borrow::Cow<'_, str> {
    let needs = field.contains(['\t', '\n', '\r', '"'])
        || field.starts_with(char::is_whitespace)
        || field.ends_with(char::is_whitespace);
    if needs {
        format!("\"{}\"", field.replace('"', "\"\"")).into()
    } else {
        field.into()
    }
}

/// Writes one TSV row (fields quoted where needed, see [`quote_field`]) and a `\n`.
pub fn write_row<W: std::io::Write, S: AsRef<str>>(
    out: &mut W,
    fields: &[S],
) -> std::io::Result<()> {
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            out.write_all(b"\t")?;
        }
        out.write_all(quote_field(f.as_ref()).as_bytes())?;
    }
    out.write_all(b"\n")
}

/// A file read whole, for callers that keep the bytes while a [`Reader`] borrows them.
#[derive(Debug, Clone)]
pub struct TsvFile {
    /// The path, for messages.
    pub path: PathBuf,
    /// The content.
    pub bytes: Vec<u8>,
}

impl TsvFile {
    /// Reads `path`; a failure names it.
    pub fn read(path: &Path) -> Result<Self> {
        Ok(Self {
            path: path.to_path_buf(),
            bytes: read_bytes(path)?,
        })
    }

    /// A reader over the content.
    pub fn reader(&self) -> Result<Reader<'_>> {
        Reader::new(&self.bytes, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(text: &[u8]) -> (Vec<String>, Vec<std::result::Result<Record, RowError>>) {
        let r = Reader::new(text, Path::new("t.tsv")).unwrap();
        let header = r.header().to_vec();
        (header, r.collect())
    }

    #[test]
    fn bom_crlf_quotes_and_nfc() {
        // "가" as a decomposed jamo sequence (U+1100 U+1161) becomes the precomposed U+AC00.
        let text = "\u{feff}query\tkeyword\r\n\r\n \u{1100}\u{1161} \t\"a, \"\"b\"\"\tc\"\r\n마지막\t끝\r\n";
        let (header, rows) = rows(text.as_bytes());
        assert_eq!(header, ["query", "keyword"]);
        let rows: Vec<Record> = rows.into_iter().map(Result::unwrap).collect();
        assert_eq!(rows[0].line, 3);
        assert_eq!(rows[0].fields, ["가", "a, \"b\"\tc"]);
        assert_eq!(rows[1].line, 4);
        assert_eq!(rows[1].fields, ["마지막", "끝"]);
    }

    #[test]
    fn crlf_line_numbers_are_the_editor_lines() {
        let mut text = String::from("query\tkeyword\r\n");
        for i in 0..20 {
            text.push_str(&format!("q{i}\tk{i}\r\n"));
        }
        text.push_str("bad row\r\n");
        let (_, rows) = rows(text.as_bytes());
        for (i, r) in rows[..20].iter().enumerate() {
            assert_eq!(r.as_ref().unwrap().line, i + 2);
        }
        let err = rows[20].as_ref().unwrap_err();
        assert_eq!(err.line, 22);
        assert!(err.problem.contains("expected 2"), "{}", err.problem);
    }

    #[test]
    fn quoted_fields_spanning_lines_keep_later_line_numbers() {
        let text = "query\tkeyword\n\"two\nlines\"\tk\nnext\tk2\n";
        let (_, rows) = rows(text.as_bytes());
        let rows: Vec<Record> = rows.into_iter().map(Result::unwrap).collect();
        assert_eq!(rows[0].fields[0], "two\nlines");
        assert_eq!((rows[0].line, rows[1].line), (2, 4));
    }

    #[test]
    fn bad_rows_and_files() {
        let (_, rows) = rows(b"query\tkeyword\nok\tfine\n\xff\xfe\tbad\n");
        let err = rows[1].as_ref().unwrap_err();
        assert_eq!(err.line, 3);
        assert!(err.problem.contains("UTF-8"), "{}", err.problem);
        for empty in [&b""[..], b"\xEF\xBB\xBF", b" \n\r\n"] {
            let e = Reader::new(empty, Path::new("e.tsv"))
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("e.tsv: line 1") && e.contains("empty"), "{e}");
        }
        let r = Reader::new(b"\n\nquery\tk\n", Path::new("h.tsv")).unwrap();
        assert_eq!((r.header_line(), r.column("k")), (3, Some(1)));
        assert!(r.error(7, "why").to_string().contains("h.tsv: line 7: why"));
    }

    #[test]
    fn text_files() {
        let bytes = "\u{feff}a\r\nb\n".as_bytes();
        let text = decode_text(bytes, Path::new("s.tsv")).unwrap();
        let lines: Vec<(usize, &str)> = numbered_lines(text).collect();
        assert_eq!(lines, [(1, "a"), (2, "b"), (3, "")]);
        let e = decode_text(b"ok\n\xff\n", Path::new("s.tsv"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("s.tsv: line 2") && e.contains("UTF-8"), "{e}");
    }

    #[test]
    fn written_rows_read_back() {
        let fields = ["\"따옴표\" 질문", "탭\t있음", " 공백 ", "줄\n바꿈", "보통"];
        let mut out = b"a\tb\tc\td\te\n".to_vec();
        write_row(&mut out, &fields).unwrap();
        let (_, rows) = rows(&out);
        let got = &rows[0].as_ref().unwrap().fields;
        // Reading trims fields, so the padded one comes back trimmed.
        assert_eq!(
            got,
            &["\"따옴표\" 질문", "탭\t있음", "공백", "줄\n바꿈", "보통"]
        );
        assert_eq!(quote_field("plain"), "plain");
    }
}
