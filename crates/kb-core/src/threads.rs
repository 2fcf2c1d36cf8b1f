//! CPU thread count for candle's kernels, fixed once per process.
//!
//! candle's CPU matrix multiply asks for its thread count on every call; unless
//! `RAYON_NUM_THREADS` is set, that count is recomputed from `/proc/cpuinfo` (physical cores)
//! each time — a file read and parse per matrix product, thousands per generated token batch.
//! [`fix_thread_count`] computes it once and records it in `RAYON_NUM_THREADS`, which candle
//! (and rayon's global pool) then read instead.

/// Sets `RAYON_NUM_THREADS` to candle's default thread count (physical cores available to this
/// process) unless the user already set it; returns the count in effect.
///
/// Call it at the very start of `main`, before any other thread exists: it changes the
/// process environment.
pub fn fix_thread_count() -> usize {
    let configured = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0);
    if let Some(n) = configured {
        return n;
    }
    let n = candle_core::utils::get_num_threads().max(1);
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    n
}
