//! Data: tokenization and chat templates against transformers (tests/fixtures/tokenizer,
//! made by tests/fixtures/make_tokenizer_fixtures.py), formats, masking, truncation, packing and
//! bad input.

use std::path::PathBuf;

use qlora_rs::data::formats::{Example, Format, Message};
use qlora_rs::data::tokenizer::TextTokenizer;
use qlora_rs::data::{self, DataOptions, Sequence};
use serde_json::Value;

fn fixtures(p: &str) -> PathBuf {
    qlora_rs::testing::project_root()
        .join("tests/fixtures")
        .join(p)
}

fn golden() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures("tokenizer/golden.json")).unwrap())
        .unwrap()
}

fn tok(dir: &str) -> TextTokenizer {
    TextTokenizer::load(&fixtures(dir)).unwrap()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn messages(v: &Value) -> Vec<Message> {
    serde_json::from_value::<Vec<serde_json::Map<String, Value>>>(v.clone())
        .unwrap()
        .into_iter()
        .map(|m| Message {
            role: m["role"].as_str().unwrap().into(),
            content: m["content"].as_str().unwrap().into(),
        })
        .collect()
}

#[test]
fn tokenizer_encodes_and_decodes_like_transformers() {
    let g = golden();
    let t = tok("llama/tiny-llama");
    assert_eq!(t.vocab_size(), 211);
    assert_eq!(t.eos_token.as_deref(), Some("<|im_end|>"));
    assert_eq!(t.eos_id, Some(2));
    for case in g["encode"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            t.encode(text, false).unwrap().0,
            u32s(&case["ids"]),
            "{text:?}"
        );
        assert_eq!(
            t.encode(text, true).unwrap().0,
            u32s(&case["ids_add_special_tokens"]),
            "{text:?}"
        );
    }
    for case in g["decode"].as_array().unwrap() {
        let ids = u32s(&case["ids"]);
        assert_eq!(
            t.decode(&ids, false).unwrap(),
            case["text"].as_str().unwrap()
        );
        assert_eq!(
            t.decode(&ids, true).unwrap(),
            case["text_skip_special_tokens"].as_str().unwrap()
        );
    }
}

#[test]
fn chat_templates_render_like_transformers_with_assistant_masks() {
    let g = golden();
    for (model, dir) in [
        ("tiny-llama", "llama/tiny-llama"),
        ("tiny-qwen2", "llama/tiny-qwen2"),
        ("tiny-llama", "tokenizer/jinja-template"),
    ] {
        let t = tok(dir);
        let template = t
            .chat_template
            .as_ref()
            .unwrap_or_else(|| panic!("{dir}: no chat template"));
        for case in g["chat"][model].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let msgs = messages(&case["messages"]);
            let add = case["add_generation_prompt"].as_bool().unwrap();
            let rendered = template.render(&msgs, add).unwrap();
            assert_eq!(rendered, case["rendered"].as_str().unwrap(), "{dir} {name}");
            assert_eq!(
                t.encode(&rendered, false).unwrap().0,
                u32s(&case["ids"]),
                "{dir} {name}"
            );
            if add || !msgs.iter().any(|m| m.role == "assistant") {
                continue;
            }
            let (text, spans) = template.render_with_assistant_spans(&msgs).unwrap();
            assert_eq!(text, rendered);
            let want_spans: Vec<(usize, usize)> = case["assistant_spans_bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| {
                    (
                        s[0].as_u64().unwrap() as usize,
                        s[1].as_u64().unwrap() as usize,
                    )
                })
                .collect();
            assert_eq!(spans, want_spans, "{dir} {name}");
            let (_, train) = data::tokenize(&t, &Example::Chat(msgs.clone()), false).unwrap();
            let mask: Vec<bool> = case["assistant_mask_overlap"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64() == Some(1))
                .collect();
            assert_eq!(train, mask, "{dir} {name}");
        }
    }
    let r = &g["raise_exception"];
    let err = tok("llama/tiny-qwen2")
        .chat_template
        .unwrap()
        .render(&messages(&r["messages"]), false)
        .unwrap_err()
        .to_string();
    assert!(err.contains(r["message"].as_str().unwrap()), "{err}");
}

fn opts(format: Option<Format>, seq_len: usize) -> DataOptions {
    DataOptions {
        format,
        seq_len,
        train_on_prompt: false,
    }
}

fn load(file: &str, o: &DataOptions) -> qlora_rs::Result<(Vec<Sequence>, data::DataStats)> {
    data::load(
        &fixtures(&format!("data/{file}")),
        &tok("llama/tiny-llama"),
        o,
    )
}

#[test]
fn every_format_loads_with_the_right_loss_mask() {
    let t = tok("llama/tiny-llama");
    for file in [
        "text.jsonl",
        "prompt_completion.jsonl",
        "messages.jsonl",
        "alpaca.json",
        "sharegpt.jsonl",
    ] {
        let (seqs, stats) = load(file, &opts(None, 512)).unwrap();
        assert_eq!(seqs.len(), stats.records, "{file}");
        assert_eq!(stats.truncated, 0);
        for s in &seqs {
            assert_eq!(s.ids.len(), s.labels.len());
            assert!(s.counted() > 0);
            // Trained tokens are the tokens themselves.
            assert!(s
                .ids
                .iter()
                .zip(&s.labels)
                .all(|(&i, &l)| l == -100 || l == i as i64));
        }
        let first = &seqs[0];
        match file {
            // Everything trained, EOS appended.
            "text.jsonl" => {
                assert!(first.labels.iter().all(|&l| l != -100));
                assert_eq!(*first.ids.last().unwrap(), 2);
            }
            // Only the completion (and EOS).
            "prompt_completion.jsonl" => {
                let prompt = t
                    .encode("What is the capital of France?", true)
                    .unwrap()
                    .0
                    .len();
                assert!(first.labels[..prompt].iter().all(|&l| l == -100));
                assert!(first.labels[prompt..].iter().all(|&l| l != -100));
            }
            // Assistant turns only: the text trained on decodes to the answers and end markers.
            _ => {
                let trained: Vec<u32> = first
                    .ids
                    .iter()
                    .zip(&first.labels)
                    .filter(|(_, &l)| l != -100)
                    .map(|(&i, _)| i)
                    .collect();
                let text = t.decode(&trained, false).unwrap();
                assert!(text.contains("<|im_end|>"), "{file}: {text:?}");
                assert!(!text.contains("user"), "{file}: {text:?}");
            }
        }
    }
    // --train-on-prompt trains on everything.
    let mut o = opts(None, 512);
    o.train_on_prompt = true;
    let (seqs, _) = load("messages.jsonl", &o).unwrap();
    assert!(seqs.iter().all(|s| s.labels.iter().all(|&l| l != -100)));
}

#[test]
fn truncation_keeps_the_start_and_is_counted() {
    let (full, _) = load("text.jsonl", &opts(None, 512)).unwrap();
    let (cut, stats) = load("text.jsonl", &opts(None, 8)).unwrap();
    let longer = full.iter().filter(|s| s.ids.len() > 8).count();
    assert_eq!(stats.truncated, longer);
    assert!(longer > 0);
    for (a, b) in full.iter().zip(&cut) {
        assert_eq!(&a.ids[..b.ids.len()], b.ids.as_slice());
        assert!(b.ids.len() <= 8);
    }
}

#[test]
fn packing_fills_batches_and_keeps_sequences_whole() {
    let (seqs, _) = load("messages.jsonl", &opts(None, 512)).unwrap();
    let refs: Vec<&Sequence> = seqs.iter().collect();
    let budget = seqs.iter().map(|s| s.ids.len()).max().unwrap() + 10;
    let batches = data::pack(&refs, budget);
    assert!(batches.len() < seqs.len());
    let mut n = 0;
    for b in &batches {
        assert!(b.ids.len() <= budget);
        assert_eq!(*b.cu_seqlens.last().unwrap(), b.ids.len());
        for w in b.cu_seqlens.windows(2) {
            assert_eq!(b.ids[w[0]..w[1]], seqs[n].ids[..]);
            n += 1;
        }
    }
    assert_eq!(n, seqs.len());
    let total: usize = seqs.iter().map(|s| s.counted()).sum();
    assert_eq!(batches.iter().map(|b| b.counted()).sum::<usize>(), total);
    let o1 = data::epoch_order(10, 7, 0);
    assert_eq!(o1, data::epoch_order(10, 7, 0));
    assert_ne!(o1, data::epoch_order(10, 7, 1));
    let mut sorted = o1.clone();
    sorted.sort();
    assert_eq!(sorted, (0..10).collect::<Vec<_>>());
}

#[test]
fn bad_data_is_reported_with_file_line_and_keys() {
    let err = load("bad_line.jsonl", &opts(None, 512))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bad_line.jsonl") && err.contains("line 3") && err.contains("not valid JSON"),
        "{err}"
    );
    let err = load("missing_keys.jsonl", &opts(None, 512))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("missing_keys.jsonl")
            && err.contains("record 1 (line 2)")
            && err.contains("`prompt` and `completion`")
            && err.contains("answer, question"),
        "{err}"
    );
    // Forcing a format the records do not have.
    let err = load("text.jsonl", &opts(Some(Format::Alpaca), 512))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("record 0") && err.contains("`instruction` is missing"),
        "{err}"
    );
    // Nothing left to train on: the prompt fills the whole budget.
    let err = load("prompt_completion.jsonl", &opts(None, 3))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no record has a token left to train on") && err.contains("truncated"),
        "{err}"
    );
    let err = Format::parse("csv").unwrap_err().to_string();
    assert!(err.contains("unknown format `csv`"), "{err}");
}
