//! Finds message boundaries in a stream of tagged messages (`tag`, `i32` length, body) as bytes
//! arrive in arbitrary chunks, without buffering or decoding bodies. The relay forwards chunks
//! untouched and only asks the scanner where messages start and end, and for the bodies of the
//! few messages it must read (ReadyForQuery, ParameterStatus, a client's SQL up to a size).
//! Every length is checked against a cap.

use super::ProtocolError;

/// Reassembly memory a scanner keeps between messages; more is given back after use.
const KEEP_SPLIT_CAPACITY: usize = 8 * 1024;

/// One complete message found in a chunk.
#[derive(Debug)]
pub struct Frame<'a> {
    pub tag: u8,
    /// The body, only for tags the caller asked to see; empty otherwise.
    pub body: &'a [u8],
    /// Offset in this chunk where the message started, `None` if it began in an earlier chunk.
    pub start: Option<usize>,
    /// Offset in this chunk just past the message's last byte.
    pub end: usize,
}

#[derive(Debug)]
pub struct MessageScanner {
    max_body: usize,
    header: [u8; 5],
    header_len: usize,
    in_body: bool,
    remaining: usize,
    tag: u8,
    capture: bool,
    split_body: Vec<u8>,
    start: Option<usize>,
}

impl MessageScanner {
    /// `max_body` caps the body length of any single message.
    pub fn new(max_body: usize) -> MessageScanner {
        MessageScanner {
            max_body,
            header: [0; 5],
            header_len: 0,
            in_body: false,
            remaining: 0,
            tag: 0,
            capture: false,
            split_body: Vec::new(),
            start: None,
        }
    }

    pub fn max_body(&self) -> usize {
        self.max_body
    }

    /// True when no message is partly seen: the stream can be handed to another peer here.
    pub fn at_boundary(&self) -> bool {
        self.header_len == 0 && !self.in_body
    }

    /// The message the last [`feed`](Self::feed) left incomplete, if it started in that chunk:
    /// its offset there, its tag, and how many more bytes at least it needs.
    pub fn partial(&self) -> Option<(usize, u8, usize)> {
        if self.at_boundary() {
            return None;
        }
        let (tag, missing) = if self.in_body { (self.tag, self.remaining) } else { (self.header[0], 5 - self.header_len) };
        self.start.map(|start| (start, tag, missing))
    }

    /// Forgets the incomplete message, as if its bytes had not been fed: the caller keeps them
    /// and feeds them again once the rest has arrived.
    pub fn forget_partial(&mut self) {
        self.header_len = 0;
        self.in_body = false;
        self.remaining = 0;
        self.capture = false;
        self.split_body.clear();
        if self.split_body.capacity() > KEEP_SPLIT_CAPACITY {
            self.split_body = Vec::new();
        }
        self.start = None;
    }

    /// Scans `data`, calling `on_frame` for each message completed in it. `wants_body(tag,
    /// body_len)` says which bodies the caller needs (a body split across chunks is copied
    /// together, so the caller bounds what it asks for).
    pub fn feed(
        &mut self,
        data: &[u8],
        wants_body: impl Fn(u8, usize) -> bool,
        mut on_frame: impl FnMut(Frame<'_>),
    ) -> Result<(), ProtocolError> {
        let mut pos = 0;
        // A message carried over from an earlier chunk did not start in this one.
        self.start = None;
        while pos < data.len() {
            // Fast path: a whole header at a boundary is read in place (most messages).
            if !self.in_body && self.header_len == 0 && data.len() - pos >= 5 {
                let tag = data[pos];
                let len = i32::from_be_bytes([data[pos + 1], data[pos + 2], data[pos + 3], data[pos + 4]]);
                if len < 4 || (len as usize - 4) > self.max_body {
                    return Err(ProtocolError::BadLength { len: len as i64, max: self.max_body });
                }
                let body_len = len as usize - 4;
                let body_at = pos + 5;
                if data.len() - body_at >= body_len {
                    let end = body_at + body_len;
                    let body = if wants_body(tag, body_len) { &data[body_at..end] } else { &[] };
                    on_frame(Frame { tag, body, start: Some(pos), end });
                    pos = end;
                    continue;
                }
            }
            if !self.in_body {
                if self.header_len == 0 {
                    self.start = Some(pos);
                }
                let take = (5 - self.header_len).min(data.len() - pos);
                self.header[self.header_len..self.header_len + take].copy_from_slice(&data[pos..pos + take]);
                self.header_len += take;
                pos += take;
                if self.header_len < 5 {
                    return Ok(());
                }
                let len = i32::from_be_bytes([self.header[1], self.header[2], self.header[3], self.header[4]]);
                if len < 4 || (len as usize - 4) > self.max_body {
                    return Err(ProtocolError::BadLength { len: len as i64, max: self.max_body });
                }
                self.tag = self.header[0];
                self.remaining = len as usize - 4;
                self.header_len = 0;
                self.in_body = true;
                self.capture = wants_body(self.tag, self.remaining);
                self.split_body.clear();
            }
            let take = self.remaining.min(data.len() - pos);
            let chunk = &data[pos..pos + take];
            pos += take;
            self.remaining -= take;
            let whole_here = self.split_body.is_empty() && self.remaining == 0;
            if self.capture && !whole_here {
                self.split_body.extend_from_slice(chunk);
            }
            if self.remaining == 0 {
                self.in_body = false;
                let body: &[u8] = match (self.capture, whole_here) {
                    (false, _) => &[],
                    (true, true) => chunk,
                    (true, false) => &self.split_body,
                };
                on_frame(Frame { tag: self.tag, body, start: self.start.take(), end: pos });
                if self.split_body.capacity() > KEEP_SPLIT_CAPACITY {
                    // A large body was reassembled: do not keep its memory for the session.
                    self.split_body = Vec::new();
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn collect(scanner: &mut MessageScanner, data: &[u8]) -> Vec<(u8, Vec<u8>, Option<usize>, usize)> {
        let mut out = Vec::new();
        scanner
            .feed(data, |t, _| t == b'Z' || t == b'S', |f| out.push((f.tag, f.body.to_vec(), f.start, f.end)))
            .unwrap();
        out
    }

    #[test]
    fn feed_whole_messages_reports_offsets_and_wanted_bodies() {
        let mut data = msg(b'C', b"SELECT 1\0");
        data.extend(msg(b'Z', b"I"));
        data.extend(msg(b'S', b""));
        let mut s = MessageScanner::new(1024);
        let got = collect(&mut s, &data);
        assert_eq!(
            got,
            vec![(b'C', vec![], Some(0), 14), (b'Z', b"I".to_vec(), Some(14), 20), (b'S', vec![], Some(20), 25)]
        );
        assert!(s.at_boundary());
    }

    #[test]
    fn feed_byte_by_byte_reassembles_split_headers_and_bodies() {
        let mut data = msg(b'S', b"TimeZone\0UTC\0");
        data.extend(msg(b'Z', b"T"));
        let mut s = MessageScanner::new(1024);
        let mut got = Vec::new();
        for (i, b) in data.iter().enumerate() {
            for f in collect(&mut s, std::slice::from_ref(b)) {
                got.push((f.0, f.1, i));
            }
            assert_eq!(s.at_boundary(), i == 17 || i == data.len() - 1);
        }
        assert_eq!(got, vec![(b'S', b"TimeZone\0UTC\0".to_vec(), 17), (b'Z', b"T".to_vec(), 23)]);
    }

    /// The in-place fast path and the reassembling slow path agree wherever a chunk ends.
    #[test]
    fn feed_gives_the_same_frames_wherever_the_stream_is_cut() {
        let mut data = msg(b'T', b"rowdesc");
        data.extend(msg(b'S', b"TimeZone\0UTC\0"));
        data.extend(msg(b'D', &[7; 40]));
        data.extend(msg(b'Z', b"I"));
        let whole: Vec<(u8, Vec<u8>)> = collect(&mut MessageScanner::new(1024), &data).into_iter().map(|f| (f.0, f.1)).collect();
        assert_eq!(whole.len(), 4);
        for a in 0..=data.len() {
            for b in a..=data.len() {
                let mut s = MessageScanner::new(1024);
                let mut got = Vec::new();
                for (offset, chunk) in [(0, &data[..a]), (a, &data[a..b]), (b, &data[b..])] {
                    for f in collect(&mut s, chunk) {
                        got.push((f.0, f.1));
                        assert!(offset + f.3 <= data.len());
                    }
                }
                assert_eq!(got, whole, "cut at {a} and {b}");
                assert!(s.at_boundary());
            }
        }
    }

    #[test]
    fn partial_message_can_be_forgotten_and_fed_again_whole() {
        let mut data = msg(b'Z', b"I");
        let parse = msg(b'P', b"s1\0SELECT 1\0\0\0");
        data.extend_from_slice(&parse[..9]);
        let mut s = MessageScanner::new(1024);
        assert_eq!(collect(&mut s, &data).len(), 1);
        assert_eq!(s.partial(), Some((6, b'P', parse.len() - 9)));
        s.forget_partial();
        assert!(s.at_boundary() && s.partial().is_none());
        let got = collect(&mut s, &parse);
        assert_eq!((got[0].0, got[0].2, got[0].3), (b'P', Some(0), parse.len()));
        // Started in an earlier chunk: no offset in this one, so nothing to forget.
        let mut s = MessageScanner::new(1024);
        collect(&mut s, &parse[..3]);
        collect(&mut s, &parse[3..6]);
        assert_eq!(s.partial(), None);
        assert_eq!(collect(&mut s, &parse[6..])[0].2, None);
    }

    #[test]
    fn feed_oversize_length_is_refused() {
        let mut s = MessageScanner::new(1024);
        let err = s.feed(&[b'Q', 0x7f, 0xff, 0xff, 0xff], |_, _| false, |_| {}).unwrap_err();
        assert!(matches!(err, ProtocolError::BadLength { .. }));
    }

    #[test]
    fn feed_length_below_four_is_refused() {
        let mut s = MessageScanner::new(1024);
        assert!(s.feed(&[b'Q', 0, 0, 0, 3], |_, _| false, |_| {}).is_err());
        let mut s = MessageScanner::new(1024);
        assert!(s.feed(&[b'Q', 0xff, 0xff, 0xff, 0xff], |_, _| false, |_| {}).is_err());
    }
}
