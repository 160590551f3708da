//! The core's event loop: it feeds the core its events in batches, with the store
//! writer's reports read first, and routes what each batch produced.

use super::*;

/// Starts the core loop and the store writer; returns the sender that feeds the core.
pub fn start_core(
    mut core: Core,
    store: Store,
    store_rx: mpsc::UnboundedReceiver<StoreRequest>,
    low_space_bytes: u64,
) -> std::io::Result<(mpsc::Sender<Event>, tokio::task::JoinHandle<()>)> {
    let (tx, mut rx) = mpsc::channel::<Event>(CORE_EVENTS_QUEUE_MAX);
    tokio::spawn(measure_free_space(
        store.dir().to_path_buf(),
        low_space_bytes,
        tx.clone(),
    ));
    let commit_tx = tx.clone();
    crate::store::spawn_writer(store, store_rx, move |report| {
        let event = match report {
            WriterEvent::Committed { tokens, result } => Event::Committed { tokens, result },
            WriterEvent::Faulted(fault) => Event::StorageFaulted { fault },
            WriterEvent::Recovered => Event::StorageRecovered,
        };
        // The core drains its queue continuously, so this wait is short; if the core is
        // gone the head is shutting down and there is nobody left to tell.
        let _ = commit_tx.blocking_send(event);
    })?;
    let handle = tokio::spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut cadence = StallMeter::new(std::time::Instant::now(), now_ms());
        loop {
            let first = tokio::select! {
                ev = rx.recv() => match ev {
                    Some(ev) => ev,
                    None => break,
                },
                _ = tick.tick() => Event::Tick,
            };
            let now = now_ms();
            if let Some(stalled_ms) = cadence.turn(std::time::Instant::now(), now) {
                core.handle(Event::Stalled { stalled_ms }, now);
            }
            core.handle(first, now);
            let mut n = 1;
            while n < CORE_EVENTS_PER_BATCH_MAX {
                match rx.try_recv() {
                    Ok(ev) => core.handle(ev, now),
                    Err(_) => break,
                }
                n += 1;
            }
            core.end_batch(now);
        }
    });
    core_flush_initial(&tx);
    Ok((tx, handle))
}

/// Measures the gaps between turns of the core's loop, which turns at least every
/// [`TICK`] while the head runs. Both clocks are read: the monotonic one sees a stop
/// signal or a starved process, the wall clock (which the core's deadlines use) also a
/// frozen VM, whose monotonic clock stands still, and a clock stepped forward.
#[derive(Debug)]
pub(super) struct StallMeter {
    last: std::time::Instant,
    last_wall_ms: u64,
}

impl StallMeter {
    pub(super) fn new(now: std::time::Instant, now_wall_ms: u64) -> StallMeter {
        StallMeter {
            last: now,
            last_wall_ms: now_wall_ms,
        }
    }

    /// A turn of the loop at `now`: how long the head did not run before it, in ms, when
    /// that is at least [`HEAD_STALL_MIN`] beyond the loop's cadence.
    pub(super) fn turn(&mut self, now: std::time::Instant, now_wall_ms: u64) -> Option<u64> {
        let mono_ms = now.saturating_duration_since(self.last).as_millis() as u64;
        let wall_ms = now_wall_ms.saturating_sub(self.last_wall_ms);
        self.last = now;
        self.last_wall_ms = now_wall_ms;
        let gap_ms = mono_ms.max(wall_ms);
        let cadence_ms = TICK.as_millis() as u64;
        let stalled_ms = gap_ms.saturating_sub(cadence_ms);
        (stalled_ms >= HEAD_STALL_MIN.as_millis() as u64).then_some(stalled_ms)
    }
}

/// Reads the data directory's free space every
/// [`crate::storage_fault::FREE_SPACE_CHECK_INTERVAL_MS`] and tells the core, until the
/// core is gone.
pub(super) async fn measure_free_space(
    dir: std::path::PathBuf,
    low_bytes: u64,
    events: mpsc::Sender<Event>,
) {
    use crate::storage_fault::{free_space, DiskSpace, FREE_SPACE_CHECK_INTERVAL_MS};
    let mut every = tokio::time::interval(std::time::Duration::from_millis(
        FREE_SPACE_CHECK_INTERVAL_MS,
    ));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failed = false;
    loop {
        every.tick().await;
        match free_space(&dir) {
            Ok((free_bytes, total_bytes)) => {
                failed = false;
                let space = DiskSpace {
                    free_bytes,
                    total_bytes,
                    low_bytes,
                };
                if events.send(Event::DiskSpace(space)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                if !failed {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot read the data directory's free space");
                }
                failed = true;
            }
        }
    }
}

pub(super) fn core_flush_initial(tx: &mpsc::Sender<Event>) {
    // A first tick makes the core persist start-up changes (the built-in application).
    let _ = tx.try_send(Event::Tick);
}
