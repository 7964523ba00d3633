//! `smoldesk info`: describes a model file without loading its weights.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use serde::Serialize;

use crate::engine::ModelInfo;
use crate::engine::gguf::GgufFile;

/// Context length the memory estimate assumes.
const ESTIMATE_CONTEXT: usize = 8192;

/// Arguments of `smoldesk info`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The GGUF model file.
    #[arg(short, long)]
    pub model: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Include the embedded chat template in full.
    #[arg(long)]
    pub template: bool,
}

/// What `smoldesk info` reports: the model description plus derived figures.
#[derive(Debug, Serialize)]
pub struct InfoReport {
    /// The description read from the file (the template only when asked for).
    #[serde(flatten)]
    pub info: ModelInfo,
    /// The most common matrix type, e.g. `Q4_K`.
    pub main_quantization: Option<String>,
    /// Whether the file embeds a chat template.
    pub has_chat_template: bool,
    /// Length of the embedded chat template in characters.
    pub chat_template_chars: usize,
    /// Layers that apply rotary position embeddings.
    pub rope_layers: usize,
    /// Context length the estimates below assume (8k, or less when the model is shorter).
    pub estimate_context: usize,
    /// KV cache size at `estimate_context`.
    pub kv_cache_bytes: u64,
    /// Estimated memory needed at `estimate_context`.
    pub ram_estimate_bytes: u64,
}

impl InfoReport {
    /// Derives the report from a model description, dropping the template unless asked for.
    pub fn new(mut info: ModelInfo, with_template: bool) -> Self {
        let chat_template_chars = info.chat_template.as_ref().map_or(0, |t| t.chars().count());
        let has_chat_template = info.chat_template.is_some();
        if !with_template {
            info.chat_template = None;
        }
        let estimate_context = ESTIMATE_CONTEXT.min(info.hparams.context_length);
        Self {
            main_quantization: info.main_quantization().map(str::to_string),
            has_chat_template,
            chat_template_chars,
            rope_layers: info.hparams.rope_layer_count(),
            estimate_context,
            kv_cache_bytes: info.kv_cache_bytes(estimate_context),
            ram_estimate_bytes: info.ram_estimate_bytes(estimate_context),
            info,
        }
    }

    /// The report as aligned `label  value` lines for a terminal.
    pub fn to_text(&self) -> String {
        let info = &self.info;
        let h = &info.hparams;
        let mut lines: Vec<(&str, String)> = vec![
            (
                "file",
                format!("{} ({})", info.path.display(), human_bytes(info.file_size)),
            ),
            ("architecture", info.architecture.gguf_name().to_string()),
            ("name", info.name.clone().unwrap_or_else(|| "(none)".into())),
            ("parameters", human_count(info.n_params)),
            ("quantization", self.quantization_text()),
            ("tensor types", tensor_types_text(info)),
            ("context", format!("{} tokens", h.context_length)),
            (
                "layers",
                format!(
                    "{} (hidden {}, feed-forward {}, {} heads, {} KV heads, head size {})",
                    h.n_layer, h.n_embd, h.n_ff, h.n_head, h.n_head_kv, h.head_dim
                ),
            ),
            (
                "RoPE",
                format!(
                    "base {} on {} of {} layers",
                    h.rope_theta, self.rope_layers, h.n_layer
                ),
            ),
            ("RMS epsilon", format!("{:.1e}", h.rms_eps)),
            ("vocabulary", format!("{} tokens", h.vocab_size)),
            (
                "embeddings",
                if info.tied_embeddings {
                    "tied (no output.weight)"
                } else {
                    "separate output"
                }
                .into(),
            ),
            ("RAM estimate", self.ram_text()),
            ("can think", yes_no(info.can_think).into()),
            ("chat template", self.template_text()),
        ];
        if let Some(template) = info.chat_template.as_deref() {
            lines.push(("", format!("\n{template}")));
        }
        let mut out = String::new();
        for (label, value) in lines {
            let _ = writeln!(out, "{label:<14}{value}");
        }
        out
    }

    fn quantization_text(&self) -> String {
        if self.info.tensor_types.is_empty() {
            return "(no weights: vocabulary only)".into();
        }
        match (&self.info.file_type, &self.main_quantization) {
            (Some(file_type), Some(main)) => format!("{file_type} (mostly {main})"),
            (None, Some(main)) => format!("mostly {main}"),
            (Some(file_type), None) => file_type.clone(),
            (None, None) => "unknown".into(),
        }
    }

    fn ram_text(&self) -> String {
        format!(
            "{} at {} tokens of context (weights {}, KV cache {})",
            human_bytes(self.ram_estimate_bytes),
            self.estimate_context,
            human_bytes(self.info.weight_bytes),
            human_bytes(self.kv_cache_bytes)
        )
    }

    fn template_text(&self) -> String {
        if self.has_chat_template {
            format!("embedded ({} characters)", self.chat_template_chars)
        } else {
            "none".into()
        }
    }
}

fn tensor_types_text(info: &ModelInfo) -> String {
    if info.tensor_types.is_empty() {
        return "(no tensors)".into();
    }
    info.tensor_types
        .iter()
        .map(|(name, count)| format!("{name} ×{count}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn yes_no(v: bool) -> &'static str {
    if v { "yes" } else { "no" }
}

/// `1_900_000_000` → `1.90 GB` (decimal units, as file managers show them).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["kB", "MB", "GB", "TB"];
    if n < 1000 {
        return format!("{n} B");
    }
    let mut value = n as f64;
    let mut unit = "B";
    for u in UNITS {
        if value < 1000.0 {
            break;
        }
        value /= 1000.0;
        unit = u;
    }
    format!("{value:.2} {unit}")
}

/// `3_075_098_624` → `3.08 B`, `134_515_008` → `134.5 M`.
fn human_count(n: u64) -> String {
    match n {
        0 => "0 (no weights)".into(),
        n if n >= 1_000_000_000 => format!("{:.2} B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1} M", n as f64 / 1e6),
        n => n.to_string(),
    }
}

/// Runs the subcommand.
pub fn run(args: Args) -> anyhow::Result<()> {
    let path = &args.model;
    let gguf = GgufFile::open(path)
        .with_context(|| format!("cannot read the model file {}", path.display()))?;
    let info = ModelInfo::from_gguf(&gguf)
        .with_context(|| format!("cannot use the model file {}", path.display()))?;
    let report = InfoReport::new(info, args.template);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_sizes_and_counts() {
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(1_904_000_000), "1.90 GB");
        assert_eq!(human_bytes(3_944_032), "3.94 MB");
        assert_eq!(human_count(3_075_098_624), "3.08 B");
        assert_eq!(human_count(134_515_008), "134.5 M");
        assert_eq!(human_count(512), "512");
    }
}
