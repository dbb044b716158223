//! Text generation with a KV cache (CPU): the prompt is run once (prefill), then one token at a
//! time, each attending to the cached keys and values of everything before it. Greedy at
//! temperature 0; otherwise softmax(logits / T) restricted to the smallest set of tokens whose
//! probability reaches `top_p`, sampled from a seeded generator.

use rand::{Rng, SeedableRng};

use super::llama::Llama;
use super::lora::{LoraParams, Target};
use crate::autograd::{Frozen, NormId};
use crate::error::{Error, Result};
use crate::ops::{attention, cross_entropy, embedding, linear, residual, rmsnorm, rope, swiglu};

/// How to pick tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// 0: greedy.
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    pub max_new_tokens: usize,
}

impl Sampling {
    /// Checks the numbers: a temperature that is finite and not negative, top-p in (0, 1].
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "--temperature must be 0 (greedy) or positive and finite, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::InvalidArgument(format!(
                "--top-p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// Keys and values of every layer for the tokens seen so far.
struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
}

impl Llama {
    fn project(
        &self,
        l: usize,
        t: Target,
        x: &[f32],
        tokens: usize,
        lora: Option<&LoraParams>,
    ) -> Result<Vec<f32>> {
        let (i, o) = t.dims(&self.config);
        let w = self.base_weight(l, t)?;
        let adapter = lora.and_then(|p| {
            p.slot(l, t).map(|s| linear::Lora {
                a: &p.values[p.slots[s].a.clone()],
                b: &p.values[p.slots[s].b.clone()],
                rank: p.config.rank,
                scale: p.config.scale(),
            })
        });
        let dims = linear::Dims {
            tokens,
            in_features: i,
            out_features: o,
        };
        Ok(linear::forward(dims, x, &w, self.bias(l, t), adapter.as_ref(), None)?.0)
    }

    /// Runs `ids` (positions `cache.len..`) through the model, extending the cache; returns the
    /// logits of the last token.
    fn decode_step(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        lora: Option<&LoraParams>,
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        let (d, n) = (c.hidden_size, ids.len());
        let start = cache.len;
        let positions: Vec<u32> = (start..start + n).map(|p| p as u32).collect();
        let dims = attention::Dims {
            heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
        };
        let mut h = embedding::forward(self.embedding(), d, ids)?;
        for l in 0..c.num_layers {
            let (x, _) = rmsnorm::forward(&h, self.norm(NormId::Input(l)), d, c.rms_norm_eps)?;
            let mut q = self.project(l, Target::Q, &x, n, lora)?;
            let mut k = self.project(l, Target::K, &x, n, lora)?;
            let v = self.project(l, Target::V, &x, n, lora)?;
            rope::forward(
                &mut q,
                &positions,
                c.num_heads,
                c.head_dim,
                self.rope_freqs(),
            )?;
            rope::forward(
                &mut k,
                &positions,
                c.num_kv_heads,
                c.head_dim,
                self.rope_freqs(),
            )?;
            cache.k[l].extend_from_slice(&k);
            cache.v[l].extend_from_slice(&v);
            let o = attention::forward_cached(dims, &q, &cache.k[l], &cache.v[l], start)?;
            let a = self.project(l, Target::O, &o, n, lora)?;
            let h1 = residual::forward(&h, &a)?;
            let (x, _) =
                rmsnorm::forward(&h1, self.norm(NormId::PostAttention(l)), d, c.rms_norm_eps)?;
            let g = self.project(l, Target::Gate, &x, n, lora)?;
            let u = self.project(l, Target::Up, &x, n, lora)?;
            let s = swiglu::forward(&g, &u)?;
            let down = self.project(l, Target::Down, &s, n, lora)?;
            h = residual::forward(&h1, &down)?;
        }
        cache.len += n;
        let last = &h[(n - 1) * d..];
        let (x, _) = rmsnorm::forward(last, self.norm(NormId::Final), d, c.rms_norm_eps)?;
        Ok(cross_entropy::logits(&x, self.output_embedding(), d))
    }

    /// Generates after `prompt`, calling `on_token` with each new id; stops at `eos` (when given)
    /// or after `max_new_tokens`. Returns the new ids.
    pub fn generate(
        &self,
        lora: Option<&LoraParams>,
        prompt: &[u32],
        eos: Option<u32>,
        sampling: Sampling,
        on_token: &mut dyn FnMut(u32) -> Result<()>,
    ) -> Result<Vec<u32>> {
        let c = &self.config;
        let mut cache = KvCache {
            k: vec![Vec::new(); c.num_layers],
            v: vec![Vec::new(); c.num_layers],
            len: 0,
        };
        let context = c.max_position_embeddings;
        generate_with(prompt, eos, sampling, context, on_token, &mut |new| {
            self.decode_step(new, &mut cache, lora)
        })
    }
}

/// The sampling loop over any model: `next_logits` gets the tokens not yet seen (the prompt,
/// then each new token) and returns the logits of the last position. Used by the CPU model
/// (with its KV cache) and by the CUDA model (`qlora-rs generate --device cuda`). Stops at
/// `eos`, after `max_new_tokens`, or when prompt and output fill the model's `context` (its
/// `max_position_embeddings`), whichever comes first.
pub fn generate_with(
    prompt: &[u32],
    eos: Option<u32>,
    sampling: Sampling,
    context: usize,
    on_token: &mut dyn FnMut(u32) -> Result<()>,
    next_logits: &mut dyn FnMut(&[u32]) -> Result<Vec<f32>>,
) -> Result<Vec<u32>> {
    sampling.validate()?;
    if prompt.is_empty() {
        return Err(Error::InvalidArgument(
            "generate: the prompt has no tokens".into(),
        ));
    }
    if prompt.len() >= context {
        return Err(Error::InvalidArgument(format!(
            "generate: the prompt has {} tokens and the model's context is {context} \
             (max_position_embeddings): no room for a new one",
            prompt.len()
        )));
    }
    if sampling.max_new_tokens == 0 {
        return Ok(Vec::new());
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(sampling.seed);
    let mut logits = next_logits(prompt)?;
    let mut out = Vec::new();
    loop {
        let next = pick(&logits, sampling, &mut rng);
        out.push(next);
        on_token(next)?;
        if Some(next) == eos
            || out.len() >= sampling.max_new_tokens
            || prompt.len() + out.len() >= context
        {
            break;
        }
        logits = next_logits(&[next])?;
    }
    Ok(out)
}

/// The next token from one row of logits.
fn pick(logits: &[f32], s: Sampling, rng: &mut impl Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
                if v > bv {
                    (i, v)
                } else {
                    (bi, bv)
                }
            })
            .0 as u32
    };
    if s.temperature <= 0.0 {
        return argmax();
    }
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &z)| (i, ((z as f64 - m) / s.temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = 0.0;
    let mut cut = probs.len();
    for (i, p) in probs.iter().enumerate() {
        kept += p.1 / total;
        if kept >= s.top_p {
            cut = i + 1;
            break;
        }
    }
    probs.truncate(cut);
    let mass: f64 = probs.iter().map(|p| p.1).sum();
    let mut r = rng.random::<f64>() * mass;
    for &(i, p) in &probs {
        if r < p {
            return i as u32;
        }
        r -= p;
    }
    probs.last().map_or_else(argmax, |p| p.0 as u32)
}
