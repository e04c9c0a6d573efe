//! Several `fhirhose serve` nodes on one PostgreSQL database and one shared destination (issue
//! 19), through the real binary: three nodes (one export worker each, a 5 s heartbeat timeout)
//! behind one base URL, as behind a load balancer, and a local-folder destination that is the
//! same folder for every node (`<data-dir>/storage` links to it).
//!
//! - A token minted at node 1 is accepted at node 2 (the signing key is the cluster's), and the
//!   same client assertion presented again at node 3 is refused (the replay cache is shared).
//! - A system export kicked off at node 1 is split across the nodes (each node finishes items:
//!   the `owner` column of the items shows it); mid-export node 3 is killed with SIGKILL while it
//!   holds a lease, and node 2 is stopped (SIGSTOP) while it holds one until the item is taken
//!   over after the heartbeat timeout, then continued: its late writes are refused (fencing by
//!   owner and attempt) and removed. The export ends complete with every resource exactly once,
//!   and the export folder holds exactly the manifest's files.
//! - Another node takes work of a new export at once (`LISTEN`/`NOTIFY`), not at its next poll
//!   (`a_second_node_takes_work_of_a_new_export_without_waiting_for_its_poll`).
//! - Nodes whose clocks disagree (one 20 minutes behind, libfaketime) take no items from each
//!   other, and `_since` chained across them takes each write once: `lastUpdated` is the
//!   database's clock (`since_chained_across_nodes_whose_clocks_disagree_takes_each_write_once`).
//! - Conditional creates of one condition sent to two nodes at once create one resource
//!   (`conditional_creates_of_one_condition_on_two_nodes_create_once`).
//! - A second export kicked off at node 1 and cancelled at node 3 (restarted with the same node
//!   id) stops the workers running it on the other nodes at their next heartbeat; its files go.
//!
//! Runs when `FHIRHOSE_TEST_POSTGRES` names a PostgreSQL cluster (`scripts/postgres.sh start
//! DIR`; each run makes a database of its own) — in `scripts/test.sh`'s first pass. The
//! destination is an S3 bucket of its own on the moto server named by `FHIRHOSE_TEST_S3`
//! (`scripts/s3.sh`), or without it a local folder every node links as its storage. Without
//! PostgreSQL the test is skipped (it fails with `FHIRHOSE_REQUIRE_EXTERNAL=1`, as in CI).
//!
//! The pause works because the queue's connections end a session idle inside a transaction
//! after 3 s (`idle_in_transaction_session_timeout`): a node stopped inside a queue transaction
//! would otherwise keep its item's row lock, and `SKIP LOCKED` claims would never take it over.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use test_support::external;
use test_support::process::{Serve, clean_command, free_port, log_file};

/// A bound against hangs (not a timing assertion).
const BOUND: Duration = Duration::from_secs(40);
const HEARTBEAT_TIMEOUT_S: &str = "5";
/// A bound for a node woken by another's kick-off, well below its 60 s poll (not a timing
/// assertion: on time it takes well under a second).
const WOKEN_WITHIN: Duration = Duration::from_secs(30);

fn fhirhose() -> Command {
    let mut c = clean_command(env!("CARGO_BIN_EXE_fhirhose"));
    c.env("FHIRHOSE_LOG", "info");
    c
}

fn signal(pid: u32, sig: &str) {
    let status = test_support::process::signal(pid, sig).expect("kill");
    assert!(status.success(), "kill -{sig} {pid}");
}

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < BOUND, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A running node (its output in its log), killed when dropped.
type Node = Serve;

/// The destination every node writes to.
enum Dest {
    /// A local folder each node links as `<data-dir>/storage`.
    Shared(PathBuf),
    /// A bucket on an S3 server (moto).
    S3 { endpoint: String, bucket: String },
}

impl Dest {
    fn args(&self) -> Vec<String> {
        match self {
            Dest::Shared(_) => Vec::new(),
            Dest::S3 { endpoint, bucket } => [
                "--export-destination",
                "s3",
                "--s3-bucket",
                bucket,
                "--s3-endpoint",
                endpoint,
                "--s3-access-key-id",
                "test",
                "--s3-secret-access-key",
                "test",
            ]
            .map(String::from)
            .to_vec(),
        }
    }

    /// Every file under the export folder of `job` (names relative to it), temporary parts too.
    fn files(&self, http: &reqwest::blocking::Client, job: &str) -> Vec<String> {
        match self {
            Dest::Shared(dir) => files_under(&dir.join("exports").join(job)),
            Dest::S3 { endpoint, bucket } => {
                let prefix = format!("exports/{job}/");
                let mut out = Vec::new();
                let mut token: Option<String> = None;
                loop {
                    let mut url = format!("{endpoint}/{bucket}?list-type=2&prefix={prefix}");
                    if let Some(t) = &token {
                        url.push_str(&format!("&continuation-token={t}"));
                    }
                    let body = http
                        .get(&url)
                        .send()
                        .and_then(|r| r.error_for_status())
                        .and_then(|r| r.text())
                        .expect("list the bucket");
                    for contents in body.split("<Contents>").skip(1) {
                        let key = xml_field(contents, "Key").expect("key");
                        out.push(key.strip_prefix(&prefix).unwrap_or(&key).to_string());
                    }
                    token = xml_field(&body, "NextContinuationToken");
                    if token.is_none() {
                        break;
                    }
                }
                out.sort();
                out
            }
        }
    }
}

fn xml_field(xml: &str, name: &str) -> Option<String> {
    let v = xml.split(&format!("<{name}>")).nth(1)?;
    Some(v.split(&format!("</{name}>")).next()?.to_string())
}

struct Cluster {
    root: tempfile::TempDir,
    dest: Dest,
    url: String,
    base: String,
    clients: PathBuf,
}

impl Cluster {
    fn start(&self, id: &'static str, port: u16) -> Node {
        self.start_with(id, port, &[], "info")
    }

    /// [`Cluster::start`] with `extra` arguments and the log filter `filter` (`FHIRHOSE_LOG`).
    fn start_with(&self, id: &'static str, port: u16, extra: &[&str], filter: &str) -> Node {
        self.start_env(id, port, extra, filter, &[])
    }

    /// [`Cluster::start_with`] with more environment variables; `extra` may give its own
    /// `--export-heartbeat-timeout`.
    fn start_env(
        &self,
        id: &'static str,
        port: u16,
        extra: &[&str],
        filter: &str,
        env: &[(&str, &str)],
    ) -> Node {
        let data = self.root.path().join(id);
        fs::create_dir_all(&data).expect("data dir");
        let storage = data.join("storage");
        if let Dest::Shared(shared) = &self.dest
            && !storage.exists()
        {
            std::os::unix::fs::symlink(shared, &storage).expect("link the shared folder");
        }
        let log = self.root.path().join(format!("{id}.log"));
        let stderr = log_file(&log);
        let mut cmd = fhirhose();
        cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(&data)
            .args(["--database", &self.url, "--base-url", &self.base])
            .args(["--node-id", id, "--auth", "smart"])
            .arg("--clients")
            .arg(&self.clients)
            .args(["--export-workers", "1"]);
        if !extra.contains(&"--export-heartbeat-timeout") {
            cmd.args(["--export-heartbeat-timeout", HEARTBEAT_TIMEOUT_S]);
        }
        // Small items, so that the export lasts many claims (about 130 items for the ~13,000
        // resources) and every node is seen finishing one and holding the next even on a quiet
        // machine (with 300 the whole export could pass between two polls).
        cmd.args(["--export-item-resources", "100"])
            .args(["--export-file-resources", "50"])
            .args(["--export-max-attempts", "10"])
            .args(extra)
            .args(self.dest.args())
            .env("FHIRHOSE_LOG", filter)
            .envs(env.iter().copied())
            // The log goes to stdout.
            .stdout(stderr.try_clone().expect("log"))
            .stderr(stderr);
        Serve::start(&mut cmd, port, Some(&log)).unwrap_or_else(|e| panic!("node {id}: {e}"))
    }
}

/// Resources per type in the loaded Bundles (their entries; ids are assigned at load).
fn expected_counts(files: &[PathBuf]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for f in files {
        let gz = flate2::read::GzDecoder::new(fs::File::open(f).expect("bundle"));
        let bundle: Value = serde_json::from_reader(gz).expect("bundle JSON");
        for e in bundle["entry"].as_array().expect("entries") {
            let t = e["resource"]["resourceType"].as_str().expect("type");
            *counts.entry(t.to_string()).or_default() += 1;
        }
    }
    counts
}

/// `(owner, state)` of every item of `job`, and the attempts, by item number.
fn items(db: &mut postgres::Client, job: &str) -> Vec<(i64, Option<String>, String, i64)> {
    db.query(
        "SELECT item_no, owner, state, attempts FROM export_item WHERE job_id = $1 ORDER BY item_no",
        &[&job],
    )
    .expect("items")
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect()
}

fn node_of(owner: &Option<String>) -> &str {
    owner
        .as_deref()
        .and_then(|o| o.split('/').next())
        .unwrap_or("")
}

/// Files under `dir`, named relative to it, sorted.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = test_support::process::files_under(dir)
        .iter()
        .map(|p| {
            p.strip_prefix(dir)
                .expect("under")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    out.sort();
    out
}

/// A fresh database on the PostgreSQL cluster of `FHIRHOSE_TEST_POSTGRES` (`None`: the test
/// is skipped), a temporary root folder and an HTTP client.
fn postgres_set_up() -> Option<(
    store::testing::TestDatabase,
    tempfile::TempDir,
    reqwest::blocking::Client,
)> {
    let cluster_url =
        external::external("FHIRHOSE_TEST_POSTGRES", "scripts/postgres.sh start DIR")?;
    let database = store::testing::fresh_database(&cluster_url).expect("fresh database");
    let root = tempfile::tempdir().expect("tempdir");
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    Some((database, root, http))
}

/// Kicks off a system export at `node` with `bearer` (202 expected): its job id.
fn kick_off_system_export(http: &reqwest::blocking::Client, node: &Node, bearer: &str) -> String {
    let r = http
        .get(node.url("/$export"))
        .header("Authorization", bearer)
        .header("Accept", "application/fhir+json")
        .header("Prefer", "respond-async")
        .send()
        .expect("kick-off");
    assert_eq!(r.status().as_u16(), 202, "{:?}", r.text());
    let location = r.headers()["content-location"]
        .to_str()
        .expect("location")
        .to_string();
    location.rsplit('/').next().expect("job id").to_string()
}

/// The first `n` Synthea Bundles of the test data, in name order.
fn synthea_bundles(n: usize) -> Vec<PathBuf> {
    let mut bundles: Vec<PathBuf> = fs::read_dir(test_support::synthea_100())
        .expect("testdata")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".json.gz"))
        .collect();
    bundles.sort();
    bundles.truncate(n);
    bundles
}

/// `fhirhose load` of `bundles` into the database at `url` (data directory under `root`).
fn load(url: &str, root: &Path, bundles: &[PathBuf]) {
    let load = fhirhose()
        .args(["load", "--database", url, "--data-dir"])
        .arg(root.join("load"))
        .args(bundles)
        .stdout(Stdio::null())
        .output()
        .expect("load");
    assert!(load.status.success(), "{load:?}");
}

#[test]
fn three_nodes_share_one_database_export_split_take_over_fencing_cancel_and_tokens() {
    let Some((database, root, http)) = postgres_set_up() else {
        return;
    };
    let dest = match external::var("FHIRHOSE_TEST_S3") {
        Some(endpoint) => {
            let endpoint = endpoint.trim_end_matches('/').to_string();
            let bucket = format!("fh-multinode-{}", std::process::id());
            let made = http
                .put(format!("{endpoint}/{bucket}"))
                .send()
                .expect("create the bucket");
            assert!(
                made.status().is_success(),
                "create bucket: {}",
                made.status()
            );
            Dest::S3 { endpoint, bucket }
        }
        None => {
            assert!(
                !external::required(),
                "multinode needs FHIRHOSE_TEST_S3 (scripts/s3.sh)"
            );
            let shared = root.path().join("shared");
            fs::create_dir_all(&shared).expect("shared folder");
            Dest::Shared(shared)
        }
    };

    // The registered client (the auth crate's test key).
    let (pem, clients) = admin_client(root.path(), "system/*.cruds");

    // A third of the Synthea set: ~13,000 resources.
    let bundles = synthea_bundles(34);
    let expected = expected_counts(&bundles);
    load(&database.url, root.path(), &bundles);

    let ports = [free_port(), free_port(), free_port()];
    let cluster = Cluster {
        url: database.url.clone(),
        base: format!("http://127.0.0.1:{}", ports[0]),
        clients,
        root,
        dest,
    };
    let n1 = cluster.start("n1", ports[0]);
    let n2 = cluster.start("n2", ports[1]);
    let mut n3 = cluster.start("n3", ports[2]);
    let mut db = postgres::Client::connect(&database.url, postgres::NoTls).expect("database");

    // One assertion: a token at node 1, a replay at node 3.
    let assertion = fhirhose()
        .args(["token", "--client-id", "admin", "--key"])
        .arg(&pem)
        .args(["--token-url", &format!("{}/auth/token", cluster.base)])
        .args(["--scope", "system/*.cruds", "--assertion-only"])
        .output()
        .expect("assertion");
    assert!(assertion.status.success(), "{assertion:?}");
    let assertion = String::from_utf8(assertion.stdout).expect("utf-8");
    let form = [
        ("grant_type", "client_credentials"),
        (
            "client_assertion_type",
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        ),
        ("client_assertion", assertion.trim()),
        ("scope", "system/*.cruds"),
    ];
    let minted = http
        .post(n1.url("/auth/token"))
        .form(&form)
        .send()
        .expect("token at n1");
    assert_eq!(minted.status().as_u16(), 200);
    let token = minted.json::<Value>().expect("token JSON")["access_token"]
        .as_str()
        .expect("access_token")
        .to_string();
    let replay = http
        .post(n3.url("/auth/token"))
        .form(&form)
        .send()
        .expect("token at n3");
    let replay_status = replay.status().as_u16();
    let replay_body = replay.text().unwrap_or_default();
    assert!(
        (400..500).contains(&replay_status) && replay_body.contains("already been used"),
        "a replayed assertion at node 3: {replay_status} {replay_body}"
    );
    let bearer = format!("Bearer {token}");
    let at_n2 = http
        .get(n2.url("/Patient?_count=1"))
        .header("Authorization", &bearer)
        .send()
        .expect("search at n2");
    assert_eq!(at_n2.status().as_u16(), 200, "node 1's token at node 2");

    // A system export kicked off at node 1.
    let kickoff = |node: &Node| kick_off_system_export(&http, node, &bearer);
    let job = kickoff(&n1);
    // Node 1 paused at once: on a quiet machine it alone finished all 124 items within 1 s
    // while nodes 2 and 3 learnt of work only by polling the queue (every 2 s; now they are
    // woken at once, see the next test). Its item in progress is taken over after the heartbeat
    // timeout like any other.
    signal(n1.child.id(), "STOP");

    // Nodes 2 and 3 each finish an item, then are caught holding one: both paused first, the
    // items read once statements already sent have landed (an item read as running a moment
    // before a pause may be done by the time it takes effect: 100 resources take ~10 ms), and
    // let go again when either holds none.
    let started = Instant::now();
    let (held2, held3) = loop {
        assert!(
            started.elapsed() < BOUND,
            "timed out waiting for nodes 2 and 3 to hold leases after finishing items"
        );
        let rows = items(&mut db, &job);
        let done = |n: &str| {
            rows.iter()
                .any(|(_, o, s, _)| s == "done" && node_of(o) == n)
        };
        if !(done("n2") && done("n3")) {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        signal(n2.child.id(), "STOP");
        signal(n3.child.id(), "STOP");
        std::thread::sleep(Duration::from_millis(300));
        let rows = items(&mut db, &job);
        let running = |n: &str| {
            rows.iter()
                .find(|(_, o, s, _)| s == "running" && node_of(o) == n)
                .cloned()
        };
        if let (Some(h2), Some(h3)) = (running("n2"), running("n3")) {
            break (h2, h3);
        }
        signal(n2.child.id(), "CONT");
        signal(n3.child.id(), "CONT");
        std::thread::sleep(Duration::from_millis(5));
    };
    signal(n1.child.id(), "CONT");
    signal(n3.child.id(), "KILL");
    let _ = n3.child.wait();
    eprintln!("multinode: n3 killed holding item {held3:?}; n2 paused holding item {held2:?}");

    // Both leases are taken over after the heartbeat timeout (node 1 is the only live worker).
    wait_for("the paused node's item to be taken over", || {
        items(&mut db, &job)
            .into_iter()
            .find(|(n, o, _, a)| *n == held2.0 && (*a > held2.3 || o != &held2.1))
    });
    signal(n2.child.id(), "CONT");
    let status_url = n2.url(&format!("/export-status/{job}"));
    let manifest = wait_for("the export to complete", || {
        let r = http
            .get(&status_url)
            .header("Authorization", &bearer)
            .send()
            .ok()?;
        match r.status().as_u16() {
            200 => Some(r.json::<Value>().expect("manifest")),
            // Polled as a client does: no faster than the server asks (Retry-After).
            202 | 429 => {
                std::thread::sleep(Duration::from_secs(1));
                None
            }
            s => panic!("export status {s}: {:?}", r.text()),
        }
    });
    let rows = items(&mut db, &job);
    let take_over3 = rows.iter().find(|r| r.0 == held3.0).expect("item");
    assert!(
        take_over3.2 == "done" && take_over3.1 != held3.1 && take_over3.3 > held3.3,
        "the killed node's item was finished by another claim: {take_over3:?}"
    );
    let mut by_node: BTreeMap<&str, usize> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.2 == "done") {
        *by_node.entry(node_of(&r.1)).or_default() += 1;
    }
    eprintln!(
        "multinode: items finished by node: {by_node:?} ({} items)",
        rows.len()
    );
    for n in ["n1", "n2", "n3"] {
        assert!(
            by_node.contains_key(n),
            "node {n} finished no item: {rows:?}"
        );
    }
    // The paused node learnt that it lost its lease (at a heartbeat or commit refused, or when
    // its connection, ended by the server, failed a queue call that the lease check then
    // refused), and committed nothing after it.
    let noticed = |log: &str| {
        log.lines().any(|l| {
            let fields: Vec<&str> = l
                .split(|c: char| c.is_whitespace() || matches!(c, '{' | '}' | ':' | ','))
                .collect();
            l.contains(&job)
                && fields.contains(&format!("item={}", held2.0).as_str())
                && fields.contains(&format!("attempt={}", held2.3).as_str())
                && (l.contains("work item taken over elsewhere")
                    || l.contains("work item stopped")
                    || l.contains("export work item failed"))
        })
    };
    let start = Instant::now();
    while !noticed(&n2.log_text()) {
        assert!(
            start.elapsed() < BOUND,
            "node 2 did not notice its lost lease:\n{}",
            n2.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Every resource exactly once, read through node 2 (not the kick-off's node).
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut seen = HashSet::new();
    let mut listed = Vec::new();
    for f in manifest["output"].as_array().expect("output") {
        let url = f["url"].as_str().expect("url");
        let name = url.rsplit('/').next().expect("name").to_string();
        let body = http
            .get(n2.url(&format!("/export-files/{job}/{name}")))
            .header("Authorization", &bearer)
            .send()
            .and_then(|r| r.error_for_status())
            .and_then(|r| r.text())
            .expect("an output file through node 2");
        listed.push(name);
        let mut in_file = 0;
        for line in body.lines().filter(|l| !l.is_empty()) {
            let v: Value = serde_json::from_str(line).expect("resource");
            let t = v["resourceType"].as_str().expect("type").to_string();
            let id = v["id"].as_str().expect("id").to_string();
            assert!(seen.insert((t.clone(), id)), "{t} exported twice");
            *counts.entry(t).or_default() += 1;
            in_file += 1;
        }
        assert_eq!(in_file, f["count"].as_u64().expect("count") as usize);
    }
    // The store's counts (the loader merges the Organizations and Practitioners that several
    // Bundles repeat, so the Bundles' entries are an upper bound).
    let stored: BTreeMap<String, usize> = expected
        .keys()
        .map(|t| {
            let total = http
                .get(n1.url(&format!("/{t}?_summary=count")))
                .header("Authorization", &bearer)
                .send()
                .and_then(|r| r.error_for_status())
                .and_then(|r| r.json::<Value>())
                .expect("count")["total"]
                .as_u64()
                .expect("total") as usize;
            assert!(total > 0 && total <= expected[t], "{t}: {total}");
            (t.clone(), total)
        })
        .collect();
    assert_eq!(counts, stored, "every resource exactly once");
    // The destination holds the manifest's files and nothing else: no part of the paused node
    // (it removes its claim's part folder once it learns of the loss: waited for, bounded).
    listed.sort();
    let mut left = Vec::new();
    let settled = Instant::now();
    while settled.elapsed() < BOUND {
        left = cluster.dest.files(&http, &job);
        if left == listed {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        left, listed,
        "the export folder holds exactly the manifest's files"
    );

    // Node 3 comes back under its id; an export kicked off at node 1 is cancelled at node 3
    // while another node runs it.
    drop(n3);
    let n3 = cluster.start("n3", ports[2]);
    let job2 = kickoff(&n1);
    let runner = wait_for("an item of the second export to run on node 1 or 2", || {
        items(&mut db, &job2)
            .into_iter()
            .find(|(_, o, s, _)| s == "running" && matches!(node_of(o), "n1" | "n2"))
            .map(|(_, o, _, _)| node_of(&o).to_string())
    });
    let cancel = http
        .delete(n3.url(&format!("/export-status/{job2}")))
        .header("Authorization", &bearer)
        .send()
        .expect("cancel at n3");
    assert_eq!(cancel.status().as_u16(), 202);
    // The node that ran an item stops it at its next heartbeat or commit (or the item finished
    // before the cancel arrived, and no claim takes the cancelled job's items any more).
    eprintln!("multinode: second export cancelled at n3 while {runner} ran an item");
    wait_for("the running nodes to stop the cancelled export", || {
        let stopped = [&n1, &n2, &n3].iter().any(|n| {
            n.log_text()
                .lines()
                .any(|l| l.contains("work item stopped") && l.contains(&job2))
        });
        let running = items(&mut db, &job2)
            .iter()
            .any(|(_, _, s, _)| s == "running");
        (stopped || !running).then_some(())
    });
    wait_for("the cancelled export's files to go", || {
        cluster.dest.files(&http, &job2).is_empty().then_some(())
    });
    let state: String = db
        .query_one("SELECT state FROM export_job WHERE id = $1", &[&job2])
        .expect("job")
        .get(0);
    assert_eq!(state, "cancelled");
    let gone = http
        .get(n2.url(&format!("/export-status/{job2}")))
        .header("Authorization", &bearer)
        .send()
        .expect("status at n2");
    assert_eq!(gone.status().as_u16(), 404);
    drop((n1, n2, n3));
    drop(db);
}

/// Other nodes learn of new export work at once (PostgreSQL `LISTEN`/`NOTIFY`), not at their
/// next poll of the queue: two nodes with one worker each and a poll interval of 60 s. Node 2's
/// worker is seen idle (its log) after its listener's wake-up, so it has looked at the empty
/// queue for the last time before the kick-off; node 1 is paused (SIGSTOP) right after it
/// answered the kick-off, and node 2 — its next poll a minute away — takes an item of the export
/// within [`WOKEN_WITHIN`] and, with node 1 continued, the export completes. Without the
/// `NOTIFY` node 2 waits for its poll and the test fails.
#[test]
fn a_second_node_takes_work_of_a_new_export_without_waiting_for_its_poll() {
    let Some((database, root, http)) = postgres_set_up() else {
        return;
    };
    let shared = root.path().join("shared");
    fs::create_dir_all(&shared).expect("shared folder");
    let (pem, clients) = admin_client(root.path(), "system/*.cruds");
    load(&database.url, root.path(), &synthea_bundles(5));

    let ports = [free_port(), free_port()];
    let cluster = Cluster {
        url: database.url.clone(),
        base: format!("http://127.0.0.1:{}", ports[0]),
        clients,
        root,
        dest: Dest::Shared(shared),
    };
    let poll = ["--export-poll-interval", "60"];
    let n1 = cluster.start_with("n1", ports[0], &poll, "info");
    let n2 = cluster.start_with("n2", ports[1], &poll, "info,export::service::workers=debug");
    // Node 2's worker idle having seen a wake-up: at start-up only its listener wakes it (once
    // it listens; nothing is released or kicked off at node 2), so the worker has looked at the
    // still empty queue since the listener listens, waits with no wake-up pending, and looks
    // again at the next wake-up or a minute later.
    wait_for("node 2's worker idle after its listener's wake-up", || {
        let log = n2.log_text();
        let woken_idle = log
            .lines()
            .filter(|l| l.contains("export worker idle"))
            .filter_map(|l| {
                let field = &l[l.find("wakes=")? + "wakes=".len()..];
                let digits: String = field.chars().take_while(char::is_ascii_digit).collect();
                digits.parse::<u64>().ok()
            })
            .any(|wakes| wakes >= 1);
        (log.contains("listening for export work") && woken_idle).then_some(())
    });
    let mut db = postgres::Client::connect(&database.url, postgres::NoTls).expect("database");

    let bearer = admin_bearer(&pem, &n1);
    let job = kick_off_system_export(&http, &n1, &bearer);
    // Node 1 does nothing more: whatever runs now runs on node 2.
    signal(n1.child.id(), "STOP");

    let started = Instant::now();
    let taken = loop {
        let rows = items(&mut db, &job);
        if let Some(row) = rows.iter().find(|(_, o, _, _)| node_of(o) == "n2") {
            break row.clone();
        }
        assert!(
            started.elapsed() < WOKEN_WITHIN,
            "node 2 took no item of the new export within {WOKEN_WITHIN:?} (its poll: 60 s), \
             so it was not woken: {rows:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    eprintln!(
        "multinode: node 2 took item {taken:?} {:?} after node 1 was paused",
        started.elapsed()
    );
    signal(n1.child.id(), "CONT");
    let status_url = n2.url(&format!("/export-status/{job}"));
    wait_for("the export to complete", || {
        let r = http
            .get(&status_url)
            .header("Authorization", &bearer)
            .send()
            .expect("status");
        (r.status().as_u16() == 200).then_some(())
    });
    drop(n2);
    drop(n1);
}

/// Two nodes whose clocks disagree by 20 minutes (node 2 runs with Debian's libfaketime
/// preloaded), with a 60 s heartbeat timeout: node 2's heartbeats, on its own clock, would be
/// 20 minutes old to node 1, which would take over every item node 2 runs (and the reverse for a
/// node ahead). The queue keeps its leases on the database server's clock, so an export run by
/// both takes each item once.
#[test]
fn nodes_whose_clocks_disagree_take_no_items_from_each_other() {
    let Some((database, root, http)) = postgres_set_up() else {
        return;
    };
    let Some(faketime) = external::external("FHIRHOSE_TEST_FAKETIME", "scripts/faketime.sh") else {
        return;
    };
    let shared = root.path().join("shared");
    fs::create_dir_all(&shared).expect("shared folder");
    let (pem, clients) = admin_client(root.path(), "system/*.cruds");
    let bundles = synthea_bundles(5);
    load(&database.url, root.path(), &bundles);
    let ports = [free_port(), free_port()];
    let cluster = Cluster {
        url: database.url.clone(),
        base: format!("http://127.0.0.1:{}", ports[0]),
        clients,
        root,
        dest: Dest::Shared(shared.clone()),
    };
    let timeout = ["--export-heartbeat-timeout", "60"];
    let n1 = cluster.start_with("n1", ports[0], &timeout, "info");
    // The monotonic clock is left alone: only the wall clock is behind.
    let n2 = cluster.start_env(
        "n2",
        ports[1],
        &timeout,
        "info",
        &[
            ("LD_PRELOAD", faketime.as_str()),
            ("FAKETIME", "-20m"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    );
    let bearer = admin_bearer(&pem, &n1);
    let job = kick_off_system_export(&http, &n1, &bearer);
    let status_url = n1.url(&format!("/export-status/{job}"));
    let manifest: Value = wait_for("the export to complete", || {
        let r = http
            .get(&status_url)
            .header("Authorization", &bearer)
            .send()
            .expect("status");
        (r.status().as_u16() == 200).then(|| r.json().expect("manifest"))
    });
    let mut db = postgres::Client::connect(&database.url, postgres::NoTls).expect("database");
    let rows = items(&mut db, &job);
    let by_n2 = rows
        .iter()
        .filter(|(_, o, _, _)| node_of(o) == "n2")
        .count();
    eprintln!(
        "multinode: {} items, {by_n2} run by the node 20 minutes behind",
        rows.len()
    );
    assert!(
        by_n2 > 0,
        "the node whose clock is behind ran no item, so nothing was shown: {rows:?}\n{}",
        n2.log_text()
    );
    let retaken: Vec<_> = rows.iter().filter(|(_, _, _, a)| *a != 1).collect();
    assert!(
        retaken.is_empty(),
        "items claimed more than once (taken over from a live node): {retaken:?}"
    );
    assert!(
        rows.iter().all(|(_, _, state, _)| state == "done"),
        "{rows:?}"
    );
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for out in manifest["output"].as_array().expect("output") {
        *counts
            .entry(out["type"].as_str().expect("type").to_string())
            .or_default() += out["count"].as_u64().expect("count") as usize;
    }
    assert_eq!(counts, expected_counts(&bundles), "{manifest}");
    drop(n2);
    drop(n1);
}

/// `_since` chained across nodes whose clocks disagree by 20 minutes (node 2 behind, with
/// libfaketime). Every instant the store stamps or compares on PostgreSQL is the database
/// server's: a resource written through node 2 is last updated when it was written (not at the
/// previous write's instant plus 1 ms, as when each node stamped with its own clock and only
/// the sequence kept the order), node 1's `transactionTime` passed as `_since` to node 2 is not
/// "in the future" there (it was refused with 400), and the chained exports each hold exactly
/// what was written between them.
#[test]
fn since_chained_across_nodes_whose_clocks_disagree_takes_each_write_once() {
    let Some((database, root, http)) = postgres_set_up() else {
        return;
    };
    let Some(faketime) = external::external("FHIRHOSE_TEST_FAKETIME", "scripts/faketime.sh") else {
        return;
    };
    let shared = root.path().join("shared");
    fs::create_dir_all(&shared).expect("shared folder");
    let (pem, clients) = admin_client(root.path(), "system/*.cruds");
    let ports = [free_port(), free_port()];
    let cluster = Cluster {
        url: database.url.clone(),
        base: format!("http://127.0.0.1:{}", ports[0]),
        clients,
        root,
        dest: Dest::Shared(shared),
    };
    let n1 = cluster.start("n1", ports[0]);
    let n2 = cluster.start_env(
        "n2",
        ports[1],
        &[],
        "info",
        &[
            ("LD_PRELOAD", faketime.as_str()),
            ("FAKETIME", "-20m"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    );
    let bearer = admin_bearer(&pem, &n1);
    let put = |node: &Node, id: &str| -> String {
        let r = http
            .put(node.url(&format!("/Patient/{id}")))
            .header("Authorization", &bearer)
            .header("Content-Type", "application/fhir+json")
            .body(json!({"resourceType": "Patient", "id": id}).to_string())
            .send()
            .expect("PUT");
        assert!(r.status().is_success(), "PUT Patient/{id}: {}", r.status());
        let read: Value = http
            .get(node.url(&format!("/Patient/{id}")))
            .header("Authorization", &bearer)
            .send()
            .and_then(|r| r.json())
            .expect("read");
        read["meta"]["lastUpdated"]
            .as_str()
            .expect("lastUpdated")
            .to_string()
    };
    // Kicks off a system export of Patients at `node` (with `_since`, if given) and waits for
    // its manifest: (transactionTime, the exported ids), or the kick-off's refusal.
    let export = |node: &Node, since: Option<&str>| -> Result<(String, BTreeSet<String>), String> {
        let mut url = node.url("/$export?_type=Patient");
        if let Some(since) = since {
            url.push_str(&format!("&_since={since}"));
        }
        let r = http
            .get(&url)
            .header("Authorization", &bearer)
            .header("Accept", "application/fhir+json")
            .header("Prefer", "respond-async")
            .send()
            .expect("kick-off");
        if r.status().as_u16() != 202 {
            return Err(format!("{} {}", r.status(), r.text().unwrap_or_default()));
        }
        let status_url = r.headers()["content-location"]
            .to_str()
            .expect("location")
            .to_string();
        let manifest: Value = wait_for("the export to complete", || {
            let r = http
                .get(&status_url)
                .header("Authorization", &bearer)
                .send()
                .expect("status");
            (r.status().as_u16() == 200).then(|| r.json().expect("manifest"))
        });
        let mut ids = BTreeSet::new();
        for out in manifest["output"].as_array().expect("output") {
            let body = http
                .get(out["url"].as_str().expect("url"))
                .header("Authorization", &bearer)
                .send()
                .and_then(|r| r.error_for_status())
                .and_then(|r| r.text())
                .expect("download");
            for line in body.lines().filter(|l| !l.is_empty()) {
                let resource: Value = serde_json::from_str(line).expect("NDJSON");
                ids.insert(resource["id"].as_str().expect("id").to_string());
            }
        }
        let time = manifest["transactionTime"]
            .as_str()
            .expect("transactionTime")
            .to_string();
        Ok((time, ids))
    };
    let ms = |instant: &str| store::parse_instant_ms(instant).expect("an instant");
    let set = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();

    let a_updated = put(&n1, "a");
    let (t1, first) = export(&n1, None).expect("the first export");
    assert_eq!(first, set(&["a"]));
    assert!(ms(&t1) >= ms(&a_updated), "{t1} before a's {a_updated}");

    // Node 2 writes b after node 1's export: this machine's clock (the database server's too)
    // is past `t1` and past a's instant.
    let before_b = now_ms();
    let b_updated = put(&n2, "b");
    assert!(
        ms(&b_updated) >= before_b,
        "Patient/b written through node 2 is last updated {b_updated}, before the write was sent ({}); a is last updated {a_updated}",
        store::format_instant_ms(before_b)
    );
    // The chain goes on at node 2 with node 1's transactionTime.
    let (t2, second) = export(&n2, Some(&t1))
        .unwrap_or_else(|e| panic!("_since={t1} (node 1's transactionTime) at node 2: {e}"));
    assert_eq!(second, set(&["b"]), "_since={t1} at node 2");
    assert!(ms(&t2) >= ms(&b_updated), "{t2} before b's {b_updated}");
    // A client's own clock as `_since`, at node 1, and in a search.
    let (_, since_b) = export(&n1, Some(&store::format_instant_ms(before_b - 1)))
        .expect("an export since just before b");
    assert_eq!(since_b, set(&["b"]));

    // And back at node 1 with node 2's transactionTime.
    put(&n1, "c");
    let (_, third) = export(&n1, Some(&t2))
        .unwrap_or_else(|e| panic!("_since={t2} (node 2's transactionTime) at node 1: {e}"));
    assert_eq!(third, set(&["c"]), "_since={t2} at node 1");
    drop(n2);
    drop(n1);
}

/// Conditional creates of one condition sent at the same moment to two nodes of one database:
/// 32 clients, split over both nodes, `POST /Patient` with the same `If-None-Exist` (half with
/// its parameters in the other order) after one barrier, for three identifiers. Each condition
/// creates one Patient (201) and every other client gets it (200): the condition's lock is a
/// PostgreSQL advisory lock, held from before the condition's search until the create commits,
/// so a node's search waits for the other node's create.
#[test]
fn conditional_creates_of_one_condition_on_two_nodes_create_once() {
    let Some((database, root, http)) = postgres_set_up() else {
        return;
    };
    let shared = root.path().join("shared");
    fs::create_dir_all(&shared).expect("shared folder");
    let (pem, clients) = admin_client(root.path(), "system/*.cruds");
    let ports = [free_port(), free_port()];
    let cluster = Cluster {
        url: database.url.clone(),
        base: format!("http://127.0.0.1:{}", ports[0]),
        clients,
        root,
        dest: Dest::Shared(shared),
    };
    let nodes = [cluster.start("n1", ports[0]), cluster.start("n2", ports[1])];
    let bearer = admin_bearer(&pem, &nodes[0]);
    const CLIENTS: usize = 32;
    for round in 0..3 {
        let mrn = format!("two-nodes-{round}");
        let barrier = std::sync::Barrier::new(CLIENTS);
        let statuses: Vec<u16> = std::thread::scope(|scope| {
            let sent: Vec<_> = (0..CLIENTS)
                .map(|i| {
                    let (node, barrier, bearer, mrn) = (&nodes[i % 2], &barrier, &bearer, &mrn);
                    scope.spawn(move || {
                        let condition = if i % 4 < 2 {
                            format!("identifier=urn:x|{mrn}&birthdate=1970-01-01")
                        } else {
                            format!("birthdate=1970-01-01&identifier=urn:x|{mrn}")
                        };
                        let client = reqwest::blocking::Client::builder()
                            .timeout(Duration::from_secs(30))
                            .build()
                            .expect("client");
                        let request = client
                            .post(node.url("/Patient"))
                            .header("Authorization", bearer)
                            .header("Content-Type", "application/fhir+json")
                            .header("If-None-Exist", condition)
                            .body(
                                json!({"resourceType": "Patient", "birthDate": "1970-01-01",
                                    "identifier": [{"system": "urn:x", "value": mrn}]})
                                .to_string(),
                            );
                        barrier.wait();
                        request.send().expect("POST").status().as_u16()
                    })
                })
                .collect();
            sent.into_iter()
                .map(|t| t.join().expect("client"))
                .collect()
        });
        let found: Value = http
            .get(nodes[1].url(&format!("/Patient?identifier=urn:x|{mrn}&_summary=count")))
            .header("Authorization", &bearer)
            .send()
            .and_then(|r| r.json())
            .expect("count");
        let created = statuses.iter().filter(|s| **s == 201).count();
        let matched = statuses.iter().filter(|s| **s == 200).count();
        assert_eq!(
            (found["total"].as_u64(), created, matched),
            (Some(1), 1, CLIENTS - 1),
            "round {round}: answers {statuses:?}"
        );
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// `Bearer <token>` of `admin` (`system/*.cruds`) from `node`'s token endpoint, by
/// `fhirhose token` with the key at `pem`.
fn admin_bearer(pem: &Path, node: &Node) -> String {
    let token = fhirhose()
        .args(["token", "--client-id", "admin", "--key"])
        .arg(pem)
        .args(["--token-url", &node.url("/auth/token")])
        .args(["--scope", "system/*.cruds"])
        .output()
        .expect("token");
    assert!(token.status.success(), "{token:?}");
    let token: Value = serde_json::from_slice(&token.stdout).expect("token JSON");
    format!(
        "Bearer {}",
        token["access_token"].as_str().expect("access_token")
    )
}

/// `admin` (with `scope`) registered with the auth crate's test key, in `dir/clients.json`; returns its path
/// and the key's.
fn admin_client(dir: &Path, scope: &str) -> (PathBuf, PathBuf) {
    let pem = test_support::smart::key_path("rsa-a.pem");
    let jwks = fhirhose().arg("jwks").arg(&pem).output().expect("jwks");
    assert!(jwks.status.success(), "{jwks:?}");
    let jwks: Value = serde_json::from_slice(&jwks.stdout).expect("jwks JSON");
    let clients = dir.join("clients.json");
    fs::write(
        &clients,
        json!([{"client_id": "admin", "jwks": jwks, "scope": scope}]).to_string(),
    )
    .expect("clients");
    (pem, clients)
}

/// A `serve` process on its own SQLite data directory (mode smart), `--token-key key` if given.
fn serve_alone(
    dir: &Path,
    port: u16,
    base: &str,
    clients: &Path,
    key: Option<&Path>,
    stderr: Stdio,
) -> std::process::Child {
    let mut c = fhirhose();
    c.args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(dir)
        .args(["--base-url", base, "--auth", "smart", "--clients"])
        .arg(clients)
        .args(["--export-workers", "1"]);
    if let Some(key) = key {
        c.arg("--token-key").arg(key);
    }
    c.stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start fhirhose serve")
}

/// Tokens of a configured signing key (`--token-key FILE`): two processes on separate data
/// directories (no shared database) given the same file accept each other's tokens, a process
/// without it refuses them, and a key file that is too short stops the start-up with a message
/// that names the file but no key byte. Runs everywhere (SQLite).
#[test]
fn processes_given_one_token_key_accept_each_others_tokens() {
    let root = tempfile::tempdir().expect("tempdir");
    let (pem, clients) = admin_client(root.path(), "system/*.rs");
    let key = root.path().join("token.key");
    fs::write(
        &key,
        "6c1f0a3be0d94a3c8e2f7b5d4a9c0e1f2a3b4c5d6e7f8091a2b3c4d5e6f70812\n",
    )
    .expect("key");
    let ports = [free_port(), free_port(), free_port()];
    // One base URL (a load balancer's): the assertion's audience and the tokens' issuer.
    let base = format!("http://127.0.0.1:{}", ports[0]);
    let mut children: Vec<std::process::Child> = Vec::new();
    for (i, k) in [Some(key.as_path()), Some(key.as_path()), None]
        .into_iter()
        .enumerate()
    {
        let dir = root.path().join(format!("p{i}"));
        children.push(serve_alone(
            &dir,
            ports[i],
            &base,
            &clients,
            k,
            Stdio::null(),
        ));
    }
    struct Kill(Vec<std::process::Child>);
    impl Drop for Kill {
        fn drop(&mut self) {
            for c in &mut self.0 {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    let children = Kill(children);
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    for port in ports {
        wait_for(&format!("the process on {port} to answer"), || {
            http.get(format!("http://127.0.0.1:{port}/metadata"))
                .send()
                .ok()
                .filter(|r| r.status().is_success())
        });
    }
    let assertion = fhirhose()
        .args(["token", "--client-id", "admin", "--key"])
        .arg(&pem)
        .args(["--token-url", &format!("{base}/auth/token")])
        .args(["--scope", "system/*.rs", "--assertion-only"])
        .output()
        .expect("assertion");
    assert!(assertion.status.success(), "{assertion:?}");
    let assertion = String::from_utf8(assertion.stdout).expect("utf-8");
    let minted = http
        .post(format!("http://127.0.0.1:{}/auth/token", ports[0]))
        .form(&[
            ("grant_type", "client_credentials"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion.trim()),
            ("scope", "system/*.rs"),
        ])
        .send()
        .expect("token");
    assert_eq!(minted.status().as_u16(), 200);
    let token = minted.json::<Value>().expect("token JSON")["access_token"]
        .as_str()
        .expect("access_token")
        .to_string();
    let search = |port: u16| {
        http.get(format!("http://127.0.0.1:{port}/Patient?_count=1"))
            .bearer_auth(&token)
            .send()
            .expect("search")
            .status()
            .as_u16()
    };
    assert_eq!(search(ports[0]), 200, "the minting process");
    assert_eq!(
        search(ports[1]),
        200,
        "another process with the same --token-key"
    );
    assert_eq!(search(ports[2]), 401, "a process with a key of its own");
    drop(children);

    // Too short a key: refused at start-up, naming the file and no key material.
    let short = root.path().join("short.key");
    fs::write(&short, "0123456789abcdef\n").expect("short key");
    let out = serve_alone(
        &root.path().join("p3"),
        free_port(),
        &base,
        &clients,
        Some(&short),
        Stdio::piped(),
    )
    .wait_with_output()
    .expect("serve with a short key");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("short.key") && stderr.contains("32") && !stderr.contains("0123456789"),
        "{stderr}"
    );
}
