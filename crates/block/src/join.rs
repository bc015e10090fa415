//! Futures run together on the calling task (a request's pieces, a quorum's children):
//! no tasks spawned, every result kept in order.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

/// Runs every future of `futs` together until all are done; their results in order.
pub async fn join_all<F: Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut pending: Vec<(usize, Pin<Box<F>>)> = futs.map(Box::pin).enumerate().collect();
    let mut out: Vec<Option<F::Output>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        pending.retain_mut(|(i, f)| match f.as_mut().poll(cx) {
            Poll::Ready(v) => {
                out[*i] = Some(v);
                false
            }
            Poll::Pending => true,
        });
        if pending.is_empty() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::join_all;
    use std::time::Duration;

    #[test]
    fn results_keep_their_order() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let out = rt.block_on(join_all((0..4u64).map(|i| async move {
            tokio::time::sleep(Duration::from_millis(40 - 10 * i)).await;
            i
        })));
        assert_eq!(out, vec![0, 1, 2, 3]);
    }
}
