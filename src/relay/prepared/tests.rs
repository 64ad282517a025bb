//! Unit tests of the rewriter and the statement stores, with fakes of neither: byte messages in,
//! byte messages and answers out.

use super::*;

/// A client's statements, a backend's, and a relay's pipeline, all empty.
fn parts() -> (ClientStatements, BackendStatements, Pipeline) {
    Default::default()
}

fn rewriter<'a>(
    client: &'a mut ClientStatements,
    backend: &'a mut BackendStatements,
    pipeline: &'a mut Pipeline,
    max: usize,
) -> Rewriter<'a> {
    let now = backend.start_relay();
    Rewriter { client, backend, pipeline, settings: None, max, now }
}

/// (tag, body) of each message in `out`.
fn messages(out: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut v = Vec::new();
    let mut at = 0;
    while at < out.len() {
        let len = i32::from_be_bytes(out[at + 1..at + 5].try_into().unwrap()) as usize;
        v.push((out[at], out[at + 5..at + 1 + len].to_vec()));
        at += 1 + len;
    }
    v
}

#[test]
fn parse_then_bind_elsewhere_parses_it_on_the_new_backend_first() {
    let (mut client, mut first, mut second, mut expect) =
        (ClientStatements::default(), BackendStatements::default(), BackendStatements::default(), Pipeline::default());
    let mut out = BytesMut::new();
    rewriter(&mut client, &mut first, &mut expect, 10).parse(b"s1\0SELECT $1\0\0\x01\0\0\0\x17", Default::default(), false, &mut out).unwrap();
    assert_eq!(messages(&out), vec![(b'P', b"pgwarden_1\0SELECT $1\0\0\x01\0\0\0\x17".to_vec())]);
    let mut r = rewriter(&mut client, &mut first, &mut expect, 10);
    assert_eq!(r.answer(PARSE_COMPLETE).unwrap(), Answer::Pass);

    // The next transaction runs on another backend: the statement is parsed there first.
    let mut out = BytesMut::new();
    let mut r = rewriter(&mut client, &mut second, &mut expect, 10);
    r.bind(b"\0s1\0\0\0\0\x01\0\0\0\x0142\0\0", &mut out).unwrap();
    r.ready(true, false);
    assert_eq!(
        messages(&out),
        vec![
            (b'P', b"pgwarden_1\0SELECT $1\0\0\x01\0\0\0\x17".to_vec()),
            (b'B', b"\0pgwarden_1\0\0\0\0\x01\0\0\0\x0142\0\0".to_vec()),
        ]
    );
    assert_eq!(r.answer(PARSE_COMPLETE).unwrap(), Answer::Drop, "the added Parse's answer is not the client's");
    assert_eq!(r.answer(b'2').unwrap(), Answer::Pass);
    assert_eq!(r.answer(backend_tag::READY_FOR_QUERY).unwrap(), Answer::Pass);
    assert!(expect.is_empty());
    // Now the second backend has it: the Bind goes alone.
    let mut out = BytesMut::new();
    rewriter(&mut client, &mut second, &mut expect, 10).bind(b"\0s1\0\0\0\0\0\0\0", &mut out).unwrap();
    assert_eq!(messages(&out), vec![(b'B', b"\0pgwarden_1\0\0\0\0\0\0\0".to_vec())]);
}

#[test]
fn clients_preparing_the_same_statement_share_the_backends_copy() {
    let (mut a, mut b, mut backend, mut expect) =
        (ClientStatements::default(), ClientStatements::default(), BackendStatements::default(), Pipeline::default());
    let mut out = BytesMut::new();
    rewriter(&mut a, &mut backend, &mut expect, 10).parse(b"x\0SELECT 1\0\0\0", Default::default(), false, &mut out).unwrap();
    let mut out = BytesMut::new();
    rewriter(&mut b, &mut backend, &mut expect, 10).bind(b"\0x\0\0\0\0\0\0\0", &mut out).unwrap();
    assert_eq!(messages(&out), vec![(b'B', b"\0x\0\0\0\0\0\0\0".to_vec())], "b has no statement x: as it is");
    let mut out = BytesMut::new();
    rewriter(&mut b, &mut backend, &mut expect, 10).parse(b"y\0SELECT 1\0\0\0", Default::default(), false, &mut out).unwrap();
    // The backend has it: closed and parsed again under the same name, for b's ParseComplete.
    assert_eq!(
        messages(&out),
        vec![(b'C', b"Spgwarden_1\0".to_vec()), (b'P', b"pgwarden_1\0SELECT 1\0\0\0".to_vec())]
    );
    assert_eq!(backend.len(), 1);
}

#[test]
fn a_different_search_path_is_a_different_statement() {
    let (mut client, mut backend, mut expect) = parts();
    let mut out = BytesMut::new();
    rewriter(&mut client, &mut backend, &mut expect, 10).parse(b"a\0SELECT * FROM t\0\0\0", Default::default(), false, &mut out).unwrap();
    let mut r = rewriter(&mut client, &mut backend, &mut expect, 10);
    let mut other = Settings::default();
    other.set("search_path", "elsewhere");
    r.settings = Some(&other);
    r.parse(b"b\0SELECT * FROM t\0\0\0", Default::default(), false, &mut out).unwrap();
    assert_eq!(backend.len(), 2);
}

#[test]
fn a_failed_parse_leaves_no_statement_and_skipped_ones_are_forgotten() {
    let (mut client, mut backend, mut expect) = parts();
    let mut out = BytesMut::new();
    let mut r = rewriter(&mut client, &mut backend, &mut expect, 10);
    r.parse(b"bad\0SELEC 1\0\0\0", Default::default(), false, &mut out).unwrap();
    r.parse(b"good\0SELECT 1\0\0\0", Default::default(), false, &mut out).unwrap();
    r.ready(true, false);
    r.parse(b"later\0SELECT 2\0\0\0", Default::default(), false, &mut out).unwrap();
    r.ready(true, false);
    // The first Parse fails; the second is skipped up to the Sync.
    assert_eq!(r.answer(backend_tag::ERROR_RESPONSE).unwrap(), Answer::Pass);
    assert_eq!(r.answer(backend_tag::READY_FOR_QUERY).unwrap(), Answer::Pass);
    assert_eq!(r.answer(PARSE_COMPLETE).unwrap(), Answer::Pass, "the next Sync's Parse ran");
    assert_eq!(r.answer(backend_tag::READY_FOR_QUERY).unwrap(), Answer::Pass);
    assert!(expect.is_empty());
    assert_eq!(client.len(), 1, "only 'later' exists");
    assert_eq!(backend.len(), 1);
    // A name whose Parse failed may be used again.
    let mut out = BytesMut::new();
    rewriter(&mut client, &mut backend, &mut expect, 10).parse(b"bad\0SELECT 3\0\0\0", Default::default(), false, &mut out).unwrap();
}

#[test]
fn a_name_in_use_ends_the_session_and_close_frees_it() {
    let (mut client, mut backend, mut expect) = parts();
    let mut out = BytesMut::new();
    let mut r = rewriter(&mut client, &mut backend, &mut expect, 10);
    r.parse(b"s\0SELECT 1\0\0\0", Default::default(), false, &mut out).unwrap();
    assert_eq!(r.parse(b"s\0SELECT 2\0\0\0", Default::default(), false, &mut out), Err(ProtocolError::DuplicateStatement));
    let mut out = BytesMut::new();
    r.describe_or_close(b'C', b"Ss\0", &mut out).unwrap();
    assert_eq!(messages(&out), vec![(b'C', b"Spgwarden_\0".to_vec())], "the backend's copy stays");
    r.parse(b"s\0SELECT 2\0\0\0", Default::default(), false, &mut out).unwrap();
    assert_eq!(backend.len(), 2);
}

#[test]
fn over_the_limit_the_least_recently_used_statement_not_in_use_is_closed() {
    let (mut client, mut backend, mut expect) = parts();
    for (i, sql) in [b"a\0SELECT 1\0\0\0", b"b\0SELECT 2\0\0\0"].iter().enumerate() {
        let mut out = BytesMut::new();
        let mut r = rewriter(&mut client, &mut backend, &mut expect, 2);
        r.parse(&sql[..], Default::default(), false, &mut out).unwrap();
        assert_eq!(r.answer(PARSE_COMPLETE).unwrap(), Answer::Pass);
        assert_eq!(messages(&out).len(), 1, "statement {i} fits");
    }
    // "a" is used again, then a third statement: "b" is the one to go.
    let mut out = BytesMut::new();
    let mut r = rewriter(&mut client, &mut backend, &mut expect, 2);
    r.describe_or_close(b'D', b"Sa\0", &mut out).unwrap();
    r.parse(b"c\0SELECT 3\0\0\0", Default::default(), false, &mut out).unwrap();
    let m = messages(&out);
    assert_eq!(m[1], (b'C', b"Spgwarden_2\0".to_vec()));
    assert_eq!(m[2].0, b'P');
    assert_eq!(r.answer(CLOSE_COMPLETE).unwrap(), Answer::Drop);
    // Within one relay everything is in use: nothing is closed, the limit waits.
    r.parse(b"d\0SELECT 4\0\0\0", Default::default(), false, &mut out).unwrap();
    assert_eq!(backend.len(), 3);
    assert_eq!(expect.counts, Counts { client_parses: 4, backend_parses: 0, evictions: 1 });
}

#[test]
fn a_clients_name_that_looks_like_the_backends_is_never_passed_on() {
    let (mut client, mut backend, mut expect) = parts();
    let mut out = BytesMut::new();
    let mut r = rewriter(&mut client, &mut backend, &mut expect, 10);
    r.parse(b"mine\0SELECT 1\0\0\0", Default::default(), false, &mut out).unwrap();
    let mut out = BytesMut::new();
    r.bind(b"\0pgwarden_1\0\0\0\0\0\0\0", &mut out).unwrap();
    r.describe_or_close(b'D', b"Spgwarden_1\0", &mut out).unwrap();
    assert_eq!(
        messages(&out),
        vec![(b'B', b"\0pgwarden_\0\0\0\0\0\0\0".to_vec()), (b'D', b"Spgwarden_\0".to_vec())]
    );
}

#[test]
fn syncs_sent_into_a_copy_from_stdin_are_not_answered() {
    let (mut client, mut backend, mut expect) = parts();
    let mut out = BytesMut::new();
    let mut r = rewriter(&mut client, &mut backend, &mut expect, 10);
    // Bind, Execute (COPY ... FROM STDIN), Sync; CopyData, CopyDone, Sync; Close, Sync.
    r.ready(true, false);
    r.copy_end();
    r.ready(true, false);
    r.describe_or_close(b'C', b"Ss\0", &mut out).unwrap();
    r.ready(true, false);
    assert_eq!(r.copy_started(), 1, "the Sync sent with the COPY is ignored");
    assert_eq!(r.answer(backend_tag::READY_FOR_QUERY).unwrap(), Answer::Pass);
    assert_eq!(r.answer(CLOSE_COMPLETE).unwrap(), Answer::Pass);
    assert_eq!(r.answer(backend_tag::READY_FOR_QUERY).unwrap(), Answer::Pass);
    assert!(expect.is_empty());
}

#[test]
fn after_a_copy_ends_in_an_error_no_sync_is_assumed_ignored() {
    let (mut client, mut backend, mut expect) = parts();
    let mut r = rewriter(&mut client, &mut backend, &mut expect, 10);
    // Query COPY (bad data, no CopyDone), Query COPY, CopyDone, Sync: the first COPY's
    // error means the client's CopyDone ends the second, so the Sync is answered.
    r.ready(false, false);
    r.ready(false, false);
    r.copy_end();
    r.ready(true, false);
    assert_eq!(r.copy_started(), 0);
    r.pipeline.copy_failed();
    assert_eq!(r.copy_started(), 0, "the Sync is awaited: never too few");
}

#[test]
fn a_statement_parsed_after_binding_one_that_may_set_is_nobody_elses() {
    let (mut a, mut b, mut backend, mut expect) =
        (ClientStatements::default(), ClientStatements::default(), BackendStatements::default(), Pipeline::default());
    let settings = Settings::default();
    let mut out = BytesMut::new();
    let mut r = rewriter(&mut a, &mut backend, &mut expect, 10);
    r.settings = Some(&settings);
    r.parse(b"u\0SET datestyle TO 'ISO, DMY'\0\0\0", Default::default(), true, &mut out).unwrap();
    let mut expect = Pipeline::default();
    let mut r = rewriter(&mut a, &mut backend, &mut expect, 10);
    r.settings = Some(&settings);
    r.bind(b"\0u\0\0\0\0\0\0\0", &mut out).unwrap();
    r.parse(b"d\0SELECT '01/02/2024'::date\0\0\0", Default::default(), false, &mut out).unwrap();
    let mut expect = Pipeline::default();
    let mut r = rewriter(&mut b, &mut backend, &mut expect, 10);
    r.settings = Some(&settings);
    let mut out = BytesMut::new();
    r.parse(b"d\0SELECT '01/02/2024'::date\0\0\0", Default::default(), false, &mut out).unwrap();
    assert_eq!(messages(&out).len(), 1, "b's own Parse: not a's copy, parsed under DMY");
}

#[test]
fn deallocate_all_forgets_every_statement_at_once_in_order() {
    let (mut client, mut backend, mut expect) = parts();
    let mut out = BytesMut::new();
    let mut r = rewriter(&mut client, &mut backend, &mut expect, 10);
    r.parse(b"s\0SELECT 1\0\0\0", Default::default(), false, &mut out).unwrap();
    r.sql(false, Some(true));
    // The same name again, after DEALLOCATE ALL in the same pipeline: a new statement.
    r.parse(b"s\0SELECT 2\0\0\0", Default::default(), false, &mut out).unwrap();
    r.sql(false, Some(false));
    assert_eq!((client.len(), backend.len()), (1, 0), "DEALLOCATE name: the backend's copies may be gone");
}

#[test]
fn a_statement_parsed_after_sql_that_may_set_is_nobody_elses() {
    let (mut a, mut b, mut backend, mut expect) =
        (ClientStatements::default(), ClientStatements::default(), BackendStatements::default(), Pipeline::default());
    let settings = Settings::default();
    let mut out = BytesMut::new();
    let mut r = rewriter(&mut a, &mut backend, &mut expect, 10);
    r.settings = Some(&settings);
    r.sql(true, None); // SET LOCAL datestyle = ...
    r.parse(b"x\0SELECT '01/02/2024'::date\0\0\0", Default::default(), false, &mut out).unwrap();
    let mut expect = Pipeline::default();
    let mut r = rewriter(&mut b, &mut backend, &mut expect, 10);
    r.settings = Some(&settings);
    let mut out = BytesMut::new();
    r.parse(b"y\0SELECT '01/02/2024'::date\0\0\0", Default::default(), false, &mut out).unwrap();
    assert_eq!(messages(&out).len(), 1, "a Parse of its own, no Close of a's");
    assert_eq!(backend.len(), 2);
}

#[test]
fn an_error_restores_skipped_closes_and_closes_skipped_parses_later() {
    let (mut client, mut backend, mut expect) = parts();
    let mut out = BytesMut::new();
    let mut r = rewriter(&mut client, &mut backend, &mut expect, 1);
    r.parse(b"a\0SELECT 1\0\0\0", Default::default(), false, &mut out).unwrap();
    assert_eq!(r.answer(PARSE_COMPLETE).unwrap(), Answer::Pass);
    let mut r = rewriter(&mut client, &mut backend, &mut expect, 1);
    // Bind (fails), Close a, Parse b (evicts a: an added Close), Sync.
    r.describe_or_close(b'C', b"Sa\0", &mut out).unwrap();
    r.parse(b"b\0SELECT 2\0\0\0", Default::default(), false, &mut out).unwrap();
    r.ready(true, false);
    assert_eq!(r.answer(backend_tag::ERROR_RESPONSE).unwrap(), Answer::Pass);
    assert_eq!(r.answer(backend_tag::READY_FOR_QUERY).unwrap(), Answer::Pass);
    assert_eq!(client.len(), 1, "the skipped Close did not close a; b was never parsed");
    // What the error skipped is closed before the next message: a (evicted) and b (skipped).
    let mut out = BytesMut::new();
    let mut r = rewriter(&mut client, &mut backend, &mut expect, 1);
    r.begin(&mut out);
    assert_eq!(messages(&out), vec![(b'C', b"Spgwarden_2\0".to_vec()), (b'C', b"Spgwarden_1\0".to_vec())]);
    assert_eq!(r.answer(CLOSE_COMPLETE).unwrap(), Answer::Drop);
}

#[test]
fn a_query_after_a_failed_parse_is_skipped_up_to_the_sync() {
    let (mut client, mut backend, mut expect) = parts();
    let mut out = BytesMut::new();
    let mut r = rewriter(&mut client, &mut backend, &mut expect, 10);
    // Parse (fails), Query, Parse, Sync: PostgreSQL skips the Query and the second Parse.
    r.parse(b"bad\0SELEC\0\0\0", Default::default(), false, &mut out).unwrap();
    r.ready(false, false);
    r.parse(b"s2\0SELECT 2\0\0\0", Default::default(), false, &mut out).unwrap();
    r.ready(true, false);
    assert_eq!(r.answer(backend_tag::ERROR_RESPONSE).unwrap(), Answer::Pass);
    assert_eq!(r.pipeline.take_skipped_requests(), 1, "the Query's ReadyForQuery never comes");
    assert_eq!(r.answer(backend_tag::READY_FOR_QUERY).unwrap(), Answer::Pass);
    assert!(expect.is_empty());
    assert!(client.is_empty(), "neither statement exists");
    // The Query's own error: its ReadyForQuery comes.
    let mut r = rewriter(&mut client, &mut backend, &mut expect, 10);
    r.ready(false, false);
    assert_eq!(r.answer(backend_tag::ERROR_RESPONSE).unwrap(), Answer::Pass);
    assert_eq!(r.pipeline.take_skipped_requests(), 0);
}

#[test]
fn an_error_with_a_query_after_an_unsynced_bind_is_refused() {
    let (mut client, mut backend, mut expect) = parts();
    let mut r = rewriter(&mut client, &mut backend, &mut expect, 10);
    // Bind, Execute, Query, Sync: did the Execute fail (the Query skipped) or the Query?
    r.pipeline.note_extended(false);
    r.ready(false, r.pipeline.untracked_unsynced());
    r.ready(true, false);
    assert!(r.answer(backend_tag::ERROR_RESPONSE).is_err(), "skipped or failed: cannot tell");
    // After a Close (answered first), a Query's error is its own.
    let mut expect = Pipeline::default();
    let mut r = rewriter(&mut client, &mut backend, &mut expect, 10);
    let mut out = BytesMut::new();
    r.describe_or_close(b'C', b"Sold\0", &mut out).unwrap();
    r.ready(false, r.pipeline.untracked_unsynced());
    assert_eq!(r.answer(CLOSE_COMPLETE).unwrap(), Answer::Pass);
    assert_eq!(r.answer(backend_tag::ERROR_RESPONSE).unwrap(), Answer::Pass, "pgjdbc's dead-statement Closes, then a Query");
}

#[test]
fn past_twice_the_limit_even_statements_in_use_are_closed() {
    let (mut client, mut backend, mut expect) = parts();
    let mut out = BytesMut::new();
    let mut r = rewriter(&mut client, &mut backend, &mut expect, 2);
    for i in 0..10 {
        r.parse(format!("s{i}\0SELECT {i}\0\0\0").as_bytes(), Default::default(), false, &mut out).unwrap();
    }
    assert_eq!(backend.len(), 4, "one relay: up to twice the limit");
}

/// Random message bodies and answers in any order: errors, never a panic.
#[test]
fn random_messages_and_answers_never_panic() {
    let (mut client, mut backend, mut expect) = parts();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let settings = Settings::default();
    for _ in 0..20_000 {
        let mut out = BytesMut::new();
        let mut r = rewriter(&mut client, &mut backend, &mut expect, 3);
        r.settings = Some(&settings);
        let len = (next() % 12) as usize;
        // Bytes from a small alphabet, so names repeat and NULs are common.
        let body: Vec<u8> = (0..len).map(|_| b"\0\0Sab1P"[(next() % 7) as usize]).collect();
        match next() % 9 {
            0 => drop(r.parse(&body, Default::default(), false, &mut out)),
            1 => drop(r.bind(&body, &mut out)),
            2 => drop(r.describe_or_close(b'D', &body, &mut out)),
            3 => drop(r.describe_or_close(b'C', &body, &mut out)),
            4 => r.ready(next() % 2 == 0, next() % 2 == 0),
            5 => r.sql(next() % 2 == 0, [None, Some(false), Some(true)][(next() % 3) as usize]),
            6 => r.copy_end(),
            7 => drop(r.copy_started()),
            _ => drop(r.answer(b"123EZ"[(next() % 5) as usize])),
        }
        r.begin(&mut out);
    }
}

#[test]
fn malformed_messages_are_refused_not_passed_on_half_read() {
    let (mut client, mut backend, mut expect) = parts();
    let mut out = BytesMut::new();
    let mut r = rewriter(&mut client, &mut backend, &mut expect, 10);
    assert!(r.parse(b"no terminator", Default::default(), false, &mut out).is_err());
    assert!(r.bind(b"\0s", &mut out).is_err());
    assert!(r.describe_or_close(b'D', b"Sx", &mut out).is_err());
    assert!(r.answer(PARSE_COMPLETE).is_err(), "an answer for nothing");
    assert!(out.is_empty());
}
