//! The retry budget, as Finagle's and tower's `TpsBudget`: a reserve of
//! `min_per_second × window` retries, and `ratio` of a retry for every
//! request of the last window. Each request deposits, each retry
//! withdraws; a retry the balance cannot cover is refused.
//!
//! It is tower's algorithm with one addition, the reason it is here: its
//! balance can be read ([`RetryBudget::left`]), for the status page's
//! "budget left". The window is ten slots; the slot being written is an
//! atomic, and the lock that turns the slots is taken only when a slot's
//! time is up.

use std::sync::Mutex;
use std::sync::atomic::{AtomicIsize, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Slots in a window.
const SLOTS: u32 = 10;

/// One upstream's retry budget.
pub struct RetryBudget {
    /// The slot being written; held while the slots turn.
    index: Mutex<usize>,
    /// What `began` counts from.
    base: Instant,
    /// When the slot being written began, in nanoseconds after `base`.
    began: AtomicU64,
    /// Set once, never spent: `min_per_second × window` retries.
    reserve: isize,
    /// The window's earlier slots.
    slots: Box<[AtomicIsize]>,
    /// What the current slot has gained and spent.
    current: AtomicIsize,
    slot: Duration,
    /// What a request deposits and a retry withdraws, in whole units:
    /// `ratio` 0.2 is 1 and 5.
    deposit: isize,
    withdraw: isize,
}

impl std::fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryBudget")
            .field("left", &self.left())
            .finish_non_exhaustive()
    }
}

impl RetryBudget {
    /// A budget over `window` (1 to 60 s) of `min_per_second` retries a
    /// second, plus `ratio` (0 to 1000) retries per request.
    pub fn new(window: Duration, min_per_second: u32, ratio: f64) -> Self {
        let window = window.clamp(Duration::from_secs(1), Duration::from_secs(60));
        let ratio = ratio.clamp(0.0, 1000.0);
        let (deposit, withdraw) = if ratio == 0.0 {
            (0, 1)
        } else if ratio <= 1.0 {
            (1, (1.0 / ratio) as isize)
        } else {
            (1000, (1000.0 / ratio) as isize)
        };
        let reserve = isize::try_from(min_per_second)
            .unwrap_or(isize::MAX)
            .saturating_mul(window.as_secs() as isize)
            .saturating_mul(withdraw);
        Self {
            index: Mutex::new(0),
            base: Instant::now(),
            began: AtomicU64::new(0),
            reserve,
            slots: (0..SLOTS).map(|_| AtomicIsize::new(0)).collect(),
            current: AtomicIsize::new(0),
            slot: window / SLOTS,
            deposit,
            withdraw,
        }
    }

    /// A request was sent.
    pub fn deposit(&self) {
        self.turn();
        self.current.fetch_add(self.deposit, Ordering::SeqCst);
    }

    /// Takes a retry from the budget; `false` when it has none left.
    pub fn withdraw(&self) -> bool {
        self.turn();
        if self.balance() >= self.withdraw {
            self.current.fetch_sub(self.withdraw, Ordering::SeqCst);
            true
        } else {
            false
        }
    }

    /// Retries the budget allows now.
    pub fn left(&self) -> u64 {
        self.turn();
        u64::try_from(self.balance() / self.withdraw.max(1)).unwrap_or(0)
    }

    fn balance(&self) -> isize {
        self.slots
            .iter()
            .map(|s| s.load(Ordering::SeqCst))
            .fold(self.current.load(Ordering::SeqCst), isize::saturating_add)
            .saturating_add(self.reserve)
    }

    /// Moves to the next slot when the current one's time is up, and
    /// empties the slots that passed unused.
    fn turn(&self) {
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let now = nanos(Instant::now().saturating_duration_since(self.base));
        let slot = nanos(self.slot);
        if now.saturating_sub(self.began.load(Ordering::Acquire)) < slot {
            return;
        }
        let mut index = self.index.lock().expect("the budget's lock");
        // Another caller may have turned the slots while this one waited.
        let mut elapsed = now.saturating_sub(self.began.load(Ordering::Acquire));
        if elapsed < slot {
            return;
        }
        let written = self.current.swap(0, Ordering::SeqCst);
        self.slots[*index].store(written, Ordering::SeqCst);
        let mut next = (*index + 1) % self.slots.len();
        while elapsed > slot {
            self.slots[next].store(0, Ordering::SeqCst);
            elapsed -= slot;
            next = (next + 1) % self.slots.len();
        }
        *index = next;
        self.began.store(now, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_reserve_and_a_share_of_requests_are_spent_then_renewed() {
        // 1 retry a second over 10 s, and one retry per 5 requests.
        let budget = RetryBudget::new(Duration::from_secs(10), 1, 0.2);
        assert_eq!(budget.left(), 10, "the reserve");
        for _ in 0..10 {
            budget.deposit();
        }
        assert_eq!(budget.left(), 12);
        for left in (0..12).rev() {
            assert!(budget.withdraw());
            assert_eq!(budget.left(), left);
        }
        assert!(!budget.withdraw(), "spent");
        // A window later, what was gained and spent has passed: the
        // reserve is whole again.
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(budget.left(), 10);
        assert!(budget.withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_ratio_only_the_reserve_pays() {
        let budget = RetryBudget::new(Duration::from_secs(1), 2, 0.0);
        for _ in 0..100 {
            budget.deposit();
        }
        assert_eq!(budget.left(), 2);
        assert!(budget.withdraw() && budget.withdraw() && !budget.withdraw());
    }
}
