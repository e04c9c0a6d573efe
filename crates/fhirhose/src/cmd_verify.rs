//! `fhirhose verify MANIFEST|URL`: checks a Bulk Data export against its manifest (sizes,
//! SHA-256, counts, every line a resource of its entry's type, references resolving within the
//! export) with the `manifest` crate; exit status 1 on any mismatch. A paged manifest
//! (`allowPartialManifests`) is followed through its `link` `next` pages and checked as one.

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
    /// URL form: bearer token for the status URL, the manifest's pages and the file downloads
    /// (file form: for the next pages of a saved first page).
    #[arg(long, env = "FHIRHOSE_VERIFY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// References to an exported type that resolve to no exported resource: `fail` (default)
    /// or `warn` (a `_since` delta, whose references point into its baseline).
    #[arg(long, default_value = "fail", value_parser = ["fail", "warn"])]
    pub dangling: String,
    /// A paged manifest (Bulk Data `allowPartialManifests`: `link` `next`) is followed page by
    /// page, every page's files checked, the counts and references over all of them; more pages
    /// than this, or a `next` link to a page already read, is refused.
    #[arg(long, default_value_t = manifest::MAX_PAGES)]
    pub max_pages: usize,
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
    let cannot = |e: manifest::VerifyError| format!("cannot read the manifest: {e}");
    let (report, pages) = if is_url {
        let source = manifest::HttpSource::new(args.token.clone()).map_err(|e| e.to_string())?;
        let walk = source
            .manifest_pages(&args.manifest, args.max_pages)
            .map_err(cannot)?;
        let pages = walk.pages();
        let m = walk.finish();
        let report = match &args.dir {
            Some(dir) => manifest::verify(&m, &manifest::DirSource::new(dir, &m), &options),
            None => manifest::verify(&m, &source, &options),
        };
        (report, pages)
    } else {
        let path = PathBuf::from(&args.manifest);
        let first = manifest::read_manifest_file(&path).map_err(|e| e.to_string())?;
        let mut walk = manifest::PageWalk::new(first, None, args.max_pages).map_err(cannot)?;
        // A saved first page of a paged manifest: the next pages come from the server.
        if walk.has_next() {
            let source =
                manifest::HttpSource::new(args.token.clone()).map_err(|e| e.to_string())?;
            walk = source.follow(walk).map_err(cannot)?;
        }
        let pages = walk.pages();
        let m = walk.finish();
        let dir = args.dir.clone().unwrap_or_else(|| {
            path.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map_or_else(|| PathBuf::from("."), PathBuf::from)
        });
        (
            manifest::verify(&m, &manifest::DirSource::new(dir, &m), &options),
            pages,
        )
    };
    if pages > 1 {
        println!("manifest: {pages} pages");
    }
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
