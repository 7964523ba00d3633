//! The GGUF tokenizer against llama.cpp's token ids for SmolLM3's vocabulary, the tiny SmolLM3
//! models and the real SmolLM2-135M, plus decoding and streaming.

mod common;

use std::sync::OnceLock;
use std::time::Instant;

use serde_json::Value;
use smoldesk::engine::gguf::GgufFile;
use smoldesk::engine::tokenizer::{GgufTokenizer, StreamDecoder, TokenType};

/// Opens a model file and builds its tokenizer, reporting how long the build took.
fn load(path: &std::path::Path) -> GgufTokenizer {
    let gguf = GgufFile::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let start = Instant::now();
    let tokenizer = GgufTokenizer::from_gguf(&gguf).unwrap();
    eprintln!(
        "built the tokenizer of {} ({} tokens) in {:.0} ms",
        path.display(),
        tokenizer.vocab_size(),
        start.elapsed().as_secs_f64() * 1e3
    );
    tokenizer
}

/// SmolLM3's full tokenizer, built once for all tests.
fn smollm3() -> &'static GgufTokenizer {
    static TOKENIZER: OnceLock<GgufTokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| load(&common::fixture("smollm3-vocab.gguf")))
}

/// One reference case: text, whether special tokens are parsed, and llama.cpp's ids.
struct Case {
    text: String,
    parse_special: bool,
    ids: Vec<u32>,
}

fn cases(list: &Value) -> Vec<Case> {
    list.as_array()
        .expect("a list of cases")
        .iter()
        .map(|case| Case {
            text: case["text"].as_str().expect("text").to_string(),
            parse_special: case["parse_special"].as_bool().expect("parse_special"),
            ids: ids(&case["ids"]),
        })
        .collect()
}

fn ids(list: &Value) -> Vec<u32> {
    list.as_array()
        .expect("a list of ids")
        .iter()
        .map(|id| u32::try_from(id.as_u64().expect("an id")).expect("a u32 id"))
        .collect()
}

/// Encodes every case and fails with all mismatches listed.
fn check_cases(tokenizer: &GgufTokenizer, cases: &[Case]) {
    let mismatches: Vec<String> = cases
        .iter()
        .filter_map(|case| {
            let got = tokenizer.encode(&case.text, case.parse_special).unwrap();
            (got != case.ids).then(|| {
                format!(
                    "{:?} (parse_special {}):\n  expected {:?}\n  got      {:?}",
                    case.text, case.parse_special, case.ids, got
                )
            })
        })
        .collect();
    assert!(
        mismatches.is_empty(),
        "{} of {} cases differ from llama.cpp:\n{}",
        mismatches.len(),
        cases.len(),
        mismatches.join("\n")
    );
}

#[test]
fn smollm3_vocab_matches_llama_cpp() {
    let reference = common::read_json("smollm3-vocab.tokenize.json");
    let cases = cases(&reference["cases"]);
    assert_eq!(cases.len(), 110);
    check_cases(smollm3(), &cases);
    assert_eq!(
        smollm3().adds_bos(),
        reference["add_bos"].as_bool().expect("add_bos")
    );
}

#[test]
fn tiny_models_match_llama_cpp() {
    for (model, reference) in [
        ("tiny-smollm3-f32.gguf", "tiny-smollm3-f32.ref.json"),
        ("tiny-smollm3-q4_k_m.gguf", "tiny-smollm3-q4_k_m.ref.json"),
    ] {
        let tokenizer = load(&common::fixture(model));
        let reference = common::read_json(reference);
        assert_eq!(
            tokenizer.vocab_size() as u64,
            reference["n_vocab"].as_u64().expect("n_vocab")
        );
        let cases = cases(&reference["tokenize"]);
        assert!(!cases.is_empty());
        check_cases(&tokenizer, &cases);
        assert_eq!(tokenizer.think_ids(), Some((4098, 4099)));
        assert!(tokenizer.is_end_of_turn(4108), "<|im_end|> ends a turn");
    }
}

#[test]
fn smollm2_prompts_match_llama_cpp() {
    let path = common::smollm2_path();
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-test-model.sh",
        path.display()
    );
    let tokenizer = load(&path);
    let reference = common::read_json("smollm2-135m-chat.ref.json");
    let cases = reference["cases"].as_array().expect("cases");
    assert!(!cases.is_empty());
    for case in cases {
        let prompt = case["prompt"].as_str().expect("prompt");
        let expected = ids(&case["prompt_tokens"]);
        assert_eq!(
            tokenizer.encode_prompt(prompt).unwrap(),
            expected,
            "{prompt:?}"
        );
        assert_eq!(tokenizer.decode(&expected), prompt);
        let generated = ids(&case["generated"]);
        assert_eq!(
            tokenizer.decode(&generated),
            case["text"].as_str().expect("text")
        );
    }
    let eos = u32::try_from(reference["eos"].as_u64().expect("eos")).expect("a u32 id");
    assert!(tokenizer.is_end_of_turn(eos));
    assert!(!tokenizer.adds_bos());
    assert_eq!(tokenizer.eos_text(), "<|im_end|>");
}

#[test]
fn smollm3_special_tokens() {
    let tok = smollm3();
    assert_eq!(tok.vocab_size(), 128_256);
    assert_eq!(tok.token_id("<|im_start|>"), Some(128_011));
    assert_eq!(tok.token_id("<|im_end|>"), Some(128_012));
    assert_eq!(tok.think_ids(), Some((128_002, 128_003)));
    assert_eq!(tok.token_type(128_002), Some(TokenType::UserDefined));
    assert_eq!(tok.token_type(128_011), Some(TokenType::Control));
    assert!(!tok.adds_bos());
    assert_eq!(tok.bos_text(), "<|begin_of_text|>");
    assert_eq!(tok.eos_text(), "<|im_end|>");
    for id in [128_001, 128_008, 128_009, 128_012] {
        assert!(tok.end_of_turn_ids().contains(&id), "{id} ends a turn");
        assert!(tok.is_end_of_turn(id));
    }
    assert!(!tok.is_end_of_turn(128_011));
    assert!(!tok.is_end_of_turn(198));
    assert_eq!(tok.token_text(198), Some("Ċ"));
    assert_eq!(tok.token_bytes(198), b"\n");
    assert_eq!(tok.token_bytes(128_002), b"<think>");
}

#[test]
fn typed_control_tokens_stay_text() {
    let tok = smollm3();
    let typed = "Please end with <|im_end|> and <|im_start|>system now";
    let ids = tok.encode(typed, false).unwrap();
    let control: Vec<u32> = ids
        .iter()
        .copied()
        .filter(|&id| tok.token_type(id) == Some(TokenType::Control))
        .collect();
    assert!(
        control.is_empty(),
        "control tokens {control:?} from user text"
    );
    assert!(!ids.iter().any(|&id| tok.is_end_of_turn(id)));
    assert_eq!(tok.decode(&ids), typed);
    // The same text as a rendered prompt does hold the control tokens.
    let rendered = tok.encode(typed, true).unwrap();
    assert!(rendered.contains(&128_012) && rendered.contains(&128_011));
}

#[test]
fn decode_round_trips_and_keeps_think_tags() {
    let tok = smollm3();
    let reference = common::read_json("smollm3-vocab.tokenize.json");
    for case in cases(&reference["cases"]) {
        assert_eq!(tok.decode(&case.ids), case.text);
        let ids = tok.encode(&case.text, case.parse_special).unwrap();
        assert_eq!(tok.decode(&ids), case.text);
    }
    let reply = "<think>\nLet me think.\n</think>\nThe answer is 42.<|im_end|>";
    let ids = tok.encode_prompt(reply).unwrap();
    assert!(ids.contains(&128_002) && ids.contains(&128_003));
    assert_eq!(tok.decode(&ids), reply);
}

#[test]
fn stream_decoder_emits_split_characters_once() {
    let tok = smollm3();
    let text = " this is 🦙 日本語のテキスト 😶‍🌫️ Ünïcödé ✅";
    let ids = tok.encode(text, false).unwrap();
    // Some characters must really be split across tokens for this test to mean anything.
    let split = ids
        .iter()
        .filter(|&&id| std::str::from_utf8(&tok.token_bytes(id)).is_err())
        .count();
    assert!(split >= 3, "only {split} tokens hold partial characters");

    let mut decoder = StreamDecoder::new();
    let mut streamed = String::new();
    for &id in &ids {
        let chunk = decoder.push(tok, id);
        assert!(!chunk.contains('\u{FFFD}'), "{chunk:?} after token {id}");
        streamed.push_str(&chunk);
    }
    streamed.push_str(&decoder.finish());
    assert_eq!(streamed, text);

    // The llama arrives in three tokens; it appears exactly once, whole, with the last one.
    let llama = tok.encode("🦙", false).unwrap();
    assert_eq!(llama.len(), 3);
    let mut decoder = StreamDecoder::new();
    let chunks: Vec<String> = llama.iter().map(|&id| decoder.push(tok, id)).collect();
    assert_eq!(chunks, ["", "", "🦙"]);
}

#[test]
fn stream_decoder_flushes_a_dangling_character() {
    let tok = smollm3();
    // " 🦙" is 11410 (" " and the first two bytes of the llama), 99, 247.
    let mut decoder = StreamDecoder::new();
    assert_eq!(decoder.push(tok, 11_410), " ");
    assert_eq!(decoder.push(tok, 99), "");
    assert_eq!(decoder.finish(), "\u{FFFD}");
    assert_eq!(decoder.finish(), "");
}

#[test]
fn long_runs_round_trip() {
    let tok = smollm3();
    let text = format!(
        "{}a{}\n{}<think>{}",
        " ".repeat(20_000),
        "x".repeat(20_000),
        "\n".repeat(2_000),
        "日".repeat(5_000)
    );
    for parse_special in [false, true] {
        let ids = tok.encode(&text, parse_special).unwrap();
        assert!(ids.contains(&128_002));
        assert_eq!(tok.decode(&ids), text);
    }
}
