//! RMSNorm and the gated MLP with their own backward (`fused.cpp`), for the training
//! pass: they keep less for backward than autograd over the decomposed operations does
//! (the norm: its input and a reciprocal RMS per row instead of its input and
//! normalised output; the MLP: input, gate and up instead of input, gate, activation, up
//! and product), and recompute the elementwise rest. On the main shapes this is about
//! half of a layer's activation memory. Used only where a graph is recorded (grad mode,
//! an input requiring grad, no autocast, more than `FEW_ROWS` rows): inference takes the
//! decomposed operations, and the forward values are the same bits either way.
use std::ffi::{c_char, CStr};
use tch::Tensor;
use torch_sys::C_tensor;

use super::config::Activation;

extern "C" {
    fn distill_fused_free_message(m: *mut c_char);
    fn distill_fused_rms_norm(
        x: *const C_tensor,
        weight: *const C_tensor,
        eps: f64,
        plus_one: bool,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn distill_fused_gated_mlp(
        x: *const C_tensor,
        gate: *const C_tensor,
        up: *const C_tensor,
        down: *const C_tensor,
        activation: i64,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    #[allow(clippy::too_many_arguments)]
    fn distill_fused_norm_gated_mlp(
        x: *const C_tensor,
        norm: *const C_tensor,
        gate: *const C_tensor,
        up: *const C_tensor,
        down: *const C_tensor,
        eps: f64,
        plus_one: bool,
        activation: i64,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn distill_fused_wanted(a: *const C_tensor, b: *const C_tensor) -> bool;
}

/// Whether the fused functions apply to input `x` with parameter `weight`: a graph is
/// being recorded for them, without autocast, and `x` has more than `few_rows` rows (the
/// decomposed path multiplies a few rows another way; see `layers::linear`).
pub fn wanted(x: &Tensor, weight: &Tensor, few_rows: i64) -> bool {
    let width = x.size().last().copied().unwrap_or(0);
    if width == 0 || x.numel() as i64 / width <= few_rows {
        return false;
    }
    // SAFETY: reads grad mode, autocast state and two live tensors' flags.
    unsafe { distill_fused_wanted(x.as_ptr(), weight.as_ptr()) }
}

/// `x * rsqrt(mean(x^2) + eps)` scaled by `weight` (or by `1 + weight`), as
/// `layers::RmsNorm::forward` computes it.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, plus_one: bool) -> Tensor {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: live tensors for the call; the shim catches every C++ exception.
    let message = unsafe { distill_fused_rms_norm(x.as_ptr(), weight.as_ptr(), eps, plus_one, &mut out) };
    take(message, out, "RMSNorm")
}

fn activation_code(activation: Activation) -> i64 {
    match activation {
        Activation::Silu => 0,
        Activation::GeluTanh => 1,
        Activation::Gelu => 2,
    }
}

/// `down(act(gate(x)) * up(x))` for weights without biases.
pub fn gated_mlp(x: &Tensor, gate: &Tensor, up: &Tensor, down: &Tensor, activation: Activation) -> Tensor {
    let code = activation_code(activation);
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: as above.
    let message =
        unsafe { distill_fused_gated_mlp(x.as_ptr(), gate.as_ptr(), up.as_ptr(), down.as_ptr(), code, &mut out) };
    take(message, out, "gated MLP")
}

/// The RMSNorm of `x` (weight `norm`, as `rms_norm`) through the gated MLP: keeps `x`
/// and one reciprocal RMS per row where the two functions apart would keep `x` and the
/// normed input as well.
pub fn norm_gated_mlp(x: &Tensor, norm: (&Tensor, f64, bool), mlp: [&Tensor; 3], activation: Activation) -> Tensor {
    let ((weight, eps, plus_one), [gate, up, down]) = (norm, mlp);
    let code = activation_code(activation);
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: as above.
    let message = unsafe {
        distill_fused_norm_gated_mlp(
            x.as_ptr(),
            weight.as_ptr(),
            gate.as_ptr(),
            up.as_ptr(),
            down.as_ptr(),
            eps,
            plus_one,
            code,
            &mut out,
        )
    };
    take(message, out, "norm and gated MLP")
}

/// The shim's result. Its failures are libtorch's own checks on shapes, types and
/// devices, which the decomposed operations would fail the same way: a panic, as tch's
/// operations do.
fn take(message: *mut c_char, out: *mut C_tensor, what: &str) -> Tensor {
    if message.is_null() {
        // SAFETY: the shim allocated this tensor for us to own.
        return unsafe { Tensor::from_ptr(out) };
    }
    let text = unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned();
    unsafe { distill_fused_free_message(message) };
    panic!("fused {what}: {text}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// The gradients of `f` at `inputs` for the loss `sum(f(..) * probe)`.
    fn grads(inputs: &[Tensor], probe: &Tensor, f: impl Fn(&[Tensor]) -> Tensor) -> (Tensor, Vec<Tensor>) {
        let leaves: Vec<Tensor> = inputs.iter().map(|t| t.detach().set_requires_grad(true)).collect();
        let y = f(&leaves);
        (y * probe).sum(Kind::Float).backward();
        let y = tch::no_grad(|| f(&leaves));
        (y, leaves.iter().map(|l| l.grad()).collect())
    }

    /// `fused` against `decomposed` at `inputs`: the forward's bits equal, every gradient
    /// within 1e-5 of the largest of its entries (float32 sums in another order).
    fn same_as_decomposed(
        inputs: &[Tensor],
        probe: &Tensor,
        decomposed: impl Fn(&[Tensor]) -> Tensor,
        fused: impl Fn(&[Tensor]) -> Tensor,
        what: &str,
    ) {
        let (y0, g0) = grads(inputs, probe, decomposed);
        let (y1, g1) = grads(inputs, probe, fused);
        assert!(y0.equal(&y1), "{what}: the forward's bits");
        for (a, b) in g0.iter().zip(&g1) {
            let scale = a.abs().max().double_value(&[]);
            let diff = (a - b).abs().max().double_value(&[]);
            assert!(scale > 0.0, "{what}: no gradient");
            assert!(diff <= 1e-5 * scale, "{what}: max |difference| {diff:e} vs max |value| {scale:e}");
        }
    }

    fn decomposed_norm(x: &Tensor, w: &Tensor, eps: f64, plus_one: bool) -> Tensor {
        let xf = x.to_kind(Kind::Float);
        let normed = &xf * (xf.square().mean_dim(-1, true, Kind::Float) + eps).rsqrt();
        if plus_one {
            (normed * (w.to_kind(Kind::Float) + 1.0)).to_kind(x.kind())
        } else {
            w * normed.to_kind(x.kind())
        }
    }

    /// `layers::Mlp`'s operations without biases; `w`: gate, up, down.
    fn decomposed_mlp(x: &Tensor, w: &[Tensor], activation: Activation) -> Tensor {
        let gate = x.linear(&w[0], None::<Tensor>);
        let gate = match activation {
            Activation::Silu => gate.silu(),
            Activation::GeluTanh => gate.gelu("tanh"),
            Activation::Gelu => gate.gelu("none"),
        };
        (gate * x.linear(&w[1], None::<Tensor>)).linear(&w[2], None::<Tensor>)
    }

    #[test]
    fn the_fused_norm_has_the_decomposed_values_and_gradients() {
        tch::manual_seed(5);
        let x = Tensor::randn([3, 70, 24], (Kind::Float, Device::Cpu)) * 3.0;
        let w = Tensor::randn([24], (Kind::Float, Device::Cpu));
        let probe = Tensor::randn([3, 70, 24], (Kind::Float, Device::Cpu));
        for plus_one in [false, true] {
            let inputs = [x.shallow_clone(), w.shallow_clone()];
            same_as_decomposed(
                &inputs,
                &probe,
                |t| decomposed_norm(&t[0], &t[1], 1e-6, plus_one),
                |t| rms_norm(&t[0], &t[1], 1e-6, plus_one),
                &format!("norm, plus_one {plus_one}"),
            );
        }
    }

    #[test]
    fn the_fused_mlp_has_the_decomposed_values_and_gradients() {
        tch::manual_seed(6);
        let opts = (Kind::Float, Device::Cpu);
        let x = Tensor::randn([2, 50, 16], opts);
        let (wg, wu, wd) =
            (Tensor::randn([40, 16], opts), Tensor::randn([40, 16], opts), Tensor::randn([16, 40], opts));
        let probe = Tensor::randn([2, 50, 16], opts);
        for activation in [Activation::Silu, Activation::GeluTanh, Activation::Gelu] {
            let inputs = [x.shallow_clone(), wg.shallow_clone(), wu.shallow_clone(), wd.shallow_clone()];
            let decomposed = |t: &[Tensor]| decomposed_mlp(&t[0], &t[1..], activation);
            let fused = |t: &[Tensor]| gated_mlp(&t[0], &t[1], &t[2], &t[3], activation);
            same_as_decomposed(&inputs, &probe, decomposed, fused, &format!("MLP, {activation:?}"));
        }
    }

    #[test]
    fn the_norm_and_mlp_in_one_have_the_decomposed_values_and_gradients() {
        tch::manual_seed(7);
        let opts = (Kind::Float, Device::Cpu);
        let x = Tensor::randn([2, 50, 16], opts) * 2.0;
        let w = Tensor::randn([16], opts);
        let (wg, wu, wd) =
            (Tensor::randn([40, 16], opts), Tensor::randn([40, 16], opts), Tensor::randn([16, 40], opts));
        let probe = Tensor::randn([2, 50, 16], opts);
        for (plus_one, activation) in [(false, Activation::Silu), (true, Activation::GeluTanh)] {
            let inputs =
                [x.shallow_clone(), w.shallow_clone(), wg.shallow_clone(), wu.shallow_clone(), wd.shallow_clone()];
            let decomposed =
                |t: &[Tensor]| decomposed_mlp(&decomposed_norm(&t[0], &t[1], 1e-6, plus_one), &t[2..], activation);
            let fused =
                |t: &[Tensor]| norm_gated_mlp(&t[0], (&t[1], 1e-6, plus_one), [&t[2], &t[3], &t[4]], activation);
            same_as_decomposed(&inputs, &probe, decomposed, fused, &format!("norm + MLP, {activation:?}"));
        }
    }

    #[test]
    fn the_fused_functions_are_left_out_where_no_graph_is_recorded() {
        let x = Tensor::randn([4, 100, 8], (Kind::Float, Device::Cpu));
        let w = Tensor::ones([8], (Kind::Float, Device::Cpu));
        assert!(!wanted(&x, &w, 64), "nothing requires grad");
        let w = w.set_requires_grad(true);
        assert!(wanted(&x, &w, 64));
        assert!(!tch::no_grad(|| wanted(&x, &w, 64)), "no grad mode");
        assert!(!wanted(&x.narrow(1, 0, 16), &w, 64), "a few rows");
    }
}
