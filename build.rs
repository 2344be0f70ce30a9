//! Makes the `distill` binary find libtorch and keep its CUDA half.
//!
//! torch-sys links `-ltorch_cuda`, but rustc passes `--as-needed` to the linker, and since
//! no symbol of libtorch_cuda is referenced directly, the library is dropped from the
//! binary's DT_NEEDED. libtorch then never registers its CUDA backend and
//! `tch::Cuda::is_available()` is false even on a GPU machine. We re-add it with
//! `--no-as-needed`. We also embed an rpath to torch/lib so the binary runs without
//! LD_LIBRARY_PATH (LD_LIBRARY_PATH still wins, which is how a prebuilt binary is
//! pointed at another machine's torch).
//!
//! It also compiles `src/distributed/shim.cpp`, the c10d binding (see its header),
//! `src/model/flash_varlen.cpp`, the variable-length flash attention forward,
//! `src/model/fused.cpp`, RMSNorm and the gated MLP with their own backward, and
//! `src/cpu_cache.cpp`, the caching CPU allocator for training,
//! against the libtorch headers next to that folder, with the C++ ABI libtorch was built
//! with (`LIBTORCH_CXX11_ABI`, default 1 as torch-sys assumes: every torch wheel since
//! 2.7 uses the C++11 ABI).
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
    compile_c10d_shim(lib);
}

fn compile_c10d_shim(lib: &Path) {
    println!("cargo:rerun-if-changed=src/distributed/shim.cpp");
    println!("cargo:rerun-if-changed=src/model/flash_varlen.cpp");
    println!("cargo:rerun-if-changed=src/model/fused.cpp");
    println!("cargo:rerun-if-changed=src/cpu_cache.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let include = lib.parent().expect("libtorch's lib folder has a parent").join("include");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file("src/distributed/shim.cpp")
        .file("src/model/flash_varlen.cpp")
        .file("src/model/fused.cpp")
        .file("src/cpu_cache.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .warnings(false);
    let nccl = lib.join("libtorch_cuda.so").exists();
    if nccl {
        build.define("DISTILL_WITH_NCCL", None);
    }
    build.compile("distill_c10d");
    // After the static shim, so the linker resolves its references from these.
    for l in ["torch_cpu", "c10"] {
        println!("cargo:rustc-link-lib=dylib={l}");
    }
    if nccl {
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
    }
}
