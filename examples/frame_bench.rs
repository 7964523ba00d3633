//! Frame-time benchmark of the chat view: a 1,000-message conversation (long code blocks,
//! thinking spans) drawn by the real [`App`] in a headless egui context, measuring what the UI
//! thread does per frame (egui layout and tessellation; no rasterizer) while scrolling,
//! streaming a reply and toggling Show thinking (at the bottom and scrolled up).
//!
//! Run (release mode, numbers are rough on a busy machine):
//! `cargo run --release --example frame_bench [-- MESSAGES]`

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use smoldesk::chat::conversation::{GenerationStats, Message, Role};
use smoldesk::ui::{Action, App, AppOptions, Backend};
use smoldesk::worker::messages::{Command, Event, SegmentKind};

/// Window size of the benchmark.
const SIZE: egui::Vec2 = egui::vec2(1200.0, 800.0);

/// Seconds between frames (what egui's animations see).
const FRAME_DT: f32 = 1.0 / 60.0;

/// A backend that records commands and answers nothing on its own.
#[derive(Clone, Default)]
struct Silent(Arc<Mutex<Vec<Command>>>);

impl Backend for Silent {
    fn send(&self, command: Command) {
        if let Ok(mut commands) = self.0.lock() {
            commands.push(command);
        }
    }
    fn stop_generation(&self) {}
    fn cancel_load(&self) {}
    fn try_recv(&self) -> Option<Event> {
        None
    }
}

/// The app in a headless egui context, and the frame clock.
struct Bench {
    ctx: egui::Context,
    frame: eframe::Frame,
    app: App,
    time: f64,
    backend: Silent,
}

/// How long one frame took, split into its parts.
#[derive(Clone, Copy)]
struct FrameTime {
    total: Duration,
    repaint_requested: bool,
}

impl Bench {
    fn new(data_dir: &std::path::Path) -> Self {
        let ctx = egui::Context::default();
        let backend = Silent::default();
        let cc = eframe::CreationContext::_new_kittest(ctx.clone());
        let options = AppOptions {
            backend: Some(Box::new(backend.clone())),
            model_dirs: Some(Vec::new()),
            restore_last_model: false,
            ..AppOptions::new(data_dir)
        };
        let app = App::new(&cc, options);
        Self {
            ctx,
            frame: eframe::Frame::_new_kittest(),
            app,
            time: 0.0,
            backend,
        }
    }

    /// Runs one frame with these input events; measures layout and tessellation.
    fn frame(&mut self, events: Vec<egui::Event>) -> FrameTime {
        self.time += f64::from(FRAME_DT);
        let input = egui::RawInput {
            screen_rect: Some(egui::Rect::from_min_size(egui::Pos2::ZERO, SIZE)),
            time: Some(self.time),
            predicted_dt: FRAME_DT,
            events,
            ..egui::RawInput::default()
        };
        let start = Instant::now();
        let app = &mut self.app;
        let frame = &mut self.frame;
        let output = self.ctx.run_ui(input, |ui| {
            eframe::App::logic(app, ui.ctx(), frame);
            eframe::App::ui(app, ui, frame);
        });
        let primitives = self.ctx.tessellate(output.shapes, output.pixels_per_point);
        let total = start.elapsed();
        std::hint::black_box(primitives);
        let repaint_requested = output
            .viewport_output
            .values()
            .any(|v| v.repaint_delay < Duration::from_millis(100));
        FrameTime {
            total,
            repaint_requested,
        }
    }

    /// Toggles Show thinking `times` times, three frames each; returns the frame times.
    fn toggle_show_thinking(&mut self, times: usize) -> Vec<FrameTime> {
        let mut frames = Vec::new();
        for _ in 0..times {
            self.app.apply(Action::ToggleShowThinking);
            for _ in 0..3 {
                frames.push(self.frame(Vec::new()));
            }
        }
        self.settle(600);
        frames
    }

    /// Frames without input until nothing asks for another one (at most `max`).
    fn settle(&mut self, max: usize) -> usize {
        for n in 0..max {
            if !self.frame(Vec::new()).repaint_requested {
                return n;
            }
        }
        max
    }
}

/// A conversation of `count` messages: questions, and answers with code blocks, lists and
/// thinking.
fn long_conversation(count: usize) -> Vec<Message> {
    (0..count)
        .map(|i| {
            if i % 2 == 0 {
                Message::new(
                    Role::User,
                    format!("Question {i}: how do I read a file line by line in Rust?"),
                )
            } else {
                let mut message = Message::new(Role::Assistant, answer(i));
                message.thinking = Some(
                    "The user wants to read lines. BufReader over File, then lines(). \
                     Mention errors and the ? operator. "
                        .repeat(6),
                );
                message.stats = Some(GenerationStats {
                    generated_tokens: 420,
                    thinking_tokens: 120,
                    thinking_secs: 9.0,
                    decode_tok_per_sec: 9.5,
                    time_to_first_token_secs: 0.4,
                    ..GenerationStats::default()
                });
                message
            }
        })
        .collect()
}

fn answer(i: usize) -> String {
    let code: String = (0..40)
        .map(|line| format!("    let line_{line} = reader.next_line()?; // step {line} of {i}\n"))
        .collect();
    format!(
        "Here is answer **{i}**. Use a `BufReader`:\n\n```rust\nuse std::io::BufRead;\n\
         fn main() -> std::io::Result<()> {{\n{code}    Ok(())\n}}\n```\n\n\
         - it reads one line at a time\n- it keeps memory small\n\nA poem line,\nand another.\n"
    )
}

/// p50, p95 and max of frame times, in milliseconds.
fn summary(name: &str, times: &[FrameTime]) -> String {
    let mut ms: Vec<f64> = times.iter().map(|t| t.total.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    format!(
        "{name:<22} {:>5} frames  p50 {:>6.2} ms  p95 {:>6.2} ms  max {:>7.2} ms",
        ms.len(),
        at(0.5),
        at(0.95),
        ms[ms.len() - 1]
    )
}

fn wheel(delta_y: f32) -> Vec<egui::Event> {
    vec![
        egui::Event::PointerMoved(egui::pos2(700.0, 400.0)),
        egui::Event::MouseWheel {
            unit: egui::MouseWheelUnit::Point,
            delta: egui::vec2(0.0, delta_y),
            phase: egui::TouchPhase::Move,
            source: egui::MouseWheelSource::Wheel,
            modifiers: egui::Modifiers::NONE,
        },
    ]
}

fn main() {
    let count: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(1000);
    let data = std::env::temp_dir().join(format!("smoldesk-frame-bench-{}", std::process::id()));
    let mut bench = Bench::new(&data);
    bench.frame(Vec::new());
    let listing = Instant::now();
    while bench.app.is_opening() && listing.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(1));
        bench.frame(Vec::new());
    }
    if let Some(conversation) = bench.app.current_conversation_mut() {
        conversation.messages = long_conversation(count);
    }
    let first = Instant::now();
    bench.frame(Vec::new());
    println!(
        "{count} messages; first frame {:.1} ms",
        first.elapsed().as_secs_f64() * 1e3
    );
    let settled = bench.settle(600);
    println!("frames until idle after opening: {settled}");

    let mut scrolling = Vec::new();
    for step in 0..240 {
        let delta = if step < 120 { 120.0 } else { -120.0 };
        scrolling.push(bench.frame(wheel(delta)));
    }
    let after_scroll = bench.settle(600);

    let at_bottom = bench.toggle_show_thinking(40);
    for _ in 0..60 {
        bench.frame(wheel(120.0));
    }
    // Let the smooth scroll come to rest (it moves without asking for frames of its own).
    for _ in 0..300 {
        bench.frame(Vec::new());
    }
    let scrolled_up = bench.toggle_show_thinking(40);
    let toggling = [at_bottom.clone(), scrolled_up.clone()].concat();

    let mut streaming = Vec::new();
    bench.app.apply(Action::Regenerate);
    let id = bench
        .backend
        .0
        .lock()
        .ok()
        .and_then(|c| {
            c.iter().rev().find_map(|c| match c {
                Command::Generate(r) => Some(r.id),
                _ => None,
            })
        })
        .unwrap_or(1);
    bench.app.handle_event(Event::Started {
        id,
        prompt_tokens: 4000,
        prompt_text: String::new(),
        template_fallback: None,
        dropped_messages: 0,
    });
    let reply = answer(count);
    let pieces: Vec<&str> = reply.split_inclusive(' ').collect();
    for step in 0..400 {
        let (kind, text) = if step < 100 {
            (SegmentKind::Thinking, "thinking about it ")
        } else {
            (SegmentKind::Answer, pieces[(step - 100) % pieces.len()])
        };
        bench.app.handle_event(Event::Segment {
            id,
            kind,
            text: text.to_string(),
        });
        streaming.push(bench.frame(Vec::new()));
    }
    bench.app.handle_event(Event::Finished {
        id,
        stats: GenerationStats::default(),
    });
    let after_stream = bench.settle(600);

    println!("{}", summary("scrolling (wheel)", &scrolling));
    println!("{}", summary("toggling Show thinking", &toggling));
    println!("{}", summary("  at the bottom", &at_bottom));
    println!("{}", summary("  scrolled up", &scrolled_up));
    println!("{}", summary("streaming a reply", &streaming));
    let all: Vec<FrameTime> = [scrolling, toggling, streaming].concat();
    println!("{}", summary("all", &all));
    println!(
        "frames until idle: after scrolling {after_scroll}, after the reply {after_stream} \
         (0 = nothing repaints without a reason)"
    );
    drop(bench);
    let _ = std::fs::remove_dir_all(&data);
}
