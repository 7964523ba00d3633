//! `smoldesk --install-desktop`: a per-user desktop entry (so SmolDesk appears in the
//! application menu and opens `.gguf` files), the GGUF file type, and the icon.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// The app id: the window's Wayland app id / X11 class, and the desktop entry's name.
pub const APP_ID: &str = "smoldesk";

/// The icon, 256×256 PNG (also the window icon).
pub const ICON_256: &[u8] = include_bytes!("../../assets/icons/smoldesk-256.png");

/// Every icon size shipped, with its PNG bytes.
pub const ICONS: [(u32, &[u8]); 5] = [
    (256, ICON_256),
    (128, include_bytes!("../../assets/icons/smoldesk-128.png")),
    (64, include_bytes!("../../assets/icons/smoldesk-64.png")),
    (48, include_bytes!("../../assets/icons/smoldesk-48.png")),
    (32, include_bytes!("../../assets/icons/smoldesk-32.png")),
];

/// The desktop entry, with `@EXEC@` standing for the executable.
const DESKTOP_TEMPLATE: &str = include_str!("../../assets/smoldesk.desktop");

/// The shared-mime-info package registering `*.gguf` as `application/x-gguf`.
pub const MIME_PACKAGE: &str = include_str!("../../assets/smoldesk-gguf.xml");

/// Installs the entry, file type and icons for the current user (under `$XDG_DATA_HOME`, by
/// default `~/.local/share`), pointing at the running executable. Returns the files written.
pub fn install_for_current_user() -> anyhow::Result<Vec<PathBuf>> {
    let exe = std::env::current_exe().context("cannot find the path of this program")?;
    let exe = std::fs::canonicalize(&exe).unwrap_or(exe);
    let data_home = data_home().context("cannot find the home folder ($HOME is not set)")?;
    let written = install(&data_home, &exe)?;
    refresh_caches(&data_home);
    Ok(written)
}

/// Writes the desktop entry, the mime package and the icons under `data_home`.
pub fn install(data_home: &Path, exe: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let entry = data_home
        .join("applications")
        .join(format!("{APP_ID}.desktop"));
    write_file(&entry, desktop_entry(exe).as_bytes())?;
    written.push(entry);
    let mime = data_home
        .join("mime")
        .join("packages")
        .join(format!("{APP_ID}-gguf.xml"));
    write_file(&mime, MIME_PACKAGE.as_bytes())?;
    written.push(mime);
    for (size, png) in ICONS {
        let icon = data_home
            .join("icons/hicolor")
            .join(format!("{size}x{size}"))
            .join("apps")
            .join(format!("{APP_ID}.png"));
        write_file(&icon, png)?;
        written.push(icon);
    }
    Ok(written)
}

/// The desktop entry for an executable.
pub fn desktop_entry(exe: &Path) -> String {
    DESKTOP_TEMPLATE.replace("@EXEC@", &quote_exec(&exe.to_string_lossy()))
}

/// Prints what was installed (the user asked for it on the command line).
pub fn report(written: &[PathBuf]) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "Installed SmolDesk for this user:");
    for path in written {
        let _ = writeln!(out, "  {}", path.display());
    }
    let _ = writeln!(
        out,
        "SmolDesk is now in the application menu and can open .gguf files."
    );
}

/// Quotes a program path for an `Exec=` line (Desktop Entry Specification: reserved
/// characters need double quotes, inside which `"`, `` ` ``, `$` and `\` are escaped; `%` is
/// doubled; and the value's own backslashes are escaped once more).
pub fn quote_exec(program: &str) -> String {
    const RESERVED: &[char] = &[
        ' ', '\t', '\n', '"', '\'', '\\', '>', '<', '~', '|', '&', ';', '$', '*', '?', '#', '(',
        ')', '`',
    ];
    let program = program.replace('%', "%%");
    if !program.contains(RESERVED) {
        return program;
    }
    let mut quoted = String::from("\"");
    for c in program.chars() {
        match c {
            '"' | '`' | '$' => {
                quoted.push_str("\\\\");
                quoted.push(c);
            }
            '\\' => quoted.push_str("\\\\\\\\"),
            _ => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

fn data_home() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    directories::BaseDirs::new().map(|dirs| dirs.home_dir().join(".local/share"))
}

fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the folder {}", dir.display()))?;
    }
    crate::chat::store::write_atomically(path, bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Asks the desktop to notice the new files; the tools may be missing, which is fine.
fn refresh_caches(data_home: &Path) {
    let commands: [(&str, Vec<PathBuf>); 3] = [
        ("update-mime-database", vec![data_home.join("mime")]),
        (
            "update-desktop-database",
            vec![data_home.join("applications")],
        ),
        (
            "gtk-update-icon-cache",
            vec![data_home.join("icons/hicolor")],
        ),
    ];
    for (program, args) in commands {
        match std::process::Command::new(program)
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
        {
            Ok(status) if status.success() => {}
            Ok(status) => log::info!("{program} exited with {status}"),
            Err(err) => log::info!("{program} not run: {err}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_runs_this_program_and_opens_gguf_files() {
        let entry = desktop_entry(Path::new("/opt/smoldesk/smoldesk"));
        assert!(entry.contains("\nExec=/opt/smoldesk/smoldesk %f\n"));
        assert!(entry.contains("\nMimeType=application/x-gguf;\n"));
        assert!(entry.contains(&format!("\nStartupWMClass={APP_ID}\n")));
        assert!(entry.contains(&format!("\nIcon={APP_ID}\n")));
        assert!(entry.starts_with("[Desktop Entry]\n"));
    }

    #[test]
    fn paths_with_special_characters_are_quoted() {
        assert_eq!(quote_exec("/a/b"), "/a/b");
        assert_eq!(quote_exec("/my apps/smoldesk"), "\"/my apps/smoldesk\"");
        assert_eq!(quote_exec("/a$b"), "\"/a\\\\$b\"");
        assert_eq!(quote_exec("/100%/x"), "/100%%/x");
    }

    #[test]
    fn install_writes_entry_mime_type_and_icons() {
        let dir = tempfile::tempdir().unwrap();
        let written = install(dir.path(), Path::new("/usr/bin/smoldesk")).unwrap();
        assert_eq!(written.len(), 2 + ICONS.len());
        let entry =
            std::fs::read_to_string(dir.path().join("applications/smoldesk.desktop")).unwrap();
        assert!(entry.contains("Exec=/usr/bin/smoldesk %f"));
        let mime =
            std::fs::read_to_string(dir.path().join("mime/packages/smoldesk-gguf.xml")).unwrap();
        assert!(mime.contains(r#"<glob pattern="*.gguf"/>"#));
        let icon =
            std::fs::read(dir.path().join("icons/hicolor/256x256/apps/smoldesk.png")).unwrap();
        assert!(icon.starts_with(b"\x89PNG"));
    }

    #[test]
    fn icons_decode_at_their_sizes() {
        for (size, png) in ICONS {
            let icon = eframe::icon_data::from_png_bytes(png).unwrap();
            assert_eq!((icon.width, icon.height), (size, size));
        }
    }
}
