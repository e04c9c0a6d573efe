//! The `fhirhose` command: a thin dispatcher over the library crates, one module per subcommand.

mod cmd_fhirpath;
mod cmd_keys;
mod cmd_load;
mod cmd_reindex;
mod cmd_serve;
mod cmd_synth;
mod cmd_verify;
mod cmd_view;
mod failure;
mod progress;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc: the loader, the export and de-identification allocate and free many small JSON
/// values across threads, where glibc's allocator spent a fifth of the loader's time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "fhirhose",
    version,
    about = "A FHIR R4 server built for bulk $export and de-identification"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start: the size difference between the variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the FHIR server.
    Serve(server::ServeConfig),
    /// Load NDJSON / Bundle files (or .gz of either) into a data directory or a running server.
    Load(cmd_load::LoadArgs),
    /// Generate synthetic benchmark data (NDJSON per type) from the Synthea seed.
    Synth(cmd_synth::SynthArgs),
    /// Rebuild the search indexes of a data directory.
    Reindex(cmd_reindex::ReindexArgs),
    /// Evaluate a FHIRPath expression against a JSON resource file.
    Fhirpath(cmd_fhirpath::FhirpathArgs),
    /// Print a JWKS document for client key files (to register a SMART client).
    Jwks(auth::cli::JwksArgs),
    /// De-identify files, folders or NDJSON with a Microsoft FHIR anonymizer configuration.
    Anonymize(cmd_keys::AnonymizeCmd),
    /// Run a SQL on FHIR ViewDefinition over NDJSON/JSON files or folders, to CSV or NDJSON.
    View(cmd_view::ViewArgs),
    /// Sign a client assertion and request an access token from a Fhirhose server.
    Token(auth::cli::TokenArgs),
    /// Manage named de-identification key sets (create, list, rotate, delete) in the database.
    Keys(cmd_keys::KeysArgs),
    /// Check an export against its manifest: sizes, SHA-256, counts, lines, references.
    Verify(cmd_verify::VerifyArgs),
    /// Bulk Data $export client for any FHIR server: kick-off, SMART auth, polling, parallel
    /// resumable downloads into a folder, --verify.
    Export(client::ExportArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(config) => return failure::finish(cmd_serve::run(config)),
        Command::Load(args) => return failure::finish(cmd_load::run(args)),
        Command::Synth(args) => cmd_synth::run(args),
        Command::Reindex(args) => return failure::finish(cmd_reindex::run(args)),
        Command::Fhirpath(args) => cmd_fhirpath::run(args),
        Command::Jwks(args) => auth::cli::run_jwks(&args)
            .map(|s| println!("{s}"))
            .map_err(|e| e.to_string()),
        Command::Anonymize(cmd) => {
            // A key set whose database is unreachable keeps its exit status (3).
            let args = match cmd_keys::with_key_set(cmd) {
                Ok(args) => args,
                Err(failure) => return failure::finish(Err(failure)),
            };
            deid_cli::run(&args)
                .map(|s| eprint!("{s}"))
                .map_err(|e| e.to_string())
        }
        Command::View(args) => cmd_view::run(args),
        Command::Keys(args) => return failure::finish(cmd_keys::run(args)),
        Command::Verify(args) => return failure::finish(cmd_verify::run(args)),
        Command::Export(args) => client::run(args)
            .map(|summary| eprintln!("{summary}"))
            .map_err(|e| e.to_string()),
        Command::Token(args) => tokio::runtime::Runtime::new()
            .map_err(|e| e.to_string())
            .and_then(|rt| {
                rt.block_on(auth::cli::run_token(&args))
                    .map_err(|e| e.to_string())
            })
            .map(|s| println!("{s}")),
    };
    failure::finish(result.map_err(failure::Failure::from))
}
