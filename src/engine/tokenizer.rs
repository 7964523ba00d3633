//! The tokenizer, built from a GGUF file's own metadata (`tokenizer.ggml.*`).
//!
//! Only byte-level BPE vocabularies (`tokenizer.ggml.model = "gpt2"`) are supported. Encoding
//! follows llama.cpp, which produced the reference data:
//!
//! 1. Special tokens are cut out of the text first: every CONTROL, USER_DEFINED and UNKNOWN token,
//!    longest text first. Without `parse_special` (text a user typed) only USER_DEFINED tokens
//!    such as `<think>` are recognised; a typed `<|im_end|>` stays plain text.
//! 2. Each remaining piece is split with the regular expressions of the file's pre-tokenizer
//!    (`tokenizer.ggml.pre`), mapped to GPT-2's byte alphabet and merged by BPE rank. That part is
//!    a [`tokenizers::Tokenizer`] without added tokens.
//!
//! Decoding maps every token back to its raw bytes: special and user-defined tokens as their
//! text, normal tokens through the inverse byte alphabet. [`StreamDecoder`] turns a stream of
//! ids into whole UTF-8 characters.

use std::fmt;
use std::ops::Range;

use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use super::error::{EngineError, Result};
use super::gguf::{GgufFile, MetaValue};

/// Llama 3's split expression (llama.cpp's adaptation, without the `(?i:)` group).
const LLAMA3_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen 2's split expression: Llama 3's with single digits.
const QWEN2_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// GPT-2's split expression.
const GPT2_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Isolates every digit (StarCoder and SmolLM vocabularies).
const DIGIT_SPLIT: &str = r"\p{N}";
/// llama.cpp's fallback for pre-tokenizers it does not know.
const DEFAULT_SPLITS: &[&str] = &[
    r"[\p{P}\$\+<=>\^~\|]+",
    GPT2_SPLIT,
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
];

/// Token texts that end a turn (llama.cpp's end-of-generation list).
const END_OF_TURN_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
    // Fill-in-the-middle padding, repository and file separators also stop generation.
    "<|fim_pad|>",
    "<fim-pad>",
    "<fim_pad>",
    "<PAD>",
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
    "<|file_sep|>",
];

/// Metadata keys whose token ids also end a turn.
const END_OF_TURN_KEYS: &[&str] = &[
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.eom_token_id",
];

/// The kind of a vocabulary entry (GGUF's `tokenizer.ggml.token_type`, llama.cpp's numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenType {
    /// Type 0, or a number outside the known range.
    Undefined,
    /// Type 1: ordinary text, stored in GPT-2's byte alphabet.
    Normal,
    /// Type 2: the unknown token.
    Unknown,
    /// Type 3: a control token such as `<|im_start|>`; never produced from user text.
    Control,
    /// Type 4: a user-defined token such as `<think>`; recognised in any text.
    UserDefined,
    /// Type 5: a reserved, unused entry.
    Unused,
    /// Type 6: a raw byte (`<0xAB>`, SentencePiece vocabularies).
    Byte,
}

impl TokenType {
    /// Maps GGUF's numeric token type.
    pub fn from_gguf(value: i64) -> Self {
        match value {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Undefined,
        }
    }

    /// Whether the text is cut out of a prompt as a whole token before BPE runs.
    fn is_special(self) -> bool {
        matches!(self, Self::Control | Self::UserDefined | Self::Unknown)
    }

    /// Whether the token decodes to its text verbatim rather than through the byte alphabet.
    fn decodes_verbatim(self) -> bool {
        self.is_special()
    }
}

/// How a pre-tokenizer name from the file is handled.
#[derive(Debug, Clone, Copy)]
struct PreTokenizerRules {
    /// Split expressions applied one after the other.
    splits: &'static [&'static str],
    /// A whole pre-token that is in the vocabulary becomes that token without merging.
    ignore_merges: bool,
    /// Whether a BOS token is added when the file does not say.
    adds_bos_by_default: bool,
}

impl PreTokenizerRules {
    /// The rules llama.cpp applies for a `tokenizer.ggml.pre` name.
    fn for_name(pre: &str) -> Self {
        let rules = |splits, ignore_merges, adds_bos_by_default| Self {
            splits,
            ignore_merges,
            adds_bos_by_default,
        };
        match pre {
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral"
            | "midm-2.0" | "lfm2" => rules(&[LLAMA3_SPLIT], true, true),
            "smaug-bpe" | "dbrx" => rules(&[LLAMA3_SPLIT], false, false),
            "qwen2" | "deepseek-r1-qwen" | "kormo" | "stablelm2" | "hunyuan" | "megrez" => {
                rules(&[QWEN2_SPLIT], false, false)
            }
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
            | "minerva-7b" => rules(&[DIGIT_SPLIT, GPT2_SPLIT], false, false),
            "gpt-2" | "phi-2" | "gigachat" | "a.x-4.0" | "mellum" | "mpt" | "olmo" | "jais"
            | "trillion" | "granite-docling" | "exaone4" => rules(&[GPT2_SPLIT], false, false),
            other => {
                log::warn!(
                    "unknown tokenizer pre-tokenizer {other:?}: using llama.cpp's default \
                     splitting, tokens may differ from the model's training"
                );
                rules(DEFAULT_SPLITS, false, false)
            }
        }
    }
}

/// Many short strings or byte strings stored back to back.
#[derive(Debug, Clone, Default)]
struct PackedStrings<T> {
    data: T,
    ends: Vec<usize>,
}

impl<T> PackedStrings<T> {
    /// The byte range of entry `index`.
    fn range(&self, index: usize) -> Option<std::ops::Range<usize>> {
        let end = *self.ends.get(index)?;
        let start = match index.checked_sub(1) {
            Some(previous) => *self.ends.get(previous)?,
            None => 0,
        };
        Some(start..end)
    }

    fn len(&self) -> usize {
        self.ends.len()
    }
}

impl PackedStrings<String> {
    fn push(&mut self, text: &str) {
        self.data.push_str(text);
        self.ends.push(self.data.len());
    }

    fn get(&self, index: usize) -> Option<&str> {
        self.data.get(self.range(index)?)
    }
}

impl PackedStrings<Vec<u8>> {
    fn push(&mut self, bytes: impl IntoIterator<Item = u8>) {
        self.data.extend(bytes);
        self.ends.push(self.data.len());
    }

    fn get(&self, index: usize) -> Option<&[u8]> {
        self.data.get(self.range(index)?)
    }
}

/// A token recognised as a whole before BPE runs.
#[derive(Debug, Clone, Copy)]
struct SpecialToken {
    id: u32,
    /// Recognised in user text too (USER_DEFINED), not only in rendered prompts.
    in_user_text: bool,
}

/// A part of the text being encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fragment<'a> {
    /// Text still to be split and merged.
    Text(&'a str),
    /// A special token already recognised.
    Token(u32),
}

/// A tokenizer built from GGUF metadata; see the module documentation for its semantics.
#[derive(Clone)]
pub struct GgufTokenizer {
    /// Pre-tokenizer and BPE for text without special tokens.
    bpe: Tokenizer,
    /// Vocabulary strings as stored in the file.
    texts: PackedStrings<String>,
    /// Raw bytes each token stands for.
    pieces: PackedStrings<Vec<u8>>,
    token_types: Vec<TokenType>,
    /// Special tokens, longest text first.
    specials: Vec<SpecialToken>,
    pre_name: String,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    adds_bos: bool,
    end_of_turn: Vec<u32>,
    think: Option<(u32, u32)>,
}

impl fmt::Debug for GgufTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("pre", &self.pre_name)
            .field("special_tokens", &self.specials.len())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("adds_bos", &self.adds_bos)
            .field("end_of_turn", &self.end_of_turn)
            .field("think", &self.think)
            .finish()
    }
}

impl GgufTokenizer {
    /// Builds the tokenizer described by the file's `tokenizer.ggml.*` keys.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let model = gguf.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(EngineError::Tokenizer(format!(
                "the tokenizer model \"{model}\" is not supported (only \"gpt2\", byte-level BPE)"
            )));
        }
        let pre_name = match gguf.get("tokenizer.ggml.pre") {
            Some(_) => gguf.get_str("tokenizer.ggml.pre")?.to_string(),
            None => "default".to_string(),
        };
        let rules = PreTokenizerRules::for_name(&pre_name);

        let texts = vocabulary_texts(&gguf.get_str_array("tokenizer.ggml.tokens")?)?;
        let n_tokens = texts.len();
        let mut token_types = read_token_types(gguf, n_tokens)?;
        let bos_id = optional_token_id(gguf, "tokenizer.ggml.bos_token_id", n_tokens)?;
        let eos_id = optional_token_id(gguf, "tokenizer.ggml.eos_token_id", n_tokens)?;
        let adds_bos = optional_bool(gguf, "tokenizer.ggml.add_bos_token")?
            .unwrap_or(rules.adds_bos_by_default);

        let merge_rules = gguf.get_str_array("tokenizer.ggml.merges")?;
        let bpe = build_bpe_tokenizer(&texts, &merge_rules, rules)?;

        let end_of_turn = end_of_turn_ids(gguf, &bpe, n_tokens)?;
        mark_as_control(&mut token_types, &end_of_turn);
        let think = bpe.token_to_id("<think>").zip(bpe.token_to_id("</think>"));
        Ok(Self {
            pieces: token_pieces(&texts, &token_types),
            specials: special_tokens(&texts, &token_types),
            bpe,
            texts,
            token_types,
            pre_name,
            bos_id,
            eos_id,
            adds_bos: adds_bos && bos_id.is_some(),
            end_of_turn,
            think,
        })
    }

    /// Encodes text without adding BOS. With `parse_special` (a rendered chat prompt) control
    /// tokens such as `<|im_start|>` are recognised; without it (text a user typed) only
    /// user-defined tokens such as `<think>` are.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        self.encode_fragments(self.partition(text, parse_special, &[]))
    }

    /// Encodes fragments: special tokens as they are, text by BPE.
    fn encode_fragments(&self, fragments: Vec<Fragment<'_>>) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        for fragment in fragments {
            match fragment {
                Fragment::Token(id) => ids.push(id),
                Fragment::Text(piece) => ids.extend(self.encode_plain(piece)?),
            }
        }
        Ok(ids)
    }

    /// Encodes a rendered chat prompt: BOS if the model adds one (and the prompt does not
    /// already start with it), then the text with special tokens recognised.
    pub fn encode_prompt(&self, rendered_prompt: &str) -> Result<Vec<u32>> {
        self.encode_prompt_with_plain(rendered_prompt, &[])
    }

    /// Encodes a rendered chat prompt like [`encode_prompt`](Self::encode_prompt), except that
    /// no special token is recognised where it overlaps one of the `plain` byte ranges: text a
    /// user or the model wrote stays text even where it reads `<|im_end|>` or `<think>`. The
    /// prompt is still split and merged as a whole, so when the ranges hold no special token's
    /// text the ids are exactly those of `encode_prompt`.
    pub fn encode_prompt_with_plain(
        &self,
        rendered_prompt: &str,
        plain: &[Range<usize>],
    ) -> Result<Vec<u32>> {
        let ids = self.encode_fragments(self.partition(rendered_prompt, true, plain))?;
        match self.bos_id {
            Some(bos) if self.adds_bos && ids.first() != Some(&bos) => {
                let mut with_bos = Vec::with_capacity(ids.len() + 1);
                with_bos.push(bos);
                with_bos.extend(ids);
                Ok(with_bos)
            }
            _ => Ok(ids),
        }
    }

    /// Decodes ids to text, keeping special and user-defined tokens as their text. Invalid UTF-8
    /// becomes U+FFFD; unknown ids are skipped.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            bytes.extend_from_slice(self.token_piece(id));
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The raw bytes one token stands for (empty for an unknown id).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        self.token_piece(id).to_vec()
    }

    /// The raw bytes one token stands for, borrowed (empty for an unknown id).
    pub fn token_piece(&self, id: u32) -> &[u8] {
        self.pieces.get(id as usize).unwrap_or_default()
    }

    /// The id of a vocabulary string (as stored in the file, e.g. `Ġworld` for " world").
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.bpe.token_to_id(text)
    }

    /// The vocabulary string of a token, as stored in the file.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.texts.get(id as usize)
    }

    /// The kind of a token.
    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.token_types.get(id as usize).copied()
    }

    /// Number of entries in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.texts.len()
    }

    /// The file's `tokenizer.ggml.pre` name (`"default"` when absent).
    pub fn pre_tokenizer_name(&self) -> &str {
        &self.pre_name
    }

    /// The beginning-of-sequence token, if the file names one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The end-of-sequence token, if the file names one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Whether [`encode_prompt`](Self::encode_prompt) puts BOS in front of a prompt.
    pub fn adds_bos(&self) -> bool {
        self.adds_bos
    }

    /// BOS as text, for chat templates' `bos_token` (`""` if none).
    pub fn bos_text(&self) -> &str {
        self.bos_id
            .and_then(|id| self.token_text(id))
            .unwrap_or_default()
    }

    /// EOS as text, for chat templates' `eos_token` (`""` if none).
    pub fn eos_text(&self) -> &str {
        self.eos_id
            .and_then(|id| self.token_text(id))
            .unwrap_or_default()
    }

    /// Every token that ends the model's turn, ascending: EOS, EOT, EOM and llama.cpp's
    /// end-of-generation texts (`<|im_end|>`, `<|eot_id|>`, `<|end_of_text|>`, …) that exist.
    pub fn end_of_turn_ids(&self) -> &[u32] {
        &self.end_of_turn
    }

    /// Whether generating this token ends the model's turn.
    pub fn is_end_of_turn(&self, id: u32) -> bool {
        self.end_of_turn.binary_search(&id).is_ok()
    }

    /// Whether `text` holds the text of a special token (control, user-defined or unknown), i.e.
    /// whether [`encode_prompt`](Self::encode_prompt) would find a special token in it.
    pub fn contains_special_text(&self, text: &str) -> bool {
        self.specials.iter().any(|special| {
            self.token_text(special.id)
                .is_some_and(|pattern| text.contains(pattern))
        })
    }

    /// `(<think>, </think>)` when both are single tokens.
    pub fn think_ids(&self) -> Option<(u32, u32)> {
        self.think
    }

    /// Cuts the special tokens out of `text`, the way llama.cpp does: each special token in
    /// turn, longest first, is split out of every piece of text not yet claimed, except where it
    /// would overlap a `plain` byte range of `text`.
    fn partition<'a>(
        &self,
        text: &'a str,
        parse_special: bool,
        plain: &[Range<usize>],
    ) -> Vec<Fragment<'a>> {
        let mut fragments = Vec::new();
        if text.is_empty() {
            return fragments;
        }
        fragments.push(Fragment::Text(text));
        for special in &self.specials {
            if !parse_special && !special.in_user_text {
                continue;
            }
            let Some(pattern) = self.token_text(special.id) else {
                continue;
            };
            if !text.contains(pattern) {
                continue;
            }
            fragments = split_out(fragments, pattern, special.id, (text, plain));
        }
        fragments
    }

    /// Encodes text that holds no special token.
    fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.bpe.encode_fast(text, false).map_err(tokenizer_error)?;
        Ok(encoding.get_ids().to_vec())
    }
}

/// Splits every occurrence of `pattern` out of the text fragments as the token `id`, except
/// those overlapping one of the `plain` byte ranges of `whole` (the text the fragments are of).
fn split_out<'a>(
    fragments: Vec<Fragment<'a>>,
    pattern: &str,
    id: u32,
    (whole, plain): (&str, &[Range<usize>]),
) -> Vec<Fragment<'a>> {
    let Some(first_char) = pattern.chars().next() else {
        return fragments;
    };
    let mut out = Vec::with_capacity(fragments.len() + 2);
    for fragment in fragments {
        let Fragment::Text(piece) = fragment else {
            out.push(fragment);
            continue;
        };
        // Byte offset of the fragment in the whole text (it is a slice of it).
        let offset = (piece.as_ptr() as usize).wrapping_sub(whole.as_ptr() as usize);
        let mut emitted = 0;
        let mut search = 0;
        while let Some(found) = piece.get(search..).and_then(|rest| rest.find(pattern)) {
            let at = search + found;
            let end = at + pattern.len();
            let span = offset + at..offset + end;
            if plain
                .iter()
                .any(|r| r.start < span.end && span.start < r.end)
            {
                search = at + first_char.len_utf8();
                continue;
            }
            if at > emitted {
                out.push(Fragment::Text(&piece[emitted..at]));
            }
            out.push(Fragment::Token(id));
            emitted = end;
            search = end;
        }
        if emitted < piece.len() {
            out.push(Fragment::Text(&piece[emitted..]));
        }
    }
    out
}

/// The vocabulary strings, with empty entries renamed as llama.cpp does.
fn vocabulary_texts(tokens: &[&str]) -> Result<PackedStrings<String>> {
    if tokens.is_empty() {
        return Err(EngineError::Tokenizer("the vocabulary is empty".into()));
    }
    if u32::try_from(tokens.len()).is_err() {
        return Err(EngineError::Tokenizer(format!(
            "the vocabulary has {} entries, more than token ids can number",
            tokens.len()
        )));
    }
    let mut texts = PackedStrings {
        data: String::with_capacity(tokens.iter().map(|t| t.len()).sum()),
        ends: Vec::with_capacity(tokens.len()),
    };
    for (id, token) in tokens.iter().enumerate() {
        if token.is_empty() {
            log::warn!("token {id} of the vocabulary is empty");
            texts.push(&format!("[EMPTY_{id}]"));
        } else {
            texts.push(token);
        }
    }
    Ok(texts)
}

/// The token types, all normal when the file has none.
fn read_token_types(gguf: &GgufFile, n_tokens: usize) -> Result<Vec<TokenType>> {
    const KEY: &str = "tokenizer.ggml.token_type";
    if gguf.get(KEY).is_none() {
        return Ok(vec![TokenType::Normal; n_tokens]);
    }
    let types = gguf.get_i64_array(KEY)?;
    if types.len() != n_tokens {
        return Err(EngineError::InvalidMetadata {
            key: KEY.into(),
            reason: format!("{} entries for {n_tokens} tokens", types.len()),
        });
    }
    Ok(types.into_iter().map(TokenType::from_gguf).collect())
}

/// A token id key; an id outside the vocabulary is ignored with a warning, as llama.cpp does.
fn optional_token_id(gguf: &GgufFile, key: &str, n_tokens: usize) -> Result<Option<u32>> {
    if gguf.get(key).is_none() {
        return Ok(None);
    }
    let id = gguf.get_u64(key)?;
    match u32::try_from(id) {
        Ok(id) if (id as usize) < n_tokens => Ok(Some(id)),
        _ => {
            log::warn!("{key} = {id} is outside the vocabulary of {n_tokens} tokens; ignored");
            Ok(None)
        }
    }
}

/// A boolean key, if present.
fn optional_bool(gguf: &GgufFile, key: &str) -> Result<Option<bool>> {
    match gguf.get(key) {
        None => Ok(None),
        Some(MetaValue::Bool(value)) => Ok(Some(*value)),
        Some(other) => Err(EngineError::InvalidMetadata {
            key: key.into(),
            reason: format!("expected bool, found {}", other.type_name()),
        }),
    }
}

/// The ids that end a turn, ascending and without repeats.
fn end_of_turn_ids(gguf: &GgufFile, bpe: &Tokenizer, n_tokens: usize) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    for key in END_OF_TURN_KEYS {
        ids.extend(optional_token_id(gguf, key, n_tokens)?);
    }
    ids.extend(
        END_OF_TURN_TEXTS
            .iter()
            .filter_map(|text| bpe.token_to_id(text)),
    );
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// Makes the given tokens control tokens, as llama.cpp does for end-of-turn tokens, so that
/// user text can never produce them.
fn mark_as_control(types: &mut [TokenType], ids: &[u32]) {
    for &id in ids {
        if let Some(kind) = types.get_mut(id as usize)
            && *kind != TokenType::Control
        {
            log::debug!("token {id} ends a turn; treating it as a control token");
            *kind = TokenType::Control;
        }
    }
}

/// Parses `"left right"` merge rules; malformed ones are skipped.
fn read_merges(rules: &[&str]) -> Merges {
    let mut merges = Vec::with_capacity(rules.len());
    for rule in rules {
        // llama.cpp splits at the first space after the first byte, so " " can be a left half.
        let space = rule.bytes().skip(1).position(|b| b == b' ').map(|p| p + 1);
        match space.and_then(|at| Some((rule.get(..at)?, rule.get(at + 1..)?))) {
            Some((left, right)) => merges.push((left.to_string(), right.to_string())),
            None => log::warn!("ignoring the malformed merge rule {rule:?}"),
        }
    }
    merges
}

/// Builds the pre-tokenizer and BPE model that encode text without special tokens.
fn build_bpe_tokenizer(
    texts: &PackedStrings<String>,
    merge_rules: &[&str],
    rules: PreTokenizerRules,
) -> Result<Tokenizer> {
    let bpe = match bpe_model(vocab_map(texts), read_merges(merge_rules), rules) {
        Ok(bpe) => bpe,
        // Checking every rule up front is slow, so only a file that needs it pays for it.
        Err(err) => {
            log::warn!(
                "{err}: ignoring the merge rules that refer to tokens outside the vocabulary"
            );
            let vocab = vocab_map(texts);
            let merges = usable_merges(&vocab, read_merges(merge_rules));
            bpe_model(vocab, merges, rules)?
        }
    };
    let mut steps = Vec::with_capacity(rules.splits.len() + 1);
    for pattern in rules.splits {
        let split = Split::new(
            SplitPattern::Regex((*pattern).to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(tokenizer_error)?;
        steps.push(PreTokenizerWrapper::Split(split));
    }
    steps.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
        false, false, false,
    )));
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(Sequence::new(steps)));
    Ok(tokenizer)
}

/// The text-to-id map; a repeated text maps to its last id, like llama.cpp's.
fn vocab_map(texts: &PackedStrings<String>) -> Vocab {
    (0..texts.len())
        .filter_map(|id| Some((texts.get(id)?.to_string(), u32::try_from(id).ok()?)))
        .collect()
}

/// The BPE model; fails if a merge rule refers to a token outside the vocabulary.
fn bpe_model(vocab: Vocab, merges: Merges, rules: PreTokenizerRules) -> Result<BPE> {
    BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(rules.ignore_merges)
        .build()
        .map_err(tokenizer_error)
}

fn tokenizer_error(err: tokenizers::Error) -> EngineError {
    EngineError::Tokenizer(err.to_string())
}

/// Drops merge rules whose halves or result are not in the vocabulary (they could never apply).
fn usable_merges(vocab: &Vocab, merges: Merges) -> Merges {
    let before = merges.len();
    let mut joined = String::new();
    let usable: Merges = merges
        .into_iter()
        .filter(|(left, right)| {
            joined.clear();
            joined.push_str(left);
            joined.push_str(right);
            vocab.contains_key(left) && vocab.contains_key(right) && vocab.contains_key(&joined)
        })
        .collect();
    log::warn!("ignored {} merge rules", before - usable.len());
    usable
}

/// The raw bytes of every token.
fn token_pieces(texts: &PackedStrings<String>, types: &[TokenType]) -> PackedStrings<Vec<u8>> {
    let mut pieces = PackedStrings {
        data: Vec::with_capacity(texts.data.len()),
        ends: Vec::with_capacity(texts.len()),
    };
    for (id, kind) in types.iter().enumerate() {
        let text = texts.get(id).unwrap_or_default();
        if kind.decodes_verbatim() {
            pieces.push(text.bytes());
        } else {
            pieces.push(byte_level_decode(text));
        }
    }
    pieces
}

/// The special tokens, longest text first (ties by id).
fn special_tokens(texts: &PackedStrings<String>, types: &[TokenType]) -> Vec<SpecialToken> {
    let mut specials: Vec<(usize, SpecialToken)> = types
        .iter()
        .enumerate()
        .filter(|(_, kind)| kind.is_special())
        .filter_map(|(id, kind)| {
            let special = SpecialToken {
                id: u32::try_from(id).ok()?,
                in_user_text: *kind == TokenType::UserDefined,
            };
            Some((texts.get(id)?.len(), special))
        })
        .collect();
    specials.sort_by(|(a_len, a), (b_len, b)| b_len.cmp(a_len).then(a.id.cmp(&b.id)));
    specials.into_iter().map(|(_, special)| special).collect()
}

/// Whether GPT-2's byte alphabet maps the byte to the character with the same code.
const fn is_printable_byte(byte: u8) -> bool {
    matches!(byte, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// The bytes GPT-2's alphabet maps to U+0100, U+0101, … in order.
const UNPRINTABLE_BYTES: [u8; 68] = {
    let mut table = [0u8; 68];
    let mut next = 0;
    let mut byte = 0u8;
    loop {
        if !is_printable_byte(byte) {
            table[next] = byte;
            next += 1;
        }
        if byte == u8::MAX {
            break;
        }
        byte += 1;
    }
    table
};

/// The byte a character of GPT-2's byte alphabet stands for.
fn byte_of_char(c: char) -> Option<u8> {
    let code = u32::from(c);
    match u8::try_from(code) {
        Ok(byte) if is_printable_byte(byte) => Some(byte),
        _ => {
            let index = usize::try_from(code.checked_sub(0x100)?).ok()?;
            UNPRINTABLE_BYTES.get(index).copied()
        }
    }
}

/// Maps a vocabulary string back to raw bytes; a character outside the alphabet is kept as its
/// own UTF-8 bytes.
fn byte_level_decode(text: &str) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(text.len());
    for c in text.chars() {
        match byte_of_char(c) {
            Some(byte) => bytes.push(byte),
            None => bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    bytes
}

/// Turns a stream of token ids into text, emitting each UTF-8 character once, whole, when complete.
#[derive(Debug, Clone, Default)]
pub struct StreamDecoder {
    /// Bytes of a character not yet complete.
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// A decoder with nothing pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one token and returns the text it completes (`""` while a character is incomplete).
    pub fn push(&mut self, tokenizer: &GgufTokenizer, id: u32) -> String {
        self.push_bytes(tokenizer.token_piece(id))
    }

    /// Adds raw bytes and returns the characters they complete. Bytes that can never start or
    /// continue a character become U+FFFD at once.
    pub fn push_bytes(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        let mut consumed = 0;
        while let Some(rest) = self.pending.get(consumed..) {
            match std::str::from_utf8(rest) {
                Ok(text) => {
                    out.push_str(text);
                    consumed = self.pending.len();
                    break;
                }
                Err(err) => {
                    let valid = rest.get(..err.valid_up_to()).unwrap_or_default();
                    out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    consumed += err.valid_up_to();
                    match err.error_len() {
                        Some(invalid) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            consumed += invalid;
                        }
                        // The tail may still become a character.
                        None => break,
                    }
                }
            }
        }
        self.pending.drain(..consumed.min(self.pending.len()));
        out
    }

    /// Whether bytes of an incomplete character are waiting.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Flushes what is left: an incomplete character becomes U+FFFD, never silently dropped.
    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet};
    use std::path::PathBuf;

    use super::*;

    /// GPT-2's byte-to-character map, written out independently of [`byte_of_char`].
    fn char_of_byte(byte: u8) -> char {
        let unprintable_rank = (0..byte).filter(|b| !is_printable_byte(*b)).count() as u32;
        if is_printable_byte(byte) {
            char::from(byte)
        } else {
            char::from_u32(0x100 + unprintable_rank).unwrap()
        }
    }

    fn byte_level(text: &str) -> String {
        text.bytes().map(char_of_byte).collect()
    }

    fn strings(items: &[&str]) -> MetaValue {
        MetaValue::Array(
            items
                .iter()
                .map(|s| MetaValue::String(s.to_string()))
                .collect(),
        )
    }

    /// A small vocabulary: all 256 bytes, a few merges, and special tokens at the end.
    fn small_gguf(pre: &str) -> GgufFile {
        let mut tokens: Vec<String> = (0..=255u8).map(|b| char_of_byte(b).to_string()).collect();
        // "ab" has no merge rule: only whole-word lookup (ignore_merges) produces it.
        let merged = ["he", "ll", "hell", "hello", "Ġw", "Ġwo", "ab"];
        tokens.extend(merged.iter().map(|s| s.to_string()));
        let specials = [
            ("<|im_end|>", 3),
            ("<think>", 4),
            ("<|endoftext|>", 4),
            ("", 3),
        ];
        tokens.extend(specials.iter().map(|(s, _)| s.to_string()));
        let mut types = vec![1i32; tokens.len() - specials.len()];
        types.extend(specials.iter().map(|(_, t)| *t));
        let merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o"];

        let mut metadata = BTreeMap::new();
        let mut set = |key: &str, value| {
            metadata.insert(key.to_string(), value);
        };
        set("tokenizer.ggml.model", MetaValue::String("gpt2".into()));
        set("tokenizer.ggml.pre", MetaValue::String(pre.into()));
        let token_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        set("tokenizer.ggml.tokens", strings(&token_refs));
        set(
            "tokenizer.ggml.token_type",
            MetaValue::Array(types.into_iter().map(MetaValue::I32).collect()),
        );
        set("tokenizer.ggml.merges", strings(&merges));
        set("tokenizer.ggml.bos_token_id", MetaValue::U32(b'h'.into()));
        set("tokenizer.ggml.eos_token_id", MetaValue::U32(263));
        GgufFile {
            path: PathBuf::from("small.gguf"),
            file_size: 0,
            version: 3,
            metadata,
            tensors: Vec::new(),
            tensor_index: Default::default(),
            data_offset: 0,
            alignment: 32,
        }
    }

    fn small_tokenizer() -> GgufTokenizer {
        GgufTokenizer::from_gguf(&small_gguf("smaug-bpe")).unwrap()
    }

    fn id(tokenizer: &GgufTokenizer, text: &str) -> u32 {
        tokenizer.token_id(text).unwrap()
    }

    #[test]
    fn byte_alphabet_inverts_gpt2_mapping() {
        let mut seen = HashSet::new();
        for byte in 0..=255u8 {
            let c = char_of_byte(byte);
            assert_eq!(byte_of_char(c), Some(byte), "byte {byte:#04x} via {c:?}");
            assert!(seen.insert(c));
        }
        assert_eq!(byte_of_char('Ġ'), Some(b' '));
        assert_eq!(byte_of_char('Ċ'), Some(b'\n'));
        assert_eq!(byte_of_char('ĉ'), Some(b'\t'));
        assert_eq!(byte_of_char('日'), None);
        assert_eq!(byte_level_decode("ĠworldĊ"), b" world\n");
        assert_eq!(byte_level_decode(&byte_level("é🦙")), "é🦙".as_bytes());
    }

    #[test]
    fn merges_split_at_the_first_space_after_the_first_byte() {
        let merges = read_merges(&["Ġ Ġ", "  x", "a b", "nospace"]);
        assert_eq!(
            merges,
            vec![
                ("Ġ".to_string(), "Ġ".to_string()),
                (" ".to_string(), "x".to_string()),
                ("a".to_string(), "b".to_string()),
            ]
        );
    }

    #[test]
    fn split_out_cuts_every_occurrence() {
        let fragments = vec![Fragment::Text("a<x>b<x><x>"), Fragment::Token(7)];
        assert_eq!(
            split_out(fragments, "<x>", 9, ("", &[])),
            vec![
                Fragment::Text("a"),
                Fragment::Token(9),
                Fragment::Text("b"),
                Fragment::Token(9),
                Fragment::Token(9),
                Fragment::Token(7),
            ]
        );
    }

    #[test]
    fn plain_ranges_keep_special_text_as_text() {
        let tok = small_tokenizer();
        let end = id(&tok, "<|im_end|>");
        let prompt = "a<|im_end|>b<|im_end|>";
        let ids = tok
            .encode_prompt_with_plain(prompt, std::slice::from_ref(&(1..11)))
            .unwrap();
        assert_eq!(ids.iter().filter(|&&t| t == end).count(), 1);
        assert_eq!(ids.last(), Some(&end));
        assert_eq!(tok.decode(&ids), prompt);
        // A range touching only part of a token's text also keeps it plain.
        let partly = tok
            .encode_prompt_with_plain(prompt, std::slice::from_ref(&(12..13)))
            .unwrap();
        assert_eq!(partly.iter().filter(|&&t| t == end).count(), 1);
        assert_eq!(
            tok.encode_prompt_with_plain(prompt, &[]).unwrap(),
            tok.encode_prompt(prompt).unwrap()
        );
        assert!(tok.contains_special_text("x<think>"));
        assert!(!tok.contains_special_text("plain <thin"));
    }

    #[test]
    fn encodes_with_merges_and_byte_level() {
        let tok = small_tokenizer();
        let ids = tok.encode("hello wo", false).unwrap();
        assert_eq!(ids, vec![id(&tok, "hello"), id(&tok, "Ġwo")]);
        assert_eq!(tok.decode(&ids), "hello wo");
        let unicode = tok.encode("é", false).unwrap();
        assert_eq!(unicode, vec![0xC3, 0xA9]);
        assert_eq!(tok.decode(&unicode), "é");
    }

    #[test]
    fn control_tokens_only_in_rendered_prompts() {
        let tok = small_tokenizer();
        let end = id(&tok, "<|im_end|>");
        let think = id(&tok, "<think>");
        let user = tok.encode("<think>hello<|im_end|>", false).unwrap();
        assert_eq!(user.first(), Some(&think));
        assert!(!user.contains(&end));
        assert_eq!(tok.decode(&user), "<think>hello<|im_end|>");
        let prompt = tok.encode("<think>hello<|im_end|>", true).unwrap();
        assert_eq!(prompt, vec![think, id(&tok, "hello"), end]);
        assert_eq!(tok.decode(&prompt), "<think>hello<|im_end|>");
    }

    #[test]
    fn end_of_turn_tokens_become_control() {
        let tok = small_tokenizer();
        let endoftext = id(&tok, "<|endoftext|>");
        // Stored as user-defined, but it ends a turn: a user cannot type it.
        assert_eq!(tok.token_type(endoftext), Some(TokenType::Control));
        assert!(
            !tok.encode("<|endoftext|>", false)
                .unwrap()
                .contains(&endoftext)
        );
        assert_eq!(tok.encode("<|endoftext|>", true).unwrap(), vec![endoftext]);
        assert_eq!(tok.end_of_turn_ids(), &[263, endoftext]);
        assert!(tok.is_end_of_turn(endoftext));
        assert!(!tok.is_end_of_turn(id(&tok, "<think>")));
    }

    #[test]
    fn empty_tokens_are_renamed() {
        let tok = small_tokenizer();
        let last = u32::try_from(tok.vocab_size() - 1).unwrap();
        assert_eq!(
            tok.token_text(last),
            Some(format!("[EMPTY_{last}]").as_str())
        );
        assert_eq!(tok.encode("", true).unwrap(), Vec::<u32>::new());
    }

    #[test]
    fn bos_follows_metadata() {
        let tok = small_tokenizer();
        assert!(!tok.adds_bos());
        assert_eq!(tok.bos_text(), "h");
        assert_eq!(tok.eos_text(), "<|im_end|>");
        assert_eq!(
            tok.encode_prompt("wo").unwrap(),
            tok.encode("wo", true).unwrap()
        );

        let mut gguf = small_gguf("smaug-bpe");
        gguf.metadata
            .insert("tokenizer.ggml.add_bos_token".into(), MetaValue::Bool(true));
        let tok = GgufTokenizer::from_gguf(&gguf).unwrap();
        let bos = u32::from(b'h');
        assert_eq!(
            tok.encode_prompt("wo").unwrap(),
            vec![bos, u32::from(b'w'), u32::from(b'o')]
        );
        // A prompt that already starts with BOS does not get a second one.
        assert_eq!(tok.encode_prompt("h").unwrap(), vec![bos]);
    }

    #[test]
    fn llama3_defaults_to_bos_and_whole_words() {
        let mut gguf = small_gguf("llama-bpe");
        gguf.metadata.remove("tokenizer.ggml.add_bos_token");
        let tok = GgufTokenizer::from_gguf(&gguf).unwrap();
        assert!(tok.adds_bos());
        assert_eq!(tok.encode("ab", false).unwrap(), vec![id(&tok, "ab")]);
        assert_eq!(small_tokenizer().encode("ab", false).unwrap(), vec![97, 98]);
    }

    #[test]
    fn rejects_other_tokenizer_models() {
        let mut gguf = small_gguf("smaug-bpe");
        gguf.metadata.insert(
            "tokenizer.ggml.model".into(),
            MetaValue::String("llama".into()),
        );
        let err = GgufTokenizer::from_gguf(&gguf).unwrap_err();
        assert!(err.to_string().contains("\"llama\""), "{err}");
    }

    #[test]
    fn ignores_merges_outside_the_vocabulary() {
        let mut gguf = small_gguf("smaug-bpe");
        gguf.metadata.insert(
            "tokenizer.ggml.merges".into(),
            strings(&["h e", "x yz", "he ll", "l l", "hel lo"]),
        );
        let tok = GgufTokenizer::from_gguf(&gguf).unwrap();
        let ids = tok.encode("hell", false).unwrap();
        assert_eq!(ids, vec![id(&tok, "hell")]);
    }

    #[test]
    fn rejects_mismatched_token_types() {
        let mut gguf = small_gguf("smaug-bpe");
        gguf.metadata.insert(
            "tokenizer.ggml.token_type".into(),
            MetaValue::Array(vec![MetaValue::I32(1)]),
        );
        assert!(matches!(
            GgufTokenizer::from_gguf(&gguf),
            Err(EngineError::InvalidMetadata { .. })
        ));
    }

    #[test]
    fn missing_vocabulary_is_an_error() {
        let mut gguf = small_gguf("smaug-bpe");
        gguf.metadata.remove("tokenizer.ggml.tokens");
        assert!(matches!(
            GgufTokenizer::from_gguf(&gguf),
            Err(EngineError::MissingKey(_))
        ));
    }

    #[test]
    fn out_of_range_ids_are_ignored() {
        let mut gguf = small_gguf("smaug-bpe");
        gguf.metadata.insert(
            "tokenizer.ggml.bos_token_id".into(),
            MetaValue::U32(1 << 30),
        );
        let tok = GgufTokenizer::from_gguf(&gguf).unwrap();
        assert_eq!(tok.bos_id(), None);
        assert_eq!(tok.bos_text(), "");
        assert!(tok.token_bytes(u32::MAX).is_empty());
        assert_eq!(tok.decode(&[u32::MAX, u32::from(b'h')]), "h");
    }

    #[test]
    fn stream_decoder_emits_whole_characters() {
        let mut decoder = StreamDecoder::new();
        let emoji = "🦙".as_bytes();
        assert_eq!(decoder.push_bytes(b"a"), "a");
        assert_eq!(decoder.push_bytes(&emoji[..1]), "");
        assert!(decoder.has_pending());
        assert_eq!(decoder.push_bytes(&emoji[1..3]), "");
        assert_eq!(decoder.push_bytes(&[emoji[3], b'b']), "🦙b");
        assert!(!decoder.has_pending());
        assert_eq!(decoder.finish(), "");
    }

    #[test]
    fn stream_decoder_replaces_invalid_bytes() {
        let mut decoder = StreamDecoder::new();
        // A lone continuation byte can never become valid.
        assert_eq!(decoder.push_bytes(&[0x80, b'x']), "\u{FFFD}x");
        // A started character cut off by ASCII is invalid once the ASCII arrives.
        assert_eq!(decoder.push_bytes(&[0xE6]), "");
        assert_eq!(decoder.push_bytes(b"y"), "\u{FFFD}y");
        assert_eq!(decoder.push_bytes(&[0xF0, 0x9F]), "");
        assert_eq!(decoder.finish(), "\u{FFFD}");
        assert_eq!(decoder.finish(), "");
    }

    #[test]
    fn tokenizer_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<GgufTokenizer>();
        assert_send_sync::<StreamDecoder>();
    }
}
