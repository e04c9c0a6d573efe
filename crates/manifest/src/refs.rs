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
//! Memory is bounded: while the hashes held fit in a budget ([`DEFAULT_BUDGET`] entries, about
//! 64 MiB; `FHIRHOSE_VERIFY_BUDGET` sets another, for measuring) all stays in memory as above.
//! When they would exceed it, the ids are written, sorted, as a run file of 16-byte records into
//! a temporary directory (removed when the check ends, also on an error or a panic), the
//! unresolved targets as a run of 40-byte records (key, type, count, first referrer), and both
//! sets start empty; a reference to a target not in memory is then unresolved until the end
//! (its target may be in a written run). At the end the runs are merged by key (a k-way merge
//! of at most [`FAN_IN`] runs of each kind at once, runs merged in groups of [`FAN_IN`] first
//! when there are more): an unresolved key that no id run holds dangles, its references summed
//! over the runs, its first referrer the least (file, line). The memory is then the budget plus
//! one 64 KiB read buffer per open run; the disk is 16 bytes per resource and 40 per unresolved
//! target per run. The outcome is the same whatever the budget; a run that cannot be written
//! (a full disk) fails the check with [`VerifyError::Spill`], naming the directory.
//!
//! A dangling target is listed once, with the first resource that referred to it; those few
//! lines are found again by reading their files a second time, only when something dangles.

use std::cmp::Reverse;
use std::collections::hash_map::{Entry, RandomState};
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde_json::Value;

use crate::{DanglingRef, MAX_LISTED, Source, VerifyError, references, relative_reference};

/// The default budget, in hashes held (ids plus unresolved targets): 2^20 * 7/8, as many as a
/// table of 2^20 slots holds without growing. The ids' table is then at most 17 MiB, the
/// unresolved targets' at most 41 MiB, and a run's sorted copy 16 or 40 bytes an entry while
/// it is written: about 64 MiB at the peak (measured: docs/performance.md). 397,807 resources
/// (1,000 synthetic patients: at most about 590,000 hashes at once) stay in memory.
pub(crate) const DEFAULT_BUDGET: usize = (1 << 20) / 8 * 7;

/// The most runs of one kind read at once by a merge.
pub(crate) const FAN_IN: usize = 64;

/// The read buffer of a run being merged.
const RUN_BUFFER: usize = 64 * 1024;

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
    /// Why the check could not be done to the end (its temporary files); the counts above are
    /// then incomplete.
    pub error: Option<VerifyError>,
}

/// The check, shared by the threads that read the files (one per core): the keys are fixed at
/// the start and hash outside the lock; what was read so far is behind one mutex, taken once
/// per resource. The outcome does not depend on the order the files are read in, nor on the
/// budget: a target dangles when no file holds it, and its first referrer is the least (file,
/// line).
pub(crate) struct RefCheck {
    keys: Keys,
    state: Mutex<State>,
    /// Hashes held in memory at most before they are written to runs.
    budget: usize,
    /// Runs of one kind merged at once.
    fan_in: usize,
    /// Where the temporary directory goes (`None`: the system's, `TMPDIR`).
    tmp: Option<PathBuf>,
}

/// The two keys of a run's 128-bit hashes.
#[derive(Clone)]
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
    /// Every output resource read (since the last run was written), as the hash of `Type/id`.
    ids: HashSet<u128>,
    /// The types of the output lines (an `organizeOutputBy` export's types come from them).
    line_types: HashSet<String>,
    type_nos: HashMap<String, u32>,
    type_names: Vec<String>,
    pending: HashMap<u128, Pending>,
    references: u64,
    /// The runs written so far, once the budget was exceeded.
    spill: Option<Spill>,
    /// A run could not be written: the check stopped.
    error: Option<VerifyError>,
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

    /// Writes the ids and the unresolved targets held as two runs and empties both (their
    /// tables freed: memory is the budget, not twice it).
    fn spill(&mut self, tmp: Option<&Path>) -> Result<(), VerifyError> {
        if self.spill.is_none() {
            self.spill = Some(Spill::new(tmp)?);
        }
        let ids = std::mem::take(&mut self.ids);
        let pending = std::mem::take(&mut self.pending);
        match &mut self.spill {
            Some(spill) => spill.put(ids, pending),
            None => Ok(()),
        }
    }
}

impl RefCheck {
    /// A check with the [`DEFAULT_BUDGET`].
    pub fn new() -> RefCheck {
        RefCheck::with_budget(DEFAULT_BUDGET)
    }

    /// A check that holds at most `entries` hashes in memory (at least 1).
    pub fn with_budget(entries: usize) -> RefCheck {
        RefCheck {
            keys: Keys([RandomState::new(), RandomState::new()]),
            state: Mutex::new(State::default()),
            budget: entries.max(1),
            fan_in: FAN_IN,
            tmp: None,
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
        if s.error.is_some() {
            s.references += targets.len() as u64;
            return;
        }
        if let Some(key) = own {
            s.ids.insert(key);
            // References read before it now resolve (those in a written run at the end).
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
        if s.ids.len() + s.pending.len() >= self.budget
            && let Err(e) = s.spill(self.tmp.as_deref())
        {
            s.ids = HashSet::new();
            s.pending = HashMap::new();
            s.error = Some(e);
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
        let mut state = self
            .state
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        let mut out = Outcome {
            references: state.references,
            ..Outcome::default()
        };
        if let Some(e) = state.error.take() {
            out.error = Some(e);
            return out;
        }
        let mut dangling: Vec<(u32, u64, u128)> = Vec::new();
        if state.spill.is_none() {
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
        } else {
            // The least MAX_LISTED dangling targets, in a max-heap.
            let mut least: BinaryHeap<(u32, u64, u128)> = BinaryHeap::new();
            let merged = state.spill(self.tmp.as_deref()).and_then(|()| {
                let type_names = &state.type_names;
                let Some(spill) = &mut state.spill else {
                    return Ok(());
                };
                spill.unresolved(self.fan_in, |u| {
                    let t = &type_names[u.type_no as usize];
                    if types.contains(t) {
                        out.dangling_total += u.count;
                        least.push((u.file, u.line, u.key));
                        if least.len() > MAX_LISTED {
                            least.pop();
                        }
                    } else {
                        *out.outside.entry(t.clone()).or_default() += u.count;
                    }
                })
            });
            // The runs are removed here, before the few lines are read again.
            drop(state);
            if let Err(e) = merged {
                return Outcome {
                    references: out.references,
                    error: Some(e),
                    ..Outcome::default()
                };
            }
            dangling = least.into_sorted_vec();
        }
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

/// An unresolved target as written to a run.
#[derive(Clone, Copy)]
struct Unresolved {
    key: u128,
    type_no: u32,
    count: u64,
    file: u32,
    line: u64,
}

/// A fixed-size record of a run, sorted by its key, unique in its run.
trait Record: Copy {
    const SIZE: usize;
    fn key(&self) -> u128;
    fn encode(&self, out: &mut [u8]);
    fn decode(b: &[u8]) -> Self;
    /// Takes in a record of the same key from another run.
    fn fold(&mut self, other: &Self);
}

/// An id.
impl Record for u128 {
    const SIZE: usize = 16;
    fn key(&self) -> u128 {
        *self
    }
    fn encode(&self, out: &mut [u8]) {
        out[..16].copy_from_slice(&self.to_le_bytes());
    }
    fn decode(b: &[u8]) -> u128 {
        u128::from_le_bytes(b[..16].try_into().unwrap_or_default())
    }
    fn fold(&mut self, _: &u128) {}
}

impl Record for Unresolved {
    const SIZE: usize = 40;
    fn key(&self) -> u128 {
        self.key
    }
    fn encode(&self, out: &mut [u8]) {
        out[..16].copy_from_slice(&self.key.to_le_bytes());
        out[16..20].copy_from_slice(&self.type_no.to_le_bytes());
        out[20..28].copy_from_slice(&self.count.to_le_bytes());
        out[28..32].copy_from_slice(&self.file.to_le_bytes());
        out[32..40].copy_from_slice(&self.line.to_le_bytes());
    }
    fn decode(b: &[u8]) -> Unresolved {
        Unresolved {
            key: u128::from_le_bytes(b[..16].try_into().unwrap_or_default()),
            type_no: u32::from_le_bytes(b[16..20].try_into().unwrap_or_default()),
            count: u64::from_le_bytes(b[20..28].try_into().unwrap_or_default()),
            file: u32::from_le_bytes(b[28..32].try_into().unwrap_or_default()),
            line: u64::from_le_bytes(b[32..40].try_into().unwrap_or_default()),
        }
    }
    fn fold(&mut self, other: &Unresolved) {
        self.count += other.count;
        if (other.file, other.line) < (self.file, self.line) {
            (self.file, self.line) = (other.file, other.line);
        }
    }
}

/// The largest record.
const MAX_RECORD: usize = 40;

/// A run file: its path and how many records it holds.
#[derive(Clone)]
struct Run {
    path: PathBuf,
    len: u64,
}

/// The runs written, in a temporary directory removed when this is dropped.
struct Spill {
    dir: tempfile::TempDir,
    ids: Vec<Run>,
    pending: Vec<Run>,
    /// Runs made so far (their file names).
    made: u64,
}

impl Spill {
    fn new(tmp: Option<&Path>) -> Result<Spill, VerifyError> {
        let tmp = tmp.map_or_else(std::env::temp_dir, Path::to_path_buf);
        let dir = tempfile::Builder::new()
            .prefix("fhirhose-verify-")
            .tempdir_in(&tmp)
            .map_err(|e| VerifyError::Spill {
                dir: tmp.display().to_string(),
                message: e.to_string(),
            })?;
        Ok(Spill {
            dir,
            ids: Vec::new(),
            pending: Vec::new(),
            made: 0,
        })
    }

    fn error(&self, e: io::Error) -> VerifyError {
        VerifyError::Spill {
            dir: self.dir.path().display().to_string(),
            message: e.to_string(),
        }
    }

    /// Writes `ids` and `pending` as a run each, sorted by key.
    fn put(
        &mut self,
        ids: HashSet<u128>,
        pending: HashMap<u128, Pending>,
    ) -> Result<(), VerifyError> {
        let mut ids: Vec<u128> = ids.into_iter().collect();
        ids.sort_unstable();
        if !ids.is_empty() {
            let run = self.write(ids.iter().copied()).map_err(|e| self.error(e))?;
            self.ids.push(run);
        }
        drop(ids);
        let mut pending: Vec<Unresolved> = pending
            .into_iter()
            .map(|(key, p)| Unresolved {
                key,
                type_no: p.type_no,
                count: p.count,
                file: p.file,
                line: p.line,
            })
            .collect();
        pending.sort_unstable_by_key(|p| p.key);
        if !pending.is_empty() {
            let run = self
                .write(pending.iter().copied())
                .map_err(|e| self.error(e))?;
            self.pending.push(run);
        }
        Ok(())
    }

    /// Writes `records` (sorted by key, unique) as a new run.
    fn write<R: Record>(&mut self, records: impl Iterator<Item = R>) -> io::Result<Run> {
        self.made += 1;
        let path = self.dir.path().join(format!("run-{}", self.made));
        let mut w = BufWriter::with_capacity(RUN_BUFFER, File::create(&path)?);
        let mut buf = [0u8; MAX_RECORD];
        let mut len = 0;
        for r in records {
            r.encode(&mut buf);
            w.write_all(&buf[..R::SIZE])?;
            len += 1;
        }
        w.into_inner().map_err(io::IntoInnerError::into_error)?;
        Ok(Run { path, len })
    }

    /// Merges `runs` in groups of `fan_in` until at most `fan_in` are left; the merged runs'
    /// files are removed as they go.
    fn reduce<R: Record>(&mut self, mut runs: Vec<Run>, fan_in: usize) -> io::Result<Vec<Run>> {
        let fan_in = fan_in.max(2);
        while runs.len() > fan_in {
            let mut next = Vec::with_capacity(runs.len().div_ceil(fan_in));
            for group in runs.chunks(fan_in) {
                if let [one] = group {
                    next.push(one.clone());
                    continue;
                }
                let mut merge = Merge::<R>::open(group)?;
                let mut err = None;
                let run = self.write(std::iter::from_fn(|| match merge.next() {
                    Ok(r) => r,
                    Err(e) => {
                        err = Some(e);
                        None
                    }
                }))?;
                if let Some(e) = err {
                    return Err(e);
                }
                drop(merge);
                for r in group {
                    let _ = std::fs::remove_file(&r.path);
                }
                next.push(run);
            }
            runs = next;
        }
        Ok(runs)
    }

    /// Calls `each` with every unresolved target (its references summed over the runs, its
    /// first referrer the least) that no id run holds.
    fn unresolved(
        &mut self,
        fan_in: usize,
        mut each: impl FnMut(Unresolved),
    ) -> Result<(), VerifyError> {
        let ids = std::mem::take(&mut self.ids);
        let pending = std::mem::take(&mut self.pending);
        let go = |spill: &mut Spill| -> io::Result<()> {
            let ids = spill.reduce::<u128>(ids, fan_in)?;
            let pending = spill.reduce::<Unresolved>(pending, fan_in)?;
            let mut ids = Merge::<u128>::open(&ids)?;
            let mut pending = Merge::<Unresolved>::open(&pending)?;
            let mut id = ids.next()?;
            while let Some(p) = pending.next()? {
                while id.is_some_and(|i| i < p.key) {
                    id = ids.next()?;
                }
                if id != Some(p.key) {
                    each(p);
                }
            }
            Ok(())
        };
        go(self).map_err(|e| self.error(e))
    }
}

/// A run being read.
struct RunReader<R> {
    file: BufReader<File>,
    left: u64,
    record: PhantomData<R>,
}

impl<R: Record> RunReader<R> {
    fn open(run: &Run) -> io::Result<RunReader<R>> {
        Ok(RunReader {
            file: BufReader::with_capacity(RUN_BUFFER, File::open(&run.path)?),
            left: run.len,
            record: PhantomData,
        })
    }

    fn next(&mut self) -> io::Result<Option<R>> {
        if self.left == 0 {
            return Ok(None);
        }
        let mut buf = [0u8; MAX_RECORD];
        self.file.read_exact(&mut buf[..R::SIZE])?;
        self.left -= 1;
        Ok(Some(R::decode(&buf[..R::SIZE])))
    }
}

/// A k-way merge of runs by key: each key once, its records from all runs folded.
struct Merge<R> {
    readers: Vec<RunReader<R>>,
    heads: Vec<Option<R>>,
    /// The runs by their head's key, least first.
    heap: BinaryHeap<Reverse<(u128, usize)>>,
}

impl<R: Record> Merge<R> {
    fn open(runs: &[Run]) -> io::Result<Merge<R>> {
        let mut m = Merge {
            readers: Vec::with_capacity(runs.len()),
            heads: Vec::with_capacity(runs.len()),
            heap: BinaryHeap::with_capacity(runs.len()),
        };
        for run in runs {
            m.readers.push(RunReader::open(run)?);
            m.heads.push(None);
            m.advance(m.readers.len() - 1)?;
        }
        Ok(m)
    }

    /// Reads run `i`'s next record into its head.
    fn advance(&mut self, i: usize) -> io::Result<()> {
        let next = self.readers[i].next()?;
        if let Some(r) = &next {
            self.heap.push(Reverse((r.key(), i)));
        }
        self.heads[i] = next;
        Ok(())
    }

    fn next(&mut self) -> io::Result<Option<R>> {
        let Some(Reverse((key, i))) = self.heap.pop() else {
            return Ok(None);
        };
        let Some(mut record) = self.heads[i].take() else {
            return Ok(None);
        };
        self.advance(i)?;
        while let Some(&Reverse((k, j))) = self.heap.peek() {
            if k != key {
                break;
            }
            self.heap.pop();
            if let Some(other) = self.heads[j].take() {
                record.fold(&other);
            }
            self.advance(j)?;
        }
        Ok(Some(record))
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
            match crate::limits::read_line(&mut reader, &mut line, crate::MAX_LINE_BYTES) {
                Ok(crate::limits::Line::End) | Err(_) => return,
                Ok(crate::limits::Line::Read) => {}
                // Counted as a line, as the first read counted it; never a wanted one.
                Ok(crate::limits::Line::TooLong) => {
                    n += 1;
                    continue;
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// Files held in memory, by URL.
    struct Mem(HashMap<String, Vec<u8>>);

    impl Source for Mem {
        fn open(&self, url: &str) -> Result<Box<dyn Read + '_>, VerifyError> {
            match self.0.get(url) {
                Some(b) => Ok(Box::new(b.as_slice())),
                None => Err(VerifyError::Read {
                    what: url.into(),
                    message: "no such file".into(),
                }),
            }
        }
    }

    /// What an outcome says, comparable.
    #[derive(Debug, PartialEq)]
    struct Seen {
        references: u64,
        dangling: Vec<(String, String)>,
        dangling_total: u64,
        outside: BTreeMap<String, u64>,
    }

    const TYPES: [&str; 3] = ["Patient", "Encounter", "Observation"];

    /// Checks `files` (resources, each file read in `order`) with `check`.
    fn check(check: RefCheck, files: &[Vec<Value>], order: &[usize]) -> Seen {
        let mut mem = HashMap::new();
        let mut refs = Vec::new();
        for (n, f) in files.iter().enumerate() {
            let text: String = f.iter().map(|v| format!("{v}\n")).collect();
            mem.insert(format!("f{n}"), text.into_bytes());
            refs.push(FileRef {
                url: format!("f{n}"),
                gzip: false,
            });
        }
        for &n in order {
            for (i, v) in files[n].iter().enumerate() {
                let rt = v["resourceType"].as_str().unwrap();
                check.resource(rt, v, n as u32, i as u64 + 1);
            }
        }
        let types = TYPES.iter().map(|t| t.to_string()).collect();
        let out = check.finish(&types, &refs, &Mem(mem));
        assert!(out.error.is_none(), "{:?}", out.error);
        Seen {
            references: out.references,
            dangling: out
                .dangling
                .into_iter()
                .map(|d| (d.from, d.reference))
                .collect(),
            dangling_total: out.dangling_total,
            outside: out.outside,
        }
    }

    /// A check of `budget` hashes, merging `fan_in` runs at once, with the keys of `like`
    /// (which of several dangling targets first referred to on one line is listed depends on
    /// the keys when the list is cut).
    fn tiny(budget: usize, fan_in: usize, like: &RefCheck) -> RefCheck {
        RefCheck {
            fan_in,
            keys: like.keys.clone(),
            ..RefCheck::with_budget(budget)
        }
    }

    fn res(t: &str, id: &str, to: &[&str]) -> Value {
        let refs: Vec<Value> = to.iter().map(|r| json!({"reference": r})).collect();
        json!({"resourceType": t, "id": id, "refs": refs})
    }

    #[test]
    fn a_tiny_budget_gives_the_same_outcome_as_memory() {
        let files = vec![
            vec![
                res("Observation", "o1", &["Patient/p1"]),
                res("Observation", "o2", &["Patient/p9"]),
                res("Observation", "o3", &["Patient/p9", "Practitioner/x"]),
                res("Observation", "o4", &["Patient/p2", "Patient/p8"]),
            ],
            vec![
                res("Patient", "p1", &[]),
                res("Patient", "p2", &[]),
                res("Patient", "p2", &[]),
                res("Patient", "p3", &["Observation/o1", "Observation/o4"]),
                res("Patient", "p4", &["Patient/p8", "Practitioner/x"]),
            ],
            vec![res(
                "Encounter",
                "e1",
                &[
                    "Patient/p9",
                    "Patient/p3",
                    "Observation/o7",
                    "Encounter/e1",
                    "Practitioner/y",
                ],
            )],
        ];
        let expected = Seen {
            references: 15,
            dangling: vec![
                ("Observation/o2".into(), "Patient/p9".into()),
                ("Observation/o4".into(), "Patient/p8".into()),
                ("Encounter/e1".into(), "Observation/o7".into()),
            ],
            dangling_total: 6,
            outside: BTreeMap::from([("Practitioner".into(), 3)]),
        };
        for order in [[0, 1, 2], [2, 1, 0], [1, 2, 0]] {
            assert_eq!(check(RefCheck::new(), &files, &order), expected);
            for (budget, fan_in) in [(1, 2), (3, 2), (3, 64), (5, 3)] {
                assert_eq!(
                    check(tiny(budget, fan_in, &RefCheck::new()), &files, &order),
                    expected,
                    "budget {budget}, fan-in {fan_in}, order {order:?}"
                );
            }
        }
    }

    #[test]
    fn runs_are_written_to_a_temporary_directory_removed_at_the_end() {
        let tmp = tempfile::tempdir().unwrap();
        let c = RefCheck {
            tmp: Some(tmp.path().to_path_buf()),
            ..tiny(2, 2, &RefCheck::new())
        };
        for i in 0..10 {
            let v = res(
                "Patient",
                &format!("p{i}"),
                &[&format!("Patient/p{}", i + 5)],
            );
            c.resource("Patient", &v, 0, i + 1);
        }
        let runs = walk(tmp.path());
        assert!(runs > 5, "{runs} run files");
        let types = HashSet::from(["Patient".to_string()]);
        let out = c.finish(&types, &[], &Mem(HashMap::new()));
        assert!(out.error.is_none());
        assert_eq!((out.references, out.dangling_total), (10, 5));
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }

    /// Files under `dir`, in its subdirectories.
    fn walk(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                if e.file_type().unwrap().is_dir() {
                    walk(&e.path())
                } else {
                    1
                }
            })
            .sum()
    }

    #[test]
    fn runs_that_cannot_be_written_fail_the_check_with_their_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let gone = tmp.path().join("gone");
        let c = RefCheck {
            tmp: Some(gone.clone()),
            ..tiny(2, 2, &RefCheck::new())
        };
        for i in 0..10 {
            let v = res("Patient", &format!("p{i}"), &["Patient/p99"]);
            c.resource("Patient", &v, 0, i + 1);
        }
        let out = c.finish(&HashSet::new(), &[], &Mem(HashMap::new()));
        assert_eq!(out.references, 10);
        let e = out.error.expect("an error").to_string();
        assert!(
            e.contains(&gone.display().to_string()) && e.contains("full disk"),
            "{e}"
        );
    }

    /// A random resource: type, id, references as (type, id); type 3 is outside the export.
    type Random = (usize, u8, Vec<(usize, u8)>);

    /// Random files of random resources.
    fn files() -> impl Strategy<Value = Vec<Vec<Random>>> {
        let resource = (
            0..3usize,
            0..30u8,
            proptest::collection::vec((0..4usize, 0..40u8), 0..4),
        );
        proptest::collection::vec(proptest::collection::vec(resource, 0..25), 1..6)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn any_budget_gives_the_outcome_of_memory(
            raw in files(),
            budget in 1..12usize,
            fan_in in 2..5usize,
            reverse in any::<bool>(),
        ) {
            let all = ["Patient", "Encounter", "Observation", "Practitioner"];
            let files: Vec<Vec<Value>> = raw
                .iter()
                .map(|f| {
                    f.iter()
                        .map(|(t, id, to)| {
                            let to: Vec<String> =
                                to.iter().map(|(t, id)| format!("{}/x{id}", all[*t])).collect();
                            let to: Vec<&str> = to.iter().map(String::as_str).collect();
                            res(all[*t], &format!("x{id}"), &to)
                        })
                        .collect()
                })
                .collect();
            let mut order: Vec<usize> = (0..files.len()).collect();
            if reverse {
                order.reverse();
            }
            let memory = RefCheck::new();
            let spilled = tiny(budget, fan_in, &memory);
            let memory = check(memory, &files, &order);
            prop_assert_eq!(check(spilled, &files, &order), memory);
        }
    }
}
