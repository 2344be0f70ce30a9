//! bfloat16 autocast (PyTorch's automatic mixed precision) around a training step:
//! weights stay float32 (the master copy the optimiser updates); matmuls and attention
//! run in bfloat16 on casts that libtorch caches for the step; reductions, softmax and
//! norms stay float32 by autocast's own op lists.
//!
//! tch 0.24 only exposes the deprecated CUDA switch, whose lower-precision type is
//! float16, and no way to pick bfloat16; so these bind the `at::autocast` functions that
//! libtorch_cpu exports (C++ symbols, checked at link time) for any device type.
use tch::Device;

// `c10::DeviceType` and `c10::ScalarType` are `enum class : int8_t`.
const DEVICE_CPU: i8 = 0;
const DEVICE_CUDA: i8 = 1;
const SCALAR_BFLOAT16: i8 = 15;

#[link(name = "torch_cpu")]
extern "C" {
    #[link_name = "_ZN2at8autocast20set_autocast_enabledEN3c1010DeviceTypeEb"]
    fn set_autocast_enabled(device_type: i8, enabled: bool);
    #[link_name = "_ZN2at8autocast19is_autocast_enabledEN3c1010DeviceTypeE"]
    fn is_autocast_enabled(device_type: i8) -> bool;
    #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
    fn set_autocast_dtype(device_type: i8, dtype: i8);
    #[link_name = "_ZN2at8autocast17increment_nestingEv"]
    fn increment_nesting() -> i32;
    #[link_name = "_ZN2at8autocast17decrement_nestingEv"]
    fn decrement_nesting() -> i32;
    #[link_name = "_ZN2at8autocast11clear_cacheEv"]
    fn clear_cache();
}

/// Autocast to bfloat16 on one device while alive (the state is thread-local). On drop
/// the previous state returns and, at the outermost level, the cache of cast weights is
/// cleared: it must not outlive an optimiser step, or the next forward pass would use
/// the old weights.
pub struct AutocastGuard {
    device_type: i8,
    was_enabled: bool,
}

impl AutocastGuard {
    pub fn bf16(device: Device) -> Self {
        let device_type = if device.is_cuda() { DEVICE_CUDA } else { DEVICE_CPU };
        // SAFETY: plain functions on libtorch's thread-local autocast state.
        let was_enabled = unsafe {
            let was = is_autocast_enabled(device_type);
            set_autocast_dtype(device_type, SCALAR_BFLOAT16);
            set_autocast_enabled(device_type, true);
            increment_nesting();
            was
        };
        AutocastGuard { device_type, was_enabled }
    }
}

impl Drop for AutocastGuard {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe {
            if decrement_nesting() == 0 {
                clear_cache();
            }
            set_autocast_enabled(self.device_type, self.was_enabled);
        }
    }
}

/// Whether autocast is on for `device` on this thread.
pub fn enabled(device: Device) -> bool {
    let device_type = if device.is_cuda() { DEVICE_CUDA } else { DEVICE_CPU };
    // SAFETY: reads thread-local state.
    unsafe { is_autocast_enabled(device_type) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    #[test]
    fn matmul_runs_in_bf16_inside_and_weights_are_recast_after_an_update() {
        let w = Tensor::ones([4, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let x = Tensor::ones([2, 4], (Kind::Float, Device::Cpu));
        let first = {
            let _g = AutocastGuard::bf16(Device::Cpu);
            assert!(enabled(Device::Cpu));
            let y = x.linear(&w, None::<Tensor>);
            assert_eq!(y.kind(), Kind::BFloat16);
            y.double_value(&[0, 0])
        };
        assert!(!enabled(Device::Cpu));
        assert_eq!(x.linear(&w, None::<Tensor>).kind(), Kind::Float, "off after the guard");
        tch::no_grad(|| {
            let mut w = w.shallow_clone();
            let _ = w.fill_(2.0);
        });
        let second = {
            let _g = AutocastGuard::bf16(Device::Cpu);
            x.linear(&w, None::<Tensor>).double_value(&[0, 0])
        };
        assert_eq!((first, second), (4.0, 8.0), "a stale cached cast would give 4 again");
    }
}
