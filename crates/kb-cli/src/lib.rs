//! # kb-cli
//!
//! What the kobart-keywords binaries share on the command line, written once:
//!
//! - range checks as clap value parsers ([`at_least_one`], [`at_least_one_u64`]);
//! - [`init_stderr_log`]: library events (`tracing`) printed as `PROGRAM: message` lines;
//! - with the `model` feature, the [`model::ModelArgs`] and [`model::GenerationArgs`] groups that
//!   kb-extract, kb-eval and kb-serve flatten into their arguments;
//! - with the `progress` feature, [`progress::query_bar`], the progress bar of batched extraction;
//! - with the `server` feature, [`server::listen`] and [`server::ShutdownSignals`]: binding with
//!   the `listening on` line, and the graceful-shutdown signals of kb-serve and kb-demo.
//!
//! Multi-word flags are spelled in snake_case, as the original Python scripts spelled them, with
//! a kebab-case alias.

#![warn(missing_docs)]

#[cfg(feature = "model")]
pub mod model;
#[cfg(feature = "progress")]
pub mod progress;
#[cfg(feature = "server")]
pub mod server;

use clap::builder::RangedU64ValueParser;

/// A value parser for a `usize` of at least 1 (`0` is refused with clap's range message).
pub fn at_least_one() -> RangedU64ValueParser<usize> {
    RangedU64ValueParser::<usize>::new().range(1..)
}

/// A value parser for a `u64` of at least 1.
pub fn at_least_one_u64() -> RangedU64ValueParser<u64> {
    RangedU64ValueParser::<u64>::new().range(1..)
}

/// Prints library events on stderr as `PROGRAM: message` (warnings as
/// `PROGRAM: warning: message`), at the level `RUST_LOG` asks for (default `info`) — what the
/// command-line tools print while kb-core works (training progress lines, load notes).
pub fn init_stderr_log(program: &'static str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .event_format(ProgramPrefix(program))
        .try_init();
}

/// An error and its causes as one line, `error: cause: cause`, leaving out a cause whose text the
/// line already holds (kb-core's I/O errors name the file and repeat the system's message, which
/// `{:#}` would print twice).
pub fn error_line(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

/// `PROGRAM: [level: ]message fields` lines.
struct ProgramPrefix(&'static str);

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for ProgramPrefix
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        write!(writer, "{}: ", self.0)?;
        match *event.metadata().level() {
            tracing::Level::ERROR => write!(writer, "error: ")?,
            tracing::Level::WARN => write!(writer, "warning: ")?,
            _ => {}
        }
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Demo {
        #[arg(long, value_parser = at_least_one())]
        n: usize,
        #[arg(long, value_parser = at_least_one_u64())]
        ms: Option<u64>,
    }

    #[derive(Debug)]
    struct Outer(std::io::Error, &'static str);
    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{}", self.1)
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn causes_already_told_are_left_out() {
        let io = || std::io::Error::other("disk full");
        assert_eq!(
            error_line(&Outer(io(), "a.txt: disk full")),
            "a.txt: disk full"
        );
        assert_eq!(
            error_line(&Outer(io(), "cannot save")),
            "cannot save: disk full"
        );
    }

    #[test]
    fn zero_is_refused_and_others_kept() {
        let d = Demo::try_parse_from(["d", "--n", "3", "--ms", "7"]).unwrap();
        assert_eq!((d.n, d.ms), (3, Some(7)));
        for bad in [["d", "--n", "0"], ["d", "--n", "-1"], ["d", "--n", "x"]] {
            assert!(Demo::try_parse_from(bad).is_err(), "{bad:?}");
        }
        let e = Demo::try_parse_from(["d", "--n", "1", "--ms", "0"])
            .err()
            .unwrap();
        assert!(e.to_string().contains("--ms"), "{e}");
    }
}
