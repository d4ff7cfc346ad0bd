//! `stancemix data check|export`.

use std::io::Write;
use std::path::PathBuf;

use stancemix::data::export::{export, Split, View};
use stancemix::data::{check, load_stance_dir};

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Validate data files; report `file:line: field: problem`; print the balance table.
    Check {
        /// Files or directories (default: adapters/data adapters/instruments router-data).
        files: Vec<PathBuf>,
    },
    /// Export the SFT or DPO view of the stance pairs as JSON Lines.
    Export {
        #[arg(long, value_enum)]
        format: View,
        /// progressive or conservative.
        #[arg(long)]
        stance: String,
        #[arg(long, value_enum, default_value = "train")]
        split: Split,
        #[arg(long, default_value = "adapters/data/stance")]
        data: PathBuf,
        /// Also N survey-format records per proposition pair (as `train --survey N` adds them).
        #[arg(long, default_value_t = 0)]
        survey: usize,
        /// Output file (default: stdout).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Render prompts with this GGUF's chat template, as `train` does for it (default:
        /// ChatML without a system message).
        #[arg(long)]
        model: Option<PathBuf>,
    },
}

pub fn run(c: Command) -> anyhow::Result<()> {
    match c {
        Command::Check { files } => {
            let files = if files.is_empty() {
                ["adapters/data", "adapters/instruments", "router-data"]
                    .iter()
                    .map(PathBuf::from)
                    .collect()
            } else {
                files
            };
            let r = check(&files);
            for w in &r.warnings {
                println!("warning: {w}");
            }
            for e in &r.errors {
                println!("{e}");
            }
            print!("\n{}", r.balance_table());
            println!(
                "{} files, {} errors, {} warnings",
                r.files,
                r.errors.len(),
                r.warnings.len()
            );
            if !r.errors.is_empty() {
                anyhow::bail!("data check found {} errors", r.errors.len());
            }
            Ok(())
        }
        Command::Export {
            format,
            stance,
            split,
            data,
            survey,
            out,
            model,
        } => {
            let chat = match &model {
                Some(p) => {
                    let mut f = std::fs::File::open(p)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
                    let content = candle_core::quantized::gguf_file::Content::read(&mut f)
                        .map_err(|e| {
                            anyhow::anyhow!("{}: not a readable GGUF file: {e}", p.display())
                        })?;
                    stancemix::model::Tokenizer::from_gguf(&content, p)?.chat
                }
                None => stancemix::model::chat::ChatTemplate::chatml(),
            };
            let pairs = load_stance_dir(&data)?;
            let mut recs = export(&pairs, format, &stance, split, &chat)?;
            if survey > 0 {
                recs.extend(stancemix::data::survey::survey(
                    &pairs, format, &stance, split, survey, &chat,
                )?);
            }
            let mut buf = Vec::new();
            for r in &recs {
                writeln!(buf, "{}", serde_json::to_string(r)?)?;
            }
            match out {
                Some(p) => {
                    stancemix::error::write_atomic(&p, &buf)?;
                    eprintln!("wrote {} records to {}", recs.len(), p.display());
                }
                None => std::io::stdout().write_all(&buf)?,
            }
            Ok(())
        }
    }
}
