//! What libtorch this process runs on: its location and version, CUDA and the GPUs.
//! `distill env` prints it; benchmarks and logs record it.
use anyhow::{bail, Result};
use serde::Serialize;
use std::path::PathBuf;
use tch::Device;

#[derive(Debug, Serialize)]
pub struct RuntimeInfo {
    pub distill_version: &'static str,
    pub libtorch_dir: Option<PathBuf>,
    pub libtorch_version: Option<String>,
    pub built_against: &'static str,
    pub cuda_available: bool,
    pub cudnn_available: bool,
    pub cuda_devices: Vec<GpuInfo>,
    pub cpu_threads: i32,
}

#[derive(Debug, Serialize)]
pub struct GpuInfo {
    pub index: usize,
    pub name: String,
    pub memory_bytes: u64,
}

impl RuntimeInfo {
    pub fn collect() -> Self {
        let libtorch_dir = loaded_libtorch_dir();
        let libtorch_version = libtorch_dir.as_ref().and_then(|d| read_torch_version(d));
        let cuda_available = tch::Cuda::is_available();
        let count = if cuda_available { tch::Cuda::device_count().max(0) as usize } else { 0 };
        RuntimeInfo {
            distill_version: env!("CARGO_PKG_VERSION"),
            libtorch_dir,
            libtorch_version,
            built_against: option_env!("DISTILL_BUILT_LIBTORCH").unwrap_or("unknown"),
            cuda_available,
            cudnn_available: tch::Cuda::cudnn_is_available(),
            cuda_devices: gpu_info(count),
            cpu_threads: tch::get_num_threads(),
        }
    }
}

/// The folder of the libtorch_cpu.so this process actually loaded (LD_LIBRARY_PATH or
/// rpath), read from /proc/self/maps.
fn loaded_libtorch_dir() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so"))
        .and_then(|p| PathBuf::from(p).parent().map(PathBuf::from))
}

/// torch/version.py next to torch/lib says e.g. `__version__ = '2.11.0+cu130'`.
fn read_torch_version(lib_dir: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(lib_dir.parent()?.join("version.py")).ok()?;
    let line = text.lines().find(|l| l.starts_with("__version__"))?;
    Some(line.split('=').nth(1)?.trim().trim_matches(|c| c == '\'' || c == '"').to_string())
}

/// GPU names and memory through the CUDA driver API (libtorch does not expose them).
fn gpu_info(count: usize) -> Vec<GpuInfo> {
    let fallback = |i| GpuInfo { index: i, name: "unknown".into(), memory_bytes: 0 };
    // SAFETY: these are the documented driver API signatures; libcuda stays loaded.
    unsafe {
        let Ok(lib) = libloading::Library::new("libcuda.so.1") else {
            return (0..count).map(fallback).collect();
        };
        type Init = unsafe extern "C" fn(u32) -> i32;
        type Name = unsafe extern "C" fn(*mut std::ffi::c_char, i32, i32) -> i32;
        type Mem = unsafe extern "C" fn(*mut usize, i32) -> i32;
        let (Ok(init), Ok(name), Ok(mem)) = (
            lib.get::<Init>(b"cuInit\0"),
            lib.get::<Name>(b"cuDeviceGetName\0"),
            lib.get::<Mem>(b"cuDeviceTotalMem_v2\0"),
        ) else {
            return (0..count).map(fallback).collect();
        };
        if init(0) != 0 {
            return (0..count).map(fallback).collect();
        }
        (0..count)
            .map(|i| {
                let mut buf = [0 as std::ffi::c_char; 256];
                let mut bytes = 0usize;
                let n = if name(buf.as_mut_ptr(), 256, i as i32) == 0 {
                    std::ffi::CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned()
                } else {
                    "unknown".into()
                };
                let _ = mem(&mut bytes, i as i32);
                GpuInfo { index: i, name: n, memory_bytes: bytes as u64 }
            })
            .collect()
    }
}

/// "cpu", "cuda", "cuda:N", or "auto" (the first GPU if there is one).
pub fn parse_device(s: &str) -> Result<Device> {
    Ok(match s {
        "cpu" => Device::Cpu,
        "auto" => Device::cuda_if_available(),
        "cuda" | "gpu" => cuda(0)?,
        _ => match s.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => cuda(n)?,
            None => bail!("unknown device {s:?} (use cpu, cuda, cuda:N or auto)"),
        },
    })
}

fn cuda(n: usize) -> Result<Device> {
    if !tch::Cuda::is_available() {
        bail!("device cuda:{n} requested but CUDA is not available to libtorch (run `distill env`)");
    }
    let count = tch::Cuda::device_count() as usize;
    if n >= count {
        bail!("device cuda:{n} requested but only {count} GPU(s) are visible");
    }
    Ok(Device::Cuda(n))
}

/// This process's resident memory and its peak so far, in bytes (Linux's
/// /proc/self/status `VmRSS` and `VmHWM`; `None` elsewhere).
pub fn resident_memory() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib = |key: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        line[key.len()..].split_whitespace().next()?.parse::<u64>().ok().map(|k| k * 1024)
    };
    Some((kib("VmRSS:")?, kib("VmHWM:")?))
}

/// Bytes in use on the GPU of this thread's current CUDA context (total minus free, from
/// the driver): libtorch's caching allocator keeps what it reserved, so sampled after a
/// step this is the step's peak reservation plus the context itself. `None` without CUDA.
pub fn cuda_memory_in_use() -> Option<u64> {
    // SAFETY: the documented driver API signature; libcuda stays loaded by libtorch.
    unsafe {
        let lib = libloading::Library::new("libcuda.so.1").ok()?;
        type MemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> i32;
        let get = lib.get::<MemGetInfo>(b"cuMemGetInfo_v2\0").ok()?;
        let (mut free, mut total) = (0usize, 0usize);
        (get(&mut free, &mut total) == 0).then_some(total.saturating_sub(free) as u64)
    }
}

/// Process settings for training and decoding on the CPU, applied before any work: libtorch's OpenMP
/// worker threads spin between operations instead of sleeping, and freed memory stays in
/// the process for the next step instead of going back to the kernel.
///
/// libgomp puts idle workers to sleep after a short spin, and a training step is
/// thousands of operations with serial work between them, so each one paid a wake-up:
/// on the main job's student (2 cores) KD ran at 205 tokens/s with the default policy
/// and 260 with spinning workers, plain SFT 224 and 265 (`scripts/bench_train.sh`). The
/// policy is read once, when libgomp loads before `main`, so the process starts again
/// with `OMP_WAIT_POLICY=ACTIVE` (unless the user chose a policy). Decoding is the same
/// pattern, worse: a step of a batch of 8 is ~500 small operations; `distill generate` on
/// the main job's teacher went from 61-71 to 84 tokens/s (24 prompts, 64 new tokens).
/// Not on a machine with CUDA: there the CPU mostly waits for the GPU, and spinning
/// workers would only take cores from the data threads.
pub fn tune_for_torch_loops_on_cpu() {
    const POLICY: &str = "OMP_WAIT_POLICY";
    if tch::Cuda::is_available() {
        return;
    }
    if std::env::var_os(POLICY).is_none() {
        #[cfg(unix)]
        {
            use std::os::unix::process::CommandExt;
            if let Ok(exe) = std::env::current_exe() {
                let err =
                    std::process::Command::new(exe).args(std::env::args_os().skip(1)).env(POLICY, "ACTIVE").exec();
                // `exec` returns only when it failed: carry on with the default policy.
                eprintln!(
                    "note: cannot restart with {POLICY}=ACTIVE ({err}); OpenMP workers will sleep between operations"
                );
            }
        }
    }
    keep_freed_memory();
}

/// Makes torch's operations on the calling helper thread run serially. libgomp spins
/// between parallel regions only while no more OpenMP threads exist than cores; a
/// parallel operation on a second thread (building a batch: a product of 32k+ values)
/// makes a second team of workers, and from then on every region of the main thread's
/// team sleeps and wakes on futexes (see `precompute::pipeline`, where this halved a
/// mixture-of-experts teacher's forward). Torch reads OpenMP's per-thread setting, so
/// one call makes this thread's operations serial and leaves the others alone. A guard
/// for the batch loader: KD-only training measured the same either way (300 / 308 / 296
/// against 294 / 301 / 308 tokens/s, main job's student), its batches need no parallel op;
/// hidden-state batches do.
pub fn serial_torch_on_this_thread() {
    // Torch sets the thread's OpenMP width on its first query; ours must come after.
    let _ = tch::get_num_threads();
    #[cfg(unix)]
    {
        let this = libloading::os::unix::Library::this();
        // SAFETY: libgomp's `void omp_set_num_threads(int)`, resolved in this process
        // (libtorch loads libgomp); absent (another OpenMP runtime), nothing is done.
        unsafe {
            if let Ok(set) = this.get::<unsafe extern "C" fn(std::ffi::c_int)>(b"omp_set_num_threads\0") {
                set(1);
            }
        }
    }
}

/// `keep_freed_memory` for precompute, on a machine without CUDA. Its batches of
/// the same sizes come back every step too: a mixture-of-experts teacher (random
/// Qwen3-MoE, 16 experts, `scripts/bench_precompute.sh --moe`, 35k tokens) went from
/// 8,285 / 9,646 to 9,367 / 10,345 tokens/s (two interleaved runs each).
pub fn keep_freed_memory_on_cpu() {
    if !tch::Cuda::is_available() {
        keep_freed_memory();
    }
}

/// glibc returns large freed blocks to the kernel (every block above its mmap threshold,
/// at most 32 MB, and the heap's free top), so the next step's tensors of the same sizes
/// come back as fresh pages that the kernel zeroes on first touch: 17% of a KD step's
/// time on the main job's student was `clear_page` (perf). Served from the heap and never
/// trimmed, they are reused instead: KD 251 -> 278 tokens/s, kernel time 9.6 -> 6.4 s
/// per 8 steps, peak resident memory 4.0 -> 4.4 GB (3 interleaved runs each).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
        }
        const M_TRIM_THRESHOLD: std::ffi::c_int = -1;
        const M_MMAP_MAX: std::ffi::c_int = -4;
        // SAFETY: glibc's documented tuning call, made before this process allocates tensors.
        unsafe {
            mallopt(M_MMAP_MAX, 0);
            mallopt(M_TRIM_THRESHOLD, std::ffi::c_int::MAX);
        }
    }
}

extern "C" {
    fn distill_cpu_cache_install();
    fn distill_cpu_cache_release_idle();
    fn distill_cpu_cache_mapped() -> usize;
}

/// Environment variable that keeps glibc's heap for `train`'s tensors (`glibc`), for
/// comparison; anything else, or unset, caches (see `cache_cpu_allocations`).
pub const CPU_ALLOCATOR_VAR: &str = "DISTILL_CPU_ALLOCATOR";

/// Makes libtorch's CPU tensors of 1 MiB and more come from `cpu_cache.cpp`'s caching
/// allocator (training on a machine without CUDA): blocks kept by size and reused every
/// step, never fragmented, never zeroed again, returned once idle for a whole step
/// (`release_idle_cpu_blocks`). Against glibc's untrimmed heap it measured the same rate
/// and 1.4 / 2.2 GiB less peak memory on 135M / 360M-parameter KD steps (docs/scale.md).
pub fn cache_cpu_allocations() {
    if tch::Cuda::is_available() || std::env::var(CPU_ALLOCATOR_VAR).is_ok_and(|v| v == "glibc") {
        return;
    }
    // SAFETY: registers a process-lifetime allocator with libtorch; tensors made before
    // keep their own deleters.
    unsafe { distill_cpu_cache_install() };
}

/// Returns to the kernel the cached blocks not asked for since the previous call (a
/// no-op without the caching allocator). Called once per optimiser step.
pub fn release_idle_cpu_blocks() {
    // SAFETY: takes the allocator's lock; safe whether or not it is installed.
    unsafe { distill_cpu_cache_release_idle() };
}

/// Bytes the caching allocator holds from the kernel (in use and cached).
pub fn cpu_cache_mapped() -> usize {
    // SAFETY: reads a counter under the allocator's lock.
    unsafe { distill_cpu_cache_mapped() }
}

#[cfg(test)]
mod cache_tests {
    use super::*;
    use tch::{Device, Kind, Tensor};

    #[test]
    fn the_caching_allocator_reuses_a_freed_block_and_returns_idle_ones() {
        // SAFETY: as in `cache_cpu_allocations` (the other tests in this process then
        // allocate through it too, as `train` does).
        unsafe { distill_cpu_cache_install() };
        // A size no other test asks for: 1 MiB + 3 x 64 KiB + 4 bytes, in floats.
        let floats = ((1 << 20) + 3 * (64 << 10) + 4) / 4;
        let a = Tensor::ones([floats], (Kind::Float, Device::Cpu));
        let first = a.data_ptr();
        assert!(cpu_cache_mapped() >= floats as usize * 4);
        drop(a);
        let b = Tensor::zeros([floats], (Kind::Float, Device::Cpu));
        assert_eq!(b.data_ptr(), first, "the freed block serves the next tensor of its size");
        assert_eq!(b.sum(Kind::Float).double_value(&[]), 0.0, "a reused block holds what it is given");
        drop(b);
        // Idle through two release rounds, the block is unmapped; later tensors of its
        // size get a new one.
        release_idle_cpu_blocks();
        release_idle_cpu_blocks();
        let c = Tensor::ones([floats], (Kind::Float, Device::Cpu));
        assert_eq!(c.sum(Kind::Float).double_value(&[]), floats as f64);
        // Small tensors stay with glibc and work as before.
        let small = Tensor::arange(100, (Kind::Float, Device::Cpu));
        assert_eq!(small.sum(Kind::Float).double_value(&[]), 4950.0);
    }
}
