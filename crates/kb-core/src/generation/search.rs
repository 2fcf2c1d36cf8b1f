//! Greedy and beam search over [`Bart`], reproducing transformers' `generate()` for
//! encoder-decoder models (transformers 4.57's vectorised beam search, step for step).

use candle_core::Tensor;
use rayon::prelude::*;

use super::config::{EarlyStopping, GenerationConfig};
use super::processors::{log_softmax_in_place, process};
use crate::error::{Error, Result};
use crate::model::{Bart, DecoderCache, Pass};

/// Decoder positions reserved up front in the self-attention cache: the length limit when it
/// is at most this (typical for keyword outputs), else this many and the cache grows by
/// doubling — a generous `max_length` (the hub default is 512 for some models) must not
/// reserve memory that short answers never use.
const RESERVED_POSITIONS: usize = 64;

/// Score transformers adds to rule a candidate out (`-1e9`).
const MASKED: f32 = -1.0e9;

/// One generated sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// Generated token ids, without the decoder start token, ending with eos when the model
    /// stopped by itself (what `generate()` returns minus its first token and padding).
    pub ids: Vec<u32>,
    /// Beam search's length-normalised log-probability (`sequences_scores`); `None` for greedy.
    pub score: Option<f32>,
}

/// Right-pads `inputs` with `pad` into `(ids, mask)` tensors on the model's device.
pub fn pad_batch(model: &Bart, inputs: &[Vec<u32>], pad: u32) -> Result<(Tensor, Tensor)> {
    let width = inputs.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(inputs.len() * width);
    let mut mask = Vec::with_capacity(inputs.len() * width);
    for row in inputs {
        ids.extend_from_slice(row);
        ids.extend(std::iter::repeat_n(pad, width - row.len()));
        mask.extend(std::iter::repeat_n(1u8, row.len()));
        mask.extend(std::iter::repeat_n(0u8, width - row.len()));
    }
    let shape = (inputs.len(), width);
    Ok((
        Tensor::from_vec(ids, shape, model.device())?,
        Tensor::from_vec(mask, shape, model.device())?,
    ))
}

/// Generates one output per input (token ids without special tokens added), batched.
pub fn generate(
    model: &Bart,
    inputs: &[Vec<u32>],
    cfg: &GenerationConfig,
) -> Result<Vec<Generated>> {
    let mut outputs: Vec<Option<Generated>> = vec![None; inputs.len()];
    generate_each(model, inputs, cfg, &mut |i, g| outputs[i] = Some(g))?;
    outputs
        .into_iter()
        .enumerate()
        .map(|(i, g)| g.ok_or_else(|| Error::Invalid(format!("no output for input {i}"))))
        .collect()
}

/// [`generate`], handing each input's output to `done` (with the input's index) as soon as it
/// is final — an input that finishes early is reported before the batch ends (and leaves the
/// batch). Every input is reported exactly once when this returns `Ok`.
pub fn generate_each(
    model: &Bart,
    inputs: &[Vec<u32>],
    cfg: &GenerationConfig,
    done: &mut dyn FnMut(usize, Generated),
) -> Result<()> {
    generate_each_while(model, inputs, cfg, done, &|_| true)
}

/// [`generate_each`] that stops working on input `i` once `wanted(i)` turns false (asked after
/// every decoding step): the input leaves the batch and is never reported — a server drops
/// the requests whose clients went away. The other inputs' outputs are unchanged (each input's
/// search is independent of the others'). Every input still wanted at its end is reported
/// exactly once when this returns `Ok`.
pub fn generate_each_while(
    model: &Bart,
    inputs: &[Vec<u32>],
    cfg: &GenerationConfig,
    done: &mut dyn FnMut(usize, Generated),
    wanted: &dyn Fn(usize) -> bool,
) -> Result<()> {
    cfg.validate()
        .map_err(|(field, msg)| Error::Invalid(format!("generation setting {field}: {msg}")))?;
    if inputs.is_empty() {
        return Ok(());
    }
    let max_pos = model.config().max_position_embeddings;
    for (i, row) in inputs.iter().enumerate() {
        if row.is_empty() {
            return Err(Error::Invalid(format!("input {i} is empty (no tokens)")));
        }
        if row.len() > max_pos {
            return Err(Error::Invalid(format!(
                "input {i} has {} tokens; the model accepts at most {max_pos} (max_position_embeddings)",
                row.len()
            )));
        }
    }
    if cfg.effective_max_length() > max_pos {
        return Err(Error::Invalid(format!(
            "max_length {} exceeds the model's max_position_embeddings {max_pos}",
            cfg.effective_max_length()
        )));
    }
    let pad = cfg.pad_token_id.unwrap_or(cfg.eos_token_ids[0]);
    let (ids, mask) = pad_batch(model, inputs, pad)?;
    let encoded = model.encode(&ids, Some(&mask), Pass::Inference)?;
    // One row per input for now: beam search widens the cache to its beams after the first
    // step (see `beam_search`). The beams of an input then share its encoder output and
    // cross-attention keys/values.
    let mut cache = model.start_decoding(&encoded, Some(&mask))?;
    // Decoder positions ever fed: the start token and every generated token but the last.
    cache.reserve((cfg.effective_max_length().saturating_sub(1)).clamp(1, RESERVED_POSITIONS));
    // Each input's text, for grounded decoding.
    let grounded: Vec<Option<String>> = inputs
        .iter()
        .map(|ids| cfg.grounding.as_ref().map(|g| g.input_text(ids)))
        .collect();
    if cfg.num_beams == 1 {
        greedy(model, cache, &grounded, cfg, done, wanted)
    } else {
        beam_search(model, cache, &grounded, cfg, done, wanted)
    }
}

/// Runs one decoder step for the last token of each row; returns the f32 logits as one
/// row-major buffer (`rows × vocab`) and the vocabulary size.
fn step_logits(model: &Bart, cache: &mut DecoderCache, last: &[u32]) -> Result<(Vec<f32>, usize)> {
    let ids = Tensor::from_vec(last.to_vec(), (last.len(), 1), model.device())?;
    model.decode_step_to_host(&ids, cache)
}

/// Greedy decoding; `grounded` holds each input's text for grounded decoding (`None` entries
/// otherwise) and sets the batch size.
fn greedy(
    model: &Bart,
    mut cache: DecoderCache,
    grounded: &[Option<String>],
    cfg: &GenerationConfig,
    done: &mut dyn FnMut(usize, Generated),
    wanted: &dyn Fn(usize) -> bool,
) -> Result<()> {
    let batch = grounded.len();
    let max_length = cfg.effective_max_length();
    let pad = cfg.pad_token_id.unwrap_or(cfg.eos_token_ids[0]);
    let mut seqs: Vec<Vec<u32>> = vec![vec![cfg.decoder_start_token_id]; batch];
    // Inputs still generating, in cache row order; an input leaves once it produced eos
    // (transformers keeps computing it and appends padding, which the output drops).
    let mut active: Vec<usize> = (0..batch).collect();
    let mut cur_len = 1;
    while cur_len < max_length {
        let last: Vec<u32> = active
            .iter()
            .map(|&b| *seqs[b].last().unwrap_or(&pad))
            .collect();
        let (mut logits, vocab) = step_logits(model, &mut cache, &last)?;
        let mut still = Vec::with_capacity(active.len());
        for (pos, row) in logits.chunks_mut(vocab).enumerate() {
            let b = active[pos];
            process(row, &seqs[b], cfg, grounded[b].as_deref());
            let next = argmax(row);
            seqs[b].push(next);
            if cfg.eos_token_ids.contains(&next) {
                done(b, greedy_output(&seqs[b], cfg));
            } else if wanted(b) {
                still.push(pos);
            }
        }
        cur_len += 1;
        if !keep_active(&mut active, &still, &mut cache)? {
            return Ok(());
        }
    }
    for b in active {
        done(b, greedy_output(&seqs[b], cfg));
    }
    Ok(())
}

/// Narrows the batch to the inputs still generating: `still` lists their positions in `active`
/// (ascending); the cache keeps only their rows. Returns whether any input is left.
fn keep_active(active: &mut Vec<usize>, still: &[usize], cache: &mut DecoderCache) -> Result<bool> {
    if still.is_empty() {
        return Ok(false);
    }
    if still.len() < active.len() {
        cache.retain_groups(still)?;
        *active = still.iter().map(|&pos| active[pos]).collect();
    }
    Ok(true)
}

/// A greedy sequence (decoder start token first) as returned: up to its first eos.
fn greedy_output(seq: &[u32], cfg: &GenerationConfig) -> Generated {
    let mut ids = seq[1..].to_vec();
    if let Some(end) = ids.iter().position(|t| cfg.eos_token_ids.contains(t)) {
        ids.truncate(end + 1);
    }
    Generated { ids, score: None }
}

/// Index of the first maximum (as `torch.argmax`).
fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] || (row[best].is_nan() && !v.is_nan()) {
            best = i;
        }
    }
    best as u32
}

/// Orders `(score, index)` pairs best first: larger score, then lower index (NaN last).
fn rank(a: &(f32, usize), b: &(f32, usize)) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// Score used for ranking: NaN ranks as -inf.
fn rank_key(v: f32) -> f32 {
    if v.is_nan() {
        f32::NEG_INFINITY
    } else {
        v
    }
}

/// The `k` largest values of `scores` as `(value, index)`, largest first (ties: lower index first).
fn top_k(scores: &[f32], k: usize) -> Vec<(f32, usize)> {
    let mut all: Vec<(f32, usize)> = scores.iter().map(|&v| rank_key(v)).zip(0..).collect();
    let k = k.min(all.len());
    if k < all.len() {
        all.select_nth_unstable_by(k, rank);
        all.truncate(k);
    }
    all.sort_by(rank);
    all
}

/// Adds to `best` (kept sorted by [`rank`], at most `k` long) the `k` best of
/// `scores[i] + offset`, indexed `base + i`. Equivalent to [`top_k`] over the concatenation
/// of every row passed, because rows come in increasing `base` order and a candidate only
/// displaces a strictly worse one; one pass over the row, no copy of it.
fn push_top_k(best: &mut Vec<(f32, usize)>, scores: &[f32], offset: f32, base: usize, k: usize) {
    if k == 0 {
        return;
    }
    // The row's own best k first. Once k are kept, a block of scores whose largest is below
    // the k-th best is skipped whole (most of the row: one vectorisable maximum per block).
    const BLOCK: usize = 32;
    let mut row: Vec<(f32, usize)> = Vec::with_capacity(k + 1);
    for (b, block) in scores.chunks(BLOCK).enumerate() {
        if row.len() == k {
            let max = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            // Every `v + offset` is then below the k-th key (rounding is monotonic; NaN ranks
            // as -inf, never above it).
            if max + offset < row[k - 1].0 {
                continue;
            }
        }
        for (i, &v) in block.iter().enumerate() {
            let key = rank_key(v + offset);
            // The same total order as `rank` (so -0.0 ranks below 0.0, as in `top_k`).
            if row.len() == k && key.total_cmp(&row[k - 1].0).is_le() {
                continue;
            }
            let at = row.partition_point(|e| e.0.total_cmp(&key).is_ge());
            row.insert(at, (key, base + b * BLOCK + i));
            row.truncate(k);
        }
    }
    best.extend(row);
    best.sort_by(rank);
    best.truncate(k);
}

/// A hypothesis: decoder tokens (start token included) and its score.
#[derive(Debug, Clone)]
struct Hypothesis {
    tokens: Vec<u32>,
    score: f32,
    finished: bool,
}

/// Beam state of one input.
struct BeamState {
    /// The input's text when decoding is grounded.
    grounded_input: Option<String>,
    running: Vec<Hypothesis>,
    finished: Vec<Hypothesis>,
    improvement_possible: bool,
}

/// Beam search; `grounded` holds each input's text for grounded decoding (`None` entries
/// otherwise) and sets the batch size.
fn beam_search(
    model: &Bart,
    mut cache: DecoderCache,
    grounded: &[Option<String>],
    cfg: &GenerationConfig,
    done: &mut dyn FnMut(usize, Generated),
    wanted: &dyn Fn(usize) -> bool,
) -> Result<()> {
    let k = cfg.num_beams;
    let mut states: Vec<BeamState> = grounded
        .iter()
        .map(|input| BeamState::start(input.clone(), cfg))
        .collect();
    let mut cur_len = PROMPT_LEN;
    // Inputs still searching, in cache order (ascending). An input leaves the batch once its
    // result can no longer change (see `settled`); transformers keeps computing such inputs
    // until the whole batch stops, with the same outputs.
    let mut active: Vec<usize> = (0..grounded.len()).collect();
    loop {
        // At the first step an input's beams are one sequence (the start token): it is decoded
        // once per input, every beam is scored from that one row of logits and the cache rows
        // are copied to the beams — the same values transformers computes k times (each row of
        // a product depends on that row alone).
        let first_step = cache.group() < k;
        let beams_fed = if first_step { 1 } else { k };
        let last: Vec<u32> = active
            .iter()
            .flat_map(|&b| states[b].last_tokens(beams_fed))
            .collect();
        let (mut logits, vocab) = step_logits(model, &mut cache, &last)?;
        if first_step {
            cache.widen_groups(k)?;
        }
        let (reorder, all_hit) = score_active(
            &mut states,
            &active,
            &mut logits,
            vocab,
            beams_fed,
            cur_len,
            cfg,
        );
        cache.reorder(&reorder)?;
        cur_len += 1;
        for &b in &active {
            states[b].update_improvement(cur_len, cfg);
        }
        if batch_stops(&states, &active, all_hit, cfg) {
            break;
        }
        // Settled inputs leave the batch. Exact: a settled input's finished hypotheses can no
        // longer change (every later candidate gets the -1e9 mask); the loop's stop test only
        // depends on it through `all_hit` (true for every input at once: at most `k · eos ids`
        // of the `keep` candidates can be eos, so all hit only at the length limit) and through
        // `all_finished` (stopping earlier because of it changes nothing: the inputs left are
        // then all settled too). Inputs no longer wanted leave unreported, exact for the others
        // by the same argument: an unsettled input keeps the loop going by itself.
        let mut still = Vec::with_capacity(active.len());
        for (pos, &b) in active.iter().enumerate() {
            if settled(&states[b], cfg) {
                done(b, beam_output(&states[b]));
            } else if wanted(b) {
                still.push(pos);
            }
        }
        if !keep_active(&mut active, &still, &mut cache)? {
            return Ok(());
        }
    }
    for b in active {
        done(b, beam_output(&states[b]));
    }
    Ok(())
}

/// Decoder tokens before the first generated one (the start token).
const PROMPT_LEN: usize = 1;

impl BeamState {
    /// The state before the first step: beam 0 is the start token, the other beams and the
    /// finished slots are masked.
    fn start(grounded_input: Option<String>, cfg: &GenerationConfig) -> Self {
        let start = vec![cfg.decoder_start_token_id];
        let hypothesis = |score| Hypothesis {
            tokens: start.clone(),
            score,
            finished: false,
        };
        let k = cfg.num_beams;
        Self {
            grounded_input,
            running: (0..k)
                .map(|j| hypothesis(if j == 0 { 0.0 } else { MASKED }))
                .collect(),
            finished: (0..k).map(|_| hypothesis(MASKED)).collect(),
            improvement_possible: true,
        }
    }

    /// The last token of each of the first `beams` running hypotheses (what the next step feeds).
    fn last_tokens(&self, beams: usize) -> impl Iterator<Item = u32> + '_ {
        self.running[..beams]
            .iter()
            .map(|h| *h.tokens.last().unwrap_or(&0))
    }

    /// transformers' early-stop heuristic after a step (`cur_len` tokens): can the best running
    /// beam still beat the worst finished one?
    fn update_improvement(&mut self, cur_len: usize, cfg: &GenerationConfig) {
        let lp = cfg.length_penalty;
        let best_len = if cfg.early_stopping == EarlyStopping::Never && lp > 0.0 {
            cfg.effective_max_length() - PROMPT_LEN
        } else {
            cur_len - PROMPT_LEN
        };
        let best_possible = self.running[0].score / (best_len as f64).powf(lp) as f32;
        let worst = self
            .finished
            .iter()
            .map(|h| h.score)
            .fold(f32::INFINITY, f32::min);
        let can_improve = self.finished.iter().any(|h| {
            let worst_here = if h.finished { worst } else { MASKED };
            best_possible > worst_here
        });
        self.improvement_possible &= can_improve;
    }
}

/// Scores one step for every active input (in parallel over inputs) from `logits` (`beams_fed`
/// rows of `vocab` per input); returns the cache rows the new beams continue and whether every
/// candidate of every input stopped.
fn score_active(
    states: &mut [BeamState],
    active: &[usize],
    logits: &mut [f32],
    vocab: usize,
    beams_fed: usize,
    cur_len: usize,
    cfg: &GenerationConfig,
) -> (Vec<u32>, bool) {
    let k = cfg.num_beams;
    let keep = 2usize.max(1 + cfg.eos_token_ids.len()) * k;
    let max_length = cfg.effective_max_length();
    let mut live: Vec<&mut BeamState> = states
        .iter_mut()
        .enumerate()
        .filter(|(b, _)| active.binary_search(b).is_ok())
        .map(|(_, s)| s)
        .collect();
    let outcomes: Vec<(Vec<u32>, bool)> = live
        .par_iter_mut()
        .zip(logits.par_chunks_mut(beams_fed * vocab))
        .enumerate()
        .map(|(pos, (state, rows))| {
            beam_step(state, rows, vocab, pos, cur_len, keep, max_length, cfg)
        })
        .collect();
    let mut reorder = Vec::with_capacity(active.len() * k);
    let mut all_hit = true;
    for (rows, hit) in outcomes {
        reorder.extend(rows);
        all_hit &= hit;
    }
    (reorder, all_hit)
}

/// transformers' stop test for the whole batch after a step: no active input can improve, or
/// (with `early_stopping: true`) all are full, or every candidate stopped.
fn batch_stops(
    states: &[BeamState],
    active: &[usize],
    all_hit: bool,
    cfg: &GenerationConfig,
) -> bool {
    let improvement_possible = active.iter().any(|&b| states[b].improvement_possible);
    let all_finished = active
        .iter()
        .all(|&b| states[b].finished.iter().all(|h| h.finished));
    let open_beam = !(all_finished && cfg.early_stopping == EarlyStopping::True);
    !(improvement_possible && open_beam && !all_hit)
}

/// An input's beam search result: its best finished hypothesis, without the start token.
fn beam_output(state: &BeamState) -> Generated {
    let best = &state.finished[0];
    Generated {
        ids: best.tokens[1..].to_vec(),
        score: Some(best.score),
    }
}

/// Whether an input's beam search result is final: no candidate can improve it any more, or
/// (with `early_stopping: true`) it holds `num_beams` finished hypotheses.
fn settled(state: &BeamState, cfg: &GenerationConfig) -> bool {
    !state.improvement_possible
        || (cfg.early_stopping == EarlyStopping::True && state.finished.iter().all(|h| h.finished))
}

/// One beam-search step for one input: scores its beams' continuations from `rows` (its `k`
/// rows of logits, `vocab` wide, or one row shared by beams that are all the same sequence;
/// turned into processed log-probabilities in place), updates its
/// running and finished hypotheses and returns the cache rows its new beams continue (global
/// indices) and whether every candidate stopped.
#[allow(clippy::too_many_arguments)]
fn beam_step(
    state: &mut BeamState,
    rows: &mut [f32],
    vocab: usize,
    b: usize,
    cur_len: usize,
    keep: usize,
    max_length: usize,
    cfg: &GenerationConfig,
) -> (Vec<u32>, bool) {
    let k = cfg.num_beams;
    let lp = cfg.length_penalty;
    // The best `keep` accumulated log-probabilities over every (beam, token) continuation.
    let mut best = Vec::with_capacity(keep + 1);
    if rows.len() == vocab {
        // One row for every beam (the first step: all beams are the start token alone).
        log_softmax_in_place(rows);
        process(
            rows,
            &state.running[0].tokens,
            cfg,
            state.grounded_input.as_deref(),
        );
        for (j, hyp) in state.running.iter().enumerate() {
            push_top_k(&mut best, rows, hyp.score, j * vocab, keep);
        }
    } else {
        for (j, (hyp, row)) in state.running.iter().zip(rows.chunks_mut(vocab)).enumerate() {
            log_softmax_in_place(row);
            process(row, &hyp.tokens, cfg, state.grounded_input.as_deref());
            push_top_k(&mut best, row, hyp.score, j * vocab, keep);
        }
    }
    let cands: Vec<(f32, usize, u32, bool)> = best
        .into_iter()
        .map(|(score, idx)| {
            let token = (idx % vocab) as u32;
            let hit = cfg.eos_token_ids.contains(&token) || cur_len + 1 >= max_length;
            (score, idx / vocab, token, hit)
        })
        .collect();
    let all_hit = cands.iter().all(|c| c.3);
    let extend = |beam: usize, token: u32| {
        let mut t = state.running[beam].tokens.clone();
        t.push(token);
        t
    };

    // Next running beams: the best continuations that did not stop.
    let running_scores: Vec<f32> = cands
        .iter()
        .map(|c| c.0 + if c.3 { MASKED } else { 0.0 })
        .collect();
    let next_running: Vec<(Hypothesis, usize)> = top_k(&running_scores, k)
        .into_iter()
        .map(|(score, i)| {
            let (_, beam, token, _) = cands[i];
            (
                Hypothesis {
                    tokens: extend(beam, token),
                    score,
                    finished: false,
                },
                beam,
            )
        })
        .collect();

    // Finished hypotheses: merge the stopped top-k candidates into the kept ones.
    let denom = ((cur_len + 1 - PROMPT_LEN) as f64).powf(lp) as f32;
    let batch_full =
        state.finished.iter().all(|h| h.finished) && cfg.early_stopping == EarlyStopping::True;
    let mut merged: Vec<Hypothesis> = state.finished.clone();
    for (i, &(score, beam, token, hit)) in cands.iter().enumerate() {
        let just_finished = hit && i < k;
        let mut s = score / denom;
        if batch_full {
            s += MASKED;
        }
        if !state.improvement_possible {
            s += MASKED;
        }
        if !just_finished {
            s += MASKED;
        }
        merged.push(Hypothesis {
            tokens: extend(beam, token),
            score: s,
            finished: just_finished,
        });
    }
    let merged_scores: Vec<f32> = merged.iter().map(|h| h.score).collect();
    state.finished = top_k(&merged_scores, k)
        .into_iter()
        .map(|(_, i)| merged[i].clone())
        .collect();

    let reorder = next_running
        .iter()
        .map(|(_, beam)| (b * k + beam) as u32)
        .collect();
    state.running = next_running.into_iter().map(|(h, _)| h).collect();
    (reorder, all_hit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_and_breaks_ties_by_index() {
        let v = [0.5f32, 2.0, f32::NEG_INFINITY, 2.0, 1.0, f32::NAN];
        assert_eq!(top_k(&v, 3), vec![(2.0, 1), (2.0, 3), (1.0, 4)]);
        assert_eq!(top_k(&v, 10).len(), 6);
    }

    #[test]
    fn row_by_row_top_k_equals_top_k_of_the_concatenation() {
        // Ties within and across rows, NaN, -inf, offsets that create ties after rounding.
        let rows: [&[f32]; 3] = [
            &[0.5, 2.0, f32::NEG_INFINITY, 2.0, 1.0, f32::NAN],
            &[2.0, 1.0, -0.0, 3.0, f32::NEG_INFINITY, 0.0],
            &[f32::NEG_INFINITY; 6],
        ];
        let offsets = [0.0f32, -0.0, 1e9];
        for k in [1, 2, 4, 7, 18, 30] {
            let (best, want) = row_by_row_and_whole(&rows, &offsets, k);
            assert_eq!(best.len(), want.len(), "k={k}");
            for (a, b) in best.iter().zip(&want) {
                assert_eq!(a.1, b.1, "k={k}: {best:?} vs {want:?}");
                assert!(a.0 == b.0 || (a.0.is_infinite() && b.0.is_infinite()));
            }
        }
    }

    #[test]
    fn block_skipping_keeps_top_k_exact_on_long_rows() {
        // Rows longer than a block: repeated values (ties across blocks), -0.0/0.0, NaN and
        // -inf, the best values late in the row, offsets of both signs.
        let rows: Vec<Vec<f32>> = (0..3)
            .map(|j| {
                (0..1000)
                    .map(|i| match (i * 7 + j * 13) % 97 {
                        0 => f32::NAN,
                        1 => f32::NEG_INFINITY,
                        2 => -0.0,
                        3 => 0.0,
                        m => (m as f32 - 48.0) / 8.0 + if i > 900 { 1.0 } else { 0.0 },
                    })
                    .collect()
            })
            .collect();
        let rows: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
        let offsets = [0.0f32, -3.5, 2.25];
        for k in [1, 2, 10, 33, 100] {
            let (best, want) = row_by_row_and_whole(&rows, &offsets, k);
            assert_eq!(best, want, "k={k}");
        }
    }

    /// Ranked `(score, index)` candidates.
    type Ranked = Vec<(f32, usize)>;

    /// [`push_top_k`] over equally long `rows` (row `j` with `offsets[j]`), and [`top_k`] over
    /// their concatenation.
    fn row_by_row_and_whole(rows: &[&[f32]], offsets: &[f32], k: usize) -> (Ranked, Ranked) {
        let mut best = Vec::new();
        let mut all = Vec::new();
        for (j, (row, &off)) in rows.iter().zip(offsets).enumerate() {
            push_top_k(&mut best, row, off, j * row.len(), k);
            all.extend(row.iter().map(|v| v + off));
        }
        (best, top_k(&all, k))
    }

    #[test]
    fn argmax_takes_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
    }
}
