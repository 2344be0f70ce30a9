//! Makes the `distill` binary find libtorch and keep its CUDA half.
//!
//! torch-sys links `-ltorch_cuda`, but rustc passes `--as-needed` to the linker, and since
//! no symbol of libtorch_cuda is referenced directly, the library is dropped from the
//! binary's DT_NEEDED. libtorch then never registers its CUDA backend and
//! `tch::Cuda::is_available()` is false even on a GPU machine. We re-add it with
//! `--no-as-needed`. We also embed an rpath to torch/lib so the binary runs without
//! LD_LIBRARY_PATH (LD_LIBRARY_PATH still wins, which is how a prebuilt binary is
//! pointed at another machine's torch).
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-changed=build.rs");
    let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:warning=torch-sys did not report its libtorch folder; no rpath set");
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    let lib = Path::new(&lib_dir);
    for cuda_lib in ["torch_cuda", "c10_cuda"] {
        if lib.join(format!("lib{cuda_lib}.so")).exists() {
            println!("cargo:rustc-link-arg=-Wl,--push-state,--no-as-needed,-l{cuda_lib},--pop-state");
        }
    }
    println!("cargo:rustc-env=DISTILL_BUILT_LIBTORCH={lib_dir}");
}
