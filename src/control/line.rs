//! Reading request lines with a length limit: an oversized line is
//! skipped up to its newline and reported, and the next line reads as usual.

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// One line, without its newline (nor a `\r` before it).
    Text(Vec<u8>),
    /// A line longer than the limit; its bytes were discarded.
    TooLong,
}

pub struct LineReader<R> {
    inner: R,
    max: usize,
}

impl<R: AsyncBufRead + Unpin> LineReader<R> {
    pub fn new(inner: R, max: usize) -> LineReader<R> {
        LineReader { inner, max }
    }

    /// The reader, with whatever it had buffered.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// The next line; `None` at end of stream. A last line without a
    /// newline still counts. Not cancel-safe: a line being read when the
    /// future is dropped is lost.
    pub async fn next(&mut self) -> std::io::Result<Option<Line>> {
        let mut buf = Vec::new();
        let mut too_long = false;
        let mut any = false;
        loop {
            let avail = self.inner.fill_buf().await?;
            if avail.is_empty() {
                return Ok(match (any, too_long) {
                    (false, _) => None,
                    (true, true) => Some(Line::TooLong),
                    (true, false) => Some(Line::Text(trim_cr(buf))),
                });
            }
            any = true;
            let newline = avail.iter().position(|&b| b == b'\n');
            let chunk = &avail[..newline.unwrap_or(avail.len())];
            if !too_long {
                if buf.len() + chunk.len() > self.max {
                    too_long = true;
                    buf = Vec::new();
                } else {
                    buf.extend_from_slice(chunk);
                }
            }
            let used = newline.map_or(avail.len(), |i| i + 1);
            self.inner.consume(used);
            if newline.is_some() {
                return Ok(Some(if too_long {
                    Line::TooLong
                } else {
                    Line::Text(trim_cr(buf))
                }));
            }
        }
    }
}

fn trim_cr(mut buf: Vec<u8>) -> Vec<u8> {
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8], max: usize) -> Vec<Line> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            // A tiny buffer makes lines cross many fill_buf calls.
            let mut r = LineReader::new(tokio::io::BufReader::with_capacity(3, input), max);
            let mut out = Vec::new();
            while let Some(l) = r.next().await.unwrap() {
                out.push(l);
            }
            out
        })
    }

    #[test]
    fn splits_and_limits() {
        let t = |s: &str| Line::Text(s.as_bytes().to_vec());
        assert_eq!(
            lines(b"ab\r\ncdefgh\n\nxyz", 4),
            vec![t("ab"), Line::TooLong, t(""), t("xyz")]
        );
        assert_eq!(lines(b"abcd\nabcde\n", 4), vec![t("abcd"), Line::TooLong]);
        assert_eq!(lines(b"abcdefgh", 4), vec![Line::TooLong]);
        assert_eq!(lines(b"", 4), vec![]);
    }
}
