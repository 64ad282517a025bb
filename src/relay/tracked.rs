//! The relay's path for a client with named prepared statements ([`super::prepared`]): the
//! client's Parse, Bind, Describe and Close are passed on whole, rewritten, with any Parse or
//! Close the backend needs first; a message of those kinds not yet whole is held back until it
//! is. Backend answers to the added messages are cut out of the stream, and so is held back the
//! start of one not yet whole. Everything else streams through as on the untracked path.

use bytes::BytesMut;

use super::prepared::{self, BackendStatements, ClientStatements, Pipeline, Rewriter};
use super::{Forward, Relay, SQL_READ_LIMIT, session_state};
use crate::backend::settings::Settings;
use crate::protocol::{MessageScanner, ProtocolError, frontend_tag};

/// A tracked client's statements, and what its relays need for them.
#[derive(Debug, Default)]
pub struct TrackedClient {
    statements: ClientStatements,
    /// What the backend owes the current relay (empty between relays).
    pipeline: Pipeline,
    /// Where rewritten messages are written: a pooled read buffer, given back after each relay.
    scratch: BytesMut,
}

impl TrackedClient {
    pub(super) fn rewriter<'a>(
        &'a mut self,
        backend: &'a mut BackendStatements,
        max: usize,
        now: u64,
        settings: Option<&'a Settings>,
    ) -> Rewriter<'a> {
        Rewriter { client: &mut self.statements, backend, pipeline: &mut self.pipeline, settings, max, now }
    }

    /// A relay ended: an idle client keeps no buffer, and a relay left unfinished (the session
    /// ends then) nothing owed.
    /// Statements parsed in the rest of this relay are not to be shared (`unsure`).
    pub(super) fn settings_unsure_if(&mut self, unsure: bool) {
        self.pipeline.settings_unsure(unsure);
    }

    /// Returns what the relay did with statements.
    pub(super) fn relay_ended(&mut self) -> prepared::Counts {
        let counts = std::mem::take(&mut self.pipeline).counts;
        if self.scratch.capacity() > 0 {
            crate::bufpool::give(std::mem::take(&mut self.scratch));
        }
        counts
    }
}

/// Cuts the `drops` ranges out of `buf` and holds back a trailing, incomplete ParseComplete or
/// CloseComplete (it may be one to drop): the backend's chunk becomes `buf[..returned]`, and
/// the held bytes follow it.
pub(super) fn cut(scanner: &mut MessageScanner, buf: &mut BytesMut, drops: &[(usize, usize)]) -> usize {
    let mut hold_from = buf.len();
    if let Some((start, b'1' | b'3', _)) = scanner.partial() {
        scanner.forget_partial();
        hold_from = start;
    }
    if drops.is_empty() {
        return hold_from;
    }
    let mut write = drops[0].0;
    for (i, &(_, end)) in drops.iter().enumerate() {
        let next = drops.get(i + 1).map_or(hold_from, |d| d.0);
        buf.copy_within(end..next, write);
        write += next - end;
    }
    let len = buf.len();
    buf.copy_within(hold_from..len, write);
    buf.truncate(write + (len - hold_from));
    write
}

impl Relay<'_> {
    /// Starts rewriting the client's statement names on this backend.
    pub(super) fn start_tracking(&mut self) {
        self.tracked = true;
        self.now = self.backend.statements.start_relay();
    }

    /// [`Relay::take_client_chunk`] for a tracked client.
    pub(super) fn take_client_chunk_tracked(&mut self) -> Result<(), ProtocolError> {
        if self.client.buf.is_empty() || self.client.buf.len() < self.client_need {
            return Ok(());
        }
        self.client_need = 0;
        if self.answer_deallocate() {
            return Ok(());
        }
        let Some(client) = self.client.tracked.as_deref_mut() else {
            return Ok(());
        };
        let out = &mut client.scratch;
        if out.capacity() == 0 {
            *out = crate::bufpool::take();
        }
        out.clear();
        let mut rw = Rewriter {
            client: &mut client.statements,
            backend: &mut self.backend.statements,
            pipeline: &mut client.pipeline,
            settings: Some(self.desired.now()),
            max: self.max_statements,
            now: self.now,
        };
        let buf = &self.client.buf;
        let t = &mut self.t;
        // `buf[..copied]` is in `out` (as it was, or rewritten).
        let mut copied = 0;
        let mut rewrote = false;
        let mut forward_to = buf.len();
        let (mut terminate, mut requests, mut last_tag) = (false, 0u64, 0u8);
        let mut failed = None;
        let wants_body = |tag, len| match tag {
            frontend_tag::PARSE | frontend_tag::BIND | frontend_tag::DESCRIBE | frontend_tag::CLOSE => true,
            frontend_tag::QUERY => len <= SQL_READ_LIMIT,
            _ => false,
        };
        let presented = self.presented;
        let mut cut = None;
        self.client.scanner.feed(buf, wants_body, |f| {
            if terminate || failed.is_some() || cut.is_some() {
                return;
            }
            last_tag = f.tag;
            let mut query_look = None;
            let rewritten = match f.tag {
                frontend_tag::TERMINATE => {
                    terminate = true;
                    forward_to = t.terminate_at(f.start);
                    return;
                }
                frontend_tag::PARSE | frontend_tag::BIND | frontend_tag::DESCRIBE | frontend_tag::CLOSE => {
                    // Held back until whole (below), so it starts in this chunk.
                    let Some(start) = f.start else {
                        failed = Some(ProtocolError::Malformed("statement message split"));
                        return;
                    };
                    out.extend_from_slice(&buf[copied..start]);
                    copied = f.end;
                    rewrote = true;
                    // Closes an earlier error left owed go first.
                    rw.begin(out);
                    if matches!(f.tag, frontend_tag::BIND | frontend_tag::DESCRIBE) {
                        rw.pipeline.note_extended(false);
                    }
                    match f.tag {
                        frontend_tag::PARSE => {
                            let sql = f.body.split(|&b| b == 0).nth(1).unwrap_or_default();
                            let may_set = session_state::may_pin(sql);
                            // (A DISCARD ALL there pins; when its Execute comes is not
                            // followed, and drivers send it between transactions.)
                            rw.sql(may_set, session_state::drops_statements_looked(sql, may_set, false));
                            let named = f.body.first().is_some_and(|&b| b != 0);
                            let effects = if named { session_state::parse_effects(sql, t.pin_variable_sets) } else { Default::default() };
                            rw.parse(f.body, effects, may_set, out)
                        }
                        frontend_tag::BIND => rw.bind(f.body, out).map(|stmt| {
                            // Running a statement parsed in another transaction: what it does
                            // to the session counts now.
                            if let Some(effects) = stmt.as_ref().and_then(|s| s.effects()) {
                                t.note_effects(effects);
                            }
                        }),
                        tag => rw.describe_or_close(tag, f.body, out),
                    }
                }
                frontend_tag::QUERY => {
                    // (Not read past SQL_READ_LIMIT: settings unsure; the session pins, see `Tracker`.)
                    let sql = f.body.strip_suffix(b"\0").unwrap_or(f.body);
                    let may = session_state::may_pin(sql);
                    rw.sql(f.body.is_empty() || may, session_state::drops_statements_looked(sql, may, t.in_block()));
                    rw.ready(false, rw.pipeline.untracked_unsynced());
                    // (The first look is taken once, for the Tracker too.)
                    query_look = Some(may);
                    Ok(())
                }
                frontend_tag::FUNCTION_CALL => {
                    rw.ready(false, rw.pipeline.untracked_unsynced());
                    Ok(())
                }
                frontend_tag::SYNC => {
                    rw.ready(true, false);
                    rw.pipeline.note_extended(true);
                    Ok(())
                }
                frontend_tag::EXECUTE | frontend_tag::FLUSH => {
                    rw.pipeline.note_extended(false);
                    Ok(())
                }
                frontend_tag::COPY_DONE | frontend_tag::COPY_FAIL => {
                    rw.copy_end();
                    Ok(())
                }
                _ => Ok(()),
            };
            if let Err(e) = rewritten {
                failed = Some(e);
                return;
            }
            let request = match query_look {
                Some(may) => t.client_query(f.body, Some(may)),
                None => t.client_message(f.tag, f.body, true),
            };
            requests += u64::from(request);
            cut = super::reset_cut(t, f.end, presented);
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        // (Forgotten in order, by the Rewriter.)
        self.t.drops_statements = false;
        // A statement message not yet whole waits for the rest; so does everything after a
        // settings reset (`Relay::reset_hold`).
        let mut held = None;
        if let Some(at) = cut {
            forward_to = at;
            held = Some(at);
            self.hold_after_reset();
        } else if !terminate
            && let Some((start, frontend_tag::PARSE | frontend_tag::BIND | frontend_tag::DESCRIBE | frontend_tag::CLOSE, missing)) =
                self.client.scanner.partial()
        {
            self.client.scanner.forget_partial();
            forward_to = start;
            held = Some(start);
            // Not scanned again before it can be whole (a large message arrives in many reads).
            self.client_need = self.client.buf.len() - start + missing;
        }
        self.after_client_chunk(requests, last_tag, terminate, held.is_some());
        let end = if rewrote {
            let Some(client) = self.client.tracked.as_deref_mut() else { return Ok(()) };
            let out = &mut client.scratch;
            out.extend_from_slice(&self.client.buf[copied..forward_to]);
            let end = out.len();
            if let Some(start) = held {
                out.extend_from_slice(&self.client.buf[start..]);
            }
            std::mem::swap(out, &mut self.client.buf);
            end
        } else {
            forward_to
        };
        self.to_backend = Forward { sent: 0, end, flushing: false };
        Ok(())
    }

    /// A chunk that is one Query saying only `DEALLOCATE name` of a statement of the client's
    /// (or, unpinned, `DEALLOCATE ALL`), with nothing owed either way: answered here
    /// ([`prepared::deallocate`]), in the place of the backend's answer, which it then is.
    fn answer_deallocate(&mut self) -> bool {
        let buf = &self.client.buf;
        let t = &self.t;
        let quiet = t.pending == 0
            && !t.unsynced
            && !t.copy_in
            && !t.client_mid_message
            && !self.to_client.busy()
            && self.backend.buf.is_empty()
            && self.backend_scanner.at_boundary();
        let one_query = buf.len() > 5
            && buf[0] == frontend_tag::QUERY
            && self.client.scanner.at_boundary()
            && u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize == buf.len() - 1;
        let Some(client) = self.client.tracked.as_deref_mut() else { return false };
        if !quiet || !one_query || !client.pipeline.is_empty() {
            return false;
        }
        let Some(sql) = buf[5..].strip_suffix(b"\0") else { return false };
        // (Pinned, the backend may hold SQL-level statements DEALLOCATE ALL must drop too.)
        let all_too = !self.session_pinned && t.pins_session.is_none();
        if !prepared::deallocate::answer(&mut client.statements, sql, t.status, all_too, &mut self.backend.buf) {
            return false;
        }
        self.client.buf.clear();
        // (When the relay ends, the client's idle time counts from here.)
        self.backend.last_active = std::time::Instant::now();
        self.t.requests += 1;
        self.t.awaits_reply = false;
        self.to_client = Forward { sent: 0, end: self.backend.buf.len(), flushing: false };
        true
    }
}
