//! Where export files go: [`Sink`], with the local-folder implementation [`LocalSink`] (the
//! default, `<data-dir>/storage/<container>/…`). Object stores (Azure Blob, S3) plug in through
//! the same trait (see `remote.rs`).
//!
//! Architecture Invariant: a part is written under a temporary path and becomes visible under its
//! final name only by [`Sink::rename`] after [`PartWriter::finish`] — a reader never sees a half
//! file.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("container '{0}' not found on the destination")]
    ContainerNotFound(String),
    #[error("'{0}' not found on the destination")]
    NotFound(String),
    #[error("'{path}' is larger than {limit} bytes")]
    TooLarge { path: String, limit: u64 },
    /// Worth retrying (network, throttling, a destination that refused for now).
    #[error("destination unavailable: {0}")]
    Unavailable(String),
    /// The destination refused for good: credentials refused (401/403), bucket or container
    /// missing, request invalid. Retrying cannot help.
    #[error("{0}")]
    Refused(String),
    /// The local file system is full (ENOSPC) or over quota.
    #[error("no space left on the destination: {0}")]
    NoSpace(String),
    #[error("destination: {0}")]
    Failed(String),
}

impl SinkError {
    /// An I/O error on `what` (a container-relative name: never a server path).
    pub fn from_io(what: &str, e: std::io::Error) -> SinkError {
        // A remote part's `write` carries the destination's error, classified already.
        if e.get_ref().is_some_and(|inner| inner.is::<SinkError>()) {
            return match e.into_inner().map(|inner| inner.downcast::<SinkError>()) {
                Some(Ok(inner)) => *inner,
                _ => SinkError::Failed(format!("{what}: write failed")),
            };
        }
        // ENOSPC, EDQUOT
        if e.kind() == std::io::ErrorKind::StorageFull || matches!(e.raw_os_error(), Some(28 | 122))
        {
            SinkError::NoSpace(what.to_string())
        } else if io_is_transient(&e) {
            SinkError::Unavailable(format!("{what}: {e}"))
        } else {
            SinkError::Failed(format!("{what}: {e}"))
        }
    }

    /// Whether another attempt may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, SinkError::Unavailable(_))
    }
}

/// Whether an OS error of a local (or network-mounted) file system is a state of the mount or
/// of the machine that passes — the same call may succeed later, so the export retries it with
/// its back-off and a deletion is retried by the sweeper — rather than a property of the
/// request that no retry changes.
///
/// Transient:
/// - `EIO`: a network mount whose server went away, a device that failed a request. A disk
///   that is really broken keeps failing: the item's attempts are bounded, so it still fails.
/// - `ESTALE`: an NFS handle invalidated by a server restart or a re-export.
/// - `ETIMEDOUT`, `ENOTCONN` ("transport endpoint is not connected": a FUSE, SMB or NFS mount
///   whose daemon or session died), `EHOSTDOWN`, `EHOSTUNREACH`, `ENETDOWN`, `ENETUNREACH`,
///   `ECONNRESET`, `ECONNABORTED`, `ENOLINK`, `ECOMM`, `EREMOTEIO`, `ENOLCK` (the lock daemon
///   of an NFS server): the network under a mount.
/// - `EAGAIN`, `EINTR`, `EBUSY`, `ENOMEM`, `EMFILE`, `ENFILE`: the machine is short of
///   something for now.
/// - `EROFS`: the file system is (re)mounted read-only. Arguably the operator's error, but it
///   is a state of the mount, not of the request: the same write succeeds once it is
///   remounted read-write, and the kernel itself remounts a file system read-only after a
///   device error (`errors=remount-ro`). Retried with the back-off and failed (503, naming it)
///   once the attempts run out; a deletion meanwhile stays recorded and is retried.
///
/// Everything else is permanent (`Failed`): `EACCES`/`EPERM` (the server's user may not write
/// there: a retry gets the same answer), `EINVAL`, `ENAMETOOLONG`, `ENOTDIR`, `EISDIR`, `ELOOP`,
/// `EEXIST`, `EXDEV`, `EFBIG`, and errors without an OS code. ENOSPC and EDQUOT are neither:
/// [`SinkError::NoSpace`], waited for.
fn io_is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    if matches!(
        e.kind(),
        K::StaleNetworkFileHandle
            | K::ReadOnlyFilesystem
            | K::TimedOut
            | K::NotConnected
            | K::HostUnreachable
            | K::NetworkDown
            | K::NetworkUnreachable
            | K::ConnectionReset
            | K::ConnectionAborted
            | K::WouldBlock
            | K::Interrupted
            | K::ResourceBusy
            | K::OutOfMemory
    ) {
        return true;
    }
    // Codes without an `ErrorKind` of their own (Linux numbers; EIO is 5 on every unix).
    #[cfg(target_os = "linux")]
    const RAW: &[i32] = &[
        5,   // EIO
        23,  // ENFILE
        24,  // EMFILE
        37,  // ENOLCK
        67,  // ENOLINK
        70,  // ECOMM
        112, // EHOSTDOWN
        121, // EREMOTEIO
    ];
    #[cfg(all(unix, not(target_os = "linux")))]
    const RAW: &[i32] = &[5, 23, 24];
    #[cfg(not(unix))]
    const RAW: &[i32] = &[];
    e.raw_os_error().is_some_and(|code| RAW.contains(&code))
}

/// A file being written.
pub trait PartWriter: Write + Send {
    /// Makes the written bytes durable at the temporary path; returns the byte count.
    fn finish(self: Box<Self>) -> Result<u64, SinkError>;

    /// [`PartWriter::finish`], with the SHA-256 (lowercase hex) of the stored bytes when the
    /// writer computed it while writing ([`crate::part`]); `None` for a bare destination writer.
    fn finish_digest(self: Box<Self>) -> Result<(u64, Option<String>), SinkError> {
        self.finish().map(|bytes| (bytes, None))
    }
}

/// Size and validators of a stored file, for ranged downloads (HTTP `Range`, `If-Range`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub size: u64,
    /// A strong validator, unquoted, made of `!`, `#`-`~` only (an HTTP entity tag's
    /// characters); empty when the destination gives none (then no `If-Range` ever matches).
    pub etag: String,
    pub last_modified: Option<std::time::SystemTime>,
}

/// An entity tag's characters only (RFC 9110 `etagc` without obs-text): a destination's ETag is
/// kept when it is clean, else replaced by a hex digest of it (still strong: it changes exactly
/// when the destination's does).
pub fn clean_etag(raw: &str) -> String {
    let raw = raw.trim().trim_start_matches("W/").trim_matches('"');
    if raw.bytes().all(|b| b == 0x21 || (0x23..=0x7e).contains(&b)) {
        raw.to_string()
    } else {
        sha256_hex(raw.as_bytes())
    }
}

/// The strong validator of a local export file: its size, modification time (ns) and inode.
/// Export files never change once they have their final name (they are renamed into place
/// whole), so this changes exactly when the file is replaced, without reading it.
pub fn local_etag(meta: &std::fs::Metadata) -> String {
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    #[cfg(unix)]
    let ino = std::os::unix::fs::MetadataExt::ino(meta);
    #[cfg(not(unix))]
    let ino = 0u64;
    format!("{:x}-{mtime:x}-{ino:x}", meta.len())
}

/// How the server hands a finished file to a client.
#[derive(Debug)]
pub enum FileBody {
    /// A local file, already opened (and checked to be the object looked up, so a link swapped
    /// in after the check is never what is read), with the open file's own metadata.
    Local { file: File, meta: fs::Metadata },
    /// An object in a remote store, streamed through the server. `size` is the size the export
    /// recorded when it committed the file (set by the export service; `None` from
    /// [`Sink::body`]): a stored object of another size was replaced after the manifest and is
    /// not served as the export's.
    Remote {
        container: String,
        path: String,
        size: Option<u64>,
    },
}

/// A storage destination: containers holding export folders, and the `anonymization` container.
pub trait Sink: Send + Sync {
    /// Short name of the kind (`local`, `azure`, `s3`).
    fn kind(&self) -> &'static str;
    /// Creates the container if it does not exist.
    fn ensure_container(&self, container: &str) -> Result<(), SinkError>;
    fn create(&self, container: &str, path: &str) -> Result<Box<dyn PartWriter>, SinkError>;
    /// Moves a finished part to its final name; done when `from` is gone and `to` exists.
    fn rename(&self, container: &str, from: &str, to: &str) -> Result<(), SinkError>;
    /// Removes everything under `prefix` (a folder).
    fn delete_prefix(&self, container: &str, prefix: &str) -> Result<(), SinkError>;
    /// Reads a small object whole (at most `max_bytes`), with its ETag.
    fn read_limited(
        &self,
        container: &str,
        path: &str,
        max_bytes: u64,
    ) -> Result<(Vec<u8>, String), SinkError>;
    /// A blocking reader of a whole object (downloads from remote destinations).
    fn open_read(&self, container: &str, path: &str) -> Result<Box<dyn Read + Send>, SinkError>;
    /// Size and validators of an object ([`SinkError::NotFound`] when there is none).
    fn stat(&self, container: &str, path: &str) -> Result<ObjectInfo, SinkError>;
    /// A blocking reader of the bytes `range` (end exclusive, inside the object) of an object,
    /// streamed, never read whole. With `etag` (from [`Sink::stat`]) the read fails
    /// ([`SinkError::Unavailable`]) rather than return bytes of another version.
    fn open_range(
        &self,
        container: &str,
        path: &str,
        range: std::ops::Range<u64>,
        etag: Option<&str>,
    ) -> Result<Box<dyn Read + Send>, SinkError>;
    /// Where a path lies, for people: `<container>/<path>` for a local folder, the object's URL
    /// (without credentials) for an object store — never a server file path.
    fn location(&self, container: &str, path: &str) -> String;
    /// How to serve a finished file: a local one opened only when it is an object (a regular
    /// file reached without a symbolic link below its container), as every other read of the
    /// local folder.
    fn body(&self, container: &str, path: &str) -> Result<FileBody, SinkError>;
}

/// Containers as folders under a root directory.
#[derive(Debug, Clone)]
pub struct LocalSink {
    root: PathBuf,
}

impl LocalSink {
    /// Containers under the folder `root`, which must exist when the sink is used: nothing
    /// creates it later ([`LocalSink::create_root`] at start).
    pub fn new(root: impl Into<PathBuf>) -> LocalSink {
        LocalSink { root: root.into() }
    }

    /// Creates the storage root (and its parents) if it is missing, then the sink: what a server
    /// does once when it starts. Later writes never create it again.
    pub fn create_root(root: impl Into<PathBuf>) -> std::io::Result<LocalSink> {
        let root = root.into();
        fs::create_dir_all(&root)?;
        Ok(LocalSink { root })
    }

    /// The path of `path` in `container`; names are checked by the callers (container rules,
    /// generated file names), and `..` is refused again here.
    fn path(&self, container: &str, path: &str) -> Result<PathBuf, SinkError> {
        let bad = |s: &str| s.split(['/', '\\']).any(|seg| seg == "..") || s.starts_with('/');
        if container.is_empty() || container.contains(['/', '\\']) || bad(container) || bad(path) {
            return Err(SinkError::Failed(format!(
                "refused path '{container}/{path}'"
            )));
        }
        Ok(self.root.join(container).join(path))
    }

    /// The path of the object `path` in `container` and its metadata, when it is a regular file
    /// reached without a symbolic link below the container folder. A link planted in the
    /// storage folder (`imports/x.ndjson -> ../exports/<other job>/Patient.ndjson`, or to any
    /// server file) must not make its target an object, so every component is looked at with
    /// `symlink_metadata`; and a FIFO or device is never an object (opening a FIFO blocks).
    /// What exists but is not an object is [`SinkError::Refused`] (permanent: asking again gets
    /// the same answer), with the reason and the container-relative name only. The container
    /// folder itself may be a link (an operator's mount): it is not the client's to plant.
    fn object_path(
        &self,
        container: &str,
        path: &str,
    ) -> Result<(PathBuf, fs::Metadata), SinkError> {
        let mut p = self.path(container, "")?;
        let not_object =
            |why: &str| SinkError::Refused(format!("'{container}/{path}' is {why}, not an object"));
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let Some((last, folders)) = segments.split_last() else {
            return Err(SinkError::NotFound(path.to_string()));
        };
        for segment in folders {
            p.push(segment);
            match fs::symlink_metadata(&p) {
                Ok(m) if m.file_type().is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(not_object("under a symbolic link"));
                }
                Ok(_) => return Err(SinkError::NotFound(path.to_string())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(SinkError::NotFound(path.to_string()));
                }
                Err(e) => return Err(self.io_error(&p, e)),
            }
        }
        p.push(last);
        match fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_file() => Ok((p, m)),
            Ok(m) if m.file_type().is_symlink() => Err(not_object("a symbolic link")),
            Ok(_) => Err(not_object("not a regular file")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(SinkError::NotFound(path.to_string()))
            }
            Err(e) => Err(self.io_error(&p, e)),
        }
    }

    /// Opens the object `path` of `container` ([`LocalSink::object_path`]) with the metadata of
    /// the open file. The open file must be the one inspected: a name swapped for a link between
    /// the inspection and the open is refused rather than read through. (A FIFO swapped in
    /// within that window would still block the open: that needs `O_NONBLOCK`, i.e. `libc`.)
    fn open_object(&self, container: &str, path: &str) -> Result<(File, fs::Metadata), SinkError> {
        let (p, inspected) = self.object_path(container, path)?;
        let f = match File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SinkError::NotFound(path.to_string()));
            }
            Err(e) => return Err(self.io_error(&p, e)),
        };
        let opened = f.metadata().map_err(|e| self.io_error(&p, e))?;
        if !opened.is_file() || !same_file(&inspected, &opened) {
            return Err(SinkError::Refused(format!(
                "'{container}/{path}' was replaced while it was opened, not an object"
            )));
        }
        Ok((f, opened))
    }
}

/// Whether two metadata describe the same file (device and inode on unix).
fn same_file(a: &fs::Metadata, b: &fs::Metadata) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        a.dev() == b.dev() && a.ino() == b.ino()
    }
    #[cfg(not(unix))]
    {
        a.len() == b.len() && a.modified().ok() == b.modified().ok()
    }
}

impl LocalSink {
    /// `Ok` when the storage root is a folder. A root that is gone (an unmounted volume, a
    /// removed or renamed folder) is the destination being unavailable, not an empty one: its
    /// files are back with it, and what is written meanwhile must not land in a fresh folder on
    /// the file system below the mount point (filling the server's own disk, and hidden by the
    /// volume once it is mounted again). So nothing here creates the root: the server does,
    /// once, when it starts ([`LocalSink::create_root`]).
    fn root_is_there(&self) -> Result<(), SinkError> {
        match fs::metadata(&self.root) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(SinkError::Unavailable(
                "the storage root is not a folder".to_string(),
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(SinkError::Unavailable(
                "the storage root is missing (an unmounted volume?)".to_string(),
            )),
            Err(e) => Err(SinkError::from_io("the storage root", e)),
        }
    }

    /// Creates the folders of `dir` (below the root), when the root is there.
    fn make_dirs(&self, dir: &Path) -> Result<(), SinkError> {
        self.root_is_there()?;
        fs::create_dir_all(dir).map_err(|e| self.io_error(dir, e))
    }

    /// An I/O error on `path`, named relative to the storage root (`<container>/<path>`): error
    /// texts reach clients and logs, and must not show the server's directories.
    fn io_error(&self, path: &Path, e: std::io::Error) -> SinkError {
        let shown = path.strip_prefix(&self.root).unwrap_or_else(|_| {
            // Not under the root (cannot happen for checked paths): show the name only.
            Path::new(path.file_name().unwrap_or_default())
        });
        SinkError::from_io(&shown.display().to_string(), e)
    }
}

struct LocalPart {
    writer: BufWriter<File>,
    /// `<container>/<path>`, for errors.
    name: String,
    bytes: u64,
}

impl Write for LocalPart {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.writer.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.writer.flush()
    }
}

impl PartWriter for LocalPart {
    fn finish(self: Box<Self>) -> Result<u64, SinkError> {
        let LocalPart {
            writer,
            name,
            bytes,
        } = *self;
        let f = writer
            .into_inner()
            .map_err(|e| SinkError::from_io(&name, e.into_error()))?;
        f.sync_data().map_err(|e| SinkError::from_io(&name, e))?;
        Ok(bytes)
    }
}

impl Sink for LocalSink {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn ensure_container(&self, container: &str) -> Result<(), SinkError> {
        let p = self.path(container, "")?;
        self.make_dirs(&p)
    }

    fn create(&self, container: &str, path: &str) -> Result<Box<dyn PartWriter>, SinkError> {
        let p = self.path(container, path)?;
        if let Some(parent) = p.parent() {
            self.make_dirs(parent)?;
        }
        let f = File::create(&p).map_err(|e| self.io_error(&p, e))?;
        Ok(Box::new(LocalPart {
            writer: BufWriter::with_capacity(1 << 20, f),
            name: format!("{container}/{path}"),
            bytes: 0,
        }))
    }

    fn rename(&self, container: &str, from: &str, to: &str) -> Result<(), SinkError> {
        let (src, dst) = (self.path(container, from)?, self.path(container, to)?);
        if !src.exists() {
            // Renamed before (a retry after a crash), or gone with its folder (a cancel that
            // removed the export while a worker was renaming): never re-create the folder. Both
            // only when the root is there: without it, the part is hidden, not gone.
            self.root_is_there()?;
            return if dst.exists() {
                Ok(())
            } else {
                Err(SinkError::NotFound(from.to_string()))
            };
        }
        if let Some(parent) = dst.parent() {
            self.make_dirs(parent)?;
        }
        fs::rename(&src, &dst).map_err(|e| self.io_error(&src, e))
    }

    fn delete_prefix(&self, container: &str, prefix: &str) -> Result<(), SinkError> {
        let p = self.path(container, prefix)?;
        match fs::remove_dir_all(&p) {
            Ok(()) => Ok(()),
            // Nothing under the prefix (never written, or removed before) — but only when the
            // storage root is there: a root that is gone (an unmounted volume, a removed or
            // renamed folder) hides the files rather than lacking them, and they are back with
            // it. That is the destination being unavailable, so the deletion stays recorded and
            // is retried, not recorded done.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => self.root_is_there(),
            Err(e) => Err(self.io_error(&p, e)),
        }
    }

    fn read_limited(
        &self,
        container: &str,
        path: &str,
        max_bytes: u64,
    ) -> Result<(Vec<u8>, String), SinkError> {
        let dir = self.path(container, "")?;
        if !dir.is_dir() {
            return Err(SinkError::ContainerNotFound(container.to_string()));
        }
        let (f, _) = self.open_object(container, path)?;
        let mut bytes = Vec::new();
        f.take(max_bytes + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| SinkError::from_io(&format!("{container}/{path}"), e))?;
        if bytes.len() as u64 > max_bytes {
            return Err(SinkError::TooLarge {
                path: path.to_string(),
                limit: max_bytes,
            });
        }
        // A local file's ETag is the SHA-256 of its content: anyone can compute it
        // (`sha256sum`), and it changes exactly when the content does.
        let etag = sha256_hex(&bytes);
        Ok((bytes, etag))
    }

    fn open_read(&self, container: &str, path: &str) -> Result<Box<dyn Read + Send>, SinkError> {
        let (f, _) = self.open_object(container, path)?;
        Ok(Box::new(f))
    }

    fn stat(&self, container: &str, path: &str) -> Result<ObjectInfo, SinkError> {
        // What is not an object is not found here, as before links were refused: `$import`'s
        // kick-off answers "does not exist" (400), a download 404. The reason goes to the log.
        let (_, m) = self.object_path(container, path).map_err(|e| match e {
            SinkError::Refused(why) => {
                tracing::warn!(reason = %why, "stat of a storage path that is not an object");
                SinkError::NotFound(path.to_string())
            }
            other => other,
        })?;
        Ok(ObjectInfo {
            size: m.len(),
            etag: local_etag(&m),
            last_modified: m.modified().ok(),
        })
    }

    fn open_range(
        &self,
        container: &str,
        path: &str,
        range: std::ops::Range<u64>,
        etag: Option<&str>,
    ) -> Result<Box<dyn Read + Send>, SinkError> {
        use std::io::{Seek, SeekFrom};
        let (mut f, m) = self.open_object(container, path)?;
        let name = format!("{container}/{path}");
        if let Some(expected) = etag {
            // The open file's own metadata: the validator of exactly the bytes read.
            if local_etag(&m) != expected {
                return Err(SinkError::Unavailable(format!(
                    "{container}/{path} changed while it was read"
                )));
            }
        }
        f.seek(SeekFrom::Start(range.start))
            .map_err(|e| SinkError::from_io(&name, e))?;
        Ok(Box::new(f.take(range.end.saturating_sub(range.start))))
    }

    fn location(&self, container: &str, path: &str) -> String {
        // Container-relative: the server's directories are not the client's business.
        format!("{container}/{path}")
    }

    fn body(&self, container: &str, path: &str) -> Result<FileBody, SinkError> {
        let (file, meta) = self.open_object(container, path)?;
        Ok(FileBody::Local { file, meta })
    }
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rename_whose_part_is_gone_fails_without_recreating_the_folder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sink = LocalSink::new(dir.path());
        sink.ensure_container("exports").expect("container");
        let mut w = sink
            .create("exports", "job/_parts/1-1-1.ndjson")
            .expect("create");
        w.write_all(b"{}\n").expect("write");
        w.finish().expect("finish");
        // A cancel removes the export's folder between the part's commit and its rename.
        sink.delete_prefix("exports", "job").expect("delete");
        assert!(matches!(
            sink.rename("exports", "job/_parts/1-1-1.ndjson", "job/Patient-1.ndjson"),
            Err(SinkError::NotFound(_))
        ));
        assert!(!dir.path().join("exports/job").exists());
    }

    #[test]
    fn parts_become_visible_only_when_renamed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sink = LocalSink::new(dir.path());
        sink.ensure_container("exports").expect("container");
        let mut w = sink
            .create("exports", "job/_parts/1-1-1.ndjson")
            .expect("create");
        w.write_all(b"{}\n{}\n").expect("write");
        assert_eq!(w.finish().expect("finish"), 6);
        assert!(!dir.path().join("exports/job/Patient-1.ndjson").exists());
        sink.rename("exports", "job/_parts/1-1-1.ndjson", "job/Patient-1.ndjson")
            .expect("rename");
        // Renaming again (a retried commit) is a no-op.
        sink.rename("exports", "job/_parts/1-1-1.ndjson", "job/Patient-1.ndjson")
            .expect("rename again");
        let (bytes, etag) = sink
            .read_limited("exports", "job/Patient-1.ndjson", 100)
            .expect("read");
        assert_eq!(bytes, b"{}\n{}\n");
        assert_eq!(etag, sha256_hex(b"{}\n{}\n"));
        assert!(matches!(
            sink.read_limited("exports", "job/Patient-1.ndjson", 3),
            Err(SinkError::TooLarge { .. })
        ));
        assert!(matches!(
            sink.read_limited("nothing", "x.json", 3),
            Err(SinkError::ContainerNotFound(_))
        ));
        assert!(matches!(
            sink.read_limited("exports", "x.json", 3),
            Err(SinkError::NotFound(_))
        ));
        assert!(sink.create("exports", "../escape").is_err());
        sink.delete_prefix("exports", "job").expect("delete");
        assert!(!dir.path().join("exports/job").exists());
    }

    /// Reliability review: a deletion under a storage root that is gone (an unmounted volume, a
    /// removed folder) was reported done, and the export's files were back with the volume. A
    /// prefix missing under a root that is there is still nothing to delete.
    #[test]
    fn a_deletion_under_a_missing_storage_root_is_unavailable_not_done() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("storage");
        let sink = LocalSink::create_root(&root).expect("root");
        sink.ensure_container("exports").expect("container");
        // Nothing under the prefix, nor a container: done.
        sink.delete_prefix("exports", "never-written")
            .expect("a missing prefix under an existing root");
        sink.delete_prefix("other", "job")
            .expect("a missing container under an existing root");
        let mut w = sink
            .create("exports", "job/Patient-1.ndjson")
            .expect("create");
        w.write_all(b"{}\n").expect("write");
        w.finish().expect("finish");
        // The volume goes away (here: the folder is moved aside).
        let aside = dir.path().join("unmounted");
        fs::rename(&root, &aside).expect("unmount");
        let e = sink
            .delete_prefix("exports", "job")
            .expect_err("a missing root is not a done deletion");
        assert!(matches!(e, SinkError::Unavailable(_)), "{e:?}");
        assert!(e.is_transient());
        assert!(
            !e.to_string().contains(&*dir.path().to_string_lossy()),
            "{e}"
        );
        // It comes back: the retry removes the files.
        fs::rename(&aside, &root).expect("mount again");
        sink.delete_prefix("exports", "job").expect("delete");
        assert!(!root.join("exports/job").exists());
    }

    /// Reliability review: with the storage root gone, the next part written re-created it (and
    /// the container and folders) on the file system below the mount point — filling the
    /// server's own disk, the files hidden once the volume is mounted again. Every write that
    /// makes folders is now `Unavailable` (retried) and leaves nothing behind.
    #[test]
    fn writes_under_a_missing_storage_root_are_unavailable_and_create_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("storage");
        let sink = LocalSink::create_root(&root).expect("root");
        sink.ensure_container("exports").expect("container");
        let mut w = sink.create("exports", "job/_parts/a").expect("create");
        w.write_all(b"{}\n").expect("write");
        w.finish().expect("finish");
        fs::rename(&root, dir.path().join("unmounted")).expect("unmount");
        let unavailable = |r: Result<(), SinkError>| {
            let e = r.expect_err("a missing root");
            assert!(matches!(e, SinkError::Unavailable(_)), "{e:?}");
            assert!(
                !e.to_string().contains(&*dir.path().to_string_lossy()),
                "{e}"
            );
        };
        unavailable(sink.ensure_container("exports"));
        unavailable(sink.create("exports", "job/_parts/b").map(drop));
        unavailable(sink.rename("exports", "job/_parts/a", "job/Patient-1.ndjson"));
        assert!(!root.exists(), "the root was created again");
        // `new` never creates it either; `create_root` (the server's start) does.
        unavailable(LocalSink::new(&root).ensure_container("exports"));
        LocalSink::create_root(&root)
            .expect("root")
            .ensure_container("exports")
            .expect("a root made at start");
    }

    /// Reliability review: only ENOSPC and EDQUOT were told apart; every other OS error failed
    /// an export at its first attempt, also those of a network mount that pass.
    #[test]
    fn transient_os_errors_are_retried_and_permanent_ones_fail() {
        use std::io::{Error, ErrorKind};
        let kind = |e: Error| match SinkError::from_io("exports/job/x.ndjson", e) {
            SinkError::Unavailable(_) => "unavailable",
            SinkError::Failed(_) => "failed",
            SinkError::NoSpace(_) => "no space",
            other => panic!("{other:?}"),
        };
        #[cfg(target_os = "linux")]
        {
            // errno: EIO, EAGAIN, EINTR, ETIMEDOUT, ESTALE, EROFS, ENOTCONN, EHOSTDOWN, EBUSY,
            // EMFILE, ENOLCK, EREMOTEIO.
            for code in [5, 11, 4, 110, 116, 30, 107, 112, 16, 24, 37, 121] {
                assert_eq!(
                    kind(Error::from_raw_os_error(code)),
                    "unavailable",
                    "errno {code}"
                );
            }
            // EACCES, EPERM, EINVAL, ENAMETOOLONG, ENOTDIR, EISDIR, ELOOP, EEXIST, EXDEV, EFBIG.
            for code in [13, 1, 22, 36, 20, 21, 40, 17, 18, 27] {
                assert_eq!(
                    kind(Error::from_raw_os_error(code)),
                    "failed",
                    "errno {code}"
                );
            }
            // ENOSPC, EDQUOT: waited for.
            for code in [28, 122] {
                assert_eq!(
                    kind(Error::from_raw_os_error(code)),
                    "no space",
                    "errno {code}"
                );
            }
        }
        assert_eq!(kind(Error::from(ErrorKind::TimedOut)), "unavailable");
        assert_eq!(kind(Error::from(ErrorKind::PermissionDenied)), "failed");
        assert_eq!(kind(Error::other("odd")), "failed");
        // A transient one is what the export retries.
        assert!(SinkError::from_io("x", Error::from(ErrorKind::Interrupted)).is_transient());
    }

    /// Security review: a symbolic link planted in the import container was read through, so
    /// `$import` loaded another client's export output or any server file.
    #[cfg(unix)]
    #[test]
    fn reads_never_follow_a_symbolic_link_nor_open_what_is_not_a_regular_file() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        let sink = LocalSink::new(dir.path());
        sink.ensure_container("imports").expect("container");
        sink.ensure_container("exports").expect("container");
        let secret = outside.path().join("secret.ndjson");
        fs::write(&secret, b"{\"resourceType\":\"Patient\"}\n").expect("write");
        fs::create_dir_all(dir.path().join("exports/other")).expect("mkdir");
        fs::write(dir.path().join("exports/other/Patient.ndjson"), b"{}\n").expect("write");
        let imports = dir.path().join("imports");
        symlink(&secret, imports.join("abs.ndjson")).expect("symlink");
        symlink(
            "../exports/other/Patient.ndjson",
            imports.join("rel.ndjson"),
        )
        .expect("symlink");
        symlink(outside.path(), imports.join("folder")).expect("symlink");
        symlink("../exports/other", imports.join("sibling")).expect("symlink");
        let socket = std::os::unix::net::UnixListener::bind(imports.join("socket.ndjson"));
        assert!(socket.is_ok(), "a socket file to refuse");
        fs::create_dir_all(imports.join("real")).expect("mkdir");
        fs::write(imports.join("real/ok.ndjson"), b"{}\n").expect("write");

        for path in [
            "abs.ndjson",
            "rel.ndjson",
            "folder/secret.ndjson",
            "sibling/Patient.ndjson",
            "socket.ndjson",
            "real",
            "real/",
        ] {
            assert!(
                matches!(sink.open_read("imports", path), Err(SinkError::Refused(_))),
                "open_read {path}"
            );
            assert!(
                matches!(sink.stat("imports", path), Err(SinkError::NotFound(_))),
                "stat {path}"
            );
            assert!(
                matches!(
                    sink.open_range("imports", path, 0..1, None),
                    Err(SinkError::Refused(_))
                ),
                "open_range {path}"
            );
            assert!(
                matches!(
                    sink.read_limited("imports", path, 100),
                    Err(SinkError::Refused(_))
                ),
                "read_limited {path}"
            );
        }
        // The reason, without the server's directories.
        let Err(e) = sink.open_read("imports", "abs.ndjson") else {
            panic!("a link was opened");
        };
        assert_eq!(
            e.to_string(),
            "'imports/abs.ndjson' is a symbolic link, not an object"
        );
        assert!(matches!(
            sink.open_read("imports", "missing.ndjson"),
            Err(SinkError::NotFound(_))
        ));
        // A regular file in a real folder is an object.
        let mut text = String::new();
        sink.open_read("imports", "real/ok.ndjson")
            .expect("open")
            .read_to_string(&mut text)
            .expect("read");
        assert_eq!(text, "{}\n");
        assert_eq!(
            sink.stat("imports", "real/ok.ndjson").expect("stat").size,
            3
        );
        let (bytes, _) = sink
            .read_limited("imports", "real/ok.ndjson", 10)
            .expect("read");
        assert_eq!(bytes, b"{}\n");
    }
}
