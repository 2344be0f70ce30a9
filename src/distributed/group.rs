//! A c10d process group (Gloo on CPU, NCCL on CUDA) and its TCPStore, through the C API
//! of `shim.cpp`. Collectives block until done and return an error (never a hang past
//! the group's timeout) when a peer is gone.
use anyhow::{anyhow, bail, Result};
use std::ffi::{c_char, CStr, CString};
use std::time::Duration;
use tch::{Device, Tensor};
use torch_sys::C_tensor;

#[repr(C)]
struct RawGroup {
    _private: [u8; 0],
}

extern "C" {
    fn distill_free_message(m: *mut c_char);
    fn distill_group_new(
        host: *const c_char,
        port: i32,
        serve: bool,
        count: bool,
        prefix: *const c_char,
        rank: i32,
        world: i32,
        timeout_ms: i64,
        nccl: bool,
        out: *mut *mut RawGroup,
    ) -> *mut c_char;
    fn distill_group_free(g: *mut RawGroup);
    fn distill_backend_name(g: *mut RawGroup, out: *mut *mut c_char) -> *mut c_char;
    fn distill_allreduce(g: *mut RawGroup, ts: *const *const C_tensor, n: i32) -> *mut c_char;
    fn distill_broadcast(g: *mut RawGroup, t: *const C_tensor, root: i32) -> *mut c_char;
    fn distill_allgather(
        g: *mut RawGroup,
        input: *const C_tensor,
        outputs: *const *const C_tensor,
        n: i32,
    ) -> *mut c_char;
    fn distill_barrier(g: *mut RawGroup) -> *mut c_char;
    fn distill_store_set(g: *mut RawGroup, key: *const c_char, value: *const u8, len: usize) -> *mut c_char;
    fn distill_store_get(
        g: *mut RawGroup,
        key: *const c_char,
        timeout_ms: i64,
        found: *mut bool,
        value: *mut *mut u8,
        len: *mut usize,
    ) -> *mut c_char;
}

/// Turns the shim's malloc'd message (NULL: success) into a result.
fn checked(message: *mut c_char) -> Result<()> {
    if message.is_null() {
        return Ok(());
    }
    // SAFETY: a NUL-terminated string the shim allocated, freed once here.
    let text = unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned();
    unsafe { distill_free_message(message) };
    Err(anyhow!("{}", first_lines(&text, 4)))
}

/// c10d's messages carry C++ backtraces; the first lines say what happened.
fn first_lines(text: &str, n: usize) -> String {
    text.lines().take(n).collect::<Vec<_>>().join("\n")
}

/// Which library moves the tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Gloo,
    Nccl,
}

/// Where and how the ranks meet.
#[derive(Debug, Clone)]
pub struct GroupOptions {
    pub host: String,
    pub port: u16,
    /// This process serves the store (rank 0, unless torchrun's agent already does).
    pub serve_store: bool,
    /// The store is torchrun's agent's: the ranks do not count themselves in there.
    pub agent_store: bool,
    /// Keys of this job in the store (a store may outlive a job: torchrun restarts).
    pub prefix: String,
    pub rank: usize,
    pub world: usize,
    pub backend: Backend,
    /// Where collectives take their tensors (the CPU for Gloo, `cuda:LOCAL_RANK` for NCCL).
    pub device: Device,
    /// Bound on the rendezvous and on every collective.
    pub timeout: Duration,
}

pub struct ProcessGroup {
    raw: *mut RawGroup,
    pub rank: usize,
    pub world: usize,
    pub device: Device,
    pub timeout: Duration,
}

// SAFETY: c10d process groups and stores are used from one thread at a time here (the
// trainer's); the objects themselves are thread-safe in c10d.
unsafe impl Send for ProcessGroup {}

impl ProcessGroup {
    /// Joins the group: rank 0 serves the store on `port`, the others connect to it;
    /// returns when all `world` ranks have arrived, or fails after the timeout.
    pub fn join(opts: &GroupOptions) -> Result<Self> {
        let host = CString::new(opts.host.as_str())?;
        let prefix = CString::new(opts.prefix.as_str())?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: valid C strings and an out-pointer the shim fills on success.
        checked(unsafe {
            distill_group_new(
                host.as_ptr(),
                opts.port as i32,
                opts.serve_store,
                !opts.agent_store,
                prefix.as_ptr(),
                opts.rank as i32,
                opts.world as i32,
                millis(opts.timeout),
                opts.backend == Backend::Nccl,
                &mut raw,
            )
        })
        .map_err(|e| {
            e.context(format!(
                "rank {} of {}: no rendezvous at {}:{} within {:.0} s",
                opts.rank,
                opts.world,
                opts.host,
                opts.port,
                opts.timeout.as_secs_f64()
            ))
        })?;
        Ok(ProcessGroup { raw, rank: opts.rank, world: opts.world, device: opts.device, timeout: opts.timeout })
    }

    /// "gloo" or "nccl", as c10d names it.
    pub fn backend_name(&self) -> Result<String> {
        let mut out = std::ptr::null_mut();
        // SAFETY: the shim writes a malloc'd string on success.
        checked(unsafe { distill_backend_name(self.raw, &mut out) })?;
        let name = unsafe { CStr::from_ptr(out) }.to_string_lossy().into_owned();
        unsafe { distill_free_message(out) };
        Ok(name)
    }

    /// Sums each tensor over the ranks, in place (one collective per tensor, all in
    /// flight together). Tensors must be contiguous and on the group's device.
    pub fn all_reduce(&self, tensors: &[Tensor]) -> Result<()> {
        let ptrs = pointers(tensors)?;
        // SAFETY: the tensors outlive the call.
        checked(unsafe { distill_allreduce(self.raw, ptrs.as_ptr(), ptrs.len() as i32) })
    }

    /// Rank `root`'s values into `tensor` on every rank.
    pub fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<()> {
        let p = pointers(std::slice::from_ref(tensor))?;
        // SAFETY: as above.
        checked(unsafe { distill_broadcast(self.raw, p[0], root as i32) })
    }

    /// `outputs[r]` = rank r's `input`; `outputs` has one tensor per rank, each shaped
    /// like `input`.
    pub fn all_gather(&self, input: &Tensor, outputs: &[Tensor]) -> Result<()> {
        if outputs.len() != self.world {
            bail!("all_gather: {} outputs for {} ranks", outputs.len(), self.world);
        }
        let i = pointers(std::slice::from_ref(input))?;
        let o = pointers(outputs)?;
        // SAFETY: as above.
        checked(unsafe { distill_allgather(self.raw, i[0], o.as_ptr(), o.len() as i32) })
    }

    pub fn barrier(&self) -> Result<()> {
        // SAFETY: a live group.
        checked(unsafe { distill_barrier(self.raw) })
    }

    /// Writes `key` in the shared store (served by rank 0).
    pub fn store_set(&self, key: &str, value: &[u8]) -> Result<()> {
        let k = CString::new(key)?;
        // SAFETY: valid pointers for the call.
        checked(unsafe { distill_store_set(self.raw, k.as_ptr(), value.as_ptr(), value.len()) })
    }

    /// The value of `key`, waiting up to `wait` for some rank to write it.
    pub fn store_get(&self, key: &str, wait: Duration) -> Result<Option<Vec<u8>>> {
        let k = CString::new(key)?;
        let (mut found, mut value, mut len) = (false, std::ptr::null_mut(), 0usize);
        // SAFETY: out-pointers the shim fills; the value is malloc'd and freed here.
        checked(unsafe { distill_store_get(self.raw, k.as_ptr(), millis(wait), &mut found, &mut value, &mut len) })?;
        if !found {
            return Ok(None);
        }
        let bytes = unsafe { std::slice::from_raw_parts(value, len) }.to_vec();
        unsafe { distill_free_message(value.cast()) };
        Ok(Some(bytes))
    }
}

/// The most milliseconds handed to c10d: 2^40 (35 years). Larger counts overflow when
/// C++ adds them to a clock's nanoseconds.
pub const MAX_WAIT_MS: u64 = 1 << 40;

fn millis(d: Duration) -> i64 {
    d.as_millis().min(MAX_WAIT_MS as u128) as i64
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: created by distill_group_new, freed once.
        unsafe { distill_group_free(self.raw) }
    }
}

/// The tensors' `at::Tensor*`, refusing what c10d would reject with a C++ backtrace.
fn pointers(tensors: &[Tensor]) -> Result<Vec<*const C_tensor>> {
    tensors
        .iter()
        .map(|t| {
            if !t.is_contiguous() {
                bail!("collectives need contiguous tensors (got shape {:?})", t.size());
            }
            Ok(t.as_ptr())
        })
        .collect()
}

/// Runs `f` on two ranks (threads) of a Gloo group over loopback.
#[cfg(test)]
pub(crate) fn on_two_ranks(f: impl Fn(ProcessGroup) + Send + Sync + 'static) {
    let port = tests::free_port();
    let f = std::sync::Arc::new(f);
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            let f = f.clone();
            std::thread::spawn(move || {
                f(ProcessGroup::join(&tests::options(port, rank, Duration::from_secs(20))).unwrap())
            })
        })
        .collect();
    for r in ranks {
        r.join().unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    pub fn free_port() -> u16 {
        crate::distributed::launch::free_loopback_port().unwrap()
    }

    pub fn options(port: u16, rank: usize, timeout: Duration) -> GroupOptions {
        GroupOptions {
            host: "127.0.0.1".into(),
            port,
            serve_store: rank == 0,
            agent_store: false,
            prefix: "test".into(),
            rank,
            world: 2,
            backend: Backend::Gloo,
            device: Device::Cpu,
            timeout,
        }
    }

    /// Construct, use and destroy a Gloo group of 2 ranks (threads): guards the mirrored
    /// layouts in shim.cpp against a torch upgrade.
    #[test]
    fn gloo_collectives_between_two_ranks() {
        on_two_ranks(|g| {
            let rank = g.rank;
            assert_eq!(g.backend_name().unwrap(), "gloo");
            let a = Tensor::full([4], rank as f64 + 1.0, (Kind::Float, tch::Device::Cpu));
            let b = Tensor::arange(3, (Kind::Double, tch::Device::Cpu)) * (rank as f64 + 1.0);
            g.all_reduce(&[a.shallow_clone(), b.shallow_clone()]).unwrap();
            assert_eq!(Vec::<f32>::try_from(&a).unwrap(), vec![3.0; 4]);
            assert_eq!(Vec::<f64>::try_from(&b).unwrap(), vec![0.0, 3.0, 6.0]);
            let c = Tensor::full([2], rank as f64 * 10.0 + 5.0, (Kind::Float, tch::Device::Cpu));
            g.broadcast(&c, 1).unwrap();
            assert_eq!(Vec::<f32>::try_from(&c).unwrap(), vec![15.0; 2]);
            let out: Vec<Tensor> = (0..2).map(|_| Tensor::zeros([2], (Kind::Float, tch::Device::Cpu))).collect();
            g.all_gather(&Tensor::from_slice(&[rank as f32, 7.0]), &out).unwrap();
            assert_eq!(Vec::<f32>::try_from(&out[1]).unwrap(), vec![1.0, 7.0]);
            g.store_set(&format!("k{rank}"), b"hello").unwrap();
            let other = g.store_get(&format!("k{}", 1 - rank), Duration::from_secs(10)).unwrap();
            assert_eq!(other.as_deref(), Some(&b"hello"[..]));
            assert_eq!(g.store_get("never", Duration::from_millis(50)).unwrap(), None);
            g.barrier().unwrap();
            let strided = Tensor::zeros([2, 2], (Kind::Float, tch::Device::Cpu)).tr();
            assert!(g.all_reduce(&[strided]).unwrap_err().to_string().contains("contiguous"));
        });
    }

    /// Groups of two ranks, four pairs at a time (eight c10d groups in this process),
    /// whose first collectives start together: torch 2.11's flight recorder adds a group
    /// to a map without its lock on the group's first collective, which crashed
    /// (SIGSEGV) when two groups' first collectives met; the shim issues under one lock.
    #[test]
    fn groups_in_one_process_issue_collectives_at_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        for _ in 0..3 {
            // Not a std Barrier: a rank that failed to join would leave the others waiting.
            let ready = std::sync::Arc::new(AtomicUsize::new(0));
            let pairs: Vec<_> = (0..4)
                .map(|_| {
                    let ready = ready.clone();
                    std::thread::spawn(move || {
                        on_two_ranks(move |g| {
                            ready.fetch_add(1, Ordering::SeqCst);
                            let since = std::time::Instant::now();
                            while ready.load(Ordering::SeqCst) < 8 && since.elapsed() < Duration::from_secs(20) {
                                std::thread::yield_now();
                            }
                            for round in 0..4 {
                                let t = Tensor::full([8], round as f64, (Kind::Float, tch::Device::Cpu));
                                g.all_reduce(&[t.shallow_clone()]).unwrap();
                                assert_eq!(Vec::<f32>::try_from(&t).unwrap(), vec![2.0 * round as f32; 8]);
                            }
                        })
                    })
                })
                .collect();
            for p in pairs {
                p.join().unwrap();
            }
        }
    }

    /// A peer that stops taking part makes the next collective fail after the timeout.
    #[test]
    fn a_silent_peer_fails_the_collective_within_the_timeout() {
        let port = free_port();
        let timeout = Duration::from_secs(3);
        let quiet = std::thread::spawn(move || {
            let g = ProcessGroup::join(&options(port, 1, timeout)).unwrap();
            g.barrier().unwrap();
            std::thread::sleep(Duration::from_secs(6));
        });
        let g = ProcessGroup::join(&options(port, 0, timeout)).unwrap();
        g.barrier().unwrap();
        let started = std::time::Instant::now();
        let err = g.all_reduce(&[Tensor::ones([3], (Kind::Float, tch::Device::Cpu))]).unwrap_err();
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(2900) && waited < Duration::from_secs(6), "{waited:?}: {err}");
        assert!(err.to_string().to_lowercase().contains("timed out"), "{err}");
        quiet.join().unwrap();
    }
}
