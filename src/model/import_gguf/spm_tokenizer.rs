//! A GGUF file's SentencePiece tokenizer (`tokenizer.ggml.model == "llama"`: Llama 2, Gemma,
//! Phi-3) as a Hugging Face `tokenizer.json`, written as Hugging Face's own converters write a
//! Llama / Gemma tokenizer, so that it tokenizes as llama.cpp's SPM tokenizer
//! (`llm_tokenizer_spm` in llama-vocab.cpp) does:
//!
//! - llama.cpp writes spaces as `▁` and, with `tokenizer.ggml.add_space_prefix` (its default:
//!   true), puts one before the text and after every special token → a `Replace(" ", "▁")`
//!   normalizer, after a `Prepend("▁")` when the prefix is added (the normalizer runs on each
//!   piece of text between added tokens, as llama.cpp's prefix does);
//! - llama.cpp merges the adjacent pair whose concatenation is a token of the highest score
//!   (leftmost first) → a BPE model whose merges are every split of each normal token into two
//!   tokens, ranked by the merged token's score (highest first; then as Hugging Face's
//!   `generate_merges` orders them: longer left part, longer right part, token id, part ids);
//! - what no token covers falls back to the `<0xXX>` byte tokens → `byte_fallback`, with
//!   the unknown token (`tokenizer.ggml.unknown_token_id`) as `unk_token`;
//! - control and unknown tokens (types 3, 2) → special added tokens, user-defined ones (4) →
//!   non-special added tokens (matched in the raw text, as llama.cpp's special-token pass;
//!   stripping the whitespace after them for Phi-3, as in [`super::tokenizer`]);
//!   normal (1), unused (5) and byte (6) tokens → the vocabulary only;
//! - decoder `Replace("▁", " ")`, `ByteFallback`, `Fuse`, and `Strip` of the prefix space when
//!   one is added;
//! - `tokenizer.ggml.add_bos_token` / `add_eos_token` (llama.cpp's defaults: BOS, no EOS) → a
//!   TemplateProcessing post-processor.
//!
//! One difference remains, between tokens of equal score: llama.cpp then merges the leftmost
//! pair, the BPE model the pair of the lower-ranked merge. SentencePiece gives each merged
//! piece its own score (minus its rank), so only pieces of equal score can differ (user-defined
//! pieces, score 0, as Gemma's runs of spaces, when two of them compete in one word).
//!
//! `tokenizer.ggml.pre` is not used by llama.cpp's SPM tokenizer and is not read. The
//! SentencePiece model itself (`tokenizer.model`) is not in a GGUF file, so none is written:
//! Hugging Face's fast tokenizer (and this crate) need only `tokenizer.json`.

use std::collections::HashMap;

use serde_json::{json, Map, Value as Json};

use super::tokenizer::{
    added_tokens, check_loads, config_json, flag, strings, template, token_id, token_types,
    TokenizerFiles, NORMAL,
};
use crate::error::Result;
use crate::quant::gguf::GgufFile;

/// The BPE merges llama.cpp's score order implies: every split of a normal token into two
/// tokens, highest merged score first (ties as Hugging Face's `generate_merges`).
fn merges(tokens: &[&str], types: &[i64], scores: &[f32], ids: &HashMap<&str, usize>) -> Vec<Json> {
    let mut all: Vec<(f32, usize, usize, usize, usize)> = Vec::new();
    for (id, (t, &ty)) in tokens.iter().zip(types).enumerate() {
        if ty != NORMAL {
            continue;
        }
        let mut local = Vec::new();
        for (cut, _) in t.char_indices().skip(1) {
            let (l, r) = t.split_at(cut);
            if let (Some(&a), Some(&b)) = (ids.get(l), ids.get(r)) {
                local.push((a, b, l.len(), r.len()));
            }
        }
        local.sort_by_key(|&(a, b, _, _)| (a, b));
        all.extend(
            local
                .into_iter()
                .map(|(a, b, la, lb)| (scores[id], la, lb, a, b)),
        );
    }
    // Stable: equal keys keep the token order.
    all.sort_by(|x, y| y.0.total_cmp(&x.0).then(y.1.cmp(&x.1)).then(y.2.cmp(&x.2)));
    all.into_iter()
        .map(|(_, _, _, a, b)| json!([tokens[a], tokens[b]]))
        .collect()
}

/// Builds both files from `g`'s `llama` tokenizer metadata.
pub fn build(g: &GgufFile, model_max_length: usize) -> Result<TokenizerFiles> {
    let tokens = strings(g, "tokenizer.ggml.tokens")?
        .ok_or_else(|| g.error("metadata `tokenizer.ggml.tokens` is missing"))?;
    let n = tokens.len();
    let scores: Vec<f32> = {
        let bad = || {
            g.error(format!(
                "metadata `tokenizer.ggml.scores` must be {n} numbers, one per token (a \
                 SentencePiece vocabulary is merged by score)"
            ))
        };
        let a = g
            .get("tokenizer.ggml.scores")
            .and_then(|v| v.as_array())
            .ok_or_else(bad)?;
        if a.len() != n {
            return Err(bad());
        }
        a.iter()
            .map(|x| x.as_f64().map(|f| f as f32).ok_or_else(bad))
            .collect::<Result<_>>()?
    };
    let types = token_types(g, n)?;
    let mut vocab = Map::new();
    let mut ids: HashMap<&str, usize> = HashMap::with_capacity(n);
    for (id, t) in tokens.iter().enumerate() {
        if let Some(prev) = ids.insert(t, id) {
            return Err(g.error(format!(
                "tokenizer.ggml.tokens: tokens {prev} and {id} are both {t:?}"
            )));
        }
        vocab.insert((*t).to_string(), json!(id));
    }
    let missing_bytes: Vec<String> = (0..=255u8)
        .map(|b| format!("<0x{b:02X}>"))
        .filter(|b| !ids.contains_key(b.as_str()))
        .collect();
    let name =
        |key: &str| -> Result<Option<&str>> { Ok(token_id(g, key, n)?.map(|id| tokens[id])) };
    let bos = name("tokenizer.ggml.bos_token_id")?;
    let eos = name("tokenizer.ggml.eos_token_id")?;
    let unk = name("tokenizer.ggml.unknown_token_id")?;
    let pad = name("tokenizer.ggml.padding_token_id")?;
    if !missing_bytes.is_empty() && unk.is_none() {
        return Err(g.error(format!(
            "tokenizer.ggml.tokens lacks the byte tokens {} and there is no \
             tokenizer.ggml.unknown_token_id for what they would cover",
            missing_bytes.join(" ")
        )));
    }
    let add_bos = flag(g, "tokenizer.ggml.add_bos_token")?.unwrap_or(true);
    let add_eos = flag(g, "tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let prefix = flag(g, "tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
    let missing = |what: &str| {
        g.error(format!(
            "tokenizer.ggml.add_{what}_token is set (or llama.cpp's default for a SentencePiece \
             tokenizer) but there is no {what}_token_id"
        ))
    };
    let bos_added = if add_bos {
        Some(bos.ok_or_else(|| missing("bos"))?)
    } else {
        None
    };
    let eos_added = if add_eos {
        Some(eos.ok_or_else(|| missing("eos"))?)
    } else {
        None
    };
    let (added, special_tokens) = added_tokens(g, &tokens, &types);
    let merge_list = merges(&tokens, &types, &scores, &ids);

    let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
    let normalizer = if prefix {
        json!({"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u{2581}"},
            replace,
        ]})
    } else {
        replace
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let post = if bos_added.is_some() || eos_added.is_some() {
        template(bos_added, eos_added, &ids)
    } else {
        Json::Null
    };
    let tokenizer_json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": null,
        "post_processor": post,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": unk,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": true,
            "byte_fallback": true,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merge_list,
        },
    });
    check_loads(g, &tokenizer_json)?;
    // No `add_prefix_space` in the config: the normalizer holds it, and some transformers
    // versions would rebuild the tokenizer from a tokenizer.model the folder lacks.
    let config = config_json(g, [bos, eos, unk, pad], add_bos, add_eos, model_max_length)?;
    Ok(TokenizerFiles {
        model: "llama",
        tokenizer_json,
        tokenizer_config: config,
        pre: "default".into(),
        tokens: n,
        special_tokens,
    })
}
