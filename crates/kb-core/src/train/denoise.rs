//! The denoising objective (`objective = "denoise"`): BART's own pre-training task, text
//! infilling, on the training file's questions — for pre-training a model built from scratch
//! before it is fine-tuned on the keywords.
//!
//! Why: a small model trained from scratch on a few thousand labelled questions mangles words it
//! must copy (`대성당` → `대성성당`) and drops words unseen in training. Reconstructing whole
//! questions from damaged copies teaches the decoder to spell out the input's words, on all the
//! text at hand, before it learns which words are keywords.
//!
//! As in BART (Lewis et al. 2020, "text infilling"): spans with Poisson(3)-distributed lengths
//! are each replaced by one `<mask>` token (a span of length 0 inserts one) until about 30% of
//! the question is masked; the model reads the damaged question and generates the original.
//! Spans are drawn over characters (a Hangul syllable is one character, and the scratch
//! tokenizer's alphabet holds every common syllable), not over tokens, so the damage does not
//! depend on the tokenizer. Each question gives [`DENOISE_COPIES`] damaged copies, a pure
//! function of the rows and the seed, so a resumed run sees the same data.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::data::Example;

/// The mask token (KoBART's, and the scratch tokenizer's: see [`super::scratch`]).
pub const MASK_TOKEN: &str = "<mask>";

/// Share of each question's characters masked.
pub const MASK_RATIO: f64 = 0.3;

/// Mean span length (Poisson λ).
pub const SPAN_POISSON_LAMBDA: f64 = 3.0;

/// Damaged copies made of each question.
pub const DENOISE_COPIES: usize = 2;

/// The denoising pairs of `rows`: for each row, [`DENOISE_COPIES`] rows whose `query` is the
/// damaged question and whose target (`keyword`) is the question itself; `line` is kept for
/// messages. Rows with an empty question are left out.
pub fn denoising_pairs(rows: &[Example], seed: u64) -> Vec<Example> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xDE_0015E);
    let mut out = Vec::with_capacity(rows.len() * DENOISE_COPIES);
    for row in rows {
        if row.query.trim().is_empty() {
            continue;
        }
        for _ in 0..DENOISE_COPIES {
            out.push(Example {
                query: infill(&row.query, &mut rng),
                keyword: row.query.clone(),
                line: row.line,
            });
        }
    }
    out
}

/// `text` with spans replaced by [`MASK_TOKEN`] (see the module documentation); at least one
/// span is masked.
pub fn infill(text: &str, rng: &mut impl Rng) -> String {
    let chars: Vec<char> = text.chars().collect();
    let budget = ((chars.len() as f64 * MASK_RATIO).round() as usize).max(1);
    // A span of mean length λ starts at each unmasked position with probability p: the masked
    // share is then about pλ / (1 + pλ), MASK_RATIO for this p.
    let start_probability = MASK_RATIO / ((1.0 - MASK_RATIO) * SPAN_POISSON_LAMBDA);
    let mut out = String::with_capacity(text.len() + 16);
    let mut masked = 0;
    let mut masks = 0;
    let mut i = 0;
    while i < chars.len() {
        if masked < budget && rng.random_bool(start_probability) {
            let len = poisson(SPAN_POISSON_LAMBDA, rng).min(budget - masked);
            out.push_str(MASK_TOKEN);
            masks += 1;
            masked += len;
            if len > 0 {
                i += len;
                continue;
            }
        }
        out.push(chars[i]);
        i += 1;
    }
    if masks == 0 {
        // Nothing drawn (a short question): mask one span somewhere.
        let len = poisson(SPAN_POISSON_LAMBDA, rng).clamp(1, budget);
        let start = rng.random_range(0..=chars.len().saturating_sub(len));
        out = chars[..start].iter().collect::<String>()
            + MASK_TOKEN
            + &chars[(start + len).min(chars.len())..]
                .iter()
                .collect::<String>();
    }
    out
}

/// A span length: a Poisson(λ) draw.
fn poisson(lambda: f64, rng: &mut impl Rng) -> usize {
    let distribution = rand_distr::Poisson::new(lambda).expect("a positive, finite λ");
    rand_distr::Distribution::sample(&distribution, rng) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(query: &str) -> Example {
        Example {
            query: query.into(),
            keyword: "이사화물, 통관".into(),
            line: 7,
        }
    }

    #[test]
    fn pairs_reconstruct_the_question_from_a_masked_copy() {
        let rows = [
            example("이사화물 통관예약을 하면 뭐가 좋나요?"),
            example("  "),
            example("가"),
        ];
        let pairs = denoising_pairs(&rows, 42);
        assert_eq!(pairs.len(), 2 * DENOISE_COPIES, "the blank row is left out");
        for pair in &pairs {
            assert!(pair.query.contains(MASK_TOKEN), "{pair:?}");
            assert_eq!(pair.line, 7);
            // What is left of the question appears in it in order.
            let kept: String = pair.query.replace(MASK_TOKEN, "");
            let mut rest = pair.keyword.chars();
            assert!(kept.chars().all(|c| rest.any(|d| d == c)), "{pair:?}");
        }
        assert_eq!(pairs[0].keyword, rows[0].query);
        assert_ne!(pairs[0].query, pairs[1].query, "copies differ");
        assert_eq!(
            pairs,
            denoising_pairs(&rows, 42),
            "a pure function of rows and seed"
        );
        assert_ne!(pairs, denoising_pairs(&rows, 43));
    }

    #[test]
    fn about_thirty_percent_is_masked_in_spans_averaging_three() {
        let text = "관세청 이사화물 통관예약 제도는 해외에서 귀국하는 사람이 짐을 미리 신고하는 것";
        let n = text.chars().count();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (mut masked, mut masks, trials) = (0usize, 0usize, 2000);
        for _ in 0..trials {
            let noised = infill(text, &mut rng);
            masks += noised.matches(MASK_TOKEN).count();
            masked += n - noised.replace(MASK_TOKEN, "").chars().count();
        }
        let ratio = masked as f64 / (n * trials) as f64;
        assert!((0.22..=0.31).contains(&ratio), "masked share {ratio}");
        let mean_span = masked as f64 / masks as f64;
        assert!((2.0..=3.5).contains(&mean_span), "mean span {mean_span}");
    }
}
