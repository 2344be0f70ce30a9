//! Packed rows on CUDA through libtorch's variable-length flash attention: every
//! document of the batch in one kernel, from the segments' cumulative starts
//! (`PackedDocuments::cu_seqlens`), with no padding and no mask. The forward is called
//! through a small C++ shim (`flash_varlen.cpp`; tch binds only the backward), and
//! autograd records it as for a PyTorch caller. Used for bf16 / f16 on CUDA when the
//! kernel is built into the loaded libtorch; anything else (the CPU, float32, a build
//! without it) takes the per-bucket SDPA path, which computes the same attention.
use std::ffi::{c_char, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use tch::{Kind, Tensor};
use torch_sys::C_tensor;

use super::packed::PackedDocuments;

extern "C" {
    fn distill_flash_free_message(m: *mut c_char);
    fn distill_flash_varlen(
        q: *const C_tensor,
        k: *const C_tensor,
        v: *const C_tensor,
        cu: *const C_tensor,
        max_len: i64,
        scale: f64,
        window_left: i64,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
}

/// Set after the first failed call (a libtorch without the kernel, an unsupported GPU):
/// the process then keeps to the bucket path, after saying why once.
static UNAVAILABLE: AtomicBool = AtomicBool::new(false);
/// Set after the first call that ran the kernel.
static RAN: AtomicBool = AtomicBool::new(false);

/// Whether this process has run the variable-length flash kernel (for the GPU checks).
pub fn ran() -> bool {
    RAN.load(Ordering::Relaxed)
}

/// Causal attention of `q` `[total, heads, d]` over `k`, `v` `[total, kv_heads, d]`
/// within each segment of `docs` (and within `window` tokens), `[total, heads, d]`; `None`
/// when this kernel does not apply (not CUDA, not bf16/f16, unavailable).
pub fn flash_varlen(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    docs: &PackedDocuments,
    scale: Option<f64>,
    window: Option<usize>,
) -> Option<Tensor> {
    if !q.device().is_cuda() || !matches!(q.kind(), Kind::BFloat16 | Kind::Half) || UNAVAILABLE.load(Ordering::Relaxed)
    {
        return None;
    }
    let cu = docs.cu_seqlens.to_device(q.device()).to_kind(Kind::Int);
    let (k, v) = (k.to_kind(q.kind()).contiguous(), v.to_kind(q.kind()).contiguous());
    let q = q.contiguous();
    let mut out: *mut C_tensor = std::ptr::null_mut();
    let window_left = window.map_or(-1, |w| w as i64 - 1);
    // SAFETY: the pointers are live tensors for the call; the shim catches every C++
    // exception and returns a new tensor on success.
    let message = unsafe {
        distill_flash_varlen(
            q.as_ptr(),
            k.as_ptr(),
            v.as_ptr(),
            cu.as_ptr(),
            docs.max_len,
            scale.unwrap_or(-1.0),
            window_left,
            &mut out,
        )
    };
    if message.is_null() {
        RAN.store(true, Ordering::Relaxed);
        // SAFETY: the shim allocated this tensor for us to own.
        return Some(unsafe { Tensor::from_ptr(out) });
    }
    let text = unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned();
    unsafe { distill_flash_free_message(message) };
    if !UNAVAILABLE.swap(true, Ordering::Relaxed) {
        let first = text.lines().next().unwrap_or("");
        eprintln!(
            "note: variable-length flash attention unavailable ({first}); packed rows attend per bucket of documents"
        );
    }
    None
}
