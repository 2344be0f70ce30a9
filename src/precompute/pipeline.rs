//! The teacher pass: one worker per device (the first on the calling thread) runs
//! batches through its teacher replica while a writer thread encodes and writes the
//! previous results, so the GPU
//! does not wait for Arrow, zstd or the disk. Results are written in plan order
//! (a reorder buffer), so the shards do not depend on which device was faster.
use anyhow::{anyhow, Result};
use crossbeam_channel::{bounded, Receiver, Sender};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};
use tch::Device;

use super::capture::{capture_batch, CaptureSettings};
use super::PrecomputeConfig;
use crate::dataset::sequence::Sequence;
use crate::model::CausalLm;
use crate::shards::audit::TemperedSums;
use crate::shards::manifest::Manifest;
use crate::shards::row::ShardRow;
use crate::shards::schema::ShardLayout;
use crate::shards::writer::ShardWriter;

/// One batch of one shard; `seq` numbers batches across the whole run.
pub struct Job {
    pub seq: usize,
    pub shard: usize,
    pub last_of_shard: bool,
    pub rows: Vec<usize>,
}

struct Done {
    job: Job,
    rows: Vec<ShardRow>,
    tempered: Vec<TemperedSums>,
}

/// Time accounting for the summary.
#[derive(Debug, Default, Clone)]
pub struct PassStats {
    /// Summed over devices: time inside teacher forward + capture (GPU work and copies).
    pub teacher_busy: Duration,
    pub wall: Duration,
    pub tokens_written: usize,
}

pub struct Pass<'a> {
    pub cfg: &'a PrecomputeConfig,
    pub rows: &'a [Sequence],
    pub layout: &'a ShardLayout,
    pub capture: CaptureSettings,
    pub settings_json: String,
    /// Called with (sequences, tokens) after each written batch.
    pub on_progress: &'a (dyn Fn(usize, usize) + Sync),
}

impl Pass<'_> {
    /// Runs `jobs`, writing shards into `dir` and recording each complete shard in
    /// `manifest` (saved after every shard).
    /// `first_replica`, when given, is the model for `devices[0]` (loaded already).
    pub fn run(
        &self,
        jobs: Vec<Job>,
        first_replica: Option<CausalLm>,
        dir: &Path,
        manifest: &mut Manifest,
    ) -> Result<PassStats> {
        let started = Instant::now();
        let devices = &self.cfg.devices;
        let (job_tx, job_rx) = bounded::<Job>(2 * devices.len());
        // A small queue between the teacher and the writer bounds host memory while
        // still letting the teacher run ahead of the writer by a couple of batches.
        let (done_tx, done_rx) = bounded::<Result<Done>>(2 + devices.len());
        let mut stats = PassStats::default();
        let result = std::thread::scope(|scope| -> Result<()> {
            let (first, others) = devices.split_first().expect("at least one device");
            let workers: Vec<_> = others
                .iter()
                .map(|replica| {
                    let (rx, tx) = (job_rx.clone(), done_tx.clone());
                    scope.spawn(move || self.worker(replica, None, rx, tx))
                })
                .collect();
            let (first_rx, first_tx) = (job_rx, done_tx);
            let writer = scope.spawn(|| self.writer(done_rx, dir, manifest));
            let feeder = scope.spawn(move || {
                for job in jobs {
                    if job_tx.send(job).is_err() {
                        break; // the writer or the workers stopped on an error
                    }
                }
            });
            // The first replica runs here, on the thread that loaded it. libgomp spins
            // between parallel regions only while no more OpenMP threads exist than
            // cores; torch work on a second thread makes a second team, and then every
            // region's workers sleep and wake on futexes: a mixture-of-experts teacher
            // (many small regions) ran its forward at ~6,700 tokens/s instead of ~11,500
            // on 2 cores (random Qwen3-MoE of `bench_precompute.sh --moe`, batches of 3
            // x 137), and precompute at 512-token batches at half transformers' speed.
            stats.teacher_busy += self.worker(first, first_replica, first_rx, first_tx);
            for w in workers {
                stats.teacher_busy += w.join().map_err(|_| anyhow!("a teacher thread panicked"))?;
            }
            feeder.join().map_err(|_| anyhow!("the job feeder panicked"))?;
            stats.tokens_written = writer.join().map_err(|_| anyhow!("the writer thread panicked"))??;
            Ok(())
        });
        result?;
        stats.wall = started.elapsed();
        Ok(stats)
    }

    /// Loads a teacher replica on `devices` (unless given) and captures batches until the
    /// queue closes.
    fn worker(
        &self,
        devices: &[Device],
        preloaded: Option<CausalLm>,
        jobs: Receiver<Job>,
        done: Sender<Result<Done>>,
    ) -> Duration {
        let mut busy = Duration::ZERO;
        let loaded = match preloaded {
            Some(m) => Ok(m),
            None => CausalLm::load_split(&self.cfg.teacher, devices, self.cfg.teacher_dtype()),
        };
        let model = match loaded {
            Ok(m) => m,
            Err(e) => {
                let _ = done.send(Err(e.context(format!("loading the teacher on {devices:?}"))));
                return busy;
            }
        };
        for job in jobs {
            let rows: Vec<&Sequence> = job.rows.iter().map(|&i| &self.rows[i]).collect();
            let t0 = Instant::now();
            let result = capture_batch(&model, &rows, &self.capture);
            busy += t0.elapsed();
            let failed = result.is_err();
            if done.send(result.map(|(rows, tempered)| Done { job, rows, tempered })).is_err() || failed {
                break;
            }
        }
        busy
    }

    /// Writes results in `seq` order; returns the number of tokens written.
    fn writer(&self, done: Receiver<Result<Done>>, dir: &Path, manifest: &mut Manifest) -> Result<usize> {
        let mut pending: BTreeMap<usize, Done> = BTreeMap::new();
        // Jobs are numbered from 0 (see `jobs_for`): write them in that order whichever
        // replica finishes first.
        let mut next_seq = 0;
        let mut current: Option<(usize, ShardWriter)> = None;
        let mut tokens = 0;
        for result in done {
            let d = result?;
            pending.insert(d.job.seq, d);
            while let Some(d) = pending.remove(&next_seq) {
                next_seq += 1;
                if current.as_ref().map(|c| c.0) != Some(d.job.shard) {
                    let w = ShardWriter::create(
                        dir,
                        d.job.shard,
                        self.layout.clone(),
                        &self.cfg.parquet,
                        &self.settings_json,
                    )?;
                    current = Some((d.job.shard, w));
                }
                let (_, w) = current.as_mut().expect("writer opened above");
                w.write(&d.rows)?;
                w.add_tempered(&d.tempered);
                if self.cfg.crash_after_shards == Some(manifest.shards.len()) {
                    std::process::abort(); // the resume tests' stand-in for `kill -9`
                }
                let n: usize = d.rows.iter().map(|r| r.sequence.len()).sum();
                tokens += n;
                (self.on_progress)(d.rows.len(), n);
                if d.job.last_of_shard {
                    let (_, w) = current.take().expect("writer open");
                    manifest.shards.push(w.finish()?);
                    manifest.save(dir)?;
                }
            }
        }
        if let Some(seq) = pending.keys().next() {
            anyhow::bail!("batch {next_seq} never arrived; batches from {seq} on were not written");
        }
        Ok(tokens)
    }
}

/// Jobs for the given shards, in order; `seq` continues across shards.
pub fn jobs_for(shard_batches: Vec<(usize, Vec<Vec<usize>>)>) -> Vec<Job> {
    let mut jobs = vec![];
    for (shard, batches) in shard_batches {
        let n = batches.len();
        for (i, rows) in batches.into_iter().enumerate() {
            jobs.push(Job { seq: jobs.len(), shard, last_of_shard: i + 1 == n, rows });
        }
    }
    jobs
}
