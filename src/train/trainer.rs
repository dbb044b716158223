//! The training loop: `Trainer::new(cfg)?.run()?`.
//!
//! Each optimizer step takes up to `grad_accum` packed micro-batches of the current epoch, runs
//! forward and backward on each with the gradient scaled by 1 / (tokens counted in the whole
//! step) — so accumulation gives the same gradient as one big batch — clips the global norm,
//! and applies AdamW at the schedule's rate. The data order of epoch e is a permutation drawn
//! from (seed, e); dropout masks come from (seed, step, micro-batch). A checkpoint therefore
//! only needs the adapter, the optimizer state and (step, epoch, position): a resumed run
//! repeats the uninterrupted one's losses exactly.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::checkpoint::{self, TrainState};
use super::config::TrainConfig;
use super::metrics::{self, Metrics, MetricsLog};
use super::optimizer::{AdamW, AdamWConfig};
use super::plot;
use super::run_dir::RunDir;
use super::schedule::Schedule;
use crate::autograd::Losses;
use crate::data::tokenizer::TextTokenizer;
use crate::data::{self, DataOptions, DataStats, MicroBatch, Sequence};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::io::adapters;
use crate::model::adapters::Adapters;
use crate::model::llama::{BaseFormat, Llama};
use crate::model::lora::LoraParams;
use crate::ops::dropout;
use crate::quant::nf4::Nf4Config;

/// A NaN or infinite loss or gradient norm stops the run: an error naming the step (`exact`:
/// this very step; else at or before it, the GPU's values being read on logged steps only).
/// Checkpoints already written stay, and no adapter with non-finite weights is ever written.
fn non_finite(step: u64, loss: f64, grad_norm: f64, exact: bool) -> Result<()> {
    if loss.is_finite() && grad_norm.is_finite() {
        return Ok(());
    }
    let when = if exact {
        format!("at step {step}")
    } else {
        format!("at or before step {step} (--logging-steps 1 names the exact step)")
    };
    Err(Error::InvalidArgument(format!(
        "training stopped {when}: the loss is {loss} and the gradient norm {grad_norm}; the \
         checkpoints written before it are intact (a lower --lr, --max-grad-norm, or the data \
         of that step may be the cause)"
    )))
}

/// The optimizer skipped the update of step `bad` and every later one (a non-finite gradient
/// norm, found on a GPU only when its values are read back).
fn non_finite_on_device(bad: u64) -> Error {
    Error::InvalidArgument(format!(
        "training stopped: the gradients of step {bad} were not finite (NaN or Inf), so the \
         optimizer skipped that update and the ones after it; the adapters are those of step {}, and the \
         checkpoints written before are intact (a lower --lr, --max-grad-norm, or the data of \
         that step may be the cause)",
        bad - 1
    ))
}

/// What the loop reports after each step (for progress bars and logs).
#[derive(Clone, Debug)]
pub struct Progress<'a> {
    /// The step's metrics line (or an evaluation's, with `eval_loss` set).
    pub metrics: &'a Metrics,
    /// Optimizer steps the run will take in all.
    pub total_steps: u64,
    /// During an evaluation: micro-batches done and in all (`metrics` then carries only the
    /// step).
    pub evaluating: Option<(usize, usize)>,
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// Optimizer steps completed in all (a resumed run counts those before it).
    pub steps: u64,
    /// Training loss of the last step run (`None` when it was not a logged step).
    pub last_loss: Option<f64>,
    /// The latest evaluation-set loss (`None` without evaluation data, or when none ran).
    pub eval_loss: Option<f64>,
    /// Stopped by the stop flag (Ctrl-C) before the last step; a checkpoint was written.
    pub interrupted: bool,
    /// The output folder (adapter, checkpoints, metrics).
    pub output: PathBuf,
}

/// A training run: the model, its data, the adapters and optimizer, and the loop over them.
pub struct Trainer {
    /// The run's configuration.
    pub config: TrainConfig,
    /// The model, on the device it trains on.
    pub model: Llama,
    /// The tokenizer of the model folder.
    pub tokenizer: TextTokenizer,
    /// The adapters and optimizer state as of the last checkpoint or output (a host copy of
    /// `adapters`, which live on the model's device).
    pub lora: LoraParams,
    /// AdamW state as of the last checkpoint or output (a host copy, like `lora`).
    pub optimizer: AdamW,
    /// The adapters, their gradients and AdamW state, on the model's device.
    pub adapters: Adapters,
    /// What loading the training data file found (records, truncations, tokens).
    pub data_stats: DataStats,
    /// The same for the `eval_data` file, when one is given.
    pub eval_data_stats: Option<DataStats>,
    train: Vec<Sequence>,
    eval: Vec<Sequence>,
    state: TrainState,
    total_steps: u64,
    schedule: Schedule,
    epoch_batches: Vec<MicroBatch>,
    metrics: MetricsLog,
    stop: Arc<AtomicBool>,
    /// What the steps since the last logged one add up to (`logging_steps`).
    pending: PendingLog,
    /// The output folder, locked while the trainer lives.
    _run_dir: RunDir,
}

/// Loss and throughput of the optimizer steps not yet logged.
#[derive(Default)]
struct PendingLog {
    steps: Vec<PendingStep>,
    tokens: usize,
    started: Option<Instant>,
}

/// One unlogged step's losses (on a GPU still there, read back only when logged), over `counted`
/// tokens.
struct PendingStep {
    losses: Vec<Losses>,
    counted: usize,
}

/// The settings a resumed run must share with the run it continues.
fn resume_mismatches(saved: &TrainConfig, now: &TrainConfig) -> Vec<String> {
    let a = serde_json::to_value(saved).expect("plain struct");
    let b = serde_json::to_value(now).expect("plain struct");
    let free = [
        "output",
        "resume",
        "overwrite",
        "eval_every",
        "save_every",
        "max_steps",
        "epochs",
        "eval_data",
        "eval_split",
    ];
    a.as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| !free.contains(&k.as_str()))
        .filter(|(k, v)| b.get(k.as_str()) != Some(v))
        .map(|(k, v)| format!("{k} (checkpoint: {v}, now: {})", b[k.as_str()]))
        .collect()
}

fn resident_memory() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

impl Trainer {
    /// [`Trainer::new_on`] the CPU.
    pub fn new(config: TrainConfig) -> Result<Trainer> {
        Trainer::new_on(config, Device::Cpu)
    }

    /// Loads the model (base quantized to NF4), tokenizer and data, and the latest checkpoint
    /// with `resume`, for training on `device`. Refuses an output folder holding another run
    /// unless `resume`/`overwrite`.
    pub fn new_on(config: TrainConfig, device: Device) -> Result<Trainer> {
        config.validate()?;
        // `--tools` and `--chat-template-kwargs` are read before anything else loads.
        let chat = config.chat_options()?;
        let mut run_dir = RunDir::open(&config)?;
        let format = BaseFormat::Nf4(Nf4Config {
            blocksize: config.quant_blocksize,
            double_quant: true,
        });
        if let Device::Cuda(o) = device {
            // Refused up front, with the plan, rather than out of memory mid-load or mid-step.
            crate::model::llama::check_model_dir(&config.model)?;
            let c =
                crate::model::config::LlamaConfig::from_file(&config.model.join("config.json"))?;
            crate::model::llama::check_gpu_support(&c, format)?;
            let plan = crate::model::memory::plan(&c, &config.lora()?, config.batch_tokens)?;
            let dev = crate::device::cuda::CudaDevice::get(o)?;
            let free = dev.total_memory()?.saturating_sub(dev.memory_used()?) as u64;
            if plan.total() > free {
                let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
                return Err(Error::InvalidArgument(format!(
                    "this run needs {:.2} GiB on cuda:{o} and {:.2} GiB is free: lower \
                     --batch-tokens or --rank, or adapt fewer --targets (`qlora-rs plan` shows \
                     where it goes)",
                    gib(plan.total()),
                    gib(free)
                )));
            }
        }
        // The model's config, tokenizer and data before its weights: a bad record is refused
        // in seconds, not after the model has loaded.
        crate::model::llama::check_model_dir(&config.model)?;
        let model_config =
            crate::model::config::LlamaConfig::from_file(&config.model.join("config.json"))?;
        let tokenizer = TextTokenizer::load(&config.model)?;
        if tokenizer.vocab_size() > model_config.vocab_size {
            return Err(Error::InvalidArgument(format!(
                "the tokenizer has {} tokens but the model's vocabulary is {}",
                tokenizer.vocab_size(),
                model_config.vocab_size
            )));
        }
        let opts = config.data_options()?;
        let load = |path: &Path| -> Result<(Vec<Sequence>, DataStats)> {
            let (seqs, stats) = data::load_records(path, &tokenizer, &opts, &chat)?;
            Ok((seqs.into_iter().map(|(_, s)| s).collect(), stats))
        };
        let (mut train, data_stats) = load(&config.data)?;
        let mut eval_data_stats = None;
        let eval = match (&config.eval_data, config.eval_split) {
            (Some(path), _) => {
                let (seqs, stats) = load(path)?;
                eval_data_stats = Some(stats);
                seqs
            }
            (None, f) if f > 0.0 => {
                if train.len() < 2 {
                    return Err(Error::InvalidArgument(format!(
                        "--eval-split {f}: {} holds {} usable record(s); a split needs at least \
                         one on each side (give --eval-data, or no split)",
                        config.data.display(),
                        train.len()
                    )));
                }
                let mut order: Vec<usize> = (0..train.len()).collect();
                order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(config.seed ^ 0xE7A1));
                let n_eval = ((train.len() as f64 * f).round() as usize)
                    .clamp(1, train.len().saturating_sub(1));
                let held: std::collections::HashSet<usize> =
                    order[..n_eval].iter().copied().collect();
                let mut keep = Vec::new();
                let mut eval = Vec::new();
                for (i, s) in train.drain(..).enumerate() {
                    if held.contains(&i) {
                        eval.push(s)
                    } else {
                        keep.push(s)
                    }
                }
                train = keep;
                eval
            }
            _ => Vec::new(),
        };
        if train.is_empty() {
            return Err(Error::InvalidArgument(
                "no training sequences left after the evaluation split".into(),
            ));
        }
        let model = Llama::load_on(&config.model, format, device)?;
        let latest = if config.resume {
            checkpoint::latest(&config.output)?
        } else {
            None
        };
        if config.resume && latest.is_none() {
            return Err(Error::InvalidArgument(format!(
                "--resume: {} has no checkpoint to resume from",
                config.output.display()
            )));
        }
        let adamw = AdamWConfig {
            beta1: config.beta1,
            beta2: config.beta2,
            eps: config.eps,
            weight_decay: config.weight_decay,
        };
        let (lora, optimizer, state) = match latest {
            Some(dir) => {
                let (lora, mut opt, state) = checkpoint::load(&dir, &model.config)?;
                let diff = resume_mismatches(&state.config, &config);
                if !diff.is_empty() {
                    return Err(Error::InvalidArgument(format!(
                        "--resume: the checkpoint in {} was made with other settings: {}",
                        dir.display(),
                        diff.join("; ")
                    )));
                }
                let now = checkpoint::fingerprint(&config.data)?;
                if let Some(then) = &state.data_fingerprint {
                    if *then != now {
                        return Err(Error::InvalidArgument(format!(
                            "--resume: {} changed since the checkpoint in {} was written (then: \
                             {then}; now: {now}): resuming would train on other data than the \
                             run planned; restore the file or start a new run",
                            config.data.display(),
                            dir.display()
                        )));
                    }
                }
                if let Some(max) = config.max_steps {
                    if max < state.step {
                        return Err(Error::InvalidArgument(format!(
                            "--resume --max-steps {max}: the checkpoint in {} is already at step \
                             {}",
                            dir.display(),
                            state.step
                        )));
                    }
                }
                opt.config = adamw;
                let state = TrainState {
                    config: config.clone(),
                    data_fingerprint: Some(now),
                    ..state
                };
                (lora, opt, state)
            }
            None => {
                let lora = LoraParams::init(&model.config, config.lora()?, config.seed)?;
                let opt = AdamW::new(adamw, lora.len());
                let state = TrainState {
                    step: 0,
                    epoch: 0,
                    cursor: 0,
                    tokens_seen: 0,
                    config: config.clone(),
                    data_fingerprint: Some(checkpoint::fingerprint(&config.data)?),
                };
                (lora, opt, state)
            }
        };
        // Every input has loaded: now the run this one replaces (--overwrite) may go.
        run_dir.start()?;
        let mut trainer = Trainer {
            metrics: MetricsLog::open(&config.output, Some(state.step))?,
            adapters: Adapters::new(&lora, Some(&optimizer), adamw, device)?,
            total_steps: 0,
            schedule: Schedule {
                kind: config.schedule,
                lr: config.lr,
                warmup: config.warmup_steps,
                total: 0,
            },
            epoch_batches: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            pending: PendingLog::default(),
            _run_dir: run_dir,
            config,
            model,
            tokenizer,
            lora,
            optimizer,
            data_stats,
            eval_data_stats,
            train,
            eval,
            state,
        };
        trainer.total_steps = trainer.count_steps();
        trainer.schedule.total = trainer.total_steps;
        trainer.epoch_batches = trainer.batches_of_epoch(trainer.state.epoch);
        Ok(trainer)
    }

    fn batches_of_epoch(&self, epoch: u64) -> Vec<MicroBatch> {
        let order = data::epoch_order(self.train.len(), self.config.seed, epoch);
        let seqs: Vec<&Sequence> = order.iter().map(|&i| &self.train[i]).collect();
        data::pack(&seqs, self.config.batch_tokens)
    }

    fn count_steps(&self) -> u64 {
        if let Some(m) = self.config.max_steps {
            return m;
        }
        (0..self.config.epochs)
            .map(|e| (self.batches_of_epoch(e).len() as u64).div_ceil(self.config.grad_accum))
            .sum()
    }

    /// Optimizer steps the run will take.
    pub fn total_steps(&self) -> u64 {
        self.total_steps
    }

    /// Optimizer steps taken.
    pub fn step(&self) -> u64 {
        self.state.step
    }

    /// Training and evaluation sequence counts.
    pub fn dataset_sizes(&self) -> (usize, usize) {
        (self.train.len(), self.eval.len())
    }

    /// A flag that, once set (e.g. by Ctrl-C), makes the loop save a checkpoint and return.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// The next step's micro-batches (up to grad_accum, never across an epoch boundary).
    fn next_batches(&mut self) -> Vec<MicroBatch> {
        if self.state.cursor >= self.epoch_batches.len() {
            self.state.epoch += 1;
            self.state.cursor = 0;
            self.epoch_batches = self.batches_of_epoch(self.state.epoch);
        }
        let end =
            (self.state.cursor + self.config.grad_accum as usize).min(self.epoch_batches.len());
        let out = self.epoch_batches[self.state.cursor..end].to_vec();
        self.state.cursor = end;
        out
    }

    /// One optimizer step. Its metrics carry the loss, grad norm and throughput (averaged since the
    /// last logged step) on logged steps (`logging_steps`, and the last step), and only the step
    /// number, epoch and lr otherwise.
    pub fn train_step(&mut self) -> Result<Metrics> {
        let started = Instant::now();
        let batches = self.next_batches();
        let counted: usize = batches.iter().map(MicroBatch::counted).sum();
        let tokens: usize = batches.iter().map(|b| b.ids.len()).sum();
        let scale = 1.0 / counted.max(1) as f32;
        let lr = self.schedule.lr(self.state.step);
        let next = self.state.step + 1;
        let log = next.is_multiple_of(self.config.logging_steps.max(1)) || next >= self.total_steps;
        self.pending.started.get_or_insert(started);
        self.pending.tokens += tokens;
        let mut step = PendingStep {
            losses: Vec::with_capacity(batches.len()),
            counted,
        };
        self.adapters.zero_grads()?;
        for (i, b) in batches.iter().enumerate() {
            let seed = dropout::batch_seed(self.config.seed, self.state.step, i);
            let (losses, _) = self.model.train_micro_batch(
                &self.adapters,
                &b.ids,
                &b.labels,
                &b.cu_seqlens,
                scale,
                seed,
            )?;
            step.losses.push(losses);
        }
        // A non-finite gradient norm skips the update (the adapters stay as the last good step
        // left them) and stops the run: at once where the norm is known without a
        // synchronisation (the CPU), on the next logged step on a GPU.
        let (grad_norm, memory) = match self.adapters.step(lr, self.config.max_grad_norm)? {
            Some(norm) => {
                let mut loss = 0.0;
                for l in &step.losses {
                    loss += l.sum()?;
                }
                non_finite(next, loss / counted.max(1) as f64, norm, true)?;
                (Some(norm), resident_memory())
            }
            None if log => {
                // The only host synchronisation: the logged step's read-backs.
                if let Some(bad) = self.adapters.first_non_finite_step()? {
                    return Err(non_finite_on_device(bad));
                }
                let used = match self.model.device() {
                    Device::Cuda(o) => {
                        Some(crate::device::cuda::CudaDevice::get(o)?.memory_used()? as u64)
                    }
                    Device::Cpu => resident_memory(),
                };
                (Some(self.adapters.grad_norm()?), used)
            }
            None => (None, None),
        };
        self.pending.steps.push(step);
        self.state.step += 1;
        self.state.tokens_seen += tokens as u64;
        let mut m = Metrics {
            step: self.state.step,
            epoch: self.state.epoch,
            lr: Some(lr),
            ..Metrics::default()
        };
        if log {
            let p = std::mem::take(&mut self.pending);
            let secs = p.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
            // The mean of the steps' per-token mean losses (as transformers logs).
            let mut total = 0.0;
            for st in &p.steps {
                let mut sum = 0.0;
                for l in &st.losses {
                    sum += l.sum()?;
                }
                total += sum / st.counted.max(1) as f64;
            }
            m.loss = Some(total / p.steps.len().max(1) as f64);
            m.grad_norm = grad_norm;
            if self.model.device() != Device::Cpu {
                // The GPU's losses and norm reach the host only on logged steps.
                non_finite(
                    self.state.step,
                    total,
                    grad_norm.unwrap_or(0.0),
                    self.config.logging_steps == 1,
                )?;
            }
            m.tokens = Some(p.tokens as u64);
            m.tokens_per_s = Some(p.tokens as f64 / secs.max(1e-9));
            m.memory_bytes = memory;
            self.metrics.append(&m)?;
        }
        Ok(m)
    }

    /// Mean loss per counted token over the evaluation set (None without one).
    pub fn evaluate(&self) -> Result<Option<f64>> {
        self.evaluate_with(&mut |_, _| {})
    }

    /// [`Trainer::evaluate`], calling `on_batch(done, total)` after each micro-batch.
    pub fn evaluate_with(&self, on_batch: &mut dyn FnMut(usize, usize)) -> Result<Option<f64>> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        let seqs: Vec<&Sequence> = self.eval.iter().collect();
        let (sum, count) = loss_over(
            &self.model,
            Some(&self.adapters),
            &seqs,
            self.config.batch_tokens,
            on_batch,
        )?;
        Ok(Some(sum / count.max(1) as f64))
    }

    fn log_eval(&self, progress: &mut dyn FnMut(Progress)) -> Result<Option<f64>> {
        let at = Metrics {
            step: self.state.step,
            epoch: self.state.epoch,
            ..Metrics::default()
        };
        let loss = self.evaluate_with(&mut |done, total| {
            progress(Progress {
                metrics: &at,
                total_steps: self.total_steps,
                evaluating: Some((done, total)),
            })
        })?;
        if let Some(l) = loss {
            self.metrics.append(&Metrics {
                step: self.state.step,
                epoch: self.state.epoch,
                eval_loss: Some(l),
                ..Metrics::default()
            })?;
        }
        Ok(loss)
    }

    /// Brings the adapters and optimizer state to the host copies `lora` and `optimizer`.
    fn sync_from_device(&mut self) -> Result<()> {
        // Never a checkpoint or adapter labelled with a step whose update was skipped.
        if let Some(bad) = self.adapters.first_non_finite_step()? {
            return Err(non_finite_on_device(bad));
        }
        self.lora = self.adapters.to_host()?;
        self.optimizer = self.adapters.optimizer_to_host()?;
        Ok(())
    }

    /// Writes a checkpoint of the current state.
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        self.sync_from_device()?;
        checkpoint::save(
            &self.config.output,
            &self.lora,
            &self.optimizer,
            &self.state,
        )
    }

    /// Runs to the end (or until the stop flag).
    pub fn run(&mut self) -> Result<Summary> {
        self.run_with_progress(&mut |_| {})
    }

    /// An evaluation's result reaches the progress callback as a metrics line of its own
    /// (`eval_loss` set, `loss` unset), so logs show it, not only metrics.jsonl.
    fn report_eval(&self, loss: Option<f64>, progress: &mut dyn FnMut(Progress)) {
        if let Some(l) = loss {
            progress(Progress {
                metrics: &Metrics {
                    step: self.state.step,
                    epoch: self.state.epoch,
                    eval_loss: Some(l),
                    ..Metrics::default()
                },
                total_steps: self.total_steps,
                evaluating: None,
            });
        }
    }

    /// [`Trainer::run`], calling `progress` after every step.
    pub fn run_with_progress(&mut self, progress: &mut dyn FnMut(Progress)) -> Result<Summary> {
        let mut last_loss = None;
        let mut eval_loss = None;
        let mut interrupted = false;
        while self.state.step < self.total_steps {
            if self.stop.load(Ordering::SeqCst) {
                interrupted = true;
                break;
            }
            let m = self.train_step()?;
            last_loss = m.loss;
            progress(Progress {
                metrics: &m,
                total_steps: self.total_steps,
                evaluating: None,
            });
            let s = self.state.step;
            if self.config.eval_every > 0
                && s.is_multiple_of(self.config.eval_every)
                && s < self.total_steps
            {
                eval_loss = self.log_eval(progress)?;
                self.report_eval(eval_loss, progress);
            }
            if self.config.save_every > 0
                && s.is_multiple_of(self.config.save_every)
                && s < self.total_steps
            {
                self.save_checkpoint()?;
            }
        }
        if !interrupted {
            let last = self.log_eval(progress)?;
            self.report_eval(last, progress);
            eval_loss = last.or(eval_loss);
        }
        self.save_checkpoint()?;
        if !interrupted {
            self.write_outputs()?;
        }
        Ok(Summary {
            steps: self.state.step,
            last_loss,
            eval_loss,
            interrupted,
            output: self.config.output.clone(),
        })
    }

    /// The adapter, the loss curves (SVG and PNG) and the configuration, into the output folder.
    fn write_outputs(&mut self) -> Result<()> {
        self.sync_from_device()?;
        let out = &self.config.output;
        adapters::save(
            out,
            &self.lora,
            Some(&self.config.model.display().to_string()),
        )?;
        let m = metrics::read(self.metrics.path())?;
        plot::write_loss_curves(out, &m)?;
        adapters::write_atomic(
            &out.join("training_config.toml"),
            self.config.to_toml().as_bytes(),
        )
    }
}

/// Mean loss and counted tokens of `data` under `model` (+ `lora`), with the training formats
/// and masking (`qlora-rs eval`), on the model's device; bad records are refused, all listed,
/// unless `opts.skip_bad_records`.
pub fn evaluate_file(
    model: &Llama,
    tokenizer: &TextTokenizer,
    lora: Option<&LoraParams>,
    data_path: &Path,
    opts: &DataOptions,
    batch_tokens: usize,
) -> Result<(f64, usize, DataStats)> {
    evaluate_file_with(
        model,
        tokenizer,
        lora,
        data_path,
        opts,
        batch_tokens,
        &mut |_, _| {},
    )
}

/// [`evaluate_file`], calling `on_batch(done, total)` after each micro-batch (a progress bar).
pub fn evaluate_file_with(
    model: &Llama,
    tokenizer: &TextTokenizer,
    lora: Option<&LoraParams>,
    data_path: &Path,
    opts: &DataOptions,
    batch_tokens: usize,
    on_batch: &mut dyn FnMut(usize, usize),
) -> Result<(f64, usize, DataStats)> {
    let (seqs, stats) = data::load(data_path, tokenizer, opts)?;
    let refs: Vec<&Sequence> = seqs.iter().collect();
    let adapters = lora
        .map(|p| Adapters::new(p, None, AdamWConfig::default(), model.device()))
        .transpose()?;
    let (sum, count) = loss_over(
        model,
        adapters.as_ref(),
        &refs,
        batch_tokens.max(opts.seq_len),
        on_batch,
    )?;
    Ok((sum / count.max(1) as f64, count, stats))
}

/// Loss sum and counted tokens of `seqs`, packed into batches of `batch_tokens` (evaluation).
fn loss_over(
    model: &Llama,
    adapters: Option<&Adapters>,
    seqs: &[&Sequence],
    batch_tokens: usize,
    on_batch: &mut dyn FnMut(usize, usize),
) -> Result<(f64, usize)> {
    let (mut sum, mut count) = (0.0, 0usize);
    let batches = data::pack(seqs, batch_tokens);
    for (i, b) in batches.iter().enumerate() {
        let (losses, n) = model.eval_micro_batch(adapters, &b.ids, &b.labels, &b.cu_seqlens)?;
        sum += losses.sum()?;
        count += n;
        on_batch(i + 1, batches.len());
    }
    Ok((sum, count))
}
