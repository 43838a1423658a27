//! The demo page and its assets: where they come from (the binary, or a
//! directory during development), which paths below `/static/` are safe to
//! serve, and the answer that carries one.
//!
//! Threads: read by connection threads answering `/` and `/static/…`;
//! [`StaticFiles`] is immutable once the server starts.

use std::borrow::Cow;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use include_dir::{include_dir, Dir};

use super::http;

/// The demo page and its assets, compiled into the binary.
static EMBEDDED: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/static");

/// Where static files come from: the binary, or a directory during development.
#[derive(Debug, Clone)]
pub(crate) enum StaticFiles {
    /// Files compiled into the binary.
    Embedded,
    /// Files read from this directory on each request.
    Directory(PathBuf),
}

impl StaticFiles {
    /// The files of `server.static_dir`: the embedded ones when it is empty.
    pub(crate) fn from_config(static_dir: &str) -> StaticFiles {
        if static_dir.is_empty() {
            StaticFiles::Embedded
        } else {
            StaticFiles::Directory(PathBuf::from(static_dir))
        }
    }

    /// The file at `relative` (already checked by [`safe_relative_path`]).
    pub(crate) fn get(&self, relative: &str) -> Option<Cow<'static, [u8]>> {
        match self {
            StaticFiles::Embedded => EMBEDDED
                .get_file(relative)
                .map(|f| Cow::Borrowed(f.contents())),
            StaticFiles::Directory(dir) => {
                let path = dir.join(relative);
                // Symlinks could still point outside; resolve and compare.
                let root = dir.canonicalize().ok()?;
                let real = path.canonicalize().ok()?;
                if !real.starts_with(&root) || !real.is_file() {
                    return None;
                }
                std::fs::read(real).ok().map(Cow::Owned)
            }
        }
    }
}

/// Answers with `file` of `files`, or 404.
pub(crate) fn serve_static(
    out: &mut impl Write,
    files: &StaticFiles,
    file: &str,
) -> io::Result<()> {
    match files.get(file) {
        Some(body) => {
            let content_type = content_type(file);
            // The page's own files only: no inline script, no outside
            // request, no framing. Model text is rendered as text anyway;
            // this is the second wall.
            let csp: &[(&str, &str)] = if content_type.starts_with("text/html") {
                &[(
                    "Content-Security-Policy",
                    "default-src 'self'; script-src 'self'; connect-src 'self'; \
                     img-src 'self' data:; style-src 'self' 'unsafe-inline'; \
                     base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
                )]
            } else {
                &[]
            };
            http::respond(out, 200, content_type, csp, &body)
        }
        None => http::respond_error(out, 404, "not found"),
    }
}

/// The file path below `/static/` if it is safe: decoded, relative, with no
/// `..`, `.`, empty segment, backslash or NUL. `None` means "refuse".
pub(crate) fn safe_relative_path(raw: &str) -> Option<String> {
    let decoded = http::percent_decode(raw);
    if decoded.is_empty() || decoded.contains('\\') || decoded.contains('\0') {
        return None;
    }
    let ok = decoded
        .split('/')
        .all(|seg| !seg.is_empty() && seg != "." && seg != "..");
    ok.then(|| decoded.into_owned())
}

/// The content type of a file by its extension.
fn content_type(path: &str) -> &'static str {
    match Path::new(path).extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("json") => "application/json",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        Some("woff2") => "font/woff2",
        Some("txt" | "md") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traversal_is_refused() {
        for bad in [
            "../etc/passwd",
            "a/../../x",
            "%2e%2e/secret",
            "..%2fsecret",
            "a\\b",
            "",
            "a//b",
            "./a",
            "a/%00",
        ] {
            assert_eq!(safe_relative_path(bad), None, "{bad}");
        }
        assert_eq!(
            safe_relative_path("css/app.css").as_deref(),
            Some("css/app.css")
        );
        assert_eq!(safe_relative_path("a%20b.txt").as_deref(), Some("a b.txt"));
    }

    #[test]
    fn embedded_index_exists() {
        assert!(StaticFiles::Embedded.get("index.html").is_some());
        assert!(StaticFiles::Embedded.get("missing.html").is_none());
    }
}
