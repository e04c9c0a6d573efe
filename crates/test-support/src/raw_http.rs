//! A hand-written HTTP/1.1 server for the tests that need what no honest server sends: lying
//! `Content-Length`s, endless chunked bodies, pages that loop, answers that never come, bytes
//! that are not HTTP at all. A real server (ours, a registry, Azurite) cannot be made to
//! misbehave like this, so the clients' hostile-server tests (the export client, `verify`, the
//! manifest reader, the OCI puller) share this one instead of each writing its own.
//!
//! One thread per connection; each request is read whole (head up to 64 KiB, then a
//! `Content-Length` body), recorded, and answered by the test's closure. Every formed answer
//! closes its connection (`connection: close`), so an answer whose length lies ends at the
//! close instead of leaving the client waiting for a second request's bytes.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One request as the server read it.
#[derive(Clone, Debug, Default)]
pub struct Request {
    /// The request line (`GET /path?q HTTP/1.1`).
    pub line: String,
    /// `GET`, `POST`, …
    pub method: String,
    /// The request target as sent: path and query.
    pub target: String,
    /// Header names lowercased, values trimmed, in the order sent.
    pub headers: Vec<(String, String)>,
    /// The body (`Content-Length` bytes; chunked request bodies are not read).
    pub body: Vec<u8>,
}

impl Request {
    /// The target without its query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }

    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What the server answers.
#[derive(Clone)]
pub enum Reply {
    /// A formed answer: `Content-Length` is the body's unless `headers` names one (a lie).
    Full {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// A chunked body of `times` chunks (finite, so that a client without a bound fills no disk
    /// or memory when its test fails), the bytes written counted in `written` until the client
    /// hangs up.
    Chunked {
        status: u16,
        chunk: Vec<u8>,
        times: usize,
        written: Arc<AtomicUsize>,
    },
    /// These bytes as they are, then the connection closed.
    Raw(Vec<u8>),
    /// No answer: the connection held open this long, then closed.
    Hold(Duration),
}

impl Reply {
    /// `status` with `body` and no header beyond the length.
    pub fn status(status: u16, body: impl Into<Vec<u8>>) -> Reply {
        Reply::Full {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// 200 with a JSON body.
    pub fn json(body: impl Into<Vec<u8>>) -> Reply {
        Reply::status(200, body).header("content-type", "application/json")
    }

    /// This answer with one more header (no effect on other kinds of answer).
    pub fn header(mut self, name: &str, value: impl Into<String>) -> Reply {
        if let Reply::Full { headers, .. } = &mut self {
            headers.push((name.to_owned(), value.into()));
        }
        self
    }
}

type Answer = dyn Fn(&Request) -> Reply + Send + Sync;

/// A running server; it lives as long as the test process (its threads are never joined).
pub struct Server {
    base: String,
    seen: Arc<Mutex<Vec<Request>>>,
}

impl Server {
    /// A server on a fresh loopback port answering every request with `answer`.
    pub fn start(answer: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> Server {
        Server::start_on("127.0.0.1:0", answer)
    }

    /// [`Server::start`] on `addr` (e.g. `127.0.0.1:0`, or `localhost:0` for a host name).
    pub fn start_on(
        addr: &str,
        answer: impl Fn(&Request) -> Reply + Send + Sync + 'static,
    ) -> Server {
        let listener = TcpListener::bind(addr).expect("bind the test server");
        let base = format!("http://{}", listener.local_addr().unwrap());
        let seen: Arc<Mutex<Vec<Request>>> = Arc::default();
        let answer: Arc<Answer> = Arc::new(answer);
        let log = seen.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (log, answer) = (log.clone(), answer.clone());
                std::thread::spawn(move || serve(conn, &log, &*answer));
            }
        });
        Server { base, seen }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        self.base.trim_start_matches("http://")
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Request> {
        self.seen.lock().unwrap().clone()
    }

    /// Every request's target and `Authorization` header, in order.
    pub fn seen(&self) -> Vec<(String, Option<String>)> {
        let seen = self.seen.lock().unwrap();
        seen.iter()
            .map(|r| {
                (
                    r.target.clone(),
                    r.header("authorization").map(str::to_owned),
                )
            })
            .collect()
    }
}

/// Reads one request from `conn`: `None` when the client hung up or sent no HTTP head.
fn read_request(conn: &mut TcpStream) -> Option<Request> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 64 << 10 || conn.read(&mut byte).ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.lines();
    let line = lines.next()?.to_owned();
    let mut parts = line.split(' ');
    let method = parts.next().unwrap_or_default().to_owned();
    let target = parts.next().unwrap_or_default().to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut request = Request {
        line,
        method,
        target,
        headers,
        body: Vec::new(),
    };
    let length: usize = request
        .header("content-length")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    request.body = vec![0; length.min(64 << 20)];
    conn.read_exact(&mut request.body).ok()?;
    Some(request)
}

fn serve(mut conn: TcpStream, log: &Mutex<Vec<Request>>, answer: &Answer) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let Some(request) = read_request(&mut conn) else {
        return;
    };
    log.lock().unwrap().push(request.clone());
    match answer(&request) {
        Reply::Full {
            status,
            headers,
            body,
        } => {
            let mut head = format!("HTTP/1.1 {status} X\r\nconnection: close\r\n");
            if !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            {
                head.push_str(&format!("content-length: {}\r\n", body.len()));
            }
            for (k, v) in headers {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str("\r\n");
            let _ = conn.write_all(head.as_bytes());
            let _ = conn.write_all(&body);
        }
        Reply::Chunked {
            status,
            chunk,
            times,
            written,
        } => {
            let head = format!(
                "HTTP/1.1 {status} X\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n"
            );
            if conn.write_all(head.as_bytes()).is_err() {
                return;
            }
            let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
            framed.extend_from_slice(&chunk);
            framed.extend_from_slice(b"\r\n");
            for _ in 0..times {
                if conn.write_all(&framed).is_err() {
                    return;
                }
                written.fetch_add(chunk.len(), Ordering::Relaxed);
            }
            let _ = conn.write_all(b"0\r\n\r\n");
        }
        Reply::Raw(bytes) => {
            let _ = conn.write_all(&bytes);
        }
        Reply::Hold(how_long) => std::thread::sleep(how_long),
    }
    let _ = conn.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(addr: &str, request: &str) -> String {
        let mut conn = TcpStream::connect(addr).unwrap();
        conn.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        conn.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn answers_records_and_closes() {
        let server = Server::start(|r| match r.path() {
            "/lie" => Reply::json("{}").header("content-length", "99"),
            "/raw" => Reply::Raw(b"not http".to_vec()),
            _ => Reply::json(format!("{{\"body\":{}}}", r.body.len())),
        });
        let out = get(
            server.addr(),
            "POST /x?q=1 HTTP/1.1\r\nAuthorization: Bearer T\r\nContent-Length: 3\r\n\r\nabc",
        );
        assert!(out.starts_with("HTTP/1.1 200 X\r\n"), "{out}");
        assert!(out.contains("content-length: 10\r\n"), "{out}");
        assert!(out.ends_with("{\"body\":3}"), "{out}");
        let out = get(server.addr(), "GET /lie HTTP/1.1\r\n\r\n");
        assert!(
            out.contains("content-length: 99\r\n") && out.ends_with("{}"),
            "{out}"
        );
        assert_eq!(get(server.addr(), "GET /raw HTTP/1.1\r\n\r\n"), "not http");
        assert_eq!(
            server.seen(),
            [
                ("/x?q=1".to_owned(), Some("Bearer T".to_owned())),
                ("/lie".to_owned(), None),
                ("/raw".to_owned(), None)
            ]
        );
        assert_eq!(server.requests()[0].method, "POST");
        assert_eq!(server.requests()[0].body, b"abc");
    }

    #[test]
    fn a_chunked_answer_is_counted() {
        let written = Arc::new(AtomicUsize::new(0));
        let w = written.clone();
        let server = Server::start(move |_| Reply::Chunked {
            status: 200,
            chunk: b"ab".to_vec(),
            times: 3,
            written: w.clone(),
        });
        let out = get(server.addr(), "GET / HTTP/1.1\r\n\r\n");
        assert!(
            out.ends_with("2\r\nab\r\n2\r\nab\r\n2\r\nab\r\n0\r\n\r\n"),
            "{out}"
        );
        assert_eq!(written.load(Ordering::Relaxed), 6);
    }
}
