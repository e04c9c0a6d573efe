//! Bounds on what a counterpart can make `verify` hold in memory: one manifest (page) body and
//! one line of an NDJSON file. A hostile or broken server (or a gzip bomb) otherwise grows a
//! buffer until the process is killed.

use std::io::{BufRead, Read};

/// The largest manifest (page) read, in bytes: a manifest lists files, not resources, so real
/// ones are far smaller (about 300 bytes an entry: 64 MiB is some 200,000 files).
pub const MAX_MANIFEST_BYTES: u64 = 64 * 1024 * 1024;

/// The longest NDJSON line read, in bytes: the server's `$import` takes no longer one
/// (`export::import::MAX_LINE_BYTES`), so a longer line is no resource it could have written.
pub const MAX_LINE_BYTES: usize = 64 * 1024 * 1024;

/// What [`read_line`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Line {
    /// The end of the input.
    End,
    /// A line in the buffer (with its newline, if it had one).
    Read,
    /// A line longer than the limit: skipped to its end, the buffer cleared.
    TooLong,
}

/// Reads one line into `buf` (cleared first), at most `max` bytes of it: a longer line is read
/// to its end without being kept, so memory stays bounded whatever the input.
pub(crate) fn read_line(
    reader: &mut dyn BufRead,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Line> {
    buf.clear();
    let n = (&mut *reader).take(max as u64 + 1).read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(Line::End);
    }
    if buf.last() == Some(&b'\n') || buf.len() <= max {
        return Ok(Line::Read);
    }
    buf.clear();
    loop {
        let chunk = reader.fill_buf()?;
        if chunk.is_empty() {
            return Ok(Line::TooLong);
        }
        match chunk.iter().position(|b| *b == b'\n') {
            Some(i) => {
                reader.consume(i + 1);
                return Ok(Line::TooLong);
            }
            None => {
                let len = chunk.len();
                reader.consume(len);
            }
        }
    }
}

/// At most `max` bytes of `reader`: `Ok(None)` when it holds more (reading stops there).
pub(crate) fn read_at_most(reader: impl Read, max: u64) -> std::io::Result<Option<Vec<u8>>> {
    let mut body = Vec::new();
    reader.take(max + 1).read_to_end(&mut body)?;
    Ok((body.len() as u64 <= max).then_some(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_past_the_limit_is_skipped_without_being_kept() {
        let input = b"short\nAAAAAAAAAAAAAAAAAAAA\nnext\nlast".to_vec();
        let mut r = std::io::BufReader::with_capacity(4, input.as_slice());
        let mut buf = Vec::new();
        assert_eq!(read_line(&mut r, &mut buf, 8).unwrap(), Line::Read);
        assert_eq!(buf, b"short\n");
        assert_eq!(read_line(&mut r, &mut buf, 8).unwrap(), Line::TooLong);
        assert!(buf.is_empty());
        assert_eq!(read_line(&mut r, &mut buf, 8).unwrap(), Line::Read);
        assert_eq!(buf, b"next\n");
        assert_eq!(read_line(&mut r, &mut buf, 8).unwrap(), Line::Read);
        assert_eq!(buf, b"last");
        assert_eq!(read_line(&mut r, &mut buf, 8).unwrap(), Line::End);
        assert_eq!(
            read_at_most(&b"12345"[..], 5).unwrap(),
            Some(b"12345".to_vec())
        );
        assert_eq!(read_at_most(&b"123456"[..], 5).unwrap(), None);
    }
}
