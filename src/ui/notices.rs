//! Dismissable banners above the chat: errors, information, and "deleted — Undo".

use std::time::{Duration, Instant};

use egui::{Color32, RichText, Ui};

use super::theme;

/// How long information banners stay before fading away by themselves.
pub const INFO_LIFETIME: Duration = Duration::from_secs(8);

/// How long an undo offer stays.
pub const UNDO_LIFETIME: Duration = Duration::from_secs(15);

/// How serious a notice is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Something the user may want to know; disappears by itself.
    Info,
    /// Something went wrong; stays until dismissed.
    Error,
}

/// One banner.
#[derive(Debug, Clone)]
pub struct Notice {
    /// Unique id, for dismissing.
    pub id: u64,
    /// Seriousness.
    pub level: Level,
    /// The message.
    pub text: String,
    /// Set when the banner offers to undo deleting this conversation.
    pub undo_conversation: Option<String>,
    created: Instant,
}

impl Notice {
    /// When the banner goes away by itself, if it does.
    fn expires_at(&self) -> Option<Instant> {
        match (self.level, &self.undo_conversation) {
            (_, Some(_)) => Some(self.created + UNDO_LIFETIME),
            (Level::Info, None) => Some(self.created + INFO_LIFETIME),
            (Level::Error, None) => None,
        }
    }
}

/// What the user did with a banner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoticeResponse {
    /// Undo deleting this conversation.
    Undo(String),
}

/// The banners currently shown, oldest first.
#[derive(Debug, Default)]
pub struct Notices {
    items: Vec<Notice>,
    next_id: u64,
}

impl Notices {
    /// Most banners shown at once; older ones give way.
    pub const MAX_SHOWN: usize = 4;

    /// Shows an error until the user dismisses it.
    pub fn error(&mut self, text: impl Into<String>) -> u64 {
        let text = text.into();
        log::warn!("{text}");
        self.push(Level::Error, text, None)
    }

    /// Shows information for a few seconds.
    pub fn info(&mut self, text: impl Into<String>) -> u64 {
        self.push(Level::Info, text.into(), None)
    }

    /// Shows information unless the same text is already shown.
    pub fn info_once(&mut self, text: impl Into<String>) {
        let text = text.into();
        if !self.items.iter().any(|n| n.text == text) {
            self.info(text);
        }
    }

    /// Offers to undo deleting a conversation.
    pub fn undo_delete(&mut self, title: &str, conversation_id: &str) -> u64 {
        self.items.retain(|n| n.undo_conversation.is_none());
        self.push(
            Level::Info,
            format!("Deleted “{title}”"),
            Some(conversation_id.to_string()),
        )
    }

    /// Removes one banner.
    pub fn dismiss(&mut self, id: u64) {
        self.items.retain(|n| n.id != id);
    }

    /// Removes the undo offer for a conversation (after it was used).
    pub fn dismiss_undo(&mut self, conversation_id: &str) {
        self.items
            .retain(|n| n.undo_conversation.as_deref() != Some(conversation_id));
    }

    /// The banners currently shown.
    pub fn items(&self) -> &[Notice] {
        &self.items
    }

    /// Drops expired banners; returns how long until the next one expires.
    pub fn expire(&mut self, now: Instant) -> Option<Duration> {
        self.items
            .retain(|n| n.expires_at().is_none_or(|at| at > now));
        self.items
            .iter()
            .filter_map(Notice::expires_at)
            .map(|at| at.saturating_duration_since(now))
            .min()
    }

    /// Draws the banners; returns what the user asked for.
    pub fn show(&mut self, ui: &mut Ui) -> Vec<NoticeResponse> {
        let mut responses = Vec::new();
        let mut dismissed = Vec::new();
        for notice in &self.items {
            let (fill, stroke) = colors(ui, notice.level);
            egui::Frame::new()
                .fill(fill)
                .stroke(egui::Stroke::new(1.0, stroke))
                .corner_radius(6.0)
                .inner_margin(egui::Margin::symmetric(10, 6))
                .show(ui, |ui| {
                    ui.set_width(ui.available_width());
                    ui.horizontal(|ui| {
                        let icon = match notice.level {
                            Level::Error => "⚠",
                            Level::Info => "ℹ",
                        };
                        ui.label(RichText::new(icon).color(stroke));
                        ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                            if ui.small_button("Dismiss").clicked() {
                                dismissed.push(notice.id);
                            }
                            if let Some(id) = &notice.undo_conversation
                                && ui.small_button("Undo").clicked()
                            {
                                responses.push(NoticeResponse::Undo(id.clone()));
                                dismissed.push(notice.id);
                            }
                            ui.with_layout(
                                egui::Layout::left_to_right(egui::Align::Center),
                                |ui| {
                                    ui.add(egui::Label::new(&notice.text).wrap());
                                },
                            );
                        });
                    });
                });
        }
        for id in dismissed {
            self.dismiss(id);
        }
        responses
    }

    fn push(&mut self, level: Level, text: String, undo_conversation: Option<String>) -> u64 {
        self.next_id += 1;
        self.items.push(Notice {
            id: self.next_id,
            level,
            text,
            undo_conversation,
            created: Instant::now(),
        });
        let excess = self.items.len().saturating_sub(Self::MAX_SHOWN);
        self.items.drain(..excess);
        self.next_id
    }
}

fn colors(ui: &Ui, level: Level) -> (Color32, Color32) {
    let accent = match level {
        Level::Error => theme::error_color(ui.visuals()),
        Level::Info => theme::accent_color(ui.visuals()),
    };
    (accent.gamma_multiply(0.12), accent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_stay_and_information_expires() {
        let mut notices = Notices::default();
        notices.error("bad");
        notices.info("fyi");
        let later = Instant::now() + INFO_LIFETIME + Duration::from_millis(10);
        assert_eq!(notices.expire(later), None);
        assert_eq!(notices.items().len(), 1);
        assert_eq!(notices.items()[0].text, "bad");
    }

    #[test]
    fn only_the_newest_banners_are_kept() {
        let mut notices = Notices::default();
        for i in 0..10 {
            notices.error(format!("e{i}"));
        }
        assert_eq!(notices.items().len(), Notices::MAX_SHOWN);
        assert_eq!(notices.items()[0].text, "e6");
    }

    #[test]
    fn one_undo_offer_at_a_time() {
        let mut notices = Notices::default();
        notices.undo_delete("A", "a");
        notices.undo_delete("B", "b");
        let undos: Vec<_> = notices
            .items()
            .iter()
            .filter_map(|n| n.undo_conversation.clone())
            .collect();
        assert_eq!(undos, ["b"]);
        notices.dismiss_undo("b");
        assert!(notices.items().is_empty());
    }
}
