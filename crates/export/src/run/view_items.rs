//! `$viewdefinition-export` work items: the scan of [`scan_item`](super::scan_item) — same
//! snapshot, ranges, cursor, level/compartment and `_typeFilter` filtering, de-identification —
//! with each resource turned into the rows of every view of its type, written per view as NDJSON,
//! CSV or Parquet parts that are cut, committed with the cursor and numbered like resource files
//! (`<view name>-<n>.<ext>`). The items are ordinary `scan` items of the job's queue: the job's
//! recorded request carries the views, so resume and exactly-once are the `$export` ones.
//!
//! A resource the view cannot turn into rows (e.g. several values in a column that is not a
//! collection) is left out and reported in the job's `error` file, like a resource the
//! de-identification could not process.

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{Value, json};
use store::SeqBounds;

use super::{
    Committer, Emit, ItemContext, PartBody, Pulse, Roller, RunError, Unfinished,
    compartment_params, scan_rows, transform,
};
use crate::jobs::{FileKind, WorkItem};
use crate::request::ViewFormat;
use crate::sink::{PartWriter, SinkError};

/// Parquet row groups of view files: at most this many rows (files are cut by
/// `file_max_resources` rows, so a file usually is one row group).
const PARQUET_GROUP_ROWS: usize = 1 << 20;
const PARQUET_GROUP_BYTES: usize = 128 << 20;

/// A Parquet file of a view being written, over its part's writer.
pub(super) type ParquetFile = views::parquet::ParquetWriter<Box<dyn PartWriter>>;

/// One Parquet part being written.
struct ParquetPart {
    writer: ParquetFile,
    temp: String,
}

/// Writes a Parquet part's last row group and footer (the encoding of its buffered rows: done by
/// the committing thread, [`super::Committer::pipelined`]); returns the part's writer, flushed.
pub(super) fn finish_parquet(
    file: ParquetFile,
    temp: &str,
) -> Result<Box<dyn PartWriter>, RunError> {
    let mut w = file.finish().map_err(|e| parquet_error(temp, e))?;
    w.flush().map_err(|e| SinkError::from_io(temp, e))?;
    Ok(w)
}

/// The parts of one view in one item.
enum ViewOut<'s> {
    /// NDJSON or CSV lines (CSV: the header starts each part).
    Text {
        roller: Roller<'s>,
        header: Option<String>,
    },
    Parquet {
        base: Roller<'s>,
        current: Option<Box<ParquetPart>>,
    },
}

fn parquet_error(temp: &str, e: views::parquet::ParquetError) -> RunError {
    match e {
        // A value that does not convert is the data's problem: the job fails naming it.
        views::parquet::ParquetError::Convert { .. } => {
            RunError::Anonymization(format!("a view row cannot be written as Parquet: {e}"))
        }
        other => RunError::Sink(SinkError::from_io(
            temp,
            std::io::Error::other(other.to_string()),
        )),
    }
}

impl<'s> ViewOut<'s> {
    fn new(
        ctx: &ItemContext<'s>,
        item: &WorkItem,
        view: &views::View,
        format: ViewFormat,
        header: bool,
    ) -> ViewOut<'s> {
        let name = view.name().unwrap_or("view");
        let prefix = format!("{name}.{}", format.extension());
        let roller = Roller::new(ctx, item, FileKind::Output, name, &prefix);
        match format {
            ViewFormat::Parquet => ViewOut::Parquet {
                base: roller,
                current: None,
            },
            ViewFormat::Csv if header => {
                let mut h = String::new();
                views::csv::write_header(view.columns(), &mut h);
                h.pop();
                ViewOut::Text {
                    roller,
                    header: Some(h),
                }
            }
            _ => ViewOut::Text {
                roller,
                header: None,
            },
        }
    }

    fn write(
        &mut self,
        view: &views::View,
        format: ViewFormat,
        row: &[views::Value],
        line: &mut String,
    ) -> Result<(), RunError> {
        match self {
            ViewOut::Text { roller, header } => {
                if roller.current.is_none()
                    && let Some(h) = header
                {
                    roller.write(h.as_bytes())?;
                    // The header is not a row.
                    if let Some((_, _, n, _)) = roller.current.as_mut() {
                        *n -= 1;
                    }
                }
                line.clear();
                match format {
                    ViewFormat::Csv => views::csv::write_row(row, line),
                    _ => views::ndjson::write_row(view.columns(), row, line),
                }
                line.pop();
                roller.write(line.as_bytes())
            }
            ViewOut::Parquet { base, current } => {
                if current.is_none() {
                    base.parts += 1;
                    let temp = format!(
                        "{}/_parts/{}-{}-{}-{}.parquet",
                        base.folder, base.prefix, base.item_no, base.attempt, base.parts
                    );
                    let w = crate::part::create(base.sink, &base.container, &temp, false)?;
                    let writer = views::parquet::ParquetWriter::new(
                        &base.resource_type,
                        view.columns(),
                        w,
                        views::parquet::Options {
                            row_group_rows: PARQUET_GROUP_ROWS
                                .min(base.max_resources.min(usize::MAX as u64) as usize),
                            row_group_bytes: PARQUET_GROUP_BYTES,
                        },
                    )
                    .map_err(|e| parquet_error(&temp, e))?;
                    *current = Some(Box::new(ParquetPart { writer, temp }));
                }
                if let Some(p) = current.as_mut() {
                    p.writer
                        .write_row(row)
                        .map_err(|e| parquet_error(&p.temp, e))?;
                }
                Ok(())
            }
        }
    }

    fn full(&self) -> bool {
        match self {
            ViewOut::Text { roller, .. } => roller.full(),
            ViewOut::Parquet { base, current } => current
                .as_ref()
                .is_some_and(|p| p.writer.rows() >= base.max_resources),
        }
    }

    /// The current part, if any, still to be finished before its commit.
    fn take_unfinished(&mut self) -> Option<Unfinished> {
        match self {
            ViewOut::Text { roller, .. } => roller.take_unfinished(),
            ViewOut::Parquet { base, current } => {
                let p = current.take()?;
                Some(Unfinished {
                    kind: FileKind::Output,
                    resource_type: base.resource_type.clone(),
                    prefix: base.prefix.clone(),
                    count: p.writer.rows(),
                    body: PartBody::Parquet(Box::new(p.writer)),
                    temp_path: p.temp,
                })
            }
        }
    }
}

/// A scan item of a view export: every view of the item's type.
pub(super) fn scan_views(ctx: &ItemContext<'_>, item: &WorkItem) -> Result<u64, RunError> {
    let p = ctx.prepared;
    let t = item.resource_type.as_str();
    let format = p.req.view_format;
    let views: Vec<Arc<views::View>> = p
        .req
        .views
        .iter()
        .filter(|v| v.resource_type() == t)
        .cloned()
        .collect();
    let compartment = compartment_params(t);
    let mut outs: Vec<ViewOut<'_>> = views
        .iter()
        .map(|v| ViewOut::new(ctx, item, v, format, p.req.view_header))
        .collect();
    let mut errors = Roller::new(
        ctx,
        item,
        FileKind::Error,
        "OperationOutcome",
        "OperationOutcome",
    );
    let mut pulse = Pulse {
        last: Instant::now(),
    };
    let mut scanned = item.scanned;
    let bounds = SeqBounds {
        after: item.cursor.max(p.since_after),
        up_to: item.seq_up_to,
    };
    let mut line = String::new();
    let take_all = |outs: &mut Vec<ViewOut<'_>>, errors: &mut Roller<'_>| -> Vec<Unfinished> {
        outs.iter_mut()
            .filter_map(ViewOut::take_unfinished)
            .chain(errors.take_unfinished())
            .collect()
    };
    Committer::of(ctx).pipelined(item, |pipeline| {
        scan_rows(ctx.store, t, p.job.watermark, bounds, &mut |row| {
            scanned += 1;
            // Every resource: one resource of a costly view takes seconds (its FHIRPath work is
            // bounded by `views::MAX_RESOURCE_WORK`), so a cancel, a shutdown or a heartbeat
            // looked at every 1,024 resources came minutes late (a review).
            pulse.beat(ctx, item, scanned)?;
            if super::changed_after_until(&p.req, row.last_updated) {
                return Ok(());
            }
            // The resource as `$export` would write it (filtered, de-identified), then the views.
            let resource: Value = match transform(p, t, row.json, &compartment, &None, true)? {
                Emit::Skip => return Ok(()),
                Emit::Line(bytes) => match serde_json::from_slice(&bytes) {
                    Ok(v) => v,
                    Err(_) => return Ok(()),
                },
                Emit::Stub(stub, outcome) => {
                    errors.write(&outcome)?;
                    match serde_json::from_slice(&stub) {
                        Ok(v) => v,
                        Err(_) => return Ok(()),
                    }
                }
            };
            for (view, out) in views.iter().zip(outs.iter_mut()) {
                // A resource's error comes before its first row: all its rows or none.
                match view.for_each_row(&resource, |r| out.write(view, format, r, &mut line)) {
                    Ok(_) => {}
                    Err(views::EachRowError::Row(e)) => {
                        let oo = json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "processing",
                            "diagnostics": format!("view '{}': {e}", view.name().unwrap_or(""))}]});
                        errors.write(oo.to_string().as_bytes())?;
                    }
                    Err(views::EachRowError::Sink(e)) => return Err(e),
                }
            }
            if outs.iter().any(ViewOut::full) || errors.full() {
                pipeline.commit(take_all(&mut outs, &mut errors), row.seq, scanned)?;
            }
            Ok(())
        })?;
        pipeline.commit(take_all(&mut outs, &mut errors), item.seq_up_to, scanned)
    })?;
    Ok(scanned)
}
