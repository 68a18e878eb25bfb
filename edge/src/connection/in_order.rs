//! Futures taken in the order they were pushed, without an allocation while none is pending.

use super::*;

/// Futures whose results are taken in the order they were pushed, each with a weight (how
/// many client packets it answers). Holds no allocation while none is pending
/// (`FuturesOrdered` allocates on creation), so idle connections stay small.
pub(super) struct InOrder<F: Future> {
    pending: Option<Box<Pending<F>>>,
}

struct Pending<F: Future> {
    futures: FuturesOrdered<F>,
    weights: VecDeque<usize>,
    weight: usize,
}

impl<F: Future> Default for InOrder<F> {
    fn default() -> Self {
        InOrder { pending: None }
    }
}

impl<F: Future> InOrder<F> {
    pub(super) fn push_back(&mut self, future: F) {
        self.push_weighted(future, 1);
    }

    pub(super) fn push_weighted(&mut self, future: F, weight: usize) {
        let pending = self.pending.get_or_insert_with(|| {
            Box::new(Pending {
                futures: FuturesOrdered::new(),
                weights: VecDeque::new(),
                weight: 0,
            })
        });
        pending.futures.push_back(future);
        pending.weights.push_back(weight);
        pending.weight += weight;
    }

    /// The weights of the futures pending.
    pub(super) fn weight(&self) -> usize {
        self.pending.as_ref().map_or(0, |p| p.weight)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.pending.is_none()
    }

    /// The next result in order; `None` when nothing is pending. A poll function rather than
    /// an `async fn`, whose future would be part of every connection's task.
    pub(super) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<F::Output>> {
        let Some(pending) = self.pending.as_mut() else {
            return Poll::Ready(None);
        };
        let next = std::task::ready!(pending.futures.poll_next_unpin(cx));
        if next.is_some() {
            pending.weight -= pending.weights.pop_front().unwrap_or(0);
        }
        if pending.futures.is_empty() {
            self.pending = None;
        }
        Poll::Ready(next)
    }
}
