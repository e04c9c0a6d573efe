//! `fhirhose export` (the Bulk Data client) against the real `fhirhose serve --auth smart`,
//! through a small TCP proxy in front of the server (the server's `--base-url` is the proxy, so
//! the manifest's URLs and the token endpoint go through it too). The proxy can hold the first
//! file request long enough for the access token to expire, cut the next file download after
//! a number of bytes (once), and hold status polls (for Ctrl-C). Test key:
//! crates/auth/tests/data/rsa-a.pem (see PROVENANCE.md there). The bad days of
//! `--partial-manifests` the real server never has (running pages that loop or never end, a
//! file that cannot be served while the export runs, a file listed while running but not at
//! the end) are played by a small hostile server written here ([`Fake`]) in front of the same
//! binary.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use test_support::raw_http;

use common::{fhirhose, free_port};

fn key_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../auth/tests/data/rsa-a.pem")
}

struct Server {
    child: Child,
    direct: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the proxy does and saw.
#[derive(Default)]
struct ProxyState {
    /// Hold the first file request this long before forwarding it (token expiry).
    delay_first_file: Option<Duration>,
    /// Cut the response of the first file request after the delayed one after this many bytes.
    cut_after: Option<u64>,
    /// Never forward status polls (GET /export-status/...).
    hold_status: AtomicBool,
    delayed: AtomicBool,
    cut: AtomicBool,
    saw_range: AtomicBool,
    saw_status_poll: AtomicBool,
    saw_delete: AtomicBool,
    /// Answer every file request with this canned HTTP status (429, 503), not forwarding it.
    refuse_files: std::sync::atomic::AtomicU16,
}

/// A TCP proxy on a new port in front of `upstream`, one thread pair per connection.
fn proxy(port: u16, upstream: u16, state: Arc<ProxyState>) {
    let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind proxy");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(client) = conn else { continue };
            let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                continue;
            };
            let state = state.clone();
            // Bytes of the response after which this connection is cut (armed per request).
            let armed: Arc<Mutex<Option<u64>>> = Arc::default();
            let (mut c_read, mut s_write) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            let (st, arm) = (state.clone(), armed.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match c_read.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let text = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
                    let refuse = st.refuse_files.load(Ordering::SeqCst);
                    if refuse != 0 && text.contains("get /export-files/") {
                        let body = format!(
                            r#"{{"resourceType":"OperationOutcome","issue":[{{"severity":"error","code":"transient","diagnostics":"proxy says {refuse}"}}]}}"#
                        );
                        let answer = format!(
                            "HTTP/1.1 {refuse} Refused\r\nretry-after: 0\r\ncontent-type: application/fhir+json\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if c_read.write_all(answer.as_bytes()).is_err() {
                            break;
                        }
                        continue;
                    }
                    if text.contains("get /export-files/") {
                        if text.contains("\r\nrange: bytes=") {
                            st.saw_range.store(true, Ordering::SeqCst);
                        }
                        if let Some(d) = st.delay_first_file
                            && !st.delayed.swap(true, Ordering::SeqCst)
                        {
                            std::thread::sleep(d);
                        } else if let Some(after) = st.cut_after
                            && !st.cut.swap(true, Ordering::SeqCst)
                        {
                            *arm.lock().unwrap() = Some(after);
                        }
                    }
                    if text.contains("get /export-status/") {
                        st.saw_status_poll.store(true, Ordering::SeqCst);
                        if st.hold_status.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_secs(60));
                            break;
                        }
                    }
                    if text.starts_with("delete /export-status/") {
                        st.saw_delete.store(true, Ordering::SeqCst);
                    }
                    if s_write.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = s_write.shutdown(Shutdown::Write);
            });
            let (mut s_read, mut c_write) = (server, client);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                let mut sent: u64 = 0;
                loop {
                    let n = match s_read.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let limit = *armed.lock().unwrap();
                    if let Some(limit) = limit
                        && sent + n as u64 > limit
                    {
                        // The dropped connection: part of the body, then both ends closed.
                        let _ = c_write.write_all(&buf[..(limit - sent) as usize]);
                        let _ = c_write.shutdown(Shutdown::Both);
                        let _ = s_read.shutdown(Shutdown::Both);
                        return;
                    }
                    if limit.is_some() {
                        sent += n as u64;
                    }
                    if c_write.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = c_write.shutdown(Shutdown::Write);
            });
        }
    });
}

/// Loads `patients` Patients and as many Observations into a new data directory and serves it
/// with `--auth smart` (1 s tokens) at a port whose `--base-url` is `proxy_port`'s.
fn serve_smart(proxy_port: u16, patients: usize) -> Server {
    serve_smart_with(proxy_port, patients, &[])
}

/// [`serve_smart`] with more environment for the server (export item and file sizes).
fn serve_smart_with(proxy_port: u16, patients: usize, env: &[(&str, &str)]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let ndjson = dir.path().join("data.ndjson");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&ndjson).unwrap());
    for i in 0..patients {
        let p = json!({"resourceType": "Patient", "id": format!("p{i}"), "active": true,
            "name": [{"family": format!("Family{i}"), "given": ["Given", "Name"]}],
            "gender": if i % 2 == 0 { "female" } else { "male" }, "birthDate": "1970-01-01"});
        let o = json!({"resourceType": "Observation", "id": format!("o{i}"), "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8302-2"}]},
            "subject": {"reference": format!("Patient/p{i}")},
            "valueQuantity": {"value": 170.25, "unit": "cm"}});
        writeln!(f, "{p}\n{o}").unwrap();
    }
    drop(f);
    let data = dir.path().join("data");
    let out = fhirhose()
        .args(["load", "--data-dir"])
        .arg(&data)
        .arg(&ndjson)
        .output()
        .unwrap();
    assert!(out.status.success(), "load: {out:?}");
    let jwks = fhirhose().arg("jwks").arg(key_file()).output().unwrap();
    assert!(jwks.status.success(), "{jwks:?}");
    let jwks: Value = serde_json::from_slice(&jwks.stdout).unwrap();
    let clients = dir.path().join("clients.json");
    std::fs::write(
        &clients,
        json!([{"client_id": "exporter", "jwks": jwks, "scope": "system/*.read"}]).to_string(),
    )
    .unwrap();
    let port = free_port();
    let child = fhirhose()
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--auth",
            "smart",
        ])
        .args(["--base-url", &format!("http://127.0.0.1:{proxy_port}")])
        .args(["--token-lifetime", "1", "--data-dir"])
        .arg(&data)
        .arg("--clients")
        .arg(&clients)
        .envs(env.iter().copied())
        .env("FHIRHOSE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut server = Server {
        child,
        direct: format!("http://127.0.0.1:{port}"),
        _dir: dir,
    };
    common::wait_until_answering(&mut server.child, &server.direct);
    server
}

fn export_cmd(url: &str, out: &Path) -> Command {
    export_as("exporter", url, out)
}

fn export_as(client_id: &str, url: &str, out: &Path) -> Command {
    let mut c = fhirhose();
    c.args(["export", url, "--quiet", "--client-id", client_id, "--key"])
        .arg(key_file())
        .arg("--out")
        .arg(out);
    c
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn token(proxy: &str) -> String {
    let out = fhirhose()
        .args([
            "token",
            "--client-id",
            "exporter",
            "--scope",
            "system/*.read",
            "--key",
        ])
        .arg(key_file())
        .args(["--token-url", &format!("{proxy}/auth/token")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["access_token"].as_str().unwrap().to_owned()
}

/// The client, with SMART auth discovered from the server, downloads a system export whose
/// first file request arrives after the token expired (401: a new token, one retry) and whose
/// next download is cut mid-file (resumed by Range with If-Range); the files are the server's
/// bytes, `--verify` passes, and every resource is there once.
#[test]
fn the_client_exports_with_smart_renews_its_token_and_resumes_a_cut_download_by_range() {
    let proxy_port = free_port();
    let server = serve_smart(proxy_port, 1500);
    let state = Arc::new(ProxyState {
        delay_first_file: Some(Duration::from_millis(1500)),
        cut_after: Some(40_000),
        ..Default::default()
    });
    let port = server.direct.rsplit(':').next().unwrap().parse().unwrap();
    proxy(proxy_port, port, state.clone());
    let base = format!("http://127.0.0.1:{proxy_port}");
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let out = export_cmd(&base, &out_dir)
        .args([
            "--type",
            "Patient,Observation",
            "--verify",
            "--parallel",
            "1",
        ])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        state.saw_range.load(Ordering::SeqCst),
        "no Range request: {err}"
    );
    assert!(err.contains("resuming by Range"), "{err}");
    assert!(err.contains("1 downloads resumed by Range"), "{err}");
    assert!(err.contains("verified"), "{err}");
    // The proxy held the first file request past the 1 s token: at least two tokens.
    let tokens: u32 = err
        .split("; ")
        .find_map(|s| s.strip_suffix(" access tokens"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(tokens >= 2, "{err}");
    assert!(
        std::fs::read_dir(&out_dir).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".part"))
    );

    // Byte for byte the files the server serves (fetched directly, bypassing the proxy).
    let ids = same_as_served(&out_dir, &base, &server);
    assert_eq!(ids.len(), 3000);
    assert!(ids.values().all(|c| *c == 1));

    // `fhirhose verify` of the folder the client filled finds the files under the client's names
    // (not the URLs' last segments) and checks them with the references: Observation -> Patient
    // resolve, the types not exported are counted outside.
    let verify = |dir: &Path| {
        fhirhose()
            .arg("verify")
            .arg(dir.join("manifest.json"))
            .output()
            .unwrap()
    };
    let out = verify(&out_dir);
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{report}{}", stderr(&out));
    assert!(report.contains("result: OK"), "{report}");
    assert!(report.contains("0 dangling"), "{report}");
    // One patient's id changed in place: its digest fails, and the references to the old id
    // dangle.
    let patients = out_dir.join("Patient.1.ndjson");
    let text = std::fs::read_to_string(&patients).unwrap();
    let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let id = first["id"].as_str().unwrap();
    let other = id.chars().rev().collect::<String>();
    std::fs::write(&patients, text.replacen(id, &other, 1)).unwrap();
    let out = verify(&out_dir);
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success(), "{report}");
    assert!(report.contains("the content changed"), "{report}");
    assert!(report.contains(&format!("-> Patient/{id}")), "{report}");
}

/// `--partial-manifests`: the client kicks off with `allowPartialManifests=true`, follows the
/// running export's manifest pages (long-polled with `Prefer: wait`) and downloads each file as
/// soon as a page lists it; in the end the folder holds every file of the complete manifest
/// under the same names as a download after the export, byte for byte, and `--verify` passes.
#[test]
fn the_client_downloads_while_the_export_runs_with_partial_manifests() {
    let proxy_port = free_port();
    // One worker, small items and files: 20 pages and 400 commits (each an fdatasync), so the
    // export is still running when the first files are listed.
    let server = serve_smart_with(
        proxy_port,
        10_000,
        &[
            ("FHIRHOSE_EXPORT_WORKERS", "1"),
            ("FHIRHOSE_EXPORT_ITEM_RESOURCES", "1000"),
            ("FHIRHOSE_EXPORT_FILE_RESOURCES", "50"),
        ],
    );
    let state = Arc::new(ProxyState::default());
    let port = server.direct.rsplit(':').next().unwrap().parse().unwrap();
    proxy(proxy_port, port, state);
    let base = format!("http://127.0.0.1:{proxy_port}");
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let out = export_cmd(&base, &out_dir)
        .args(["--partial-manifests", "--verify", "--parallel", "2"])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("400 files from 20 manifest pages"), "{err}");
    assert!(err.contains("files fetched while the export ran"), "{err}");
    assert!(err.contains("verified"), "{err}");
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("manifest.json")).unwrap()).unwrap();
    assert!(manifest.get("link").is_none(), "{manifest}");
    assert_eq!(manifest["output"].as_array().unwrap().len(), 400);
    let ids = same_as_served(&out_dir, &base, &server);
    assert_eq!(ids.len(), 20_000);
    assert!(ids.values().all(|c| *c == 1));
}

/// Each failure is one line: a 401 with the server's reason, a client the token endpoint does
/// not know, 429 and 503 after the retries; Ctrl-C with --cancel-on-interrupt cancels the export on the server.
#[test]
fn failures_are_one_line_and_ctrl_c_cancels_the_export() {
    let proxy_port = free_port();
    let server = serve_smart(proxy_port, 20);
    let state = Arc::new(ProxyState::default());
    let port = server.direct.rsplit(':').next().unwrap().parse().unwrap();
    proxy(proxy_port, port, state.clone());
    let base = format!("http://127.0.0.1:{proxy_port}");
    let dir = tempfile::tempdir().unwrap();

    // No credentials: the server's 401 and its reason.
    let out = fhirhose()
        .args(["export", &base, "--quiet", "--out"])
        .arg(dir.path().join("a"))
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "error: HTTP 401 Unauthorized from {base}/$export: "
        )) && err.contains("access token"),
        "{err}"
    );
    // A client id the server does not know: the token endpoint's refusal.
    let out = export_as("stranger", &base, &dir.path().join("b"))
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!(
            "the token endpoint {base}/auth/token refused the client: HTTP 401"
        )) && err.contains("invalid_client"),
        "{err}"
    );

    // A Patient-level POST kick-off (Parameters body) for two patients: only their resources.
    let out = export_cmd(&base, &dir.path().join("p"))
        .args([
            "--patient-level",
            "--patient",
            "Patient/p3",
            "--patient",
            "Patient/p7",
        ])
        .args(["--type", "Patient,Observation", "--verify"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let mut ids: Vec<String> = Vec::new();
    for t in ["Patient", "Observation"] {
        let text = std::fs::read_to_string(dir.path().join(format!("p/{t}.1.ndjson"))).unwrap();
        ids.extend(text.lines().map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        }));
    }
    ids.sort();
    assert_eq!(ids, ["o3", "o7", "p3", "p7"]);

    // 429 and 503 on every file request: retried as told, then one line naming the attempts.
    for (code, text) in [
        (429u16, "HTTP 429 Too Many Requests from"),
        (503, "HTTP 503 from"),
    ] {
        state.refuse_files.store(code, Ordering::SeqCst);
        let out = export_cmd(&base, &dir.path().join(format!("r{code}")))
            .args(["--retries", "2"])
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains(text)
                && err.contains("/export-files/")
                && err.contains(&format!("after 3 attempts: proxy says {code}")),
            "{err}"
        );
    }
    state.refuse_files.store(0, Ordering::SeqCst);

    // Ctrl-C while polling (the proxy holds the polls): a DELETE the server accepted.
    state.hold_status.store(true, Ordering::SeqCst);
    state.saw_status_poll.store(false, Ordering::SeqCst);
    let child = export_cmd(&base, &dir.path().join("c"))
        .arg("--cancel-on-interrupt")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..600 {
        if state.saw_status_poll.load(Ordering::SeqCst) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(state.saw_status_poll.load(Ordering::SeqCst));
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("interrupted; the export was cancelled on the server"),
        "{err}"
    );
    assert!(state.saw_delete.load(Ordering::SeqCst));
}

/// The files `fhirhose export` saved in `out_dir` (named as its `manifest.json` lists them) are
/// byte for byte what the server serves, fetched directly (not through the proxy at `base`);
/// how many times each resource (`Type/id`) is in them.
fn same_as_served(
    out_dir: &Path,
    base: &str,
    server: &Server,
) -> std::collections::BTreeMap<String, usize> {
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("manifest.json")).unwrap()).unwrap();
    let http = reqwest::blocking::Client::new();
    // Tokens live 1 s here: a new one when the last has expired.
    let mut bearer = token(base);
    let mut ids = std::collections::BTreeMap::<String, usize>::new();
    let mut n: std::collections::HashMap<String, usize> = Default::default();
    for entry in manifest["output"].as_array().unwrap() {
        let rtype = entry["type"].as_str().unwrap();
        let i = n.entry(rtype.to_owned()).or_default();
        *i += 1;
        let local = std::fs::read(out_dir.join(format!("{rtype}.{i}.ndjson"))).unwrap();
        let url = entry["url"].as_str().unwrap().replace(base, &server.direct);
        let mut served = http.get(&url).bearer_auth(&bearer).send().unwrap();
        if served.status() == reqwest::StatusCode::UNAUTHORIZED {
            bearer = token(base);
            served = http.get(&url).bearer_auth(&bearer).send().unwrap();
        }
        assert!(served.status().is_success(), "{}", served.status());
        assert!(
            local == served.bytes().unwrap().as_ref(),
            "{rtype}.{i} differs"
        );
        for line in String::from_utf8(local).unwrap().lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            *ids.entry(format!(
                "{}/{}",
                v["resourceType"].as_str().unwrap(),
                v["id"].as_str().unwrap()
            ))
            .or_default() += 1;
        }
    }
    ids
}

/// A hostile Bulk Data server for the protocol edges the real one never shows (pages that
/// loop, pages without end, a file listed while the export runs but not at its end, a file
/// that cannot be served): plain HTTP/1.1 on a thread per connection, each answer closing its
/// connection. `GET /fhir/$export` answers 202 with `Content-Location: BASE/status`; the status
/// URL (and its `?page=N`) answers 202 with the running export's page N from `page` until
/// `runs_for` has passed since the kick-off, then 200 with `complete`; `GET /files/NAME`
/// answers the file's bytes (with a strong ETag), as [`Serving`] says. A status request with
/// `Prefer: wait` for a page without `next` is held as a real server holds it (at most
/// `hold`, and never past the end of the export), with `Preference-Applied: wait`.
struct Fake {
    base: String,
    state: Arc<FakeState>,
}

/// The running export's manifest page N, given the fake's base URL.
type PageFn = Box<dyn Fn(&str, usize) -> Value + Send + Sync>;

/// How the fake serves its files, beyond their bytes.
#[derive(Default, Clone, Copy)]
struct Serving {
    /// Files answered with 500 (an OperationOutcome) every time.
    broken: &'static [&'static str],
    /// Files whose first answer announces [`LIE`] bytes more than the file has
    /// (`Content-Length`), sends its first half and closes the connection.
    cut_first: &'static [&'static str],
    /// What a request with `Range: bytes=N-` gets.
    ranges: Ranges,
}

#[derive(Default, Clone, Copy, Debug)]
enum Ranges {
    /// 206 and the bytes from N on (`Content-Range`).
    #[default]
    Served,
    /// 200 and the whole file, as from a server without range support.
    Ignored,
    /// 416 with `Content-Range: bytes */SIZE`.
    Refused,
}

/// What a cut first answer ([`Serving::cut_first`]) announces beyond the file's size.
const LIE: usize = 8 << 20;

struct FakeState {
    page: PageFn,
    runs_for: Duration,
    complete: Value,
    files: std::collections::HashMap<String, Vec<u8>>,
    serving: Serving,
    hold: Duration,
    kicked: Mutex<Option<std::time::Instant>>,
    /// Request lines seen, in order.
    requests: Mutex<Vec<String>>,
}

impl Fake {
    fn start(
        page: impl Fn(&str, usize) -> Value + Send + Sync + 'static,
        runs_for: Duration,
        complete: impl FnOnce(&str) -> Value,
        files: &[(&str, &str)],
        serving: Serving,
    ) -> Fake {
        let base = Arc::new(std::sync::OnceLock::<String>::new());
        let b = base.clone();
        let st: Arc<std::sync::OnceLock<Arc<FakeState>>> = Arc::default();
        let s = st.clone();
        let server = raw_http::Server::start(move |r| {
            let (st, b) = (s.get().expect("state first"), b.get().expect("base first"));
            fake_answer(r, st, b)
        });
        let base = {
            base.set(server.base().to_owned()).unwrap();
            server.base().to_owned()
        };
        let state = Arc::new(FakeState {
            page: Box::new(page),
            runs_for,
            complete: complete(&base),
            files: files
                .iter()
                .map(|(n, b)| (n.to_string(), b.as_bytes().to_vec()))
                .collect(),
            serving,
            hold: Duration::from_secs(30),
            kicked: Mutex::default(),
            requests: Mutex::default(),
        });
        if st.set(state.clone()).is_err() {
            unreachable!("the state is set once");
        }
        Fake { base, state }
    }

    fn requests(&self) -> Vec<String> {
        self.state.requests.lock().unwrap().clone()
    }
}

/// A manifest (page) of Patient files served by the fake at `base` (`/files/NAME`), with a
/// `next` link when given.
fn fake_manifest(base: &str, names: &[&str], next: Option<String>) -> Value {
    let output: Vec<Value> = names
        .iter()
        .map(|name| json!({"type": "Patient", "url": format!("{base}/files/{name}")}))
        .collect();
    let mut m = json!({"transactionTime": "2026-01-01T00:00:00Z", "request": "x",
        "requiresAccessToken": false, "output": output, "error": []});
    if let Some(n) = next {
        m["link"] = json!([{"relation": "next", "url": n}]);
    }
    m
}

fn fake_answer(r: &raw_http::Request, st: &FakeState, base: &str) -> raw_http::Reply {
    let line = r.line.clone();
    st.requests.lock().unwrap().push(line.clone());
    let target = r.target.as_str();
    // `status` is a status line's code and reason; `headers` lines of `name: value\r\n`.
    let answer = |status: &str, headers: &str, body: &[u8]| {
        let code = status
            .split(' ')
            .next()
            .and_then(|c| c.parse().ok())
            .unwrap_or(500);
        let mut reply = raw_http::Reply::status(code, body);
        for (k, v) in headers.lines().filter_map(|l| l.split_once(':')) {
            reply = reply.header(k.trim(), v.trim());
        }
        reply
    };
    if target.starts_with("/fhir/$export") {
        *st.kicked.lock().unwrap() = Some(std::time::Instant::now());
        let h = format!("content-location: {base}/status\r\n");
        return answer("202 Accepted", &h, b"");
    }
    if let Some(name) = target.strip_prefix("/files/") {
        if st.serving.broken.contains(&name) {
            let body = br#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"exception","diagnostics":"the disk is on fire"}]}"#;
            let h = "content-type: application/fhir+json\r\n";
            return answer("500 Internal Server Error", h, body);
        }
        let Some(body) = st.files.get(name) else {
            return answer("404 Not Found", "", b"");
        };
        let h = "content-type: application/fhir+ndjson\r\netag: \"v1\"\r\n";
        let asked = line.clone();
        let first = st
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| **r == asked)
            .count()
            == 1;
        if first && st.serving.cut_first.contains(&name) {
            let mut raw = format!(
                "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: {}\r\n{h}\r\n",
                body.len() + LIE
            )
            .into_bytes();
            raw.extend_from_slice(&body[..body.len() / 2]);
            return raw_http::Reply::Raw(raw);
        }
        let from = r
            .header("range")
            .and_then(|v| v.strip_prefix("bytes="))
            .and_then(|r| r.split('-').next()?.parse::<usize>().ok());
        return match (from, st.serving.ranges) {
            (Some(from), Ranges::Served) if from < body.len() => {
                let range = format!(
                    "content-range: bytes {from}-{}/{}\r\n",
                    body.len() - 1,
                    body.len()
                );
                answer("206 Partial Content", &(range + h), &body[from..])
            }
            (Some(_), Ranges::Refused) => {
                let range = format!("content-range: bytes */{}\r\n", body.len());
                answer("416 Range Not Satisfiable", &range, b"")
            }
            _ => answer("200 OK", h, body),
        };
    }
    if let Some(rest) = target.strip_prefix("/status") {
        let kicked = st
            .kicked
            .lock()
            .unwrap()
            .unwrap_or_else(std::time::Instant::now);
        let ends = kicked + st.runs_for;
        let n: usize = rest
            .strip_prefix("?page=")
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let page = (st.page)(base, n);
        let waits = r
            .header("prefer")
            .is_some_and(|v| v.to_ascii_lowercase().starts_with("wait"));
        if waits && next_of(&page).is_none() {
            let until = (std::time::Instant::now() + st.hold).min(ends);
            std::thread::sleep(until.saturating_duration_since(std::time::Instant::now()));
        }
        if std::time::Instant::now() >= ends {
            let body = st.complete.to_string();
            return answer(
                "200 OK",
                "content-type: application/json\r\n",
                body.as_bytes(),
            );
        }
        let body = page.to_string();
        let mut h = format!(
            "content-type: application/json\r\nx-progress: page {n}\r\netag: W/\"{:x}\"\r\n",
            body.len()
        );
        if waits {
            h.push_str("preference-applied: wait\r\n");
        }
        return answer("202 Accepted", &h, body.as_bytes());
    }
    answer("404 Not Found", "", b"")
}

fn next_of(page: &Value) -> Option<&str> {
    page["link"][0]["url"].as_str()
}

/// `fhirhose export --partial-manifests` against `fake`, without auth; its output and how
/// long it ran.
fn export_fake(fake: &Fake, out: &Path, extra: &[&str]) -> (Output, Duration) {
    let started = std::time::Instant::now();
    let out = fhirhose()
        .args(["export", &format!("{}/fhir", fake.base), "--quiet"])
        .arg("--out")
        .arg(out)
        .args(["--partial-manifests", "--poll-interval", "1"])
        .args(extra)
        .output()
        .unwrap();
    (out, started.elapsed())
}

/// The names of the files in `dir` (recursively, relative), sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                names.push(p.strip_prefix(dir).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    names.sort();
    names
}

/// Two small Patient files, `a` and `b`.
const AB: [(&str, &str); 2] = [
    ("a", "{\"resourceType\":\"Patient\",\"id\":\"a\"}\n"),
    ("b", "{\"resourceType\":\"Patient\",\"id\":\"b\"}\n"),
];

/// Whatever the client left in `dir` is whole: each file under a final name holds exactly the
/// bytes of the file of `files` the manifest's order names so (`Patient.N.ndjson` is the N-th),
/// anything else is a `.part`; the final names found.
fn only_whole_files(dir: &Path, files: &[(&str, &str)], err: &str) -> Vec<String> {
    let mut whole = Vec::new();
    for name in names_in(dir) {
        if name.ends_with(".part") {
            continue;
        }
        let i: usize = name
            .strip_prefix("Patient.")
            .and_then(|n| n.strip_suffix(".ndjson"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{name}: {err}"));
        let (_, body) = files
            .get(i - 1)
            .unwrap_or_else(|| panic!("{name} should not be there: {err}"));
        let text = std::fs::read_to_string(dir.join(&name)).unwrap();
        assert_eq!(&text, body, "{name}: {err}");
        whole.push(name);
    }
    whole
}

/// `fhirhose export --partial-manifests` (with `extra`) against `fake` into a new folder, which
/// must fail within `within`: exit code 1, one line on stderr that contains `expect`, and no
/// manifest written. That line and the folder.
fn refused_by(
    fake: &Fake,
    extra: &[&str],
    expect: &str,
    within: Duration,
) -> (String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (out, took) = export_fake(fake, dir.path(), extra);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(expect), "{err}");
    assert!(took < within, "{took:?}: {err}");
    assert!(!dir.path().join("manifest.json").exists());
    (err, dir)
}

/// `--partial-manifests`, running pages whose `next` links loop (back to an earlier page, or
/// to the first: the status URL): the run ends at once with one line naming the loop and the
/// page it leads back to; no manifest is written, no page is asked for after the loop was
/// seen, and the files fetched so far are whole under their names.
#[test]
fn partial_manifests_running_pages_that_loop_are_refused() {
    for back in ["?page=1", ""] {
        let fake = Fake::start(
            move |b, n| match n {
                0 => fake_manifest(b, &["a"], Some(format!("{b}/status?page=1"))),
                1 => fake_manifest(b, &["b"], Some(format!("{b}/status?page=2"))),
                // Back to page 1, or to the first page.
                _ => fake_manifest(b, &[], Some(format!("{b}/status{back}"))),
            },
            Duration::from_secs(120),
            |b| fake_manifest(b, &["a", "b"], None),
            &AB,
            Serving::default(),
        );
        let expect = format!(
            "manifest page 3 links to {}/status{back} as `next`, a page already read: the pages loop",
            fake.base
        );
        let (err, dir) = refused_by(&fake, &[], &expect, Duration::from_secs(20));
        only_whole_files(dir.path(), &AB, &err);
        let pages = fake
            .requests()
            .iter()
            .filter(|r| r.contains(" /status"))
            .count();
        assert_eq!(pages, 3, "{:?}", fake.requests());
    }
}

/// `--partial-manifests`, a running export whose pages never end (each links a new one): the
/// run ends at `--max-pages` with one line saying so, before the export ends.
#[test]
fn partial_manifests_more_running_pages_than_max_pages_are_refused() {
    let fake = Fake::start(
        |b, n| fake_manifest(b, &[], Some(format!("{b}/status?page={}", n + 1))),
        Duration::from_secs(120),
        |b| fake_manifest(b, &[], None),
        &[],
        Serving::default(),
    );
    refused_by(
        &fake,
        &["--max-pages", "5"],
        "the manifest has more than 5 pages; refused (raise --max-pages",
        Duration::from_secs(20),
    );
    let pages: Vec<String> = fake
        .requests()
        .into_iter()
        .filter(|r| r.contains(" /status"))
        .collect();
    assert_eq!(pages.len(), 5, "{pages:?}");
}

/// `--partial-manifests`, a file listed by the running export that the server cannot serve
/// (500 every time) while the status answers are held as long as the client asks
/// (`Prefer: wait`): the run ends as soon as the download has failed (not when the server
/// next answers, nor when the export ends), with one line naming the file and the server's
/// reason; the other file is whole or a `.part`, and no manifest is written.
#[test]
fn partial_manifests_a_download_failing_while_the_export_runs_ends_the_run_at_once() {
    let fake = Fake::start(
        |b, _| fake_manifest(b, &["a", "b"], None),
        Duration::from_secs(120),
        |b| fake_manifest(b, &["a", "b"], None),
        &AB,
        Serving {
            broken: &["b"],
            ..Serving::default()
        },
    );
    let expect = format!(
        "HTTP 500 from {}/files/b after 2 attempts: the disk is on fire",
        fake.base
    );
    // The fake holds each status answer 30 s; the failure is known after one retry (half a
    // second).
    let (err, dir) = refused_by(&fake, &["--retries", "1"], &expect, Duration::from_secs(10));
    let whole = only_whole_files(dir.path(), &AB, &err);
    assert!(whole.iter().all(|n| n == "Patient.1.ndjson"), "{whole:?}");
}

/// `--partial-manifests`, a file listed by the running export but not by its complete
/// manifest: a protocol error naming the file; no manifest is written and the file fetched
/// early is removed (its name may be another file's in the manifest), the others are whole.
#[test]
fn partial_manifests_a_file_listed_while_running_but_not_at_the_end_is_refused() {
    let files = [
        AB[0],
        ("x", "{\"resourceType\":\"Patient\",\"id\":\"x\"}\n"),
        AB[1],
    ];
    let fake = Fake::start(
        |b, _| fake_manifest(b, &["a", "x"], None),
        Duration::from_secs(3),
        |b| fake_manifest(b, &["a", "b"], None),
        &files,
        Serving::default(),
    );
    let expect = format!(
        "{}/files/x was listed while the export ran but is not in its manifest",
        fake.base
    );
    // The export runs 3 s.
    let (err, dir) = refused_by(&fake, &[], &expect, Duration::from_secs(20));
    // `x` was fetched while the export ran (as Patient.2.ndjson, `b`'s name in the manifest).
    assert!(
        fake.requests().iter().any(|r| r.contains(" /files/x ")),
        "{:?}",
        fake.requests()
    );
    let whole = only_whole_files(dir.path(), &[files[0]], &err);
    assert!(whole.iter().all(|n| n == "Patient.1.ndjson"), "{whole:?}");
}

/// One file `a` of `patients` Patients (about 40 bytes each) downloaded from a fake served as
/// `serving` says, after an export that has already ended: the run's stderr (it must succeed),
/// the file's bytes, the folder (which then holds exactly `Patient.1.ndjson` and
/// `manifest.json`) and how many times the file was asked for.
fn downloaded(patients: usize, serving: Serving) -> (String, String, tempfile::TempDir, usize) {
    let body: String = (0..patients)
        .map(|i| format!("{{\"resourceType\":\"Patient\",\"id\":\"p{i}\"}}\n"))
        .collect();
    let fake = Fake::start(
        |b, _| fake_manifest(b, &[], None),
        Duration::ZERO,
        |b| fake_manifest(b, &["a"], None),
        &[("a", body.as_str())],
        serving,
    );
    let dir = tempfile::tempdir().unwrap();
    let (out, _) = export_fake(&fake, dir.path(), &[]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert_eq!(names_in(dir.path()), ["Patient.1.ndjson", "manifest.json"]);
    let got = std::fs::read_to_string(dir.path().join("Patient.1.ndjson")).unwrap();
    assert!(
        got == body,
        "{} bytes received, {} served",
        got.len(),
        body.len()
    );
    let gets = fake
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /files/a "))
        .count();
    (err, body, dir, gets)
}

/// The disk blocks of `path` against its size: allocated bytes at most the size rounded up to
/// the filesystem's block, plus 64 KiB of slack (what the filesystem may keep on its own).
fn assert_no_blocks_past_the_end(path: &Path) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).unwrap();
    let (size, allocated, block) = (m.len(), m.blocks() * 512, m.blksize());
    let whole_blocks = size.div_ceil(block) * block;
    assert!(
        allocated <= whole_blocks + (64 << 10),
        "{}: {allocated} bytes allocated for {size} bytes ({whole_blocks} in whole {block}-byte blocks)",
        path.display()
    );
}

/// A server whose first answer announces 8 MiB more than the file it sends half of (a lying
/// server, or a body cut short), then serves the rest by Range: the file is the server's
/// bytes, and the disk space reserved for the announced size is given back (no blocks
/// allocated past the file's end).
#[test]
fn a_body_shorter_than_announced_is_resumed_and_leaves_no_reserved_blocks() {
    let (err, body, dir, gets) = downloaded(
        5000,
        Serving {
            cut_first: &["a"],
            ..Serving::default()
        },
    );
    assert!(
        err.contains(&format!("interrupted at byte {}", body.len() / 2)),
        "{err}"
    );
    assert!(err.contains("1 downloads resumed by Range"), "{err}");
    assert_eq!(gets, 2, "{err}");
    assert_no_blocks_past_the_end(&dir.path().join("Patient.1.ndjson"));
}

/// A body cut short by a server that then refuses the Range request: a 200 with the whole
/// file (no range support; the part is written again from its start) or a 416 (the part is
/// dropped and the file asked for again without Range). Either way the file ends whole under
/// its name, and nothing else is left in the folder.
#[test]
fn a_cut_body_whose_server_refuses_range_is_downloaded_again_from_the_start() {
    for (ranges, requests) in [(Ranges::Ignored, 2), (Ranges::Refused, 3)] {
        let (err, body, dir, gets) = downloaded(
            5000,
            Serving {
                cut_first: &["a"],
                ranges,
                ..Serving::default()
            },
        );
        let cut = format!("interrupted at byte {}", body.len() / 2);
        assert!(err.contains(&cut), "{ranges:?}: {err}");
        assert_eq!(gets, requests, "{ranges:?}: {err}");
        assert_no_blocks_past_the_end(&dir.path().join("Patient.1.ndjson"));
    }
}
