//! `fhirhose fhirpath 'EXPR' FILE.json`: debug FHIRPath (and de-identification rules).

use std::path::PathBuf;

use clap::Args;

#[derive(Debug, Args)]
pub struct FhirpathArgs {
    /// The FHIRPath expression (nodesByType / nodesByName available).
    pub expression: String,
    /// A JSON resource file (`-` for standard input).
    pub file: PathBuf,
    /// Print only the values, as one JSON array.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: FhirpathArgs) -> Result<(), String> {
    let text = if args.file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())
            .map_err(|e| format!("cannot read standard input: {e}"))?
    } else {
        std::fs::read_to_string(&args.file)
            .map_err(|e| format!("cannot read {}: {e}", args.file.display()))?
    };
    let out = fhirpath::cli::run(&args.expression, &text, args.json).map_err(|e| e.to_string())?;
    print!("{out}");
    Ok(())
}
