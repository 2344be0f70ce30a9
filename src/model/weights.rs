//! Reading model weights from safetensors (single file or sharded with an index),
//! and the `VarBuilder` through which model blocks create their parameters.
//!
//! Every parameter is created by name (the Hugging Face name, e.g.
//! `model.layers.0.self_attn.q_proj.weight`) in a tch `VarStore`, either from a
//! checkpoint, with its shape checked against what config.json implies, or freshly
//! initialised. Errors name the file and the tensor.
use anyhow::{bail, Context, Result};
use memmap2::{Mmap, UncheckedAdvice};
use safetensors::{tensor::Metadata, Dtype, SafeTensors};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tch::{nn, Device, Kind, Tensor};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    header_len: usize,
    metadata: Metadata,
}

/// All safetensors files of a checkpoint, memory-mapped; tensors are copied out on request.
pub struct SafetensorsFiles {
    files: Vec<MappedFile>,
    /// tensor name -> index into `files`
    location: HashMap<String, usize>,
}

impl SafetensorsFiles {
    /// Opens `dir/model.safetensors`, or the shards listed in `dir/model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join(INDEX_FILE);
        let single = dir.join(SINGLE_FILE);
        if index.exists() {
            Self::open_index(&index)
        } else if single.exists() {
            Self::open_files(&[single])
        } else {
            bail!("{}: no {SINGLE_FILE} or {INDEX_FILE} found", dir.display())
        }
    }

    fn open_index(index: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index).with_context(|| format!("cannot read {}", index.display()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", index.display()))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{}: field `weight_map` missing or not an object", index.display()))?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut names: BTreeSet<&str> = BTreeSet::new();
        for (tensor, file) in map {
            let file = file
                .as_str()
                .with_context(|| format!("{}: weight_map[{tensor:?}] is not a file name", index.display()))?;
            crate::files::check_plain_name(file)
                .with_context(|| format!("{}: weight_map[{tensor:?}]", index.display()))?;
            names.insert(file);
        }
        let paths: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
        let files = Self::open_files(&paths)?;
        for (tensor, file) in map {
            let listed = dir.join(file.as_str().unwrap_or_default());
            match files.location.get(tensor) {
                Some(&i) if files.files[i].path == listed => {}
                Some(&i) => bail!(
                    "{}: lists {tensor} in {} but it is in {}",
                    index.display(),
                    listed.display(),
                    files.files[i].path.display()
                ),
                None => {
                    bail!("{}: lists {tensor} in {} but that file does not hold it", index.display(), listed.display())
                }
            }
        }
        Ok(files)
    }

    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut location = HashMap::new();
        for path in paths {
            let file =
                std::fs::File::open(path).with_context(|| format!("cannot open weights file {}", path.display()))?;
            // SAFETY: the mapping is read-only; a checkpoint modified while we read it is
            // a user error that can at worst produce wrong values, as with any reader.
            let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
            let (header_len, metadata) = SafeTensors::read_metadata(&mmap)
                .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e}", path.display()))?;
            for name in metadata.tensors().keys() {
                if let Some(prev) = location.insert(name.clone(), files.len()) {
                    let prev: &MappedFile = &files[prev];
                    bail!("tensor {name} appears in both {} and {}", prev.path.display(), path.display());
                }
            }
            files.push(MappedFile { path: path.clone(), mmap, header_len, metadata });
        }
        Ok(SafetensorsFiles { files, location })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.location.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    /// Which file holds `name` (for error messages).
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.location.get(name).map(|&i| self.files[i].path.as_path())
    }

    /// Copies tensor `name` out of the file as a CPU tensor of its stored dtype.
    pub fn load(&self, name: &str) -> Result<Tensor> {
        let &i = self.location.get(name).with_context(|| format!("tensor {name} not found"))?;
        let file = &self.files[i];
        let info = file.metadata.info(name).expect("indexed tensor has metadata");
        let kind = kind_of(info.dtype).with_context(|| format!("{}: tensor {name}", file.path.display()))?;
        let start = 8 + file.header_len + info.data_offsets.0;
        let end = 8 + file.header_len + info.data_offsets.1;
        let bytes = file
            .mmap
            .get(start..end)
            .with_context(|| format!("{}: tensor {name} lies past the end of the file", file.path.display()))?;
        let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        let tensor = Tensor::f_from_data_size(bytes, &shape, kind)
            .with_context(|| format!("{}: tensor {name} cannot be read", file.path.display()))?;
        // The copy is all that is needed: unmap the pages read, or the process holds the
        // weights twice until the files are closed (a 1.7B float32 teacher's precompute
        // peaked at 13.1 GiB against transformers' 9.4). Advice only: a failure costs
        // memory, never data.
        // SAFETY: the mapping is read-only and file-backed, so dropped pages are read
        // from the file again if touched (a tied weight read twice); `bytes` is not used
        // past this point.
        let _ = unsafe { file.mmap.unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start) };
        Ok(tensor)
    }

    pub fn shape(&self, name: &str) -> Option<Vec<i64>> {
        let &i = self.location.get(name)?;
        let info = self.files[i].metadata.info(name)?;
        Some(info.shape.iter().map(|&d| d as i64).collect())
    }
}

pub fn kind_of(dtype: Dtype) -> Result<Kind> {
    Ok(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        other => bail!("dtype {other:?} is not a supported weight type (float32, bfloat16, float16)"),
    })
}

pub fn dtype_of(kind: Kind) -> Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Uint8 => Dtype::U8,
        other => bail!("cannot store tensors of kind {other:?}"),
    })
}

/// How a fresh parameter is initialised when no checkpoint provides it.
#[derive(Debug, Clone, Copy)]
pub enum Init {
    /// normal(0, std): linear and embedding weights (transformers' `_init_weights`).
    Normal,
    Ones,
    Zeros,
}

/// Where parameter values come from. `renames`: (our prefix, the checkpoint's), for a
/// model stored under other names (the text part of a multimodal checkpoint).
pub enum ParamSource<'a> {
    Checkpoint { files: &'a SafetensorsFiles, used: Mutex<BTreeSet<String>>, renames: Vec<(String, String)> },
    Random { std: f64 },
}

impl<'a> ParamSource<'a> {
    pub fn checkpoint(files: &'a SafetensorsFiles, renames: Vec<(String, String)>) -> Self {
        ParamSource::Checkpoint { files, used: Mutex::new(BTreeSet::new()), renames }
    }

    /// The checkpoint's name of our parameter `name`.
    pub fn stored_name(&self, name: &str) -> String {
        if let ParamSource::Checkpoint { renames, .. } = self {
            for (ours, theirs) in renames {
                if let Some(rest) = name.strip_prefix(ours.as_str()) {
                    return format!("{theirs}{rest}");
                }
            }
        }
        name.to_string()
    }
}

/// Creates named parameters in a VarStore, candle-style: `vb.pp("mlp").get(..)`.
pub struct VarBuilder<'a> {
    path: nn::Path<'a>,
    source: &'a ParamSource<'a>,
    kind: Kind,
    /// Where parameters go; differs from the VarStore's device for a model split by layers.
    device: Device,
}

impl<'a> VarBuilder<'a> {
    pub fn new(vs: &'a nn::VarStore, source: &'a ParamSource<'a>, kind: Kind) -> Self {
        VarBuilder { path: vs.root(), source, kind, device: vs.device() }
    }

    pub fn pp<S: ToString>(&self, name: S) -> VarBuilder<'a> {
        VarBuilder { path: self.path.sub(name), source: self.source, kind: self.kind, device: self.device }
    }

    /// The same builder placing parameters on `device`.
    pub fn on(&self, device: Device) -> VarBuilder<'a> {
        VarBuilder { path: self.path.clone(), device, ..*self }
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The parameter `name` of shape `shape`, trainable, in this builder's kind and device.
    pub fn get(&self, name: &str, shape: &[i64], init: Init) -> Result<Tensor> {
        let ours = self.path.path(name);
        let device = self.device();
        let t = match self.source {
            ParamSource::Checkpoint { files, used, .. } => {
                let full = self.source.stored_name(&ours);
                let Some(file) = files.file_of(&full) else {
                    bail!("missing weight {full}: no safetensors file of the model holds it");
                };
                let stored_shape = files.shape(&full).unwrap_or_default();
                if stored_shape != shape {
                    bail!(
                        "{}: tensor {full} has shape {stored_shape:?} but config.json implies {shape:?}",
                        file.display()
                    );
                }
                used.lock().unwrap().insert(full.clone());
                // Convert on whichever side moves fewer bytes between host and device.
                let stored = files.load(&full)?;
                if stored.kind().elt_size_in_bytes() > self.kind.elt_size_in_bytes() {
                    stored.to_kind(self.kind).to_device(device)
                } else {
                    stored.to_device(device).to_kind(self.kind)
                }
            }
            ParamSource::Random { std } => match init {
                Init::Normal => Tensor::randn(shape, (Kind::Float, device)) * *std,
                Init::Ones => Tensor::ones(shape, (Kind::Float, device)),
                Init::Zeros => Tensor::zeros(shape, (Kind::Float, device)),
            }
            .to_kind(self.kind),
        };
        Ok(self.path.add(name, t, true))
    }
}

impl ParamSource<'_> {
    /// Tensors of the checkpoint that no parameter took, for the unused-weights check.
    pub fn unused(&self) -> Vec<String> {
        match self {
            ParamSource::Checkpoint { files, used, .. } => {
                let used = used.lock().unwrap();
                let mut unused: Vec<String> = files.names().filter(|n| !used.contains(*n)).map(String::from).collect();
                unused.sort();
                unused
            }
            ParamSource::Random { .. } => vec![],
        }
    }
}
