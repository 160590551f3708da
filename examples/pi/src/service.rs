//! The pi service: the [`Service`] that `pi-service` hands to [`flame_shims::service::run`].

use crate::sampler::{count_inside, SplitMix64};
use crate::wire::{decode_samples, decode_seed, encode_u64};
use flame_shims::service::{Service, SessionContext, TaskContext};

/// Counts points inside the quarter circle, one task at a time.
#[derive(Debug, Default)]
pub struct PiService {
    /// The bound session's seed, or why its common data is not one.
    seed: Option<Result<u64, String>>,
}

impl Service for PiService {
    fn enter_session(&mut self, ctx: &SessionContext) -> Result<(), String> {
        // A bad seed fails each task with the reason instead of refusing the session: a
        // refused enter stops the executor, and the node would only start another one to be
        // refused again, while a failed task reaches the client with the message.
        self.seed = Some(decode_seed(&ctx.common_data));
        Ok(())
    }

    fn invoke(&mut self, ctx: &TaskContext, input: &[u8]) -> Result<Vec<u8>, String> {
        let seed = match &self.seed {
            Some(seed) => seed.clone()?,
            // run_with only invokes between enter and leave.
            None => return Err("task invoked outside a session".to_string()),
        };
        let samples = decode_samples(input)?;
        let mut rng = SplitMix64::for_task(seed, ctx.session_id, ctx.task_id);
        Ok(encode_u64(count_inside(&mut rng, samples)).to_vec())
    }

    fn leave_session(&mut self) -> Result<(), String> {
        self.seed = None;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::sampler::estimate;
    use crate::wire::{decode_inside, SAMPLES_PER_TASK_MAX};
    use flame_protocol::shim::SHIM_FRAME_BYTES_MAX as MAX;
    use flame_protocol::shim::{split_frame, AppFrame, NodeFrame, ResultStatus};
    use flame_shims::service::run_with;

    /// What the service answered to each TaskInvoke, in order: `Ok(output)` or
    /// `Err(message)`. Every other reply must be Ready.
    fn converse(frames: &[NodeFrame<'_>]) -> Vec<Result<Vec<u8>, String>> {
        let mut input = Vec::new();
        for frame in frames {
            frame.encode(&mut input).unwrap();
        }
        let mut output = Vec::new();
        run_with(PiService::default(), &input[..], &mut output).unwrap();
        let mut rest = &output[..];
        let mut results = Vec::new();
        while let Some(raw) = split_frame(rest, MAX).unwrap() {
            match AppFrame::decode(raw.frame_type, raw.body, MAX).unwrap() {
                AppFrame::Ready => {}
                AppFrame::TaskResult {
                    status: ResultStatus::Ok,
                    payload,
                    ..
                } => results.push(Ok(payload.to_vec())),
                AppFrame::TaskResult {
                    status: ResultStatus::Error,
                    payload,
                    ..
                } => results.push(Err(String::from_utf8(payload.to_vec()).unwrap())),
                other => panic!("unexpected reply {other:?}"),
            }
            rest = &rest[raw.consumed..];
        }
        results
    }

    fn enter(session_id: u64, common_data: &[u8]) -> NodeFrame<'_> {
        NodeFrame::SessionEnter {
            session_id,
            common_data,
        }
    }

    fn invoke(task_id: u64, input: &[u8]) -> NodeFrame<'_> {
        NodeFrame::TaskInvoke { task_id, input }
    }

    #[test]
    fn good_input_counts_the_inside_deterministically() {
        let seed = encode_u64(3);
        let samples = encode_u64(100_000);
        let results = converse(&[
            enter(1, &seed),
            invoke(1, &samples),
            invoke(1, &samples),
            invoke(2, &samples),
            NodeFrame::SessionLeave,
            // Empty common data is seed 0: another stream again.
            enter(1, b""),
            invoke(1, &samples),
            NodeFrame::SessionLeave,
        ]);
        let counts: Vec<u64> = results
            .iter()
            .map(|r| decode_inside(r.as_ref().unwrap()).unwrap())
            .collect();
        assert_eq!(counts.len(), 4);
        // The same (seed, session, task) counts the same; a different task or seed does not.
        assert_eq!(counts[0], counts[1]);
        assert_ne!(counts[0], counts[2]);
        assert_ne!(counts[0], counts[3]);
        for count in counts {
            let pi = estimate(count, 100_000);
            assert!((pi - std::f64::consts::PI).abs() < 0.03, "{pi}");
        }
    }

    #[test]
    fn zero_samples_count_zero() {
        let results = converse(&[enter(1, b""), invoke(1, &encode_u64(0))]);
        assert_eq!(results, [Ok(encode_u64(0).to_vec())]);
    }

    #[test]
    fn bad_input_fails_the_task_and_keeps_the_executor() {
        let results = converse(&[
            enter(1, b""),
            invoke(1, b"1000"),
            invoke(2, &encode_u64(SAMPLES_PER_TASK_MAX + 1)),
            invoke(3, &encode_u64(10)),
        ]);
        assert_eq!(
            results[0],
            Err(
                "task input must be the sample count as 8 bytes (a little-endian u64), got 4 bytes"
                    .into()
            )
        );
        assert!(results[1]
            .as_ref()
            .unwrap_err()
            .contains("over the limit of 1000000000 per task"));
        assert!(results[2].is_ok());
    }

    #[test]
    fn a_bad_seed_fails_every_task_of_its_session_only() {
        let results = converse(&[
            enter(1, b"seed"),
            invoke(1, &encode_u64(10)),
            NodeFrame::SessionLeave,
            enter(2, &encode_u64(1)),
            invoke(1, &encode_u64(10)),
        ]);
        assert_eq!(
            results[0],
            Err("session common data must be empty or the seed as 8 bytes (a little-endian u64), got 4 bytes".into())
        );
        assert!(results[1].is_ok());
    }
}
