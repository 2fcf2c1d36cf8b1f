//! Score processors applied to each row's next-token scores, in transformers' order:
//! no-repeat n-gram, minimum length, grounding (transformers' prefix-allowed-tokens slot),
//! forced first token, forced last token.

use super::config::GenerationConfig;

/// Applies every enabled processor to `scores` (one row, `vocab` long) for a hypothesis whose
/// decoder tokens so far (start token included) are `tokens`; `grounded_input` is the input's
/// text for [`GenerationConfig::grounding`] ([`super::Grounding::input_text`]).
pub fn process(
    scores: &mut [f32],
    tokens: &[u32],
    cfg: &GenerationConfig,
    grounded_input: Option<&str>,
) {
    let cur_len = tokens.len();
    if cfg.no_repeat_ngram_size > 0 {
        ban_repeated_ngrams(scores, tokens, cfg.no_repeat_ngram_size);
    }
    if cur_len < cfg.min_length {
        for &eos in &cfg.eos_token_ids {
            if let Some(s) = scores.get_mut(eos as usize) {
                *s = f32::NEG_INFINITY;
            }
        }
    }
    if let (Some(g), Some(input)) = (&cfg.grounding, grounded_input) {
        g.mask(scores, input, &tokens[1.min(tokens.len())..]);
    }
    if let Some(bos) = cfg.forced_bos_token_id {
        if cur_len == 1 {
            force(scores, &[bos]);
        }
    }
    if let Some(eos) = cfg.forced_eos_token_id {
        if cur_len == cfg.effective_max_length() - 1 {
            force(scores, &[eos]);
        }
    }
}

/// Sets every score to -inf except `keep`, which get 0 (transformers' forced-token processors).
fn force(scores: &mut [f32], keep: &[u32]) {
    scores.iter_mut().for_each(|s| *s = f32::NEG_INFINITY);
    for &k in keep {
        if let Some(s) = scores.get_mut(k as usize) {
            *s = 0.0;
        }
    }
}

/// Bans every token that would complete an n-gram already present in `tokens`.
pub fn ban_repeated_ngrams(scores: &mut [f32], tokens: &[u32], n: usize) {
    let len = tokens.len();
    if n == 0 || len < n {
        return; // no complete n-gram yet
    }
    let prefix = &tokens[len + 1 - n..];
    for start in 0..=len - n {
        if &tokens[start..start + n - 1] == prefix {
            if let Some(s) = scores.get_mut(tokens[start + n - 1] as usize) {
                *s = f32::NEG_INFINITY;
            }
        }
    }
}

/// In-place log-softmax of one row, in f32 like transformers' `log_softmax` on float32 logits
/// (vectorised: [`crate::vector_math::log_softmax_in_place`]).
pub fn log_softmax_in_place(row: &mut [f32]) {
    crate::vector_math::log_softmax_in_place(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ngram_ban_matches_transformers_examples() {
        // tokens: 1 5 6 5 ; bigram (5, 6) seen, last token 5 -> ban 6
        let mut s = vec![0.0f32; 10];
        ban_repeated_ngrams(&mut s, &[1, 5, 6, 5], 2);
        assert_eq!(s[6], f32::NEG_INFINITY);
        assert_eq!(s.iter().filter(|x| x.is_infinite()).count(), 1);
        // trigram: 1 2 3 1 2 -> ban 3
        let mut s = vec![0.0f32; 10];
        ban_repeated_ngrams(&mut s, &[1, 2, 3, 1, 2], 3);
        assert_eq!(s[3], f32::NEG_INFINITY);
        // too short for any n-gram
        let mut s = vec![0.0f32; 10];
        ban_repeated_ngrams(&mut s, &[1], 3);
        assert!(s.iter().all(|x| x.is_finite()));
        // unigram ban: every seen token
        let mut s = vec![0.0f32; 10];
        ban_repeated_ngrams(&mut s, &[1, 4], 1);
        assert!(s[1].is_infinite() && s[4].is_infinite());
    }

    #[test]
    fn log_softmax_normalises() {
        let mut r = vec![1.0f32, 2.0, 3.0];
        log_softmax_in_place(&mut r);
        let total: f32 = r.iter().map(|x| x.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }
}
