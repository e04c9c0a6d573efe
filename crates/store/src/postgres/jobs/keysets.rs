//! [`KeySets`] in PostgreSQL (table `deid_key_set`, migration 4).

use ::postgres::Row;

use super::super::statements::Session;

use super::PgJobQueue;
use crate::jobs::QueueError;
use crate::keysets::{KEY_SET_COLUMNS, KeySet, KeySets};

fn row(r: &Row) -> KeySet {
    KeySet {
        name: r.get(0),
        version: r.get(1),
        crypto_hash_key: r.get(2),
        encrypt_key: r.get(3),
        date_shift_key: r.get(4),
        created_ms: r.get(5),
        rotated_ms: r.get(6),
    }
}

impl KeySets for PgJobQueue {
    fn create_key_set(&self, set: &KeySet) -> Result<bool, QueueError> {
        self.run(|c| {
            let n = c.execute(
                &format!(
                    "INSERT INTO deid_key_set ({KEY_SET_COLUMNS}) VALUES ($1, 1, $2, $3, $4, $5, NULL)
                     ON CONFLICT (name) DO NOTHING"
                ),
                &[
                    &set.name,
                    &set.crypto_hash_key,
                    &set.encrypt_key,
                    &set.date_shift_key,
                    &set.created_ms,
                ],
            )?;
            Ok(n == 1)
        })
    }

    fn key_set(&self, name: &str) -> Result<Option<KeySet>, QueueError> {
        self.read(|c| {
            Ok(c.query_opt(
                &format!("SELECT {KEY_SET_COLUMNS} FROM deid_key_set WHERE name = $1"),
                &[&name],
            )?
            .as_ref()
            .map(row))
        })
    }

    fn key_sets(&self) -> Result<Vec<KeySet>, QueueError> {
        self.read(|c| {
            Ok(c.query(
                &format!("SELECT {KEY_SET_COLUMNS} FROM deid_key_set ORDER BY name"),
                &[],
            )?
            .iter()
            .map(row)
            .collect())
        })
    }

    fn rotate_key_set(&self, set: &KeySet, now_ms: i64) -> Result<Option<i64>, QueueError> {
        self.run(|c| {
            Ok(c.query_opt(
                "UPDATE deid_key_set SET version = version + 1, crypto_hash_key = $2,
                 encrypt_key = $3, date_shift_key = $4, rotated_ms = $5 WHERE name = $1
                 RETURNING version",
                &[
                    &set.name,
                    &set.crypto_hash_key,
                    &set.encrypt_key,
                    &set.date_shift_key,
                    &now_ms,
                ],
            )?
            .map(|r| r.get(0)))
        })
    }

    fn delete_key_set(&self, name: &str) -> Result<bool, QueueError> {
        self.run(|c| Ok(c.execute("DELETE FROM deid_key_set WHERE name = $1", &[&name])? == 1))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_migration_creates_the_shared_table() {
        let table = crate::keysets::KEY_SET_TABLE.trim();
        assert!(super::super::SCHEMA_V4.contains(table));
    }
}
