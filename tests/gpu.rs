//! GPU checks, ignored by default (CI has no GPU). scripts/gpu_check.sh builds this test
//! binary and runs it on a CUDA machine with `--ignored`.
mod common;
use common::*;
use tch::{Device, Kind};

#[test]
#[ignore = "needs a CUDA GPU; run through scripts/gpu_check.sh"]
fn cuda_is_linked_and_available() {
    let info = distill::runtime::RuntimeInfo::collect();
    eprintln!("{}", serde_json::to_string_pretty(&info).unwrap());
    assert!(info.cuda_available, "libtorch reports no CUDA: is libtorch_cuda linked? (ldd the binary)");
    assert!(!info.cuda_devices.is_empty());
}

#[test]
#[ignore = "needs a CUDA GPU; run through scripts/gpu_check.sh"]
fn bfloat16_on_cuda_matches_cpu_float32() {
    for name in MODELS {
        // Same yardstick as the CPU test: transformers' own bf16 error on these models
        // (1.5e-2..2.4e-2, ‖bf16 - f32‖ / ‖f32‖), with 25% room for other GPU kernels.
        for c in reduced_precision_errors(name, Device::Cuda(0), Kind::BFloat16) {
            eprintln!(
                "{}: cuda bf16 vs cpu float32 {:.2e} (transformers cpu bf16: {:.2e})",
                c.what, c.ours, c.transformers_bf16
            );
            assert!(
                c.ours < 1.25 * c.transformers_bf16 + 1e-3,
                "{}: CUDA bf16 logits differ by {:.3e}",
                c.what,
                c.ours
            );
        }
        for c in reduced_precision_errors(name, Device::Cuda(0), Kind::Float) {
            eprintln!("{}: cuda float32 vs cpu float32 {:.2e}", c.what, c.ours);
            // TF32 may be on for matmuls; 1e-3 covers it.
            assert!(c.ours < 1e-3, "{}: CUDA float32 logits differ by {:.3e}", c.what, c.ours);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU; run through scripts/gpu_check.sh"]
fn model_split_over_cuda_and_cpu_matches_one_device() {
    // One GPU is enough to move activations across a device boundary.
    for name in MODELS {
        let dir = model_dir(name);
        let reference = read_tensors(&dir.join("reference.safetensors"));
        let model = distill::model::CausalLm::load_split(&dir, &[Device::Cuda(0), Device::Cpu], Kind::Float).unwrap();
        let ids = reference["left.input_ids"].to_device(Device::Cuda(0));
        let mask = reference["left.attention_mask"].to_device(Device::Cuda(0));
        let out = tch::no_grad(|| model.forward(&ids, Some(&mask), &[0, 1])).unwrap();
        let e = norm_rel_err(&out.logits, &reference["left.logits"], Some(&reference["left.attention_mask"]));
        eprintln!("{name}: split cuda:0+cpu float32 vs reference {e:.2e}");
        assert!(e < 1e-3, "{name}: split model logits differ by {e:.3e}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU; run through scripts/gpu_check.sh"]
fn training_on_cuda_in_bf16_follows_cpu_float32() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    let student = model_dir("qwen3");
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    ok(precompute("llama", &sample(), &shards, &["--top-k", "16", "--devices", "cpu"]));
    let run = |name: &str, extra: &[&str]| -> Vec<serde_json::Value> {
        let out = tmp.path().join(name);
        let paths = [s(&student), s(&shards), s(&out)];
        let mut args = vec!["train", "--student", &paths[0], "--shards", &paths[1], "--output", &paths[2]];
        args.extend(["--steps", "8", "--batch-tokens", "512", "--lr", "3e-3", "--pack"]);
        args.extend(extra);
        ok(distill(&args));
        let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let cpu = run("cpu", &["--device", "cpu", "--precision", "f32"]);
    let cuda = run("cuda", &["--device", "cuda:0", "--precision", "bf16", "--recompute"]);
    for (a, b) in cpu.iter().zip(&cuda) {
        let (a, b) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
        eprintln!("step loss: cpu f32 {a:.5}, cuda bf16 + recompute {b:.5}");
        // bf16 keeps 8 mantissa bits; on the CPU the same comparison stays within 1e-3.
        assert!((a - b).abs() < 0.05 * a, "cpu {a} vs cuda {b}");
    }
    let memory = cuda[0]["gpu_memory_bytes"].as_u64().unwrap_or(0);
    eprintln!("GPU memory in use after step 1: {memory} bytes");
    assert!(memory > 0, "CUDA runs log the GPU memory in use");
}

#[test]
#[ignore = "needs a CUDA GPU; run through scripts/gpu_check.sh"]
fn tail_draws_and_the_label_bucket_on_cuda_follow_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    // The same draws on either device (float32 teacher): they depend on row and position
    // alone; an id may differ only where a uniform number falls at an interval's edge.
    let draws = |device: &str| {
        let dir = tmp.path().join(format!("draws-{}", device.replace(':', "")));
        ok(precompute(
            "llama",
            &sample(),
            &dir,
            &["--top-k", "8", "--sample", "8", "--devices", device, "--dtype", "float32"],
        ));
        let set = distill::shards::reader::ShardSet::open(&dir, false).unwrap();
        let rows: Vec<_> = set.row_groups().iter().flat_map(|&rg| set.decode(rg).unwrap()).collect();
        (dir, rows)
    };
    let ((cpu_dir, cpu), (_, cuda)) = (draws("cpu"), draws("cuda:0"));
    let (mut same, mut all) = (0, 0);
    for (a, b) in cpu.iter().zip(&cuda) {
        let (a, b) = (a.topk.draws.as_ref().unwrap(), b.topk.draws.as_ref().unwrap());
        for (x, y) in a.per_position().zip(b.per_position()) {
            same += usize::from(x == y);
            all += 1;
        }
    }
    eprintln!("identical draws at {same} of {all} positions");
    assert!(same as f64 >= 0.99 * all as f64, "draws differ at {} of {all} positions", all - same);
    // Training on draws and on the label bucket: CUDA float32 follows the CPU.
    let topk_dir = tmp.path().join("topk");
    ok(precompute("llama", &sample(), &topk_dir, &["--top-k", "8", "--devices", "cpu"]));
    let student = model_dir("qwen3");
    let run = |name: &str, shards: &std::path::Path, extra: &[&str]| -> Vec<f64> {
        let out = tmp.path().join(name);
        let paths = [s(&student), s(shards), s(&out)];
        let mut args = vec!["train", "--student", &paths[0], "--shards", &paths[1], "--output", &paths[2]];
        args.extend(["--steps", "4", "--batch-tokens", "512", "--lr", "3e-3", "--pack", "--shuffle", "false"]);
        args.extend(extra);
        ok(distill(&args));
        let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap()).collect()
    };
    for (what, shards, extra) in [("draws", &cpu_dir, &[][..]), ("label bucket", &topk_dir, &["--label-bucket"][..])] {
        let cpu = run(
            &format!("train-{what}-cpu"),
            shards,
            &[&["--device", "cpu", "--precision", "f32"][..], extra].concat(),
        );
        let cuda = run(
            &format!("train-{what}-cuda"),
            shards,
            &[&["--device", "cuda:0", "--precision", "f32"][..], extra].concat(),
        );
        for (a, b) in cpu.iter().zip(&cuda) {
            eprintln!("step loss on {what}: cpu {a:.6}, cuda {b:.6}");
            assert!((a - b).abs() < 1e-3 * a.abs().max(1.0), "{what}: cpu {a} vs cuda {b}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU; run through scripts/gpu_check.sh"]
fn generation_on_cuda_follows_cpu() {
    use distill::generate::{generate, GenerateOptions, Hooks, SamplingOptions};
    // Prompts of different lengths (left padding), past the Mistral model's window;
    // rows of two so that waiting prompts join a batch in flight.
    let prompts: Vec<Vec<u32>> =
        [5usize, 19, 3, 11].iter().map(|&n| (0..n as u32).map(|i| 3 + (i * 37) % 380).collect()).collect();
    let keys: Vec<u64> = (0..prompts.len() as u64).collect();
    for name in ["llama", "mistral", "qwen3"] {
        for sampling in
            [SamplingOptions::default(), SamplingOptions { temperature: 1.0, seed: 4, ..Default::default() }]
        {
            let opts = GenerateOptions {
                max_new_tokens: 24,
                stop_ids: vec![1],
                sampling,
                max_batch_tokens: 10_000,
                max_batch_rows: 2,
            };
            let run = |device| {
                let model = distill::model::CausalLm::load(&model_dir(name), device, Kind::Float).unwrap();
                generate(&model, &prompts, &keys, &opts, &Hooks::default()).unwrap()
            };
            let (cpu, cuda) = (run(Device::Cpu), run(Device::Cuda(0)));
            // TF32 matmuls may flip a near tie; count, and require nearly all to agree.
            let same = cpu.iter().zip(&cuda).filter(|(a, b)| a == b).count();
            eprintln!("{name} {sampling:?}: {same} of {} replies identical on CUDA and CPU", cpu.len());
            assert!(same + 1 >= cpu.len(), "{name}: CUDA replies differ from the CPU's: {cpu:?} vs {cuda:?}");
        }
    }
}

/// NCCL through the c10d shim: a group of one rank on cuda:0 (every GPU machine), and
/// when two GPUs exist, 2 processes x 1 micro-batch against 1 process x 2 on CUDA.
#[test]
#[ignore = "needs a CUDA GPU; run through scripts/gpu_check.sh"]
fn nccl_process_group_on_cuda() {
    use distill::distributed::{Backend, GroupOptions, ProcessGroup};
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let group = ProcessGroup::join(&GroupOptions {
        host: "127.0.0.1".into(),
        port,
        serve_store: true,
        agent_store: false,
        prefix: "gpu-check/".into(),
        rank: 0,
        world: 1,
        backend: Backend::Nccl,
        device: Device::Cuda(0),
        timeout: std::time::Duration::from_secs(60),
    })
    .unwrap();
    assert_eq!(group.backend_name().unwrap(), "nccl");
    let t = tch::Tensor::arange(4, (Kind::Float, Device::Cuda(0)));
    group.all_reduce(std::slice::from_ref(&t)).unwrap();
    assert_eq!(Vec::<f32>::try_from(t.to_device(Device::Cpu)).unwrap(), vec![0.0, 1.0, 2.0, 3.0]);
    drop(group);
    if tch::Cuda::device_count() < 2 {
        eprintln!("one GPU: the 2-process NCCL training check needs two");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    ok(precompute("llama", &sample(), &shards, &["--top-k", "16"]));
    let run = |out: &str, extra: &[&str]| {
        let student = model_dir("qwen3");
        let out = tmp.path().join(out);
        let mut args = vec!["train", "--student", student.to_str().unwrap(), "--shards", shards.to_str().unwrap()];
        args.extend(["--output", out.to_str().unwrap(), "--device", "cuda", "--precision", "f32", "--steps", "4"]);
        args.extend(["--batch-tokens", "512", "--save-every", "4", "--alpha", "0.3"]);
        args.extend(extra);
        ok(distill(&args));
        read_tensors(&out.join("checkpoint-0000004/model.safetensors"))
    };
    let (one, two) = (run("one", &["--grad-accum", "2"]), run("two", &["--nproc", "2"]));
    for (name, a) in &one {
        let d = (a - &two[name]).abs().max().double_value(&[]) / a.abs().max().double_value(&[]).max(1e-30);
        // TF32 and other kernels per GPU: 1e-3 as the other CUDA checks.
        assert!(d < 1e-3, "{name}: 2 GPUs differ from one by {d:e}");
    }
}

/// Packed rows on CUDA in bf16 go through libtorch's variable-length flash attention,
/// and each document's hidden states and the parameters' gradients equal those of the
/// per-bucket path (the same attention, computed per bucket of documents) within bf16
/// rounding; windows (Mistral) take the kernel's window.
#[test]
#[ignore = "needs a CUDA GPU; run through scripts/gpu_check.sh"]
fn packed_documents_on_cuda_take_flash_varlen() {
    use distill::model::packed::PackedDocuments;
    use distill::model::{CausalLm, ForwardInput};
    use tch::Tensor;
    for name in ["qwen3", "mistral", "llama"] {
        let dir = model_dir(name);
        let model = CausalLm::load(&dir, Device::Cuda(0), Kind::BFloat16).unwrap();
        let docs = [vec![5u32, 70, 20], vec![90]];
        let width = 100i64;
        tch::manual_seed(3);
        let ids = Tensor::randint(300, [2, width], (Kind::Int64, Device::Cuda(0)));
        let mut positions = vec![0i64; 200];
        for (r, row) in docs.iter().enumerate() {
            let mut at = 0;
            for &n in row {
                for t in 0..n as usize {
                    positions[r * 100 + at + t] = t as i64;
                }
                at += n as usize;
            }
        }
        let positions = Tensor::from_slice(&positions).view([2, width]).to_device(Device::Cuda(0));
        let layout = PackedDocuments::new(&docs, width as usize).to_device(Device::Cuda(0));
        let input = ForwardInput {
            input_ids: &ids,
            attention_mask: None,
            position_ids: Some(&positions),
            documents: Some(&layout),
        };
        let flash = tch::no_grad(|| model.transformer.forward_hidden(&input, &[])).unwrap().last;
        assert!(distill::model::flash_varlen::ran(), "{name}: the variable-length flash kernel did not run");
        // The same in float32 takes the bucket path.
        let f32_model = CausalLm::load(&dir, Device::Cuda(0), Kind::Float).unwrap();
        let buckets = tch::no_grad(|| f32_model.transformer.forward_hidden(&input, &[])).unwrap().last;
        let e = norm_rel_err(&flash.to_kind(Kind::Float), &buckets, None);
        eprintln!("{name}: packed rows, flash varlen bf16 vs bucket path float32: {e:.2e}");
        assert!(e < 3e-2, "{name}: flash varlen differs by {e:.3e}");
    }
}

/// `--offload-optimizer` keeps AdamW's state in host memory and trains to the weights of
/// the same run with the state on the GPU (the update runs on the GPU either way).
#[test]
#[ignore = "needs a CUDA GPU; run through scripts/gpu_check.sh"]
fn offloaded_optimizer_state_trains_like_state_on_the_gpu() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    ok(precompute("llama", &sample(), &shards, &["--top-k", "16"]));
    let run = |out: &str, extra: &[&str]| {
        let student = model_dir("qwen3");
        let out = tmp.path().join(out);
        let mut args = vec!["train", "--student", student.to_str().unwrap(), "--shards", shards.to_str().unwrap()];
        args.extend(["--output", out.to_str().unwrap(), "--device", "cuda", "--steps", "4", "--save-every", "4"]);
        args.extend(["--batch-tokens", "512", "--weights", "bf16", "--optimizer-moments", "8bit"]);
        args.extend(extra);
        let printed = ok(distill(&args));
        (read_tensors(&out.join("checkpoint-0000004/model.safetensors")), printed)
    };
    let ((near, _), (far, printed)) = (run("near", &[]), run("far", &["--offload-optimizer"]));
    eprintln!("{printed}");
    assert!(printed.contains("in host memory"), "{printed}");
    for (name, a) in &near {
        let d = (a.to_kind(Kind::Float) - far[name].to_kind(Kind::Float)).abs().max().double_value(&[]);
        assert!(d == 0.0, "{name}: offloaded state trains other weights (max |difference| {d:e})");
    }
}
