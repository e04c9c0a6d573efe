//! The files an export writes, wrapped so that the manifest can say what was stored: each part
//! counts and hashes (SHA-256) its bytes as they go to the destination — local folder, Azure or
//! S3 alike, never by reading the file back — and optionally gzip-compresses them first
//! (`.ndjson.gz`; the size and digest are then those of the compressed, stored bytes).

use std::io::Write;

use flate2::write::GzEncoder;
use manifest::DigestWriter;

use crate::sink::{PartWriter, Sink, SinkError};

enum Inner {
    Plain(DigestWriter<Box<dyn PartWriter>>),
    // Boxed: the encoder (zlib-rs) is larger than the plain writer.
    Gzip(Box<GzEncoder<DigestWriter<Box<dyn PartWriter>>>>),
}

/// A part being written: the destination's writer under a digest (and a gzip encoder).
pub struct Part {
    inner: Inner,
    name: String,
}

/// Creates a part at `path` in `container` of `sink`.
pub fn create(
    sink: &dyn Sink,
    container: &str,
    path: &str,
    gzip: bool,
) -> Result<Box<dyn PartWriter>, SinkError> {
    let w = DigestWriter::new(sink.create(container, path)?);
    let inner = if gzip {
        // Level 1: most of what level 6 saves on NDJSON, at a fraction of the CPU time.
        Inner::Gzip(Box::new(GzEncoder::new(w, flate2::Compression::fast())))
    } else {
        Inner::Plain(w)
    };
    Ok(Box::new(Part {
        inner,
        name: format!("{container}/{path}"),
    }))
}

impl Write for Part {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut self.inner {
            Inner::Plain(w) => w.write(buf),
            Inner::Gzip(w) => w.write(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match &mut self.inner {
            Inner::Plain(w) => w.write_all(buf),
            Inner::Gzip(w) => w.write_all(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.inner {
            Inner::Plain(w) => w.flush(),
            Inner::Gzip(w) => w.flush(),
        }
    }
}

impl PartWriter for Part {
    fn finish(self: Box<Self>) -> Result<u64, SinkError> {
        self.finish_digest().map(|(bytes, _)| bytes)
    }

    fn finish_digest(self: Box<Self>) -> Result<(u64, Option<String>), SinkError> {
        let Part { inner, name } = *self;
        let digest = match inner {
            Inner::Plain(w) => w,
            Inner::Gzip(w) => w.finish().map_err(|e| SinkError::from_io(&name, e))?,
        };
        let (mut w, bytes, sha256) = digest.into_parts();
        w.flush().map_err(|e| SinkError::from_io(&name, e))?;
        let stored = w.finish()?;
        if stored != bytes {
            return Err(SinkError::from_io(
                &name,
                std::io::Error::other(format!(
                    "the destination took {stored} bytes of {bytes} written"
                )),
            ));
        }
        Ok((bytes, Some(sha256)))
    }
}
