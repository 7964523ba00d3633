//! Chat templates: rendering the GGUF's own Jinja template the way Hugging Face does.
//!
//! Hugging Face transformers renders `tokenizer.chat_template` with
//! `jinja2.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`, the
//! `loopcontrols` extension, its own `{% generation %}` tag, a `tojson` filter that does not
//! escape HTML, and the globals `raise_exception` and `strftime_now`. [`ChatTemplate`] reproduces
//! that environment with minijinja so that prompts are byte-identical to the reference.
//! [`PromptFormatter`] picks the template a model should use and falls back to ChatML when the
//! template cannot be used.
//!
//! A template comes from a downloaded model file, so it is untrusted: it is rendered in a
//! sandbox. Its source is limited to [`MAX_TEMPLATE_BYTES`], every render has a step and memory
//! budget ([`RENDER_FUEL`], minijinja's fuel, which also makes `"x" * n`, `indent(n)` and
//! `range(n)` refuse results they cannot pay for before allocating them), the output is limited
//! to [`MAX_PROMPT_BYTES`], macro recursion to [`RECURSION_LIMIT`] levels, and `tojson`'s
//! indentation and nesting are bounded. A template that exceeds a budget fails with
//! [`TemplateError::OverBudget`]; the formatter then uses ChatML from that point on.

use std::fmt;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use chrono::NaiveDate;
use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};

use crate::chat::conversation::{Message, Role};

/// The name the template is registered under (no extension, so nothing is auto-escaped).
const TEMPLATE_NAME: &str = "chat_template";

/// The ChatML template used when a model has none or its own cannot be used.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The longest template source accepted (real chat templates are a few kilobytes).
pub const MAX_TEMPLATE_BYTES: usize = 1 << 20;
/// The fuel of one render: about that many template steps, or 64 times that many bytes of data
/// created (see minijinja's `Environment::set_fuel`). SmolLM3's template spends about 60 per
/// message plus 1 per 20 bytes of content.
pub const RENDER_FUEL: u64 = 1_000_000;
/// The longest prompt a template may produce.
pub const MAX_PROMPT_BYTES: usize = 16 << 20;
/// How deep macros may call each other (each level takes native stack).
pub const RECURSION_LIMIT: usize = 64;
/// The most tokens (operators, names, literals) one `{{ … }}` or `{% … %}` may hold: the
/// parser and compiler recurse once per nested operation, on the caller's native stack.
pub const MAX_TAG_TOKENS: usize = 512;
/// The deepest nesting of blocks (`if`, `for`, `macro`…) accepted, for the same reason.
pub const MAX_BLOCK_DEPTH: usize = 48;
/// The widest `tojson(indent=…)` accepted.
const MAX_JSON_INDENT: usize = 64;
/// The deepest value `tojson` writes (a namespace can contain itself).
const MAX_JSON_DEPTH: usize = 64;

/// Why a chat template could not be loaded or rendered.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The template does not parse.
    #[error("the chat template has a syntax error: {0}")]
    Syntax(String),
    /// The template source is longer than [`MAX_TEMPLATE_BYTES`].
    #[error("the chat template is {bytes} bytes long, more than the {limit} allowed")]
    TooLarge {
        /// Length of the source.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// Rendering needed more steps, memory or output than a template is allowed.
    #[error("the chat template needs more work or memory than allowed ({0})")]
    OverBudget(String),
    /// Rendering failed (an undefined value, a wrong type, a bad `strftime_now` format...).
    #[error("the chat template failed to render: {0}")]
    Render(String),
    /// The template called `raise_exception(message)`; the message is kept as written.
    #[error("the chat template refused the conversation: {0}")]
    Raised(String),
    /// A template file could not be read.
    #[error("cannot read the chat template {path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The template path names a folder, a device or a pipe rather than a file.
    #[error(
        "cannot read the chat template {path}: it is not a regular file (a folder, a device or a pipe); choose a text file"
    )]
    NotAFile {
        /// The path involved.
        path: PathBuf,
    },
}

impl TemplateError {
    /// What is wrong, without the file's path (for messages that name the file already).
    pub fn reason(&self) -> String {
        match self {
            Self::Io { source, .. } => source.to_string(),
            Self::NotAFile { .. } => {
                "it is not a regular file (a folder, a device or a pipe)".to_string()
            }
            other => other.to_string(),
        }
    }
}

/// Reads a chat template file: a regular file of at most [`MAX_TEMPLATE_BYTES`] of UTF-8 text.
/// A folder, a device such as `/dev/zero` or a pipe is refused before anything is read, and no
/// more than the limit (plus one byte) is ever read, even from a file that grows meanwhile.
pub fn read_template_file(path: &Path) -> Result<String, TemplateError> {
    use std::io::Read as _;
    let io_error = |source| TemplateError::Io {
        path: path.to_path_buf(),
        source,
    };
    let not_a_file = || TemplateError::NotAFile {
        path: path.to_path_buf(),
    };
    let too_large = |bytes: u64| TemplateError::TooLarge {
        bytes: usize::try_from(bytes).unwrap_or(usize::MAX),
        limit: MAX_TEMPLATE_BYTES,
    };
    // Checked before opening: opening a pipe for reading waits for a writer.
    if !std::fs::metadata(path).map_err(io_error)?.is_file() {
        return Err(not_a_file());
    }
    let file = std::fs::File::open(path).map_err(io_error)?;
    // Checked again on what was opened, in case the path changed in between.
    let metadata = file.metadata().map_err(io_error)?;
    if !metadata.is_file() {
        return Err(not_a_file());
    }
    if metadata.len() > MAX_TEMPLATE_BYTES as u64 {
        return Err(too_large(metadata.len()));
    }
    let mut bytes = Vec::with_capacity(metadata.len() as usize);
    file.take(MAX_TEMPLATE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io_error)?;
    if bytes.len() > MAX_TEMPLATE_BYTES {
        return Err(too_large(bytes.len() as u64));
    }
    String::from_utf8(bytes).map_err(|_| {
        io_error(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "it is not UTF-8 text",
        ))
    })
}

/// The variables a template is rendered with besides the messages.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderOptions {
    /// End the prompt with the start of an assistant turn.
    pub add_generation_prompt: bool,
    /// The template's `enable_thinking`; `None` leaves it undefined (SmolLM3 then thinks).
    pub enable_thinking: Option<bool>,
    /// The date `strftime_now` formats (the time of day is the local clock's).
    pub date: NaiveDate,
    /// The text of the model's beginning-of-sequence token.
    pub bos_token: String,
    /// The text of the model's end-of-sequence token.
    pub eos_token: String,
    /// Other keyword arguments (`tools`, `xml_tools`, `documents`...), passed as they are.
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for RenderOptions {
    fn default() -> Self {
        Self {
            add_generation_prompt: true,
            enable_thinking: None,
            date: chrono::Local::now().date_naive(),
            bos_token: String::new(),
            eos_token: String::new(),
            extra: serde_json::Map::new(),
        }
    }
}

/// A compiled chat template. Cheap to clone, and shareable between threads.
#[derive(Clone)]
pub struct ChatTemplate {
    source: Arc<str>,
    env: Arc<Environment<'static>>,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles a Jinja chat template (at most [`MAX_TEMPLATE_BYTES`] long).
    pub fn new(source: &str) -> Result<Self, TemplateError> {
        if source.len() > MAX_TEMPLATE_BYTES {
            return Err(TemplateError::TooLarge {
                bytes: source.len(),
                limit: MAX_TEMPLATE_BYTES,
            });
        }
        check_nesting(source)?;
        let env =
            build_environment(source).map_err(|err| TemplateError::Syntax(err.to_string()))?;
        Ok(Self {
            source: Arc::from(source),
            env: Arc::new(env),
        })
    }

    /// The plain ChatML template.
    pub fn chatml() -> Self {
        // The constant is covered by tests; it always compiles.
        Self::new(CHATML_TEMPLATE).expect("the built-in ChatML template compiles")
    }

    /// Reads (with [`read_template_file`]'s limits) and compiles a template file.
    pub fn from_file(path: &Path) -> Result<Self, TemplateError> {
        Self::new(&read_template_file(path)?)
    }

    /// The template's source as given (before the `{% generation %}` tags are rewritten).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders messages given as JSON objects (`role`, `content` and any other fields).
    pub fn render_json(
        &self,
        messages: &[serde_json::Value],
        opts: &RenderOptions,
    ) -> Result<String, TemplateError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|err| TemplateError::Syntax(err.to_string()))?;
        let mut output = LimitedOutput::default();
        let rendered = template.render_captured_to(render_context(messages, opts), &mut output);
        match rendered {
            Ok(_) => String::from_utf8(output.bytes)
                .map_err(|_| TemplateError::Render("the output is not valid UTF-8".into())),
            Err(_) if output.overflowed => Err(TemplateError::OverBudget(format!(
                "its output is longer than {MAX_PROMPT_BYTES} bytes"
            ))),
            Err(err) => Err(classify_render_error(err)),
        }
    }

    /// Renders conversation messages: role and content only (the assistant's thinking is not
    /// sent back, the history keeps answers only).
    pub fn render(
        &self,
        messages: &[Message],
        opts: &RenderOptions,
    ) -> Result<String, TemplateError> {
        self.render_json(&messages_to_json(messages), opts)
    }
}

/// Block tags that open a body closed by an `end…` tag.
const BLOCK_TAGS: &[&str] = &[
    "if",
    "for",
    "macro",
    "call",
    "filter",
    "with",
    "autoescape",
    "block",
    "generation",
];

/// Refuses sources nested deeper than the parser can take on a thread's stack: more than
/// [`MAX_TAG_TOKENS`] tokens in one tag, or blocks more than [`MAX_BLOCK_DEPTH`] deep.
fn check_nesting(source: &str) -> Result<(), TemplateError> {
    let too_deep = |what: String| TemplateError::OverBudget(what);
    let mut depth = 0usize;
    let mut rest = source;
    while let Some(open) = rest.find(['{']) {
        rest = &rest[open + 1..];
        let close = match rest.as_bytes().first() {
            Some(b'{') => "}}",
            Some(b'%') => "%}",
            _ => continue,
        };
        let (body, after) = split_tag(&rest[1..], close);
        rest = after;
        if tag_tokens(body) > MAX_TAG_TOKENS {
            return Err(too_deep(format!(
                "a tag has more than {MAX_TAG_TOKENS} tokens"
            )));
        }
        if close == "%}" {
            let keyword = body
                .trim_start_matches(['-', '+'])
                .split_whitespace()
                .next()
                .unwrap_or_default();
            if BLOCK_TAGS.contains(&keyword) || (keyword == "set" && !body.contains('=')) {
                depth += 1;
                if depth > MAX_BLOCK_DEPTH {
                    return Err(too_deep(format!(
                        "blocks are nested more than {MAX_BLOCK_DEPTH} deep"
                    )));
                }
            } else if keyword.starts_with("end") {
                depth = depth.saturating_sub(1);
            }
        }
    }
    Ok(())
}

/// Splits a tag's body (after its opening delimiter) from the text after its closing one,
/// skipping string literals.
fn split_tag<'a>(text: &'a str, close: &str) -> (&'a str, &'a str) {
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (at, c) in text.char_indices() {
        match quote {
            Some(_) if escaped => escaped = false,
            Some(_) if c == '\\' => escaped = true,
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '\'' || c == '"' => quote = Some(c),
            None if text[at..].starts_with(close) => {
                return (&text[..at], &text[at + close.len()..]);
            }
            None => {}
        }
    }
    (text, "")
}

/// Roughly how many tokens a tag's body holds: operator characters, and runs of name or
/// number characters (string literals count once).
fn tag_tokens(body: &str) -> usize {
    let mut count = 0;
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in body.chars() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        let word_char = c.is_alphanumeric() || c == '_';
        if c == '\'' || c == '"' {
            quote = Some(c);
        }
        let starts_token = if word_char {
            !in_word
        } else {
            !c.is_whitespace()
        };
        count += usize::from(starts_token);
        in_word = word_char;
    }
    count
}

/// The output of a render, refusing to grow past [`MAX_PROMPT_BYTES`].
#[derive(Default)]
struct LimitedOutput {
    bytes: Vec<u8>,
    overflowed: bool,
}

impl std::io::Write for LimitedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len().saturating_add(buf.len()) > MAX_PROMPT_BYTES {
            self.overflowed = true;
            return Err(std::io::Error::other("the prompt is too long"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The template a model should use: override file > embedded template > ChatML, with fallback.
#[derive(Debug, Clone)]
pub struct PromptFormatter {
    template: ChatTemplate,
    fallback_reason: Option<String>,
    /// Set when the template went over its budget once: it is not tried again (shared by clones).
    over_budget: Arc<OnceLock<String>>,
}

/// A rendered prompt, and why ChatML was used instead of the model's template, if it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedPrompt {
    /// The exact prompt text.
    pub text: String,
    /// Why the preferred template was not used (it did not compile, or failed to render and
    /// ChatML was used); `None` when it was.
    pub fallback: Option<String>,
}

impl PromptFormatter {
    /// Chooses the template: the override if it compiles, else the embedded template if it
    /// compiles, else ChatML. Never fails; a template that does not compile is recorded as the
    /// fallback reason (and logged).
    pub fn new(embedded: Option<&str>, override_source: Option<&str>) -> Self {
        let mut failures = Vec::new();
        let candidates = [
            ("the template file", override_source),
            ("the model's chat template", embedded),
        ];
        for (what, source) in candidates {
            let Some(source) = source.filter(|s| !s.trim().is_empty()) else {
                continue;
            };
            match ChatTemplate::new(source).and_then(probe) {
                Ok(template) => {
                    return Self::with_failures(template, failures);
                }
                Err(err) => failures.push(format!("{what} cannot be used ({err})")),
            }
        }
        Self::with_failures(ChatTemplate::chatml(), failures)
    }

    /// Builds the formatter, turning earlier failures into the fallback reason.
    fn with_failures(template: ChatTemplate, failures: Vec<String>) -> Self {
        let fallback_reason = (!failures.is_empty()).then(|| failures.join("; "));
        if let Some(reason) = &fallback_reason {
            log::warn!("chat template fallback: {reason}");
        }
        Self {
            template,
            fallback_reason,
            over_budget: Arc::new(OnceLock::new()),
        }
    }

    /// The template in use.
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// Why the preferred template is not in use, if it is not.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback_reason.as_deref()
    }

    /// Renders a conversation, preceded by a system message when `system_prompt` is not blank.
    /// If the template fails, the prompt is rendered with ChatML and the reason is returned.
    pub fn render(
        &self,
        system_prompt: &str,
        messages: &[Message],
        opts: &RenderOptions,
    ) -> RenderedPrompt {
        self.render_json(&conversation_json(system_prompt, messages), opts)
    }

    /// Renders JSON messages as they are, falling back to ChatML if the template fails.
    pub fn render_json(
        &self,
        messages: &[serde_json::Value],
        opts: &RenderOptions,
    ) -> RenderedPrompt {
        let result = match self.over_budget.get() {
            Some(reason) => Err(TemplateError::OverBudget(reason.clone())),
            None => self.template.render_json(messages, opts),
        };
        match result {
            Ok(text) => RenderedPrompt {
                text,
                fallback: self.fallback_reason.clone(),
            },
            Err(err) => {
                let reason = format!("{err}; using ChatML instead");
                if let TemplateError::OverBudget(why) = &err
                    && self.over_budget.set(why.clone()).is_ok()
                {
                    log::warn!("{reason}; the template is not tried again");
                }
                RenderedPrompt {
                    text: chatml_prompt(messages, opts.add_generation_prompt),
                    fallback: Some(reason),
                }
            }
        }
    }
}

/// Renders a small conversation with a freshly compiled template, so that one that goes over
/// its budget is refused when the model is opened, not at the first message. Other render
/// errors are kept for the real conversation to show (a template may refuse this sample).
fn probe(template: ChatTemplate) -> Result<ChatTemplate, TemplateError> {
    let sample = [
        message_json(Role::System, "You are a helpful assistant."),
        message_json(Role::User, "Hello!"),
        message_json(Role::Assistant, "Hi! How can I help?"),
        message_json(Role::User, "What is 2 + 2?"),
    ];
    match template.render_json(&sample, &RenderOptions::default()) {
        Err(err @ TemplateError::OverBudget(_)) => Err(err),
        _ => Ok(template),
    }
}

/// The messages a conversation is rendered from: a system message first when `system_prompt`
/// is not blank, then role and content of each message (the assistant's thinking is not sent
/// back, the history keeps answers only).
pub fn conversation_json(system_prompt: &str, messages: &[Message]) -> Vec<serde_json::Value> {
    let mut json = Vec::with_capacity(messages.len() + 1);
    if !system_prompt.trim().is_empty() {
        json.push(message_json(Role::System, system_prompt));
    }
    json.extend(messages_to_json(messages));
    json
}

/// Renders ChatML directly, without a template engine (the fallback of last resort).
pub fn chatml_prompt(messages: &[serde_json::Value], add_generation_prompt: bool) -> String {
    chatml_prompt_spans(messages, add_generation_prompt).0
}

/// Renders ChatML directly, with the byte range of every role and content in the text (what
/// the messages wrote, as opposed to ChatML's own markers).
pub fn chatml_prompt_spans(
    messages: &[serde_json::Value],
    add_generation_prompt: bool,
) -> (String, Vec<std::ops::Range<usize>>) {
    let mut out = String::new();
    let mut spans = Vec::with_capacity(messages.len() * 2);
    for message in messages {
        let mut push_field = |out: &mut String, name: &str| {
            let start = out.len();
            out.push_str(&message.get(name).map(json_text).unwrap_or_default());
            spans.push(start..out.len());
        };
        out.push_str("<|im_start|>");
        push_field(&mut out, "role");
        out.push('\n');
        push_field(&mut out, "content");
        out.push_str("<|im_end|>\n");
    }
    if add_generation_prompt {
        out.push_str("<|im_start|>assistant\n");
    }
    (out, spans)
}

/// A JSON value as Jinja would print it: strings bare, anything else as its JSON text.
fn json_text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        other => json_to_value(other).to_string(),
    }
}

/// The JSON form of conversation messages that templates see.
fn messages_to_json(messages: &[Message]) -> Vec<serde_json::Value> {
    messages
        .iter()
        .map(|m| message_json(m.role, &m.content))
        .collect()
}

/// One `{role, content}` message.
fn message_json(role: Role, content: &str) -> serde_json::Value {
    serde_json::json!({ "role": role.as_str(), "content": content })
}

/// Rewrites `{% generation %}` / `{% endgeneration %}` (Hugging Face's assistant-mask tags, which
/// minijinja does not know) into an always-true `if` block with the same whitespace control, so
/// the output is exactly what Hugging Face produces.
pub fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let (before, tag) = rest.split_at(start);
        out.push_str(before);
        match rewrite_generation_tag(tag) {
            Some((replacement, consumed)) => {
                out.push_str(&replacement);
                rest = tag.get(consumed..).unwrap_or_default();
            }
            None => {
                out.push_str("{%");
                rest = tag.get(2..).unwrap_or_default();
            }
        }
    }
    out.push_str(rest);
    out
}

/// If `text` starts with a generation tag, its replacement and the tag's length in bytes.
fn rewrite_generation_tag(text: &str) -> Option<(String, usize)> {
    let inner = text.strip_prefix("{%")?;
    let end = inner.find("%}")?;
    let body = inner.get(..end)?;
    let (left, body) = split_leading_control(body);
    let (body, right) = split_trailing_control(body);
    let keyword = match body.trim() {
        "generation" => "if true",
        "endgeneration" => "endif",
        _ => return None,
    };
    Some((format!("{{%{left} {keyword} {right}%}}"), end + 4))
}

/// Splits a leading `-` or `+` whitespace-control marker from a tag body: (marker, rest).
fn split_leading_control(body: &str) -> (&str, &str) {
    match body.chars().next() {
        Some('-' | '+') => body.split_at(1),
        _ => ("", body),
    }
}

/// Splits a trailing `-` or `+` whitespace-control marker from a tag body: (rest, marker).
fn split_trailing_control(body: &str) -> (&str, &str) {
    match body.chars().next_back() {
        Some('-' | '+') => body.split_at(body.len() - 1),
        _ => (body, ""),
    }
}

/// The minijinja environment Hugging Face's Jinja environment corresponds to.
fn build_environment(source: &str) -> Result<Environment<'static>, Error> {
    let mut env = Environment::new();
    env.set_fuel(Some(RENDER_FUEL));
    env.set_recursion_limit(RECURSION_LIMIT);
    env.set_syntax(
        SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()?,
    );
    env.set_unknown_method_callback(python_methods);
    env.add_filter("tojson", tojson);
    env.add_function("raise_exception", raise_exception);
    env.add_template_owned(TEMPLATE_NAME, rewrite_generation_tags(source))?;
    Ok(env)
}

/// The widest field `str.format` may pad to (minijinja-contrib allocates the padding unchecked).
const MAX_FORMAT_WIDTH: usize = 4096;

/// Python's string, list and dict methods (minijinja-contrib), with `str.format` refused when a
/// field asks for more than [`MAX_FORMAT_WIDTH`] characters of width or precision.
fn python_methods(
    state: &mut minijinja::State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, Error> {
    if method == "format"
        && let Some(format) = value.as_str()
    {
        check_format_widths(format)?;
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// Fails if a replacement field of a `str.format` string has a nested field or a number
/// (width, precision) above [`MAX_FORMAT_WIDTH`].
fn check_format_widths(format: &str) -> Result<(), Error> {
    let refuse = |why: &str| Err(limit_error(format!("str.format: {why}")));
    let mut rest = format;
    while let Some(open) = rest.find('{') {
        rest = &rest[open + 1..];
        if let Some(after) = rest.strip_prefix('{') {
            rest = after;
            continue;
        }
        let Some(close) = rest.find('}') else {
            return Ok(());
        };
        let field = &rest[..close];
        rest = &rest[close + 1..];
        let Some((_, spec)) = field.split_once(':') else {
            continue;
        };
        if spec.contains('{') {
            return refuse("nested replacement fields are not supported");
        }
        let too_wide = spec.split(|c: char| !c.is_ascii_digit()).any(|digits| {
            digits.len() > 6 || digits.parse().is_ok_and(|n: usize| n > MAX_FORMAT_WIDTH)
        });
        if too_wide {
            return refuse(&format!(
                "a field wider than {MAX_FORMAT_WIDTH} is not allowed"
            ));
        }
    }
    Ok(())
}

/// The variables of one render, as Hugging Face passes them.
fn render_context(messages: &[serde_json::Value], opts: &RenderOptions) -> Value {
    let mut vars: Vec<(String, Value)> = vec![
        ("tools".into(), Value::from(())),
        ("documents".into(), Value::from(())),
        ("bos_token".into(), Value::from(opts.bos_token.as_str())),
        ("eos_token".into(), Value::from(opts.eos_token.as_str())),
    ];
    vars.extend(
        opts.extra
            .iter()
            .map(|(key, value)| (key.clone(), json_to_value(value))),
    );
    vars.push((
        "messages".into(),
        messages.iter().map(json_to_value).collect(),
    ));
    vars.push((
        "add_generation_prompt".into(),
        Value::from(opts.add_generation_prompt),
    ));
    if let Some(enable_thinking) = opts.enable_thinking {
        vars.push(("enable_thinking".into(), Value::from(enable_thinking)));
    }
    vars.push(("strftime_now".into(), strftime_now(opts.date)));
    // Later entries win, like keyword arguments given after `**kwargs`.
    let map: std::collections::BTreeMap<String, Value> = vars.into_iter().collect();
    Value::from_pairs(map)
}

/// Converts JSON to a template value.
fn json_to_value(json: &serde_json::Value) -> Value {
    use serde_json::Value as J;
    match json {
        J::Null => Value::from(()),
        J::Bool(b) => Value::from(*b),
        J::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => Value::from(i),
            (None, Some(u), _) => Value::from(u),
            (None, None, f) => Value::from(f.unwrap_or(f64::NAN)),
        },
        J::String(s) => Value::from(s.as_str()),
        J::Array(items) => items.iter().map(json_to_value).collect(),
        J::Object(map) => {
            Value::from_pairs(map.iter().map(|(k, v)| (k.as_str(), json_to_value(v))))
        }
    }
}

/// Marks an error raised by the template itself through `raise_exception`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct RaisedByTemplate(String);

/// The `raise_exception(message)` global: fails the render with the template's message.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message.clone())
        .with_source(RaisedByTemplate(message)))
}

/// Marks an error raised because a template hit one of the sandbox's limits.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct SandboxLimit(String);

/// An error for a template that asked for more than the sandbox allows.
fn limit_error(message: String) -> Error {
    Error::new(ErrorKind::InvalidOperation, message.clone()).with_source(SandboxLimit(message))
}

/// minijinja's own messages for refused sizes and depths.
const MINIJINJA_LIMITS: &[&str] = &[
    "recursion limit exceeded",
    "range has too many elements",
    "repeated string is too large",
    "repeated sequence is too large",
];

/// Whether a render error comes from a budget or limit rather than from the template's logic.
fn is_over_budget(err: &Error) -> bool {
    err.kind() == ErrorKind::OutOfFuel
        || err
            .detail()
            .is_some_and(|detail| MINIJINJA_LIMITS.contains(&detail))
}

/// Maps a minijinja render error to a [`TemplateError`], recognising `raise_exception` and the
/// sandbox's limits.
fn classify_render_error(err: Error) -> TemplateError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(current) = source {
        if let Some(raised) = current.downcast_ref::<RaisedByTemplate>() {
            return TemplateError::Raised(raised.0.clone());
        }
        if current.downcast_ref::<SandboxLimit>().is_some()
            || current.downcast_ref::<Error>().is_some_and(is_over_budget)
        {
            return TemplateError::OverBudget(err.to_string());
        }
        source = current.source();
    }
    if err.kind() == ErrorKind::SyntaxError {
        TemplateError::Syntax(err.to_string())
    } else {
        TemplateError::Render(err.to_string())
    }
}

/// The `strftime_now(format)` function for one render: `date` at the local time of day.
fn strftime_now(date: NaiveDate) -> Value {
    Value::from_function(move |format: &str| -> Result<String, Error> {
        let now = date.and_time(chrono::Local::now().time());
        let mut out = String::new();
        write!(out, "{}", now.format(format)).map_err(|_| {
            Error::new(
                ErrorKind::InvalidOperation,
                format!("strftime_now: invalid format {format:?}"),
            )
        })?;
        Ok(out)
    })
}

/// How `tojson` lays out its output, as Python's `json.dumps` arguments say.
struct JsonLayout {
    ensure_ascii: bool,
    indent: Option<String>,
    item_separator: String,
    key_separator: String,
    sort_keys: bool,
}

impl JsonLayout {
    /// Reads Hugging Face's `tojson(x, ensure_ascii=False, indent=None, separators=None,
    /// sort_keys=False)` arguments.
    fn from_args(ensure_ascii: Option<bool>, kwargs: &Kwargs) -> Result<Self, Error> {
        let ensure_ascii = match ensure_ascii {
            Some(flag) => flag,
            None => kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
        };
        let indent = match kwargs.get::<Option<Value>>("indent")? {
            None => None,
            Some(v) if v.is_none() => None,
            Some(v) => Some(json_indent(&v)?),
        };
        let separators = kwargs.get::<Option<Vec<String>>>("separators")?;
        let (item_separator, key_separator) = match separators.as_deref() {
            Some([item, key]) => (item.clone(), key.clone()),
            Some(_) => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: separators must be a pair of strings",
                ));
            }
            None if indent.is_some() => (",".to_string(), ": ".to_string()),
            None => (", ".to_string(), ": ".to_string()),
        };
        let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
        kwargs.assert_all_used()?;
        Ok(Self {
            ensure_ascii,
            indent,
            item_separator,
            key_separator,
            sort_keys,
        })
    }
}

/// The indentation `tojson(indent=…)` asks for: a string, or a number of spaces (at most
/// [`MAX_JSON_INDENT`] either way).
fn json_indent(value: &Value) -> Result<String, Error> {
    let too_wide = || {
        limit_error(format!(
            "tojson: an indent wider than {MAX_JSON_INDENT} is not allowed"
        ))
    };
    match value.as_str() {
        Some(text) if text.len() > MAX_JSON_INDENT => Err(too_wide()),
        Some(text) => Ok(text.to_string()),
        None => {
            let width = i64::try_from(value.clone())?;
            match usize::try_from(width.max(0)) {
                Ok(width) if width <= MAX_JSON_INDENT => Ok(" ".repeat(width)),
                _ => Err(too_wide()),
            }
        }
    }
}

/// Fails once `tojson`'s output is longer than a whole prompt may be.
fn check_json_size(out: &str) -> Result<(), Error> {
    if out.len() > MAX_PROMPT_BYTES {
        return Err(limit_error(format!(
            "tojson: the output is longer than {MAX_PROMPT_BYTES} bytes"
        )));
    }
    Ok(())
}

/// Hugging Face's `tojson` filter: Python's `json.dumps` without HTML escaping.
fn tojson(value: &Value, ensure_ascii: Option<bool>, kwargs: Kwargs) -> Result<String, Error> {
    let layout = JsonLayout::from_args(ensure_ascii, &kwargs)?;
    let mut out = String::new();
    write_json(&mut out, value, &layout, 0)?;
    Ok(out)
}

/// Writes one value as JSON.
fn write_json(
    out: &mut String,
    value: &Value,
    layout: &JsonLayout,
    depth: usize,
) -> Result<(), Error> {
    if depth > MAX_JSON_DEPTH {
        return Err(limit_error(format!(
            "tojson: the value is nested more than {MAX_JSON_DEPTH} levels deep"
        )));
    }
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => write_json_number(out, value),
        ValueKind::String => write_json_string(out, value.as_str().unwrap_or_default(), layout),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_json_container(out, ('[', ']'), &items, layout, depth, |out, item| {
                write_json(out, item, layout, depth + 1)
            })?;
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if layout.sort_keys {
                keys.sort_by_key(|k| k.to_string());
            }
            write_json_container(out, ('{', '}'), &keys, layout, depth, |out, key| {
                write_json_string(out, &json_key(key), layout);
                out.push_str(&layout.key_separator);
                write_json(out, &value.get_item(key)?, layout, depth + 1)
            })?;
        }
        kind => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: a value of type {kind} is not JSON serializable"),
            ));
        }
    }
    Ok(())
}

/// Writes the items of an array or object with the layout's separators and indentation.
fn write_json_container<T>(
    out: &mut String,
    (open, close): (char, char),
    items: &[T],
    layout: &JsonLayout,
    depth: usize,
    mut write_item: impl FnMut(&mut String, &T) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return Ok(());
    }
    for (idx, item) in items.iter().enumerate() {
        if idx > 0 {
            out.push_str(&layout.item_separator);
        }
        if let Some(indent) = &layout.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth + 1));
        }
        write_item(out, item)?;
        check_json_size(out)?;
    }
    if let Some(indent) = &layout.indent {
        out.push('\n');
        out.push_str(&indent.repeat(depth));
    }
    out.push(close);
    Ok(())
}

/// An object key as Python's `json.dumps` converts it to a string.
fn json_key(key: &Value) -> String {
    match key.kind() {
        ValueKind::String => key.as_str().unwrap_or_default().to_string(),
        ValueKind::Bool => if key.is_true() { "true" } else { "false" }.to_string(),
        ValueKind::None | ValueKind::Undefined => "null".to_string(),
        _ => key.to_string(),
    }
}

/// Writes a number like Python's `json.dumps`.
fn write_json_number(out: &mut String, value: &Value) {
    let text = value.to_string();
    match text.as_str() {
        "NaN" => out.push_str("NaN"),
        "inf" => out.push_str("Infinity"),
        "-inf" => out.push_str("-Infinity"),
        _ => out.push_str(&text),
    }
}

/// Writes a JSON string literal with Python's escapes (`\uXXXX` for non-ASCII if asked).
fn write_json_string(out: &mut String, text: &str, layout: &JsonLayout) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (layout.ensure_ascii && !(' '..='~').contains(&c)) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> RenderOptions {
        RenderOptions {
            date: NaiveDate::from_ymd_opt(2026, 11, 26).unwrap_or_default(),
            ..RenderOptions::default()
        }
    }

    #[test]
    fn template_files_are_read_only_when_regular_and_small() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("t.jinja");
        std::fs::write(&good, CHATML_TEMPLATE).unwrap();
        assert_eq!(read_template_file(&good).unwrap(), CHATML_TEMPLATE);
        assert!(ChatTemplate::from_file(&good).is_ok());

        // A device that never ends, and a folder: refused before reading.
        for path in [dir.path(), Path::new("/dev/zero")] {
            if !path.exists() {
                continue;
            }
            let err = read_template_file(path).unwrap_err();
            assert!(matches!(err, TemplateError::NotAFile { .. }), "{err:?}");
            assert!(err.to_string().contains("not a regular file"), "{err}");
            assert!(matches!(
                ChatTemplate::from_file(path),
                Err(TemplateError::NotAFile { .. })
            ));
        }

        let big = dir.path().join("big.jinja");
        std::fs::write(&big, "x".repeat(MAX_TEMPLATE_BYTES + 1)).unwrap();
        assert!(matches!(
            read_template_file(&big),
            Err(TemplateError::TooLarge { bytes, .. }) if bytes == MAX_TEMPLATE_BYTES + 1
        ));
        let binary = dir.path().join("bin.jinja");
        std::fs::write(&binary, [0xff, 0xfe, 0x00]).unwrap();
        let err = read_template_file(&binary).unwrap_err();
        assert!(err.reason().contains("UTF-8"), "{err}");
        let missing = read_template_file(&dir.path().join("nope")).unwrap_err();
        assert!(matches!(missing, TemplateError::Io { .. }), "{missing:?}");
    }

    #[test]
    fn rewrites_generation_tags_keeping_whitespace_control() {
        assert_eq!(
            rewrite_generation_tags("a{% generation %}b{% endgeneration %}c"),
            "a{% if true %}b{% endif %}c"
        );
        assert_eq!(
            rewrite_generation_tags("{%- generation -%}x{%+endgeneration+%}"),
            "{%- if true -%}x{%+ endif +%}"
        );
        assert_eq!(
            rewrite_generation_tags("{%\n  generation\n%}{%-endgeneration%}"),
            "{% if true %}{%- endif %}"
        );
    }

    #[test]
    fn leaves_other_tags_alone() {
        let source = "{% if generation %}{% set generations = 1 %}{{ '%}' }}{% endif %}{%";
        assert_eq!(rewrite_generation_tags(source), source);
    }

    #[test]
    fn chatml_template_and_direct_chatml_agree() {
        let messages = [
            serde_json::json!({"role": "system", "content": "Be brief."}),
            serde_json::json!({"role": "user", "content": "Hi\n"}),
            serde_json::json!({"role": "assistant", "content": "Hello"}),
        ];
        for add_generation_prompt in [true, false] {
            let opts = RenderOptions {
                add_generation_prompt,
                ..opts()
            };
            let rendered = ChatTemplate::chatml().render_json(&messages, &opts);
            assert_eq!(
                rendered.ok(),
                Some(chatml_prompt(&messages, add_generation_prompt))
            );
        }
    }

    #[test]
    fn chat_template_is_send_sync_and_clone() {
        fn assert_traits<T: Send + Sync + Clone>() {}
        assert_traits::<ChatTemplate>();
        assert_traits::<PromptFormatter>();
    }

    #[test]
    fn enable_thinking_is_undefined_unless_set() {
        let template = ChatTemplate::new(
            "{% if enable_thinking is defined %}{{ enable_thinking }}{% else %}unset{% endif %}",
        );
        let Ok(template) = template else {
            panic!("template compiles");
        };
        let render = |enable_thinking| {
            let opts = RenderOptions {
                enable_thinking,
                ..opts()
            };
            template.render(&[], &opts).ok()
        };
        assert_eq!(render(None).as_deref(), Some("unset"));
        assert_eq!(render(Some(false)).as_deref(), Some("False"));
        assert_eq!(render(Some(true)).as_deref(), Some("True"));
    }

    #[test]
    fn strftime_now_with_a_bad_format_is_a_render_error() {
        let Ok(template) = ChatTemplate::new("{{ strftime_now('%Q %') }}") else {
            panic!("template compiles");
        };
        let result = template.render(&[], &opts());
        assert!(
            matches!(result, Err(TemplateError::Render(_))),
            "{result:?}"
        );
    }

    #[test]
    fn syntax_errors_are_reported_at_compile_time() {
        let result = ChatTemplate::new("{% for m in messages %}");
        assert!(
            matches!(result, Err(TemplateError::Syntax(_))),
            "{result:?}"
        );
    }

    #[test]
    fn python_string_methods_are_available() {
        let Ok(template) = ChatTemplate::new(
            "{{ '  a/think '.replace('/think', '').strip().upper() }}|{{ '\\n\\nx'.lstrip('\\n') }}|{{ 'a,b'.split(',')|length }}",
        ) else {
            panic!("template compiles");
        };
        assert_eq!(template.render(&[], &opts()).ok().as_deref(), Some("A|x|2"));
    }

    /// Renders a hostile template through a formatter and returns the result and the time.
    fn render_hostile(source: &str) -> (PromptFormatter, RenderedPrompt, std::time::Duration) {
        let start = std::time::Instant::now();
        let formatter = PromptFormatter::new(Some(source), None);
        let messages = [message_json(Role::User, "Hi")];
        let prompt = formatter.render_json(&messages, &opts());
        (formatter, prompt, start.elapsed())
    }

    #[test]
    fn hostile_templates_end_in_chatml_quickly() {
        let hostile = [
            (
                "tojson indent",
                "{{ messages | tojson(indent=100000000000) }}",
            ),
            ("indent filter", "{{ 'a\nb' | indent(100000000000) }}"),
            ("str.format width", "{{ '{:>100000000000}'.format(1) }}"),
            ("repeat", "{{ 'x' * 100000000000 }}"),
            (
                "nested loops",
                "{% for i in range(99999) %}{% for j in range(99999) %}{{ '' }}{% endfor %}{% endfor %}",
            ),
            (
                "recursion",
                "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            ),
            (
                "doubling",
                "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
            ),
            (
                "self reference",
                "{% set ns = namespace() %}{% set ns.me = ns %}{{ ns | tojson }}",
            ),
            (
                "list repeat",
                "{{ (messages * 100000000) | length }}{{ (messages * 100000000) | join(',') }}",
            ),
            (
                "big output",
                "{% for i in range(99999) %}{{ 'x' * 99999 }}{% endfor %}",
            ),
        ];
        for (name, source) in hostile {
            let (_, prompt, elapsed) = render_hostile(source);
            eprintln!("{name}: {elapsed:?} {:?}", prompt.fallback);
            assert_eq!(
                prompt.text, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
                "{name}"
            );
            assert!(prompt.fallback.is_some(), "{name}");
        }
    }

    #[test]
    fn deeply_nested_templates_fail_cleanly_on_a_small_stack() {
        let deep = 20_000;
        // Just inside the limits: these must compile without overflowing a 2 MiB stack.
        let edge = MAX_TAG_TOKENS / 2 - 2;
        let at_limit = [
            format!("{{{{ 1{} }}}}", " + 1".repeat(edge)),
            format!(
                "{{{{ {}1{} }}}}",
                "(".repeat(edge / 2),
                ")".repeat(edge / 2)
            ),
            format!("{{{{ {}x }}}}", "not ".repeat(edge * 2 - 2)),
            format!("{{{{ x{} }}}}", "|lower".repeat(edge)),
            format!(
                "{}x{}",
                "{% if true %}".repeat(MAX_BLOCK_DEPTH),
                "{% endif %}".repeat(MAX_BLOCK_DEPTH)
            ),
        ];
        for source in at_limit {
            let worker = std::thread::Builder::new()
                .stack_size(2 << 20)
                .spawn(move || ChatTemplate::new(&source).map(|t| t.render(&[], &opts())))
                .unwrap();
            // Compiles, or fails with a clean error; the stack holds either way.
            let compiled = worker.join().unwrap();
            assert!(
                compiled.is_ok() || matches!(compiled, Err(TemplateError::Syntax(_))),
                "{compiled:?}"
            );
        }
        let sources = [
            format!("{{{{ {}1{} }}}}", "(".repeat(deep), ")".repeat(deep)),
            format!("{{{{ {}1{} }}}}", "[".repeat(deep), "]".repeat(deep)),
            format!(
                "{}x{}",
                "{% if true %}".repeat(deep),
                "{% endif %}".repeat(deep)
            ),
            format!("{{{{ 1{} }}}}", " + 1".repeat(deep)),
            format!("{{{{ x{} }}}}", "|lower".repeat(deep)),
            format!("{{{{ {}x }}}}", "not ".repeat(deep)),
        ];
        for source in sources {
            let worker = std::thread::Builder::new()
                .stack_size(2 << 20)
                .spawn(move || {
                    let (formatter, prompt, elapsed) = render_hostile(&source);
                    (
                        formatter.fallback_reason().map(str::to_string),
                        prompt,
                        elapsed,
                    )
                })
                .unwrap();
            let (reason, prompt, elapsed) = worker.join().unwrap();
            eprintln!("nested: {elapsed:?} {reason:?}");
            assert!(reason.is_some() || prompt.fallback.is_some());
        }
    }

    #[test]
    fn tojson_rejects_unknown_arguments() {
        let Ok(template) = ChatTemplate::new("{{ [1] | tojson(width=3) }}") else {
            panic!("template compiles");
        };
        assert!(template.render(&[], &opts()).is_err());
    }
}
