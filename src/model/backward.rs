//! A training step's forward and backward through the body, optionally with activation
//! recomputation per layer: only each recomputed layer's input is kept during the forward
//! pass (no graph), and during backward each layer is run again with its graph, from the
//! last to the first, and backpropagated at once. Activation memory drops from every
//! layer's intermediates to one `[batch, seq, hidden]` tensor per layer plus one
//! layer's graph, for one extra forward pass. Recomputing only the first `k` layers
//! (Megatron's `--recompute-num-layers`) keeps the others' graphs from the forward pass:
//! memory and time in between, in proportion. tch has no custom autograd functions, so
//! the chain rule across layers is applied here: a layer's output gradient enters its
//! recomputed graph as the surrogate `sum(output * gradient)`. Either way, in a step's
//! first micro-batch, the embeddings' output is a leaf whose gradient is added into the
//! embedding matrix's row by row (`Transformer::embed_backward`).
use anyhow::Result;
use tch::{Kind, Tensor};

use super::moe::RouterBalance;
use super::transformer::{ForwardInput, Transformer};

/// Loss terms a step attaches to the body's outputs; each returns a scalar to backpropagate.
pub trait StepLosses {
    /// The loss on the final (normed) hidden states `[batch, seq, hidden]`.
    fn on_last(&mut self, last: &Tensor) -> Result<Tensor>;
    /// The loss on captured hidden state `capture[slot]` (transformers' numbering).
    fn on_captured(&mut self, slot: usize, state: &Tensor) -> Result<Tensor>;
    /// Weight of the routers' load-balancing loss (`moe::RouterBalance`) in this pass;
    /// 0 leaves it out.
    fn router_balance_weight(&self) -> f64 {
        0.0
    }
    /// The pass's load-balancing loss, unweighted (for the log).
    fn on_router_balance(&mut self, _loss: f64) {}
    /// Whether the parameters' gradients hold nothing of this step yet (the step's first
    /// micro-batch): the embedding matrix's may then be written in place (see
    /// `Transformer::embeds_in_place`).
    fn fresh_gradients(&self) -> bool {
        false
    }
}

impl Transformer {
    /// Forward, losses and backward: parameter gradients accumulate in `.grad()`. The
    /// first `recompute` layers (all of them for `usize::MAX`) are recomputed during
    /// backward; 0 keeps one graph of the whole body.
    pub fn forward_backward(
        &self,
        input: &ForwardInput,
        capture: &[usize],
        recompute: usize,
        losses: &mut dyn StepLosses,
    ) -> Result<()> {
        let weight = losses.router_balance_weight();
        let balance = weight > 0.0 && self.has_experts();
        // Built only for the balance loss (no work per micro-batch without it).
        let real = if balance { real_tokens(input) } else { Tensor::new() };
        if recompute == 0 {
            self.record_routing(balance);
            let in_place = self.embeds_in_place(losses.fresh_gradients());
            let embedded = if in_place { self.embed_leaf(input.input_ids) } else { self.embed(input.input_ids) };
            let out = self.forward_from(embedded.shallow_clone(), input, capture);
            let records = self.take_routing();
            self.record_routing(false);
            let out = out?;
            let mut total = losses.on_last(&out.last)?;
            for (slot, state) in out.captured.iter().enumerate() {
                total = total.g_add(&losses.on_captured(slot, state)?.to_device(total.device()));
            }
            if let Some(b) = RouterBalance::new(&records, &real) {
                let loss = records
                    .iter()
                    .map(|r| b.term(r, &real).to_device(total.device()))
                    .fold(total.zeros_like(), |a, t| a + t);
                losses.on_router_balance(loss.double_value(&[]));
                total = total.g_add(&(loss * weight));
            }
            total.backward();
            if in_place {
                self.embed_backward(input.input_ids, &grad_or_zeros(&embedded));
            }
            return Ok(());
        }
        let n = self.check_capture(capture)?;
        let recomputed = recompute.min(n);
        let slots_at = |index: usize| capture.iter().enumerate().filter(move |(_, &c)| c == index).map(|(s, _)| s);
        // Forward, keeping each layer's input; without a graph for the recomputed layers,
        // with one (cut at the layer's input) for the others. The routers' choices of
        // every layer are counted: the load-balancing terms need all of them.
        self.record_routing(balance);
        let forward = (|| -> Result<_> {
            let x = tch::no_grad(|| self.embed(input.input_ids));
            let mut ctx = tch::no_grad(|| self.layer_context(input, x.kind()))?;
            let mut inputs = vec![x];
            let mut graphs = vec![];
            let mut routing = vec![];
            for i in 0..n {
                let next = if i < recomputed {
                    tch::no_grad(|| self.layer_forward(i, &inputs[i], &mut ctx))
                } else {
                    let x = inputs[i].detach().set_requires_grad(true);
                    let out = self.layer_forward(i, &x, &mut ctx);
                    let next = out.detach();
                    graphs.push((x, out));
                    next
                };
                routing.push(self.take_routing());
                inputs.push(next);
            }
            Ok((inputs, ctx, graphs, routing))
        })();
        let (mut inputs, mut ctx, mut graphs, mut routing) = forward.inspect_err(|_| self.record_routing(false))?;
        let router_balance = RouterBalance::new(routing.iter().flatten(), &real);
        if let Some(b) = &router_balance {
            losses.on_router_balance(routing.iter().flatten().map(|r| b.term(r, &real).double_value(&[])).sum());
        }
        // A recomputed layer's terms come from its recomputation: these were for the count.
        routing[..recomputed].iter_mut().for_each(Vec::clear);
        // The head and every loss on the final hidden state.
        let top = inputs.pop().expect("n + 1 inputs").detach().set_requires_grad(true);
        let last = self.final_norm(&top);
        let mut total = losses.on_last(&last)?;
        for slot in slots_at(n) {
            total = total.g_add(&losses.on_captured(slot, &last)?);
        }
        total.backward();
        let mut grad = grad_or_zeros(&top);
        // Each layer, last to first: its graph from the forward pass, or run again.
        for i in (0..n).rev() {
            let input = inputs.pop().expect("one input per layer");
            let (x, out, records) = if i < recomputed {
                let x = input.detach().set_requires_grad(true);
                let out = self.layer_forward(i, &x, &mut ctx);
                (x, out, self.take_routing())
            } else {
                let (x, out) = graphs.pop().expect("one graph per kept layer");
                (x, out, std::mem::take(&mut routing[i]))
            };
            let mut total = (&out * grad.to_device(out.device())).sum(Kind::Float);
            if let Some(b) = &router_balance {
                for r in &records {
                    total = total.g_add(&(b.term(r, &real) * weight).to_device(total.device()));
                }
            }
            if i + 1 < n {
                for slot in slots_at(i + 1) {
                    total = total.g_add(&losses.on_captured(slot, &out)?.to_device(total.device()));
                }
            }
            total.backward();
            grad = grad_or_zeros(&x);
        }
        self.record_routing(false);
        // The embeddings: their lookup has the embedding matrix's gradient.
        let in_place = self.embeds_in_place(losses.fresh_gradients());
        let x = if in_place { self.embed_leaf(input.input_ids) } else { self.embed(input.input_ids) };
        let mut total = (&x * grad.to_device(x.device())).sum(Kind::Float);
        for slot in slots_at(0) {
            total = total.g_add(&losses.on_captured(slot, &x)?.to_device(total.device()));
        }
        if total.requires_grad() {
            total.backward();
        }
        if in_place {
            self.embed_backward(input.input_ids, &grad_or_zeros(&x));
        }
        Ok(())
    }
}

/// `[tokens]` float32: 1 for each real token of the input, 0 for padding.
fn real_tokens(input: &ForwardInput) -> Tensor {
    match input.attention_mask {
        Some(m) => m.reshape([-1]).ne(0).to_kind(Kind::Float),
        None => Tensor::ones([input.input_ids.numel() as i64], (Kind::Float, input.input_ids.device())),
    }
}

/// The gradient of a leaf (zeros when nothing downstream used it).
fn grad_or_zeros(leaf: &Tensor) -> Tensor {
    let g = leaf.grad();
    if g.defined() {
        g
    } else {
        leaf.zeros_like()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CausalLm, ModelConfig};
    use tch::Device;

    /// Squares of the final states plus fixed random projections of the captured ones
    /// (and, with experts, the routers' load-balancing loss at weight 0.5).
    struct Probe {
        weights: Vec<Tensor>,
        balance: Vec<f64>,
    }

    impl StepLosses for Probe {
        fn on_last(&mut self, last: &Tensor) -> Result<Tensor> {
            Ok(last.square().mean(Kind::Float))
        }
        fn on_captured(&mut self, slot: usize, state: &Tensor) -> Result<Tensor> {
            Ok((state * &self.weights[slot]).sum(Kind::Float))
        }
        fn router_balance_weight(&self) -> f64 {
            0.5
        }
        fn on_router_balance(&mut self, loss: f64) {
            self.balance.push(loss);
        }
    }

    #[test]
    fn recomputation_gives_the_gradients_of_one_graph() {
        let dense = serde_json::json!({
            "model_type": "qwen3", "vocab_size": 50, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
            "tie_word_embeddings": true,
        });
        let mut experts = dense.clone();
        let fields = serde_json::json!({"model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2,
            "moe_intermediate_size": 8, "mlp_only_layers": [1], "norm_topk_prob": true});
        experts.as_object_mut().unwrap().extend(fields.as_object().unwrap().clone());
        for config in [dense, experts] {
            same_gradients(ModelConfig::from_value(config).unwrap());
        }
    }

    fn same_gradients(config: ModelConfig) {
        let moe = config.moe.is_some();
        tch::manual_seed(3);
        let model = CausalLm::random(config, Device::Cpu, Kind::Float).unwrap();
        // 2 x 40 positions: more than `layers::FEW_ROWS`, so the training graph has the
        // fused norms and MLPs (`fused.rs`); the second row ends in padding.
        let ids = Tensor::randint(50, [2, 40], (Kind::Int64, Device::Cpu));
        let mask = Tensor::ones([2, 40], (Kind::Int64, Device::Cpu));
        let _ = mask.get(1).narrow(0, 33, 7).fill_(0);
        let input = ForwardInput::new(&ids, Some(&mask));
        // Hidden states 0 (embeddings), 2 (a middle layer) and 3 (final) twice.
        let capture = [0usize, 2, 3, 2];
        let weights = (0..capture.len()).map(|_| Tensor::randn([2, 40, 16], (Kind::Float, Device::Cpu))).collect();
        let mut probe = Probe { weights, balance: vec![] };
        let grads = |recompute: usize, probe: &mut Probe| -> Vec<Tensor> {
            let mut vars: Vec<(String, Tensor)> = model.vs.variables().into_iter().collect();
            vars.sort_by(|a, b| a.0.cmp(&b.0));
            for (_, v) in &vars {
                let mut g = v.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
            model.transformer.forward_backward(&input, &capture, recompute, probe).unwrap();
            vars.iter().map(|(_, v)| v.grad().copy()).collect()
        };
        let plain = grads(0, &mut probe);
        // Every layer recomputed, the first one or two (the others keep their graphs),
        // and more than there are layers.
        let counts = [usize::MAX, 1, 2, 3, 4];
        for &k in &counts {
            let recomputed = grads(k, &mut probe);
            assert_eq!(plain.len(), recomputed.len());
            for (a, b) in plain.iter().zip(&recomputed) {
                let scale = a.abs().max().double_value(&[]);
                assert!(scale > 0.0, "every parameter gets a gradient");
                let diff = (a - b).abs().max().double_value(&[]);
                assert!(diff <= 1e-5 * scale, "{k} recomputed: max |difference| {diff:e} vs max |gradient| {scale:e}");
            }
        }
        // The balance loss: reported once per pass, the same every way, > 0 with experts.
        if moe {
            assert_eq!(probe.balance.len(), 1 + counts.len());
            let first = probe.balance[0];
            assert!(first > 0.0 && probe.balance.iter().all(|b| (b - first).abs() < 1e-6 * first));
        } else {
            assert!(probe.balance.is_empty());
        }
    }
}
