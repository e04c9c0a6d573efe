//! Stand-alone front end (what `fhirhose anonymize` calls): `cargo run --release -p deid-cli --example anonymize -- -i IN -o OUT -c CONFIG [-b]`.
use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: deid_cli::AnonymizeArgs,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let start = std::time::Instant::now();
    match deid_cli::run(&cli.args) {
        Ok(s) => {
            let secs = start.elapsed().as_secs_f64();
            eprint!("{s}");
            eprintln!(
                "{:.2} s, {:.0} resources/s",
                secs,
                s.resources as f64 / secs
            );
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
