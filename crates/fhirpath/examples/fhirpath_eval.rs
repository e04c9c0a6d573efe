//! `cargo run -p fhirpath --example fhirpath_eval -- 'EXPR' FILE.json [--json]`: what the
//! `fhirhose fhirpath` subcommand prints.
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(expr), Some(file)) = (args.first(), args.get(1)) else {
        eprintln!("usage: fhirpath_eval 'EXPR' FILE.json [--json]");
        std::process::exit(2);
    };
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{file}: {e}");
            std::process::exit(1);
        }
    };
    match fhirpath::cli::run(expr, &text, args.iter().any(|a| a == "--json")) {
        Ok(out) => print!("{out}"),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}
