//! The server's one typed configuration: defaults in code, `FHIRHOSE_*` environment variables,
//! command-line flags. Validated at start-up ([`ServeConfig::validate`]).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, ValueEnum};

/// `fhirhose serve` options. Every flag also reads the environment variable named beside it.
#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// Address and port to listen on.
    #[arg(long, env = "FHIRHOSE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Data directory: the SQLite database `fhirhose.db` and the local `storage/` folder.
    #[arg(long, env = "FHIRHOSE_DATA_DIR", default_value = "./fhirhose-data")]
    pub data_dir: PathBuf,
    /// Where resources and export jobs are kept: `sqlite` (default: `fhirhose.db` and
    /// `exports.db` in the data directory) or a PostgreSQL URL
    /// (`postgres://user:password@host:5432/db`, `?sslmode=require` for TLS). Several `serve`
    /// processes may share one PostgreSQL database and one export destination (see --node-id
    /// and --export-destination).
    #[arg(long, env = "FHIRHOSE_DATABASE")]
    pub database: Option<store::DatabaseArg>,
    /// Base URL written into links and manifests (default: `http://` and the listen address).
    #[arg(long, env = "FHIRHOSE_BASE_URL")]
    pub base_url: Option<String>,
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "FHIRHOSE_MAX_BODY_BYTES", default_value_t = 100 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Bytes of request bodies held in memory at once, summed over every request being read or
    /// handled (a parsed body takes 10–20 times its size); a body that would go over it is
    /// answered 503 with Retry-After. At least --max-body-bytes.
    #[arg(long, env = "FHIRHOSE_MAX_BODY_MEMORY", default_value_t = crate::body_budget::DEFAULT_MAX_BODY_MEMORY)]
    pub max_body_memory: usize,
    /// Most entries in a batch or transaction Bundle (413 beyond); the body is refused while it
    /// is parsed.
    #[arg(
        long,
        env = "FHIRHOSE_MAX_BUNDLE_ENTRIES",
        default_value_t = crate::negotiate::DEFAULT_MAX_BUNDLE_ENTRIES
    )]
    pub max_bundle_entries: usize,
    /// `Host` names accepted besides the base URL's host, the listen address and
    /// localhost, 127.0.0.1 or ::1 on the base URL's port, comma-separated: `host` (any port),
    /// `host:port`, or `*` (any host; no DNS-rebinding guard). Checked with `--auth none`, and
    /// with `--auth smart` when given.
    #[arg(long, env = "FHIRHOSE_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,
    /// Log format.
    #[arg(long, env = "FHIRHOSE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Authorization mode: `none` (loopback only unless --insecure) or `smart`
    /// (SMART Backend Services).
    #[arg(long, env = "FHIRHOSE_AUTH", default_value = "none")]
    pub auth: String,
    /// SMART client registrations (JSON array), required with `--auth smart`.
    #[arg(long, env = "FHIRHOSE_CLIENTS")]
    pub clients: Option<PathBuf>,
    /// Who may read `GET /metrics` (Prometheus text): `off`, `open`, or `protected` (a
    /// valid access token). Default: `open` with `--auth none`, `protected` with `--auth smart`.
    #[arg(long, env = "FHIRHOSE_METRICS", value_enum)]
    pub metrics: Option<crate::metrics::MetricsMode>,
    /// Allow `--auth none` on a non-loopback address.
    #[arg(long, env = "FHIRHOSE_INSECURE", default_value_t = false)]
    pub insecure: bool,
    /// Lifetime of issued access tokens, in seconds.
    #[arg(long, env = "FHIRHOSE_TOKEN_LIFETIME", default_value_t = 300)]
    pub token_lifetime: u64,
    /// File holding the access-token signing key (at least 32 bytes, e.g. `openssl rand -hex
    /// 32`): processes given the same file accept each other's tokens. Without it the key is
    /// random per process, or shared through the PostgreSQL database by the nodes using one.
    #[arg(long, env = "FHIRHOSE_TOKEN_KEY", value_name = "FILE")]
    pub token_key: Option<std::path::PathBuf>,
    /// Seconds a client has to send a request's complete header (slowloris guard).
    #[arg(long, env = "FHIRHOSE_HEADER_READ_TIMEOUT", default_value_t = 10)]
    pub header_read_timeout: u64,
    /// The least average rate of a request body, in bytes a second, after a grace of
    /// --header-read-timeout (and no pause longer than 3 times that); a slower body is
    /// answered 408 and its connection closed.
    #[arg(long, env = "FHIRHOSE_MIN_BODY_RATE", default_value_t = 1024)]
    pub min_body_rate: u64,
    /// Seconds a response may wait for its client to take the part of it sent last: a client
    /// that reads nothing, or hardly anything, would hold its request (or download) slot for
    /// ever. Past it the connection is closed.
    #[arg(long, env = "FHIRHOSE_SEND_TIMEOUT", default_value_t = 60)]
    pub send_timeout: u64,
    /// Connections served at once; more wait until one closes.
    #[arg(long, env = "FHIRHOSE_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// Connections served at once from one client address (an IPv4 address, an IPv6 /64);
    /// more are answered 503 and closed. Behind a reverse proxy every request comes from the
    /// proxy's address: raise it to --max-connections there.
    #[arg(
        long,
        env = "FHIRHOSE_MAX_CONNECTIONS_PER_ADDRESS",
        default_value_t = 256
    )]
    pub max_connections_per_address: usize,
    /// Requests in progress at once (from arrival to the end of the response body), over every
    /// connection; one client address may have the share of it that
    /// --max-connections-per-address is of --max-connections. More are answered 503 with
    /// Retry-After at once. Bounds the memory of responses built and waiting for slow readers.
    #[arg(long, env = "FHIRHOSE_MAX_REQUESTS", default_value_t = crate::in_flight::DEFAULT_MAX_REQUESTS)]
    pub max_requests: usize,
    /// Downloads of export files in progress at once, counted apart from --max-requests (so
    /// that many parallel downloaders do not make every other request 503); one client
    /// address may have the same share of it. More are answered 503 with Retry-After at once.
    #[arg(long, env = "FHIRHOSE_MAX_DOWNLOADS", default_value_t = crate::in_flight::DEFAULT_MAX_DOWNLOADS)]
    pub max_downloads: usize,
    /// Seconds a graceful shutdown (SIGTERM, Ctrl-C) waits for open requests and running export
    /// work items to finish; items still running are then given back to resume at the next
    /// start.
    #[arg(long, env = "FHIRHOSE_SHUTDOWN_TIMEOUT", default_value_t = 30)]
    pub shutdown_timeout: u64,
    /// Seconds a request waits for the database (a read, a write, a search, an export's
    /// kick-off or status) before it answers 503 with Retry-After, when the database stops
    /// answering without closing its connections (a paused host, a storage stall, a network
    /// dropping packets). A write that had not begun its commit by then is rolled back when the
    /// database answers again (nothing written); one whose commit had begun is answered 504
    /// (its outcome is the database's). At least --search-timeout. Default: 60, or twice
    /// --search-timeout when that is longer.
    #[arg(long, env = "FHIRHOSE_DATABASE_WAIT")]
    pub database_wait: Option<u64>,
    #[command(flatten)]
    pub export: ExportOptions,
    #[command(flatten)]
    pub search: SearchOptions,
}

/// Bounds on one search request (each beyond its bound: 400 `too-costly` naming the parameter).
#[derive(Debug, Clone, Args)]
pub struct SearchOptions {
    /// Seconds a search may run; then it is stopped and answers 503 (`timeout`).
    #[arg(long, env = "FHIRHOSE_SEARCH_TIMEOUT", default_value_t = search::SearchLimits::default().timeout.as_secs())]
    pub search_timeout: u64,
    /// Search parameters in one request.
    #[arg(long, env = "FHIRHOSE_SEARCH_MAX_PARAMS", default_value_t = search::SearchLimits::default().max_params)]
    pub search_max_params: usize,
    /// Bytes of one search parameter (name and value).
    #[arg(long, env = "FHIRHOSE_SEARCH_MAX_VALUE_BYTES", default_value_t = search::SearchLimits::default().max_value_bytes)]
    pub search_max_value_bytes: usize,
    /// Bytes of all search parameters of a request together.
    #[arg(long, env = "FHIRHOSE_SEARCH_MAX_QUERY_BYTES", default_value_t = search::SearchLimits::default().max_query_bytes)]
    pub search_max_query_bytes: usize,
    /// Values in one search request (each item of a comma-separated OR list counts).
    #[arg(long, env = "FHIRHOSE_SEARCH_MAX_VALUES", default_value_t = search::SearchLimits::default().max_values)]
    pub search_max_values: usize,
    /// `_sort` keys.
    #[arg(long, env = "FHIRHOSE_SEARCH_MAX_SORT_KEYS", default_value_t = search::SearchLimits::default().max_sort_keys)]
    pub search_max_sort_keys: usize,
    /// `_include` and `_revinclude` parameters of one search together.
    #[arg(long, env = "FHIRHOSE_SEARCH_MAX_INCLUDES", default_value_t = search::SearchLimits::default().max_includes)]
    pub search_max_includes: usize,
    /// Included resources in one page; more are left out with a warning in the Bundle.
    #[arg(long, env = "FHIRHOSE_SEARCH_MAX_INCLUDED", default_value_t = search::SearchLimits::default().max_included)]
    pub search_max_included: usize,
    /// Bytes of stored resources in one search page, matches and included ones together; the
    /// page ends early (with a next link), and includes beyond it are left out with a warning.
    /// Also the bytes the read entries of one batch or transaction return together (later
    /// reads are answered 400 too-costly in their entries).
    #[arg(long, env = "FHIRHOSE_SEARCH_MAX_PAGE_BYTES", default_value_t = search::SearchLimits::default().max_page_bytes)]
    pub search_max_page_bytes: usize,
}

impl Default for SearchOptions {
    fn default() -> Self {
        let d = search::SearchLimits::default();
        SearchOptions {
            search_timeout: d.timeout.as_secs(),
            search_max_params: d.max_params,
            search_max_value_bytes: d.max_value_bytes,
            search_max_query_bytes: d.max_query_bytes,
            search_max_values: d.max_values,
            search_max_sort_keys: d.max_sort_keys,
            search_max_includes: d.max_includes,
            search_max_included: d.max_included,
            search_max_page_bytes: d.max_page_bytes,
        }
    }
}

impl SearchOptions {
    /// The limits the search handler applies.
    pub fn limits(&self) -> search::SearchLimits {
        search::SearchLimits {
            max_params: self.search_max_params,
            max_value_bytes: self.search_max_value_bytes,
            max_query_bytes: self.search_max_query_bytes,
            max_values: self.search_max_values,
            max_sort_keys: self.search_max_sort_keys,
            max_includes: self.search_max_includes,
            max_included: self.search_max_included,
            max_page_bytes: self.search_max_page_bytes,
            timeout: std::time::Duration::from_secs(self.search_timeout),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.search_timeout == 0
            || self.search_max_params == 0
            || self.search_max_value_bytes == 0
            || self.search_max_query_bytes == 0
            || self.search_max_values == 0
        {
            return Err(ConfigError::Search(
                "--search-timeout, --search-max-params, --search-max-value-bytes, --search-max-query-bytes and --search-max-values must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// `$export` options.
#[derive(Debug, Clone, Args)]
pub struct ExportOptions {
    /// Export worker threads in this process (default: the number of cores, at least 2).
    #[arg(long, env = "FHIRHOSE_EXPORT_WORKERS")]
    pub export_workers: Option<usize>,
    /// Resources per NDJSON file before it is rolled to the next number.
    #[arg(long, env = "FHIRHOSE_EXPORT_FILE_RESOURCES", default_value_t = export::defaults::FILE_MAX_RESOURCES)]
    pub export_file_resources: u64,
    /// Megabytes per NDJSON file before it is rolled (whichever limit comes first).
    #[arg(long, env = "FHIRHOSE_EXPORT_FILE_MB", default_value_t = export::defaults::FILE_MAX_MB)]
    pub export_file_mb: u64,
    /// Store export files gzip-compressed (`.ndjson.gz`; the manifest says so) unless the
    /// kick-off says `_compression=none`.
    #[arg(long, env = "FHIRHOSE_EXPORT_GZIP")]
    pub export_gzip: bool,
    /// Resources per work item: an export is split into items of about this size, which the
    /// workers share.
    #[arg(
        long,
        env = "FHIRHOSE_EXPORT_ITEM_RESOURCES",
        default_value_t = export::defaults::ITEM_RESOURCES
    )]
    pub export_item_resources: u64,
    /// Exports queued or running at once; more kick-offs get 429.
    #[arg(long, env = "FHIRHOSE_EXPORT_MAX_CONCURRENT", default_value_t = export::defaults::MAX_CONCURRENT)]
    pub export_max_concurrent: u64,
    /// Exports and imports queued or running at once of one SMART client (default: half of
    /// `--export-max-concurrent`, at least 1); more kick-offs of that client get 429, so that
    /// one client cannot take every slot. Without authentication (`--auth none`) every caller is
    /// the same principal and only `--export-max-concurrent` applies.
    #[arg(long, env = "FHIRHOSE_EXPORT_MAX_PER_CLIENT")]
    pub export_max_per_client: Option<u64>,
    /// Seconds without a heartbeat after which a running work item is taken over (by any node
    /// sharing the database); items heartbeat every quarter of it, at most every 10 s.
    #[arg(long, env = "FHIRHOSE_EXPORT_HEARTBEAT_TIMEOUT", default_value_t = export::defaults::HEARTBEAT_TIMEOUT_SECS)]
    pub export_heartbeat_timeout: u64,
    /// Seconds an idle export worker waits before it looks at the job queue again unwoken. A
    /// kick-off or a release wakes the workers of its own process at once, and on PostgreSQL
    /// those of every node (LISTEN/NOTIFY); this poll is the fallback.
    #[arg(long, env = "FHIRHOSE_EXPORT_POLL_INTERVAL", default_value_t = export::defaults::POLL_SECS)]
    pub export_poll_interval: u64,
    /// This node's id among the `serve` processes sharing one PostgreSQL database (letters,
    /// digits, `.`, `_`, `-`; at most 64), unique and stable across restarts: export leases are
    /// owned by `<node id>/<incarnation>`, and a restarted node releases its previous
    /// incarnation's leases at once. Without it the id kept in the data directory's `node-id`
    /// file (written at the first start, locked while the node runs) is used; if another
    /// running process holds that file, a random id, whose dead leases are taken over only after
    /// the heartbeat timeout.
    #[arg(long, env = "FHIRHOSE_NODE_ID")]
    pub node_id: Option<String>,
    /// Attempts per export work item (a transient failure, or a server that stopped while it
    /// ran, uses one; back-off 2 s, 4 s, … ≤ 60 s between them); then the export fails.
    #[arg(long, env = "FHIRHOSE_EXPORT_MAX_ATTEMPTS", default_value_t = export::defaults::MAX_ATTEMPTS)]
    pub export_max_attempts: i64,
    /// Seconds an export may wait for space at a full local destination (ENOSPC, EDQUOT): its
    /// work is given back without spending an attempt and tried again after 5 s, then after
    /// the time waited so far (at most 60 s), its status saying `waiting for space at the
    /// destination`; once it has waited this long it fails with 507 and its files are removed.
    /// 0: it fails at once.
    #[arg(long, env = "FHIRHOSE_EXPORT_FULL_WAIT", default_value_t = export::defaults::FULL_WAIT_SECS)]
    pub export_full_wait: u64,
    /// Seconds a complete export's files are kept; then they are removed and its status URL
    /// answers 410.
    #[arg(long, env = "FHIRHOSE_EXPORT_RETENTION", default_value_t = export::defaults::RETENTION_SECS)]
    pub export_retention: u64,
    /// Deepest nesting of Groups a Group-level export follows (deeper: that export fails).
    #[arg(long, env = "FHIRHOSE_EXPORT_GROUP_MAX_DEPTH", default_value_t = export::defaults::GROUP_MAX_DEPTH)]
    pub export_group_max_depth: usize,
    /// Most member entries (over all nested Groups) a Group-level export resolves (more: that
    /// export fails).
    #[arg(
        long,
        env = "FHIRHOSE_EXPORT_GROUP_MAX_MEMBERS",
        default_value_t = export::defaults::GROUP_MAX_MEMBERS
    )]
    pub export_group_max_members: usize,
    /// Container used when a kick-off has no `_container`.
    #[arg(long, env = "FHIRHOSE_EXPORT_CONTAINER", default_value = export::defaults::CONTAINER)]
    pub export_container: String,
    /// The container of the storage `$import` reads its inputs from (no other object may be
    /// named; exports may not write into it). Not `--export-container`.
    #[arg(long, env = "FHIRHOSE_IMPORT_CONTAINER", default_value = export::defaults::IMPORT_CONTAINER)]
    pub import_container: String,
    /// Where export files go: `local` (`<data-dir>/storage/<container>/`), `azure` (Blob /
    /// ADLS Gen2) or `s3` (an S3-compatible store). When several nodes share one PostgreSQL
    /// database, `local` must be shared storage (the same folder mounted at every node's
    /// `<data-dir>/storage`, e.g. NFS): any node writes an export's parts, any node serves them.
    #[arg(long, env = "FHIRHOSE_EXPORT_DESTINATION", default_value = "local")]
    pub export_destination: String,
    /// Azure: a storage connection string (AccountName + AccountKey or SharedAccessSignature,
    /// optional BlobEndpoint).
    #[arg(long, env = "FHIRHOSE_AZURE_CONNECTION_STRING", hide_env_values = true)]
    pub azure_connection_string: Option<String>,
    /// Azure: the storage account (without a connection string).
    #[arg(long, env = "FHIRHOSE_AZURE_ACCOUNT")]
    pub azure_account: Option<String>,
    /// Azure: the account key.
    #[arg(long, env = "FHIRHOSE_AZURE_ACCOUNT_KEY", hide_env_values = true)]
    pub azure_account_key: Option<String>,
    /// Azure: a SAS token (instead of the key).
    #[arg(long, env = "FHIRHOSE_AZURE_SAS", hide_env_values = true)]
    pub azure_sas: Option<String>,
    /// Azure: the blob endpoint (default `https://ACCOUNT.blob.core.windows.net`).
    #[arg(long, env = "FHIRHOSE_AZURE_ENDPOINT")]
    pub azure_endpoint: Option<String>,
    /// S3: the bucket (containers are top-level prefixes in it).
    #[arg(long, env = "FHIRHOSE_S3_BUCKET")]
    pub s3_bucket: Option<String>,
    /// S3: the region.
    #[arg(long, env = "FHIRHOSE_S3_REGION", default_value = "us-east-1")]
    pub s3_region: String,
    /// S3: the endpoint of an S3-compatible store (default AWS).
    #[arg(long, env = "FHIRHOSE_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// S3: the access key id.
    #[arg(long, env = "FHIRHOSE_S3_ACCESS_KEY_ID")]
    pub s3_access_key_id: Option<String>,
    /// S3: the secret access key.
    #[arg(long, env = "FHIRHOSE_S3_SECRET_ACCESS_KEY", hide_env_values = true)]
    pub s3_secret_access_key: Option<String>,
    /// Container registries `_anonymizationConfigCollectionReference` may name, comma-separated:
    /// `host[:port]`, `host[:port]/repository` or `host[:port]/repository@sha256:…`. Empty: none.
    #[arg(long, env = "FHIRHOSE_ANONYMIZATION_REGISTRIES", value_delimiter = ',')]
    pub anonymization_registries: Vec<String>,
    /// Registries (`host:port`) reached over plain HTTP rather than HTTPS, comma-separated.
    #[arg(long, env = "FHIRHOSE_REGISTRY_INSECURE_HTTP", value_delimiter = ',')]
    pub registry_insecure_http: Vec<String>,
    /// Registry user name (Basic or token authentication).
    #[arg(long, env = "FHIRHOSE_REGISTRY_USERNAME")]
    pub registry_username: Option<String>,
    /// Registry password or token.
    #[arg(long, env = "FHIRHOSE_REGISTRY_PASSWORD", hide_env_values = true)]
    pub registry_password: Option<String>,
    /// Seconds one configuration pull may take.
    #[arg(long, env = "FHIRHOSE_REGISTRY_TIMEOUT", default_value_t = 60)]
    pub registry_timeout: u64,
    /// Hosts besides the registry itself that a pull may be sent to, comma-separated: blob
    /// redirects (a CDN) and token services (`host` any port, `host:port` that one). Empty:
    /// redirects and token services elsewhere fail the pull.
    #[arg(long, env = "FHIRHOSE_REGISTRY_REDIRECT_HOSTS", value_delimiter = ',')]
    pub registry_redirect_hosts: Vec<String>,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            export_workers: None,
            export_file_resources: export::defaults::FILE_MAX_RESOURCES,
            export_file_mb: export::defaults::FILE_MAX_MB,
            export_gzip: false,
            export_item_resources: export::defaults::ITEM_RESOURCES,
            export_max_concurrent: export::defaults::MAX_CONCURRENT,
            export_max_per_client: None,
            export_heartbeat_timeout: export::defaults::HEARTBEAT_TIMEOUT_SECS,
            export_poll_interval: export::defaults::POLL_SECS,
            node_id: None,
            export_max_attempts: export::defaults::MAX_ATTEMPTS,
            export_full_wait: export::defaults::FULL_WAIT_SECS,
            export_retention: export::defaults::RETENTION_SECS,
            export_group_max_depth: export::defaults::GROUP_MAX_DEPTH,
            export_group_max_members: export::defaults::GROUP_MAX_MEMBERS,
            export_container: export::defaults::CONTAINER.into(),
            import_container: export::defaults::IMPORT_CONTAINER.into(),
            export_destination: "local".into(),
            azure_connection_string: None,
            azure_account: None,
            azure_account_key: None,
            azure_sas: None,
            azure_endpoint: None,
            s3_bucket: None,
            s3_region: "us-east-1".into(),
            s3_endpoint: None,
            s3_access_key_id: None,
            s3_secret_access_key: None,
            anonymization_registries: Vec::new(),
            registry_insecure_http: Vec::new(),
            registry_username: None,
            registry_password: None,
            registry_timeout: 60,
            registry_redirect_hosts: Vec::new(),
        }
    }
}

impl ExportOptions {
    /// The object-store destination, when one is configured (`None` for `local`).
    pub fn remote_destination(&self) -> Result<Option<export::RemoteConfig>, ConfigError> {
        let bad = |m: &str| ConfigError::Export(m.to_string());
        match self.export_destination.as_str() {
            "local" => Ok(None),
            "azure" => {
                if let Some(cs) = &self.azure_connection_string {
                    return export::RemoteConfig::azure_from_connection_string(cs)
                        .map(Some)
                        .map_err(|e| {
                            ConfigError::Export(format!("--azure-connection-string: {e}"))
                        });
                }
                let account = self.azure_account.clone().ok_or_else(|| {
                    bad("--export-destination azure needs --azure-connection-string or --azure-account")
                })?;
                if self.azure_account_key.is_none() && self.azure_sas.is_none() {
                    return Err(bad(
                        "--azure-account needs --azure-account-key or --azure-sas",
                    ));
                }
                Ok(Some(export::RemoteConfig::Azure {
                    account,
                    key: self.azure_account_key.clone(),
                    sas: self.azure_sas.clone(),
                    endpoint: self.azure_endpoint.clone(),
                }))
            }
            "s3" => {
                let bucket = self
                    .s3_bucket
                    .clone()
                    .ok_or_else(|| bad("--export-destination s3 needs --s3-bucket"))?;
                Ok(Some(export::RemoteConfig::S3 {
                    bucket,
                    region: self.s3_region.clone(),
                    allow_http: self
                        .s3_endpoint
                        .as_deref()
                        .is_some_and(|e| e.starts_with("http://")),
                    endpoint: self.s3_endpoint.clone(),
                    access_key_id: self.s3_access_key_id.clone(),
                    secret_access_key: self.s3_secret_access_key.clone(),
                }))
            }
            other => Err(ConfigError::Export(format!(
                "--export-destination '{other}' is not one of local, azure, s3"
            ))),
        }
    }

    /// How de-identification configurations are pulled out of OCI images.
    pub fn registry_settings(&self) -> Result<oci_config::OciSettings, ConfigError> {
        let allow = self
            .anonymization_registries
            .iter()
            .map(|e| e.trim())
            .filter(|e| !e.is_empty())
            .map(|e| {
                e.parse().map_err(|err| {
                    ConfigError::Export(format!("--anonymization-registries '{e}': {err}"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if self.registry_timeout == 0 {
            return Err(ConfigError::Export(
                "--registry-timeout must be at least 1 second".into(),
            ));
        }
        Ok(oci_config::OciSettings {
            allow,
            insecure_http: self.registry_insecure_http.clone(),
            username: self.registry_username.clone(),
            password: self.registry_password.clone(),
            timeout: std::time::Duration::from_secs(self.registry_timeout),
            redirect_hosts: self
                .registry_redirect_hosts
                .iter()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
                .collect(),
        })
    }

    /// The export service settings for a data directory (the destination is connected here).
    pub fn export_config(
        &self,
        data_dir: &std::path::Path,
        base_url: String,
    ) -> Result<export::ExportConfig, ConfigError> {
        let mut c = export::ExportConfig::local(data_dir.join("storage"), base_url);
        if let Some(w) = self.export_workers {
            c.workers = w;
        }
        c.run.file_max_resources = self.export_file_resources;
        c.run.file_max_bytes = self.export_file_mb.saturating_mul(1024 * 1024);
        c.run.item_resources = self.export_item_resources;
        c.run.group_max_depth = self.export_group_max_depth;
        c.run.group_max_members = self.export_group_max_members;
        c.max_concurrent = self.export_max_concurrent;
        c.max_per_client = self
            .export_max_per_client
            .unwrap_or(export::defaults::max_per_client(self.export_max_concurrent));
        c.heartbeat_timeout = std::time::Duration::from_secs(self.export_heartbeat_timeout);
        c.run.heartbeat_every = c.run.heartbeat_every.min(c.heartbeat_timeout / 4);
        c.poll = std::time::Duration::from_secs(self.export_poll_interval);
        c.node_id = self.node_id.clone();
        c.max_attempts = self.export_max_attempts;
        c.retention = std::time::Duration::from_secs(self.export_retention);
        c.full_wait = std::time::Duration::from_secs(self.export_full_wait);
        c.default_container = self.export_container.clone();
        c.import_container = self.import_container.clone();
        c.gzip = self.export_gzip;
        if let Some(remote) = self.remote_destination()? {
            let sink = export::ObjectStoreSink::new(remote, export::RemoteSettings::default())
                .map_err(|e| ConfigError::Export(format!("export destination: {e}")))?;
            c.sink = std::sync::Arc::new(sink);
        } else {
            // The local storage root is made here, at start, and never again by a write: a
            // root that vanishes later (an unmounted volume) makes writes wait, not recreate it.
            let root = data_dir.join("storage");
            let sink = export::LocalSink::create_root(&root).map_err(|e| {
                ConfigError::Export(format!("storage folder {}: {e}", root.display()))
            })?;
            c.sink = std::sync::Arc::new(sink);
        }
        let registry = self.registry_settings()?;
        c.image_configs = Some(std::sync::Arc::new(move |image: &str, name: &str| {
            let fetched = oci_config::fetch_file(&registry, image, name)
                .map_err(|e| oci_error(e, image, name))?;
            export::anonymization::from_bytes(
                name,
                fetched.bytes,
                "oci",
                None,
                Some(fetched.image),
                Some(fetched.manifest_digest),
            )
        }));
        Ok(c)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--base-url '{0}' must be an absolute http(s) URL without query or fragment")]
    BaseUrl(String),
    #[error("--max-body-bytes must be at least 1024")]
    BodyLimit,
    #[error("{0}")]
    Export(String),
    #[error("{0}")]
    Auth(String),
    #[error("{0}")]
    Search(String),
    #[error("{0}")]
    Limit(String),
}

/// A registry failure as the kick-off reports it: 400 for what the request got wrong, 503 for
/// a registry that may answer later.
fn oci_error(e: oci_config::OciError, image: &str, name: &str) -> export::AnonymizationError {
    use export::AnonymizationError as A;
    use oci_config::OciError as O;
    match e {
        O::NotAllowed(_) => A::NotAllowed(image.to_string()),
        O::FileNotFound { .. } => A::NotFound(name.to_string()),
        O::FileTooLarge { .. } => A::TooLarge,
        e if e.is_transient() => A::Fetch(e.to_string()),
        e => A::Registry(e.to_string()),
    }
}

/// The longest `--header-read-timeout` and `--send-timeout`, in seconds: a day.
pub const MAX_CONNECTION_TIMEOUT_S: u64 = 86_400;

impl ServeConfig {
    /// `--database-wait`, or its default: [`crate::database_wait::DEFAULT`], or twice
    /// `--search-timeout` when that is longer (a search on an answering database ends by its
    /// own limit first).
    pub fn database_wait(&self) -> std::time::Duration {
        let secs = self.database_wait.unwrap_or_else(|| {
            crate::database_wait::DEFAULT
                .as_secs()
                .max(self.search.search_timeout.saturating_mul(2))
        });
        std::time::Duration::from_secs(secs)
    }

    /// The database `--database` names (SQLite in `--data-dir` by default).
    pub fn database(&self) -> store::Database {
        store::Database::from_flag(self.database.as_ref(), &self.data_dir)
    }

    /// The request-body bytes one client address may hold: the share of `--max-body-memory`
    /// that `--max-connections-per-address` is of `--max-connections` (all of it behind a
    /// proxy, where the two are set equal), and never less than one body of
    /// `--max-body-bytes`.
    pub fn body_memory_per_address(&self) -> usize {
        let share = (self.max_body_memory as u128)
            .saturating_mul(self.max_connections_per_address as u128)
            / (self.max_connections.max(1) as u128);
        usize::try_from(share)
            .unwrap_or(usize::MAX)
            .max(self.max_body_bytes)
            .min(self.max_body_memory)
    }

    /// What one client address may have in progress of a bound of `total` (`--max-requests`,
    /// `--max-downloads`): the share of it that `--max-connections-per-address` is of
    /// `--max-connections` (all of it behind a proxy, where the two are set equal), at least
    /// one.
    pub fn share_per_address(&self, total: usize) -> usize {
        let share = (total as u128).saturating_mul(self.max_connections_per_address as u128)
            / (self.max_connections.max(1) as u128);
        usize::try_from(share)
            .unwrap_or(usize::MAX)
            .clamp(1, total.max(1))
    }

    /// Checks the values that clap cannot check alone.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(b) = &self.base_url {
            let ok = (b.starts_with("http://") || b.starts_with("https://"))
                && !b.contains(['?', '#', ' '])
                && b.len() > "https://".len();
            if !ok {
                return Err(ConfigError::BaseUrl(b.clone()));
            }
        }
        if self.max_body_bytes < 1024 {
            return Err(ConfigError::BodyLimit);
        }
        if self.max_body_memory < self.max_body_bytes {
            return Err(ConfigError::Limit(format!(
                "--max-body-memory ({}) must be at least --max-body-bytes ({})",
                self.max_body_memory, self.max_body_bytes
            )));
        }
        self.request_policy(&self.base_url())?;
        self.search.validate()?;
        if let Some(wait) = self.database_wait
            && wait < self.search.search_timeout
        {
            return Err(ConfigError::Limit(format!(
                "--database-wait ({wait}) must be at least --search-timeout ({})",
                self.search.search_timeout
            )));
        }
        let e = &self.export;
        if e.export_workers == Some(0) {
            return Err(ConfigError::Export(
                "--export-workers must be at least 1".into(),
            ));
        }
        if e.export_file_resources == 0 || e.export_file_mb == 0 || e.export_item_resources == 0 {
            return Err(ConfigError::Export(
                "--export-file-resources, --export-file-mb and --export-item-resources must be at least 1".into(),
            ));
        }
        if self.header_read_timeout == 0
            || self.max_connections == 0
            || self.max_connections_per_address == 0
            || self.max_requests == 0
            || self.max_downloads == 0
            || self.min_body_rate == 0
            || self.send_timeout == 0
        {
            return Err(ConfigError::Export(
                "--header-read-timeout, --max-connections, --max-connections-per-address, \
                 --max-requests, --max-downloads, --min-body-rate and --send-timeout must be at \
                 least 1"
                    .into(),
            ));
        }
        // The connection guards add these to clock readings: a value beyond what a clock can
        // hold (u64::MAX seconds) panicked in every connection's task.
        if self.header_read_timeout > MAX_CONNECTION_TIMEOUT_S
            || self.send_timeout > MAX_CONNECTION_TIMEOUT_S
        {
            return Err(ConfigError::Export(format!(
                "--header-read-timeout and --send-timeout must be at most {MAX_CONNECTION_TIMEOUT_S} seconds (a day)"
            )));
        }
        if !export::request::valid_container(&e.import_container)
            || export::request::RESERVED_CONTAINERS.contains(&e.import_container.as_str())
            || e.import_container == e.export_container
        {
            return Err(ConfigError::Export(format!(
                "--import-container '{}' must be a container name (3-63 lowercase letters, digits and single hyphens) other than --export-container and 'anonymization'",
                e.import_container
            )));
        }
        if e.export_max_per_client == Some(0) {
            return Err(ConfigError::Export(
                "--export-max-per-client must be at least 1".into(),
            ));
        }
        if e.export_max_attempts < 1 || e.export_retention == 0 {
            return Err(ConfigError::Export(
                "--export-max-attempts and --export-retention must be at least 1".into(),
            ));
        }
        if e.export_poll_interval < 1 {
            return Err(ConfigError::Export(
                "--export-poll-interval must be at least 1 second".into(),
            ));
        }
        if e.export_heartbeat_timeout < 5 {
            return Err(ConfigError::Export(
                "--export-heartbeat-timeout must be at least 5 seconds".into(),
            ));
        }
        if let Some(id) = &e.node_id
            && !valid_node_id(id)
        {
            return Err(ConfigError::Export(format!(
                "--node-id '{id}' must be 1-64 letters, digits, '.', '_' or '-'"
            )));
        }
        e.remote_destination()?;
        e.registry_settings()?;
        if !export::request::valid_container(&e.export_container) {
            return Err(ConfigError::Export(format!(
                "--export-container '{}' is not a valid container name (3-63 lowercase letters, digits and single hyphens)",
                e.export_container
            )));
        }
        Ok(())
    }

    /// The request rules of `--max-bundle-entries` and `--allowed-hosts` (the Host check is on
    /// with `--auth none`, or when `--allowed-hosts` is given).
    pub fn request_policy(
        &self,
        base_url: &str,
    ) -> Result<crate::negotiate::RequestPolicy, ConfigError> {
        if self.max_bundle_entries == 0 {
            return Err(ConfigError::Limit(
                "--max-bundle-entries must be at least 1".into(),
            ));
        }
        let mut p = crate::negotiate::RequestPolicy::new(
            base_url,
            self.auth.trim().eq_ignore_ascii_case("none"),
            Some(&self.data_dir),
        );
        p.max_bundle_entries = self.max_bundle_entries;
        let mut extra = self.allowed_hosts.clone();
        if (!self.allowed_hosts.is_empty() || p.allowed_hosts.is_some())
            && !self.listen.ip().is_unspecified()
        {
            extra.push(self.listen.to_string());
        }
        p.allow_hosts(base_url, &extra)
            .map_err(ConfigError::Limit)?;
        Ok(p)
    }

    /// The base URL without a trailing slash.
    pub fn base_url(&self) -> String {
        match &self.base_url {
            Some(b) => b.trim_end_matches('/').to_string(),
            None => {
                let addr = self.listen;
                // An unspecified address is not reachable as such: name the loopback instead.
                let host = if addr.ip().is_unspecified() {
                    "127.0.0.1".to_string()
                } else if addr.is_ipv6() {
                    format!("[{}]", addr.ip())
                } else {
                    addr.ip().to_string()
                };
                format!("http://{host}:{}", addr.port())
            }
        }
    }
}

/// A node id (`--node-id`, or the data directory's `node-id` file): 1-64 letters, digits, `.`,
/// `_` or `-` (the lease owner `<node id>/<incarnation>` is split at the `/`).
pub fn valid_node_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn connection_timeouts_beyond_a_day_are_refused_at_start() {
        let serve = |args: &[&str]| Cli::parse_from([&["serve"], args].concat()).serve;
        assert!(serve(&[]).validate().is_ok());
        assert!(serve(&["--send-timeout", "86400"]).validate().is_ok());
        for flag in ["--send-timeout", "--header-read-timeout"] {
            let e = serve(&[flag, "18446744073709551615"])
                .validate()
                .expect_err(flag)
                .to_string();
            assert!(e.contains(flag) && e.contains("at most 86400"), "{e}");
        }
    }

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeConfig,
    }

    #[test]
    fn a_client_address_holds_its_connections_share_of_the_body_memory() {
        let serve = |args: &[&str]| Cli::parse_from([&["serve"], args].concat()).serve;
        // 256 of 1,024 connections: a quarter of 256 MiB is below one 100 MiB body.
        assert_eq!(serve(&[]).body_memory_per_address(), 100 * 1024 * 1024);
        let c = serve(&["--max-body-memory", "1000000", "--max-body-bytes", "1024"]);
        assert_eq!(c.body_memory_per_address(), 250_000);
        // Behind a proxy the two connection limits are equal: all of it.
        let c = serve(&[
            "--max-body-memory",
            "1000000",
            "--max-connections-per-address",
            "1024",
        ]);
        assert_eq!(c.body_memory_per_address(), 1_000_000);
    }

    #[test]
    fn a_client_address_holds_its_connections_share_of_the_requests() {
        let serve = |args: &[&str]| Cli::parse_from([&["serve"], args].concat()).serve;
        // 256 of 1,024 connections: a quarter of 128 requests and of 64 downloads.
        let c = serve(&[]);
        assert_eq!(c.share_per_address(c.max_requests), 32);
        assert_eq!(c.share_per_address(c.max_downloads), 16);
        let c = serve(&["--max-requests", "2"]);
        assert_eq!(c.share_per_address(c.max_requests), 1);
        let c = serve(&[
            "--max-requests",
            "10",
            "--max-connections-per-address",
            "1024",
        ]);
        assert_eq!(c.share_per_address(c.max_requests), 10);
        assert!(serve(&["--max-downloads", "0"]).validate().is_err());
    }

    /// The flags' defaults and the structs' `Default`s are the same values (both read
    /// `export::defaults` and `search::SearchLimits::default()`), so tests that build options in
    /// code run what `fhirhose serve` runs. (Skipped when the environment sets a flag's variable.)
    #[test]
    fn flag_defaults_are_the_default_settings() {
        if std::env::vars().any(|(k, _)| {
            (k.starts_with("FHIRHOSE_EXPORT_") || k.starts_with("FHIRHOSE_SEARCH_"))
                && !k.starts_with("FHIRHOSE_TEST_")
        }) {
            return;
        }
        let parsed = Cli::parse_from(["serve"]).serve;
        let (e, d) = (parsed.export, ExportOptions::default());
        assert_eq!(e.export_file_resources, d.export_file_resources);
        assert_eq!(e.export_file_mb, d.export_file_mb);
        assert_eq!(e.export_item_resources, d.export_item_resources);
        assert_eq!(e.export_max_concurrent, d.export_max_concurrent);
        assert_eq!(e.export_max_per_client, d.export_max_per_client);
        assert_eq!(e.export_heartbeat_timeout, d.export_heartbeat_timeout);
        assert_eq!(e.export_poll_interval, d.export_poll_interval);
        assert_eq!(e.export_max_attempts, d.export_max_attempts);
        assert_eq!(e.export_retention, d.export_retention);
        assert_eq!(e.export_full_wait, d.export_full_wait);
        assert_eq!(e.export_group_max_depth, d.export_group_max_depth);
        assert_eq!(e.export_group_max_members, d.export_group_max_members);
        assert_eq!(e.export_container, d.export_container);
        assert_eq!(e.import_container, d.import_container);
        let run = export::RunSettings::default();
        assert_eq!(e.export_file_resources, run.file_max_resources);
        assert_eq!(e.export_file_mb * 1024 * 1024, run.file_max_bytes);
        let (s, d) = (parsed.search.limits(), search::SearchLimits::default());
        assert_eq!(s.max_params, d.max_params);
        assert_eq!(s.max_value_bytes, d.max_value_bytes);
        assert_eq!(s.max_query_bytes, d.max_query_bytes);
        assert_eq!(s.max_values, d.max_values);
        assert_eq!(s.max_sort_keys, d.max_sort_keys);
        assert_eq!(s.max_includes, d.max_includes);
        assert_eq!(s.max_included, d.max_included);
        assert_eq!(s.max_page_bytes, d.max_page_bytes);
        assert_eq!(s.timeout, d.timeout);
    }

    #[test]
    fn the_database_wait_outlasts_the_search_time_limit() {
        let serve = |args: &[&str]| Cli::parse_from([&["serve"], args].concat()).serve;
        let secs = |c: ServeConfig| c.database_wait().as_secs();
        assert_eq!(secs(serve(&[])), 60);
        assert_eq!(secs(serve(&["--search-timeout", "100"])), 200);
        assert_eq!(secs(serve(&["--database-wait", "45"])), 45);
        assert!(serve(&["--database-wait", "10"]).validate().is_err());
        assert!(
            serve(&["--database-wait", "10", "--search-timeout", "5"])
                .validate()
                .is_ok()
        );
    }
}
