//! `smoldesk synth`: writes a synthetic SmolLM3 model with random weights for benchmarks.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};

use crate::engine::ModelInfo;
use crate::engine::gguf::GgufFile;
use crate::engine::synth::{SynthPreset, write_synthetic_model};

/// The vocabulary file used when `--vocab` is not given.
const DEFAULT_VOCAB: &str = "smollm3-vocab.gguf";

/// Arguments of `smoldesk synth`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to write the model (the file appears only once complete).
    #[arg(short, long)]
    pub out: PathBuf,
    /// Which shapes to give the model.
    #[arg(long, value_enum, default_value_t = Preset::Smollm3)]
    pub preset: Preset,
    /// Seed of the random weights (the same seed writes the same file).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A GGUF whose tokenizer and other metadata are copied. Default: `smollm3-vocab.gguf` from
    /// `$SMOLDESK_FIXTURES`, `shared/fixtures` or `../shared/fixtures`.
    #[arg(long)]
    pub vocab: Option<PathBuf>,
}

/// The model shapes `--preset` offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// SmolLM3-3B: 36 layers, hidden 2048, about 1.9 GB as Q4_K_M.
    #[value(name = "smollm3-3b")]
    Smollm3,
    /// The tiny test model's shapes: 8 layers, hidden 256.
    Tiny,
}

impl From<Preset> for SynthPreset {
    fn from(preset: Preset) -> Self {
        match preset {
            Preset::Smollm3 => SynthPreset::SmolLm3,
            Preset::Tiny => SynthPreset::Tiny,
        }
    }
}

/// Where to look for the default vocabulary file.
fn vocab_candidates() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::var_os("SMOLDESK_FIXTURES") {
        dirs.push(PathBuf::from(dir));
    }
    dirs.push(PathBuf::from("shared/fixtures"));
    dirs.push(PathBuf::from("../shared/fixtures"));
    dirs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"));
    dirs.into_iter().map(|d| d.join(DEFAULT_VOCAB)).collect()
}

fn find_vocab(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        return Ok(path);
    }
    let candidates = vocab_candidates();
    match candidates.iter().find(|p| p.is_file()) {
        Some(found) => Ok(found.clone()),
        None => bail!(
            "no vocabulary file given and {DEFAULT_VOCAB} not found (looked at {}); pass --vocab FILE",
            candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Prints progress to stderr at every further tenth.
fn progress_printer() -> impl FnMut(f32) {
    let mut next_tenth = 1;
    move |fraction| {
        while fraction * 10.0 >= next_tenth as f32 && next_tenth <= 10 {
            eprint!("{}% ", next_tenth * 10);
            if next_tenth == 10 {
                eprintln!();
            }
            next_tenth += 1;
        }
    }
}

/// Runs the subcommand.
pub fn run(args: Args) -> anyhow::Result<()> {
    let vocab_path = find_vocab(args.vocab)?;
    let vocab = GgufFile::open(&vocab_path)
        .with_context(|| format!("cannot read the vocabulary file {}", vocab_path.display()))?;
    let start = Instant::now();
    eprintln!(
        "writing {} (preset {:?}, seed {}, vocabulary from {})",
        args.out.display(),
        args.preset,
        args.seed,
        vocab_path.display()
    );
    let mut progress = progress_printer();
    let size = write_synthetic_model(
        &args.out,
        &vocab,
        args.preset.into(),
        args.seed,
        &mut progress,
    )
    .with_context(|| format!("cannot write {}", args.out.display()))?;
    let gguf = GgufFile::open(&args.out).context("the written file does not read back")?;
    let info = ModelInfo::from_gguf(&gguf).context("the written file does not validate")?;
    println!(
        "wrote {} ({} bytes, {} tensors: {:?}) in {:.1} s",
        args.out.display(),
        size,
        gguf.tensors.len(),
        info.tensor_types,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
