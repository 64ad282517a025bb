//! The RDS IAM auth token format, sans-io: parsing a token (`host:port/?Action=connect&...`),
//! rebuilding its SigV4 canonical request and string to sign, deriving the signing key, and
//! minting a token (for `pgwarden token` and tests). Nothing here knows about keys we trust,
//! clocks or caches: [`super::iam`] decides whether a parsed, signed token is acceptable.

use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
pub const SERVICE: &str = "rds-db";
/// The longest token accepted; real ones, with an STS session token, stay under 3 KiB.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;
/// RDS caps a token's lifetime at 15 minutes.
pub const MAX_EXPIRES_SECS: u64 = 900;
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Why a token could not be read. Names the part, never echoes the token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token longer than {MAX_TOKEN_LEN} bytes")]
    TooLong,
    #[error("token is not host:port/?query")]
    Shape,
    #[error("malformed percent-encoding in parameter {0}")]
    Encoding(&'static str),
    #[error("parameter {0} appears twice")]
    Duplicate(String),
    #[error("missing parameter {0}")]
    Missing(&'static str),
    #[error("unexpected parameter {0}")]
    Unexpected(String),
    #[error("bad value for {0}")]
    BadValue(&'static str),
}

/// The parameters a token may carry, in canonical (sorted) order.
const PARAMS: [&str; 9] = [
    "Action",
    "DBUser",
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-Security-Token",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
];

/// A token taken apart. Values are percent-decoded. The session token and signature are not
/// secrets on their own (the token is), but a parsed token is still never logged whole.
pub struct ParsedToken {
    /// As written in the token (the canonical host line lower-cases it).
    pub host: String,
    pub port: u16,
    pub db_user: String,
    pub access_key_id: String,
    /// `yyyymmdd` from the credential scope.
    pub scope_date: String,
    pub region: String,
    /// `yyyymmddTHHMMSSZ`.
    pub amz_date: String,
    /// Seconds since the epoch of `amz_date`.
    pub signed_at: u64,
    pub expires_secs: u64,
    pub security_token: Option<SecretString>,
    /// 32 bytes, from the 64 hex digits.
    pub signature: [u8; 32],
    /// The canonical query string (every parameter but the signature, encoded and sorted).
    canonical_query: String,
}

impl std::fmt::Debug for ParsedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParsedToken")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("db_user", &self.db_user)
            .field("access_key_id", &self.access_key_id)
            .field("region", &self.region)
            .field("amz_date", &self.amz_date)
            .finish_non_exhaustive()
    }
}

/// A cheap test for "this password is meant to be an IAM token", used where a user may log in
/// with either a token or a password.
pub fn looks_like_token(password: &str) -> bool {
    password.contains("X-Amz-Signature=") && password.contains("/?")
}

pub fn parse(token: &str) -> Result<ParsedToken, TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::TooLong);
    }
    let (endpoint, query) = token.split_once("/?").ok_or(TokenError::Shape)?;
    // aws-sdk-rds leaves out the default HTTPS port: no port means 443.
    let (host, port) = endpoint.rsplit_once(':').unwrap_or((endpoint, "443"));
    if host.is_empty() || host.bytes().any(|b| b.is_ascii_whitespace() || b == b'/' || b == b'@') {
        return Err(TokenError::Shape);
    }
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TokenError::Shape);
    }
    let port: u16 = port.parse().map_err(|_| TokenError::Shape)?;
    let mut values: [Option<String>; PARAMS.len()] = Default::default();
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').ok_or(TokenError::Shape)?;
        let key = percent_decode(key).ok_or(TokenError::Encoding("name"))?;
        let slot = PARAMS.iter().position(|p| *p == key).ok_or_else(|| TokenError::Unexpected(printable(&key)))?;
        let value = percent_decode(value).ok_or(TokenError::Encoding(PARAMS[slot]))?;
        if values[slot].replace(value).is_some() {
            return Err(TokenError::Duplicate(key));
        }
    }
    let [action, db_user, algorithm, credential, amz_date, expires, security_token, signed_headers, signature] = values;
    let action = action.ok_or(TokenError::Missing("Action"))?;
    let db_user = db_user.ok_or(TokenError::Missing("DBUser"))?;
    let algorithm = algorithm.ok_or(TokenError::Missing("X-Amz-Algorithm"))?;
    let credential = credential.ok_or(TokenError::Missing("X-Amz-Credential"))?;
    let amz_date = amz_date.ok_or(TokenError::Missing("X-Amz-Date"))?;
    let expires = expires.ok_or(TokenError::Missing("X-Amz-Expires"))?;
    let signed_headers = signed_headers.ok_or(TokenError::Missing("X-Amz-SignedHeaders"))?;
    let signature = signature.ok_or(TokenError::Missing("X-Amz-Signature"))?;
    if action != "connect" {
        return Err(TokenError::BadValue("Action"));
    }
    if db_user.is_empty() {
        return Err(TokenError::BadValue("DBUser"));
    }
    if algorithm != ALGORITHM {
        return Err(TokenError::BadValue("X-Amz-Algorithm"));
    }
    if signed_headers != "host" {
        return Err(TokenError::BadValue("X-Amz-SignedHeaders"));
    }
    let mut scope = credential.split('/');
    let (Some(access_key_id), Some(scope_date), Some(region), Some(service), Some(terminator), None) =
        (scope.next(), scope.next(), scope.next(), scope.next(), scope.next(), scope.next())
    else {
        return Err(TokenError::BadValue("X-Amz-Credential"));
    };
    if service != SERVICE || terminator != "aws4_request" || !is_access_key_id(access_key_id) || !is_region(region) {
        return Err(TokenError::BadValue("X-Amz-Credential"));
    }
    let signed_at = parse_amz_date(&amz_date).ok_or(TokenError::BadValue("X-Amz-Date"))?;
    if scope_date != &amz_date[..8] {
        return Err(TokenError::BadValue("X-Amz-Credential"));
    }
    let expires_secs: u64 = match expires.parse() {
        Ok(n) if expires.bytes().all(|b| b.is_ascii_digit()) => n,
        _ => return Err(TokenError::BadValue("X-Amz-Expires")),
    };
    let signature = parse_hex32(&signature).ok_or(TokenError::BadValue("X-Amz-Signature"))?;

    let canonical_query = canonical_query(&[
        ("Action", Some(&action)),
        ("DBUser", Some(&db_user)),
        ("X-Amz-Algorithm", Some(&algorithm)),
        ("X-Amz-Credential", Some(&credential)),
        ("X-Amz-Date", Some(&amz_date)),
        ("X-Amz-Expires", Some(&expires)),
        ("X-Amz-Security-Token", security_token.as_deref()),
        ("X-Amz-SignedHeaders", Some(&signed_headers)),
    ]);
    Ok(ParsedToken {
        host: host.to_owned(),
        port,
        db_user,
        access_key_id: access_key_id.to_owned(),
        scope_date: scope_date.to_owned(),
        region: region.to_owned(),
        amz_date,
        signed_at,
        expires_secs,
        security_token: security_token.map(SecretString::from),
        signature,
        canonical_query,
    })
}

impl ParsedToken {
    /// The SigV4 string to sign for this token.
    pub fn string_to_sign(&self) -> String {
        string_to_sign(&self.host, self.port, &self.canonical_query, &self.amz_date, &self.scope_date, &self.region)
    }
}

/// An access key id: letters and digits (AKIA..., ASIA...), bounded.
fn is_access_key_id(s: &str) -> bool {
    (1..=128).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// A region name (`us-east-1`, `cn-north-1`, `us-gov-west-1`): it goes into the policy
/// resource ARN, so nothing that could reshape that ARN (`:`, `/`, `*`) gets in.
fn is_region(s: &str) -> bool {
    (1..=32).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// `key=value` pairs, encoded and joined in the (already sorted) order given; `None` leaves
/// its pair out (only the optional session token can be absent).
fn canonical_query(pairs: &[(&str, Option<&str>)]) -> String {
    let mut out = String::with_capacity(512);
    for (key, value) in pairs {
        let Some(value) = value else { continue };
        if !out.is_empty() {
            out.push('&');
        }
        percent_encode_into(&mut out, key);
        out.push('=');
        percent_encode_into(&mut out, value);
    }
    out
}

fn string_to_sign(host: &str, port: u16, canonical_query: &str, amz_date: &str, scope_date: &str, region: &str) -> String {
    let host = host.to_ascii_lowercase();
    let host_line = if port == 443 { host } else { format!("{host}:{port}") };
    let canonical_request = format!("GET\n/\n{canonical_query}\nhost:{host_line}\n\nhost\n{EMPTY_SHA256}");
    let hashed = hex(&Sha256::digest(canonical_request.as_bytes()));
    format!("{ALGORITHM}\n{amz_date}\n{scope_date}/{region}/{SERVICE}/aws4_request\n{hashed}")
}

/// The SigV4 signing key: HMAC chain over date, region, service, terminator.
pub fn signing_key(secret_access_key: &SecretString, scope_date: &str, region: &str) -> [u8; 32] {
    let k_secret = format!("AWS4{}", secret_access_key.expose_secret());
    let k_date = hmac(k_secret.as_bytes(), scope_date.as_bytes());
    let k_region = hmac(&k_date, region.as_bytes());
    let k_service = hmac(&k_region, SERVICE.as_bytes());
    hmac(&k_service, b"aws4_request")
}

pub fn sign(signing_key: &[u8; 32], string_to_sign: &str) -> [u8; 32] {
    hmac(signing_key, string_to_sign.as_bytes())
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// What it takes to mint a token.
pub struct SigningCredentials<'a> {
    pub access_key_id: &'a str,
    pub secret_access_key: &'a SecretString,
    pub session_token: Option<&'a SecretString>,
}

/// Mints a token, as `aws rds generate-db-auth-token` does, signed at `unix_secs`.
pub fn mint(host: &str, port: u16, db_user: &str, region: &str, creds: &SigningCredentials<'_>, unix_secs: u64, expires_secs: u64) -> SecretString {
    let amz_date = format_amz_date(unix_secs);
    let scope_date = &amz_date[..8];
    let credential = format!("{}/{scope_date}/{region}/{SERVICE}/aws4_request", creds.access_key_id);
    let expires = expires_secs.to_string();
    let query = canonical_query(&[
        ("Action", Some("connect")),
        ("DBUser", Some(db_user)),
        ("X-Amz-Algorithm", Some(ALGORITHM)),
        ("X-Amz-Credential", Some(&credential)),
        ("X-Amz-Date", Some(&amz_date)),
        ("X-Amz-Expires", Some(&expires)),
        ("X-Amz-Security-Token", creds.session_token.map(|t| t.expose_secret())),
        ("X-Amz-SignedHeaders", Some("host")),
    ]);
    let key = signing_key(creds.secret_access_key, scope_date, region);
    let signature = sign(&key, &string_to_sign(host, port, &query, &amz_date, scope_date, region));
    SecretString::from(format!("{host}:{port}/?{query}&X-Amz-Signature={}", hex(&signature)))
}

/// SigV4 URI encoding: unreserved characters stay, everything else is `%XX` (upper case).
fn percent_encode_into(out: &mut String, s: &str) {
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(char::from(b"0123456789ABCDEF"[(b >> 4) as usize]));
            out.push(char::from(b"0123456789ABCDEF"[(b & 15) as usize]));
        }
    }
}

/// `%XX` decoding; `None` on a bad escape or bytes that are not UTF-8. `+` stays `+`.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hi = (*bytes.get(i + 1)? as char).to_digit(16)?;
            let lo = (*bytes.get(i + 2)? as char).to_digit(16)?;
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A parameter name for an error message: short and printable, never a value.
fn printable(s: &str) -> String {
    s.chars().take(40).map(|c| if c.is_ascii_graphic() { c } else { '?' }).collect()
}

pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(b"0123456789abcdef"[(b >> 4) as usize]));
        s.push(char::from(b"0123456789abcdef"[(b & 15) as usize]));
    }
    s
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.as_bytes().chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// `yyyymmddTHHMMSSZ` to seconds since the epoch (UTC).
pub fn parse_amz_date(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    // ASCII first: the slices below must not split a multi-byte character.
    if b.len() != 16 || !s.is_ascii() || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<u64> {
        let part = &s[range];
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    let (year, month, day) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (hour, minute, second) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1970..=9999).contains(&year) || !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

pub fn format_amz_date(unix_secs: u64) -> String {
    let (year, month, day) = civil_from_days(unix_secs / 86_400);
    let rem = unix_secs % 86_400;
    format!("{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

fn is_leap(y: u64) -> bool {
    y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)
}

fn days_in_month(y: u64, m: u64) -> u64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 (Howard Hinnant's algorithm, for years ≥ 1970).
fn days_from_civil(y: u64, m: u64, d: u64) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: u64) -> (u64, u64, u64) {
    let z = z + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const AT: u64 = 1_724_709_600; // 2024-08-26T22:00:00Z

    fn mint_vector(host: &str, port: u16, user: &str, region: &str, session: Option<&str>) -> String {
        let secret = SecretString::from("secret");
        let session = session.map(SecretString::from);
        let creds = SigningCredentials { access_key_id: "akid", secret_access_key: &secret, session_token: session.as_ref() };
        mint(host, port, user, region, &creds, AT, 900).expose_secret().to_owned()
    }

    fn signature_of(token: &str) -> &str {
        token.rsplit_once("X-Amz-Signature=").unwrap().1
    }

    /// The golden vectors of REFERENCE.md §1 (checked against botocore and aws-sdk-rds).
    #[test]
    fn mint_matches_golden_vectors() {
        let t = mint_vector("prod-instance.us-east-1.rds.amazonaws.com", 3306, "peccy", "us-east-1", None);
        assert_eq!(signature_of(&t), "dd0cba843009474347af724090233265628ace491ea17ce3eb3da098b983ad89");
        let t = mint_vector("db.local", 5432, "app user", "us-east-1", Some("tok/with+chars="));
        assert_eq!(signature_of(&t), "39ad4939a439eedb3814053019b940ddb8680285b9edec35a6fa151a51bf6587");
        let t = mint_vector("Proxy.Example.COM", 443, "u+x", "eu-west-1", None);
        assert_eq!(signature_of(&t), "03981a8160b2af07c5c09b869441c35cf8d70f67bbbac1eae584a479c0669290");
        assert!(t.starts_with("Proxy.Example.COM:443/?Action=connect&DBUser=u%2Bx&"), "{t}");
    }

    #[test]
    fn golden_canonical_request_hashes_as_documented() {
        let t = mint_vector("prod-instance.us-east-1.rds.amazonaws.com", 3306, "peccy", "us-east-1", None);
        let parsed = parse(&t).unwrap();
        assert_eq!(
            parsed.canonical_query,
            "Action=connect&DBUser=peccy&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=akid%2F20240826%2Fus-east-1%2Frds-db%2Faws4_request&X-Amz-Date=20240826T220000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host"
        );
    }

    #[test]
    fn parse_then_resign_reproduces_the_signature() {
        for (host, port, user, region, session) in [
            ("prod-instance.us-east-1.rds.amazonaws.com", 3306, "peccy", "us-east-1", None),
            ("db.local", 5432, "app user", "us-east-1", Some("tok/with+chars=")),
            ("Proxy.Example.COM", 443, "u+x", "eu-west-1", None),
        ] {
            let t = mint_vector(host, port, user, region, session);
            let p = parse(&t).unwrap();
            assert_eq!((p.host.as_str(), p.port, p.db_user.as_str(), p.region.as_str()), (host, port, user, region));
            assert_eq!(p.signed_at, AT);
            let key = signing_key(&SecretString::from("secret"), &p.scope_date, &p.region);
            assert_eq!(sign(&key, &p.string_to_sign()), p.signature);
        }
    }

    #[test]
    fn a_token_without_a_port_is_for_443() {
        let t = mint_vector("Proxy.Example.COM", 443, "u+x", "eu-west-1", None).replacen(":443/", "/", 1);
        let p = parse(&t).unwrap();
        assert_eq!((p.host.as_str(), p.port), ("Proxy.Example.COM", 443));
        let key = signing_key(&SecretString::from("secret"), &p.scope_date, &p.region);
        assert_eq!(sign(&key, &p.string_to_sign()), p.signature);
    }

    #[test]
    fn parse_rejects_each_malformed_part() {
        let good = mint_vector("db.local", 5432, "app", "us-east-1", None);
        let cases: Vec<(String, TokenError)> = vec![
            ("x".repeat(MAX_TOKEN_LEN + 1), TokenError::TooLong),
            ("no-query-here".into(), TokenError::Shape),
            (good.replacen(":5432", ":99999", 1), TokenError::Shape),
            (good.replacen(":5432", ":+5432", 1), TokenError::Shape),
            (good.replacen("us-east-1", "x:222222222222:dbuser:y", 1), TokenError::BadValue("X-Amz-Credential")),
            (good.replacen("us-east-1", "US-EAST-1", 1), TokenError::BadValue("X-Amz-Credential")),
            (good.replacen("akid%2F", "ak%2Ad%2F", 1), TokenError::BadValue("X-Amz-Credential")),
            (good.replacen("20240826T220000Z", "202%C3%A9082T220000Z", 1), TokenError::BadValue("X-Amz-Date")),
            (good.replacen("Action=connect", "Action=connect&Action=connect", 1), TokenError::Duplicate("Action".into())),
            (good.replacen("Action=connect&", "", 1), TokenError::Missing("Action")),
            (good.replacen("DBUser=app&", "", 1), TokenError::Missing("DBUser")),
            (good.replacen("Action=connect", "Action=connect&Foo=1", 1), TokenError::Unexpected("Foo".into())),
            (good.replacen("Action=connect", "Action=admin", 1), TokenError::BadValue("Action")),
            (good.replacen("X-Amz-Expires=900", "X-Amz-Expires=%2B900", 1), TokenError::BadValue("X-Amz-Expires")),
            (good.replacen("rds-db", "s3", 1), TokenError::BadValue("X-Amz-Credential")),
            (good.replacen("%2F20240826%2F", "%2F20240827%2F", 1), TokenError::BadValue("X-Amz-Credential")),
            (good.replacen("20240826T220000Z", "20241326T220000Z", 1), TokenError::BadValue("X-Amz-Date")),
            (good.replacen("SignedHeaders=host", "SignedHeaders=host%3Bx", 1), TokenError::BadValue("X-Amz-SignedHeaders")),
            (good.replacen("DBUser=app", "DBUser=%zz", 1), TokenError::Encoding("DBUser")),
            (format!("{}0", good), TokenError::BadValue("X-Amz-Signature")),
        ];
        for (token, want) in cases {
            assert_eq!(parse(&token).map(|_| ()).unwrap_err(), want, "{token}");
        }
    }

    #[test]
    fn amz_dates_round_trip_and_refuse_nonsense() {
        for secs in [0, AT, 951_782_400 /* 2000-02-29 */, 4_102_444_799] {
            assert_eq!(parse_amz_date(&format_amz_date(secs)), Some(secs));
        }
        assert_eq!(format_amz_date(AT), "20240826T220000Z");
        for bad in ["20240230T000000Z", "20240826T250000Z", "2024-08-26T22:00", "+0240826T220000Z", "202é082T220000Z"] {
            assert_eq!(parse_amz_date(bad), None, "{bad}");
        }
    }

    #[test]
    fn debug_of_a_parsed_token_omits_signature_and_session_token() {
        let t = mint_vector("db.local", 5432, "app", "us-east-1", Some("sessiontok"));
        let text = format!("{:?}", parse(&t).unwrap());
        assert!(!text.contains("sessiontok") && !text.contains(signature_of(&t)), "{text}");
    }
}
