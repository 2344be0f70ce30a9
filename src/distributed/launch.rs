//! Who is who: the rank, world and rendezvous address from the launcher's environment,
//! read as PyTorch reads them (torchrun: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`; Slurm's `SLURM_PROCID`,
//! `SLURM_NTASKS`, `SLURM_LOCALID`, `SLURM_NTASKS_PER_NODE` and the first host of
//! `SLURM_JOB_NODELIST` when those are absent), and `--nproc N`, which starts N local
//! processes of this same command as torchrun would.
use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::process::{Child, Command};
use std::time::Duration;

/// PyTorch's default rendezvous port.
pub const DEFAULT_PORT: u16 = 29500;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorldInfo {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub local_world: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// torchrun's agent serves the store at the master address (its workers connect to
    /// it: `TORCHELASTIC_USE_AGENT_STORE`), and how often it restarted the workers.
    pub agent_store: bool,
    pub restart: u64,
}

impl WorldInfo {
    /// The process's place in a multi-process job, or `None` when it runs alone (no
    /// launcher variables, or a world of 1).
    pub fn from_env() -> Result<Option<WorldInfo>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<WorldInfo>> {
        let num = |k: &str| -> Result<Option<usize>> {
            var(k).map(|v| v.trim().parse::<usize>().with_context(|| format!("{k}={v:?} is not a number"))).transpose()
        };
        let (torchrun, slurm) = (num("WORLD_SIZE")?.is_some(), num("SLURM_NTASKS")?.is_some());
        if !torchrun && !slurm {
            return Ok(None);
        }
        let pick = |torch: &str, slurm: &str| -> Result<Option<usize>> {
            Ok(if torchrun { num(torch)? } else { num(slurm)? })
        };
        let world = pick("WORLD_SIZE", "SLURM_NTASKS")?.unwrap_or(1);
        if world <= 1 {
            return Ok(None);
        }
        let Some(rank) = pick("RANK", "SLURM_PROCID")? else {
            bail!("WORLD_SIZE={world} but no RANK (nor SLURM_PROCID) in the environment");
        };
        let local_rank = pick("LOCAL_RANK", "SLURM_LOCALID")?.unwrap_or(0);
        let local_world = match pick("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE") {
            Ok(n) => n.unwrap_or(world),
            // Slurm writes e.g. "4(x2)" when nodes run the same count.
            Err(_) => var("SLURM_NTASKS_PER_NODE")
                .and_then(|v| v.split('(').next().and_then(|n| n.parse().ok()))
                .unwrap_or(world),
        };
        let master_addr = match var("MASTER_ADDR") {
            Some(a) => a,
            None => match var("SLURM_JOB_NODELIST").or_else(|| var("SLURM_NODELIST")) {
                Some(list) => first_host(&list)?,
                None => bail!("rank {rank} of {world}: no MASTER_ADDR (nor SLURM_JOB_NODELIST) to meet the others at"),
            },
        };
        let master_port = match var("MASTER_PORT") {
            Some(p) => p.trim().parse().with_context(|| format!("MASTER_PORT={p:?} is not a port"))?,
            None => DEFAULT_PORT,
        };
        if rank >= world || local_rank >= local_world {
            bail!("rank {rank} (local {local_rank}) is outside a world of {world} ({local_world} per node)");
        }
        let agent_store = var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let restart = var("TORCHELASTIC_RESTART_COUNT").and_then(|v| v.parse().ok()).unwrap_or(0);
        Ok(Some(WorldInfo { rank, world, local_rank, local_world, master_addr, master_port, agent_store, restart }))
    }
}

/// The first host of a Slurm node list: "gpu[03-05,9],cpu1" -> "gpu03".
pub fn first_host(list: &str) -> Result<String> {
    let list = list.trim();
    let first = match list.find('[') {
        Some(open) if list[..open].find(',').is_none() => {
            let close = list[open..].find(']').map(|c| open + c).context("unclosed '[' in the Slurm node list")?;
            let range = list[open + 1..close].split(',').next().unwrap_or_default();
            format!("{}{}", &list[..open], range.split('-').next().unwrap_or_default())
        }
        _ => list.split(',').next().unwrap_or_default().to_string(),
    };
    if first.is_empty() {
        bail!("empty Slurm node list");
    }
    Ok(first)
}

/// A loopback port nothing listens on, for a rendezvous this process starts: outside the
/// kernel's ephemeral range (`ip_local_port_range`), since a port the kernel handed out
/// (bind to port 0, then close) may be handed out again as another socket's local port
/// before the store binds it (Gloo's pairs open several), and distinct within this
/// process (a counter; the tests start many rendezvous at once).
pub fn free_loopback_port() -> Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u32, ephemeral_low.clamp(10_001, 65_536));
    let span = high - low;
    // Processes start at different offsets, so concurrent ones rarely try the same ports.
    let offset = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span.min(4096) {
        let port = low + (offset + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        if std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return Ok(port as u16);
        }
    }
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Runs `nproc` copies of this program with `args` on this machine, as torchrun does
/// (ranks 0..nproc, a free loopback port), and waits for them. When one fails, the
/// others are stopped and the error names it; when this process dies (`kill -9`, a job
/// scheduler's end), so do they. Each gets an equal share of the cores for
/// its OpenMP workers unless `OMP_NUM_THREADS` is set (torchrun sets 1): N processes of
/// all-core teams would each spin on every core.
pub fn run_local(nproc: usize, args: &[OsString]) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find this program to start its ranks")?;
    let port = free_loopback_port()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = std::env::var("OMP_NUM_THREADS").unwrap_or_else(|_| (cores / nproc).max(1).to_string());
    let mut children: Vec<(usize, Child)> = vec![];
    for rank in 0..nproc {
        let mut command = Command::new(&exe);
        end_with_this_process(&mut command);
        let child = command
            .args(args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("OMP_NUM_THREADS", &threads)
            .spawn();
        match child {
            Ok(c) => children.push((rank, c)),
            Err(e) => {
                stop_all(&mut children);
                return Err(e).context(format!("cannot start rank {rank}"));
            }
        }
    }
    while !children.is_empty() {
        let mut failed = None;
        children.retain_mut(|(rank, c)| match c.try_wait() {
            Ok(Some(status)) if status.success() => false,
            Ok(Some(status)) => {
                failed.get_or_insert((*rank, status.to_string()));
                false
            }
            Ok(None) => true,
            Err(e) => {
                failed.get_or_insert((*rank, e.to_string()));
                false
            }
        });
        if let Some((rank, status)) = failed {
            stop_all(&mut children);
            bail!("rank {rank} of {nproc} failed ({status}); the other ranks were stopped");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// The child gets SIGKILL when this process ends, however it ends: ranks left running
/// without their launcher would hold the GPUs and the run directory.
fn end_with_this_process(command: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: between fork and exec only async-signal-safe calls (prctl, getppid, _exit).
        unsafe {
            command.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                // The launcher may have died before prctl took effect.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
    }
}

fn stop_all(children: &mut [(usize, Child)]) {
    for (_, c) in children.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn world(vars: &[(&str, &str)]) -> Result<Option<WorldInfo>> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        WorldInfo::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn torchrun_and_slurm_environments() {
        assert_eq!(world(&[]).unwrap(), None);
        assert_eq!(world(&[("WORLD_SIZE", "1"), ("RANK", "0")]).unwrap(), None, "a world of one is alone");
        let t = world(&[
            ("WORLD_SIZE", "16"),
            ("RANK", "9"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "8"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "1234"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((t.rank, t.world, t.local_rank, t.local_world, t.master_port), (9, 16, 1, 8, 1234));
        let s = world(&[
            ("SLURM_NTASKS", "8"),
            ("SLURM_PROCID", "5"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NTASKS_PER_NODE", "4(x2)"),
            ("SLURM_JOB_NODELIST", "gpu[03-04]"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((s.rank, s.local_rank, s.local_world), (5, 1, 4));
        assert_eq!((s.master_addr.as_str(), s.master_port), ("gpu03", DEFAULT_PORT));
        let err = world(&[("WORLD_SIZE", "2")]).unwrap_err().to_string();
        assert!(err.contains("no RANK"), "{err}");
        let err = world(&[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_ADDR", "a")]).unwrap_err().to_string();
        assert!(err.contains("outside a world of 2"), "{err}");
        assert!(world(&[("WORLD_SIZE", "two")]).unwrap_err().to_string().contains("WORLD_SIZE"));
    }

    #[test]
    fn first_host_of_slurm_node_lists() {
        assert_eq!(first_host("gpu[03-05,9],cpu1").unwrap(), "gpu03");
        assert_eq!(first_host("a1,b[1-2]").unwrap(), "a1");
        assert_eq!(first_host("single").unwrap(), "single");
        assert!(first_host("x[1-2").is_err());
    }
}
