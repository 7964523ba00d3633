//! The headless command line. A subcommand never opens a window; no subcommand opens the app.

mod bench;
mod generate;
mod headless;
mod info;
mod logits;
mod prompt;
mod synth;
mod tokenize;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// SmolDesk: chat with SmolLM3 privately on your own CPU.
#[derive(Debug, Parser)]
#[command(name = "smoldesk", version, about)]
pub struct Cli {
    /// A GGUF model to open in the app.
    pub model: Option<PathBuf>,
    /// Install the desktop entry and icon for the current user, then exit.
    #[arg(long)]
    pub install_desktop: bool,
    /// Headless subcommands (none opens the app).
    #[command(subcommand)]
    pub command: Option<Commands>,
}

/// Headless subcommands.
#[derive(Debug, Subcommand)]
pub enum Commands {
    /// Describe a model file: architecture, hyper-parameters, tensor types, template.
    Info(info::Args),
    /// Tokenize text with a model's tokenizer.
    Tokenize(tokenize::Args),
    /// Print the logits the model computes for a token sequence.
    Logits(logits::Args),
    /// Measure load time, prefill and decode speed, and peak memory.
    Bench(bench::Args),
    /// Render a conversation with a chat template and print the exact prompt.
    Prompt(prompt::Args),
    /// Generate a reply to a prompt, streaming it to the terminal.
    Generate(generate::Args),
    /// Write a synthetic model with random weights (for benchmarks and tests).
    Synth(synth::Args),
    /// The app without a window, chatting once (for tests of saving under kills and signals).
    #[command(hide = true)]
    HeadlessChat(headless::Args),
}

/// Parses the command line and runs a subcommand, or opens the app when there is none.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Commands::Info(a)) => info::run(a),
        Some(Commands::Tokenize(a)) => tokenize::run(a),
        Some(Commands::Logits(a)) => logits::run(a),
        Some(Commands::Bench(a)) => {
            limit_kernel_threads(a.threads);
            bench::run(a)
        }
        Some(Commands::Prompt(a)) => prompt::run(a),
        Some(Commands::Generate(a)) => generate::run(a),
        Some(Commands::Synth(a)) => synth::run(a),
        Some(Commands::HeadlessChat(a)) => {
            init_logging();
            headless::run(a)
        }
        None => {
            init_logging();
            crate::ui::run_app(cli.model, cli.install_desktop)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Makes candle's matmul kernels, which keep their own worker pool, use `threads` too (0 = their
/// default, one per core). Must run before the first matmul, while this is the only thread.
fn limit_kernel_threads(threads: usize) {
    if threads > 0 {
        // SAFETY: called at the start of `main`, before any other thread exists.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", threads.to_string()) };
    }
}

/// Sends `log` output to stderr (level from `RUST_LOG`, default warnings).
pub fn init_logging() {
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .try_init();
}
