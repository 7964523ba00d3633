//! `smoldesk generate`: stream a reply to one prompt in the terminal.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::chat::conversation::{ChatSettings, Message, Role};
use crate::chat::generate::{
    GenerationContext, GenerationEvent, Reply, generate_from_tokens, generate_reply,
    sampling_for_reply,
};
use crate::chat::template::PromptFormatter;
use crate::chat::thinking::{SegmentKind, prompt_ends_inside_think};
use crate::engine::sampling::model_defaults;
use crate::engine::session::{Engine, LoadOptions};

/// Arguments of `smoldesk generate`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The GGUF model.
    #[arg(short, long)]
    pub model: PathBuf,
    /// The user's message (or, with --raw, the whole prompt text).
    #[arg(long)]
    pub prompt: String,
    /// A system prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Let the model reason before answering.
    #[arg(long, conflicts_with = "no_think")]
    pub think: bool,
    /// Answer without reasoning.
    #[arg(long)]
    pub no_think: bool,
    /// Send the prompt as is, without the chat template (special tokens are parsed).
    #[arg(long)]
    pub raw: bool,
    /// Most tokens to generate.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Sampling temperature (0 = greedy).
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Nucleus sampling threshold.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Drop tokens below min_p times the top probability.
    #[arg(long)]
    pub min_p: Option<f32>,
    /// Penalty for recently used tokens (1 = off).
    #[arg(long)]
    pub repeat_penalty: Option<f32>,
    /// Random seed (without it, each run draws a fresh one; the stats show which).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Most tokens the model may think; then the thought is closed and the model answers.
    #[arg(long, value_name = "N")]
    pub think_budget: Option<usize>,
    /// Context length in tokens.
    #[arg(long, default_value_t = 8192)]
    pub context: usize,
    /// Compute threads (0 = all physical cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// End with a JSON line: {"thinking", "answer", "tokens", "stats"}.
    #[arg(long)]
    pub json: bool,
}

impl Args {
    fn settings(&self, engine: &Engine) -> ChatSettings {
        let mut sampling = model_defaults(engine.info().architecture);
        if let Some(v) = self.temperature {
            sampling.temperature = v;
        }
        if let Some(v) = self.top_p {
            sampling.top_p = v;
        }
        if let Some(v) = self.min_p {
            sampling.min_p = v;
        }
        if let Some(v) = self.repeat_penalty {
            sampling.repeat_penalty = v;
        }
        if let Some(v) = self.top_k {
            sampling.top_k = v;
        }
        if let Some(v) = self.seed {
            sampling.seed = v;
        }
        if let Some(v) = self.max_tokens {
            sampling.max_tokens = v;
        }
        ChatSettings {
            system_prompt: self.system.clone().unwrap_or_default(),
            thinking: !self.no_think && (self.think || engine.info().can_think),
            sampling,
            fixed_seed: self.seed.is_some(),
            thinking_budget: self.think_budget,
        }
    }
}

/// Prints segments as they stream, marking thinking apart from the answer.
struct Printer {
    current: Option<SegmentKind>,
}

impl Printer {
    fn print(&mut self, kind: SegmentKind, text: &str) {
        let mut out = std::io::stdout().lock();
        if self.current != Some(kind) {
            let header = match kind {
                SegmentKind::Thinking => "[thinking]\n",
                SegmentKind::Answer if self.current.is_some() => "\n[answer]\n",
                SegmentKind::Answer => "",
            };
            let _ = out.write_all(header.as_bytes());
            self.current = Some(kind);
        }
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    }
}

/// Runs the subcommand.
pub fn run(args: Args) -> Result<()> {
    let options = LoadOptions {
        context_length: args.context,
        threads: args.threads,
    };
    let mut engine = Engine::load(&args.model, &options, &mut |_| true)
        .with_context(|| format!("cannot load {}", args.model.display()))?;
    let settings = args.settings(&engine);
    let formatter = PromptFormatter::new(engine.info().chat_template.as_deref(), None);
    let not_cancelled = || false;
    let ctx = GenerationContext {
        formatter: &formatter,
        date: chrono::Local::now().date_naive(),
        cancelled: &not_cancelled,
    };
    let mut printer = Printer { current: None };
    let mut on_event = |event: GenerationEvent| match event {
        GenerationEvent::Segment(segment) => printer.print(segment.kind, &segment.text),
        GenerationEvent::Started {
            template_fallback: Some(reason),
            ..
        } => eprintln!("note: using ChatML: {reason}"),
        GenerationEvent::Started { .. } => {}
    };
    let reply: Reply = if args.raw {
        let tokens = engine.tokenizer().encode_prompt(&args.prompt)?;
        let inside = prompt_ends_inside_think(&args.prompt);
        generate_from_tokens(
            &mut engine,
            &ctx,
            &tokens,
            inside,
            &sampling_for_reply(&settings),
            settings.thinking_budget,
            &mut on_event,
        )?
    } else {
        let messages = [Message::new(Role::User, args.prompt.clone())];
        generate_reply(&mut engine, &ctx, &messages, &settings, &mut on_event)?
    };
    println!();
    if args.json {
        let json = serde_json::json!({
            "thinking": reply.thinking,
            "answer": reply.answer,
            "tokens": reply.tokens,
            "stats": reply.stats,
        });
        println!("{json}");
    } else {
        let s = &reply.stats;
        eprintln!(
            "{} prompt tokens ({} computed), {} generated ({} thinking{}); seed {}; TTFT {:.2} s; prefill {:.1} tok/s; decode {:.2} tok/s; stop: {:?}",
            s.prompt_tokens,
            s.prefilled_tokens,
            s.generated_tokens,
            s.thinking_tokens,
            if s.thinking_budget_reached {
                ", budget reached"
            } else {
                ""
            },
            s.seed,
            s.time_to_first_token_secs,
            s.prefill_tok_per_sec,
            s.decode_tok_per_sec,
            s.stop_reason
        );
    }
    Ok(())
}
