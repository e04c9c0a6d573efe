//! [`KeySets`] in `exports.db` (table `deid_key_set`, job schema version 3).

use rusqlite::{OptionalExtension, params};

use super::SqliteJobQueue;
use crate::jobs::QueueError;
use crate::keysets::{KEY_SET_COLUMNS, KeySet, KeySets};

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeySet> {
    Ok(KeySet {
        name: r.get(0)?,
        version: r.get(1)?,
        crypto_hash_key: r.get(2)?,
        encrypt_key: r.get(3)?,
        date_shift_key: r.get(4)?,
        created_ms: r.get(5)?,
        rotated_ms: r.get(6)?,
    })
}

impl KeySets for SqliteJobQueue {
    fn create_key_set(&self, set: &KeySet) -> Result<bool, QueueError> {
        let n = self.conn().execute(
            &format!(
                "INSERT INTO deid_key_set ({KEY_SET_COLUMNS}) VALUES (?1, 1, ?2, ?3, ?4, ?5, NULL)
                 ON CONFLICT (name) DO NOTHING"
            ),
            params![
                set.name,
                set.crypto_hash_key,
                set.encrypt_key,
                set.date_shift_key,
                set.created_ms
            ],
        )?;
        Ok(n == 1)
    }

    fn key_set(&self, name: &str) -> Result<Option<KeySet>, QueueError> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {KEY_SET_COLUMNS} FROM deid_key_set WHERE name = ?1"),
                [name],
                row,
            )
            .optional()?)
    }

    fn key_sets(&self) -> Result<Vec<KeySet>, QueueError> {
        let c = self.conn();
        let mut st = c.prepare(&format!(
            "SELECT {KEY_SET_COLUMNS} FROM deid_key_set ORDER BY name"
        ))?;
        let sets = st.query_map([], row)?.collect::<Result<Vec<_>, _>>()?;
        Ok(sets)
    }

    fn rotate_key_set(&self, set: &KeySet, now_ms: i64) -> Result<Option<i64>, QueueError> {
        Ok(self
            .conn()
            .query_row(
                "UPDATE deid_key_set SET version = version + 1, crypto_hash_key = ?2,
                 encrypt_key = ?3, date_shift_key = ?4, rotated_ms = ?5 WHERE name = ?1
                 RETURNING version",
                params![
                    set.name,
                    set.crypto_hash_key,
                    set.encrypt_key,
                    set.date_shift_key,
                    now_ms
                ],
                |r| r.get(0),
            )
            .optional()?)
    }

    fn delete_key_set(&self, name: &str) -> Result<bool, QueueError> {
        let n = self
            .conn()
            .execute("DELETE FROM deid_key_set WHERE name = ?1", [name])?;
        Ok(n == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_sets_are_created_listed_rotated_and_deleted() {
        let q = SqliteJobQueue::open_in_memory().expect("queue");
        let set = KeySet {
            name: "research".into(),
            version: 1,
            crypto_hash_key: "h".into(),
            encrypt_key: "e".repeat(32),
            date_shift_key: "d".into(),
            created_ms: 5,
            rotated_ms: None,
        };
        assert!(q.create_key_set(&set).unwrap());
        assert!(!q.create_key_set(&set).unwrap(), "a name is created once");
        assert_eq!(q.key_set("research").unwrap(), Some(set.clone()));
        let new = KeySet {
            crypto_hash_key: "h2".into(),
            ..set.clone()
        };
        assert_eq!(q.rotate_key_set(&new, 9).unwrap(), Some(2));
        let got = q.key_set("research").unwrap().unwrap();
        assert_eq!(
            (got.version, got.crypto_hash_key.as_str(), got.rotated_ms),
            (2, "h2", Some(9))
        );
        assert_eq!(q.key_sets().unwrap().len(), 1);
        assert!(!format!("{got:?}").contains("h2"), "Debug hides the keys");
        assert_eq!(
            q.rotate_key_set(
                &KeySet {
                    name: "x".into(),
                    ..new
                },
                9
            )
            .unwrap(),
            None
        );
        assert!(q.delete_key_set("research").unwrap());
        assert!(!q.delete_key_set("research").unwrap());
        assert_eq!(q.key_set("research").unwrap(), None);
    }

    /// A file of job schema version 2 (before digests and key sets) gains both at open.
    #[test]
    fn a_version_2_file_gains_digests_and_key_sets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(super::super::JOBS_FILE_NAME);
        drop(SqliteJobQueue::open(&path).expect("create"));
        {
            let c = rusqlite::Connection::open(&path).expect("open");
            c.execute_batch(
                "ALTER TABLE export_file DROP COLUMN sha256; DROP TABLE deid_key_set;
                 DROP TABLE auth_jti; ALTER TABLE export_item DROP COLUMN full_since_ms;
                 PRAGMA user_version = 2;",
            )
            .expect("make a version 2 file");
        }
        let q = SqliteJobQueue::open(&path).expect("migrated");
        assert!(q.key_sets().expect("key sets").is_empty());
        let c = q.conn();
        let version: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version, super::super::JOBS_SCHEMA_VERSION);
        let has_sha: bool = c
            .query_row(
                "SELECT count(*) > 0 FROM pragma_table_info('export_file') WHERE name = 'sha256'",
                [],
                |r| r.get(0),
            )
            .expect("columns");
        assert!(has_sha);
    }
}
