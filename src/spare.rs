//! Per-thread lists of spare byte buffers, one list per size: a buffer is taken while bytes
//! move through it and given back when they stop, so an idle connection holds none and a busy
//! thread does not allocate one per read. Used by the relay's buffers and the TLS read buffer.

use std::cell::RefCell;

/// Spare buffers of one size.
type List = (usize, Vec<Box<[u8]>>);

thread_local! {
    static SPARE: RefCell<Vec<List>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of `size` bytes: a spare one if this thread has one, else a new one.
pub fn take(size: usize) -> Box<[u8]> {
    SPARE
        .with(|s| {
            let mut s = s.borrow_mut();
            s.iter_mut().find(|(n, _)| *n == size)?.1.pop()
        })
        .unwrap_or_else(|| vec![0u8; size].into_boxed_slice())
}

/// Keeps `buf` for this thread's next [`take`] of its size, unless `keep` of that size are
/// kept already.
pub fn give(buf: Box<[u8]>, keep: usize) {
    SPARE.with(|s| {
        let mut s = s.borrow_mut();
        let size = buf.len();
        let i = match s.iter().position(|(n, _)| *n == size) {
            Some(i) => i,
            None => {
                s.push((size, Vec::new()));
                s.len() - 1
            }
        };
        let list = &mut s[i].1;
        if list.len() < keep {
            list.push(buf);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_by_size_and_only_up_to_keep() {
        let a = take(100);
        let b = take(200);
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        give(a, 1);
        give(b, 1);
        let b = take(200);
        assert_eq!(b.as_ptr(), pb, "the spare of that size");
        let again = take(100);
        assert_eq!(again.as_ptr(), pa);
        assert_eq!(again.len(), 100);
        give(again, 1);
        give(vec![0u8; 100].into_boxed_slice(), 1);
        let first = take(100);
        assert_eq!(first.as_ptr(), pa, "the second was not kept");
        let fresh = take(100);
        assert_ne!(fresh.as_ptr(), pa, "nothing spare is left");
    }
}
