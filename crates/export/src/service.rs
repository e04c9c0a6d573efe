//! [`ExportService`]: what the HTTP layer calls.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use store::{SqliteStore, Store};

use crate::jobs::{JobRecord, JobState, JobStore};
use crate::request::{ExportLevel, ExportRequest, RequestError, parameters_to_pairs};
use crate::run::{RunError, run_export};

/// Export settings from the server configuration.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// `<data-dir>/storage`: containers are folders in it.
    pub storage_root: PathBuf,
    /// `<data-dir>/exports.db`.
    pub jobs_db: PathBuf,
    /// Container used without `_container`.
    pub default_container: String,
    /// Resources per NDJSON file.
    pub file_max_resources: u64,
    /// Exports queued or running at once; more get 429.
    pub max_concurrent: u64,
    /// Base URL for file URLs in manifests.
    pub base_url: String,
    /// Whether downloads need a bearer token (the manifest's `requiresAccessToken`).
    pub requires_access_token: bool,
}

/// Errors of the export API; each names the HTTP status it maps to.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A kick-off parameter is invalid → 400.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The Group of a Group-level export does not exist → 404.
    #[error("Group/{0} not found")]
    GroupNotFound(String),
    /// No such job, or not the caller's → 404.
    #[error("no export job '{0}'")]
    UnknownJob(String),
    /// No such file in a finished export → 404.
    #[error("no file '{0}' in this export")]
    UnknownFile(String),
    /// Too many exports at once → 429 with Retry-After.
    #[error("too many exports in progress ({0}); retry later")]
    TooMany(u64),
    /// Storage or job-table failure → 500.
    #[error("export storage failure: {0}")]
    Internal(String),
}

/// The state of a job as the status endpoint reports it.
#[derive(Debug, Clone)]
pub enum Status {
    InProgress { progress: String },
    Complete { manifest: Value },
    Failed { diagnostics: String },
}

/// Persisted form of a kick-off, re-parsed when a restarted server resumes the job.
fn request_json(
    level: &ExportLevel,
    pairs: &[(String, String)],
    is_post: bool,
    lenient: bool,
    url: &str,
) -> String {
    let (lv, gid) = match level {
        ExportLevel::System => ("system", None),
        ExportLevel::Patient => ("patient", None),
        ExportLevel::Group(g) => ("group", Some(g.clone())),
    };
    json!({"level": lv, "group": gid, "params": pairs, "post": is_post, "lenient": lenient, "url": url}).to_string()
}

fn parse_request_json(s: &str, now_ms: i64) -> Option<ExportRequest> {
    let v: Value = serde_json::from_str(s).ok()?;
    let level = match v["level"].as_str()? {
        "system" => ExportLevel::System,
        "patient" => ExportLevel::Patient,
        _ => ExportLevel::Group(v["group"].as_str()?.to_string()),
    };
    let pairs: Vec<(String, String)> = serde_json::from_value(v["params"].clone()).ok()?;
    ExportRequest::parse(
        level,
        &pairs,
        v["post"].as_bool()?,
        v["lenient"].as_bool()?,
        now_ms,
        v["url"].as_str()?.to_string(),
    )
    .ok()
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The export service: durable jobs, one runner thread per running export.
pub struct ExportService {
    store: Arc<SqliteStore>,
    jobs: JobStore,
    config: ExportConfig,
    cancels: Mutex<HashMap<String, Arc<AtomicBool>>>,
    live_progress: Arc<Mutex<HashMap<String, String>>>,
}

impl ExportService {
    pub fn open(
        store: Arc<SqliteStore>,
        config: ExportConfig,
    ) -> Result<Arc<ExportService>, ExportError> {
        let jobs =
            JobStore::open(&config.jobs_db).map_err(|e| ExportError::Internal(e.to_string()))?;
        Ok(Arc::new(ExportService {
            store,
            jobs,
            config,
            cancels: Mutex::new(HashMap::new()),
            live_progress: Arc::new(Mutex::new(HashMap::new())),
        }))
    }

    /// Starts again every job a previous process left unfinished (from its pinned snapshot,
    /// into a cleared folder).
    pub fn resume(self: &Arc<Self>) -> Result<usize, ExportError> {
        let unfinished = self
            .jobs
            .unfinished()
            .map_err(|e| ExportError::Internal(e.to_string()))?;
        let n = unfinished.len();
        for job in unfinished {
            tracing::info!(job = %job.id, "resuming export job");
            self.spawn(job);
        }
        Ok(n)
    }

    fn job_dir(&self, job: &JobRecord) -> PathBuf {
        self.config.storage_root.join(&job.container).join(&job.id)
    }

    /// Validates a kick-off and queues the job. `body` is the POST Parameters resource, if any.
    #[allow(clippy::too_many_arguments)]
    pub fn kickoff(
        self: &Arc<Self>,
        level: ExportLevel,
        mut pairs: Vec<(String, String)>,
        body: Option<&Value>,
        lenient: bool,
        request_url: String,
        client_id: Option<String>,
    ) -> Result<String, ExportError> {
        let is_post = body.is_some();
        if let Some(b) = body {
            pairs.extend(parameters_to_pairs(b)?);
        }
        let now = now_ms();
        let req = ExportRequest::parse(
            level.clone(),
            &pairs,
            is_post,
            lenient,
            now,
            request_url.clone(),
        )?;
        if let ExportLevel::Group(id) = &level {
            match self.store.read("Group", id) {
                Ok(_) => {}
                Err(store::StoreError::NotFound { .. } | store::StoreError::Gone { .. }) => {
                    return Err(ExportError::GroupNotFound(id.clone()));
                }
                Err(e) => return Err(ExportError::Internal(e.to_string())),
            }
        }
        let active = self
            .jobs
            .active_count()
            .map_err(|e| ExportError::Internal(e.to_string()))?;
        if active >= self.config.max_concurrent {
            return Err(ExportError::TooMany(active));
        }
        let wm = self
            .store
            .watermark()
            .map_err(|e| ExportError::Internal(e.to_string()))?;
        let transaction_time = wm
            .last_updated
            .unwrap_or_else(|| store::format_instant_ms(now));
        let job = JobRecord {
            id: uuid::Uuid::new_v4().simple().to_string(),
            state: JobState::Queued,
            request: request_json(&level, &pairs, is_post, lenient, &request_url),
            watermark: wm.seq,
            transaction_time,
            client_id,
            container: req
                .container
                .clone()
                .unwrap_or_else(|| self.config.default_container.clone()),
            result: None,
            progress: "queued".into(),
            created_ms: now,
            finished_ms: None,
        };
        self.jobs
            .insert(&job)
            .map_err(|e| ExportError::Internal(e.to_string()))?;
        let id = job.id.clone();
        self.spawn(job);
        Ok(id)
    }

    fn spawn(self: &Arc<Self>, job: JobRecord) {
        let flag = Arc::new(AtomicBool::new(false));
        self.cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(job.id.clone(), flag.clone());
        let me = self.clone();
        std::thread::Builder::new()
            .name(format!("export-{}", &job.id[..8.min(job.id.len())]))
            .spawn(move || me.execute(job, &flag))
            .map(|_| ())
            .unwrap_or_else(|e| tracing::error!(error = %e, "cannot start an export thread"));
    }

    fn execute(&self, job: JobRecord, cancel: &AtomicBool) {
        let id = job.id.clone();
        match self.jobs.start(&id) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::error!(job = %id, error = %e, "cannot start export job");
                return;
            }
        }
        let Some(req) = parse_request_json(&job.request, job.created_ms) else {
            let _ = self.jobs.finish(
                &id,
                JobState::Failed,
                Some("the stored request cannot be read"),
                now_ms(),
            );
            return;
        };
        let dir = self.job_dir(&job);
        // A previous attempt may have left files: the snapshot is pinned, so start clean.
        let _ = std::fs::remove_dir_all(&dir);
        let live = self.live_progress.clone();
        let mut progress = |text: &str| {
            live.lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id.clone(), text.to_string());
        };
        let result = run_export(
            self.store.as_ref(),
            &req,
            job.watermark,
            &dir,
            self.config.file_max_resources,
            cancel,
            &mut progress,
        );
        self.live_progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        match result {
            Ok(output) => {
                let url =
                    |name: &str| format!("{}/export-files/{}/{}", self.config.base_url, id, name);
                let files = |v: &[crate::run::OutputFile]| -> Vec<Value> {
                    v.iter().map(|f| json!({"type": f.resource_type, "url": url(&f.name), "count": f.count})).collect()
                };
                let mut manifest = json!({
                    "transactionTime": job.transaction_time,
                    "request": req.request_url,
                    "requiresAccessToken": self.config.requires_access_token,
                    "output": files(&output.files),
                    "error": files(&output.errors),
                    "extension": {
                        "storage": {"container": job.container, "folder": id, "path": dir.display().to_string()}
                    }
                });
                if req.since_ms.is_some() {
                    manifest["deleted"] = Value::Array(files(&output.deleted));
                }
                let _ = self.jobs.finish(
                    &id,
                    JobState::Complete,
                    Some(&manifest.to_string()),
                    now_ms(),
                );
                tracing::info!(job = %id, files = output.files.len(), "export complete");
            }
            Err(RunError::Cancelled) => {
                let _ = std::fs::remove_dir_all(&dir);
            }
            Err(e) => {
                tracing::error!(job = %id, error = %e, "export failed");
                let _ = std::fs::remove_dir_all(&dir);
                let _ = self
                    .jobs
                    .finish(&id, JobState::Failed, Some(&e.to_string()), now_ms());
            }
        }
        self.cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    fn owned_job(
        &self,
        id: &str,
        may_see: &dyn Fn(Option<&str>) -> bool,
    ) -> Result<JobRecord, ExportError> {
        let job = self
            .jobs
            .get(id)
            .map_err(|e| ExportError::Internal(e.to_string()))?
            .ok_or_else(|| ExportError::UnknownJob(id.to_string()))?;
        if job.state == JobState::Cancelled || !may_see(job.client_id.as_deref()) {
            return Err(ExportError::UnknownJob(id.to_string()));
        }
        Ok(job)
    }

    /// The status of a job; `may_see` decides whether the caller may see a job of that client.
    pub fn status(
        &self,
        id: &str,
        may_see: &dyn Fn(Option<&str>) -> bool,
    ) -> Result<Status, ExportError> {
        let job = self.owned_job(id, may_see)?;
        Ok(match job.state {
            JobState::Queued | JobState::Running | JobState::Cancelled => {
                let live = self
                    .live_progress
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(id)
                    .cloned();
                Status::InProgress {
                    progress: live.unwrap_or(job.progress),
                }
            }
            JobState::Complete => Status::Complete {
                manifest: job
                    .result
                    .as_deref()
                    .and_then(|s| serde_json::from_str(s).ok())
                    .unwrap_or(Value::Null),
            },
            JobState::Failed => Status::Failed {
                diagnostics: job.result.unwrap_or_default(),
            },
        })
    }

    /// Cancels a job (running or finished): stops its runner and removes its files.
    pub fn cancel(
        &self,
        id: &str,
        may_see: &dyn Fn(Option<&str>) -> bool,
    ) -> Result<(), ExportError> {
        let job = self.owned_job(id, may_see)?;
        if let Some(flag) = self
            .cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
        {
            flag.store(true, Ordering::Relaxed);
        }
        self.jobs
            .cancel(id, now_ms())
            .map_err(|e| ExportError::Internal(e.to_string()))?;
        let _ = std::fs::remove_dir_all(self.job_dir(&job));
        Ok(())
    }

    /// The path of a file of a finished export.
    pub fn file(
        &self,
        id: &str,
        name: &str,
        may_see: &dyn Fn(Option<&str>) -> bool,
    ) -> Result<PathBuf, ExportError> {
        let job = self.owned_job(id, may_see)?;
        let valid_name =
            name.ends_with(".ndjson") && !name.contains(['/', '\\']) && !name.contains("..");
        if job.state != JobState::Complete || !valid_name {
            return Err(ExportError::UnknownFile(name.to_string()));
        }
        let path = self.job_dir(&job).join(name);
        if path.is_file() {
            Ok(path)
        } else {
            Err(ExportError::UnknownFile(name.to_string()))
        }
    }
}
