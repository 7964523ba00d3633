//! `smoldesk bench`: load time, prefill and decode speed, time to first token, peak memory.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::engine::model::argmax;
use crate::engine::session::{Engine, LoadOptions};

/// Arguments of `smoldesk bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The GGUF model.
    #[arg(short, long)]
    pub model: PathBuf,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Tokens to generate after the prompt.
    #[arg(long, default_value_t = 128)]
    pub gen_tokens: usize,
    /// Compute threads (0 = all physical cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// What one benchmark run measured.
#[derive(Debug, Serialize)]
pub struct BenchResult {
    /// Seconds to open, validate and load the model (tokenizer included).
    pub load_s: f64,
    /// Prompt tokens per second.
    pub prefill_tok_s: f64,
    /// Generated tokens per second (after the first).
    pub decode_tok_s: f64,
    /// Seconds from starting the prompt to having the first generated token.
    pub ttft_s: f64,
    /// Peak resident memory of the process in MB.
    pub peak_rss_mb: f64,
}

/// Runs the subcommand.
pub fn run(args: Args) -> Result<()> {
    let options = LoadOptions {
        context_length: args.prompt_tokens + args.gen_tokens + 1,
        threads: args.threads,
    };
    let start = Instant::now();
    let mut engine = Engine::load(&args.model, &options, &mut |_| true)
        .with_context(|| format!("cannot load {}", args.model.display()))?;
    let load_s = start.elapsed().as_secs_f64();

    let vocab = engine.info().hparams.vocab_size.min(100_000) as u64;
    // Deterministic pseudo-random prompt ids from ordinary text-token range.
    let prompt: Vec<u32> = (0..args.prompt_tokens as u64)
        .map(|i| ((i * 2_654_435_761 + 12_345) % (vocab - 1000) + 500) as u32)
        .collect();
    let start = Instant::now();
    let prefill = engine.prefill(&prompt)?;
    let mut next = argmax(&prefill.logits);
    let ttft_s = start.elapsed().as_secs_f64();
    let prefill_tok_s = args.prompt_tokens as f64 / ttft_s;

    let start = Instant::now();
    for _ in 0..args.gen_tokens {
        next = argmax(&engine.decode(next)?);
    }
    let decode_tok_s = args.gen_tokens as f64 / start.elapsed().as_secs_f64();

    let result = BenchResult {
        load_s,
        prefill_tok_s,
        decode_tok_s,
        ttft_s,
        peak_rss_mb: peak_rss_mb().unwrap_or(f64::NAN),
    };
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        println!(
            "load {:.2} s | prefill {:.1} tok/s | decode {:.2} tok/s | TTFT {:.2} s | peak RSS {:.0} MB",
            result.load_s,
            result.prefill_tok_s,
            result.decode_tok_s,
            result.ttft_s,
            result.peak_rss_mb
        );
    }
    Ok(())
}

/// Peak resident set size of this process (Linux `VmHWM`), in MB.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
