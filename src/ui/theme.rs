//! Colours, spacing and text sizes for both light and dark mode.

use egui::{Color32, FontFamily, FontId, TextStyle, Theme, ThemePreference, Visuals};

use super::prefs::ThemeChoice;

/// Widest the conversation column grows, in points (long lines are hard to read).
pub const READING_WIDTH: f32 = 780.0;

/// What the theme was last built from, so it is rebuilt only when that changes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AppliedTheme {
    /// The colour scheme.
    pub choice: ThemeChoice,
    /// The body text size.
    pub font_size: f32,
}

/// Applies colours, spacing and text sizes to both themes and picks the active one.
pub fn apply(ctx: &egui::Context, applied: AppliedTheme) {
    for theme in [Theme::Dark, Theme::Light] {
        ctx.style_mut_of(theme, |style| {
            style.text_styles = text_styles(applied.font_size);
            style.spacing.item_spacing = egui::vec2(8.0, 6.0);
            style.spacing.button_padding = egui::vec2(8.0, 4.0);
            style.spacing.interact_size.y = (applied.font_size + 9.0).max(22.0);
            style.spacing.scroll.floating = true;
            tune_visuals(&mut style.visuals);
        });
    }
    ctx.set_theme(match applied.choice {
        ThemeChoice::System => ThemePreference::System,
        ThemeChoice::Light => ThemePreference::Light,
        ThemeChoice::Dark => ThemePreference::Dark,
    });
}

/// Text sizes derived from the body size.
fn text_styles(body: f32) -> std::collections::BTreeMap<TextStyle, FontId> {
    [
        (
            TextStyle::Small,
            FontId::new(body * 0.8, FontFamily::Proportional),
        ),
        (TextStyle::Body, FontId::new(body, FontFamily::Proportional)),
        (
            TextStyle::Button,
            FontId::new(body, FontFamily::Proportional),
        ),
        (
            TextStyle::Heading,
            FontId::new(body * 1.45, FontFamily::Proportional),
        ),
        (
            TextStyle::Monospace,
            FontId::new(body * 0.92, FontFamily::Monospace),
        ),
    ]
    .into()
}

fn tune_visuals(visuals: &mut Visuals) {
    let accent = accent_color(visuals);
    visuals.selection.bg_fill = accent.gamma_multiply(if visuals.dark_mode { 0.55 } else { 0.35 });
    visuals.selection.stroke.color = if visuals.dark_mode {
        Color32::WHITE
    } else {
        Color32::from_rgb(20, 40, 60)
    };
    visuals.hyperlink_color = accent;
    // A blinking cursor redraws the window twice a second forever; without a GPU that costs
    // CPU the model needs.
    visuals.text_cursor.blink = false;
    visuals.window_corner_radius = egui::CornerRadius::same(10);
    visuals.menu_corner_radius = egui::CornerRadius::same(8);
    visuals.widgets.noninteractive.corner_radius = egui::CornerRadius::same(6);
    visuals.widgets.inactive.corner_radius = egui::CornerRadius::same(6);
    visuals.widgets.hovered.corner_radius = egui::CornerRadius::same(6);
    visuals.widgets.active.corner_radius = egui::CornerRadius::same(6);
    visuals.widgets.open.corner_radius = egui::CornerRadius::same(6);
    if visuals.dark_mode {
        visuals.widgets.noninteractive.fg_stroke.color = Color32::from_rgb(222, 224, 228);
        visuals.widgets.inactive.fg_stroke.color = Color32::from_rgb(214, 216, 220);
        visuals.panel_fill = Color32::from_rgb(30, 31, 34);
        visuals.window_fill = Color32::from_rgb(36, 37, 41);
        visuals.extreme_bg_color = Color32::from_rgb(22, 23, 25);
        visuals.code_bg_color = Color32::from_rgb(44, 46, 52);
        visuals.error_fg_color = Color32::from_rgb(255, 110, 100);
    } else {
        visuals.widgets.noninteractive.fg_stroke.color = Color32::from_rgb(28, 30, 34);
        visuals.widgets.inactive.fg_stroke.color = Color32::from_rgb(36, 38, 44);
        visuals.panel_fill = Color32::from_rgb(250, 250, 251);
        visuals.window_fill = Color32::from_rgb(255, 255, 255);
        visuals.extreme_bg_color = Color32::from_rgb(255, 255, 255);
        visuals.code_bg_color = Color32::from_rgb(236, 238, 242);
        visuals.error_fg_color = Color32::from_rgb(190, 30, 30);
    }
}

/// The app's highlight colour.
pub fn accent_color(visuals: &Visuals) -> Color32 {
    if visuals.dark_mode {
        Color32::from_rgb(94, 178, 255)
    } else {
        Color32::from_rgb(20, 110, 200)
    }
}

/// Colour for errors.
pub fn error_color(visuals: &Visuals) -> Color32 {
    visuals.error_fg_color
}

/// Colour for warnings (e.g. the context is almost full).
pub fn warn_color(visuals: &Visuals) -> Color32 {
    if visuals.dark_mode {
        Color32::from_rgb(255, 170, 60)
    } else {
        Color32::from_rgb(170, 90, 0)
    }
}

/// Background of the user's messages.
pub fn user_bubble_fill(visuals: &Visuals) -> Color32 {
    if visuals.dark_mode {
        Color32::from_rgb(46, 52, 64)
    } else {
        Color32::from_rgb(228, 237, 248)
    }
}

/// Background of the conversation list.
pub fn sidebar_fill(visuals: &Visuals) -> Color32 {
    if visuals.dark_mode {
        Color32::from_rgb(24, 25, 27)
    } else {
        Color32::from_rgb(240, 241, 244)
    }
}

/// Text colour of thinking spans: readable but clearly secondary.
pub fn thinking_text_color(visuals: &Visuals) -> Color32 {
    if visuals.dark_mode {
        Color32::from_rgb(170, 174, 182)
    } else {
        Color32::from_rgb(88, 92, 100)
    }
}

/// Text colour of small secondary details (stats, hints) with enough contrast on the panel.
pub fn muted_text_color(visuals: &Visuals) -> Color32 {
    if visuals.dark_mode {
        Color32::from_rgb(150, 154, 162)
    } else {
        Color32::from_rgb(96, 100, 108)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_sizes_follow_the_body_size() {
        let styles = text_styles(20.0);
        assert_eq!(styles[&TextStyle::Body].size, 20.0);
        assert!(styles[&TextStyle::Heading].size > 20.0);
        assert!(styles[&TextStyle::Small].size < 20.0);
    }

    #[test]
    fn applying_sets_the_body_size_of_both_themes() {
        let ctx = egui::Context::default();
        apply(
            &ctx,
            AppliedTheme {
                choice: ThemeChoice::Dark,
                font_size: 17.0,
            },
        );
        for theme in [Theme::Dark, Theme::Light] {
            let size = ctx.style_of(theme).text_styles[&TextStyle::Body].size;
            assert_eq!(size, 17.0);
        }
        assert_eq!(ctx.options(|o| o.theme_preference), ThemePreference::Dark);
    }
}
