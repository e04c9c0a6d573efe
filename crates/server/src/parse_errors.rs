//! hyper answers an HTTP/1 request it cannot parse by itself, before any of our code sees it:
//! `400` (a malformed request line or header field), `414` (a URI longer than 65,534 bytes) or
//! `431` (more than 100 header fields, or a header section larger than its read buffer), each
//! with an empty body. Every error of this API is an OperationOutcome ([`crate::error`]), so
//! [`OutcomeOnParseError`] wraps each connection's socket and writes those three answers with
//! one: hyper's whole answer — its status line, `connection: close`, `content-length: 0`, the
//! blank line, nothing else — is recognised in the write that carries it and replaced by the
//! same status with an OperationOutcome body. Nothing else written on a connection is touched.
//!
//! hyper closes the connection after such an answer, so no request follows it on the same
//! connection. HTTP/2 connections pass through unchanged: their frames never look like an
//! HTTP/1 status line.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use ingest::outcome::{OutcomeIssue, operation_outcome};

/// hyper's answer is about 100 bytes; a longer write is never one.
const MAX_HEAD: usize = 512;

/// A connection's socket whose hyper-made parse-error answers carry an OperationOutcome.
pub struct OutcomeOnParseError<T> {
    inner: T,
    /// The replacement answer and how much of it is written.
    pending: Option<(Vec<u8>, usize)>,
}

impl<T> OutcomeOnParseError<T> {
    pub fn new(inner: T) -> OutcomeOnParseError<T> {
        OutcomeOnParseError {
            inner,
            pending: None,
        }
    }
}

impl<T: AsyncWrite + Unpin> OutcomeOnParseError<T> {
    /// Writes what is left of a replacement answer; ready once none is left.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, done)) = &mut self.pending {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*done..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *done += n;
            if *done == bytes.len() {
                self.pending = None;
            }
        }
        Poll::Ready(Ok(()))
    }

    /// `buf` is hyper's parse-error answer: it is taken whole and its replacement written
    /// instead (as far as the socket takes it now; flush and shutdown write the rest).
    fn replace(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Option<Poll<io::Result<usize>>> {
        let answer = replacement(buf)?;
        self.pending = Some((answer, 0));
        Some(match self.drain(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(buf.len())),
        })
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for OutcomeOnParseError<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for OutcomeOnParseError<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.drain(cx))?;
        if let Some(done) = this.replace(cx, buf) {
            return done;
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.drain(cx))?;
        // hyper's answer is one buffer of its own (a head and no body).
        if let Some(first) = bufs.iter().find(|b| !b.is_empty())
            && let Some(done) = this.replace(cx, first)
        {
            return done;
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// The answer with an OperationOutcome for `buf` when `buf` is exactly one of hyper's
/// parse-error answers; `None` for anything else.
fn replacement(buf: &[u8]) -> Option<Vec<u8>> {
    if buf.len() > MAX_HEAD || !(buf.starts_with(b"HTTP/1.1 4") || buf.starts_with(b"HTTP/1.0 4")) {
        return None;
    }
    let head = std::str::from_utf8(buf).ok()?.strip_suffix("\r\n\r\n")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let (code, diagnostics) = match status_line.get(9..)? {
        "400 Bad Request" => (
            "structure",
            "the request could not be read as HTTP: a malformed request line or header field",
        ),
        "414 URI Too Long" => (
            "too-long",
            "the request's URI is longer than 65,534 bytes; send a long search as \
             POST [type]/_search with the parameters in a form body",
        ),
        "431 Request Header Fields Too Large" => (
            "too-long",
            "the request's header section is too large: more than 100 header fields, or \
             more than 408 KiB",
        ),
        _ => return None,
    };
    let (mut close, mut empty, mut date) = (false, false, None);
    for line in lines {
        let (name, value) = line.split_once(": ")?;
        match name.to_ascii_lowercase().as_str() {
            "connection" if value.eq_ignore_ascii_case("close") => close = true,
            "content-length" if value == "0" => empty = true,
            "date" => date = Some(line),
            _ => return None,
        }
    }
    if !(close && empty) {
        return None;
    }
    let body = serde_json::to_vec(&operation_outcome(&[OutcomeIssue::error(
        code,
        diagnostics,
    )]))
    .ok()?;
    let mut out = format!(
        "{status_line}\r\ncontent-type: application/fhir+json; charset=utf-8\r\n\
         connection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    if let Some(date) = date {
        out.push_str(date);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(&body);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYPER_414: &[u8] = b"HTTP/1.1 414 URI Too Long\r\nconnection: close\r\n\
        content-length: 0\r\ndate: Sun, 06 Dec 2026 07:52:31 GMT\r\n\r\n";

    fn parts(answer: &[u8]) -> (String, serde_json::Value) {
        let text = std::str::from_utf8(answer).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        (head.to_string(), serde_json::from_str(body).unwrap())
    }

    #[test]
    fn hypers_three_answers_get_an_operation_outcome() {
        for (raw, status, code) in [
            (HYPER_414.to_vec(), "414 URI Too Long", "too-long"),
            (
                b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
                    .to_vec(),
                "400 Bad Request",
                "structure",
            ),
            (
                b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\
                  connection: close\r\ndate: x\r\n\r\n"
                    .to_vec(),
                "431 Request Header Fields Too Large",
                "too-long",
            ),
        ] {
            let answer = replacement(&raw).expect("replaced");
            let (head, body) = parts(&answer);
            assert!(
                head.starts_with(&format!("HTTP/1.1 {status}\r\n")),
                "{head}"
            );
            assert!(
                head.contains("content-type: application/fhir+json"),
                "{head}"
            );
            assert!(head.contains("connection: close"), "{head}");
            let len = answer.len() - head.len() - 4;
            assert!(
                head.split("\r\n")
                    .any(|l| l == format!("content-length: {len}")),
                "{head}"
            );
            assert_eq!(body["resourceType"], "OperationOutcome");
            assert_eq!(body["issue"][0]["code"], code);
        }
        let (head, _) = parts(&replacement(HYPER_414).unwrap());
        assert!(
            head.ends_with("date: Sun, 06 Dec 2026 07:52:31 GMT"),
            "{head}"
        );
    }

    #[test]
    fn anything_else_is_left_alone() {
        for raw in [
            // Our own answers have a body and a type.
            &b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/fhir+json\r\n\
               content-length: 87\r\n\r\n"[..],
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 404 Not Found\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            // More than the head: a body follows.
            b"HTTP/1.1 414 URI Too Long\r\nconnection: close\r\ncontent-length: 0\r\n\r\nx",
            b"HTTP/1.1 414 URI Too Long\r\nconnection: close\r\ncontent-length: 0\r\n",
            b"{\"resourceType\":\"Patient\"}\n",
            b"HTTP/1.1 4",
            b"",
        ] {
            assert!(
                replacement(raw).is_none(),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        let mut long = HYPER_414.to_vec();
        long.splice(26..26, vec![b'x'; MAX_HEAD]);
        assert!(replacement(&long).is_none());
    }

    #[tokio::test]
    async fn a_replaced_answer_is_written_whole_through_a_small_socket() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A socket that takes 7 bytes at a time.
        let (client, server) = tokio::io::duplex(7);
        let mut conn = OutcomeOnParseError::new(server);
        let reader = tokio::spawn(async move {
            let mut client = client;
            let mut all = Vec::new();
            client.read_to_end(&mut all).await.unwrap();
            all
        });
        assert_eq!(conn.write(HYPER_414).await.unwrap(), HYPER_414.len());
        conn.shutdown().await.unwrap();
        drop(conn);
        let all = reader.await.unwrap();
        assert_eq!(all, replacement(HYPER_414).unwrap());
    }
}
