//! `fhirhose verify MANIFEST|URL`: checks a Bulk Data export against its manifest (sizes,
//! SHA-256, counts, every line a resource of its entry's type, references resolving within the
//! export) with the `manifest` crate; exit status 1 on any mismatch.

use std::path::PathBuf;

use clap::Args;

use crate::failure::Failure;

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// A manifest file (JSON), or the status URL of a completed export (http:// or https://).
    pub manifest: String,
    /// File form: the folder holding the files, by the names their URLs end with (default: the
    /// manifest file's folder).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// URL form: bearer token for the status URL and the file downloads.
    #[arg(long, env = "FHIRHOSE_VERIFY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// References to an exported type that resolve to no exported resource: `fail` (default)
    /// or `warn` (a `_since` delta, whose references point into its baseline).
    #[arg(long, default_value = "fail", value_parser = ["fail", "warn"])]
    pub dangling: String,
}

pub fn run(args: VerifyArgs) -> Result<(), Failure> {
    let options = manifest::Options {
        dangling: if args.dangling == "warn" {
            manifest::Dangling::Warn
        } else {
            manifest::Dangling::Fail
        },
    };
    let is_url = args.manifest.starts_with("http://") || args.manifest.starts_with("https://");
    let report = if is_url {
        let source = manifest::HttpSource::new(args.token.clone()).map_err(|e| e.to_string())?;
        let m = source
            .manifest(&args.manifest)
            .map_err(|e| format!("cannot read the manifest: {e}"))?;
        match &args.dir {
            Some(dir) => manifest::verify(&m, &manifest::DirSource::new(dir), &options),
            None => manifest::verify(&m, &source, &options),
        }
    } else {
        let path = PathBuf::from(&args.manifest);
        let m = manifest::read_manifest_file(&path).map_err(|e| e.to_string())?;
        let dir = args.dir.clone().unwrap_or_else(|| {
            path.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map_or_else(|| PathBuf::from("."), PathBuf::from)
        });
        manifest::verify(&m, &manifest::DirSource::new(dir), &options)
    };
    print!("{report}");
    if report.ok() {
        Ok(())
    } else {
        Err(format!(
            "the export does not match its manifest ({} problems)",
            report.problem_count()
        )
        .into())
    }
}
