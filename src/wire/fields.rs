//! A message's end-to-end header lines, carried from the head they came in to the head that
//! forwards them as they were written: a response's from the upstream to the client, a
//! request's from the client to the upstream. The proxy acts on none of them but a few it
//! notes as they are read (`Content-Length` and `Date` here). Building a header map of every
//! line, only to write each one out again, cost more than reading the head.

use bytes::{BufMut, Bytes, BytesMut};

/// Where a header line's name and value lie in the buffer its head was parsed from:
/// positions, not slices, so that a parser's findings outlive its borrow of the buffer.
pub type Spans = ((usize, usize), (usize, usize));

/// Header lines ready to be written, each `name: value\r\n` with the name in the case the
/// sender gave it (nginx forwards names so too) and the space after the colon as it sent it.
/// `Content-Length` is not among them: its value is kept, for the head to write once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fields {
    lines: Bytes,
    content_length: Option<u64>,
    date: bool,
}

impl Fields {
    /// The lines, for the head that carries them.
    pub fn lines(&self) -> &Bytes {
        &self.lines
    }

    /// The length the sender's `Content-Length` gave, to be forwarded.
    pub fn content_length(&self) -> Option<u64> {
        self.content_length
    }

    /// A `Date` line is among them, so the head needs none of its own.
    pub fn has_date(&self) -> bool {
        self.date
    }

    /// Each line's name and value, in order: what a test reads back.
    #[cfg(test)]
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.lines
            .split(|&b| b == b'\n')
            .filter(|line| !line.is_empty())
            .map(|line| {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let colon = line.iter().position(|&b| b == b':').unwrap_or(line.len());
                let value = line.get(colon + 1..).unwrap_or_default();
                (&line[..colon], value.trim_ascii_start())
            })
    }
}

/// Builds [`Fields`] in room the caller keeps from one head to the next: each set is split
/// off it, and once the set is written and dropped its room serves the next.
pub struct Builder<'r> {
    room: &'r mut BytesMut,
    content_length: Option<u64>,
    date: bool,
}

impl<'r> Builder<'r> {
    pub fn new(room: &'r mut BytesMut) -> Builder<'r> {
        room.clear();
        Builder {
            room,
            content_length: None,
            date: false,
        }
    }

    /// Appends header lines as an HTTP parser accepted them: from the first line's name to
    /// the end of the last one's value, each line before the last ending in CRLF. Copying a
    /// run of lines whole costs less than copying each name and value.
    pub fn push(&mut self, lines: &[u8]) {
        self.room.reserve(lines.len() + 2);
        self.room.put_slice(lines);
        self.room.put_slice(b"\r\n");
    }

    /// Appends the lines of a parsed head that `forward(i, name)` keeps, line `i` of `spans`
    /// lying in `head`. Lines kept one after the other, with only CRLF between them, go as
    /// one run: copying a run whole costs less than copying each line.
    pub fn push_kept(
        &mut self,
        head: &[u8],
        spans: &[Spans],
        mut forward: impl FnMut(usize, &[u8]) -> bool,
    ) {
        let mut run: Option<(usize, usize)> = None;
        for (i, &(name, value)) in spans.iter().enumerate() {
            let kept = forward(i, &head[name.0..name.1]);
            run = match run {
                Some((start, end)) if kept && &head[end..name.0] == b"\r\n" => {
                    Some((start, value.1))
                }
                _ => {
                    if let Some((start, end)) = run {
                        self.push(&head[start..end]);
                    }
                    kept.then_some((name.0, value.1))
                }
            };
        }
        if let Some((start, end)) = run {
            self.push(&head[start..end]);
        }
    }

    /// Records the length to forward as `Content-Length`.
    pub fn content_length(&mut self, n: u64) {
        self.content_length = Some(n);
    }

    /// Records that a `Date` line was pushed.
    pub fn date(&mut self) {
        self.date = true;
    }

    pub fn finish(self) -> Fields {
        Fields {
            lines: super::split_head(self.room),
            content_length: self.content_length,
            date: self.date,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_written_as_given_and_read_back_in_order() {
        let mut room = BytesMut::new();
        let mut b = Builder::new(&mut room);
        b.push(b"ETag: \"x\"\r\nx-empty:");
        b.push(b"Content-Length:\t 2");
        b.content_length(2);
        let fields = b.finish();
        assert_eq!(
            &fields.lines()[..],
            b"ETag: \"x\"\r\nx-empty:\r\nContent-Length:\t 2\r\n"
        );
        let lines: Vec<_> = fields.iter().collect();
        assert_eq!(
            lines,
            [
                (&b"ETag"[..], &b"\"x\""[..]),
                (b"x-empty", b""),
                (b"Content-Length", b"2")
            ]
        );
        assert_eq!(fields.content_length(), Some(2));
        assert!(!fields.has_date());
    }

    #[test]
    fn the_room_serves_the_next_set_once_the_last_is_dropped() {
        let value = [b'v'; 34];
        let mut room = BytesMut::with_capacity(64);
        let set = |room: &mut BytesMut| {
            let mut b = Builder::new(room);
            b.push(&value);
            b.finish()
        };
        let first = set(&mut room);
        let at = first.lines().as_ptr();
        drop(first);
        // Too little is left after the first set for the second: the room starts over.
        let second = set(&mut room);
        assert_eq!(second.lines().as_ptr(), at);
        // While a set is held, the next goes elsewhere and the held one is untouched.
        let third = set(&mut room);
        assert_ne!(third.lines().as_ptr(), at);
        assert_eq!(second, set(&mut BytesMut::new()));
    }

    #[test]
    fn the_room_of_a_large_set_is_not_kept() {
        let mut room = BytesMut::new();
        let mut b = Builder::new(&mut room);
        b.push(&vec![b'v'; 64 * 1024]);
        let large = b.finish();
        assert_eq!(large.lines().len(), 64 * 1024 + 2);
        drop(large);
        // Kept, the large room would be whole again for the next set.
        room.reserve(16);
        assert!(room.capacity() < 4 * 1024, "{}", room.capacity());
    }
}
