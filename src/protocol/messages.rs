//! Messages pgwarden writes itself: authentication requests, ParameterStatus, BackendKeyData,
//! ReadyForQuery, CommandComplete, NegotiateProtocolVersion and ErrorResponse. Each writer
//! appends one whole message to a buffer, back-patching the length.

use bytes::{BufMut, BytesMut};


/// Appends `tag`, a placeholder length, runs `body`, then patches the length.
fn write_message(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_i32(0);
    body(buf);
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(buf: &mut BytesMut, s: &str) {
    // A NUL inside a value would end it early and desynchronize the peer: cut it there.
    let s = s.split('\0').next().unwrap_or("");
    buf.put_slice(s.as_bytes());
    buf.put_u8(0);
}

pub fn auth_ok(buf: &mut BytesMut) {
    write_message(buf, b'R', |b| b.put_i32(0));
}

pub fn auth_cleartext_password(buf: &mut BytesMut) {
    write_message(buf, b'R', |b| b.put_i32(3));
}

pub fn auth_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    write_message(buf, b'R', |b| {
        b.put_i32(10);
        for m in mechanisms {
            put_cstr(b, m);
        }
        b.put_u8(0);
    });
}

pub fn auth_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    write_message(buf, b'R', |b| {
        b.put_i32(11);
        b.put_slice(data);
    });
}

pub fn auth_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    write_message(buf, b'R', |b| {
        b.put_i32(12);
        b.put_slice(data);
    });
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    write_message(buf, b'S', |b| {
        put_cstr(b, name);
        put_cstr(b, value);
    });
}

pub fn backend_key_data(buf: &mut BytesMut, pid: i32, secret: i32) {
    write_message(buf, b'K', |b| {
        b.put_i32(pid);
        b.put_i32(secret);
    });
}

pub fn ready_for_query_idle(buf: &mut BytesMut) {
    ready_for_query(buf, super::TxStatus::Idle);
}

pub fn ready_for_query(buf: &mut BytesMut, status: super::TxStatus) {
    write_message(buf, b'Z', |b| b.put_u8(status.byte()));
}

/// CommandComplete with its command tag (e.g. "DEALLOCATE").
pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    write_message(buf, b'C', |b| put_cstr(b, tag));
}

/// Tells a client asking for protocol 3.`minor` that we speak 3.0 and which `_pq_` options we ignored.
pub fn negotiate_protocol_version(buf: &mut BytesMut, unrecognized: &[&str]) {
    write_message(buf, b'v', |b| {
        b.put_i32(super::PROTOCOL_3_0);
        b.put_i32(unrecognized.len() as i32);
        for o in unrecognized {
            put_cstr(b, o);
        }
    });
}

/// Severity of a synthesized ErrorResponse: FATAL ends the session, ERROR does not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

pub fn error_response(buf: &mut BytesMut, severity: Severity, code: &str, message: &str) {
    let sev = match severity {
        Severity::Error => "ERROR",
        Severity::Fatal => "FATAL",
    };
    write_message(buf, b'E', |b| {
        b.put_u8(b'S');
        put_cstr(b, sev);
        b.put_u8(b'V');
        put_cstr(b, sev);
        b.put_u8(b'C');
        put_cstr(b, code);
        b.put_u8(b'M');
        put_cstr(b, message);
        b.put_u8(0);
    });
}

/// Frontend messages pgwarden sends to a backend outside of relaying.
pub fn query(buf: &mut BytesMut, sql: &str) {
    write_message(buf, b'Q', |b| put_cstr(b, sql));
}

pub fn terminate(buf: &mut BytesMut) {
    write_message(buf, b'X', |_| {});
}

pub fn cancel_request(buf: &mut BytesMut, pid: i32, secret: i32) {
    buf.put_i32(16);
    buf.put_i32(super::CANCEL_REQUEST_CODE);
    buf.put_i32(pid);
    buf.put_i32(secret);
}

/// Reads the SQLSTATE and message out of an ErrorResponse/NoticeResponse body.
pub fn parse_error_fields(mut body: &[u8]) -> (Option<String>, Option<String>) {
    let (mut code, mut message) = (None, None);
    while let Some((&field, rest)) = body.split_first() {
        if field == 0 {
            break;
        }
        let Ok((value, rest)) = super::read_cstr(rest) else { break };
        match field {
            b'C' => code = Some(value.to_owned()),
            b'M' => message = Some(value.to_owned()),
            _ => {}
        }
        body = rest;
    }
    (code, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::SqlState;

    #[test]
    fn error_response_golden_bytes() {
        let mut buf = BytesMut::new();
        error_response(&mut buf, Severity::Fatal, SqlState::INVALID_PASSWORD.code(), "no");
        let expected: &[u8] = b"E\0\0\0\x1eSFATAL\0VFATAL\0C28P01\0Mno\0\0";
        assert_eq!(&buf[..], expected);
        let (code, msg) = parse_error_fields(&buf[5..]);
        assert_eq!(code.as_deref(), Some("28P01"));
        assert_eq!(msg.as_deref(), Some("no"));
    }

    #[test]
    fn auth_sasl_lists_mechanisms() {
        let mut buf = BytesMut::new();
        auth_sasl(&mut buf, &["SCRAM-SHA-256"]);
        assert_eq!(&buf[..], b"R\0\0\0\x17\0\0\0\x0aSCRAM-SHA-256\0\0");
    }

    #[test]
    fn parameter_status_cuts_embedded_nul() {
        let mut buf = BytesMut::new();
        parameter_status(&mut buf, "a", "b\0c");
        assert_eq!(&buf[..], b"S\0\0\0\x08a\0b\0");
    }
}
