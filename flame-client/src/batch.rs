//! Splitting task inputs into submit batches.

use bytes::Bytes;
use flame_protocol::limits;

/// Bounds on one `SubmitBatch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Payload bytes packed into one batch before the next one starts. An input larger than
    /// this travels alone in its own batch.
    pub bytes_target: usize,
    /// Most inputs in one batch.
    pub tasks_max: usize,
}

impl Default for BatchLimits {
    /// [`limits::SUBMIT_BATCH_BYTES_TARGET`] and [`limits::SUBMIT_BATCH_TASKS_MAX`].
    fn default() -> Self {
        BatchLimits {
            bytes_target: limits::SUBMIT_BATCH_BYTES_TARGET,
            tasks_max: limits::SUBMIT_BATCH_TASKS_MAX,
        }
    }
}

/// Splits `inputs`, in order, into batches that each hold at most `limits.tasks_max` inputs
/// and at most `limits.bytes_target` payload bytes (or a single larger input). Concatenating
/// the batches gives back `inputs`; no batch is empty.
pub fn split_batches(inputs: Vec<Bytes>, limits: BatchLimits) -> Vec<Vec<Bytes>> {
    // A zero bound would make no progress; one input per batch is the least that does.
    let tasks_max = limits.tasks_max.max(1);
    let mut batches = Vec::new();
    let mut current: Vec<Bytes> = Vec::new();
    let mut current_bytes = 0usize;
    for input in inputs {
        let fits_bytes = current_bytes.saturating_add(input.len()) <= limits.bytes_target;
        if !current.is_empty() && (!fits_bytes || current.len() >= tasks_max) {
            batches.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
        current_bytes = current_bytes.saturating_add(input.len());
        current.push(input);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn inputs(sizes: &[usize]) -> Vec<Bytes> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| Bytes::from(vec![i as u8; n]))
            .collect()
    }

    fn sizes(batches: &[Vec<Bytes>]) -> Vec<Vec<usize>> {
        batches
            .iter()
            .map(|b| b.iter().map(Bytes::len).collect())
            .collect()
    }

    #[test]
    fn empty_input_gives_no_batch() {
        assert!(split_batches(Vec::new(), BatchLimits::default()).is_empty());
    }

    #[test]
    fn splits_on_task_count() {
        let limits = BatchLimits {
            bytes_target: 1000,
            tasks_max: 3,
        };
        let batches = split_batches(inputs(&[1; 7]), limits);
        assert_eq!(sizes(&batches), vec![vec![1, 1, 1], vec![1, 1, 1], vec![1]]);
    }

    #[test]
    fn splits_on_bytes_and_keeps_oversized_inputs_alone() {
        let limits = BatchLimits {
            bytes_target: 10,
            tasks_max: 100,
        };
        let batches = split_batches(inputs(&[4, 6, 1, 25, 3, 10, 0]), limits);
        assert_eq!(
            sizes(&batches),
            vec![vec![4, 6], vec![1], vec![25], vec![3], vec![10, 0]]
        );
    }

    #[test]
    fn order_is_preserved_and_bounds_hold() {
        let limits = BatchLimits {
            bytes_target: 64,
            tasks_max: 5,
        };
        let original: Vec<Bytes> = (0..1000u32)
            .map(|i| Bytes::from(vec![0u8; (i % 37) as usize]))
            .enumerate()
            .map(|(i, mut b)| {
                // Make every input distinct so that order is checked, not just sizes.
                let mut v = b.to_vec();
                v.extend_from_slice(&(i as u32).to_le_bytes());
                b = Bytes::from(v);
                b
            })
            .collect();
        let batches = split_batches(original.clone(), limits);
        for b in &batches {
            assert!(!b.is_empty());
            assert!(b.len() <= limits.tasks_max);
            let bytes: usize = b.iter().map(Bytes::len).sum();
            assert!(bytes <= limits.bytes_target || b.len() == 1);
        }
        let flat: Vec<Bytes> = batches.into_iter().flatten().collect();
        assert_eq!(flat, original);
    }

    #[test]
    fn zero_task_bound_still_progresses() {
        let limits = BatchLimits {
            bytes_target: 0,
            tasks_max: 0,
        };
        let batches = split_batches(inputs(&[1, 2]), limits);
        assert_eq!(sizes(&batches), vec![vec![1], vec![2]]);
    }
}
