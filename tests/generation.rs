//! The generation loop on real model files: the thinking budget (scripted thinker), fresh and
//! fixed seeds, and dropping old turns in blocks so later turns reuse the KV cache.

mod common;

use smoldesk::chat::conversation::{ChatSettings, Message, Role, StopReason};
use smoldesk::chat::generate::{GenerationContext, GenerationEvent, Reply, generate_reply};
use smoldesk::chat::template::PromptFormatter;
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
    let formatter = PromptFormatter::new(engine.info().chat_template.as_deref(), None);
    let not_cancelled = || false;
    let ctx = GenerationContext {
        formatter: &formatter,
        date: chrono::NaiveDate::from_ymd_opt(2026, 1, 1).unwrap(),
        cancelled: &not_cancelled,
    };
    generate_reply(
        engine,
        &ctx,
        messages,
        settings,
        &mut |_: GenerationEvent| {},
    )
    .expect("a reply")
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

#[test]
fn a_thinking_budget_of_256_ends_the_thought_and_an_answer_follows() {
    let mut engine = load("scripted-thinker.gguf", 2048);
    for temperature in [0.0, 0.8] {
        let mut chat = settings(SamplingParams {
            temperature,
            max_tokens: 600,
            ..SamplingParams::default()
        });
        chat.thinking_budget = Some(256);
        let reply = reply(&mut engine, &[user("Hello")], &chat);
        assert!(reply.stats.thinking_budget_reached, "t={temperature}");
        assert_eq!(reply.stats.thinking_tokens, 256, "t={temperature}");
        let tokenizer = engine.tokenizer();
        let (open, close) = tokenizer.think_ids().expect("SmolLM3 thinking tokens");
        let close_at = reply.tokens.iter().position(|&t| t == close).unwrap();
        assert_eq!(close_at, 255, "the end tag is the 256th thinking token");
        assert!(
            !reply.tokens[close_at..].contains(&open),
            "no second thought"
        );
        assert!(
            reply.answer.split_whitespace().count() >= 5,
            "t={temperature}: answer {:?}",
            reply.answer
        );
        assert_eq!(
            reply.stats.stop_reason,
            StopReason::EndOfTurn,
            "t={temperature}"
        );
        assert!(!reply.thinking.contains("</think>"));
    }
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
