//! The tokens of SQL text as `session_state` reads it: words, punctuation, plain string
//! literals and everything else as one opaque token; comments, quoted identifiers and
//! dollar-quoted bodies skipped whole. Must not: look past the text it is given.

use super::is;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Token<'a> {
    /// A keyword or unquoted identifier, as written.
    Word(&'a [u8]),
    Punct(u8),
    /// A plain string literal's text, between its quotes (doubled quotes left doubled).
    Str(&'a [u8]),
    /// Another literal, a quoted identifier, a parameter (`$1`), a number.
    Other,
}

pub(super) struct Lexer<'a> {
    sql: &'a [u8],
    pos: usize,
}

pub(super) const fn is_word_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

fn is_word_byte(b: u8) -> bool {
    is_word_start(b) || b.is_ascii_digit() || b == b'$'
}

impl<'a> Lexer<'a> {
    pub(super) fn new(sql: &'a [u8]) -> Self {
        Lexer { sql, pos: 0 }
    }

    fn peek(&self, ahead: usize) -> Option<u8> {
        self.sql.get(self.pos + ahead).copied()
    }

    /// Past a quoted run that opened at `pos` (the quote itself), honouring doubled quotes and,
    /// for `E'...'`, backslash escapes (with standard_conforming_strings on, every server's
    /// default since 9.1). An unterminated run ends the text.
    fn skip_quoted(&mut self, quote: u8, backslashes: bool) {
        self.pos += 1;
        while let Some(b) = self.peek(0) {
            self.pos += 1;
            if backslashes && b == b'\\' {
                self.pos += 1;
            } else if b == quote {
                if self.peek(0) == Some(quote) {
                    self.pos += 1;
                } else {
                    return;
                }
            }
        }
        self.pos = self.sql.len();
    }

    /// At a `$`: a parameter (`$1`), a dollar-quoted body (`$tag$ ... $tag$`, skipped whole),
    /// or a lone `$`.
    fn dollar(&mut self) -> Token<'a> {
        let rest = &self.sql[self.pos..];
        if rest.get(1).is_some_and(u8::is_ascii_digit) {
            self.pos += 1 + rest[1..].iter().take_while(|b| b.is_ascii_digit()).count();
            return Token::Other;
        }
        let tag_len = rest[1..].iter().take_while(|&&b| is_word_byte(b) && b != b'$').count();
        let tag_is_word = tag_len == 0 || is_word_start(rest[1]);
        if !tag_is_word || rest.get(1 + tag_len) != Some(&b'$') {
            self.pos += 1;
            return Token::Punct(b'$');
        }
        let delimiter = &rest[..tag_len + 2];
        let body = &rest[delimiter.len()..];
        self.pos += match body.windows(delimiter.len()).position(|w| w == delimiter) {
            Some(at) => delimiter.len() * 2 + at,
            None => rest.len(),
        };
        Token::Other
    }
}

impl<'a> Iterator for Lexer<'a> {
    type Item = Token<'a>;

    fn next(&mut self) -> Option<Token<'a>> {
        loop {
            let b = self.peek(0)?;
            match b {
                b' ' | b'\t' | b'\n' | b'\r' | 0x0c => self.pos += 1,
                b'-' if self.peek(1) == Some(b'-') => {
                    let line = self.sql[self.pos..].iter().position(|&c| c == b'\n');
                    self.pos = line.map_or(self.sql.len(), |n| self.pos + n + 1);
                }
                b'/' if self.peek(1) == Some(b'*') => {
                    // Block comments nest in PostgreSQL.
                    let mut depth = 0u32;
                    while self.pos < self.sql.len() {
                        match (self.peek(0), self.peek(1)) {
                            (Some(b'/'), Some(b'*')) => {
                                depth += 1;
                                self.pos += 2;
                            }
                            (Some(b'*'), Some(b'/')) => {
                                depth -= 1;
                                self.pos += 2;
                                if depth == 0 {
                                    break;
                                }
                            }
                            _ => self.pos += 1,
                        }
                    }
                }
                b'\'' => {
                    let start = self.pos;
                    self.skip_quoted(b'\'', false);
                    let text = self.sql.get(start + 1..self.pos.saturating_sub(1)).unwrap_or_default();
                    let closed = self.pos > start + 1 && self.sql[self.pos - 1] == b'\'';
                    return Some(if closed { Token::Str(text) } else { Token::Other });
                }
                b'"' => {
                    self.skip_quoted(b'"', false);
                    return Some(Token::Other);
                }
                b'$' => return Some(self.dollar()),
                b if is_word_start(b) => {
                    let start = self.pos;
                    self.pos += self.sql[start..].iter().take_while(|&&c| is_word_byte(c)).count();
                    let word = &self.sql[start..self.pos];
                    if self.peek(0) == Some(b'\'') && (is(word, b"e") || is(word, b"b") || is(word, b"x") || is(word, b"n")) {
                        self.skip_quoted(b'\'', is(word, b"e"));
                        return Some(Token::Other);
                    }
                    return Some(Token::Word(word));
                }
                b'0'..=b'9' => {
                    self.pos += self.sql[self.pos..].iter().take_while(|c| c.is_ascii_alphanumeric() || **c == b'.').count();
                    return Some(Token::Other);
                }
                b => {
                    self.pos += 1;
                    return Some(Token::Punct(b));
                }
            }
        }
    }
}
