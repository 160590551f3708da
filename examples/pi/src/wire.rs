//! The bytes of a pi session, shared by the client and both services.
//!
//! | where | bytes |
//! |---|---|
//! | session common data | empty (seed 0), or the seed: a `u64`, 8 bytes little-endian |
//! | task input | the sample count: a `u64`, 8 bytes little-endian, at most [`SAMPLES_PER_TASK_MAX`] |
//! | task output | the count of samples inside the quarter circle: a `u64`, 8 bytes little-endian |
//!
//! The error messages are part of the format: `python/pi_service.py` returns the same text
//! for the same mistake, and `tests/stdio.rs` holds both services to it.

/// Most samples one task may draw: a few seconds of work in Rust, minutes in Python. Larger
/// runs are split into more tasks, which is what spreads them over executors in the first
/// place.
pub const SAMPLES_PER_TASK_MAX: u64 = 1_000_000_000;

/// Bytes of every integer in the format.
pub const U64_BYTES: usize = 8;

/// A `u64` as the format carries it.
pub fn encode_u64(value: u64) -> [u8; U64_BYTES] {
    value.to_le_bytes()
}

/// The sample count in a task input.
pub fn decode_samples(input: &[u8]) -> Result<u64, String> {
    let samples = decode_u64(input).ok_or_else(|| {
        format!(
            "task input must be the sample count as 8 bytes (a little-endian u64), got {} bytes",
            input.len()
        )
    })?;
    if samples > SAMPLES_PER_TASK_MAX {
        return Err(format!(
            "{samples} samples is over the limit of {SAMPLES_PER_TASK_MAX} per task; use more tasks with fewer samples each"
        ));
    }
    Ok(samples)
}

/// The seed in a session's common data; empty common data is seed 0.
pub fn decode_seed(common_data: &[u8]) -> Result<u64, String> {
    if common_data.is_empty() {
        return Ok(0);
    }
    decode_u64(common_data).ok_or_else(|| {
        format!(
            "session common data must be empty or the seed as 8 bytes (a little-endian u64), got {} bytes",
            common_data.len()
        )
    })
}

/// The inside count in a task output.
pub fn decode_inside(output: &[u8]) -> Result<u64, String> {
    decode_u64(output).ok_or_else(|| {
        format!(
            "task output must be the inside count as 8 bytes (a little-endian u64), got {} bytes",
            output.len()
        )
    })
}

fn decode_u64(bytes: &[u8]) -> Option<u64> {
    <[u8; U64_BYTES]>::try_from(bytes)
        .ok()
        .map(u64::from_le_bytes)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn u64s_are_eight_bytes_little_endian() {
        assert_eq!(encode_u64(0x0102), [2, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(decode_samples(&encode_u64(1_000_000)).unwrap(), 1_000_000);
        assert_eq!(decode_inside(&encode_u64(u64::MAX)).unwrap(), u64::MAX);
        assert_eq!(decode_seed(&encode_u64(42)).unwrap(), 42);
    }

    #[test]
    fn empty_common_data_is_seed_zero() {
        assert_eq!(decode_seed(b"").unwrap(), 0);
    }

    #[test]
    fn wrong_lengths_name_the_expected_format() {
        let err = decode_samples(b"1000").unwrap_err();
        assert_eq!(
            err,
            "task input must be the sample count as 8 bytes (a little-endian u64), got 4 bytes"
        );
        assert!(decode_samples(b"").unwrap_err().contains("got 0 bytes"));
        assert!(decode_samples(&[0; 9]).unwrap_err().contains("got 9 bytes"));
        let err = decode_seed(&[0; 4]).unwrap_err();
        assert!(
            err.starts_with("session common data must be empty or"),
            "{err}"
        );
        assert!(decode_inside(b"x").unwrap_err().contains("got 1 bytes"));
    }

    #[test]
    fn sample_counts_are_capped() {
        assert_eq!(
            decode_samples(&encode_u64(SAMPLES_PER_TASK_MAX)).unwrap(),
            SAMPLES_PER_TASK_MAX
        );
        let err = decode_samples(&encode_u64(SAMPLES_PER_TASK_MAX + 1)).unwrap_err();
        assert_eq!(
            err,
            "1000000001 samples is over the limit of 1000000000 per task; use more tasks with fewer samples each"
        );
    }
}
