//! Progress bars for long command-line work.

use indicatif::{ProgressBar, ProgressStyle};
pub use store::format::thousands;

/// A spinner-with-counter bar showing a rate, drawn on stderr.
pub fn counter(what: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_message(what.to_string());
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}
