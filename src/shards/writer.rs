//! `ShardWriter`: captured rows -> Arrow record batches -> one zstd Parquet file,
//! written under a temporary name and renamed only when complete, so a crash never
//! leaves a file that looks finished.
use super::audit::{AuditSums, TemperedSums};
use anyhow::{bail, Context, Result};
use arrow::array::{
    ArrayRef, BooleanArray, FixedSizeListArray, Float16Array, Float32Array, Int32Array, ListArray, RecordBatch,
    StringArray, UInt16Array, UInt64Array, UInt8Array,
};
use arrow::buffer::{NullBuffer, OffsetBuffer};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::{ArrowSchemaConverter, ArrowWriter};
use parquet::basic::{Compression, Encoding, Type as PhysicalType, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::manifest::ShardEntry;
use super::row::{ShardRow, TailDraws, UldTargets};
use super::schema::{columns, IdType, ShardLayout, FORMAT_NAME, META_FORMAT, META_SETTINGS, META_VERSION};
use crate::files::checksum_file;

/// Parquet settings; defaults chosen by `scripts/bench_precompute.sh` (see docs/benchmarks.md).
#[derive(Debug, Clone)]
pub struct ParquetOptions {
    pub zstd_level: i32,
    pub row_group_rows: usize,
    /// BYTE_STREAM_SPLIT for the int and float32 per-token and per-target columns: the bytes of
    /// each value are stored in separate streams, so the always-zero high bytes of ids
    /// and the similar exponents of floats compress away under zstd.
    pub byte_stream_split: bool,
}

pub fn shard_file_name(index: usize) -> String {
    format!("shard-{index:05}.parquet")
}

pub struct ShardWriter {
    layout: ShardLayout,
    schema: Arc<Schema>,
    writer: ArrowWriter<File>,
    tmp_path: PathBuf,
    final_path: PathBuf,
    entry: ShardEntry,
}

impl ShardWriter {
    /// Starts `dir/shard-{index}.parquet` (as a `.tmp` file). `settings_json` goes into
    /// the file's key-value metadata so a shard describes itself.
    pub fn create(
        dir: &Path,
        index: usize,
        layout: ShardLayout,
        opts: &ParquetOptions,
        settings_json: &str,
    ) -> Result<Self> {
        let name = shard_file_name(index);
        let final_path = dir.join(&name);
        let tmp_path = dir.join(format!("{name}.tmp"));
        let schema = Arc::new(layout.arrow_schema());
        let metadata = vec![
            KeyValue::new(META_FORMAT.to_string(), FORMAT_NAME.to_string()),
            KeyValue::new(META_VERSION.to_string(), layout.format_version().to_string()),
            KeyValue::new(META_SETTINGS.to_string(), settings_json.to_string()),
        ];
        let mut props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(opts.zstd_level)?))
            .set_max_row_group_row_count(Some(opts.row_group_rows.max(1)))
            .set_dictionary_enabled(false)
            .set_statistics_enabled(EnabledStatistics::None)
            .set_key_value_metadata(Some(metadata));
        if opts.byte_stream_split {
            let parquet_schema = ArrowSchemaConverter::new().convert(&schema)?;
            for col in parquet_schema.columns() {
                let root = col.path().parts()[0].as_str();
                // Per-row scalars are few; strings and booleans are skipped by type below.
                let numeric = ![columns::ROW_INDEX, columns::NUM_TOKENS, columns::NUM_TARGETS].contains(&root);
                // Not on float16 (FIXED_LEN_BYTE_ARRAY) columns: DuckDB 2.0 cannot read
                // BYTE_STREAM_SPLIT there, and any Arrow tool must read the shards.
                let readable = matches!(
                    col.physical_type(),
                    PhysicalType::FLOAT | PhysicalType::DOUBLE | PhysicalType::INT32 | PhysicalType::INT64
                );
                if numeric && readable {
                    props = props.set_column_encoding(col.path().clone(), Encoding::BYTE_STREAM_SPLIT);
                }
            }
        }
        let props = props.build();
        let file = File::create(&tmp_path).with_context(|| format!("cannot create {}", tmp_path.display()))?;
        let writer = ArrowWriter::try_new(file, schema.clone(), Some(props))?;
        let entry = ShardEntry {
            file: name,
            rows: 0,
            tokens: 0,
            targets: 0,
            bytes: 0,
            checksum: String::new(),
            row_range: (u64::MAX, 0),
            audit: Some(AuditSums::default()),
        };
        Ok(ShardWriter { layout, schema, writer, tmp_path, final_path, entry })
    }

    pub fn write(&mut self, rows: &[ShardRow]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        // Targets that are not a distribution are never written (the reader refuses
        // them too: `ShardRow::check`).
        for r in rows {
            r.topk.check_mass().with_context(|| format!("row_index {}", r.sequence.row_index))?;
        }
        self.write_unchecked(rows)
    }

    /// `write` without the check that the targets are a distribution: for the tests that
    /// make the hostile files the reader must refuse.
    #[doc(hidden)]
    pub fn write_unchecked(&mut self, rows: &[ShardRow]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let batch = self.record_batch(rows)?;
        self.writer.write(&batch).with_context(|| format!("writing {}", self.tmp_path.display()))?;
        self.entry.audit.get_or_insert_with(AuditSums::default).add_rows(rows);
        for r in rows {
            self.entry.rows += 1;
            self.entry.tokens += r.sequence.len();
            self.entry.targets += r.num_targets();
            self.entry.row_range.0 = self.entry.row_range.0.min(r.sequence.row_index);
            self.entry.row_range.1 = self.entry.row_range.1.max(r.sequence.row_index + 1);
        }
        Ok(())
    }

    /// Closes the file, syncs it to disk, renames it to its final name and returns its
    /// manifest entry (with size and checksum).
    /// Adds the audit against the full distribution of rows written here (`audit`).
    pub fn add_tempered(&mut self, tempered: &[TemperedSums]) {
        self.entry.audit.get_or_insert_with(AuditSums::default).merge_tempered(tempered);
    }

    pub fn finish(mut self) -> Result<ShardEntry> {
        let file = self.writer.into_inner().with_context(|| format!("closing {}", self.tmp_path.display()))?;
        file.sync_all().with_context(|| format!("syncing {}", self.tmp_path.display()))?;
        drop(file);
        std::fs::rename(&self.tmp_path, &self.final_path)
            .with_context(|| format!("renaming {} to {}", self.tmp_path.display(), self.final_path.display()))?;
        self.entry.bytes = std::fs::metadata(&self.final_path)?.len();
        self.entry.checksum = checksum_file(&self.final_path)?;
        Ok(self.entry)
    }

    fn record_batch(&self, rows: &[ShardRow]) -> Result<RecordBatch> {
        let k = self.layout.top_k;
        let per_row_targets: Vec<usize> = rows.iter().map(ShardRow::num_targets).collect();
        let per_row_tokens: Vec<usize> = rows.iter().map(|r| r.sequence.len()).collect();
        for r in rows {
            let layers: Vec<(usize, usize)> = r.hidden.iter().map(|h| (h.layer, h.width)).collect();
            let t = &r.topk;
            let kinds = t.draws.is_some() == self.layout.draws
                && t.lengths.is_some() == self.layout.adaptive
                && t.uld.is_some() == self.layout.uld;
            if t.k != k || layers != self.layout.hidden || !kinds {
                bail!("row {} was captured with other settings than this shard", r.sequence.row_index);
            }
            // Columns of one row that must have matching lengths to form lists at all.
            let (p, t) = (r.num_targets(), &r.topk);
            let agree = r.sequence.loss_mask.len() == r.sequence.len()
                && t.ids.len() == t.lengths.as_ref().map_or(p * k, |l| l.iter().map(|&n| n as usize).sum())
                && t.logprobs.len() == t.ids.len()
                && t.lengths.as_ref().is_none_or(|l| l.len() == p)
                && t.target_logprob.len() == p
                && t.draws.as_ref().is_none_or(|d| {
                    d.lengths.len() == p
                        && d.counts.len() == d.ids.len()
                        && d.lengths.iter().map(|&n| n as usize).sum::<usize>() == d.ids.len()
                })
                && t.uld.as_ref().is_none_or(|u| u.logprobs.len() == p * (k + 1) && u.continues.len() == p)
                && r.hidden.iter().all(|h| h.values.len() == p * h.width && h.rms.len() == p)
                && r.sequence.sampler_logprobs.as_ref().is_none_or(|l| self.layout.sampler_logprobs && l.len() == p);
            if !agree {
                bail!("row {}: its per-token or per-target values disagree in length", r.sequence.row_index);
            }
        }
        let seqs = || rows.iter().map(|r| &r.sequence);
        let by_token = |values: ArrayRef| list(values, &per_row_tokens);
        let by_target = |values: ArrayRef| list(values, &per_row_targets);
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(UInt64Array::from_iter_values(seqs().map(|s| s.row_index))),
            list(
                Arc::new(StringArray::from_iter_values(seqs().flat_map(|s| s.sample_ids.iter()))),
                &seqs().map(|s| s.sample_ids.len()).collect::<Vec<_>>(),
            ),
            list(
                Arc::new(Int32Array::from_iter_values(seqs().flat_map(|s| s.doc_lengths.iter().map(|&n| n as i32)))),
                &seqs().map(|s| s.doc_lengths.len()).collect::<Vec<_>>(),
            ),
            Arc::new(Int32Array::from_iter_values(per_row_tokens.iter().map(|&n| n as i32))),
            Arc::new(Int32Array::from_iter_values(per_row_targets.iter().map(|&n| n as i32))),
            by_token(Arc::new(Int32Array::from_iter_values(seqs().flat_map(|s| s.ids.iter().map(|&i| i as i32))))),
            by_token(Arc::new(BooleanArray::from_iter(seqs().flat_map(|s| s.loss_mask.iter().map(|&m| Some(m)))))),
        ];
        let id_type = self.layout.id_type;
        if k > 0 {
            // Per position: k entries, or each position's own count when mass-adaptive.
            let lengths: Vec<usize> =
                rows.iter().flat_map(|r| r.topk.lengths.iter().flatten().map(|&n| n as usize)).collect();
            let per_position = |values: ArrayRef| match self.layout.adaptive {
                true => list(values, &lengths),
                false => fixed(values, k),
            };
            columns
                .push(by_target(per_position(id_array(id_type, rows.iter().flat_map(|r| r.topk.ids.iter().copied())))));
            let logprobs = Float16Array::from_iter_values(rows.iter().flat_map(|r| r.topk.logprobs.iter().copied()));
            columns.push(by_target(per_position(Arc::new(logprobs))));
        }
        columns.push(by_target(f32_array(rows.iter().flat_map(|r| r.topk.tail_logmass.iter().copied()))));
        columns.push(by_target(f32_array(rows.iter().flat_map(|r| r.topk.target_logprob.iter().copied()))));
        if self.layout.draws {
            let draws: Vec<&TailDraws> = rows.iter().filter_map(|r| r.topk.draws.as_ref()).collect();
            let lengths: Vec<usize> = draws.iter().flat_map(|d| d.lengths.iter().map(|&n| n as usize)).collect();
            let ids = id_array(id_type, draws.iter().flat_map(|d| d.ids.iter().copied()));
            columns.push(by_target(list(ids, &lengths)));
            let counts = UInt8Array::from_iter_values(draws.iter().flat_map(|d| d.counts.iter().copied()));
            columns.push(by_target(list(Arc::new(counts), &lengths)));
        }
        if self.layout.sampler_logprobs {
            // Null for a row of fixed data mixed into a round of samples.
            let values = f32_array(rows.iter().flat_map(|r| r.sequence.sampler_logprobs.iter().flatten().copied()));
            let field = Arc::new(Field::new("item", DataType::Float32, false));
            let lengths = rows.iter().map(|r| r.sequence.sampler_logprobs.as_ref().map_or(0, Vec::len));
            let valid = NullBuffer::from_iter(rows.iter().map(|r| r.sequence.sampler_logprobs.is_some()));
            columns.push(Arc::new(ListArray::new(field, OffsetBuffer::from_lengths(lengths), values, Some(valid))));
        }
        if self.layout.uld {
            let uld: Vec<&UldTargets> = rows.iter().filter_map(|r| r.topk.uld.as_ref()).collect();
            let values = Float16Array::from_iter_values(uld.iter().flat_map(|u| u.logprobs.iter().copied()));
            columns.push(by_target(fixed(Arc::new(values), k + 1)));
            let continues = BooleanArray::from_iter(uld.iter().flat_map(|u| u.continues.iter().map(|&c| Some(c))));
            columns.push(by_target(Arc::new(continues)));
        }
        for (i, &(_, width)) in self.layout.hidden.iter().enumerate() {
            let values = Float16Array::from_iter_values(rows.iter().flat_map(|r| r.hidden[i].values.iter().copied()));
            columns.push(by_target(fixed(Arc::new(values), width)));
            columns.push(by_target(f32_array(rows.iter().flat_map(|r| r.hidden[i].rms.iter().copied()))));
        }
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }
}

fn id_array(id_type: IdType, ids: impl Iterator<Item = u32>) -> ArrayRef {
    match id_type {
        IdType::Uint16 => Arc::new(UInt16Array::from_iter_values(ids.map(|i| i as u16))),
        IdType::Int32 => Arc::new(Int32Array::from_iter_values(ids.map(|i| i as i32))),
    }
}

fn f32_array(values: impl Iterator<Item = f32>) -> ArrayRef {
    Arc::new(Float32Array::from_iter_values(values))
}

/// `values` grouped `n` at a time.
fn fixed(values: ArrayRef, n: usize) -> ArrayRef {
    let field = Arc::new(Field::new("item", values.data_type().clone(), false));
    Arc::new(FixedSizeListArray::new(field, n as i32, values, None))
}

/// `values` split into rows of `lengths` elements.
fn list(values: ArrayRef, lengths: &[usize]) -> ArrayRef {
    let field = Arc::new(Field::new("item", values.data_type().clone(), false));
    Arc::new(ListArray::new(field, OffsetBuffer::from_lengths(lengths.iter().copied()), values, None))
}

/// Rows streamed into consecutive shards of at least `shard_tokens` tokens each, every
/// complete shard listed in the manifest (saved after each) as precompute does; for
/// sets made from other sets (`merge-teachers`, cross-tokenizer targets).
pub struct RollingShards<'a> {
    dir: &'a Path,
    layout: ShardLayout,
    opts: ParquetOptions,
    settings_json: String,
    shard_tokens: usize,
    current: Option<(ShardWriter, usize)>,
}

impl<'a> RollingShards<'a> {
    pub fn new(dir: &'a Path, settings: &super::manifest::Settings) -> Result<Self> {
        let s = &settings.sharding;
        Ok(RollingShards {
            dir,
            layout: settings.layout(),
            opts: ParquetOptions {
                zstd_level: s.zstd_level,
                row_group_rows: s.row_group_rows,
                byte_stream_split: s.byte_stream_split,
            },
            settings_json: serde_json::to_string(settings)?,
            shard_tokens: s.shard_tokens,
            current: None,
        })
    }

    pub fn write(&mut self, rows: &[ShardRow], manifest: &mut super::manifest::Manifest) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        if self.current.is_none() {
            let w = ShardWriter::create(
                self.dir,
                manifest.shards.len(),
                self.layout.clone(),
                &self.opts,
                &self.settings_json,
            )?;
            self.current = Some((w, 0));
        }
        let (w, tokens) = self.current.as_mut().unwrap();
        w.write(rows)?;
        *tokens += rows.iter().map(|r| r.sequence.len()).sum::<usize>();
        if *tokens >= self.shard_tokens {
            manifest.shards.push(self.current.take().unwrap().0.finish()?);
            manifest.save(self.dir)?;
        }
        Ok(())
    }

    /// Closes the last shard and marks the set complete.
    pub fn finish(mut self, manifest: &mut super::manifest::Manifest) -> Result<()> {
        if let Some((w, _)) = self.current.take() {
            manifest.shards.push(w.finish()?);
        }
        manifest.planned_shards = manifest.shards.len();
        manifest.complete = true;
        manifest.save(self.dir)
    }
}
