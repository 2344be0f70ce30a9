//! Tokenizer and chat template against transformers' tokenizer and apply_chat_template:
//! same text, same ids; the loss mask covers exactly the assistant replies.
mod common;
use common::*;
use distill::chat::ChatTemplate;
use distill::dataset::Example;
use distill::tokenizer::TextTokenizer;
use serde_json::json;

fn conversation() -> Vec<serde_json::Value> {
    vec![
        json!({"role": "system", "content": "You answer in one sentence."}),
        json!({"role": "user", "content": "Who ran close by Alice?"}),
        json!({"role": "assistant", "content": "A White Rabbit with pink eyes."}),
        json!({"role": "user", "content": "What did it take out of its pocket?"}),
        json!({"role": "assistant", "content": "A watch, and then it hurried on."}),
    ]
}

/// qwen3 keeps its template in chat_template.jinja, llama in tokenizer_config.json.
fn check(name: &str) {
    let dir = model_dir(name);
    let tokenizer = TextTokenizer::from_dir(&dir).unwrap();
    let template = ChatTemplate::load(&dir).unwrap().expect("tiny models have a chat template");
    let messages = conversation();
    let work = tempfile::tempdir().unwrap();
    let (msgs, out) = (work.path().join("m.json"), work.path().join("out.json"));
    std::fs::write(&msgs, serde_json::to_string(&messages).unwrap()).unwrap();
    run_script(&["chat", dir.to_str().unwrap(), msgs.to_str().unwrap(), out.to_str().unwrap()]);
    let hf: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();

    let rendered = template.render(&messages, false).unwrap();
    assert_eq!(rendered, hf["text"].as_str().unwrap(), "{name}: chat template renders differently");
    let tokens = Example::Chat(messages).tokenize(&tokenizer, Some(&template)).unwrap();
    let hf_ids: Vec<u32> = serde_json::from_value(hf["ids"].clone()).unwrap();
    assert_eq!(tokens.ids, hf_ids, "{name}: chat token ids differ from transformers");

    let plain = tokenizer.encode("Alice was beginning to get very tired.", true).unwrap();
    let hf_plain: Vec<u32> = serde_json::from_value(hf["plain_ids"].clone()).unwrap();
    assert_eq!(plain, hf_plain, "{name}: plain-text ids (with BOS) differ from transformers");

    // The masked tokens are the two replies with their end-of-turn marker, nothing else.
    let mut trained = String::new();
    let mut runs = 0;
    for (i, (&id, &m)) in tokens.ids.iter().zip(&tokens.loss_mask).enumerate() {
        if m {
            if i == 0 || !tokens.loss_mask[i - 1] {
                runs += 1;
            }
            trained.push_str(&tokenizer.decode(&[id], false).unwrap());
        }
    }
    assert_eq!(runs, 2, "{name}: expected two masked runs");
    assert_eq!(
        trained, "A White Rabbit with pink eyes.<|im_end|>\nA watch, and then it hurried on.<|im_end|>\n",
        "{name}: wrong tokens in the loss mask"
    );
}

#[test]
fn chat_template_in_tokenizer_config_matches_transformers() {
    check("llama");
}

#[test]
fn chat_template_jinja_file_matches_transformers() {
    check("qwen3");
}

#[test]
fn rejected_role_is_an_error_naming_the_template() {
    let dir = model_dir("llama");
    let template = ChatTemplate::load(&dir).unwrap().unwrap();
    let e = template.render(&[json!({"role": "tool", "content": "x"})], false).unwrap_err().to_string();
    assert!(e.contains("tokenizer_config.json") && e.contains("Unknown role: tool"), "{e}");
}

#[test]
fn prompt_response_masks_only_the_response() {
    let dir = model_dir("llama");
    let tokenizer = TextTokenizer::from_dir(&dir).unwrap();
    let ex = Example::PromptResponse { prompt: "Call me".into(), response: " Ishmael.".into() };
    let t = ex.tokenize(&tokenizer, None).unwrap();
    let masked: Vec<u32> = t.ids.iter().zip(&t.loss_mask).filter(|(_, &m)| m).map(|(&i, _)| i).collect();
    assert_eq!(tokenizer.decode(&masked, false).unwrap(), " Ishmael.");
    assert!(!t.loss_mask[0], "BOS is not a target");
}
