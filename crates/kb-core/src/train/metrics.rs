//! `metrics.jsonl` (one JSON object per optimizer step and per validation) and the loss-curve
//! picture drawn from it with plotters — the run's record in place of the original's wandb.

use std::io::Write;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricRecord {
    /// Optimizer step after which the record was taken.
    pub step: usize,
    /// Epoch (0-based).
    pub epoch: usize,
    /// Mean training loss of the step's batches (absent on validation records).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_loss: Option<f64>,
    /// Validation loss (only on validation records).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// Learning rate used by the step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// Encoder plus decoder tokens per second over the step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    /// Seconds since the run started (resumed runs continue the count).
    pub time: f64,
}

/// Appends records to `metrics.jsonl`.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// Opens `run/metrics.jsonl`; when resuming at `keep_upto_step`, records after it (written by
    /// the interrupted run after its last checkpoint) are dropped first, and so is a last line
    /// cut short (a write that failed, a full disk).
    pub fn open(run: &Path, keep_upto_step: Option<usize>) -> Result<Self> {
        std::fs::create_dir_all(run).map_err(|e| Error::io(run, e))?;
        let path = run.join("metrics.jsonl");
        match keep_upto_step {
            Some(step) if path.exists() => {
                let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
                let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
                if complete.len() < text.len() {
                    tracing::warn!(
                        "{}: dropped its last line, cut short: {:?}",
                        path.display(),
                        &text[complete.len()..]
                    );
                }
                let kept: Vec<MetricRecord> = parse_metrics(complete, &path)?
                    .into_iter()
                    .filter(|r| r.step <= step)
                    .collect();
                let mut text = String::new();
                for r in &kept {
                    text.push_str(&serde_json::to_string(r).expect("serialisable"));
                    text.push('\n');
                }
                let tmp = run.join(".metrics.jsonl.tmp");
                write_then_rename(&tmp, &path, text.as_bytes())?;
            }
            None if path.exists() => {
                std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            }
            _ => {}
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(Self { path, file })
    }

    /// Appends one record (one write of the whole line).
    pub fn write(&mut self, r: &MetricRecord) -> Result<()> {
        let line = serde_json::to_string(r).expect("serialisable") + "\n";
        self.file
            .write_all(line.as_bytes())
            .map_err(|e| Error::io(&self.path, e))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads `metrics.jsonl`; a malformed line is an error naming it.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricRecord>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_metrics(&text, path)
}

fn parse_metrics(text: &str, path: &Path) -> Result<Vec<MetricRecord>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| Error::Invalid(format!("{}: line {}: {e}", path.display(), i + 1)))
        })
        .collect()
}

/// Writes `bytes` to `tmp`, then renames it to `path`: `path` is the old file or the new one,
/// never a part. On failure `tmp` is removed and the error names `path`.
fn write_then_rename(tmp: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(tmp, bytes)
        .and_then(|()| std::fs::rename(tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(tmp);
            Error::io(path, e)
        })
}

/// Draws training loss (per step, with a moving average) and validation loss against the
/// optimizer step into an SVG picture at `out`, replaced in one step (a temporary file renamed).
/// A failed write is an [`Error::Io`] naming `out`; a drawing that fails, [`Error::Invalid`].
pub fn plot_losses(records: &[MetricRecord], out: &Path, title: &str) -> Result<()> {
    let train: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| r.train_loss.map(|l| (r.step as f64, l)))
        .collect();
    let val: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| r.val_loss.map(|l| (r.step as f64, l)))
        .collect();
    let window = (train.len() / 20).clamp(1, 50);
    let smooth: Vec<(f64, f64)> = (0..train.len())
        .map(|i| {
            let lo = i.saturating_sub(window - 1);
            let mean = train[lo..=i].iter().map(|p| p.1).sum::<f64>() / (i + 1 - lo) as f64;
            (train[i].0, mean)
        })
        .collect();
    let all = train.iter().chain(val.iter());
    let max_step = all.clone().map(|p| p.0).fold(1.0, f64::max);
    let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
        (lo.min(p.1), hi.max(p.1))
    });
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let mut svg = String::new();
    let mut draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::with_string(&mut svg, (900, 540)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..max_step, (lo - pad).max(0.0)..hi + pad)?;
        chart
            .configure_mesh()
            .x_desc("optimizer step")
            .y_desc("loss (cross-entropy per keyword token)")
            .label_style(("sans-serif", 14))
            .draw()?;
        chart
            .draw_series(LineSeries::new(
                train.iter().copied(),
                RGBColor(170, 200, 230).stroke_width(1),
            ))?
            .label("train loss (per step)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RGBColor(170, 200, 230)));
        chart
            .draw_series(LineSeries::new(
                smooth.iter().copied(),
                BLUE.stroke_width(2),
            ))?
            .label(format!("train loss (moving average of {window})"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        chart
            .draw_series(LineSeries::new(val.iter().copied(), RED.stroke_width(2)))?
            .label("validation loss")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
        chart.draw_series(val.iter().map(|&p| Circle::new(p, 4, RED.filled())))?;
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| Error::Invalid(format!("cannot draw {}: {e}", out.display())))?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "plot.svg".into());
    let tmp = out.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    write_then_rename(&tmp, out, svg.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(step: usize, train: Option<f64>, val: Option<f64>) -> MetricRecord {
        MetricRecord {
            step,
            epoch: 0,
            train_loss: train,
            val_loss: val,
            lr: None,
            tokens_per_s: None,
            time: step as f64,
        }
    }

    #[test]
    fn resume_truncates_later_records_and_plot_is_an_svg() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(dir.path(), None).unwrap();
        for s in 1..=10 {
            log.write(&rec(s, Some(5.0 - s as f64 * 0.3), None))
                .unwrap();
        }
        log.write(&rec(10, None, Some(2.5))).unwrap();
        drop(log);
        let _ = MetricsLog::open(dir.path(), Some(6)).unwrap();
        let back = read_metrics(&dir.path().join("metrics.jsonl")).unwrap();
        assert_eq!(back.len(), 6);
        let out = dir.path().join("loss.svg");
        let mut all = back.clone();
        all.push(rec(6, None, Some(3.0)));
        plot_losses(&all, &out, "run").unwrap();
        let svg = std::fs::read_to_string(out).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("validation loss"),
            "{}",
            &svg[..200]
        );
    }

    #[test]
    fn failed_writes_name_the_file_and_leave_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        // A full disk: /dev/full fails every write with ENOSPC.
        if let Ok(file) = std::fs::OpenOptions::new().append(true).open("/dev/full") {
            let mut log = MetricsLog {
                path: dir.path().join("metrics.jsonl"),
                file,
            };
            let err = log.write(&rec(1, Some(1.0), None)).unwrap_err();
            assert!(matches!(err, Error::Io { .. }), "{err}");
            let err = err.to_string();
            assert!(
                err.contains("metrics.jsonl") && err.contains("No space left on device"),
                "{err}"
            );
        } else {
            eprintln!("no /dev/full here: the metrics write is not checked");
        }
        // A picture whose folder is gone.
        let out = dir.path().join("gone/loss.svg");
        let err = plot_losses(&[rec(1, Some(1.0), None)], &out, "run").unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
        assert!(err.to_string().contains("gone/loss.svg"), "{err}");
        // Replaced in one step: no temporary file beside it once written.
        let out = dir.path().join("loss.svg");
        plot_losses(&[rec(1, Some(1.0), None)], &out, "run").unwrap();
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert_eq!(names, ["loss.svg"]);
    }
}
