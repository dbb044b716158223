//! The `qlora-rs` command line: a thin layer over the library. Only this file exits the process.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{parser::ValueSource, ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use qlora_rs::data::formats::Format;
use qlora_rs::data::preview::summary;
use qlora_rs::data::tokenizer::TextTokenizer;
use qlora_rs::data::DataOptions;
use qlora_rs::device::{self, kernels, Availability, CudaDevice, Device, DeviceRequest};
use qlora_rs::io::{adapters, export};
use qlora_rs::model::config::LlamaConfig;
use qlora_rs::model::generate::Sampling;
use qlora_rs::model::llama::{BaseFormat, Llama};
use qlora_rs::model::lora::{LoraConfig, Target};
use qlora_rs::model::{export_gguf, import_gguf, memory, shapes};
use qlora_rs::quant::nf4::Nf4Config;
use qlora_rs::train::{trainer, TrainConfig, Trainer};

#[derive(Parser)]
#[command(
    name = "qlora-rs",
    version,
    about = "QLoRA fine-tuning of Llama-family models with handwritten CUDA kernels",
    long_about = "QLoRA fine-tuning of Llama-family models: a 4-bit NF4 base model (bit-exact with \
                  bitsandbytes) with LoRA adapters trained on top, written as a PEFT adapter. The \
                  CPU backend runs everything (slowly) and is the reference for the CUDA kernels."
)]
struct Cli {
    /// Where to run: `auto` (CUDA when a driver, a GPU and this build's kernels are present,
    /// else CPU), `cpu`, `cuda` or `cuda:N`.
    #[arg(long, global = true, default_value = "auto", value_parser = parse_device)]
    device: DeviceRequest,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fine-tune a LoRA adapter on a 4-bit base model; writes a PEFT adapter, metrics.jsonl,
    /// loss_curve.svg, loss_curve.png and checkpoints to --output.
    Train {
        /// A TOML file with the same keys as the flags (flags given here override it).
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        train: Box<TrainConfig>,
    },
    /// What training will see: the data summary, records with the trained tokens highlighted,
    /// or (--json) each sequence's ids and labels; reads the model's tokenizer, not its weights.
    Data(Box<qlora_rs::data::preview::DataArgs>),
    /// Mean loss and perplexity of a model (and adapter) on a dataset, with the training
    /// formats and loss masking.
    Eval {
        /// Hugging Face model folder.
        #[arg(long)]
        model: PathBuf,
        /// A PEFT LoRA adapter folder to apply.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Data file (JSON array or JSON Lines).
        #[arg(long)]
        data: PathBuf,
        /// Data format: auto, text, prompt-completion, messages, alpaca, sharegpt.
        #[arg(long, default_value = "auto")]
        format: String,
        /// Score prompts and user turns too.
        #[arg(long)]
        train_on_prompt: bool,
        /// Longest sequence in tokens (longer records are cut, keeping the start).
        #[arg(long, default_value_t = 2048)]
        seq_len: usize,
        /// Leave out the records that cannot be used (listed in the summary) instead of
        /// refusing the file.
        #[arg(long)]
        skip_bad_records: bool,
        /// Tokens per packed batch.
        #[arg(long, default_value_t = 4096)]
        batch_tokens: usize,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// How to hold the base weights: nf4 (as training does) or dense (the checkpoint's own
        /// precision). Default: nf4 with --adapter or on a GPU (whose kernels take NF4), dense
        /// otherwise (e.g. a merged model on the CPU).
        #[arg(long, value_parser = ["nf4", "dense"])]
        base: Option<String>,
    },
    /// Generate text from a prompt (or a chat message rendered with the model's chat template),
    /// streaming tokens as they come; stops at the end-of-sequence token or --max-new-tokens.
    Generate {
        /// Hugging Face model folder.
        #[arg(long)]
        model: PathBuf,
        /// A PEFT LoRA adapter folder to apply.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Raw text to continue.
        #[arg(long, conflicts_with = "chat", required_unless_present = "chat")]
        prompt: Option<String>,
        /// A user message, rendered with the chat template and a generation prompt.
        #[arg(long)]
        chat: Option<String>,
        /// Most tokens to generate.
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        /// 0 is greedy; higher is more random.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        /// Sample only from the most likely tokens whose probability adds up to this.
        #[arg(long, default_value_t = 0.9)]
        top_p: f64,
        /// Seed of the sampler.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// How to hold the base weights: nf4 or dense. Default: nf4 with --adapter or on a GPU,
        /// else dense.
        #[arg(long, value_parser = ["nf4", "dense"])]
        base: Option<String>,
    },
    /// Time training steps of a model (random weights of a built-in shape, or a model folder):
    /// tokens/s, step time, achieved FLOP/s (the FLOP count is printed), peak memory, and the
    /// memory plan beside it.
    Bench {
        /// A built-in shape (random weights): smollm2-135m, llama3-1b, llama3-8b, qwen3-0.6b,
        /// qwen3-8b, gemma2-2b, gemma3-1b, phi-3.5-mini, phi-4-mini.
        #[arg(long, conflicts_with = "model", required_unless_present = "model")]
        shape: Option<String>,
        /// A Hugging Face model folder instead (its real weights).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Sequences per step.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Tokens per sequence.
        #[arg(long, default_value_t = 512)]
        seq_len: usize,
        /// Timed steps (after one warm-up step).
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// LoRA rank.
        #[arg(long, default_value_t = 16)]
        rank: usize,
        /// Projections to adapt: any of q,k,v,o,gate,up,down (Phi-3: qkv,o,gate_up,down), or all.
        #[arg(long, default_value = "all")]
        targets: String,
    },
    /// The device memory a training run will need (base weights, adapters and optimizer,
    /// activations, workspaces) and whether it fits --gpu-mem, before anything is loaded.
    Plan {
        /// Hugging Face model folder (only config.json is read).
        #[arg(long, conflicts_with = "shape", required_unless_present = "shape")]
        model: Option<PathBuf>,
        /// A built-in shape: smollm2-135m, llama3-1b, llama3-8b, qwen3-0.6b, qwen3-8b, gemma2-2b,
        /// gemma3-1b, phi-3.5-mini, phi-4-mini.
        #[arg(long)]
        shape: Option<String>,
        /// Tokens per micro-batch (batch × sequence length).
        #[arg(long, default_value_t = 4096)]
        batch_tokens: usize,
        /// LoRA rank.
        #[arg(long, default_value_t = 16)]
        rank: usize,
        /// Projections to adapt: any of q,k,v,o,gate,up,down (Phi-3: qkv,o,gate_up,down), or all.
        #[arg(long, default_value = "all")]
        targets: String,
        /// Device memory to check against, GiB.
        #[arg(long, default_value_t = 24.0)]
        gpu_mem: f64,
    },
    /// Convert a GGUF of llama.cpp's `llama` (Llama, Mistral, SmolLM…), `qwen2` (Qwen2, Qwen2.5),
    /// `qwen3`, `gemma2`, `gemma3` (Gemma 3 text) or `phi3` (Phi-3, Phi-4-mini) architecture (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
    /// Q5_0, Q5_1, Q4_K, Q5_K, Q6_K
    /// tensors; byte-level BPE or SentencePiece tokenizer) into a Hugging Face folder:
    /// config.json, bf16 safetensors, tokenizer.json and tokenizer_config.json with the chat template. Anything the
    /// Hugging Face model cannot hold (yarn rope scaling, unknown tensors) is refused by name.
    ImportGguf {
        /// The .gguf file.
        gguf: PathBuf,
        /// Output folder.
        #[arg(long)]
        output: PathBuf,
    },
    /// Fold a LoRA adapter into its base model: W + s·B·A in f32 (W dequantized from NF4, the
    /// weights the adapter was trained on), written as bf16 safetensors (sharded like the input)
    /// with config and tokenizer files: a folder transformers loads as a plain model.
    Merge {
        /// Hugging Face model folder (plain or bitsandbytes 4-bit).
        #[arg(long)]
        model: PathBuf,
        /// PEFT LoRA adapter folder.
        #[arg(long)]
        adapter: PathBuf,
        /// Output folder (must not hold a model).
        #[arg(long)]
        output: PathBuf,
        /// Add the update to the original (unquantized) weights instead of their NF4 version.
        #[arg(long)]
        onto_original: bool,
    },
    /// Write one GGUF file that llama.cpp, Ollama and LM Studio load: the model with the
    /// adapter folded in (W + s·B·A in f32 over the NF4 weights it was trained on, as `merge`),
    /// llama.cpp's tensor names and metadata (architectures llama, qwen2, qwen3, gemma2,
    /// gemma3, phi3), the tokenizer (byte-level BPE, or SentencePiece from tokenizer.model) and
    /// chat template, quantized as llama-quantize quantizes (same bytes, same per-tensor types).
    ExportGguf {
        /// Hugging Face model folder (the adapter's base; plain or bitsandbytes 4-bit).
        #[arg(long)]
        model: PathBuf,
        /// PEFT LoRA adapter folder to fold in (omit to export the model as it is).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// The .gguf file to write (written under a temporary name, renamed when complete).
        #[arg(long)]
        output: PathBuf,
        /// f32, f16, bf16, q8_0, q4_0, q4_k_m (the usual choice), q5_k_m or q6_k.
        #[arg(long = "type", value_name = "TYPE", default_value = "q4_k_m")]
        ty: String,
        /// Replace --output if it exists.
        #[arg(long)]
        overwrite: bool,
        /// Add the update to the original (unquantized) weights instead of their NF4 version.
        #[arg(long)]
        onto_original: bool,
        /// Accept an adapter whose config names another base model than --model.
        #[arg(long)]
        allow_other_base: bool,
    },
    /// Write a bitsandbytes 4-bit NF4 checkpoint (double quantization, blocks of 64) that
    /// transformers + bitsandbytes load and `train --model` loads without re-quantizing.
    Quantize {
        /// Hugging Face model folder (bf16, f16 or f32 weights).
        #[arg(long)]
        model: PathBuf,
        /// Output folder (must not hold a model).
        #[arg(long)]
        output: PathBuf,
    },
    /// Show this build (kernels, nvcc, GPU architectures), the driver and GPUs found, and which
    /// device `--device` selects; on a GPU, run the NF4 kernels once against the CPU reference.
    Env,
}

fn parse_device(s: &str) -> Result<DeviceRequest, String> {
    s.parse().map_err(|e: qlora_rs::Error| e.to_string())
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    // The exit status of a training run that a signal interrupted (128 + signal).
    let mut interrupted: Option<u8> = None;
    let result = match cli.command {
        Command::Env => env(cli.device),
        Command::Data(args) => qlora_rs::data::preview::run(&args),
        Command::Generate {
            model,
            adapter,
            prompt,
            chat,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            base,
        } => {
            let sampling = Sampling {
                temperature,
                top_p,
                seed,
                max_new_tokens,
            };
            run_generate(
                cli.device,
                &model,
                adapter.as_deref(),
                prompt,
                chat,
                sampling,
                base.as_deref(),
            )
        }
        Command::Bench {
            shape,
            model,
            batch,
            seq_len,
            steps,
            rank,
            targets,
        } => run_bench(
            cli.device, shape, model, batch, seq_len, steps, rank, &targets,
        ),
        Command::Plan {
            model,
            shape,
            batch_tokens,
            rank,
            targets,
            gpu_mem,
        } => (|| {
            let cfg = match (model, shape) {
                (Some(m), _) => LlamaConfig::from_file(&m.join("config.json"))?,
                (None, Some(s)) => shapes::by_name(&s)?,
                (None, None) => unreachable!("clap requires --model or --shape"),
            };
            let lora = LoraConfig {
                rank,
                alpha: 2.0 * rank as f64,
                rslora: false,
                dropout: 0.0,
                targets: Target::parse_list(&targets)?,
            };
            let p = memory::plan(&cfg, &lora, batch_tokens)?;
            println!(
                "training plan: {} layers, hidden {}, vocab {}; {batch_tokens} tokens per micro-batch; LoRA rank {rank} on {targets}",
                cfg.num_layers, cfg.hidden_size, cfg.vocab_size
            );
            print!("{}", p.table(Some((gpu_mem * (1u64 << 30) as f64) as u64)));
            if let Err(e) = qlora_rs::model::llama::check_gpu_support(
                &cfg,
                BaseFormat::Nf4(Nf4Config::default()),
            ) {
                eprintln!(
                    "warning: this plan is for a CUDA device, which cannot run this model: {e}"
                );
            }
            Ok(())
        })(),
        Command::ImportGguf { gguf, output } => {
            import_gguf::import_gguf(&gguf, &output).map(|r| println!("{r}"))
        }
        Command::Merge {
            model,
            adapter,
            output,
            onto_original,
        } => {
            warn_other_base(&model, &adapter);
            export::merge(&model, &adapter, &output, onto_original)
        }
        .map(|r| {
            println!(
                "merged {} adapted projections; wrote {} tensors ({:.1} MiB) in {} file(s) to {}",
                r.projections,
                r.tensors,
                r.bytes as f64 / (1u64 << 20) as f64,
                r.shards,
                output.display()
            )
        }),
        Command::ExportGguf {
            model,
            adapter,
            output,
            ty,
            overwrite,
            onto_original,
            allow_other_base,
        } => (|| {
            let opts = export_gguf::ExportGguf {
                model,
                adapter,
                output,
                ty: ty.parse()?,
                overwrite,
                onto_original,
                allow_other_base,
            };
            let bar = tensor_bar("export");
            let report = export_gguf::export_gguf(&opts, |done, total, name| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
                bar.set_message(name.to_string());
            });
            bar.finish_and_clear();
            let report = report?;
            for w in &report.warnings {
                eprintln!("warning: {w}");
            }
            println!("{report}");
            Ok(())
        })(),
        Command::Quantize { model, output } => export::quantize(&model, &output).map(|r| {
            println!(
                "quantized {} projections to NF4; wrote {} tensors ({:.1} MiB) in {} file(s) to {}",
                r.projections,
                r.tensors,
                r.bytes as f64 / (1u64 << 20) as f64,
                r.shards,
                output.display()
            )
        }),
        Command::Train { config, train } => {
            let sub = matches
                .subcommand_matches("train")
                .expect("train subcommand");
            merge_config(config, *train, sub)
                .and_then(|cfg| run_train(cli.device, cfg))
                .map(|status| interrupted = status)
        }
        Command::Eval {
            model,
            adapter,
            data,
            format,
            train_on_prompt,
            seq_len,
            skip_bad_records,
            batch_tokens,
            json,
            base,
        } => (|| {
            let opts = DataOptions {
                format: Format::parse(&format)?,
                seq_len,
                train_on_prompt,
                skip_bad_records,
            };
            run_eval(
                cli.device,
                &model,
                adapter.as_deref(),
                &data,
                &opts,
                batch_tokens,
                json,
                base.as_deref(),
            )
        })(),
    };
    match result {
        Ok(()) => interrupted.map_or(ExitCode::SUCCESS, ExitCode::from),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The TOML file's settings, with every flag given on the command line on top.
fn merge_config(
    file: Option<PathBuf>,
    cli: TrainConfig,
    m: &ArgMatches,
) -> qlora_rs::Result<TrainConfig> {
    let Some(path) = file else { return Ok(cli) };
    let mut base = serde_json::to_value(TrainConfig::from_toml_file(&path)?).expect("plain struct");
    let over = serde_json::to_value(&cli).expect("plain struct");
    for id in m.ids() {
        let id = id.as_str();
        if m.value_source(id) == Some(ValueSource::CommandLine) {
            if let Some(v) = over.get(id) {
                base[id] = v.clone();
            }
        }
    }
    serde_json::from_value(base).map_err(|e| qlora_rs::Error::Format {
        path,
        msg: format!("with the command-line flags: {e}"),
    })
}

/// The device to run on. `train` runs on CUDA when asked for explicitly (`--device cuda`); the
/// CUDA step is new and awaits its first GPU validation, so `auto` keeps training on the CPU and
/// says so. The other commands run on the CPU backend in this build and refuse `cuda`.
fn compute_device(request: DeviceRequest, cuda_ok: bool) -> qlora_rs::Result<Device> {
    let selection = device::select(request, &Availability::probe())?;
    match selection.device {
        Device::Cpu => {
            eprintln!("device: {}", selection.reason);
            Ok(Device::Cpu)
        }
        Device::Cuda(o) if request == DeviceRequest::Auto => {
            let how = if cuda_ok {
                "pass --device cuda to use it (the CUDA path awaits its first GPU validation)"
            } else {
                "this command runs on the CPU backend in this build"
            };
            eprintln!("device: cpu (auto: cuda:{o} is present; {how})");
            Ok(Device::Cpu)
        }
        Device::Cuda(o) if cuda_ok => {
            eprintln!("device: {}", selection.reason);
            Ok(Device::Cuda(o))
        }
        Device::Cuda(o) => Err(qlora_rs::Error::CudaUnavailable(format!(
            "--device cuda:{o}: this command runs on the CPU backend in this build; use --device cpu"
        ))),
    }
}

/// SIGINT (Ctrl-C), SIGTERM (docker stop, Slurm, spot reclaim) and SIGHUP (a closed terminal):
/// the first asks the trainer to stop after the current step and save a checkpoint; a second of
/// the same kind ends the process at once (exit 128 + signal), for a user who will not wait.
struct Interrupts {
    received: Vec<(&'static str, i32, Arc<AtomicBool>)>,
}

impl Interrupts {
    fn install(stop: Arc<AtomicBool>) -> qlora_rs::Result<Interrupts> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let mut received = Vec::new();
        for (name, sig) in [("SIGINT", SIGINT), ("SIGTERM", SIGTERM), ("SIGHUP", SIGHUP)] {
            let this = Arc::new(AtomicBool::new(false));
            let err = |e: std::io::Error| {
                qlora_rs::Error::InvalidArgument(format!("cannot install the {name} handler: {e}"))
            };
            // Order matters: the shutdown checks the flag before this signal sets it, so only a
            // second signal (the flag already set) ends the process.
            signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, this.clone())
                .map_err(err)?;
            signal_hook::flag::register(sig, this.clone()).map_err(err)?;
            signal_hook::flag::register(sig, stop.clone()).map_err(err)?;
            received.push((name, sig, this));
        }
        Ok(Interrupts { received })
    }

    /// The signal that stopped the run and the exit status that reports it (128 + signal).
    fn received(&self) -> (&'static str, u8) {
        self.received
            .iter()
            .find(|(_, _, f)| f.load(Ordering::SeqCst))
            .map_or(("a stop request", 130), |(n, s, _)| (*n, (128 + s) as u8))
    }
}

/// This run's command line with `--resume` (once), quoted for a POSIX shell.
fn resume_command() -> String {
    let quote = |a: String| {
        if !a.is_empty()
            && a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
        {
            a
        } else {
            format!("'{}'", a.replace('\'', r"'\''"))
        }
    };
    let mut args: Vec<String> = std::env::args().map(quote).collect();
    if !args.iter().any(|a| a == "--resume") {
        args.push("--resume".into());
    }
    args.join(" ")
}

/// Trains; `Some(status)` when a signal interrupted the run (checkpoint saved), for the exit
/// status that tells scripts and schedulers so.
fn run_train(request: DeviceRequest, cfg: TrainConfig) -> qlora_rs::Result<Option<u8>> {
    let device = compute_device(request, true)?;
    let mut trainer = Trainer::new_on(cfg, device)?;
    for w in &trainer.model.load_warnings {
        eprintln!("warning: {}: {w}", trainer.config.model.display());
    }
    let (n_train, n_eval) = trainer.dataset_sizes();
    // The summary `qlora-rs data` prints, for the training file (and the evaluation file).
    let opts = trainer.config.data_options()?;
    eprint!(
        "{}",
        summary(&trainer.config.data, &opts, &trainer.data_stats)
    );
    if let (Some(path), Some(stats)) = (&trainer.config.eval_data, &trainer.eval_data_stats) {
        eprint!("{}", summary(path, &opts, stats));
    }
    eprintln!(
        "training on {n_train} sequence{}{}",
        if n_train == 1 { "" } else { "s" },
        if n_eval > 0 {
            format!(", evaluating on {n_eval}")
        } else {
            String::new()
        }
    );
    eprintln!(
        "model: {} layers, hidden {}, vocab {}; LoRA rank {} on {:?}: {} trainable parameters",
        trainer.model.config.num_layers,
        trainer.model.config.hidden_size,
        trainer.model.config.vocab_size,
        trainer.lora.config.rank,
        trainer.lora.config.targets,
        trainer.lora.len()
    );
    if trainer.step() > 0 {
        eprintln!(
            "resuming at step {} of {}",
            trainer.step(),
            trainer.total_steps()
        );
    }
    let signals = Interrupts::install(trainer.stop_flag())?;
    // A bar (on stderr) for a terminal; plain log lines on stdout when it is not one.
    let tty = std::io::stdout().is_terminal() && std::io::stderr().is_terminal();
    let bar = indicatif::ProgressBar::new(trainer.total_steps());
    if tty {
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .expect("valid template"),
        );
        bar.set_position(trainer.step());
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut smoothed: Option<f64> = None;
    // A CPU run that will clearly take hours says so once its first step is measured.
    let (started, first_step) = (std::time::Instant::now(), trainer.step());
    let mut estimated = device != Device::Cpu;
    let summary = trainer.run_with_progress(&mut |p| {
        let m = p.metrics;
        if !estimated && p.evaluating.is_none() && m.eval_loss.is_none() && m.step > first_step {
            estimated = true;
            if let Some(line) = cpu_estimate(
                started.elapsed().as_secs_f64(),
                m.step - first_step,
                p.total_steps - m.step,
            ) {
                if tty {
                    bar.println(line);
                } else {
                    eprintln!("{line}");
                }
            }
        }
        // An evaluation in progress: its batches on the bar's message (terminal only; plain logs
        // get the result line).
        if let Some((done, total)) = p.evaluating {
            if tty {
                bar.set_message(format!("evaluating: batch {done}/{total}"));
            }
            return;
        }
        if let Some(eval) = m.eval_loss {
            let line = format!(
                "eval at step {}/{}: loss {eval:.4} (perplexity {:.3})",
                m.step,
                p.total_steps,
                eval.exp()
            );
            if tty {
                bar.println(line);
            } else {
                println!("{line}");
            }
            return;
        }
        // Steps between two logged ones (--logging-steps) only move the bar.
        let Some(loss) = m.loss else {
            bar.set_position(m.step);
            return;
        };
        let ema = smoothed.map_or(loss, |s| 0.9 * s + 0.1 * loss);
        smoothed = Some(ema);
        let line = format!(
            "loss {loss:.4} (avg {ema:.4}) lr {:.2e} grad {:.3} {:.0} tok/s mem {:.0} MiB",
            m.lr.unwrap_or(0.0),
            m.grad_norm.unwrap_or(0.0),
            m.tokens_per_s.unwrap_or(0.0),
            m.memory_bytes.unwrap_or(0) as f64 / (1u64 << 20) as f64
        );
        if tty {
            bar.set_position(m.step);
            bar.set_message(line);
        } else {
            println!("step {}/{} {line}", m.step, p.total_steps);
        }
    })?;
    bar.finish_and_clear();
    if summary.interrupted {
        let (name, code) = signals.received();
        eprintln!(
            "interrupted by {name} at step {}: checkpoint saved in {}; continue with:\n  {}",
            summary.steps,
            summary.output.display(),
            resume_command()
        );
        return Ok(Some(code));
    }
    println!(
        "done: {} steps, last loss {:.4}{}; adapter in {}",
        summary.steps,
        summary.last_loss.unwrap_or(f64::NAN),
        summary
            .eval_loss
            .map(|l| format!(", eval loss {l:.4}"))
            .unwrap_or_default(),
        summary.output.display()
    );
    Ok(None)
}

/// Warns when `adapter_config.json` names a base model other than `model` (a hub id whose last
/// part is not the folder's name, or another local folder): merging onto another base gives a
/// model that was never trained. Shapes are checked by the merge itself.
fn warn_other_base(model: &std::path::Path, adapter: &std::path::Path) {
    if let Some(named) = adapters::other_base(model, adapter) {
        eprintln!(
            "warning: {}: the adapter was trained on `{named}`; merging it onto {}",
            adapter.join(adapters::CONFIG_FILE).display(),
            model.display()
        );
    }
}

/// Loads a model folder onto `device`, printing what loading set aside (as named warnings).
fn load_model(
    dir: &std::path::Path,
    format: BaseFormat,
    device: Device,
) -> qlora_rs::Result<Llama> {
    let model = Llama::load_on(dir, format, device)?;
    for w in &model.load_warnings {
        eprintln!("warning: {}: {w}", dir.display());
    }
    Ok(model)
}

/// The base weights as training holds them (NF4) when an adapter is applied, else the
/// checkpoint's own precision, unless `--base` says otherwise.
fn base_format(flag: Option<&str>, with_adapter: bool, device: Device) -> BaseFormat {
    match flag {
        Some("dense") => BaseFormat::Dense,
        Some(_) => BaseFormat::Nf4(Nf4Config::default()),
        None if with_adapter || device != Device::Cpu => BaseFormat::Nf4(Nf4Config::default()),
        None => BaseFormat::Dense,
    }
}

#[allow(clippy::too_many_arguments)]
fn run_bench(
    request: DeviceRequest,
    shape: Option<String>,
    model_dir: Option<PathBuf>,
    batch: usize,
    seq_len: usize,
    steps: usize,
    rank: usize,
    targets: &str,
) -> qlora_rs::Result<()> {
    use qlora_rs::model::adapters::Adapters;
    use qlora_rs::model::lora::LoraParams;
    use qlora_rs::train::optimizer::AdamWConfig;
    use rand::{Rng, SeedableRng};
    use std::time::Instant;
    if steps == 0 {
        return Err(qlora_rs::Error::InvalidArgument(
            "bench --steps must be at least 1 (the steps timed after one warm-up step)".into(),
        ));
    }
    let device = compute_device(request, true)?;
    let nf4 = BaseFormat::Nf4(Nf4Config::default());
    let started = Instant::now();
    // A built-in shape is drawn on the device itself: no host copy of the model on a GPU,
    // whatever its size.
    let model = match (&shape, &model_dir) {
        (Some(s), _) => Llama::random_on(shapes::by_name(s)?, nf4, device, 0)?,
        (None, Some(m)) => load_model(m, nf4, device)?,
        (None, None) => unreachable!("clap requires --shape or --model"),
    };
    let cfg = model.config.clone();
    let lora_cfg = LoraConfig {
        rank,
        alpha: 2.0 * rank as f64,
        rslora: false,
        dropout: 0.0,
        targets: Target::parse_list(targets)?,
    };
    let lora = LoraParams::init(&cfg, lora_cfg.clone(), 0)?;
    let mut adapters = Adapters::new(&lora, None, AdamWConfig::default(), device)?;
    drop(lora);
    let tokens = batch * seq_len;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let ids: Vec<u32> = (0..tokens)
        .map(|_| rng.random_range(0..cfg.vocab_size as u32))
        .collect();
    let labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let cu: Vec<usize> = (0..=batch).map(|b| b * seq_len).collect();
    eprintln!(
        "model ready in {:.1} s on {device}: {} layers, hidden {}, {:.0}M parameters; LoRA rank {rank}: {} trainable",
        started.elapsed().as_secs_f64(),
        cfg.num_layers,
        cfg.hidden_size,
        cfg.num_parameters() as f64 / 1e6,
        adapters.len()
    );
    let mut times = Vec::with_capacity(steps);
    let counted = (tokens - batch) as f32;
    let sync = || match device {
        Device::Cuda(o) => CudaDevice::get(o)?.synchronize(),
        Device::Cpu => Ok(()),
    };
    let mut launches = 0u64;
    let mut cpu_secs = 0.0;
    // Host time to issue each step's work, up to the closing synchronisation: the step reads
    // nothing back, so on a GPU this is the host's own cost (our code and the driver's launch
    // calls), and it stays below the step time while the host keeps ahead of the GPU.
    let mut issued = 0.0;
    for step in 0..=steps {
        sync()?;
        let launched = qlora_rs::device::cuda::launches();
        let cpu0 = process_cpu_secs();
        let t0 = Instant::now();
        adapters.zero_grads()?;
        model.train_micro_batch(&adapters, &ids, &labels, &cu, 1.0 / counted, step as u64)?;
        adapters.step(1e-4, 1.0)?;
        let issue_time = t0.elapsed().as_secs_f64();
        sync()?;
        if step > 0 {
            issued += issue_time;
            times.push(t0.elapsed().as_secs_f64());
            cpu_secs += process_cpu_secs() - cpu0;
            launches = qlora_rs::device::cuda::launches() - launched;
        }
    }
    let device_memory = match device {
        Device::Cuda(o) => {
            let dev = CudaDevice::get(o)?;
            Some((dev.memory_used()?, dev.pool_peaks()?))
        }
        Device::Cpu => None,
    };
    let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
    // Model FLOPs per step: 6·N·T for the parameter products (forward, and the input and
    // adapter gradients of the backward; the recomputed forward is not counted, by convention)
    // plus 6·L·d·S·T for causal attention (QKᵀ and PV, forward and backward, halved by the mask).
    let n = cfg.num_parameters() as f64;
    let flops = 6.0 * n * tokens as f64
        + 6.0 * (cfg.num_layers * cfg.hidden_size * seq_len) as f64 * tokens as f64;
    let peak = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_string)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map(|kib| kib / (1024.0 * 1024.0));
    let plan = memory::plan(&cfg, &lora_cfg, tokens)?;
    println!("bench: {batch} × {seq_len} tokens, {steps} timed steps on {device}");
    println!(
        "  step time   {:.3} s ({:.0} tokens/s)",
        mean,
        tokens as f64 / mean
    );
    println!(
        "  throughput  {:.2} TFLOP/s of model FLOPs ({:.3e} per step = 6·N·T + 6·L·d·S·T, N = {:.3e})",
        flops / mean / 1e12,
        flops,
        n
    );
    match device {
        Device::Cpu => {
            println!("  MFU         n/a on the CPU backend (no peak rate to compare with)");
            // How busy the cores were during the timed steps (the model load not counted).
            println!(
                "  cpu/wall    {:.2} over the timed steps ({:.1} s of CPU time in {:.1} s, {} threads)",
                cpu_secs / times.iter().sum::<f64>().max(1e-9),
                cpu_secs,
                times.iter().sum::<f64>(),
                qlora_rs::ops::matmul::cpu_threads()
            );
            if let Some(gib) = peak {
                println!("  peak memory {gib:.2} GiB resident (host: the CPU backend)");
            }
        }
        Device::Cuda(o) => {
            let dev = CudaDevice::get(o)?;
            let name = dev.name()?;
            // Dense bf16 tensor-core peaks of common cards; others print n/a.
            let peak_tflops = [
                ("H100", 989.0),
                ("H200", 989.0),
                ("A100", 312.0),
                ("4090", 165.2),
                ("3090", 71.0),
            ]
            .iter()
            .find(|(k, _)| name.contains(k))
            .map(|(_, p)| *p);
            match peak_tflops {
                Some(p) => println!(
                    "  MFU         {:.1}% of {p} TFLOP/s ({name}, dense bf16)",
                    flops / mean / 1e12 / p * 100.0
                ),
                None => println!("  MFU         n/a (no bf16 peak on file for {name})"),
            }
            // Launches per step, the step time per launch (on a GPU the bound under which the
            // host's issuing would show) and the host's issue time per launch (on a GPU, below
            // the former while the host keeps ahead; on the simulated GPU both are the host's,
            // simulator checks included).
            let per_launch = |secs: f64| secs * 1e6 / launches.max(1) as f64;
            let issue = issued / times.len().max(1) as f64;
            println!(
                "  launches    {launches} per step: {:.1} µs of step time per launch; issued in \
                 {:.2} ms a step, {:.1} µs per launch on the host",
                per_launch(mean),
                issue * 1e3,
                per_launch(issue)
            );
            if name.contains("simulated") {
                println!(
                    "  note        the simulated GPU proves results and measures memory; its \
                     times are the CPU's, not a GPU's"
                );
            }
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            if let Some((used, pool)) = device_memory {
                if let Some((allocated, reserved)) = pool {
                    println!(
                        "  peak memory {:.2} GiB allocated ({allocated} bytes), {:.2} GiB \
                         reserved (every tensor we allocate; cf. \
                         torch.cuda.max_memory_allocated/reserved)",
                        gib(allocated),
                        gib(reserved)
                    );
                }
                println!(
                    "  device mem  {:.2} GiB in use after the steps (the driver's total − free: \
                     with the CUDA context, kernels and any other process)",
                    gib(used as u64)
                );
            }
        }
    }
    println!(
        "  plan        {:.2} GiB ({} bytes) on a CUDA device for this configuration (see \
         `qlora-rs plan`)",
        plan.total() as f64 / (1u64 << 30) as f64,
        plan.total()
    );
    Ok(())
}

fn run_generate(
    request: DeviceRequest,
    model_dir: &std::path::Path,
    adapter: Option<&std::path::Path>,
    prompt: Option<String>,
    chat: Option<String>,
    sampling: Sampling,
    base: Option<&str>,
) -> qlora_rs::Result<()> {
    use std::io::Write;
    let device = compute_device(request, true)?;
    let format = base_format(base, adapter.is_some(), device);
    let model = load_model(model_dir, format, device)?;
    let tokenizer = TextTokenizer::load(model_dir)?;
    let lora = adapter
        .map(|a| adapters::load(a, &model.config))
        .transpose()?;
    let ids = match (prompt, chat) {
        (Some(p), _) => tokenizer.encode(&p, true)?.0,
        (None, Some(c)) => tokenizer.chat_prompt(&c)?,
        (None, None) => unreachable!("clap requires --prompt or --chat"),
    };
    let mut out = std::io::stdout();
    let mut generated: Vec<u32> = Vec::new();
    let mut shown = 0usize;
    let mut on_token = |id| {
        if Some(id) == tokenizer.eos_id {
            return Ok(());
        }
        generated.push(id);
        // Decode everything so far and print what is new (a token may end mid-character).
        let text = tokenizer.decode(&generated, true)?;
        if text.len() > shown && text.is_char_boundary(shown) {
            let _ = write!(out, "{}", &text[shown..]);
            let _ = out.flush();
            shown = text.len();
        }
        Ok(())
    };
    let context = model.config.max_position_embeddings;
    let new = model.generate(
        lora.as_ref(),
        &ids,
        tokenizer.eos_id,
        sampling,
        &mut on_token,
    )?;
    println!();
    if ids.len() + new.len() >= context && new.last().copied() != tokenizer.eos_id {
        eprintln!(
            "(stopped at the model's context length: {context} tokens, max_position_embeddings)"
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_eval(
    request: DeviceRequest,
    model_dir: &std::path::Path,
    adapter: Option<&std::path::Path>,
    data: &std::path::Path,
    opts: &DataOptions,
    batch_tokens: usize,
    json: bool,
    base: Option<&str>,
) -> qlora_rs::Result<()> {
    let device = compute_device(request, true)?;
    let format = base_format(base, adapter.is_some(), device);
    let model = load_model(model_dir, format, device)?;
    let tokenizer = TextTokenizer::load(model_dir)?;
    let lora = adapter
        .map(|a| adapters::load(a, &model.config))
        .transpose()?;
    // A bar on a terminal while the batches run; nothing extra in plain logs.
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(0).with_style(
            indicatif::ProgressStyle::with_template(
                "evaluating {bar:30} {pos}/{len} batches [{elapsed_precise}<{eta_precise}]",
            )
            .expect("valid template"),
        )
    } else {
        indicatif::ProgressBar::hidden()
    };
    let (loss, tokens, stats) = trainer::evaluate_file_with(
        &model,
        &tokenizer,
        lora.as_ref(),
        data,
        opts,
        batch_tokens,
        &mut |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )?;
    bar.finish_and_clear();
    // As `train` says it: what was cut, dropped or skipped before the loss was taken.
    eprint!("{}", summary(data, opts, &stats));
    if json {
        println!(
            "{}",
            serde_json::json!({
                "loss": loss,
                "perplexity": loss.exp(),
                "tokens": tokens,
                "records": stats.records,
                "truncated": stats.truncated,
                "dropped": stats.empty,
                "skipped": stats.skipped.len(),
            })
        );
    } else {
        println!(
            "eval loss {loss:.4} (perplexity {:.3}) over {tokens} tokens",
            loss.exp()
        );
    }
    Ok(())
}

fn env(request: DeviceRequest) -> qlora_rs::Result<()> {
    println!("qlora-rs {}", env!("CARGO_PKG_VERSION"));
    if kernels::available() {
        let names: Vec<&str> = kernels::FATBINS.iter().map(|(s, _)| *s).collect();
        println!(
            "kernels: {} ({}), built by {}, for {}",
            names.len(),
            names.join(", "),
            kernels::NVCC_VERSION,
            kernels::CUDA_ARCHS.join(", ")
        );
    } else {
        println!("kernels: none ({})", device::NO_KERNELS);
    }
    let avail = Availability::probe();
    println!(
        "driver: {}",
        if avail.driver {
            "libcuda loaded"
        } else {
            "not found"
        }
    );
    if avail.driver {
        println!("GPUs: {}", avail.gpu_count);
        if let Some(e) = &avail.driver_error {
            println!("  cuInit: {e}");
        }
    }
    let selection = device::select(request, &avail)?;
    println!("device: {}", selection.reason);
    if let Device::Cuda(o) = selection.device {
        let dev = CudaDevice::get(o)?;
        let (major, minor) = dev.compute_capability()?;
        println!(
            "  {} (sm_{major}{minor}), {:.1} GiB",
            dev.name()?,
            dev.total_memory()? as f64 / (1u64 << 30) as f64
        );
        self_test(selection.device)?;
    }
    Ok(())
}

/// Runs the NF4 kernels on the selected GPU and checks their bytes against the CPU reference:
/// proves the fatbin loads and runs on this card and driver.
fn self_test(device: Device) -> qlora_rs::Result<()> {
    use qlora_rs::quant::nf4::Nf4Tensor;
    use qlora_rs::{DType, Tensor};
    let n = 64 * 257 + 3;
    let w: Vec<f32> = (0..n)
        .map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * (1.0 + (i % 97) as f32))
        .collect();
    let cpu_w = Tensor::from_vec(w, &[n], &Device::Cpu)?;
    let cfg = Nf4Config::default();
    let cpu = Nf4Tensor::quantize(&cpu_w, cfg)?;
    let gpu = Nf4Tensor::quantize(&cpu_w.to_device(&device)?, cfg)?;
    let same_codes = cpu.packed.to_vec::<u8>()? == gpu.packed.to_vec::<u8>()?
        && cpu.absmax_f32()? == gpu.absmax_f32()?;
    let same_values = cpu.dequantize(DType::F32)?.to_vec::<f32>()?
        == gpu.dequantize(DType::F32)?.to_vec::<f32>()?;
    if same_codes && same_values {
        println!("self-test: NF4 quantize + dequantize on {device} match the CPU reference");
        Ok(())
    } else {
        Err(qlora_rs::Error::InvalidArgument(format!(
            "self-test failed: NF4 kernels on {device} differ from the CPU reference \
             (codes equal: {same_codes}, values equal: {same_values})"
        )))
    }
}

/// A bar over tensors on a terminal (`{verb} [bar] done/total tensors name`); hidden in logs.
fn tensor_bar(verb: &str) -> indicatif::ProgressBar {
    if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(0).with_style(
            indicatif::ProgressStyle::with_template(&format!(
                "{verb} {{bar:30}} {{pos}}/{{len}} tensors [{{elapsed_precise}}<{{eta_precise}}] {{msg}}"
            ))
            .expect("valid template"),
        )
    } else {
        indicatif::ProgressBar::hidden()
    }
}

/// The warning for a CPU run whose remaining steps, at the pace of the first `done` steps
/// (`secs` of wall time), will take an hour or more; `None` for a shorter run.
fn cpu_estimate(secs: f64, done: u64, remaining: u64) -> Option<String> {
    let per_step = secs / done.max(1) as f64;
    let total = per_step * remaining as f64;
    if total < 3600.0 {
        return None;
    }
    let (h, m) = ((total / 3600.0) as u64, ((total % 3600.0) / 60.0) as u64);
    Some(format!(
        "warning: on the CPU this run will take about {h} h {m:02} min more ({per_step:.1} s a \
         step × {remaining} steps, evaluations not counted); the CPU backend is meant for tiny \
         models, the demo and checks, a run of this size for a GPU. Continuing."
    ))
}

/// User + system CPU time of this process so far, in seconds (every thread).
fn process_cpu_secs() -> f64 {
    // SAFETY: getrusage writes the struct it is given and nothing else.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return f64::NAN;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::cpu_estimate;

    #[test]
    fn a_cpu_run_of_hours_is_announced_and_a_short_one_is_not() {
        // 4 s a step, 1000 steps to go: 1 h 06 min.
        let w = cpu_estimate(8.0, 2, 1000).unwrap();
        assert!(
            w.contains("1 h 06 min") && w.contains("4.0 s a step"),
            "{w}"
        );
        assert!(cpu_estimate(8.0, 2, 899).is_none());
        assert!(cpu_estimate(0.5, 1, 5000).is_none());
    }
}
