//! Renders the app in states a real model cannot be asked for on demand here (a thinking
//! reply streaming, shown and hidden; light and dark) to PNG files for a person to look at.
//! Run by `scripts/screenshot.sh`; ignored in the normal test run (it needs a GPU or lavapipe).

mod common;
mod ui_support;

use std::path::PathBuf;

use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use smoldesk::chat::conversation::GenerationStats;
use smoldesk::ui::App;
use smoldesk::ui::prefs::{Preferences, ThemeChoice};
use smoldesk::worker::messages::SegmentKind;
use ui_support::*;

const THINKING: &str = "The user asks why the sky is blue. Sunlight contains all colours. \
Air molecules are much smaller than the wavelength of light, so they scatter it by Rayleigh \
scattering, which goes as 1/λ⁴. Blue light (≈450 nm) is scattered about 5.5 times more than \
red (≈700 nm). Violet is scattered even more, but the sun emits less of it and our eyes are \
less sensitive to it. So: explain Rayleigh scattering simply, give the ratio, mention sunsets.";

const ANSWER: &str = "The sky looks blue because of **Rayleigh scattering**:\n\n\
1. Sunlight is a mix of all colours.\n\
2. Air molecules scatter short wavelengths much more than long ones — the effect grows as \
`1/λ⁴`, so blue is scattered about **5.5×** more than red.\n\
3. That scattered blue light reaches your eyes from every direction of the sky.\n\n\
At sunset the light crosses much more air, so most of the blue is scattered away and the \
reds and oranges remain.\n\n\
```python\nratio = (700 / 450) ** 4\nprint(f\"blue is scattered {ratio:.1f}x more than red\")\n```";

fn out_dir() -> PathBuf {
    let dir = std::env::var_os("SMOLDESK_SHOT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/smoldesk-shots"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn save(harness: &mut Harness<'_, App>, name: &str) {
    harness.run_steps(2);
    let image = harness.render().expect("rendering works");
    let path = out_dir().join(name);
    image.save(&path).unwrap();
    eprintln!("wrote {}", path.display());
}

fn rendered_app<'a>(
    fake: &Fake,
    storage: &'a MemoryStorage,
    models: &std::path::Path,
    data: &std::path::Path,
) -> Harness<'a, App> {
    Harness::builder()
        .with_size(SIZE)
        .with_max_steps(20)
        .allow_missing_glyphs()
        .wgpu()
        .build_eframe(move |cc| {
            cc.storage = Some(storage);
            App::new(cc, fake_options(fake, data, models))
        })
}

fn storage_with(theme: ThemeChoice) -> MemoryStorage {
    let mut storage = MemoryStorage::default();
    Preferences {
        theme,
        ..Preferences::default()
    }
    .store(&mut storage);
    storage
}

#[test]
#[ignore = "writes screenshots; run by scripts/screenshot.sh"]
fn render_screenshots() {
    let models = tempfile::tempdir().unwrap();
    let model = models.path().join("SmolLM3-3B-Q4_K_M.gguf");
    std::fs::copy(common::fixture("tiny-smollm3-q4_k_m.gguf"), &model).unwrap();

    for (theme, suffix) in [(ThemeChoice::Dark, "dark"), (ThemeChoice::Light, "light")] {
        let data = tempfile::tempdir().unwrap();
        let fake = Fake::default();
        let storage = storage_with(theme);
        let mut harness = rendered_app(&fake, &storage, models.path(), data.path());
        save(&mut harness, &format!("k1-welcome-{suffix}.png"));

        load_model(&mut harness, &fake, &model);
        save(&mut harness, &format!("k2-empty-chat-{suffix}.png"));

        send_message(&mut harness, "Why is the sky blue?");
        let request = fake.last_request();
        fake.started(request.id, "", 0);
        let half = THINKING.len() / 2;
        let cut = (half..THINKING.len())
            .find(|i| THINKING.is_char_boundary(*i))
            .unwrap_or(THINKING.len());
        fake.segment(request.id, SegmentKind::Thinking, &THINKING[..cut]);
        harness.run_steps(3);
        save(&mut harness, &format!("k3-thinking-shown-{suffix}.png"));
        harness.get_by_label("Show thinking").click();
        harness.run_steps(2);
        save(&mut harness, &format!("k4-thinking-hidden-{suffix}.png"));
        harness.get_by_label("Show thinking").click();
        fake.segment(request.id, SegmentKind::Thinking, &THINKING[cut..]);
        fake.segment(request.id, SegmentKind::Answer, ANSWER);
        fake.finished(
            request.id,
            GenerationStats {
                prompt_tokens: 57,
                prefilled_tokens: 57,
                generated_tokens: 212,
                thinking_tokens: 118,
                thinking_secs: 12.4,
                time_to_first_token_secs: 0.8,
                prefill_tok_per_sec: 71.0,
                decode_tok_per_sec: 9.3,
                ..GenerationStats::default()
            },
        );
        harness.run_steps(4);
        save(&mut harness, &format!("k5-reply-{suffix}.png"));
        harness.get_by_label("⚙ Settings").click();
        harness.run_steps(3);
        save(&mut harness, &format!("k6-settings-{suffix}.png"));
    }
}
