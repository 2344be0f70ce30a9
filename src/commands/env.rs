//! `distill env`: the libtorch, CUDA and GPUs this binary runs with.
use anyhow::Result;
use clap::Args;
use distill::runtime::RuntimeInfo;

#[derive(Args)]
pub struct EnvArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: EnvArgs) -> Result<()> {
    let info = RuntimeInfo::collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(());
    }
    let or_unknown = |o: Option<String>| o.unwrap_or_else(|| "unknown".into());
    println!("distill        {}", info.distill_version);
    println!("libtorch       {}", or_unknown(info.libtorch_version.clone()));
    println!("libtorch dir   {}", or_unknown(info.libtorch_dir.as_ref().map(|p| p.display().to_string())));
    println!("built against  {}", info.built_against);
    println!("cpu threads    {}", info.cpu_threads);
    println!("cuda           {}", if info.cuda_available { "available" } else { "not available" });
    println!("cudnn          {}", if info.cudnn_available { "available" } else { "not available" });
    for gpu in &info.cuda_devices {
        println!("  cuda:{}  {}  {:.1} GiB", gpu.index, gpu.name, gpu.memory_bytes as f64 / (1u64 << 30) as f64);
    }
    Ok(())
}
