//! `smoldesk generate`: stream a reply to one prompt in the terminal.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::chat::conversation::{ChatSettings, Message, Role};
use crate::chat::generate::{
    GenerationContext, GenerationEvent, Reply, generate_from_tokens, generate_reply,
    sampling_for_reply,
};
use crate::chat::prompt::PromptBuilder;
use crate::chat::state_cache::{
    DEFAULT_DISK_CAP, StateCache, StateCacheConfig, restore_longest_prefix,
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
    #[arg(long, default_value_t = 0, value_parser = super::parse_threads)]
    pub threads: usize,
    /// End with a JSON line: {"thinking", "answer", "tokens", "stats", "state_cache"}.
    #[arg(long)]
    pub json: bool,
    /// Folder of saved KV states: restore the one sharing the longest prefix with the prompt
    /// before computing it, and save the state after the reply.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
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
    let messages = [Message::new(Role::User, args.prompt.clone())];
    let cache = args.cache_dir.as_deref().map(CliStateCache::open);
    let restored = match &cache {
        Some(cache) => Some(cache.restore(&mut engine, &args, &ctx, &settings, &messages)?),
        None => None,
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
        generate_reply(&mut engine, &ctx, &messages, &settings, &mut on_event)?
    };
    let state_cache = cache
        .zip(restored)
        .map(|(cache, restored)| cache.save(&engine, restored));
    println!();
    if args.json {
        let json = serde_json::json!({
            "thinking": reply.thinking,
            "answer": reply.answer,
            "tokens": reply.tokens,
            "stats": reply.stats,
            "state_cache": state_cache,
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

/// `--cache-dir`: the saved KV states of earlier runs.
struct CliStateCache {
    cache: StateCache,
}

/// What `--cache-dir` did, for `--json`.
#[derive(Debug, serde::Serialize)]
struct CacheReport {
    /// Prompt tokens whose state was restored from the folder.
    restored_tokens: usize,
    /// Seconds reading and restoring the state took.
    restore_secs: f64,
    /// Seconds saving the new state took (after the reply).
    save_secs: f64,
    /// Bytes of the saved state file.
    saved_bytes: u64,
}

/// The key to save under and what the restore did.
struct Restored {
    key: String,
    tokens: usize,
    secs: f64,
}

impl CliStateCache {
    fn open(dir: &std::path::Path) -> Self {
        let config = StateCacheConfig {
            dir: Some(dir.to_path_buf()),
            memory_budget: 0,
            disk_cap: DEFAULT_DISK_CAP,
        };
        Self {
            cache: StateCache::open(config),
        }
    }

    /// Restores the state sharing the longest prefix with the prompt the run will compute.
    fn restore(
        &self,
        engine: &mut Engine,
        args: &Args,
        ctx: &GenerationContext<'_>,
        settings: &ChatSettings,
        messages: &[Message],
    ) -> Result<Restored> {
        let start = std::time::Instant::now();
        let prompt = if args.raw {
            engine.tokenizer().encode_prompt(&args.prompt)?
        } else {
            let tokenizer = engine.tokenizer().clone();
            PromptBuilder::new(ctx.formatter, &tokenizer, ctx.date)
                .build(settings, messages)?
                .tokens
        };
        let found = restore_longest_prefix(&self.cache, engine, &prompt);
        let secs = start.elapsed().as_secs_f64();
        let (key, tokens) = found.unwrap_or_else(|| {
            let bytes: Vec<u8> = prompt.iter().flat_map(|t| t.to_le_bytes()).collect();
            (format!("cli-{:08x}", crc32fast::hash(&bytes)), 0)
        });
        if tokens > 0 {
            eprintln!("restored {tokens} cached tokens in {secs:.2} s");
        }
        Ok(Restored { key, tokens, secs })
    }

    /// Saves the engine's state under the restored state's key (or a new one) and waits until
    /// it is written.
    fn save(self, engine: &Engine, restored: Restored) -> CacheReport {
        let start = std::time::Instant::now();
        let state = engine.export_kv_state();
        self.cache.put(&restored.key, state);
        self.cache.flush();
        CacheReport {
            restored_tokens: restored.tokens,
            restore_secs: restored.secs,
            save_secs: start.elapsed().as_secs_f64(),
            saved_bytes: self.cache.stored_bytes(&restored.key).unwrap_or(0),
        }
    }
}
