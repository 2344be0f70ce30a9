//! Data-parallel training with the arithmetic of one process: every rank reads the same
//! stream and builds its share of each step's micro-batches (`batch::feed::Share`), the
//! loss is normalised by the step's trained tokens over all ranks, gradients are summed
//! in buckets after the last micro-batch, and every rank takes the same AdamW step, so
//! the weights stay identical (optionally with AdamW's moments split, ZeRO-1). Rank 0
//! writes checkpoints, metrics and the plot.
//!
//! Faults: a collective fails when a peer is gone (at once when its process died, after
//! `ParallelSettings::timeout` when it hangs); the error then names the ranks that did
//! not arrive at the step and what a failed rank reported, from the store (each rank
//! records the last step it arrived at, and its error before it exits).
use anyhow::{anyhow, bail, Result};
use serde_json::Value as Json;
use std::time::Duration;
use tch::{Device, Tensor};

use super::config::ParallelSettings;
use super::optim::{AdamW, AdamWConfig, OptimizerMemory};
use crate::batch::feed::Share;
use crate::distributed::buckets::{all_reduce_grads, all_reduce_sum, broadcast_from_first};
use crate::distributed::zero::{write_into, Partition};
use crate::distributed::{Backend, GroupOptions, ProcessGroup, WorldInfo};
use crate::shards::manifest::json_diff;

/// How long a rank that has met an error looks in the store for what the others said.
const DIAGNOSE_WAIT: Duration = Duration::from_secs(2);

pub struct Parallel {
    group: ProcessGroup,
    pub world: WorldInfo,
    settings: ParallelSettings,
    /// With ZeRO-1: the ranges of the parameters each rank updates.
    zero: Option<Partition>,
}

impl Parallel {
    /// Meets the other ranks (Gloo on a CPU, NCCL on `cuda:LOCAL_RANK`).
    pub fn join(world: &WorldInfo, settings: ParallelSettings, device: Device) -> Result<Self> {
        let backend = if device.is_cuda() { Backend::Nccl } else { Backend::Gloo };
        let group = ProcessGroup::join(&GroupOptions {
            host: world.master_addr.clone(),
            port: world.master_port,
            serve_store: world.rank == 0 && !world.agent_store,
            agent_store: world.agent_store,
            prefix: format!("distill/{}/", world.restart),
            rank: world.rank,
            world: world.world,
            backend,
            device: if device.is_cuda() { device } else { Device::Cpu },
            timeout: settings.timeout,
        })?;
        Ok(Parallel { group, world: world.clone(), settings, zero: None })
    }

    pub fn is_first(&self) -> bool {
        self.world.rank == 0
    }

    pub fn share(&self) -> Share {
        Share { index: self.world.rank, of: self.world.world }
    }

    /// Every rank must run the same job: `facts` (student, shards, settings, checkpoint
    /// resumed from, world) are compared with rank 0's, naming what differs.
    pub fn check_same(&self, facts: &Json) -> Result<()> {
        let key = "facts/0";
        if self.is_first() {
            self.group.store_set(key, facts.to_string().as_bytes())?;
        }
        let Some(first) = self.group.store_get(key, self.settings.timeout)? else {
            bail!("rank {}: rank 0 did not publish its settings within the timeout", self.world.rank);
        };
        let first: Json = serde_json::from_slice(&first)?;
        let diff = json_diff(facts, &first);
        if !diff.is_empty() {
            let message = format!(
                "rank {} and rank 0 differ (every rank must train the same student on the same shards with the same settings, and see the same --output):\n  {}",
                self.world.rank,
                diff.join("\n  ")
            );
            self.report(&message);
            bail!(message);
        }
        self.group.barrier().map_err(|e| self.diagnose(e, 0))
    }

    /// Rank 0's weights on every rank, so that all begin from the same point.
    pub fn broadcast_weights(&self, params: &[Tensor]) -> Result<()> {
        broadcast_from_first(&self.group, params).map_err(|e| self.diagnose(e, 0))
    }

    /// AdamW over all parameters, or over this rank's range of them with ZeRO-1.
    pub fn optimizer(&mut self, named: Vec<(String, Tensor)>, cfg: AdamWConfig, memory: OptimizerMemory) -> AdamW {
        if !self.settings.zero1 {
            return AdamW::with_memory(named, cfg, memory);
        }
        let numels: Vec<i64> = named.iter().map(|(_, t)| t.numel() as i64).collect();
        let partition = Partition::new(&numels, self.world.world);
        let opt = AdamW::new_owned(named, cfg, &partition, self.world.rank);
        self.zero = Some(partition);
        opt
    }

    /// Sums `values` over the ranks.
    pub fn sum(&self, values: &[f64], step: u64) -> Result<Vec<f64>> {
        all_reduce_sum(&self.group, values).map_err(|e| self.diagnose(e, step))
    }

    /// Records that this rank has finished the micro-batches of `step` (1-based), then
    /// sums the gradients.
    pub fn reduce_grads(&self, params: &[Tensor], step: u64) -> Result<()> {
        let arrived = self.group.store_set(&arrived_key(self.world.rank), step.to_string().as_bytes());
        arrived
            .and_then(|()| all_reduce_grads(&self.group, params, self.settings.buckets))
            .map(|_| ())
            .map_err(|e| self.diagnose(e, step))
    }

    /// After an AdamW step with ZeRO-1: every rank's updated range to every rank.
    pub fn gather_weights(&self, opt: &AdamW, params: &[Tensor], step: u64) -> Result<()> {
        let Some(partition) = &self.zero else { return Ok(()) };
        let own = opt.owned_values();
        partition
            .all_gather(&self.group, &own, |range, values| {
                write_into(partition, params, range, values);
                Ok(())
            })
            .map_err(|e| self.diagnose(e, step))
    }

    /// The optimiser's moments by name for a checkpoint: its own with whole parameters;
    /// with ZeRO-1 gathered from every rank (on rank 0; the others get `None`).
    pub fn optimizer_state(
        &self,
        opt: &AdamW,
        named: &[(String, Tensor)],
        step: u64,
    ) -> Result<Option<Vec<(String, Tensor)>>> {
        let Some(partition) = &self.zero else {
            return Ok(self.is_first().then(|| opt.state()));
        };
        let [exp_avg, exp_avg_sq] = opt.owned_moments();
        let mut out = vec![];
        for (prefix, own) in [("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)] {
            let full: Vec<Tensor> = if self.is_first() {
                named.iter().map(|(_, t)| Tensor::zeros(t.size(), (tch::Kind::Float, t.device()))).collect()
            } else {
                vec![]
            };
            partition
                .all_gather(&self.group, &own, |range, values| {
                    if !full.is_empty() {
                        write_into(partition, &full, range, values);
                    }
                    Ok(())
                })
                .map_err(|e| self.diagnose(e, step))?;
            out.extend(named.iter().zip(full).map(|((name, _), t)| (format!("{prefix}.{name}"), t)));
        }
        Ok(self.is_first().then_some(out))
    }

    /// Rank 0 runs `make` (files the other ranks then read) and returns its value; the
    /// other ranks wait for it however long it takes, and stop with rank 0's error if
    /// it fails, or as soon as it is gone (its store goes with it): never a hang.
    pub fn first_makes<T>(&self, what: &str, make: impl FnOnce() -> Result<T>) -> Result<Option<T>> {
        let key = format!("made/{what}");
        if self.is_first() {
            let made = make();
            let note = match &made {
                Ok(_) => "ok".to_string(),
                Err(e) => format!("{e:#}"),
            };
            self.group.store_set(&key, note.as_bytes())?;
            return made.map(Some);
        }
        loop {
            match self.group.store_get(&key, Duration::from_secs(5)) {
                Ok(Some(note)) if note == b"ok" => return Ok(None),
                Ok(Some(note)) => bail!("rank 0 could not make {what}: {}", String::from_utf8_lossy(&note)),
                Ok(None) => continue,
                Err(e) => bail!("rank {}: rank 0 stopped while making {what}: {e:#}", self.world.rank),
            }
        }
    }

    /// Tells the other ranks why this one stops (best effort: the store may be gone).
    pub fn report(&self, message: &str) {
        let _ = self.group.store_set(&failed_key(self.world.rank), message.as_bytes());
    }

    /// A failed collective at `step`, explained by what the other ranks left in the store.
    fn diagnose(&self, err: anyhow::Error, step: u64) -> anyhow::Error {
        let me = self.world.rank;
        // A rank that failed writes why just before it exits; give it a moment (once).
        let deadline = std::time::Instant::now() + DIAGNOSE_WAIT;
        let mut causes = vec![];
        for r in (0..self.world.world).filter(|&r| r != me) {
            let wait = deadline.saturating_duration_since(std::time::Instant::now());
            match self.group.store_get(&failed_key(r), wait) {
                Ok(Some(m)) => causes.push(format!("rank {r} stopped: {}", String::from_utf8_lossy(&m))),
                Ok(None) => {
                    let arrived = self.group.store_get(&arrived_key(r), Duration::ZERO).ok().flatten();
                    let at: u64 = arrived.and_then(|v| String::from_utf8_lossy(&v).parse().ok()).unwrap_or(0);
                    if at < step {
                        causes.push(format!(
                            "rank {r} did not arrive at step {step} (last arrived at step {at}): it died or hangs"
                        ));
                    }
                }
                Err(_) if r == 0 => causes.push("rank 0, which serves the rendezvous store, is gone".into()),
                Err(_) => {}
            }
        }
        if causes.is_empty() {
            causes.push(format!("every rank arrived at step {step}; one died or hangs inside the collective"));
        }
        anyhow!(
            "rank {me} of {}: step {step}: {} (timeout {:.0} s)\n{err:#}",
            self.world.world,
            causes.join("; "),
            self.settings.timeout.as_secs_f64()
        )
    }
}

fn arrived_key(rank: usize) -> String {
    format!("arrived/{rank}")
}

fn failed_key(rank: usize) -> String {
    format!("failed/{rank}")
}
