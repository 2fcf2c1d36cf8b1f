//! Grounded decoding: every generated keyword is a span of the input (whitespace ignored) or a
//! term of a closed list of derived terms (`docs/labelling.md`: intent terms, nouns for native
//! verbs, negations) — enforced inside the search, as transformers' `prefix_allowed_tokens_fn`
//! (`PrefixConstrainedLogitsProcessor`) does: at every step each hypothesis may only continue
//! with tokens that keep its text groundable, so beam search spends its beams on grounded
//! outputs instead of filtering invented keywords afterwards.
//!
//! Text is compared the way the tokenizer sees it: tokens are the vocabulary's pieces (`▁` for
//! a space), the input is the concatenation of its tokens' pieces, and every comparison ignores
//! whitespace. The generated text is read as keywords separated by `,`: the keyword being
//! written must be a substring of the input or a prefix of a derived term; a `,` or the end of
//! the sequence is allowed only after a complete keyword (a non-empty substring of the input,
//! or a whole derived term). An input token the vocabulary does not know (`<unk>`) matches
//! nothing.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use unicode_normalization::UnicodeNormalization;

use crate::error::Result;
use crate::tokenizer::KoTokenizer;
use crate::tsv;

/// The derived terms a grounded keyword may be besides a span of the input, with how often the
/// training labels used each (`term<TAB>count` TSV, see [`DerivedTerms::from_labels`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DerivedTerms {
    /// `(term, count)`, most used first.
    pub terms: Vec<(String, usize)>,
}

impl DerivedTerms {
    /// The keywords of `(query, keywords)` rows that are not spans of their query (whitespace
    /// ignored, NFKC), counted; those used fewer than `min_count` times are left out (a typo in
    /// one label should not become an allowed term).
    pub fn from_labels<'a>(
        rows: impl IntoIterator<Item = (&'a str, &'a [String])>,
        min_count: usize,
    ) -> Self {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for (query, keywords) in rows {
            let q = squash(query);
            for k in keywords {
                let key = squash(k);
                if !key.is_empty() && !q.contains(&key) {
                    *counts.entry(k.nfkc().collect()).or_default() += 1;
                }
            }
        }
        let mut terms: Vec<(String, usize)> = counts
            .into_iter()
            .filter(|(_, n)| *n >= min_count)
            .collect();
        terms.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        Self { terms }
    }

    /// Reads a `term<TAB>count` file (header `term<TAB>count`), as [`DerivedTerms::write`]
    /// writes it.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = tsv::read_bytes(path)?;
        let reader = tsv::Reader::new(&bytes, path)?;
        let (Some(tcol), Some(ccol)) = (reader.column("term"), reader.column("count")) else {
            return Err(reader.error(
                reader.header_line(),
                format!(
                    "the header must be `term<TAB>count`; found {:?}",
                    reader.header()
                ),
            ));
        };
        let mut terms = Vec::new();
        for row in reader {
            let row = row.map_err(|e| tsv::line_error(path, e.line, e.problem))?;
            let term = row.fields[tcol].clone();
            if term.is_empty() || term.contains([',', '，']) {
                return Err(tsv::line_error(
                    path,
                    row.line,
                    "field `term` is empty or contains a comma",
                ));
            }
            let count = row.fields[ccol].parse::<usize>().map_err(|_| {
                tsv::line_error(
                    path,
                    row.line,
                    format!(
                        "field `count` is not a whole number: {:?}",
                        row.fields[ccol]
                    ),
                )
            })?;
            terms.push((term, count));
        }
        Ok(Self { terms })
    }

    /// Writes the terms as a `term<TAB>count` TSV.
    pub fn write(&self, path: &Path) -> Result<()> {
        let mut out = Vec::new();
        let io = |e| crate::Error::io(path, e);
        tsv::write_row(&mut out, &["term", "count"]).map_err(io)?;
        for (term, count) in &self.terms {
            tsv::write_row(&mut out, &[term.clone(), count.to_string()]).map_err(io)?;
        }
        std::fs::write(path, out).map_err(io)
    }
}

/// NFKC, every whitespace character removed, `▁` (the tokenizer's space) too.
fn squash(text: &str) -> String {
    text.nfkc()
        .filter(|c| !c.is_whitespace() && *c != '▁')
        .collect()
}

/// Whether `c` separates keywords (`,`, and `，` before NFKC).
fn is_separator(c: char) -> bool {
    c == ',' || c == '，'
}

/// A matcher for one input never produces this character (an unknown input token).
const NO_MATCH: char = '\u{FFFF}';

/// The grounding constraint for a tokenizer and a list of derived terms: built once, shared by
/// every search (see the module documentation). Two constraints compare equal only when they are
/// the same object (settings holding the same `Arc<Grounding>` batch together).
pub struct Grounding {
    /// Each token's text, squashed; `None` for special tokens (never allowed, eos aside).
    pieces: Vec<Option<String>>,
    /// Tokens by the first character of their squashed text.
    by_first_char: HashMap<char, Vec<u32>>,
    /// Tokens whose squashed text is empty (a lone `▁`): always allowed inside the text.
    blank: Vec<u32>,
    /// Squashed derived terms.
    terms: HashSet<String>,
    /// The squashed derived terms, sorted: those starting with a given text follow it directly
    /// ([`Grounding::is_term_prefix`]). Storing every prefix instead took memory quadratic in a
    /// term's length (a 30,000-character line of a terms file: 1.3 GB).
    sorted_terms: Vec<String>,
    /// End-of-sequence tokens.
    eos: Vec<u32>,
}

impl std::fmt::Debug for Grounding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grounding")
            .field("vocabulary", &self.pieces.len())
            .field("derived_terms", &self.terms.len())
            .finish()
    }
}

impl PartialEq for Grounding {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}

impl Grounding {
    /// The constraint for `tokenizer`'s vocabulary and `derived` terms.
    pub fn new(tokenizer: &KoTokenizer, derived: &DerivedTerms) -> Self {
        let pieces = tokenizer.piece_texts();
        let mut by_first_char: HashMap<char, Vec<u32>> = HashMap::new();
        let mut blank = Vec::new();
        let pieces: Vec<Option<String>> =
            pieces.into_iter().map(|p| p.map(|p| squash(&p))).collect();
        for (id, p) in pieces.iter().enumerate() {
            match p.as_deref().map(|p| p.chars().next()) {
                Some(Some(c)) => by_first_char.entry(c).or_default().push(id as u32),
                Some(None) => blank.push(id as u32),
                None => {}
            }
        }
        let terms: HashSet<String> = derived
            .terms
            .iter()
            .map(|(t, _)| squash(t))
            .filter(|t| !t.is_empty())
            .collect();
        let mut sorted_terms: Vec<String> = terms.iter().cloned().collect();
        sorted_terms.sort_unstable();
        Self {
            pieces,
            by_first_char,
            blank,
            terms,
            sorted_terms,
            eos: tokenizer.special().eos.clone(),
        }
    }

    /// The squashed text of an input given as token ids (what a keyword may be a span of).
    pub fn input_text(&self, input_ids: &[u32]) -> String {
        input_ids
            .iter()
            .map(|&id| match self.pieces.get(id as usize) {
                Some(Some(p)) => p.as_str(),
                _ => "\u{FFFF}",
            })
            .collect()
    }

    /// Sets to -inf the score of every token that would make the hypothesis ungrounded:
    /// `input` is [`Grounding::input_text`] of the input, `generated` the hypothesis' tokens
    /// after the decoder start token.
    pub fn mask(&self, scores: &mut [f32], input: &str, generated: &[u32]) {
        let allowed = self.allowed(input, generated);
        let mut keep = vec![false; scores.len()];
        for id in allowed {
            if let Some(k) = keep.get_mut(id as usize) {
                *k = true;
            }
        }
        for (s, k) in scores.iter_mut().zip(keep) {
            if !k {
                *s = f32::NEG_INFINITY;
            }
        }
    }

    /// The tokens a hypothesis may continue with (see [`Grounding::mask`]).
    pub fn allowed(&self, input: &str, generated: &[u32]) -> Vec<u32> {
        let Some(state) = self.state_after(input, generated) else {
            // Already ungrounded (e.g. forced tokens): only ending is offered.
            return self.eos.clone();
        };
        let mut out = Vec::new();
        if state.can_end(self, input) || (state.partial.is_empty() && !state.after_separator) {
            out.extend_from_slice(&self.eos);
        }
        let mut next_chars: HashSet<char> = HashSet::new();
        if state.can_end(self, input) {
            next_chars.insert(',');
        }
        if state.partial.is_empty() {
            next_chars.extend(input.chars().filter(|&c| c != NO_MATCH));
            next_chars.extend(self.terms.iter().filter_map(|t| t.chars().next()));
        } else {
            let p = state.partial.as_str();
            let mut from = 0;
            while let Some(at) = input[from..].find(p) {
                let end = from + at + p.len();
                if let Some(c) = input[end..].chars().next() {
                    next_chars.insert(c);
                }
                from += at + p.chars().next().map_or(1, char::len_utf8);
            }
            for t in &self.terms {
                if let Some(rest) = t.strip_prefix(p) {
                    next_chars.extend(rest.chars().next());
                }
            }
        }
        next_chars.remove(&NO_MATCH);
        for c in next_chars {
            for &id in self.by_first_char.get(&c).into_iter().flatten() {
                if self.extend(&state, input, id).is_some() {
                    out.push(id);
                }
            }
        }
        if out.is_empty() {
            // Nothing grounded can follow (cannot happen while the input has text): end.
            return self.eos.clone();
        }
        out.extend_from_slice(&self.blank);
        out
    }

    /// Whether `text` begins a derived term: the first term not sorting before it starts with it.
    fn is_term_prefix(&self, text: &str) -> bool {
        let at = self.sorted_terms.partition_point(|t| t.as_str() < text);
        self.sorted_terms
            .get(at)
            .is_some_and(|t| t.starts_with(text))
    }

    /// The state after `generated`, or `None` if it is not grounded.
    fn state_after(&self, input: &str, generated: &[u32]) -> Option<State> {
        let mut state = State::default();
        for &id in generated {
            if self.eos.contains(&id) {
                break;
            }
            state = self.extend(&state, input, id)?;
        }
        Some(state)
    }

    /// The state after one more token, or `None` if it breaks grounding.
    fn extend(&self, state: &State, input: &str, id: u32) -> Option<State> {
        let piece = self.pieces.get(id as usize)?.as_deref()?;
        let mut next = state.clone();
        for c in piece.chars() {
            if is_separator(c) {
                if !next.can_end(self, input) {
                    return None;
                }
                next.partial.clear();
                next.after_separator = true;
            } else {
                next.partial.push(c);
                if !(input.contains(next.partial.as_str()) || self.is_term_prefix(&next.partial)) {
                    return None;
                }
            }
        }
        Some(next)
    }
}

/// Where a hypothesis' text stands: the keyword being written (squashed) and whether a
/// separator came last.
#[derive(Debug, Clone, Default)]
struct State {
    partial: String,
    after_separator: bool,
}

impl State {
    /// Whether the keyword being written is complete: a non-empty span of the input or a whole
    /// derived term.
    fn can_end(&self, g: &Grounding, input: &str) -> bool {
        !self.partial.is_empty()
            && (input.contains(self.partial.as_str()) || g.terms.contains(&self.partial))
    }
}

/// Whether every keyword of `keywords` is grounded in `query` (a span, whitespace ignored) or a
/// derived term — what the constraint guarantees, for tests and reports.
pub fn is_grounded(keyword: &str, query: &str, derived: &DerivedTerms) -> bool {
    let k = squash(keyword);
    !k.is_empty()
        && (squash(query).contains(&k) || derived.terms.iter().any(|(t, _)| squash(t) == k))
}
