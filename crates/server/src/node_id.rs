//! A node id kept in the data directory (`DIR/node-id`), for `serve` on a shared (PostgreSQL)
//! job queue without `--node-id`.
//!
//! Export work leases are owned by `<node id>/<incarnation>`, and a starting node releases only
//! the leases of its own earlier incarnations (see `export::ExportService::start_workers`). With a
//! random id per start, a single node killed with -9 and restarted could not tell its dead
//! leases from a live node's: its export sat still until the heartbeat timeout (10 minutes by
//! default). The id written here at the first start is the same at every restart from this data
//! directory, so a restarted node resumes its work at once.
//!
//! The file is locked (an advisory `flock`) for the life of the process: a second `serve` on the
//! same data directory (a mistake, or a copy that is still running) does not take the id; it runs
//! with a random one, as without this file, and says so in its log.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// The file's name inside the data directory.
pub const NODE_ID_FILE: &str = "node-id";

/// Why the data directory's node id could not be used.
#[derive(Debug, thiserror::Error)]
pub enum NodeIdError {
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Another live process holds the file's lock.
    #[error("{path} is held by another running process")]
    Busy { path: PathBuf },
    #[error("{path} does not hold a node id (1-64 letters, digits, '.', '_' or '-'): {found:?}")]
    Invalid { path: PathBuf, found: String },
}

/// The node id of a data directory, held (locked) until dropped.
#[derive(Debug)]
pub struct NodeId {
    id: String,
    // Holding the open file holds the lock.
    _file: File,
}

impl NodeId {
    /// Reads `dir/node-id`, or writes a new random id there, and locks it.
    pub fn acquire(dir: &Path) -> Result<NodeId, NodeIdError> {
        let path = dir.join(NODE_ID_FILE);
        let io = |source| NodeIdError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(NodeIdError::Busy { path }),
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(io)?;
        let found = text.trim();
        let id = if found.is_empty() {
            let id = format!("node-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
            file.rewind().map_err(io)?;
            file.set_len(0).map_err(io)?;
            writeln!(file, "{id}").map_err(io)?;
            file.sync_all().map_err(io)?;
            id
        } else if crate::config::valid_node_id(found) {
            found.to_string()
        } else {
            return Err(NodeIdError::Invalid {
                path,
                found: found.chars().take(80).collect(),
            });
        };
        Ok(NodeId { id, _file: file })
    }

    /// The id.
    pub fn id(&self) -> &str {
        &self.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_is_written_once_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let first = NodeId::acquire(dir.path()).unwrap().id().to_string();
        assert!(crate::config::valid_node_id(&first), "{first}");
        let again = NodeId::acquire(dir.path()).unwrap();
        assert_eq!(again.id(), first);
    }

    #[test]
    fn a_second_holder_is_refused_while_the_first_lives() {
        let dir = tempfile::tempdir().unwrap();
        let held = NodeId::acquire(dir.path()).unwrap();
        assert!(matches!(
            NodeId::acquire(dir.path()),
            Err(NodeIdError::Busy { .. })
        ));
        drop(held);
        NodeId::acquire(dir.path()).unwrap();
    }

    #[test]
    fn a_file_that_holds_no_id_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(NODE_ID_FILE), "not an id/with a slash\n").unwrap();
        assert!(matches!(
            NodeId::acquire(dir.path()),
            Err(NodeIdError::Invalid { .. })
        ));
    }
}
