//! Plain-text log lines that network input cannot forge.
//!
//! EST usernames, DNS query names, request paths and upstream errors come from the
//! network; written raw, a newline in one of them starts a fake log line (and an escape
//! sequence rewrites the operator's terminal). Every field value of the plain format is
//! written through [`Escape`]: control characters (C0, DEL, C1), the Unicode line and
//! paragraph separators and the bidirectional overrides become visible escapes. The JSON
//! format escapes on its own.

use std::fmt::{self, Write};

use tracing_subscriber::field::MakeExt;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::{Writer, debug_fn};

/// The field formatter of the plain format: `message` bare, then `name=value`, each
/// value escaped.
pub fn escaped_fields() -> impl for<'w> FormatFields<'w> + Send + Sync + 'static {
    debug_fn(|w: &mut Writer<'_>, field: &tracing::field::Field, value: &dyn fmt::Debug| {
        let name = field.name();
        if name.starts_with("log.") {
            return Ok(());
        }
        if name != "message" {
            write!(w, "{}=", name.strip_prefix("r#").unwrap_or(name))?;
        }
        write!(Escape(w), "{value:?}")
    })
    .delimited(" ")
}

/// Writes what it is given with unsafe characters escaped.
pub struct Escape<W>(pub W);

fn needs_escape(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

impl<W: Write> Write for Escape<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Almost every value is plain printable ASCII: one scan, one write.
        if s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return self.0.write_str(s);
        }
        let mut rest = s;
        while let Some((i, c)) = rest.char_indices().find(|&(_, c)| needs_escape(c)) {
            self.0.write_str(&rest[..i])?;
            match c {
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                c => write!(self.0, "\\u{{{:x}}}", u32::from(c))?,
            }
            rest = &rest[i + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn esc(s: &str) -> String {
        let mut out = String::new();
        write!(Escape(&mut out), "{s}").unwrap();
        out
    }

    #[test]
    fn control_characters_become_visible() {
        assert_eq!(esc("plain text / é"), "plain text / é");
        assert_eq!(esc("a\nINFO forged line"), "a\\nINFO forged line");
        assert_eq!(esc("\r\t\u{1b}[2J\u{7f}\u{85}"), "\\r\\t\\u{1b}[2J\\u{7f}\\u{85}");
        assert_eq!(esc("x\u{2028}y\u{202e}z"), "x\\u{2028}y\\u{202e}z");
    }

    #[test]
    fn fields_of_an_event_are_escaped() {
        // A real event through a subscriber with the formatter, captured.
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let out = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .fmt_fields(escaped_fields())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let user = "cam\nERROR portcullis: forged";
            tracing::warn!(user = %user, path = ?"/a\r\nb", "refused {}", "x\ny");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(
            text.contains("refused x\\ny user=cam\\nERROR portcullis: forged path=\"/a\\r\\nb\""),
            "{text}"
        );
    }
}
