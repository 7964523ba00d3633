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
        println!(
            "{id:>8}  {vocab:<24}  {}",
            piece_label(tokenizer.token_piece(id))
        );
    }
}

/// A token's bytes as a quoted string, or as escaped bytes when they are part of a character.
fn piece_label(piece: &[u8]) -> String {
    match std::str::from_utf8(piece) {
        Ok(text) => format!("{text:?}"),
        Err(_) => format!("b\"{}\"", piece.escape_ascii()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_characters_show_their_bytes() {
        assert_eq!(piece_label(b" world"), "\" world\"");
        assert_eq!(piece_label(&[b' ', 0xF0, 0x9F]), "b\" \\xf0\\x9f\"");
    }
}
