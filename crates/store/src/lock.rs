//! The data directory lock: one process at a time may write a data directory.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::StoreError;

/// Name of the lock file inside the data directory.
pub const LOCK_FILE_NAME: &str = "fhirhose.lock";

/// An exclusive advisory lock on a data directory (`DIR/fhirhose.lock`), held until dropped.
/// `fhirhose serve` and `fhirhose load --data-dir` both take it (through
/// [`crate::SqliteStore::open_data_dir`]), so a loader refuses to write under a running server.
/// The operating system releases the lock if the process dies, so a stale file never blocks.
#[derive(Debug)]
pub struct DataDirLock {
    dir: PathBuf,
    // Holding the open file holds the lock.
    _file: File,
}

impl DataDirLock {
    /// Create `dir` if needed and lock it; [`StoreError::Locked`] if another process holds it.
    pub fn acquire(dir: &Path) -> Result<DataDirLock, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        let path = dir.join(LOCK_FILE_NAME);
        let io_err = |source| StoreError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(StoreError::Locked {
                    path: dir.display().to_string(),
                    lock_file: path.display().to_string(),
                });
            }
            Err(TryLockError::Error(e)) => return Err(io_err(e)),
        }
        // The pid is informational only (for a human looking at the directory).
        let _ = file.set_len(0);
        let _ = writeln!(file, "{}", std::process::id());
        Ok(DataDirLock {
            dir: dir.to_path_buf(),
            _file: file,
        })
    }

    /// The locked directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_on_same_dir_is_refused_until_first_is_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let first = DataDirLock::acquire(tmp.path()).unwrap();
        match DataDirLock::acquire(tmp.path()) {
            Err(StoreError::Locked { .. }) => {}
            other => panic!("expected Locked, got {other:?}"),
        }
        drop(first);
        DataDirLock::acquire(tmp.path()).unwrap();
    }
}
