//! Export destinations as private instances on free ports, from the installations of
//! `scripts/azurite.sh` (Azurite), `scripts/s3.sh` (moto) and `scripts/s3fs.sh` (s3s-fs), so
//! that stopping, pausing or killing one never disturbs other tests. `FHIRHOSE_TEST_AZURITE_BIN`,
//! `FHIRHOSE_TEST_MOTO_SERVER` and `FHIRHOSE_TEST_S3S_FS` override the paths. moto keeps its
//! objects in memory (it can be paused, not restarted); s3s-fs keeps them in a folder.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use crate::external::{required, tool};
use crate::process::{free_port, log_file, signal, tail, wait_exit, wait_listening};

/// Azurite's well-known development account key (public, in Azurite's documentation).
pub const AZURITE_DEV_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// The S3 credentials the S3 servers here are given (moto takes any).
pub const S3_KEY: &str = "test";

/// Which server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Azurite,
    Moto,
    S3sFs,
}

impl Kind {
    /// The name used for its folder and log (`azurite`, `moto`, `s3s`).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Azurite => "azurite",
            Kind::Moto => "moto",
            Kind::S3sFs => "s3s",
        }
    }
}

/// Azurite, moto or s3s-fs on a free port of its own; continued and killed when dropped.
pub struct Destination {
    pub kind: Kind,
    bin: PathBuf,
    pub port: u16,
    /// Its data folder (Azurite, s3s-fs).
    pub location: PathBuf,
    child: Option<Child>,
    /// Its stdout and stderr (moto writes a line per request).
    pub log: PathBuf,
    env: Vec<(String, String)>,
}

impl Drop for Destination {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = signal(c.id(), "CONT");
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Destination {
    /// Starts one with its folder and log under `dir`. `Ok(None)`: not installed, the test is
    /// skipped; an error under `FHIRHOSE_REQUIRE_EXTERNAL=1`, or when it does not start.
    pub fn new(kind: Kind, dir: &Path) -> Result<Option<Destination>, String> {
        Destination::with_env(kind, dir, &[])
    }

    /// [`Destination::new`] with environment variables for the server (moto's
    /// `INITIAL_NO_AUTH_ACTION_COUNT=0`: every request must be signed by a key its IAM knows).
    pub fn with_env(
        kind: Kind,
        dir: &Path,
        env: &[(&str, &str)],
    ) -> Result<Option<Destination>, String> {
        let (bin, script) = match kind {
            Kind::Azurite => (
                tool(
                    "FHIRHOSE_TEST_AZURITE_BIN",
                    ".tools/azurite/node_modules/.bin/azurite-blob",
                ),
                "./scripts/azurite.sh",
            ),
            Kind::S3sFs => (
                tool("FHIRHOSE_TEST_S3S_FS", ".tools/s3s-fs/bin/s3s-fs"),
                "./scripts/s3fs.sh",
            ),
            Kind::Moto => (
                tool(
                    "FHIRHOSE_TEST_MOTO_SERVER",
                    ".tools/moto/venv/bin/moto_server",
                ),
                "./scripts/s3.sh",
            ),
        };
        if !bin.exists() {
            let what = format!("{} is missing (run {script})", bin.display());
            if required() {
                return Err(format!("missing, and FHIRHOSE_REQUIRE_EXTERNAL=1: {what}"));
            }
            eprintln!("skipped: {what}");
            return Ok(None);
        }
        let location = dir.join(kind.name());
        std::fs::create_dir_all(&location).map_err(|e| e.to_string())?;
        let mut d = Destination {
            kind,
            bin,
            port: free_port(),
            log: dir.join(format!("{}.log", kind.name())),
            location,
            child: None,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        d.start()?;
        Ok(Some(d))
    }

    /// Starts it (again, on the same port and folder) and waits until it listens.
    pub fn start(&mut self) -> Result<(), String> {
        let mut cmd = Command::new(&self.bin);
        match self.kind {
            Kind::Azurite => cmd
                .args(["--blobHost", "127.0.0.1", "--blobPort"])
                .arg(self.port.to_string())
                .arg("--location")
                .arg(&self.location)
                .args(["--skipApiVersionCheck", "--loose"]),
            // A bucket is a folder of the root.
            Kind::S3sFs => cmd
                .args(["--host", "127.0.0.1", "--port"])
                .arg(self.port.to_string())
                .args(["--access-key", S3_KEY, "--secret-key", S3_KEY])
                .arg(&self.location),
            Kind::Moto => cmd
                .args(["-H", "127.0.0.1", "-p"])
                .arg(self.port.to_string()),
        };
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdout(log_file(&self.log))
            .stderr(log_file(&self.log))
            .spawn()
            .map_err(|e| format!("start {}: {e}", self.kind.name()))?;
        self.child = Some(child);
        if wait_listening(self.port, Duration::from_secs(30)) {
            Ok(())
        } else {
            Err(format!(
                "{} did not listen: {}",
                self.kind.name(),
                tail(&self.log)
            ))
        }
    }

    /// Stopped (SIGTERM, so that Azurite saves its metadata) and waited for.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = signal(c.id(), "TERM");
            if wait_exit(&mut c, Duration::from_secs(20)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// Killed (SIGKILL) and waited for.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stopped with SIGSTOP: connections hang.
    pub fn pause(&self) {
        if let Some(c) = &self.child {
            let _ = signal(c.id(), "STOP");
        }
    }

    /// Continued after [`Destination::pause`].
    pub fn resume(&self) {
        if let Some(c) = &self.child {
            let _ = signal(c.id(), "CONT");
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// What it wrote so far (moto: a line per request).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `fhirhose serve` flags that export to this destination (`bucket` for S3).
    pub fn serve_args(&self, bucket: &str) -> Vec<String> {
        if self.kind == Kind::Azurite {
            vec![
                "--export-destination".into(),
                "azure".into(),
                "--azure-connection-string".into(),
                azurite_connection_string(&format!("{}/devstoreaccount1", self.endpoint())),
            ]
        } else {
            vec![
                "--export-destination".into(),
                "s3".into(),
                "--s3-bucket".into(),
                bucket.into(),
                "--s3-endpoint".into(),
                self.endpoint(),
                "--s3-access-key-id".into(),
                S3_KEY.into(),
                "--s3-secret-access-key".into(),
                S3_KEY.into(),
            ]
        }
    }
}

/// The connection string of Azurite's development account at `blob_endpoint` (which names the
/// account: `http://127.0.0.1:10000/devstoreaccount1`).
pub fn azurite_connection_string(blob_endpoint: &str) -> String {
    format!(
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={AZURITE_DEV_KEY};BlobEndpoint={blob_endpoint};"
    )
}
