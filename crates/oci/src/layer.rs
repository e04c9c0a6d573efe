//! Finding one file inside a downloaded (and already digest-verified) layer blob.
//!
//! A layer is normally a gzip-compressed tar (`tar+gzip`); an uncompressed tar is read too, and so
//! is an ORAS-style "file" layer whose `org.opencontainers.image.title` annotation names the file
//! (its blob then *is* the file). Anything else is a bad layer. Decompression is bounded in bytes
//! and in time, so a gzip bomb can neither fill memory nor run forever.

use std::cell::Cell;
use std::io::{self, Read};
use std::time::Instant;

use crate::Limits;

/// What one layer says about the file.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum LayerOutcome {
    /// The file's bytes (at most `Limits::file`).
    Found(Vec<u8>),
    /// A whiteout (`.wh.<name>`) in this layer deletes the file from the layers below.
    Deleted,
    /// This layer does not mention the file.
    Absent,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ScanError {
    /// Not a (gzip-compressed) tar archive, or a corrupt one.
    Bad(String),
    /// The matching entry is larger than `Limits::file` (its declared size).
    FileTooLarge(u64),
    /// The layer decompresses to more than `Limits::decompressed`.
    DecompressedTooLarge,
    /// The fetch deadline passed while decompressing.
    Deadline,
}

/// Annotation that ORAS and others put on a layer holding a single file.
pub(crate) const TITLE_ANNOTATION: &str = "org.opencontainers.image.title";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trip {
    Limit,
    Deadline,
}

/// Bounds the decompressed stream in bytes and time; records why it stopped.
struct Bounded<'a, R> {
    inner: R,
    remaining: u64,
    deadline: Instant,
    tripped: &'a Cell<Option<Trip>>,
}

impl<R: Read> Read for Bounded<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if Instant::now() >= self.deadline {
            self.tripped.set(Some(Trip::Deadline));
            return Err(io::Error::other("deadline passed"));
        }
        let n = self.inner.read(buf)?;
        if n as u64 > self.remaining {
            self.tripped.set(Some(Trip::Limit));
            return Err(io::Error::other("decompressed size limit"));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// How well a path matches the wanted name: 2 = the exact path, 1 = its last component.
fn rank(path: &str, name: &str) -> u8 {
    if path == name {
        2
    } else if !name.contains('/') && last_component(path) == name {
        1
    } else {
        0
    }
}

fn last_component(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// `./a/b`, `/a/b`, `a/b/` → `a/b`.
fn normalize(path: &str) -> &str {
    let mut p = path;
    loop {
        if let Some(rest) = p.strip_prefix("./") {
            p = rest;
        } else if let Some(rest) = p.strip_prefix('/') {
            p = rest;
        } else {
            break;
        }
    }
    p.trim_end_matches('/')
}

/// Whether `path` is a whiteout of the wanted file: `.wh.<basename>` in the same directory
/// (for an exact-path name) or anywhere (for a bare file name, matching by last component).
fn is_whiteout(path: &str, name: &str) -> bool {
    let Some(hidden) = last_component(path).strip_prefix(".wh.") else {
        return false;
    };
    let dir = |p: &str| p.rsplit_once('/').map(|(d, _)| d.to_string());
    if name.contains('/') {
        hidden == last_component(name) && dir(path) == dir(name)
    } else {
        hidden == name
    }
}

/// Looks for `name` in one layer blob.
pub(crate) fn scan_layer(
    blob: &[u8],
    title: Option<&str>,
    name: &str,
    limits: &Limits,
    deadline: Instant,
) -> Result<LayerOutcome, ScanError> {
    let tripped = Cell::new(None);
    if blob.starts_with(&[0x1f, 0x8b]) {
        let reader = Bounded {
            inner: flate2::read::MultiGzDecoder::new(blob),
            remaining: limits.decompressed,
            deadline,
            tripped: &tripped,
        };
        return scan_tar(reader, name, limits.file, &tripped);
    }
    if blob.len() >= 262 && &blob[257..262] == b"ustar" {
        let reader = Bounded {
            inner: blob,
            remaining: limits.decompressed,
            deadline,
            tripped: &tripped,
        };
        return scan_tar(reader, name, limits.file, &tripped);
    }
    if let Some(title) = title {
        return if rank(normalize(title), name) > 0 {
            if blob.len() as u64 > limits.file {
                Err(ScanError::FileTooLarge(blob.len() as u64))
            } else {
                Ok(LayerOutcome::Found(blob.to_vec()))
            }
        } else {
            Ok(LayerOutcome::Absent)
        };
    }
    Err(ScanError::Bad(
        "the layer is not a gzip-compressed tar archive".to_string(),
    ))
}

fn scan_tar<R: Read>(
    reader: R,
    name: &str,
    max_file: u64,
    tripped: &Cell<Option<Trip>>,
) -> Result<LayerOutcome, ScanError> {
    let fail = |e: io::Error| match tripped.get() {
        Some(Trip::Limit) => ScanError::DecompressedTooLarge,
        Some(Trip::Deadline) => ScanError::Deadline,
        None => ScanError::Bad(format!("the layer is not a valid tar.gz archive: {e}")),
    };
    let mut archive = tar::Archive::new(reader);
    let mut best: Option<(u8, Vec<u8>)> = None;
    let mut whiteout = false;
    for entry in archive.entries().map_err(fail)? {
        let mut entry = entry.map_err(fail)?;
        let raw_path = entry.path_bytes();
        // Entry names that are not UTF-8 can never equal the (UTF-8) wanted name.
        let Ok(path) = std::str::from_utf8(&raw_path) else {
            continue;
        };
        let path = normalize(path).to_string();
        let kind = entry.header().entry_type();
        if is_whiteout(&path, name) {
            whiteout = true;
            continue;
        }
        let r = rank(&path, name);
        if r == 0 || !(kind.is_file() || kind == tar::EntryType::Continuous) {
            // Directories, links and devices are never followed.
            continue;
        }
        let size = entry.size();
        if size > max_file {
            return Err(ScanError::FileTooLarge(size));
        }
        let mut bytes = Vec::with_capacity(size as usize);
        (&mut entry)
            .take(max_file + 1)
            .read_to_end(&mut bytes)
            .map_err(fail)?;
        if bytes.len() as u64 > max_file {
            return Err(ScanError::FileTooLarge(bytes.len() as u64));
        }
        // A later entry of equal rank wins (as when the archive is extracted); an exact path wins
        // over a last-component match.
        if best.as_ref().is_none_or(|(b, _)| r >= *b) {
            best = Some((r, bytes));
        }
    }
    Ok(match best {
        Some((_, bytes)) => LayerOutcome::Found(bytes),
        None if whiteout => LayerOutcome::Deleted,
        None => LayerOutcome::Absent,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    /// A tar.gz with the given (path, content) regular files.
    pub(crate) fn tar_gz(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar_bytes(files)).unwrap();
        gz.finish().unwrap()
    }

    pub(crate) fn tar_bytes(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, content) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(content.len() as u64);
            header.set_mode(0o644);
            header.set_entry_type(tar::EntryType::Regular);
            builder.append_data(&mut header, path, *content).unwrap();
        }
        builder.into_inner().unwrap()
    }

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    const MAX_FILE_BYTES: u64 = crate::MAX_FILE_BYTES;

    fn scan(blob: &[u8], name: &str) -> Result<LayerOutcome, ScanError> {
        scan_layer(blob, None, name, &Limits::default(), later())
    }

    #[test]
    fn finds_by_exact_path_or_last_component() {
        let blob = tar_gz(&[
            ("other.json", b"o"),
            ("./configs/r4-config.json", b"deep"),
            ("readme", b"r"),
        ]);
        assert_eq!(
            scan(&blob, "r4-config.json"),
            Ok(LayerOutcome::Found(b"deep".to_vec()))
        );
        assert_eq!(
            scan(&blob, "configs/r4-config.json"),
            Ok(LayerOutcome::Found(b"deep".to_vec()))
        );
        assert_eq!(
            scan(&blob, "other/r4-config.json"),
            Ok(LayerOutcome::Absent)
        );
        assert_eq!(scan(&blob, "config.json"), Ok(LayerOutcome::Absent));
        assert_eq!(scan(&blob, "r4-config"), Ok(LayerOutcome::Absent));

        // Exact path beats a last-component match, whatever the order.
        let blob = tar_gz(&[("r4-config.json", b"top"), ("a/r4-config.json", b"nested")]);
        assert_eq!(
            scan(&blob, "r4-config.json"),
            Ok(LayerOutcome::Found(b"top".to_vec()))
        );
        let blob = tar_gz(&[("a/r4-config.json", b"nested"), ("r4-config.json", b"top")]);
        assert_eq!(
            scan(&blob, "r4-config.json"),
            Ok(LayerOutcome::Found(b"top".to_vec()))
        );
        // Among equal ranks the later entry wins.
        let blob = tar_gz(&[("r4-config.json", b"first"), ("r4-config.json", b"second")]);
        assert_eq!(
            scan(&blob, "r4-config.json"),
            Ok(LayerOutcome::Found(b"second".to_vec()))
        );
        // Uncompressed tar works too.
        let blob = tar_bytes(&[("r4-config.json", b"plain")]);
        assert_eq!(
            scan(&blob, "r4-config.json"),
            Ok(LayerOutcome::Found(b"plain".to_vec()))
        );
    }

    #[test]
    fn ignores_directories_and_links() {
        let mut builder = tar::Builder::new(Vec::new());
        let mut dir = tar::Header::new_gnu();
        dir.set_entry_type(tar::EntryType::Directory);
        dir.set_size(0);
        builder
            .append_data(&mut dir, "r4-config.json/", io::empty())
            .unwrap();
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_size(0);
        builder
            .append_link(&mut link, "x/r4-config.json", "/etc/passwd")
            .unwrap();
        let tar = builder.into_inner().unwrap();
        assert_eq!(scan(&tar, "r4-config.json"), Ok(LayerOutcome::Absent));
    }

    #[test]
    fn whiteouts_delete() {
        let blob = tar_gz(&[("cfg/.wh.r4-config.json", b"")]);
        assert_eq!(scan(&blob, "r4-config.json"), Ok(LayerOutcome::Deleted));
        assert_eq!(scan(&blob, "cfg/r4-config.json"), Ok(LayerOutcome::Deleted));
        assert_eq!(
            scan(&blob, "other/r4-config.json"),
            Ok(LayerOutcome::Absent)
        );
    }

    #[test]
    fn size_limits() {
        let big = vec![b'x'; MAX_FILE_BYTES as usize + 1];
        let blob = tar_gz(&[("r4-config.json", &big)]);
        assert_eq!(
            scan(&blob, "r4-config.json"),
            Err(ScanError::FileTooLarge(MAX_FILE_BYTES + 1))
        );
        // Exactly the limit is fine; a big file under another name is skipped.
        let exact = vec![b'y'; MAX_FILE_BYTES as usize];
        let blob = tar_gz(&[("big.bin", &big), ("r4-config.json", &exact)]);
        assert_eq!(
            scan(&blob, "r4-config.json"),
            Ok(LayerOutcome::Found(exact))
        );
        // A raw (title-annotated) file layer.
        assert_eq!(
            scan_layer(
                &big,
                Some("r4-config.json"),
                "r4-config.json",
                &Limits::default(),
                later()
            ),
            Err(ScanError::FileTooLarge(MAX_FILE_BYTES + 1))
        );
    }

    #[test]
    fn title_annotated_file_layers() {
        let json = br#"{"fhirVersion":"R4"}"#;
        assert_eq!(
            scan_layer(
                json,
                Some("r4-config.json"),
                "r4-config.json",
                &Limits::default(),
                later()
            ),
            Ok(LayerOutcome::Found(json.to_vec()))
        );
        assert_eq!(
            scan_layer(
                json,
                Some("other.json"),
                "r4-config.json",
                &Limits::default(),
                later()
            ),
            Ok(LayerOutcome::Absent)
        );
        // Without a title a non-archive is a bad layer.
        assert!(matches!(
            scan(json, "r4-config.json"),
            Err(ScanError::Bad(_))
        ));
    }

    #[test]
    fn garbage_is_a_bad_layer_not_a_panic() {
        let good = tar_gz(&[("r4-config.json", b"{}"), ("b", &[7u8; 5000])]);
        let mut inputs: Vec<Vec<u8>> = vec![
            vec![],
            vec![0x1f],
            vec![0x1f, 0x8b],
            vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3],
            b"not a tar at all".to_vec(),
        ];
        // Every truncation and a few corruptions of a valid layer.
        for cut in (0..good.len()).step_by(7) {
            inputs.push(good[..cut].to_vec());
        }
        for i in (0..good.len()).step_by(5) {
            let mut c = good.clone();
            c[i] ^= 0x55;
            inputs.push(c);
        }
        // A gzip of something that is not a tar.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&[0xAB; 2000]).unwrap();
        inputs.push(gz.finish().unwrap());
        for input in inputs {
            // Any outcome is acceptable except a panic; truncated gzip must not be "found".
            let _ = scan(&input, "r4-config.json");
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&[0xAB; 2000]).unwrap();
        assert!(matches!(
            scan(&gz.finish().unwrap(), "r4-config.json"),
            Err(ScanError::Bad(_))
        ));
    }

    #[test]
    fn gzip_bomb_is_bounded() {
        // 64 MiB of zeros compress to a few hundred KiB; with a 16 MiB decompression limit the
        // scan stops early (the real limit is larger, the mechanism the same).
        let limits = Limits {
            decompressed: 16 << 20,
            ..Limits::default()
        };
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut header = tar::Header::new_gnu();
        header.set_path("huge.bin").unwrap();
        header.set_size(64 << 20);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        gz.write_all(header.as_bytes()).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..64 {
            gz.write_all(&zeros).unwrap();
        }
        let bomb = gz.finish().unwrap();
        assert_eq!(
            scan_layer(&bomb, None, "r4-config.json", &limits, later()),
            Err(ScanError::DecompressedTooLarge)
        );
        // And a passed deadline stops it as well.
        assert_eq!(
            scan_layer(&bomb, None, "r4-config.json", &limits, Instant::now()),
            Err(ScanError::Deadline)
        );
    }

    #[test]
    fn path_helpers() {
        assert_eq!(normalize("./a/b"), "a/b");
        assert_eq!(normalize("/./a/b/"), "a/b");
        assert_eq!(normalize("././x"), "x");
        assert_eq!(rank("a/b.json", "b.json"), 1);
        assert_eq!(rank("b.json", "b.json"), 2);
        assert_eq!(rank("a/b.json", "a/b.json"), 2);
        assert_eq!(rank("c/a/b.json", "a/b.json"), 0);
        assert!(is_whiteout(".wh.b.json", "b.json"));
        assert!(is_whiteout("x/.wh.b.json", "b.json"));
        assert!(is_whiteout("a/.wh.b.json", "a/b.json"));
        assert!(!is_whiteout(".wh.b.json", "a/b.json"));
        assert!(!is_whiteout("b.json", "b.json"));
    }
}
