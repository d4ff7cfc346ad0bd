//! `stancemix train sft|dpo`: train a stance expert (LoRA) on the stance pairs.

use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use stancemix::data::load_stance_dir;
use stancemix::model::{LoadOptions, Model, WeightFormat};
use stancemix::train::{Method, Outcome, Progress, Reference, TrainConfig, Trainer};

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Supervised fine-tuning on the adapter's own answers (loss on answer tokens only).
    Sft(Args),
    /// DPO: own answer chosen, the other side's answer rejected; the reference is the --init
    /// adapter, frozen (or the base: --reference base).
    Dpo(Args),
}

/// Settings: a TOML `--config`, overridden by flags; saved as OUT/train.toml.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output folder: the adapter, train.toml, train_log.jsonl, checkpoints.
    #[arg(long)]
    pub out: PathBuf,
    /// Continue from OUT/checkpoint.safetensors with the settings in OUT/train.toml.
    #[arg(long)]
    pub resume: bool,
    /// Train nothing: score the adapter given by --init (the base model without one) on the dev
    /// split the other settings describe, print its dev loss and side accuracy as JSON, and
    /// exit. Nothing is written to --out.
    #[arg(long)]
    pub dev_only: bool,
    /// TOML file with any of the settings below (flags win).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Base model GGUF (default: the one a resumed run was started with, else the fetched
    /// SmolLM2-135M-Instruct).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The adapter's own side: progressive or conservative.
    #[arg(long)]
    pub stance: Option<String>,
    /// Stance-pair folder.
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[arg(long)]
    pub rank: Option<usize>,
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Use rsLoRA scaling (alpha / sqrt(rank)).
    #[arg(long)]
    pub rslora: bool,
    /// Target modules, comma separated (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj).
    #[arg(long, value_delimiter = ',')]
    pub targets: Option<Vec<String>>,
    #[arg(long)]
    pub dropout: Option<f64>,
    /// Peak learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    #[arg(long)]
    pub min_lr_ratio: Option<f64>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub grad_accum: Option<usize>,
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Stop after this many optimizer steps.
    #[arg(long)]
    pub max_steps: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// DPO temperature.
    #[arg(long)]
    pub beta: Option<f64>,
    /// DPO's reference model: `init` (the --init adapter, frozen; the default) or `base`.
    #[arg(long, value_enum)]
    pub reference: Option<Reference>,
    /// Start from this adapter (e.g. the SFT one, for DPO).
    #[arg(long)]
    pub init: Option<PathBuf>,
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Dev records for the dev figures, spread evenly over the dev split (0: all)
    #[arg(long)]
    pub eval_limit: Option<usize>,
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// Stop once the dev loss (every --eval-every steps) has not improved for N evaluations,
    /// keeping the adapter of the best one ("until dev loss stops falling"; 0: off).
    #[arg(long)]
    pub patience: Option<usize>,
    /// Adapt only blocks N.. (0: all). The blocks below stay the base's, so their output is
    /// computed once per sequence and kept in memory: later epochs run only the adapted blocks.
    #[arg(long, value_name = "N")]
    pub layers_from: Option<usize>,
    /// Add N survey-format examples (statement -> one Likert option) per proposition pair.
    #[arg(long)]
    pub survey: Option<usize>,
    /// Train on the long-form answers too (`--long-form false`: survey examples only).
    #[arg(long)]
    pub long_form: Option<bool>,
    /// Frozen base weights: f32 (exact) or int8 (per-row int8 products, 3-5x faster per matmul
    /// with AVX-512 VNNI). Default: int8 where the CPU has AVX-512 VNNI, else f32.
    #[arg(long, value_name = "FORMAT")]
    pub base_format: Option<WeightFormat>,
}

impl Args {
    /// The run's settings: saved ones on resume, else defaults < --config < flags.
    fn settings(&self, method: Method) -> anyhow::Result<TrainConfig> {
        let saved = self.out.join("train.toml");
        if self.resume && saved.exists() {
            let c = TrainConfig::load(&saved)?;
            if c.method != method {
                anyhow::bail!(
                    "{}: method is {:?}, not {method:?}",
                    saved.display(),
                    c.method
                );
            }
            return Ok(c);
        }
        let mut c = match &self.config {
            Some(p) => TrainConfig::load(p)?,
            None => TrainConfig::default(),
        };
        c.method = method;
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { c.$f = v.clone(); } )* };
        }
        set!(
            stance,
            data,
            rank,
            alpha,
            targets,
            dropout,
            lr,
            warmup_steps,
            min_lr_ratio
        );
        set!(
            weight_decay,
            batch_size,
            grad_accum,
            max_seq_len,
            epochs,
            max_steps,
            seed,
            beta,
            reference
        );
        set!(
            eval_every,
            eval_limit,
            checkpoint_every,
            patience,
            layers_from,
            survey,
            long_form
        );
        if let Some(f) = self.base_format {
            c.base = f;
        }
        if self.init.is_some() {
            c.init = self.init.clone();
        }
        if let Some(m) = &self.model {
            // Absolute, so that a resume from another directory finds it.
            c.model = Some(std::path::absolute(m).unwrap_or_else(|_| m.clone()));
        }
        c.rslora |= self.rslora;
        c.validate()
            .map_err(|e| anyhow::anyhow!("train settings: {e}"))?;
        Ok(c)
    }
}

pub fn run(cmd: Command) -> anyhow::Result<()> {
    let (method, args) = match cmd {
        Command::Sft(a) => (Method::Sft, a),
        Command::Dpo(a) => (Method::Dpo, a),
    };
    let config = args.settings(method)?;
    // --model, else the one the run was started with (a resume), else the default base.
    let model_path = crate::cli::model_path(
        args.model
            .as_ref()
            .or(config.model.as_ref())
            .map(|p| p.as_path()),
    )?;
    let model = Model::load(
        &model_path,
        &LoadOptions {
            format: config.base,
        },
    )?;
    let pairs = load_stance_dir(&config.data)?;
    // Prompts in the base's own chat template, as chat and eval will render them.
    let (train, dev) = config.records(&pairs, &model.tokenizer.chat)?;
    if args.dev_only {
        let limit = config.eval_limit;
        let trainer = Trainer::new(&model, config, &train, &dev, &args.out)?;
        let (loss, acc) = trainer
            .dev_loss(limit)?
            .ok_or_else(|| anyhow::anyhow!("the dev split has no records"))?;
        let figures = serde_json::json!({
            "adapter": args.init, "dev_examples": trainer.sizes().1, "eval_limit": limit,
            "dev_loss": loss, "dev_accuracy": acc,
            "accuracy": match method { Method::Sft => "side", Method::Dpo => "reward" },
        });
        println!("{figures}");
        return Ok(());
    }
    let mut trainer = Trainer::new(&model, config, &train, &dev, &args.out)?;
    let (n_train, n_dev, dropped) = trainer.sizes();
    eprintln!(
        "training {} ({:?}): {n_train} train / {n_dev} dev examples ({dropped} records longer than max_seq_len left out), {} trainable parameters, {} steps, {} threads, base weights {}",
        args.out.display(),
        method,
        trainer.lora().num_params(),
        trainer.total_steps(),
        candle_core::utils::get_num_threads(),
        model.format.name(),
    );
    if let first @ 1.. = trainer.lora().first_layer() {
        let kept = match trainer.repeats_examples() {
            true => "kept in memory",
            false => "kept for the dev split (the run reads no training example twice)",
        };
        eprintln!(
            "adapting blocks {first}-{}: the residual stream entering block {first} is computed once per sequence and {kept}",
            model.config.n_layer - 1
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))?;
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} steps, ETA {eta}  {msg}",
        )?
        .progress_chars("=> "),
    );
    let report = trainer.run(args.resume, &stop, &mut |p| match p {
        Progress::Start { total, step } => {
            bar.set_length(total as u64);
            bar.set_position(step as u64);
            bar.reset_eta();
        }
        Progress::Step {
            step,
            loss,
            lr,
            tokens_per_second,
        } => {
            bar.set_position(step as u64);
            bar.set_message(format!(
                "loss {loss:.4}  lr {lr:.2e}  {tokens_per_second:.0} tok/s"
            ));
        }
        Progress::Note(line) => bar.println(line),
    })?;
    bar.finish_and_clear();
    match report.outcome {
        Outcome::Interrupted => eprintln!(
            "stopped at step {}/{}; checkpoint saved: resume with --resume --out {}",
            report.steps,
            report.total_steps,
            args.out.display()
        ),
        Outcome::Finished => {
            println!(
                "{} steps, {} tokens in {:.0} s ({:.1} tok/s); dev loss {}{}; adapter in {}",
                report.steps,
                report.tokens,
                report.train_seconds,
                report.tokens_per_second,
                report.dev_loss.map_or("-".into(), |l| format!("{l:.4}")),
                match (report.dev_reward_accuracy, report.dev_side_accuracy) {
                    (Some(a), _) => format!(", reward accuracy {a:.3}"),
                    (None, Some(a)) => format!(", side accuracy {a:.3}"),
                    (None, None) => String::new(),
                },
                args.out.display()
            );
        }
    }
    Ok(())
}
