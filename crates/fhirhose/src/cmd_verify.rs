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
    /// Bearer token, sent to one origin (scheme, host and port) only: in URL form the status
    /// URL's, in file form the one `--token-origin` names (none without it). The manifest's
    /// pages on that origin get it, and its files there when it says `requiresAccessToken`;
    /// a URL on any other origin (or over http for an https origin) is read without it.
    #[arg(long, env = "FHIRHOSE_VERIFY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File form: the origin (e.g. `https://fhir.example.org`) the token is sent to, for the
    /// next pages of a saved first page. A saved manifest may name any host, so the token goes
    /// to none unless named here.
    #[arg(long, requires = "token")]
    pub token_origin: Option<String>,
    /// URL form: seconds to wait for a connection, an answer, or the next bytes of a body.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
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
    let timeout = std::time::Duration::from_secs(args.timeout.max(1));
    let (report, pages) = if is_url {
        if args.token_origin.is_some() {
            return Err(
                "--token-origin is for a manifest file: with a status URL the token \
                        goes to that URL's origin"
                    .to_owned()
                    .into(),
            );
        }
        let mut source = manifest::HttpSource::with_timeout(args.token.clone(), timeout)
            .and_then(|s| s.send_token_to(&args.manifest))
            .map_err(|e| e.to_string())?;
        let walk = source
            .manifest_pages(&args.manifest, args.max_pages)
            .map_err(cannot)?;
        let pages = walk.pages();
        let m = walk.finish();
        source.files_need_token(requires_access_token(&m));
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
            let mut source = manifest::HttpSource::with_timeout(args.token.clone(), timeout)
                .map_err(|e| e.to_string())?;
            if let Some(origin) = &args.token_origin {
                source = source.send_token_to(origin).map_err(|e| e.to_string())?;
            } else if args.token.is_some() {
                eprintln!(
                    "the token is not sent: a saved manifest's pages may be on any host \
                     (--token-origin names the one to send it to)"
                );
            }
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

/// The manifest's `requiresAccessToken` (false when absent).
fn requires_access_token(m: &serde_json::Value) -> bool {
    m.get("requiresAccessToken")
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false)
}
