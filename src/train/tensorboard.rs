//! TensorBoard event files, written by hand: a file of TFRecords (length, masked CRC-32C
//! of the length, an `Event` protocol buffer, masked CRC-32C of it), each event one
//! step's scalars. The few protobuf fields this needs (Event, Summary, Summary.Value,
//! SessionLog) are encoded here; no protobuf runtime is pulled in for them.
//!
//! Every number of a step's `StepLog` becomes a scalar tagged by its JSON path
//! (`loss`, `kd`, `lr`, `grad_norm`, `time/body`, `state_bytes/optimizer`, ...), so
//! TensorBoard shows what metrics.jsonl holds, under the same names.
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

const EVENTS_PREFIX: &str = "events.out.tfevents.";
/// Marks the event files distill writes, so a resumed run knows its folder.
const EVENTS_SUFFIX: &str = ".distill";

/// Refuses a `--tensorboard` folder that is not this run's: one holding anything but
/// distill's event files, or, for a run that starts afresh, any file at all (its session
/// start would hide another run's steps in TensorBoard). A missing folder is fine.
pub fn check_dir(dir: &Path, resuming: bool) -> Result<()> {
    let names = crate::files::dir_entries(dir)?;
    if let Some(other) = names.iter().find(|n| !(n.starts_with(EVENTS_PREFIX) && n.ends_with(EVENTS_SUFFIX))) {
        bail!(
            "--tensorboard {}: holds {other}, which distill did not write; choose an empty or new folder",
            dir.display()
        );
    }
    if let (Some(first), false) = (names.first(), resuming) {
        bail!(
            "--tensorboard {}: already holds {first} of another run; choose an empty or new folder, or --resume that run",
            dir.display()
        );
    }
    Ok(())
}

/// One run's (or one resumed part's) event file in a TensorBoard log directory.
pub struct EventWriter {
    file: BufWriter<std::fs::File>,
    path: PathBuf,
}

impl EventWriter {
    /// A new event file in `dir` (created if missing), named so that TensorBoard reads
    /// the files of a resumed run in the order they were written. `first_step` is the
    /// step the run resumes after (0 for a fresh run): the file starts with a session
    /// start at the next step, on which TensorBoard's reader drops the earlier files'
    /// events from that step on (a resumed run's were written past the checkpoint it
    /// resumes from, and metrics.jsonl drops them too).
    pub fn create(dir: &Path, first_step: u64) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let host: String = host.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
        let name = format!(
            "{EVENTS_PREFIX}{:010}.{}.{:09}.{}{EVENTS_SUFFIX}",
            now.as_secs(),
            if host.is_empty() { "localhost" } else { &host },
            now.subsec_nanos(),
            std::process::id()
        );
        let path = dir.join(name);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let mut writer = EventWriter { file: BufWriter::new(file), path };
        let wall = now.as_secs_f64();
        writer.record(&event(wall, 0, Body::FileVersion("brain.Event:2")))?;
        writer.record(&event(wall, first_step as i64 + 1, Body::SessionStart))?;
        writer.flush()?;
        Ok(writer)
    }

    /// Every number in `log` (a step's JSON record) as a scalar of step `step`.
    pub fn scalars(&mut self, step: u64, log: &Value) -> Result<()> {
        let mut values = vec![];
        flatten("", log, &mut values);
        values.retain(|(tag, _)| tag != "step");
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        self.record(&event(wall, step as i64, Body::Scalars(&values)))
    }

    pub fn flush(&mut self) -> Result<()> {
        self.file.flush().with_context(|| format!("cannot write {}", self.path.display()))
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut bytes = Vec::with_capacity(data.len() + 16);
        bytes.extend_from_slice(&len);
        bytes.extend_from_slice(&masked_crc(&len).to_le_bytes());
        bytes.extend_from_slice(data);
        bytes.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.file.write_all(&bytes).with_context(|| format!("cannot write {}", self.path.display()))
    }
}

/// The numbers of a JSON record, tagged by their paths joined with `/`.
fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, f32)>) {
    match v {
        Value::Number(n) => out.push((prefix.to_string(), n.as_f64().unwrap_or(f64::NAN) as f32)),
        Value::Object(map) => {
            for (k, v) in map {
                let tag = if prefix.is_empty() { k.clone() } else { format!("{prefix}/{k}") };
                flatten(&tag, v, out);
            }
        }
        _ => {}
    }
}

/// TFRecord's checksum: CRC-32C, rotated and offset so that a CRC of data holding CRCs
/// does not degenerate.
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

enum Body<'a> {
    FileVersion(&'a str),
    /// SessionLog { status: START }.
    SessionStart,
    Scalars(&'a [(String, f32)]),
}

/// An `Event` message: wall_time (1, double), step (2, int64), then one of file_version
/// (3, string), summary (5: Summary { value (1): Value { tag (1), simple_value (2, float) } })
/// or session_log (7: SessionLog { status (1) = START (1) }).
fn event(wall_time: f64, step: i64, body: Body) -> Vec<u8> {
    let mut out = vec![0x09];
    out.extend_from_slice(&wall_time.to_le_bytes());
    out.push(0x10);
    varint(step as u64, &mut out);
    match body {
        Body::FileVersion(v) => length_delimited(0x1a, v.as_bytes(), &mut out),
        Body::SessionStart => length_delimited(0x3a, &[0x08, 0x01], &mut out),
        Body::Scalars(values) => {
            let mut summary = vec![];
            for (tag, value) in values {
                let mut v = vec![];
                length_delimited(0x0a, tag.as_bytes(), &mut v);
                v.push(0x15);
                v.extend_from_slice(&value.to_le_bytes());
                length_delimited(0x0a, &v, &mut summary);
            }
            length_delimited(0x2a, &summary, &mut out);
        }
    }
    out
}

fn length_delimited(key: u8, bytes: &[u8], out: &mut Vec<u8>) {
    out.push(key);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_and_varint_match_their_references() {
        // CRC-32C of "123456789" is 0xe3069283 (the check value of the Castagnoli CRC).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        let mut out = vec![];
        varint(300, &mut out);
        assert_eq!(out, [0xac, 0x02]);
    }

    #[test]
    fn a_record_is_length_crc_data_crc() {
        let tmp = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(tmp.path(), 0).unwrap();
        w.scalars(1, &serde_json::json!({"step": 1, "loss": 2.5, "time": {"data": 0.25}})).unwrap();
        w.flush().unwrap();
        let bytes = std::fs::read(&w.path).unwrap();
        let mut at = 0;
        let mut records = 0;
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            assert_eq!(masked_crc(&bytes[at..at + 8]).to_le_bytes(), bytes[at + 8..at + 12]);
            let data = &bytes[at + 12..at + 12 + len];
            assert_eq!(masked_crc(data).to_le_bytes(), bytes[at + 12 + len..at + 16 + len]);
            at += 16 + len;
            records += 1;
        }
        assert_eq!((at, records), (bytes.len(), 3));
    }
}
