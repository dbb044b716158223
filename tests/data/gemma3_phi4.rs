//! Gemma 3's and Phi-4-mini-instruct's chat templates against tests/fixtures/chat/golden.json
//! (made by tests/fixtures/make_chat_fixtures.py with transformers and TRL): gemma3.jinja (the
//! template of Ollama's gemma3:1b GGUF, which reads a system message's text from its first
//! content part only), gemma3_trl.jinja (TRL's, which takes a string too), phi4_mini.jinja.

use qlora_rs::data;
use qlora_rs::data::formats::ChatOptions;
use qlora_rs::data::preview::highlight;
use serde_json::Value;

use super::{
    chat_golden, chat_options, chat_tok, check_chat_cases, fixtures, golden_case, messages, opts,
    u32s,
};

/// The golden case of `template` on `file` (no kwargs).
fn case(template: &str, file: &str) -> &'static Value {
    golden_case(template, file, "null")
}

/// Record `record` of `file` loaded with `template` as training sees it, trained text in [[ ]].
fn highlighted(template: &str, file: &str, record: usize) -> String {
    let t = chat_tok(template);
    let (seqs, _) = data::load_records(
        &fixtures(&format!("chat/{file}")),
        &t,
        &opts(None, 4096),
        &chat_options(case(template, file)),
    )
    .unwrap();
    highlight(&t, &seqs[record].1, false).unwrap()
}

#[test]
fn gemma3_turns_render_and_train_like_transformers_and_trl() {
    // Both Gemma 3 templates: bos_token printed by the template, `model` for the assistant role,
    // every message trimmed, content parts, one to three turns, `weight: 0`; each turn's trained
    // text is its trimmed content, <end_of_turn> and the newline, exactly the {% generation %}
    // blocks of TRL's gemma3_training.jinja (checked by make_chat_fixtures.py). Conversational
    // prompt-completion by TRL's completion mask. gemma3_trl with system messages too.
    for (t, files) in [
        (
            "gemma3",
            &["alternating.jsonl", "weight.jsonl", "pc_alternating.jsonl"][..],
        ),
        (
            "gemma3_trl",
            &[
                "alternating.jsonl",
                "weight.jsonl",
                "system.jsonl",
                "parts.jsonl",
                "pc_alternating.jsonl",
                "pc_chat.jsonl",
            ][..],
        ),
    ] {
        for file in files {
            assert_eq!(check_chat_cases(file, Some(t)), 1, "{t} {file}");
        }
    }
    // The system message opens the first user turn, a blank line after it (an empty one leaves
    // the blank line), and is not trained.
    let c = case("gemma3_trl", "system.jsonl");
    let rendered = |i: usize| c["records"][i]["rendered"].as_str().unwrap().to_string();
    assert!(
        rendered(0).starts_with(
            "<|im_start|><start_of_turn>user\nYou are a helpful AI assistant.\n\nHi!<end_of_turn>\n\
             <start_of_turn>model\n"
        ),
        "{}",
        rendered(0)
    );
    assert!(
        rendered(1).starts_with(
            "<|im_start|><start_of_turn>user\n\n\nWhat is the capital of France?<end_of_turn>\n"
        ),
        "{}",
        rendered(1)
    );
    let s = highlighted("gemma3_trl", "system.jsonl", 0);
    assert!(
        s.contains(
            "<start_of_turn>model\n[[Hello! How can I help?<end_of_turn>\n]]<start_of_turn>user\n"
        ) && s.ends_with("<start_of_turn>model\n[[7<end_of_turn>\n]]"),
        "{s}"
    );
}

#[test]
fn gemma3_refuses_the_records_that_transformers_refuses() {
    // gemma2_refusals.jsonl: both templates refuse two user messages in a row and an assistant
    // message first with their own raise_exception (and the same advice as Gemma 2's); gemma3
    // also refuses record 1, whose string system message it reads as content parts (jinja2's
    // UndefinedError in transformers; minijinja's error for the same lookup here).
    let g = chat_golden();
    let r = &g["gemma3_refusals"];
    let file = fixtures(&format!("chat/{}", r["data"].as_str().unwrap()));
    let templates = r["templates"].as_object().unwrap();
    assert_eq!(templates.len(), 2);
    for (t, want) in templates {
        let want = want.as_array().unwrap();
        let err = data::load_records(
            &file,
            &chat_tok(t),
            &opts(None, 4096),
            &ChatOptions::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(&format!(
                "gemma2_refusals.jsonl: {} of 5 records cannot be used",
                want.len()
            )),
            "{t}: {err}"
        );
        let lines: Vec<&str> = err
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("record "))
            .collect();
        assert_eq!(lines.len(), want.len(), "{t}: {err}");
        for (line, w) in lines.iter().zip(want) {
            let at = format!("record {} (line {}): ", w["record"], w["line"]);
            let message = w["message"].as_str().unwrap();
            let head = if w["raise_exception"] == true {
                format!("{at}the chat template refuses the conversation (\"{message}\"). ")
            } else {
                format!("{at}chat template: ")
            };
            assert!(
                line.starts_with(&head),
                "{t}: {line}\nshould start with\n{head}"
            );
        }
        let n = lines.len();
        assert!(
            lines[n - 2].ends_with(
                "The template wants user and assistant messages to alternate: merge \
                 consecutive messages of one role into one (messages 0 and 1 are both user)"
            ),
            "{t}: {}",
            lines[n - 2]
        );
        assert!(
            lines[n - 1].ends_with(
                "The template wants the conversation to start with a user message \
                 (message 0 is assistant)"
            ),
            "{t}: {}",
            lines[n - 1]
        );
    }
}

#[test]
fn phi4_mini_turns_render_and_train_like_transformers() {
    // Phi-4-mini-instruct's template: no newline after a role header or <|end|>, untrimmed
    // content, an empty system message rendered, eos_token after the last message without a
    // generation prompt. The reference masks are transformers' assistant masks with a copy of the
    // template tagged as TRL's phi3_training.jinja tags Phi-3 (make_chat_fixtures.py).
    for file in [
        "parts.jsonl",
        "weight.jsonl",
        "alternating.jsonl",
        "system.jsonl",
        "pc_chat.jsonl",
        "pc_alternating.jsonl",
    ] {
        assert_eq!(check_chat_cases(file, Some("phi4_mini")), 1, "{file}");
    }
    let c = case("phi4_mini", "system.jsonl");
    let empty = c["records"][1]["rendered"].as_str().unwrap();
    assert!(
        empty.starts_with("<|system|><|end|><|user|>What is the capital of France?<|end|>"),
        "{empty}"
    );
    // An earlier turn stops at its <|end|>; the last one takes eos_token.
    let s = highlighted("phi4_mini", "system.jsonl", 0);
    assert!(
        s.contains("<|assistant|>[[Hello! How can I help?<|end|>]]<|user|>")
            && s.ends_with("<|assistant|>[[7<|end|><|im_end|>]]"),
        "{s}"
    );
}

#[test]
fn generation_prompts_render_like_transformers() {
    // What `qlora-rs generate --chat` feeds the model (TextTokenizer::chat_prompt: one user
    // message with the generation prompt) and longer conversations with it, for Gemma 3 (a
    // system message folded in by gemma3_trl) and Phi-4-mini: transformers' rendering and ids.
    let g = chat_golden();
    let prompts = g["generation_prompts"].as_array().unwrap();
    for t in ["gemma3", "gemma3_trl", "phi4_mini"] {
        assert_eq!(
            prompts.iter().filter(|p| p["template"] == t).count(),
            2,
            "{t}"
        );
    }
    for p in prompts {
        let name = p["template"].as_str().unwrap();
        let t = chat_tok(name);
        let msgs = messages(&p["messages"]);
        let ids = u32s(&p["ids"]);
        let text = t
            .chat_template
            .as_ref()
            .unwrap()
            .render(&msgs, true)
            .unwrap();
        assert_eq!(text, p["rendered"].as_str().unwrap(), "{name}");
        assert_eq!(t.encode(&text, false).unwrap().0, ids, "{name}");
        if let [m] = &msgs[..] {
            assert_eq!(m.role, "user");
            assert_eq!(t.chat_prompt(&m.content).unwrap(), ids, "{name}");
        }
    }
}
