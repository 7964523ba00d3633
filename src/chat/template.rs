//! Chat templates: rendering the GGUF's own Jinja template the way Hugging Face does.
