//! Span substitution: training rows whose copied keywords are replaced by other text, so that a
//! model learns to copy whatever the question names rather than to memorise the entities of its
//! training rows.
//!
//! Why: a keyword extractor trained from scratch on a few thousand questions learns their entity
//! lists — on questions about other topics it invented entities from its training rows (신발 →
//! 게임기) and dropped words it had never seen. Here, for an augmented copy of a row, one or more
//! of its keywords that are spans of the question (`이사화물` in `이사화물 통관예약을 하면…`) are
//! replaced, in the question and in the keywords alike, by either another row's span keyword
//! (entities recombined with other contexts) or a random string of common Hangul syllables
//! (text the model cannot have memorised, only copied). Particles and the rest of the question
//! stay, so the copy is still a natural question with its labels still right by
//! `docs/labelling.md` (a substituted keyword is still a span; derived terms are never
//! replaced). A copy whose keywords would stop being spans (a replaced keyword inside another
//! keyword) is not made.
//!
//! The copies are a pure function of the rows, the rate and the seed, so a resumed run sees the
//! same data.

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::data::Example;
use crate::keywords::{join_keywords, split_keywords};

/// The 2,350 Hangul syllables of KS X 1001 (the common ones: every syllable of ordinary Korean
/// text), in code order.
pub fn common_hangul_syllables() -> Vec<char> {
    // KS X 1001 lists its Hangul in EUC-KR rows 0xB0–0xC8, columns 0xA1–0xFE.
    let mut out = Vec::with_capacity(2350);
    for hi in 0xB0u8..=0xC8 {
        for lo in 0xA1u8..=0xFE {
            let bytes = [hi, lo];
            let (text, _, bad) = encoding_rs::EUC_KR.decode(&bytes);
            if !bad {
                out.extend(
                    text.chars()
                        .filter(|c| ('\u{AC00}'..='\u{D7A3}').contains(c)),
                );
            }
        }
    }
    out
}

/// Span substitution settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpanSubstitution {
    /// Expected augmented copies per row (e.g. 1.0: one copy of every row that has a span
    /// keyword; 0.5: of half of them; 2.0: two copies each).
    pub rate: f64,
    /// Seed of the copies (the run's seed).
    pub seed: u64,
}

/// The augmented copies of `rows` (not the rows themselves): see the module documentation.
/// `derived` tells the derived terms, which are never replaced.
pub fn substitute_spans(
    rows: &[Example],
    settings: SpanSubstitution,
    is_derived: impl Fn(&str) -> bool,
) -> Vec<Example> {
    if settings.rate <= 0.0 {
        return Vec::new();
    }
    let spans_of = |e: &Example| -> Vec<String> {
        split_keywords(&e.keyword)
            .into_iter()
            .filter(|k| k.chars().count() >= 2 && e.query.contains(k.as_str()) && !is_derived(k))
            .collect()
    };
    // Every span keyword of the data, for recombination.
    let mut lexicon: Vec<String> = rows.iter().flat_map(spans_of).collect();
    lexicon.sort();
    lexicon.dedup();
    let syllables = common_hangul_syllables();
    let mut out = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let spans = spans_of(row);
        if spans.is_empty() {
            continue;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(
            settings.seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let whole = settings.rate.floor() as usize;
        let copies = whole + usize::from(rng.random_bool(settings.rate.fract()));
        for _ in 0..copies {
            if let Some(copy) =
                substitute_row(row, &spans, &lexicon, &syllables, &is_derived, &mut rng)
            {
                out.push(copy);
            }
        }
    }
    out
}

/// One augmented copy of `row`, or `None` if its labels would no longer hold.
fn substitute_row(
    row: &Example,
    spans: &[String],
    lexicon: &[String],
    syllables: &[char],
    is_derived: &impl Fn(&str) -> bool,
    rng: &mut ChaCha8Rng,
) -> Option<Example> {
    // Each span is replaced with probability 1/2, at least one.
    let mut chosen: Vec<&String> = spans.iter().filter(|_| rng.random_bool(0.5)).collect();
    if chosen.is_empty() {
        chosen.push(spans.choose(rng)?);
    }
    // Longest first, so that a keyword inside a longer one is not replaced before it.
    chosen.sort_by_key(|k| std::cmp::Reverse(k.chars().count()));
    let mut query = row.query.clone();
    let mut keywords = split_keywords(&row.keyword);
    for old in chosen {
        let new = if rng.random_bool(0.5) {
            lexicon.choose(rng)?.clone()
        } else {
            let len = rng.random_range(2..=4);
            (0..len)
                .map(|_| *syllables.choose(rng).unwrap_or(&'가'))
                .collect()
        };
        if new == *old || keywords.contains(&new) || !query.contains(old.as_str()) {
            continue;
        }
        query = query.replace(old.as_str(), &new);
        for k in &mut keywords {
            if k == old {
                *k = new.clone();
            }
        }
    }
    // Every keyword must still be a span of the question or a derived term.
    let squash = |s: &str| s.chars().filter(|c| !c.is_whitespace()).collect::<String>();
    let q = squash(&query);
    let grounded = keywords
        .iter()
        .all(|k| is_derived(k) || q.contains(&squash(k)));
    (grounded && query != row.query).then(|| Example {
        query,
        keyword: join_keywords(&keywords),
        line: row.line,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(q: &str, k: &str) -> Example {
        Example {
            query: q.into(),
            keyword: k.into(),
            line: 2,
        }
    }

    #[test]
    fn the_common_syllables_are_ks_x_1001() {
        let s = common_hangul_syllables();
        assert_eq!(s.len(), 2350);
        assert_eq!((s[0], s[s.len() - 1]), ('가', '힝'));
        assert!(s.contains(&'관') && s.contains(&'세') && !s.contains(&'똠'));
    }

    #[test]
    fn copies_keep_labels_grounded_and_are_reproducible() {
        let rows = vec![
            row(
                "이사화물 통관예약을 하면 뭐가 좋나요?",
                "이사화물, 통관, 예약, 장점",
            ),
            row(
                "해외에서 산 명품 가방은 신고해야 하나요?",
                "해외, 구매, 명품, 가방, 신고, 필요 여부",
            ),
            row("면세한도를 넘으면 어떻게 되나요?", "면세한도, 초과, 결과"),
            row("뭐가 좋아요?", "장점"),
        ];
        let derived = |k: &str| ["장점", "구매", "필요 여부", "초과", "결과"].contains(&k);
        let settings = SpanSubstitution { rate: 2.0, seed: 7 };
        let copies = substitute_spans(&rows, settings, derived);
        assert!(copies.len() >= 4, "{copies:?}");
        for c in &copies {
            let q: String = c.query.chars().filter(|c| !c.is_whitespace()).collect();
            for k in split_keywords(&c.keyword) {
                let k2: String = k.chars().filter(|c| !c.is_whitespace()).collect();
                assert!(derived(&k) || q.contains(&k2), "{k} not in {}", c.query);
            }
            assert!(rows.iter().all(|r| r.query != c.query));
            // Derived terms survive, in place.
            assert!(!c.keyword.contains("장점") || c.keyword.ends_with("장점"));
        }
        assert_eq!(copies, substitute_spans(&rows, settings, derived));
        assert_ne!(
            copies,
            substitute_spans(&rows, SpanSubstitution { rate: 2.0, seed: 8 }, derived)
        );
        assert!(
            substitute_spans(&rows, SpanSubstitution { rate: 0.0, seed: 7 }, derived).is_empty()
        );
    }
}
