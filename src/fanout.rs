//! Bounded fan-out on one thread.
//!
//! Every host is one future on the current executor; at most `limit` run at
//! once, and each result is handed to the caller the moment it completes (so
//! output appears in completion order while slow hosts are still working).
//! No thread or process per host: a thousand hosts cost a thousand small
//! futures, of which `limit` hold a socket at any time.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

/// Run `f` over `items`, at most `limit` at once, calling `done` as each finishes.
pub async fn for_each<T, R, Fut>(
    items: impl IntoIterator<Item = T>,
    limit: usize,
    f: impl Fn(T) -> Fut,
    mut done: impl FnMut(R),
) where
    Fut: Future<Output = R>,
{
    let limit = limit.max(1);
    let mut pending = items.into_iter();
    let mut running: Vec<Pin<Box<Fut>>> = Vec::with_capacity(limit);
    std::future::poll_fn(|cx| {
        while running.len() < limit {
            match pending.next() {
                Some(t) => running.push(Box::pin(f(t))),
                None => break,
            }
        }
        let mut i = 0;
        while i < running.len() {
            match running[i].as_mut().poll(cx) {
                Poll::Ready(r) => {
                    drop(running.swap_remove(i));
                    done(r);
                    if let Some(t) = pending.next() {
                        running.push(Box::pin(f(t)));
                    }
                }
                Poll::Pending => i += 1,
            }
        }
        if running.is_empty() { Poll::Ready(()) } else { Poll::Pending }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::time::Duration;

    #[test]
    fn bounded_and_in_completion_order() {
        let live = Cell::new(0usize);
        let peak = Cell::new(0usize);
        let mut order = Vec::new();
        smol::block_on(for_each(
            (0..20u64).rev(),
            4,
            |i| {
                let (live, peak) = (&live, &peak);
                async move {
                    live.set(live.get() + 1);
                    peak.set(peak.get().max(live.get()));
                    smol::Timer::after(Duration::from_millis(5 * i)).await;
                    live.set(live.get() - 1);
                    i
                }
            },
            |r| order.push(r),
        ));
        assert_eq!(order.len(), 20);
        assert_eq!(peak.get(), 4);
        // the shortest sleeps (started last) finish before the first, longest ones
        assert_eq!(order[0], 16, "shortest of the first batch completes first");
    }

    #[test]
    fn empty_input_finishes() {
        let mut n = 0;
        smol::block_on(for_each(Vec::<u8>::new(), 8, |x| async move { x }, |_| n += 1));
        assert_eq!(n, 0);
    }
}
