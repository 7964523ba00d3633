//! `smoldesk tokenize`: shows how a model's own tokenizer splits a text.

use std::path::PathBuf;

use anyhow::Context;

use crate::engine::gguf::GgufFile;
use crate::engine::tokenizer::GgufTokenizer;

/// Arguments of `smoldesk tokenize`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The GGUF model whose tokenizer to use.
    #[arg(short, long)]
    pub model: PathBuf,
    /// The text to tokenize.
    #[arg(long)]
    pub text: String,
    /// Recognise control tokens such as `<|im_start|>`, as in a rendered chat prompt (without
    /// this flag the text is treated as typed by a user).
    #[arg(long)]
    pub special: bool,
    /// Print `{"ids":[...]}` only.
    #[arg(long)]
    pub json: bool,
}

/// Runs the subcommand.
pub fn run(args: Args) -> anyhow::Result<()> {
    let gguf = GgufFile::open(&args.model)
        .with_context(|| format!("cannot open the model {}", args.model.display()))?;
    let tokenizer = GgufTokenizer::from_gguf(&gguf)
        .with_context(|| format!("cannot build the tokenizer of {}", args.model.display()))?;
    let ids = tokenizer
        .encode(&args.text, args.special)
        .context("cannot tokenize the text")?;
    if args.json {
        println!("{}", serde_json::json!({ "ids": ids }));
    } else {
        print_table(&tokenizer, &ids);
    }
    Ok(())
}

/// Prints the ids on one line, then one line per token with its vocabulary string and the text
/// it stands for.
fn print_table(tokenizer: &GgufTokenizer, ids: &[u32]) {
    let joined: Vec<String> = ids.iter().map(u32::to_string).collect();
    println!("{} tokens: [{}]", ids.len(), joined.join(", "));
    for &id in ids {
        let vocab = tokenizer.token_text(id).unwrap_or_default();
        let text = String::from_utf8_lossy(tokenizer.token_piece(id));
        println!("{id:>8}  {vocab:<24}  {text:?}");
    }
}
