//! The first packet of a connection: SSLRequest, GSSENCRequest, CancelRequest or StartupMessage.

use super::{
    CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, ProtocolError, SSL_REQUEST_CODE, read_cstr,
};

/// A parsed first packet. Parameters keep the client's order.
#[derive(Debug, PartialEq, Eq)]
pub enum StartupRequest {
    Ssl,
    GssEnc,
    Cancel { pid: i32, secret: i32 },
    Startup { minor: u16, params: Vec<(String, String)> },
}

/// Parses the body of a first packet (everything after its 4-byte length).
pub fn parse_startup(body: &[u8]) -> Result<StartupRequest, ProtocolError> {
    if body.len() < 4 {
        return Err(ProtocolError::Malformed("startup packet too short"));
    }
    let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    let rest = &body[4..];
    match code {
        SSL_REQUEST_CODE if rest.is_empty() => Ok(StartupRequest::Ssl),
        GSSENC_REQUEST_CODE if rest.is_empty() => Ok(StartupRequest::GssEnc),
        CANCEL_REQUEST_CODE => {
            // Protocol 3.0 keys are 4 bytes; 3.2 allows up to 256, which we never hand out.
            if rest.len() != 8 {
                return Err(ProtocolError::Malformed("cancel request has a bad key length"));
            }
            let pid = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
            let secret = i32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]);
            Ok(StartupRequest::Cancel { pid, secret })
        }
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE => Err(ProtocolError::Malformed("request code with a body")),
        version => {
            let major = (version >> 16) as u16;
            let minor = (version & 0xffff) as u16;
            if major != 3 {
                return Err(ProtocolError::UnsupportedVersion { major, minor });
            }
            let params = parse_params(rest)?;
            Ok(StartupRequest::Startup { minor, params })
        }
    }
}

fn parse_params(mut buf: &[u8]) -> Result<Vec<(String, String)>, ProtocolError> {
    let mut params = Vec::new();
    loop {
        match buf {
            [0] => return Ok(params),
            [] => return Err(ProtocolError::Malformed("startup parameters are not terminated")),
            _ => {}
        }
        let (name, rest) = read_cstr(buf)?;
        if name.is_empty() {
            return Err(ProtocolError::Malformed("empty startup parameter name"));
        }
        let (value, rest) = read_cstr(rest)?;
        if params.iter().any(|(n, _)| n == name) {
            return Err(ProtocolError::Malformed("duplicate startup parameter"));
        }
        params.push((name.to_owned(), value.to_owned()));
        buf = rest;
    }
}

/// Splits a libpq `options` value (`-c a=b --c=d`, backslash escapes spaces) into settings.
/// Anything but `-c`/`--name=value` is refused: the proxy cannot forward other backend switches.
pub fn parse_options(options: &str) -> Result<Vec<(String, String)>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    word.push(next);
                }
            }
            c if c.is_ascii_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    let mut settings = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let assignment = if w == "-c" {
            it.next().ok_or_else(|| "-c without a setting".to_owned())?
        } else if let Some(rest) = w.strip_prefix("-c") {
            rest.to_owned()
        } else if let Some(rest) = w.strip_prefix("--") {
            rest.to_owned()
        } else {
            return Err(w);
        };
        let (name, value) = assignment.split_once('=').ok_or_else(|| assignment.clone())?;
        settings.push((name.replace('-', "_"), value.to_owned()));
    }
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: i32, tail: &[u8]) -> Vec<u8> {
        let mut v = code.to_be_bytes().to_vec();
        v.extend_from_slice(tail);
        v
    }

    #[test]
    fn parse_startup_protocol_3_0_returns_params() {
        let body = packet(196_608, b"user\0app\0database\0db\0\0");
        assert_eq!(
            parse_startup(&body).unwrap(),
            StartupRequest::Startup {
                minor: 0,
                params: vec![("user".into(), "app".into()), ("database".into(), "db".into())]
            }
        );
    }

    #[test]
    fn parse_startup_protocol_3_2_reports_minor() {
        let body = packet(196_610, b"user\0app\0\0");
        assert!(matches!(parse_startup(&body).unwrap(), StartupRequest::Startup { minor: 2, .. }));
    }

    #[test]
    fn parse_startup_protocol_2_is_unsupported() {
        let body = packet(131_072, b"user\0app\0\0");
        assert_eq!(
            parse_startup(&body).unwrap_err(),
            ProtocolError::UnsupportedVersion { major: 2, minor: 0 }
        );
    }

    #[test]
    fn parse_startup_truncated_params_is_malformed() {
        assert!(parse_startup(&packet(196_608, b"user\0ap")).is_err());
        assert!(parse_startup(&packet(196_608, b"user\0app\0")).is_err());
        assert!(parse_startup(&[0, 3]).is_err());
    }

    #[test]
    fn parse_startup_duplicate_param_is_malformed() {
        assert!(parse_startup(&packet(196_608, b"user\0a\0user\0b\0\0")).is_err());
    }

    #[test]
    fn parse_startup_ssl_gss_cancel() {
        assert_eq!(parse_startup(&packet(80_877_103, b"")).unwrap(), StartupRequest::Ssl);
        assert_eq!(parse_startup(&packet(80_877_104, b"")).unwrap(), StartupRequest::GssEnc);
        let mut tail = 7i32.to_be_bytes().to_vec();
        tail.extend_from_slice(&(-9i32).to_be_bytes());
        assert_eq!(
            parse_startup(&packet(80_877_102, &tail)).unwrap(),
            StartupRequest::Cancel { pid: 7, secret: -9 }
        );
        assert!(parse_startup(&packet(80_877_102, &tail[..5])).is_err());
    }

    #[test]
    fn parse_options_handles_c_forms_and_escapes() {
        let got = parse_options(r"-c search_path=a,b --statement-timeout=5s -cwork_mem=1MB -c x=with\ space").unwrap();
        assert_eq!(
            got,
            vec![
                ("search_path".into(), "a,b".into()),
                ("statement_timeout".into(), "5s".into()),
                ("work_mem".into(), "1MB".into()),
                ("x".into(), "with space".into()),
            ]
        );
        assert_eq!(parse_options("-B 100").unwrap_err(), "-B");
    }
}
