//! Read buffers for active clients. An idle client holds no buffer (that is most of what makes
//! an idle client cheap); an active one takes a buffer from a small per-thread free list and
//! gives it back when it goes idle, so the hot path does not pay for an 8 KiB malloc and free
//! per transaction.

use std::cell::RefCell;

use bytes::BytesMut;

/// Size of a client read buffer.
pub const READ_BUFFER: usize = 8192;
/// Buffers kept per worker thread; beyond this they are freed.
const KEEP_PER_THREAD: usize = 64;

thread_local! {
    static FREE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer with at least [`READ_BUFFER`] bytes of room.
pub fn take() -> BytesMut {
    FREE.with(|f| f.borrow_mut().pop()).unwrap_or_else(|| BytesMut::with_capacity(READ_BUFFER))
}

/// Returns a buffer to this thread's free list (or frees it). Buffers that grew large for one
/// big message are freed rather than kept.
pub fn give(mut buf: BytesMut) {
    buf.clear();
    if buf.capacity() < READ_BUFFER || buf.capacity() > 4 * READ_BUFFER {
        return;
    }
    FREE.with(|f| {
        let mut f = f.borrow_mut();
        if f.len() < KEEP_PER_THREAD {
            f.push(buf);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_buffer_is_reused_empty() {
        let mut b = take();
        b.extend_from_slice(b"leftover");
        let ptr = b.as_ptr();
        give(b);
        let again = take();
        assert!(again.is_empty());
        assert_eq!(again.as_ptr(), ptr);
    }

    #[test]
    fn oversized_buffer_is_not_kept() {
        let mut b = BytesMut::with_capacity(1 << 20);
        b.extend_from_slice(b"x");
        give(b);
        assert!(take().capacity() < 1 << 20);
    }
}
