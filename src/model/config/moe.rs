//! The mixture-of-experts families' feed-forward settings (Qwen2-MoE, Qwen3-MoE, Mixtral).
use anyhow::{bail, Context, Result};

use super::families::Family;
use super::raw::RawConfig;

/// The mixture-of-experts feed-forward of a family that has one: a router picks
/// `experts_per_token` of `num_experts` gated MLPs per token (softmax over all experts in
/// float32, then top-k), their outputs summed with the router's probabilities.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub experts_per_token: usize,
    /// Width of each expert's MLP (`moe_intermediate_size`; Mixtral: `intermediate_size`).
    pub expert_intermediate_size: usize,
    /// Renormalise the chosen experts' probabilities to sum to one (Mixtral always).
    pub norm_topk_prob: bool,
    /// Qwen2-MoE: an always-on expert of this width, scaled by sigmoid(its own gate).
    pub shared_expert_intermediate_size: Option<usize>,
    /// Per layer: experts (true) or a dense MLP of `intermediate_size` (Qwen's
    /// `mlp_only_layers` and `decoder_sparse_step`).
    pub sparse_layers: Vec<bool>,
}

/// The mixture-of-experts settings of `family` (None for a dense family), as
/// transformers reads them.
pub(super) fn moe_config(cfg: &RawConfig, family: Family) -> Result<Option<MoeConfig>> {
    if !family.is_moe() {
        return Ok(None);
    }
    let n = cfg.num_hidden_layers;
    let num_experts = cfg.num_experts.or(cfg.num_local_experts).context("field `num_experts` is missing")?;
    let experts_per_token = cfg.num_experts_per_tok.context("field `num_experts_per_tok` is missing")?;
    if num_experts == 0 || experts_per_token == 0 || experts_per_token > num_experts {
        bail!("field `num_experts_per_tok`: {experts_per_token} must be between 1 and num_experts ({num_experts})");
    }
    let (expert_intermediate_size, norm_topk_prob, shared, sparse_layers) = match family {
        Family::Mixtral => (cfg.intermediate_size, true, None, vec![true; n]),
        _ => {
            let width = cfg.moe_intermediate_size.context("field `moe_intermediate_size` is missing")?;
            // At least 1, as the widths below (`raw::check_values`).
            let step = cfg.decoder_sparse_step.unwrap_or(1);
            let dense = cfg.mlp_only_layers.clone().unwrap_or_default();
            if let Some(&bad) = dense.iter().find(|&&l| l >= n) {
                bail!("field `mlp_only_layers`: layer {bad} does not exist ({n} layers)");
            }
            let sparse = (0..n).map(|i| !dense.contains(&i) && (i + 1) % step == 0).collect();
            let shared = match family {
                Family::Qwen2Moe => Some(
                    cfg.shared_expert_intermediate_size
                        .context("field `shared_expert_intermediate_size` is missing (Qwen2-MoE)")?,
                ),
                _ => None,
            };
            (width, cfg.norm_topk_prob.unwrap_or(false), shared, sparse)
        }
    };
    Ok(Some(MoeConfig {
        num_experts,
        experts_per_token,
        expert_intermediate_size,
        norm_topk_prob,
        shared_expert_intermediate_size: shared,
        sparse_layers,
    }))
}

#[cfg(test)]
mod tests {
    use super::super::tests::{base, err};
    use super::super::ModelConfig;
    use serde_json::json;

    #[test]
    fn mixture_of_experts_fields_follow_transformers() {
        let mut v = base();
        v["model_type"] = "qwen3_moe".into();
        v["num_experts"] = 8.into();
        v["num_experts_per_tok"] = 2.into();
        v["moe_intermediate_size"] = 16.into();
        v["num_hidden_layers"] = 4.into();
        v["decoder_sparse_step"] = 2.into();
        v["mlp_only_layers"] = json!([3]);
        let c = ModelConfig::from_value(v.clone()).unwrap();
        let moe = c.moe.clone().unwrap();
        assert_eq!(moe.sparse_layers, vec![false, true, false, false]);
        assert!(!moe.norm_topk_prob && c.qk_norm && moe.shared_expert_intermediate_size.is_none());
        // Written back as one explicit list, which transformers reads the same way.
        let again = ModelConfig::from_value(c.to_json("float32")).unwrap();
        assert_eq!(again.moe.unwrap().sparse_layers, moe.sparse_layers);
        // transformers 5 saves the count as num_local_experts.
        let o = v.as_object_mut().unwrap();
        o.remove("num_experts");
        o.insert("num_local_experts".into(), 8.into());
        assert_eq!(ModelConfig::from_value(v.clone()).unwrap().moe.unwrap().num_experts, 8);
        v["num_experts_per_tok"] = 9.into();
        assert!(err(v).contains("num_experts_per_tok"));

        let mut m = base();
        m["model_type"] = "mixtral".into();
        m["num_local_experts"] = 4.into();
        m["num_experts_per_tok"] = 2.into();
        m["sliding_window"] = 4.into();
        let c = ModelConfig::from_value(m).unwrap();
        let moe = c.moe.unwrap();
        assert!(moe.norm_topk_prob && moe.expert_intermediate_size == 64 && moe.sparse_layers == vec![true, true]);
        assert_eq!(c.sliding_windows, vec![Some(4), Some(4)]);

        let mut q = base();
        q["model_type"] = "qwen2_moe".into();
        q["num_experts"] = 4.into();
        q["num_experts_per_tok"] = 2.into();
        q["moe_intermediate_size"] = 16.into();
        // transformers 5 writes sliding_window 0 when no layer slides.
        q["sliding_window"] = 0.into();
        assert!(err(q.clone()).contains("shared_expert_intermediate_size"));
        q["shared_expert_intermediate_size"] = 24.into();
        let c = ModelConfig::from_value(q).unwrap();
        assert!(c.qkv_bias && c.sliding_windows == vec![None, None]);
        assert_eq!(c.moe.unwrap().shared_expert_intermediate_size, Some(24));
    }
}
