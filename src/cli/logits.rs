//! `smoldesk logits`: the logits the model computes for a token sequence.

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::engine::ModelInfo;
use crate::engine::gguf::GgufFile;
use crate::engine::model::Model;

/// Arguments of `smoldesk logits`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The GGUF model.
    #[arg(short, long)]
    pub model: PathBuf,
    /// Comma-separated token ids, e.g. 1,2,3.
    #[arg(long, value_delimiter = ',', required = true)]
    pub tokens: Vec<u32>,
    /// Print one row per position instead of only the last.
    #[arg(long)]
    pub all_positions: bool,
    /// Print JSON: {"logits": [[...], ...]}.
    #[arg(long)]
    pub json: bool,
}

/// Runs the subcommand.
pub fn run(args: Args) -> Result<()> {
    let gguf = GgufFile::open(&args.model)
        .with_context(|| format!("cannot open {}", args.model.display()))?;
    let info = ModelInfo::from_gguf(&gguf)?;
    let mut model = Model::load(&gguf, &info, args.tokens.len().max(1), &mut |_| true)
        .with_context(|| format!("cannot load {}", args.model.display()))?;
    let rows = model.forward(&args.tokens, args.all_positions)?;
    if args.json {
        println!("{}", serde_json::json!({ "logits": rows }));
    } else {
        for (i, row) in rows.iter().enumerate() {
            let best = crate::engine::model::argmax(row);
            let shown: Vec<String> = row.iter().take(8).map(|v| format!("{v:.4}")).collect();
            println!(
                "row {i}: argmax {best}; first logits [{} …]",
                shown.join(", ")
            );
        }
    }
    Ok(())
}
