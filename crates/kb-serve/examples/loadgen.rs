//! Load generator for the kb-serve benchmark (`scripts/bench_serve.sh`).
//!
//! `--clients` concurrent clients each send one request at a time for `--duration` seconds to
//! `POST /keyword_extract` (body `{"prompt": …}` without a Content-Type, as the original client
//! sent it) or `POST /v1/keywords`, cycling through prompts (concurrent clients send different ones). Requests still running at the end
//! are abandoned and reported as unfinished. Prints one JSON object with requests/s (answers up to
//! the last answer, divided by the time of that answer), latency percentiles and errors.
//!
//! ```text
//! cargo run --release -p kb-serve --example loadgen -- --url http://127.0.0.1:8459 --clients 16 --duration 30
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use serde_json::json;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Route {
    /// `POST /keyword_extract` with `{"prompt"}`.
    Seed,
    /// `POST /v1/keywords` with `{"query"}`.
    V1,
}

#[derive(Debug, Parser)]
#[command(about = "Load generator for kb-serve benchmarks")]
struct Opts {
    /// Server base URL, e.g. http://127.0.0.1:8459.
    #[arg(long)]
    url: String,
    /// Route to load.
    #[arg(long, value_enum, default_value_t = Route::Seed)]
    route: Route,
    /// Concurrent clients, each with one request in flight.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 30.0)]
    duration: f64,
    /// Prompts, one per line (text before a tab); default: a few built-in questions.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Name of this run in the output.
    #[arg(long, default_value = "run")]
    label: String,
    /// Per-request client timeout in seconds.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
}

#[derive(Debug, Default)]
struct Tally {
    latencies_ms: Vec<f64>,
    errors: usize,
    error_samples: Vec<String>,
    /// Requests cut off by the deadline.
    unfinished: usize,
    /// When the last answered request finished, measured from the start.
    last_done: Duration,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let opts = Opts::parse();
    let prompts: Vec<String> = match &opts.prompts {
        Some(path) => std::fs::read_to_string(path)?
            .lines()
            .filter_map(|l| l.split('\t').next())
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect(),
        None => [
            "이사화물 통관예약을 하면 뭐가 좋나요?",
            "해외직구 물품의 면세한도는 얼마인가요?",
            "개인통관고유부호는 어디서 발급받나요?",
        ]
        .map(String::from)
        .to_vec(),
    };
    anyhow::ensure!(!prompts.is_empty(), "no prompts");
    let prompts = Arc::new(prompts);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(opts.timeout_s))
        .build()?;
    let (path, field) = match opts.route {
        Route::Seed => ("/keyword_extract", "prompt"),
        Route::V1 => ("/v1/keywords", "query"),
    };
    let url = format!("{}{path}", opts.url.trim_end_matches('/'));
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(opts.duration);

    let mut tasks = Vec::new();
    for c in 0..opts.clients {
        let (client, url, prompts) = (client.clone(), url.clone(), prompts.clone());
        let clients = opts.clients;
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut i = c;
            loop {
                let prompt = &prompts[i % prompts.len()];
                i += clients;
                let body = json!({ field: prompt }).to_string();
                let sent = Instant::now();
                let outcome = tokio::time::timeout_at(deadline.into(), async {
                    let resp = client.post(&url).body(body).send().await?;
                    let status = resp.status();
                    let text = resp.text().await?;
                    Ok::<_, reqwest::Error>((status, text))
                })
                .await;
                match outcome {
                    Err(_) => {
                        tally.unfinished += 1;
                        break;
                    }
                    Ok(Ok((status, _))) if status.is_success() => {
                        tally
                            .latencies_ms
                            .push(sent.elapsed().as_secs_f64() * 1000.0);
                        tally.last_done = started.elapsed();
                    }
                    Ok(Ok((status, text))) => {
                        tally.errors += 1;
                        if tally.error_samples.len() < 3 {
                            tally.error_samples.push(format!(
                                "{status}: {}",
                                text.chars().take(200).collect::<String>()
                            ));
                        }
                    }
                    Ok(Err(e)) => {
                        tally.errors += 1;
                        if tally.error_samples.len() < 3 {
                            tally.error_samples.push(e.to_string());
                        }
                    }
                }
                if Instant::now() >= deadline {
                    break;
                }
            }
            tally
        }));
    }
    let mut all = Tally::default();
    for t in tasks {
        let tally = t.await?;
        all.latencies_ms.extend(tally.latencies_ms);
        all.errors += tally.errors;
        all.error_samples.extend(tally.error_samples);
        all.unfinished += tally.unfinished;
        all.last_done = all.last_done.max(tally.last_done);
    }
    let elapsed = Duration::from_secs_f64(opts.duration);
    let completed = all.latencies_ms.len() + all.errors;
    let mut sorted = all.latencies_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let mean = sorted.iter().sum::<f64>() / sorted.len().max(1) as f64;
    let report = json!({
        "label": opts.label,
        "route": path,
        "clients": opts.clients,
        "duration_s": elapsed.as_secs_f64(),
        "completed": completed,
        "ok": sorted.len(),
        "errors": all.errors,
        "unfinished_at_deadline": all.unfinished,
        // Answers per second up to the last answer: with batched servers, answers come in bursts,
        // and counting up to the deadline would depend on where it falls between two bursts.
        "rps": sorted.len() as f64 / all.last_done.as_secs_f64().max(1e-9),
        "rps_window": sorted.len() as f64 / elapsed.as_secs_f64(),
        "last_answer_s": all.last_done.as_secs_f64(),
        "mean_ms": mean,
        "p50_ms": percentile(&sorted, 50.0),
        "p90_ms": percentile(&sorted, 90.0),
        "p99_ms": percentile(&sorted, 99.0),
        "max_ms": sorted.last().copied().unwrap_or(f64::NAN),
        "error_samples": all.error_samples,
    });
    println!("{report}");
    Ok(())
}
