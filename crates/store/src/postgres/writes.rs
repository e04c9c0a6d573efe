//! The write path: one transaction per [`Store::write`](crate::Store::write) call, serialized by
//! [`WRITE_LOCK`](super::WRITE_LOCK) before it allocates seqs, with the version and index rows
//! written by binary `COPY`.

use std::collections::HashMap;

use super::statements::{Conn, Session, Tx};
use ::postgres::binary_copy::BinaryCopyInWriter;
use ::postgres::types::Type;

use crate::stamp::{PreparedResource, format_instant_ms};
use crate::{
    HistoryMethod, IndexEntry, IndexValue, StoreError, WriteOp, WriteOutcome, WriteStatus,
};

use super::{PgStore, WRITE_LOCK};
use crate::index_tables::{INDEX_TABLES, ParamNumbers};
use crate::ops::{Body, MAX_SEQ, Prepared, key, method_code, prepare};

pub(super) fn write(store: &PgStore, ops: Vec<WriteOp>) -> Result<Vec<WriteOutcome>, StoreError> {
    let prepared: Vec<Prepared> = ops.into_iter().map(prepare).collect::<Result<_, _>>()?;
    let mut names: Vec<&str> = prepared.iter().map(|p| p.resource_type.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    let names: Vec<String> = names.into_iter().map(str::to_string).collect();
    store.pool.run(|c| {
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        store.register_types(c, &refs)?;
        store.write_in(c, prepared)
    })
}

impl PgStore {
    /// The write transaction (see the module docs).
    pub(super) fn write_in(
        &self,
        c: &mut Conn,
        prepared: Vec<Prepared>,
    ) -> Result<Vec<WriteOutcome>, StoreError> {
        let mut tx = c.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])?;
        // The instant is the database server's, read under the lock (one clock for every node:
        // see the module docs of `postgres`), and strictly after the last one.
        let row = tx.query_one(
            "SELECT seq, lu_ms, (extract(epoch FROM clock_timestamp()) * 1000)::bigint
             FROM watermark",
            &[],
        )?;
        let (last_seq, last_ms, now): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        let lu_ms = now.max(last_ms + 1);
        let last_updated = format_instant_ms(lu_ms);
        let first_seq = last_seq + 1;
        let mut seq = last_seq;

        // The current version of every named resource, in one query per type.
        let mut current: HashMap<(i64, String), Current> = HashMap::new();
        {
            let mut by_type: HashMap<i64, Vec<&str>> = HashMap::new();
            for p in &prepared {
                if let Some(id) = &p.id {
                    let type_no = self.registered(&p.resource_type)?;
                    by_type.entry(type_no).or_default().push(id);
                }
            }
            for (type_no, ids) in by_type {
                let rows = tx.query(
                    "SELECT DISTINCT ON (id) id, k, version, deleted FROM resource_versions
                     WHERE type_no = $1 AND id = ANY($2) ORDER BY id, version DESC",
                    &[&type_no, &ids],
                )?;
                for r in rows {
                    current.insert(
                        (type_no, r.get::<_, String>(0)),
                        Current {
                            k: r.get(1),
                            version: r.get(2),
                            deleted: r.get::<_, i64>(3) != 0,
                        },
                    );
                }
            }
        }

        let mut outcomes: Vec<WriteOutcome> = Vec::with_capacity(prepared.len());
        let mut rows: Vec<NewRow> = Vec::with_capacity(prepared.len());
        let mut row_of_k: HashMap<i64, usize> = HashMap::new();
        let mut supersede_db: (Vec<i64>, Vec<i64>) = (Vec::new(), Vec::new());
        let mut deindex_db: Vec<i64> = Vec::new();
        let indexing = self.indexer.is_some();
        let defer_deindex = self
            .upkeep_suspended
            .load(std::sync::atomic::Ordering::Relaxed);

        for p in prepared {
            let type_no = self.registered(&p.resource_type)?;
            let id = match p.id {
                Some(id) => id,
                None => uuid::Uuid::new_v4().to_string(),
            };
            let cur = current.get(&(type_no, id.clone())).copied();
            if p.method == HistoryMethod::Post && cur.is_some() {
                return Err(StoreError::AlreadyExists {
                    resource_type: p.resource_type,
                    id,
                });
            }
            if p.must_exist && cur.is_none_or(|c| c.deleted) {
                return Err(StoreError::UpdateWouldCreate {
                    resource_type: p.resource_type,
                    id,
                });
            }
            if let Some(expected) = p.if_match {
                let live = cur.filter(|c| !c.deleted).map(|c| c.version);
                if live != Some(expected) {
                    return Err(StoreError::VersionConflict {
                        resource_type: p.resource_type,
                        id,
                        expected,
                        actual: live,
                    });
                }
            }
            if p.resource.is_none() && cur.is_none_or(|c| c.deleted) {
                outcomes.push(WriteOutcome {
                    resource_type: p.resource_type,
                    id,
                    status: WriteStatus::DeleteNotFound,
                    version: cur.map_or(0, |c| c.version),
                    seq: 0,
                    last_updated: last_updated.clone(),
                    json: None,
                });
                continue;
            }
            seq += 1;
            if seq > MAX_SEQ {
                return Err(StoreError::Corrupt("sequence space exhausted".into()));
            }
            let k = key(type_no, seq);
            // A kept version (`$import` InitialLoad) only creates.
            let kept = match &p.resource {
                Some(Body::Ready(ready)) => ready.kept.clone(),
                _ => None,
            };
            if kept.is_some() && cur.is_some() {
                return Err(StoreError::AlreadyExists {
                    resource_type: p.resource_type,
                    id,
                });
            }
            let (version, row_updated) = match kept {
                Some((v, lu)) => (v, lu),
                None => (cur.map_or(1, |c| c.version + 1), last_updated.clone()),
            };
            // Supersede the previous version (written earlier in this call, or in the database).
            if let Some(c) = cur {
                match row_of_k.get(&c.k) {
                    Some(&i) => {
                        rows[i].superseded_seq = Some(seq);
                        rows[i].index = None;
                    }
                    None => {
                        supersede_db.0.push(c.k);
                        supersede_db.1.push(seq);
                        if indexing && !c.deleted && !defer_deindex {
                            deindex_db.push(c.k);
                        }
                    }
                }
            }
            let (status, json, index, deleted) = match p.resource {
                None => (WriteStatus::Deleted, None, None, true),
                Some(body) => {
                    let ready = match body {
                        Body::Ready(ready) => ready,
                        Body::Json(m) => PreparedResource::build(
                            &p.resource_type,
                            &id,
                            m,
                            self.indexer.as_deref(),
                        )?,
                    };
                    let json = ready.stamped(version, &row_updated);
                    let index = if indexing {
                        let Some(entries) = ready.index else {
                            return Err(StoreError::InvalidResource(format!(
                                "{}/{} was prepared without this store's search indexer",
                                p.resource_type, id
                            )));
                        };
                        Some(entries)
                    } else {
                        None
                    };
                    let status = match cur {
                        Some(c) if !c.deleted => WriteStatus::Updated,
                        _ => WriteStatus::Created,
                    };
                    (status, Some(json), index, false)
                }
            };
            current.insert(
                (type_no, id.clone()),
                Current {
                    k,
                    version,
                    deleted,
                },
            );
            row_of_k.insert(k, rows.len());
            rows.push(NewRow {
                k,
                seq,
                type_no,
                version,
                method: if deleted {
                    HistoryMethod::Delete
                } else {
                    p.method
                },
                deleted,
                superseded_seq: None,
                outcome: outcomes.len(),
                index,
            });
            outcomes.push(WriteOutcome {
                resource_type: p.resource_type,
                id,
                status,
                version,
                seq,
                last_updated: row_updated,
                json,
            });
        }

        if !supersede_db.0.is_empty() {
            tx.execute(
                "UPDATE resource_versions rv SET superseded_seq = u.s
                 FROM unnest($1::bigint[], $2::bigint[]) AS u(k, s) WHERE rv.k = u.k",
                &[&supersede_db.0, &supersede_db.1],
            )?;
        }
        if !deindex_db.is_empty() {
            for table in INDEX_TABLES {
                tx.execute(
                    &format!("DELETE FROM {table} WHERE k = ANY($1)"),
                    &[&deindex_db],
                )?;
            }
        }
        let mut assigned = Vec::new();
        if !rows.is_empty() {
            copy_versions(&mut tx, &rows, &outcomes)?;
            let indexed: Vec<(i64, i64, &[IndexEntry])> = rows
                .iter()
                .filter_map(|r| r.index.as_deref().map(|e| (r.type_no, r.k, e)))
                .collect();
            assigned = copy_index_rows(&mut tx, &self.params, &indexed, "")?;
            tx.execute(
                "INSERT INTO transactions(lu_ms, first_seq, last_seq) VALUES ($1, $2, $3)",
                &[&lu_ms, &first_seq, &seq],
            )?;
            tx.execute("UPDATE watermark SET seq = $1, lu_ms = $2", &[&seq, &lu_ms])?;
        }
        crate::give_up::before_commit()?;
        tx.commit()?;
        self.params.extend(assigned);
        Ok(outcomes)
    }
}

/// A version row to be written by [`PgStore::write_in`].
pub(super) struct NewRow {
    k: i64,
    seq: i64,
    type_no: i64,
    version: i64,
    method: HistoryMethod,
    deleted: bool,
    /// Set when a later op of the same call supersedes it.
    superseded_seq: Option<i64>,
    /// Index of its outcome (id, json).
    outcome: usize,
    /// Index entries, `None` when not indexing or superseded within the call.
    index: Option<Vec<IndexEntry>>,
}

#[derive(Clone, Copy)]
pub(super) struct Current {
    k: i64,
    version: i64,
    deleted: bool,
}

pub(super) fn copy_versions(
    tx: &mut Tx<'_>,
    rows: &[NewRow],
    outcomes: &[WriteOutcome],
) -> Result<(), StoreError> {
    // Prepared once per connection like the other statements (`statements`): a COPY given as
    // text costs a Parse round trip on every write.
    let copy = tx.prepared(
        "COPY resource_versions (k, seq, type_no, id, version, last_updated, method, deleted,
         superseded_seq, json) FROM STDIN (FORMAT binary)",
    )?;
    let sink = tx.raw().copy_in(&copy)?;
    let types = [
        Type::INT8,
        Type::INT8,
        Type::INT8,
        Type::TEXT,
        Type::INT8,
        Type::TEXT,
        Type::INT8,
        Type::INT8,
        Type::INT8,
        Type::BYTEA,
    ];
    let mut w = BinaryCopyInWriter::new(sink, &types);
    for r in rows {
        let o = &outcomes[r.outcome];
        let method = method_code(r.method);
        let deleted = i64::from(r.deleted);
        let json: Option<&[u8]> = o.json.as_deref();
        w.write(&[
            &r.k,
            &r.seq,
            &r.type_no,
            &o.id,
            &r.version,
            &o.last_updated,
            &method,
            &deleted,
            &r.superseded_seq,
            &json,
        ])?;
    }
    w.finish()?;
    Ok(())
}

/// COPY the index rows of `(type_no, k, entries)` into the index tables, one COPY per table that
/// gets rows; `suffix` names the tables' copies a full reindex fills (`""`: the live tables).
/// Returns the parameter numbers it read or assigned in `tx` (for the store's cache once `tx`
/// committed).
pub(super) fn copy_index_rows(
    tx: &mut Tx<'_>,
    params: &ParamNumbers,
    items: &[(i64, i64, &[IndexEntry])],
    suffix: &str,
) -> Result<Vec<(String, i64)>, StoreError> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    // The number of every code first: no other statement can run during a COPY.
    let mut numbers: HashMap<&str, i64> = HashMap::new();
    let mut assigned = Vec::new();
    for (_, _, entries) in items {
        for e in entries.iter() {
            if numbers.contains_key(e.param.as_str()) {
                continue;
            }
            let no = match params.get(&e.param) {
                Some(no) => no,
                None => {
                    tx.execute(
                        "INSERT INTO params(name) VALUES ($1) ON CONFLICT (name) DO NOTHING",
                        &[&e.param],
                    )?;
                    let no: i64 = tx
                        .query_one("SELECT param_no FROM params WHERE name = $1", &[&e.param])?
                        .get(0);
                    assigned.push((e.param.clone(), no));
                    no
                }
            };
            numbers.insert(&e.param, no);
        }
    }
    let t = Type::TEXT;
    let i = Type::INT8;
    let f = Type::FLOAT8;
    // (table, columns, types, does this entry belong here)
    type Pick = fn(&IndexValue) -> bool;
    let tables: [(&str, &str, Vec<Type>, Pick); 9] = [
        (
            "idx_token",
            "type_no, param_no, system, code, k",
            vec![i.clone(), i.clone(), t.clone(), t.clone(), i.clone()],
            |v| matches!(v, IndexValue::Token { .. }),
        ),
        (
            "idx_token_text",
            "type_no, param_no, text, k",
            vec![i.clone(), i.clone(), t.clone(), i.clone()],
            |v| matches!(v, IndexValue::TokenText(_)),
        ),
        (
            "idx_string",
            "type_no, param_no, normalized, exact, k",
            vec![i.clone(), i.clone(), t.clone(), t.clone(), i.clone()],
            |v| matches!(v, IndexValue::String { .. }),
        ),
        (
            "idx_date",
            "type_no, param_no, lo, hi, k",
            vec![i.clone(), i.clone(), i.clone(), i.clone(), i.clone()],
            |v| matches!(v, IndexValue::Date { .. }),
        ),
        (
            "idx_number",
            "type_no, param_no, value, k",
            vec![i.clone(), i.clone(), f.clone(), i.clone()],
            |v| matches!(v, IndexValue::Number(_)),
        ),
        (
            "idx_quantity",
            "type_no, param_no, value, system, code, unit, k",
            vec![
                i.clone(),
                i.clone(),
                f.clone(),
                t.clone(),
                t.clone(),
                t.clone(),
                i.clone(),
            ],
            |v| matches!(v, IndexValue::Quantity { .. }),
        ),
        (
            "idx_reference",
            "type_no, param_no, target_type, target_id, url, k",
            vec![
                i.clone(),
                i.clone(),
                t.clone(),
                t.clone(),
                t.clone(),
                i.clone(),
            ],
            |v| {
                matches!(
                    v,
                    IndexValue::Reference { .. } | IndexValue::ReferenceUrl(_)
                )
            },
        ),
        (
            "idx_reference_identifier",
            "type_no, param_no, system, value, k",
            vec![i.clone(), i.clone(), t.clone(), t.clone(), i.clone()],
            |v| matches!(v, IndexValue::ReferenceIdentifier { .. }),
        ),
        (
            "idx_uri",
            "type_no, param_no, uri, k",
            vec![i.clone(), i.clone(), t.clone(), i.clone()],
            |v| matches!(v, IndexValue::Uri(_)),
        ),
    ];
    for (table, columns, types, pick) in tables {
        let any = items
            .iter()
            .any(|(_, _, entries)| entries.iter().any(|e| pick(&e.value)));
        if !any {
            continue;
        }
        let copy = tx.prepared(&format!(
            "COPY {table}{suffix} ({columns}) FROM STDIN (FORMAT binary)"
        ))?;
        let sink = tx.raw().copy_in(&copy)?;
        let mut w = BinaryCopyInWriter::new(sink, &types);
        for (type_no, k, entries) in items {
            for e in entries.iter().filter(|e| pick(&e.value)) {
                let p = numbers[e.param.as_str()];
                let none: Option<&str> = None;
                match &e.value {
                    IndexValue::Token { system, code } => {
                        w.write(&[type_no, &p, system, code, k])?
                    }
                    IndexValue::TokenText(text) => w.write(&[type_no, &p, text, k])?,
                    IndexValue::String { normalized, exact } => {
                        w.write(&[type_no, &p, normalized, exact, k])?
                    }
                    IndexValue::Date { lo, hi } => w.write(&[type_no, &p, lo, hi, k])?,
                    IndexValue::Number(value) => w.write(&[type_no, &p, value, k])?,
                    IndexValue::Quantity {
                        value,
                        system,
                        code,
                        unit,
                    } => w.write(&[type_no, &p, value, system, code, unit, k])?,
                    IndexValue::Reference { target_type, id } => {
                        let tt: Option<&str> = Some(target_type);
                        let ti: Option<&str> = Some(id);
                        w.write(&[type_no, &p, &tt, &ti, &none, k])?
                    }
                    IndexValue::ReferenceUrl(url) => {
                        let u: Option<&str> = Some(url);
                        w.write(&[type_no, &p, &none, &none, &u, k])?
                    }
                    IndexValue::ReferenceIdentifier { system, value } => {
                        w.write(&[type_no, &p, system, value, k])?
                    }
                    IndexValue::Uri(uri) => w.write(&[type_no, &p, uri, k])?,
                }
            }
        }
        w.finish()?;
    }
    Ok(assigned)
}
