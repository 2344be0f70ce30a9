//! The Arrow schema of a shard, built from the capture settings. The same columns are
//! described for people in schemas/shards.md and for machines in
//! schemas/shard.schema.json; a test checks written files against the latter.
use arrow::datatypes::{DataType, Field, Schema};
use std::sync::Arc;

pub const FORMAT_NAME: &str = "distill-shards";
/// The version this distill writes for a shard set with tail draws or without top-k
/// columns; a set with neither is written as version 1, which every version reads.
pub const FORMAT_VERSION: u32 = 2;
/// Versions this distill reads.
pub const READABLE_VERSIONS: [u32; 2] = [1, 2];
/// Parquet key-value metadata keys.
pub const META_FORMAT: &str = "distill.format";
pub const META_VERSION: &str = "distill.format_version";
pub const META_SETTINGS: &str = "distill.settings";

/// Token ids are stored in the narrowest type that holds the vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdType {
    Uint16,
    Int32,
}

impl IdType {
    pub fn for_vocab(vocab: usize) -> Self {
        if vocab <= 1 << 16 {
            IdType::Uint16
        } else {
            IdType::Int32
        }
    }

    pub fn data_type(self) -> DataType {
        match self {
            IdType::Uint16 => DataType::UInt16,
            IdType::Int32 => DataType::Int32,
        }
    }
}

/// What varies between shard sets: k, the id type, tail draws, and the captured layers'
/// widths.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardLayout {
    /// 0: no top-k columns (the targets are draws alone).
    pub top_k: usize,
    /// The `draw_ids` and `draw_counts` columns are present.
    pub draws: bool,
    /// Mass-adaptive top-k: the top-k columns hold lists of 1..=k entries per position.
    pub adaptive: bool,
    /// The `sampler_logprob` column is present (rows sampled from a model).
    pub sampler_logprobs: bool,
    /// Cross-tokenizer set: the `uld_logprobs` ([top_k + 1] per target) and
    /// `group_continues` columns are present.
    pub uld: bool,
    pub id_type: IdType,
    /// (layer number, width) of each captured hidden state.
    pub hidden: Vec<(usize, usize)>,
}

/// Column names, defined once for the writer, the reader and the documentation tests.
pub mod columns {
    pub const ROW_INDEX: &str = "row_index";
    pub const SAMPLE_IDS: &str = "sample_ids";
    pub const DOC_LENGTHS: &str = "doc_lengths";
    pub const NUM_TOKENS: &str = "num_tokens";
    pub const NUM_TARGETS: &str = "num_targets";
    pub const INPUT_IDS: &str = "input_ids";
    pub const LOSS_MASK: &str = "loss_mask";
    pub const TOPK_IDS: &str = "topk_ids";
    pub const TOPK_LOGPROBS: &str = "topk_logprobs";
    pub const TAIL_LOGMASS: &str = "tail_logmass";
    pub const TARGET_LOGPROB: &str = "target_logprob";
    pub const DRAW_IDS: &str = "draw_ids";
    pub const DRAW_COUNTS: &str = "draw_counts";
    pub const SAMPLER_LOGPROB: &str = "sampler_logprob";
    pub const ULD_LOGPROBS: &str = "uld_logprobs";
    pub const GROUP_CONTINUES: &str = "group_continues";
}

pub fn hidden_column(layer: usize) -> String {
    format!("hidden_{layer}")
}

pub fn hidden_rms_column(layer: usize) -> String {
    format!("hidden_{layer}_rms")
}

fn list_of(item: DataType) -> DataType {
    DataType::List(Arc::new(Field::new("item", item, false)))
}

fn fixed_list_of(item: DataType, n: usize) -> DataType {
    DataType::FixedSizeList(Arc::new(Field::new("item", item, false)), n as i32)
}

impl ShardLayout {
    /// The format version a set of this layout is written as.
    pub fn format_version(&self) -> u32 {
        if self.draws || self.adaptive || self.top_k == 0 || self.sampler_logprobs || self.uld {
            FORMAT_VERSION
        } else {
            1
        }
    }

    pub fn arrow_schema(&self) -> Schema {
        use columns::*;
        let mut fields = vec![
            Field::new(ROW_INDEX, DataType::UInt64, false),
            Field::new(SAMPLE_IDS, list_of(DataType::Utf8), false),
            Field::new(DOC_LENGTHS, list_of(DataType::Int32), false),
            Field::new(NUM_TOKENS, DataType::Int32, false),
            Field::new(NUM_TARGETS, DataType::Int32, false),
            Field::new(INPUT_IDS, list_of(DataType::Int32), false),
            Field::new(LOSS_MASK, list_of(DataType::Boolean), false),
        ];
        if self.top_k > 0 {
            let per_position = |item: DataType| match self.adaptive {
                true => list_of(item),
                false => fixed_list_of(item, self.top_k),
            };
            fields.push(Field::new(TOPK_IDS, list_of(per_position(self.id_type.data_type())), false));
            fields.push(Field::new(TOPK_LOGPROBS, list_of(per_position(DataType::Float16)), false));
        }
        fields.push(Field::new(TAIL_LOGMASS, list_of(DataType::Float32), false));
        fields.push(Field::new(TARGET_LOGPROB, list_of(DataType::Float32), false));
        if self.draws {
            fields.push(Field::new(DRAW_IDS, list_of(list_of(self.id_type.data_type())), false));
            fields.push(Field::new(DRAW_COUNTS, list_of(list_of(DataType::UInt8)), false));
        }
        if self.sampler_logprobs {
            // Null for a row of fixed data mixed into a round of samples.
            fields.push(Field::new(SAMPLER_LOGPROB, list_of(DataType::Float32), true));
        }
        if self.uld {
            fields.push(Field::new(ULD_LOGPROBS, list_of(fixed_list_of(DataType::Float16, self.top_k + 1)), false));
            fields.push(Field::new(GROUP_CONTINUES, list_of(DataType::Boolean), false));
        }
        for &(layer, width) in &self.hidden {
            fields.push(Field::new(hidden_column(layer), list_of(fixed_list_of(DataType::Float16, width)), false));
            fields.push(Field::new(hidden_rms_column(layer), list_of(DataType::Float32), false));
        }
        Schema::new(fields)
    }
}
