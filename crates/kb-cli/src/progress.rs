//! The progress bar of the tools that extract keywords for many queries.

use indicatif::{ProgressBar, ProgressStyle};

/// A bar over `total` queries on stderr (`pos/len queries`, rate, ETA); hidden unless `visible`.
pub fn query_bar(total: usize, visible: bool) -> ProgressBar {
    let bar = if visible {
        ProgressBar::new(total as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} queries  {per_sec}  eta {eta}")
            .expect("valid template"),
    );
    bar
}
