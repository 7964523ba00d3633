//! Fitting a conversation into the context window by dropping the oldest turns.
