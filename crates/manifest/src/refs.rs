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

pub(crate) struct RefCheck {
    keys: [RandomState; 2],
    /// Every output resource read, as the hash of `Type/id`.
    ids: HashSet<u128>,
    /// The types of the output lines (an `organizeOutputBy` export's types come from them).
    line_types: HashSet<String>,
    type_nos: HashMap<String, u32>,
    type_names: Vec<String>,
    pending: HashMap<u128, Pending>,
    references: u64,
}

impl RefCheck {
    pub fn new() -> RefCheck {
        RefCheck {
            keys: [RandomState::new(), RandomState::new()],
            ids: HashSet::new(),
            line_types: HashSet::new(),
            type_nos: HashMap::new(),
            type_names: Vec::new(),
            pending: HashMap::new(),
            references: 0,
        }
    }

    fn key(&self, t: &str, id: &str) -> u128 {
        let [a, b] = self.keys.each_ref().map(|k| {
            let mut h = k.build_hasher();
            h.write(t.as_bytes());
            h.write_u8(b'/');
            h.write(id.as_bytes());
            h.finish()
        });
        (u128::from(a) << 64) | u128::from(b)
    }

    /// An output resource of type `rt` (line `line` of file `file`): its id, and its references.
    pub fn resource(&mut self, rt: &str, v: &Value, file: u32, line: u64) {
        if !self.line_types.contains(rt) {
            self.line_types.insert(rt.to_string());
        }
        let id = v.get("id").and_then(Value::as_str).unwrap_or("");
        if !id.is_empty() {
            let key = self.key(rt, id);
            self.ids.insert(key);
            // References read before it now resolve.
            self.pending.remove(&key);
        }
        let mut found = Vec::new();
        references(v, &mut found);
        for r in found {
            let Some((t, id)) = relative_reference(r) else {
                continue;
            };
            self.references += 1;
            let key = self.key(t, id);
            if self.ids.contains(&key) {
                continue;
            }
            let type_no = match self.type_nos.get(t) {
                Some(&n) => n,
                None => {
                    let n = self.type_names.len() as u32;
                    self.type_names.push(t.to_string());
                    self.type_nos.insert(t.to_string(), n);
                    n
                }
            };
            match self.pending.entry(key) {
                Entry::Occupied(mut e) => e.get_mut().count += 1,
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
    pub fn line_types(&self) -> impl Iterator<Item = &String> {
        self.line_types.iter()
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
        let mut out = Outcome {
            references: self.references,
            ..Outcome::default()
        };
        let mut dangling: Vec<(u32, u64, u128)> = Vec::new();
        for (key, p) in &self.pending {
            let t = &self.type_names[p.type_no as usize];
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
                self.listed(f, wanted, source, &mut out.dangling);
            }
            start = end;
        }
        out
    }

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
