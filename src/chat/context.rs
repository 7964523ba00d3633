//! Fitting a conversation into the context window by dropping the oldest turns.
//!
//! The system prompt is not part of the message list (the caller renders it with every
//! candidate), and the newest message is never dropped. Messages are dropped from the start, a
//! user message together with the assistant reply after it, so the kept part starts with a user
//! message whenever that fits; only when nothing else fits is the newest message kept alone.
//!
//! [`fit_in_blocks`] drops old turns a block at a time, so that the start of the prompt (and
//! with it the KV cache) stays the same for many turns instead of changing with every turn.

use super::conversation::{Message, Role};

/// A conversation cut to fit the context.
#[derive(Debug, Clone, PartialEq)]
pub struct Fitted {
    /// The messages that are kept, oldest first.
    pub messages: Vec<Message>,
    /// How many messages were dropped from the start.
    pub dropped: usize,
    /// Tokens of the prompt rendered from the kept messages, as the counter reported them.
    pub prompt_tokens: usize,
}

/// Why a conversation cannot be fitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    /// Even the newest message alone (with the system prompt) is over the budget.
    #[error("the message needs {tokens} tokens but the context has room for only {budget}")]
    TooLong {
        /// Tokens of the smallest prompt that could be built.
        tokens: usize,
        /// The budget it had to fit.
        budget: usize,
    },
}

/// Drops the oldest messages until the prompt fits `budget_tokens`, calling `count_tokens`
/// (which renders and tokenizes a candidate list) O(log n) times.
///
/// Assumes that dropping messages never makes the prompt longer.
pub fn fit_to_context(
    messages: &[Message],
    budget_tokens: usize,
    count_tokens: &mut dyn FnMut(&[Message]) -> usize,
) -> Result<Fitted, ContextError> {
    let fits = |tokens: usize| tokens <= budget_tokens;
    let too_long = |tokens: usize| ContextError::TooLong {
        tokens,
        budget: budget_tokens,
    };
    let all_tokens = count_tokens(messages);
    if fits(all_tokens) {
        return Ok(kept_from(messages, 0, all_tokens));
    }
    let cuts = drop_points(messages);
    let Some((&newest_only, _)) = cuts.split_last().filter(|(_, rest)| !rest.is_empty()) else {
        return Err(too_long(all_tokens));
    };
    let newest_only_tokens = count_tokens(&messages[newest_only..]);
    if !fits(newest_only_tokens) {
        return Err(too_long(newest_only_tokens));
    }
    // cuts[too_many] does not fit, cuts[enough] does; find the first that fits in between.
    let mut too_many = 0;
    let mut enough = cuts.len() - 1;
    let mut enough_tokens = newest_only_tokens;
    while enough - too_many > 1 {
        let middle = too_many + (enough - too_many) / 2;
        let tokens = count_tokens(&messages[cuts[middle]..]);
        if fits(tokens) {
            enough = middle;
            enough_tokens = tokens;
        } else {
            too_many = middle;
        }
    }
    Ok(kept_from(messages, cuts[enough], enough_tokens))
}

/// Like [`fit_to_context`], but once old turns must go, drops them in blocks of at least
/// `block_tokens`, so the kept part starts at the same message turn after turn and the prompt's
/// cached prefix stays valid until the next block goes.
///
/// The cut depends only on how many tokens the oldest messages take (blocks are counted from
/// the start of the conversation), not on what came after them: appending turns leaves it in
/// place until the conversation has grown by about a block. Each time it moves, at least
/// `block_tokens` of the budget are free after the cut.
pub fn fit_in_blocks(
    messages: &[Message],
    budget_tokens: usize,
    block_tokens: usize,
    count_tokens: &mut dyn FnMut(&[Message]) -> usize,
) -> Result<Fitted, ContextError> {
    let needed = fit_to_context(messages, budget_tokens, count_tokens)?;
    if needed.dropped == 0 {
        return Ok(needed);
    }
    let block = block_tokens.max(1);
    let all_tokens = count_tokens(messages);
    // Tokens the dropped messages take; the cut goes to the block boundary after the next one.
    let dropped_tokens = all_tokens.saturating_sub(needed.prompt_tokens);
    let cut_at = (dropped_tokens.div_ceil(block) + 1) * block;
    match fit_to_context(messages, all_tokens.saturating_sub(cut_at), count_tokens) {
        Ok(fitted) if fitted.dropped >= needed.dropped => Ok(fitted),
        // The block boundary lies past the end (the dropped part is one huge message): the
        // minimal drop, if it already frees a block (it stays put until the rest outgrows it).
        _ if budget_tokens.saturating_sub(needed.prompt_tokens) >= block => Ok(needed),
        // Not even the newest message fits so small a part: keep it alone.
        _ => {
            let newest = drop_points(messages).last().copied().unwrap_or(0);
            let tokens = count_tokens(&messages[newest..]);
            Ok(kept_from(messages, newest.max(needed.dropped), tokens))
        }
    }
}

/// The numbers of messages that may be dropped, ascending: none, every count that leaves a
/// non-assistant message first, and all but the newest.
fn drop_points(messages: &[Message]) -> Vec<usize> {
    let Some(newest) = messages.len().checked_sub(1) else {
        return vec![0];
    };
    let mut points: Vec<usize> = messages[..newest]
        .iter()
        .enumerate()
        .filter(|(first_kept, message)| *first_kept == 0 || message.role != Role::Assistant)
        .map(|(first_kept, _)| first_kept)
        .collect();
    points.push(newest);
    points
}

fn kept_from(messages: &[Message], dropped: usize, prompt_tokens: usize) -> Fitted {
    Fitted {
        messages: messages[dropped..].to_vec(),
        dropped,
        prompt_tokens,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SYSTEM_TOKENS: usize = 10;
    const PER_MESSAGE_TOKENS: usize = 4;

    /// A fake renderer: a fixed system prompt, a few tokens per message, one per character.
    struct FakeCounter {
        calls: usize,
    }

    impl FakeCounter {
        fn new() -> Self {
            Self { calls: 0 }
        }

        fn count(&mut self, messages: &[Message]) -> usize {
            self.calls += 1;
            SYSTEM_TOKENS
                + messages
                    .iter()
                    .map(|m| PER_MESSAGE_TOKENS + m.content.len())
                    .sum::<usize>()
        }
    }

    fn fit(messages: &[Message], budget: usize) -> (Result<Fitted, ContextError>, usize) {
        let mut counter = FakeCounter::new();
        let result = fit_to_context(messages, budget, &mut |m| counter.count(m));
        (result, counter.calls)
    }

    fn user(text: &str) -> Message {
        Message::new(Role::User, text)
    }

    fn assistant(text: &str) -> Message {
        Message::new(Role::Assistant, text)
    }

    /// `pairs` user/assistant pairs of 10-character messages, then a final user message.
    fn conversation(pairs: usize) -> Vec<Message> {
        let mut messages = Vec::new();
        for i in 0..pairs {
            messages.push(user(&format!("question{i:02}")));
            messages.push(assistant(&format!("answer{i:04}")));
        }
        messages.push(user("final"));
        messages
    }

    fn cost(messages: &[Message]) -> usize {
        FakeCounter::new().count(messages)
    }

    #[test]
    fn a_conversation_that_fits_is_kept_whole_with_one_count() {
        let messages = conversation(3);
        let (result, calls) = fit(&messages, 1000);
        let fitted = result.unwrap();
        assert_eq!(fitted.messages, messages);
        assert_eq!(fitted.dropped, 0);
        assert_eq!(fitted.prompt_tokens, cost(&messages));
        assert_eq!(calls, 1);
    }

    #[test]
    fn oldest_pairs_are_dropped_first() {
        let messages = conversation(5);
        // Room for the final message and exactly two pairs.
        let budget = cost(&messages[6..]);
        let fitted = fit(&messages, budget).0.unwrap();
        assert_eq!(fitted.dropped, 6);
        assert_eq!(fitted.messages, messages[6..].to_vec());
        assert_eq!(fitted.prompt_tokens, budget);
        assert_eq!(fitted.messages[0].role, Role::User);
    }

    #[test]
    fn a_user_message_goes_with_its_reply() {
        let messages = conversation(5);
        // Room for the assistant reply of the third pair too, but not without its question.
        let budget = cost(&messages[5..]);
        let fitted = fit(&messages, budget).0.unwrap();
        assert_eq!(fitted.dropped, 6);
        assert_eq!(fitted.messages[0], user("question03"));
        assert_eq!(fitted.prompt_tokens, cost(&messages[6..]));
    }

    #[test]
    fn the_newest_message_alone_when_nothing_else_fits() {
        let messages = conversation(4);
        let newest = messages.len() - 1;
        let budget = cost(&messages[newest..]);
        let fitted = fit(&messages, budget).0.unwrap();
        assert_eq!(fitted.dropped, newest);
        assert_eq!(fitted.messages, vec![user("final")]);
    }

    #[test]
    fn a_newest_assistant_message_is_kept_alone_if_need_be() {
        let messages = vec![user("a long question here"), assistant("ok")];
        let budget = cost(&messages[1..]);
        let fitted = fit(&messages, budget).0.unwrap();
        assert_eq!(fitted.dropped, 1);
        assert_eq!(fitted.messages, vec![assistant("ok")]);
    }

    #[test]
    fn too_long_when_the_newest_message_alone_does_not_fit() {
        let messages = conversation(3);
        let newest_cost = cost(&messages[messages.len() - 1..]);
        let (result, _) = fit(&messages, newest_cost - 1);
        assert_eq!(
            result,
            Err(ContextError::TooLong {
                tokens: newest_cost,
                budget: newest_cost - 1
            })
        );
        let single = [user("hello")];
        let (result, calls) = fit(&single, 3);
        assert_eq!(
            result,
            Err(ContextError::TooLong {
                tokens: cost(&single),
                budget: 3
            })
        );
        assert_eq!(calls, 1);
    }

    #[test]
    fn an_empty_conversation_fits_or_the_system_prompt_is_too_long() {
        let fitted = fit(&[], 100).0.unwrap();
        assert_eq!((fitted.dropped, fitted.prompt_tokens), (0, SYSTEM_TOKENS));
        assert!(fit(&[], SYSTEM_TOKENS - 1).0.is_err());
    }

    #[test]
    fn counts_tokens_a_logarithmic_number_of_times() {
        let messages = conversation(500);
        let budget = cost(&messages[700..]);
        let (result, calls) = fit(&messages, budget);
        assert_eq!(result.unwrap().dropped, 700);
        // 501 drop points: the whole list, the newest alone, then a binary search over the rest.
        assert!(calls <= 2 + 9, "{calls} calls");
    }

    /// The first drop point (in the order `drop_points` lists them) whose rest fits.
    fn linear_fit(messages: &[Message], budget: usize) -> Option<usize> {
        drop_points(messages)
            .into_iter()
            .find(|&dropped| cost(&messages[dropped..]) <= budget)
    }

    #[test]
    fn binary_search_agrees_with_a_linear_scan() {
        let lengths = [3usize, 40, 7, 1, 25, 12, 0, 9, 31, 5, 18, 2, 14];
        for size in 1..lengths.len() {
            let messages: Vec<Message> = (0..size)
                .map(|i| {
                    let role = if i % 3 == 2 {
                        Role::Assistant
                    } else if i % 2 == 0 {
                        Role::User
                    } else {
                        Role::Assistant
                    };
                    Message::new(role, "x".repeat(lengths[i]))
                })
                .collect();
            for budget in 0..cost(&messages) + 2 {
                let result = fit(&messages, budget).0;
                match linear_fit(&messages, budget) {
                    Some(dropped) => {
                        let fitted = result.unwrap();
                        assert_eq!(fitted.dropped, dropped, "size {size} budget {budget}");
                        assert_eq!(fitted.prompt_tokens, cost(&messages[dropped..]));
                    }
                    None => assert!(result.is_err(), "size {size} budget {budget}"),
                }
            }
        }
    }

    fn fit_blocks(messages: &[Message], budget: usize, block: usize) -> Fitted {
        let mut counter = FakeCounter::new();
        fit_in_blocks(messages, budget, block, &mut |m| counter.count(m)).unwrap()
    }

    #[test]
    fn blocks_keep_the_whole_conversation_while_it_fits() {
        let messages = conversation(3);
        let fitted = fit_blocks(&messages, cost(&messages), 40);
        assert_eq!(fitted.dropped, 0);
        assert_eq!(fitted.messages, messages);
    }

    /// A conversation growing by one turn at a time: the first kept message moves only
    /// now and then, each move frees at least a block, and the prompt always fits.
    #[test]
    fn blocks_move_the_cut_rarely_and_free_a_block_each_time() {
        let budget = 300;
        let block = 75;
        let mut messages = vec![user("question00")];
        let mut cuts = Vec::new();
        for turn in 1..80 {
            let fitted = fit_blocks(&messages, budget, block);
            assert!(fitted.prompt_tokens <= budget, "turn {turn}");
            assert_eq!(fitted.messages[0].role, Role::User, "turn {turn}");
            if cuts.last() != Some(&fitted.dropped) {
                if fitted.dropped > 0 {
                    assert!(
                        budget - fitted.prompt_tokens >= block,
                        "turn {turn}: only {} tokens free after a drop",
                        budget - fitted.prompt_tokens
                    );
                }
                cuts.push(fitted.dropped);
            }
            messages.push(assistant(&format!("answer{turn:04}")));
            messages.push(user(&format!("question{turn:02}")));
        }
        // Each turn adds 28 tokens: a 75-token block lasts under three turns; the cut
        // moves by at least a block and then stays for a few turns.
        let drops = cuts.len() - 1;
        assert!(drops >= 5, "the conversation outgrew the context: {cuts:?}");
        assert!(drops <= 80 * 28 / block, "{drops} drops: {cuts:?}");
        assert!(cuts.windows(2).all(|w| w[0] < w[1]), "{cuts:?}");
    }

    /// A pasted text far larger than a block, then short turns: the paste goes, the turns
    /// after it stay, and the cut holds while the conversation grows.
    #[test]
    fn a_huge_first_message_is_dropped_without_the_turns_after_it() {
        let budget = 1900;
        let block = 512;
        let mut messages = vec![
            user(&"p".repeat(1750)),
            assistant(&"a".repeat(150)),
            user(&"q".repeat(30)),
            assistant(&"b".repeat(90)),
            user(&"r".repeat(30)),
        ];
        let mut cuts = Vec::new();
        for turn in 0..4 {
            let fitted = fit_blocks(&messages, budget, block);
            assert!(fitted.prompt_tokens + block <= budget, "turn {turn}");
            assert_eq!(fitted.messages[0].role, Role::User, "turn {turn}");
            assert!(
                fitted.messages.len() > 1,
                "turn {turn}: only the newest kept"
            );
            cuts.push(fitted.dropped);
            messages.push(assistant(&"c".repeat(60)));
            messages.push(user(&"s".repeat(20)));
        }
        assert_eq!(cuts, vec![2; 4]);
    }

    #[test]
    fn blocks_agree_with_the_minimal_fit_on_what_is_too_long() {
        let messages = conversation(3);
        let newest_cost = cost(&messages[messages.len() - 1..]);
        let mut counter = FakeCounter::new();
        let result = fit_in_blocks(&messages, newest_cost - 1, 50, &mut |m| counter.count(m));
        assert!(result.is_err());
        // A block larger than the whole conversation keeps only the newest message.
        let fitted = fit_blocks(&messages, cost(&messages) - 1, 10_000);
        assert_eq!(fitted.messages, vec![user("final")]);
    }

    #[test]
    fn drop_points_skip_assistant_replies() {
        let messages = vec![
            user("a"),
            assistant("b"),
            user("c"),
            assistant("d"),
            assistant("e"),
            user("f"),
            assistant("g"),
        ];
        assert_eq!(drop_points(&messages), vec![0, 2, 5, 6]);
        assert_eq!(drop_points(&[]), vec![0]);
        assert_eq!(drop_points(&[user("only")]), vec![0]);
    }
}
