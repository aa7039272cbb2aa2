//! A one-line progress bar on stderr, drawn only on a terminal.

use std::io::{IsTerminal, Write};

use super::table::size;
use crate::control::protocol::Progress;

const WIDTH: usize = 30;

pub struct Bar {
    label: String,
    drawn: bool,
}

impl Bar {
    /// `None` when stderr is not a terminal.
    pub fn on_terminal(label: impl Into<String>) -> Option<Bar> {
        std::io::stderr().is_terminal().then(|| Bar {
            label: label.into(),
            drawn: false,
        })
    }

    pub fn update(&mut self, p: Progress) {
        let line = render(&self.label, p);
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K{line}");
        let _ = err.flush();
        self.drawn = true;
    }

    /// Clears the bar so the result prints on a clean line.
    pub fn finish(&mut self) {
        if self.drawn {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
            self.drawn = false;
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.finish();
    }
}

fn render(label: &str, p: Progress) -> String {
    match p.total.filter(|&t| t > 0) {
        Some(total) => {
            let frac = (p.done as f64 / total as f64).clamp(0.0, 1.0);
            let filled = (frac * WIDTH as f64).round() as usize;
            format!(
                "{label} [{}{}] {:3.0}% {}/{}",
                "#".repeat(filled),
                "-".repeat(WIDTH - filled),
                frac * 100.0,
                size(p.done),
                size(total)
            )
        }
        None => format!("{label} {}", size(p.done)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders() {
        let half = Progress {
            done: 512 << 20,
            total: Some(1 << 30),
        };
        assert_eq!(
            render("fetch", half),
            "fetch [###############---------------]  50% 512.0M/1.0G"
        );
        let open = Progress {
            done: 2048,
            total: None,
        };
        assert_eq!(render("fetch", open), "fetch 2.0K");
    }
}
