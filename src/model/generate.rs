//! Text generation through the one decoder: on the CPU with a KV cache (the prompt is run once,
//! then one token at a time, each attending to the cached keys and values of everything before
//! it); on a GPU by running the whole sequence per new token (no KV cache there yet). Greedy at
//! temperature 0; otherwise softmax(logits / T) restricted to the smallest set of tokens whose
//! probability reaches `top_p`, sampled from a seeded generator.

use rand::{Rng, SeedableRng};

use super::adapters::Adapters;
use super::llama::Llama;
use super::lora::LoraParams;
use crate::autograd::KvCache;
use crate::device::Device;
use crate::error::{Error, Result};

/// How to pick tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// 0: greedy.
    pub temperature: f64,
    /// Nucleus sampling: only the most likely tokens whose probabilities add up to this.
    pub top_p: f64,
    /// Seed of the sampler.
    pub seed: u64,
    /// Most tokens to generate.
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

impl Llama {
    /// Generates after `prompt` on the model's device, calling `on_token` with each new id;
    /// stops at `eos` (when given), after `max_new_tokens`, or at the model's context. Returns the
    /// new ids.
    pub fn generate(
        &self,
        lora: Option<&LoraParams>,
        prompt: &[u32],
        eos: Option<u32>,
        sampling: Sampling,
        on_token: &mut dyn FnMut(u32) -> Result<()>,
    ) -> Result<Vec<u32>> {
        let adapters = self.adapters_for(lora)?;
        self.generate_with_adapters(adapters.as_ref(), prompt, eos, sampling, on_token)
    }

    /// [`Llama::generate`] with adapters already on the model's device. On the CPU the prompt
    /// runs once and each new token attends to a KV cache; on a GPU (no KV cache yet) each new
    /// token runs the forward over the whole sequence.
    pub fn generate_with_adapters(
        &self,
        adapters: Option<&Adapters>,
        prompt: &[u32],
        eos: Option<u32>,
        sampling: Sampling,
        on_token: &mut dyn FnMut(u32) -> Result<()>,
    ) -> Result<Vec<u32>> {
        let context = self.config.max_position_embeddings;
        match self.device() {
            Device::Cpu => {
                let mut cache = vec![KvCache::default(); self.config.num_layers];
                generate_with(prompt, eos, sampling, context, on_token, &mut |new| {
                    self.decode_step(adapters, new, &mut cache)
                })
            }
            Device::Cuda(_) => {
                let mut seen: Vec<u32> = Vec::new();
                generate_with(prompt, eos, sampling, context, on_token, &mut |new| {
                    seen.extend_from_slice(new);
                    self.last_logits(adapters, &seen)
                })
            }
        }
    }
}

/// The sampling loop over any model: `next_logits` gets the tokens not yet seen (the prompt,
/// then each new token) and returns the logits of the last position. Stops at
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
