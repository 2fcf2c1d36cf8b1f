//! Synonym canonicalisation: folding keyword variants into the one spelling used by the
//! knowledge graph (`직구` → `해외직구`, `통관번호` → `개인통관고유부호`).
//!
//! A synonyms file (`configs/synonyms.tsv`) is UTF-8 text with one entry per line:
//! `canonical<TAB>variant1<TAB>variant2…`. Lines whose first non-blank character is `#` are
//! comments, blank lines are ignored, a BOM and CRLF line ends are accepted, and each field is
//! trimmed. Matching is on the whole keyword after [`match_key`] (trimmed, NFC, Latin letters
//! lower-cased); the output always uses the canonical spelling of the file.
//!
//! A file is refused, with an error naming the file and line, when a line has an empty field,
//! a canonical has no variant, a canonical is listed on two lines, a variant is listed twice
//! (under two canonicals or twice under one), or a variant equals a canonical (its own or
//! another's). These rules make the mapping unambiguous and non-chaining.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use unicode_normalization::UnicodeNormalization;

use crate::error::Result;

/// A keyword trimmed and in Unicode NFC: the form in which keywords are compared.
pub fn normalize_keyword(keyword: &str) -> String {
    keyword.trim().nfc().collect()
}

/// The key synonyms are matched on: [`normalize_keyword`], then Latin letters lower-cased
/// (Hangul has no case; other scripts are left as they are).
pub fn match_key(keyword: &str) -> String {
    normalize_keyword(keyword)
        .chars()
        .flat_map(|c| {
            let latin = c.is_ascii_alphabetic()
                || ('\u{00C0}'..='\u{024F}').contains(&c)
                || ('\u{1E00}'..='\u{1EFF}').contains(&c);
            let lower: Vec<char> = if latin {
                c.to_lowercase().collect()
            } else {
                vec![c]
            };
            lower
        })
        .collect()
}

/// Where a term of the file was defined (for messages about conflicts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Canonical,
    Variant,
}

/// A loaded synonyms file: every canonical and variant, by [`match_key`], mapped to the
/// canonical spelling.
#[derive(Debug, Clone, Default)]
pub struct Synonyms {
    /// The file read (empty for [`Synonyms::default`]).
    pub path: PathBuf,
    map: HashMap<String, String>,
    canonicals: usize,
}

impl Synonyms {
    /// Reads and checks a synonyms file (see the module documentation for the format).
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = crate::tsv::read_bytes(path)?;
        Self::parse(crate::tsv::decode_text(&bytes, path)?, path)
    }

    /// Parses the text of a synonyms file; `path` names the file in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let fail = |line: usize, problem: String| crate::tsv::line_error(path, line, problem);
        // match key -> (canonical spelling, role, line)
        let mut seen: HashMap<String, (String, Role, usize)> = HashMap::new();
        let mut canonicals = 0;
        for (line, raw) in crate::tsv::numbered_lines(text) {
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = raw.split('\t').map(str::trim).collect();
            if let Some(pos) = fields.iter().position(|f| f.is_empty()) {
                return Err(fail(
                    line,
                    format!(
                        "field {} is empty (fields are separated by a single TAB; no leading, trailing or doubled TABs)",
                        pos + 1
                    ),
                ));
            }
            let canonical = normalize_keyword(fields[0]);
            if fields.len() < 2 {
                return Err(fail(
                    line,
                    format!(
                        "canonical `{canonical}` has no variant (expected `canonical<TAB>variant…`)"
                    ),
                ));
            }
            let ckey = match_key(&canonical);
            if let Some((other, role, at)) = seen.get(&ckey) {
                return Err(fail(
                    line,
                    match role {
                        Role::Canonical => format!(
                            "canonical `{canonical}` is already an entry at line {at}; list all its variants on one line"
                        ),
                        Role::Variant => format!(
                            "canonical `{canonical}` is already a variant of `{other}` at line {at}; a variant must not equal a canonical"
                        ),
                    },
                ));
            }
            seen.insert(ckey, (canonical.clone(), Role::Canonical, line));
            canonicals += 1;
            for variant in &fields[1..] {
                let variant = normalize_keyword(variant);
                let vkey = match_key(&variant);
                if let Some((other, role, at)) = seen.get(&vkey) {
                    return Err(fail(
                        line,
                        match role {
                            Role::Canonical if *at == line => format!(
                                "variant `{variant}` equals its canonical `{other}`"
                            ),
                            Role::Canonical => format!(
                                "variant `{variant}` equals the canonical `{other}` of line {at}"
                            ),
                            Role::Variant if *at == line => format!(
                                "variant `{variant}` is listed twice on this line"
                            ),
                            Role::Variant => format!(
                                "variant `{variant}` is already listed under `{other}` at line {at}; a variant may belong to one canonical only"
                            ),
                        },
                    ));
                }
                seen.insert(vkey, (canonical.clone(), Role::Variant, line));
            }
        }
        let map = seen
            .into_iter()
            .map(|(key, (canonical, _, _))| (key, canonical))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            map,
            canonicals,
        })
    }

    /// Number of entries (canonical terms).
    pub fn len(&self) -> usize {
        self.canonicals
    }

    /// Whether the file had no entries.
    pub fn is_empty(&self) -> bool {
        self.canonicals == 0
    }

    /// The canonical spelling of `keyword` if it is a listed term (a variant or a canonical in
    /// another case or normalisation form), else `keyword` trimmed and in NFC.
    pub fn canonical<'a>(&'a self, keyword: &str) -> Cow<'a, str> {
        match self.map.get(&match_key(keyword)) {
            Some(c) => Cow::Borrowed(c.as_str()),
            None => Cow::Owned(normalize_keyword(keyword)),
        }
    }

    /// Maps every keyword to its canonical spelling, drops empty keywords, and removes the
    /// duplicates this creates, keeping each keyword at its first position.
    pub fn apply(&self, keywords: &[String]) -> Vec<String> {
        let mut out: Vec<String> = Vec::with_capacity(keywords.len());
        for kw in keywords {
            let c = self.canonical(kw);
            if !c.is_empty() && !out.iter().any(|k| k == c.as_ref()) {
                out.push(c.into_owned());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Synonyms> {
        Synonyms::parse(text, Path::new("syn.tsv"))
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    fn kws(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn maps_variants_to_the_canonical_and_dedups_keeping_first_position() {
        let s = parse(
            "# comment\n\n해외직구\t직구\t해외 직구\r\n개인통관고유부호\t통관번호\n유니패스\tUNI-PASS\n",
        )
        .unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(
            s.apply(&kws(&[
                "직구",
                " 통관번호 ",
                "해외직구",
                "관세",
                "uni-pass",
                "유니패스"
            ])),
            kws(&["해외직구", "개인통관고유부호", "관세", "유니패스"])
        );
        // Canonicals map to themselves whatever their case; unknown keywords pass through.
        assert_eq!(s.canonical("Uni-Pass"), "유니패스");
        assert_eq!(s.canonical("  통관  "), "통관");
    }

    #[test]
    fn matching_is_nfc_and_latin_case_insensitive() {
        let s = parse("HS코드\tHS CODE\n").unwrap();
        assert_eq!(s.canonical("hs code"), "HS코드");
        assert_eq!(s.canonical("hs코드"), "HS코드");
        // Decomposed jamo (NFD) match the composed spelling.
        let nfd: String = "직구".chars().collect::<String>().nfd().collect();
        assert_ne!(nfd, "직구");
        let s = parse("해외직구\t직구\n").unwrap();
        assert_eq!(s.canonical(&nfd), "해외직구");
    }

    #[test]
    fn the_starter_file_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/synonyms.tsv");
        let s = Synonyms::read(&path).unwrap();
        assert!(s.len() > 50);
        assert_eq!(s.canonical("이삿짐"), "이사화물");
        assert_eq!(s.canonical("ata carnet"), "ATA 까르네");
    }

    #[test]
    fn canonical_without_variant_is_an_error() {
        let e = err("# c\n해외직구\t직구\n면세한도\n");
        assert!(
            e.contains("syn.tsv: line 3:") && e.contains("no variant"),
            "{e}"
        );
    }

    #[test]
    fn empty_field_is_an_error() {
        for text in ["a\t\tb\n", "a\tb\t\n", "\ta\n", "a\t  \n"] {
            let e = err(text);
            assert!(
                e.contains("syn.tsv: line 1:") && e.contains("empty"),
                "{text:?}: {e}"
            );
        }
    }

    #[test]
    fn variant_under_two_canonicals_is_an_error() {
        let e = err("a\tx\nb\ty\tX\n");
        assert!(
            e.contains("syn.tsv: line 2:") && e.contains("already listed under `a` at line 1"),
            "{e}"
        );
        let e = err("a\tx\tx\n");
        assert!(e.contains("line 1:") && e.contains("twice"), "{e}");
    }

    #[test]
    fn variant_equal_to_a_canonical_is_an_error() {
        let e = err("a\tb\nc\tA\n");
        assert!(
            e.contains("line 2:") && e.contains("equals the canonical `a`"),
            "{e}"
        );
        let e = err("a\ta\n");
        assert!(
            e.contains("line 1:") && e.contains("equals its canonical"),
            "{e}"
        );
        // A canonical that an earlier line listed as a variant.
        let e = err("a\tb\nb\tc\n");
        assert!(
            e.contains("line 2:") && e.contains("already a variant of `a`"),
            "{e}"
        );
        let e = err("a\tb\na\tc\n");
        assert!(
            e.contains("line 2:") && e.contains("already an entry at line 1"),
            "{e}"
        );
    }

    #[test]
    fn unreadable_files_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.tsv");
        assert!(Synonyms::read(&missing)
            .unwrap_err()
            .to_string()
            .contains("nope.tsv"));
        let bad = dir.path().join("bad.tsv");
        std::fs::write(&bad, b"a\tb\n\xff\tc\n").unwrap();
        let e = Synonyms::read(&bad).unwrap_err().to_string();
        assert!(e.contains("bad.tsv: line 2:") && e.contains("UTF-8"), "{e}");
    }
}
