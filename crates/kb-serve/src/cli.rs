//! Command-line options. Every option can also come from a `KB_…` environment variable and is
//! accepted in both the snake_case spelling shown in `--help` and its kebab-case alias.

use std::time::Duration;

use clap::builder::FalseyValueParser;
use clap::{Parser, ValueEnum};
use kb_cli::model::ModelArgs;
use kb_cli::{at_least_one, at_least_one_u64};

use crate::backend::BackendOptions;
use crate::http::connections::{DEFAULT_HEADER_TIMEOUT, DEFAULT_MAX_CONNECTIONS};
use crate::http::{ConnectionOptions, HttpOptions};
use crate::queue::BatchPolicy;
use crate::server::ServeOptions;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Options of `kb-serve`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "kb-serve",
    version,
    about = "Keyword HTTP server: KoBART keyword extraction with dynamic batching",
    long_about = "Keyword HTTP server: KoBART keyword extraction with dynamic batching.\n\n\
        Routes: POST /keyword_extract (the original Flask contract), POST /v1/keywords, \
        GET /health, GET /ready, GET /metrics, GET /openapi.json.\n\n\
        Every option can also be set from the environment variable shown next to it, and \
        `--snake_case` options also accept their `--kebab-case` spelling.",
    after_help = "Hostile and overwhelming clients: at most --max_connections connections are \
        served at once (more wait in the listen backlog until one closes); a connection must send \
        a complete request head within --header_timeout_ms of opening or of its previous response \
        (this also closes idle keep-alive connections); a keyword request gets --timeout_ms from \
        its request head to its answer, reading the body included (504 beyond); at most \
        --max_concurrent keyword requests are handled and --max_queue wait for the model (503 + \
        Retry-After beyond); bodies are limited to --max_body_bytes (413 beyond). On SIGINT or \
        SIGTERM the server stops accepting, closes idle connections, and answers the requests in \
        flight before exiting.\n\n\
        Log verbosity follows RUST_LOG (default: info). On startup the bound address is \
        printed on stdout as `listening on http://HOST:PORT`.",
    mut_arg("model", |a| a
        .required(true)
        .help("Model folder (config.json, tokenizer.json, weights) or Hugging Face hub id resolved \
            through the local cache (e.g. gogamza/kobart-base-v1)")),
)]
pub struct Args {
    /// The model (--model, required), its dtype (--dtype), device (--device), weight
    /// quantization (--quantize) and key/value cache dtype (--kv_cache_dtype).
    #[command(flatten)]
    pub model: ModelArgs,

    /// Address to listen on. Loopback by default; use 0.0.0.0 to listen on all interfaces.
    #[arg(long, env = "KB_HOST", default_value = "127.0.0.1")]
    pub host: String,

    /// Port to listen on; 0 picks a free port (see the `listening on` line on stdout).
    #[arg(long, env = "KB_PORT", default_value_t = 8459)]
    pub port: u16,

    /// Beams used when a request does not ask for a number (the original server used 5).
    #[arg(long = "num_beams", alias = "num-beams", env = "KB_NUM_BEAMS", default_value_t = 5,
          value_parser = at_least_one())]
    pub num_beams: usize,

    /// Largest `num_beams` a request may ask for.
    #[arg(long = "max_num_beams", alias = "max-num-beams", env = "KB_MAX_NUM_BEAMS",
          default_value_t = 16, value_parser = at_least_one())]
    pub max_num_beams: usize,

    /// Decoder length limit counting the start token (transformers' `max_length`), and the
    /// largest `max_length` a request may ask for. Default: the model folder's generation
    /// settings, capped at the model's max_position_embeddings.
    #[arg(long = "max_length", alias = "max-length", env = "KB_MAX_LENGTH", value_parser = at_least_one())]
    pub max_length: Option<usize>,

    /// Most queries run together in one batched generation.
    #[arg(long = "max_batch_size", alias = "max-batch-size", env = "KB_MAX_BATCH_SIZE",
          default_value_t = 16, value_parser = at_least_one())]
    pub max_batch_size: usize,

    /// How long the batcher waits for more requests after the first one of a batch arrived, or
    /// after the previous batch finished if that is later (ms).
    #[arg(
        long = "max_wait_ms",
        alias = "max-wait-ms",
        env = "KB_MAX_WAIT_MS",
        default_value_t = 5
    )]
    pub max_wait_ms: u64,

    /// Keyword requests allowed to wait for the model; beyond it requests get 503 + Retry-After.
    #[arg(long = "max_queue", alias = "max-queue", env = "KB_MAX_QUEUE", default_value_t = 256,
          value_parser = at_least_one())]
    pub max_queue: usize,

    /// Keyword requests handled at once (parsing, queued or generating); beyond it 503 + Retry-After.
    #[arg(long = "max_concurrent", alias = "max-concurrent", env = "KB_MAX_CONCURRENT",
          default_value_t = 512, value_parser = at_least_one())]
    pub max_concurrent: usize,

    /// Most queries in one `POST /v1/keywords` request (422 beyond).
    #[arg(long = "max_client_batch_size", alias = "max-client-batch-size",
          env = "KB_MAX_CLIENT_BATCH_SIZE", default_value_t = 32, value_parser = at_least_one())]
    pub max_client_batch_size: usize,

    /// Token limit per query (422 beyond, unless --truncate). Default: the model's
    /// max_position_embeddings.
    #[arg(long = "max_input_tokens", alias = "max-input-tokens", env = "KB_MAX_INPUT_TOKENS",
          value_parser = at_least_one())]
    pub max_input_tokens: Option<usize>,

    /// Cut queries longer than --max_input_tokens instead of answering 422.
    #[arg(long, env = "KB_TRUNCATE", value_parser = FalseyValueParser::new())]
    pub truncate: bool,

    /// Largest request body in bytes (413 beyond).
    #[arg(long = "max_body_bytes", alias = "max-body-bytes", env = "KB_MAX_BODY_BYTES",
          default_value_t = 1 << 20, value_parser = at_least_one())]
    pub max_body_bytes: usize,

    /// Time limit of one keyword request in milliseconds, from its request head to its answer:
    /// reading the body, queueing and generation included (504 beyond).
    #[arg(long = "timeout_ms", alias = "timeout-ms", env = "KB_TIMEOUT_MS", default_value_t = 60_000,
          value_parser = at_least_one_u64())]
    pub timeout_ms: u64,

    /// When set, keyword routes require `Authorization: Bearer KEY` (401 otherwise);
    /// /health, /ready, /metrics and /openapi.json stay open.
    #[arg(
        long = "api_key",
        alias = "api-key",
        env = "KB_API_KEY",
        hide_env_values = true
    )]
    pub api_key: Option<String>,

    /// Origin allowed by CORS (repeat, or comma-separate in the variable; `*` allows any).
    /// No CORS headers are sent when unset.
    #[arg(
        long = "cors_origin",
        alias = "cors-origin",
        env = "KB_CORS_ORIGIN",
        value_delimiter = ','
    )]
    pub cors_origin: Vec<String>,

    /// Synonyms file (`canonical<TAB>variant…` lines, see configs/synonyms.tsv). When set,
    /// keywords that are listed variants are answered as their canonical term, repeats are
    /// removed, and `text` (and the seed route's `result`) is the mapped keywords joined by ", ".
    #[arg(long, env = "KB_SYNONYMS", value_name = "FILE")]
    pub synonyms: Option<std::path::PathBuf>,

    /// Grounded decoding by default: every keyword is a span of its query (whitespace ignored)
    /// or a derived term; a request may still choose with `"grounded": false|true`. Needs
    /// derived terms: --derived_terms, or the model folder's derived_terms.tsv.
    #[arg(long, env = "KB_GROUNDED", value_parser = FalseyValueParser::new())]
    pub grounded: bool,

    /// Derived terms for grounded decoding (`term<TAB>count`, e.g. configs/derived_terms.tsv);
    /// default: the model folder's derived_terms.tsv, if it has one.
    #[arg(
        long = "derived_terms",
        alias = "derived-terms",
        env = "KB_DERIVED_TERMS",
        value_name = "FILE"
    )]
    pub derived_terms: Option<std::path::PathBuf>,

    /// Most client connections served at once. Beyond it new connections are not refused: they
    /// wait in the kernel's listen backlog until a served connection closes.
    #[arg(long = "max_connections", alias = "max-connections", env = "KB_MAX_CONNECTIONS",
          default_value_t = DEFAULT_MAX_CONNECTIONS, value_parser = at_least_one())]
    pub max_connections: usize,

    /// Time a connection has to send a complete request head, counted from its opening or from
    /// its previous response (ms); slower connections and idle keep-alive connections are closed.
    #[arg(long = "header_timeout_ms", alias = "header-timeout-ms", env = "KB_HEADER_TIMEOUT_MS",
          default_value_t = DEFAULT_HEADER_TIMEOUT.as_millis() as u64, value_parser = at_least_one_u64())]
    pub header_timeout_ms: u64,

    /// Log format on stderr.
    #[arg(long = "log_format", alias = "log-format", env = "KB_LOG_FORMAT", value_enum,
          default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl Args {
    /// Checks option combinations that clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if self.num_beams > self.max_num_beams {
            return Err(format!(
                "--num_beams {} exceeds --max_num_beams {}",
                self.num_beams, self.max_num_beams
            ));
        }
        if let Some(n) = self.max_length {
            if n < 2 {
                return Err(format!(
                    "--max_length {n} leaves no room for a generated token (it counts the decoder start token; use 2 or more)"
                ));
            }
        }
        for origin in &self.cors_origin {
            if origin != "*" && axum::http::HeaderValue::from_str(origin).is_err() {
                return Err(format!(
                    "--cors_origin {origin:?} is not a valid header value"
                ));
            }
        }
        if let Some(path) = &self.synonyms {
            kb_core::synonyms::Synonyms::read(path).map_err(|e| format!("--synonyms: {e}"))?;
        }
        if let Some(key) = &self.api_key {
            if key.is_empty() {
                return Err("--api_key is empty; leave it unset to disable authentication".into());
            }
        }
        Ok(())
    }

    /// The batcher's wait window.
    pub fn max_wait(&self) -> Duration {
        Duration::from_millis(self.max_wait_ms)
    }

    /// The per-request time limit.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// The header read timeout of connections.
    pub fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.header_timeout_ms)
    }

    /// What the server runs with, once the options are checked ([`Args::validate`]).
    pub fn options(&self) -> Result<ServeOptions, String> {
        self.validate()?;
        Ok(ServeOptions {
            backend: BackendOptions {
                model: self.model.spec().to_string(),
                dtype: self.model.dtype,
                device: self.model.device.clone(),
                quantization: self.model.quantize,
                kv_cache_dtype: self.model.kv_cache_dtype,
                num_beams: self.num_beams,
                max_num_beams: self.max_num_beams,
                max_length: self.max_length,
                max_input_tokens: self.max_input_tokens,
                truncate: self.truncate,
                max_client_batch_size: self.max_client_batch_size,
                synonyms: self.synonyms.clone(),
                grounded: self.grounded,
                derived_terms: self.derived_terms.clone(),
            },
            batch: BatchPolicy {
                max_batch_size: self.max_batch_size,
                max_wait: self.max_wait(),
            },
            max_queue: self.max_queue,
            http: HttpOptions {
                max_concurrent: self.max_concurrent,
                max_body_bytes: self.max_body_bytes,
                timeout: self.timeout(),
                api_key: self.api_key.clone(),
                cors_origin: self.cors_origin.clone(),
            },
            connections: ConnectionOptions {
                max_connections: self.max_connections,
                header_timeout: self.header_timeout(),
                // Requests in flight finish within their time limit, and a request head being
                // read within the header timeout.
                shutdown_grace: self.timeout() + self.header_timeout() + Duration::from_secs(1),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn snake_and_kebab_spellings_are_accepted() {
        let a = Args::try_parse_from([
            "kb-serve",
            "--model",
            "m",
            "--max_batch_size",
            "4",
            "--max-wait-ms",
            "7",
            "--num-beams",
            "3",
        ])
        .unwrap();
        assert_eq!((a.max_batch_size, a.max_wait_ms, a.num_beams), (4, 7, 3));
        assert_eq!(a.host, "127.0.0.1");
        assert_eq!(a.port, 8459);
        assert!(!a.truncate);
        assert_eq!((a.max_connections, a.header_timeout_ms), (1024, 10_000));
        let a = Args::try_parse_from([
            "kb-serve",
            "--model",
            "m",
            "--max-connections",
            "3",
            "--header_timeout_ms",
            "250",
        ])
        .unwrap();
        let o = a.options().unwrap();
        assert_eq!(o.connections.max_connections, 3);
        assert_eq!(o.connections.header_timeout, Duration::from_millis(250));
        assert_eq!(o.backend.model, "m");
    }

    #[test]
    fn the_model_is_required() {
        let e = Args::try_parse_from(["kb-serve"]).unwrap_err();
        assert!(e.to_string().contains("--model"), "{e}");
    }

    #[test]
    fn zero_and_contradictions_are_rejected() {
        assert!(
            Args::try_parse_from(["kb-serve", "--model", "m", "--max_batch_size", "0"]).is_err()
        );
        for flag in ["--max_connections", "--header_timeout_ms", "--timeout_ms"] {
            assert!(Args::try_parse_from(["kb-serve", "--model", "m", flag, "0"]).is_err());
        }
        let a = Args::try_parse_from(["kb-serve", "--model", "m", "--num_beams", "20"]).unwrap();
        assert!(a.validate().unwrap_err().contains("--max_num_beams"));
        let a = Args::try_parse_from(["kb-serve", "--model", "m", "--max_length", "1"]).unwrap();
        assert!(a.validate().unwrap_err().contains("--max_length"));
        let dir = tempfile::tempdir().unwrap();
        let syn = dir.path().join("syn.tsv");
        std::fs::write(&syn, "a\tb\nc\n").unwrap();
        let a = Args::try_parse_from([
            "kb-serve",
            "--model",
            "m",
            "--synonyms",
            syn.to_str().unwrap(),
        ])
        .unwrap();
        let e = a.validate().unwrap_err();
        assert!(
            e.contains("--synonyms") && e.contains("syn.tsv: line 2:"),
            "{e}"
        );
    }

    #[test]
    fn help_names_the_environment_variables() {
        let help = Args::command().render_long_help().to_string();
        for var in [
            "KB_MODEL",
            "KB_PORT",
            "KB_HOST",
            "KB_NUM_BEAMS",
            "KB_API_KEY",
            "KB_MAX_WAIT_MS",
            "KB_SYNONYMS",
            "KB_MAX_CONNECTIONS",
            "KB_HEADER_TIMEOUT_MS",
            "KB_DTYPE",
            "KB_DEVICE",
            "KB_QUANTIZE",
            "KB_KV_CACHE_DTYPE",
        ] {
            assert!(help.contains(var), "{var} missing from --help");
        }
    }
}
