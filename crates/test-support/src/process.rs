//! Processes of a test: the binary with a clean environment, free ports, a started
//! `fhirhose serve` waited for until it answers, signals, log files.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// `program` with nothing of the caller's `FHIRHOSE_*` environment: the tests pass every setting
/// as a flag.
pub fn clean_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new(program);
    for (k, _) in std::env::vars() {
        if k.starts_with("FHIRHOSE_") {
            c.env_remove(k);
        }
    }
    c
}

/// A port nothing listens on now (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Waits (at most `bound`) until something accepts connections on 127.0.0.1:`port`.
pub fn wait_listening(port: u16, bound: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < bound {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// `kill -SIG pid`; its exit status (an error when `kill` could not run).
pub fn signal(pid: u32, sig: &str) -> std::io::Result<ExitStatus> {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
}

/// Waits (at most `bound`) for `child` to exit.
pub fn wait_exit(child: &mut Child, bound: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < bound {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// A log file opened for appending (for a child's stdout or stderr).
pub fn log_file(path: &Path) -> fs::File {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("log file")
}

/// The last 15 lines of a log (each cut at 400 characters), for an error message.
pub fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..]
        .iter()
        .map(|l| l.chars().take(400).collect::<String>())
        .collect::<Vec<_>>()
        .join("\n")
}

/// A log's text without terminal colour codes.
pub fn log_text(path: &Path) -> String {
    let raw = fs::read_to_string(path).unwrap_or_default();
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters, ending with a letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Regular files under `dir` (none when it does not exist).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// How long a started server may take to answer (a bound against hangs, not a timing
/// assertion).
pub const START_BOUND: Duration = Duration::from_secs(60);

/// Waits (at most `bound`) until the `serve` process `child` answers `GET {base}/metadata`; an
/// error when it exits first or never answers.
pub fn wait_answering(child: &mut Child, base: &str, bound: Duration) -> Result<(), String> {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| format!("http client: {e}"))?;
    let start = Instant::now();
    while start.elapsed() < bound {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("fhirhose serve exited early: {status}"));
        }
        if client
            .get(format!("{base}/metadata"))
            .send()
            .is_ok_and(|r| r.status().is_success())
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("fhirhose serve did not answer on {base}"))
}

/// [`wait_answering`] within [`START_BOUND`] that panics; the child is killed when it never
/// answers.
pub fn wait_until_answering(child: &mut Child, base: &str) {
    if let Err(e) = wait_answering(child, base, START_BOUND) {
        let _ = child.kill();
        panic!("{e}");
    }
}

/// A running `fhirhose serve` on 127.0.0.1, continued (if stopped), killed and waited for when
/// dropped.
pub struct Serve {
    pub child: Child,
    pub port: u16,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// Where its output goes, when the caller sent it to a file.
    pub log: Option<PathBuf>,
}

impl Serve {
    /// Spawns `cmd` (a `serve` listening on 127.0.0.1:`port`, its output already directed by the
    /// caller, to `log` if given) and waits until it answers; the error names why, with the
    /// log's tail.
    pub fn start(cmd: &mut Command, port: u16, log: Option<&Path>) -> Result<Serve, String> {
        let child = cmd
            .spawn()
            .map_err(|e| format!("start fhirhose serve: {e}"))?;
        let mut s = Serve {
            child,
            port,
            base: format!("http://127.0.0.1:{port}"),
            log: log.map(Path::to_path_buf),
        };
        if let Err(e) = wait_answering(&mut s.child, &s.base, START_BOUND) {
            return Err(match &s.log {
                Some(log) => format!("{e}\n{}", tail(log)),
                None => e,
            });
        }
        Ok(s)
    }

    /// `base` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Killed with SIGKILL and waited for.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Its log without terminal colour codes (empty without a log file).
    pub fn log_text(&self) -> String {
        self.log.as_deref().map(log_text).unwrap_or_default()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = signal(self.child.id(), "CONT");
        }
        self.kill9();
    }
}
