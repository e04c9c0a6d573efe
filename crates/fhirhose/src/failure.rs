//! How a command fails: one line on stderr and an exit status that tells the causes a supervisor
//! acts on apart (see the README's exit status table).

use std::process::ExitCode;

/// Any other failure.
pub const EXIT_FAILURE: u8 = 1;
/// The database could not be reached (PostgreSQL down, refused, timed out): retrying later may
/// succeed. (2 is clap's invalid-arguments status.)
pub const EXIT_DATABASE_UNAVAILABLE: u8 = 3;

/// A failed command: its message and exit status.
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub code: u8,
}

impl From<String> for Failure {
    fn from(message: String) -> Failure {
        Failure {
            message,
            code: EXIT_FAILURE,
        }
    }
}

impl Failure {
    /// `context: error`, with [`EXIT_DATABASE_UNAVAILABLE`] when the store could not reach its
    /// database.
    pub fn store(context: impl std::fmt::Display, e: &store::StoreError) -> Failure {
        Failure {
            message: format!("{context}: {e}"),
            code: match e {
                store::StoreError::Unavailable { .. } => EXIT_DATABASE_UNAVAILABLE,
                _ => EXIT_FAILURE,
            },
        }
    }
}

/// Prints the failure on one line and turns the result into the exit status.
pub fn finish(result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            let line: String = f
                .message
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            eprintln!("error: {line}");
            ExitCode::from(f.code)
        }
    }
}
