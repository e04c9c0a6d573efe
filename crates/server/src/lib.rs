//! The Fhirhose FHIR R4 REST API.
//!
//! - [`config`]: `fhirhose serve` options ([`ServeConfig`]).
//! - [`error`]: [`ApiError`], the one mapping of every error to an HTTP status and an
//!   OperationOutcome.
//! - [`routes`]: the handlers (CRUD, history, search, batch/transaction, metadata).
//! - [`capability`]: the CapabilityStatement, generated from what is implemented.
//! - [`negotiate`]: content negotiation (JSON only), body parsing.
//! - [`chunks`]: the body of a Bundle written around stored resources (search, history).
//!
//! Architecture Invariant: handlers never block the async runtime: every store call runs in
//! `spawn_blocking`. Stored resources are served as the stored bytes, without re-serialisation,
//! alone and inside the search and history Bundles.

pub mod body_budget;
pub mod capability;
pub mod chunks;
pub mod config;
pub mod database_wait;
pub mod error;
pub mod export_routes;
pub mod in_flight;
pub mod metrics;
pub mod negotiate;
pub mod node_id;
pub mod parse_errors;
pub mod per_address;
pub mod ranges;
pub mod routes;
pub mod slow_clients;
pub mod status_page;
pub mod view_routes;

use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use store::{SqliteStore, Store};

pub use config::{LogFormat, ServeConfig};
pub use error::ApiError;

/// The largest header list an HTTP/2 request may have (SETTINGS_MAX_HEADER_LIST_SIZE: the
/// decoded names and values, 32 bytes more per field). hyper's default of 16 KiB answered a
/// longer `:path` with a bare 431 that HTTP/1.1 takes (its request line may have 64 KiB); at
/// 96 KiB the request reaches the server's own checks, which answer a too-long search with an
/// OperationOutcome. Longer lists still get h2's bare 431.
pub const HTTP2_MAX_HEADER_LIST: u32 = 96 * 1024;

/// FHIR JSON media type.
pub const FHIR_JSON: &str = "application/fhir+json";

/// Everything handlers share. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    /// Base URL without a trailing slash.
    pub base_url: Arc<str>,
    pub auth: auth::Auth,
    pub max_body_bytes: usize,
    /// The request bodies held in memory at once (`--max-body-memory`, [`body_budget`]).
    pub body_budget: body_budget::BodyBudget,
    /// The requests in progress at once (`--max-requests`, [`in_flight`]).
    pub in_flight: Arc<in_flight::InFlight>,
    /// The downloads of export files in progress at once (`--max-downloads`, [`in_flight`]).
    pub downloads_in_flight: Arc<in_flight::InFlight>,
    pub export: Arc<export::ExportService>,
    /// Bounds on search requests and their time limit (`--search-*`).
    pub search_limits: search::SearchLimits,
    /// How long a request waits for its store work before it answers 503
    /// (`--database-wait`, [`database_wait`]).
    pub database_wait: std::time::Duration,
    /// Host check, Bundle entry limit, paths kept out of error answers ([`negotiate`]).
    pub policy: Arc<negotiate::RequestPolicy>,
    /// Request counters and latencies for `GET /metrics` ([`metrics`]).
    pub metrics: Arc<metrics::Metrics>,
    /// Who may read `GET /metrics` (`--metrics`).
    pub metrics_mode: metrics::MetricsMode,
}

impl AppState {
    /// The state of a server over `store` (its export jobs in the store's queue), with the local
    /// storage containers in `data_dir` (`storage/`).
    pub fn new(
        store: Arc<dyn Store>,
        base_url: impl Into<String>,
        auth: auth::Auth,
        max_body_bytes: usize,
        data_dir: &std::path::Path,
    ) -> Result<AppState, export::ExportError> {
        let base_url: String = base_url.into();
        let config = config::ExportOptions::default()
            .export_config(data_dir, base_url.clone())
            .map_err(|e| export::ExportError::Settings(Box::new(e)))?;
        let state = AppState::with_export(store, base_url.clone(), auth, max_body_bytes, config)?;
        let policy = negotiate::RequestPolicy::new(
            &base_url,
            !state.auth.requires_access_token(),
            Some(data_dir),
        );
        Ok(AppState {
            policy: Arc::new(policy),
            ..state
        })
    }

    /// The state of a server with the given export settings, its export workers running.
    pub fn with_export(
        store: Arc<dyn Store>,
        base_url: impl Into<String>,
        auth: auth::Auth,
        max_body_bytes: usize,
        export_config: export::ExportConfig,
    ) -> Result<AppState, export::ExportError> {
        let state =
            AppState::with_export_idle(store, base_url, auth, max_body_bytes, export_config)?;
        state.export.start_workers()?;
        Ok(state)
    }

    /// [`AppState::with_export`] without starting the export workers: `serve` starts them last
    /// ([`export::ExportService::start_workers`]), once its port is bound.
    pub fn with_export_idle(
        store: Arc<dyn Store>,
        base_url: impl Into<String>,
        auth: auth::Auth,
        max_body_bytes: usize,
        mut export_config: export::ExportConfig,
    ) -> Result<AppState, export::ExportError> {
        let base_url: String = base_url.into();
        export_config.base_url = base_url.clone();
        export_config.requires_access_token = auth.requires_access_token();
        let policy = negotiate::RequestPolicy::new(&base_url, !auth.requires_access_token(), None);
        let export = export::ExportService::open(store.clone(), export_config)?;
        Ok(AppState {
            store,
            base_url: base_url.into(),
            auth,
            max_body_bytes,
            body_budget: body_budget::BodyBudget::new(
                body_budget::DEFAULT_MAX_BODY_MEMORY.max(max_body_bytes),
            )
            .with_body_limit(max_body_bytes),
            in_flight: in_flight::InFlight::new(
                in_flight::DEFAULT_MAX_REQUESTS,
                in_flight::DEFAULT_MAX_REQUESTS / 4,
            ),
            downloads_in_flight: in_flight::InFlight::of(
                in_flight::Pool::Downloads,
                in_flight::DEFAULT_MAX_DOWNLOADS,
                in_flight::DEFAULT_MAX_DOWNLOADS / 4,
            ),
            export,
            search_limits: search::SearchLimits::default(),
            database_wait: database_wait::DEFAULT,
            policy: Arc::new(policy),
            metrics: Arc::new(metrics::Metrics::default()),
            metrics_mode: metrics::MetricsMode::Open,
        })
    }
}

/// A JSON value as an `application/fhir+json` response body.
pub fn fhir_json(v: &serde_json::Value) -> Response {
    fhir_bytes(v.to_string().into_bytes())
}

/// Stored JSON bytes as an `application/fhir+json` response body.
pub fn fhir_bytes(bytes: Vec<u8>) -> Response {
    fhir_json_type(bytes.into_response())
}

/// `r` with the `application/fhir+json` content type of every FHIR JSON answer.
pub fn fhir_json_type(mut r: Response) -> Response {
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/fhir+json; charset=utf-8"),
    );
    r
}

/// The application: routes, negotiation, authorization, body limit, tracing, compression and a
/// panic backstop that still answers with an OperationOutcome.
pub fn router(state: AppState) -> Router {
    routes::router(state)
}

/// Errors that stop `serve` from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("invalid configuration: {0}")]
    Config(#[from] config::ConfigError),
    #[error("invalid authorization configuration: {0}")]
    Auth(#[from] auth::ConfigError),
    /// The store cannot be opened (`database` as [`store::Database::describe`] says it, without
    /// credentials).
    #[error("cannot open the store ({database}): {source}")]
    Store {
        database: String,
        #[source]
        source: store::StoreError,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("server error: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot open the export job table: {0}")]
    Export(#[from] export::ExportError),
    /// The signing key the nodes sharing the database share could not be read or made.
    #[error("{0}")]
    SharedAuth(#[from] auth::SharedStateError),
}

/// The auth layer's state over the store's: the accepted client assertions its database records
/// ([`store::AssertionRecord`]: SQLite's `exports.db`, or a database several nodes share) and,
/// over [`store::SharedState`], the token signing key the nodes sharing the database share.
struct OnStore<T: ?Sized>(Arc<T>);

impl<T: store::AssertionRecord + ?Sized> auth::ReplayRecord for OnStore<T> {
    fn remember_once(
        &self,
        iss: &str,
        jti: &str,
        keep_until: i64,
        now: i64,
    ) -> Result<bool, auth::SharedStateError> {
        self.0
            .remember_once(iss, jti, keep_until, now)
            .map_err(|e| auth::SharedStateError(e.to_string()))
    }
}

impl auth::SharedAuthState for OnStore<dyn store::SharedState> {
    fn signing_key(&self, fresh: &[u8]) -> Result<Vec<u8>, auth::SharedStateError> {
        self.0
            .secret(auth::shared::SIGNING_KEY_NAME, fresh)
            .map_err(|e| auth::SharedStateError(e.to_string()))
    }
}

/// The authorization layer on `store`: on a database several nodes share, their signing key and
/// replay cache; on one a single process uses, the accepted assertions recorded there, so that
/// one accepted before a restart is refused after it. Blocks on the store.
pub fn auth_on_store(auth: auth::Auth, store: &dyn Store) -> Result<auth::Auth, ServeError> {
    if auth.mode() != auth::AuthMode::Smart {
        return Ok(auth);
    }
    if let Some(shared) = store.shared_state() {
        return Ok(auth.share(Arc::new(OnStore(shared)))?);
    }
    match store.assertion_record() {
        Some(record) => Ok(auth.record_assertions_in(Arc::new(OnStore(record)))?),
        None => Ok(auth),
    }
}

/// Opens the store `database` names ([`store::open`]), writing search index rows or not (a bulk
/// load that indexes later with `fhirhose reindex`).
pub fn open_database(
    database: &store::Database,
    index: bool,
) -> Result<Arc<dyn Store>, store::StoreError> {
    store::open(
        database,
        store::OpenOptions {
            indexer: index.then(|| Arc::new(search::SearchIndexer) as Arc<dyn store::Indexer>),
        },
    )
}

/// Opens the SQLite store of a data directory (taking its lock) with search indexing on.
pub fn open_store(dir: &std::path::Path) -> Result<SqliteStore, store::StoreError> {
    std::fs::create_dir_all(dir).map_err(|source| store::StoreError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let options = store::SqliteOptions {
        indexer: Some(Arc::new(search::SearchIndexer)),
        ..store::SqliteOptions::default()
    };
    SqliteStore::open_data_dir(dir, options)
}

/// Runs the server until Ctrl-C / SIGTERM.
///
/// Order: everything is validated and the port bound before the store is opened and before any
/// export work is claimed (a start that fails uses up no attempt of a work item); export
/// workers start last. On SIGTERM the listener closes, open connections get the drain timeout
/// to finish, and running export items finish or are given back at their committed cursor.
pub async fn serve(config: ServeConfig) -> Result<(), ServeError> {
    config.validate()?;
    let base_url = config.base_url();
    let mode: auth::AuthMode = config.auth.parse()?;
    let mut settings = auth::AuthSettings::new(mode, base_url.clone());
    settings.clients_file = config.clients.clone();
    settings.insecure = config.insecure;
    settings.token_lifetime = std::time::Duration::from_secs(config.token_lifetime);
    settings.token_key_file = config.token_key.clone();
    let auth = auth::Auth::from_settings(&settings, config.listen)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: config.listen,
            source,
        })?;
    let database = config.database();
    // The store's calls block (PostgreSQL's client runs a runtime of its own): off the async
    // workers, like every store call.
    let store =
        tokio::task::block_in_place(|| open_database(&database, true)).map_err(|source| {
            ServeError::Store {
                database: database.describe(),
                source,
            }
        })?;
    // Several nodes on one database: tokens and the replay cache are the cluster's; one
    // process: the replay cache is the database's, so that it outlives a restart.
    let auth = tokio::task::block_in_place(|| auth_on_store(auth, &*store))?;
    if tokio::task::block_in_place(|| store.indexes_stale()).unwrap_or(false) {
        tracing::warn!(
            database = %database.describe(),
            "data was loaded with --no-index: searches miss those resources until `fhirhose reindex`"
        );
    }
    let mut export_config = config
        .export
        .export_config(&config.data_dir, base_url.clone())?;
    export_config.exclusive_queue = database.is_exclusive();
    export_config.type_filter_limits = config.search.limits();
    // On a shared queue without --node-id: the data directory's id, so that a restart releases
    // this node's dead leases at once (see node_id). Held until `serve` returns.
    let _node_id = if export_config.exclusive_queue || export_config.node_id.is_some() {
        None
    } else {
        match node_id::NodeId::acquire(&config.data_dir) {
            Ok(held) => {
                tracing::info!(node_id = held.id(), "node id from the data directory");
                export_config.node_id = Some(held.id().to_string());
                Some(held)
            }
            Err(e) => {
                tracing::warn!(error = %e, "no stable node id: leases of an earlier run of this node are taken over only after the heartbeat timeout (give --node-id)");
                None
            }
        }
    };
    let state = tokio::task::block_in_place(|| {
        AppState::with_export_idle(
            store,
            base_url.clone(),
            auth,
            config.max_body_bytes,
            export_config,
        )
    })?;
    let state = AppState {
        search_limits: config.search.limits(),
        database_wait: config.database_wait(),
        body_budget: body_budget::BodyBudget::new(config.max_body_memory)
            .with_client_share(config.body_memory_per_address())
            .with_body_limit(config.max_body_bytes),
        in_flight: in_flight::InFlight::new(
            config.max_requests,
            config.share_per_address(config.max_requests),
        ),
        downloads_in_flight: in_flight::InFlight::of(
            in_flight::Pool::Downloads,
            config.max_downloads,
            config.share_per_address(config.max_downloads),
        ),
        // `--metrics`, by default open without authorization and protected with it.
        metrics_mode: config
            .metrics
            .unwrap_or(if state.auth.requires_access_token() {
                metrics::MetricsMode::Protected
            } else {
                metrics::MetricsMode::Open
            }),
        ..state
    };
    let state = AppState {
        policy: Arc::new(config.request_policy(&base_url)?),
        ..state
    };
    let export = state.export.clone();
    let app = router(state);
    let limits = ConnectionLimits {
        header_read_timeout: std::time::Duration::from_secs(config.header_read_timeout),
        max_connections: config.max_connections,
        max_connections_per_address: config.max_connections_per_address,
        min_body_rate: config.min_body_rate,
        send_timeout: std::time::Duration::from_secs(config.send_timeout),
    };
    let drain = std::time::Duration::from_secs(config.shutdown_timeout);
    // Last: from here on work items are claimed.
    let resumed = tokio::task::block_in_place(|| {
        export.start_workers()?;
        export.resume()
    })?;
    if resumed > 0 {
        tracing::info!(resumed, "export jobs resumed");
    }
    tracing::info!(listen = %config.listen, base_url = %base_url, data_dir = %config.data_dir.display(), database = %database.describe(), "Fhirhose is serving");
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let drain_exports = tokio::spawn(async move {
        let _ = stopping_rx.await;
        tokio::task::spawn_blocking(move || export.shutdown(drain)).await
    });
    serve_connections(
        listener,
        app,
        limits,
        async move {
            shutdown_signal().await;
            let _ = stopping_tx.send(());
        },
        drain,
    )
    .await?;
    match drain_exports.await {
        Ok(Ok(released)) => tracing::info!(released, "export work drained"),
        _ => tracing::warn!("export drain did not finish"),
    }
    Ok(())
}

/// Limits on the connections `serve` accepts.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// A client must send a request's complete header within this time (slowloris guard); an
    /// idle kept-alive connection is closed after it too.
    pub header_read_timeout: std::time::Duration,
    /// Connections served at once; more wait in the listen backlog until one closes.
    pub max_connections: usize,
    /// Connections served at once from one client address (an IPv4 address, an IPv6 `/64`);
    /// more are answered 503 and closed ([`per_address`]).
    pub max_connections_per_address: usize,
    /// The least average rate of a request body, in bytes a second, after a grace of
    /// `header_read_timeout` ([`slow_clients::MinRateBody`]); a slower one is answered 408.
    pub min_body_rate: u64,
    /// The longest a response body waits for its client to take the part it handed out last;
    /// past it the connection is closed ([`slow_clients::Busy::stalled_for`]).
    pub send_timeout: std::time::Duration,
}

/// Serves `app` on `listener` (HTTP/1.1 and HTTP/2) under `limits` until `shutdown` completes;
/// then stops accepting and gives open connections up to `drain` to finish their requests.
pub async fn serve_connections(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl std::future::Future<Output = ()>,
    drain: std::time::Duration,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;

    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let per_address = per_address::PerAddress::new(limits.max_connections_per_address);
    let (rate, grace) = (limits.min_body_rate, limits.header_read_timeout);
    let app = app.layer(tower::util::MapRequestLayer::new(
        move |req: axum::extract::Request| slow_clients::min_rate(req, rate, grace),
    ));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(HTTP2_MAX_HEADER_LIST);
    // One builder for every connection task (its settings are read, never changed).
    let builder = Arc::new(builder);
    tokio::pin!(shutdown);
    loop {
        // A permit first: beyond the cap, connections wait in the backlog, unread.
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // E.g. out of file descriptors: wait instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let Some(address_slot) = per_address.take(peer.ip()) else {
            // One client may not hold every slot: this one goes back at once.
            drop(permit);
            per_address.refuse(stream, peer);
            continue;
        };
        let busy = slow_clients::Busy::for_socket(&stream);
        let service = TowerToHyperService::new(slow_clients::Tracked {
            inner: app.clone(),
            busy: busy.clone(),
            mark: per_address::Client(per_address::client_key(peer.ip())),
        });
        let builder = Arc::clone(&builder);
        let watcher = graceful.watcher();
        let first_byte = limits.header_read_timeout;
        let send_timeout = limits.send_timeout;
        tokio::spawn(async move {
            // hyper's header timeout starts with a request's first byte: a connection that
            // sends none would hold its permit for ever.
            if !slow_clients::first_byte(&stream, first_byte).await {
                tracing::debug!(peer = %peer, "connection closed: no request within the header-read timeout");
                drop((permit, address_slot));
                return;
            }
            busy.touch();
            let conn = builder
                .serve_connection_with_upgrades(
                    TokioIo::new(parse_errors::OutcomeOnParseError::new(
                        slow_clients::WriteWatch::new(stream, busy.clone()),
                    )),
                    service,
                )
                .into_owned();
            // A connection with no request in progress for the header-read timeout is closed
            // (HTTP/2 has no such limit of its own).
            tokio::select! {
                ended = watcher.watch(conn) => if let Err(e) = ended {
                    tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
                },
                () = busy.idle_for(first_byte) => {
                    tracing::debug!(peer = %peer, "idle connection closed");
                }
                // A client that does not read its responses would hold their request slots for
                // ever (`slow_clients`).
                () = busy.stalled_for(send_timeout) => {
                    slow_clients::note_stalled(peer, send_timeout);
                }
            }
            drop((permit, address_slot));
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(drain) => {
            tracing::warn!(drain_secs = drain.as_secs(), "connections still open at the drain timeout are closed");
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down");
}
