//! Command-line options. Every option can also come from a `KB_DEMO_…` environment variable,
//! and multi-word options accept both their snake_case spelling (shown in `--help`) and their
//! kebab-case alias.

use std::time::Duration;

use clap::Parser;
use kb_cli::at_least_one_u64;

/// Options of `kb-demo`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "kb-demo",
    version,
    about = "Browser demo page for kb-serve: type a Korean sentence, get its keywords",
    long_about = "Browser demo page for kb-serve: type a Korean sentence, get its keywords.\n\n\
        Serves a self-contained page (every asset is embedded in the binary: no CDN, works \
        offline) and proxies the page's calls to a running kb-serve, so no CORS setup is needed.\n\n\
        Routes: GET / (the page), POST /api/keywords {\"query\": \"…\"} (proxied to kb-serve's \
        POST /v1/keywords), GET /api/ready (kb-serve's GET /ready), GET /health.\n\n\
        Every option can also be set from the environment variable shown next to it, and \
        `--snake_case` options also accept their `--kebab-case` spelling.",
    after_help = "Example: kb-serve --model gogamza/kobart-base-v1 & kb-demo --server \
        http://127.0.0.1:8459, then open http://127.0.0.1:8501.\n\n\
        Log verbosity follows RUST_LOG (default: info). On startup the bound address is printed \
        on stdout as `listening on http://HOST:PORT`."
)]
pub struct Args {
    /// Base URL of the running kb-serve (http only).
    #[arg(long, env = "KB_DEMO_SERVER", default_value = "http://127.0.0.1:8459")]
    pub server: String,

    /// Address to listen on. Loopback by default; use 0.0.0.0 to listen on all interfaces.
    #[arg(long, env = "KB_DEMO_HOST", default_value = "127.0.0.1")]
    pub host: String,

    /// Port to listen on; 0 picks a free port (see the `listening on` line on stdout).
    #[arg(long, env = "KB_DEMO_PORT", default_value_t = 8501)]
    pub port: u16,

    /// Time limit of one proxied keyword request in milliseconds (504 beyond).
    #[arg(long = "timeout_ms", alias = "timeout-ms", env = "KB_DEMO_TIMEOUT_MS",
          default_value_t = 60_000, value_parser = at_least_one_u64())]
    pub timeout_ms: u64,

    /// API key of kb-serve (its --api_key), sent as `Authorization: Bearer KEY`.
    #[arg(
        long = "api_key",
        alias = "api-key",
        env = "KB_DEMO_API_KEY",
        hide_env_values = true
    )]
    pub api_key: Option<String>,

    /// Longest sentence the page may send, in characters (422 beyond).
    #[arg(long = "max_query_chars", alias = "max-query-chars", env = "KB_DEMO_MAX_QUERY_CHARS",
          default_value_t = 2_000, value_parser = at_least_one_u64())]
    pub max_query_chars: u64,
}

impl Args {
    /// Checks what clap cannot: the server URL and the API key.
    pub fn validate(&self) -> Result<(), String> {
        self.server_url()?;
        if self.api_key.as_deref() == Some("") {
            return Err("--api_key is empty; leave it unset when kb-serve needs no key".into());
        }
        Ok(())
    }

    /// The kb-serve base URL without a trailing slash, checked.
    pub fn server_url(&self) -> Result<String, String> {
        let url = reqwest::Url::parse(self.server.trim())
            .map_err(|e| format!("--server {:?} is not a URL: {e}", self.server))?;
        if url.scheme() != "http" {
            return Err(format!(
                "--server {:?}: only http:// URLs are supported (kb-serve speaks plain HTTP)",
                self.server
            ));
        }
        if url.host_str().is_none() || url.query().is_some() || url.fragment().is_some() {
            return Err(format!(
                "--server {:?}: expected a base URL such as http://127.0.0.1:8459",
                self.server
            ));
        }
        Ok(url.as_str().trim_end_matches('/').to_string())
    }

    /// The proxy's per-request time limit.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
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
    fn defaults_and_both_spellings() {
        let a = Args::try_parse_from(["kb-demo"]).unwrap();
        assert_eq!(a.server, "http://127.0.0.1:8459");
        assert_eq!((a.host.as_str(), a.port), ("127.0.0.1", 8501));
        let a = Args::try_parse_from(["kb-demo", "--timeout-ms", "5", "--max_query_chars", "9"])
            .unwrap();
        assert_eq!((a.timeout_ms, a.max_query_chars), (5, 9));
        let a = Args::try_parse_from(["kb-demo", "--timeout_ms", "7", "--api-key", "k"]).unwrap();
        assert_eq!((a.timeout_ms, a.api_key.as_deref()), (7, Some("k")));
        assert!(Args::try_parse_from(["kb-demo", "--timeout_ms", "0"]).is_err());
    }

    #[test]
    fn server_urls_are_checked() {
        let with = |s: &str| Args::try_parse_from(["kb-demo", "--server", s]).unwrap();
        assert_eq!(
            with("http://127.0.0.1:8459/").server_url().unwrap(),
            "http://127.0.0.1:8459"
        );
        assert_eq!(
            with("http://example.test/kb/").server_url().unwrap(),
            "http://example.test/kb"
        );
        assert!(with("127.0.0.1:8459").validate().is_err());
        assert!(with("https://example.test").validate().is_err());
        assert!(with("http://h/?q=1").validate().is_err());
        let a = Args::try_parse_from(["kb-demo", "--api_key", ""]).unwrap();
        assert!(a.validate().is_err());
    }

    #[test]
    fn help_names_the_environment_variables() {
        let help = Args::command().render_long_help().to_string();
        for var in [
            "KB_DEMO_SERVER",
            "KB_DEMO_HOST",
            "KB_DEMO_PORT",
            "KB_DEMO_TIMEOUT_MS",
            "KB_DEMO_API_KEY",
            "KB_DEMO_MAX_QUERY_CHARS",
        ] {
            assert!(help.contains(var), "{var} missing from --help");
        }
    }
}
