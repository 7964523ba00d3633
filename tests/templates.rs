//! Chat templates rendered like Hugging Face transformers: the fixture renders (library and
//! `smoldesk prompt`), fallback to ChatML, `{% generation %}` tags, `raise_exception`, thinking.

mod common;

use std::path::PathBuf;
use std::process::Command;

use chrono::NaiveDate;
use serde_json::Value as Json;
use smoldesk::chat::conversation::{Message, Role};
use smoldesk::chat::template::{ChatTemplate, PromptFormatter, RenderOptions, TemplateError};
use smoldesk::engine::gguf::GgufFile;

const THINK_OFF_ENDING: &str = "<|im_start|>assistant\n<think>\n\n</think>\n";
const THINK_ON_ENDING: &str = "<|im_start|>assistant\n";

/// One case of `templates/renders.json`.
struct RenderCase {
    template: String,
    name: String,
    messages: Vec<Json>,
    kwargs: serde_json::Map<String, Json>,
    add_generation_prompt: bool,
    expected: String,
}

impl RenderCase {
    fn label(&self) -> String {
        format!("{} / {}", self.template, self.name)
    }

    fn template_path(&self) -> PathBuf {
        common::fixture("templates").join(&self.template)
    }

    /// The render options the case's kwargs describe.
    fn options(&self) -> RenderOptions {
        let mut extra = self.kwargs.clone();
        let enable_thinking = extra.remove("enable_thinking").and_then(|v| v.as_bool());
        RenderOptions {
            add_generation_prompt: self.add_generation_prompt,
            enable_thinking,
            date: fixture_date(),
            bos_token: String::new(),
            eos_token: "<|im_end|>".to_string(),
            extra,
        }
    }
}

fn fixture_date() -> NaiveDate {
    let text = common::read_json("templates/renders.json")["date"]
        .as_str()
        .map(str::to_string)
        .expect("renders.json has a date");
    NaiveDate::parse_from_str(&text, "%d %B %Y").expect("the fixture date parses")
}

fn render_cases() -> Vec<RenderCase> {
    let json = common::read_json("templates/renders.json");
    let renders = json["renders"].as_array().expect("renders is an array");
    renders
        .iter()
        .map(|r| RenderCase {
            template: r["template"].as_str().expect("template").to_string(),
            name: r["case"].as_str().expect("case").to_string(),
            messages: r["messages"].as_array().expect("messages").clone(),
            kwargs: r["kwargs"].as_object().cloned().unwrap_or_default(),
            add_generation_prompt: r["add_generation_prompt"].as_bool().unwrap_or(true),
            expected: r["expected"].as_str().expect("expected").to_string(),
        })
        .collect()
}

fn official_template_source() -> String {
    std::fs::read_to_string(common::fixture("templates/smollm3-official.jinja"))
        .expect("official template fixture")
}

fn tiny_smollm3_template_source() -> String {
    let gguf = GgufFile::open(common::fixture("tiny-smollm3-f32.gguf")).expect("tiny SmolLM3");
    gguf.get_str("tokenizer.chat_template")
        .expect("the tiny SmolLM3 embeds a template")
        .to_string()
}

fn options_with_date() -> RenderOptions {
    RenderOptions {
        date: NaiveDate::from_ymd_opt(2026, 11, 26).expect("valid date"),
        ..RenderOptions::default()
    }
}

fn user(text: &str) -> Message {
    Message::new(Role::User, text)
}

#[test]
fn all_fixture_renders_are_byte_identical() {
    let cases = render_cases();
    assert_eq!(cases.len(), 27);
    let mut failures = Vec::new();
    for case in &cases {
        let template = ChatTemplate::from_file(&case.template_path()).expect("fixture compiles");
        match template.render_json(&case.messages, &case.options()) {
            Ok(text) if text == case.expected => {}
            Ok(text) => failures.push(format!(
                "{}:\n  expected {:?}\n  got      {:?}",
                case.label(),
                case.expected,
                text
            )),
            Err(err) => failures.push(format!("{}: {err}", case.label())),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn prompt_command_prints_the_fixture_renders() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut failures = Vec::new();
    for (idx, case) in render_cases().iter().enumerate() {
        let messages_path = dir.path().join(format!("messages-{idx}.json"));
        let messages = serde_json::to_string(&case.messages).expect("messages serialize");
        std::fs::write(&messages_path, messages).expect("write messages");
        let mut command = Command::new(env!("CARGO_BIN_EXE_smoldesk"));
        command
            .arg("prompt")
            .arg("--template")
            .arg(case.template_path())
            .arg("--messages")
            .arg(&messages_path)
            .args(["--date", "26 November 2026"]);
        match case.kwargs.get("enable_thinking").and_then(Json::as_bool) {
            Some(true) => command.arg("--think"),
            Some(false) => command.arg("--no-think"),
            None => &mut command,
        };
        let output = command.output().expect("run smoldesk prompt");
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() || stdout != case.expected {
            failures.push(format!(
                "{}: status {}, stderr {:?}\n  expected {:?}\n  got      {:?}",
                case.label(),
                output.status,
                String::from_utf8_lossy(&output.stderr),
                case.expected,
                stdout
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn prompt_command_reads_the_model_template_and_object_files() {
    let dir = tempfile::tempdir().expect("temp dir");
    let messages_path = dir.path().join("conversation.json");
    let case = render_cases()
        .into_iter()
        .find(|c| c.template == "smollm3-official.jinja" && c.name == "multi-turn-no-think")
        .expect("fixture case");
    let file = serde_json::json!({ "messages": case.messages });
    std::fs::write(&messages_path, file.to_string()).expect("write messages");
    let output = Command::new(env!("CARGO_BIN_EXE_smoldesk"))
        .arg("prompt")
        .arg("-m")
        .arg(common::fixture("tiny-smollm3-f32.gguf"))
        .arg("--messages")
        .arg(&messages_path)
        .args(["--date", "2026-11-26", "--no-think"])
        .output()
        .expect("run smoldesk prompt");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The tiny model embeds the official template, so the fixture's expected render applies.
    assert_eq!(tiny_smollm3_template_source(), official_template_source());
    assert_eq!(String::from_utf8_lossy(&output.stdout), case.expected);
}

#[test]
fn prompt_command_without_generation_prompt_ends_after_the_last_message() {
    let dir = tempfile::tempdir().expect("temp dir");
    let messages_path = dir.path().join("messages.json");
    std::fs::write(&messages_path, r#"[{"role": "user", "content": "Hi"}]"#).expect("write");
    let output = Command::new(env!("CARGO_BIN_EXE_smoldesk"))
        .arg("prompt")
        .arg("--template")
        .arg(common::fixture("templates/smollm2.jinja"))
        .arg("--messages")
        .arg(&messages_path)
        .arg("--no-generation-prompt")
        .output()
        .expect("run smoldesk prompt");
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    );
}

#[test]
fn prompt_command_reports_a_broken_template_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let template = dir.path().join("broken.jinja");
    std::fs::write(&template, "{% for m in messages %}{{ m.content }}").expect("write");
    let messages_path = dir.path().join("messages.json");
    std::fs::write(&messages_path, r#"[{"role": "user", "content": "Hi"}]"#).expect("write");
    let output = Command::new(env!("CARGO_BIN_EXE_smoldesk"))
        .arg("prompt")
        .arg("--template")
        .arg(&template)
        .arg("--messages")
        .arg(&messages_path)
        .output()
        .expect("run smoldesk prompt");
    assert!(!output.status.success());
    assert!(output.stdout.is_empty());
    assert!(String::from_utf8_lossy(&output.stderr).contains("syntax error"));
}

#[test]
fn prompt_command_refuses_template_paths_that_are_not_small_regular_files() {
    let dir = tempfile::tempdir().expect("temp dir");
    let messages_path = dir.path().join("messages.json");
    std::fs::write(&messages_path, r#"[{"role": "user", "content": "Hi"}]"#).expect("write");
    let big = dir.path().join("big.jinja");
    std::fs::write(&big, "x".repeat(2 << 20)).expect("write");
    let model = common::fixture("tiny-smollm3-q4_k_m.gguf");
    let cases = [
        (dir.path().to_path_buf(), "not a regular file"),
        (PathBuf::from("/dev/zero"), "not a regular file"),
        (big, "more than the 1048576 allowed"),
    ];
    for (template, expected) in cases {
        if !template.exists() {
            continue;
        }
        // Without a model (the file is rendered) and with one (the app's builder uses it).
        for with_model in [false, true] {
            let mut command = Command::new(env!("CARGO_BIN_EXE_smoldesk"));
            command
                .arg("prompt")
                .arg("--template")
                .arg(&template)
                .arg("--messages")
                .arg(&messages_path);
            if with_model {
                command.arg("-m").arg(&model);
            }
            let output = command.output().expect("run smoldesk prompt");
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(!output.status.success(), "{}", template.display());
            assert!(output.stdout.is_empty());
            assert!(
                stderr.contains(expected),
                "{}: {stderr}",
                template.display()
            );
            assert!(!stderr.contains("panicked"), "{stderr}");
        }
    }
}

#[test]
fn a_template_that_does_not_parse_falls_back_to_chatml() {
    let formatter = PromptFormatter::new(Some("{% if messages %}unterminated"), None);
    let reason = formatter.fallback_reason().expect("a fallback reason");
    assert!(reason.contains("syntax error"), "{reason}");
    let prompt = formatter.render("Be brief.", &[user("Hi")], &options_with_date());
    assert_eq!(
        prompt.text,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(prompt.fallback.as_deref(), Some(reason));
}

#[test]
fn a_template_that_fails_to_render_falls_back_to_chatml() {
    let source = "{{ messages[0].content.nothing.deeper }}";
    let formatter = PromptFormatter::new(Some(source), None);
    assert!(formatter.fallback_reason().is_none());
    let prompt = formatter.render("", &[user("Hi")], &options_with_date());
    assert_eq!(
        prompt.text,
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert!(prompt.fallback.is_some());
}

#[test]
fn a_model_without_template_gets_chatml_without_a_fallback_reason() {
    let formatter = PromptFormatter::new(None, None);
    assert!(formatter.fallback_reason().is_none());
    let prompt = formatter.render("", &[user("Hi")], &options_with_date());
    assert_eq!(
        prompt.text,
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(prompt.fallback, None);
}

#[test]
fn the_override_file_wins_over_the_embedded_template() {
    let smollm2 = std::fs::read_to_string(common::fixture("templates/smollm2.jinja"))
        .expect("smollm2 template");
    let official = official_template_source();
    let formatter = PromptFormatter::new(Some(&official), Some(&smollm2));
    assert_eq!(formatter.template().source(), smollm2);
    assert!(formatter.fallback_reason().is_none());

    let broken_override = PromptFormatter::new(Some(&official), Some("{{ unclosed"));
    assert_eq!(broken_override.template().source(), official);
    let reason = broken_override.fallback_reason().expect("reason");
    assert!(reason.contains("template file"), "{reason}");
}

#[test]
fn assistant_thinking_is_not_sent_back_to_the_model() {
    let template = ChatTemplate::chatml();
    let mut answer = Message::new(Role::Assistant, "Four.");
    answer.thinking = Some("2 + 2 = 4".to_string());
    let text = template
        .render(&[user("2 + 2?"), answer], &options_with_date())
        .expect("ChatML renders");
    assert_eq!(
        text,
        "<|im_start|>user\n2 + 2?<|im_end|>\n<|im_start|>assistant\nFour.<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn generation_tags_render_their_body_like_hugging_face() {
    // Expected outputs computed with jinja2 and transformers' AssistantTracker extension.
    let messages = [
        serde_json::json!({"role": "user", "content": "Hi"}),
        serde_json::json!({"role": "assistant", "content": "Hello"}),
    ];
    let opts = options_with_date();
    let plain = "{% for m in messages %}\n  {% if m.role == 'assistant' %}\n    {% generation %}\n    [{{ m.content }}]\n    {% endgeneration %}\n  {% else %}\n<{{ m.content }}>\n  {% endif %}\n{% endfor %}";
    let rendered = ChatTemplate::new(plain)
        .expect("compiles")
        .render_json(&messages, &opts)
        .expect("renders");
    assert_eq!(rendered, "<Hi>\n    [Hello]\n");

    let controlled = "{%- for m in messages -%}\n{%- if m.role == 'assistant' -%}\nA: {%- generation -%}   {{ m.content }}   {%- endgeneration -%} .\n{%+ generation +%}\n  x {{ m.content }}\n{%+endgeneration%}\n{%- else -%}\nU: {{ m.content }}\n{% endif -%}\n{%- endfor -%}";
    let rendered = ChatTemplate::new(controlled)
        .expect("compiles")
        .render_json(&messages, &opts)
        .expect("renders");
    assert_eq!(rendered, "U: Hi\nA:Hello.\n\n  x Hello\n");
}

#[test]
fn raise_exception_fails_the_render_with_its_message() {
    let source = "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{{ m.content }}{% endfor %}";
    let template = ChatTemplate::new(source).expect("compiles");
    let ok = template.render_json(
        &[serde_json::json!({"role": "user", "content": "Hi"})],
        &options_with_date(),
    );
    assert_eq!(ok.ok().as_deref(), Some("Hi"));
    let err = template
        .render_json(
            &[serde_json::json!({"role": "tool", "content": "42"})],
            &options_with_date(),
        )
        .expect_err("the template raises");
    match err {
        TemplateError::Raised(message) => {
            assert_eq!(message, "Only user and assistant roles are supported!")
        }
        other => panic!("expected a raised error, got {other:?}"),
    }
}

/// The prompt endings of SmolLM3's thinking modes, for a template source.
fn check_thinking_endings(source: &str) {
    let formatter = PromptFormatter::new(Some(source), None);
    assert!(formatter.fallback_reason().is_none());
    let conversation = [user("What is 17*23?")];
    let render = |system: &str, enable_thinking: Option<bool>| {
        let opts = RenderOptions {
            enable_thinking,
            ..options_with_date()
        };
        let prompt = formatter.render(system, &conversation, &opts);
        assert_eq!(prompt.fallback, None);
        prompt.text
    };

    let default = render("", None);
    assert!(default.ends_with(THINK_ON_ENDING) && !default.ends_with(THINK_OFF_ENDING));
    assert!(default.contains("Reasoning Mode: /think\n"));
    assert!(default.contains("Today Date: 26 November 2026\n"));

    let on = render("", Some(true));
    assert_eq!(on, default);

    let off = render("", Some(false));
    assert!(off.ends_with(THINK_OFF_ENDING), "{off:?}");
    assert!(off.contains("Reasoning Mode: /no_think\n"));

    let system_off = render("Be terse. /no_think", Some(true));
    assert!(system_off.ends_with(THINK_OFF_ENDING), "{system_off:?}");
    assert!(system_off.contains("Be terse.\n\n"));
    assert!(!system_off.contains("/no_think\n\n<|im_start|>user"));

    let system_on = render("Be terse. /think", Some(false));
    assert!(system_on.ends_with(THINK_ON_ENDING) && !system_on.ends_with(THINK_OFF_ENDING));
    assert!(system_on.contains("Reasoning Mode: /think\n"));
}

#[test]
fn thinking_endings_with_the_official_template() {
    check_thinking_endings(&official_template_source());
}

#[test]
fn thinking_endings_with_the_tiny_smollm3_embedded_template() {
    check_thinking_endings(&tiny_smollm3_template_source());
}

#[test]
fn smollm3_lists_xml_tools_given_as_kwargs() {
    // Expected tail computed with jinja2 configured like transformers.
    let tool = serde_json::json!({
        "description": "Get the weather",
        "name": "get_weather",
        "parameters": {"properties": {"city": {"type": "string"}}, "type": "object"}
    });
    let template = ChatTemplate::new(&official_template_source()).expect("compiles");
    let expected_tail = "### Tools\n\nYou may call one or more functions to assist with the user query.\nYou are provided with function signatures within <tools></tools> XML tags:\n\n<tools>\n{'description': 'Get the weather', 'name': 'get_weather', 'parameters': {'properties': {'city': {'type': 'string'}}, 'type': 'object'}}\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>\n\n<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n";
    for key in ["xml_tools", "tools"] {
        let mut opts = RenderOptions {
            enable_thinking: Some(false),
            ..options_with_date()
        };
        opts.extra
            .insert(key.to_string(), Json::Array(vec![tool.clone()]));
        let text = template
            .render(&[user("Weather in Paris?")], &opts)
            .expect("renders");
        assert!(text.ends_with(expected_tail), "{key}: {text:?}");
    }
}

#[test]
fn tojson_and_string_match_python() {
    // Expected outputs computed with jinja2 and transformers' tojson filter.
    let source = "{{ x|tojson }}|{{ x|tojson(indent=2) }}|{{ x|tojson(separators=(',', ':')) }}|{{ 'é<&>\\'' | tojson }}|{{ x|tojson(ensure_ascii=True, sort_keys=True) }}|{{ [] | tojson(indent=2) }}|{{ x|string }}";
    let mut opts = options_with_date();
    opts.extra.insert(
        "x".to_string(),
        serde_json::json!({"a": "é\n\"", "b": [1, 2.5, null, true]}),
    );
    let text = ChatTemplate::new(source)
        .expect("compiles")
        .render_json(&[], &opts)
        .expect("renders");
    let expected = [
        r#"{"a": "é\n\"", "b": [1, 2.5, null, true]}"#,
        "{\n  \"a\": \"é\\n\\\"\",\n  \"b\": [\n    1,\n    2.5,\n    null,\n    true\n  ]\n}",
        r#"{"a":"é\n\"","b":[1,2.5,null,true]}"#,
        r#""é<&>'""#,
        r#"{"a": "\u00e9\n\"", "b": [1, 2.5, null, true]}"#,
        "[]",
        r#"{'a': 'é\n"', 'b': [1, 2.5, None, True]}"#,
    ]
    .join("|");
    assert_eq!(text, expected);
}

#[test]
fn special_tokens_and_date_are_template_variables() {
    let template =
        ChatTemplate::new("{{ bos_token }}{{ strftime_now('%Y-%m-%d|%d %B %Y') }}{{ eos_token }}")
            .expect("compiles");
    let opts = RenderOptions {
        bos_token: "<s>".to_string(),
        eos_token: "</s>".to_string(),
        ..options_with_date()
    };
    assert_eq!(
        template.render(&[], &opts).expect("renders"),
        "<s>2026-11-26|26 November 2026</s>"
    );
}
