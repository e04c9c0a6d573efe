//! Scaffolding shared by the server's HTTP tests: a real server on a socket over a loaded store,
//! the `$export` client flow, and the external components `scripts/test.sh` starts.
#![allow(dead_code)] // each test file uses a part

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

/// The 100-patient Synthea set (gzipped Bundles), and an external component's address (the
/// test is skipped without it, unless `FHIRHOSE_REQUIRE_EXTERNAL=1`): the `test-support`
/// crate's.
#[allow(unused_imports)]
pub use test_support::external::external;
#[allow(unused_imports)]
pub use test_support::synthea_100 as synthea;

/// A server on 127.0.0.1 over a fresh store (SQLite, or PostgreSQL with
/// `FHIRHOSE_TEST_DATABASE`: [`store::testing`]) and a fresh directory for its storage containers.
pub struct Server {
    pub base: String,
    pub c: reqwest::Client,
    pub dir: tempfile::TempDir,
    /// The store and what keeps its database alive.
    pub db: store::testing::TestStore,
}

/// A fresh store with search indexing, on the backend `FHIRHOSE_TEST_DATABASE` selects. Call it
/// off the async workers (PostgreSQL's client blocks): in `spawn_blocking`.
pub fn test_store() -> store::testing::TestStore {
    store::testing::test_store(Some(Arc::new(search::SearchIndexer)))
}

/// [`test_store`] from an async test (created off the async workers).
pub async fn test_store_async() -> store::testing::TestStore {
    tokio::task::spawn_blocking(test_store).await.unwrap()
}

/// [`server::AppState::new`] built off the async workers: the export service's start-up calls
/// the store, and PostgreSQL's client blocks.
pub async fn app_state(
    store: Arc<dyn store::Store>,
    base: &str,
    auth: auth::Auth,
    max_body_bytes: usize,
    data_dir: &std::path::Path,
) -> server::AppState {
    let (base, data_dir) = (base.to_string(), data_dir.to_path_buf());
    tokio::task::spawn_blocking(move || {
        server::AppState::new(store, base, auth, max_body_bytes, &data_dir).unwrap()
    })
    .await
    .unwrap()
}

/// Runs `f` (which calls the store) off the async workers and returns its result.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// Loads `paths` into a fresh data directory and serves it with these export options.
pub async fn start(paths: &[PathBuf], options: server::config::ExportOptions) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let export = options.export_config(dir.path(), base.clone()).unwrap();
    let paths = paths.to_vec();
    let url = base.clone();
    let (db, state) = tokio::task::spawn_blocking(move || {
        let db = test_store();
        ingest::load_into_store(
            &*db.store,
            &paths,
            &ingest::LoadOptions::default(),
            &mut |_| {},
        )
        .unwrap();
        let state = server::AppState::with_export(
            db.store.clone(),
            url,
            auth::Auth::none(),
            1 << 20,
            export,
        )
        .unwrap();
        (db, state)
    })
    .await
    .unwrap();
    tokio::spawn(async move { axum::serve(listener, server::router(state)).await.unwrap() });
    Server {
        base,
        c: reqwest::Client::new(),
        dir,
        db,
    }
}

impl Server {
    pub async fn kickoff(&self, path: &str) -> reqwest::Response {
        self.c
            .get(format!("{}{}", self.base, path))
            .header("accept", "application/fhir+json")
            .header("prefer", "respond-async")
            .send()
            .await
            .unwrap()
    }

    /// Kick-off (202 expected), poll to completion, return the manifest.
    pub async fn export(&self, path: &str) -> Value {
        self.export_with_status(path).await.1
    }

    /// [`Server::export`] that also returns the status URL (to cancel or poll again).
    pub async fn export_with_status(&self, path: &str) -> (String, Value) {
        let status_url = self.kickoff_accepted(path).await;
        let manifest = self.wait(&status_url).await;
        (status_url, manifest)
    }

    /// Kick-off that must be accepted (202): its status URL.
    pub async fn kickoff_accepted(&self, path: &str) -> String {
        let r = self.kickoff(path).await;
        assert_eq!(
            r.status(),
            StatusCode::ACCEPTED,
            "{}",
            r.text().await.unwrap()
        );
        r.headers()["content-location"]
            .to_str()
            .unwrap()
            .to_string()
    }

    /// Polls a status URL until the manifest (checking the headers of each answer).
    pub async fn wait(&self, status_url: &str) -> Value {
        for _ in 0..1200 {
            let r = self.c.get(status_url).send().await.unwrap();
            match r.status() {
                StatusCode::OK => {
                    assert!(r.headers().contains_key("expires"));
                    return r.json().await.unwrap();
                }
                StatusCode::ACCEPTED => assert!(r.headers().contains_key("x-progress")),
                StatusCode::TOO_MANY_REQUESTS => assert!(r.headers().contains_key("retry-after")),
                other => panic!("status {other}: {}", r.text().await.unwrap()),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("export did not finish");
    }
}

/// A server with `--auth smart` over a fresh store (SQLite, or PostgreSQL with
/// `FHIRHOSE_TEST_DATABASE`) and a fresh storage directory: each `(client_id, scope)` of its
/// clients is registered with one test key of the auth crate.
pub struct SmartServer {
    pub base: String,
    pub token_url: String,
    /// The clients' key (its public half registered for every client).
    pub key: auth::ClientKey,
    /// The server's authorization (its token issuer, for tokens the endpoint would not give).
    pub auth: auth::Auth,
    pub dir: tempfile::TempDir,
    /// The store and what keeps its database alive.
    pub db: store::testing::TestStore,
}

/// [`SmartServer`] with the key `key_name` (`crates/auth/tests/data`), `clients` and a request
/// body limit of `max_body` bytes.
pub async fn start_smart(key_name: &str, clients: &[(&str, &str)], max_body: usize) -> SmartServer {
    start_smart_with(key_name, clients, max_body, |state| state).await
}

/// [`start_smart`] with the router's state changed by `adjust` first (as `serve` would set it,
/// e.g. the metrics mode).
pub async fn start_smart_with(
    key_name: &str,
    clients: &[(&str, &str)],
    max_body: usize,
    adjust: impl FnOnce(server::AppState) -> server::AppState,
) -> SmartServer {
    let (listener, s) = smart_parts(key_name, &test_support::smart::registrations(clients)).await;
    let state = app_state(
        s.db.store.clone(),
        &s.base,
        s.auth.clone(),
        max_body,
        s.dir.path(),
    )
    .await;
    s.serve(listener, adjust(state))
}

/// [`start_smart`] with export settings changed by `adjust` (e.g. no workers, so that admitted
/// exports stay queued and hold their slots).
pub async fn start_smart_export(
    key_name: &str,
    clients: &[(&str, &str)],
    max_body: usize,
    adjust: impl FnOnce(&mut export::ExportConfig) + Send + 'static,
) -> SmartServer {
    start_smart_registered(
        key_name,
        &test_support::smart::registrations(clients),
        max_body,
        adjust,
    )
    .await
}

/// [`start_smart_export`] with clients given as clients file entries without keys (for fields
/// beside `scope`, such as `key_sets`).
pub async fn start_smart_registered(
    key_name: &str,
    clients: &[Value],
    max_body: usize,
    adjust: impl FnOnce(&mut export::ExportConfig) + Send + 'static,
) -> SmartServer {
    let (listener, s) = smart_parts(key_name, clients).await;
    let mut config = server::config::ExportOptions::default()
        .export_config(s.dir.path(), s.base.clone())
        .unwrap();
    adjust(&mut config);
    let (store, url, a) = (s.db.store.clone(), s.base.clone(), s.auth.clone());
    let state =
        blocking(move || server::AppState::with_export(store, url, a, max_body, config).unwrap())
            .await;
    s.serve(listener, state)
}

/// A [`SmartServer`] not serving yet: its folder, store, key and clients, and the listener its
/// base URL names.
async fn smart_parts(key_name: &str, clients: &[Value]) -> (tokio::net::TcpListener, SmartServer) {
    let dir = tempfile::tempdir().unwrap();
    let db = test_store_async().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let token_url = test_support::smart::token_url(&base);
    let key = test_support::smart::test_key(key_name);
    let auth = test_support::smart::auth_registered(&base, &key, clients);
    let server = SmartServer {
        base,
        token_url,
        key,
        auth,
        dir,
        db,
    };
    (listener, server)
}

impl SmartServer {
    /// Serves `state`'s router on `listener` (in the background).
    fn serve(self, listener: tokio::net::TcpListener, state: server::AppState) -> SmartServer {
        let app = server::router(state);
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        self
    }

    /// An access token for `client` with `scope` from this server's token endpoint.
    pub async fn token(&self, client: &str, scope: &str) -> String {
        test_support::smart::token(&self.token_url, client, &self.key, scope).await
    }

    /// PUTs `resource` at its own type and id with `token`; asserts success.
    pub async fn put(&self, token: &str, resource: Value) {
        let path = format!(
            "/{}/{}",
            resource["resourceType"].as_str().unwrap(),
            resource["id"].as_str().unwrap()
        );
        let (st, _, body) = self
            .send(reqwest::Method::PUT, &path, Some(token), Some(resource))
            .await;
        assert!(st.is_success(), "{path}: {body}");
    }

    /// A request as a SMART client sends it ([`test_support::smart::send`]): the status, the
    /// headers and the body as text.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, reqwest::header::HeaderMap, String) {
        test_support::smart::send(&self.base, method, path, token, body).await
    }

    /// Polls a status URL with `token` until the export completes; returns the manifest.
    pub async fn manifest(&self, status_url: &str, token: &str) -> Value {
        for _ in 0..600 {
            let (st, _, body) = self
                .send(reqwest::Method::GET, status_url, Some(token), None)
                .await;
            match st {
                StatusCode::OK => return serde_json::from_str(&body).unwrap(),
                StatusCode::ACCEPTED | StatusCode::TOO_MANY_REQUESTS => {
                    tokio::time::sleep(Duration::from_millis(150)).await
                }
                other => panic!("status {other}: {body}"),
            }
        }
        panic!("the export did not complete");
    }
}
