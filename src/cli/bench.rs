//! `smoldesk bench`: load time, prefill and decode speed (also after a long context), time to
//! first token, peak memory; or, with `--bandwidth`, the machine's multi-threaded read bandwidth.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::engine::cpu::{bandwidth, simd_level};
use crate::engine::session::{Engine, LoadOptions};

/// Arguments of `smoldesk bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The GGUF model (not needed with --bandwidth).
    #[arg(short, long, required_unless_present = "bandwidth")]
    pub model: Option<PathBuf>,
    /// Prompt length in tokens (prefill speed, measured on an empty cache).
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Tokens to generate after the prompt (decode speed).
    #[arg(long, default_value_t = 128)]
    pub gen_tokens: usize,
    /// Also measure decoding after this many tokens of context (0 = skip), like llama-bench -d.
    #[arg(long, default_value_t = 0)]
    pub depth: usize,
    /// Tokens to generate after the --depth context.
    #[arg(long, default_value_t = 32)]
    pub depth_gen_tokens: usize,
    /// Compute threads (0 = all physical cores).
    #[arg(long, default_value_t = 0, value_parser = super::parse_threads)]
    pub threads: usize,
    /// Also measure how long a Stop takes to end a prompt computation (a few stops at spread
    /// moments of a --prompt-tokens prefill).
    #[arg(long)]
    pub stop_latency: bool,
    /// Measure read bandwidth over a buffer instead of running a model.
    #[arg(long)]
    pub bandwidth: bool,
    /// Also read a --bandwidth-mb buffer once after every generated token of the decode run
    /// (untimed), so the decode speed can be set against the bandwidth of the same moments
    /// (the peak RSS then includes the buffer).
    #[arg(long)]
    pub paired_bandwidth: bool,
    /// Buffer size of --bandwidth, in MiB.
    #[arg(long, default_value_t = 1024)]
    pub bandwidth_mb: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// What one benchmark run measured.
#[derive(Debug, Serialize)]
pub struct BenchResult {
    /// The model file's size in bytes.
    pub file_bytes: u64,
    /// Compute threads requested (0 = all physical cores).
    pub threads: usize,
    /// The SIMD kernels that ran ("avx512", "avx2" or "portable": the CPU's best, or lower
    /// where `SMOLDESK_SIMD` says so).
    pub simd: &'static str,
    /// Prompt length of the prefill measurement.
    pub prompt_tokens: usize,
    /// Tokens generated for the decode measurement.
    pub gen_tokens: usize,
    /// Seconds to open, validate and load the model (tokenizer included): until it can answer.
    pub load_s: f64,
    /// Seconds after load until the background repacking of Q4_K weights ended (the speeds
    /// below are measured after it).
    pub repack_s: f64,
    /// Prompt tokens per second.
    pub prefill_tok_s: f64,
    /// Generated tokens per second right after the prompt.
    pub decode_tok_s: f64,
    /// With --paired-bandwidth: mean read bandwidth (GB/s) of the passes taken between the
    /// decode run's tokens.
    pub paired_read_gb_s: Option<f64>,
    /// Seconds from starting the prompt to having the first generated token.
    pub ttft_s: f64,
    /// Peak resident memory in MB after the prompt and decode runs (before any --depth run).
    pub peak_rss_mb: f64,
    /// Context length of the depth measurement (0 = not measured).
    pub depth: usize,
    /// Tokens generated after the depth context.
    pub depth_gen_tokens: usize,
    /// Generated tokens per second after `depth` tokens of context (null when not measured).
    pub depth_decode_tok_s: Option<f64>,
    /// Peak resident memory in MB at the end, the depth run included.
    pub peak_rss_end_mb: f64,
    /// Seconds from each Stop request to the prefill returning (with --stop-latency).
    pub stop_latencies_s: Vec<f64>,
}

/// What `--bandwidth` measured.
#[derive(Debug, Serialize)]
pub struct BandwidthResult {
    /// Reading threads.
    pub threads: usize,
    /// Buffer size in MiB.
    pub buffer_mb: usize,
    /// Best read bandwidth over the passes, in GB/s (10^9 bytes).
    pub read_gb_s: f64,
}

/// Runs the subcommand.
pub fn run(args: Args) -> Result<()> {
    if args.bandwidth {
        return run_bandwidth(&args);
    }
    let Some(model) = args.model.as_deref() else {
        bail!("--model is required");
    };
    let result = run_model(&args, model)?;
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        print_model_result(&result);
    }
    Ok(())
}

fn run_model(args: &Args, model: &Path) -> Result<BenchResult> {
    if args.prompt_tokens == 0 {
        bail!("--prompt-tokens must be at least 1");
    }
    let file_bytes = std::fs::metadata(model)
        .with_context(|| format!("cannot read {}", model.display()))?
        .len();
    let depth_run = if args.depth > 0 {
        args.depth + args.depth_gen_tokens
    } else {
        0
    };
    let options = LoadOptions {
        context_length: (args.prompt_tokens + args.gen_tokens).max(depth_run) + 1,
        threads: args.threads,
    };
    let start = Instant::now();
    let mut engine = Engine::load(model, &options, &mut |_| true)
        .with_context(|| format!("cannot load {}", model.display()))?;
    let load_s = start.elapsed().as_secs_f64();
    let start = Instant::now();
    engine.wait_for_repack();
    let repack_s = start.elapsed().as_secs_f64();
    let vocab = vocab_size(&mut engine)?;

    let prompt = pseudo_random_prompt(args.prompt_tokens, vocab, 0);
    let start = Instant::now();
    let prefill = engine.prefill(&prompt)?;
    let next = argmax(&prefill.logits);
    let ttft_s = start.elapsed().as_secs_f64();
    let paired = args
        .paired_bandwidth
        .then(|| bandwidth::ReadBuffer::new(args.bandwidth_mb << 20));
    let threads = engine.threads();
    let (decode_tok_s, paired_read_gb_s) =
        decode_rate(&mut engine, next, args.gen_tokens, paired.as_ref(), threads)?;
    let rss_after_decode = peak_rss_mb().unwrap_or(f64::NAN);

    let depth_decode_tok_s = if args.depth > 0 {
        engine.reset();
        let context = pseudo_random_prompt(args.depth, vocab, 1);
        let next = argmax(&engine.prefill(&context)?.logits);
        Some(decode_rate(&mut engine, next, args.depth_gen_tokens, None, threads)?.0)
    } else {
        None
    };
    let stop_latencies_s = if args.stop_latency {
        STOP_MOMENTS
            .iter()
            .filter_map(|&at| stop_latency(&mut engine, &prompt, ttft_s * at).transpose())
            .collect::<Result<_>>()?
    } else {
        Vec::new()
    };
    Ok(BenchResult {
        file_bytes,
        threads: args.threads,
        simd: simd_level().name(),
        prompt_tokens: args.prompt_tokens,
        gen_tokens: args.gen_tokens,
        load_s,
        repack_s,
        prefill_tok_s: args.prompt_tokens as f64 / ttft_s,
        decode_tok_s,
        paired_read_gb_s,
        ttft_s,
        peak_rss_mb: rss_after_decode,
        depth: args.depth,
        depth_gen_tokens: args.depth_gen_tokens,
        depth_decode_tok_s,
        peak_rss_end_mb: peak_rss_mb().unwrap_or(f64::NAN),
        stop_latencies_s,
    })
}

/// When the --stop-latency runs ask to stop, as fractions of the measured prefill time.
const STOP_MOMENTS: [f64; 4] = [0.13, 0.37, 0.61, 0.87];

/// Seconds a prefill of `prompt` (on an empty cache) takes to return after a Stop requested
/// `after_s` seconds into it; `None` when it ended before that (a machine busier before).
fn stop_latency(engine: &mut Engine, prompt: &[u32], after_s: f64) -> Result<Option<f64>> {
    use std::sync::atomic::{AtomicBool, Ordering};
    engine.reset();
    let stop = AtomicBool::new(false);
    let requested = std::sync::Mutex::new(None);
    let outcome = std::thread::scope(|scope| {
        scope.spawn(|| {
            std::thread::sleep(std::time::Duration::from_secs_f64(after_s));
            *requested.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
            stop.store(true, Ordering::Relaxed);
        });
        engine.prefill_cancellable(prompt, &|| stop.load(Ordering::Relaxed))
    });
    let returned = Instant::now();
    engine.reset();
    match (
        outcome,
        *requested.lock().unwrap_or_else(|e| e.into_inner()),
    ) {
        (Err(crate::engine::error::EngineError::Cancelled), Some(at)) => {
            Ok(Some(returned.duration_since(at).as_secs_f64()))
        }
        (Ok(_), _) => Ok(None),
        (Err(err), _) => Err(err.into()),
    }
}

fn print_model_result(r: &BenchResult) {
    print!(
        "{} kernels | load {:.2} s (repacked {:.2} s later) | prefill {:.1} tok/s | decode {:.2} tok/s | TTFT {:.2} s | peak RSS {:.0} MB",
        r.simd, r.load_s, r.repack_s, r.prefill_tok_s, r.decode_tok_s, r.ttft_s, r.peak_rss_mb
    );
    if let Some(gb_s) = r.paired_read_gb_s {
        let share = r.decode_tok_s * r.file_bytes as f64 / 1e9 / gb_s;
        print!(
            " | read bandwidth between tokens {gb_s:.1} GB/s (decode read the file at {:.0}% of it)",
            100.0 * share
        );
    }
    if let Some(rate) = r.depth_decode_tok_s {
        print!(" | decode after {} tokens {:.2} tok/s", r.depth, rate);
    }
    if let Some(worst) = r.stop_latencies_s.iter().copied().reduce(f64::max) {
        print!(" | stop within {worst:.2} s");
    }
    println!();
}

/// The vocabulary size, from the length of the logits of a one-token prompt (cache reset after).
fn vocab_size(engine: &mut Engine) -> Result<usize> {
    let vocab = engine.prefill(&[1])?.logits.len();
    engine.reset();
    if vocab < 2000 {
        bail!("the model's vocabulary ({vocab} tokens) is too small to benchmark");
    }
    Ok(vocab)
}

/// Deterministic pseudo-random ids from the ordinary text-token range (away from both ends,
/// where special tokens live). `stream` selects an independent sequence.
fn pseudo_random_prompt(len: usize, vocab: usize, stream: u64) -> Vec<u32> {
    let range = (vocab.min(100_000) - 1000) as u64;
    (0..len as u64)
        .map(|i| (((i + stream * 7_919) * 2_654_435_761 + 12_345) % range + 500) as u32)
        .collect()
}

/// Greedy-decodes `tokens` tokens starting from `next`; returns tokens per second and, with
/// `paired`, the mean GB/s of the read passes of it taken (untimed) after each token.
fn decode_rate(
    engine: &mut Engine,
    mut next: u32,
    tokens: usize,
    paired: Option<&bandwidth::ReadBuffer>,
    threads: usize,
) -> Result<(f64, Option<f64>)> {
    let mut decoding = 0.0;
    let mut passes = Vec::new();
    for _ in 0..tokens {
        let start = Instant::now();
        next = argmax(&engine.decode(next)?);
        decoding += start.elapsed().as_secs_f64();
        if let Some(buffer) = paired {
            passes.push(buffer.pass_gb_s(threads));
        }
    }
    let mean_pass = (!passes.is_empty()).then(|| passes.iter().sum::<f64>() / passes.len() as f64);
    Ok((tokens as f64 / decoding, mean_pass))
}

/// Index of the largest logit (the first on ties).
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Peak resident set size of this process (Linux `VmHWM`), in MB.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn run_bandwidth(args: &Args) -> Result<()> {
    let threads = if args.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        args.threads
    };
    if args.bandwidth_mb == 0 {
        bail!("--bandwidth-mb must be at least 1");
    }
    let result = BandwidthResult {
        threads,
        buffer_mb: args.bandwidth_mb,
        read_gb_s: bandwidth::read_bandwidth_gb_s(args.bandwidth_mb << 20, threads),
    };
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        println!(
            "read bandwidth {:.1} GB/s ({} threads, {} MiB buffer, best of {})",
            result.read_gb_s,
            result.threads,
            result.buffer_mb,
            bandwidth::PASSES
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudo_random_prompt_stays_in_the_ordinary_range_and_streams_differ() {
        let a = pseudo_random_prompt(300, 49_152, 0);
        let b = pseudo_random_prompt(300, 49_152, 1);
        assert!(
            a.iter()
                .chain(&b)
                .all(|&t| (500..49_152 - 500).contains(&t))
        );
        assert_ne!(a, b);
    }

    #[test]
    fn argmax_picks_the_first_largest() {
        assert_eq!(argmax(&[0.5, 2.0, -1.0, 2.0]), 1);
    }
}
