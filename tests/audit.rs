//! The fidelity audit precompute writes into the manifest equals a float64 computation
//! from transformers' full logits, read back with pyarrow (shards/audit.rs defines it).
mod common;

use common::*;

const REFERENCE: &str = r#"
import json, sys, math
import pyarrow.parquet as pq, torch, transformers
shards, model_dir, stride = sys.argv[1], sys.argv[2], 32  # shards::audit::AUDIT_STRIDE
m = json.load(open(f"{shards}/manifest.json"))
vocab = m["settings"]["tokenizer"]["vocab_size"]
temps = [t["temperature"] for t in m["audit"]["tempered"]]
model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
kl = {t: [] for t in temps}; mass = {t: [] for t in temps}
stored_mass, outside = [], 0
for shard in m["shards"]:
    table = pq.read_table(f"{shards}/{shard['file']}").to_pylist()
    for row in table:
        assert row["doc_lengths"] == [len(row["input_ids"])], "one document per row"
        with torch.no_grad():
            z = model(torch.tensor([row["input_ids"]])).logits[0, :, :vocab].double()
        targets = [t for t in range(1, len(row["input_ids"])) if row["loss_mask"][t]]
        for n, t in enumerate(targets):
            ids, lps = row["topk_ids"][n], row["topk_logprobs"][n]
            stored_mass.append(sum(math.exp(x) for x in lps))
            outside += row["input_ids"][t] not in ids
            if n % stride:
                continue
            listed = torch.zeros(vocab, dtype=torch.bool); listed[list(ids)] = True
            logp1 = torch.log_softmax(z[t - 1], -1)
            log_r = torch.logsumexp(logp1[~listed], 0)
            log_pmin = logp1[listed].min()
            for T in temps:
                logpt = torch.log_softmax(z[t - 1] / T, -1); pt = logpt.exp()
                w_tail = log_r + (1 / T - 1) * log_pmin
                norm = torch.logaddexp(torch.logsumexp(logp1[listed] / T, 0), w_tail)
                q = torch.where(listed, logp1 / T - norm, w_tail - norm - math.log(vocab - int(listed.sum())))
                kl[T].append(float((pt * (logpt - q)).sum())); mass[T].append(float(pt[listed].sum()))
a = m["audit"]
checks = [(a["retained_mass_mean"], sum(stored_mass) / len(stored_mass), 1e-6, "stored mass"),
          (a["label_outside_share"], outside / len(stored_mass), 1e-12, "label outside")]
for e in a["tempered"]:
    T = e["temperature"]
    assert e["positions"] == len(kl[T]), (e, len(kl[T]))
    checks.append((e["truncation_kl_mean"], sum(kl[T]) / len(kl[T]), 1e-4, f"KL at T={T}"))
    checks.append((e["retained_mass_mean"], sum(mass[T]) / len(mass[T]), 1e-4, f"mass at T={T}"))
for got, want, tol, what in checks:
    print(f"{what}: {got:.6f} vs float64 {want:.6f}")
    assert abs(got - want) <= tol, (what, got, want)
"#;

#[test]
fn audit_equals_a_float64_reference() {
    let work = tempfile::tempdir().unwrap();
    for (model, extra) in [
        ("llama", &["--top-k", "8", "--sample", "0", "--audit-temperatures", "2,4"][..]),
        // Mass-adaptive lists (the kept ids only), and a padded vocabulary.
        ("qwen2", &["--top-k", "8", "--top-p", "0.1", "--min-k", "2", "--audit-temperatures", "0.5,2"][..]),
    ] {
        let out = work.path().join(model);
        let printed = ok(precompute(model, &sample(), &out, extra));
        assert!(printed.contains("truncation KL"), "{printed}");
        let m = manifest(&out);
        let temps: Vec<f64> =
            m["audit"]["tempered"].as_array().unwrap().iter().map(|t| t["temperature"].as_f64().unwrap()).collect();
        assert_eq!(temps.len(), 3, "T = 1 and the two asked for: {temps:?}");
        python_ok(REFERENCE, &[&out, &model_dir(model)]);
        let inspect = ok(distill(&["inspect", out.to_str().unwrap()]));
        assert!(inspect.contains("audit") && inspect.contains("T = 2: truncation KL"), "{inspect}");
    }
}
