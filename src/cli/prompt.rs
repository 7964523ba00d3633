//! `smoldesk prompt`: renders a conversation with a chat template and prints the exact prompt
//! (and its tokens), built by the same [`PromptBuilder`] as the app's.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use chrono::NaiveDate;

use crate::chat::prompt::{BuiltPrompt, PromptBuilder};
use crate::chat::template::{ChatTemplate, PromptFormatter, RenderOptions, read_template_file};
use crate::engine::gguf::GgufFile;
use crate::engine::tokenizer::GgufTokenizer;

/// Arguments of `smoldesk prompt`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("template_source").required(true).multiple(true).args(["model", "template"])))]
pub struct Args {
    /// A GGUF model: its embedded chat template (ChatML if it has none or it fails, as in the
    /// app) and its BOS/EOS tokens.
    #[arg(short = 'm', long)]
    pub model: Option<PathBuf>,
    /// A Jinja template file to render with instead (errors are reported, not worked around).
    #[arg(long)]
    pub template: Option<PathBuf>,
    /// A JSON file: an array of {role, content} messages, or an object with "messages" (its
    /// other keys, such as "tools", are passed to the template as keyword arguments).
    #[arg(long)]
    pub messages: PathBuf,
    /// Set enable_thinking to true.
    #[arg(long, conflicts_with = "no_think")]
    pub think: bool,
    /// Set enable_thinking to false.
    #[arg(long)]
    pub no_think: bool,
    /// The date strftime_now uses, e.g. "26 November 2026" or "2026-11-26" (default: today).
    #[arg(long)]
    pub date: Option<String>,
    /// Do not end the prompt with the start of an assistant turn.
    #[arg(long)]
    pub no_generation_prompt: bool,
    /// Print `{"text": …, "tokens": […]}` (the tokens need the model's tokenizer: -m).
    #[arg(long, requires = "model")]
    pub json: bool,
}

/// Runs the subcommand.
pub fn run(args: Args) -> anyhow::Result<()> {
    let (messages, extra) = read_messages(&args.messages)?;
    let mut opts = RenderOptions {
        add_generation_prompt: !args.no_generation_prompt,
        enable_thinking: thinking_flag(&args),
        extra,
        ..RenderOptions::default()
    };
    if let Some(date) = &args.date {
        opts.date = parse_date(date)?;
    }
    let model = args.model.as_deref().map(open_model).transpose()?;
    let prompt = match (&args.template, &model) {
        (Some(path), None) => {
            let text = render_template_file(path, &messages, &opts)?;
            BuiltPrompt {
                text,
                tokens: Vec::new(),
                fallback: None,
                starts_in_thinking: false,
            }
        }
        (Some(path), Some(model)) => {
            // The file's errors are reported; once it renders, the app's builder is used.
            let tokenizer = model_tokenizer(model, &mut opts)?;
            render_template_file(path, &messages, &opts)?;
            let source = read_template_file(path)?;
            let formatter = PromptFormatter::new(None, Some(&source));
            PromptBuilder::new(&formatter, &tokenizer, opts.date).build_json(&messages, &opts)?
        }
        (None, Some(model)) => {
            let tokenizer = model_tokenizer(model, &mut opts)?;
            build_with_model_template(model, &tokenizer, &messages, &opts)?
        }
        (None, None) => bail!("give a model (-m) or a template file (--template)"),
    };
    let mut stdout = std::io::stdout().lock();
    if args.json {
        let json = serde_json::json!({ "text": prompt.text, "tokens": prompt.tokens });
        writeln!(stdout, "{json}")?;
    } else {
        stdout.write_all(prompt.text.as_bytes())?;
    }
    stdout.flush()?;
    Ok(())
}

/// Renders with a template file, reporting its errors rather than working around them.
fn render_template_file(
    path: &Path,
    messages: &[serde_json::Value],
    opts: &RenderOptions,
) -> anyhow::Result<String> {
    ChatTemplate::from_file(path)?
        .render_json(messages, opts)
        .with_context(|| format!("cannot render {}", path.display()))
}

/// The model's tokenizer; sets the BOS/EOS texts the template sees.
fn model_tokenizer(model: &GgufFile, opts: &mut RenderOptions) -> anyhow::Result<GgufTokenizer> {
    let tokenizer = GgufTokenizer::from_gguf(model)
        .with_context(|| format!("cannot read the tokenizer of {}", model.path.display()))?;
    opts.bos_token = tokenizer.bos_text().to_string();
    opts.eos_token = tokenizer.eos_text().to_string();
    Ok(tokenizer)
}

/// `--think` / `--no-think` as the template's `enable_thinking` (unset without either).
fn thinking_flag(args: &Args) -> Option<bool> {
    match (args.think, args.no_think) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    }
}

/// Builds the prompt with the model's embedded template the way the app does, warning on a
/// fallback.
fn build_with_model_template(
    model: &GgufFile,
    tokenizer: &GgufTokenizer,
    messages: &[serde_json::Value],
    opts: &RenderOptions,
) -> anyhow::Result<BuiltPrompt> {
    let embedded = model
        .get("tokenizer.chat_template")
        .and_then(|v| v.as_str());
    if embedded.is_none() {
        eprintln!("note: the model has no chat template; using ChatML");
    }
    let formatter = PromptFormatter::new(embedded, None);
    let prompt = PromptBuilder::new(&formatter, tokenizer, opts.date).build_json(messages, opts)?;
    if let Some(reason) = &prompt.fallback {
        eprintln!("warning: {reason}");
    }
    Ok(prompt)
}

/// Opens a GGUF file's metadata.
fn open_model(path: &Path) -> anyhow::Result<GgufFile> {
    GgufFile::open(path).with_context(|| format!("cannot open model {}", path.display()))
}

/// Reads the messages file: the messages, and any other keys of an object as template kwargs.
fn read_messages(
    path: &Path,
) -> anyhow::Result<(
    Vec<serde_json::Value>,
    serde_json::Map<String, serde_json::Value>,
)> {
    let limit = crate::chat::store::MAX_CONVERSATION_BYTES;
    let mut text = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(limit + 1).read_to_end(&mut text))
        .with_context(|| format!("cannot read messages file {}", path.display()))?;
    if text.len() as u64 > limit {
        bail!(
            "{} is larger than {limit} bytes, more than any conversation",
            path.display()
        );
    }
    let json: serde_json::Value = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let (messages, extra) = match json {
        serde_json::Value::Array(messages) => (messages, serde_json::Map::new()),
        serde_json::Value::Object(mut object) => match object.remove("messages") {
            Some(serde_json::Value::Array(messages)) => (messages, object),
            _ => bail!(
                "{}: the \"messages\" key must hold an array of messages",
                path.display()
            ),
        },
        _ => bail!(
            "{}: expected an array of messages or an object with \"messages\"",
            path.display()
        ),
    };
    if let Some(bad) = messages.iter().position(|m| !m.is_object()) {
        bail!("{}: message {bad} is not a JSON object", path.display());
    }
    Ok((messages, extra))
}

/// Parses a date like "26 November 2026", "26 Nov 2026" or "2026-11-26".
fn parse_date(text: &str) -> anyhow::Result<NaiveDate> {
    let text = text.trim();
    ["%d %B %Y", "%d %b %Y", "%Y-%m-%d"]
        .iter()
        .find_map(|format| NaiveDate::parse_from_str(text, format).ok())
        .with_context(|| {
            format!("cannot read the date {text:?} (expected e.g. \"26 November 2026\" or \"2026-11-26\")")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_fixture_date_and_iso_dates() {
        let expected = NaiveDate::from_ymd_opt(2026, 11, 26);
        assert_eq!(parse_date("26 November 2026").ok(), expected);
        assert_eq!(parse_date("26 Nov 2026").ok(), expected);
        assert_eq!(parse_date(" 2026-11-26 ").ok(), expected);
        assert!(parse_date("November the 26th").is_err());
    }

    #[test]
    fn reads_an_array_or_an_object_of_messages() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let array = dir.path().join("array.json");
        std::fs::write(&array, r#"[{"role": "user", "content": "Hi"}]"#)?;
        let (messages, extra) = read_messages(&array)?;
        assert_eq!(messages.len(), 1);
        assert!(extra.is_empty());

        let object = dir.path().join("object.json");
        std::fs::write(
            &object,
            r#"{"messages": [{"role": "user", "content": "Hi"}], "tools": [{"name": "f"}]}"#,
        )?;
        let (messages, extra) = read_messages(&object)?;
        assert_eq!(messages.len(), 1);
        assert!(extra.contains_key("tools"));

        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, r#"["just text"]"#)?;
        assert!(read_messages(&bad).is_err());
        Ok(())
    }
}
