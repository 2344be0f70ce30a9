//! Finding and reading input files: JSONL and Parquet, given as files, directories or
//! glob patterns, in a deterministic order (sorted paths, rows in file order). Every
//! row gets a stable id: its own `id` field, else `FILE_STEM:LINE` (JSONL) or
//! `FILE_STEM:ROW` (Parquet, 1-based).
use anyhow::{bail, Context, Result};
use serde_json::Value as Json;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use super::{Example, FieldNames, Record};

/// One row that could not be read, kept when the caller skips invalid rows.
#[derive(Debug, Clone)]
pub struct InvalidRow {
    pub location: String,
    pub error: String,
}

/// Expands files, directories (their *.jsonl / *.parquet, recursively) and glob patterns.
pub fn resolve_inputs(inputs: &[String]) -> Result<Vec<PathBuf>> {
    let mut files = vec![];
    for input in inputs {
        let path = Path::new(input);
        if path.is_dir() {
            collect_dir(path, &mut files)?;
        } else if path.is_file() {
            files.push(path.to_path_buf());
        } else if path.exists() {
            bail!("{input}: not a regular file or directory (a FIFO, device or socket cannot be read twice)");
        } else if input.contains(['*', '?', '[']) {
            let matches: Vec<PathBuf> = glob::glob(input)
                .with_context(|| format!("bad glob pattern {input:?}"))?
                .filter_map(|p| p.ok())
                .filter(|p| p.is_file())
                .collect();
            if matches.is_empty() {
                bail!("{input}: the pattern matches no file");
            }
            files.extend(matches);
        } else {
            bail!("{input}: no such file or directory");
        }
    }
    files.sort();
    files.dedup();
    for f in &files {
        if format_of(f).is_none() {
            bail!("{}: unknown input format (use .jsonl, .json lines or .parquet)", f.display());
        }
    }
    if files.is_empty() {
        bail!("no input files in {inputs:?}");
    }
    Ok(files)
}

fn collect_dir(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect_dir(&path, out)?;
        } else if format_of(&path).is_some() {
            out.push(path);
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Format {
    Jsonl,
    Parquet,
}

fn format_of(path: &Path) -> Option<Format> {
    match path.extension()?.to_str()? {
        "jsonl" | "json" | "ndjson" => Some(Format::Jsonl),
        "parquet" => Some(Format::Parquet),
        _ => None,
    }
}

/// One input row as read: where it is (`FILE:LINE`), its id, and its JSON (or why it
/// is not JSON).
pub struct RawRow {
    pub location: String,
    pub id: String,
    pub row: Result<Json>,
}

/// Every row of `files`, in order, parsed as JSON but not yet read as an example.
pub fn read_raw_rows(files: &[PathBuf]) -> Result<Vec<RawRow>> {
    let mut out = vec![];
    for file in files {
        let rows = match format_of(file) {
            Some(Format::Jsonl) => jsonl_rows(file)?,
            Some(Format::Parquet) => parquet_rows(file)?,
            None => bail!("{}: unknown input format", file.display()),
        };
        if rows.is_empty() {
            bail!("{}: no examples (the file is empty)", file.display());
        }
        let stem = file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        for (number, row) in rows {
            let id = match row.as_ref().ok().and_then(|obj| obj.get("id")) {
                Some(Json::String(s)) => s.clone(),
                Some(Json::Number(n)) => n.to_string(),
                _ => format!("{stem}:{number}"),
            };
            out.push(RawRow { location: format!("{}:{number}", file.display()), id, row });
        }
    }
    Ok(out)
}

/// Reads every row of `files`. With `skip_invalid`, rows that cannot be parsed are
/// returned in the second list instead of failing the whole read.
pub fn read_records(
    files: &[PathBuf],
    fields: &FieldNames,
    skip_invalid: bool,
) -> Result<(Vec<Record>, Vec<InvalidRow>)> {
    let mut records = vec![];
    let invalid = for_each_record(files, fields, skip_invalid, |id, location, _, example| {
        records.push(Record { id, location, example });
        Ok(())
    })?;
    Ok((records, invalid))
}

/// The string field `name` of every record `read_records` returns (same files, fields
/// and skipping), in the same order: `None` where a record lacks it. A value that is
/// not a string is refused by location.
pub fn record_field(
    files: &[PathBuf],
    fields: &FieldNames,
    skip_invalid: bool,
    name: &str,
) -> Result<Vec<Option<String>>> {
    let mut out = vec![];
    for_each_record(files, fields, skip_invalid, |_, location, obj, _| {
        out.push(match obj.get(name) {
            None | Some(Json::Null) => None,
            Some(Json::String(s)) => Some(s.clone()),
            Some(v) => bail!("{location}: `{name}` is {v}, not a string"),
        });
        Ok(())
    })?;
    Ok(out)
}

/// Calls `each(id, location, row, example)` for every row that reads as an example, in
/// order; returns the rows skipped as invalid (`skip_invalid`), else fails on the first.
fn for_each_record(
    files: &[PathBuf],
    fields: &FieldNames,
    skip_invalid: bool,
    mut each: impl FnMut(String, String, &Json, Example) -> Result<()>,
) -> Result<Vec<InvalidRow>> {
    let mut invalid = vec![];
    for RawRow { location, id, row } in read_raw_rows(files)? {
        match row.and_then(|obj| Example::from_json(&obj, fields).map(|example| (obj, example))) {
            Ok((obj, example)) => each(id, location, &obj, example)?,
            Err(e) if skip_invalid => invalid.push(InvalidRow { location, error: format!("{e:#}") }),
            Err(e) => return Err(e.context(location)),
        }
    }
    Ok(invalid)
}

/// (1-based line number, parsed JSON or its error), blank lines skipped.
fn jsonl_rows(path: &Path) -> Result<Vec<(usize, Result<Json>)>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut rows = vec![];
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("{}:{}: cannot read line (not UTF-8 text?)", path.display(), i + 1))?;
        // A UTF-8 byte-order mark (as some Windows tools write) is not part of the JSON.
        let line = if i == 0 { line.strip_prefix('\u{feff}').unwrap_or(&line).to_string() } else { line };
        if line.trim().is_empty() {
            continue;
        }
        rows.push((i + 1, serde_json::from_str::<Json>(&line).context("not valid JSON")));
    }
    Ok(rows)
}

/// Parquet rows as JSON objects (1-based row numbers), through arrow's JSON writer.
fn parquet_rows(path: &Path) -> Result<Vec<(usize, Result<Json>)>> {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{}: not a readable Parquet file", path.display()))?
        .build()?;
    let mut rows = vec![];
    for batch in reader {
        let batch = batch.with_context(|| format!("{}: cannot decode", path.display()))?;
        let batch = binary_as_text(&batch).with_context(|| path.display().to_string())?;
        let mut writer = arrow::json::ArrayWriter::new(Vec::new());
        writer.write(&batch)?;
        writer.finish()?;
        let values: Vec<Json> = serde_json::from_slice(&writer.into_inner())?;
        for v in values {
            rows.push((rows.len() + 1, Ok(v)));
        }
    }
    Ok(rows)
}

/// The batch with binary columns (as Spark writes strings) read as UTF-8 text: the JSON
/// writer would otherwise turn their bytes into a hex string.
fn binary_as_text(batch: &arrow::array::RecordBatch) -> Result<arrow::array::RecordBatch> {
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;
    fn text(t: &DataType) -> DataType {
        let field = |f: &Arc<Field>| Arc::new(f.as_ref().clone().with_data_type(text(f.data_type())));
        match t {
            DataType::Binary | DataType::BinaryView => DataType::Utf8,
            DataType::LargeBinary => DataType::LargeUtf8,
            DataType::List(f) => DataType::List(field(f)),
            DataType::LargeList(f) => DataType::LargeList(field(f)),
            DataType::Struct(fields) => DataType::Struct(fields.iter().map(field).collect()),
            other => other.clone(),
        }
    }
    let schema = batch.schema();
    let mut fields = vec![];
    let mut columns = vec![];
    for (f, column) in schema.fields().iter().zip(batch.columns()) {
        let to = text(f.data_type());
        let column = if &to == f.data_type() {
            column.clone()
        } else {
            let options = arrow::compute::CastOptions { safe: false, ..Default::default() };
            arrow::compute::cast_with_options(column, &to, &options)
                .with_context(|| format!("column `{}` holds bytes that are not UTF-8 text", f.name()))?
        };
        fields.push(f.as_ref().clone().with_data_type(to));
        columns.push(column);
    }
    Ok(arrow::array::RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?)
}

/// A hash of the input files' bytes, in order, with their names: the data identity
/// that a resumed or merged run must share.
pub fn hash_inputs(files: &[PathBuf]) -> Result<String> {
    let name = |f: &PathBuf| f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    hash_named_inputs(&files.iter().map(|f| (f.clone(), name(f))).collect::<Vec<_>>())
}

/// `hash_inputs` with each file hashed under the name given: rows read from a temporary
/// file that then takes another name (`generate --capture`) hash as the file they become.
pub fn hash_named_inputs(files: &[(PathBuf, String)]) -> Result<String> {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    for (file, name) in files {
        hasher.update(name.as_bytes());
        let mut f = std::fs::File::open(file).with_context(|| format!("cannot read {}", file.display()))?;
        hasher.update(&f.metadata()?.len().to_le_bytes());
        crate::files::update_from(&mut hasher, &mut f).with_context(|| format!("cannot read {}", file.display()))?;
    }
    Ok(crate::files::xxh3_string(hasher.digest()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(path: &Path) -> Result<(Vec<Record>, Vec<InvalidRow>)> {
        read_records(&[path.to_path_buf()], &FieldNames::default(), false)
    }

    #[test]
    fn jsonl_errors_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(&p, "{\"text\": \"ok\"}\n\n{\"text\": 3}\n").unwrap();
        let e = format!("{:#}", read(&p).unwrap_err());
        assert!(e.contains("d.jsonl:3") && e.contains("`text`"), "{e}");
        std::fs::write(&p, "{\"text\": \"ok\"\n").unwrap();
        let e = format!("{:#}", read(&p).unwrap_err());
        assert!(e.contains("d.jsonl:1") && e.contains("JSON"), "{e}");
        std::fs::write(&p, "").unwrap();
        assert!(format!("{:#}", read(&p).unwrap_err()).contains("empty"));
    }

    #[test]
    fn skip_invalid_keeps_good_rows_and_lists_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(&p, "{\"text\": \"a\"}\nnot json\n{\"id\": 7, \"text\": \"b\"}\n").unwrap();
        let (rows, bad) = read_records(&[p], &FieldNames::default(), true).unwrap();
        assert_eq!(rows.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), vec!["d:1", "7"]);
        assert_eq!(bad.len(), 1);
        assert!(bad[0].location.ends_with("d.jsonl:2"));
    }

    #[test]
    fn directories_and_globs_resolve_sorted() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b.jsonl", "a.jsonl", "notes.txt"] {
            std::fs::write(dir.path().join(name), "{\"text\": \"x\"}\n").unwrap();
        }
        let d = dir.path().to_string_lossy().into_owned();
        let files = resolve_inputs(std::slice::from_ref(&d)).unwrap();
        assert_eq!(
            files.iter().map(|f| f.file_name().unwrap().to_str().unwrap()).collect::<Vec<_>>(),
            ["a.jsonl", "b.jsonl"]
        );
        assert_eq!(resolve_inputs(&[format!("{d}/*.jsonl")]).unwrap(), files);
        assert!(resolve_inputs(&[format!("{d}/missing.jsonl")]).is_err());
    }
}
