//! The reference check of [`verify`](crate::verify): whether the relative references of an
//! export's output resources resolve to resources of the export.
//!
//! The check needs every output resource's `Type/id`, and every reference whose target has not
//! been read yet (files come in manifest order, a reference often points into a later file).
//! Both are kept as 128-bit keyed hashes, not as text: a resource costs about 30 bytes and an
//! unresolved *target* (not each reference to it) about 60, where the text of every reference
//! with its referrer cost ten times that (`fhirhose export --verify` of 397,807 resources peaked
//! at 230 MiB, growing with the export). The keys are drawn per run, so no file can be crafted to
//! make a missing target collide with a present one.
//!
//! A dangling target is listed once, with the first resource that referred to it; those few
//! lines are found again by reading their files a second time, only when something dangles.

use std::collections::hash_map::{Entry, RandomState};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::io::{BufRead, BufReader, Read};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde_json::Value;

use crate::{DanglingRef, MAX_LISTED, Source, references, relative_reference};

/// A target not yet read: its type, how many references point to it, and where the first one
/// is (file number in reading order, line number counted as the check counts lines).
struct Pending {
    type_no: u32,
    count: u64,
    file: u32,
    line: u64,
}

/// A file read by the check, as needed to read it again.
pub(crate) struct FileRef {
    pub url: String,
    pub gzip: bool,
}

/// The references' outcome.
#[derive(Default)]
pub(crate) struct Outcome {
    pub references: u64,
    pub dangling: Vec<DanglingRef>,
    pub dangling_total: u64,
    pub outside: BTreeMap<String, u64>,
}

/// The check, shared by the threads that read the files (one per core): the keys are fixed at
/// the start and hash outside the lock; what was read so far is behind one mutex, taken once
/// per resource. The outcome does not depend on the order the files are read in: a target
/// dangles when no file holds it, and its first referrer is the least (file, line).
pub(crate) struct RefCheck {
    keys: Keys,
    state: Mutex<State>,
}

/// The two keys of a run's 128-bit hashes.
struct Keys([RandomState; 2]);

impl Keys {
    fn key(&self, t: &str, id: &str) -> u128 {
        let [a, b] = self.0.each_ref().map(|k| {
            let mut h = k.build_hasher();
            h.write(t.as_bytes());
            h.write_u8(b'/');
            h.write(id.as_bytes());
            h.finish()
        });
        (u128::from(a) << 64) | u128::from(b)
    }
}

#[derive(Default)]
struct State {
    /// Every output resource read, as the hash of `Type/id`.
    ids: HashSet<u128>,
    /// The types of the output lines (an `organizeOutputBy` export's types come from them).
    line_types: HashSet<String>,
    type_nos: HashMap<String, u32>,
    type_names: Vec<String>,
    pending: HashMap<u128, Pending>,
    references: u64,
}

impl State {
    fn type_no(&mut self, t: &str) -> u32 {
        if let Some(&n) = self.type_nos.get(t) {
            return n;
        }
        let n = self.type_names.len() as u32;
        self.type_names.push(t.to_string());
        self.type_nos.insert(t.to_string(), n);
        n
    }
}

impl RefCheck {
    pub fn new() -> RefCheck {
        RefCheck {
            keys: Keys([RandomState::new(), RandomState::new()]),
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An output resource of type `rt` (line `line` of file `file`): its id, and its references.
    pub fn resource(&self, rt: &str, v: &Value, file: u32, line: u64) {
        let id = v.get("id").and_then(Value::as_str).unwrap_or("");
        let own = (!id.is_empty()).then(|| self.keys.key(rt, id));
        let mut found = Vec::new();
        references(v, &mut found);
        let targets: Vec<(u128, &str)> = found
            .into_iter()
            .filter_map(relative_reference)
            .map(|(t, id)| (self.keys.key(t, id), t))
            .collect();
        let mut s = self.state();
        if !s.line_types.contains(rt) {
            s.line_types.insert(rt.to_string());
        }
        if let Some(key) = own {
            s.ids.insert(key);
            // References read before it now resolve.
            s.pending.remove(&key);
        }
        for (key, t) in targets {
            s.references += 1;
            if s.ids.contains(&key) {
                continue;
            }
            let type_no = s.type_no(t);
            match s.pending.entry(key) {
                Entry::Occupied(mut e) => {
                    let p = e.get_mut();
                    p.count += 1;
                    // Files are read in parallel: the first referrer in reading order is the
                    // least position, whichever thread saw it first.
                    if (file, line) < (p.file, p.line) {
                        (p.file, p.line) = (file, line);
                    }
                }
                Entry::Vacant(e) => {
                    e.insert(Pending {
                        type_no,
                        count: 1,
                        file,
                        line,
                    });
                }
            }
        }
    }

    /// The types of the output lines read.
    pub fn line_types(&self) -> Vec<String> {
        self.state().line_types.iter().cloned().collect()
    }

    /// Classifies what is still unresolved: a target of a type the export has files of
    /// (`types`) dangles, another is outside the export. The first [`MAX_LISTED`] dangling
    /// targets (in reading order) are listed with their first referrer, read again from
    /// `files`.
    pub fn finish(
        self,
        types: &HashSet<String>,
        files: &[FileRef],
        source: &dyn Source,
    ) -> Outcome {
        let state = self
            .state
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        let mut out = Outcome {
            references: state.references,
            ..Outcome::default()
        };
        let mut dangling: Vec<(u32, u64, u128)> = Vec::new();
        for (key, p) in &state.pending {
            let t = &state.type_names[p.type_no as usize];
            if types.contains(t) {
                out.dangling_total += p.count;
                dangling.push((p.file, p.line, *key));
            } else {
                *out.outside.entry(t.clone()).or_default() += p.count;
            }
        }
        dangling.sort_unstable();
        dangling.truncate(MAX_LISTED);
        let mut start = 0;
        while start < dangling.len() {
            let file = dangling[start].0;
            let end = start + dangling[start..].iter().take_while(|d| d.0 == file).count();
            let wanted = &dangling[start..end];
            if let Some(f) = files.get(file as usize) {
                self.keys.listed(f, wanted, source, &mut out.dangling);
            }
            start = end;
        }
        out
    }
}

impl Keys {
    /// Reads `file` again up to the last line in `wanted` and lists each wanted line's
    /// references to wanted targets. A file that changed or cannot be read lists less: its
    /// own report already says so (sizes and digests are checked on the first read).
    fn listed(
        &self,
        file: &FileRef,
        wanted: &[(u32, u64, u128)],
        source: &dyn Source,
        list: &mut Vec<DanglingRef>,
    ) {
        let Ok(raw) = source.open(&file.url) else {
            return;
        };
        let decoded: Box<dyn Read> = if file.gzip {
            Box::new(flate2::read::MultiGzDecoder::new(raw))
        } else {
            raw
        };
        let mut reader = BufReader::with_capacity(256 * 1024, decoded);
        let last = wanted.iter().map(|w| w.1).max().unwrap_or(0);
        let mut line = Vec::new();
        let mut n = 0u64;
        while n < last {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            n += 1;
            if !wanted.iter().any(|w| w.1 == n) {
                continue;
            }
            let Ok(v) = serde_json::from_slice::<Value>(&line) else {
                continue;
            };
            let rt = v.get("resourceType").and_then(Value::as_str).unwrap_or("");
            let id = v.get("id").and_then(Value::as_str).unwrap_or("");
            let mut found = Vec::new();
            references(&v, &mut found);
            let mut listed_here = HashSet::new();
            for r in found {
                let Some((t, tid)) = relative_reference(r) else {
                    continue;
                };
                let key = self.key(t, tid);
                if wanted.iter().any(|w| w.1 == n && w.2 == key) && listed_here.insert(key) {
                    list.push(DanglingRef {
                        from: format!("{rt}/{id}"),
                        reference: r.to_string(),
                    });
                }
            }
        }
    }
}
