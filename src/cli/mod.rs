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

/// Parses a `--threads` value: 0 (one per physical core) up to the most a compute pool
/// starts on this computer ([`max_threads`](crate::engine::cpu::pool::max_threads)).
pub(crate) fn parse_threads(value: &str) -> Result<usize, String> {
    let threads: usize = value
        .parse()
        .map_err(|_| format!("\"{value}\" is not a whole number of threads"))?;
    let max = crate::engine::cpu::pool::max_threads();
    if threads > max {
        return Err(format!(
            "{threads} threads is more than the {max} this computer can use (0 uses one per physical core)"
        ));
    }
    Ok(threads)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_counts_past_the_limit_are_refused_with_a_clear_message() {
        let max = crate::engine::cpu::pool::max_threads();
        let parse = |command: &str, threads: &str| {
            let mut args = vec!["smoldesk", command, "-m", "m.gguf", "--threads", threads];
            if command == "generate" {
                args.extend(["--prompt", "hi"]);
            }
            Cli::try_parse_from(args)
        };
        for command in ["generate", "bench"] {
            let err = parse(command, &usize::MAX.to_string()).unwrap_err();
            assert!(
                err.to_string().contains(&format!("more than the {max}")),
                "{command}: {err}"
            );
            assert!(parse(command, &(max + 1).to_string()).is_err(), "{command}");
            assert!(parse(command, "lots").is_err(), "{command}");
            for ok in ["0", "1", &max.to_string()] {
                assert!(parse(command, ok).is_ok(), "{command} --threads {ok}");
            }
        }
    }
}
