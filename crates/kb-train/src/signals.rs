//! SIGINT and SIGTERM — what a terminal's Ctrl-C, Kubernetes, SLURM and spot-instance reclaims
//! send — turned into a [`StopRequest`]: the run finishes its optimizer step, saves `last` and
//! stops. A second signal ends the process at once.

use kb_core::train::StopRequest;
use signal_hook::consts::{SIGINT, SIGTERM};

/// Makes SIGINT and SIGTERM request `stop` (the first one, printing a line that says so); a
/// signal after that ends the process at once with status 128 + its number.
pub fn stop_on_signals(stop: &StopRequest) -> std::io::Result<()> {
    for signal in [SIGINT, SIGTERM] {
        let name = name_of(signal);
        let first = format!(
            "kb-train: {name}: finishing the current optimizer step, then saving `last` and stopping (send it again to stop at once)\n"
        )
        .into_bytes();
        let again = format!(
            "kb-train: {name} while stopping: stopping at once, without saving; the checkpoints saved before are kept (continue with --resume)\n"
        )
        .into_bytes();
        let stop = stop.clone();
        let cause = signal as usize;
        // SAFETY: the action does only what is async-signal-safe: one atomic compare-and-swap,
        // write(2) of bytes prepared here, and _exit(2). It allocates nothing and takes no lock.
        unsafe {
            signal_hook::low_level::register(signal, move || {
                let first_request = stop.request_because(cause);
                let line = if first_request { &first } else { &again };
                libc::write(libc::STDERR_FILENO, line.as_ptr().cast(), line.len());
                if !first_request {
                    signal_hook::low_level::exit(128 + signal);
                }
            })?;
        }
    }
    Ok(())
}

fn name_of(signal: i32) -> &'static str {
    signal_hook::low_level::signal_name(signal).unwrap_or("a signal")
}

/// What stopped a run, by a stop request's cause: the signal's name and the exit status
/// (128 + its number).
pub fn describe(cause: Option<usize>) -> (&'static str, i32) {
    match cause.and_then(|c| i32::try_from(c).ok()) {
        Some(signal) if signal_hook::low_level::signal_name(signal).is_some() => {
            (name_of(signal), 128 + signal)
        }
        _ => ("a stop request", 1),
    }
}

/// `text` as one word for a POSIX shell: as it is when it holds only safe characters, else in
/// single quotes.
pub fn shell_quote(text: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_-./=+:,@%".contains(c);
    if !text.is_empty() && text.chars().all(safe) {
        text.to_string()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_and_quoting() {
        assert_eq!(describe(Some(SIGTERM as usize)), ("SIGTERM", 143));
        assert_eq!(describe(Some(SIGINT as usize)), ("SIGINT", 130));
        assert_eq!(describe(Some(StopRequest::ASKED)), ("a stop request", 1));
        assert_eq!(shell_quote("runs/a-1"), "runs/a-1");
        assert_eq!(shell_quote("my run"), "'my run'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
