//! The partitions of a batch a sink gathers between `write_partition` and `commit`.

use std::sync::Mutex;

/// Partitions of the batch being written, in arrival order; taken back in partition order.
pub(crate) struct Pending<T>(Mutex<Vec<(usize, Vec<T>)>>);

impl<T> Default for Pending<T> {
    fn default() -> Self {
        Self(Mutex::new(Vec::new()))
    }
}

impl<T> Pending<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(usize, Vec<T>)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn clear(&self) {
        self.lock().clear();
    }

    pub(crate) fn push(&self, partition: usize, data: Vec<T>) {
        self.lock().push((partition, data));
    }

    /// Every gathered element, partition by partition; leaves nothing behind.
    pub(crate) fn take_in_order(&self) -> Vec<T> {
        let mut parts = std::mem::take(&mut *self.lock());
        parts.sort_by_key(|(i, _)| *i);
        parts.into_iter().flat_map(|(_, p)| p).collect()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn takes_partitions_in_order_once() {
        let p = super::Pending::default();
        p.push(2, vec!['c']);
        p.push(0, vec!['a', 'b']);
        assert_eq!(p.take_in_order(), vec!['a', 'b', 'c']);
        assert!(p.take_in_order().is_empty());
    }
}
