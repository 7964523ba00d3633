//! The generation loop on real model files: the thinking budget (scripted thinker), fresh and
//! fixed seeds, and dropping old turns in blocks so later turns reuse the KV cache.

mod common;

use smoldesk::chat::conversation::{ChatSettings, Message, Role, StopReason};
use smoldesk::chat::generate::{GenerationContext, GenerationEvent, Reply, generate_reply};
use smoldesk::chat::template::PromptFormatter;
use smoldesk::chat::thinking::SegmentKind;
use smoldesk::engine::sampling::SamplingParams;
use smoldesk::engine::session::{Engine, LoadOptions};

fn load(name: &str, context_length: usize) -> Engine {
    let options = LoadOptions {
        context_length,
        threads: 0,
    };
    Engine::load(&common::fixture(name), &options, &mut |_| true).expect("the fixture loads")
}

/// One reply to `messages`, with the model's own template.
fn reply(engine: &mut Engine, messages: &[Message], settings: &ChatSettings) -> Reply {
    reply_and_shown_answer(engine, messages, settings).0
}

fn settings(sampling: SamplingParams) -> ChatSettings {
    ChatSettings {
        thinking: true,
        sampling,
        ..ChatSettings::default()
    }
}

fn user(text: &str) -> Message {
    Message::new(Role::User, text)
}

#[test]
fn without_a_budget_the_scripted_thinker_thinks_its_300_words() {
    let mut engine = load("scripted-thinker.gguf", 2048);
    let reply = reply(
        &mut engine,
        &[user("Hello")],
        &settings(SamplingParams::greedy()),
    );
    assert!(!reply.stats.thinking_budget_reached);
    // `<think>`, 300 words, `</think>`.
    assert_eq!(reply.stats.thinking_tokens, 302);
    assert!(!reply.answer.trim().is_empty());
}

/// One reply to `messages` and the answer text streamed to the screen while it was written.
fn reply_and_shown_answer(
    engine: &mut Engine,
    messages: &[Message],
    settings: &ChatSettings,
) -> (Reply, String) {
    let formatter = PromptFormatter::new(engine.info().chat_template.as_deref(), None);
    let not_cancelled = || false;
    let ctx = GenerationContext {
        formatter: &formatter,
        date: chrono::NaiveDate::from_ymd_opt(2026, 1, 1).unwrap(),
        cancelled: &not_cancelled,
    };
    let mut shown = String::new();
    let reply = generate_reply(engine, &ctx, messages, settings, &mut |event| {
        if let GenerationEvent::Segment(segment) = event
            && segment.kind == SegmentKind::Answer
        {
            shown.push_str(&segment.text);
        }
    })
    .expect("a reply");
    (reply, shown)
}

/// The scripted thinker is a bigram table whose `\n` is followed by `<think>`: once the budget
/// has fed `</think>` and `\n`, a new thought is forbidden, so it wanders until it falls into its
/// word chain and ends the turn. Seeds are fixed to keep the walk the same on every run.
#[test]
fn a_thinking_budget_of_256_ends_the_thought_with_the_tag_and_a_newline_then_an_answer_follows() {
    let mut engine = load("scripted-thinker.gguf", 2048);
    let tokenizer = engine.tokenizer().clone();
    let (open, close) = tokenizer.think_ids().expect("SmolLM3 thinking tokens");
    let newline = tokenizer.encode("\n", false).unwrap();
    for seed in [1, 2] {
        let mut chat = settings(SamplingParams {
            max_tokens: 1200,
            seed,
            ..SamplingParams::default()
        });
        chat.fixed_seed = true;
        chat.thinking_budget = Some(256);
        let (reply, shown) = reply_and_shown_answer(&mut engine, &[user("Hello")], &chat);
        assert!(reply.stats.thinking_budget_reached, "seed {seed}");
        assert_eq!(reply.stats.thinking_tokens, 256, "seed {seed}");
        let close_at = reply.tokens.iter().position(|&t| t == close).unwrap();
        assert_eq!(close_at, 255, "the end tag is the 256th thinking token");
        let after_close = &reply.tokens[close_at + 1..];
        assert_eq!(
            &after_close[..newline.len()],
            &newline[..],
            "seed {seed}: the newline is fed after the end tag"
        );
        assert!(
            !after_close.contains(&open),
            "seed {seed}: no second thought"
        );
        assert!(
            reply.answer.split_whitespace().count() >= 5,
            "seed {seed}: answer {:?}",
            reply.answer
        );
        assert_eq!(shown, reply.answer, "seed {seed}");
        assert!(
            !shown.starts_with(char::is_whitespace),
            "seed {seed}: the fed newline is shown: {shown:?}"
        );
        assert_eq!(
            reply.stats.stop_reason,
            StopReason::EndOfTurn,
            "seed {seed}"
        );
        assert!(!reply.thinking.contains("</think>"));
    }
}

#[test]
fn greedy_decoding_is_fed_the_same_end_of_thought() {
    let mut engine = load("scripted-thinker.gguf", 1024);
    let tokenizer = engine.tokenizer().clone();
    let (_, close) = tokenizer.think_ids().unwrap();
    let mut expected = vec![close];
    expected.extend(tokenizer.encode("\n", false).unwrap());
    let mut chat = settings(SamplingParams {
        max_tokens: 64,
        ..SamplingParams::greedy()
    });
    chat.thinking_budget = Some(32);
    let (reply, _) = reply_and_shown_answer(&mut engine, &[user("Hello")], &chat);
    assert!(reply.stats.thinking_budget_reached);
    assert_eq!(reply.stats.thinking_tokens, 32);
    assert_eq!(&reply.tokens[31..31 + expected.len()], &expected[..]);
}

/// `smoldesk generate --think-budget N` closes the thought the same way.
#[test]
fn the_cli_think_budget_closes_the_thought_with_the_tag_and_a_newline() {
    let model = common::fixture("scripted-thinker.gguf");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_smoldesk"))
        .args(["generate", "--think", "--think-budget", "40", "--seed", "5"])
        .args([
            "--max-tokens",
            "800",
            "--context",
            "2048",
            "--json",
            "--prompt",
            "Hi",
        ])
        .arg("--model")
        .arg(&model)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    let json: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let stats = &json["stats"];
    assert_eq!(stats["thinking_budget_reached"], true);
    assert_eq!(stats["thinking_tokens"], 40);
    let tokens: Vec<u64> = json["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    let engine = load("scripted-thinker.gguf", 256);
    let (_, close) = engine.tokenizer().think_ids().unwrap();
    let newline = engine.tokenizer().encode("\n", false).unwrap();
    assert_eq!(tokens[39], u64::from(close));
    assert_eq!(tokens[40], u64::from(newline[0]));
    let answer = json["answer"].as_str().unwrap();
    assert!(
        !answer.is_empty() && !answer.starts_with('\n'),
        "{answer:?}"
    );
}

#[test]
fn each_reply_draws_a_fresh_seed_unless_the_chat_fixes_one() {
    let mut engine = load("tiny-smollm3-q4_k_m.gguf", 1024);
    let sampling = SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        max_tokens: 24,
        seed: 7,
        ..SamplingParams::default()
    };
    let messages = [user("Tell me a story")];
    let free = ChatSettings {
        thinking: false,
        ..settings(sampling.clone())
    };
    let a = reply(&mut engine, &messages, &free);
    let b = reply(&mut engine, &messages, &free);
    assert_ne!(a.stats.seed, b.stats.seed);

    // The seed a reply reports reproduces it.
    let again = ChatSettings {
        fixed_seed: true,
        sampling: SamplingParams {
            seed: a.stats.seed,
            ..sampling.clone()
        },
        ..free.clone()
    };
    let c = reply(&mut engine, &messages, &again);
    assert_eq!(c.stats.seed, a.stats.seed);
    assert_eq!(c.tokens, a.tokens);
    let fixed = ChatSettings {
        fixed_seed: true,
        ..free
    };
    assert_eq!(reply(&mut engine, &messages, &fixed).stats.seed, 7);
}

/// Turns past the first overflow: each computes only its new tokens, except when a block of
/// old turns is dropped (then the whole, shorter prompt is computed once).
#[test]
fn after_the_context_overflows_turns_reuse_the_cache_between_block_drops() {
    let context = 1024;
    let mut engine = load("tiny-smollm3-q4_k_m.gguf", context);
    let chat = ChatSettings {
        thinking: false,
        ..settings(SamplingParams {
            max_tokens: 12,
            ..SamplingParams::greedy()
        })
    };
    let mut messages = Vec::new();
    let mut previous_dropped = 0;
    let mut turns_after_overflow = 0;
    let mut drops = 0;
    let mut reused_turns = 0;
    for turn in 0..80 {
        messages.push(user(&format!(
            "Question number {turn}: what is the weather like on planet {turn}?"
        )));
        let reply = reply(&mut engine, &messages, &chat);
        let stats = &reply.stats;
        assert!(
            stats.prompt_tokens + stats.generated_tokens <= context,
            "turn {turn}"
        );
        if stats.dropped_messages > 0 {
            turns_after_overflow += 1;
        }
        if stats.dropped_messages != previous_dropped {
            drops += 1;
            // At least a quarter of the context is free after a drop.
            assert!(
                stats.prompt_tokens + context / 4 <= context - chat.sampling.max_tokens,
                "turn {turn}: prompt of {} tokens after a drop",
                stats.prompt_tokens
            );
        } else if turn > 0 {
            // Only the previous reply (as re-rendered) and the new question are computed.
            assert!(
                stats.prefilled_tokens < 64,
                "turn {turn}: computed {} of {} prompt tokens",
                stats.prefilled_tokens,
                stats.prompt_tokens
            );
            if stats.dropped_messages > 0 {
                reused_turns += 1;
            }
        }
        previous_dropped = stats.dropped_messages;
        messages.push(Message::new(Role::Assistant, reply.answer.clone()));
        if turns_after_overflow >= 10 {
            break;
        }
    }
    assert!(turns_after_overflow >= 10, "the context never overflowed");
    assert!(drops <= 3, "{drops} drops in 10 turns");
    assert!(
        reused_turns >= 7,
        "only {reused_turns} turns reused the cache"
    );
}
