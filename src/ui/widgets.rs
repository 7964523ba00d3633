//! Small widgets shared by the panels.

use std::time::Duration;

use egui::{Response, Sense, Shape, Stroke, Ui};

/// How often an activity indicator redraws. egui's own spinner redraws every frame, which on a
/// machine without a GPU steals CPU from the model; a dozen frames a second is enough to look
/// alive.
pub const SPINNER_FRAME: Duration = Duration::from_millis(80);

/// A spinning arc that shows work in progress, redrawing at [`SPINNER_FRAME`].
pub fn spinner(ui: &mut Ui) -> Response {
    let size = ui.text_style_height(&egui::TextStyle::Body);
    let (rect, response) = ui.allocate_exact_size(egui::vec2(size, size), Sense::hover());
    if ui.is_rect_visible(rect) {
        let time = ui.input(|i| i.time);
        let radius = rect.height() / 2.0 - 2.0;
        let start = time * std::f64::consts::TAU;
        let end = start + 240f64.to_radians() * time.sin();
        let points: Vec<egui::Pos2> = (0..=20)
            .map(|i| {
                let angle = egui::lerp(start..=end, f64::from(i) / 20.0);
                let (sin, cos) = angle.sin_cos();
                rect.center() + radius * egui::vec2(cos as f32, sin as f32)
            })
            .collect();
        let color = ui.visuals().strong_text_color();
        ui.painter()
            .add(Shape::line(points, Stroke::new(2.5, color)));
        ui.ctx().request_repaint_after(SPINNER_FRAME);
    }
    response
}
