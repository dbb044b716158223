//! Data: tokenization and chat templates against transformers (tests/fixtures/tokenizer,
//! made by tests/fixtures/make_tokenizer_fixtures.py), formats, masking, truncation, packing and
//! bad input.

use std::path::{Path, PathBuf};

use qlora_rs::data::chat::{ChatTemplate, LocalTime};
use qlora_rs::data::formats::{ChatOptions, Example, Format, Message};
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
            let (_, train) = data::tokenize(&t, &Example::chat(&msgs), false).unwrap();
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
        skip_bad_records: false,
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

// ---- chat records of every kind, against tests/fixtures/chat/golden.json (made by
// tests/fixtures/make_chat_fixtures.py with transformers' apply_chat_template and TRL's masks) ----

mod gemma3_phi4;

/// tests/fixtures/chat/golden.json, parsed once for every test that reads it.
fn chat_golden() -> &'static Value {
    static GOLDEN: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    GOLDEN.get_or_init(|| {
        serde_json::from_str(&std::fs::read_to_string(fixtures("chat/golden.json")).unwrap())
            .unwrap()
    })
}

/// The golden case of `template` on `file` whose `chat_template_kwargs` are `kwargs` (JSON;
/// "null" for none).
fn golden_case(template: &str, file: &str, kwargs: &str) -> &'static Value {
    let kwargs: Value = serde_json::from_str(kwargs).unwrap();
    chat_golden()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["template"] == template && c["data"] == file && c["chat_template_kwargs"] == kwargs
        })
        .unwrap_or_else(|| panic!("no golden case for {template} {file} {kwargs}"))
}

/// The date make_chat_fixtures.py pins `strftime_now` to: 2025-03-07 14:05:09, a Friday.
fn fixed_now() -> LocalTime {
    LocalTime {
        year: 2025,
        month: 3,
        day: 7,
        hour: 14,
        minute: 5,
        second: 9,
        microsecond: 0,
        weekday: 5,
        yearday: 65,
    }
}

/// The tiny tokenizer with one of the real templates of tests/fixtures/chat/templates.
fn chat_tok(template: &str) -> TextTokenizer {
    let mut t = tok("llama/tiny-llama");
    let text =
        std::fs::read_to_string(fixtures(&format!("chat/templates/{template}.jinja"))).unwrap();
    let ct = ChatTemplate::new(&text, t.bos_token.clone(), t.eos_token.clone()).unwrap();
    ct.set_time(Some(fixed_now()));
    t.chat_template = Some(ct);
    t
}

fn chat_options(case: &Value) -> ChatOptions {
    let tools = case["tools_file"]
        .as_str()
        .map(|f| fixtures(&format!("chat/{f}")));
    let kwargs =
        (!case["chat_template_kwargs"].is_null()).then(|| case["chat_template_kwargs"].to_string());
    ChatOptions::parse(tools.as_deref(), kwargs.as_deref()).unwrap()
}

/// Every golden case on `file`: the ids and labels `data::load_records` gives (what training and
/// `qlora-rs data --json` use) equal transformers' rendering + tokenization and the reference
/// masks. Returns how many cases ran.
fn check_chat_cases(file: &str, template: Option<&str>) -> usize {
    let g = chat_golden();
    let mut n = 0;
    for case in g["cases"].as_array().unwrap() {
        let name = case["template"].as_str().unwrap();
        if case["data"] != file || template.is_some_and(|t| t != name) {
            continue;
        }
        let what = format!("{name} {file} {}", case["chat_template_kwargs"]);
        let t = chat_tok(name);
        let (seqs, stats) = data::load_records(
            &fixtures(&format!("chat/{file}")),
            &t,
            &opts(None, 4096),
            &chat_options(case),
        )
        .unwrap_or_else(|e| panic!("{what}: {e}"));
        let want = case["records"].as_array().unwrap();
        assert_eq!(seqs.len(), want.len(), "{what}");
        assert_eq!(stats.truncated, 0, "{what}");
        for ((i, s), w) in seqs.iter().zip(want) {
            let rendered = w["rendered"].as_str().unwrap();
            assert_eq!(*i as u64, w["record"].as_u64().unwrap(), "{what}");
            assert_eq!(
                s.ids,
                u32s(&w["ids"]),
                "{what}: record {i} ids; transformers renders\n{rendered}\nwe tokenized\n{}",
                t.decode(&s.ids, false).unwrap()
            );
            let labels: Vec<i64> = w["labels"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect();
            let shown = |l: &[i64]| {
                let trained: Vec<u32> = s
                    .ids
                    .iter()
                    .zip(l)
                    .filter(|(_, &l)| l != -100)
                    .map(|(&i, _)| i)
                    .collect();
                t.decode(&trained, false).unwrap()
            };
            assert_eq!(
                s.labels,
                labels,
                "{what}: record {i} labels ({}); want trained {:?}, got {:?}",
                w["mask_rule"],
                shown(&labels),
                shown(&s.labels)
            );
        }
        n += 1;
    }
    n
}

#[test]
fn content_parts_are_joined_like_transformers() {
    // SmolLM2, Qwen2.5, Qwen3 (also with enable_thinking false), Llama 3.2, Phi-3.5, Phi-3,
    // Gemma 3 (TRL's template, which takes a system message as a string) and Phi-4-mini.
    assert_eq!(check_chat_cases("parts.jsonl", None), 9);
}

#[test]
fn conversational_prompt_completion_trains_the_completion_like_trl() {
    // SmolLM2, Qwen2.5, Qwen3 (also with enable_thinking false), Phi-3.5, Phi-3, Gemma 3 (TRL's
    // template) and Phi-4-mini.
    assert_eq!(check_chat_cases("pc_chat.jsonl", None), 8);
}

#[test]
fn tool_calls_and_tool_results_render_like_transformers() {
    // Per-record tools (a list, or a JSON string of one), --tools for the record without,
    // content null beside tool_calls, arguments as an object and as a JSON string; Qwen2.5,
    // Qwen3 (also with enable_thinking false), Llama 3.1 and 3.2 (tools in the first user
    // message).
    assert_eq!(check_chat_cases("tools.jsonl", None), 5);
}

#[test]
fn reasoning_renders_like_transformers_and_qwen3_turns_are_located() {
    // reasoning_content, <think> in content, `reasoning` aliased, multi-turn Qwen3 (earlier
    // reasoning dropped: the prefix rule fails and each turn is located in the one rendering);
    // enable_thinking unset, false and true.
    assert_eq!(check_chat_cases("reasoning.jsonl", None), 3);
}

#[test]
fn qwen3_turns_are_trained_as_trl_trains_them_whatever_enable_thinking_says() {
    // Multi-turn Qwen3 (turns.jsonl: no reasoning, reasoning in the last turn only, in an earlier
    // turn only, a tool call with reasoning and <think> in content), with enable_thinking unset,
    // false and true. The references are TRL's assistant-only masks (generation markers after
    // the role header, checked by make_chat_fixtures.py against the training template that
    // SFTTrainer swaps in): the think block of a turn that shows one is trained, empty or not,
    // also where enable_thinking false puts `<think>\n\n</think>\n\n` into the generation prompt.
    assert_eq!(check_chat_cases("turns.jsonl", Some("qwen3")), 3);
    let case = |kw: &str| golden_case("qwen3", "turns.jsonl", kw);
    let (off, unset) = (case(r#"{"enable_thinking":false}"#), case("null"));
    // The same renderings and masks with the kwarg as without (the messages' renderings do not
    // read it; only the generation prompt does).
    assert_eq!(off["records"], unset["records"]);
    // Each turn's trained text starts right after `<|im_start|>assistant\n`.
    let t = chat_tok("qwen3");
    let (seqs, _) = data::load_records(
        &fixtures("chat/turns.jsonl"),
        &t,
        &opts(None, 4096),
        &chat_options(off),
    )
    .unwrap();
    let s = qlora_rs::data::preview::highlight(&t, &seqs[1].1, false).unwrap();
    assert!(
        s.ends_with(
            "<|im_start|>assistant\n[[<think>\nThree and three make six.\n</think>\n\n6<|im_end|>\n]]"
        ),
        "{s}"
    );
    let s = qlora_rs::data::preview::highlight(&t, &seqs[0].1, false).unwrap();
    assert!(
        s.contains("<|im_start|>assistant\n[[Hello! How can I help?<|im_end|>\n]]")
            && s.ends_with("<|im_start|>assistant\n[[<think>\n\n</think>\n\n7<|im_end|>\n]]"),
        "{s}"
    );
}

#[test]
fn single_turn_qwen3_trains_the_empty_think_block_with_enable_thinking_false() {
    // The prefix rule holds for these records (parts.jsonl: single-turn; weight.jsonl: the one
    // trained turn is the last), but with enable_thinking false Qwen3's generation prompt ends in
    // the turn's own empty think block; TRL trains it, so the turn starts right after
    // `<|im_start|>assistant\n` as it does without the kwarg.
    let case = |file: &str, kw: &str| golden_case("qwen3", file, kw);
    let (off, unset) = (
        case("parts.jsonl", r#"{"enable_thinking":false}"#),
        case("parts.jsonl", "null"),
    );
    for (a, b) in off["records"]
        .as_array()
        .unwrap()
        .iter()
        .zip(unset["records"].as_array().unwrap())
    {
        assert_eq!((&a["ids"], &a["labels"]), (&b["ids"], &b["labels"]));
    }
    let t = chat_tok("qwen3");
    for (file, record, want) in [
        ("parts.jsonl", 0, "The capital of France is Paris."),
        ("parts.jsonl", 1, "Leaves fall slowly."),
        ("weight.jsonl", 0, "The capital of France is Paris."),
    ] {
        let c = case(file, r#"{"enable_thinking":false}"#);
        assert_eq!(c["records"][record]["mask_rule"], "generation-tags");
        let (seqs, _) = data::load_records(
            &fixtures(&format!("chat/{file}")),
            &t,
            &opts(None, 4096),
            &chat_options(c),
        )
        .unwrap();
        let s = qlora_rs::data::preview::highlight(&t, &seqs[record].1, false).unwrap();
        assert!(
            s.ends_with(&format!(
                "<|im_start|>assistant\n[[<think>\n\n</think>\n\n{want}<|im_end|>\n]]"
            )),
            "{file} record {record}: {s}"
        );
    }
    assert_eq!(check_chat_cases("weight.jsonl", Some("qwen3")), 1);
}

#[test]
fn weight_zero_turns_are_not_trained() {
    // SmolLM2, Qwen2.5, Llama 3.1, Gemma 2, Phi-3.5, Phi-3, Gemma 3 (both templates) and
    // Phi-4-mini.
    assert_eq!(check_chat_cases("weight.jsonl", None), 10);
    // And without the weight, the same turn is trained.
    let t = chat_tok("smollm2");
    let dir = std::env::temp_dir().join(format!("qlora-weight-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = std::fs::read_to_string(fixtures("chat/weight.jsonl")).unwrap();
    let f = dir.join("noweight.jsonl");
    std::fs::write(&f, text.replace(", \"weight\": 0", "")).unwrap();
    let o = opts(None, 4096);
    let (with, _) = data::load_records(
        &fixtures("chat/weight.jsonl"),
        &t,
        &o,
        &ChatOptions::default(),
    )
    .unwrap();
    let (without, _) = data::load_records(&f, &t, &o, &ChatOptions::default()).unwrap();
    assert_eq!(with[0].1.ids, without[0].1.ids);
    assert!(with[0].1.counted() < without[0].1.counted());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn chat_template_kwargs_reach_the_template() {
    // enable_thinking false writes the empty think block into Qwen3's generation prompt.
    let rendered = |kw: &str| &golden_case("qwen3", "pc_chat.jsonl", kw)["records"][0]["labels"];
    assert_ne!(rendered("null"), rendered(r#"{"enable_thinking":false}"#));
    assert_eq!(check_chat_cases("pc_chat.jsonl", Some("qwen3")), 2);
    let err = ChatOptions::parse(None, Some("[1]"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--chat-template-kwargs must be a JSON object"),
        "{err}"
    );
}

#[test]
fn strftime_now_writes_the_date_as_transformers_does() {
    // The golden Llama 3.2 renderings hold "Today Date: 07 Mar 2025" (strftime_now pinned).
    assert_eq!(check_chat_cases("parts.jsonl", Some("llama3_2")), 1);
    let case = golden_case("llama3_2", "tools.jsonl", "null");
    assert!(case["records"][0]["rendered"]
        .as_str()
        .unwrap()
        .contains("Today Date: 07 Mar 2025\n"));
    // Unpinned, it is today's date, not the template's fallback.
    let t = chat_tok("llama3_2");
    let ct = t.chat_template.as_ref().unwrap();
    ct.set_time(None);
    let today = qlora_rs::data::chat::strftime("%d %b %Y", &LocalTime::now()).unwrap();
    let msgs = [Message {
        role: "user".into(),
        content: "Hi".into(),
    }];
    let text = ct.render(&msgs, true).unwrap();
    assert!(text.contains(&format!("Today Date: {today}\n")), "{text}");
    let t = fixed_now();
    let s = qlora_rs::data::chat::strftime("%a %A %d %-d %b %B %m %y %Y %H %I %p %M %S %j %%", &t)
        .unwrap();
    assert_eq!(
        s,
        "Fri Friday 07 7 Mar March 03 25 2025 14 02 PM 05 09 066 %"
    );
    assert_eq!(LocalTime::from_unix_utc(1_741_356_309, 0), fixed_now());
}

#[test]
fn a_template_that_raises_names_the_record_and_gives_its_message() {
    let g = chat_golden();
    let r = &g["raise_exception"];
    let t = chat_tok(r["template"].as_str().unwrap());
    let err = data::load_records(
        &fixtures(&format!("chat/{}", r["data"].as_str().unwrap())),
        &t,
        &opts(None, 4096),
        &ChatOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("two_tool_calls.jsonl")
            && err.contains("record 1 (line 2)")
            && err.contains(r["message"].as_str().unwrap()),
        "{err}"
    );
}

#[test]
fn gemma2_model_turns_render_and_train_like_transformers_and_trl() {
    // Gemma 2's template: bos_token printed by the template, `model` for the assistant role,
    // every message trimmed (Python's whitespace: U+3000 and U+001F too), content parts, one to
    // three turns; the trained text of each turn is its trimmed content, <end_of_turn> and the
    // newline, exactly TRL's {% generation %} blocks in gemma_training.jinja (checked by
    // make_chat_fixtures.py). Conversational prompt-completion by TRL's completion mask, and
    // `weight: 0` (in weight_zero_turns_are_not_trained).
    assert_eq!(check_chat_cases("alternating.jsonl", Some("gemma2")), 1);
    assert_eq!(check_chat_cases("pc_alternating.jsonl", Some("gemma2")), 1);
    let case = golden_case("gemma2", "alternating.jsonl", "null");
    let third = case["records"][2]["rendered"].as_str().unwrap();
    assert!(
        third.starts_with("<|im_start|><start_of_turn>user\nTell me a short poem.<end_of_turn>\n")
            && third
                .ends_with("<start_of_turn>model\nLeaves fall slowly,\nrivers run.<end_of_turn>\n"),
        "{third}"
    );
}

#[test]
fn phi3_turns_render_and_train_like_transformers_and_trl() {
    // Phi-3.5-mini-instruct's template (llama.cpp's vendored copy, the same as TRL's
    // phi3_5.jinja) and Phi-3's (TRL's phi3.jinja): a system message (left out by Phi-3.5 where
    // it is empty), content parts, one to three turns, untrimmed content. Without a generation
    // prompt they write eos_token after the last message, so the prefix rule holds for a last
    // turn only: an earlier turn's trained text is its content and `<|end|>\n`, the last one's
    // eos_token too, exactly TRL's {% generation %} blocks in phi3_training.jinja /
    // phi3_5_training.jinja (checked by make_chat_fixtures.py). Conversational prompt-completion
    // by TRL's completion mask, and `weight: 0`.
    for t in ["phi3_5", "phi3"] {
        for file in [
            "parts.jsonl",
            "weight.jsonl",
            "alternating.jsonl",
            "system.jsonl",
            "pc_chat.jsonl",
            "pc_alternating.jsonl",
        ] {
            assert_eq!(check_chat_cases(file, Some(t)), 1, "{t} {file}");
        }
    }
    let case = |t: &str| golden_case(t, "system.jsonl", "null");
    // The empty system message: left out by Phi-3.5, rendered by Phi-3.
    let empty = |t: &str| {
        case(t)["records"][1]["rendered"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(
        empty("phi3_5").starts_with("<|user|>\n"),
        "{}",
        empty("phi3_5")
    );
    assert!(
        empty("phi3").starts_with("<|system|>\n<|end|>\n<|user|>\n"),
        "{}",
        empty("phi3")
    );
    // An earlier turn stops at its `<|end|>\n` (eos_token and the next role header share `<|`,
    // which must not be trained); the last one takes eos_token.
    for t in ["phi3_5", "phi3"] {
        let tk = chat_tok(t);
        let (seqs, _) = data::load_records(
            &fixtures("chat/system.jsonl"),
            &tk,
            &opts(None, 4096),
            &chat_options(case(t)),
        )
        .unwrap();
        let s = qlora_rs::data::preview::highlight(&tk, &seqs[0].1, false).unwrap();
        assert!(
            s.contains("<|assistant|>\n[[Hello! How can I help?<|end|>\n]]<|user|>\n")
                && s.ends_with("<|assistant|>\n[[7<|end|>\n<|im_end|>]]"),
            "{t}: {s}"
        );
    }
}

#[test]
fn a_closing_eos_token_is_trained_after_the_last_turn_only() {
    // Phi-3.5's template with Phi's own eos_token, `<|endoftext|>`, which shares `<|` with the
    // next role header: each earlier turn ends at its `<|end|>\n`, the last takes eos_token.
    let text = std::fs::read_to_string(fixtures("chat/templates/phi3_5.jinja")).unwrap();
    let msg = |role: &str, content: &str| Message {
        role: role.into(),
        content: content.into(),
    };
    let msgs = [
        msg("user", "Hi!"),
        msg("assistant", "Hello."),
        msg("user", "Bye."),
        msg("assistant", "Goodbye."),
    ];
    let phi = ChatTemplate::new(&text, None, Some("<|endoftext|>".into())).unwrap();
    let (full, spans) = phi.render_with_assistant_spans(&msgs).unwrap();
    let trained: Vec<&str> = spans.iter().map(|&(a, b)| &full[a..b]).collect();
    assert_eq!(
        full,
        "<|user|>\nHi!<|end|>\n<|assistant|>\nHello.<|end|>\n<|user|>\nBye.<|end|>\n\
         <|assistant|>\nGoodbye.<|end|>\n<|endoftext|>"
    );
    assert_eq!(
        trained,
        ["Hello.<|end|>\n", "Goodbye.<|end|>\n<|endoftext|>"]
    );
    // The same where the turns are located in the one rendering (this template writes a last
    // assistant turn differently, so the prefix rule fails).
    let last = text.replace(
        "{{'<|assistant|>\n' + message['content']",
        "{{'<|assistant|>\n' + ('(last) ' if loop.last else '') + message['content']",
    );
    assert_ne!(last, text);
    let located = ChatTemplate::new(&last, None, Some("<|endoftext|>".into())).unwrap();
    let (full, spans) = located.render_with_assistant_spans(&msgs).unwrap();
    let trained: Vec<&str> = spans.iter().map(|&(a, b)| &full[a..b]).collect();
    assert!(full.contains("<|assistant|>\nHello.<|end|>\n"), "{full}");
    assert_eq!(
        trained,
        ["Hello.<|end|>\n", "(last) Goodbye.<|end|>\n<|endoftext|>"]
    );
}

/// The lines of `err` that list the records of gemma2_refusals.jsonl.
fn gemma2_refusal_lines(err: &str) -> Vec<&str> {
    err.lines()
        .map(str::trim)
        .filter(|l| l.starts_with("record "))
        .collect()
}

/// What Gemma 2's refusals of gemma2_refusals.jsonl say: where, the template's own message as
/// transformers raises it, and what to do.
fn check_gemma2_refusals(err: &str) {
    let g = chat_golden();
    let r = &g["gemma2_refusals"];
    assert!(
        err.contains("gemma2_refusals.jsonl: 3 of 5 records cannot be used (--skip-bad-records leaves them out):"),
        "{err}"
    );
    let lines = gemma2_refusal_lines(err);
    let want = r["records"].as_array().unwrap();
    assert_eq!(lines.len(), want.len(), "{err}");
    for (line, w) in lines.iter().zip(want) {
        let head = format!(
            "record {} (line {}): the chat template refuses the conversation (\"{}\"). ",
            w["record"],
            w["line"],
            w["message"].as_str().unwrap()
        );
        assert!(line.starts_with(&head), "{line}\nshould start with\n{head}");
    }
    assert_eq!(
        lines[0],
        "record 1 (line 2): the chat template refuses the conversation (\"System role not \
         supported\"). The template takes no system message: put the system prompt at \
         the start of the first user message (then a blank line), or use a model whose chat \
         template accepts a system role"
    );
    assert!(
        lines[1].ends_with(
            "The template wants user and assistant messages to alternate: merge \
             consecutive messages of one role into one (messages 0 and 1 are both user)"
        ),
        "{}",
        lines[1]
    );
    assert!(
        lines[2].ends_with(
            "The template wants the conversation to start with a user message \
             (message 0 is assistant)"
        ),
        "{}",
        lines[2]
    );
}

#[test]
fn gemma2_refuses_a_system_role_naming_the_record_its_message_and_what_to_do() {
    let g = chat_golden();
    let r = &g["gemma2_refusals"];
    let file = fixtures(&format!("chat/{}", r["data"].as_str().unwrap()));
    let t = chat_tok(r["template"].as_str().unwrap());
    let err = data::load_records(&file, &t, &opts(None, 4096), &ChatOptions::default())
        .unwrap_err()
        .to_string();
    check_gemma2_refusals(&err);
    // The same with --train-on-prompt (another rendering path).
    let mut o = opts(None, 4096);
    o.train_on_prompt = true;
    let err = data::load_records(&file, &t, &o, &ChatOptions::default())
        .unwrap_err()
        .to_string();
    check_gemma2_refusals(&err);
    // --skip-bad-records keeps records 0 and 4 and lists the others.
    let mut o = opts(None, 4096);
    o.skip_bad_records = true;
    let (seqs, stats) = data::load_records(&file, &t, &o, &ChatOptions::default()).unwrap();
    assert_eq!(seqs.iter().map(|s| s.0).collect::<Vec<_>>(), [0, 4]);
    assert_eq!(
        stats.skipped.iter().map(|b| b.index).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    // A system message and two user messages in a row: both changes are named; a template
    // that raises for another reason (Llama 3.1's one tool call per turn) gets no advice.
    let both = write_lines(
        "gemma2-both",
        &[
            r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi."}]}"#,
        ],
    );
    let err = data::load_records(&both, &t, &opts(None, 4096), &ChatOptions::default())
        .unwrap_err()
        .to_string();
    std::fs::remove_dir_all(both.parent().unwrap()).unwrap();
    assert!(
        err.contains(
            "(\"System role not supported\"). The template wants user and assistant \
             messages to alternate: merge consecutive messages of one role into one (messages 1 \
             and 2 are both user). The template takes no system message: put the \
             system prompt at the start of the first user message"
        ) && !err.contains("start with a user message"),
        "{err}"
    );
    let err = data::load_records(
        &fixtures("chat/two_tool_calls.jsonl"),
        &chat_tok("llama3_1"),
        &opts(None, 4096),
        &ChatOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("the chat template refuses the conversation (\"This model only supports single tool-calls \
             at once!\")")
            && !err.contains("The template"),
        "{err}"
    );
}

#[test]
fn cli_train_and_data_give_gemma2_refusals_before_reading_weights() {
    let g = chat_golden();
    let file = fixtures(&format!(
        "chat/{}",
        g["gemma2_refusals"]["data"].as_str().unwrap()
    ));
    // The tiny Llama with Gemma 2's template: its weights are never read.
    let model = model_dir_named("gemma2", "gemma2-train");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures(&format!("llama/tiny-llama/{f}")), model.join(f)).unwrap();
    }
    let out_dir = model.join("out");
    for args in [
        vec![
            "data",
            "--model",
            model.to_str().unwrap(),
            "--data",
            file.to_str().unwrap(),
        ],
        vec![
            "train",
            "--device",
            "cpu",
            "--model",
            model.to_str().unwrap(),
            "--data",
            file.to_str().unwrap(),
            "--output",
            out_dir.to_str().unwrap(),
            "--max-steps",
            "1",
        ],
    ] {
        let out = crate::common::qlora(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && !stderr.contains("panicked"),
            "{args:?}: {stderr}"
        );
        check_gemma2_refusals(&stderr);
    }
    assert!(!out_dir.join("adapter_model.safetensors").exists());
    std::fs::remove_dir_all(&model).unwrap();
}

/// Writes `lines` to a temporary JSONL file and loads it with the ChatML template.
fn load_lines(
    name: &str,
    lines: &[&str],
) -> qlora_rs::Result<(Vec<(usize, Sequence)>, data::DataStats)> {
    let dir = std::env::temp_dir().join(format!("qlora-chat-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join(format!("{name}.jsonl"));
    std::fs::write(&f, lines.join("\n")).unwrap();
    let r = data::load_records(
        &f,
        &chat_tok("qwen3"),
        &opts(None, 4096),
        &ChatOptions::default(),
    );
    std::fs::remove_dir_all(&dir).unwrap();
    r
}

#[test]
fn bad_chat_records_name_the_file_line_and_message() {
    let ok = r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}"#;
    for (name, bad, want) in [
        (
            "image",
            r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "x.png"}}]}, {"role": "assistant", "content": "A cat."}]}"#,
            "message 0 has content part 1 of type `image_url`",
        ),
        (
            "nullcontent",
            r#"{"messages": [{"role": "user", "content": null}, {"role": "assistant", "content": "Hello."}]}"#,
            "message 0 has no `content` (missing or null, and no `tool_calls`)",
        ),
        (
            "args",
            r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]}"#,
            "message 1 has tool call 0 whose `arguments` string is not valid JSON",
        ),
        (
            "usercalls",
            r#"{"messages": [{"role": "user", "content": "Hi", "tool_calls": []}, {"role": "assistant", "content": "Hello."}]}"#,
            "message 0 has `tool_calls` but its role is user",
        ),
        (
            "weight",
            r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello.", "weight": 2}]}"#,
            "message 1 has `weight: 2` (expected 0 or 1)",
        ),
        (
            "tools",
            r#"{"tools": {"name": "f"}, "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}"#,
            "`tools`: tools must be a list of tool definitions",
        ),
        (
            "mixed",
            r#"{"prompt": [{"role": "user", "content": "Hi"}], "completion": "Hello."}"#,
            "`completion` is not a list of messages",
        ),
        (
            "pcweight",
            r#"{"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello.", "weight": 0}]}"#,
            "`completion` message 0 has `weight: 0`",
        ),
        (
            "texttools",
            r#"{"text": "Hello.", "tools": []}"#,
            "`tools` is only used with chat records",
        ),
    ] {
        let first = match name {
            "texttools" => r#"{"text": "Hi."}"#,
            "mixed" | "pcweight" => {
                r#"{"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello."}]}"#
            }
            _ => ok,
        };
        let err = load_lines(name, &[first, bad]).unwrap_err().to_string();
        assert!(
            err.contains(&format!("{name}.jsonl"))
                && err.contains("record 1 (line 2)")
                && err.contains(want),
            "{name}: {err}"
        );
    }
}

/// A model folder with the tiny tokenizer and one of the real templates (no weights).
fn model_dir(template: &str) -> PathBuf {
    model_dir_named(template, template)
}

/// [`model_dir`] in a folder of its own (`name`), for tests that run beside others.
fn model_dir_named(template: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qlora-data-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        fixtures("llama/tiny-llama/tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    let text =
        std::fs::read_to_string(fixtures(&format!("chat/templates/{template}.jinja"))).unwrap();
    let cfg = serde_json::json!({
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "chat_template": text,
    });
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    dir
}

#[test]
fn cli_data_json_gives_the_ids_and_labels_of_the_references() {
    let g = chat_golden();
    let model = model_dir("qwen3");
    for case in g["cases"].as_array().unwrap() {
        if case["template"] != "qwen3" {
            continue;
        }
        let file = fixtures(&format!("chat/{}", case["data"].as_str().unwrap()));
        let mut args = vec![
            "data".to_string(),
            "--model".into(),
            model.display().to_string(),
            "--data".into(),
            file.display().to_string(),
            "--json".into(),
        ];
        if !case["chat_template_kwargs"].is_null() {
            args.push("--chat-template-kwargs".into());
            args.push(case["chat_template_kwargs"].to_string());
        }
        if let Some(t) = case["tools_file"].as_str() {
            args.push("--tools".into());
            args.push(fixtures(&format!("chat/{t}")).display().to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = crate::common::qlora_ok(&args);
        assert!(out.starts_with("{\"record\":0,\"ids\":["), "{out}");
        let got: Vec<Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let want = case["records"].as_array().unwrap();
        assert_eq!(got.len(), want.len(), "{args:?}");
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g["record"], w["record"], "{args:?}");
            assert_eq!(g["ids"], w["ids"], "{args:?}");
            assert_eq!(g["labels"], w["labels"], "{args:?}");
        }
    }
    // The preview: the summary, then records with the trained text in [[…]] (not a terminal).
    let file = fixtures("chat/reasoning.jsonl");
    let out = crate::common::qlora_ok(&[
        "data",
        "--model",
        model.to_str().unwrap(),
        "--data",
        file.to_str().unwrap(),
        "--show",
        "4",
    ]);
    assert!(out.contains("4 records, format messages"), "{out}");
    assert!(out.contains("sequences: 4 kept; 0 dropped"), "{out}");
    assert!(out.contains("lengths (tokens per sequence):"), "{out}");
    assert!(out.contains("record 3: "), "{out}");
    assert!(
        out.contains("[[The sum is 5.<|im_end|>\n]]<|im_start|>user"),
        "{out}"
    );
    std::fs::remove_dir_all(&model).unwrap();
    // Bad input: the file, the line and the template's own message.
    let model = model_dir("llama3_1");
    let out = crate::common::qlora(&[
        "data",
        "--model",
        model.to_str().unwrap(),
        "--data",
        fixtures("chat/two_tool_calls.jsonl").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("record 1 (line 2)") && stderr.contains("single tool-calls"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&model).unwrap();
}

// ---- what is not used, bad records, the summary ----

/// Writes `lines` to a fresh JSONL file named `name` (in its own folder) and returns its path.
fn write_lines(name: &str, lines: &[&str]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qlora-data-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join(format!("{name}.jsonl"));
    std::fs::write(&f, lines.join("\n")).unwrap();
    f
}

/// Loads `lines` with `t`, bad records skipped or not.
fn load_with(
    t: &TextTokenizer,
    name: &str,
    lines: &[&str],
    skip_bad_records: bool,
) -> qlora_rs::Result<(Vec<(usize, Sequence)>, data::DataStats)> {
    let f = write_lines(name, lines);
    let mut o = opts(None, 4096);
    o.skip_bad_records = skip_bad_records;
    let r = data::load_records(&f, t, &o, &ChatOptions::default());
    std::fs::remove_dir_all(f.parent().unwrap()).unwrap();
    r
}

#[test]
fn unused_keys_are_counted_and_named_in_the_summary() {
    // Qwen2.5's template reads neither `name` nor `tool_call_id`; the record's `id` and `source`
    // no format reads.
    let t = chat_tok("qwen2_5");
    let lines = [
        r#"{"id": 1, "messages": [{"role": "user", "content": "Hi", "name": "ann"}, {"role": "assistant", "content": "Hello.", "name": "bot"}]}"#,
        r#"{"id": 2, "source": "web", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo.", "extra": null}]}"#,
        r#"{"id": 3, "messages": [{"role": "user", "content": "Weather?"}, {"role": "assistant", "tool_calls": [{"function": {"name": "w", "arguments": {}}}]}, {"role": "tool", "tool_call_id": "c1", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]}"#,
    ];
    let (seqs, stats) = load_with(&t, "unused", &lines, false).unwrap();
    assert_eq!(seqs.len(), 3);
    let unused: Vec<(&str, usize)> = stats.unused.iter().map(|(k, &n)| (k.as_str(), n)).collect();
    assert_eq!(
        unused,
        [
            ("messages[].name", 2),
            ("messages[].tool_call_id", 1),
            ("record key `id`", 3),
            ("record key `source`", 1),
        ],
        "null values are absent keys, not unused ones"
    );
    let s = qlora_rs::data::preview::summary(Path::new("unused.jsonl"), &opts(None, 4096), &stats);
    assert!(
        s.contains(
            "ignored: 3 × record key `id`, 2 × messages[].name, 1 × messages[].tool_call_id, \
             1 × record key `source`"
        ),
        "{s}"
    );

    // A template that reads `name` gets it (and it is not counted).
    let mut t = tok("llama/tiny-llama");
    t.chat_template = Some(
        ChatTemplate::new(
            "{% for m in messages %}{{ m.role }}{% if m.name is defined %} ({{ m.name }}){% endif %}: {{ m.content }}\n{% endfor %}",
            t.bos_token.clone(),
            t.eos_token.clone(),
        )
        .unwrap(),
    );
    let (seqs, stats) = load_with(&t, "named", &lines[..2], false).unwrap();
    let text = t.decode(&seqs[0].1.ids, false).unwrap();
    assert!(
        text.contains("user (ann): Hi\nassistant (bot): Hello."),
        "{text}"
    );
    assert!(!stats.unused.contains_key("messages[].name"), "{stats:?}");
    assert_eq!(stats.unused.get("record key `id`"), Some(&2));

    // A template that prints whole messages reads every key, in the file's order.
    let mut t = tok("llama/tiny-llama");
    t.chat_template = Some(
        ChatTemplate::new(
            "{% for m in messages %}{{ m | tojson }}\n{% endfor %}",
            t.bos_token.clone(),
            t.eos_token.clone(),
        )
        .unwrap(),
    );
    let (seqs, stats) = load_with(&t, "json", &lines[..1], false).unwrap();
    let text = t.decode(&seqs[0].1.ids, false).unwrap();
    assert!(
        text.contains(r#"{"role": "user", "content": "Hi", "name": "ann"}"#),
        "{text}"
    );
    assert_eq!(stats.unused.keys().collect::<Vec<_>>(), ["record key `id`"]);

    // ShareGPT reads `from` and `value`; anything else is counted.
    let t = chat_tok("qwen2_5");
    let (_, stats) = load_with(
        &t,
        "sharegpt_unused",
        &[r#"{"conversations": [{"from": "human", "value": "Hi", "lang": "en"}, {"from": "gpt", "value": "Yo."}], "id": 5}"#],
        false,
    )
    .unwrap();
    assert_eq!(stats.unused.get("conversations[].lang"), Some(&1));
    assert_eq!(stats.unused.get("record key `id`"), Some(&1));
}

#[test]
fn tool_call_keys_the_template_never_reads_are_counted_and_named() {
    // Qwen2.5's template reads a call's `function` (or the call itself), its `name` and
    // `arguments`; not the OpenAI `id` and `type`, nor a stray key beside them.
    let t = chat_tok("qwen2_5");
    let tools = r#""tools": [{"type": "function", "function": {"name": "w"}}]"#;
    let lines = [
        format!(
            r#"{{{tools}, "messages": [{{"role": "user", "content": "Weather in Paris and Rome?"}}, {{"role": "assistant", "content": null, "tool_calls": [{{"id": "call_1", "type": "function", "function": {{"name": "w", "arguments": {{"city": "Paris"}}, "strict": true}}}}, {{"id": "call_2", "type": "function", "function": {{"name": "w", "arguments": "{{\"city\": \"Rome\"}}", "description": null}}}}]}}, {{"role": "tool", "content": "sunny"}}, {{"role": "tool", "content": "rainy"}}, {{"role": "assistant", "content": "Sunny, and rainy."}}]}}"#
        ),
        // The flat layout, {name, arguments}.
        format!(
            r#"{{{tools}, "messages": [{{"role": "user", "content": "Weather?"}}, {{"role": "assistant", "tool_calls": [{{"name": "w", "arguments": {{}}, "index": 0}}]}}, {{"role": "tool", "content": "sunny"}}, {{"role": "assistant", "content": "Sunny."}}]}}"#
        ),
    ];
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    let (seqs, stats) = load_with(&t, "call_keys", &lines, false).unwrap();
    assert_eq!(seqs.len(), 2);
    let unused: Vec<(&str, usize)> = stats.unused.iter().map(|(k, &n)| (k.as_str(), n)).collect();
    assert_eq!(
        unused,
        [
            ("messages[].tool_calls[].function.strict", 1),
            ("messages[].tool_calls[].id", 2),
            ("messages[].tool_calls[].index", 1),
            ("messages[].tool_calls[].type", 2),
        ],
        "one count per tool call; null values are absent keys"
    );
    let s =
        qlora_rs::data::preview::summary(Path::new("call_keys.jsonl"), &opts(None, 4096), &stats);
    assert!(
        s.contains(
            "ignored: 2 × messages[].tool_calls[].id, 2 × messages[].tool_calls[].type, 1 × \
             messages[].tool_calls[].function.strict, 1 × messages[].tool_calls[].index"
        ),
        "{s}"
    );

    // A template that prints whole calls reads all their keys.
    let with = |source: &str| {
        let mut t = tok("llama/tiny-llama");
        t.chat_template =
            Some(ChatTemplate::new(source, t.bos_token.clone(), t.eos_token.clone()).unwrap());
        t
    };
    let whole = with(
        "{{ tools | tojson }}\n{% for m in messages %}{{ m.role }}: {{ m.content }}{% if m.tool_calls %}{{ m.tool_calls | tojson }}{% endif %}\n{% endfor %}",
    );
    let (_, stats) = load_with(&whole, "call_keys_json", &lines[..1], false).unwrap();
    assert!(
        !stats.unused.keys().any(|k| k.contains("tool_calls")),
        "{:?}",
        stats.unused
    );

    // One that prints a call's name but not its arguments would train the turn without them:
    // refused for a trained turn, counted for a turn left out of the loss.
    let names = with(
        "{% for m in messages %}{{ m.role }}: {{ m.content }}{% for c in m.tool_calls %}{{ c.function.name }}{% endfor %}\n{% endfor %}",
    );
    let call = r#"{"role": "assistant", "tool_calls": [{"function": {"name": "w", "arguments": {"city": "Oslo"}}}]"#;
    let trained = format!(
        r#"{{"messages": [{{"role": "user", "content": "Weather?"}}, {call}}}, {{"role": "tool", "content": "cold"}}, {{"role": "assistant", "content": "Cold."}}]}}"#
    );
    let err = load_with(&names, "call_args", &[&trained], false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "record 0 (line 1): message 1 is trained on, but the chat template never \
             reads its `tool_calls[].function.arguments`"
        ),
        "{err}"
    );
    let untrained = trained.replace(
        r#"]}, {"role": "tool""#,
        r#"], "weight": 0}, {"role": "tool""#,
    );
    assert_ne!(untrained, trained);
    let (_, stats) = load_with(&names, "call_args", &[&untrained], false).unwrap();
    assert_eq!(
        stats
            .unused
            .get("messages[].tool_calls[].function.arguments"),
        Some(&1),
        "{:?}",
        stats.unused
    );
}

/// `qlora-rs data` on `file` with the model folder `model` and `extra` flags; its output.
fn cli_data(model: &Path, file: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "data",
        "--model",
        model.to_str().unwrap(),
        "--data",
        file.to_str().unwrap(),
        "--show",
        "0",
    ];
    args.extend_from_slice(extra);
    crate::common::qlora_ok(&args)
}

#[test]
fn chat_template_kwargs_the_template_never_reads_are_named_in_a_warning() {
    let t = chat_tok("qwen3");
    let load = |file: &str, lines: &[&str], kwargs: &str| {
        let f = write_lines(file, lines);
        let chat = ChatOptions::parse(None, Some(kwargs)).unwrap();
        let r = data::load_records(&f, &t, &opts(None, 4096), &chat).unwrap();
        std::fs::remove_dir_all(f.parent().unwrap()).unwrap();
        r
    };
    let chat = [
        r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}"#,
    ];
    let (_, stats) = load(
        "typo",
        &chat,
        r#"{"enable_thinkng": false, "enable_thinking": false}"#,
    );
    assert_eq!(
        stats.warnings,
        [
            "chat_template_kwargs.enable_thinkng: the chat template never reads it, so it changes \
          nothing (did you mean `enable_thinking`?)"
        ]
    );
    let s = qlora_rs::data::preview::summary(Path::new("typo.jsonl"), &opts(None, 4096), &stats);
    assert!(
        s.contains(
            "\nwarning: chat_template_kwargs.enable_thinkng: the chat template never reads it"
        ),
        "{s}"
    );
    let (_, stats) = load("right", &chat, r#"{"enable_thinking": false}"#);
    assert!(stats.warnings.is_empty(), "{:?}", stats.warnings);
    // Kwargs, right or wrong, with records that no template renders.
    let (_, stats) = load(
        "text",
        &[r#"{"text": "Hello."}"#],
        r#"{"enable_thinking": false}"#,
    );
    assert_eq!(
        stats.warnings,
        [
            "chat_template_kwargs: no record is rendered with the chat template, so they change \
          nothing"
        ]
    );

    // ShareGPT records are rendered with the kwargs too: as the same messages are. (Qwen3's
    // enable_thinking reaches only the generation prompt, and a turn is trained from its role
    // header whatever the prompt holds, so a template that prints a kwarg into the
    // conversation tells.)
    let sharegpt = write_lines(
        "kw_sharegpt",
        &[
            r#"{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}"#,
        ],
    );
    let messages = write_lines("kw_messages", &chat);
    let mut noted = tok("llama/tiny-llama");
    let text = std::fs::read_to_string(fixtures("chat/templates/qwen3.jinja")).unwrap();
    noted.chat_template = Some(
        ChatTemplate::new(
            &format!("{{{{- note | default('') }}}}{text}"),
            noted.bos_token.clone(),
            noted.eos_token.clone(),
        )
        .unwrap(),
    );
    let note = ChatOptions::parse(None, Some(r#"{"note": "Be brief."}"#)).unwrap();
    let get = |f: &Path, o: &ChatOptions| {
        data::load_records(f, &noted, &opts(None, 4096), o)
            .unwrap()
            .0
    };
    assert_eq!(get(&sharegpt, &note), get(&messages, &note));
    assert_ne!(
        get(&sharegpt, &note),
        get(&sharegpt, &ChatOptions::default())
    );

    // On the command line, and as the config's key.
    let model = model_dir_named("qwen3", "kwargs-warning");
    let out = cli_data(
        &model,
        &messages,
        &["--chat-template-kwargs", r#"{"enable_thinkng": false}"#],
    );
    assert!(
        out.contains(
            "warning: chat_template_kwargs.enable_thinkng: the chat template never reads \
             it, so it changes nothing (did you mean `enable_thinking`?)\n"
        ),
        "{out}"
    );
    let cfg = messages.with_file_name("run.toml");
    std::fs::write(
        &cfg,
        "chat_template_kwargs = '{\"enable_thinkng\": false}'\n",
    )
    .unwrap();
    let out = cli_data(&model, &messages, &["--config", cfg.to_str().unwrap()]);
    assert!(
        out.contains(
            "warning: chat_template_kwargs.enable_thinkng: the chat template never reads it"
        ),
        "{out}"
    );
    let out = cli_data(
        &model,
        &messages,
        &["--chat-template-kwargs", r#"{"enable_thinking": false}"#],
    );
    assert!(!out.contains("warning"), "{out}");
    for f in [&sharegpt, &messages, &model] {
        let _ = std::fs::remove_dir_all(if f.is_dir() { f } else { f.parent().unwrap() });
    }
}

#[test]
fn keys_that_would_change_what_is_trained_are_refused() {
    let ok = r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}"#;
    let call = r#"[{"function": {"name": "w", "arguments": {}}}]"#;
    let cases = [
        (
            "qwen2_5",
            r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello.", "train": false}]}"#.to_string(),
            "message 1 has `train`, which qlora-rs does not read",
        ),
        (
            "qwen2_5",
            r#"{"system": "Be terse.", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}"#.into(),
            "has `system`: format messages does not read it",
        ),
        (
            "qwen2_5",
            r#"{"weight": 0.5, "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}"#.into(),
            "has `weight`: qlora-rs does not weight records",
        ),
        (
            "qwen2_5",
            r#"{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo.", "weight": 0}]}"#.into(),
            "`conversations` message 1 has `weight`, which format sharegpt does not read",
        ),
        // SmolLM2's template prints `content` only: a trained turn's tool calls, reasoning and
        // the tool definitions would vanish.
        (
            "smollm2",
            format!(r#"{{"messages": [{{"role": "user", "content": "Weather?"}}, {{"role": "assistant", "content": "Let me look.", "tool_calls": {call}}}]}}"#),
            "message 1 is trained on, but the chat template never reads its `tool_calls`",
        ),
        (
            "smollm2",
            r#"{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "Two and two."}]}"#.into(),
            "message 1 is trained on, but the chat template never reads its `reasoning_content`",
        ),
        (
            "smollm2",
            r#"{"tools": [{"type": "function", "function": {"name": "w"}}], "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}"#.into(),
            "the chat template never reads `tools`",
        ),
    ];
    for (template, bad, want) in &cases {
        let first = if bad.contains("conversations") {
            r#"{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo."}]}"#
        } else {
            ok
        };
        let err = load_with(&chat_tok(template), "changes", &[first, bad], false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("changes.jsonl")
                && err.contains("record 1 (line 2)")
                && err.contains(want),
            "{template} {bad}: {err}"
        );
    }
    // What changes nothing is counted instead: an empty `system`, a record weight of 1, and the
    // tool calls of a turn left out of the loss.
    let (_, stats) = load_with(
        &chat_tok("smollm2"),
        "harmless",
        &[
            r#"{"system": "", "weight": 1, "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}"#,
            &format!(r#"{{"messages": [{{"role": "user", "content": "Weather?"}}, {{"role": "assistant", "content": "Let me look.", "tool_calls": {call}, "weight": 0}}, {{"role": "user", "content": "And?"}}, {{"role": "assistant", "content": "Sunny."}}]}}"#),
        ],
        false,
    )
    .unwrap();
    assert_eq!(stats.unused.get("record key `system`"), Some(&1));
    assert_eq!(stats.unused.get("record key `weight`"), Some(&1));
    assert_eq!(stats.unused.get("messages[].tool_calls"), Some(&1));
    // Said once, for the list: not again for the keys of its calls.
    assert!(
        !stats.unused.keys().any(|k| k.contains("tool_calls[]")),
        "{:?}",
        stats.unused
    );
}

#[test]
fn bad_records_are_reported_together_and_skipped_only_when_asked() {
    let good = r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}"#;
    let bad = [
        r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "asistant", "content": "Yo."}]}"#,
        r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]}"#,
        r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo."}"#,
        r#"["not", "an", "object"]"#,
        r#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}, {"role": "assistant", "content": "A cat."}]}"#,
    ];
    // 30 records: every sixth good, the others bad in turn.
    let lines: Vec<&str> = (0..30)
        .map(|i| if i % 6 == 0 { good } else { bad[i % 5] })
        .collect();
    let t = chat_tok("qwen3");
    let err = load_with(&t, "many_bad", &lines, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("many_bad.jsonl: 25 of 30 records cannot be used (--skip-bad-records"),
        "{err}"
    );
    for want in [
        "\n  record 1 (line 2): message 1 has no `content`",
        "\n  line 3: not valid JSON",
        "\n  line 4: expected a JSON object, found an array",
        "\n  record 4 (line 5): message 0 has content part 0 of type `image_url`",
        "\n  record 5 (line 6): message 1 has the unknown role `asistant`",
    ] {
        assert!(err.contains(want), "{want:?} not in\n{err}");
    }
    let listed = err.lines().filter(|l| l.starts_with("  ")).count();
    assert_eq!(listed, 21, "20 records and the rest counted:\n{err}");
    assert!(err.ends_with("\n  … and 5 more"), "{err}");

    // --skip-bad-records: the good ones, by their index in the file, and the rest listed.
    let (seqs, stats) = load_with(&t, "many_bad", &lines, true).unwrap();
    let kept: Vec<usize> = seqs.iter().map(|(i, _)| *i).collect();
    assert_eq!(kept, [0, 6, 12, 18, 24]);
    assert_eq!(stats.records, 30);
    assert_eq!(stats.skipped.len(), 25);
    assert_eq!(stats.skipped[1].line, Some(3));
    let s =
        qlora_rs::data::preview::summary(Path::new("many_bad.jsonl"), &opts(None, 4096), &stats);
    assert!(
        s.contains("skipped: 25 bad records (--skip-bad-records):\n  record 1 (line 2): "),
        "{s}"
    );
    assert!(s.contains("\n  … and 5 more\nsequences: 5 kept"), "{s}");

    // Nothing left: refused even with --skip-bad-records.
    let err = load_with(&t, "all_bad", &bad, true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("none of the 5 records can be used"), "{err}");
}

#[test]
fn the_summary_counts_layouts_drops_and_lengths() {
    let t = chat_tok("qwen2_5");
    let (_, stats) = load_with(
        &t,
        "mixed",
        &[
            r#"{"prompt": "What is 2 + 2?", "completion": " 4"}"#,
            r#"{"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello."}]}"#,
            r#"{"prompt": "Say nothing.", "completion": "  "}"#,
            r#"{"prompt": "Count.", "completion": " one two three four five six seven eight nine ten"}"#,
        ],
        false,
    )
    .unwrap();
    assert_eq!(
        stats.kinds,
        [
            ("prompt-completion", 3),
            ("prompt-completion (conversational)", 1)
        ]
    );
    let s = qlora_rs::data::preview::summary(Path::new("mixed.jsonl"), &opts(None, 4096), &stats);
    assert!(
        s.starts_with(
            "data: mixed.jsonl — 4 records, format prompt-completion: 3 prompt-completion, 1 \
             prompt-completion (conversational)\n"
        ),
        "{s}"
    );
    assert!(s.contains("lengths (tokens per sequence):\n"), "{s}");
    let bucketed: usize = s
        .lines()
        .skip_while(|l| !l.starts_with("lengths"))
        .skip(1)
        .map(|l| {
            l.split_whitespace()
                .nth(3)
                .unwrap()
                .parse::<usize>()
                .unwrap()
        })
        .sum();
    assert_eq!(bucketed, stats.lengths.len());
    assert_eq!(stats.lengths.len() + stats.empty, 4);
}
